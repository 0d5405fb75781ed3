"""Steering L7 flows to the verifier (bh_steer), on crafted frames.

An L7 flow passes with a struct bh_meta {magic, mark, flags = 0} in front of the frame
(XDP metadata, which bulkhead_tc copies into skb->mark) -- but only while a
verifier listens (ctl flag L7_READY). Without one, every packet of the flow
is dropped as punt_no_handler, and that is decided per packet, never cached:
a verifier that comes back steers the same flow again. The reply entry the
verifier writes for its upstream connection (agent/datapath/flowtable.py)
steers the origin's answers to the verifier's socket.
"""
from __future__ import annotations

import struct

import pytest
from scapy.all import IP, TCP, UDP, IPv6, raw

from bulkhead.datapath import abi
from bulkhead.datapath.flowtable import FlowTable

from .conftest import (
    A,
    APP_PAY,
    APP_WEB,
    BASE_POLICY,
    C4,
    C6,
    E,
    PAY4,
    PAY6,
    R,
    RULE_PAY_L7,
    SEG_CORE,
    SEG_PROD,
    TCP as P_TCP,
    UDP as P_UDP,
    X,
    base_bundle,
    pol,
)
from .test_xdp_flows import frag4

META = struct.Struct("=III")  # struct bh_meta: magic, mark, flags


def seg4(flags="S", sport=40000, dport=80, src=C4, dst=PAY4, payload=b""):
    return E / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / payload


def seg6(flags="S", sport=40000, dport=80, src=C6, dst=PAY6):
    return E / IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags)


def steered(xdp, v, frame, segment: int, ifname: str) -> None:
    """The frame passed unchanged, behind bulkhead's metadata with the segment's mark; on a
    kernel without XDP metadata, with nothing in front, and bulkhead_tc gives it that mark
    from the flow entry."""
    if not xdp.meta:
        assert v.data_out == raw(frame)
        code, out, mark = xdp.tc(frame, ifname, mark=0x00AB0000)
        assert (code, out) == (0, raw(frame))  # TC_ACT_OK, untouched
        assert mark == (0x00AB0000 & abi.MARK_KEEP) | abi.MARK_L7 | segment
        return
    assert len(v.data_out) == META.size + len(raw(frame))
    # flags 0: bulkhead_tc must never take a steered packet for a reject answer to send back out
    assert META.unpack(v.data_out[: META.size]) == (abi.META_MAGIC, abi.MARK_L7 | segment, 0)
    assert v.data_out[META.size:] == raw(frame)


@pytest.fixture
def ready(xdp):
    """A verifier listens (the fixture's reset clears the flag again)."""
    xdp.dp.set_ctl_flags(set_bits=abi.CTL_L7_READY)
    return xdp


@pytest.mark.parametrize("make", [seg4, seg6], ids=["v4", "v6"])
def test_l7_flow_is_steered_with_its_segment_mark(ready, make):
    syn = make("S")
    steered(ready, ready.expect(syn, "prod", X.PASS, R.L7_STEER), syn, SEG_PROD, "prod")
    # Cached: the next packet of the flow is steered from the flow entry.
    ack = make("A")
    v = ready.expect(ack, "prod", X.PASS, R.L7_STEER)
    assert not v.events, "the second packet must hit the cache"
    steered(ready, v, ack, SEG_PROD, "prod")
    fwd = [f for _, f in ready.flows(4 if make is seg4 else 6) if not f.flags & abi.FLOWF_REPLY]
    assert [(f.reason, f.rule_id, f.src_app, f.dst_app) for f in fwd] == [
        (R.L7_STEER, RULE_PAY_L7, APP_WEB, APP_PAY)]


def test_non_l7_flows_carry_no_steering_mark(ready):
    """An allowed flow passes unchanged; metadata in front of it (the fast path's, see
    test_xdp_fastpath.py) never carries the verifier's mark."""
    syn = seg4("S", dport=443)
    v = ready.expect(syn, "prod", X.PASS, R.ALLOW_RULE)
    assert v.data_out[-len(raw(syn)):] == raw(syn)
    meta = v.data_out[: -len(raw(syn))]
    assert len(meta) in (0, META.size)
    if meta:
        magic, mark, _ = META.unpack(meta)
        assert magic != abi.META_MAGIC or mark & abi.MARK_L7 != abi.MARK_L7
    if not ready.meta:  # bulkhead_tc marks from the flow entry there: never the verifier's mark
        code, _out, mark = ready.tc(syn, "prod")
        assert code == 0 and mark & abi.MARK_L7 != abi.MARK_L7


def test_no_verifier_drops_per_packet_and_is_not_cached(ready):
    syn = seg4("S")
    steered(ready, ready.expect(syn, "prod", X.PASS, R.L7_STEER), syn, SEG_PROD, "prod")
    ready.dp.set_ctl_flags(clear_bits=abi.CTL_L7_READY)  # the verifier went away
    ack = seg4("A")
    assert ready.expect(ack, "prod", X.DROP, R.PUNT_NO_HANDLER).data_out
    ready.dp.set_ctl_flags(set_bits=abi.CTL_L7_READY)  # and came back: the same flow is steered again
    steered(ready, ready.expect(ack, "prod", X.PASS, R.L7_STEER), ack, SEG_PROD, "prod")


def test_l7_rule_on_udp_is_dropped_not_steered(ready):
    ready.apply(base_bundle(policy=BASE_POLICY + [pol(APP_WEB, APP_PAY, P_UDP, 80, A.L7, RULE_PAY_L7)]))
    dgram = E / IP(src=C4, dst=PAY4) / UDP(sport=5000, dport=80)
    ready.expect(dgram, "prod", X.DROP, R.PUNT_NO_HANDLER)


def test_later_fragments_of_a_steered_flow_are_dropped(ready):
    first = frag4(80, 200, 0, True)
    steered(ready, ready.expect(first, "prod", X.PASS, R.L7_STEER), first, SEG_PROD, "prod")
    ready.expect(frag4(80, 200, 5, False), "prod", X.DROP, R.PUNT_NO_HANDLER)


def _upstream(ready, client_port: int):
    """Steer the punted flow, then register the verifier's upstream connection from C4:client_port."""
    ready.expect(seg4("S"), "prod", X.PASS, R.L7_STEER)
    ft = FlowTable(fds=ready.dp.map_fds)
    fwd = ft.lookup(C4, PAY4, 40000, 80, P_TCP, SEG_PROD)
    assert fwd is not None and fwd.reason == R.L7_STEER and fwd.peer_segment == SEG_CORE
    ft.steer_upstream(fwd, SEG_PROD, (C4, client_port), (PAY4, 80))
    return ft


def test_origin_answers_to_the_upstream_connection_are_steered(ready):
    _upstream(ready, 50001)
    synack = seg4("SA", sport=80, dport=50001, src=PAY4, dst=C4)
    steered(ready, ready.expect(synack, "core", X.PASS, R.L7_UPSTREAM), synack, SEG_CORE, "core")
    # Another port of the client: no upstream entry, a server-to-client flow: denied.
    stray = seg4("SA", sport=80, dport=50002, src=PAY4, dst=C4)
    ready.expect(stray, "core", X.DROP, R.DENY_DEFAULT)


def test_upstream_entry_survives_a_swap_and_follows_the_new_policy(ready):
    _upstream(ready, 50003)
    ready.apply(base_bundle())  # same policy, new generation: the reply entry is re-judged
    data = seg4("A", sport=80, dport=50003, src=PAY4, dst=C4)
    steered(ready, ready.expect(data, "core", X.PASS, R.L7_UPSTREAM), data, SEG_CORE, "core")
    # The L7 rule became a plain allow (or the pair is a router's client -> backend, which the
    # compiler allows directly): the client's connection still ends at the verifier, so the
    # origin's answers stay steered to its socket.
    plain = [pol(APP_WEB, APP_PAY, P_TCP, 80, A.ALLOW, RULE_PAY_L7) if p[-1] == RULE_PAY_L7 else p
             for p in BASE_POLICY]
    ready.apply(base_bundle(policy=plain))
    steered(ready, ready.expect(data, "core", X.PASS, R.L7_UPSTREAM), data, SEG_CORE, "core")
    # A policy without the rule: the origin's answers are no longer let in.
    ready.apply(base_bundle(policy=[p for p in BASE_POLICY if p[-1] != RULE_PAY_L7]))
    ready.expect(data, "core", X.DROP, R.DENY_DEFAULT)
