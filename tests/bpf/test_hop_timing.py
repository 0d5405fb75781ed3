"""Request timing per hop (bh_hop_*, issue 16) in bulkhead_tc, on crafted frames.

The fabric tests' two gateways (test_xdp_fabric.py: this one is gateway 1, far is behind
gateway 2). A transit TCP flow's SYN asks for classification (BH_FLOWX_HOP_CLASSIFY); its first
client payload decides: an HTTP method or a TLS record makes it timed (BH_FLOWX_HOP on both
entries, a req_hop entry for the turn), anything else leaves it untimed for good. Then:

- more of the same request, and pure ACKs, leave the turn alone (bh_hop_wants: a pure ACK does
  not even look the turn up);
- an answer, at the server's gateway, marks the turn answered (the time since the request goes
  into the VNI: a test run can't see the tunnel key, the live lab checks that,
  tests/integration/test_fabric_hops.py);
- the client's next payload after an answer is a new request: one BH_FE_HOP event for the last
  one; a FIN or RST from the client ends the turn with one too (an unanswered request is never
  told).

The server's gateway's reply entry is bulkhead_transit_in's, which a test run can't make (no
tunnel metadata), so it is written here as that gateway would hold it: on segment core, for the
timed flow's reversed tuple (its forward key is then the timed flow's own).
"""
from __future__ import annotations

import ctypes as C
import socket

import pytest
from bulkhead.datapath import abi, libbpf
from bulkhead.datapath.flowtable import FlowTable
from scapy.all import IP, TCP, UDP

from .conftest import C4, PAY4, SEG_CORE, SEG_PROD, E, R, X
from .conftest import TCP as P_TCP
from .test_xdp_fabric import FAR4, TC_ACT_REDIRECT, fabric_bundle, run_tc, self_entry
from .test_xdp_telemetry import _ring

HTTP_REQ = b"GET /x HTTP/1.1\r\nHost: far.apps.example\r\n\r\n"
TLS_HELLO = bytes([0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3C, 0x03, 0x03]) + bytes(0x3C - 2)
NOT_HTTP = b"\x00\x01hello, not a request"


@pytest.fixture
def transit(xdp):
    xdp.apply(fabric_bundle(transit=True), fab_self=self_entry(xdp))
    yield xdp
    for k, _ in hops(xdp):
        libbpf.map_delete(hop_fd(xdp), k)


@pytest.fixture
def ring(transit):
    return _ring(transit)


def hop_fd(xdp) -> int:
    return xdp.dp.bpf.get_table(b"req_hop").map_fd


def hops(xdp) -> list[tuple[abi.Flow6Key, abi.Hop]]:
    out = []
    for k in libbpf.map_keys(hop_fd(xdp), abi.Flow6Key):
        v = abi.Hop()
        if libbpf.lib().bpf_map_lookup_elem(hop_fd(xdp), C.byref(k), C.byref(v)) == 0:
            out.append((k, v))
    return out


def the_hop(xdp) -> abi.Hop:
    (_, h), = hops(xdp)
    return h


def pkt(flags: str, payload: bytes = b"", sport: int = 40000, src: str = C4, dst: str = FAR4, dport: int = 443):
    return E / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=1, ack=1) / payload


def entries(xdp, sport: int = 40000) -> tuple[abi.Flow, abi.Flow]:
    ft = FlowTable(fds=xdp.dp.map_fds)
    return ft.lookup(C4, FAR4, sport, 443, P_TCP, SEG_PROD), ft.lookup(FAR4, C4, 443, sport, P_TCP, 4)


def started(xdp, first: bytes | None, sport: int = 40000) -> None:
    """A transit flow from its SYN, then (if given) its first client payload through bulkhead_tc."""
    xdp.expect(pkt("S", sport=sport), "prod", X.PASS, R.ALLOW_RULE)
    fwd, _ = entries(xdp, sport)
    assert fwd.xflags & abi.FLOWX_HOP_CLASSIFY, "a transit TCP flow's SYN asks to classify its first payload"
    if first is not None:
        assert run_tc(xdp, pkt("PA", first, sport), "prod").code == TC_ACT_REDIRECT


def answer_entry(xdp, sport: int = 40000) -> None:
    """The reply entry the server's gateway holds: on core, to the client's segment (prod)."""
    fwd, _ = entries(xdp, sport)
    v = abi.Flow.from_buffer_copy(bytes(fwd))
    v.flags, v.peer_segment, v.xflags = abi.FLOWF_TRANSIT | abi.FLOWF_REPLY, SEG_PROD, abi.FLOWX_HOP
    k = abi.Flow4Key(saddr_be=int.from_bytes(socket.inet_aton(FAR4), "little"),
                     daddr_be=int.from_bytes(socket.inet_aton(C4), "little"),
                     sport_be=socket.htons(443), dport_be=socket.htons(sport), proto=P_TCP, segment_id=SEG_CORE)
    libbpf.map_update(xdp.dp.map_fds["flows4"], k, v)


def answer(xdp, payload: bytes = b"HTTP/1.1 200 OK\r\n\r\n", sport: int = 40000) -> int:
    return run_tc(xdp, pkt("PA", payload, 443, src=FAR4, dst=C4, dport=sport), "core").code


@pytest.mark.parametrize("first, kind, state", [
    pytest.param(HTTP_REQ, abi.HOP_HTTP, abi.HOPS_REQ | abi.HOPS_APP, id="http"),
    pytest.param(TLS_HELLO, abi.HOP_TLS, abi.HOPS_REQ, id="tls-hello-is-not-a-request"),
])
def test_first_payload_http_or_tls_makes_the_flow_timed(transit, first, kind, state):
    started(transit, first)
    fwd, rep = entries(transit)
    assert fwd.xflags & (abi.FLOWX_HOP | abi.FLOWX_HOP_CLASSIFY) == abi.FLOWX_HOP
    assert rep.xflags & abi.FLOWX_HOP
    h = the_hop(transit)
    assert (h.kind, h.state, h.turns) == (kind, state, 1)
    assert h.t_req and not h.t_first


def test_any_other_first_payload_leaves_the_flow_untimed_for_good(transit):
    started(transit, NOT_HTTP)
    fwd, rep = entries(transit)
    assert not fwd.xflags & (abi.FLOWX_HOP | abi.FLOWX_HOP_CLASSIFY) and not rep.xflags & abi.FLOWX_HOP
    assert run_tc(transit, pkt("PA", HTTP_REQ), "prod").code == TC_ACT_REDIRECT
    assert not entries(transit)[0].xflags & abi.FLOWX_HOP and hops(transit) == []


def test_a_pure_ack_before_the_payload_keeps_the_flow_to_classify(transit):
    started(transit, None)
    assert run_tc(transit, pkt("A"), "prod").code == TC_ACT_REDIRECT
    assert entries(transit)[0].xflags & abi.FLOWX_HOP_CLASSIFY and hops(transit) == []


def test_udp_and_local_flows_are_never_classified(transit):
    transit.expect(E / IP(src=C4, dst=FAR4) / UDP(sport=5000, dport=5001) / b"x", "prod", X.PASS, R.ALLOW_RULE)
    transit.expect(pkt("S", dst=PAY4), "prod", X.PASS, R.ALLOW_RULE)
    ft = FlowTable(fds=transit.dp.map_fds)
    assert ft.lookup(C4, FAR4, 5000, 5001, 17, SEG_PROD).xflags == 0
    assert ft.lookup(C4, PAY4, 40000, 443, P_TCP, SEG_PROD).xflags == 0


def test_more_of_the_request_and_acks_leave_the_turn_alone(transit, ring):
    started(transit, HTTP_REQ)
    before = bytes(the_hop(transit))
    for p in (pkt("PA", b"more of the body"), pkt("A"), pkt("A")):
        assert run_tc(transit, p, "prod").code == TC_ACT_REDIRECT
    assert bytes(the_hop(transit)) == before
    assert [e for e in ring.drain() if e.kind == abi.FlowEv.HOP] == []


def test_an_answer_at_the_servers_gateway_marks_the_turn_answered(transit):
    started(transit, HTTP_REQ)
    answer_entry(transit)
    assert answer(transit) == TC_ACT_REDIRECT
    assert the_hop(transit).state & abi.HOPS_RESP
    # a pure ACK from the app is no answer
    libbpf.map_delete(hop_fd(transit), hops(transit)[0][0])
    started(transit, HTTP_REQ, sport=40001)
    answer_entry(transit, sport=40001)
    assert run_tc(transit, pkt("A", b"", 443, src=FAR4, dst=C4, dport=40001), "core").code == TC_ACT_REDIRECT
    assert not the_hop(transit).state & abi.HOPS_RESP


def test_the_next_request_after_an_answer_tells_the_last_one(transit, ring):
    started(transit, HTTP_REQ)
    answer_entry(transit)
    assert answer(transit) == TC_ACT_REDIRECT
    ring.drain()
    assert run_tc(transit, pkt("PA", HTTP_REQ), "prod").code == TC_ACT_REDIRECT
    ev = [e for e in ring.drain() if e.kind == abi.FlowEv.HOP]
    assert len(ev) == 1, ev
    e = ev[0]
    assert (e.prev_reason, socket.ntohs(e.sport_be), socket.ntohs(e.dport_be), e.src_app) == (
        abi.HOP_HTTP, 40000, 443, entries(transit)[0].src_app)
    h = the_hop(transit)
    assert (h.turns, h.state) == (2, abi.HOPS_REQ | abi.HOPS_APP), "a new turn"


@pytest.mark.parametrize("flags", ["FA", "RA"])
def test_a_fin_or_rst_from_the_client_ends_the_turn_telling_it_if_answered(transit, ring, flags):
    started(transit, HTTP_REQ)
    answer_entry(transit)
    assert answer(transit) == TC_ACT_REDIRECT
    ring.drain()
    assert run_tc(transit, pkt(flags), "prod").code == TC_ACT_REDIRECT
    assert len([e for e in ring.drain() if e.kind == abi.FlowEv.HOP]) == 1
    assert the_hop(transit).state == 0
    # an unanswered request is not told
    started(transit, HTTP_REQ, sport=40001)
    assert run_tc(transit, pkt(flags, sport=40001), "prod").code == TC_ACT_REDIRECT
    assert [e for e in ring.drain() if e.kind == abi.FlowEv.HOP] == []
