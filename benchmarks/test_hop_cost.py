"""What request timing per hop (issue 16) costs a packet: BPF_PROG_TEST_RUN of bulkhead_tc at the
client's gateway, on transit flows that are timed and flows that are not.

The transit benchmark's namespace and policy (test_transit.py: clients in segment 1 -> far, behind
gateway 2, tcp/5201). Each flow starts with a SYN through bulkhead_xdp (so its entry asks for
classification, BH_FLOWX_HOP_CLASSIFY, as every transit TCP flow's does), then its first payload
through bulkhead_tc decides: an HTTP request makes it timed (BH_FLOWX_HOP, a req_hop entry),
anything else leaves it untimed for good. Then, marginal over an empty sched_cls program,
interleaved, median of 7 rounds of 200,000 runs (or single runs where a run changes the state):

    mid-stream ACK        a flow first seen mid-stream (no SYN: never classified, as before issue 16)
    untimed data / ACK    a flow whose first payload was not HTTP/TLS: the one flag test
    timed data            more of the same request: the scratch key, a req_hop lookup
    timed ACK             a pure ACK of a timed flow: bh_hop_wants says there is nothing to do
    classify (single)     the first payload: the kind read from the payload, the req_hop entry
                          written (the flow entry reset to "classify" before each run)
    new request (single)  a request after an answer: the BH_FE_HOP event of the last one
                          (ring buffer reserve/submit), the entry reset for the next
    untimed data (single) beside them, so single runs compare with single runs

The server's gateway's side: an answer from the app, in bulkhead_tc on its way into the tunnel
(its time since the request, bh_hop_code, into the VNI). Its flow entries are bulkhead_transit_in's,
which a test run can't make (no tunnel metadata on a test skb, see test_transit.py), so the
benchmark writes the reply entry such a gateway would hold, on segment 2, for the timed flow's
reversed tuple (its forward key is then the timed flow's own, whose req_hop entry it finds):

    answer untimed / timed   the same entry without / with BH_FLOWX_HOP (the answer's time coded)

The live lab (tests/integration/test_fabric_hops.py) runs the real thing.

Writes build/bench-hops.md; the headline figures go to make bench's table (benchmarks/summary.py).
"""
from __future__ import annotations

import ctypes as C
import socket

import pytest
from bulkhead.datapath import abi, libbpf, loader
from scapy.all import IP, TCP, raw

from .conftest import ring_counter
from .summary import goal
from .test_transit import (  # noqa: F401 -- fab_dp, tc_empty: fixtures, used by name
    ADDR,
    ETH,
    TABLE_FILE,
    TC_REDIRECT,
    apply,
    fab_dp,
    tc_empty,
    tc_interleaved,
    tc_run,
    tc_single,
)

HOP_TABLE = TABLE_FILE.with_name("bench-hops.md")
B = "request timing per hop"
WANT = "reported (no figure set)"
SINGLE = 1001
SPORT_UNTIMED, SPORT_TIMED, SPORT_CLASSIFY, SPORT_MIDSTREAM = 40020, 40021, 40022, 40023
REQUEST = b"GET /r HTTP/1.1\r\nHost: far.apps.example\r\nUser-Agent: bench\r\n\r\n"
DATA = bytes(range(64))  # neither HTTP nor TLS


def frame(sport: int, flags: str, payload: bytes = b"") -> bytes:
    _cli, _srv, far, _vip = ADDR["ipv4"]
    return raw(ETH / IP(src=ADDR["ipv4"][0], dst=far) / TCP(sport=sport, dport=5201, flags=flags, seq=1, ack=1)
               / payload)


def flow_key(dp, sport: int) -> abi.Flow4Key:
    keys = [k for k in libbpf.map_keys(dp.map_fds["flows4"], abi.Flow4Key)
            if k.sport_be == socket.htons(sport) and k.dport_be == socket.htons(5201)]
    assert len(keys) == 1, f"one forward entry for sport {sport}, found {len(keys)}"
    return keys[0]


def flow_get(dp, k) -> abi.Flow:
    v = abi.Flow()
    libbpf._check(libbpf.lib().bpf_map_lookup_elem(dp.map_fds["flows4"], C.byref(k), C.byref(v)), "flow lookup")
    return v


def answer_frame(payload: bytes = DATA) -> bytes:
    """The app's answer to the timed flow, as the server's gateway sees it come from its segment."""
    _cli, _srv, far, _vip = ADDR["ipv4"]
    return raw(ETH / IP(src=far, dst=ADDR["ipv4"][0]) / TCP(sport=5201, dport=SPORT_TIMED, flags="PA", seq=1, ack=1)
               / payload)


def put_answer_entry(dp, timed: bool) -> None:
    """The reply entry a server's gateway holds for the timed flow: on segment 2 (where the answer
    comes from), to the client's segment 1 through the transit."""
    fwd = flow_get(dp, flow_key(dp, SPORT_TIMED))
    v = abi.Flow.from_buffer_copy(bytes(fwd))
    v.flags = abi.FLOWF_TRANSIT | abi.FLOWF_REPLY
    v.peer_segment = 1
    v.xflags = abi.FLOWX_HOP if timed else 0
    _cli, _srv, far, _vip = ADDR["ipv4"]
    k = abi.Flow4Key(saddr_be=int.from_bytes(socket.inet_aton(far), "little"),
                     daddr_be=int.from_bytes(socket.inet_aton(ADDR["ipv4"][0]), "little"),
                     sport_be=socket.htons(5201), dport_be=socket.htons(SPORT_TIMED), proto=6, segment_id=2)
    libbpf.map_update(dp.map_fds["flows4"], k, v)


def hop_fd(dp) -> int:
    return dp.bpf.get_table(b"req_hop").map_fd  # unpinned: the benchmark build's own


def hop_entries(dp) -> list[tuple[abi.Flow6Key, abi.Hop]]:
    out = []
    for k in libbpf.map_keys(hop_fd(dp), abi.Flow6Key):
        v = abi.Hop()
        if libbpf.lib().bpf_map_lookup_elem(hop_fd(dp), C.byref(k), C.byref(v)) == 0:
            out.append((k, v))
    return out


@pytest.fixture
def hop_flows(fab_dp):
    dp = fab_dp
    apply(dp, fabric=True)
    seg1 = dp.ifindexes["seg1"]
    for sport in (SPORT_UNTIMED, SPORT_TIMED, SPORT_CLASSIFY):
        assert libbpf.prog_test_run_xdp(dp.prog_fd(), frame(sport, "S"), seg1).retval == 2  # XDP_PASS
        assert flow_get(dp, flow_key(dp, sport)).xflags & abi.FLOWX_HOP_CLASSIFY, "a transit SYN asks to classify"
    assert libbpf.prog_test_run_xdp(dp.prog_fd(), frame(SPORT_MIDSTREAM, "A"), seg1).retval == 2
    assert not flow_get(dp, flow_key(dp, SPORT_MIDSTREAM)).xflags & abi.FLOWX_HOP_CLASSIFY
    tc = dp.prog_fd(loader.TC_PROG)
    assert tc_run(tc, frame(SPORT_UNTIMED, "PA", DATA), seg1)[0] == TC_REDIRECT
    assert tc_run(tc, frame(SPORT_TIMED, "PA", REQUEST), seg1)[0] == TC_REDIRECT
    untimed, timed = (flow_get(dp, flow_key(dp, s)).xflags for s in (SPORT_UNTIMED, SPORT_TIMED))
    assert untimed & (abi.FLOWX_HOP | abi.FLOWX_HOP_CLASSIFY) == 0, "not HTTP/TLS: never timed"
    assert timed & abi.FLOWX_HOP and not timed & abi.FLOWX_HOP_CLASSIFY, "an HTTP request: timed"
    assert len(hop_entries(dp)) == 1
    yield dp
    for k, _ in hop_entries(dp):
        libbpf.map_delete(hop_fd(dp), k)


def test_hop_cost_per_packet(benchmark, hop_flows, tc_empty):
    dp = hop_flows
    seg1 = dp.ifindexes["seg1"]
    tc = dp.prog_fd(loader.TC_PROG)
    seen = ring_counter(dp)
    ckey = flow_key(dp, SPORT_CLASSIFY)
    (tkey, tval), = hop_entries(dp)

    def reset_classify() -> None:
        """SPORT_CLASSIFY's entry back to "first payload not seen", its req_hop entry gone."""
        v = flow_get(dp, ckey)
        v.xflags = (v.xflags | abi.FLOWX_HOP_CLASSIFY) & ~abi.FLOWX_HOP
        libbpf.map_update(dp.map_fds["flows4"], ckey, v)
        for k, h in hop_entries(dp):
            if bytes(k) != bytes(tkey):
                libbpf.map_delete(hop_fd(dp), k)

    def answered() -> None:
        """The timed flow's turn answered: its next payload is a new request (an event)."""
        h = abi.Hop.from_buffer_copy(bytes(tval))
        h.state = abi.HOPS_REQ | abi.HOPS_RESP | abi.HOPS_APP
        libbpf.map_update(hop_fd(dp), tkey, h)

    res: dict[str, dict] = {}
    ev = {}

    def run():
        res["midstream_ack"] = tc_interleaved(tc, tc_empty, frame(SPORT_MIDSTREAM, "A"), seg1)
        res["untimed_data"] = tc_interleaved(tc, tc_empty, frame(SPORT_UNTIMED, "PA", DATA), seg1)
        res["timed_data"] = tc_interleaved(tc, tc_empty, frame(SPORT_TIMED, "PA", DATA), seg1)
        res["untimed_ack"] = tc_interleaved(tc, tc_empty, frame(SPORT_UNTIMED, "A"), seg1)
        res["timed_ack"] = tc_interleaved(tc, tc_empty, frame(SPORT_TIMED, "A"), seg1)
        seg2 = dp.ifindexes["seg2"]
        put_answer_entry(dp, timed=False)
        res["answer_untimed"] = tc_interleaved(tc, tc_empty, answer_frame(), seg2)
        put_answer_entry(dp, timed=True)
        ev0 = dp.events()["transit_encap"]
        res["answer_timed"] = tc_interleaved(tc, tc_empty, answer_frame(), seg2)
        assert dp.events()["transit_encap"] > ev0
        assert hop_entries(dp)[0][1].state & abi.HOPS_RESP, "the timed answer found its request"
        res["untimed_data_1"] = tc_single(tc, tc_empty, frame(SPORT_UNTIMED, "PA", DATA), seg1, SINGLE)
        res["classify_1"] = tc_single(tc, tc_empty, frame(SPORT_CLASSIFY, "PA", REQUEST), seg1, SINGLE, reset_classify)
        dp.bpf.ring_buffer_consume()
        e0 = dp.events()["flow_event_lost"], seen[0]
        res["new_request_1"] = tc_single(tc, tc_empty, frame(SPORT_TIMED, "PA", REQUEST), seg1, SINGLE, answered)
        dp.bpf.ring_buffer_consume()
        ev.update(lost=dp.events()["flow_event_lost"] - e0[0], read=seen[0] - e0[1])

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert {k: r["retval"] for k, r in res.items()} == dict.fromkeys(res, TC_REDIRECT)
    # every new request told its predecessor: one event each (the lost ones counted, not silent)
    assert ev["read"] + ev["lost"] >= SINGLE, ev
    benchmark.extra_info.update({k: {kk: float(vv) for kk, vv in r.items()} for k, r in res.items()})
    benchmark.extra_info["events"] = ev
    m = {k: r["marginal_ns"] for k, r in res.items()}
    build = "without XDP metadata (BH_NO_XDP_META)" if "BH_NO_XDP_META" in dp.defines else "with XDP metadata"
    HOP_TABLE.parent.mkdir(exist_ok=True)
    HOP_TABLE.write_text("\n".join([
        f"bulkhead_tc, IPv4 transit flows (answer_*: at the server's gateway, the rest at the client's), {build}; "
        "marginal over an empty sched_cls",
        "", "| case | empty ns | bulkhead_tc ns | marginal ns |", "|---|---:|---:|---:|",
        *(f"| {k} | {r['empty_ns']:.0f} | {r['ours_ns']:.0f} | {m[k]:.0f} |" for k, r in res.items()),
        "", f"new requests: {ev['read']} events read, {ev['lost']} lost (ring full)", ""]))

    def rel(a: str, b: str) -> float | None:
        return m[a] / m[b] if m[b] > 0 else None

    goal(B, "bulkhead_tc, a timed flow's data packet (more of a request)", ours=m["timed_data"], unit="ns",
         baseline=m["untimed_data"], baseline_is="an untimed transit flow's data packet", ratio=rel("timed_data", "untimed_data"),
         want=WANT, met=None, note=f"ACK: {m['timed_ack']:.0f} vs {m['untimed_ack']:.0f} ns")
    goal(B, "bulkhead_tc, an untimed transit flow's ACK (not HTTP/TLS: the flag test)", ours=m["untimed_ack"],
         unit="ns", baseline=m["midstream_ack"], baseline_is="a flow never classified (first seen mid-stream)",
         ratio=rel("untimed_ack", "midstream_ack"), want=WANT, met=None)
    goal(B, "bulkhead_tc at the server's gateway, an answer of a timed flow (its time into the VNI)",
         ours=m["answer_timed"], unit="ns", baseline=m["answer_untimed"], baseline_is="the same answer, untimed",
         ratio=rel("answer_timed", "answer_untimed"), want=WANT, met=None)
    goal(B, "bulkhead_tc, a new request (the last one's BH_FE_HOP event), single runs", ours=m["new_request_1"],
         unit="ns", baseline=m["untimed_data_1"], baseline_is="untimed data packet, single runs",
         ratio=rel("new_request_1", "untimed_data_1"), want=WANT, met=None,
         note=f"classify (first payload): {m['classify_1']:.0f} ns; {SINGLE:,} fresh skbs each")
