"""Prometheus exporter: a collector that reads the per-CPU BPF counters at
scrape time (never a copy refreshed on a timer). Label values are names
from the ABI enums, never raw ids; no IP addresses are labels.
"""
from __future__ import annotations

import logging

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

log = logging.getLogger("bulkhead.metrics")


class DatapathCollector:
    def __init__(self, agent):
        self.agent = agent
        self.errors = 0

    def collect(self):
        errors = CounterMetricFamily("bulkhead_collector_errors", "Scrapes that failed to read a BPF map")
        try:
            counters = self.agent.dp.counters()
            events = self.agent.dp.events()
            generation = self.agent.dp.active_generation()
        except Exception:
            log.exception("metrics collection failed")
            self.errors += 1
            errors.add_metric([], self.errors)
            yield errors
            return
        pkts = CounterMetricFamily("bulkhead_packets", "Packets judged by the XDP program", labels=["reason", "verdict"])
        byts = CounterMetricFamily("bulkhead_bytes", "Bytes judged by the XDP program", labels=["reason", "verdict"])
        for reason, c in counters.items():
            pkts.add_metric([reason, c["verdict"]], c["packets"])
            byts.add_metric([reason, c["verdict"]], c["bytes"])
        ev = CounterMetricFamily("bulkhead_datapath_events", "Data-path events", labels=["event"])
        for name, n in events.items():
            ev.add_metric([name], n)
        gen = GaugeMetricFamily("bulkhead_policy_generation", "Generation of the policy in force")
        gen.add_metric([], generation)
        dur = GaugeMetricFamily("bulkhead_policy_apply_seconds", "Duration of the last policy apply")
        dur.add_metric([], float(self.agent.last_apply.get("seconds") or 0.0))
        errors.add_metric([], self.errors)
        yield from (pkts, byts, ev, gen, dur, errors)
        yield from self.verifier_metrics()

    def verifier_metrics(self):
        """The L7 verifier's requests and latency, from the records the agent aggregates."""
        l7 = getattr(self.agent, "l7", None)
        if l7 is None:
            return
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
        yield from (up, restarts, reqs, conns, hist)


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
