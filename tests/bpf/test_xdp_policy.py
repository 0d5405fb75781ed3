"""Policy verdicts of new flows, and the reject answers (TCP RST, ICMP unreachable).

Rows: id, frame, ingress interface, expected XDP code, the one reason counter
that must move. Policy: conftest.BASE_POLICY (rule ids RULE_* there) unless
a row names settings to change.
"""
from __future__ import annotations

import pytest
from scapy.all import (
    GRE,
    ICMP,
    IP,
    TCP,
    UDP,
    Dot1Q,
    ICMPv6EchoRequest,
    IPOption_Router_Alert,
    IPv6,
    IPv6ExtHdrDestOpt,
    Raw,
    raw,
)
from scapy.layers.inet import in4_chksum
from scapy.layers.inet6 import in6_chksum
from scapy.layers.l2 import Dot1AD, Ether
from scapy.utils import checksum

from .conftest import (
    APP_DB,
    APP_PAY,
    APP_WEB,
    C4,
    C6,
    CAT4,
    CAT6,
    DB4,
    DB6,
    E,
    EV,
    PAY4,
    PAY6,
    PORT_RANGE,
    RULE_PAY_HTTPS,
    RULE_PAY_SSH,
    SEG_CORE,
    SEG_PROD,
    A,
    R,
    X,
    base_bundle,
    case,
    pol,
)


def syn4(dport, dst=PAY4, src=C4, sport=40000):
    return E / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S")


def syn6(dport, dst=PAY6, src=C6, sport=40000):
    return E / IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S")


POLICY = [
    case("allow-rule", syn4(443), "prod", X.PASS, R.ALLOW_RULE),
    case("allow-rule-v6", syn6(443), "prod", X.PASS, R.ALLOW_RULE),
    case("allow-rule-udp", E / IP(src=C4, dst=PAY4) / UDP(sport=5000, dport=53), "prod", X.PASS, R.ALLOW_RULE),
    case("deny-rule", syn4(23), "prod", X.DROP, R.DENY_RULE),
    case("deny-rule-v6", syn6(23), "prod", X.DROP, R.DENY_RULE),
    case("default-deny-port", syn4(444), "prod", X.DROP, R.DENY_DEFAULT),
    case("default-deny-port-v6", syn6(444), "prod", X.DROP, R.DENY_DEFAULT),
    case("default-deny-udp-on-tcp-port", E / IP(src=C4, dst=PAY4) / UDP(sport=5000, dport=443), "prod",
         X.DROP, R.DENY_DEFAULT),
    case("default-deny-unknown-dst", syn4(443, dst="198.19.0.99"), "prod", X.DROP, R.DENY_DEFAULT),
    case("default-deny-unknown-src", syn4(443, src="198.18.2.5"), "prod", X.DROP, R.DENY_DEFAULT),
    case("default-deny-server-to-client", E / IP(src=PAY4, dst=C4) / TCP(sport=5555, dport=40000, flags="S"),
         "core", X.DROP, R.DENY_DEFAULT),
    case("audit-rule-deny", syn4(8080), "prod", X.PASS, R.AUDIT_RULE),
    case("audit-rule-reject", syn4(2323), "prod", X.PASS, R.AUDIT_RULE),
    case("audit-rule-deny-v6", syn6(8080), "prod", X.PASS, R.AUDIT_RULE),
    case("l7-punt-without-handler", syn4(80), "prod", X.DROP, R.PUNT_NO_HANDLER),
    case("l7-punt-without-handler-v6", syn6(80), "prod", X.DROP, R.PUNT_NO_HANDLER),
    # SNI-gated: the handshake passes and waits for the ClientHello (tests/bpf/test_xdp_sni.py)
    case("sni-handshake-waits-for-clienthello", syn4(9443), "prod", X.PASS, R.SNI_PENDING),
    # prefix 64: any protocol, any port
    case("any-protocol-tcp", syn4(1234, dst=CAT4), "prod", X.PASS, R.ALLOW_RULE),
    case("any-protocol-udp", E / IP(src=C4, dst=CAT4) / UDP(sport=5000, dport=999), "prod", X.PASS, R.ALLOW_RULE),
    case("any-protocol-icmp", E / IP(src=C4, dst=CAT4) / ICMP(id=3), "prod", X.PASS, R.ALLOW_RULE),
    case("any-protocol-gre-v6", E / IPv6(src=C6, dst=CAT6) / GRE() / Raw(b"x" * 8), "prod", X.PASS, R.ALLOW_RULE),
    # prefix 72: tcp, any port
    case("any-port-tcp-5432", syn4(5432, dst=DB4), "prod", X.PASS, R.ALLOW_RULE),
    case("any-port-tcp-1", syn4(1, dst=DB4), "prod", X.PASS, R.ALLOW_RULE),
    case("any-port-tcp-65535-v6", syn6(65535, dst=DB6), "prod", X.PASS, R.ALLOW_RULE),
    case("any-port-not-udp", E / IP(src=C4, dst=DB4) / UDP(sport=5000, dport=5432), "prod", X.DROP, R.DENY_DEFAULT),
    case("any-port-not-icmp", E / IP(src=C4, dst=DB4) / ICMP(id=3), "prod", X.DROP, R.DENY_DEFAULT),
    # prefix 88: tcp/8192-8447
    case("port-range-low", syn4(PORT_RANGE[0]), "prod", X.PASS, R.ALLOW_RULE),
    case("port-range-mid", syn4(8300), "prod", X.PASS, R.ALLOW_RULE),
    case("port-range-high", syn4(PORT_RANGE[1]), "prod", X.PASS, R.ALLOW_RULE),
    case("port-range-high-v6", syn6(PORT_RANGE[1]), "prod", X.PASS, R.ALLOW_RULE),
    case("port-range-below", syn4(PORT_RANGE[0] - 1), "prod", X.DROP, R.DENY_DEFAULT),
    case("port-range-above", syn4(PORT_RANGE[1] + 1), "prod", X.DROP, R.DENY_DEFAULT),
    case("port-range-byte-swapped", syn4(0x0020), "prod", X.DROP, R.DENY_DEFAULT),
    # the same client address in another segment is another app
    case("overlap-dev-denied-by-rule", syn4(443), "dev", X.DROP, R.DENY_RULE),
    case("overlap-dev-own-rule", syn4(80, dst=CAT4), "dev", X.PASS, R.ALLOW_RULE),
    case("overlap-dev-not-web-rules", syn4(1234, dst=CAT4), "dev", X.DROP, R.DENY_DEFAULT),
    case("overlap-dev-v6", syn6(443), "dev", X.DROP, R.DENY_RULE),
    # ingress interface in no segment
    case("no-segment-lo", syn4(443), "lo", X.DROP, R.NO_SEGMENT),
    case("no-segment-lo-v6", syn6(443), "lo", X.DROP, R.NO_SEGMENT),
    case("no-segment-veth-peer", syn4(443), "prod-p", X.DROP, R.NO_SEGMENT),
]


@pytest.mark.parametrize("frame, ifname, code, reason", POLICY)
def test_policy(xdp, frame, ifname, code, reason):
    xdp.expect(frame, ifname, code, reason)


DEFAULT_ALLOW = {"default_action": "allow"}
AUDIT = {"mode": "audit"}
SETTINGS = [
    # (settings, row)
    (DEFAULT_ALLOW, case("default-allow", syn4(444), "prod", X.PASS, R.ALLOW_DEFAULT)),
    (DEFAULT_ALLOW, case("default-allow-unknown-dst", syn4(443, dst="198.19.0.99"), "prod",
                         X.PASS, R.ALLOW_DEFAULT)),
    (DEFAULT_ALLOW, case("default-allow-deny-rule-wins", syn4(23), "prod", X.DROP, R.DENY_RULE)),
    (DEFAULT_ALLOW, case("default-allow-rule-still-rule", syn4(443), "prod", X.PASS, R.ALLOW_RULE)),
    (DEFAULT_ALLOW, case("default-allow-punt-never-allows", syn4(80), "prod", X.DROP, R.PUNT_NO_HANDLER)),
    (DEFAULT_ALLOW, case("default-allow-no-segment", syn4(443), "lo", X.DROP, R.NO_SEGMENT)),
    (AUDIT, case("audit-default", syn4(444), "prod", X.PASS, R.AUDIT_DEFAULT)),
    (AUDIT, case("audit-default-v6", syn6(444), "prod", X.PASS, R.AUDIT_DEFAULT)),
    (AUDIT, case("audit-deny-rule", syn4(23), "prod", X.PASS, R.AUDIT_RULE)),
    (AUDIT, case("audit-reject-rule", syn4(22), "prod", X.PASS, R.AUDIT_RULE)),
    (AUDIT, case("audit-allow-rule", syn4(443), "prod", X.PASS, R.ALLOW_RULE)),
    (AUDIT, case("audit-no-segment-still-drops", syn4(443), "lo", X.DROP, R.NO_SEGMENT)),
    (AUDIT, case("audit-malformed-still-drops", E / IP(src=C4, dst=PAY4, ihl=4) / TCP(dport=443), "prod",
                 X.DROP, R.MALFORMED_IPV4)),
    ({**DEFAULT_ALLOW, **AUDIT}, case("audit-default-allow", syn4(444), "prod", X.PASS, R.ALLOW_DEFAULT)),
]


@pytest.mark.parametrize(
    "settings, frame, ifname, code, reason",
    [pytest.param(st, *row.values, id=row.id) for st, row in SETTINGS],
)
def test_settings(xdp, settings, frame, ifname, code, reason):
    xdp.apply(base_bundle(settings))
    xdp.expect(frame, ifname, code, reason)


# Every key layer for one app pair (web -> db): the longest match must win,
# whichever map (exact hash or range trie) holds it.
PRECEDENCE_POLICY = [
    pol(APP_WEB, APP_DB, None, None, A.DENY, 20),  # 64: any protocol
    pol(APP_WEB, APP_DB, 6, None, A.ALLOW, 21),  # 72: tcp, any port
    pol(APP_WEB, APP_DB, 6, (0x1500, 0x15FF), A.REJECT, 22),  # 88: tcp/5376-5631
    pol(APP_WEB, APP_DB, 6, (0x1520, 0x152F), A.ALLOW, 23),  # 92: tcp/5408-5423
    pol(APP_WEB, APP_DB, 6, 5432, A.DENY, 24),  # 96: tcp/5432 (inside the /88 block)
    pol(APP_WEB, APP_DB, 17, 53, A.ALLOW, 25),  # 96: udp/53
]
PRECEDENCE = [
    # id, frame, code, reason, rule that must have decided
    pytest.param(syn4(5432, dst=DB4), X.DROP, R.DENY_RULE, 24, id="exact-beats-range"),
    pytest.param(syn4(5400, dst=DB4), X.TX, R.REJECT_RULE, 22, id="range-beats-any-port"),
    pytest.param(syn4(5410, dst=DB4), X.PASS, R.ALLOW_RULE, 23, id="longer-range-beats-shorter"),
    pytest.param(syn6(5631, dst=DB6), X.TX, R.REJECT_RULE, 22, id="range-end-v6"),
    pytest.param(syn4(80, dst=DB4), X.PASS, R.ALLOW_RULE, 21, id="any-port-beats-any-protocol"),
    pytest.param(E / IP(src=C4, dst=DB4) / UDP(sport=5000, dport=53), X.PASS, R.ALLOW_RULE, 25, id="udp-exact"),
    pytest.param(E / IP(src=C4, dst=DB4) / UDP(sport=5000, dport=54), X.DROP, R.DENY_RULE, 20,
                 id="udp-falls-to-any-protocol"),
    pytest.param(E / IP(src=C4, dst=DB4) / ICMP(id=4), X.DROP, R.DENY_RULE, 20, id="icmp-falls-to-any-protocol"),
    pytest.param(E / IP(src=C4, dst=DB4) / GRE() / Raw(b"x" * 8), X.DROP, R.DENY_RULE, 20,
                 id="gre-falls-to-any-protocol"),
]


@pytest.mark.parametrize("frame, code, reason, rule", PRECEDENCE)
def test_longest_policy_key_wins(xdp, frame, code, reason, rule):
    xdp.apply(base_bundle(policy=PRECEDENCE_POLICY))
    xdp.expect(frame, "prod", code, reason)
    family = 6 if IPv6 in frame else 4
    assert [v.rule_id for k, v in xdp.flows(family) if k.segment_id == SEG_PROD] == [rule]


def test_rule_ids_and_apps_are_cached(xdp):
    """The flow entry records what decided: rule id, apps, generation, reason."""
    xdp.expect(syn4(443), "prod", X.PASS, R.ALLOW_RULE)
    xdp.expect(syn4(444, sport=40001), "prod", X.DROP, R.DENY_DEFAULT)
    entries = {(k.segment_id, bytes(k)[8:10]): v for k, v in xdp.flows(4)}
    allowed = entries[(1, (40000).to_bytes(2, "big"))]
    assert (allowed.rule_id, allowed.src_app, allowed.dst_app, allowed.action, allowed.reason,
            allowed.generation, allowed.peer_segment) == (RULE_PAY_HTTPS, APP_WEB, APP_PAY, A.ALLOW,
                                                          R.ALLOW_RULE, xdp.generation, SEG_CORE)
    denied = entries[(1, (40001).to_bytes(2, "big"))]
    assert (denied.rule_id, denied.action, denied.reason) == (0, A.DENY, R.DENY_DEFAULT)
    # the reply key of the allowed flow, on payments' segment
    reply = entries[(3, (443).to_bytes(2, "big"))]
    assert (reply.flags & 0x2, reply.reason, reply.peer_segment, reply.rule_id) == (
        0x2, R.ALLOW_REPLY, 1, RULE_PAY_HTTPS)
    assert len(entries) == 3  # a denied flow gets no reply entry


# ------------------------------------------------------------------ reject
def _l2_len(frame: Ether) -> int:
    return 14 + 4 * sum(1 for layer in (Dot1Q, Dot1AD) for _ in _all(frame, layer))


def _all(pkt, layer):
    i = 1
    while pkt.getlayer(layer, i) is not None:
        yield pkt.getlayer(layer, i)
        i += 1


def _tags(frame: Ether) -> list:
    out, layer = [], frame.payload
    while isinstance(layer, (Dot1Q, Dot1AD)):
        out.append((type(layer).__name__, layer.vlan, layer.prio, layer.type))
        layer = layer.payload
    return out


def check_rst(sent: bytes, out: bytes, flags: str, seq: int, ack: int) -> None:
    """`out` is the RST that makes the sender of `sent` give up, byte-exact and checksummed."""
    s, r = Ether(sent), Ether(out)
    assert (r.src, r.dst) == (s.dst, s.src)
    assert _tags(r) == _tags(s)
    l2 = _l2_len(s)
    if IP in s:
        si, ri = s[IP], r[IP]
        assert (ri.src, ri.dst, ri.version, ri.ihl, ri.proto, ri.ttl, ri.len, str(ri.flags), ri.frag) == (
            si.dst, si.src, 4, 5, 6, 64, 40, "DF", 0)
        assert checksum(raw(ri)[:20]) == 0, "IP header checksum"
        ip_len = 20
    else:
        si, ri = s[IPv6], r[IPv6]
        assert (ri.src, ri.dst, ri.nh, ri.hlim, ri.plen) == (si.dst, si.src, 6, 64, 20)
        ip_len = 40
    st, rt = s[TCP], r[TCP]
    assert (rt.sport, rt.dport, str(rt.flags), rt.seq, rt.ack, rt.dataofs, rt.window, rt.urgptr) == (
        st.dport, st.sport, flags, seq, ack, 5, 0, 0)
    tcp = bytearray(out[l2 + ip_len:])
    assert len(tcp) == 20, "nothing after the RST header"
    tcp[16:18] = b"\0\0"
    want = in4_chksum(6, ri, bytes(tcp)) if IP in s else in6_chksum(6, ri, bytes(tcp))
    assert rt.chksum == want, "TCP checksum"


def check_unreachable(sent: bytes, out: bytes) -> None:
    """`out` is an ICMP 3/13 (ICMPv6 1/1) quoting `sent`'s IP header(s) + 8 bytes, checksummed."""
    s, r = Ether(sent), Ether(out)
    assert (r.src, r.dst) == (s.dst, s.src)
    assert _tags(r) == _tags(s)
    l2 = _l2_len(s)
    if IP in s:
        si, ri = s[IP], r[IP]
        l4_off = si.ihl * 4
        ip_len, hdr_len, proto, want_type = si.len, 20, 1, (3, 13)
    else:
        si, ri = s[IPv6], r[IPv6]
        l4_off = len(raw(si)) - len(raw(s[UDP] if UDP in s else s[TCP]))
        ip_len, hdr_len, proto, want_type = 40 + si.plen, 40, 58, (1, 1)
    quote_len = min(l4_off + 8, ip_len, 128) & ~1
    icmp = out[l2 + hdr_len:]
    assert len(icmp) == 8 + quote_len
    assert (icmp[0], icmp[1]) == want_type
    assert icmp[4:8] == b"\0\0\0\0"
    assert icmp[8:] == sent[l2: l2 + quote_len], "the quote is the offending datagram's start"
    if proto == 1:
        assert (ri.src, ri.dst, ri.ihl, ri.proto, ri.ttl, ri.len) == (si.dst, si.src, 5, 1, 64, 20 + len(icmp))
        assert checksum(raw(ri)[:20]) == 0, "IP header checksum"
        assert checksum(icmp) == 0, "ICMP checksum"
    else:
        assert (ri.src, ri.dst, ri.nh, ri.hlim, ri.plen) == (si.dst, si.src, 58, 64, len(icmp))
        zeroed = icmp[:2] + b"\0\0" + icmp[4:]
        assert in6_chksum(58, ri, zeroed) == int.from_bytes(icmp[2:4], "big"), "ICMPv6 checksum"


V4 = IP(src=C4, dst=PAY4)
V6 = IPv6(src=C6, dst=PAY6)
RST = [
    # id, frame, expected flags, seq, ack of the RST
    pytest.param(E / V4 / TCP(sport=40000, dport=22, flags="S", seq=1000), "RA", 0, 1001, id="syn"),
    pytest.param(E / V4 / TCP(sport=40000, dport=22, flags="S", seq=0xFFFFFFFF), "RA", 0, 0, id="syn-seq-wraps"),
    pytest.param(E / V4 / TCP(sport=40000, dport=22, flags="S", seq=7) / Raw(b"d" * 10), "RA", 0, 18,
                 id="syn-with-data"),
    pytest.param(E / V4 / TCP(sport=40000, dport=22, flags="A", seq=5000, ack=777), "R", 777, 0, id="ack"),
    pytest.param(E / V4 / TCP(sport=40000, dport=22, flags="PA", seq=5000, ack=0xDEADBEEF) / Raw(b"x" * 100),
                 "R", 0xDEADBEEF, 0, id="data-ack"),
    pytest.param(E / V4 / TCP(sport=40000, dport=22, flags="F", seq=50) / Raw(b"x" * 5), "RA", 0, 56,
                 id="fin-no-ack"),
    pytest.param(E / V4 / TCP(sport=40000, dport=22, flags="", seq=50) / Raw(b"x" * 5), "RA", 0, 55,
                 id="no-flags-data"),
    # the segment length comes from the IP header, not from the padded frame
    pytest.param(raw(E / V4 / TCP(sport=40000, dport=22, flags="", seq=50) / Raw(b"x" * 1)) + b"\0" * 5, "RA", 0, 51,
                 id="no-flags-data-padded"),
    pytest.param(E / V4 / TCP(sport=40000, dport=22, flags="S", seq=1000,
                              options=[("MSS", 1460), ("NOP", None), ("WScale", 7)]), "RA", 0, 1001,
                 id="syn-tcp-options"),
    pytest.param(E / IP(src=C4, dst=PAY4, options=[IPOption_Router_Alert()])
                 / TCP(sport=40000, dport=22, flags="S", seq=1000), "RA", 0, 1001, id="ipv4-options"),
    pytest.param(raw(E / V4 / TCP(sport=40000, dport=22, flags="S", seq=1000)) + b"\0" * 6, "RA", 0, 1001,
                 id="ethernet-padding"),
    pytest.param(E / Dot1Q(vlan=10, prio=3) / V4 / TCP(sport=40000, dport=22, flags="S", seq=1000), "RA", 0, 1001,
                 id="vlan"),
    pytest.param(E / Dot1AD(vlan=100) / Dot1Q(vlan=10) / V4 / TCP(sport=40000, dport=22, flags="S", seq=1000),
                 "RA", 0, 1001, id="qinq"),
    pytest.param(E / V6 / TCP(sport=40000, dport=22, flags="S", seq=1000), "RA", 0, 1001, id="v6-syn"),
    pytest.param(E / V6 / TCP(sport=40000, dport=22, flags="A", seq=1000, ack=31337), "R", 31337, 0, id="v6-ack"),
    pytest.param(E / V6 / IPv6ExtHdrDestOpt() / TCP(sport=40000, dport=22, flags="S", seq=1000), "RA", 0, 1001,
                 id="v6-ext-header"),
    pytest.param(E / Dot1Q(vlan=10) / V6 / TCP(sport=40000, dport=22, flags="S", seq=1000), "RA", 0, 1001,
                 id="v6-vlan"),
]


@pytest.mark.parametrize("frame, flags, seq, ack", RST)
def test_reject_tcp_answers_rst(xdp, frame, flags, seq, ack):
    sent = raw(frame)
    v = xdp.expect(sent, "prod", X.TX, R.REJECT_RULE)
    assert v.events.get(EV.REJECT_TCP_RST) == 1
    check_rst(sent, v.data_out, flags, seq, ack)


@pytest.mark.parametrize("flags", ["R", "RA"])
def test_reject_never_answers_a_reset(xdp, flags):
    v = xdp.expect(E / V4 / TCP(sport=40000, dport=22, flags=flags, seq=1, ack=2), "prod", X.DROP,
                   R.REJECT_FAILED)
    assert EV.REJECT_TCP_RST not in v.events


UNREACH = [
    pytest.param(E / V4 / UDP(sport=40000, dport=5353) / Raw(b"m" * 30), id="udp"),
    pytest.param(E / V4 / UDP(sport=40000, dport=5353) / Raw(b"m" * 3), id="udp-odd-length"),
    pytest.param(E / V4 / UDP(sport=40000, dport=5353), id="udp-empty"),
    pytest.param(raw(E / V4 / UDP(sport=40000, dport=5353) / Raw(b"m" * 3)) + b"\0" * 13, id="udp-padded"),
    pytest.param(E / IP(src=C4, dst=PAY4, options=[IPOption_Router_Alert()]) / UDP(sport=40000, dport=5353)
                 / Raw(b"m" * 30), id="ipv4-options"),
    pytest.param(E / Dot1Q(vlan=10) / V4 / UDP(sport=40000, dport=5353) / Raw(b"m" * 30), id="vlan"),
    pytest.param(E / Dot1AD(vlan=7) / Dot1Q(vlan=10) / V4 / UDP(sport=40000, dport=5353), id="qinq"),
    pytest.param(E / V6 / UDP(sport=40000, dport=5353) / Raw(b"m" * 30), id="v6-udp"),
    pytest.param(E / V6 / UDP(sport=40000, dport=5353) / Raw(b"m" * 1), id="v6-udp-odd-length"),
    pytest.param(E / Dot1Q(vlan=10) / V6 / UDP(sport=40000, dport=5353) / Raw(b"m" * 30), id="v6-vlan"),
    pytest.param(E / V6 / IPv6ExtHdrDestOpt(options=[]) / UDP(sport=40000, dport=5353), id="v6-ext-header"),
    # 40 + 96 + 8 bytes of headers: the quote stops at 128 bytes
    pytest.param(E / IPv6(src=C6, dst=PAY6, nh=60) / Raw(bytes([17, 11]) + b"\0" * 94)
                 / UDP(sport=40000, dport=5353), id="v6-quote-capped"),
]


@pytest.mark.parametrize("frame", UNREACH)
def test_reject_udp_answers_icmp_unreachable(xdp, frame):
    sent = raw(frame)
    v = xdp.expect(sent, "prod", X.TX, R.REJECT_RULE)
    assert v.events.get(EV.REJECT_ICMP) == 1
    check_unreachable(sent, v.data_out)


def test_reject_rule_of_any_protocol_answers_icmp(xdp):
    """A reject rule that covers ICMP answers an echo request with an unreachable."""
    policy = [pol(APP_WEB, APP_PAY, None, None, A.REJECT, RULE_PAY_SSH)]  # any protocol
    xdp.apply(base_bundle(policy=policy))
    sent = raw(E / V4 / ICMP(type=8, id=9) / Raw(b"p" * 20))
    v = xdp.expect(sent, "prod", X.TX, R.REJECT_RULE)
    check_unreachable(sent, v.data_out)
    # fewer than 8 bytes of L4: the quote ends with the datagram, rounded down to even
    sent = raw(E / V4 / GRE() / Raw(b"g"))
    v = xdp.expect(sent, "prod", X.TX, R.REJECT_RULE)
    check_unreachable(sent, v.data_out)
    sent6 = raw(E / V6 / ICMPv6EchoRequest(id=9))
    v = xdp.expect(sent6, "prod", X.TX, R.REJECT_RULE)
    assert Ether(v.data_out)[IPv6].nh == 58 and v.data_out[14 + 40] == 1


def test_reject_does_not_answer_icmp_errors(xdp):
    """An ICMP error follows the flow it quotes, never a rule: a reject rule covering ICMP
    does not make bulkhead answer an error with an error (RFC 1122)."""
    policy = [pol(APP_WEB, APP_PAY, None, None, A.REJECT, RULE_PAY_SSH)]
    xdp.apply(base_bundle(policy=policy))
    quote = raw(IP(src=PAY4, dst=C4) / UDP(sport=53, dport=40000))[:28]
    v = xdp.expect(E / V4 / ICMP(type=3, code=3) / Raw(quote), "prod", X.DROP, R.ICMP_ERROR_NO_FLOW)
    assert not v.events
