"""fill.pack_slot writes the bytes the old per-entry ctypes path wrote (the abi structs), so the
kernel sees the same keys and values whichever way a slot is filled."""
from __future__ import annotations

import ctypes as C
import socket

import pytest
from bulkhead.datapath import abi, fill
from bulkhead.datapath.errors import DatapathError
from bulkhead.policy.bundle import Bundle

V4 = b"\0" * 10 + b"\xff\xff" + bytes([198, 18, 1, 77])
V6 = bytes.fromhex("fd000001000000000000000000000005")


def bundle(**kw) -> Bundle:
    d = {"settings": {}, "segments": [], "apps": [], "rules": [], "src_entries": [], "dst_entries": [],
         "policy_entries": []}
    d.update(kw)
    return Bundle(**d)


def test_struct_layouts_match_abi():
    for layout, struct_t in ((fill.SRC_KEY, abi.SrcKey), (fill.DST_KEY, abi.DstKey), (fill.IDENT, abi.Ident),
                             (fill.POL_KEY, abi.PolicyKey), (fill.POL_VAL, abi.PolicyVal),
                             (fill.SNI_KEY, abi.SniKey), (fill.SNI_VAL, abi.SniVal)):
        assert layout.size == C.sizeof(struct_t), struct_t.__name__


def test_entries_pack_as_the_abi_structs():
    b = bundle(
        src_entries=[(3, V4, 128, 7), (2, V6, 64, 9)],
        dst_entries=[(V6, 128, 11, 4), (V4, 120, 12, 5)],
        policy_entries=[(abi.POLICY_PLEN_EXACT, 7, 11, 6, 443, int(abi.Action.ALLOW), 0, 1),
                        (abi.POLICY_PLEN_ANY_PROTO, 7, 12, 17, 53, int(abi.Action.DENY), abi.ACTF_AUDIT, 2),
                        (abi.POLICY_PLEN_ANY_PORT, 9, 11, 17, 53, int(abi.Action.REJECT), 0, 3),
                        (abi.POLICY_PLEN_PORT_BASE + 8, 9, 12, 6, 0x2000, int(abi.Action.L7), 0, 4)],
        sni_entries=[(0x1122334455667788, 7, abi.APP_ANY, 8443, int(abi.Action.ALLOW), 0, 5, 13)],
    )
    packed, flags = fill.pack_slot(b)

    def src(seg, addr, plen):
        k = abi.SrcKey(prefixlen=abi.SEG_BITS + plen, segment_id=seg)
        C.memmove(k.addr, addr, 16)
        return bytes(k)

    def dst(addr, plen):
        k = abi.DstKey(prefixlen=plen)
        C.memmove(k.addr, addr, 16)
        return bytes(k)

    def pk(plen, s, d, proto, port):
        return bytes(abi.PolicyKey(prefixlen=plen, src_app=s, dst_app=d, proto=proto, dport_be=socket.htons(port)))

    def pv(action, fl, rule):
        return bytes(abi.PolicyVal(action=action, flags=fl, rule_id=rule))

    v6_64 = V6[:8] + b"\0" * 8  # a trie key carries only its prefix's bits
    v4_120 = V4[:15] + b"\0"
    assert packed["src_host"] == ([src(3, V4, 128)], [bytes(abi.Ident(app_id=7, segment_id=3))])
    assert packed["src_ident"] == ([src(2, v6_64, 64)], [bytes(abi.Ident(app_id=9, segment_id=2))])
    assert packed["dst_host"] == ([dst(V6, 128)], [bytes(abi.Ident(app_id=11, segment_id=4))])
    assert packed["dst_ident"] == ([dst(v4_120, 120)], [bytes(abi.Ident(app_id=12, segment_id=5))])
    assert packed["pol_exact"] == (
        [pk(abi.POLICY_PLEN_EXACT, 7, 11, 6, 443), pk(abi.POLICY_PLEN_ANY_PROTO, 7, 12, 0, 0),
         pk(abi.POLICY_PLEN_ANY_PORT, 9, 11, 17, 0)],
        [pv(abi.Action.ALLOW, 0, 1), pv(abi.Action.DENY, abi.ACTF_AUDIT, 2), pv(abi.Action.REJECT, 0, 3)])
    assert packed["policy"] == ([pk(abi.POLICY_PLEN_PORT_BASE + 8, 9, 12, 6, 0x2000)], [pv(abi.Action.L7, 0, 4)])
    k = abi.SniKey(name_hash=0x1122334455667788, src_app=7, dst_app=abi.APP_ANY, dport_be=socket.htons(8443),
                   proto=6)
    assert packed["sni_names"] == ([bytes(k)], [bytes(abi.SniVal(action=abi.Action.ALLOW, rule_id=5, app_id=13))])
    assert flags == abi.SLOTF_SRC_LPM | abi.SLOTF_DST_LPM | abi.SLOTF_POL_LPM | abi.SLOTF_SNI_ANY


def test_hosts_only_need_no_trie_flags():
    _, flags = fill.pack_slot(bundle(src_entries=[(1, V4, 128, 1)], dst_entries=[(V6, 128, 2, 2)],
                                     policy_entries=[(abi.POLICY_PLEN_EXACT, 1, 2, 6, 22, 1, 0, 1)]))
    assert flags == 0


def test_trie_port_bits_past_the_prefix_are_cleared():
    packed, _ = fill.pack_slot(bundle(policy_entries=[(abi.POLICY_PLEN_PORT_BASE + 4, 1, 2, 6, 0x1234, 1, 0, 1)]))
    (key,), _ = packed["policy"]
    assert key[-2:] == socket.htons(0x1000).to_bytes(2, "little")


def test_a_bad_prefix_length_is_refused_before_any_write():
    with pytest.raises(DatapathError, match="prefix length 50"):
        fill.pack_slot(bundle(policy_entries=[(50, 1, 2, 6, 22, 1, 0, 1)]))


# ------------------------------------------------------------------ fab_N
T4 = b"\0" * 10 + b"\xff\xff" + bytes([198, 18, 100, 1])  # a transit address, IPv4-mapped
VIP = b"\0" * 10 + b"\xff\xff" + bytes([198, 19, 255, 5])


def fab_key(kind, ident, addr=bytes(16)) -> bytes:
    k = abi.FabKey(kind=kind, id=ident)
    C.memmove(k.addr, addr, 16)
    return bytes(k)


def fab_val(a, b, addr=bytes(16)) -> bytes:
    v = abi.FabVal(a=a, b=b)
    C.memmove(v.addr, addr, 16)
    return bytes(v)


def test_fab_layouts_match_abi():
    assert fill.FAB_KEY.size == C.sizeof(abi.FabKey) == 24
    assert fill.FAB_VAL.size == C.sizeof(abi.FabVal) == 24
    assert fill.SLOT_MAPS["fab"] == (fill.FAB_KEY, fill.FAB_VAL)


def test_fab_entries_and_self_pack_as_the_abi_structs():
    entries = [(int(abi.FAB_VIP), 0, VIP, 12, 5, V4), (int(abi.FAB_REAL), 0, V4, 12, 0, VIP),
               (int(abi.FAB_SEG), 5, bytes(16), 2, 0, bytes(16)), (int(abi.FAB_APP), 12, bytes(16), 5, 2, bytes(16)),
               (int(abi.FAB_PEER), 0, T4, 1, 0, bytes(16)), (int(abi.FAB_GW), 1, bytes(16), 4, 0, T4)]
    packed, flags = fill.pack_slot(bundle(fab_entries=entries), fab_self=(1, 42, T4))
    keys, vals = packed["fab"]
    assert keys == [fab_key(k, i, ka) for k, i, ka, _, _, _ in entries] + [fab_key(abi.FAB_SELF, 0)]
    assert vals == [fab_val(a, b, va) for _, _, _, a, b, va in entries] + [fab_val(1, 42, T4)]
    # the kind is the first little-endian word, SELF's id and key address are zero
    assert keys[-1] == (1).to_bytes(4, "little") + bytes(20)
    assert flags == abi.SLOTF_FABRIC


def test_fabric_flag_only_with_fab_entries():
    _, flags = fill.pack_slot(bundle())
    assert flags & abi.SLOTF_FABRIC == 0
    packed, flags = fill.pack_slot(bundle(), fab_self=(2, 0, bytes(16)))  # a gateway without a device yet
    assert packed["fab"] == ([fab_key(abi.FAB_SELF, 0)], [fab_val(2, 0)]) and flags == abi.SLOTF_FABRIC
    packed, flags = fill.pack_slot(bundle(fab_entries=[(int(abi.FAB_SEG), 1, bytes(16), 1, 0, bytes(16))]))
    assert len(packed["fab"][0]) == 1 and flags == abi.SLOTF_FABRIC


@pytest.mark.parametrize("entries, fab_self, why", [
    ([(int(abi.FAB_SELF), 0, bytes(16), 1, 0, bytes(16))], None, "SELF"),
    ([(int(abi.FAB_SEG), 1, bytes(16), 1, 0, bytes(16))] * 2, None, "twice"),
    ([(int(abi.FAB_PEER), 0, bytes(4), 1, 0, bytes(16))], None, "16 bytes"),
    ([], (1, 0, bytes(4)), "16 bytes"),
])
def test_bad_fab_entries_are_refused_before_any_write(entries, fab_self, why):
    with pytest.raises(DatapathError, match=why):
        fill.pack_slot(bundle(fab_entries=entries), fab_self=fab_self)
