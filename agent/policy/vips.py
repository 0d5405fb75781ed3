"""Service addresses (VIPs) for published apps: allocated once, kept across revisions.

Each published app gets one address per family it has addresses in, from the policy's
`fabric: service_addresses` pools, distinct per app. The allocation is part of the compiled
bundle (`Bundle.vips`, app name -> [addresses]) and is carried from one revision to the next:
`allocate(..., previous=old_bundle.vips)` keeps every address an app already had, as long as it
is still published and the address still lies in a pool. New apps take a free address at a
place derived from their name (sha256, then the next free one), so even without the previous
allocation (a first publish, a lost state) an app's address does not depend on the apps before
it in the file: adding or removing an unrelated app moves nobody.

The first address of an IPv4 pool (its network address) and the last (broadcast) are never
given out, nor the first address of an IPv6 pool (the subnet-router anycast address).
"""
from __future__ import annotations

import hashlib
import ipaddress
from typing import Iterable, Optional


def _usable(pool) -> tuple[int, int]:
    """[first, last] integer bounds of the addresses a pool gives out."""
    lo, hi = int(pool.network_address), int(pool.broadcast_address)
    return (lo + 1, hi - 1) if pool.version == 4 else (lo + 1, hi)


def allocate(apps: Iterable[tuple[str, set[int]]], pools: list, previous: Optional[dict] = None) -> dict[str, list[str]]:
    """{app name: [vip, ...]} for `apps`: (name, families it needs) in file order.

    `pools` are ip_network objects; the first pool of a family is used first, the next when it is
    full. Raises ValueError when a family's pools are exhausted (validation counts first)."""
    previous = previous or {}
    apps = list(apps)
    by_family: dict[int, list] = {}
    for p in pools:
        by_family.setdefault(p.version, []).append(p)
    taken: set[tuple[int, int]] = set()
    out: dict[str, list[str]] = {name: [] for name, _ in apps}
    want: list[tuple[str, int]] = []
    # Pass 1: keep what each app had (if still valid and not claimed by an earlier app).
    for name, families in apps:
        kept = {}
        for text in previous.get(name, []):
            try:
                addr = ipaddress.ip_address(text)
            except ValueError:
                continue
            if addr.version in families and addr.version not in kept and (addr.version, int(addr)) not in taken:
                if any(_usable(p)[0] <= int(addr) <= _usable(p)[1] for p in by_family.get(addr.version, [])):
                    kept[addr.version] = addr
                    taken.add((addr.version, int(addr)))
        for fam in sorted(families):
            if fam in kept:
                out[name].append(str(kept[fam]))
            elif by_family.get(fam):
                want.append((name, fam))
    # Pass 2: new ones, at a place derived from the name, then the next free address.
    for name, fam in want:
        addr = _place(name, fam, by_family[fam], taken)
        taken.add((fam, addr))
        out[name].append(str(ipaddress.ip_address(addr) if fam == 6 else ipaddress.IPv4Address(addr)))
    for name in out:
        out[name].sort(key=lambda t: ipaddress.ip_address(t).version)
    return {name: vips for name, vips in out.items() if vips}


def _place(name: str, fam: int, pools: list, taken: set[tuple[int, int]]) -> int:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    for pool in pools:
        lo, hi = _usable(pool)
        size = hi - lo + 1
        start = h % size
        # The walk is bounded by what is taken in this pool, not by the pool's size.
        for i in range(size):
            addr = lo + (start + i) % size
            if (fam, addr) not in taken:
                return addr
    raise ValueError(f"the IPv{fam} service_addresses pools are full")
