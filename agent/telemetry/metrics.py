"""Prometheus exporter: a collector that reads the BPF maps at scrape time
(never a copy refreshed on a timer). Label values are names (reasons,
verdicts, apps, rules, maps), never raw ids; no IP addresses are labels, so
cardinality is bounded by apps x apps x rules.

Each section of a scrape is read on its own: one failing (a map being
rewritten, a kernel without a feature) is counted in
bulkhead_collector_errors{section} and the others are still exported. The
collector never takes Agent.lock, so a long policy apply doesn't stall a
scrape.

Verdict labels are pass | drop | reject | audit: a would-deny of audit mode
(reasons audit_rule, audit_default) is "audit", never "drop".
"""
from __future__ import annotations

import collections
import logging
import threading

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from bulkhead.telemetry import flowlog, hops
from bulkhead.datapath import abi, loader

log = logging.getLogger("bulkhead.metrics")

# Parts of a scrape, each read and counted (bulkhead_collector_errors{section}) on its own.
SECTIONS = ("counters", "policy", "pair_flows", "flow_table", "latency", "http_hops", "maps", "flow_log", "verifier",
            "dns")
MAP_ARRAYS = {"ctl", "slot_cfg", "if_cfg", "stats", "events", "tails", "sni_scratch"}  # preallocated: always full


class DatapathCollector:
    def __init__(self, agent):
        self.agent = agent
        self.errors: collections.Counter = collections.Counter()  # section -> failed reads
        self.totals = flowlog.FlowTotals()
        self.evictions = 0  # derived, kept monotonic
        self.lock = threading.Lock()  # one scrape at a time: the monotonic state is shared
        self._map_entries_from_walk: dict[str, int] = {}

    def collect(self):
        with self.lock:
            out = []
            self._map_entries_from_walk = {}
            for name in SECTIONS:
                section = getattr(self, "_" + name)
                try:
                    out.extend(section())
                except Exception:
                    if not self.errors[name]:
                        log.exception("metrics section %s failed", name)
                    else:
                        log.debug("metrics section %s failed", name, exc_info=True)
                    self.errors[name] += 1
            errors = CounterMetricFamily("bulkhead_collector_errors",
                                         "Sections of a scrape that failed to read (a BPF map, agent state)",
                                         labels=["section"])
            for name in SECTIONS:
                errors.add_metric([name], self.errors[name])
            out.append(errors)
        yield from out

    # ------------------------------------------------------------ sections
    def _counters(self):
        dp = self.agent.dp
        counters = dp.counters()
        events = dp.events()
        pkts = CounterMetricFamily("bulkhead_packets", "Packets judged by the XDP program",
                                   labels=["reason", "verdict"])
        byts = CounterMetricFamily("bulkhead_bytes", "Bytes judged by the XDP program", labels=["reason", "verdict"])
        for reason, c in counters.items():
            verdict = abi.verdict_of(abi.Reason[reason.upper()])
            pkts.add_metric([reason, verdict], c["packets"])
            byts.add_metric([reason, verdict], c["bytes"])
        ev = CounterMetricFamily("bulkhead_datapath_events", "Data-path events", labels=["event"])
        for name, n in events.items():
            ev.add_metric([name], n)
        return [pkts, byts, ev]

    def _policy(self):
        a = self.agent
        gen = GaugeMetricFamily("bulkhead_policy_generation", "Generation of the policy in force")
        gen.add_metric([], a.dp.active_generation())
        dur = GaugeMetricFamily("bulkhead_policy_apply_seconds", "Duration of the last policy apply")
        dur.add_metric([], float(a.last_apply.get("seconds") or 0.0))
        applies = CounterMetricFamily("bulkhead_policy_applies", "Policy applies by result (failed: the old "
                                      "policy stayed in force)", labels=["result"])
        counts = dict(getattr(a, "applies", {}))
        for result in ("ok", "failed"):
            applies.add_metric([result], counts.get(result, 0))
        return [gen, dur, applies]

    def _pair_flows(self):
        """Flows judged per app pair, rule and reason: exact (the kernel counts each flow once)."""
        a = self.agent
        merged: collections.Counter = collections.Counter()
        for (s, d, rule, reason), n in a.dp.pair_flows().items():
            merged[(a.app_name(s), a.app_name(d), a.rule_name(rule), flowlog.reason_name(reason),
                    abi.verdict_of(reason))] += n
        m = CounterMetricFamily("bulkhead_flows", "Flows judged, by source app, destination app, rule, reason and "
                                "verdict (a flow decided by TLS server name counts once, when decided)",
                                labels=["src_app", "dst_app", "rule", "reason", "verdict"])
        for labels, n in sorted(merged.items()):
            m.add_metric(list(labels), n)
        return [m]

    def _flow_table(self):
        """Walk both flow tables: packets/bytes by app pair, occupancy, derived evictions."""
        a = self.agent
        dp = a.dp
        # Read before the walk: entries created meanwhile can only make the derived evictions smaller.
        created = dp.events().get("flow_entry_new", 0)
        entries = dp.flow_entries()
        fwd_labels: dict[tuple, tuple] = {}
        replies = []
        snap = []
        per_map = collections.Counter()
        for fam, k, v in entries:
            per_map[fam] += 1
            tup = (fam, bytes(k.saddr) if fam == "flows6" else k.saddr_be,
                   bytes(k.daddr) if fam == "flows6" else k.daddr_be, k.sport_be, k.dport_be, k.proto)
            ident = (*tup, k.segment_id)
            if v.flags & abi.FLOWF_REPLY:
                replies.append((ident, tup, v))
                continue
            labels = (a.app_name(v.src_app), a.app_name(v.dst_app), a.rule_name(v.rule_id),
                      abi.verdict_of(v.reason))
            fwd_labels[ident] = labels
            snap.append((ident, labels, v.packets, v.bytes))
        for ident, (fam, sa, da, sp, dpo, proto), v in replies:
            labels = fwd_labels.get((fam, da, sa, dpo, sp, proto, v.peer_segment))
            if labels is None:  # forward entry gone (evicted): the reply side's own view
                labels = (a.app_name(v.src_app), a.app_name(v.dst_app), a.rule_name(v.rule_id),
                          "pass" if v.reason == abi.Reason.ALLOW_REPLY else abi.verdict_of(v.reason))
            snap.append((ident, labels, v.packets, v.bytes))
        totals = self.totals.update(snap)
        pk = CounterMetricFamily("bulkhead_flow_packets", "Packets of flows through the gateway (live flow-table "
                                 "entries + those gone), both directions, by the flow's apps, rule and verdict",
                                 labels=["src_app", "dst_app", "rule", "verdict"])
        by = CounterMetricFamily("bulkhead_flow_bytes", "Bytes of flows through the gateway (live flow-table "
                                 "entries + those gone), both directions, by the flow's apps, rule and verdict",
                                 labels=["src_app", "dst_app", "rule", "verdict"])
        for labels, (p, b) in sorted(totals.items()):
            pk.add_metric(list(labels), p)
            by.add_metric(list(labels), b)
        live = GaugeMetricFamily("bulkhead_flow_entries", "Flow-table entries now (a flow has a forward and, "
                                 "if it passes, a reply entry)", labels=["map"])
        for fam in ("flows4", "flows6"):
            live.add_metric([fam], per_map[fam])
        self._map_entries_from_walk = dict(per_map)
        self.evictions = max(self.evictions, created - len(entries))
        ev = CounterMetricFamily("bulkhead_flow_evictions", "Flow-table entries gone (LRU eviction or expiry), "
                                 "derived: entries created - entries now; never decreases")
        ev.add_metric([], self.evictions)
        return [pk, by, live, ev]

    def _latency(self):
        a = self.agent
        bounds = a.dp.latency_bounds()
        merged: dict[tuple, dict] = {}
        for (s, d, kind), h in a.dp.latency().items():
            key = (flowlog.LAT_KINDS.get(kind, str(kind)), a.app_name(s), a.app_name(d))
            m = merged.setdefault(key, {"buckets": [0] * len(h["buckets"]), "sum_s": 0.0})
            m["buckets"] = [x + y for x, y in zip(m["buckets"], h["buckets"])]
            m["sum_s"] += h["sum_s"]
        hist = HistogramMetricFamily(
            "bulkhead_hop_latency_seconds",
            "Hop latency measured at the gateway for TCP flows whose SYN it saw: server_rtt = SYN -> SYN-ACK, "
            "client_rtt = SYN-ACK -> ACK, server_time = first request byte -> first response byte",
            labels=["kind", "src_app", "dst_app"])
        for key, m in sorted(merged.items()):
            cum, buckets = 0, []
            for b, n in enumerate(m["buckets"][:-1]):
                cum += n
                buckets.append((repr(bounds[b]), cum))
            buckets.append(("+Inf", sum(m["buckets"])))
            hist.add_metric(list(key), buckets, m["sum_s"])
        return [hist]

    def _http_hops(self):
        hist = HistogramMetricFamily(
            "bulkhead_http_hop_duration_seconds",
            "Response time of HTTP requests between two gateways, per hop, measured at the client's gateway "
            "(telemetry/hops.py): ingress (client <-> its gateway), backbone (gateway <-> gateway), app_vpc "
            "(far gateway <-> app), app (the app's time to first byte), total; mode tls_inferred: TLS the "
            "gateways don't decrypt, inferred from TCP timing",
            labels=["src_app", "dst_app", "hop", "mode"])
        rows = self.agent.flowlog.hops.export()
        for h in sorted(rows, key=lambda h: (h["src_app"], h["dst_app"], h["hop"], h["mode"])):
            cum, buckets = 0, []
            for bound, n in zip(hops.BOUNDS[:-1], h["buckets"]):
                cum += n
                buckets.append((repr(bound), cum))
            buckets.append(("+Inf", h["count"]))
            hist.add_metric([h["src_app"], h["dst_app"], h["hop"], h["mode"]], buckets, h["sum_s"])
        return [hist]

    def _maps(self):
        a = self.agent
        dp = a.dp
        specs = loader.map_specs(dp.sizes)
        cap = GaugeMetricFamily("bulkhead_map_capacity", "Entries a pinned BPF map can hold (max_entries)",
                                labels=["map"])
        ent = GaugeMetricFamily("bulkhead_map_entries", "Entries in a pinned BPF map (arrays: always full; "
                                "per-slot policy maps: as written by the last apply into that slot)", labels=["map"])
        walked = getattr(self, "_map_entries_from_walk", {})
        slot_entries = dict(getattr(a, "slot_entries", {}))
        for name, (_type, _k, _v, max_entries) in sorted(specs.items()):
            cap.add_metric([name], max_entries)
            n = None
            if name in MAP_ARRAYS:
                n = max_entries
            elif name in walked:
                n = walked[name]
            elif name in slot_entries:
                n = slot_entries[name]
            elif name in ("frags", "sni_state", "lat_hist", "pair_flows"):
                try:
                    n = dp.occupancy(name)
                except Exception:
                    self.errors["maps"] += 1
            if n is not None:
                ent.add_metric([name], n)
        return [cap, ent]

    def _flow_log(self):
        a = self.agent
        fl = getattr(a, "flowlog", None)
        if fl is None:
            return []
        st = fl.stats()
        ev = CounterMetricFamily("bulkhead_flow_events", "Flow events received by the agent, by kind",
                                 labels=["kind"])
        for kind in ("new", "change", "end"):
            ev.add_metric([kind], st["by_kind"].get(kind, 0))
        lost = CounterMetricFamily("bulkhead_flow_events_lost", "Flow events lost: kernel = the ring buffer was "
                                   "full; agent = fell out of the agent's buffer (--events-keep) unread, or "
                                   "undecodable", labels=["where"])
        lost.add_metric(["kernel"], a.dp.events().get("flow_event_lost", 0))
        lost.add_metric(["agent"], st["buffer_dropped"] + st["bad"])
        return [ev, lost]

    def _verifier(self):
        """The L7 verifier's requests and latency, from the records the agent aggregates."""
        l7 = getattr(self.agent, "l7", None)
        if l7 is None:
            return []
        up = GaugeMetricFamily("bulkhead_verifier_up", "1 while the L7 verifier process runs")
        restarts = CounterMetricFamily("bulkhead_verifier_restarts", "Times the agent restarted the verifier")
        sup = getattr(self.agent, "verifier", None)
        running = bool(sup and sup.proc and sup.proc.poll() is None)
        up.add_metric([], 1 if running else 0)
        restarts.add_metric([], sup.restarts if sup else 0)
        reqs = CounterMetricFamily("bulkhead_l7_requests", "HTTP requests decided by the verifier",
                                   labels=["verdict", "rule", "src_app", "dst_app", "status"])
        conns = CounterMetricFamily("bulkhead_l7_connections", "Verifier connection events", labels=["event"])
        hist = HistogramMetricFamily("bulkhead_l7_request_seconds",
                                     "Verifier latency split: decision, upstream connect, upstream time to "
                                     "first byte, total", labels=["phase", "src_app", "dst_app"])
        with l7.lock:
            for key, n in l7.requests.items():
                reqs.add_metric(list(key), n)
            for event, n in l7.connections.items():
                conns.add_metric([event], n)
            for (phase, src, dst), h in l7.latency.items():
                buckets = [(str(b), h[i]) for i, b in enumerate(l7.BUCKETS)] + [("+Inf", h[-2])]
                hist.add_metric([phase.removesuffix("_s"), src, dst], buckets, h[-1])
        return [up, restarts, reqs, conns, hist]


    def _dns(self):
        """The gateway's DNS (docs/fabric.md): queries by asking segment and answer."""
        dns = getattr(self.agent, "dns", None)
        if dns is None:
            return []
        q = CounterMetricFamily("bulkhead_dns_queries", "DNS queries the gateway answered, by the segment that "
                                "asked and the answer (noerror, nxdomain: a name the segment may not reach, "
                                "refused, forwarded, servfail, formerr, ...)", labels=["segment", "answer"])
        for (segment, answer), n in sorted(dns.by_segment.items()):
            q.add_metric([segment, answer], n)
        return [q]


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address must be HOST:PORT, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(agent, addr: str) -> None:
    host, port = parse_addr(addr)
    REGISTRY.register(DatapathCollector(agent))
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
