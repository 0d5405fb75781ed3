"""The XDP fast path (bulkhead_forward, tail slot 6): an allowed packet bulkhead does not steer
is forwarded in XDP — bpf_fib_lookup, new MACs, TTL - 1 with the checksum the kernel would
write, XDP_REDIRECT — or passes to the stack, counted by why, with the segment mark that makes
the plumbing skip conntrack (BH_MARK_SEG | the segment it leaves by), except local delivery.

On a kernel without bpf_xdp_adjust_meta (the BH_NO_XDP_META build, `xdp.meta` False) the
fast path runs the same (its input travels in the per-CPU meta_handoff) and redirects the same,
but nothing goes in front of what it passes up: bulkhead_tc (run here on the frame) finds the
flow entry itself and must still give the stack the mark a packet needs (tests below).

Routes and neighbours are added to the session namespace for each test and removed after:

    core  198.19.0.1/24, fd00:19::1/64; payments (PAY4/PAY6) has a static neighbour, db none
    lo    catalog's address (CAT4): local, as if the gateway served it
    table 0x0b000001 (prod's segment table, as the plumbing keeps it): 198.18.1.0/24 via prod,
          client C4 a static neighbour on prod
    table 0x0b000002 (dev's): 198.18.1.0/24 via dev, C4 a static neighbour on dev too (dev's
          client has prod's address; the main table's connected route says prod)

A second build (BH_FIB_TBID set to an unknown bit) runs the fallback for kernels without
BPF_FIB_LOOKUP_TBID: the main table, taken only where it leaves by the client's segment.
"""
from __future__ import annotations

import contextlib
import os
import struct

import pytest
from bulkhead.datapath import abi, loader
from pyroute2 import IPRoute
from scapy.all import IP, TCP, Dot1Q, Ether, IPv6, raw

from .conftest import (
    APP_LAPTOPS,
    APP_PAY,
    BASE_POLICY,
    C4,
    C6,
    CAT4,
    DB4,
    EV,
    GW_MAC,
    PAY4,
    PAY6,
    SEG_DEV,
    SEG_PROD,
    A,
    E,
    R,
    X,
    Xdp,
    base_bundle,
    pol,
)
from .conftest import TCP as P_TCP
from .test_xdp_flows import frag4

META = struct.Struct("=III")  # struct bh_meta: magic, mark, flags
PAY_MAC, CLIENT_NEIGH_MAC, DEV_NEIGH_MAC = "02:00:00:00:00:10", "02:00:00:00:00:11", "02:00:00:00:00:12"
NUD_PERMANENT = 0x80
PROD_TABLE = abi.MARK_SEG | SEG_PROD
DEV_TABLE = abi.MARK_SEG | SEG_DEV
FWD_EVENTS = {e for e in EV if e.name.startswith("FWD_")}


def mac(ifname: str) -> str:
    with IPRoute() as ipr:  # the session namespace's link (sysfs shows the host's)
        return ipr.get_links(ifname=ifname)[0].get_attr("IFLA_ADDRESS")


def set_redirect(xdp, ifname: str, ok: bool) -> None:
    xdp.dp.set_reject_path(xdp.ifindex[ifname], abi.RejectPath.XDP_TX, redirect_ok=ok)


@contextlib.contextmanager
def routes(xdp):
    """The session namespace with the routes and neighbours above, core, prod and dev redirect targets."""
    idx = xdp.ifindex
    with IPRoute() as ipr, contextlib.ExitStack() as undo:
        def add(kind, cmd_del, **kw):
            getattr(ipr, kind)("add", **kw)
            undo.callback(lambda: getattr(ipr, kind)(cmd_del, **kw))

        add("addr", "del", index=idx["core"], address="198.19.0.1", prefixlen=24)
        add("addr", "del", index=idx["core"], address="fd00:19::1", prefixlen=64, flags=0x80)  # nodad
        add("addr", "del", index=idx["lo"], address=CAT4, prefixlen=32)
        add("neigh", "del", dst=PAY4, lladdr=PAY_MAC, ifindex=idx["core"], state=NUD_PERMANENT)
        add("neigh", "del", dst=PAY6, lladdr=PAY_MAC, ifindex=idx["core"], state=NUD_PERMANENT)
        add("neigh", "del", dst=C4, lladdr=CLIENT_NEIGH_MAC, ifindex=idx["prod"], state=NUD_PERMANENT)
        add("route", "del", dst="198.18.1.0/24", oif=idx["prod"], table=PROD_TABLE)
        # dev's client has prod's address: the main table's connected route says prod, dev's table dev.
        add("neigh", "del", dst=C4, lladdr=DEV_NEIGH_MAC, ifindex=idx["dev"], state=NUD_PERMANENT)
        add("route", "del", dst="198.18.1.0/24", oif=idx["dev"], table=DEV_TABLE)
        for name in ("core", "prod", "dev"):
            set_redirect(xdp, name, True)
            undo.callback(set_redirect, xdp, name, False)
        yield xdp


@pytest.fixture
def routed(xdp):
    with routes(xdp) as x:
        yield x


@pytest.fixture(scope="module")
def no_tbid_session(xdp_session):
    """The program built with an unknown bit as BPF_FIB_LOOKUP_TBID: every table lookup is refused
    (-EINVAL), as on a kernel without the flag, so the fallback runs on this one."""
    pin = loader.PIN_ROOT / f"test-bpf-notbid-{os.getpid()}"
    with contextlib.ExitStack() as stack:
        loader.remove_pins(pin)
        stack.callback(loader.remove_pins, pin)
        dp = loader.Datapath(pin, defines=("BH_FIB_TBID=(1U<<30)",))
        stack.callback(lambda: dp.bpf and dp.bpf.cleanup())
        dp.load()
        yield Xdp(dp, xdp_session.ifindex, xdp_session.ns_fd, xdp_session.orig_ns_fd)


@pytest.fixture
def routed_no_tbid(no_tbid_session):
    no_tbid_session.reset()
    with no_tbid_session.inside(), routes(no_tbid_session) as x:
        yield x


def fwd_events(v) -> dict:
    return {e.name: n for e, n in v.events.items() if e in FWD_EVENTS}


def redirected(v, frame, out_if: str, dmac: str):
    """The frame as the kernel would forward it: new MACs, TTL - 1, the IPv4 checksum valid."""
    out = Ether(v.data_out)
    assert (out.dst, out.src) == (dmac, mac(out_if))
    sent = Ether(raw(frame))
    if IP in sent:
        assert out[IP].ttl == sent[IP].ttl - 1
        fixed = out[IP].copy()
        fixed.chksum = None
        assert out[IP].chksum == IP(raw(fixed))[IP].chksum  # what a fresh computation gives
        out[IP].ttl, out[IP].chksum = sent[IP].ttl, sent[IP].chksum
    else:
        assert out[IPv6].hlim == sent[IPv6].hlim - 1
        out[IPv6].hlim = sent[IPv6].hlim
    assert raw(out)[12:] == raw(sent)[12:], "only MACs and TTL change"
    assert fwd_events(v) == {"FWD_REDIRECT": 1}


def tc(xdp, frame, ifname: str, mark: int = 0):
    """bulkhead_tc on `frame` arriving on `ifname` (test_xdp_fabric.run_tc; imported here, as
    that module imports this one)."""
    from .test_xdp_fabric import run_tc

    return run_tc(xdp, frame, ifname, mark=mark)


def marked(v, frame, out_seg: int, reason: str, xdp: Xdp, ifname: str):
    """Passed to the stack unchanged. With XDP metadata: behind metadata with BH_MARK_SEG | out_seg
    (flags cleared). Without (BH_NO_XDP_META): nothing in front, and bulkhead_tc on ingress
    (`ifname`, from the flow entry) passes it with that same mark in skb->mark, the bits of
    others' kept (a reply must still leave by its client's segment's table, and skip conntrack:
    conntrack never saw the forward direction, XDP redirected it)."""
    if xdp.meta:
        assert len(v.data_out) == META.size + len(raw(frame))
        assert META.unpack(v.data_out[: META.size]) == (abi.META_MAGIC, abi.MARK_SEG | out_seg, 0)
        assert v.data_out[META.size:] == raw(frame)
    else:
        assert v.data_out == raw(frame), "nothing in front of the frame"
        t = tc(xdp, frame, ifname, mark=0x00AB0000)
        assert (t.code, t.out, t.reasons) == (0, raw(frame), {}), "TC passes it as it is"
        assert t.mark == 0x00AB0000 | abi.MARK_SEG | out_seg, f"skb->mark {t.mark:#010x}"
    assert fwd_events(v) == {reason: 1}


def test_established_flow_is_redirected_v4(routed):
    syn = E / IP(src=C4, dst=PAY4, ttl=64) / TCP(sport=40000, dport=443, flags="S")
    redirected(routed.expect(syn, "prod", X.REDIRECT, R.ALLOW_RULE), syn, "core", PAY_MAC)
    ack = E / IP(src=C4, dst=PAY4, ttl=17) / TCP(sport=40000, dport=443, flags="A")
    redirected(routed.expect(ack, "prod", X.REDIRECT, R.ALLOW_RULE), ack, "core", PAY_MAC)


def test_established_flow_is_redirected_v6(routed):
    syn = E / IPv6(src=C6, dst=PAY6, hlim=64) / TCP(sport=40000, dport=443, flags="S")
    redirected(routed.expect(syn, "prod", X.REDIRECT, R.ALLOW_RULE), syn, "core", PAY_MAC)
    ack = E / IPv6(src=C6, dst=PAY6, hlim=9) / TCP(sport=40000, dport=443, flags="A")
    redirected(routed.expect(ack, "prod", X.REDIRECT, R.ALLOW_RULE), ack, "core", PAY_MAC)


DEV_PAY = pol(APP_LAPTOPS, APP_PAY, P_TCP, 8443, A.ALLOW, 99)


def dev_flow(x, sport: int):
    """laptops (dev, 198.18.1.5 like prod's web) -> payments tcp/8443, allowed for the test; its SYN-ACK."""
    x.apply(base_bundle(policy=BASE_POLICY + [DEV_PAY]))
    x.expect(E / IP(src=C4, dst=PAY4) / TCP(sport=sport, dport=8443, flags="S"), "dev", X.REDIRECT, R.ALLOW_RULE)
    return Ether(src=PAY_MAC, dst=GW_MAC) / IP(src=PAY4, dst=C4, ttl=64) / TCP(sport=8443, dport=sport, flags="SA")


def test_reply_leaves_by_the_client_segments_table(routed):
    """dev's client shares prod's address: the main table would send the reply out of prod, dev's
    table out of dev. It leaves by dev, to dev's neighbour: looked up in dev's table."""
    synack = dev_flow(routed, 40001)
    redirected(routed.expect(synack, "core", X.REDIRECT, R.ALLOW_REPLY), synack, "dev", DEV_NEIGH_MAC)


def test_without_table_lookups_a_reply_via_the_main_table_is_redirected(routed_no_tbid):
    """Kernel without BPF_FIB_LOOKUP_TBID: the main table's answer is taken where it leaves by the
    client's segment (prod's reply: prod)."""
    x = routed_no_tbid
    x.expect(E / IP(src=C4, dst=PAY4) / TCP(sport=40011, dport=443, flags="S"), "prod", X.REDIRECT, R.ALLOW_RULE)
    synack = Ether(src=PAY_MAC, dst=GW_MAC) / IP(src=PAY4, dst=C4, ttl=64) / TCP(sport=443, dport=40011, flags="SA")
    redirected(x.expect(synack, "core", X.REDIRECT, R.ALLOW_REPLY), synack, "prod", CLIENT_NEIGH_MAC)


def test_without_table_lookups_a_reply_for_another_segment_goes_to_the_stack(routed_no_tbid):
    """...and not where it leaves by another: dev's reply (main says prod) goes up marked with dev's
    segment, for the ip rule to route by dev's table."""
    synack = dev_flow(routed_no_tbid, 40012)
    marked(routed_no_tbid.expect(synack, "core", X.PASS, R.ALLOW_REPLY), synack, SEG_DEV, "FWD_OTHER_SEGMENT",
           routed_no_tbid, "core")


def _ids_for_checksum_carry() -> list[int]:
    """IP ids whose header checksum makes the TTL decrement carry (checksum + 0x0100 > 0xffff)."""
    hdr = bytearray(raw(IP(src=C4, dst=PAY4, id=0, ttl=64, chksum=0) / TCP(sport=40002, dport=443, flags="A"))[:20])
    out = []
    for ident in range(65536):
        hdr[4:6] = ident.to_bytes(2, "big")
        s = sum(struct.unpack("!10H", hdr))
        s = (s & 0xffff) + (s >> 16)
        if (~((s & 0xffff) + (s >> 16))) & 0xffff >= 0xff00:
            out.append(ident)
            if len(out) == 2:
                break
    return out


@pytest.mark.parametrize("ident", [0, 1, 0x1234, *_ids_for_checksum_carry()])
def test_ttl_checksum_as_the_kernel_writes_it(routed, ident):
    routed.expect(E / IP(src=C4, dst=PAY4) / TCP(sport=40002, dport=443, flags="S"), "prod", X.REDIRECT, R.ALLOW_RULE)
    ack = E / IP(src=C4, dst=PAY4, id=ident, ttl=64) / TCP(sport=40002, dport=443, flags="A")
    redirected(routed.expect(ack, "prod", X.REDIRECT, R.ALLOW_RULE), ack, "core", PAY_MAC)


def test_unresolved_neighbour_goes_to_the_stack(routed):
    """db (web -> db tcp: allow) is routed by core but has no neighbour entry: the stack resolves it."""
    syn = E / IP(src=C4, dst=DB4) / TCP(sport=40003, dport=5432, flags="S")
    marked(routed.expect(syn, "prod", X.PASS, R.ALLOW_RULE), syn, 0, "FWD_NO_NEIGH", routed, "prod")


def test_egress_that_cannot_take_xdp_frames_goes_to_the_stack(routed):
    set_redirect(routed, "core", False)
    syn = E / IP(src=C4, dst=PAY4) / TCP(sport=40004, dport=443, flags="S")
    marked(routed.expect(syn, "prod", X.PASS, R.ALLOW_RULE), syn, 0, "FWD_NO_TARGET", routed, "prod")


def test_reply_marked_with_the_client_segment_when_it_goes_to_the_stack(routed):
    routed.expect(E / IP(src=C4, dst=PAY4) / TCP(sport=40005, dport=443, flags="S"), "prod",
                  X.REDIRECT, R.ALLOW_RULE)
    set_redirect(routed, "prod", False)
    synack = Ether(src=PAY_MAC, dst=GW_MAC) / IP(src=PAY4, dst=C4) / TCP(sport=443, dport=40005, flags="SA")
    marked(routed.expect(synack, "core", X.PASS, R.ALLOW_REPLY), synack, SEG_PROD, "FWD_NO_TARGET", routed, "core")


@pytest.mark.parametrize("frame", [
    pytest.param(E / IP(src=C4, dst=PAY4, ttl=1) / TCP(sport=40006, dport=443, flags="S"), id="ttl-1"),
    pytest.param(E / IPv6(src=C6, dst=PAY6, hlim=1) / TCP(sport=40006, dport=443, flags="S"), id="hop-limit-1"),
    pytest.param(E / IP(src=C4, dst=PAY4, options=b"\x01\x01\x01\x00") / TCP(sport=40006, dport=443, flags="S"),
                 id="ip-options"),
    pytest.param(Ether(src="02:00:00:00:00:01", dst=GW_MAC) / Dot1Q(vlan=7) / IP(src=C4, dst=PAY4)
                 / TCP(sport=40006, dport=443, flags="S"), id="vlan-tag"),
    pytest.param(frag4(443, 77, 0, True), id="first-fragment"),
])
def test_packets_the_kernel_must_handle_go_to_the_stack(routed, frame):
    v = routed.expect(frame, "prod", X.PASS, R.ALLOW_RULE)
    assert fwd_events(v) == {"FWD_PACKET": 1}
    assert v.data_out[-len(raw(frame)):] == raw(frame), "passed unchanged"
    if not routed.meta:
        # BH_NO_XDP_META: nothing in front; bulkhead_tc gives skb->mark what the metadata would have carried.
        assert v.data_out == raw(frame), "nothing in front of the frame"
        # TC ingress gets a tagged frame untagged (__netif_receive_skb_core: skb_vlan_untag, the tag
        # in skb->vlan_tci, before sch_handle_ingress); a test run can't set vlan_tci, so: the frame untagged.
        seen = Ether(raw(frame))
        if Dot1Q in seen:
            seen = Ether(src=seen.src, dst=seen.dst, type=seen[Dot1Q].type) / seen[Dot1Q].payload
        t = tc(routed, raw(seen), "prod", mark=0x00AB0000)
        assert (t.code, t.out, t.reasons) == (0, raw(seen), {}), "TC passes it as it is"
        if IP in Ether(raw(frame)) and Ether(raw(frame))[IP].flags.MF:
            assert t.mark == 0x00AB0000, "a fragment keeps conntrack (its later fragments carry no mark)"
        else:
            assert t.mark == 0x00AB0000 | abi.MARK_SEG, "to the stack, skipping conntrack"
        return
    magic, mark, flags = META.unpack(v.data_out[: META.size])
    if IP in Ether(raw(frame)) and Ether(raw(frame))[IP].flags.MF:
        assert magic != abi.META_MAGIC, "a fragment keeps conntrack (its later fragments carry no mark)"
    else:
        assert (magic, mark, flags) == (abi.META_MAGIC, abi.MARK_SEG, 0), "to the stack, skipping conntrack"


def pseudo_sum(src: str, dst: str, proto: int, l4_len: int) -> int:
    """What a sender leaving the checksum to offload writes: the pseudo-header's folded sum."""
    import ipaddress

    words = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    s = sum(struct.unpack(f"!{len(words) // 2}H", words)) + proto + l4_len
    while s > 0xffff:
        s = (s & 0xffff) + (s >> 16)
    return s


@pytest.mark.parametrize("frame", [
    pytest.param(E / IP(src=C4, dst=PAY4) / TCP(sport=40010, dport=443, flags="S", chksum=pseudo_sum(C4, PAY4, 6, 20)),
                 id="tcp-v4"),
    pytest.param(E / IPv6(src=C6, dst=PAY6) / TCP(sport=40010, dport=443, flags="S", chksum=pseudo_sum(C6, PAY6, 6, 20)),
                 id="tcp-v6"),
])
def test_checksum_left_to_offload_goes_to_the_stack(routed, frame):
    """A local socket behind a veth leaves its checksum to offload (CHECKSUM_PARTIAL); a
    redirected XDP frame would lose that note and arrive broken. The stack finishes it."""
    marked(routed.expect(frame, "prod", X.PASS, R.ALLOW_RULE), frame, 0, "FWD_CSUM_PARTIAL", routed, "prod")


def test_local_delivery_keeps_conntrack(routed):
    """catalog's address is the gateway's own (on lo): not forwarded, so the packet passes without
    the notrack mark (the gateway's replies are routed back by conntrack's mark). With metadata
    the mark is withdrawn (magic cleared); without (BH_NO_XDP_META) nothing is in front and
    bulkhead_tc gives it no mark either."""
    syn = E / IP(src=C4, dst=CAT4) / TCP(sport=40007, dport=80, flags="S")
    v = routed.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    assert fwd_events(v) == {"FWD_LOCAL": 1}
    if routed.meta:
        meta = v.data_out[: -len(raw(syn))]
        assert len(meta) == META.size and META.unpack(meta)[0] != abi.META_MAGIC, "the mark is withdrawn"
    else:
        assert v.data_out == raw(syn), "nothing in front of the frame"
        t = tc(routed, syn, "prod", mark=0x00AB0000)
        assert (t.code, t.out, t.mark, t.reasons) == (0, raw(syn), 0x00AB0000, {}), "no mark from TC"


def test_no_fastpath_flag_passes_everything_plainly(routed):
    routed.dp.set_ctl_flags(set_bits=abi.CTL_NO_FASTPATH)
    try:
        syn = E / IP(src=C4, dst=PAY4) / TCP(sport=40008, dport=443, flags="S")
        v = routed.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
        assert v.data_out == raw(syn) and not fwd_events(v)
    finally:
        routed.dp.set_ctl_flags(clear_bits=abi.CTL_NO_FASTPATH)


def test_denied_and_steered_packets_never_take_it(routed):
    """A steered packet passes with the L7 mark: in its metadata, or (BH_NO_XDP_META: nothing in
    front) set by bulkhead_tc from the flow entry."""
    routed.dp.set_ctl_flags(set_bits=abi.CTL_L7_READY)
    steered = E / IP(src=C4, dst=PAY4) / TCP(sport=40009, dport=80, flags="S")
    v = routed.expect(steered, "prod", X.PASS, R.L7_STEER)
    assert not fwd_events(v)
    if routed.meta:
        assert META.unpack(v.data_out[: META.size])[1] == abi.MARK_L7 | SEG_PROD
    else:
        assert v.data_out == raw(steered), "nothing in front of the frame"
        t = tc(routed, steered, "prod", mark=0x00AB0000 | abi.MARK_SEG)
        assert (t.code, t.out, t.reasons) == (0, raw(steered), {})
        assert t.mark == 0x00AB0000 | abi.MARK_L7 | SEG_PROD
    denied = E / IP(src=C4, dst=PAY4) / TCP(sport=40009, dport=23, flags="S")
    assert not fwd_events(routed.expect(denied, "prod", X.DROP, R.DENY_RULE))

