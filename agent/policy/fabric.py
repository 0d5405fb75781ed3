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

import base64
import binascii
import ipaddress
from typing import Any, Optional

from bulkhead.policy.loader import YMap, YSeq, type_name
from bulkhead.policy.model import Fabric, Loc, Route
from bulkhead.policy.schema import (
    DNS_TTL_DEFAULT,
    DNS_TTL_MAX,
    FABRIC_KEYS,
    MAX_TRANSIT_APPS,
    ROUTE_KEYS,
    TRANSIT_PORT_DEFAULT,
    WIREGUARD_KEYS,
)

# The smallest pool worth having, and the largest we enumerate (allocation walks free addresses).
POOL_MIN_PREFIX = {4: 30, 6: 126}
POOL_MAX_ADDRESSES = 1 << 24


class FabricChecks:
    fabric: Optional[Fabric] = None
    fabric_loc: Optional[Loc] = None
    fabric_transit_only = False  # `fabric:` sets only transit_port: no pools, no DNS

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
        self.fabric_transit_only = set(f) == {"transit_port"}
        pools = []
        # A fabric that only sets the transit's port needs no pools; any other fabric has them.
        if "service_addresses" not in f and not self.fabric_transit_only:
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
        port, port_loc = TRANSIT_PORT_DEFAULT, None
        if "transit_port" in f:
            v, port_loc = f["transit_port"], f.loc("transit_port")
            if type(v) is int and 1 <= v <= 65535:
                port = v
            else:
                self.error(port_loc, f"fabric: transit_port must be an integer UDP port from 1 to 65535 (default "
                                     f"{TRANSIT_PORT_DEFAULT}), got {type_name(v)}")
        self.fabric = Fabric(pools, upstream, ttl, loc, port, port_loc)

    def gateway_wireguard(self, m: YMap, label: str) -> Optional[dict]:
        """A gateway's `wireguard: {public_key: BASE64, endpoint: ADDR:PORT}`; reports and returns
        None when it is not that. {"public_key", "endpoint", "address" (ip_address), "port"}."""
        w, loc = m["wireguard"], m.loc("wireguard")
        if not isinstance(w, YMap):
            self.error(loc, f"{label}: wireguard must be a mapping with keys {', '.join(WIREGUARD_KEYS)}, "
                            f"got {type_name(w)}")
            return None
        self.check_keys(w, WIREGUARD_KEYS, f"{label}: wireguard")
        ok = True
        key = self.string(w, "public_key", f"{label}: wireguard")
        if key is not None:
            try:
                raw = base64.b64decode(key, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(key) != 44 or len(raw) != 32:
                self.error(w.loc("public_key"), f"{label}: wireguard: public_key must be a WireGuard public "
                                                "key: 44 characters of base64 (32 bytes), as `wg pubkey` "
                                                "prints it")
                ok = False
        else:
            ok = False
        ep = self.string(w, "endpoint", f"{label}: wireguard")
        addr = port = None
        if ep is not None:
            host, sep, port_text = ep.rpartition(":")
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            try:
                addr = ipaddress.ip_address(host) if sep else None
                port = int(port_text) if port_text.isdigit() else None
            except ValueError:
                addr = None
            if addr is None or port is None or not 1 <= port <= 65535:
                self.error(w.loc("endpoint"), f"{label}: wireguard: endpoint must be ADDRESS:PORT (IPv6: "
                                              f"[ADDRESS]:PORT), the gateway's underlay address and "
                                              f"WireGuard listen port, got {ep!r}")
                ok = False
        else:
            ok = False
        if not ok:
            return None
        text = f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
        return {"public_key": key, "endpoint": text, "address": addr, "port": port}

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

    def segment_transit_snat(self, m: YMap, label: str) -> tuple[list[Any], Optional[Loc]]:
        """`transit_snat: ADDR` or `[ADDR, ADDR]`: at most one IPv4 and one IPv6 host address."""
        if "transit_snat" not in m:
            return [], None
        loc = m.loc("transit_snat")
        items = [(m["transit_snat"], loc)] if isinstance(m["transit_snat"], str) else \
            self.string_list(m, "transit_snat", label, "addresses") or []
        out: list[Any] = []
        for text, item_loc in items:
            addr = self.host_address(text, item_loc, f"{label}: transit_snat")
            if addr is None:
                continue
            if any(a.version == addr.version for a in out):
                self.error(item_loc, f"{label}: transit_snat has two IPv{addr.version} addresses: give at most "
                                     "one of each family (the address flows from other gateways take here)")
                continue
            out.append(addr)
        return out, loc

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

    def app_routes(self, m: YMap, label: str) -> Optional[list[Route]]:
        """A router's `routes:` list: {sni: NAME, to: APP} or {host: NAME, path: /PREFIX, to: APP}."""
        seq = m["routes"]
        if not isinstance(seq, YSeq) or not seq:
            self.error(m.loc("routes"), f"{label}: routes must be a non-empty list of {{sni: NAME, to: APP}} "
                                        f"or {{host: NAME, path: /PREFIX, to: APP}}, got {type_name(seq)}")
            return []
        out, seen = [], {}
        for i, r in enumerate(seq):
            where = seq.loc(i)
            if not isinstance(r, YMap):
                self.error(where, f"{label}: each route must be a mapping with keys {', '.join(ROUTE_KEYS)}, "
                                  f"got {type_name(r)}")
                continue
            what = f"{label} route #{i + 1}"
            self.check_keys(r, ROUTE_KEYS, what)
            kinds = [k for k in ("sni", "host") if k in r]
            if len(kinds) != 1:
                self.error(where, f"{what}: give exactly one of sni (TLS, by server name) or host (HTTP, by "
                                  "Host header)")
                continue
            kind = kinds[0]
            text = self.string(r, kind, what)
            name = self.hostname(text, r.loc(kind), what) if text is not None else None
            path = None
            if "path" in r:
                path = self.string(r, "path", what)
                if kind == "sni":
                    self.error(r.loc("path"), f"{what}: path needs host: a TLS route sees only the server "
                                              "name (the request is encrypted)")
                elif path is not None and (not path.startswith("/") or any(c in path for c in " \t?#")):
                    self.error(r.loc("path"), f"{what}: path must be a prefix starting with '/' without "
                                              f"spaces, '?' or '#', got {path!r}")
            to = self.string(r, "to", what)
            if name is None:
                continue
            key = (kind, name, path)
            if key in seen:
                self.error(where, f"{what}: the same {kind} {name}{' ' + path if path else ''} is already "
                                  f"routed at {seen[key]}")
                continue
            seen[key] = where
            out.append(Route(kind, name, path, to, where))
        return out

    def families(self, app) -> set[int]:
        """The address families an app (a router: its backends) can get service addresses in: those
        it has a host address (/32, /128) in, the one its service address translates to."""
        if app.routes is None:
            return {a.network.version for a in app.addresses if a.network.num_addresses == 1}
        out = set()
        for r in app.routes:
            dst = self.apps.get(r.to) if r.to else None
            if dst is not None and dst.routes is None:
                out |= {a.network.version for a in dst.addresses if a.network.num_addresses == 1}
        return out

    def check_routers(self) -> None:
        """A router (an app with routes) is a service address and its routes, nothing more."""
        for app in self.apps.values():
            if app.routes is None:
                continue
            label = f"app {app.name}"
            for key, present in (("addresses", app.addresses), ("hostnames", app.hostnames),
                                 ("tls", app.tls), ("segment", app.segment)):
                if present:
                    self.error(app.routes_loc, f"{label}: a router (an app with routes) has no {key}: its "
                                               "backends have them")
            if not app.publish and not self.load_failed:
                self.error(app.routes_loc, f"{label}: a router needs publish: [NAME, ...]: the names that "
                                           "resolve to its service address")
            if not app.ports or any(p.proto != "tcp" for p in app.ports):
                self.error(app.routes_loc, f"{label}: a router needs ports, TCP only (e.g. [tcp/443, "
                                           "tcp/80]): the ports its service address accepts")
            for route in app.routes:
                if route.to is None or self.load_failed:
                    continue
                dst = self.apps.get(route.to)
                if dst is None:
                    self.error(route.loc, f"{label}: route to {self.undefined('app', route.to, self.apps)}")
                elif dst.routes is not None:
                    self.error(route.loc, f"{label}: route to {dst.name}, another router: a route leads to "
                                          "an app with addresses")
                elif not any(a.network.num_addresses == 1 for a in dst.addresses):
                    self.error(route.loc, f"{label}: route to {dst.name}: the app needs a host address "
                                          "(/32 or /128) to connect to")
        routers = {a.name for a in self.apps.values() if a.routes is not None}
        for rule in self.rules.values():
            if rule.dst in routers:
                self.error(rule.to_loc, f"rule {rule.name}: to: {rule.dst} is a router: write rules to its "
                                        "backends (the route and the rule are decided together)")
            if rule.src in routers:
                self.error(rule.from_loc, f"rule {rule.name}: from: {rule.src} is a router: it has no "
                                          "addresses to send from")

    # ----------------------------------------------------------- meaning --

    def check_fabric(self) -> None:
        self.check_routers()
        self.check_transit()
        self.check_router_gateways()
        fab = self.fabric
        # a transit-only fabric (no service_addresses) has no DNS and no service addresses
        no_pools = (self.fabric_loc is None or self.fabric_transit_only) and not self.load_failed
        for seg in self.segments.values():
            if seg.dns_loc is not None and no_pools:
                self.error(seg.dns_loc, f"segment {seg.name}: dns needs the fabric: add a top-level "
                                        "`fabric:` with service_addresses (docs/fabric.md)")
        published = [a for a in self.apps.values() if a.publish]
        for app in published:
            label = f"app {app.name}"
            if no_pools:
                self.error(app.publish_loc, f"{label}: publish needs the fabric: add a top-level `fabric:` "
                                            "with service_addresses (docs/fabric.md)")
            if not app.dns_names:
                self.error(app.publish_loc, f"{label}: publish: true needs hostnames (the names DNS answers "
                                            "for it), or give the names: publish: [NAME, ...]")
            families = self.families(app)
            if not families and app.routes is None:
                self.error(app.publish_loc, f"{label}: publish needs a host address (/32 or /128) to "
                                            "translate the service address to")
            elif families and fab is not None and fab.service_addresses:
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
            need = sum(1 for a in published if pool.version in self.families(a))
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

    def check_transit(self) -> None:
        """Gateways' `transit:` addresses and `fabric: transit_port` (docs/fabric.md)."""
        with_transit = [g for g in self.gateways.values() if g.transit is not None]
        fab = self.fabric
        if fab is not None and fab.transit_port_loc is not None and not with_transit and not self.load_failed:
            self.error(fab.transit_port_loc, "fabric: transit_port needs a gateway with transit: give the "
                                             "gateways `transit: ADDRESS` (the address other gateways reach "
                                             "each at), or leave transit_port out")
        if not with_transit:
            self.check_wireguard(with_transit)
            self.check_transit_snat(with_transit)
            return
        first = with_transit[0]
        seen: dict[Any, Any] = {}
        for g in with_transit:
            label = f"gateway {g.name}: transit {g.transit}"
            if g.transit.version != first.transit.version:
                self.error(g.transit_loc, f"{label} is IPv{g.transit.version} but gateway {first.name}'s "
                                          f"({first.transit_loc}) is IPv{first.transit.version}: the transit "
                                          "addresses of a policy are all of one family")
            elif g.transit in seen:
                other = seen[g.transit]
                self.error(g.transit_loc, f"{label} is already gateway {other.name}'s ({other.transit_loc}): "
                                          "each gateway has its own transit address")
            seen.setdefault(g.transit, g)
            for pool in fab.service_addresses if fab is not None else []:
                if g.transit.version == pool.version and g.transit in pool:
                    self.error(g.transit_loc, f"{label} is inside fabric service_addresses {pool}: service "
                                              "addresses are the gateways' virtual ones, the transit address "
                                              "is a real address of the gateway's underlay")
            for app in self.apps.values():
                for addr in app.addresses:
                    if g.transit.version == addr.network.version and g.transit in addr.network:
                        self.error(g.transit_loc, f"{label} is inside app {app.name}'s address {addr} "
                                                  f"({addr.loc}): the transit address is the gateway's own, "
                                                  "no app's")
        self.check_wireguard(with_transit)
        self.check_transit_snat(with_transit)
        if len(self.apps) > MAX_TRANSIT_APPS:
            app = list(self.apps.values())[MAX_TRANSIT_APPS]
            self.error(app.loc, f"app {app.name}: too many apps for the transit (at most {MAX_TRANSIT_APPS}: "
                                "an app id travels between gateways as the 16-bit VXLAN group id)")

    def check_transit_snat(self, with_transit) -> None:
        """A segment's `transit_snat` needs its gateway to have transit; no service address."""
        names = {g.name for g in with_transit}
        pools = self.fabric.service_addresses if self.fabric is not None else []
        for seg in self.segments.values():
            if seg.transit_snat_loc is None:
                continue
            label = f"segment {seg.name}: transit_snat"
            if seg.gateway not in names:
                self.error(seg.transit_snat_loc, f"{label} needs the segment's gateway to have transit: give "
                                                 "the segment `gateway: NAME` of a gateway with `transit: "
                                                 "ADDRESS` (flows from other gateways are what it translates)")
            for a in seg.transit_snat:
                if any(a in p for p in pools if p.version == a.version):
                    self.error(seg.transit_snat_loc, f"{label} {a} is inside fabric service_addresses: it is "
                                                     "a real address of the gateway in the segment")

    def check_wireguard(self, with_transit) -> None:
        """`wireguard:` on every gateway with transit or on none; endpoints distinct."""
        for g in self.gateways.values():
            if g.wireguard_loc is not None and g.transit is None:
                self.error(g.wireguard_loc, f"gateway {g.name}: wireguard needs transit: the transit address "
                                            "is what lives on the WireGuard interface")
        wg = [g for g in with_transit if g.wireguard_loc is not None]
        if wg and len(wg) != len(with_transit):
            missing = ", ".join(g.name for g in with_transit if g.wireguard_loc is None)
            self.error(wg[0].wireguard_loc, f"gateway {wg[0].name}: wireguard is on some gateways with transit "
                                            f"but not on {missing}: encrypt the transit between every gateway "
                                            "or none (give each `wireguard: {public_key, endpoint}`)")
        seen: dict[str, Any] = {}
        keys: dict[str, Any] = {}
        for g in wg:
            w = g.wireguard
            if w is None:
                continue
            if w["endpoint"] in seen:
                self.error(g.wireguard_loc, f"gateway {g.name}: wireguard endpoint {w['endpoint']} is already "
                                            f"gateway {seen[w['endpoint']].name}'s: each gateway has its own")
            seen.setdefault(w["endpoint"], g)
            if w["public_key"] in keys:
                self.error(g.wireguard_loc, f"gateway {g.name}: wireguard public_key is already gateway "
                                            f"{keys[w['public_key']].name}'s: each gateway has its own key")
            keys.setdefault(w["public_key"], g)
            if g.transit is not None and w["address"] == g.transit:
                self.error(g.wireguard_loc, f"gateway {g.name}: wireguard endpoint {w['endpoint']} is its "
                                            "transit address: the endpoint is the underlay address, the "
                                            "transit address lives on the WireGuard interface")

    def check_router_gateways(self) -> None:
        """Not yet: a router's verifier runs on its client's gateway and connects to the backend from
        there, so every backend must be behind the gateway of each of its clients."""
        if not self.gateways or self.load_failed:
            return
        routers = [a for a in self.apps.values() if a.routes is not None]
        if not routers:
            return
        first_allow: dict[str, dict[str, str]] = {}  # backend -> {client app: rule name}
        for rule in self.rules.values():
            if rule.action == "allow" and rule.src in self.apps and rule.dst in self.apps:
                first_allow.setdefault(rule.dst, {}).setdefault(rule.src, rule.name)
        default_allow = self.settings.default_action == "allow"
        for r_app in routers:
            for route in r_app.routes:
                backend = self.apps.get(route.to) if route.to else None
                if backend is None or backend.routes is not None:
                    continue  # reported by check_routers
                b_gw = self.gateway_of(backend)
                if b_gw is None:
                    continue
                clients = dict(first_allow.get(backend.name, {}))
                if default_allow:
                    for a in self.apps.values():
                        if a.routes is None and a.addresses:
                            clients.setdefault(a.name, "")
                for name, rule in clients.items():
                    c_gw = self.gateway_of(self.apps[name])
                    if c_gw is not None and c_gw != b_gw:
                        why = f"by rule {rule}" if rule else "by settings.default_action: allow"
                        self.error(route.loc, f"app {r_app.name}: route to {backend.name}: not yet: a router's "
                                              f"backend behind another gateway than its client: {backend.name} "
                                              f"is behind gateway {b_gw} and app {name} (a client {why}) "
                                              f"behind {c_gw}; the router's verifier connects from the "
                                              "client's gateway")
                        break
