"""Port specs (`tcp/443`, `udp/53`, `tcp/8000-8100`, `sctp/9`, `icmp`) and port sets.

The policy trie matches (protocol, destination port) by longest prefix, so a
port range must become aligned power-of-two blocks (`range_to_blocks`), and
a rule's effective match is the intersection of its own ports with its
destination app's ports (`intersect`). Both live here so the compiler only
has to think about precedence.

A port set is either `None` — every protocol and every port, what a rule or
app without `ports:` means — or a dict `{proto number: intervals}` where
intervals are sorted, disjoint, non-adjacent `(lo, hi)` tuples. Protocols
without ports (ICMP, ICMPv6) always hold `WHOLE_PROTOCOL`, so intersecting
them needs no special case.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional

from bulkhead.core.names import proto_name

# Protocol keyword -> IP protocol numbers. `icmp` names both families' ICMP
# because an app's addresses may be IPv4 and IPv6 at once, and a user who
# allows "ping" means both.
PROTOCOLS: dict[str, tuple[int, ...]] = {
    "tcp": (6,),
    "udp": (17,),
    "sctp": (132,),
    "icmp": (1, 58),
}
# Protocols matched as a whole (prefixlen 72): they have no destination port.
PORTLESS = frozenset({1, 58})

PORT_MIN, PORT_MAX = 1, 65535
PORT_BITS = 16
# Marker interval for a portless protocol: "all of it". Port 0 is included so
# that intersecting two of these stays non-empty.
WHOLE_PROTOCOL: tuple[tuple[int, int], ...] = ((0, 65535),)

Intervals = tuple[tuple[int, int], ...]
PortSet = Optional[dict[int, Intervals]]

SPEC_FORMS = "tcp/PORT, udp/PORT, sctp/PORT, PROTO/LOW-HIGH or icmp"
_SPEC_RE = re.compile(r"^(tcp|udp|sctp)/([0-9]+)(?:-([0-9]+))?$")


@dataclasses.dataclass(frozen=True)
class PortSpec:
    """One parsed entry of a `ports:` list; `lo`/`hi` are None for icmp."""

    proto: str
    lo: Optional[int] = None
    hi: Optional[int] = None

    def __str__(self) -> str:
        if self.lo is None:
            return self.proto
        if self.lo == self.hi:
            return f"{self.proto}/{self.lo}"
        return f"{self.proto}/{self.lo}-{self.hi}"


class PortSpecError(ValueError):
    """A port spec string that is not one of SPEC_FORMS; the message says why."""


def parse_port_spec(text: object) -> PortSpec:
    """Parse one port spec, strictly: anything not in SPEC_FORMS is an error.

    Strictness is deliberate: a typo that silently widened a rule to "all
    ports" would turn a narrow allow into a broad one.
    """
    if not isinstance(text, str):
        raise PortSpecError(f"port spec must be a string like tcp/443, got {_describe(text)}")
    return _parse_str(text)


@functools.lru_cache(maxsize=4096)
def _parse_str(text: str) -> PortSpec:
    # Cached: large policies repeat the same few specs (tcp/443) many times,
    # and PortSpec is immutable. Errors raise and are not cached.
    if text == "icmp":
        return PortSpec("icmp")
    m = _SPEC_RE.match(text)
    if not m:
        hint = ""
        if text in ("tcp", "udp", "sctp"):
            hint = f" (for every {text} port write {text}/1-65535)"
        elif text in ("icmpv6", "icmp6"):
            hint = " (icmp already means both ICMP and ICMPv6)"
        raise PortSpecError(f"invalid port spec {text!r}: expected {SPEC_FORMS}{hint}")
    proto, lo_s, hi_s = m.group(1), m.group(2), m.group(3)
    lo = int(lo_s)
    hi = int(hi_s) if hi_s is not None else lo
    for p in (lo, hi):
        if not PORT_MIN <= p <= PORT_MAX:
            raise PortSpecError(f"invalid port spec {text!r}: ports are {PORT_MIN}-{PORT_MAX}")
    if lo > hi:
        raise PortSpecError(f"invalid port spec {text!r}: range start {lo} is above its end {hi}")
    return PortSpec(proto, lo, hi)


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _normalize(intervals: list[tuple[int, int]]) -> Intervals:
    """Sort and merge overlapping or adjacent intervals."""
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def portset(specs: Optional[list[PortSpec]]) -> PortSet:
    """The set of (protocol, port) a `ports:` list means; None = everything."""
    if specs is None:
        return None
    acc: dict[int, list[tuple[int, int]]] = {}
    for spec in specs:
        for proto in PROTOCOLS[spec.proto]:
            if proto in PORTLESS:
                acc.setdefault(proto, []).extend(WHOLE_PROTOCOL)
            else:
                acc.setdefault(proto, []).append((spec.lo, spec.hi))
    return {proto: _normalize(iv) for proto, iv in acc.items()}


def _intersect_intervals(a: Intervals, b: Intervals) -> Intervals:
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def intersect(a: PortSet, b: PortSet) -> PortSet:
    """Intersection of two port sets; an empty dict means nothing matches."""
    if a is None:
        return b
    if b is None:
        return a
    out = {}
    for proto in a.keys() & b.keys():
        iv = _intersect_intervals(a[proto], b[proto])
        if iv:
            out[proto] = iv
    return out


def is_empty(s: PortSet) -> bool:
    return s is not None and not s


def range_to_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """Split [lo, hi] into the fewest aligned power-of-two blocks.

    Returns (start, fixed_bits): the block is every port whose top
    `fixed_bits` of 16 equal those of `start`, i.e. an LPM entry of prefix
    length POLICY_PLEN_PORT_BASE + fixed_bits. Greedy from the left is
    optimal: at each step take the largest block that is aligned at `lo`
    and does not pass `hi`. A 16-bit range needs at most 30 blocks.
    """
    if not 0 <= lo <= hi <= 0xFFFF:
        raise ValueError(f"bad port range {lo}-{hi}")
    blocks = []
    while lo <= hi:
        # Largest alignment of lo (lo == 0 is aligned to everything).
        size = (lo & -lo) if lo else 1 << PORT_BITS
        while lo + size - 1 > hi:
            size >>= 1
        blocks.append((lo, PORT_BITS - (size.bit_length() - 1)))
        lo += size
    return blocks


def format_portset(s: PortSet) -> str:
    """Human form for error messages: 'tcp/443, udp/53' or 'all ports'."""
    if s is None:
        return "all ports"
    parts = []
    for proto in sorted(s):
        name = proto_name(proto)
        if proto in PORTLESS:
            parts.append(name)
            continue
        for lo, hi in s[proto]:
            parts.append(f"{name}/{lo}" if lo == hi else f"{name}/{lo}-{hi}")
    return ", ".join(parts) if parts else "nothing"
