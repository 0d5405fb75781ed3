"""HTTP response time per hop, for requests between two gateways (the kernel's BH_FE_HOP events).

The client's gateway (A) and the server's (B) each time a request on their own clock; B
tells A its part in the VNI of the answer (bpf/bulkhead.c, "request timing per hop"). One
event per request carries four times, in units of 1024 ns (0: unknown):

    crtt      A: client RTT, SYN-ACK -> ACK            (the client's network, both ways)
    near      A: request -> answer, at A               (HTTP: first answer byte; TLS: last)
    far       B: request -> answer, at B               (as B saw the same request)
    far_srtt  B: server RTT, SYN -> SYN-ACK            (the app's VPC, both ways)

and these parts, which add up to what the client waited (total = ingress + near):

    ingress   = crtt                  client <-> its gateway
    backbone  = near - far            gateway <-> gateway (the transit, both ways)
    app_vpc   = far_srtt              far gateway <-> app
    app       = far - far_srtt        the app's own time to its first (TLS: last) byte

B's part travels as a 7-bit log-float (within 1/16 of its value, in steps of 16.4 us):
backbone and app inherit that error. TLS requests the gateways don't decrypt are inferred
from TCP timing (a client record after an answer is the next request) and labelled so.
"""
from __future__ import annotations

import collections
import socket
import threading
import time

from bulkhead.datapath import abi

UNIT_S = 1024e-9
HOPS = ("ingress", "backbone", "app_vpc", "app", "total")
MODES = {abi.HOP_HTTP: "http", abi.HOP_TLS: "tls_inferred"}
# Histogram bounds (seconds): what `fleet latency` and the metric read p50/p99 from.
BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175,
          0.02, 0.025, 0.03, 0.035, 0.04, 0.05, 0.06, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4,
          0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, float("inf"))
DEFAULT_KEEP = 2000

# ------------------------------------------------------------ the VNI's code (mirror of C)
UNIT_SHIFT = 4


def code(units: int) -> int:
    """bh_hop_code: a duration in units of 1024 ns -> 7 bits (1..127)."""
    v = units >> UNIT_SHIFT
    if v < 16:
        return max(v, 1)
    e = min(v.bit_length() - 1, 27)
    r = (v + (1 << (e - 4))) >> (e - 3)
    if r >= 16:
        e, r = e + 1, 8
    if e > 17:
        return 127
    return ((e - 2) << 3) | (r - 8)


def units(c: int) -> int:
    """bh_hop_units: 7 bits -> units of 1024 ns."""
    if c < 16:
        return c << UNIT_SHIFT
    e = ((c >> 3) & 15) + 2
    return ((8 + (c & 7)) << (e - 3)) << UNIT_SHIFT


# ------------------------------------------------------------ one request
def parts(crtt: int, near: int, far: int, far_srtt: int) -> dict[str, float | None]:
    """The four raw times (units) -> seconds per hop (None: not measured)."""
    s = {k: v * UNIT_S if v else None for k, v in
         (("crtt", crtt), ("near", near), ("far", far), ("far_srtt", far_srtt))}
    out: dict[str, float | None] = dict.fromkeys(HOPS)
    out["ingress"] = s["crtt"]
    if s["near"] is not None and s["far"] is not None:
        out["backbone"] = max(s["near"] - s["far"], 0.0)
        if s["far_srtt"] is not None:
            out["app_vpc"] = s["far_srtt"]
            out["app"] = max(s["far"] - s["far_srtt"], 0.0)
    if s["near"] is not None and s["crtt"] is not None:
        out["total"] = s["crtt"] + s["near"]
    return out


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1e3, 3)


def record(ev: abi.FlowEvent, rec: dict) -> dict:
    """A decoded BH_FE_HOP event (flowlog.decode's names) -> the request record users see."""
    p = parts(ev.packets, ev.bytes, ev.r_packets, ev.r_bytes)
    return {
        "time": rec["time"], "source": "fabric", "mode": MODES.get(ev.prev_reason, "?"),
        "inferred": ev.prev_reason == abi.HOP_TLS,
        "src_app": rec["src_app"], "dst_app": rec["dst_app"], "rule": rec["rule"],
        "segment": rec["segment"], "src": rec["src"], "sport": rec["sport"],
        "dst": rec["dst"], "dport": socket.ntohs(ev.dport_be), "via": rec["via"],
        "hops_ms": {k: ms(v) for k, v in p.items()},
    }


# ------------------------------------------------------------ histograms
def bucket(v: float) -> int:
    for i, b in enumerate(BOUNDS):
        if v <= b:
            return i
    return len(BOUNDS) - 1


def quantile(buckets: list[int], q: float) -> float | None:
    """The q-quantile of a BOUNDS histogram, linear inside its bucket (the last: its lower bound)."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank, cum = q * total, 0
    for i, n in enumerate(buckets):
        if n and cum + n >= rank:
            lo = BOUNDS[i - 1] if i else 0.0
            hi = BOUNDS[i]
            if hi == float("inf"):
                return lo
            return lo + (hi - lo) * max(0.0, rank - cum) / n
        cum += n
    return None


def merge(into: dict, hists: list[dict]) -> dict:
    """Add exported histograms ({src_app, dst_app, hop, mode, buckets, count, sum_s}) into `into`."""
    for h in hists:
        key = (h["src_app"], h["dst_app"], h["hop"], h["mode"])
        m = into.setdefault(key, {"buckets": [0] * len(BOUNDS), "count": 0, "sum_s": 0.0})
        if len(h["buckets"]) != len(BOUNDS):
            raise ValueError(f"a histogram of {len(h['buckets'])} buckets, expected {len(BOUNDS)}")
        m["buckets"] = [a + b for a, b in zip(m["buckets"], h["buckets"])]
        m["count"] += h["count"]
        m["sum_s"] += h["sum_s"]
    return into


def summary(merged: dict) -> list[dict]:
    """Merged histograms -> [{src_app, dst_app, mode, hop, count, p50_ms, p99_ms, mean_ms}]."""
    order = {h: i for i, h in enumerate(HOPS)}
    out = []
    for (s, d, hop, mode), m in sorted(merged.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3],
                                                                       order.get(kv[0][2], 99))):
        if not m["count"]:
            continue
        out.append({"src_app": s, "dst_app": d, "mode": mode, "hop": hop, "count": m["count"],
                    "p50_ms": ms(quantile(m["buckets"], 0.5)), "p99_ms": ms(quantile(m["buckets"], 0.99)),
                    "mean_ms": ms(m["sum_s"] / m["count"])})
    return out


def fleet_summary(docs: list[dict], app: str | None = None, max_age: float | None = None,
                  now: float | None = None) -> dict:
    """Every gateway's published histograms (fleet/latency.read) summed:
    {"gateways": [{name, updated, age_s, requests, used, error}], "latency": summary rows}.

    `app` keeps the pairs with that app at either end; `max_age` leaves out gateways whose last
    publish is older (a gateway long dead).
    """
    now = time.time() if now is None else now
    merged: dict = {}
    gws = []
    for d in docs:
        updated = d.get("updated")
        age = round(now - updated, 1) if isinstance(updated, (int, float)) else None
        g = {"name": d["name"], "updated": updated, "age_s": age, "requests": 0, "used": False,
             "error": d.get("error")}
        gws.append(g)
        if g["error"] or (max_age is not None and (age is None or age > max_age)):
            continue
        hists = [h for h in d.get("histograms") or [] if isinstance(h, dict)
                 and (app is None or app in (h.get("src_app"), h.get("dst_app")))]
        try:
            merge(merged, hists)
        except (KeyError, TypeError, ValueError) as e:
            g["error"] = f"histograms unreadable: {e}"
            continue
        g["used"] = True
        g["requests"] = sum(h["count"] for h in hists if h.get("hop") == "total")
    return {"gateways": gws, "latency": summary(merged)}


class HopLog:
    """Recent per-hop request records (bounded) and their histograms, per app pair, hop and mode."""

    def __init__(self, keep: int = DEFAULT_KEEP):
        self.lock = threading.Lock()
        self.recent: collections.deque = collections.deque(maxlen=keep)
        self.seq = 0
        self.hists: dict[tuple, dict] = {}
        self.started = time.time()

    def add(self, r: dict) -> None:
        with self.lock:
            self.seq += 1
            r["seq"] = self.seq
            self.recent.append(r)
            for hop, v in r["hops_ms"].items():
                if v is None:
                    continue
                key = (r["src_app"], r["dst_app"], hop, r["mode"])
                m = self.hists.setdefault(key, {"buckets": [0] * len(BOUNDS), "count": 0, "sum_s": 0.0})
                m["buckets"][bucket(v / 1e3)] += 1
                m["count"] += 1
                m["sum_s"] += v / 1e3

    def since(self, after: int | None, limit: int) -> list[dict]:
        with self.lock:
            recs = [r for r in self.recent if after is None or r["seq"] > after]
        return recs[-limit:] if limit else recs

    def export(self) -> list[dict]:
        """The histograms, as `merge` reads them (what a gateway publishes to the fleet store)."""
        with self.lock:
            return [{"src_app": s, "dst_app": d, "hop": h, "mode": mo, "buckets": list(m["buckets"]),
                     "count": m["count"], "sum_s": m["sum_s"]} for (s, d, h, mo), m in self.hists.items()]

    def summary(self) -> list[dict]:
        return summary(merge({}, self.export()))

    def reply(self, req: dict) -> dict:
        """The control socket's `requests` answer, its per-hop half: records after `hop_after`."""
        after = req.get("hop_after")
        return {"hop_seq": self.seq, "hop_latency": self.summary(),
                "hop_requests": self.since(None if after is None else int(after), int(req.get("limit", 1000)))}
