"""The L7 verifier on loopback: every case of tests/integration/l7/cases.py against the
engine (agent/verifier/proxy.py) in-process, plus what only loopback can stage
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
