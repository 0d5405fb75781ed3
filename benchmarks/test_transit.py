"""The fabric's transit path (issue 15; ../shared/BENCHMARKS.md item 7): the per-packet cost of
encapsulating at gateway A and decapsulating and checking at gateway B, and the live rate across
two gateways against the same lab without bulkhead.

1. Per packet, BPF_PROG_TEST_RUN (method 1), in the benchmark build's namespace (conftest.bench_dp),
   a hand-built policy: clients (segment 1) -> server (segment 2, this gateway) and -> far (segment 3,
   behind gateway 2), tcp/5201; far also by a service address; this gateway's SELF entry has a
   transit device. Marginal over an empty program of the same type, interleaved, median of 7 rounds:
   - bulkhead_xdp on an established transit flow's packet (the verdict, then the hand-off to TC:
     metadata in front of the frame) against a plain established flow's (the verdict; ctl
     BH_CTL_NO_FASTPATH as in test_xdp_cost.py). `repeat` reuses one xdp_buff: its 32-byte metadata
     area is used up after two runs, so from then on the transit hand-off's bpf_xdp_adjust_meta fails
     and the packet passes without metadata: the figure has the helper call, not the three stores.
   - bulkhead_tc (empty: a sched_cls program returning TC_ACT_OK) on the transit flow's frame: parse,
     the flow lookup, the SEG/SELF/GW entries, bpf_skb_set_tunnel_key, bpf_skb_set_tunnel_opt (the
     GBP id) and bpf_redirect to the transit device: the test run returns TC_ACT_REDIRECT (the kernel
     does not run the redirect, nor the VXLAN device's own encapsulation: those are in the live rate).
     Against the same program on the plain flow's frame with the same policy (parse + lookup, nothing
     of the fabric's) and with a policy without fabric entries (two lookups). A plain established flow
     never meets bulkhead_tc at all on a gateway: XDP forwards it (bulkhead_forward).
   - bulkhead_tc on a flow to the service address (translate, then tunnel) can't be repeated on one
     skb (the first run rewrites the destination: the next finds no entry), so it is measured in
     single runs (repeat 1, a fresh skb each, 2,001 of them, each against an empty run): the transit
     flow is measured the same way beside it, so the two are comparable.
   - bulkhead_transit_in can't be run by a test run: it reads the outer header from the skb's tunnel
     metadata (bpf_skb_get_tunnel_key), which only a VXLAN device's receive attaches. The test shows
     it: a test-run skb is dropped as transit_unknown_peer. It is measured live (2.).
2. Live (benchmarks/transitlab.py): the fabric lab, gwa and gwb each running `bulkhead agent run
   --policy F --gateway NAME` of one policy, a-cli -> api's service address (translated at gwa,
   tunnelled, judged again at gwb, delivered to b-srv), against the same lab without bulkhead: a plain
   kernel VXLAN between the gateways and host routes to b-srv's real address (`vxlan`), and the same
   with a bare XDP_PASS on the two segment interfaces (`vxlan+xdp_pass`: the veths in bulkhead's
   mode). UDP Mpps (60-byte frames, one flow, from XDP live frames) and TCP Gbit/s (one connection,
   Python bulk sender and sink), and the CPU the two-gateway path costs per packet: one UDP flow in
   bursts of 200 frames (~8 kpps here, nothing lost: the test checks), the gateways' threads' run time
   on their core (schedstat of the segment interfaces' NAPI threads and that core's ksoftirqd) over
   the packets delivered -- a figure the scheduler can't skew as it skews a saturated rate; cases interleaved (their order turning each round), ROUNDS rounds, medians; the ratios are the
   median of each round's own ratio (this VM drifts between rounds more than the cases differ).
   In bulkhead's case, one more UDP run with BPF run-time statistics on (BPF_ENABLE_STATS, system-wide for about a second,
   off again when its fd closes; never during a measured rate) gives each program's ns per packet
   on the live path, bulkhead_transit_in's included; the floor of that accounting is an empty
   program's under the same statistics (test runs in the same window), subtracted.

Knobs: BH_TRANSIT_ROUNDS=5, BH_TRANSIT_FRAMES=15000000 (frames per UDP measurement), BH_TRANSIT_TCP_S=3,
BH_TRANSIT_PACED_S=3.
Writes build/bench-transit.md; the headline figures go to make bench's table (benchmarks/summary.py).
"""
from __future__ import annotations

import ctypes as C
import ipaddress
import os
import statistics
from pathlib import Path

import pytest
from bulkhead.datapath import abi, libbpf, loader
from bulkhead.policy.bundle import Bundle
from scapy.all import IP, TCP, Ether, IPv6, raw

from .conftest import measure
from .summary import goal

ROOT = Path(__file__).resolve().parents[1]
TABLE_FILE = ROOT / "build" / "bench-transit.md"
ROUNDS = int(os.environ.get("BH_TRANSIT_ROUNDS", "5"))
FRAMES = int(os.environ.get("BH_TRANSIT_FRAMES", "15000000"))
TCP_S = float(os.environ.get("BH_TRANSIT_TCP_S", "3"))
PACED_S = float(os.environ.get("BH_TRANSIT_PACED_S", "3"))
STATS_FRAMES = 3_000_000
SINGLE_RUNS = 2001
B = "fabric transit"
WANT = "reported (item 7 sets no figure)"
TC_OK, TC_SHOT, TC_REDIRECT = 0, 2, 7
LINES: list[str] = []  # build/bench-transit.md

# ------------------------------------------------------------------ 1. per packet
SEG_CLI, SEG_SRV, SEG_FAR = 1, 2, 3
APP_CLI, APP_SRV, APP_FAR = 1, 2, 3
GW_ME, GW_OTHER = 1, 2
T_ME, T_OTHER = "198.18.100.1", "198.18.100.2"
ADDR = {  # family -> (client, server, far, far's service address)
    "ipv4": ("198.19.1.5", "198.19.2.10", "198.19.3.10", "198.19.255.3"),
    "ipv6": ("fd00:bf:1::5", "fd00:bf:2::10", "fd00:bf:3::10", "fd00:bf:ff::3"),
}
CLI_NET = {"ipv4": "198.19.1.0/24", "ipv6": "fd00:bf:1::/64"}
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
Z16 = bytes(16)


def a16(addr: str) -> bytes:
    return loader.v4mapped(ipaddress.ip_address(addr))


def net(cidr: str) -> tuple[bytes, int]:
    n = ipaddress.ip_network(cidr)
    return a16(str(n.network_address)), n.prefixlen + (abi.V4MAPPED_BITS if n.version == 4 else 0)


def transit_bundle(fabric: bool = True) -> Bundle:
    """clients (seg1) -> server (seg2, here) and -> far (seg3, behind gateway 2) tcp/5201; far also
    by its service address. fabric False: the same apps and rules, no fab_N entries (no transit)."""
    src, dst, fab = [], [], []
    for fam, (_c, srv, far, vip) in ADDR.items():
        src.append((SEG_CLI, *net(CLI_NET[fam]), APP_CLI))
        for addr, app, seg in ((srv, APP_SRV, SEG_SRV), (far, APP_FAR, SEG_FAR)):
            src.append((seg, a16(addr), 128, app))
            dst.append((a16(addr), 128, app, seg))
        dst.append((a16(vip), 128, APP_FAR, SEG_FAR))
        fab += [(abi.FAB_VIP, 0, a16(vip), APP_FAR, SEG_FAR, a16(far)), (abi.FAB_REAL, 0, a16(far), APP_FAR, 0, a16(vip))]
    pol = [(abi.POLICY_PLEN_PORT_BASE + 16, APP_CLI, to, 6, 5201, int(abi.Action.ALLOW), 0, rule)
           for to, rule in ((APP_SRV, 1), (APP_FAR, 2))]
    fab += [(abi.FAB_SEG, s, Z16, GW_ME, 0, Z16) for s in (SEG_CLI, SEG_SRV)]
    fab += [(abi.FAB_SEG, SEG_FAR, Z16, GW_OTHER, 0, Z16)]
    fab += [(abi.FAB_APP, app, Z16, seg, gw, Z16)
            for app, seg, gw in ((APP_CLI, SEG_CLI, GW_ME), (APP_SRV, SEG_SRV, GW_ME), (APP_FAR, SEG_FAR, GW_OTHER))]
    for gw, addr in ((GW_ME, T_ME), (GW_OTHER, T_OTHER)):
        fab += [(abi.FAB_PEER, 0, a16(addr), gw, 0, Z16), (abi.FAB_GW, gw, Z16, 4, 0, a16(addr))]
    return Bundle(
        settings={"default_action": "deny", "mode": "enforce", "unknown_sni": "deny"},
        segments=[{"id": SEG_CLI, "name": "clients", "interfaces": ["seg1"]},
                  {"id": SEG_SRV, "name": "servers", "interfaces": ["seg2"]}],
        apps=[], rules=[], src_entries=src, dst_entries=dst, policy_entries=pol,
        fab_entries=fab if fabric else [],
    )


def ack(fam: str, dst: str, sport: int = 40000) -> bytes:
    ip = IP if fam == "ipv4" else IPv6
    return raw(ETH / ip(src=ADDR[fam][0], dst=dst) / TCP(sport=sport, dport=5201, flags="A", seq=1, ack=1))


class SkBuff(C.Structure):
    """The head of struct __sk_buff, up to cb[]: what a SCHED_CLS test run may set."""

    _fields_ = [("len", C.c_uint32), ("pkt_type", C.c_uint32), ("mark", C.c_uint32),
                ("queue_mapping", C.c_uint32), ("protocol", C.c_uint32), ("vlan_present", C.c_uint32),
                ("vlan_tci", C.c_uint32), ("vlan_proto", C.c_uint32), ("priority", C.c_uint32),
                ("ingress_ifindex", C.c_uint32), ("ifindex", C.c_uint32), ("tc_index", C.c_uint32),
                ("cb", C.c_uint32 * 5), ("_rest", C.c_uint8 * 256)]


def tc_run(fd: int, frame: bytes, ifindex: int, repeat: int = 1) -> tuple[int, int]:
    """A sched_cls program on an skb arriving on `ifindex` -> (TC code, mean ns per run)."""
    buf_in = C.create_string_buffer(frame, len(frame))
    buf_out = C.create_string_buffer(len(frame) + 256)
    ctx_in, ctx_out = SkBuff(ifindex=ifindex, ingress_ifindex=ifindex), SkBuff()
    opts = libbpf.TestRunOpts(sz=C.sizeof(libbpf.TestRunOpts), repeat=repeat)
    opts.data_in, opts.data_size_in = C.cast(buf_in, C.c_void_p), len(frame)
    opts.data_out, opts.data_size_out = C.cast(buf_out, C.c_void_p), len(buf_out)
    opts.ctx_in, opts.ctx_size_in = C.cast(C.pointer(ctx_in), C.c_void_p), SkBuff._rest.offset
    opts.ctx_out, opts.ctx_size_out = C.cast(C.pointer(ctx_out), C.c_void_p), C.sizeof(ctx_out)
    libbpf._check(libbpf.lib().bpf_prog_test_run_opts(fd, C.byref(opts)), "tc test run")
    return opts.retval, opts.duration


def tc_interleaved(fd: int, empty: int, frame: bytes, ifindex: int, rounds: int = 7, repeat: int = 200_000) -> dict:
    a, b, d = [], [], []
    for _ in range(rounds):
        code, ta = tc_run(fd, frame, ifindex, repeat)
        _, tb = tc_run(empty, frame, ifindex, repeat)
        a.append(ta)
        b.append(tb)
        d.append(ta - tb)
    return {"ours_ns": statistics.median(a), "empty_ns": statistics.median(b), "marginal_ns": statistics.median(d),
            "retval": code}


def tc_single(fd: int, empty: int, frame: bytes, ifindex: int, n: int = SINGLE_RUNS, before=None) -> dict:
    """n single runs (repeat 1: a fresh skb each), each followed by one of the empty program;
    `before()` (not timed: map writes that reset a state) ahead of each."""
    a, b, d, codes = [], [], [], set()
    for _ in range(n):
        if before:
            before()
        code, ta = tc_run(fd, frame, ifindex)
        _, tb = tc_run(empty, frame, ifindex)
        codes.add(code)
        a.append(ta)
        b.append(tb)
        d.append(ta - tb)
    assert len(codes) == 1, f"every run must end the same way: {codes}"
    return {"ours_ns": statistics.median(a), "empty_ns": statistics.median(b), "marginal_ns": statistics.median(d),
            "retval": codes.pop()}


@pytest.fixture(scope="module")
def tc_empty():
    """A sched_cls program that returns TC_ACT_OK: the TC figures' reference."""
    from bcc import BPF

    b = BPF(text="int tr_tc_empty(struct __sk_buff *skb) { return 0; }")
    try:
        yield b.load_func("tr_tc_empty", BPF.SCHED_CLS).fd
    finally:
        b.cleanup()


@pytest.fixture(scope="module")
def fab_dp(bench_dp):
    """bench_dp with the transit policy (SELF: gateway 1, its transit device seg2p, any interface
    no segment names); its flow entries are removed afterwards."""
    import socket

    transit_dev = socket.if_nametoindex("seg2p")  # bench_dp's namespace: the process is in it
    bench_dp.transit_self = (GW_ME, transit_dev, a16(T_ME))
    yield bench_dp
    for name, key in (("flows4", abi.Flow4Key), ("flows6", abi.Flow6Key)):
        fd = bench_dp.map_fds[name]
        for k in libbpf.map_keys(fd, key):
            libbpf.map_delete(fd, k)
    bench_dp.set_ctl_flags(clear_bits=abi.CTL_NO_FASTPATH)


def apply(dp, fabric: bool) -> None:
    dp.generation += 1
    dp.apply(transit_bundle(fabric), dp.ifindexes, dp.generation, fab_self=dp.transit_self if fabric else None)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_transit_per_packet(benchmark, fab_dp, tc_empty, family):
    dp = fab_dp
    _cli, srv, far, vip = ADDR[family]
    seg1 = dp.ifindexes["seg1"]
    # (the service address's flow from another port: one client tuple to an app by both of its
    # addresses is a flow collision, refused)
    plain, transit, nat = ack(family, srv), ack(family, far), ack(family, vip, sport=40001)
    apply(dp, fabric=True)
    ev0 = dp.events()
    for frame in (plain, transit, nat):  # each flow's first packet: judged, its entries made
        assert libbpf.prog_test_run_xdp(dp.prog_fd(), frame, seg1).retval == 2
    tc = dp.prog_fd(loader.TC_PROG)
    assert tc_run(tc, transit, seg1)[0] == TC_REDIRECT, "the transit flow's frame must be tunnelled"
    assert tc_run(tc, plain, seg1)[0] == TC_OK
    assert dp.events()["transit_encap"] > ev0["transit_encap"]

    # bulkhead_transit_in can't be test-run: no tunnel metadata on a test skb (module docstring).
    c0 = dp.counters()["transit_unknown_peer"]["packets"]
    assert tc_run(dp.prog_fd(loader.TRANSIT_PROG), transit, seg1)[0] == TC_SHOT
    assert dp.counters()["transit_unknown_peer"]["packets"] == c0 + 1

    res: dict[str, dict] = {}

    def run():
        dp.set_ctl_flags(set_bits=abi.CTL_NO_FASTPATH)
        try:
            res["xdp_plain"] = measure(dp, plain, seg1)
            res["xdp_transit"] = measure(dp, transit, seg1)
        finally:
            dp.set_ctl_flags(clear_bits=abi.CTL_NO_FASTPATH)
        res["tc_plain"] = tc_interleaved(tc, tc_empty, plain, seg1)
        res["tc_transit"] = tc_interleaved(tc, tc_empty, transit, seg1)
        res["tc_transit_1"] = tc_single(tc, tc_empty, transit, seg1)
        res["tc_nat_transit_1"] = tc_single(tc, tc_empty, nat, seg1)
        apply(dp, fabric=False)
        res["tc_no_fabric"] = tc_interleaved(tc, tc_empty, plain, seg1)

    benchmark.pedantic(run, rounds=1, iterations=1)
    want_codes = {"xdp_plain": 2, "xdp_transit": 2, "tc_plain": TC_OK, "tc_transit": TC_REDIRECT,
                  "tc_transit_1": TC_REDIRECT, "tc_nat_transit_1": TC_REDIRECT, "tc_no_fabric": TC_OK}
    assert {k: r["retval"] for k, r in res.items()} == want_codes
    benchmark.extra_info.update({k: {kk: float(vv) for kk, vv in r.items()} for k, r in res.items()})
    m = {k: r["marginal_ns"] for k, r in res.items()}

    LINES.extend([f"| {family} | {k} | {res[k]['empty_ns']:.0f} | {res[k]['ours_ns']:.0f} | {m[k]:.0f} |"
                  for k in want_codes])
    a_side = m["xdp_transit"] + m["tc_transit"]
    goal(B, f"encapsulate at A per packet: bulkhead_xdp + bulkhead_tc, established transit flow, {family}",
         ours=a_side, unit="ns", baseline=m["xdp_plain"], baseline_is="bulkhead_xdp, plain established flow",
         ratio=a_side / m["xdp_plain"] if m["xdp_plain"] > 0 else None, want=WANT, met=None,
         note=(f"BPF_PROG_TEST_RUN, marginal: XDP {m['xdp_transit']:.0f} ns + TC {m['tc_transit']:.0f} ns; "
               "the kernel's VXLAN encapsulation is in the live rate"))
    goal(B, f"bulkhead_tc, established transit flow (lookup, tunnel key + GBP, redirect), {family}",
         ours=m["tc_transit"], unit="ns", baseline=m["tc_plain"], baseline_is="bulkhead_tc, plain flow's frame",
         ratio=m["tc_transit"] / m["tc_plain"] if m["tc_plain"] > 0 else None, want=WANT, met=None, note=f"the same program without fabric entries: {m['tc_no_fabric']:.0f} ns")
    goal(B, f"bulkhead_tc, service address: translate + tunnel, single runs, {family}",
         ours=m["tc_nat_transit_1"], unit="ns", baseline=m["tc_transit_1"],
         baseline_is="transit without translation, single runs",
         ratio=m["tc_nat_transit_1"] / m["tc_transit_1"] if m["tc_transit_1"] > 0 else None, want=WANT, met=None,
         note=f"{SINGLE_RUNS:,} fresh skbs each")


# ------------------------------------------------------------------ 2. live
def floors(dp, tc_empty: int, seg1: int, frame: bytes) -> dict[str, float]:
    """ns per run the BPF statistics give an empty program (XDP, TC) while they are on: their floor."""
    from .transitlab import prog_stats

    out = {}
    for kind, fd in (("xdp", dp.prog_fd(loader.EMPTY_PROG)), ("tc", tc_empty)):
        t0, n0 = prog_stats(fd)
        if kind == "xdp":
            libbpf.prog_test_run_xdp(fd, frame, seg1, repeat=1_000_000)
        else:
            tc_run(fd, frame, seg1, repeat=1_000_000)
        t1, n1 = prog_stats(fd)
        out[kind] = (t1 - t0) / max(1, n1 - n0)
    return out


def live_stats(lab, dp, tc_empty: int) -> dict[str, float]:
    """ns per packet of the agents' programs on the live transit path (one UDP run, stats on)."""
    from .transitlab import BpfStats, prog_stats

    progs = {"xdp_a": ("gwa", loader.XDP_PROG), "tc_a": ("gwa", loader.TC_PROG),
             "transit_in_b": ("gwb", loader.TRANSIT_PROG)}
    fds = {k: lab.agent_prog(gw, name) for k, (gw, name) in progs.items()}
    try:
        with BpfStats():
            before = {k: prog_stats(fd) for k, fd in fds.items()}
            r = lab.udp(STATS_FRAMES)
            after = {k: prog_stats(fd) for k, fd in fds.items()}
            fl = floors(dp, tc_empty, dp.ifindexes["seg1"], ack("ipv4", ADDR["ipv4"][1]))
    finally:
        for fd in fds.values():
            os.close(fd)
    out = {k: (after[k][0] - before[k][0]) / max(1, after[k][1] - before[k][1]) for k in fds}
    out.update({f"runs_{k}": after[k][1] - before[k][1] for k in fds})
    out.update({"floor_xdp": fl["xdp"], "floor_tc": fl["tc"], "received": r["received"]})
    return out


CASES = ("vxlan", "vxlan+xdp_pass", "bulkhead")


def one_round(lab, dp, tc_empty, res: dict, i: int) -> None:
    """Every case once; the order turns by one each round, so no case always comes first."""
    for case in CASES[i % len(CASES):] + CASES[:i % len(CASES)]:
        if case == "bulkhead":
            res.setdefault("_start_s", []).append(lab.bulkhead_on())
            ev0 = {gw: a.status()["events"] for gw, a in lab.agents.items()}
        else:
            lab.baseline_on(xdp_pass=case.endswith("xdp_pass"))
        try:
            lab.udp(1000)  # the flow's first frames: judged (and neighbours resolved) before measuring
            lab.udp(1000)
            res.setdefault(case, {}).setdefault("udp", []).append(lab.udp(FRAMES))
            res[case].setdefault("tcp", []).append(lab.tcp(TCP_S))
            paced = lab.udp_paced(PACED_S)
            assert paced["received"] == paced["sent"], f"{case}: the paced flow lost frames: {paced}"
            res[case].setdefault("paced", []).append(paced)
            if case == "bulkhead":
                ev1 = {gw: a.status()["events"] for gw, a in lab.agents.items()}
                got = res[case]["udp"][-1]["received"]
                # Every frame b-srv counted went through both gateways' bulkhead: tunnelled at gwa, judged
                # and delivered at gwb.
                for gw, ev in (("gwa", "transit_encap"), ("gwb", "transit_decap")):
                    assert ev1[gw][ev] - ev0[gw][ev] >= got, (gw, ev, ev0[gw], ev1[gw], got)
                res.setdefault("_stats", []).append(live_stats(lab, dp, tc_empty))
        finally:
            if case == "bulkhead":
                lab.bulkhead_off()
                left = lab.leftovers()
                assert not left, f"bulkhead down left: {left}"
            else:
                lab.baseline_off()


def med(res: dict, case: str, traffic: str, key: str) -> float:
    return statistics.median(r[key] for r in res[case][traffic])


def paired(res: dict, case: str, traffic: str, key: str) -> float:
    """Median over rounds of bulkhead's figure over `case`'s in the same round (the machine drifts
    between rounds more than the cases differ within one)."""
    return statistics.median(b[key] / c[key] for b, c in zip(res["bulkhead"][traffic], res[case][traffic]))


@pytest.mark.timeout(1800)
def test_transit_live(benchmark, fab_dp, tc_empty):
    if os.cpu_count() < 2:
        pytest.skip("needs 2 CPUs: the generator on one, the gateways on the other")
    from .transitlab import TransitLab

    res: dict = {}
    with TransitLab() as lab:
        benchmark.pedantic(lambda: [one_round(lab, fab_dp, tc_empty, res, i) for i in range(ROUNDS)],
                           rounds=1, iterations=1)
    for case in CASES:
        for t in ("udp", "tcp"):
            assert all(r.get("received", r.get("bytes")) > 0 for r in res[case][t]), (case, t, res[case][t])

    u = {c: med(res, c, "udp", "mpps") for c in CASES}
    g = {c: med(res, c, "tcp", "gbps") for c in CASES}
    offered = {c: med(res, c, "udp", "gen_mpps") for c in CASES}
    st = {k: statistics.median(s[k] for s in res["_stats"]) for k in res["_stats"][0]}
    ns = lambda mpps: 1e3 / mpps  # ns per packet on the gateways' core
    extra = {c: ns(u["bulkhead"]) - ns(u[c]) for c in CASES[:2]}
    cpu = {c: med(res, c, "paced", "ns_per_pkt") for c in CASES}

    def cpu_extra(c: str) -> float:
        return statistics.median(b["ns_per_pkt"] - x["ns_per_pkt"]
                                 for b, x in zip(res["bulkhead"]["paced"], res[c]["paced"]))

    a_live = st["xdp_a"] - st["floor_xdp"] + st["tc_a"] - st["floor_tc"]
    b_live = st["transit_in_b"] - st["floor_tc"]

    lines = [f"Transit across two gateways (gwa -> gwb), median of {ROUNDS} interleaved rounds; UDP: {FRAMES:,} "
             f"60-byte frames of one flow per measurement; TCP: one connection, {TCP_S:g} s",
             "",
             ("| case | UDP Mpps | ns per packet (gateways' core) | UDP offered Mpps | TCP Gbit/s | bulkhead / this, "
              "UDP | bulkhead / this, TCP | UDP Mpps, each round | TCP Gbit/s, each round |"),
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in CASES:
        each_u = ", ".join(f"{r['mpps']:.3f}" for r in res[c]["udp"])
        each_g = ", ".join(f"{r['gbps']:.2f}" for r in res[c]["tcp"])
        lines.append(f"| {c} | {u[c]:.3f} | {ns(u[c]):,.0f} | {offered[c]:.2f} | {g[c]:.2f} | "
                     f"{paired(res, c, 'udp', 'mpps'):.2f}x | {paired(res, c, 'tcp', 'gbps'):.2f}x | {each_u} | {each_g} |")
    lines.append("(bulkhead / this: the median over rounds of the two figures' ratio in the same round)")
    lines += ["", "CPU of the two-gateway path per packet (paced UDP, no loss; the gateways' threads on their core)", "",
              "| case | ns per packet | kpps offered | bulkhead - this, ns (paired) | each round, ns |",
              "|---|---:|---:|---:|---|"]
    for c in CASES:
        each = ", ".join(f"{r['ns_per_pkt']:,.0f}" for r in res[c]["paced"])
        lines.append(f"| {c} | {cpu[c]:,.0f} | {med(res, c, 'paced', 'kpps'):.1f} | {cpu_extra(c):+,.0f} | {each} |")
    lines += ["", f"agents' start (both, side by side): {statistics.median(res['_start_s']):.1f} s (median)",
              "",
              "Live ns per packet of bulkhead's programs (BPF run-time statistics, one UDP run of "
              f"{STATS_FRAMES:,} frames; floor: an empty program under the same statistics)",
              "", "| program | ns per run | runs | minus floor |", "|---|---:|---:|---:|"]
    for k, fl in (("xdp_a", "floor_xdp"), ("tc_a", "floor_tc"), ("transit_in_b", "floor_tc")):
        lines.append(f"| {k} | {st[k]:.0f} | {st['runs_' + k]:,.0f} | {st[k] - st[fl]:.0f} |")
    lines.append(f"| floor: empty XDP / empty TC | {st['floor_xdp']:.0f} / {st['floor_tc']:.0f} | | |")
    lines += ["", "Per packet, BPF_PROG_TEST_RUN (marginal over an empty program of the same type)", "",
              "| family | scenario | empty ns | bulkhead ns | marginal ns |", "|---|---|---:|---:|---:|"] + LINES
    text = "\n".join(lines) + "\n"
    TABLE_FILE.parent.mkdir(exist_ok=True)
    TABLE_FILE.write_text(text)
    print("\n" + text + f"\n(written to {TABLE_FILE})")
    benchmark.extra_info["table"] = text

    goal(B, "per packet, encapsulate at A + decapsulate and check at B, live (service address: translate + "
         "tunnel at gwa, judge by the carried identity at gwb)", ours=a_live + b_live, unit="ns", want=WANT,
         met=None, note=(f"BPF run-time statistics minus an empty program's: gwa bulkhead_xdp + bulkhead_tc "
                         f"{a_live:.0f} ns, gwb bulkhead_transit_in {b_live:.0f} ns"))
    for c, why in (("vxlan", "plain kernel VXLAN, no bulkhead"),
                   ("vxlan+xdp_pass", "plain VXLAN + bare XDP_PASS on the segment interfaces")):
        goal(B, "CPU per packet of the whole path gwa -> gwb (kernel + bulkhead, both gateways), paced UDP, no loss",
             ours=cpu["bulkhead"], unit="ns", baseline=cpu[c], baseline_is=why,
             ratio=paired(res, c, "paced", "ns_per_pkt"), ratio_is="median of paired rounds", want=WANT, met=None,
             note=f"{cpu_extra(c):+,.0f} ns per packet with bulkhead (median of paired rounds)")
    for c, why in (("vxlan", "plain kernel VXLAN, no bulkhead"),
                   ("vxlan+xdp_pass", "plain VXLAN + bare XDP_PASS on the segment interfaces")):
        goal(B, "UDP packet rate across gwa -> gwb, one flow, 60-byte frames", ours=u["bulkhead"], unit="Mpps",
             baseline=u[c], baseline_is=why, ratio=paired(res, c, "udp", "mpps"), ratio_is="median of paired rounds",
             want=WANT, met=None,
             note=f"{extra[c]:+,.0f} ns per packet on the gateways' one core")
    for c, why in (("vxlan", "plain kernel VXLAN, no bulkhead"),
                   ("vxlan+xdp_pass", "plain VXLAN + bare XDP_PASS on the segment interfaces")):
        goal(B, "TCP throughput across gwa -> gwb, one connection", ours=g["bulkhead"], unit="Gbit/s",
             baseline=g[c], baseline_is=why, ratio=paired(res, c, "tcp", "gbps"), ratio_is="median of paired rounds",
             want=WANT, met=None)
