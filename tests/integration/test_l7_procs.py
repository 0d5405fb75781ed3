"""Two verifier processes behind one TPROXY port (`agent run --verifier-procs 2`).

The same topology and catalog origin as test_l7_gateway.py. Each child has its own
SO_REUSEPORT listeners on the port nftables' TPROXY rule names; the kernel spreads new
connections over them by 4-tuple hash. Records carry the pid of the child that decided them.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from bulkhead.core.paths import REPO
from bulkhead.lab.topology import CATALOG_V4, CATALOG_V6

pytestmark = [pytest.mark.root, pytest.mark.integration]

ORIGIN = REPO / "tests" / "integration" / "l7" / "origin.py"
PORT = 8081
PROCS = 2
CONNECTIONS = 64  # new connections (new source ports): P(all on one child) = 2 * 2**-64
APPS = [
    {"name": "web", "segment": "prod", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
    {"name": "laptops", "segment": "dev", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
    {"name": "catalog", "segment": "core", "addresses": ["198.19.0.20/32", "fd00:19::20/128"],
     "ports": [f"tcp/{PORT}"]},
]


def rules(paths=("/items", "/items/*")) -> list[dict]:
    return [{"name": "web-reads-catalog", "from": "web", "to": "catalog",
             "http": [{"methods": ["GET"], "paths": list(paths)}]}]


AGENT_ARGS = ("--verifier-procs", str(PROCS))  # conftest's gateway fixture starts the agent with these


@pytest.fixture(scope="module")
def gw(gateway):
    """The module's gateway (two verifier processes) with catalog's origin and the L7 rule applied."""
    topo = gateway.topo
    for listen in (f"{CATALOG_V4}:{PORT}", f"[{CATALOG_V6}]:{PORT}"):
        p = topo.spawn("core", [sys.executable, str(ORIGIN), "--listen", listen],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
        line = p.stdout.readline()
        assert line.startswith("ready"), f"origin did not start: {line!r}"
    gateway.apply(*rules(), apps=APPS)
    yield gateway


def status_of(s: socket.socket, path: str) -> int:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: catalog\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    n = next((int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")), 0)
    while len(body) < n:
        body += s.recv(65536)
    return int(head.split()[1])


def one_request(gw, path: str, addr: str = CATALOG_V4) -> int:
    s = gw.topo.socket("prod", socket.AF_INET6 if ":" in addr else socket.AF_INET)
    s.settimeout(5)
    try:
        s.connect((addr, PORT))
        return status_of(s, path)
    finally:
        s.close()


def requests_after(gw, seq: int) -> list[dict]:
    import json

    p = gw.agent.cli("requests", "--json", "--limit", "0")
    assert p.returncode == 0, p.stderr
    return [r for r in (json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()) if r.get("seq", 0) > seq]


def last_seq(gw) -> int:
    recs = requests_after(gw, 0)
    return recs[-1]["seq"] if recs else 0


def test_status_shows_every_process(gw):
    v = gw.agent.status()["verifier"]
    assert v["procs"] == PROCS and len(v["pids"]) == PROCS and all(v["pids"]), v
    assert len(set(v["pids"])) == PROCS and v["pid"] == v["pids"][0]


def test_connections_land_on_every_process_and_each_enforces(gw):
    pids = set(gw.agent.status()["verifier"]["pids"])
    seq = last_seq(gw)
    for i in range(CONNECTIONS):
        assert one_request(gw, f"/items/{i}") == 200
    assert one_request(gw, "/admin") == 403
    assert one_request(gw, "/items/v6", CATALOG_V6) == 200
    recs = gw.wait_for(lambda: (lambda r: r if len(r) >= CONNECTIONS + 2 else None)(requests_after(gw, seq)))
    assert recs and len(recs) == CONNECTIONS + 2, recs
    by_pid = {}
    for r in recs:
        by_pid.setdefault(r["pid"], []).append(r)
    assert set(by_pid) == pids, f"records by pid {sorted(by_pid)}, children {sorted(pids)}"
    assert {r["verdict"] for r in recs if r["path"].startswith("/items/")} == {"allow"}
    assert [r["verdict"] for r in recs if r["path"] == "/admin"] == ["deny"]


def test_a_policy_change_reaches_every_process(gw):
    try:
        gw.apply(*rules(paths=("/other",)), apps=APPS)
        seq = last_seq(gw)
        assert all(one_request(gw, f"/items/{i}") == 403 for i in range(CONNECTIONS))
        recs = gw.wait_for(lambda: (lambda r: r if len(r) >= CONNECTIONS else None)(requests_after(gw, seq)))
        assert {r["pid"] for r in recs} == set(gw.agent.status()["verifier"]["pids"])
        assert {r["verdict"] for r in recs} == {"deny"}
    finally:
        gw.apply(*rules(), apps=APPS)
    assert one_request(gw, "/items/1") == 200


def test_a_refusal_by_the_children_leaves_the_old_policy_in_all(gw, tmp_path):
    gen = gw.generation()
    bad = rules()
    bad[0]["http"][0]["tokens"] = [{"jwt": str(tmp_path / "missing.pem")}]
    p = gw.agent.apply(gw.write(gw.policy_yaml(*bad, apps=APPS)))
    assert p.returncode != 0 and "missing.pem" in (p.stdout + p.stderr)
    assert gw.generation() == gen
    assert all(one_request(gw, f"/items/{i}") == 200 for i in range(16))


def test_one_child_killed_is_restarted_with_the_policy_and_the_other_keeps_its_own(gw):
    v = gw.agent.status()["verifier"]
    victim, other = v["pids"][0], v["pids"][1]
    os.kill(victim, signal.SIGKILL)
    st = gw.wait_for(lambda: (lambda s: s if s["restarts"] > v["restarts"] and all(s["pids"]) else None)(
        gw.agent.status()["verifier"]), timeout=20)
    assert st and victim not in st["pids"] and other in st["pids"], st
    seq = last_seq(gw)
    assert all(one_request(gw, f"/items/{i}") == 200 for i in range(CONNECTIONS))
    assert one_request(gw, "/admin") == 403
    recs = gw.wait_for(lambda: (lambda r: r if len(r) >= CONNECTIONS + 1 else None)(requests_after(gw, seq)))
    assert {r["pid"] for r in recs} == set(st["pids"])
