"""What the L7 verifier reported to the agent: recent requests, totals, latency histograms."""
from __future__ import annotations

import collections
import logging
import threading

log = logging.getLogger("bulkhead.agent")


class L7Records:
    """What the verifier reported: recent requests (bounded), totals, latency histograms."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    PHASES = ("decision_s", "connect_s", "ttfb_s", "total_s")

    def __init__(self, keep: int = 2000):
        self.lock = threading.Lock()
        self.recent: collections.deque = collections.deque(maxlen=keep)
        self.seq = 0
        self.requests: collections.Counter = collections.Counter()  # (verdict, rule, src, dst, status) -> n
        self.connections: collections.Counter = collections.Counter()  # event -> n
        # routers (docs/fabric.md, Routes): (router, route, backend, verdict) -> n; route and
        # backend "" when no route matched
        self.routes: collections.Counter = collections.Counter()
        # (phase, src, dst) -> [bucket counts..., +Inf count, sum]
        self.latency: dict[tuple, list] = {}

    def add(self, rec: dict) -> None:
        kind = rec.get("t")
        with self.lock:
            if kind == "request":
                self.seq += 1
                rec["seq"] = self.seq
                self.recent.append(rec)
                src, dst = rec.get("src_app") or "-", rec.get("dst_app") or "-"
                self.requests[(rec.get("verdict") or "?", rec.get("rule") or "", src, dst,
                               str(rec.get("status") or 0))] += 1
                if rec.get("router"):
                    self.routes[(rec["router"], rec.get("route") or "", rec.get("backend") or "",
                                 rec.get("verdict") or "?")] += 1
                for phase in self.PHASES:
                    v = rec.get(phase)
                    if v is None:
                        continue
                    h = self.latency.setdefault((phase, src, dst), [0] * (len(self.BUCKETS) + 2))
                    for i, b in enumerate(self.BUCKETS):
                        if v <= b:
                            h[i] += 1
                    h[-2] += 1
                    h[-1] += v
            elif kind == "conn":
                self.connections[rec.get("event") or "?"] += 1
        if kind == "request" and rec.get("verdict") in ("deny", "error", "audit"):
            log.info("L7 %s %s %s %s%s from %s (%s) to %s: rule %s: %s", rec.get("verdict"), rec.get("status"),
                     rec.get("method"), rec.get("host") or "", rec.get("path"), rec.get("src_app"),
                     rec.get("client"), rec.get("dst_app"), rec.get("rule") or "-", rec.get("reason"))
        elif kind == "conn" and rec.get("event") not in ("accepted", "closed", "ready", "routed"):
            log.warning("L7 connection %s %s: %s", rec.get("event"), rec.get("flow_id") or "", rec.get("detail"))

    def since(self, after: int, limit: int) -> tuple[int, list[dict]]:
        with self.lock:
            out = [r for r in self.recent if r["seq"] > after]
            return self.seq, out[-limit:] if limit else out

    def totals(self) -> dict:
        with self.lock:
            by_verdict: collections.Counter = collections.Counter()
            for (verdict, *_), n in self.requests.items():
                by_verdict[verdict] += n
            out = {"by_verdict": dict(by_verdict), "connections": dict(self.connections)}
            if self.routes:
                out["routes"] = [{"router": r, "route": rt, "backend": b, "verdict": v, "count": n}
                                 for (r, rt, b, v), n in sorted(self.routes.items())]
            return out
