"""Parser: every header path to its verdict, every malformed header to its own drop reason.

Each row: id, frame (scapy one-liner), ingress interface, expected XDP code,
the one reason counter that must move (by exactly one packet). The policy is
conftest.BASE_POLICY: web (prod) may reach payments on tcp/443, udp/53, icmp
and GRE, so a frame that parses cleanly and reaches the policy ends
ALLOW_RULE; anything the parser refuses ends under its MALFORMED_* reason.
"""
from __future__ import annotations

import errno

import pytest
from scapy.all import (
    ARP,
    GRE,
    ICMP,
    IP,
    TCP,
    UDP,
    Dot1Q,
    ICMPv6EchoRequest,
    ICMPv6MLReport2,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    IPOption_NOP,
    IPOption_Router_Alert,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Raw,
    raw,
)
from scapy.layers.l2 import Dot1AD, Ether
from scapy.layers.sctp import SCTP

from .conftest import C4, C6, CAT4, DB4, E, PAY4, PAY6, R, X, case

SYN4 = IP(src=C4, dst=PAY4) / TCP(sport=40000, dport=443, flags="S")
SYN6 = IPv6(src=C6, dst=PAY6) / TCP(sport=40000, dport=443, flags="S")
V4 = IP(src=C4, dst=PAY4)
V6 = IPv6(src=C6, dst=PAY6)


def dopts(n: int):
    """n empty destination-options headers (8 bytes each), chained."""
    chain = IPv6ExtHdrDestOpt()
    for _ in range(n - 1):
        chain = chain / IPv6ExtHdrDestOpt()
    return chain


def ah6(next_header: int) -> Raw:
    """An IPv6 Authentication Header: its length counts 4-byte units minus 2 (RFC 4302)."""
    return Raw(bytes([next_header, 4, 0, 0]) + b"\x00\x00\x01\x00" + b"\x00\x00\x00\x01" + b"\xaa" * 12)


def patched(frame, offset: int, value: bytes) -> bytes:
    """The frame's bytes with `value` written at `offset` (lengths scapy would otherwise fix)."""
    b = bytearray(raw(frame))
    b[offset: offset + len(value)] = value
    return bytes(b)


PARSE_OK = [
    case("ipv4-tcp", E / SYN4, "prod", X.PASS, R.ALLOW_RULE),
    case("ipv4-udp", E / V4 / UDP(sport=40000, dport=53) / Raw(b"q" * 12), "prod", X.PASS, R.ALLOW_RULE),
    case("ipv4-icmp-echo", E / V4 / ICMP(type=8, id=7, seq=1), "prod", X.PASS, R.ALLOW_RULE),
    case("ipv4-options-ihl6", E / IP(src=C4, dst=PAY4, options=[IPOption_Router_Alert()])
         / TCP(sport=40000, dport=443, flags="S"), "prod", X.PASS, R.ALLOW_RULE),
    case("ipv4-options-ihl15", E / IP(src=C4, dst=PAY4, options=[IPOption_NOP()] * 40)
         / TCP(sport=40000, dport=443, flags="S"), "prod", X.PASS, R.ALLOW_RULE),
    case("ipv4-ethernet-padding", raw(E / SYN4) + b"\0" * 6, "prod", X.PASS, R.ALLOW_RULE),
    case("ipv4-tcp-options", E / V4 / TCP(sport=40000, dport=443, flags="S",
                                          options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]),
         "prod", X.PASS, R.ALLOW_RULE),
    case("ipv6-tcp", E / SYN6, "prod", X.PASS, R.ALLOW_RULE),
    case("ipv6-udp", E / V6 / UDP(sport=40000, dport=53) / Raw(b"q" * 12), "prod", X.PASS, R.ALLOW_RULE),
    case("ipv6-icmp-echo", E / V6 / ICMPv6EchoRequest(id=7, seq=1), "prod", X.PASS, R.ALLOW_RULE),
    case("ipv6-hbh-dstopt-routing-tcp", E / V6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
         / IPv6ExtHdrRouting() / TCP(sport=40000, dport=443, flags="S"), "prod", X.PASS, R.ALLOW_RULE),
    case("ipv6-six-ext-headers", E / V6 / dopts(6) / TCP(sport=40000, dport=443, flags="S"),
         "prod", X.PASS, R.ALLOW_RULE),
    case("ipv6-ah-tcp", E / IPv6(src=C6, dst=PAY6, nh=51) / ah6(6) / TCP(sport=40000, dport=443, flags="S"),
         "prod", X.PASS, R.ALLOW_RULE),
    case("ipv6-ah-deny-port", E / IPv6(src=C6, dst=PAY6, nh=51) / ah6(6) / TCP(sport=40000, dport=444),
         "prod", X.DROP, R.DENY_DEFAULT),
    case("vlan-8021q", E / Dot1Q(vlan=10) / SYN4, "prod", X.PASS, R.ALLOW_RULE),
    case("vlan-qinq-8021ad", E / Dot1AD(vlan=100) / Dot1Q(vlan=10) / SYN4, "prod", X.PASS, R.ALLOW_RULE),
    case("vlan-double-8021q", E / Dot1Q(vlan=100) / Dot1Q(vlan=10) / SYN6, "prod", X.PASS, R.ALLOW_RULE),
    case("vlan-three-tags", E / Dot1AD(vlan=100) / Dot1Q(vlan=10) / Dot1Q(vlan=11) / SYN4,
         "prod", X.DROP, R.VLAN_TOO_DEEP),
    case("arp", E / ARP(psrc=C4, pdst="198.18.1.1"), "prod", X.PASS, R.PASS_NON_IP),
    case("arp-vlan", E / Dot1Q(vlan=10) / ARP(psrc=C4, pdst="198.18.1.1"), "prod", X.PASS, R.PASS_NON_IP),
    case("arp-no-segment", E / ARP(psrc=C4, pdst="198.18.1.1"), "lo", X.PASS, R.PASS_NON_IP),
    case("lldp", Ether(src="02:00:00:00:00:01", dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\x02\x07" * 8),
         "prod", X.PASS, R.PASS_NON_IP),
    case("icmpv6-neighbor-solicitation", E / IPv6(src="fe80::1", dst="ff02::1:ff00:1")
         / ICMPv6ND_NS(tgt="fd00:1::1"), "prod", X.PASS, R.PASS_IPV6_CONTROL),
    case("icmpv6-neighbor-advert", E / IPv6(src="fe80::1", dst="fe80::2") / ICMPv6ND_NA(tgt="fd00:1::1"),
         "core", X.PASS, R.PASS_IPV6_CONTROL),
    case("icmpv6-router-advert", E / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6ND_RA(), "dev",
         X.PASS, R.PASS_IPV6_CONTROL),
    case("icmpv6-mldv2-report", E / IPv6(src="fe80::1", dst="ff02::16") / ICMPv6MLReport2(), "prod",
         X.PASS, R.PASS_IPV6_CONTROL),
    case("icmpv6-ns-no-segment", E / IPv6(src="fe80::1", dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt="fd00:1::1"),
         "lo", X.PASS, R.PASS_IPV6_CONTROL),
    case("icmpv6-echo-is-not-control", E / IPv6(src=C6, dst="fd00:19::99") / ICMPv6EchoRequest(), "prod",
         X.DROP, R.DENY_DEFAULT),
    # Protocols without ports are judged by protocol-only (prefix 72 / 64) entries.
    case("gre-by-protocol-rule", E / IP(src=C4, dst=PAY4) / GRE() / IP(src="10.0.0.1", dst="10.0.0.2"),
         "prod", X.PASS, R.ALLOW_RULE),
    case("gre6-by-protocol-rule", E / IPv6(src=C6, dst=PAY6) / GRE() / IP(src="10.0.0.1", dst="10.0.0.2"),
         "prod", X.PASS, R.ALLOW_RULE),
    case("esp-no-rule", E / IP(src=C4, dst=PAY4, proto=50) / Raw(b"\x00\x00\x01\x00" * 6), "prod",
         X.DROP, R.DENY_DEFAULT),
    case("gre-tcp-only-rule", E / IP(src=C4, dst=DB4) / GRE() / Raw(b"x" * 8), "prod", X.DROP, R.DENY_DEFAULT),
    case("gre-any-protocol-rule", E / IP(src=C4, dst=CAT4) / GRE() / Raw(b"x" * 8), "prod",
         X.PASS, R.ALLOW_RULE),
    case("sctp-any-protocol-rule", E / IP(src=C4, dst=CAT4) / SCTP(sport=5000, dport=36412), "prod",
         X.PASS, R.ALLOW_RULE),
    case("sctp-no-rule", E / IP(src=C4, dst=PAY4) / SCTP(sport=5000, dport=443), "prod", X.DROP, R.DENY_DEFAULT),
]

MALFORMED = [
    # L2
    case("ethernet-only-vlan-type", raw(E / Dot1Q(vlan=10) / SYN4)[:14], "prod", X.DROP, R.MALFORMED_L2),
    case("ethernet-only-ipv4-type", raw(E / SYN4)[:14], "prod", X.DROP, R.MALFORMED_IPV4),
    case("ethernet-only-ipv6-type", raw(E / SYN6)[:14], "prod", X.DROP, R.MALFORMED_IPV6),
    case("ethernet-only-arp-type", raw(E / ARP())[:14], "prod", X.PASS, R.PASS_NON_IP),
    case("vlan-tag-truncated", raw(E / Dot1Q(vlan=10) / SYN4)[:16], "prod", X.DROP, R.MALFORMED_L2),
    case("qinq-inner-tag-truncated", raw(E / Dot1AD(vlan=1) / Dot1Q(vlan=10) / SYN4)[:20], "prod",
         X.DROP, R.MALFORMED_L2),
    # IPv4
    case("ipv4-header-truncated", raw(E / SYN4)[:14 + 19], "prod", X.DROP, R.MALFORMED_IPV4),
    case("ipv4-ihl-4", E / IP(src=C4, dst=PAY4, ihl=4) / TCP(sport=40000, dport=443), "prod",
         X.DROP, R.MALFORMED_IPV4),
    case("ipv4-ihl-0", E / IP(src=C4, dst=PAY4, ihl=0) / TCP(sport=40000, dport=443), "prod",
         X.DROP, R.MALFORMED_IPV4),
    case("ipv4-version-6", E / IP(src=C4, dst=PAY4, version=6) / TCP(sport=40000, dport=443), "prod",
         X.DROP, R.MALFORMED_IPV4),
    case("ipv4-tot-len-beyond-frame", E / IP(src=C4, dst=PAY4, len=100) / TCP(sport=40000, dport=443),
         "prod", X.DROP, R.MALFORMED_IPV4),
    case("ipv4-tot-len-below-ihl", E / IP(src=C4, dst=PAY4, len=16) / TCP(sport=40000, dport=443),
         "prod", X.DROP, R.MALFORMED_IPV4),
    case("ipv4-options-beyond-tot-len", patched(E / SYN4, 14, b"\x4f"), "prod", X.DROP, R.MALFORMED_IPV4),
    case("ipv4-in-ipv6-ethertype", Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x86DD)
         / SYN4, "prod", X.DROP, R.MALFORMED_IPV6),
    # TCP
    case("tcp-header-truncated", E / IP(src=C4, dst=PAY4, proto=6) / Raw(raw(TCP(dport=443))[:19]), "prod",
         X.DROP, R.MALFORMED_L4),
    case("tcp-doff-4", E / V4 / TCP(sport=40000, dport=443, dataofs=4), "prod", X.DROP, R.MALFORMED_L4),
    case("tcp-doff-0", E / V4 / TCP(sport=40000, dport=443, dataofs=0), "prod", X.DROP, R.MALFORMED_L4),
    case("tcp-doff-beyond-datagram", E / V4 / TCP(sport=40000, dport=443, dataofs=15), "prod",
         X.DROP, R.MALFORMED_L4),
    case("tcp-doff-beyond-datagram-in-padding", raw(E / V4 / TCP(sport=40000, dport=443, dataofs=6))
         + b"\0" * 8, "prod", X.DROP, R.MALFORMED_L4),
    case("tcp6-header-truncated", E / IPv6(src=C6, dst=PAY6, nh=6) / Raw(b"\x9c\x40\x01\xbb" * 4), "prod",
         X.DROP, R.MALFORMED_L4),
    case("tcp6-doff-beyond-datagram", E / V6 / TCP(sport=40000, dport=443, dataofs=8), "prod",
         X.DROP, R.MALFORMED_L4),
    # UDP
    case("udp-header-truncated", E / IP(src=C4, dst=PAY4, proto=17) / Raw(b"\x9c\x40\x00\x35"), "prod",
         X.DROP, R.MALFORMED_L4),
    case("udp-len-7", E / V4 / UDP(sport=40000, dport=53, len=7) / Raw(b"q" * 4), "prod",
         X.DROP, R.MALFORMED_L4),
    case("udp-len-beyond-datagram", E / V4 / UDP(sport=40000, dport=53, len=100) / Raw(b"q" * 4), "prod",
         X.DROP, R.MALFORMED_L4),
    case("udp6-len-beyond-datagram", E / V6 / UDP(sport=40000, dport=53, len=13) / Raw(b"q" * 4), "prod",
         X.DROP, R.MALFORMED_L4),
    # ICMP
    case("icmp-shorter-than-8", E / IP(src=C4, dst=PAY4, proto=1) / Raw(b"\x08\x00\xf7\xff"), "prod",
         X.DROP, R.MALFORMED_L4),
    case("icmpv6-shorter-than-8", E / IPv6(src=C6, dst=PAY6, nh=58) / Raw(b"\x80\x00\x00\x00"), "prod",
         X.DROP, R.MALFORMED_L4),
    case("icmp-error-quote-truncated", E / IP(src=PAY4, dst=C4) / ICMP(type=3, code=3)
         / Raw(raw(SYN4)[:24]), "core", X.DROP, R.MALFORMED_L4),
    case("icmp-error-quote-not-ipv4", E / IP(src=PAY4, dst=C4) / ICMP(type=3, code=3)
         / Raw(raw(SYN6)[:48]), "core", X.DROP, R.MALFORMED_L4),
    case("icmpv6-error-quote-truncated", E / IPv6(src=PAY6, dst=C6, nh=58) / Raw(b"\x01\x04\x00\x00\x00\x00\x00\x00")
         / Raw(raw(SYN6)[:44]), "core", X.DROP, R.MALFORMED_L4),
    case("sctp-header-truncated", E / IP(src=C4, dst=CAT4, proto=132) / Raw(b"\x13\x88\x8e\x3c" * 2),
         "prod", X.DROP, R.MALFORMED_L4),
    # IPv6
    case("ipv6-header-truncated", raw(E / SYN6)[:14 + 39], "prod", X.DROP, R.MALFORMED_IPV6),
    case("ipv6-version-4", E / IPv6(src=C6, dst=PAY6, version=4) / TCP(sport=40000, dport=443), "prod",
         X.DROP, R.MALFORMED_IPV6),
    case("ipv6-payload-len-beyond-frame", E / IPv6(src=C6, dst=PAY6, plen=21) / TCP(sport=40000, dport=443),
         "prod", X.DROP, R.MALFORMED_IPV6),
    case("ipv6-payload-len-0", E / IPv6(src=C6, dst=PAY6, plen=0) / TCP(sport=40000, dport=443), "prod",
         X.DROP, R.MALFORMED_IPV6),
    case("ipv6-seven-ext-headers", E / V6 / dopts(7) / TCP(sport=40000, dport=443, flags="S"), "prod",
         X.DROP, R.IPV6_EXT_CHAIN),
    case("ipv6-six-ext-headers-then-ext", E / V6 / dopts(6) / IPv6ExtHdrHopByHop()
         / TCP(sport=40000, dport=443), "prod", X.DROP, R.IPV6_EXT_CHAIN),
    case("ipv6-ext-len-past-datagram", E / V6 / IPv6ExtHdrDestOpt(len=10) / TCP(sport=40000, dport=443),
         "prod", X.DROP, R.MALFORMED_IPV6),
    case("ipv6-ext-len-past-datagram-into-padding", raw(E / V6 / IPv6ExtHdrDestOpt(len=3)
         / TCP(sport=40000, dport=443)) + b"\0" * 16, "prod", X.DROP, R.MALFORMED_IPV6),
    case("ipv6-ext-header-cut-by-datagram-end", E / IPv6(src=C6, dst=PAY6, nh=60) / Raw(b"\x06\x00\x01\x04"),
         "prod", X.DROP, R.MALFORMED_IPV6),
    case("ipv6-ah-len-past-datagram", E / IPv6(src=C6, dst=PAY6, nh=51)
         / Raw(bytes([6, 40, 0, 0]) + b"\0" * 20) / TCP(sport=40000, dport=443), "prod", X.DROP, R.MALFORMED_IPV6),
]


@pytest.mark.parametrize("frame, ifname, code, reason", PARSE_OK + MALFORMED)
def test_parse(xdp, frame, ifname, code, reason):
    xdp.expect(frame, ifname, code, reason)


def test_ipv4_option_frames_really_carry_options():
    """The ihl>5 rows are only worth something if scapy built what they claim."""
    for opts, ihl in (([IPOption_Router_Alert()], 6), ([IPOption_NOP()] * 40, 15)):
        frame = raw(E / IP(src=C4, dst=PAY4, options=opts) / TCP(dport=443))
        assert frame[14] & 0x0F == ihl


# ------------------------------------------------------------- truncation
def test_shorter_than_ethernet(xdp):
    """Frames of 0-13 bytes: dropped as MALFORMED_L2 wherever they can be delivered.

    The kernel refuses such input to BPF_PROG_TEST_RUN (EINVAL, even with XDP
    metadata in front to satisfy the ETH_HLEN minimum of the input buffer),
    and bpf_xdp_adjust_head/tail cannot shrink a frame below ETH_HLEN either:
    on this kernel no frame that short reaches an XDP program, and the
    program's Ethernet bounds check is there for the verifier. Where a kernel
    does deliver one, it must be the L2 drop.
    """
    frame = raw(E / SYN4)
    for cut in range(14):
        try:
            v = xdp.judge(frame[:cut], "prod")
        except OSError as e:
            assert e.errno == errno.EINVAL, cut
            continue
        assert (X(v.retval), v.reasons) == (X.DROP, {R.MALFORMED_L2: 1}), cut


# Valid frames cut at every byte offset: no prefix may pass, and each is
# dropped for the layer the cut lands in. The IP header still claims the full
# datagram, so any cut past L2 is a truncated IP packet.
SWEEP = {
    # id: (frame, end of L2, IP reason)
    "ipv4-tcp-syn": (E / SYN4, 14, R.MALFORMED_IPV4),
    "ipv6-tcp-syn": (E / SYN6, 14, R.MALFORMED_IPV6),
    "qinq-ipv4-udp": (E / Dot1AD(vlan=1) / Dot1Q(vlan=2) / V4 / UDP(sport=40000, dport=53) / Raw(b"q" * 5),
                      22, R.MALFORMED_IPV4),
    "ipv6-ext-tcp": (E / V6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / TCP(sport=40000, dport=443, flags="S"),
                     14, R.MALFORMED_IPV6),
    "ipv4-icmp-echo": (E / V4 / ICMP(type=8, id=7), 14, R.MALFORMED_IPV4),
}


def _sweep_rows():
    for name, (frame, l2_end, ip_reason) in SWEEP.items():
        data = raw(frame)
        for cut in range(14, len(data)):  # shorter: test_shorter_than_ethernet
            yield pytest.param(data[:cut], R.MALFORMED_L2 if cut < l2_end else ip_reason, id=f"{name}-{cut}")


@pytest.mark.parametrize("frame, reason", list(_sweep_rows()))
def test_truncated_at_every_offset(xdp, frame, reason):
    xdp.expect(frame, "prod", X.DROP, reason)


def _with_lengths_fixed(data: bytes, l3: int) -> bytes:
    """The truncated frame with its IP length field rewritten to end where the frame ends."""
    b = bytearray(data)
    if len(b) >= l3 + 4 and b[l3] >> 4 == 4:
        b[l3 + 2: l3 + 4] = (len(b) - l3).to_bytes(2, "big")
    elif len(b) >= l3 + 6 and b[l3] >> 4 == 6:
        b[l3 + 4: l3 + 6] = (len(b) - l3 - 40).to_bytes(2, "big") if len(b) >= l3 + 40 else b"\0\0"
    return bytes(b)


# The same cuts with the IP length made to agree: now the cut lands inside a
# consistent, shorter datagram, and each layer must catch its own truncation.
SWEEP_FIXED = {
    # id: (frame, [(end offset, reason for cuts before it)], reason past the last boundary)
    "ipv4-tcp-syn": (E / SYN4, [(14, R.MALFORMED_L2), (34, R.MALFORMED_IPV4)], R.MALFORMED_L4),
    "ipv4-options-tcp": (E / IP(src=C4, dst=PAY4, options=[IPOption_Router_Alert()])
                         / TCP(sport=40000, dport=443, flags="S"),
                         [(14, R.MALFORMED_L2), (38, R.MALFORMED_IPV4)], R.MALFORMED_L4),
    # payload_len 0 is refused by itself, so a cut right after the IPv6 header is an IPv6 drop.
    "ipv6-tcp-syn": (E / SYN6, [(14, R.MALFORMED_L2), (55, R.MALFORMED_IPV6)], R.MALFORMED_L4),
    "ipv6-ext-tcp": (E / V6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / TCP(sport=40000, dport=443, flags="S"),
                     [(14, R.MALFORMED_L2), (70, R.MALFORMED_IPV6)], R.MALFORMED_L4),
    "vlan-ipv4-udp": (E / Dot1Q(vlan=2) / V4 / UDP(sport=40000, dport=53) / Raw(b"q" * 5),
                      [(18, R.MALFORMED_L2), (38, R.MALFORMED_IPV4)], R.MALFORMED_L4),
    "ipv4-icmp-echo": (E / V4 / ICMP(type=8, id=7), [(14, R.MALFORMED_L2), (34, R.MALFORMED_IPV4)],
                       R.MALFORMED_L4),
    "ipv6-icmp-echo": (E / V6 / ICMPv6EchoRequest(id=7), [(14, R.MALFORMED_L2), (55, R.MALFORMED_IPV6)],
                       R.MALFORMED_L4),
}


def _sweep_fixed_rows():
    for name, (frame, bounds, last) in SWEEP_FIXED.items():
        data = raw(frame)
        l3 = bounds[0][0]
        for cut in range(14, len(data)):
            reason = next((r for end, r in bounds if cut < end), last)
            yield pytest.param(_with_lengths_fixed(data[:cut], l3), reason, id=f"{name}-{cut}")


@pytest.mark.parametrize("frame, reason", list(_sweep_fixed_rows()))
def test_truncated_with_consistent_lengths(xdp, frame, reason):
    xdp.expect(frame, "prod", X.DROP, reason)
