"""L7 rules through the real gateway: XDP steers, TPROXY delivers, the verifier decides.

Topology (agent/lab/topology.py): clients in prod and dev share 198.18.1.10 /
fd00:1::10; catalog's HTTP origin (tests/integration/l7/origin.py, echoes
what it received as JSON) listens on 198.19.0.20:8081 and [fd00:19::20]:8081
in core. web (prod) may GET /items*, laptops (dev, same address) only
GET /public/*: the same client IP gets different rules by segment.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bulkhead.core.paths import REPO
from bulkhead.lab.topology import CATALOG_V4, CATALOG_V6, CLIENT_V4, CLIENT_V6, PAYMENTS_V4

pytestmark = [pytest.mark.root, pytest.mark.integration]

ORIGIN = REPO / "tests" / "integration" / "l7" / "origin.py"
PORT = 8081
APPS = [
    {"name": "web", "segment": "prod", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
    {"name": "laptops", "segment": "dev", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
    {"name": "payments", "segment": "core", "addresses": ["198.19.0.10/32"], "ports": ["tcp/8443"]},
    {"name": "catalog", "segment": "core", "addresses": ["198.19.0.20/32", "fd00:19::20/128"],
     "ports": [f"tcp/{PORT}"]},
]


def l7_rules(web_paths=("/items", "/items/*")) -> list[dict]:
    return [
        {"name": "web-reads-catalog", "from": "web", "to": "catalog",
         "http": [{"methods": ["GET", "HEAD"], "paths": list(web_paths)}]},
        {"name": "laptops-read-public", "from": "laptops", "to": "catalog",
         "http": [{"methods": ["GET"], "paths": ["/public/*"]}]},
        {"name": "web-pays", "from": "web", "to": "payments"},
    ]


@pytest.fixture(scope="module")
def l7(gateway):
    """The module's gateway with catalog's HTTP origin running and the L7 policy applied."""
    topo = gateway.topo
    for listen in (f"{CATALOG_V4}:{PORT}", f"[{CATALOG_V6}]:{PORT}"):
        p = topo.spawn("core", [sys.executable, str(ORIGIN), "--listen", listen],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
        line = p.stdout.readline()
        assert line.startswith("ready"), f"origin did not start: {line!r}"
    gateway.apply(*l7_rules(), apps=APPS)
    yield gateway


def http(topo, ns: str, addr: str, raw: bytes, timeout: float = 5.0, keep: socket.socket | None = None):
    """Send raw request bytes from `ns`; return (status, headers, body, socket)."""
    s = keep
    if s is None:
        s = topo.socket(ns, socket.AF_INET6 if ":" in addr else socket.AF_INET)
        s.settimeout(timeout)
        s.connect((addr, PORT))
    s.sendall(raw)
    return (*read_response(s), s)


def read_response(s: socket.socket):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:n]


def get(path: str, host: str = "catalog") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def records(gw, after: int = 0) -> list[dict]:
    p = gw.agent.cli("requests", "--json", "--limit", "0")
    assert p.returncode == 0, p.stderr
    recs = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
    return [r for r in recs if r.get("seq", 0) > after]


def last_seq(gw) -> int:
    recs = records(gw)
    return recs[-1]["seq"] if recs else 0


@pytest.mark.parametrize("addr, client", [(CATALOG_V4, CLIENT_V4), (CATALOG_V6, CLIENT_V6)], ids=["v4", "v6"])
def test_allowed_request_reaches_the_origin_from_the_client_address(l7, addr, client):
    seq = last_seq(l7)
    status, _, body, s = http(l7.topo, "prod", addr, get("/items/42"))
    s.close()
    assert status == 200, body
    seen = json.loads(body)
    assert seen["method"] == "GET" and seen["target"] == "/items/42"
    # Transparent: the origin sees the client's own address, not the gateway's.
    assert seen["client"][0] == client
    recs = l7.wait_for(lambda: records(l7, seq))
    assert [(r["verdict"], r["rule"], r["src_app"], r["dst_app"], r["status"]) for r in recs] == [
        ("allow", "web-reads-catalog", "web", "catalog", 200)]


def test_denied_request_is_answered_by_the_gateway(l7):
    seq = last_seq(l7)
    status, headers, body, s = http(l7.topo, "prod", CATALOG_V4, get("/admin"))
    s.close()
    assert status == 403
    assert b"web-reads-catalog" in body
    recs = l7.wait_for(lambda: records(l7, seq))
    assert [(r["verdict"], r["rule"], r["status"], r["path"]) for r in recs] == [
        ("deny", "web-reads-catalog", 403, "/admin")]


def test_same_address_other_segment_gets_its_own_rule(l7):
    """dev's laptops have web's address: identity, not IP, picks the rule."""
    status, _, _, s = http(l7.topo, "dev", CATALOG_V4, get("/items/42"))
    s.close()
    assert status == 403
    status, _, body, s = http(l7.topo, "dev", CATALOG_V4, get("/public/x"))
    s.close()
    assert status == 200, body
    assert json.loads(body)["client"][0] == CLIENT_V4


def test_keep_alive_allowed_then_denied_on_one_connection(l7):
    status, _, _, s = http(l7.topo, "prod", CATALOG_V4, get("/items"))
    assert status == 200
    status, _, _, s = http(l7.topo, "prod", CATALOG_V4, get("/orders"), keep=s)
    assert status == 403
    status, _, _, s = http(l7.topo, "prod", CATALOG_V4, get("/items/7"), keep=s)
    assert status == 200
    s.close()


def test_flows_without_l7_never_reach_the_verifier(l7):
    before = l7.agent.status()["verifier"]["requests"]["connections"].get("accepted", 0)
    c0 = l7.counters()
    probe = l7.topo.tcp("prod", PAYMENTS_V4, 8443)
    assert probe.ok and probe.reply.startswith("hello from payments")
    moved = l7.delta(c0, l7.counters())
    assert "l7_steer" not in moved and moved.get("allow_rule", 0) >= 1, moved
    assert l7.agent.status()["verifier"]["requests"]["connections"].get("accepted", 0) == before


def test_apply_changes_the_next_request_on_an_open_connection(l7):
    status, _, _, s = http(l7.topo, "prod", CATALOG_V4, get("/items/1"))
    assert status == 200
    try:
        l7.apply(*l7_rules(web_paths=("/other",)), apps=APPS)
        status, _, body, s = http(l7.topo, "prod", CATALOG_V4, get("/items/1"), keep=s)
        assert status == 403, body
    finally:
        s.close()
        l7.apply(*l7_rules(), apps=APPS)


def test_an_l7_policy_that_cannot_load_leaves_the_old_one(l7, tmp_path):
    gen = l7.generation()
    bad = l7_rules()
    bad[0]["http"][0]["tokens"] = [{"jwt": str(tmp_path / "missing.pem")}]
    path = l7.write(l7.policy_yaml(*bad, apps=APPS))
    p = l7.agent.apply(path)
    assert p.returncode != 0 and "missing.pem" in (p.stdout + p.stderr)
    assert l7.generation() == gen
    status, _, _, s = http(l7.topo, "prod", CATALOG_V4, get("/items/1"))
    s.close()
    assert status == 200


def test_metrics_count_requests_by_rule_and_apps(l7):
    http(l7.topo, "prod", CATALOG_V4, get("/nope"))[3].close()
    text = l7.wait_for(lambda: (lambda t: t if 'verdict="deny"' in t else "")(
        l7.gw("curl", "-s", "http://127.0.0.1:9477/metrics")))
    line = [ln for ln in text.splitlines() if ln.startswith("bulkhead_l7_requests_total{")
            and 'verdict="deny"' in ln and 'rule="web-reads-catalog"' in ln]
    assert line and 'src_app="web"' in line[0] and 'dst_app="catalog"' in line[0], text[-3000:]
    assert float(line[0].rsplit(" ", 1)[1]) >= 1
    assert "bulkhead_l7_request_seconds_bucket{" in text and "bulkhead_verifier_up 1.0" in text


def test_verifier_crash_fails_closed_and_is_restarted(l7):
    st = l7.agent.status()["verifier"]
    pid, restarts = st["pid"], st["restarts"]
    status, _, _, s = http(l7.topo, "prod", CATALOG_V4, get("/items/1"))
    assert status == 200
    os.kill(pid, signal.SIGKILL)
    # The open connection dies with it: reset or closed, never answered by anyone else.
    with pytest.raises((ConnectionError, OSError)):
        http(l7.topo, "prod", CATALOG_V4, get("/items/1"), keep=s)
    s.close()
    st = l7.wait_for(lambda: (lambda v: v if v["restarts"] > restarts and v["pid"] else None)(
        l7.agent.status()["verifier"]), timeout=20)
    assert st and st["pid"] != pid
    status, _, _, s = http(l7.topo, "prod", CATALOG_V4, get("/items/1"))
    s.close()
    assert status == 200


def test_no_verifier_no_l7_traffic(l7):
    """Agent gone: the verifier is gone too, and L7 flows are dropped, counted."""
    before = l7.counters().get("punt_no_handler", 0)
    l7.agent.stop()
    try:
        probe = l7.topo.tcp("prod", CATALOG_V4, PORT, timeout=1.0)
        assert not probe.ok
    finally:
        l7.agent.start(l7.write(l7.policy_yaml(*l7_rules(), apps=APPS)))
    # The pinned counters outlive the agent: the dropped SYN (and its retries) were counted.
    assert l7.counters().get("punt_no_handler", 0) > before


def test_audit_mode_forwards_and_records_would_be_denials(l7):
    l7.apply(*l7_rules(), apps=APPS, mode="audit")
    try:
        seq = last_seq(l7)
        status, _, body, s = http(l7.topo, "prod", CATALOG_V4, get("/admin"))
        s.close()
        assert status == 200, body  # audit: forwarded to the origin
        recs = l7.wait_for(lambda: records(l7, seq))
        assert [(r["verdict"], r["rule"]) for r in recs] == [("audit", "web-reads-catalog")]
        assert recs[0]["reason"].startswith("audit: would deny")
    finally:
        l7.apply(*l7_rules(), apps=APPS)
