"""The flow log, latency summaries, monotonic flow totals and the collector, without a kernel."""
from __future__ import annotations

import collections
import ctypes as C
import dataclasses
import ipaddress
import socket
import time

import pytest
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bulkhead.telemetry import flowlog
from bulkhead.cli.main import parse_map_sizes
from bulkhead.datapath import abi
from bulkhead.telemetry.metrics import SECTIONS, DatapathCollector

APPS = {1: "web", 2: "laptops", 3: "payments"}
RULES = {7: "web-pays", 8: "laptops-audit"}
SEGS = {1: "prod", 2: "dev", 3: "core"}
NAMES = {5: (APPS, RULES, SEGS), 6: ({1: "web2", 3: "payments"}, {7: "renamed"}, SEGS)}


def names(gen: int):
    return NAMES.get(gen, NAMES[5])


def mapped(ip: str) -> bytes:
    a = ipaddress.ip_address(ip)
    return b"\0" * 10 + b"\xff\xff" + a.packed if a.version == 4 else a.packed


def event(kind=abi.FlowEv.NEW, reason=abi.Reason.ALLOW_RULE, src="198.18.1.10", dst="198.19.0.10", sport=40000,
          dport=443, src_app=1, dst_app=3, rule=7, gen=5, seg=1, peer=3, flags=0, sni: bytes = b"", **kw):
    kw.setdefault("family", 6 if ":" in src else 4)
    e = abi.FlowEvent(kind=kind, reason=reason, src_app=src_app, dst_app=dst_app, rule_id=rule, generation=gen,
                      segment_id=seg, peer_segment=peer, flags=flags, proto=6, sport_be=socket.htons(sport),
                      dport_be=socket.htons(dport), ts_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC), **kw)
    C.memmove(e.saddr, mapped(src), 16)
    C.memmove(e.daddr, mapped(dst), 16)
    if sni:
        C.memmove(e.sni, sni, min(len(sni), 64))
        e.sni_len = min(len(sni), 64)
    return e


# ------------------------------------------------------------------ decode
def test_decode_names_addresses_and_time():
    ev = event(kind=abi.FlowEv.END, packets=5, bytes=500, r_packets=4, r_bytes=900, tcp_flags=0x11)
    d = flowlog.decode(ev, names, flowlog.monotonic_offset())
    assert (d["kind"], d["segment"], d["peer_segment"], d["proto"], d["family"]) == ("end", "prod", "core", "tcp", 4)
    assert (d["src"], d["sport"], d["dst"], d["dport"]) == ("198.18.1.10", 40000, "198.19.0.10", 443)
    assert (d["src_app"], d["dst_app"], d["rule"], d["verdict"], d["reason"]) == \
        ("web", "payments", "web-pays", "pass", "allow_rule")
    assert (d["packets"], d["bytes"], d["r_packets"], d["r_bytes"]) == (5, 500, 4, 900)
    assert d["prev_reason"] is None and d["sni"] is None and not d["audit"]
    assert abs(d["time"] - time.time()) < 2


def test_decode_uses_the_generation_of_the_event():
    assert flowlog.decode(event(gen=6), names, 0)["src_app"] == "web2"
    assert flowlog.decode(event(gen=6), names, 0)["rule"] == "renamed"
    assert flowlog.decode(event(gen=99), names, 0)["src_app"] == "web"  # unknown generation: current names


def test_decode_ipv6_by_name_default_rule_and_unknown_ids():
    d = flowlog.decode(event(src="fd00:1::10", dst="fd00:19::10", dst_app=abi.APP_ANY, rule=0,
                             reason=abi.Reason.SNI_PENDING), names, 0)
    assert (d["src"], d["dst"], d["family"]) == ("fd00:1::10", "fd00:19::10", 6)
    assert (d["dst_app"], d["rule"], d["verdict"]) == ("(by name)", "(default)", "pass")
    d = flowlog.decode(event(src_app=0, dst_app=42, rule=77, peer=0), names, 0)
    assert (d["src_app"], d["dst_app"], d["rule"], d["peer_segment"]) == ("-", "app#42", "rule#77", None)


@pytest.mark.parametrize("reason,verdict", [
    (abi.Reason.AUDIT_RULE, "audit"), (abi.Reason.AUDIT_DEFAULT, "audit"), (abi.Reason.DENY_RULE, "drop"),
    (abi.Reason.DENY_DEFAULT, "drop"), (abi.Reason.REJECT_RULE, "reject"), (abi.Reason.FLOW_COLLISION, "drop"),
    (abi.Reason.ALLOW_DEFAULT, "pass"), (abi.Reason.L7_STEER, "pass"), (200, "drop"),
])
def test_verdicts_audit_is_never_a_deny(reason, verdict):
    assert abi.verdict_of(reason) == verdict


def test_audit_event():
    d = flowlog.decode(event(reason=abi.Reason.AUDIT_RULE, rule=8, src_app=2, seg=2, flags=abi.ACTF_AUDIT), names, 0)
    assert (d["verdict"], d["audit"], d["rule"], d["src_app"], d["segment"]) == \
        ("audit", True, "laptops-audit", "laptops", "dev")


def test_change_event_with_server_name():
    ev = event(kind=abi.FlowEv.CHANGE, prev_reason=abi.Reason.SNI_PENDING, sni=b"pay.example.internal",
               flags=abi.FLOWF_REPLY)
    d = flowlog.decode(ev, names, 0)
    assert (d["kind"], d["prev_reason"], d["sni"], d["by_reply"]) == \
        ("change", "sni_pending", "pay.example.internal", True)
    exact = flowlog.decode(event(sni=b"a" * 64), names, 0)["sni"]
    assert exact == "a" * 64  # a 64-byte name fits whole
    ev = event(sni=b"b" * 64)
    ev.sni_len = 200  # the name's length: longer than the log holds
    assert flowlog.decode(ev, names, 0)["sni"] == "b" * 64 + "…"  # cut by the kernel: marked


def test_bad_records_are_counted_not_raised():
    log = flowlog.FlowLog(names)
    log.ingest(event(kind=9))
    log.ingest(event(family=0))
    buf = (C.c_uint8 * 10)()
    log.ingest_raw(buf, 10)  # too short
    ok = event()
    log.ingest_raw(C.cast(C.pointer(ok), C.c_void_p), C.sizeof(ok))
    st = log.stats()
    assert (st["bad"], st["received"], st["kept"]) == (3, 1, 1)


def test_ingest_raw_copies_the_record():
    log = flowlog.FlowLog(names)
    ev = event(sport=1234)
    log.ingest_raw(C.cast(C.pointer(ev), C.c_void_p), C.sizeof(ev))
    ev.sport_be = socket.htons(9)  # the kernel reuses the ring slot
    assert log.since(None, 0)[1][0]["sport"] == 1234


# ------------------------------------------------------------------ buffer
def fill(log: flowlog.FlowLog, n: int, **kw) -> None:
    for i in range(n):
        log.ingest(event(sport=10000 + i, **kw))


def test_since_tail_and_paging():
    log = flowlog.FlowLog(names, keep=100)
    fill(log, 10)
    seq, evs, lost = log.since(None, 3)
    assert seq == 10 and [e["seq"] for e in evs] == [8, 9, 10] and lost == 0
    seq, evs, lost = log.since(0, 4)  # paging forward: the oldest first, continue from the last
    assert [e["seq"] for e in evs] == [1, 2, 3, 4] and seq == 4 and lost == 0
    seq, evs, lost = log.since(seq, 0)
    assert [e["seq"] for e in evs] == list(range(5, 11)) and seq == 10
    assert log.since(10, 10) == (10, [], 0)
    assert log.since(50, 10)[1][0]["seq"] == 1  # a follower of an earlier agent starts over


def test_buffer_bound_and_lost_accounting():
    log = flowlog.FlowLog(names, keep=5)
    fill(log, 3)
    seq, _, _ = log.since(None, 0)
    assert seq == 3
    fill(log, 9)  # seq 4..12; the buffer keeps 8..12
    assert log.stats()["kept"] == 5 and log.stats()["buffer_dropped"] == 7
    nxt, evs, lost = log.since(seq, 0)
    assert lost == 4  # 4..7 fell out unread
    assert [e["seq"] for e in evs] == [8, 9, 10, 11, 12] and nxt == 12
    assert log.since(nxt, 0) == (12, [], 0)
    assert log.since(None, 0)[2] == 0  # the recent view reports no loss


def test_zero_keep_counts_everything_lost():
    log = flowlog.FlowLog(names, keep=0)
    fill(log, 4)
    assert log.since(0, 0) == (4, [], 4)


def test_filters_app_verdict_rule():
    log = flowlog.FlowLog(names)
    log.ingest(event())  # web -> payments pass web-pays
    log.ingest(event(src_app=2, reason=abi.Reason.AUDIT_RULE, rule=8))  # laptops audit
    log.ingest(event(src_app=2, reason=abi.Reason.DENY_DEFAULT, rule=0))  # laptops drop (default)
    pick = lambda **kw: [(e["src_app"], e["verdict"]) for e in log.since(None, 0, **kw)[1]]  # noqa: E731
    assert pick(app="laptops") == [("laptops", "audit"), ("laptops", "drop")]
    assert pick(app="payments") == [("web", "pass"), ("laptops", "audit"), ("laptops", "drop")]
    assert pick(verdict="audit") == [("laptops", "audit")]
    assert pick(verdict="drop") == [("laptops", "drop")]
    assert pick(rule="(default)") == [("laptops", "drop")]
    assert pick(rule="web-pays", verdict="drop") == []
    # paging with a filter moves past what did not match
    seq, evs, _ = log.since(0, 1, verdict="drop")
    assert seq == 3 and [e["verdict"] for e in evs] == ["drop"]


def test_recent_pairs():
    log = flowlog.FlowLog(names)
    fill(log, 2)
    log.ingest(event(kind=abi.FlowEv.END))
    log.ingest(event(src_app=2, reason=abi.Reason.DENY_RULE))
    pairs = {(p["src_app"], p["dst_app"]): p for p in log.recent_pairs()}
    assert pairs[("web", "payments")]["new"] == 2 and pairs[("web", "payments")]["end"] == 1
    assert pairs[("web", "payments")]["by_verdict"] == {"pass": 2}
    assert pairs[("laptops", "payments")]["by_verdict"] == {"drop": 1}


# ----------------------------------------------------------------- latency
BOUNDS = [(2 ** (b + 1)) * 1024e-9 for b in range(abi.LAT_BUCKETS)]


def test_percentile_interpolates_within_a_bucket():
    b = [0] * abi.LAT_BUCKETS
    b[10] = 100  # all in [2^10, 2^11) units
    lo, hi = BOUNDS[9], BOUNDS[10]
    assert flowlog.percentile(b, BOUNDS, 0.5) == pytest.approx(lo + (hi - lo) * 0.5)
    assert flowlog.percentile(b, BOUNDS, 0.99) == pytest.approx(lo + (hi - lo) * 0.99)
    b[20] = 100
    assert flowlog.percentile(b, BOUNDS, 0.5) == pytest.approx(hi)  # the top of the lower half
    assert BOUNDS[19] < flowlog.percentile(b, BOUNDS, 0.99) <= BOUNDS[20]
    assert flowlog.percentile([0] * abi.LAT_BUCKETS, BOUNDS, 0.5) is None
    one = [0] * abi.LAT_BUCKETS
    one[0] = 1
    assert 0 <= flowlog.percentile(one, BOUNDS, 0.5) <= BOUNDS[0]


def test_latency_summary_merges_by_name():
    b1 = [0] * abi.LAT_BUCKETS
    b1[17] = 2
    b2 = [0] * abi.LAT_BUCKETS
    b2[17] = 1
    lat = {(1, 3, abi.Lat.SERVER_TIME): {"buckets": b1, "count": 2, "sum_s": 0.4},
           (4, 3, abi.Lat.SERVER_TIME): {"buckets": b2, "count": 1, "sum_s": 0.2},  # another id, same name
           (1, 3, abi.Lat.SERVER_RTT): {"buckets": [0] * abi.LAT_BUCKETS, "count": 0, "sum_s": 0.0}}
    rows = flowlog.latency_summary(lat, BOUNDS, lambda i: {1: "web", 4: "web", 3: "payments"}[i])
    assert rows == [{"src_app": "web", "dst_app": "payments", "kind": "server_time", "count": 3,
                     "p50_ms": rows[0]["p50_ms"], "p99_ms": rows[0]["p99_ms"], "mean_ms": 200.0}]
    assert BOUNDS[16] * 1e3 <= rows[0]["p50_ms"] <= rows[0]["p99_ms"] <= BOUNDS[17] * 1e3
    one = [0] * abi.LAT_BUCKETS
    one[6] = 1
    row = flowlog.latency_summary({(1, 3, abi.Lat.CLIENT_RTT): {"buckets": one, "count": 1, "sum_s": 70e-6}},
                                  BOUNDS, lambda i: str(i))[0]
    assert row["p50_ms"] == row["p99_ms"] == row["mean_ms"] == 0.07  # one sample: exact


# --------------------------------------------------------- monotonic totals
L1, L2 = ("web", "payments", "web-pays", "pass"), ("web", "payments", "(default)", "drop")


def test_flow_totals_live_then_evicted():
    t = flowlog.FlowTotals()
    assert t.update([("a", L1, 5, 500), ("b", L1, 2, 200)]) == {L1: (7, 700)}
    assert t.update([("a", L1, 9, 900), ("b", L1, 2, 200)]) == {L1: (11, 1100)}
    assert t.update([("a", L1, 10, 1000)]) == {L1: (12, 1200)}  # b evicted: its counts stay
    assert t.update([]) == {L1: (12, 1200)}
    assert t.entries == {}


def test_flow_totals_recreated_key_and_label_change():
    t = flowlog.FlowTotals()
    t.update([("a", L1, 10, 1000)])
    assert t.update([("a", L1, 3, 300)]) == {L1: (13, 1300)}  # counts went down: a new flow on that key
    # re-judged to another rule/verdict: what came before stays with L1, the rest counts for L2
    got = t.update([("a", L2, 5, 500)])
    assert got == {L1: (13, 1300), L2: (2, 200)}
    got = t.update([("a", L2, 8, 800)])
    assert got == {L1: (13, 1300), L2: (5, 500)}
    prev = got
    for snap in ([("a", L1, 9, 900)], [("a", L1, 1, 100)], []):  # never decreases, whatever happens
        cur = t.update(snap)
        for k, (p, b) in prev.items():
            assert cur[k][0] >= p and cur[k][1] >= b
        prev = cur


# --------------------------------------------------------------- map sizes
def test_parse_map_sizes():
    assert parse_map_sizes(["flows=1024", "events-ring-pages=1", "BH_MAX_LAT=64", "pair_flows=0x10"]) == {
        "BH_MAX_FLOWS": 1024, "BH_EVENT_RING_PAGES": 1, "BH_MAX_LAT": 64, "BH_MAX_PAIRS": 16}
    for bad in ("flows", "nope=3", "flows=x", "flows=0", "events_ring_pages=3", f"flows={1 << 30}"):
        with pytest.raises(ValueError):
            parse_map_sizes([bad])


# --------------------------------------------------------------- collector
class FakeDP:
    sizes = dict(abi.DEFAULT_SIZES, BH_MAX_PAIRS=8)

    def __init__(self):
        self.fail: set[str] = set()
        self.entries: list = []
        self.created = 0

    def _maybe(self, name):
        if name in self.fail:
            raise OSError(f"{name} failed")

    def counters(self):
        self._maybe("counters")
        return {r.name.lower(): {"packets": 1, "bytes": 10, "verdict": abi.REASON_VERDICT[r]} for r in abi.Reason}

    def events(self):
        self._maybe("events")
        return {"flow_entry_new": self.created, "flow_event_lost": 3}

    def active_generation(self):
        return 5

    def pair_flows(self):
        self._maybe("pair_flows")
        return {(1, 3, 7, int(abi.Reason.ALLOW_RULE)): 4, (2, 3, 8, int(abi.Reason.AUDIT_RULE)): 2,
                (5, 3, 7, int(abi.Reason.ALLOW_RULE)): 1}  # id 5: "web" in an older policy

    def flow_entries(self):
        self._maybe("flow_entries")
        return self.entries

    def latency(self):
        b = [0] * abi.LAT_BUCKETS
        b[3], b[5] = 1, 2
        return {(1, 3, abi.Lat.SERVER_RTT): {"buckets": b, "count": 3, "sum_s": 0.0003}}

    latency_bounds = staticmethod(lambda: BOUNDS)

    def occupancy(self, name):
        self._maybe("occupancy")
        return 1


class FakeAgent:
    def __init__(self):
        self.dp = FakeDP()
        self.last_apply = {"seconds": 0.5}
        self.applies = {"ok": 2, "failed": 1}
        self.slot_entries = {"pol_exact_0": 12}
        self.flowlog = flowlog.FlowLog(names)
        self.l7 = None

    def app_name(self, i):
        return {1: "web", 5: "web", 2: "laptops", 3: "payments"}.get(i, f"app#{i}")

    def rule_name(self, i):
        return RULES.get(i, "(default)")


def flow_entry(saddr, daddr, sport, dport, seg, peer, packets, reason=abi.Reason.ALLOW_RULE, reply=False):
    k = abi.Flow4Key(saddr_be=saddr, daddr_be=daddr, sport_be=sport, dport_be=dport, proto=6, segment_id=seg)
    v = abi.Flow(packets=packets, bytes=packets * 100, src_app=1, dst_app=3, rule_id=7, reason=reason,
                 peer_segment=peer, flags=abi.FLOWF_REPLY if reply else 0)
    return ("flows4", k, v)


def scrape(collector) -> dict:
    reg = CollectorRegistry()
    reg.register(collector)
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(m: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= set(ls))


def test_collector_names_audit_and_merging():
    agent = FakeAgent()
    agent.dp.entries = [flow_entry(1, 2, 10, 20, 1, 3, 5), flow_entry(2, 1, 20, 10, 3, 1, 4, abi.Reason.ALLOW_REPLY,
                                                                      reply=True)]
    agent.dp.created = 10
    m = scrape(DatapathCollector(agent))
    assert get(m, "bulkhead_flows_total", src_app="web", dst_app="payments", rule="web-pays", verdict="pass") == 5
    assert get(m, "bulkhead_flows_total", src_app="laptops", verdict="audit", reason="audit_rule") == 2
    assert get(m, "bulkhead_flows_total", verdict="drop") == 0
    assert get(m, "bulkhead_packets_total", reason="audit_rule", verdict="audit") == 1
    # both directions of a flow under the forward entry's labels
    assert get(m, "bulkhead_flow_packets_total", src_app="web", rule="web-pays", verdict="pass") == 9
    assert get(m, "bulkhead_flow_evictions_total") == 8
    assert get(m, "bulkhead_hop_latency_seconds_count", kind="server_rtt", src_app="web") == 3
    assert get(m, "bulkhead_hop_latency_seconds_bucket", kind="server_rtt", le="+Inf") == 3
    assert get(m, "bulkhead_map_capacity", map="pair_flows") == 8
    assert get(m, "bulkhead_map_entries", map="pol_exact_0") == 12
    assert get(m, "bulkhead_map_entries", map="flows4") == 2
    assert get(m, "bulkhead_map_entries", map="stats") == abi.REASON_MAX
    assert get(m, "bulkhead_flow_events_lost_total", where="kernel") == 3
    assert get(m, "bulkhead_policy_applies_total", result="failed") == 1
    assert get(m, "bulkhead_collector_errors_total") == 0


def test_collector_sections_fail_alone_and_counters_stay_monotonic():
    agent = FakeAgent()
    c = DatapathCollector(agent)
    agent.dp.entries = [flow_entry(1, 2, 10, 20, 1, 3, 5)]
    agent.dp.created = 1
    m1 = scrape(c)
    agent.dp.fail = {"pair_flows", "flow_entries"}
    m2 = scrape(c)
    assert get(m2, "bulkhead_collector_errors_total", section="pair_flows") == 1
    assert get(m2, "bulkhead_collector_errors_total", section="flow_table") == 1
    assert get(m2, "bulkhead_policy_generation") == 5 and get(m2, "bulkhead_packets_total") > 0
    assert {dict(ls)["section"] for (n, ls) in m2 if n == "bulkhead_collector_errors_total"} == set(SECTIONS)
    agent.dp.fail = set()
    agent.dp.entries = []  # evicted
    agent.dp.created = 1
    m3 = scrape(c)
    assert get(m3, "bulkhead_flow_packets_total", src_app="web") == get(m1, "bulkhead_flow_packets_total",
                                                                        src_app="web") == 5
    assert get(m3, "bulkhead_flow_evictions_total") == 1
    agent.dp.entries = [flow_entry(1, 2, 10, 20, 1, 3, 2)]  # re-created, more entries than created says
    assert get(scrape(c), "bulkhead_flow_evictions_total") == 1  # clamped: never decreases


def test_cli_event_line():
    from bulkhead.cli.render import EVENT_HEADER, event_line as _event_line

    e = flowlog.decode(event(src="fd00:1::10", dst="fd00:19::10", kind=abi.FlowEv.END, packets=5, bytes=500,
                             r_packets=4, r_bytes=900), names, 0)
    line = _event_line(e)
    assert "[fd00:1::10]:40000 -> [fd00:19::10]:443" in line and "web -> payments" in line
    assert line.split()[1:3] == ["end", "prod"] and line.endswith("5/500 4/900")
    ch = flowlog.decode(event(kind=abi.FlowEv.CHANGE, prev_reason=abi.Reason.SNI_PENDING, sni=b"pay.example"),
                        names, 0)
    assert "allow_rule (was sni_pending)" in _event_line(ch) and "pay.example" in _event_line(ch)
    assert EVENT_HEADER.split()[:3] == ["TIME", "KIND", "SEGMENT"]


# ------------------------------------------------------- server names kept
def test_server_names_of_decided_flows_are_kept_bounded(monkeypatch):
    """The kernel keeps only a name's hashes in the flow entries: the flow
    table's `sni` comes from the decision events, by forward 5-tuple."""
    monkeypatch.setattr(flowlog.FlowLog, "MAX_NAMES", 2)
    fl = flowlog.FlowLog(names, keep=10)
    fl.ingest(event(kind=abi.FlowEv.CHANGE, prev_reason=abi.Reason.SNI_PENDING, sni=b"pay.example", sport=1))
    fl.ingest(event(kind=abi.FlowEv.CHANGE, sport=2))  # a re-decision tells no name: nothing kept
    key = lambda sport: (1, mapped("198.18.1.10"), socket.htons(sport), mapped("198.19.0.10"), socket.htons(443))  # noqa: E731
    assert fl.server_name(*key(1)) == "pay.example"
    assert fl.server_name(*key(2)) is None
    fl.ingest(event(kind=abi.FlowEv.CHANGE, sni=b"b.example", sport=3))
    fl.ingest(event(kind=abi.FlowEv.CHANGE, sni=b"c.example", sport=4))
    assert fl.server_name(*key(1)) is None, "the oldest name goes first"
    assert (fl.server_name(*key(3)), fl.server_name(*key(4))) == ("b.example", "c.example")
    assert fl.server_name(2, *key(3)[1:]) is None, "another segment's flow"


def test_collector_counts_the_gateways_dns_by_segment_and_answer():
    import types

    agent = FakeAgent()
    assert get(scrape(DatapathCollector(agent)), "bulkhead_dns_queries_total") == 0  # no fabric: no family
    agent.dns = types.SimpleNamespace(by_segment=collections.Counter({("prod", "noerror"): 3, ("dev", "nxdomain"): 2}))
    m = scrape(DatapathCollector(agent))
    assert get(m, "bulkhead_dns_queries_total", segment="prod", answer="noerror") == 3
    assert get(m, "bulkhead_dns_queries_total", segment="dev", answer="nxdomain") == 2
    assert get(m, "bulkhead_collector_errors_total", section="dns") == 0


# ------------------------------------------------------------ the fabric
FABRIC_DOC = {
    "version": 1,
    "settings": {"default_action": "deny"},
    "gateways": [{"name": "gwa", "transit": "198.18.100.1"}, {"name": "gwb", "transit": "198.18.100.2"}],
    "fabric": {"service_addresses": ["198.19.255.0/24", "fd00:ff::/120"]},
    "segments": [{"name": "a-cli", "gateway": "gwa", "interfaces": ["bh-cli"]},
                 {"name": "a-srv", "gateway": "gwa", "interfaces": ["bh-srv"]},
                 {"name": "b-srv", "gateway": "gwb", "interfaces": ["bh-srv"]},
                 {"name": "b-empty", "gateway": "gwb", "interfaces": ["bh-empty"]}],  # no app in it
    "apps": [{"name": "web", "segment": "a-cli", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
             {"name": "local", "segment": "a-srv", "addresses": ["198.19.0.10/32"], "publish": ["local.example"]},
             {"name": "api", "segment": "b-srv", "addresses": ["198.18.1.20/32", "fd00:1::20/128"],
              "publish": ["api.example"]}],
    "rules": [{"name": "web-api", "from": "web", "to": "api", "ports": ["tcp/8080"]},
              {"name": "web-local", "from": "web", "to": "local", "ports": ["tcp/8080"]}],
}


@pytest.fixture(scope="module")
def fabric_bundle(tmp_path_factory):
    import yaml

    from bulkhead.policy import load_policy

    p = tmp_path_factory.mktemp("fabric") / "p.yaml"
    p.write_text(yaml.safe_dump(FABRIC_DOC, sort_keys=False))
    return load_policy([str(p)])[0]


def names_of(bundle):
    """What Agent.names_for gives the flow log for a bundle it applied."""
    return lambda _gen: (bundle.app_names(), bundle.rule_names(), bundle.segment_names(),
                         flowlog.fabric_names(bundle))


def ids(bundle, kind: str) -> dict[str, int]:
    return {x["name"]: x["id"] for x in getattr(bundle, kind)}


def vip_of(bundle, app: str, family: int = 4) -> str:
    return next(v for v in bundle.vips[app] if (":" in v) == (family == 6))


def test_a_cut_bundle_names_the_other_gateways_segments(fabric_bundle):
    seg = ids(fabric_bundle, "segments")
    gwa = fabric_bundle.for_gateway("gwa")
    assert [s["name"] for s in gwa.segments] == ["a-cli", "a-srv"]
    names = gwa.segment_names()
    assert names[seg["b-srv"]] == "b-srv"  # behind gwb: named from api's FAB_APP entry
    assert seg["b-empty"] not in names  # no app behind it: nothing names it (no flow can have it)
    assert fabric_bundle.for_gateway("gwb").segment_names()[seg["a-cli"]] == "a-cli"
    fab = flowlog.fabric_names(gwa)
    assert fab.local == {seg["a-cli"], seg["a-srv"]}
    assert fab.gateway_of == {seg["a-cli"]: "gwa", seg["a-srv"]: "gwa", seg["b-srv"]: "gwb", seg["b-empty"]: "gwb"}
    assert flowlog.fabric_names(dataclasses.replace(fabric_bundle, fab_entries=[])) is None


@pytest.mark.parametrize("family", [4, 6])
def test_decode_at_the_clients_gateway_names_the_vip_the_real_address_and_the_other_gateway(fabric_bundle, family):
    gwa = fabric_bundle.for_gateway("gwa")
    seg, app = ids(gwa, "segments"), ids(gwa, "apps")
    vip = vip_of(gwa, "api", family)
    client = "198.18.1.10" if family == 4 else "fd00:1::10"
    ev = event(src=client, dst=vip, dport=8080, src_app=app["web"], dst_app=app["api"], rule=1, gen=1,
               seg=seg["a-cli"], peer=ids(fabric_bundle, "segments")["b-srv"], flags=abi.FLOWF_NAT | abi.FLOWF_TRANSIT)
    d = flowlog.decode(ev, names_of(gwa), 0)
    assert (d["segment"], d["peer_segment"], d["src_app"], d["dst_app"], d["rule"]) == \
        ("a-cli", "b-srv", "web", "api", "web-api")
    assert (d["dst"], d["vip"], d["real"], d["via"]) == \
        (vip, vip, "198.18.1.20" if family == 4 else "fd00:1::20", "gwb")


def test_decode_at_the_servers_gateway_names_the_clients_segment_and_gateway(fabric_bundle):
    """bulkhead_transit_in: segment_id is the client's (gwa's) segment, peer_segment the local one,
    the destination api's real address, TRANSIT without NAT (gwb can't know what was dialed)."""
    gwb = fabric_bundle.for_gateway("gwb")
    seg, app = ids(fabric_bundle, "segments"), ids(gwb, "apps")
    ev = event(dst="198.18.1.20", dport=8080, src_app=app["web"], dst_app=app["api"], rule=1, gen=1,
               seg=seg["a-cli"], peer=seg["b-srv"], flags=abi.FLOWF_TRANSIT)
    d = flowlog.decode(ev, names_of(gwb), 0)
    assert (d["segment"], d["peer_segment"], d["src_app"], d["dst_app"]) == ("a-cli", "b-srv", "web", "api")
    assert (d["via"], d["vip"], d["real"]) == ("gwa", None, None)


def test_decode_a_translated_flow_at_one_gateway_either_way(fabric_bundle):
    """A published app of this gateway: NAT, no transit. An event caused by a reply (the kernel
    reads it before TC translates it back) has the real address as its destination: the service
    address is found from it."""
    gwa = fabric_bundle.for_gateway("gwa")
    seg, app = ids(gwa, "segments"), ids(gwa, "apps")
    vip = vip_of(gwa, "local")
    kw = dict(dport=8080, src_app=app["web"], dst_app=app["local"], gen=1, seg=seg["a-cli"], peer=seg["a-srv"])
    d = flowlog.decode(event(dst=vip, flags=abi.FLOWF_NAT, **kw), names_of(gwa), 0)
    assert (d["vip"], d["real"], d["via"]) == (vip, "198.19.0.10", None)
    d = flowlog.decode(event(dst="198.19.0.10", kind=abi.FlowEv.END, flags=abi.FLOWF_NAT | abi.FLOWF_REPLY, **kw),
                       names_of(gwa), 0)
    assert (d["dst"], d["vip"], d["real"], d["by_reply"]) == ("198.19.0.10", vip, "198.19.0.10", True)


def test_decode_without_the_fabric_bits_keeps_its_keys_and_adds_nulls(fabric_bundle):
    gwa = fabric_bundle.for_gateway("gwa")
    seg, app = ids(gwa, "segments"), ids(gwa, "apps")
    # a flow to api's real address, not through a service address, at a gateway: no bit, no fabric keys
    d = flowlog.decode(event(dst="198.18.1.20", src_app=app["web"], dst_app=app["api"], gen=1, seg=seg["a-cli"],
                             peer=0), names_of(gwa), 0)
    assert (d["via"], d["vip"], d["real"]) == (None, None, None)
    old = flowlog.decode(event(), names, 0)  # names without FabricNames (3-tuple), bits or not
    assert (old["via"], old["vip"], old["real"]) == (None, None, None)
    assert flowlog.decode(event(flags=abi.FLOWF_NAT | abi.FLOWF_TRANSIT), names, 0)["via"] is None
    keys = ["time", "kind", "segment", "peer_segment", "family", "proto", "src", "sport", "dst", "dport",
            "src_app", "dst_app", "rule", "verdict", "reason", "prev_reason", "audit", "by_reply", "tcp_flags", "sni",
            "generation", "packets", "bytes", "r_packets", "r_bytes"]
    assert list(old)[:len(keys)] == keys  # the keys there were before the fabric, in their order
    assert list(old)[len(keys):] == ["via", "vip", "real", "snat"]
    assert old["snat"] is None and d["snat"] is None


def test_event_line_through_the_fabric(fabric_bundle):
    from bulkhead.cli.render import event_line

    gwa = fabric_bundle.for_gateway("gwa")
    seg, app = ids(fabric_bundle, "segments"), ids(gwa, "apps")
    vip = vip_of(gwa, "api")
    d = flowlog.decode(event(dst=vip, dport=8080, src_app=app["web"], dst_app=app["api"], rule=1, gen=1,
                             seg=seg["a-cli"], peer=seg["b-srv"], flags=abi.FLOWF_NAT | abi.FLOWF_TRANSIT),
                       names_of(gwa), 0)
    assert f"198.18.1.10:40000 -> {vip}:8080 (api 198.18.1.20) via gwb " in event_line(d)
    gwb = fabric_bundle.for_gateway("gwb")
    d = flowlog.decode(event(dst="198.18.1.20", dport=8080, src_app=app["web"], dst_app=app["api"], rule=1, gen=1,
                             seg=seg["a-cli"], peer=seg["b-srv"], flags=abi.FLOWF_TRANSIT), names_of(gwb), 0)
    line = event_line(d)
    assert "198.18.1.10:40000 -> 198.18.1.20:8080 via gwa " in line and line.split()[2] == "a-cli"
    d = flowlog.decode(event(dst="198.18.1.20", peer=seg["b-srv"], flags=abi.FLOWF_NAT | abi.FLOWF_REPLY,
                             src_app=app["web"], dst_app=app["api"], gen=1, seg=seg["a-cli"]), names_of(gwa), 0)
    assert f"-> 198.18.1.20:443 (api by {vip}) " in event_line(d)
    plain = flowlog.decode(event(), names, 0)
    assert "(" not in event_line(plain).split("web -> payments")[0] and " via " not in event_line(plain)


def status_reply(transit: dict | None, counters: dict | None = None, events: dict | None = None) -> dict:
    return {"generation": 3, "active_slot": 1, "pid": 1, "uptime_s": 1.0,
            "policy": {"files": ["p.yaml"], "apps": 3, "rules": 2, "policy_entries": 4,
                       "settings": {"default_action": "deny", "mode": "enforce"}},
            "interfaces": [], "flows": {"flows4": 0, "flows6": 0},
            "counters": {r.name.lower(): {"packets": (counters or {}).get(r.name.lower(), 0), "bytes": 0,
                                          "verdict": abi.REASON_VERDICT[r]} for r in abi.Reason},
            "events": {e.name.lower(): (events or {}).get(e.name.lower(), 0) for e in abi.Event},
            "transit": transit, "verifier": {"running": False}, "flow_log": {}, "latency": []}


def test_status_text_has_a_transit_section_with_packets_and_drops_by_reason():
    from bulkhead.cli.render import status_text

    t = {"device": "bhvx-default", "ifindex": 7, "port": 4789, "address": "198.18.100.1", "gateway": "gwa",
         "gateway_id": 1, "peers": {"gwb": "198.18.100.2"}}
    text = status_text(status_reply(t, {"transit_unknown_peer": 3, "transit_bad_identity": 2},
                                    {"transit_encap": 12, "transit_decap": 10, "vip_nat": 4}))
    lines = text.splitlines()
    i = next(n for n, x in enumerate(lines) if x.startswith("transit: gateway gwa"))
    assert lines[i + 1] == ("  packets sent 12 (transit_encap), accepted 10 (transit_decap); "
                            "translated flows 4 (vip_nat)")
    assert lines[i + 2] == ("  dropped: transit_unknown_peer 3, transit_bad_identity 2, transit_bad_segment 0, "
                            "transit_no_tunnel 0, transit_snat_full 0, transit_snat_lost 0")
    # without transit: nothing, unless something was counted (a policy with transit run with no gateway name)
    assert "transit" not in status_text(status_reply(None))
    text = status_text(status_reply(None, {"transit_no_tunnel": 5}))
    assert ("  dropped: transit_unknown_peer 0, transit_bad_identity 0, transit_bad_segment 0, transit_no_tunnel 5, "
            "transit_snat_full 0, transit_snat_lost 0") \
        in text.splitlines()


def test_metrics_name_the_fabrics_reasons_and_events():
    """Reasons and events are exported by name from the abi enums: the fabric's appear with no
    change to the collector."""
    agent = FakeAgent()
    agent.dp.events = lambda: {e.name.lower(): int(e) for e in abi.Event}
    m = scrape(DatapathCollector(agent))
    for reason in ("transit_unknown_peer", "transit_bad_identity", "transit_bad_segment", "transit_no_tunnel",
                   "sni_fronting"):
        assert (("bulkhead_packets_total", (("reason", reason), ("verdict", "drop")))) in m, reason
    for ev in ("transit_encap", "transit_decap", "vip_nat"):
        assert get(m, "bulkhead_datapath_events_total", event=ev) == int(abi.Event[ev.upper()])
