"""`bulkhead fleet latency`: HTTP response time per hop, per app pair, across every gateway.

Each gateway times the requests its clients make to apps behind other gateways
(telemetry/hops.py: one record per request, at the client's gateway) and keeps a histogram per
(src_app, dst_app, hop, mode) since its agent started. A fleet agent publishes those histograms
to its own key every PUBLISH_INTERVAL seconds when they changed:

    /bulkhead/v1/gateways/NAME/latency   JSON {"name", "updated", "started", "agent", "histograms": [...]}

Histograms, not percentiles, travel: percentiles of different gateways can't be combined, their
bucket counts can (telemetry/hops.fleet_summary sums what `read` returns). Every request is
counted once, by the gateway of its client, so the fleet's histogram of a pair is the sum over
gateways. The key is persistent: a gateway that died still shows what it measured (its `updated` says how old that is); an agent restarted starts
its histograms from zero and its next publish replaces the old ones.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable

from bulkhead.fleet.store import GATEWAYS_PREFIX, Store, env_seconds, latency_key

PUBLISH_INTERVAL = 10.0  # seconds; BULKHEAD_FLEET_LATENCY_INTERVAL changes it (tests make it short)
ENV_INTERVAL = "BULKHEAD_FLEET_LATENCY_INTERVAL"


def publish_interval() -> float:
    return env_seconds(ENV_INTERVAL, PUBLISH_INTERVAL, lo=0.5, hi=3600)


class Publisher:
    """Puts one gateway's histograms to its latency key when they changed and the interval passed.

    `source` returns hops.HopLog.export() (called from the follower's keepalive thread).
    `maybe_publish` never raises for the store's sake: a failed put is kept in `error` and tried
    again at the next interval.
    """

    def __init__(self, gateway: str, source: Callable[[], list[dict]], agent_id: str,
                 interval: float | None = None, started: float | None = None):
        self.gateway, self.source, self.agent_id = gateway, source, agent_id
        self.interval = publish_interval() if interval is None else interval
        self.started = time.time() if started is None else started
        self.next_at = 0.0
        self.last: str | None = None  # the histograms last written, as JSON
        self.error: str | None = None

    def doc(self, hists: list[dict]) -> dict:
        return {"name": self.gateway, "updated": time.time(), "started": self.started,
                "agent": self.agent_id, "histograms": hists}

    def maybe_publish(self, store: Store, now: float | None = None) -> bool:
        """Publish if the interval passed and something changed; True if written."""
        now = time.monotonic() if now is None else now
        if now < self.next_at:
            return False
        self.next_at = now + self.interval
        hists = sorted(self.source(), key=lambda h: (h["src_app"] or "", h["dst_app"] or "", h["hop"], h["mode"]))
        body = json.dumps(hists, sort_keys=True)
        if body == self.last:
            return False
        try:
            store.put(latency_key(self.gateway), json.dumps(self.doc(hists)).encode())
        except Exception as e:  # noqa: BLE001 -- etcd away: the follower reconnects; retry next time
            self.error = str(e)
            return False
        self.last, self.error = body, None
        return True


def read(store: Store) -> list[dict]:
    """Every gateway's latency document; a key that isn't one is reported, not fatal."""
    out = []
    for kv in store.get_prefix(GATEWAYS_PREFIX):
        name, _, leaf = kv.key[len(GATEWAYS_PREFIX):].rpartition("/")
        if leaf != "latency" or not name:
            continue
        try:
            d = json.loads(kv.value)
            if not isinstance(d, dict) or not isinstance(d.get("histograms"), list):
                raise ValueError("not a latency document")
        except ValueError as e:
            out.append({"name": name, "error": f"unreadable: {e}", "histograms": []})
            continue
        d["name"] = name
        out.append(d)
    return sorted(out, key=lambda d: d["name"])
