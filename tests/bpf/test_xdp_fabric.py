"""The fabric in the datapath (fab_N, bh_fab_flow, bh_fab_handoff, bulkhead_tc), on crafted frames.

A service address (VIP) of a published app: XDP judges the flow as one to the app, keys the
forward entry on what the client sends (the VIP) with FLOWF_NAT and the reply entry on what
the app sends back (its real address) with NAT|REPLY, and passes the packet up with bulkhead
metadata {magic, BH_MARK_SEG | out segment, METAF_FABRIC} -- never through the fast path. TC
(bulkhead_tc) finds the entry again and rewrites the address with the skb checksum helpers:
the forward destination VIP -> real, the reply source real -> VIP. On a kernel without
bpf_xdp_adjust_meta (the BH_NO_XDP_META build, `xdp.meta` False) nothing is in front of the
packet: bulkhead_tc finds the entry by itself (bh_tc_nometa), so where these tests check what
XDP handed over, they run bulkhead_tc on the frame and check it translates / encapsulates, and
gives a packet it leaves to the stack the mark the metadata would have carried.

Transit: a destination whose segment is behind another gateway (fab SEG entry) gets
FLOWF_TRANSIT on both entries, is dropped as transit_no_tunnel without a transit device
(SELF.b == 0; no SELF at all is one gateway for the whole policy: nothing tunnelled), and carries
no fragments (frag_no_flow).

The fab_N entries are hand-built over the session topology (conftest.base_bundle), as the
rest of tests/bpf does; one test compiles a YAML policy to check that what the compiler
emits (Bundle.fab_entries, for_gateway) drives the same datapath.

    VIP4 / VIP6        -> payments (PAY4 / PAY6, segment core, this gateway)
    FAR_VIP4           -> far (FAR4, segment 4 "far", behind gateway 2)
    gateway 1 (SELF)   transit 198.18.100.1     gateway 2   transit 198.18.100.2

bulkhead_tc is run with BPF_PROG_TEST_RUN on an skb: ctx.ifindex picks the device (so
skb->ifindex, the segment TC looks the flow up in); the skb test run takes no XDP metadata,
so TC sees these packets as ones "without bulkhead metadata while the slot has
SLOTF_FABRIC" -- the branch that looks every such packet up (on a BH_NO_XDP_META build,
bh_tc_nometa: the only branch there is). The branch with metadata (METAF_FABRIC, SLOT1 choosing
the slot) can't be reached from a test run.
"""
from __future__ import annotations

import ctypes as C
import dataclasses
import ipaddress
import struct

import pytest
from bulkhead.datapath import abi, libbpf, loader
from bulkhead.datapath.flowtable import FlowTable
from bulkhead.policy import load_policy
from scapy.all import (
    ICMP,
    IP,
    TCP,
    UDP,
    Ether,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    Raw,
    raw,
)

from .conftest import (
    APP_CAT,
    APP_DB,
    APP_LAPTOPS,
    APP_PAY,
    APP_WEB,
    C4,
    C6,
    CAT4,
    EV,
    PAY4,
    PAY6,
    RULE_PAY_DNS,
    RULE_PAY_HTTPS,
    RULE_PAY_ICMP,
    SEG_CORE,
    SEG_DEV,
    SEG_PROD,
    A,
    E,
    R,
    X,
    base_bundle,
    pol,
)
from .conftest import ICMP as P_ICMP
from .conftest import ICMP6 as P_ICMP6
from .conftest import TCP as P_TCP
from .conftest import UDP as P_UDP
from .test_xdp_fastpath import routes
from .test_xdp_reject_path import SkBuff

META = struct.Struct("=III")  # struct bh_meta: magic, mark, flags
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
FAB_FLAGS = abi.FLOWF_NAT | abi.FLOWF_TRANSIT | abi.FLOWF_REPLY
FWD_EVENTS = {e for e in EV if e.name.startswith("FWD_")}

VIP4, VIP6 = "198.19.100.10", "fd00:100::10"  # payments' service addresses
SEG_FAR, APP_FAR = 4, 6  # a segment behind gateway 2, and its app
FAR4, FAR6 = "198.19.50.10", "fd00:50::10"
FAR_VIP4 = "198.19.100.50"  # far's service address: translated here, then through the transit
GW_ME, GW_OTHER = 1, 2
T_ME, T_OTHER = "198.18.100.1", "198.18.100.2"
RULE_FAR_HTTPS, RULE_FAR_UDP = 30, 31


def a16(addr: str) -> bytes:
    return loader.v4mapped(ipaddress.ip_address(addr))


Z16 = bytes(16)


def vip_entries(vip: str, real: str, app: int, seg: int) -> tuple[list, list]:
    """(fab entries, dst entries) the compiler makes for one service address."""
    fab = [(abi.FAB_VIP, 0, a16(vip), app, seg, a16(real)), (abi.FAB_REAL, 0, a16(real), app, 0, a16(vip))]
    return fab, [(a16(vip), 128, app, seg)]


def fabric_bundle(transit: bool = False, vips: bool = True, policy: list | None = None):
    """The session topology with payments published (VIP4, VIP6); with `transit`, also gateways
    1 (this one: prod, dev, core) and 2 (segment far, app far, published as FAR_VIP4)."""
    b = base_bundle(policy=policy)
    fab, dst, src, apps = [], list(b.dst_entries), list(b.src_entries), list(b.apps)
    pols = list(b.policy_entries)
    if vips:
        for vip, real in ((VIP4, PAY4), (VIP6, PAY6)):
            f, d = vip_entries(vip, real, APP_PAY, SEG_CORE)
            fab += f
            dst += d
    if transit:
        for addr in (FAR4, FAR6):
            src.append((SEG_FAR, a16(addr), 128, APP_FAR))
            dst.append((a16(addr), 128, APP_FAR, SEG_FAR))
        apps.append({"id": APP_FAR, "name": "far", "segment": "far", "addresses": [f"{FAR4}/32", f"{FAR6}/128"],
                     "ports": [], "hostnames": []})
        if vips:
            f, d = vip_entries(FAR_VIP4, FAR4, APP_FAR, SEG_FAR)
            fab += f
            dst += d
        if policy is None:
            pols += [pol(APP_WEB, APP_FAR, P_TCP, 443, A.ALLOW, RULE_FAR_HTTPS),
                     pol(APP_WEB, APP_FAR, P_UDP, None, A.ALLOW, RULE_FAR_UDP)]
        fab += [(abi.FAB_SEG, s, Z16, GW_ME, 0, Z16) for s in (SEG_PROD, SEG_DEV, SEG_CORE)]
        fab += [(abi.FAB_SEG, SEG_FAR, Z16, GW_OTHER, 0, Z16)]
        fab += [(abi.FAB_APP, app, Z16, seg, GW_ME, Z16)
                for app, seg in ((APP_WEB, SEG_PROD), (APP_LAPTOPS, SEG_DEV), (APP_PAY, SEG_CORE),
                                 (APP_CAT, SEG_CORE), (APP_DB, SEG_CORE))]
        fab += [(abi.FAB_APP, APP_FAR, Z16, SEG_FAR, GW_OTHER, Z16)]
        for gw, addr in ((GW_ME, T_ME), (GW_OTHER, T_OTHER)):
            fab += [(abi.FAB_PEER, 0, a16(addr), gw, 0, Z16), (abi.FAB_GW, gw, Z16, 4, 0, a16(addr))]
    return dataclasses.replace(b, src_entries=src, dst_entries=dst, apps=apps, policy_entries=pols,
                               fab_entries=fab)


def self_entry(xdp, tunnel: bool = True) -> tuple[int, int, bytes]:
    """This gateway's SELF: gateway 1, a transit device (any interface no segment names), T_ME."""
    return GW_ME, xdp.ifindex["dev-p"] if tunnel else 0, a16(T_ME)


def slot_flag(xdp) -> int:
    return abi.METAF_SLOT1 if xdp.dp.ctl().active_slot & 1 else 0


def handed_to_tc(xdp, v, frame, out_seg: int, ifname: str, src: str | None = None, dst: str | None = None,
                 encap: bool = False) -> None:
    """Passed unchanged (XDP rewrites nothing), behind metadata for bulkhead_tc's fabric part,
    and not forwarded by the fast path (no FORWARD flag, no FWD_* event).

    Without XDP metadata (BH_NO_XDP_META): nothing in front, so bulkhead_tc run on the frame
    arriving on `ifname` must find the flow itself: the address translated (`src`/`dst`: what
    it becomes; the caller checks a port translation itself), then with `encap` sent through
    the transit device (TC_ACT_REDIRECT, transit_encap, our mark gone), else left to the stack
    (no route in these fixtures) with BH_MARK_SEG | out_seg, as the metadata would have set it."""
    assert X(v.retval) == X.PASS
    if xdp.meta:
        assert len(v.data_out) == META.size + len(raw(frame))
        assert META.unpack(v.data_out[: META.size]) == (
            abi.META_MAGIC, abi.MARK_SEG | out_seg, abi.METAF_FABRIC | slot_flag(xdp))
        assert v.data_out[META.size:] == raw(frame)
    else:
        assert v.data_out == raw(frame), "nothing in front of the frame"
        t = run_tc(xdp, frame, ifname, mark=0x00AB0000)
        assert t.reasons == {}, t.reasons
        if src or dst:
            translated(t.out, frame, src=src, dst=dst)
        if encap:
            assert (t.code, t.events.get(EV.TRANSIT_ENCAP)) == (TC_ACT_REDIRECT, 1)
            assert t.mark == 0x00AB0000, "our mark goes: the outer packet is routed by the underlay"
        else:
            assert (t.code, t.events.get(EV.TRANSIT_ENCAP)) == (TC_ACT_OK, None)
            assert t.mark == 0x00AB0000 | abi.MARK_SEG | out_seg, (
                f"skb->mark {t.mark:#010x}: not the segment mark the metadata carries")
    assert not FWD_EVENTS & set(v.events), v.events


def not_fabric(v, frame) -> None:
    """Judged as a plain flow: the fast path took it (FWD_* events), no fabric metadata in front."""
    assert FWD_EVENTS & set(v.events), v.events
    assert v.data_out.endswith(raw(frame))
    meta = v.data_out[: -len(raw(frame))]
    assert len(meta) in (0, META.size)
    if meta:
        magic, _mark, flags = META.unpack(meta)
        assert magic != abi.META_MAGIC or not flags & abi.METAF_FABRIC


def fab_flags(f: abi.Flow | None) -> int | None:
    return None if f is None else f.flags & FAB_FLAGS


# ------------------------------------------------------------------ TC
@dataclasses.dataclass
class TcRun:
    code: int
    out: bytes
    mark: int
    reasons: dict
    events: dict


def run_tc(xdp, frame, ifname: str, mark: int = 0) -> TcRun:
    """bulkhead_tc on an skb arriving on `ifname` (ctx.ifindex: the device; no XDP metadata)."""
    data = raw(frame) if not isinstance(frame, bytes) else frame
    buf_in = C.create_string_buffer(data, len(data))
    buf_out = C.create_string_buffer(len(data) + 256)
    idx = xdp.ifindex[ifname]
    ctx_in, ctx_out = SkBuff(mark=mark, ifindex=idx, ingress_ifindex=idx), SkBuff()
    opts = libbpf.TestRunOpts(sz=C.sizeof(libbpf.TestRunOpts), repeat=1)
    opts.data_in, opts.data_size_in = C.cast(buf_in, C.c_void_p), len(data)
    opts.data_out, opts.data_size_out = C.cast(buf_out, C.c_void_p), len(buf_out)
    opts.ctx_in, opts.ctx_size_in = C.cast(C.pointer(ctx_in), C.c_void_p), SkBuff._rest.offset
    opts.ctx_out, opts.ctx_size_out = C.cast(C.pointer(ctx_out), C.c_void_p), C.sizeof(ctx_out)
    p0, _ = xdp.counters()
    e0 = xdp.events()
    libbpf._check(libbpf.lib().bpf_prog_test_run_opts(xdp.dp.prog_fd(loader.TC_PROG), C.byref(opts)), "tc test run")
    p1, _ = xdp.counters()
    e1 = xdp.events()
    return TcRun(opts.retval, buf_out.raw[: opts.data_size_out], ctx_out.mark,
                 {r: p1[r] - p0[r] for r in R if p1[r] != p0[r]},
                 {e: e1[e] - e0[e] for e in EV if e1[e] != e0[e]})


def checksums_recomputed(out: bytes, keep_udp_zero: bool = False) -> bytes:
    """The frame as scapy builds it with every checksum field deleted (computed afresh)."""
    f = Ether(out)
    layer = f
    while layer and not isinstance(layer, Raw):
        for name in ("chksum", "cksum"):
            if name in layer.fields and not (keep_udp_zero and isinstance(layer, UDP)):
                delattr(layer, name)  # through scapy: drops the dissected bytes it would reuse
        layer = layer.payload
    return raw(f)


def test_checksum_check_sees_a_stale_checksum():
    """The check itself: a frame whose address changed under its old checksums is caught."""
    good = raw(E / IP(src=C4, dst=VIP4) / TCP(sport=1, dport=2))
    assert checksums_recomputed(good) == good
    stale = good[:30] + bytes(ipaddress.ip_address(PAY4).packed) + good[34:]
    assert checksums_recomputed(stale) != stale


def translated(out: bytes, frame, src: str | None = None, dst: str | None = None, hop: bool = False) -> Ether:
    """`out` is `frame` with its source and/or destination replaced (and, with `hop`, its TTL or
    hop limit one less: forwarded by bh_tc_route), all checksums right."""
    got = Ether(out)
    ip = IP if IP in got else IPv6
    want = Ether(raw(frame))
    if src:
        want[ip].src = src
    if dst:
        want[ip].dst = dst
    if hop and ip is IP:
        want[IP].ttl -= 1
    elif hop:
        want[IPv6].hlim -= 1
    assert (got[ip].src, got[ip].dst) == (want[ip].src, want[ip].dst)
    assert checksums_recomputed(out) == out, "a checksum TC left is not what scapy computes"
    # Beyond the addresses and the checksums, nothing changed.
    assert checksums_recomputed(out) == checksums_recomputed(raw(want))
    return got


# ------------------------------------------------------------ fixtures
@pytest.fixture
def fab(xdp):
    """payments published (VIP4, VIP6); no transit, no SELF."""
    xdp.apply(fabric_bundle())
    return xdp


@pytest.fixture
def transit(xdp):
    """Two gateways, this one gateway 1 with a transit device."""
    xdp.apply(fabric_bundle(transit=True), fab_self=self_entry(xdp))
    return xdp


# (client -> VIP frame, the app's reply, proto, client port/id, server port/id)
def tcp_pair(v6: bool, sport=40000, dport=443):
    ipc, vip, real, cli = (IPv6, VIP6, PAY6, C6) if v6 else (IP, VIP4, PAY4, C4)
    return (E / ipc(src=cli, dst=vip) / TCP(sport=sport, dport=dport, flags="S", seq=1000),
            E / ipc(src=real, dst=cli) / TCP(sport=dport, dport=sport, flags="SA", seq=5000, ack=1001),
            P_TCP, sport, dport)


def udp_pair(v6: bool, sport=5000, dport=53):
    ipc, vip, real, cli = (IPv6, VIP6, PAY6, C6) if v6 else (IP, VIP4, PAY4, C4)
    return (E / ipc(src=cli, dst=vip) / UDP(sport=sport, dport=dport) / b"query",
            E / ipc(src=real, dst=cli) / UDP(sport=dport, dport=sport) / b"answer",
            P_UDP, sport, dport)


def echo_pair(v6: bool, ident=0x4242):
    if v6:
        return (E / IPv6(src=C6, dst=VIP6) / ICMPv6EchoRequest(id=ident, seq=1) / b"ping",
                E / IPv6(src=PAY6, dst=C6) / ICMPv6EchoReply(id=ident, seq=1) / b"ping",
                P_ICMP6, ident, ident)
    return (E / IP(src=C4, dst=VIP4) / ICMP(type=8, id=ident, seq=1) / b"ping",
            E / IP(src=PAY4, dst=C4) / ICMP(type=0, id=ident, seq=1) / b"ping",
            P_ICMP, ident, ident)


PAIRS = [pytest.param(mk, v6, id=f"{name}-v{6 if v6 else 4}")
         for name, mk in (("tcp", tcp_pair), ("udp", udp_pair), ("icmp", echo_pair)) for v6 in (False, True)]
RULE_OF = {P_TCP: RULE_PAY_HTTPS, P_UDP: RULE_PAY_DNS, P_ICMP: RULE_PAY_ICMP, P_ICMP6: RULE_PAY_ICMP}


# ------------------------------------------------------ 1. XDP, a VIP
@pytest.mark.parametrize("make, v6", PAIRS)
def test_new_flow_to_a_service_address_is_translated_by_entries(fab, make, v6):
    req, rep, proto, cport, sport = make(v6)
    vip, real, cli = (VIP6, PAY6, C6) if v6 else (VIP4, PAY4, C4)
    v = fab.expect(req, "prod", X.PASS, R.ALLOW_RULE)
    handed_to_tc(fab, v, req, 0, "prod", dst=real)  # forward: out by the main table, as bh_fwd_handoff's
    assert v.events.get(EV.VIP_NAT) == 1 and v.events.get(EV.FLOW_NEW) == 1

    ft = FlowTable(fds=fab.dp.map_fds)
    fwd = ft.lookup(cli, vip, cport, sport, proto, SEG_PROD)
    assert fwd is not None, "the forward entry is keyed on the service address the client sent to"
    assert (fab_flags(fwd), fwd.reason, fwd.rule_id, fwd.src_app, fwd.dst_app, fwd.peer_segment) == (
        abi.FLOWF_NAT, R.ALLOW_RULE, RULE_OF[proto], APP_WEB, APP_PAY, SEG_CORE)
    back = ft.lookup(real, cli, sport, cport, proto, SEG_CORE)
    assert back is not None, "the reply entry is keyed on the real address, on the app's segment"
    assert (fab_flags(back), back.reason, back.peer_segment, back.dst_app) == (
        abi.FLOWF_NAT | abi.FLOWF_REPLY, R.ALLOW_REPLY, SEG_PROD, APP_PAY)
    assert ft.lookup(vip, cli, sport, cport, proto, SEG_CORE) is None, "no reply entry on the service address"
    assert len(fab.flows(6 if v6 else 4)) == 2

    # The app answers from its real address, on its segment: established, marked for the client's segment.
    r = fab.expect(rep, "core", X.PASS, R.ALLOW_REPLY)
    handed_to_tc(fab, r, rep, SEG_PROD, "core", src=vip)
    assert EV.VIP_NAT not in r.events and EV.FLOW_NEW not in r.events

    # The flow's next packet: the cached entry, no second translation event.
    again = fab.expect(req, "prod", X.PASS, R.ALLOW_RULE)
    handed_to_tc(fab, again, req, 0, "prod", dst=real)
    assert EV.VIP_NAT not in again.events


def test_vip_nat_counted_once_per_new_flow(fab):
    e0 = fab.events()
    for port in (40001, 40002, 40003):
        fab.expect(tcp_pair(False, sport=port)[0], "prod", X.PASS, R.ALLOW_RULE)
        fab.expect(tcp_pair(False, sport=port)[0], "prod", X.PASS, R.ALLOW_RULE)  # a retransmission
    assert fab.events()[EV.VIP_NAT] - e0[EV.VIP_NAT] == 3


def test_vip_flow_denied_by_policy_makes_no_entry(fab):
    """The translation is the allowed flow's: a port no rule allows is denied, nothing translated."""
    syn = tcp_pair(False, dport=23)[0]
    v = fab.expect(syn, "prod", X.DROP, R.DENY_RULE)
    assert EV.VIP_NAT not in v.events
    syn = tcp_pair(False, dport=9999)[0]
    v = fab.expect(syn, "prod", X.DROP, R.DENY_DEFAULT)
    assert EV.VIP_NAT not in v.events
    assert fab.flows(4) == [] or all(not f.flags & abi.FLOWF_NAT for _, f in fab.flows(4))


@pytest.mark.parametrize("first", ["vip", "real"])
def test_two_flows_on_one_reply_tuple_are_a_collision(fab, first):
    """C4:40000 -> VIP4:443 and C4:40000 -> PAY4:443 are two flows for the client, one for
    payments: both answer from PAY4:443 to C4:40000 on core, the same reply key. Replies can't
    tell them apart (as for two segments' flows with one tuple): the newcomer is refused as a
    collision, and the live flow's reply entry stays what it was (NAT or not)."""
    to_vip = E / IP(src=C4, dst=VIP4) / TCP(sport=40000, dport=443, flags="S")
    to_real = E / IP(src=C4, dst=PAY4) / TCP(sport=40000, dport=443, flags="S")
    live, newcomer = (to_vip, to_real) if first == "vip" else (to_real, to_vip)
    fab.expect(live, "prod", X.PASS, R.ALLOW_RULE)
    ft = FlowTable(fds=fab.dp.map_fds)
    before = fab_flags(ft.lookup(PAY4, C4, 443, 40000, P_TCP, SEG_CORE))
    assert before == abi.FLOWF_REPLY | (abi.FLOWF_NAT if first == "vip" else 0)
    fab.expect(newcomer, "prod", X.DROP, R.FLOW_COLLISION)
    assert fab_flags(ft.lookup(PAY4, C4, 443, 40000, P_TCP, SEG_CORE)) == before


def test_first_fragment_to_a_vip_is_dropped(fab):
    first = E / IP(src=C4, dst=VIP4, id=77, flags="MF") / TCP(sport=40000, dport=443, flags="S") / (b"f" * 16)
    v = fab.expect(first, "prod", X.DROP, R.FRAG_NO_FLOW)
    assert EV.VIP_NAT not in v.events
    assert fab.flows(4) == []


# --------------------------------------------------- 2. TC rewrites
@pytest.mark.parametrize("make, v6", PAIRS)
def test_tc_translates_both_directions_with_valid_checksums(fab, make, v6):
    req, rep, *_ = make(v6)
    vip, real = (VIP6, PAY6) if v6 else (VIP4, PAY4)
    fab.expect(req, "prod", X.PASS, R.ALLOW_RULE)
    t = run_tc(fab, req, "prod")
    assert (t.code, t.reasons) == (TC_ACT_OK, {})
    translated(t.out, req, dst=real)
    fab.expect(rep, "core", X.PASS, R.ALLOW_REPLY)
    t = run_tc(fab, rep, "core")
    assert (t.code, t.reasons) == (TC_ACT_OK, {})
    translated(t.out, rep, src=vip)


@pytest.fixture
def fab_routed(fab):
    """As `fab`, with test_xdp_fastpath's routes: payments on core (a neighbour), prod's segment
    table, so bh_tc_route finds where translated packets go and redirects them itself."""
    with routes(fab) as x:
        yield x


@pytest.mark.parametrize("make, v6", [p for p in PAIRS if "v4" in p.id] + [PAIRS[1]])
def test_tc_forwards_translated_packets_itself(fab_routed, make, v6):
    """With a route: TTL - 1 (the IPv4 checksum with it), bpf_redirect_neigh (TC_ACT_REDIRECT), our
    mark cleared. The forward packet by the main table (out of core, to the real address); the
    reply by its client's segment table (prod's: IPv4 only, so the IPv6 reply goes up the stack)."""
    fab = fab_routed
    req, rep, *_ = make(v6)
    vip, real = (VIP6, PAY6) if v6 else (VIP4, PAY4)
    fab.expect(req, "prod", X.PASS, R.ALLOW_RULE)
    t = run_tc(fab, req, "prod", mark=abi.MARK_SEG | 0x00AB0000)
    assert (t.code, t.reasons, t.mark) == (TC_ACT_REDIRECT, {}, 0x00AB0000)
    translated(t.out, req, dst=real, hop=True)
    fab.expect(rep, "core", X.PASS, R.ALLOW_REPLY)
    t = run_tc(fab, rep, "core", mark=abi.MARK_SEG | SEG_PROD)
    if v6:
        assert (t.code, t.mark) == (TC_ACT_OK, abi.MARK_SEG | SEG_PROD)
        translated(t.out, rep, src=vip)
    else:
        assert (t.code, t.mark) == (TC_ACT_REDIRECT, 0)
        translated(t.out, rep, src=vip, hop=True)


def test_tc_leaves_an_expiring_ttl_to_the_stack(fab_routed):
    """TTL 1: translated, not forwarded (the stack sends the time-exceeded), TTL kept."""
    syn = E / IP(src=C4, dst=VIP4, ttl=1) / TCP(sport=40000, dport=443, flags="S")
    fab_routed.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    t = run_tc(fab_routed, syn, "prod")
    assert t.code == TC_ACT_OK
    assert Ether(t.out)[IP].ttl == 1
    translated(t.out, syn, dst=PAY4)


def test_tc_keeps_a_zero_udp_checksum_over_ipv4(fab):
    req = E / IP(src=C4, dst=VIP4) / UDP(sport=5000, dport=53, chksum=0) / b"query"
    rep = E / IP(src=PAY4, dst=C4) / UDP(sport=53, dport=5000, chksum=0) / b"answer"
    fab.expect(req, "prod", X.PASS, R.ALLOW_RULE)
    fab.expect(rep, "core", X.PASS, R.ALLOW_REPLY)
    for frame, ifname, src, dst in ((req, "prod", C4, PAY4), (rep, "core", VIP4, C4)):
        t = run_tc(fab, frame, ifname)
        assert t.code == TC_ACT_OK
        got = Ether(t.out)
        assert (got[IP].src, got[IP].dst, got[UDP].chksum) == (src, dst, 0), "no checksum: it stays none"
        assert checksums_recomputed(t.out, keep_udp_zero=True) == t.out, "the IPv4 header checksum"


def test_tc_translates_every_packet_of_the_flow_from_the_same_entry(fab):
    """Payload-carrying TCP (the checksum covers it): the rewrite is incremental, right for any data."""
    syn, synack, *_ = tcp_pair(False)
    fab.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    fab.expect(synack, "core", X.PASS, R.ALLOW_REPLY)
    data = E / IP(src=C4, dst=VIP4) / TCP(sport=40000, dport=443, flags="PA", seq=1001, ack=5001) / (b"x" * 333)
    fab.expect(data, "prod", X.PASS, R.ALLOW_RULE)
    t = run_tc(fab, data, "prod")
    assert t.code == TC_ACT_OK
    translated(t.out, data, dst=PAY4)


def test_tc_leaves_frames_without_a_fabric_entry_alone(fab):
    """The slot has fabric entries, so TC looks every unmarked packet up: one of a plain flow
    (web -> catalog), or of no flow at all, passes byte for byte."""
    plain = E / IP(src=C4, dst=CAT4) / TCP(sport=41000, dport=80, flags="S")
    fab.expect(plain, "prod", X.PASS, R.ALLOW_RULE)
    for frame in (plain, E / IP(src=C4, dst=VIP4) / TCP(sport=41001, dport=443, flags="S")):
        t = run_tc(fab, frame, "prod", mark=0x00AB0000)
        assert (t.code, t.out, t.mark, t.reasons) == (TC_ACT_OK, raw(frame), 0x00AB0000, {})


def test_tc_looks_up_in_the_segment_of_the_interface(fab):
    """The VIP flow is prod's: the same frame on dev (same client CIDR, another app) is no entry of it."""
    syn = tcp_pair(False)[0]
    fab.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    t = run_tc(fab, syn, "dev")
    assert (t.code, t.out) == (TC_ACT_OK, raw(syn))


# ----------------------------------------------------- 3. transit
def test_flow_to_an_app_behind_another_gateway_is_transit(transit):
    syn = E / IP(src=C4, dst=FAR4) / TCP(sport=40000, dport=443, flags="S")
    v = transit.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    handed_to_tc(transit, v, syn, 0, "prod", encap=True)
    assert EV.VIP_NAT not in v.events
    ft = FlowTable(fds=transit.dp.map_fds)
    fwd = ft.lookup(C4, FAR4, 40000, 443, P_TCP, SEG_PROD)
    back = ft.lookup(FAR4, C4, 443, 40000, P_TCP, SEG_FAR)
    assert (fab_flags(fwd), fwd.peer_segment, fwd.dst_app, fwd.rule_id) == (
        abi.FLOWF_TRANSIT, SEG_FAR, APP_FAR, RULE_FAR_HTTPS)
    assert (fab_flags(back), back.peer_segment, back.reason) == (
        abi.FLOWF_TRANSIT | abi.FLOWF_REPLY, SEG_PROD, R.ALLOW_REPLY)


def test_ipv6_flow_behind_another_gateway_is_transit(transit):
    dgram = E / IPv6(src=C6, dst=FAR6) / UDP(sport=5000, dport=5001) / b"x"
    v = transit.expect(dgram, "prod", X.PASS, R.ALLOW_RULE)
    handed_to_tc(transit, v, dgram, 0, "prod", encap=True)
    ft = FlowTable(fds=transit.dp.map_fds)
    assert fab_flags(ft.lookup(C6, FAR6, 5000, 5001, P_UDP, SEG_PROD)) == abi.FLOWF_TRANSIT
    assert fab_flags(ft.lookup(FAR6, C6, 5001, 5000, P_UDP, SEG_FAR)) == abi.FLOWF_TRANSIT | abi.FLOWF_REPLY


def test_flow_to_a_local_segment_in_a_transit_policy_is_not_transit(transit):
    """payments is behind this gateway (SEG core -> gateway 1 = SELF): a plain flow, fast path and all."""
    syn = E / IP(src=C4, dst=PAY4) / TCP(sport=40000, dport=443, flags="S")
    v = transit.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    not_fabric(v, syn)
    ft = FlowTable(fds=transit.dp.map_fds)
    assert fab_flags(ft.lookup(C4, PAY4, 40000, 443, P_TCP, SEG_PROD)) == 0
    assert fab_flags(ft.lookup(PAY4, C4, 443, 40000, P_TCP, SEG_CORE)) == abi.FLOWF_REPLY


def test_vip_of_an_app_behind_another_gateway_is_nat_and_transit(transit):
    syn = E / IP(src=C4, dst=FAR_VIP4) / TCP(sport=40000, dport=443, flags="S")
    v = transit.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    handed_to_tc(transit, v, syn, 0, "prod", dst=FAR4, encap=True)
    assert v.events.get(EV.VIP_NAT) == 1
    ft = FlowTable(fds=transit.dp.map_fds)
    both = abi.FLOWF_NAT | abi.FLOWF_TRANSIT
    assert fab_flags(ft.lookup(C4, FAR_VIP4, 40000, 443, P_TCP, SEG_PROD)) == both
    assert fab_flags(ft.lookup(FAR4, C4, 443, 40000, P_TCP, SEG_FAR)) == both | abi.FLOWF_REPLY


def test_tc_translates_then_sends_through_the_transit_device(transit):
    """bulkhead_tc on a NAT + transit flow: the destination rewritten, then a tunnel key set and a
    redirect to SELF's transit device (TC_ACT_REDIRECT, counted transit_encap). The tunnel key
    itself (VNI = far's segment, GBP = web's id) is not visible to a test run."""
    syn = E / IP(src=C4, dst=FAR_VIP4) / TCP(sport=40000, dport=443, flags="S")
    transit.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    t = run_tc(transit, syn, "prod", mark=abi.MARK_SEG | 0x00AB0000)
    assert (t.code, t.reasons, t.events.get(EV.TRANSIT_ENCAP)) == (TC_ACT_REDIRECT, {}, 1)
    assert t.mark == 0x00AB0000, "our mark goes: the outer packet is routed by the underlay"
    translated(t.out, syn, dst=FAR4)


SELF_KINDS = [pytest.param(True, id="no-device"), pytest.param(False, id="no-self")]


def apply_without_tunnel(xdp, with_self: bool) -> None:
    """SELF with no transit device (a gateway of the policy without a transit address), or no
    SELF at all (an agent run with --policy and no --gateway NAME)."""
    xdp.apply(fabric_bundle(transit=True), fab_self=self_entry(xdp, tunnel=False) if with_self else None)


def test_transit_without_a_tunnel_is_dropped(xdp):
    """A gateway of the policy (SELF) without a transit device: flows to other gateways' segments
    are dropped, counted, and leave no entry."""
    apply_without_tunnel(xdp, True)
    for syn in (E / IP(src=C4, dst=FAR4) / TCP(sport=40000, dport=443, flags="S"),
                E / IPv6(src=C6, dst=FAR6) / UDP(sport=5000, dport=5001),
                E / IP(src=C4, dst=FAR_VIP4) / TCP(sport=40000, dport=443, flags="S")):
        v = xdp.expect(syn, "prod", X.DROP, R.TRANSIT_NO_TUNNEL)
        assert EV.FLOW_NEW not in v.events and EV.VIP_NAT not in v.events
    assert xdp.flows(4) == [] and xdp.flows(6) == [], "a dropped new flow leaves no entry"


def test_no_self_is_one_gateway_for_the_whole_policy(xdp):
    """No SELF (an agent without --gateway): every segment is its own, nothing is tunnelled, as
    before transit (agent/daemon/agent.py logs it)."""
    apply_without_tunnel(xdp, False)
    v = xdp.expect(E / IP(src=C4, dst=FAR4) / TCP(sport=40000, dport=443, flags="S"), "prod", X.PASS,
                   R.ALLOW_RULE)
    assert EV.FLOW_NEW in v.events
    assert all(not (e.flags & abi.FLOWF_TRANSIT) for _, e in xdp.flows(4)), xdp.flows(4)


@pytest.mark.parametrize("with_self", SELF_KINDS)
def test_transit_without_a_tunnel_leaves_local_segments_alone(xdp, with_self):
    """Only flows to other gateways' segments need the tunnel: web -> payments (core, a segment of
    this gateway) and web -> payments' VIP pass as without transit."""
    apply_without_tunnel(xdp, with_self)
    xdp.expect(E / IP(src=C4, dst=PAY4) / TCP(sport=40000, dport=443, flags="S"), "prod", X.PASS, R.ALLOW_RULE)
    v = xdp.expect(E / IP(src=C4, dst=VIP4) / TCP(sport=40001, dport=443, flags="S"), "prod", X.PASS,
                   R.ALLOW_RULE)
    assert v.events.get(EV.VIP_NAT) == 1


def test_first_fragment_of_a_transit_flow_is_dropped(transit):
    first = E / IP(src=C4, dst=FAR4, id=99, flags="MF") / UDP(sport=5000, dport=5001, len=1000) / (b"f" * 16)
    transit.expect(first, "prod", X.DROP, R.FRAG_NO_FLOW)
    assert transit.flows(4) == []
    # Its later fragments follow no remembered verdict: dropped too.
    later = E / IP(src=C4, dst=FAR4, id=99, frag=3, proto=17) / (b"f" * 24)
    transit.expect(later, "prod", X.DROP, R.FRAG_NO_FLOW)


# ------------------------------------------------------ 4. policy swap
def test_reply_entry_rejudged_under_a_new_generation_keeps_nat(fab):
    syn, synack, *_ = tcp_pair(False)
    fab.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    fab.expect(synack, "core", X.PASS, R.ALLOW_REPLY)
    gen = fab.apply(fabric_bundle())  # same policy, next generation (the other slot)
    ack = E / IP(src=PAY4, dst=C4) / TCP(sport=443, dport=40000, flags="A", seq=5001, ack=1001)
    v = fab.expect(ack, "core", X.PASS, R.ALLOW_REPLY)
    assert v.events.get(EV.FLOW_RECLASSIFY) == 1, "the reply entry was re-judged"
    handed_to_tc(fab, v, ack, SEG_PROD, "core", src=VIP4)
    ft = FlowTable(fds=fab.dp.map_fds)
    back = ft.lookup(PAY4, C4, 443, 40000, P_TCP, SEG_CORE)
    assert (back.generation, fab_flags(back), back.peer_segment) == (gen, abi.FLOWF_NAT | abi.FLOWF_REPLY, SEG_PROD)
    t = run_tc(fab, ack, "core")
    assert t.code == TC_ACT_OK
    translated(t.out, ack, src=VIP4)
    # The client's next packet re-judges the forward entry: translated as before.
    data = E / IP(src=C4, dst=VIP4) / TCP(sport=40000, dport=443, flags="A", seq=1001, ack=5001)
    v = fab.expect(data, "prod", X.PASS, R.ALLOW_RULE)
    handed_to_tc(fab, v, data, 0, "prod", dst=PAY4)
    assert v.events.get(EV.FLOW_RECLASSIFY) == 1 and EV.FLOW_NEW not in v.events
    fwd = ft.lookup(C4, VIP4, 40000, 443, P_TCP, SEG_PROD)
    assert (fwd.generation, fab_flags(fwd)) == (gen, abi.FLOWF_NAT)
    back = ft.lookup(PAY4, C4, 443, 40000, P_TCP, SEG_CORE)
    assert (back.generation, fab_flags(back)) == (gen, abi.FLOWF_NAT | abi.FLOWF_REPLY)


def test_vip_nat_is_not_counted_again_when_a_flow_is_rejudged(fab):
    """vip_nat counts new flows to a service address (enums.h); a live flow re-judged after an
    apply is no new flow (flow_reclassify, not flow_new) and was translated already."""
    syn = tcp_pair(False)[0]
    fab.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    fab.apply(fabric_bundle())
    data = E / IP(src=C4, dst=VIP4) / TCP(sport=40000, dport=443, flags="A", seq=1001, ack=5001)
    v = fab.expect(data, "prod", X.PASS, R.ALLOW_RULE)
    assert v.events.get(EV.FLOW_RECLASSIFY) == 1 and EV.FLOW_NEW not in v.events
    assert EV.VIP_NAT not in v.events, "vip_nat counted for a re-judged flow"


def test_transit_reply_entry_rejudged_keeps_transit(transit):
    """A reply entry of a transit flow re-judged by XDP (as bulkhead_xdp would for a packet that
    came that way) keeps TRANSIT: how the flow crosses the fabric is the connection's."""
    syn = E / IP(src=C4, dst=FAR_VIP4) / TCP(sport=40000, dport=443, flags="S")
    transit.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    gen = transit.apply(fabric_bundle(transit=True), fab_self=self_entry(transit))
    data = E / IP(src=C4, dst=FAR_VIP4) / TCP(sport=40000, dport=443, flags="A", seq=1001, ack=1)
    v = transit.expect(data, "prod", X.PASS, R.ALLOW_RULE)
    handed_to_tc(transit, v, data, 0, "prod", dst=FAR4, encap=True)
    ft = FlowTable(fds=transit.dp.map_fds)
    both = abi.FLOWF_NAT | abi.FLOWF_TRANSIT
    fwd = ft.lookup(C4, FAR_VIP4, 40000, 443, P_TCP, SEG_PROD)
    back = ft.lookup(FAR4, C4, 443, 40000, P_TCP, SEG_FAR)
    assert (fwd.generation, fab_flags(fwd)) == (gen, both)
    assert (back.generation, fab_flags(back)) == (gen, both | abi.FLOWF_REPLY)


# ------------------------------------------------- 5. without fabric
def test_plain_flow_has_neither_flag(xdp):
    """The base policy has no fab_N entries (no SLOTF_FABRIC): a flow is neither NAT nor TRANSIT,
    and passes through the fast path as ever."""
    assert not xdp.dp.slot_cfg(xdp.dp.ctl().active_slot & 1).flags & abi.SLOTF_FABRIC
    syn = E / IP(src=C4, dst=PAY4) / TCP(sport=40000, dport=443, flags="S")
    v = xdp.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    not_fabric(v, syn)
    assert [fab_flags(f) for _, f in sorted(xdp.flows(4), key=lambda kv: kv[1].flags)] == [0, abi.FLOWF_REPLY]
    # And TC, without fabric entries in the slot, looks nothing up.
    t = run_tc(xdp, syn, "prod")
    assert (t.code, t.out) == (TC_ACT_OK, raw(syn))


def test_fabric_slot_flag_follows_the_entries(xdp):
    xdp.apply(fabric_bundle())
    assert xdp.dp.slot_cfg(xdp.dp.ctl().active_slot & 1).flags & abi.SLOTF_FABRIC
    xdp.apply(fabric_bundle(vips=False))
    assert not xdp.dp.slot_cfg(xdp.dp.ctl().active_slot & 1).flags & abi.SLOTF_FABRIC


# ---------------------------------------------- the compiler's entries
POLICY = """\
version: 1
settings: {default_action: deny}
gateways:
  - {name: gw-a, transit: 198.18.100.1}
  - {name: gw-b, transit: 198.18.100.2}
fabric:
  service_addresses: [198.19.255.0/24, "fd00:ff::/120"]
segments:
  - {name: prod, gateway: gw-a, interfaces: [prod]}
  - {name: core, gateway: gw-a, interfaces: [core]}
  - {name: far, gateway: gw-b, interfaces: [far0]}
apps:
  - {name: web, segment: prod, addresses: [198.18.1.0/24, "fd00:1::/64"]}
  - {name: payments, segment: core, addresses: [198.19.0.10/32, "fd00:19::10/128"], publish: [pay.example]}
  - {name: inventory, segment: far, addresses: [198.19.50.10/32], publish: [inv.example]}
rules:
  - {name: web-to-payments, from: web, to: payments, ports: [tcp/443]}
  - {name: web-to-inventory, from: web, to: inventory, ports: [tcp/8080]}
"""


def test_compiled_fabric_policy_drives_the_datapath(xdp, tmp_path):
    path = tmp_path / "fabric.yaml"
    path.write_text(POLICY)
    bundle, _warnings = load_policy([str(path)])
    seg = {s["name"]: s["id"] for s in bundle.segments}
    app = {a["name"]: a["id"] for a in bundle.apps}
    mine = bundle.for_gateway("gw-a")
    xdp.apply(mine, fab_self=(1, xdp.ifindex["dev-p"], a16(T_ME)))
    pay_vip4 = next(v for v in bundle.vips["payments"] if ipaddress.ip_address(v).version == 4)
    pay_vip6 = next(v for v in bundle.vips["payments"] if ipaddress.ip_address(v).version == 6)
    inv_vip4 = bundle.vips["inventory"][0]
    ft = FlowTable(fds=xdp.dp.map_fds)

    for cli, vip, real in ((C4, pay_vip4, PAY4), (C6, pay_vip6, PAY6)):
        ipc = IP if cli == C4 else IPv6
        syn = E / ipc(src=cli, dst=vip) / TCP(sport=40000, dport=443, flags="S")
        v = xdp.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
        handed_to_tc(xdp, v, syn, 0, "prod", dst=real)
        assert fab_flags(ft.lookup(cli, vip, 40000, 443, P_TCP, seg["prod"])) == abi.FLOWF_NAT
        back = ft.lookup(real, cli, 443, 40000, P_TCP, seg["core"])
        assert (fab_flags(back), back.dst_app) == (abi.FLOWF_NAT | abi.FLOWF_REPLY, app["payments"])
        t = run_tc(xdp, syn, "prod")
        assert t.code == TC_ACT_OK
        translated(t.out, syn, dst=real)

    for dst, want in ((FAR4, abi.FLOWF_TRANSIT), (inv_vip4, abi.FLOWF_TRANSIT | abi.FLOWF_NAT)):
        syn = E / IP(src=C4, dst=dst) / TCP(sport=40001, dport=8080, flags="S")
        v = xdp.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
        handed_to_tc(xdp, v, syn, 0, "prod", dst=FAR4 if dst != FAR4 else None, encap=True)
        assert fab_flags(ft.lookup(C4, dst, 40001, 8080, P_TCP, seg["prod"])) == want
        back = ft.lookup(FAR4, C4, 8080, 40001, P_TCP, seg["far"])
        assert fab_flags(back) == want | abi.FLOWF_REPLY
        xdp.clear_flows()


# ---------------------------------------- 6. source translation at the far gateway (TC half)
SNAT4 = "198.19.0.1"  # core's transit_snat: far's clients enter core from it


def snat_reply_entries(xdp, port: int, with_orig: bool = True):
    """What bulkhead_transit_in leaves for a flow from far (FAR4:40000, behind gateway 2) to payments
    (PAY4:443, core) that it translated to SNAT4:`port`: core's SNAT4 fact, the reply entry keyed on
    the translated tuple, and (with_orig) the client's own address and port in fab_snat. Written
    directly: transit_in takes tunnel metadata that a test run can't give (tests/integration/
    test_fabric_snat.py covers it with real traffic)."""
    b = fabric_bundle(transit=True)
    b = dataclasses.replace(b, fab_entries=[*b.fab_entries, (abi.FAB_SNAT4, SEG_CORE, Z16, 0, 0, a16(SNAT4))])
    gen = xdp.apply(b, fab_self=self_entry(xdp))
    v = abi.Flow(generation=gen, src_app=APP_FAR, dst_app=APP_PAY, peer_segment=SEG_FAR, action=abi.Action.ALLOW,
                 flags=abi.FLOWF_TRANSIT | abi.FLOWF_REPLY, reason=R.ALLOW_REPLY, xflags=abi.FLOWX_SNAT,
                 snat_port_be=struct.unpack("=H", struct.pack("!H", port))[0])
    FlowTable(fds=xdp.dp.map_fds).put(PAY4, SNAT4, 443, port, P_TCP, SEG_CORE, v)
    if with_orig:
        k = abi.SnatKey(sport_be=struct.unpack("=H", struct.pack("!H", 443))[0],
                        dport_be=struct.unpack("=H", struct.pack("!H", port))[0], proto=P_TCP, family=4,
                        segment_id=SEG_CORE)
        C.memmove(k.saddr, a16(PAY4), 16)
        o = abi.SnatVal(port_be=struct.unpack("=H", struct.pack("!H", 40000))[0])
        C.memmove(o.addr, a16(FAR4), 16)
        libbpf.map_update(xdp.dp.map_fds["fab_snat"], k, o)


@pytest.mark.parametrize("port", [40000, 51234], ids=["own-port", "another-port"])
def test_tc_turns_a_reply_back_to_the_translated_client_then_encapsulates(xdp, port):
    """The server answers SNAT4:port; bulkhead_xdp hands it over (the reply entry is TRANSIT) and
    bulkhead_tc puts back the client's own address and port (checksums right) before the tunnel."""
    snat_reply_entries(xdp, port)
    synack = E / IP(src=PAY4, dst=SNAT4) / TCP(sport=443, dport=port, flags="SA", seq=5000, ack=1001)
    v = xdp.expect(synack, "core", X.PASS, R.ALLOW_REPLY)
    handed_to_tc(xdp, v, synack, SEG_FAR, "core", encap=True)  # the address and port: checked below
    t = run_tc(xdp, synack, "core")
    assert (t.code, t.reasons, t.events.get(EV.TRANSIT_ENCAP)) == (TC_ACT_REDIRECT, {}, 1)
    got = Ether(t.out)
    assert (got[IP].dst, got[TCP].dport, got[IP].src, got[TCP].sport) == (FAR4, 40000, PAY4, 443)
    assert checksums_recomputed(t.out) == t.out, "a checksum TC left is not what scapy computes"


def test_tc_drops_a_reply_whose_translation_is_gone(xdp):
    """Its fab_snat entry evicted: the reply can't be turned back, so it is dropped and counted
    (transit_snat_lost), never sent on to the other gateway with the translated address."""
    snat_reply_entries(xdp, 51234, with_orig=False)
    synack = E / IP(src=PAY4, dst=SNAT4) / TCP(sport=443, dport=51234, flags="SA", seq=5000, ack=1001)
    xdp.expect(synack, "core", X.PASS, R.ALLOW_REPLY)
    t = run_tc(xdp, synack, "core")
    assert (t.code, t.reasons) == (TC_ACT_SHOT, {R.TRANSIT_SNAT_LOST: 1})
    assert EV.TRANSIT_ENCAP not in t.events
