"""Validation of the fabric's keys: `fabric:`, a segment's `dns:`, an app's `publish:`.

A mixin of validate._Builder, like checks.CrossChecks: `add_fabric`, `segment_dns` and
`app_publish` run in the first pass (shape), `check_fabric` in the second (meaning). The
reference is docs/fabric.md.

    fabric:
      service_addresses: [198.19.255.0/24, "fd00:ff::/120"]   # the VIP pools
      upstream_dns: [198.18.200.53]                          # optional
      dns_ttl: 30                                            # optional
    segments:
      - {name: prod, interfaces: [bh-prod], dns: [198.18.1.1]}
    apps:
      - {name: payments, segment: core, addresses: [198.19.0.10/32],
         hostnames: [payments.apps.example], publish: true}
"""
from __future__ import annotations

import ipaddress
from typing import Any, Optional

from bulkhead.policy.loader import YMap, YSeq, type_name
from bulkhead.policy.model import Fabric, Loc
from bulkhead.policy.schema import DNS_TTL_DEFAULT, DNS_TTL_MAX, FABRIC_KEYS

# The smallest pool worth having, and the largest we enumerate (allocation walks free addresses).
POOL_MIN_PREFIX = {4: 30, 6: 126}
POOL_MAX_ADDRESSES = 1 << 24


class FabricChecks:
    fabric: Optional[Fabric] = None
    fabric_loc: Optional[Loc] = None

    # ------------------------------------------------------------- shape --

    def add_fabric(self, doc: YMap) -> None:
        loc = doc.loc("fabric")
        if self.fabric_loc is not None:
            self.error(loc, f"fabric is already set at {self.fabric_loc}: with several files, "
                            "write fabric in only one of them")
            return
        self.fabric_loc = loc
        f = doc["fabric"]
        if not isinstance(f, YMap):
            self.error(loc, f"fabric must be a mapping with keys {', '.join(FABRIC_KEYS)}, got {type_name(f)}")
            return
        self.check_keys(f, FABRIC_KEYS, "fabric")
        pools = []
        if "service_addresses" not in f:
            self.error(loc, "fabric: service_addresses is required: the pools the gateways take service "
                            "addresses (VIPs) from, e.g. [198.19.255.0/24, \"fd00:ff::/120\"]")
        for text, item_loc in self.string_list(f, "service_addresses", "fabric", "CIDRs") or []:
            net = self.address(text, item_loc, "fabric: service_addresses")
            if net is None:
                continue
            if net.prefixlen > POOL_MIN_PREFIX[net.version]:
                self.error(item_loc, f"fabric: service_addresses: {net} is too small for a pool: at least "
                                     f"/{POOL_MIN_PREFIX[net.version]} for IPv{net.version}")
                continue
            if any(net.overlaps(p) for p in pools):
                self.error(item_loc, f"fabric: service_addresses: {net} overlaps another pool")
                continue
            pools.append(net)
        upstream = []
        for text, item_loc in self.string_list(f, "upstream_dns", "fabric", "addresses",
                                               "REFUSED for names outside the fabric") or []:
            addr = self.host_address(text, item_loc, "fabric: upstream_dns")
            if addr is not None:
                upstream.append(addr)
        ttl = DNS_TTL_DEFAULT
        if "dns_ttl" in f:
            v = f["dns_ttl"]
            if type(v) is int and 0 <= v <= DNS_TTL_MAX:
                ttl = v
            else:
                self.error(f.loc("dns_ttl"), f"fabric: dns_ttl must be an integer number of seconds from 0 "
                                             f"to {DNS_TTL_MAX}, got {type_name(v)}")
        self.fabric = Fabric(pools, upstream, ttl, loc)

    def host_address(self, text: str, loc: Loc, label: str):
        """One address (not a network); reports and returns None otherwise."""
        try:
            return ipaddress.ip_address(text)
        except ValueError:
            self.error(loc, f"{label}: {text!r} is not an IPv4 or IPv6 address (one address, no /prefix)")
            return None

    def segment_dns(self, m: YMap, label: str) -> tuple[list[Any], Optional[Loc]]:
        if "dns" not in m:
            return [], None
        out = []
        for text, loc in self.string_list(m, "dns", label, "addresses") or []:
            addr = self.host_address(text, loc, f"{label}: dns")
            if addr is not None and addr not in out:
                out.append(addr)
        return out, m.loc("dns")

    def app_publish(self, m: YMap, label: str) -> tuple[bool, Optional[list[str]], Optional[Loc]]:
        """(published, its DNS names or None for its hostnames, where)."""
        if "publish" not in m:
            return False, None, None
        v, loc = m["publish"], m.loc("publish")
        if isinstance(v, bool):
            return v, None, loc
        if isinstance(v, YSeq):
            names = []
            for text, item_loc in self.string_list(m, "publish", label, "DNS names") or []:
                host = self.hostname(text, item_loc, f"{label}: publish")
                if host is not None and host not in names:
                    names.append(host)
            return True, names, loc
        self.error(loc, f"{label}: publish must be true (its hostnames) or a list of DNS names, "
                        f"got {type_name(v)}")
        return False, None, loc

    # ----------------------------------------------------------- meaning --

    def check_fabric(self) -> None:
        fab = self.fabric
        for seg in self.segments.values():
            if seg.dns_loc is not None and self.fabric_loc is None and not self.load_failed:
                self.error(seg.dns_loc, f"segment {seg.name}: dns needs the fabric: add a top-level "
                                        "`fabric:` with service_addresses (docs/fabric.md)")
        published = [a for a in self.apps.values() if a.publish]
        for app in published:
            label = f"app {app.name}"
            if self.fabric_loc is None and not self.load_failed:
                self.error(app.publish_loc, f"{label}: publish needs the fabric: add a top-level `fabric:` "
                                            "with service_addresses (docs/fabric.md)")
            if not app.dns_names:
                self.error(app.publish_loc, f"{label}: publish: true needs hostnames (the names DNS answers "
                                            "for it), or give the names: publish: [NAME, ...]")
            if not app.addresses:
                self.error(app.publish_loc, f"{label}: publish needs addresses: a service address is "
                                            "translated to the app's own address")
            elif fab is not None and fab.service_addresses:
                families = {a.network.version for a in app.addresses}
                pools = {p.version for p in fab.service_addresses}
                if not families & pools:
                    fam = "/".join(f"IPv{v}" for v in sorted(families))
                    self.error(app.publish_loc, f"{label}: publish: the app has only {fam} addresses and "
                                                f"fabric: service_addresses has no {fam} pool")
        if fab is None:
            return
        # Pools are the gateways' own: no app address and no DNS address may be in one.
        for app in self.apps.values():
            for addr in app.addresses:
                for pool in fab.service_addresses:
                    if addr.network.version == pool.version and addr.network.overlaps(pool):
                        self.error(addr.loc, f"app {app.name}: {addr} overlaps fabric service_addresses "
                                             f"{pool}: service addresses belong to the gateways")
        for seg in self.segments.values():
            for a in seg.dns:
                if any(a in p for p in fab.service_addresses if p.version == a.version):
                    self.error(seg.dns_loc, f"segment {seg.name}: dns {a} is inside fabric service_addresses")
        for pool in fab.service_addresses:
            need = sum(1 for a in published if any(x.network.version == pool.version for x in a.addresses))
            have = min(pool.num_addresses, POOL_MAX_ADDRESSES) - (2 if pool.version == 4 else 1)
            if need > have:
                self.error(fab.loc, f"fabric: service_addresses {pool} has {have} usable addresses for "
                                    f"{need} published IPv{pool.version} apps")
        # A published name is one app's: DNS must answer it with one service address.
        owner: dict[str, str] = {}
        for app in published:
            for host in app.dns_names:
                if host in owner and owner[host] != app.name:
                    self.error(app.publish_loc, f"app {app.name}: publish: hostname {host} is also published "
                                                f"by app {owner[host]}; a published name belongs to one app")
                owner.setdefault(host, app.name)
