"""Prometheus exporter: a collector that reads the per-CPU BPF counters at
scrape time (never a copy refreshed on a timer). Label values are names
from the ABI enums, never raw ids; no IP addresses are labels.
"""
from __future__ import annotations

import logging

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily

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
