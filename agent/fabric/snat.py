"""Source translation at the far gateway (docs/fabric.md "Source translation at the far gateway"):
the apply-time check of a segment's `transit_snat` addresses.

Flows from other gateways enter the segment from its `transit_snat` address and the servers answer
to it, so it must be an address of this gateway on one of the segment's interfaces (the kernel
answers ARP and neighbour solicitations for it; the datapath takes the replies before the stack).
A missing one fails the apply, and the running policy stays, as a missing DNS address does.
"""
from __future__ import annotations

import ipaddress


class SnatError(RuntimeError):
    pass


def interface_addresses(ifnames: list[str]) -> dict[str, set]:
    """ifname -> the addresses on it (ip_address objects), for the interfaces that exist."""
    from pyroute2 import IPRoute  # imported late: unit tests import this module without it

    out: dict[str, set] = {}
    with IPRoute() as ipr:
        for name in ifnames:
            idx = ipr.link_lookup(ifname=name)
            if not idx:
                continue
            out[name] = {ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=idx[0])}
    return out


def check(bundle, addresses=interface_addresses) -> None:
    """Raise SnatError unless every transit_snat address of the bundle's segments (this gateway's,
    once cut) is on one of its segment's interfaces."""
    missing = []
    for seg in bundle.segments:
        want = seg.get("transit_snat") or []
        if not want:
            continue
        have = addresses(list(seg["interfaces"]))
        on = set().union(*have.values()) if have else set()
        for a in want:
            if ipaddress.ip_address(a) not in on:
                missing.append(f"segment {seg['name']}: transit_snat {a} is on none of its interfaces "
                               f"({', '.join(seg['interfaces'])}): add it to one (ip addr add {a}/PREFIX dev "
                               f"{seg['interfaces'][0]}); servers answer flows from other gateways to it")
    if missing:
        raise SnatError("; ".join(missing))
