"""The L7 verifier on loopback: every case of tests/integration/l7/cases.py against the
engine (agent/verifier/) in-process, plus what only loopback can stage
(origin down / slow, overload, unresolved flows).

No root, no BPF: origins are origin.py processes on 127.0.0.1.
"""
from __future__ import annotations

import socket
import time

import pytest

from l7 import cases
from l7.cases import Raw, req
from l7.loopback import EngineThread, LoopbackTarget

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with LoopbackTarget(tmp_path_factory.mktemp("l7")) as t:
        yield t


@pytest.mark.parametrize("case", cases.CASES, ids=cases.ids())
def test_case(case, target):
    case(target)


# ---------------------------------------------------------------- loopback only

def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _engine(target, original_dst, settings=None, **kw) -> tuple[EngineThread, int]:
    async def resolve(sock):
        return target.policy.context("shop", "catalog", sock.getpeername()[:2], original_dst, settings)

    eng = EngineThread(resolve, **kw)
    port = eng.listen()
    eng.start()
    return eng, port


def test_origin_down_502(target):
    eng, port = _engine(target, ("127.0.0.1", _free_port()))
    try:
        c = Raw(socket.create_connection(("127.0.0.1", port)))
        c.send(req("GET", "/items"))
        r = c.final()
        assert r.status == 502 and r.header("Connection") == "close"
        assert c.closed()
        c.close()
        recs = cases.wait_records(eng, 1)
        assert recs[0]["status"] == 502 and recs[0]["verdict"] == "error" and recs[0]["rule"] == "catalog-read"
        # a denied request never needs the origin
        c = Raw(socket.create_connection(("127.0.0.1", port)))
        c.send(req("GET", "/admin"))
        assert c.final().status == 403
        c.close()
    finally:
        eng.stop()


def test_origin_slow_504(target):
    settings = dict(target.policy.settings, response_timeout=0.5)
    eng, port = _engine(target, ("127.0.0.1", target.catalog_port), settings)
    try:
        c = Raw(socket.create_connection(("127.0.0.1", port)))
        c.send(req("GET", "/hang"))
        t0 = time.monotonic()
        r = c.final()
        assert r.status == 504 and time.monotonic() - t0 < 3
        c.close()
        recs = cases.wait_records(eng, 1)
        assert recs[0]["status"] == 504 and recs[0]["verdict"] == "error"
    finally:
        eng.stop()


def test_connect_timeout_504(target):
    async def slow_opener(ctx):
        import asyncio
        await asyncio.sleep(5)
        raise AssertionError("not reached")

    settings = dict(target.policy.settings, connect_timeout=0.3)
    eng, port = _engine(target, ("127.0.0.1", target.catalog_port), settings, opener=slow_opener)
    try:
        c = Raw(socket.create_connection(("127.0.0.1", port)))
        c.send(req("GET", "/items"))
        assert c.final().status == 504
        c.close()
    finally:
        eng.stop()


def test_overload_resets(target):
    eng, port = _engine(target, ("127.0.0.1", target.catalog_port), max_connections=2)
    held = []
    try:
        for _ in range(2):
            c = Raw(socket.create_connection(("127.0.0.1", port)))
            c.send(req("GET", "/items"))
            assert c.final().status == 200
            held.append(c)
        c = Raw(socket.create_connection(("127.0.0.1", port)))
        assert c.closed(wait=2)
        c.close()
        assert any(e[1] == "overload" for e in eng.events())
    finally:
        for c in held:
            c.close()
        eng.stop()


def test_no_flow_resets(target):
    async def resolve(sock):
        return None

    eng = EngineThread(resolve)
    port = eng.listen()
    eng.start()
    try:
        c = Raw(socket.create_connection(("127.0.0.1", port)))
        try:
            c.send(req("GET", "/items"))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert c.closed(wait=2)
        c.close()
        assert any(e[1] == "no_flow" for e in eng.events())
    finally:
        eng.stop()


def test_reused_upstream_closed_by_origin(target):
    """The origin closes an idle keep-alive connection: the next request opens a new one."""
    eng, port = _engine(target, ("127.0.0.1", target.catalog_port))
    try:
        c = Raw(socket.create_connection(("127.0.0.1", port)))
        c.send(req("GET", "/items", version="HTTP/1.1", headers=[("Connection", "keep-alive")]))
        assert c.final().status == 200
        # ask the origin to close after this one; the client side stays open
        c.send(req("GET", "/status/200", headers=[]))
        assert c.final().status == 200
        c.send(req("GET", "/close"))
        assert c.final().status == 200
        c.close()
    finally:
        eng.stop()


# ---------------------------------------------------------------- standalone (bulkhead verifier serve)

import json as _json  # noqa: E402
import os as _os  # noqa: E402
import signal as _signal  # noqa: E402
import subprocess as _sp  # noqa: E402
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_REPO = _Path(__file__).resolve().parents[2]
_BULKHEAD = [_sys.executable, "-m", "bulkhead.cli.main"]


def _serve(args: list[str]) -> tuple[_sp.Popen, int]:
    p = _sp.Popen(_BULKHEAD + ["verifier", "serve", "--listen", "127.0.0.1:0", *args],
                  stdout=_sp.PIPE, stderr=_sp.PIPE, cwd=_REPO)
    line = p.stderr.readline().decode()
    if "listening on" not in line:
        p.kill()
        raise AssertionError(f"standalone did not start: {line!r} {p.stderr.read().decode()[:1000]}")
    port = int(line.split("listening on ")[1].split(" ")[0].rsplit(":", 1)[1])
    return p, port


def _stop(p: _sp.Popen) -> tuple[int, str, str]:
    p.send_signal(_signal.SIGTERM)
    try:
        out, err = p.communicate(timeout=10)
    except _sp.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return p.returncode, out.decode(), err.decode()


def test_standalone_serve_json(target):
    p, port = _serve(["--upstream", f"127.0.0.1:{target.catalog_port}", "--policy", str(target.material.policy_path),
                      "--rule", "catalog-read", "--rule", "catalog-glob", "--json"])
    try:
        base = f"http://127.0.0.1:{port}"
        r = _sp.run(["curl", "-sS", "-w", "%{http_code} ", "-o", "/dev/null", f"{base}/items/1",
                     "-o", "/dev/null", f"{base}/admin", "-o", "/dev/null", f"{base}/reports/x/summary"],
                    capture_output=True, timeout=20)
        assert r.stdout.split() == [b"200", b"403", b"200"], r
        c = Raw(socket.create_connection(("127.0.0.1", port)))
        c.send(b"GET /items HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert c.final().status == 400
        c.close()
    finally:
        code, out, err = _stop(p)
    assert code == 0, err
    lines = [_json.loads(x) for x in out.splitlines()]
    assert [(x["verdict"], x["status"], x["path"]) for x in lines] == [
        ("allow", 200, "/items/1"), ("deny", 403, "/admin"), ("allow", 200, "/reports/x/summary"),
        ("error", 400, "/items")], lines
    assert lines[0]["rule"] == "catalog-read" and lines[2]["rule"] == "catalog-glob"
    assert "client" in lines[0] and "time" in lines[0] and "total_s" in lines[0]
    assert "stopped; 2 allowed, 1 denied, 1 errors" in err


def test_standalone_tls_app_and_text_output(target):
    p, port = _serve(["--upstream", f"127.0.0.1:{target.vault_port}", "--policy", str(target.material.policy_path),
                      "--rule", "vault-read", "--tls-app", "vault"])
    try:
        url = f"https://vault.l7.internal:{port}"
        r = _sp.run(["curl", "-sS", "--cacert", str(target.ca_file), "--resolve", f"vault.l7.internal:{port}:127.0.0.1",
                     f"{url}/secret/x"], capture_output=True, timeout=20)
        e = _json.loads(r.stdout)
        assert e["tls"] is True and e["target"] == "/secret/x"
        # plain HTTP on the same port, Host not the app's name
        c = Raw(socket.create_connection(("127.0.0.1", port)))
        c.send(req("GET", "/secret/y", host="catalog.l7.internal"))
        r = c.final()
        assert r.status == 403 and b"is not app vault's" in r.body
        c.close()
    finally:
        code, out, err = _stop(p)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and "ALLOW 200 GET vault.l7.internal/secret/x rule=vault-read" in lines[0], out
    assert "DENY  403 GET catalog.l7.internal/secret/y" in lines[1], out


@pytest.mark.parametrize("args, message", [
    (["--rule", "no-such-rule"], "rule 'no-such-rule' is not in"),
    (["--rule", "catalog-reed"], "did you mean 'catalog-read'"),
    (["--rule", "catalog-read", "--tls-app", "nope"], "--tls-app 'nope' is not an app"),
    (["--rule", "catalog-read", "--tls-app", "catalog"], "has no tls"),
])
def test_standalone_bad_input(target, args, message):
    r = _sp.run(_BULKHEAD + ["verifier", "serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
                             "--policy", str(target.material.policy_path), *args],
                capture_output=True, timeout=30, cwd=_REPO)
    assert r.returncode == 2 and message in r.stderr.decode(), r


def test_standalone_not_l7_rule_and_bad_policy(tmp_path):
    r = _sp.run(_BULKHEAD + ["verifier", "serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
                             "--policy", "policies/example.yaml", "--rule", "web-to-payments"],
                capture_output=True, timeout=30, cwd=_REPO)
    assert r.returncode == 2 and "has no http: entries" in r.stderr.decode(), r
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules: 3\n")
    r = _sp.run(_BULKHEAD + ["verifier", "serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
                             "--policy", str(bad), "--rule", "x"], capture_output=True, timeout=30, cwd=_REPO)
    assert r.returncode == 2 and "bad.yaml:2:" in r.stderr.decode(), r
    r = _sp.run(_BULKHEAD + ["verifier", "serve", "--listen", "127.0.0.1", "--upstream", "127.0.0.1:9",
                             "--policy", str(bad), "--rule", "x"], capture_output=True, timeout=30, cwd=_REPO)
    assert r.returncode == 2 and "--listen must be HOST:PORT" in r.stderr.decode(), r


def test_opener_error_is_502_not_a_hang(target):
    async def broken_opener(ctx):
        raise ValueError("opener bug")

    eng, port = _engine(target, ("127.0.0.1", target.catalog_port), opener=broken_opener)
    try:
        c = Raw(socket.create_connection(("127.0.0.1", port)))
        c.send(req("GET", "/items"))
        r = c.final()
        assert r.status == 502 and b"opener bug" in r.body
        c.close()
    finally:
        eng.stop()


def test_standalone_ipv6_listen(target):
    p = _sp.Popen(_BULKHEAD + ["verifier", "serve", "--listen", "[::1]:0", "--upstream",
                               f"127.0.0.1:{target.catalog_port}", "--policy", str(target.material.policy_path),
                               "--rule", "catalog-read"], stdout=_sp.PIPE, stderr=_sp.PIPE, cwd=_REPO)
    try:
        line = p.stderr.readline().decode()
        assert "listening on [::1]:" in line, line
        port = int(line.split("listening on [::1]:")[1].split(" ")[0])
        c = Raw(socket.create_connection(("::1", port)))
        c.send(req("GET", "/items/v6"))
        r = c.final()
        assert r.status == 200 and r.json()["target"] == "/items/v6"
        c.close()
    finally:
        code, out, _ = _stop(p)
    assert code == 0 and "ALLOW 200 GET catalog.l7.internal/items/v6" in out


def test_stalled_upload_cut_after_idle_timeout(target):
    settings = dict(target.policy.settings, idle_timeout=1.0)
    eng, port = _engine(target, ("127.0.0.1", target.catalog_port), settings)
    try:
        c = Raw(socket.create_connection(("127.0.0.1", port)))
        c.send(req("POST", "/upload/stall", headers=[("Content-Length", "1000")]) + b"x" * 10)
        t0 = time.monotonic()
        assert c.closed(wait=5)
        assert 0.8 < time.monotonic() - t0 < 4
        c.close()
        recs = cases.wait_records(eng, 1)
        assert recs and recs[0]["verdict"] == "error" and recs[0]["bytes_in"] == 10, recs
        assert any(e[1] == "timeout" and e[2] == "stall" for e in eng.events())
    finally:
        eng.stop()
