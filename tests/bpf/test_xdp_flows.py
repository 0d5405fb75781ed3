"""Flow cache, directionality, overlapping segments, generations, fragments, ICMP errors.

Most cases are sequences: each step is a frame, its ingress interface, the
XDP code and the one reason counter it must move, and optionally the event
counters that must move with it (events not named must not move).
"""
from __future__ import annotations

import ctypes as C
import dataclasses
import time
from socket import inet_aton

import pytest
from scapy.all import (
    ICMP,
    IP,
    TCP,
    UDP,
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    IPOption_Router_Alert,
    IPv6,
    IPv6ExtHdrFragment,
    Raw,
    raw,
)

from bulkhead.datapath import abi, libbpf

from .conftest import (
    APP_PAY,
    APP_WEB,
    BASE_POLICY,
    C4,
    C6,
    CAT4,
    CAT6,
    E,
    EV,
    PAY4,
    PAY6,
    RULE_PAY_HTTPS,
    ROUTED4,
    ROUTED6,
    SEG_CORE,
    UNROUTED4,
    A,
    R,
    X,
    base_bundle,
    pol,
)


# Telemetry bookkeeping (entries created, flow events, latency samples) has its
# own tests (test_xdp_telemetry.py); the sequences here check verdict events.
TELEMETRY_EVENTS = {EV.FLOW_ENTRY_NEW, EV.FLOW_EVENT_LOST, EV.LAT_SAMPLE, EV.LAT_HIST_FULL, EV.PAIR_FULL}
# So has the fast path (where an allowed packet went after its verdict: test_xdp_fastpath.py).
FASTPATH_EVENTS = {e for e in EV if e.name.startswith("FWD_")}


@dataclasses.dataclass
class Step:
    frame: object
    ifname: str
    code: int
    reason: R
    events: dict | None = None  # exact event deltas; None = don't care

    def __repr__(self):
        return f"{self.ifname}:{X(self.code).name}:{self.reason.name}"


def play(xdp, steps):
    for i, st in enumerate(steps):
        try:
            v = xdp.expect(st.frame, st.ifname, st.code, st.reason)
            if st.events is not None:
                got = {e.name: n for e, n in v.events.items() if e not in TELEMETRY_EVENTS | FASTPATH_EVENTS}
                assert got == {e.name: n for e, n in st.events.items()}
        except AssertionError as e:
            raise AssertionError(f"step {i} ({st!r}): {e}") from e


def tcp4(src, dst, sport, dport, flags="S", **kw):
    return E / IP(src=src, dst=dst, **kw) / TCP(sport=sport, dport=dport, flags=flags)


def tcp6(src, dst, sport, dport, flags="S"):
    return E / IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags)


NEW = {EV.FLOW_NEW: 1}
HIT = {}  # served from the cache: no event at all
RECLASSIFY = {EV.FLOW_RECLASSIFY: 1}

# client -> payments:443 from prod (web: allowed) with its reply on core
FWD4 = tcp4(C4, PAY4, 40000, 443)
REPLY4 = tcp4(PAY4, C4, 443, 40000, "SA")
FWD6 = tcp6(C6, PAY6, 40000, 443)
REPLY6 = tcp6(PAY6, C6, 443, 40000, "SA")

SEQUENCES = {
    "reply-passes-v4": [
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(REPLY4, "core", X.PASS, R.ALLOW_REPLY, HIT),
        Step(tcp4(C4, PAY4, 40000, 443, "A"), "prod", X.PASS, R.ALLOW_RULE, HIT),
        Step(tcp4(PAY4, C4, 443, 40000, "A"), "core", X.PASS, R.ALLOW_REPLY, HIT),
    ],
    "reply-passes-v6": [
        Step(FWD6, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(REPLY6, "core", X.PASS, R.ALLOW_REPLY, HIT),
        Step(tcp6(C6, PAY6, 40000, 443, "A"), "prod", X.PASS, R.ALLOW_RULE, HIT),
    ],
    "reply-before-any-request-is-new": [
        Step(REPLY4, "core", X.DROP, R.DENY_DEFAULT, NEW),
    ],
    "new-connection-server-to-client-denied": [
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(tcp4(PAY4, C4, 5555, 40000), "core", X.DROP, R.DENY_DEFAULT, NEW),
        Step(tcp4(PAY4, C4, 443, 40001, "SA"), "core", X.DROP, R.DENY_DEFAULT, NEW),
        Step(tcp6(PAY6, C6, 5555, 40000), "core", X.DROP, R.DENY_DEFAULT, NEW),
    ],
    "reply-on-wrong-segment-is-not-a-reply": [
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(REPLY4, "prod", X.DROP, R.DENY_DEFAULT, NEW),
        Step(REPLY4, "dev", X.DROP, R.DENY_DEFAULT, NEW),
    ],
    "second-packet-hits-cache": [
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, HIT),
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, HIT),
    ],
    "denied-flow-cached-too": [
        Step(tcp4(C4, PAY4, 40000, 444), "prod", X.DROP, R.DENY_DEFAULT, NEW),
        Step(tcp4(C4, PAY4, 40000, 444), "prod", X.DROP, R.DENY_DEFAULT, HIT),
        Step(tcp4(PAY4, C4, 444, 40000, "SA"), "core", X.DROP, R.DENY_DEFAULT, NEW),
    ],
    "reject-cached-answers-every-time": [
        Step(tcp4(C4, PAY4, 40000, 22), "prod", X.TX, R.REJECT_RULE, {EV.FLOW_NEW: 1, EV.REJECT_TCP_RST: 1}),
        Step(tcp4(C4, PAY4, 40000, 22), "prod", X.TX, R.REJECT_RULE, {EV.REJECT_TCP_RST: 1}),
    ],
    "icmp-echo-reply-passes": [
        Step(E / IP(src=C4, dst=PAY4) / ICMP(type=8, id=77), "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(E / IP(src=PAY4, dst=C4) / ICMP(type=0, id=77), "core", X.PASS, R.ALLOW_REPLY, HIT),
        Step(E / IP(src=PAY4, dst=C4) / ICMP(type=0, id=78), "core", X.DROP, R.DENY_DEFAULT, NEW),
        Step(E / IPv6(src=C6, dst=PAY6) / ICMPv6EchoRequest(id=77), "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(E / IPv6(src=PAY6, dst=C6) / ICMPv6EchoReply(id=77), "core", X.PASS, R.ALLOW_REPLY, HIT),
    ],
    # Same client address in prod (web) and dev (laptops): different apps, different verdicts.
    "overlap-same-ip-two-verdicts": [
        Step(tcp4(C4, PAY4, 40000, 443), "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(tcp4(C4, PAY4, 40001, 443), "dev", X.DROP, R.DENY_RULE, NEW),
        Step(tcp4(PAY4, C4, 443, 40000, "SA"), "core", X.PASS, R.ALLOW_REPLY, HIT),
        Step(tcp4(PAY4, C4, 443, 40001, "SA"), "core", X.DROP, R.DENY_DEFAULT, NEW),
    ],
    "overlap-both-segments-pass-with-own-ports": [
        Step(tcp4(C4, CAT4, 40000, 80), "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(tcp4(C4, CAT4, 40001, 80), "dev", X.PASS, R.ALLOW_RULE, NEW),
        Step(tcp4(CAT4, C4, 80, 40000, "SA"), "core", X.PASS, R.ALLOW_REPLY, HIT),
        Step(tcp4(CAT4, C4, 80, 40001, "SA"), "core", X.PASS, R.ALLOW_REPLY, HIT),
        Step(tcp4(C4, CAT4, 40000, 80, "A"), "prod", X.PASS, R.ALLOW_RULE, HIT),
        Step(tcp4(C4, CAT4, 40001, 80, "A"), "dev", X.PASS, R.ALLOW_RULE, HIT),
    ],
    "overlap-same-5-tuple-collides": [
        Step(tcp4(C4, CAT4, 40000, 80), "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(tcp4(C4, CAT4, 40000, 80), "dev", X.DROP, R.FLOW_COLLISION, HIT),
        Step(tcp4(C4, CAT4, 40000, 80), "dev", X.DROP, R.FLOW_COLLISION, HIT),
        # the first flow is undisturbed
        Step(tcp4(CAT4, C4, 80, 40000, "SA"), "core", X.PASS, R.ALLOW_REPLY, HIT),
        Step(tcp4(C4, CAT4, 40000, 80, "A"), "prod", X.PASS, R.ALLOW_RULE, HIT),
    ],
    "overlap-same-5-tuple-collides-v6": [
        Step(tcp6(C6, CAT6, 40000, 80), "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(tcp6(C6, CAT6, 40000, 80), "dev", X.DROP, R.FLOW_COLLISION, HIT),
        Step(tcp6(CAT6, C6, 80, 40000, "SA"), "core", X.PASS, R.ALLOW_REPLY, HIT),
    ],
    "overlap-denied-flow-does-not-block-other-segment": [
        # dev's flow is denied: it leaves no reply key, so prod's identical flow is free
        Step(tcp4(C4, PAY4, 40000, 443), "dev", X.DROP, R.DENY_RULE, NEW),
        Step(tcp4(C4, PAY4, 40000, 443), "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(tcp4(PAY4, C4, 443, 40000, "SA"), "core", X.PASS, R.ALLOW_REPLY, HIT),
    ],
}


@pytest.mark.parametrize("steps", list(SEQUENCES.values()), ids=list(SEQUENCES))
def test_sequence(xdp, steps):
    play(xdp, steps)


def test_flow_entries_count_packets(xdp):
    play(xdp, [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE), Step(FWD4, "prod", X.PASS, R.ALLOW_RULE),
               Step(REPLY4, "core", X.PASS, R.ALLOW_REPLY)])
    by_seg = {k.segment_id: v for k, v in xdp.flows(4)}
    assert sorted(by_seg) == [1, 3]
    # FWD4 is a SYN: the entry waits for the handshake and first payload (timing bits).
    assert (by_seg[1].packets, by_seg[1].bytes, by_seg[1].flags) == (2, 2 * len(FWD4), abi.FLOWF_OBSERVE)
    assert (by_seg[3].packets, by_seg[3].flags & 0x2, by_seg[3].peer_segment) == (1, 0x2, 1)


# ------------------------------------------------------------- generation
DENY_HTTPS = [pol(APP_WEB, APP_PAY, 6, 443, A.DENY, 99)] + [e for e in BASE_POLICY if e[-1] != RULE_PAY_HTTPS]
REJECT_HTTPS = [pol(APP_WEB, APP_PAY, 6, 443, A.REJECT, 99)] + [e for e in BASE_POLICY if e[-1] != RULE_PAY_HTTPS]
ALLOW_444 = BASE_POLICY + [pol(APP_WEB, APP_PAY, 6, 444, A.ALLOW, 98)]

GENERATIONS = {
    # id: (steps before, new policy, steps after)
    "deny-after-allow-forward-first": (
        [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW), Step(REPLY4, "core", X.PASS, R.ALLOW_REPLY, HIT)],
        DENY_HTTPS,
        [Step(FWD4, "prod", X.DROP, R.DENY_RULE, RECLASSIFY), Step(FWD4, "prod", X.DROP, R.DENY_RULE, HIT),
         Step(REPLY4, "core", X.DROP, R.DENY_RULE, RECLASSIFY), Step(REPLY4, "core", X.DROP, R.DENY_RULE, HIT)],
    ),
    "deny-after-allow-reply-first": (
        [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW)],
        DENY_HTTPS,
        [Step(REPLY4, "core", X.DROP, R.DENY_RULE, RECLASSIFY),
         Step(FWD4, "prod", X.DROP, R.DENY_RULE, RECLASSIFY)],
    ),
    "deny-after-allow-v6": (
        [Step(FWD6, "prod", X.PASS, R.ALLOW_RULE, NEW), Step(REPLY6, "core", X.PASS, R.ALLOW_REPLY, HIT)],
        DENY_HTTPS,
        [Step(REPLY6, "core", X.DROP, R.DENY_RULE, RECLASSIFY),
         Step(FWD6, "prod", X.DROP, R.DENY_RULE, RECLASSIFY)],
    ),
    "still-allowed-re-judged-once": (
        [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW), Step(REPLY4, "core", X.PASS, R.ALLOW_REPLY, HIT)],
        BASE_POLICY + [pol(APP_WEB, APP_PAY, 6, 8443, A.ALLOW, 97)],
        [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, RECLASSIFY), Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, HIT),
         Step(REPLY4, "core", X.PASS, R.ALLOW_REPLY, HIT)],
    ),
    "still-allowed-reply-first": (
        [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW)],
        BASE_POLICY + [pol(APP_WEB, APP_PAY, 6, 8443, A.ALLOW, 97)],
        [Step(REPLY4, "core", X.PASS, R.ALLOW_REPLY, RECLASSIFY), Step(REPLY4, "core", X.PASS, R.ALLOW_REPLY, HIT),
         Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, RECLASSIFY)],
    ),
    "reject-after-allow": (
        [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW), Step(REPLY4, "core", X.PASS, R.ALLOW_REPLY, HIT)],
        REJECT_HTTPS,
        # the client gets a RST; the server's packets are only dropped
        [Step(REPLY4, "core", X.DROP, R.REJECT_RULE, RECLASSIFY),
         Step(tcp4(C4, PAY4, 40000, 443, "A"), "prod", X.TX, R.REJECT_RULE,
              {EV.FLOW_RECLASSIFY: 1, EV.REJECT_TCP_RST: 1})],
    ),
    "allow-after-deny": (
        [Step(tcp4(C4, PAY4, 40000, 444), "prod", X.DROP, R.DENY_DEFAULT, NEW)],
        ALLOW_444,
        [Step(tcp4(C4, PAY4, 40000, 444), "prod", X.PASS, R.ALLOW_RULE, RECLASSIFY),
         Step(tcp4(PAY4, C4, 444, 40000, "SA"), "core", X.PASS, R.ALLOW_REPLY, HIT)],
    ),
    "audit-mode-after-deny": (
        [Step(tcp4(C4, PAY4, 40000, 444), "prod", X.DROP, R.DENY_DEFAULT, NEW)],
        ({"mode": "audit"}, BASE_POLICY),
        [Step(tcp4(C4, PAY4, 40000, 444), "prod", X.PASS, R.AUDIT_DEFAULT, RECLASSIFY),
         Step(tcp4(PAY4, C4, 444, 40000, "SA"), "core", X.PASS, R.ALLOW_REPLY, HIT)],
    ),
}


@pytest.mark.parametrize("before, policy, after", list(GENERATIONS.values()), ids=list(GENERATIONS))
def test_generation_change(xdp, before, policy, after):
    play(xdp, before)
    settings, policy = policy if isinstance(policy, tuple) else (None, policy)
    gen = xdp.apply(base_bundle(settings, policy))
    play(xdp, after)
    assert all(v.generation == gen for _, v in xdp.flows(4) + xdp.flows(6))


def test_old_generation_never_used_after_apply(xdp):
    """An entry cached under generation N is never trusted under N+1, even if nothing else changed."""
    play(xdp, [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW)])
    xdp.apply(base_bundle(policy=BASE_POLICY))  # identical policy, new generation
    play(xdp, [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, RECLASSIFY)])


# -------------------------------------------------------------- fragments
def frag4(dport, fid, offset, mf, payload=None, proto=6, sport=40000, src=C4, dst=PAY4):
    ip = IP(src=src, dst=dst, id=fid, frag=offset, flags="MF" if mf else 0, proto=proto)
    if offset == 0:
        l4 = TCP(sport=sport, dport=dport, flags="S") if proto == 6 else UDP(sport=sport, dport=dport, len=1000)
        return E / ip / l4 / Raw(b"f" * 16)
    return E / ip / Raw(payload or b"f" * 24)


def frag6(dport, fid, offset, mf, src=C6, dst=PAY6):
    fh = IPv6ExtHdrFragment(id=fid, offset=offset, m=int(mf), nh=6)
    if offset == 0:
        return E / IPv6(src=src, dst=dst) / fh / TCP(sport=40000, dport=dport, flags="S") / Raw(b"f" * 16)
    return E / IPv6(src=src, dst=dst) / fh / Raw(b"f" * 24)


FIRST = {EV.FLOW_NEW: 1, EV.FRAG_FIRST: 1}
FOLLOW = {EV.FRAG_FOLLOW: 1}

FRAGMENTS = {
    "v4-allowed-first-then-later": [
        Step(frag4(443, 100, 0, True), "prod", X.PASS, R.ALLOW_RULE, FIRST),
        Step(frag4(443, 100, 5, True), "prod", X.PASS, R.ALLOW_RULE, FOLLOW),
        Step(frag4(443, 100, 10, False), "prod", X.PASS, R.ALLOW_RULE, FOLLOW),
    ],
    "v4-later-without-first": [
        Step(frag4(443, 101, 5, True), "prod", X.DROP, R.FRAG_NO_FLOW, {}),
    ],
    "v4-later-other-datagram-id": [
        Step(frag4(443, 100, 0, True), "prod", X.PASS, R.ALLOW_RULE, FIRST),
        Step(frag4(443, 102, 5, False), "prod", X.DROP, R.FRAG_NO_FLOW, {}),
    ],
    "v4-later-other-segment": [
        Step(frag4(443, 100, 0, True), "prod", X.PASS, R.ALLOW_RULE, FIRST),
        Step(frag4(443, 100, 5, False), "dev", X.DROP, R.FRAG_NO_FLOW, {}),
    ],
    "v4-denied-first-then-later": [
        Step(frag4(444, 103, 0, True), "prod", X.DROP, R.DENY_DEFAULT, FIRST),
        Step(frag4(444, 103, 5, False), "prod", X.DROP, R.DENY_DEFAULT, FOLLOW),
    ],
    "v4-rejected-first-then-later": [
        Step(frag4(22, 104, 0, True), "prod", X.TX, R.REJECT_RULE, {**FIRST, EV.REJECT_TCP_RST: 1}),
        Step(frag4(22, 104, 5, False), "prod", X.DROP, R.REJECT_RULE, FOLLOW),
    ],
    "v4-punted-first-then-later": [
        Step(frag4(80, 105, 0, True), "prod", X.DROP, R.PUNT_NO_HANDLER, FIRST),
        Step(frag4(80, 105, 5, False), "prod", X.DROP, R.PUNT_NO_HANDLER, FOLLOW),
    ],
    "v4-audit-first-then-later": [
        Step(frag4(8080, 106, 0, True), "prod", X.PASS, R.AUDIT_RULE, FIRST),
        Step(frag4(8080, 106, 5, False), "prod", X.PASS, R.AUDIT_RULE, FOLLOW),
    ],
    "v4-udp-first-fragment-carries-datagram-length": [
        Step(frag4(53, 107, 0, True, proto=17), "prod", X.PASS, R.ALLOW_RULE, FIRST),
        Step(frag4(53, 107, 5, False, proto=17), "prod", X.PASS, R.ALLOW_RULE, FOLLOW),
    ],
    "v4-fragment-of-cached-flow": [
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(frag4(443, 108, 0, True), "prod", X.PASS, R.ALLOW_RULE, {EV.FRAG_FIRST: 1}),
        Step(frag4(443, 108, 5, False), "prod", X.PASS, R.ALLOW_RULE, FOLLOW),
    ],
    "v4-reply-fragments": [
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(E / IP(src=PAY4, dst=C4, id=109, flags="MF") / TCP(sport=443, dport=40000, flags="A")
             / Raw(b"r" * 16), "core", X.PASS, R.ALLOW_REPLY, {EV.FRAG_FIRST: 1}),
        Step(E / IP(src=PAY4, dst=C4, id=109, frag=5, proto=6) / Raw(b"r" * 8), "core", X.PASS, R.ALLOW_REPLY,
             FOLLOW),
    ],
    "v6-allowed-first-then-later": [
        Step(frag6(443, 200, 0, True), "prod", X.PASS, R.ALLOW_RULE, FIRST),
        Step(frag6(443, 200, 5, True), "prod", X.PASS, R.ALLOW_RULE, FOLLOW),
        Step(frag6(443, 200, 10, False), "prod", X.PASS, R.ALLOW_RULE, FOLLOW),
    ],
    "v6-later-without-first": [
        Step(frag6(443, 201, 5, False), "prod", X.DROP, R.FRAG_NO_FLOW, {}),
    ],
    "v6-later-other-segment": [
        Step(frag6(443, 202, 0, True), "prod", X.PASS, R.ALLOW_RULE, FIRST),
        Step(frag6(443, 202, 5, False), "dev", X.DROP, R.FRAG_NO_FLOW, {}),
    ],
    "v6-denied-first-then-later": [
        Step(frag6(444, 203, 0, True), "prod", X.DROP, R.DENY_DEFAULT, FIRST),
        Step(frag6(444, 203, 5, False), "prod", X.DROP, R.DENY_DEFAULT, FOLLOW),
    ],
    # the ports of a first fragment too short for its TCP header decide nothing
    "v4-tiny-first-fragment": [
        Step(E / IP(src=C4, dst=PAY4, id=110, flags="MF", proto=6) / Raw(raw(TCP(sport=40000, dport=443))[:16]),
             "prod", X.DROP, R.MALFORMED_L4, {}),
        Step(frag4(443, 110, 2, False), "prod", X.DROP, R.FRAG_NO_FLOW, {}),
    ],
    "v6-atomic-fragment-is-whole": [
        Step(frag6(443, 204, 0, False), "prod", X.PASS, R.ALLOW_RULE, NEW),
    ],
}


@pytest.mark.parametrize("steps", list(FRAGMENTS.values()), ids=list(FRAGMENTS))
def test_fragments(xdp, steps):
    play(xdp, steps)


def test_fragment_verdict_expires(xdp):
    """A first fragment's verdict is forgotten after BH_FRAG_IDLE_NS (30 s) without fragments."""
    idle_ns = 30 * 10**9
    play(xdp, [Step(frag4(443, 111, 0, True), "prod", X.PASS, R.ALLOW_RULE, FIRST)])
    fd = xdp.dp.map_fds["frags"]
    (key,) = libbpf.map_keys(fd, abi.FragKey)
    # bpf_ktime_get_coarse_ns() is CLOCK_MONOTONIC: age the entry by rewriting its timestamp.
    while time.clock_gettime_ns(time.CLOCK_MONOTONIC) < idle_ns + 2 * 10**9:
        time.sleep(0.5)  # only on a host booted less than 32 s ago
    val = abi.Frag()
    assert libbpf.lib().bpf_map_lookup_elem(fd, C.byref(key), C.byref(val)) == 0
    val.last_seen_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - idle_ns - 10**9
    libbpf.map_update(fd, key, val)
    play(xdp, [Step(frag4(443, 111, 5, False), "prod", X.DROP, R.FRAG_NO_FLOW, {})])


# ------------------------------------------------------------- ICMP errors
def quote4(src, dst, sport, dport, proto="tcp"):
    """What a router quotes: the offending IP header and 8 bytes of its L4 header."""
    l4 = TCP(sport=sport, dport=dport, flags="S") if proto == "tcp" else UDP(sport=sport, dport=dport)
    return raw(IP(src=src, dst=dst) / l4)[:28]


def quote6(src, dst, sport, dport):
    return raw(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S"))[:48]


ROUTER4, ROUTER6 = "198.19.0.1", "fd00:19::1"

ICMP_ERRORS = {
    "unreachable-about-allowed-flow": [
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(E / IP(src=ROUTER4, dst=C4) / ICMP(type=3, code=1) / Raw(quote4(C4, PAY4, 40000, 443)),
             "core", X.PASS, R.ICMP_ERROR_RELATED, {}),
        Step(E / IP(src=ROUTER4, dst=C4) / ICMP(type=11, code=0) / Raw(quote4(C4, PAY4, 40000, 443)),
             "core", X.PASS, R.ICMP_ERROR_RELATED, {}),
        Step(E / IP(src=PAY4, dst=C4) / ICMP(type=3, code=4) / Raw(quote4(C4, PAY4, 40000, 443)),
             "core", X.PASS, R.ICMP_ERROR_RELATED, {}),
    ],
    "unreachable-from-client-side-about-reply": [
        # the client's host answers the server's packet with port unreachable
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(E / IP(src=C4, dst=PAY4) / ICMP(type=3, code=3) / Raw(quote4(PAY4, C4, 443, 40000)),
             "prod", X.PASS, R.ICMP_ERROR_RELATED, {}),
    ],
    "unreachable-quoting-ip-options": [
        Step(tcp4(C4, PAY4, 40000, 443, options=[IPOption_Router_Alert()]), "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(E / IP(src=ROUTER4, dst=C4) / ICMP(type=3, code=1)
             / Raw(raw(IP(src=C4, dst=PAY4, options=[IPOption_Router_Alert()]) / TCP(sport=40000, dport=443))[:32]),
             "core", X.PASS, R.ICMP_ERROR_RELATED, {}),
    ],
    "unreachable-about-unknown-flow": [
        Step(E / IP(src=ROUTER4, dst=C4) / ICMP(type=3, code=1) / Raw(quote4(C4, PAY4, 40000, 443)),
             "core", X.DROP, R.ICMP_ERROR_NO_FLOW, {}),
    ],
    "unreachable-about-other-ports": [
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(E / IP(src=ROUTER4, dst=C4) / ICMP(type=3, code=1) / Raw(quote4(C4, PAY4, 40001, 443)),
             "core", X.DROP, R.ICMP_ERROR_NO_FLOW, {}),
    ],
    "unreachable-about-denied-flow": [
        Step(tcp4(C4, PAY4, 40000, 444), "prod", X.DROP, R.DENY_DEFAULT, NEW),
        Step(E / IP(src=C4, dst=PAY4) / ICMP(type=3, code=3) / Raw(quote4(PAY4, C4, 444, 40000)),
             "prod", X.DROP, R.ICMP_ERROR_NO_FLOW, {}),
    ],
    "unreachable-on-wrong-segment": [
        Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(E / IP(src=ROUTER4, dst=C4) / ICMP(type=3, code=1) / Raw(quote4(C4, PAY4, 40000, 443)),
             "dev", X.DROP, R.ICMP_ERROR_NO_FLOW, {}),
    ],
    "unreachable-about-udp-flow": [
        Step(E / IP(src=C4, dst=PAY4) / UDP(sport=5000, dport=53), "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(E / IP(src=PAY4, dst=C4) / ICMP(type=3, code=3) / Raw(quote4(C4, PAY4, 5000, 53, "udp")),
             "core", X.PASS, R.ICMP_ERROR_RELATED, {}),
        Step(E / IP(src=PAY4, dst=C4) / ICMP(type=3, code=3) / Raw(quote4(C4, PAY4, 5000, 53, "tcp")),
             "core", X.DROP, R.ICMP_ERROR_NO_FLOW, {}),
    ],
    "unreachable-about-echo": [
        Step(E / IP(src=C4, dst=PAY4) / ICMP(type=8, id=55), "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(E / IP(src=ROUTER4, dst=C4) / ICMP(type=11) / Raw(raw(IP(src=C4, dst=PAY4) / ICMP(type=8, id=55))),
             "core", X.PASS, R.ICMP_ERROR_RELATED, {}),
        Step(E / IP(src=ROUTER4, dst=C4) / ICMP(type=11) / Raw(raw(IP(src=C4, dst=PAY4) / ICMP(type=8, id=56))),
             "core", X.DROP, R.ICMP_ERROR_NO_FLOW, {}),
    ],
    "v6-unreachable-about-allowed-flow": [
        Step(FWD6, "prod", X.PASS, R.ALLOW_RULE, NEW),
        Step(E / IPv6(src=ROUTER6, dst=C6) / ICMPv6DestUnreach(code=3) / Raw(quote6(C6, PAY6, 40000, 443)),
             "core", X.PASS, R.ICMP_ERROR_RELATED, {}),
        Step(E / IPv6(src=ROUTER6, dst=C6) / ICMPv6PacketTooBig(mtu=1280) / Raw(quote6(C6, PAY6, 40000, 443)),
             "core", X.PASS, R.ICMP_ERROR_RELATED, {}),
    ],
    "v6-unreachable-about-unknown-flow": [
        Step(E / IPv6(src=ROUTER6, dst=C6) / ICMPv6DestUnreach(code=3) / Raw(quote6(C6, PAY6, 40000, 443)),
             "core", X.DROP, R.ICMP_ERROR_NO_FLOW, {}),
    ],
}


@pytest.mark.parametrize("steps", list(ICMP_ERRORS.values()), ids=list(ICMP_ERRORS))
def test_icmp_errors(xdp, steps):
    # The ICMP steps expect no event at all: an error follows its flow and never creates one.
    play(xdp, steps)


def test_icmp_error_not_judged_by_old_generation(xdp):
    """After an apply, a cached verdict is stale: an error about the flow must not pass on it."""
    error = E / IP(src=ROUTER4, dst=C4) / ICMP(type=3, code=4) / Raw(quote4(C4, PAY4, 40000, 443))
    play(xdp, [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW),
               Step(error, "core", X.PASS, R.ICMP_ERROR_RELATED, {})])
    xdp.apply(base_bundle(policy=DENY_HTTPS))
    play(xdp, [Step(error, "core", X.DROP, R.ICMP_ERROR_NO_FLOW, {})])
    # still allowed under the new generation: related again once the flow is re-judged
    xdp.apply(base_bundle())
    play(xdp, [Step(error, "core", X.DROP, R.ICMP_ERROR_NO_FLOW, {}),
               Step(REPLY4, "core", X.PASS, R.ALLOW_REPLY, RECLASSIFY),
               Step(error, "core", X.PASS, R.ICMP_ERROR_RELATED, {})])


# ------------------------------------------------------------- control
def test_bypass_flag_classifies_every_packet(xdp_bench):
    """BH_CTL_BYPASS_FLOWS, a benchmark hook: the bench build (the production object ignores it,
    test_xdp_bench.py)."""
    xdp = xdp_bench
    play(xdp, [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW)])  # a cached flow with its reply key
    xdp.dp.set_ctl_flags(set_bits=0x1)
    try:
        play(xdp, [
            Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, {}),
            Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, {}),
            # the cached reply key is ignored: the reply is judged as a new flow
            Step(REPLY4, "core", X.DROP, R.DENY_DEFAULT, {}),
            Step(tcp4(C4, PAY4, 40001, 443), "prod", X.PASS, R.ALLOW_RULE, {}),
            Step(tcp4(C4, CAT4, 40000, 80), "prod", X.PASS, R.ALLOW_RULE, {}),
            # no collision check either: nothing is cached to collide with
            Step(tcp4(C4, CAT4, 40000, 80), "dev", X.PASS, R.ALLOW_RULE, {}),
        ])
        assert len(xdp.flows(4)) == 2, "bypass writes no flow entries"
    finally:
        xdp.dp.set_ctl_flags(clear_bits=0x1)
    play(xdp, [Step(REPLY4, "core", X.PASS, R.ALLOW_REPLY, HIT),
               Step(tcp4(C4, PAY4, 40001, 443), "prod", X.PASS, R.ALLOW_RULE, NEW)])


def test_no_policy_fails_closed(xdp):
    with xdp.no_policy():
        play(xdp, [
            Step(FWD4, "prod", X.DROP, R.NO_POLICY, {}),
            Step(FWD6, "prod", X.DROP, R.NO_POLICY, {}),
            Step(FWD4, "lo", X.DROP, R.NO_POLICY, {}),
            # the link-local control plane and non-IP still work
            Step(E / IPv6(src="fe80::1", dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt="fd00:1::1"), "prod",
                 X.PASS, R.PASS_IPV6_CONTROL, {}),
            Step(raw(E)[:12] + b"\x08\x06" + b"\0" * 28, "prod", X.PASS, R.PASS_NON_IP, {}),
        ])
        assert xdp.flows(4) == []
    play(xdp, [Step(FWD4, "prod", X.PASS, R.ALLOW_RULE, NEW)])


# ------------------------------------------------------------ FIB fallback
def test_reply_segment_from_fib(xdp):
    """A destination no app names: the FIB says where its replies arrive (here: core)."""
    xdp.apply(base_bundle({"default_action": "allow"}))
    play(xdp, [
        Step(tcp4(C4, ROUTED4, 40000, 80), "prod", X.PASS, R.ALLOW_DEFAULT, NEW),
        Step(tcp4(ROUTED4, C4, 80, 40000, "SA"), "core", X.PASS, R.ALLOW_REPLY, HIT),
        Step(tcp6(C6, ROUTED6, 40000, 80), "prod", X.PASS, R.ALLOW_DEFAULT, NEW),
        Step(tcp6(ROUTED6, C6, 80, 40000, "SA"), "core", X.PASS, R.ALLOW_REPLY, HIT),
        # No route: no reply key, so the answer is judged as a new flow of its own. The
        # forward entry it finds at its own reply key claims no segment: no collision.
        Step(tcp4(C4, UNROUTED4, 40000, 80), "prod", X.PASS, R.ALLOW_DEFAULT, NEW),
        Step(tcp4(UNROUTED4, C4, 80, 40000, "SA"), "core", X.PASS, R.ALLOW_DEFAULT, NEW),
        # ... whose reply key (it is the client's direction) now carries the client's packets
        Step(tcp4(C4, UNROUTED4, 40000, 80, "A"), "prod", X.PASS, R.ALLOW_REPLY, HIT),
    ])
    reply_keys = {(k.segment_id, bytes(k)[:4]) for k, v in xdp.flows(4) if v.flags & 0x2}
    assert (SEG_CORE, inet_aton(ROUTED4)) in reply_keys


def test_unknown_reply_segment_in_audit_mode(xdp):
    """Audit mode drops nothing: the answer to a flow whose reply segment is unknown passes too."""
    xdp.apply(base_bundle({"mode": "audit"}))
    play(xdp, [
        Step(tcp4(C4, UNROUTED4, 40000, 80), "prod", X.PASS, R.AUDIT_DEFAULT, NEW),
        Step(tcp4(UNROUTED4, C4, 80, 40000, "SA"), "core", X.PASS, R.AUDIT_DEFAULT, NEW),
    ])
