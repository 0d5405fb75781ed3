"""Port specs, port-set intersection and range -> aligned block decomposition."""
from __future__ import annotations

import random

import pytest

from bulkhead.policy.ports import (
    WHOLE_PROTOCOL,
    PortSpec,
    PortSpecError,
    format_portset,
    intersect,
    is_empty,
    parse_port_spec,
    portset,
    range_to_blocks,
)


@pytest.mark.parametrize("text,spec,normal", [
    ("tcp/443", PortSpec("tcp", 443, 443), "tcp/443"),
    ("udp/53", PortSpec("udp", 53, 53), "udp/53"),
    ("tcp/8000-8100", PortSpec("tcp", 8000, 8100), "tcp/8000-8100"),
    ("sctp/2905", PortSpec("sctp", 2905, 2905), "sctp/2905"),
    ("sctp/1-65535", PortSpec("sctp", 1, 65535), "sctp/1-65535"),
    ("tcp/7-7", PortSpec("tcp", 7, 7), "tcp/7"),
    ("tcp/0080", PortSpec("tcp", 80, 80), "tcp/80"),
    ("icmp", PortSpec("icmp"), "icmp"),
])
def test_parse_valid(text, spec, normal):
    assert parse_port_spec(text) == spec
    assert str(spec) == normal


@pytest.mark.parametrize("text,fragment", [
    ("tcp/0", "ports are 1-65535"),
    ("udp/65536", "ports are 1-65535"),
    ("tcp/0-10", "ports are 1-65535"),
    ("tcp/10-5", "range start 10 is above its end 5"),
    ("tcp", "tcp/1-65535"),
    ("TCP/443", "invalid port spec 'TCP/443'"),
    ("tcp/ 443", "invalid port spec"),
    ("tcp/443 ", "invalid port spec"),
    ("tcp:443", "invalid port spec"),
    ("icmp/8", "invalid port spec"),
    ("icmpv6", "icmp already means both"),
    ("gre", "invalid port spec 'gre'"),
    ("tcp/-1", "invalid port spec"),
    ("tcp/1-2-3", "invalid port spec"),
    ("", "invalid port spec ''"),
    (443, "must be a string like tcp/443, got int 443"),
    (None, "must be a string"),
])
def test_parse_invalid(text, fragment):
    with pytest.raises(PortSpecError) as e:
        parse_port_spec(text)
    assert fragment in str(e.value)


def test_portset_merges_and_expands_icmp():
    s = portset([parse_port_spec(t) for t in ("tcp/10-20", "tcp/21-30", "tcp/5", "udp/53", "icmp")])
    assert s == {6: ((5, 5), (10, 30)), 17: ((53, 53),), 1: WHOLE_PROTOCOL, 58: WHOLE_PROTOCOL}
    assert portset(None) is None


@pytest.mark.parametrize("a,b,expect", [
    (None, None, None),
    (None, ["tcp/443"], "tcp/443"),
    (["tcp/443"], None, "tcp/443"),
    (["tcp/1-100", "udp/53"], ["tcp/50-200"], "tcp/50-100"),
    (["tcp/1-10", "tcp/20-30"], ["tcp/5-25"], "tcp/5-10, tcp/20-25"),
    (["icmp"], ["icmp", "tcp/1"], "icmp, icmpv6"),
    (["icmp"], ["tcp/443"], "nothing"),
    (["tcp/22"], ["tcp/443"], "nothing"),
])
def test_intersect(a, b, expect):
    def ps(x):
        return None if x is None else portset([parse_port_spec(t) for t in x])
    got = intersect(ps(a), ps(b))
    assert format_portset(got) == ("all ports" if expect is None else expect)
    assert is_empty(got) == (expect == "nothing")


def _block_ports(start, bits):
    size = 1 << (16 - bits)
    assert start % size == 0, "block not aligned"
    return range(start, start + size)


def _minimal_count(lo, hi):
    """Reference: fewest aligned blocks, by dynamic programming over [lo, hi]."""
    best = {hi + 1: 0}
    for p in range(hi, lo - 1, -1):
        options = []
        size = 1
        while size <= 1 << 16 and p % size == 0 and p + size - 1 <= hi:
            options.append(1 + best[p + size])
            size <<= 1
        best[p] = min(options)
    return best[lo]


@pytest.mark.parametrize("lo,hi", [
    (443, 443), (1, 65535), (0, 65535), (8000, 8100), (1024, 65535), (1, 1023),
    (32768, 65535), (65535, 65535), (1, 2), (3, 4), (1000, 2000),
])
def test_range_to_blocks_exact_and_minimal(lo, hi):
    blocks = range_to_blocks(lo, hi)
    covered = [p for start, bits in blocks for p in _block_ports(start, bits)]
    assert covered == list(range(lo, hi + 1))  # exact, disjoint, in order
    assert len(blocks) == _minimal_count(lo, hi)
    assert len(blocks) <= 30


def test_range_to_blocks_random_ranges():
    rng = random.Random(7)
    for _ in range(300):
        lo = rng.randint(1, 65535)
        hi = rng.randint(lo, min(65535, lo + rng.choice([0, 3, 100, 5000, 65535])))
        blocks = range_to_blocks(lo, hi)
        covered = [p for start, bits in blocks for p in _block_ports(start, bits)]
        assert covered == list(range(lo, hi + 1))
        assert len(blocks) <= 30


def test_full_range_is_one_block_and_known_shapes():
    assert range_to_blocks(0, 65535) == [(0, 0)]
    assert range_to_blocks(443, 443) == [(443, 16)]
    assert range_to_blocks(8000, 8063) == [(8000, 10)]
    assert len(range_to_blocks(1, 65535)) == 16
