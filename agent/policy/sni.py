"""Server names as the kernel hashes them (bpf/include/tls.h).

The XDP parser never buffers a name: it hashes it byte by byte as it
streams past, lowercased, with a trailing dot taken back out. Its wildcard
form is "*" followed by everything from the first dot, so a pattern
`*.example.internal` matches exactly one left-most label. The compiler
hashes policy names the same way; tests/bpf checks the two agree.
"""
from __future__ import annotations

FNV64_BASIS = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3
FNV32_BASIS = 0x811C9DC5
FNV32_PRIME = 0x01000193
M64 = (1 << 64) - 1
M32 = (1 << 32) - 1


def fnv1a64(data: bytes) -> int:
    h = FNV64_BASIS
    for b in data:
        h = ((h ^ b) * FNV64_PRIME) & M64
    return h


def fnv1a32(data: bytes) -> int:
    h = FNV32_BASIS
    for b in data:
        h = ((h ^ b) * FNV32_PRIME) & M32
    return h


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


def name_hashes(pattern: str | bytes) -> tuple[int, int]:
    """(64-bit key hash, 32-bit check) of a policy hostname or wildcard pattern."""
    n = normalize(pattern)
    return fnv1a64(n), fnv1a32(n)


def matches(pattern: str, name: str) -> bool:
    """Does hostname pattern (exact or `*.rest`) match a concrete server name?"""
    p, n = normalize(pattern), normalize(name)
    if p.startswith(b"*."):
        return wildcard_form(n) == p
    return p == n
