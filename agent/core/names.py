"""Names and numbers every room shares: one definition each, imported everywhere.

The C side's numbers (reasons, events, map layouts) are mirrored in bulkhead.datapath.abi;
skb/ct marks are in bulkhead.datapath.marks; HTTP defaults in bulkhead.l7.settings.
"""
from __future__ import annotations

# IP protocol numbers as flows, events and port specs show them.
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "icmpv6", 132: "sctp"}


def proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


# The verdict classes a user sees (status, flows, metrics, top). audit: a would-be denial that
# was passed (audit mode); it is never shown as a deny.
VERDICTS = ("pass", "drop", "reject", "audit")
PASS, DROP, REJECT, AUDIT = VERDICTS

# Socket options Python's socket module does not name (asm-generic/socket.h, linux/in.h, in6.h).
SO_MARK = 36
SO_NETNS_COOKIE = 71  # Linux 5.14+
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75

# The clock of bpf_ktime_get_coarse_ns() (flow entries' last_seen); Python's time module lacks the name.
CLOCK_MONOTONIC_COARSE = 6
