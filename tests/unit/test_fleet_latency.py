"""fleet/latency.py without etcd: when a gateway publishes its histograms, and how they are summed.

The same against a real etcd and the CLI: tests/integration/test_fleet_store.py; from real
agents timing real requests: tests/integration/test_fabric_fleet.py.
"""
from __future__ import annotations

import json

import pytest

from bulkhead.fleet import latency
from bulkhead.fleet.store import KV, FleetStoreError, latency_key
from bulkhead.telemetry.hops import HopLog, fleet_summary


class FakeStore:
    def __init__(self):
        self.kv: dict[str, bytes] = {}
        self.puts = 0
        self.fail = False

    def put(self, key, value, lease=None):
        if self.fail:
            raise FleetStoreError("etcd unreachable at http://198.18.0.1:2379")
        self.puts += 1
        self.kv[key] = value if isinstance(value, bytes) else value.encode()
        return self.puts

    def get_prefix(self, prefix):
        return [KV(k, v, 1, 1) for k, v in sorted(self.kv.items()) if k.startswith(prefix)]


def one(log: HopLog, ms: float = 10.0, src: str = "web", dst: str = "api") -> None:
    log.add({"time": 0, "src_app": src, "dst_app": dst, "mode": "http",
             "hops_ms": {"ingress": ms, "backbone": ms, "app_vpc": ms, "app": ms, "total": 4 * ms}})


def test_publishes_when_due_and_changed_and_retries_a_failed_put():
    log, st = HopLog(), FakeStore()
    p = latency.Publisher("gw-a", log.export, "host/1", interval=10.0)
    assert p.maybe_publish(st, now=100.0)  # empty histograms are a document too: the gateway is there
    one(log)
    assert not p.maybe_publish(st, now=105.0), "not before the interval"
    assert p.maybe_publish(st, now=110.0)
    doc = json.loads(st.kv[latency_key("gw-a")])
    assert (doc["name"], doc["agent"]) == ("gw-a", "host/1")
    assert sum(h["count"] for h in doc["histograms"] if h["hop"] == "total") == 1
    assert not p.maybe_publish(st, now=120.0), "unchanged: not written again"
    assert st.puts == 2
    one(log)
    st.fail = True
    assert not p.maybe_publish(st, now=130.0) and "unreachable" in p.error
    st.fail = False
    assert p.maybe_publish(st, now=140.0) and p.error is None


def test_sums_gateways_filters_by_app_and_age():
    st = FakeStore()
    logs = {"gw-a": HopLog(), "gw-b": HopLog()}
    for _ in range(3):
        one(logs["gw-a"], 10.0)
    one(logs["gw-b"], 10.0)
    one(logs["gw-b"], 100.0, "batch", "db")
    for gw, log in logs.items():
        latency.Publisher(gw, log.export, "x", interval=0).maybe_publish(st)
    out = fleet_summary(latency.read(st))
    total = {(r["src_app"], r["dst_app"]): r["count"] for r in out["latency"] if r["hop"] == "total"}
    assert total == {("web", "api"): 4, ("batch", "db"): 1}
    assert [(g["name"], g["requests"]) for g in out["gateways"]] == [("gw-a", 3), ("gw-b", 2)]
    only = fleet_summary(latency.read(st), app="web")
    assert {r["src_app"] for r in only["latency"]} == {"web"}
    doc = json.loads(st.kv[latency_key("gw-b")])
    later = doc["updated"] + 120
    aged = fleet_summary(latency.read(st), max_age=60, now=later)
    assert {g["name"]: g["used"] for g in aged["gateways"]} == {"gw-a": False, "gw-b": False}
    assert aged["latency"] == []


def test_a_document_of_another_shape_is_reported_not_summed():
    st = FakeStore()
    st.kv[latency_key("gw-x")] = json.dumps({"histograms": [{"src_app": "a", "dst_app": "b", "hop": "total",
                                                              "mode": "http", "buckets": [1, 2], "count": 3,
                                                              "sum_s": 0.1}]}).encode()
    st.kv[latency_key("gw-y")] = b"[1, 2]"
    out = fleet_summary(latency.read(st))
    errs = {g["name"]: g["error"] for g in out["gateways"]}
    assert "buckets" in errs["gw-x"] and errs["gw-y"].startswith("unreadable")
    assert out["latency"] == []


@pytest.mark.parametrize("raw,ok", [("", True), ("2.5", True), ("0.1", False), ("soon", False)])
def test_the_interval_from_the_environment(monkeypatch, raw, ok):
    monkeypatch.setenv(latency.ENV_INTERVAL, raw)
    if ok:
        assert latency.publish_interval() == (float(raw) if raw else latency.PUBLISH_INTERVAL)
    else:
        with pytest.raises(ValueError, match=latency.ENV_INTERVAL):
            latency.publish_interval()
