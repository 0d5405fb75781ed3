"""Server names as the kernel hashes them (bpf/include/sni_hash.h).

The XDP parser never buffers a name: it hashes it as it streams past,
lowercased, with a trailing dot left out. A name's key is a 64-bit hash over
its 8-byte little-endian words (the last one zero-padded), then its length
and a finalizer. "*.rest" patterns match exactly one left-most label: they
are stored under the hash of `rest` with another seed, and the kernel looks
a concrete name up under the hash of what follows its first dot. The
compiler hashes policy names the same way; tests/bpf checks the two agree.
"""
from __future__ import annotations

M64 = (1 << 64) - 1
SEED_NAME = 0x243F6A8885A308D3
SEED_REST = 0x13198A2E03707344
K1 = 0x9E3779B97F4A7C15
K2 = 0xBF58476D1CE4E5B9
K3 = 0x94D049BB133111EB


def word_hash(data: bytes, seed: int) -> int:
    """The kernel's name hash (sni_hash.h: bh_nh_word per word, bh_nh_final)."""
    h = seed
    for i in range(0, len(data), 8):
        w = int.from_bytes(data[i:i + 8], "little")  # a short last word is zero-padded
        h = ((h ^ w) * K1) & M64
        h ^= h >> 29
    h ^= len(data)
    h ^= h >> 30
    h = (h * K2) & M64
    h ^= h >> 27
    h = (h * K3) & M64
    return h ^ (h >> 31)


def normalize(name: str | bytes) -> bytes:
    """ASCII-lowercase, one trailing dot dropped: what the kernel hashes."""
    b = name.encode() if isinstance(name, str) else bytes(name)
    b = bytes(c | 0x20 if 0x41 <= c <= 0x5A else c for c in b)
    return b[:-1] if b.endswith(b".") and len(b) > 1 else b


def wildcard_form(name: str | bytes) -> bytes | None:
    """The "*.rest" form a concrete name is looked up under, or None (no dot)."""
    n = normalize(name)
    dot = n.find(b".")
    return None if dot < 0 else b"*" + n[dot:]


def name_hash(pattern: str | bytes) -> int:
    """The sni_names key hash of a policy hostname: an exact name, or a `*.rest` pattern."""
    n = normalize(pattern)
    if n.startswith(b"*."):
        return word_hash(n[2:], SEED_REST)
    return word_hash(n, SEED_NAME)


def lookup_hashes(name: str | bytes) -> tuple[int, int | None]:
    """What the kernel looks a concrete server name up under: (exact, wildcard or None)."""
    n = normalize(name)
    dot = n.find(b".")
    return word_hash(n, SEED_NAME), (None if dot < 0 else word_hash(n[dot + 1:], SEED_REST))


def matches(pattern: str, name: str) -> bool:
    """Does hostname pattern (exact or `*.rest`) match a concrete server name?"""
    p, n = normalize(pattern), normalize(name)
    if p.startswith(b"*."):
        return wildcard_form(n) == p
    return p == n
