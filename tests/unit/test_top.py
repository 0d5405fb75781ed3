"""`bulkhead top` frame building (pure, no agent) and the Grafana dashboard in docs/."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from bulkhead.cli import top

ROOT = Path(__file__).resolve().parents[2]


def flow(src_app, dst_app, *, direction="forward", verdict="pass", reason="allow_rule", rule="r", packets=1,
         bytes=100, sport=40000, audit=False, idle_s=0.0, **kw):
    return {"segment": "prod", "direction": direction, "proto": "tcp", "src": "198.18.1.10", "sport": sport,
            "dst": "198.19.0.10", "dport": 443, "src_app": src_app, "dst_app": dst_app, "rule": rule,
            "reason": reason, "verdict": verdict, "audit": audit, "generation": 1, "packets": packets,
            "bytes": bytes, "idle_s": idle_s, "sni": None, **kw}


def counters(**by_reason):
    verdicts = {"allow_rule": "pass", "deny_rule": "drop", "reject_rule": "reject", "audit_rule": "pass",
                "audit_default": "pass", "allow_reply": "pass"}
    return {r: {"verdict": verdicts[r], "packets": p, "bytes": b} for r, (p, b) in by_reason.items()}


# ------------------------------------------------------------ classification
@pytest.mark.parametrize("rec, want", [
    ({"verdict": "pass", "reason": "allow_rule"}, "pass"),
    ({"verdict": "drop", "reason": "deny_default"}, "drop"),
    ({"verdict": "reject", "reason": "reject_rule"}, "reject"),
    ({"verdict": "pass", "reason": "audit_rule", "audit": True}, "audit"),   # today's flows op
    ({"verdict": "pass", "reason": "audit_default"}, "audit"),
    ({"verdict": "audit", "reason": "audit_rule"}, "audit"),                 # the flow log's verdict
    ({"verdict": "pass", "audit": True}, "audit"),                           # no reason: the flag decides
    ({"verdict": "pass", "reason": "allow_reply", "audit": True}, "pass"),   # reply of an audited flow
    ({"verdict": "tx"}, "reject"),
    ({}, "?"),
])
def test_verdict_of(rec, want):
    assert top.verdict_of(rec) == want


# --------------------------------------------------------------------- rates
def test_counter_rates_by_verdict_with_audit_apart():
    prev = counters(allow_rule=(100, 10_000), deny_rule=(10, 600), audit_rule=(5, 300))
    cur = counters(allow_rule=(300, 30_000), deny_rule=(30, 1_800), audit_rule=(25, 1_500), reject_rule=(4, 240))
    r = top.counter_rates(prev, cur, 2.0)
    assert r["by_verdict"]["pass"] == {"pps": 100.0, "bps": 10_000.0}
    assert r["by_verdict"]["drop"] == {"pps": 10.0, "bps": 600.0}
    assert r["by_verdict"]["audit"] == {"pps": 10.0, "bps": 600.0}     # not counted as pass, nor as drop
    assert r["by_verdict"]["reject"] == {"pps": 2.0, "bps": 120.0}     # new reason: counts from zero
    assert [x["reason"] for x in r["by_reason"]] == ["allow_rule", "audit_rule", "deny_rule", "reject_rule"]


def test_counter_rates_need_two_samples_and_survive_resets():
    cur = counters(allow_rule=(10, 1000))
    assert top.counter_rates(None, cur, 2.0) is None
    assert top.counter_rates(cur, cur, 0) is None
    r = top.counter_rates(counters(allow_rule=(500, 50_000)), cur, 1.0)   # went backwards: maps re-created
    assert r["by_verdict"]["pass"]["pps"] == 10.0
    # malformed entries are skipped, an empty counter table is all zeros
    assert top.counter_rates({}, {"x": 3}, 1.0)["by_verdict"]["pass"]["pps"] == 0


def test_event_rate():
    assert top.event_rate({"flow_new": 10}, {"flow_new": 30}, "flow_new", 2.0) == 10.0
    assert top.event_rate(None, {"flow_new": 30}, "flow_new", 2.0) is None
    assert top.event_rate({}, {}, "flow_new", 2.0) is None


# --------------------------------------------------------------------- pairs
def test_aggregate_pairs_counts_forward_entries_and_folds_replies():
    flows = [
        flow("web", "payments", sport=1, bytes=1000, packets=10),
        flow("web", "payments", direction="reply", reason="allow_reply", sport=1, bytes=50_000, packets=40),
        flow("web", "payments", sport=2, bytes=500, packets=5, rule="web-to-payments"),
        flow("laptops", "catalog", verdict="reject", reason="reject_rule", rule="laptops-catalog", bytes=60),
        flow("laptops", "payments", reason="audit_rule", audit=True, rule="audit-me", bytes=20_000),
    ]
    pairs = top.aggregate_pairs(flows)
    assert [(p["src_app"], p["dst_app"]) for p in pairs] == [
        ("web", "payments"), ("laptops", "payments"), ("laptops", "catalog")]   # by bytes, both ways
    web = pairs[0]
    assert web["flows"] == 2 and web["packets"] == 15 and web["bytes"] == 1500
    assert web["reply_packets"] == 40 and web["reply_bytes"] == 50_000
    assert web["verdicts"] == {"pass": 2} and web["rules"] == {"r": 1, "web-to-payments": 1}
    assert web["bps"] is None                                                # no previous sample
    assert pairs[1]["verdicts"] == {"audit": 1}
    assert pairs[2]["verdicts"] == {"reject": 1}


def test_aggregate_pairs_ties_by_flows_then_name():
    flows = [flow("b", "x", bytes=0), flow("a", "x", bytes=0, sport=2), flow("c", "x", bytes=0, sport=3),
             flow("c", "x", bytes=0, sport=4)]
    assert [p["src_app"] for p in top.aggregate_pairs(flows)] == ["c", "a", "b"]


def test_aggregate_pairs_rate_between_samples():
    prev = [flow("web", "payments", sport=1, bytes=1000),
            flow("web", "payments", sport=1, direction="reply", bytes=4000),
            flow("web", "payments", sport=9, bytes=7000)]              # gone by now: not counted
    cur = [flow("web", "payments", sport=1, bytes=3000),               # +2000
           flow("web", "payments", sport=1, direction="reply", bytes=10_000),   # +6000
           flow("web", "payments", sport=2, bytes=2000),               # new: +2000
           flow("ops", "payments", sport=3, bytes=100)]
    pairs = {p["src_app"]: p for p in top.aggregate_pairs(cur, prev, 2.0)}
    assert pairs["web"]["bps"] == 5000.0
    assert pairs["ops"]["bps"] == 50.0
    # a tuple reused by a new flow (counters below the old ones) counts from zero
    again = top.aggregate_pairs([flow("web", "payments", sport=1, bytes=10)], prev, 1.0)
    assert again[0]["bps"] == 10.0


def test_aggregate_pairs_tolerates_missing_fields():
    pairs = top.aggregate_pairs([{}, {"src_app": "web"}, {"packets": None, "bytes": "x"}])
    assert {(p["src_app"], p["dst_app"]) for p in pairs} == {("-", "-"), ("web", "-")}
    assert sum(p["flows"] for p in pairs) == 3


# ------------------------------------------------------------------ denials
def event(kind, verdict, seq, **kw):
    return {"seq": seq, "time": 1_700_000_000 + seq, "kind": kind, "verdict": verdict, "src_app": "laptops",
            "dst_app": "catalog", "rule": "laptops-catalog", "reason": kw.pop("reason", verdict + "_rule"), **kw}


def test_event_log_keeps_audit_apart_and_newest_first():
    evs = [event("new", "drop", 1), event("new", "pass", 2), event("new", "audit", 3, reason="audit_rule"),
           event("new", "reject", 4), event("end", "drop", 5), event("change", "drop", 6),
           event("new", "pass", 7, reason="audit_default")]
    log = top.EventLog()
    log.update([{"ok": True, "seq": 7, "events": evs}])
    assert [d["seq"] for d in log.denials] == [6, 4, 1]                 # end events are not listed again
    assert {d["verdict"] for d in log.denials} == {"drop", "reject"}
    assert [a["seq"] for a in log.would_deny] == [7, 3]
    assert all(a["verdict"] == "audit" for a in log.would_deny)


def test_denials_from_flows_fallback():
    flows = [flow("a", "b", verdict="drop", reason="deny_default", idle_s=5.0),
             flow("a", "b", verdict="drop", reason="deny_rule", idle_s=1.0, sport=2),
             flow("a", "b", verdict="pass", reason="audit_rule", audit=True, sport=3),
             flow("a", "b", direction="reply", verdict="drop", sport=4),        # replies are not listed
             flow("a", "b", sport=5)]
    denied, audit = top.denials_from_flows(flows)
    assert [d["reason"] for d in denied] == ["deny_rule", "deny_default"]
    assert [a["verdict"] for a in audit] == ["audit"]


def test_event_log_polls_each_verdict_and_dedups():
    calls = []
    log_events = [event("new", "drop", 1), event("new", "audit", 2), event("new", "reject", 4),
                  event("new", "drop", 5)]

    def fetch(op, **kw):
        calls.append((op, kw))
        evs = [e for e in log_events if e["verdict"] == kw["verdict"]][-kw["limit"]:]
        return {"ok": True, "seq": 5, "events": evs, "lost": 0, "kernel_lost": 3}

    log = top.EventLog(keep=2, per_poll=10)
    log.poll(fetch)
    log.poll(fetch)                                                    # the same events again: held once
    assert calls[:3] == [("flow_events", {"verdict": v, "limit": 10}) for v in ("drop", "reject", "audit")]
    assert [d["seq"] for d in log.denials] == [5, 4]                   # newest `keep`
    assert [d["seq"] for d in log.would_deny] == [2]
    assert log.kernel_lost == 3

    # an agent that ignores the verdict filter: the panels still only hold their verdicts
    noisy = top.EventLog()
    noisy.update([{"ok": True, "events": [event("new", "pass", 1), event("new", "drop", 2)]}])
    assert [d["verdict"] for d in noisy.denials] == ["drop"] and noisy.would_deny == []

    old = top.EventLog()
    old.update([{"ok": False, "code": 2, "error": "unknown op 'flow_events'"}])
    assert not old.available and "unknown op" in old.error
    old.poll(lambda *a, **k: pytest.fail("no more polls once the op is unknown"))


# ------------------------------------------------------------------ latency
def test_latency_rows_absent_empty_and_sorted():
    assert top.latency_rows({}) is None
    assert top.latency_rows({"latency": []}) == []
    rows = top.latency_rows({"latency": [
        {"src_app": "web", "dst_app": "payments", "kind": "server_rtt", "count": 3, "p50_ms": 0.2, "p99_ms": 1.5,
         "mean_ms": 0.4},
        {"src_app": "web", "dst_app": "catalog", "kind": "server_time", "count": 10},
        "junk",
    ]})
    assert [(r["dst_app"], r["count"]) for r in rows] == [("catalog", 10), ("payments", 3)]
    assert rows[0]["p99_ms"] is None


# -------------------------------------------------------------------- frame
def status(counters_, events=None, **extra):
    return {"pid": 42, "uptime_s": 3725, "generation": 7,
            "policy": {"files": ["p.yaml"], "settings": {"mode": "enforce", "default_action": "deny"}},
            "flows": {"flows4": 3, "flows6": 0}, "counters": counters_, "events": events or {},
            "verifier": {"running": True, "pid": 99, "port": 15001, "restarts": 1,
                         "requests": {"by_verdict": {"allow": 4, "deny": 1}}}, **extra}


def test_build_frame_full():
    prev = {"t": 10.0, "status": status(counters(allow_rule=(100, 1000), deny_rule=(0, 0)), {"flow_new": 4}),
            "flows": [flow("web", "payments", bytes=1000)]}
    cur = {"t": 12.0,
           "status": status(counters(allow_rule=(300, 5000), deny_rule=(8, 480)), {"flow_new": 10},
                            latency=[{"src_app": "web", "dst_app": "payments", "kind": "server_rtt", "count": 5,
                                      "p50_ms": 0.3, "p99_ms": 2.0, "mean_ms": 0.5}]),
           "flows": [flow("web", "payments", bytes=3000),
                     flow("laptops", "catalog", verdict="drop", reason="deny_rule", sport=7, bytes=60)]}
    log = top.EventLog()
    log.update([{"ok": True, "seq": 2, "events": [event("new", "drop", 1), event("new", "audit", 2)],
                 "kernel_lost": 0}])
    f = top.build_frame(cur, prev, log, rows=5)
    assert f["interval_s"] == 2.0
    assert f["agent"]["generation"] == 7 and f["agent"]["mode"] == "enforce"
    assert f["rates"]["by_verdict"]["pass"]["pps"] == 100.0
    assert f["rates"]["by_verdict"]["drop"]["pps"] == 4.0
    assert f["rates"]["new_flows_per_s"] == 3.0
    assert f["pairs"][0]["src_app"] == "web" and f["pairs"][0]["bps"] == 1000.0
    assert f["denials_source"] == "events"
    assert [d["verdict"] for d in f["denials"]] == ["drop"]
    assert [d["verdict"] for d in f["would_deny"]] == ["audit"]
    assert f["event_loss"] == {"kernel_lost": 0}
    assert f["latency"][0]["p99_ms"] == 2.0
    assert f["verifier"]["running"] and f["verifier"]["requests"] == {"allow": 4, "deny": 1}
    assert f["notes"] == []
    json.dumps(f)                                                         # --json prints it as is


def test_build_frame_minimal_agent():
    """First sample, an agent without flow log or latency, a status with little in it."""
    f = top.build_frame({"t": 1.0, "status": {"counters": {}}, "flows": [
        flow("laptops", "catalog", verdict="drop", reason="deny_rule"),
        flow("laptops", "payments", reason="audit_default")]}, None, None)
    assert f["rates"] is None and f["interval_s"] is None
    assert f["denials_source"] == "flows" and len(f["denials"]) == 1 and len(f["would_deny"]) == 1
    assert f["latency"] == [] and f["event_loss"] is None
    assert not f["verifier"]["running"]
    assert any("no hop latency" in n for n in f["notes"])
    f = top.build_frame({"t": 1.0, "status": {}, "flows": []}, {"t": 1.0, "status": {}, "flows": []})
    assert f["rates"] is None                                             # zero interval: no rates
    f = top.build_frame({"t": 1.0, "status": {"flow_log": {"running": False, "error": "no ring"}}, "flows": []})
    assert "the agent's flow log is not running: no ring" in f["notes"]


def test_build_frame_limits_rows():
    flows = [flow(f"app{i}", "db", sport=i, bytes=i) for i in range(30)]
    f = top.build_frame({"t": 0, "status": {}, "flows": flows}, rows=4)
    assert len(f["pairs"]) == 4 and f["pairs_total"] == 30 and f["pairs"][0]["src_app"] == "app29"


# ---------------------------------------------------------------- rendering
def render_text(frame) -> str:
    from rich.console import Console

    con = Console(file=io.StringIO(), width=160, color_system=None)
    con.print(top.render(frame))
    return con.file.getvalue()


def test_render_full_and_empty_frames():
    log = top.EventLog()
    log.update([{"ok": True, "seq": 2, "events": [event("new", "drop", 1), event("new", "audit", 2)],
                 "lost": 0, "kernel_lost": 3}])
    cur = {"t": 2.0, "status": status(counters(allow_rule=(10, 1000)), latency=[]),
           "flows": [flow("web", "payments", bytes=2_500_000), flow("[bold]ops", "db", rule="[x]", sport=2)]}
    out = render_text(top.build_frame(cur, {"t": 1.0, "status": status({}), "flows": []}, log))
    for text in ("generation 7", "web", "payments", "2.5 MB", "Would deny", "laptops-catalog", "3 flow events lost",
                 "L7 verifier", "no hop-latency samples yet",
                 "[bold]ops", "[x]"):                                   # names are never rich markup
        assert text in out, text
    assert "(no flows)" in render_text(top.build_frame({"t": 0, "status": {}, "flows": []}))
    assert "SNI" not in out                                              # no server names: no column
    log.update([{"ok": True, "events": [event("new", "drop", 9, sni="pay.example.internal")]}])
    assert "pay.example.internal" in render_text(top.build_frame(cur, None, log))


def test_run_once_json_and_agent_errors():
    st = status(counters(allow_rule=(10, 1000)))

    def fetch(op, **kw):
        if op == "status":
            return {"ok": True, "status": st}
        if op == "flows":
            return {"ok": True, "flows": [flow("web", "payments")]}
        return {"ok": False, "code": 2, "error": f"unknown op {op!r}"}

    from rich.console import Console

    con = Console(file=io.StringIO(), width=120)
    assert top.run(fetch, interval=0, once=True, as_json=True, console=con) == 0
    frame = json.loads(con.file.getvalue())
    assert frame["pairs"][0]["dst_app"] == "payments" and frame["denials_source"] == "flows"

    with pytest.raises(top.TopError, match="boom"):
        top.run(lambda op, **kw: {"ok": False, "error": "boom"}, interval=0, once=True,
                console=Console(file=io.StringIO()))


def test_formatting():
    assert top.fmt_count(1234) == "1.2k" and top.fmt_count(3) == "3" and top.fmt_count(None) == "-"
    assert top.fmt_bytes(999) == "999 B" and top.fmt_bytes(2_500_000) == "2.5 MB"
    assert top.fmt_ms(0.123) == "0.12" and top.fmt_ms(None) == "-"
    assert top.fmt_duration(3725) == "1h02m" and top.fmt_duration(59) == "0m59s"


# ---------------------------------------------------------- Grafana dashboard
DASHBOARD = ROOT / "docs" / "grafana-bulkhead.json"
# What the agent exports (prometheus-client adds _total to counters; histograms have _bucket/_sum/_count).
METRICS = {
    "bulkhead_packets_total", "bulkhead_bytes_total", "bulkhead_flows_total", "bulkhead_flow_packets_total",
    "bulkhead_flow_bytes_total", "bulkhead_l7_requests_total", "bulkhead_verifier_up",
    "bulkhead_verifier_restarts_total", "bulkhead_map_entries", "bulkhead_map_capacity",
    "bulkhead_flow_evictions_total", "bulkhead_flow_events_total", "bulkhead_flow_events_lost_total",
    "bulkhead_datapath_events_total", "bulkhead_policy_generation", "bulkhead_policy_apply_seconds",
    "bulkhead_policy_applies_total", "bulkhead_collector_errors_total",
} | {f"{h}_{s}" for h in ("bulkhead_hop_latency_seconds", "bulkhead_l7_request_seconds",
                                           "bulkhead_http_hop_duration_seconds")
     for s in ("bucket", "sum", "count")}
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "by", "without", "rate", "irate", "increase", "changes",
    "histogram_quantile", "clamp_min", "clamp_max", "and", "or", "unless", "on", "ignoring", "group_left",
    "group_right", "bool", "label_values", "offset",
}


def promql_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that are not functions, keywords, labels or variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                            # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                           # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    expr = re.sub(r"\$\w+", "", expr)                                # $__range, $instance
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"[eE]\d*", n)}


def dashboard_exprs(d: dict):
    for p in d["panels"]:
        for t in p.get("targets", []):
            yield p, t["expr"]
    for a in d["annotations"]["list"]:
        if "expr" in a:
            yield a, a["expr"]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", v["definition"])
            yield v, m.group(1) if m else v["definition"]


def test_promql_names_helper():
    assert promql_names('histogram_quantile(0.99, sum by (le, kind) (rate(x_bucket{a=~"b|c"}[$__rate_interval])))') \
        == {"x_bucket"}
    assert promql_names("max by (map) (100 * a{x=\"1\"} / b)") == {"a", "b"}


def test_dashboard_is_valid_and_uses_known_metrics():
    d = json.loads(DASHBOARD.read_text())
    assert d["title"] and d["uid"] and 36 <= d["schemaVersion"] <= 41
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    ds_vars = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert [v["name"] for v in ds_vars] == ["DS_PROMETHEUS"] and ds_vars[0]["query"] == "prometheus"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    for name in ("src_app", "dst_app"):
        assert variables[name]["definition"].startswith("label_values(")
        assert variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    exprs = list(dashboard_exprs(d))
    assert len(exprs) > 20
    for where, expr in exprs:
        depth = 0
        for ch in re.sub(r'"(?:[^"\\]|\\.)*"', "", expr):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            assert depth >= 0, expr
        assert depth == 0, expr
        unknown = promql_names(expr) - METRICS
        assert not unknown, f"{where.get('title') or where.get('name')}: {unknown} in {expr}"
    used = set().union(*(promql_names(e) for _, e in exprs))
    # every family the agent exports is on the dashboard somewhere
    assert {m.removesuffix("_bucket") for m in METRICS if not m.endswith(("_sum", "_count"))} \
        <= {m.removesuffix("_bucket") for m in used} | {"bulkhead_bytes_total", "bulkhead_flow_packets_total"}


def test_dashboard_panels_have_datasource_and_layout():
    d = json.loads(DASHBOARD.read_text())
    titles = set()
    for p in d["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        titles.add(p["title"])
        if p["type"] != "row":
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["expr"], p["title"]
    # audit (would deny) is its own panel, never summed into the denials
    deny = next(p for p in d["panels"] if p["title"].startswith("Denied flows/s"))
    assert all('verdict=~"drop|reject"' in t["expr"] for t in deny["targets"])
    assert any("Would deny" in t for t in titles)
    assert {"Hop latency p50 by kind", "Hop latency p99 by kind", "Map use %"} <= titles


def test_dashboard_metrics_are_exported_by_the_agent():
    """Every series the dashboard queries is a family agent/telemetry/metrics.py defines, with the right suffix."""
    src = (ROOT / "agent" / "telemetry" / "metrics.py").read_text()
    families = {}
    for kind, name in re.findall(r'(Counter|Gauge|Histogram)MetricFamily\(\s*"(\w+)"', src):
        if kind == "Counter":
            families[name + "_total"] = kind
        elif kind == "Histogram":
            families.update({f"{name}_{s}": kind for s in ("bucket", "sum", "count")})
        else:
            families[name] = kind
    d = json.loads(DASHBOARD.read_text())
    used = set().union(*(promql_names(e) for _, e in dashboard_exprs(d)))
    assert used <= set(families), used - set(families)
