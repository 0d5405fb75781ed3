"""Compile a validated Policy into a Bundle: ids and LPM map entries.

Pure: no kernel, no files. The hard part is the policy trie. The kernel does
one longest-prefix lookup on (src app, dst app, proto, dport) and takes the
entry it finds as the verdict, so precedence (deny beats allow, earlier rule
wins a tie) must be resolved here, before anything is emitted:

- An any-protocol rule is one entry at prefixlen 64: the pair's best
  any-protocol rule.
- For every protocol some rule of the pair names, each port of 1..65535 (or
  the whole protocol, for ICMP) gets the best rule among that protocol's
  rules *and* the any-protocol ones. Runs of ports with the same winner
  become aligned power-of-two blocks (prefixlen 80 + fixed bits).
- Where the winner is the pair's best any-protocol rule, nothing more is
  emitted: the lookup falls back to the prefixlen-64 entry, which says the
  same. This keeps `deny everything, allow tcp/443` at one entry instead of
  thirty, and `allow all, deny tcp/22` at two.

Ports are never longer-prefix-overlapping: for each (pair, protocol) the
emitted port blocks are disjoint, so the longest match is unambiguous.
"""
from __future__ import annotations

import heapq
import ipaddress
from typing import NamedTuple, Optional

from bulkhead.datapath.abi import (
    ACTF_AUDIT,
    APP_ANY,
    FAB_APP,
    FAB_GW,
    FAB_PEER,
    FAB_REAL,
    FAB_SEG,
    FAB_SNAT4,
    FAB_SNAT6,
    FAB_VIP,
    POLICY_PLEN_ANY_PORT,
    POLICY_PLEN_ANY_PROTO,
    POLICY_PLEN_PORT_BASE,
    Action,
)
from bulkhead.policy import ports as portlib
from bulkhead.policy import sni as snilib
from bulkhead.policy import vips as viplib
from bulkhead.policy.bundle import APP_GATEWAY, Bundle
from bulkhead.policy.model import App, Policy, Rule
from bulkhead.policy.schema import TRANSIT_PORT_DEFAULT

# Precedence ranks: higher wins; equal ranks go to the earlier rule.
RANK_DENY = 4  # enforced deny/reject
RANK_AUDIT_DENY = 3  # deny/reject in audit mode: still wins, but only counts
RANK_L7 = 2  # allow with http conditions: the verifier decides
RANK_ALLOW = 1  # allow (or SNI-checked allow)

_ACTIONS = {"allow": Action.ALLOW, "deny": Action.DENY, "reject": Action.REJECT}


class Verdict(NamedTuple):
    """What one rule would do, and how strongly: the unit of precedence."""

    rank: int
    rule_id: int  # 1.. in file order; lower wins a tie
    action: int
    flags: int

    @property
    def key(self) -> tuple[int, int]:
        """Sort key: the smallest key is the winner."""
        return (-self.rank, self.rule_id)


def rule_verdict(rule: Rule, rule_id: int, dst: App, settings_mode: str) -> Verdict:
    """Rank, action and flags of `rule`, following the precedence in docs/policy.md."""
    if rule.action in ("deny", "reject"):
        audit = rule.mode == "audit" or settings_mode == "audit"
        return Verdict(RANK_AUDIT_DENY if audit else RANK_DENY, rule_id,
                       int(_ACTIONS[rule.action]), ACTF_AUDIT if audit else 0)
    if rule.l7:
        return Verdict(RANK_L7, rule_id, int(Action.L7), 0)
    return Verdict(RANK_ALLOW, rule_id, int(Action.ALLOW), 0)


def l4_verdict(rule: Rule, rule_id: int, dst: App, settings_mode: str) -> Verdict:
    """What the (src, dst, proto, port) entry says for `rule`.

    Traffic to an app named by hostnames belongs to it only if the ClientHello
    names it ("where both are given, both must match"), so every rule to such
    an app, allow or deny, becomes an SNI gate: the kernel decides on the
    ClientHello, from the server-name table (sni_entries).
    """
    if dst.hostnames and not rule.l7:
        return Verdict(RANK_ALLOW, rule_id, int(Action.SNI), 0)
    return rule_verdict(rule, rule_id, dst, settings_mode)


def compile_policy(policy: Policy, previous_vips: Optional[dict] = None) -> Bundle:
    """Assign ids in file order and emit every map entry.

    `previous_vips` is the running bundle's `vips`: published apps keep their service addresses."""
    seg_ids = {s.name: i for i, s in enumerate(policy.segments, 1)}
    app_ids = {a.name: i for i, a in enumerate(policy.apps, 1)}
    apps = {a.name: a for a in policy.apps}

    src_entries = [
        (seg_ids[app.segment], addr.addr16, addr.prefixlen128, app_ids[app.name])
        for app in policy.apps
        for addr in app.addresses
    ]

    # Rule destinations, and published apps (not routers): a flow to a service address is a flow
    # to the app, whose real addresses must then be destinations too, even when only
    # settings.default_action reaches it.
    destinations = {rule.dst for rule in policy.rules} | {a.name for a in policy.apps
                                                         if a.publish and a.routes is None}
    dst_entries = [
        (addr.addr16, addr.prefixlen128, app_ids[app.name], seg_ids[app.segment])
        for app in policy.apps
        if app.name in destinations
        for addr in app.addresses
    ]

    # Group each rule's (verdict, match set) by the app pair it governs. A
    # hostname-only app has no address: its pair is (src, APP_ANY).
    pairs: dict[tuple[int, int], list[tuple[Verdict, portlib.PortSet]]] = {}
    named: dict[tuple[int, int], list[tuple[int, Rule, App, portlib.PortSet]]] = {}
    app_ports = {a.name: portlib.portset(a.ports) for a in policy.apps}  # once per app, not per rule
    for rule_id, rule in enumerate(policy.rules, 1):
        dst = apps[rule.dst]
        match = portlib.intersect(portlib.portset(rule.ports), app_ports[dst.name])
        if portlib.is_empty(match):
            continue  # validation rejects this; defensive for direct callers
        dst_key = app_ids[dst.name] if dst.addresses else APP_ANY
        verdict = l4_verdict(rule, rule_id, dst, policy.settings.mode)
        pairs.setdefault((app_ids[rule.src], dst_key), []).append((verdict, match))
        if dst.hostnames and not rule.l7:
            named.setdefault((app_ids[rule.src], dst_key), []).append((rule_id, rule, dst, match))

    policy_entries = []
    for (src_id, dst_id), cands in sorted(pairs.items()):
        for plen, proto, dport, v in pair_entries(cands):
            policy_entries.append((plen, src_id, dst_id, proto, dport, v.action, v.flags, v.rule_id))

    sni_entries = []
    for (src_id, dst_key), group in sorted(named.items()):
        sni_entries += sni_group_entries(src_id, dst_key, group, app_ids, policy.settings.mode)

    fabric, vips = {}, {}
    if policy.fabric is not None and policy.fabric.service_addresses:  # not a transit-only fabric
        fab = policy.fabric
        fabric = {"service_addresses": [str(p) for p in fab.service_addresses],
                  "upstream_dns": [str(a) for a in fab.upstream_dns], "dns_ttl": fab.dns_ttl}
        pools = {p.version for p in fab.service_addresses}
        vips = viplib.allocate(((a.name, vip_families(a, apps) & pools)
                                for a in policy.apps if a.publish), fab.service_addresses, previous_vips)
        dst_entries += dns_dst_entries(policy, seg_ids)
        policy_entries += dns_policy_entries(policy, seg_ids, app_ids)
        dst_entries += router_dst_entries(policy, app_ids, vips)
        dst_entries += vip_dst_entries(policy, seg_ids, app_ids, vips)
        policy_entries += router_policy_entries(policy, app_ids, app_ports)

    fab_entries = vip_fab_entries(policy, seg_ids, app_ids, vips)
    transit = {}
    if policy.transit:
        transit = {"port": policy.fabric.transit_port if policy.fabric is not None else TRANSIT_PORT_DEFAULT,
                   "gateways": {g.name: str(g.transit) for g in policy.gateways if g.transit is not None}}
        wg = {g.name: {"public_key": g.wireguard["public_key"], "endpoint": g.wireguard["endpoint"]}
              for g in policy.gateways if g.transit is not None and g.wireguard is not None}
        if wg:  # only then: a bundle without it keeps its bytes and checksum
            transit["wireguard"] = wg
        fab_entries += transit_fab_entries(policy, seg_ids, app_ids)

    return Bundle(
        settings=policy.settings.as_dict(),
        segments=[{"id": seg_ids[s.name], "name": s.name, "interfaces": list(s.interfaces),
                   "gateway": s.gateway if policy.gateways else None,
                   **({"dns": [str(a) for a in s.dns]} if s.dns else {}),
                   **({"transit_snat": [str(a) for a in s.transit_snat]} if s.transit_snat else {})}
                  for s in policy.segments],
        apps=[{"id": app_ids[a.name], "name": a.name, "segment": a.segment,
               "addresses": [str(x) for x in a.addresses],
               "ports": [str(p) for p in a.ports or []],
               "hostnames": list(a.hostnames),
               # L7 verifier: TLS termination material (file paths, never contents)
               "tls": ({k: v for k, v in vars(a.tls).items() if k in ("cert", "key", "ca") and v}
                       if a.tls else None),
               **({"dns_names": list(a.dns_names)} if a.publish else {}),
               **({"routes": [{"kind": r.kind, "name": r.name, "path": r.path, "to": r.to} for r in a.routes]}
                  if a.routes is not None else {})}
              for a in policy.apps],
        rules=[{"id": i, "name": r.name, "from": r.src, "to": r.dst, "action": r.action,
                "mode": r.mode, "ports": [str(p) for p in r.ports or []], "l7": r.l7,
                "http": r.http}
               for i, r in enumerate(policy.rules, 1)],
        src_entries=src_entries,
        dst_entries=dst_entries,
        policy_entries=policy_entries,
        sni_entries=sni_entries,
        source=list(policy.sources),
        warnings=list(policy.warnings),
        gateways=[g.name for g in policy.gateways],
        fabric=fabric,
        vips=vips,
        transit=transit,
        fab_entries=fab_entries,
    )


def _addr16(a) -> bytes:
    """An address in the 16-byte space of the maps (IPv4 IPv4-mapped, as model.Address)."""
    return a.packed if a.version == 6 else b"\x00" * 10 + b"\xff\xff" + a.packed


ZERO16 = b"\x00" * 16  # an unused address of a fab entry


def vip_families(app: App, apps: dict[str, App]) -> set[int]:
    """Families a published app gets service addresses in: those of its host addresses (/32, /128:
    what a service address translates to), or a router's backends' host addresses."""
    if app.routes is None:
        return {x.network.version for x in app.addresses if x.network.num_addresses == 1}
    return {x.network.version for r in app.routes for x in apps[r.to].addresses if x.network.num_addresses == 1}


def real_address(app: App, version: int):
    """The address a published app's service address of `version` translates to: its first host
    address of that family (None: it has none; validation and vip_families see to it)."""
    return next((x.network.network_address for x in app.addresses
                 if x.network.version == version and x.network.num_addresses == 1), None)


def vip_dst_entries(policy: Policy, seg_ids: dict[str, int], app_ids: dict[str, int],
                    vips: dict[str, list[str]]) -> list[tuple]:
    """A published app's service addresses are destinations of the app itself (in its segment),
    so a flow to one is classified as a flow to the app; routers have theirs (router_dst_entries)."""
    return [(_addr16(ipaddress.ip_address(v)), 128, app_ids[a.name], seg_ids[a.segment])
            for a in policy.apps if a.publish and a.routes is None for v in vips.get(a.name, [])]


def vip_fab_entries(policy: Policy, seg_ids: dict[str, int], app_ids: dict[str, int],
                    vips: dict[str, list[str]]) -> list[tuple]:
    """FAB_VIP (service address -> app, segment, real address) and FAB_REAL (real address -> app,
    service address) for each service address of a published app that is not a router."""
    out = []
    for a in policy.apps:
        if not a.publish or a.routes is not None:
            continue
        for v in vips.get(a.name, []):
            vip = ipaddress.ip_address(v)
            real = real_address(a, vip.version)
            if real is None:
                continue  # defensive: vip_families gives no service address without a host address
            out.append((int(FAB_VIP), 0, _addr16(vip), app_ids[a.name], seg_ids[a.segment], _addr16(real)))
            out.append((int(FAB_REAL), 0, _addr16(real), app_ids[a.name], 0, _addr16(vip)))
    return out


def transit_fab_entries(policy: Policy, seg_ids: dict[str, int], app_ids: dict[str, int]) -> list[tuple]:
    """With transit: which gateway each segment (FAB_SEG) and app (FAB_APP) is behind, and each
    transit gateway's address both ways (FAB_PEER: address -> id, FAB_GW: id -> address, family).
    Gateway ids are 1-based in `gateways:` order."""
    gw_ids = {g.name: i for i, g in enumerate(policy.gateways, 1)}
    seg_gw = {s.name: gw_ids.get(s.gateway, 0) for s in policy.segments}
    out = [(int(FAB_SEG), seg_ids[s.name], ZERO16, seg_gw[s.name], 0, ZERO16) for s in policy.segments]
    out += [(int(FAB_APP), app_ids[a.name], ZERO16, seg_ids[a.segment], seg_gw[a.segment], ZERO16)
            for a in policy.apps if a.segment is not None]
    out += [(int(FAB_SNAT4 if a.version == 4 else FAB_SNAT6), seg_ids[s.name], ZERO16, 0, 0, _addr16(a))
            for s in policy.segments for a in s.transit_snat]
    for g in policy.gateways:
        if g.transit is not None:
            out.append((int(FAB_PEER), 0, _addr16(g.transit), gw_ids[g.name], 0, ZERO16))
            out.append((int(FAB_GW), gw_ids[g.name], ZERO16, g.transit.version, 0, _addr16(g.transit)))
    return out


def router_dst_entries(policy: Policy, app_ids: dict[str, int], vips: dict[str, list[str]]) -> list[tuple]:
    """A router's service addresses are its destination: flows to them are the router's."""
    return [(_addr16(ipaddress.ip_address(v)), 128, app_ids[a.name], 0)
            for a in policy.apps if a.routes is not None for v in vips.get(a.name, [])]


def router_policy_entries(policy: Policy, app_ids: dict[str, int], app_ports: dict) -> list[tuple]:
    """Every app with an allow rule to one of a router's backends may open connections to the
    router's ports: the verifier reads the server name or Host, picks the backend, and decides
    the pair (client, backend) as the kernel would (docs/fabric.md). Steered: Action.L7."""
    routers = [a for a in policy.apps if a.routes is not None]
    if not routers:
        return []
    # One pass over the rules: each backend's first allow rule per client app.
    first_allow: dict[str, dict[str, int]] = {}  # backend -> {client app: rule id}
    for rule_id, rule in enumerate(policy.rules, 1):
        if rule.action == "allow":
            first_allow.setdefault(rule.dst, {}).setdefault(rule.src, rule_id)
    out = []
    for r_app in routers:
        clients: dict[str, int] = {}
        for backend in dict.fromkeys(r.to for r in r_app.routes):
            for src, rule_id in first_allow.get(backend, {}).items():
                if rule_id < clients.get(src, rule_id + 1):
                    clients[src] = rule_id
        if policy.settings.default_action == "allow":
            # any app may reach the backends by default: any app may reach the router (without
            # an entry its flows would be allowed unsteered, and nothing owns the service address)
            for a in policy.apps:
                if a.routes is None and a.addresses:
                    clients.setdefault(a.name, 0)
        for src, rule_id in sorted(clients.items(), key=lambda kv: app_ids[kv[0]]):
            v = Verdict(RANK_L7, rule_id, int(Action.L7), 0)
            for plen, proto, dport, win in pair_entries([(v, app_ports[r_app.name])]):
                out.append((plen, app_ids[src], app_ids[r_app.name], proto, dport, win.action, win.flags, win.rule_id))
    return out


def dns_dst_entries(policy: Policy, seg_ids: dict[str, int]) -> list[tuple]:
    """The gateways' DNS addresses as one destination (APP_GATEWAY), so queries pass XDP."""
    out, seen = [], set()
    for s in policy.segments:
        for a in s.dns:
            key = _addr16(a)
            if key not in seen:
                seen.add(key)
                out.append((key, 128, APP_GATEWAY, seg_ids[s.name]))
    return out


def dns_policy_entries(policy: Policy, seg_ids: dict[str, int], app_ids: dict[str, int]) -> list[tuple]:
    """Every app of a segment with `dns:` may query it: udp/53 and tcp/53 to APP_GATEWAY, rule 0."""
    with_dns = {s.name for s in policy.segments if s.dns}
    out = []
    for app in policy.apps:
        if app.segment in with_dns and app.addresses:
            for proto in (6, 17):
                out.append((POLICY_PLEN_PORT_BASE + 16, app_ids[app.name], APP_GATEWAY, proto, 53,
                            int(Action.ALLOW), 0, 0))
    return out


# Ports of a hostname rule are expanded one by one into the name table; a
# rule with more explicit TCP ports than this is refused (use no ports).
SNI_MAX_PORTS = 4096


def _tcp_ports(match: portlib.PortSet) -> Optional[set[int]]:
    """The TCP ports a match set covers: None = any TCP port, set() = none."""
    if match is None:
        return None
    ivs = match.get(6, [])
    if ivs == [(1, 65535)] or ivs == [(0, 65535)]:
        return None
    ports = set()
    for lo, hi in ivs:
        ports.update(range(lo, hi + 1))
        if len(ports) > SNI_MAX_PORTS:
            raise ValueError(f"a rule to a hostname app covers more than {SNI_MAX_PORTS} TCP ports: "
                             "name them individually or leave ports out")
    return ports


def sni_group_entries(src_id: int, dst_key: int, group, app_ids: dict[str, int], mode: str) -> list[tuple]:
    """Server-name table entries for one (src app, dst key) group of hostname rules.

    The kernel tries, in order: exact name at the port, exact name at any
    port (0), then the wildcard form likewise, and takes the first hit. So
    each entry must already be the precedence winner among *every* rule
    whose app matches that name at that port: an exact name's entry also
    weighs wildcard rules that cover it, and a port's entry also weighs
    any-port rules.
    """
    cands = []  # (verdict, rule, app, ports or None)
    for rule_id, rule, app, match in group:
        tcp = _tcp_ports(match)
        if tcp is not None and not tcp:
            continue  # no TCP ports: nothing to decide by ClientHello
        cands.append((rule_verdict(rule, rule_id, app, mode), rule, app, tcp))
    patterns = sorted({snilib.normalize(h).decode() for _, _, app, _ in cands for h in app.hostnames})
    out = []
    for pat in patterns:
        is_wild = pat.startswith("*.")

        def covers(app: App) -> bool:
            if is_wild:  # a wildcard lookup finds only wildcard patterns
                return any(snilib.normalize(h).decode() == pat for h in app.hostnames)
            return any(snilib.matches(h, pat) for h in app.hostnames)

        mine = [c for c in cands if covers(c[2])]
        ports = sorted({p for c in mine if c[3] is not None for p in c[3]})
        h64 = snilib.name_hash(pat)
        for port in [0] + ports:
            here = [c for c in mine if c[3] is None or (port and port in c[3])]
            if not here:
                continue
            v, rule, app, _ = min(here, key=lambda c: c[0].key)
            out.append((h64, src_id, dst_key, port, v.action, v.flags, v.rule_id, app_ids[app.name]))
    return out


def _best(verdicts) -> Optional[Verdict]:
    return min(verdicts, key=lambda v: v.key, default=None)


def pair_entries(cands: list[tuple[Verdict, portlib.PortSet]]) -> list[tuple[int, int, int, Verdict]]:
    """LPM entries (prefixlen, proto, dport, verdict) for one (src app, dst app) pair."""
    if len(cands) == 1:
        # The common case (one rule per pair): nothing to resolve.
        return _single_rule_entries(*cands[0])
    out = []
    any_best = _best(v for v, match in cands if match is None)
    if any_best is not None:
        out.append((POLICY_PLEN_ANY_PROTO, 0, 0, any_best))

    protos = sorted({p for _, match in cands if match is not None for p in match})
    for proto in protos:
        per_proto = [(v, match[proto]) for v, match in cands if match is not None and proto in match]
        if proto in portlib.PORTLESS:
            win = _best([v for v, _ in per_proto] + ([any_best] if any_best else []))
            if win != any_best:
                out.append((POLICY_PLEN_ANY_PORT, proto, 0, win))
            continue
        for lo, hi, win in port_winners(per_proto, any_best):
            if win == any_best:
                continue  # the prefixlen-64 entry already gives this verdict
            for start, bits in portlib.range_to_blocks(lo, hi):
                out.append((POLICY_PLEN_PORT_BASE + bits, proto, start, win))
    return out


def _single_rule_entries(v: Verdict, match: portlib.PortSet) -> list[tuple[int, int, int, Verdict]]:
    if match is None:
        return [(POLICY_PLEN_ANY_PROTO, 0, 0, v)]
    out = []
    for proto in sorted(match):
        if proto in portlib.PORTLESS:
            out.append((POLICY_PLEN_ANY_PORT, proto, 0, v))
            continue
        for lo, hi in match[proto]:
            for start, bits in portlib.range_to_blocks(lo, hi):
                out.append((POLICY_PLEN_PORT_BASE + bits, proto, start, v))
    return out


def port_winners(per_proto: list[tuple[Verdict, portlib.Intervals]],
                 fallback: Optional[Verdict]) -> list[tuple[int, int, Verdict]]:
    """Maximal port runs [lo, hi] of 1..65535 with their winning verdict.

    A sweep over interval boundaries keeps the rules covering the current
    port in a heap ordered by precedence (removed lazily), so a pair with
    many port rules costs O(n log n), not O(ports x rules). `fallback` (the
    best any-protocol rule) covers every port. Ports no rule covers are left
    out.
    """
    events: dict[int, list[tuple[int, Verdict]]] = {}
    for v, intervals in per_proto:
        for lo, hi in intervals:
            events.setdefault(lo, []).append((+1, v))
            events.setdefault(hi + 1, []).append((-1, v))
    points = sorted(set(events) | {portlib.PORT_MIN, portlib.PORT_MAX + 1})

    active: list[tuple[tuple[int, int], Verdict]] = []
    live: dict[Verdict, int] = {}
    runs: list[list] = []  # [lo, hi, verdict]
    for i, pos in enumerate(points[:-1]):
        for delta, v in events.get(pos, ()):
            live[v] = live.get(v, 0) + delta
            if delta > 0:
                heapq.heappush(active, (v.key, v))
        while active and live.get(active[0][1], 0) <= 0:
            heapq.heappop(active)
        if pos < portlib.PORT_MIN:
            continue
        end = min(points[i + 1] - 1, portlib.PORT_MAX)
        win = _best([v for v in (active[0][1] if active else None, fallback) if v is not None])
        if win is None:
            continue
        if runs and runs[-1][2] == win and runs[-1][1] == pos - 1:
            runs[-1][1] = end
        else:
            runs.append([pos, end, win])
    return [(lo, hi, v) for lo, hi, v in runs]
