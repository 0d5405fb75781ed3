"""Visibility on real traffic: /metrics counters by name, the flow log, hop latency, loss.

One agent per module (conftest `gateway`). The traffic fixture sends a known
set of flows with fixed client ports (allowed, denied by rule, would-be denied
by an audit rule) between two scrapes, so counters can be checked for moving
by exactly what was sent. Denied probes wait longer than the initial SYN
retransmission timeout (1 s): the retransmitted SYN is the same flow, counted
once. The last test restarts the
agent with tiny maps (an event ring of one page, a full pair_flows, a
64-entry flow table) to see loss counted and the exporter still working.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bulkhead.core.paths import REPO
from bulkhead.lab.runner import bulkhead_argv
from bulkhead.lab.topology import CATALOG_V4, PAYMENTS_V4

pytestmark = [pytest.mark.root, pytest.mark.integration]

METRICS = "http://127.0.0.1:9477/metrics"
APPS = [  # conftest's apps (test modules can't import conftest)
    {"name": "web", "segment": "prod", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
    {"name": "laptops", "segment": "dev", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
    {"name": "payments", "segment": "core", "addresses": ["198.19.0.10/32", "fd00:19::10/128"]},
    {"name": "catalog", "segment": "core", "addresses": ["198.19.0.20/32", "fd00:19::20/128"]},
]
DENY_WAIT = 1.6  # > the 1 s initial SYN RTO: a retransmitted SYN is the same flow, counted once
RULES = [
    {"name": "web-pays", "from": "web", "to": "payments", "action": "allow", "ports": ["tcp/8443", "tcp/9100"]},
    {"name": "web-catalog", "from": "web", "to": "catalog", "action": "allow", "ports": ["tcp/9100"]},
    {"name": "laptops-no-pay", "from": "laptops", "to": "payments", "action": "deny"},
    {"name": "laptops-cat-audit", "from": "laptops", "to": "catalog", "action": "deny", "mode": "audit"},
]
N_ALLOW, N_DENY, N_AUDIT = 3, 2, 2
SPORT_ALLOW, SPORT_DENY, SPORT_AUDIT = 41000, 41100, 41200

# A request/response server for hop latency: reads a line, sleeps DELAY (payments) or not
# (catalog), answers one line. Unlike the topology's greeting server, the client speaks first.
DELAY = 0.2
SLOW_SERVER = r"""
import socket, sys, threading, time
def serve(addr, delay):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 9100)); s.listen(64)
    def conn(c):
        with c:
            buf = b""
            while not buf.endswith(b"\n"):
                d = c.recv(4096)
                if not d:
                    return
                buf += d
            time.sleep(delay)
            c.sendall(b"answer\n")
    while True:
        c, _ = s.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
for addr, delay in ((sys.argv[1], float(sys.argv[2])), (sys.argv[3], float(sys.argv[4]))):
    threading.Thread(target=serve, args=(addr, delay), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


# ------------------------------------------------------------------ helpers
def scrape(gw) -> dict:
    """{(sample name, frozenset(labels)): value} of one /metrics scrape (asserts HTTP 200)."""
    p = gw.topo.run("gw", ["curl", "-s", "-w", "\n%{http_code}", METRICS], check=False, timeout=30)
    body, _, code = p.stdout.rpartition("\n")
    assert code == "200", f"scrape failed: {code!r} {p.stderr}"
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def label_sets(samples: dict, name: str) -> list[dict]:
    return [dict(ls) for (n, ls) in samples if n == name]


def flow_events(gw, *args: str) -> list[dict]:
    p = gw.agent.cli("flows", "--json", "--limit", "0", *args)
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def by_sport(events: list[dict], sport: int) -> list[dict]:
    return [e for e in events if e["sport"] == sport and e["dst"] in (PAYMENTS_V4, CATALOG_V4)]


def request(topo, ns: str, addr: str, port: int = 9100, timeout: float = 3.0) -> str:
    s = topo.socket(ns)
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
        s.sendall(b"question\n")
        buf = b""
        while not buf.endswith(b"\n"):
            d = s.recv(4096)
            if not d:
                break
            buf += d
        return buf.decode()
    finally:
        s.close()


@pytest.fixture(scope="module")
def vis(gateway):
    gateway.apply(*RULES)
    yield gateway


@pytest.fixture(scope="module")
def traffic(vis):
    """Known flows between two scrapes: (before, after, probes)."""
    topo = vis.topo
    time.sleep(0.3)  # let stray packets of earlier applies settle
    before = scrape(vis)
    probes = {"allow": [], "deny": [], "audit": []}
    for i in range(N_ALLOW):
        p = topo.tcp("prod", PAYMENTS_V4, 8443, send=b"visible\n", sport=SPORT_ALLOW + i)
        assert p.ok, p
        probes["allow"].append(SPORT_ALLOW + i)
    for i in range(N_DENY):
        p = topo.tcp("dev", PAYMENTS_V4, 8443, timeout=DENY_WAIT, sport=SPORT_DENY + i)
        assert p.result == "timeout", p
        probes["deny"].append(SPORT_DENY + i)
    for i in range(N_AUDIT):
        p = topo.tcp("dev", CATALOG_V4, 8080, send=b"audited\n", sport=SPORT_AUDIT + i)
        assert p.ok, p
        probes["audit"].append(SPORT_AUDIT + i)
    # Every end event is in once both sides' FINs have passed.
    vis.wait_for(lambda: len([e for e in flow_events(vis) if e["kind"] == "end"
                              and e["sport"] in probes["allow"] + probes["audit"]]) >= N_ALLOW + N_AUDIT)
    after = scrape(vis)
    return before, after, probes


# -------------------------------------------------------------------- tests
def test_flows_total_moves_by_exactly_the_flows_sent(traffic):
    before, after, _ = traffic
    name = "bulkhead_flows_total"

    def d(**labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert d(src_app="web", dst_app="payments", rule="web-pays", reason="allow_rule", verdict="pass") == N_ALLOW
    assert d(src_app="laptops", dst_app="payments", rule="laptops-no-pay", reason="deny_rule",
             verdict="drop") == N_DENY
    # would-be denials: their own verdict, never counted as drops
    assert d(src_app="laptops", dst_app="catalog", rule="laptops-cat-audit", reason="audit_rule",
             verdict="audit") == N_AUDIT
    assert d(src_app="laptops", dst_app="catalog", verdict="drop") == 0
    assert d() == N_ALLOW + N_DENY + N_AUDIT, "flows counted that were not sent"
    for ls in label_sets(after, name):  # names, never ids or addresses
        assert not any(v.startswith(("app#", "rule#")) or v.count(".") == 3 for v in ls.values()), ls


def test_flow_packets_and_bytes_by_app_pair(traffic):
    before, after, _ = traffic
    for name in ("bulkhead_flow_packets_total", "bulkhead_flow_bytes_total"):
        web = value(after, name, src_app="web", dst_app="payments", rule="web-pays", verdict="pass") - \
            value(before, name, src_app="web", dst_app="payments", rule="web-pays", verdict="pass")
        # each allowed flow: >= 4 packets each way (handshake, greeting/data/echo, FIN)
        assert web >= N_ALLOW * 8 if name.startswith("bulkhead_flow_packets") else web >= N_ALLOW * 8 * 60, (name, web)
        audit = value(after, name, src_app="laptops", dst_app="catalog", verdict="audit")
        assert audit > 0, name
        assert value(after, name, src_app="laptops", dst_app="catalog", verdict="drop") == 0
    assert value(after, "bulkhead_flow_packets_total", src_app="laptops", dst_app="payments", verdict="drop") >= N_DENY


def test_flow_log_shows_each_flow_with_verdict_and_rule(traffic, vis):
    events = flow_events(vis)
    _, _, probes = traffic
    for sport in probes["allow"]:
        evs = by_sport(events, sport)
        assert sorted(e["kind"] for e in evs) == ["end", "new"], evs
        for e in evs:
            assert (e["segment"], e["src_app"], e["dst_app"], e["rule"], e["verdict"], e["proto"]) == \
                ("prod", "web", "payments", "web-pays", "pass", "tcp"), e
            assert e["src"] == "198.18.1.10" and e["dport"] == 8443 and e["peer_segment"] == "core", e
        new = next(e for e in evs if e["kind"] == "new")
        end = next(e for e in evs if e["kind"] == "end")
        assert new["reason"] == "allow_rule" and new["packets"] == 1, new
        assert end["packets"] >= 4 and end["r_packets"] >= 3 and end["bytes"] > 0 and end["r_bytes"] > 0, end
        assert abs(end["time"] - time.time()) < 60 and end["time"] >= new["time"], (new, end)
    for sport in probes["deny"]:
        evs = by_sport(events, sport)
        assert [(e["kind"], e["verdict"], e["reason"], e["rule"], e["src_app"], e["dst_app"], e["segment"])
                for e in evs] == [("new", "drop", "deny_rule", "laptops-no-pay", "laptops", "payments", "dev")], evs
    for sport in probes["audit"]:
        evs = by_sport(events, sport)
        assert sorted(e["kind"] for e in evs) == ["end", "new"], evs
        assert all(e["verdict"] == "audit" and e["audit"] and e["reason"] == "audit_rule"
                   and e["rule"] == "laptops-cat-audit" for e in evs), evs


def test_flow_log_filters(traffic, vis):
    _, _, probes = traffic
    audit = flow_events(vis, "--verdict", "audit")
    assert audit and all(e["verdict"] == "audit" for e in audit)
    assert {e["sport"] for e in audit} >= set(probes["audit"])
    web = flow_events(vis, "--app", "web")
    assert web and all("web" in (e["src_app"], e["dst_app"]) for e in web)
    assert not {e["sport"] for e in web} & set(probes["deny"] + probes["audit"])
    rule = flow_events(vis, "--rule", "laptops-no-pay")
    assert {e["sport"] for e in by_sport(rule, probes["deny"][0])} == {probes["deny"][0]}
    assert all(e["rule"] == "laptops-no-pay" for e in rule)
    last = flow_events(vis, "--verdict", "drop")[-1:]
    assert flow_events(vis, "--verdict", "drop", "--limit", "1") == last
    # human output: a header, a line per event, the latency footer
    p = vis.agent.cli("flows", "--app", "laptops", "--limit", "5")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("TIME") and "laptops -> payments" in p.stdout and "hop latency" in p.stdout, p.stdout
    # bad usage
    assert vis.agent.cli("flows", "--verdict", "maybe").returncode == 2


def test_follow_streams_new_events(vis):
    argv = [*bulkhead_argv(), "flows", "--follow", "--json", "--app", "web", "--limit", "0",
            "--interval", "0.1", "--state-dir", vis.agent.state_dir]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        time.sleep(1.0)  # the initial batch is printed; following from here
        sport = 41300
        assert vis.topo.tcp("prod", PAYMENTS_V4, 8443, send=b"live\n", sport=sport).ok
        got = vis.wait_for(lambda: [json.loads(x) for x in list(lines) if f'"sport": {sport},' in x
                                    and '"kind": "end"' in x], timeout=10)
        assert got and got[0]["rule"] == "web-pays", lines[-5:]
        news = [json.loads(x) for x in list(lines) if f'"sport": {sport},' in x and '"kind": "new"' in x]
        assert len(news) == 1, lines[-5:]  # each event once
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode in (0, -15), proc.stderr.read()


@pytest.fixture(scope="module")
def slow_server(vis):
    """The request/response server on 9100: payments answers after DELAY, catalog at once."""
    p = vis.topo.spawn("core", [sys.executable, "-c", SLOW_SERVER, PAYMENTS_V4, str(DELAY), CATALOG_V4, "0"],
                       stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_hop_latency_server_time_ordered(vis, slow_server):
    topo = vis.topo
    before = scrape(vis)
    n = 3
    for _ in range(n):
        t0 = time.monotonic()
        assert request(topo, "prod", PAYMENTS_V4) == "answer\n"
        assert time.monotonic() - t0 >= DELAY
        assert request(topo, "prod", CATALOG_V4) == "answer\n"
    time.sleep(0.2)
    after = scrape(vis)

    def hist(kind: str, dst: str) -> tuple[float, float]:
        lab = {"kind": kind, "src_app": "web", "dst_app": dst}
        c = value(after, "bulkhead_hop_latency_seconds_count", **lab) - \
            value(before, "bulkhead_hop_latency_seconds_count", **lab)
        s = value(after, "bulkhead_hop_latency_seconds_sum", **lab) - \
            value(before, "bulkhead_hop_latency_seconds_sum", **lab)
        return c, s

    slow_n, slow_s = hist("server_time", "payments")
    fast_n, fast_s = hist("server_time", "catalog")
    assert slow_n == n and fast_n == n, (slow_n, fast_n)
    assert DELAY * 0.95 <= slow_s / n < DELAY + 0.1, slow_s / n
    assert fast_s / n < DELAY / 4 and fast_s / n < slow_s / n, fast_s / n
    for kind in ("server_rtt", "client_rtt"):
        for dst in ("payments", "catalog"):
            c, s = hist(kind, dst)
            assert c == n and 0 < s / n < 0.05, (kind, dst, c, s)
    # the buckets are cumulative and end with +Inf = count
    lab = {"kind": "server_time", "src_app": "web", "dst_app": "payments"}
    buckets = sorted((float(dict(ls)["le"]), v) for (nm, ls), v in after.items()
                     if nm == "bulkhead_hop_latency_seconds_bucket" and lab.items() <= ls)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1][1] == value(after, "bulkhead_hop_latency_seconds_count", **lab)
    below = max(v for le, v in buckets if le < DELAY * 0.6)
    assert value(after, "bulkhead_hop_latency_seconds_count", **lab) - below >= n  # the slow ones sit above
    # the same summary in status --json and flows --latency
    rows = {(r["src_app"], r["dst_app"], r["kind"]): r for r in vis.agent.status()["latency"]}
    assert rows[("web", "payments", "server_time")]["p50_ms"] > rows[("web", "catalog", "server_time")]["p99_ms"]
    assert rows[("web", "payments", "server_time")]["p50_ms"] >= DELAY * 1000 * 0.6
    out = vis.agent.cli("flows", "--latency")
    assert out.returncode == 0 and "server_time" in out.stdout and "payments" in out.stdout, out.stdout
    human = vis.agent.cli("status")
    assert "hop latency" in human.stdout and "server_time" in human.stdout, human.stdout


def client_hello(name: str) -> bytes:
    """A minimal TLS 1.2-style ClientHello carrying one server_name."""
    def v16(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    raw = name.encode()
    sni = b"\x00\x00" + v16(v16(b"\x00" + v16(raw)))
    body = b"\x03\x03" + bytes(32) + b"\x00" + v16(b"\x13\x01\xc0\x2f") + b"\x01\x00" + v16(sni)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + v16(hs)


def test_flow_log_shows_tls_server_name(vis, slow_server):
    """payments named by hostname on 9100: the flow is new (sni_pending), then changes to
    allow_rule with the name the client asked for; counted once, when decided."""
    apps = [dict(a) for a in APPS]
    for a in apps:
        if a["name"] == "payments":
            a.update(ports=["tcp/9100"], hostnames=["pay.example.internal"])
    vis.apply(*RULES, apps=apps)
    try:
        before = scrape(vis)
        sport = 41400
        s = vis.topo.socket("prod")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
        s.settimeout(3)
        s.connect((PAYMENTS_V4, 9100))
        s.sendall(client_hello("Pay.Example.Internal"))
        evs = vis.wait_for(lambda: [e for e in by_sport(flow_events(vis), sport) if e["kind"] == "change"])
        s.close()
        assert evs, by_sport(flow_events(vis), sport)
        ch = evs[0]
        assert (ch["sni"], ch["prev_reason"], ch["reason"], ch["verdict"], ch["rule"], ch["dst_app"]) == \
            ("pay.example.internal", "sni_pending", "allow_rule", "pass", "web-pays", "payments"), ch
        new = [e for e in by_sport(flow_events(vis), sport) if e["kind"] == "new"]
        assert [(e["reason"], e["sni"]) for e in new] == [("sni_pending", None)], new
        after = scrape(vis)
        lab = dict(src_app="web", dst_app="payments", rule="web-pays")
        assert value(after, "bulkhead_flows_total", **lab) - value(before, "bulkhead_flows_total", **lab) == 1
        assert value(after, "bulkhead_flows_total", reason="sni_pending") == 0
    finally:
        vis.apply(*RULES)


def test_exporter_keeps_working_during_apply(vis):
    first = scrape(vis)
    errors0 = value(first, "bulkhead_collector_errors_total")
    results: list = []
    stop = threading.Event()

    def scraper():
        while not stop.is_set():
            try:
                s = scrape(vis)
                results.append(value(s, "bulkhead_flows_total") > 0 and
                               ("bulkhead_policy_generation", frozenset()) in s)
            except AssertionError as e:
                results.append(str(e))

    t = threading.Thread(target=scraper)
    t.start()
    try:
        gens = []
        for i in range(3):
            extra = [{"name": f"churn-{i}", "from": "web", "to": "catalog", "action": "allow",
                      "ports": [f"tcp/{7000 + i}"]}]
            gens.append(vis.apply(*RULES, *extra))
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(30)
    assert len(results) >= 3 and all(r is True for r in results), results
    last = scrape(vis)
    assert value(last, "bulkhead_collector_errors_total") == errors0
    assert value(last, "bulkhead_policy_generation") == gens[-1]
    assert value(last, "bulkhead_policy_applies_total", result="ok") - \
        value(first, "bulkhead_policy_applies_total", result="ok") == 3
    vis.apply(*RULES)


def test_event_loss_counted_and_full_maps(vis):
    """Restart with a one-page event ring, room for 2 pair counters and 64 flow entries."""
    agent = vis.agent
    agent.stop()
    assert agent.down().returncode == 0
    path = vis.write(vis.policy_yaml(*RULES))
    agent.start(path, args=("--map-size", "events-ring-pages=1", "--map-size", "pair_flows=2",
                            "--map-size", "flows=64"))
    try:
        topo = vis.topo
        st0 = agent.status()
        fl0 = st0["flow_log"]
        assert fl0["running"], fl0
        # A burst of short flows: one datagram each to a distinct port, all denied (one new event each).
        burst = 1000
        s = topo.socket("dev", type_=socket.SOCK_DGRAM)
        try:
            for port in range(20000, 20000 + burst):
                s.sendto(b"x", (PAYMENTS_V4, port))
        finally:
            s.close()

        def settled():
            fl = agent.status()["flow_log"]
            got = fl["received"] - fl0["received"] + (fl["kernel_lost"] - fl0["kernel_lost"])
            return fl if got >= burst else None

        fl = vis.wait_for(settled, timeout=10) or agent.status()["flow_log"]
        received = fl["received"] - fl0["received"]
        lost = fl["kernel_lost"] - fl0["kernel_lost"]
        assert lost > 0, fl
        assert received + lost == burst, (received, lost)
        m = scrape(vis)
        assert value(m, "bulkhead_flow_events_lost_total", where="kernel") == fl["kernel_lost"]
        # The CLI tells a follower about loss: the agent's reply carries kernel_lost.
        p = agent.cli("flows", "--json", "--limit", "1")
        assert p.returncode == 0

        # Full pair_flows: a third (src, dst, rule, reason) has no room; counted, scrape unharmed.
        assert topo.tcp("prod", PAYMENTS_V4, 8443, send=b"a\n").ok
        assert topo.tcp("dev", CATALOG_V4, 8080, send=b"b\n").ok
        ev = agent.status()["events"]
        assert ev["pair_full"] >= 1, ev
        m1 = scrape(vis)
        assert value(m1, "bulkhead_map_capacity", map="pair_flows") == 2
        assert value(m1, "bulkhead_map_entries", map="pair_flows") == 2
        assert value(m1, "bulkhead_map_capacity", map="flows4") == 64
        assert 0 < value(m1, "bulkhead_map_entries", map="flows4") <= 64
        # the flow table (64) could not hold the burst's 1000 flows: evictions, derived
        assert value(m1, "bulkhead_flow_evictions_total") >= burst - 2 * 64
        m2 = scrape(vis)
        assert value(m2, "bulkhead_collector_errors_total") == value(m1, "bulkhead_collector_errors_total") == 0
        assert value(m2, "bulkhead_flow_evictions_total") >= value(m1, "bulkhead_flow_evictions_total")
        for name in ("bulkhead_flow_packets_total", "bulkhead_flows_total"):
            for (n, ls), v in m2.items():
                if n == name and (n, ls) in m1:
                    assert v >= m1[(n, ls)], (n, dict(ls))
    finally:
        agent.stop()
        agent.down()
        agent.start(vis.write(vis.policy_yaml(*RULES)))
