"""Telemetry of the data path, on crafted frames (BPF_PROG_TEST_RUN):

- flow events in the `flow_events` ring buffer: one NEW per flow (any
  verdict), CHANGE when a policy swap or a server name changes its verdict,
  one END per flow at its first FIN or RST; the tuple always client -> server;
- `pair_flows`: flows judged per (src app, dst app, rule, reason), exact;
- `lat_hist`: one server-RTT, client-RTT and server-time sample per TCP flow;
- a full ring buffer: every event is either delivered or counted as lost.

Verdicts are checked on every step too (Xdp.expect): telemetry never changes one.
"""
from __future__ import annotations

import ctypes as C
import socket

import pytest
from scapy.all import IP, TCP, UDP, IPv6, Raw

from bulkhead.datapath import abi, libbpf, loader

from .conftest import (
    APP_PAY,
    APP_WEB,
    BASE_POLICY,
    C4,
    C6,
    E,
    EV,
    PAY4,
    PAY6,
    RULE_PAY_AUDIT,
    RULE_PAY_HTTPS,
    RULE_PAY_TELNET,
    SEG_CORE,
    SEG_PROD,
    A,
    R,
    X,
    base_bundle,
    pol,
)
from .test_xdp_sni import RULE_NAME_ALLOW, client_hello, send_hello, sni_bundle

FE, LAT = abi.FlowEv, abi.Lat
SPORT = 41000


class Ring:
    """Drains flow_events (opened once per session: bcc keeps one reader per map)."""

    def __init__(self, dp):
        self.dp = dp
        self.got: list[abi.FlowEvent] = []
        dp.bpf[b"flow_events"].open_ring_buffer(self._cb)

    def _cb(self, _ctx, data, size):
        ev = abi.FlowEvent()
        C.memmove(C.byref(ev), data, min(size, C.sizeof(ev)))
        self.got.append(ev)

    def drain(self) -> list[abi.FlowEvent]:
        self.dp.bpf.ring_buffer_consume()
        out, self.got = self.got, []
        return out


def _ring(x) -> Ring:
    """The drained Ring of a session datapath (`xdp` or `xdp_bench`)."""
    r = getattr(x, "_ring", None)
    if r is None:
        r = x._ring = Ring(x.dp)
    r.drain()
    return r


@pytest.fixture
def ring(xdp):
    return _ring(xdp)


def frames(v6: bool, dport: int = 443, sport: int = SPORT):
    """(forward, reply) frame makers of one TCP flow web -> payments."""
    fwd_l3 = IPv6(src=C6, dst=PAY6) if v6 else IP(src=C4, dst=PAY4)
    rep_l3 = IPv6(src=PAY6, dst=C6) if v6 else IP(src=PAY4, dst=C4)

    def fwd(flags, payload=b""):
        p = E / fwd_l3 / TCP(sport=sport, dport=dport, flags=flags, seq=100)
        return p / Raw(payload) if payload else p

    def rep(flags, payload=b""):
        p = E / rep_l3 / TCP(sport=dport, dport=sport, flags=flags, seq=900)
        return p / Raw(payload) if payload else p

    return fwd, rep


def addr16(a: str) -> bytes:
    return loader.v4mapped(__import__("ipaddress").ip_address(a))


def lat(xdp, kind) -> int:
    return xdp.dp.latency().get((APP_WEB, APP_PAY, kind), {}).get("count", 0)


def pairs(xdp, rule, reason) -> int:
    return xdp.dp.pair_flows().get((APP_WEB, APP_PAY, rule, reason), 0)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_tcp_flow_new_timing_and_one_end(xdp, ring, v6):
    fwd, rep = frames(v6)
    lat0 = {k: lat(xdp, k) for k in LAT}
    pairs0 = pairs(xdp, RULE_PAY_HTTPS, R.ALLOW_RULE)

    v = xdp.expect(fwd("S"), "prod", X.PASS, R.ALLOW_RULE)
    assert v.events.get(EV.FLOW_ENTRY_NEW) == 2 and v.events.get(EV.FLOW_NEW) == 1
    (new,) = ring.drain()
    assert (FE(new.kind), R(new.reason), new.rule_id, new.src_app, new.dst_app) == (
        FE.NEW, R.ALLOW_RULE, RULE_PAY_HTTPS, APP_WEB, APP_PAY)
    assert (new.segment_id, new.peer_segment, new.family, new.proto) == (SEG_PROD, SEG_CORE, 6 if v6 else 4, 6)
    assert (bytes(new.saddr), bytes(new.daddr)) == (addr16(C6 if v6 else C4), addr16(PAY6 if v6 else PAY4))
    assert (socket.ntohs(new.sport_be), socket.ntohs(new.dport_be), new.packets, new.sni_len) == (SPORT, 443, 1, 0)
    assert pairs(xdp, RULE_PAY_HTTPS, R.ALLOW_RULE) == pairs0 + 1

    xdp.expect(rep("SA"), "core", X.PASS, R.ALLOW_REPLY)
    assert lat(xdp, LAT.SERVER_RTT) == lat0[LAT.SERVER_RTT] + 1
    xdp.expect(fwd("A"), "prod", X.PASS, R.ALLOW_RULE)
    assert lat(xdp, LAT.CLIENT_RTT) == lat0[LAT.CLIENT_RTT] + 1
    xdp.expect(fwd("PA", b"GET / HTTP/1.1\r\n\r\n"), "prod", X.PASS, R.ALLOW_RULE)
    xdp.expect(rep("A"), "core", X.PASS, R.ALLOW_REPLY)  # a pure ACK is no response yet
    assert lat(xdp, LAT.SERVER_TIME) == lat0[LAT.SERVER_TIME]
    xdp.expect(rep("PA", b"HTTP/1.1 200 OK\r\n\r\n"), "core", X.PASS, R.ALLOW_REPLY)
    xdp.expect(rep("PA", b"more"), "core", X.PASS, R.ALLOW_REPLY)  # one sample per flow
    assert {k: lat(xdp, k) - lat0[k] for k in LAT} == {k: 1 for k in LAT}
    assert ring.drain() == []  # no events between the flow's start and its end

    xdp.expect(fwd("FA"), "prod", X.PASS, R.ALLOW_RULE)
    (end,) = ring.drain()
    # counts before the FIN: SYN, ACK, request / SYN-ACK, ACK, response, more
    assert (FE(end.kind), R(end.reason), end.packets, end.r_packets) == (FE.END, R.ALLOW_RULE, 3, 4)
    assert (end.flags & abi.FLOWF_REPLY, end.segment_id, end.peer_segment) == (0, SEG_PROD, SEG_CORE)
    xdp.expect(rep("FA"), "core", X.PASS, R.ALLOW_REPLY)
    xdp.expect(fwd("A"), "prod", X.PASS, R.ALLOW_RULE)
    assert ring.drain() == []  # one end per flow


def test_end_told_by_the_server_side_reads_client_to_server(xdp, ring):
    fwd, rep = frames(False)
    xdp.expect(fwd("S"), "prod", X.PASS, R.ALLOW_RULE)
    xdp.expect(rep("SA"), "core", X.PASS, R.ALLOW_REPLY)
    ring.drain()
    xdp.expect(rep("R"), "core", X.PASS, R.ALLOW_REPLY)
    (end,) = ring.drain()
    assert (FE(end.kind), R(end.reason), end.flags & abi.FLOWF_REPLY) == (FE.END, R.ALLOW_RULE, abi.FLOWF_REPLY)
    assert (bytes(end.saddr), socket.ntohs(end.sport_be), socket.ntohs(end.dport_be)) == (addr16(C4), SPORT, 443)
    assert (end.segment_id, end.peer_segment, end.packets, end.r_packets) == (SEG_PROD, SEG_CORE, 1, 1)


def test_syn_retransmission_is_the_same_flow_a_syn_after_the_end_a_new_one(xdp, ring):
    fwd, rep = frames(False)
    xdp.expect(fwd("S"), "prod", X.PASS, R.ALLOW_RULE)
    v = xdp.expect(fwd("S"), "prod", X.PASS, R.ALLOW_RULE)  # SYN-ACK lost: the client resends
    assert EV.FLOW_NEW not in v.events
    assert [FE(e.kind) for e in ring.drain()] == [FE.NEW]
    for frame, ifname in ((rep("SA"), "core"), (fwd("A"), "prod"), (fwd("FA"), "prod"), (rep("FA"), "core"),
                          (fwd("A"), "prod")):
        xdp.judge(frame, ifname)
    assert [FE(e.kind) for e in ring.drain()] == [FE.END]
    v = xdp.expect(fwd("S"), "prod", X.PASS, R.ALLOW_RULE)  # the 5-tuple reused by a new connection
    assert v.events.get(EV.FLOW_NEW) == 1
    assert [FE(e.kind) for e in ring.drain()] == [FE.NEW]


@pytest.mark.parametrize("dport,reason,rule,audit", [
    (23, R.DENY_RULE, RULE_PAY_TELNET, 0),
    (8080, R.AUDIT_RULE, RULE_PAY_AUDIT, abi.ACTF_AUDIT),  # would-deny: distinct from a deny
], ids=["deny", "audit"])
def test_denied_and_would_deny_flows_are_told_apart(xdp, ring, dport, reason, rule, audit):
    fwd, _ = frames(False, dport=dport)
    before = pairs(xdp, rule, reason)
    xdp.expect(fwd("S"), "prod", X.PASS if audit else X.DROP, reason)
    (new,) = ring.drain()
    assert (FE(new.kind), R(new.reason), new.rule_id, new.flags & abi.ACTF_AUDIT) == (FE.NEW, reason, rule, audit)
    assert pairs(xdp, rule, reason) == before + 1
    xdp.expect(fwd("S"), "prod", X.PASS if audit else X.DROP, reason)  # cached: counted once
    assert pairs(xdp, rule, reason) == before + 1 and ring.drain() == []


def test_policy_swap_tells_the_verdict_change(xdp, ring):
    fwd, _ = frames(False, sport=SPORT + 1)
    xdp.expect(fwd("S"), "prod", X.PASS, R.ALLOW_RULE)
    xdp.expect(fwd("A"), "prod", X.PASS, R.ALLOW_RULE)
    ring.drain()
    deny = [pol(APP_WEB, APP_PAY, 6, 443, A.DENY, 99)] + [e for e in BASE_POLICY if e[-1] != RULE_PAY_HTTPS]
    xdp.apply(base_bundle(policy=deny))
    xdp.expect(fwd("A"), "prod", X.DROP, R.DENY_RULE)
    (ch,) = ring.drain()
    assert (FE(ch.kind), R(ch.prev_reason), R(ch.reason), ch.rule_id) == (FE.CHANGE, R.ALLOW_RULE, R.DENY_RULE, 99)
    assert ch.generation == xdp.generation


def test_server_name_decision_is_told_with_the_name(xdp, ring):
    xdp.apply(sni_bundle())
    before = pairs(xdp, RULE_NAME_ALLOW, R.ALLOW_RULE)
    v = send_hello(xdp, client_hello(b"Pay.Example.Internal"))
    assert R.ALLOW_RULE in v.reasons
    new, ch = ring.drain()
    assert (FE(new.kind), R(new.reason)) == (FE.NEW, R.SNI_PENDING)
    assert (FE(ch.kind), R(ch.prev_reason), R(ch.reason), ch.rule_id) == (
        FE.CHANGE, R.SNI_PENDING, R.ALLOW_RULE, RULE_NAME_ALLOW)
    assert bytes(ch.sni[: ch.sni_len]) == b"pay.example.internal"
    assert pairs(xdp, RULE_NAME_ALLOW, R.ALLOW_RULE) == before + 1


@pytest.mark.parametrize("name", [b"n" * 64, b"L" * 100 + b".example"], ids=["64", "108"])
def test_server_name_length_tells_a_whole_name_from_a_cut_one(xdp, ring, name):
    """sni_len is the name's length: a 64-byte name is whole in the 64-byte log; a
    longer one (streamed) is logged by its start, and its length says it was cut."""
    xdp.apply(sni_bundle())
    send_hello(xdp, client_hello(name))
    _, ch = ring.drain()
    assert ch.sni_len == len(name)
    assert bytes(ch.sni[:63]) == name.lower()[:63]


def test_full_ring_counts_every_lost_event(xdp_bench):
    """Every new flow is either in the ring or counted lost: nothing vanishes.
    (BH_CTL_BYPASS_FLOWS is a benchmark hook: the bench build.)"""
    xdp, ring = xdp_bench, _ring(xdp_bench)
    frame = bytes(E / IP(src=C4, dst=PAY4) / UDP(sport=SPORT, dport=53) / Raw(b"q"))
    runs = 20000  # 20000 x 176 bytes (record + header) > the 2 MiB ring
    xdp.dp.set_ctl_flags(set_bits=abi.CTL_BYPASS_FLOWS)  # every run is a new flow
    try:
        e0 = xdp.events()
        libbpf.prog_test_run_xdp(xdp.dp.prog_fd(), frame, xdp.ifindex["prod"], repeat=runs)
        e1 = xdp.events()
    finally:
        xdp.dp.set_ctl_flags(clear_bits=abi.CTL_BYPASS_FLOWS)
    got = ring.drain()
    lost = e1[EV.FLOW_EVENT_LOST] - e0[EV.FLOW_EVENT_LOST]
    assert lost > 0 and len(got) > 0
    assert len(got) + lost == runs
    assert all(FE(e.kind) == FE.NEW and R(e.reason) == R.ALLOW_RULE for e in got)


@pytest.fixture(scope="module")
def perf_dp(xdp_session):
    """The program built for kernels without a BPF ring buffer (-DBH_EVENTS_PERF): a second compile."""
    import os

    pin = loader.PIN_ROOT / f"bpftest-perf-{os.getpid()}"
    dp = loader.Datapath(pin, defines=("BH_EVENTS_PERF",)).load()
    try:
        dp.apply(base_bundle(), xdp_session.ifindex, 1)
        yield dp
    finally:
        loader.remove_pins(pin)


def test_perf_buffer_fallback_delivers_the_same_events(xdp, perf_dp):
    # `xdp` puts the process in the test namespace: BPF_PROG_TEST_RUN resolves
    # ingress_ifindex there (outside, the index may name nothing: ENODEV).
    assert perf_dp.events_perf
    got = []

    def cb(_cpu, data, size):
        ev = abi.FlowEvent()
        C.memmove(C.byref(ev), data, min(size, C.sizeof(ev)))
        got.append(ev)

    perf_dp.bpf[b"flow_events"].open_perf_buffer(cb, page_cnt=8)
    fwd, _ = frames(False, sport=SPORT + 7)
    r = libbpf.prog_test_run_xdp(perf_dp.prog_fd(), bytes(fwd("S")), xdp.ifindex["prod"])
    assert r.retval == X.PASS
    for _ in range(20):
        perf_dp.bpf.perf_buffer_poll(50)
        if got:
            break
    (new,) = got
    assert (FE(new.kind), R(new.reason), new.rule_id, new.src_app, new.dst_app) == (
        FE.NEW, R.ALLOW_RULE, RULE_PAY_HTTPS, APP_WEB, APP_PAY)
    assert (bytes(new.saddr), socket.ntohs(new.sport_be)) == (addr16(C4), SPORT + 7)
