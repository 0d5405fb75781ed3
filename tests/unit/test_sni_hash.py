"""The server-name hash of bulkhead.policy.sni (the kernel's twin: tests/bpf checks they agree)."""
from __future__ import annotations

import pytest

from bulkhead.policy import sni


def test_a_name_is_looked_up_under_its_exact_and_rest_hashes():
    exact, wild = sni.lookup_hashes("Api.Example.Internal.")
    assert exact == sni.name_hash("api.example.internal")
    assert wild == sni.name_hash("*.example.internal")
    assert sni.lookup_hashes("localhost") == (sni.name_hash("localhost"), None)


def test_a_pattern_matches_exactly_one_label():
    _, wild = sni.lookup_hashes("a.b.example.internal")
    assert wild != sni.name_hash("*.example.internal")
    assert wild == sni.name_hash("*.b.example.internal")


@pytest.mark.parametrize("a,b", [
    ("abcdefgh", "abcdefgh\0"),          # a zero byte is no padding: the length counts
    ("example.internal", "*.internal"),  # a name and a pattern never share a hash (seeds)
    ("a" * 8, "a" * 16),
    ("x.y", "x.y.z"),
])
def test_distinct_names_hash_apart(a, b):
    assert sni.name_hash(a) != sni.name_hash(b)


def test_word_boundaries():
    """Names of 7, 8, 9, 15, 16, 17 bytes: words and a zero-padded last word."""
    hashes = {sni.name_hash("n" * n) for n in (7, 8, 9, 15, 16, 17)}
    assert len(hashes) == 6
    assert all(0 <= h < 1 << 64 for h in hashes)
