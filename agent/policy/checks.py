"""The second validation pass ("meaning"): checks across all files of a policy.

References between segments, apps and rules, address overlaps within a segment and between
destinations, port intersections, L7 rules on TLS ports. A mixin of validate._Builder: it reads
the registries the first pass filled (self.segments, self.apps, self.rules) and reports with
self.error, so every problem of every file is reported in one run.
"""
from __future__ import annotations

import difflib
import heapq
from typing import Any, Callable, Optional

from bulkhead.policy import ports as portlib
from bulkhead.policy.model import Address, App, Loc, Policy, Rule
from bulkhead.policy.schema import DST_OVERLAP_WHY, POLICY_VERSION, TLS_PORTS


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class CrossChecks:
    def finish(self, paths: list[str]) -> Policy:
        if self.version_loc is None and not self.load_failed and paths:
            self.error(Loc(paths[0], 1), f"version is required: add `version: {POLICY_VERSION}`")
        self.check_app_segments()
        self.check_segment_gateways()
        self.check_segment_overlaps()
        self.check_rules()
        self.check_destination_overlaps()
        self.check_fabric()
        self.collect_warnings()
        return Policy(self.settings, list(self.segments.values()), list(self.apps.values()),
                      list(self.rules.values()), paths, gateways=list(self.gateways.values()),
                      fabric=self.fabric)

    def undefined(self, kind: str, ref: str, registry: dict) -> str:
        return f"{kind} {ref!r} is not defined{suggest(ref, registry)}"

    def check_app_segments(self) -> None:
        if self.load_failed:
            return
        for app in self.apps.values():
            if app.segment is not None and app.segment not in self.segments:
                self.error(app.segment_loc, f"app {app.name}: "
                                            f"{self.undefined('segment', app.segment, self.segments)}")

    def check_segment_gateways(self) -> None:
        """With `gateways:` every segment names one of them; without, none may."""
        if self.load_failed:
            return  # the unreadable file may hold `gateways:` or the segments' gateway keys
        declared = ", ".join(self.gateways)
        for seg in self.segments.values():
            if self.gateways_loc is None:
                if seg.gateway_loc is not None:
                    self.error(seg.gateway_loc, f"segment {seg.name}: gateway needs the gateways declared: "
                                                f"add a top-level `gateways:` list (e.g. `gateways: "
                                                f"[{{name: {seg.gateway or 'NAME'}}}]`), or leave gateway "
                                                "out for a policy enforced by one gateway")
            elif seg.gateway_loc is None:
                self.error(seg.loc, f"segment {seg.name}: gateway is required: the policy declares "
                                    f"gateways ({declared}), so every segment names the one it is attached to")
            elif seg.gateway is not None and seg.gateway not in self.gateways and self.gateways:
                self.error(seg.gateway_loc, f"segment {seg.name}: "
                                            f"{self.undefined('gateway', seg.gateway, self.gateways)}")

    def gateway_of(self, app: App) -> Optional[str]:
        """The gateway an app sits behind: its segment's; None for a hostname-only app.

        A hostname-only app has no address, so it is never a source, and as a
        destination it is found by server name on whichever gateway the client
        is behind: it is behind no gateway.
        """
        if not app.addresses or app.segment is None:
            return None
        seg = self.segments.get(app.segment)
        # An undeclared gateway was reported at its segment; no second error for its rules.
        return seg.gateway if seg is not None and seg.gateway in self.gateways else None

    def check_segment_overlaps(self) -> None:
        """Within a segment the source trie must map each address to one app."""
        by_segment: dict[str, list[tuple[Address, App]]] = {}
        for app in self.apps.values():
            if app.segment is not None:
                by_segment.setdefault(app.segment, []).extend((a, app) for a in app.addresses)
        for segment, items in by_segment.items():
            for (a1, app1), (a2, app2) in _overlapping(items, lambda x, y: x is not y):
                first, second = sorted(((a1, app1), (a2, app2)), key=lambda p: self.order(p[1]))
                self.error(second[0].loc,
                           f"apps {first[1].name} and {second[1].name} overlap in segment {segment}: "
                           f"{first[0]} ({first[0].loc}) and {second[0]}; apps in one segment may "
                           "not share addresses")

    def order(self, app: App) -> int:
        """File order of an app, so an overlap is reported at the later of the two."""
        if self._app_order is None:
            self._app_order = {name: i for i, name in enumerate(self.apps)}
        return self._app_order[app.name]

    def check_rules(self) -> None:
        for rule in self.rules.values():
            label = f"rule {rule.name}"
            src = self.resolve_app(rule.src, rule.from_loc, label, "from")
            dst = self.resolve_app(rule.dst, rule.to_loc, label, "to")
            if src is not None and not src.addresses and src.hostnames:
                self.error(rule.from_loc, f"{label}: from app {src.name} has no addresses; sources are "
                                          "identified by address only, so the rule could never match")
            if src is not None and dst is not None and self.gateways:
                src_gw, dst_gw = self.gateway_of(src), self.gateway_of(dst)
                if src_gw is not None and dst_gw is not None and src_gw != dst_gw:
                    where = f"app {src.name} is behind gateway {src_gw} and app {dst.name} behind {dst_gw}"
                    missing = [g for g in dict.fromkeys((src_gw, dst_gw)) if self.gateways[g].transit is None]
                    if missing:
                        self.error(rule.to_loc, f"{label}: {where}: rules across gateways need the fabric's "
                                                f"transit: give gateway {' and '.join(missing)} "
                                                "`transit: ADDRESS` (the address the other gateways reach "
                                                "it at; both gateways need one)")
                        continue
                    if rule.l7:
                        self.error(rule.http_loc, f"{label}: {where}: not yet: http rules across gateways "
                                                  "(the L7 verifier sees only flows of its own gateway); "
                                                  "write the rule without http, or keep both apps behind "
                                                  "one gateway")
                        continue
            if dst is not None and rule.ports is not None and dst.ports is not None:
                mine, theirs = portlib.portset(rule.ports), portlib.portset(dst.ports)
                if portlib.is_empty(portlib.intersect(mine, theirs)):
                    self.error(rule.ports_loc,
                               f"{label}: its ports ({portlib.format_portset(mine)}) and app {dst.name}'s "
                               f"ports ({portlib.format_portset(theirs)}) have nothing in common, so the "
                               "rule could never match")
                    continue
            if dst is not None and rule.l7 and rule.action == "allow":
                self.check_l7_tls(rule, dst, label)

    def check_l7_tls(self, rule: Rule, dst: App, label: str) -> None:
        """An L7 rule whose ports include a TLS port needs the destination's TLS material."""
        if dst.tls is not None or dst.name in self.tls_broken:
            return
        ports = portlib.intersect(portlib.portset(rule.ports), portlib.portset(dst.ports))
        for port in TLS_PORTS:
            if _has_port(ports, 6, port):
                self.error(rule.http_loc,
                           f"{label}: http rules on TLS port tcp/{port} need the verifier to terminate TLS: "
                           f"give app {dst.name} `tls: {{cert, key}}`, or limit the rule's ports to "
                           "plain-HTTP ports")
                return

    def resolve_app(self, ref: Optional[str], loc: Loc, label: str, key: str) -> Optional[App]:
        if ref is None:
            return None
        app = self.apps.get(ref)
        if app is None and not self.load_failed:
            self.error(loc, f"{label}: {key} {self.undefined('app', ref, self.apps)}")
        return app

    def destination_apps(self) -> list[App]:
        """Apps whose addresses are in the destination table: rule destinations, and published
        apps (their service addresses translate to them; the compiler's `destinations`)."""
        seen: dict[str, App] = {}
        for rule in self.rules.values():
            app = self.apps.get(rule.dst) if rule.dst is not None else None
            if app is not None and app.addresses:
                seen.setdefault(app.name, app)
        for app in self.apps.values():
            if app.publish and app.routes is None and app.addresses:
                seen.setdefault(app.name, app)
        return list(seen.values())

    def check_destination_overlaps(self) -> None:
        """The destination trie has no segment in its key, so destinations must be disjoint.

        Pairs in one segment were already reported by check_segment_overlaps.
        """
        items = [(a, app) for app in self.destination_apps() for a in app.addresses]
        conflict = lambda x, y: x is not y and x.segment != y.segment  # noqa: E731
        for (a1, app1), (a2, app2) in _overlapping(items, conflict):
            first, second = sorted(((a1, app1), (a2, app2)), key=lambda p: self.order(p[1]))
            self.error(second[0].loc,
                       f"destination apps {first[1].name} (segment {first[1].segment}) and "
                       f"{second[1].name} (segment {second[1].segment}) overlap: {first[0]} "
                       f"({first[0].loc}) and {second[0]}; {DST_OVERLAP_WHY}")

    def collect_warnings(self) -> None:
        """No check warns at present; Diags.warn is kept for the next one."""


def _overlapping(items: list[tuple[Address, Any]], conflict: Callable[[Any, Any], bool]):
    """Yield one overlapping address pair per pair of owners that `conflict`.

    A sweep over addresses sorted by start: the heap holds the prefixes that
    are still "open" (end at or after the current start), which are exactly
    the earlier prefixes the current one overlaps. O(n log n) for valid
    policies, where open prefixes are few; 100k apps must validate quickly.
    """
    order = sorted(range(len(items)), key=lambda i: (items[i][0].first128, -items[i][0].last128))
    open_: list[tuple[int, int]] = []  # (last128, index)
    reported: set[tuple[int, int]] = set()
    for i in order:
        addr, owner = items[i]
        while open_ and open_[0][0] < addr.first128:
            heapq.heappop(open_)
        for _, j in open_:
            other = items[j][1]
            if conflict(other, owner):
                pair = tuple(sorted((id(other), id(owner))))
                if pair not in reported:
                    reported.add(pair)
                    yield items[j], items[i]
        heapq.heappush(open_, (addr.last128, i))


def _has_port(ports: portlib.PortSet, proto: int, port: int) -> bool:
    if ports is None:
        return True
    return any(lo <= port <= hi for lo, hi in ports.get(proto, ()))
