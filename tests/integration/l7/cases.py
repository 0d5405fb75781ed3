"""The L7 verifier case matrix: harness-agnostic, each case a function of a `target`.

A harness runs every case in CASES against its own target:

    @pytest.mark.parametrize("case", cases.CASES, ids=cases.ids())
    def test_l7(case, target):
        case(target)

The target protocol (what a harness provides; the loopback one is loopback.py):

    host, port          the plain-HTTP app (catalog) as the client dials it
    tls_host, tls_port  the TLS-terminated app (vault, named vault.l7.internal)
    ca_file             CA that signed the verifier's certificate for vault
    material            material.Material: JWTs, API keys (the policy was made from it)
    connect(tls=False, server_hostname=None) -> socket.socket
                        a connected socket from the client side (tls: to vault, wrapped
                        with ca_file; server_hostname defaults to vault.l7.internal)
    run(argv, timeout=30, input=None) -> subprocess.CompletedProcess
                        curl etc. on the client side (stdout/stderr captured as bytes)
    records() -> list[dict]      RequestRecords (as dicts) produced since the last call
    origin_log() -> list[dict]   requests the origins received since the last call
                                 (origin.py --log lines: method, target, headers, body_len,
                                 body_sha256, tls, sni, ...)

Every case checks what the client got *and* what the origin saw (allowed requests
arrive, denied and smuggled ones never do), and most check the records.
The policy is policy.yaml (rules catalog-read, catalog-glob, catalog-hosts,
catalog-headers, catalog-jwt, catalog-apikey, vault-read).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import secrets
import socket
import ssl
import time

from . import origin as origin_mod

CASES: list = []

VAULT = "vault.l7.internal"
HEADER_TIMEOUT = 1.5   # policy.yaml settings.http
IDLE_TIMEOUT = 2.5
MAX_HEADER = 8192


def case(fn):
    CASES.append(fn)
    return fn


def ids() -> list[str]:
    return [c.__name__.removeprefix("case_") for c in CASES]


def nonce() -> str:
    return secrets.token_hex(6)


# ------------------------------------------------------------------ helpers

class Resp:
    def __init__(self, status: int, reason: str, headers: list, body: bytes, version: str):
        self.status, self.reason, self.headers, self.body, self.version = status, reason, headers, body, version

    def header(self, name: str):
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def json(self) -> dict:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Resp {self.status} {self.reason!r} {self.headers} {self.body[:200]!r}>"


class Raw:
    """A raw HTTP/1.1 client on a socket, with its own (independent) response parser."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0):
        self.s = sock
        self.buf = b""
        self.eof = False
        sock.settimeout(timeout)

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.s.recv(262144)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed; got {self.buf[:200]!r}")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int, sink=None) -> bytes:
        out = []
        while n > 0:
            if not self.buf and not self._fill():
                raise EOFError("connection closed inside a body")
            take = self.buf[:n]
            self.buf = self.buf[n:]
            n -= len(take)
            if sink is not None:
                sink(take)
            else:
                out.append(take)
        return b"".join(out)

    def response(self, head: bool = False, sink=None) -> Resp:
        """Read one response (1xx included). With `sink`, the body is passed to it, not kept."""
        line = self._line()
        version, _, rest = line.decode("latin-1").partition(" ")
        code, _, reason = rest.partition(" ")
        status = int(code)
        headers = []
        while True:
            h = self._line()
            if not h:
                break
            n, _, v = h.decode("latin-1").partition(":")
            headers.append((n, v.strip()))
        r = Resp(status, reason, headers, b"", version)
        te = (r.header("transfer-encoding") or "").lower()
        if head or status < 200 or status in (204, 304):
            return r
        parts = []
        put = sink or parts.append
        if "chunked" in te:
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass
                    break
                self._exact(size, put)
                self._line()
        elif r.header("content-length") is not None:
            self._exact(int(r.header("content-length")), put)
        else:
            while self._fill():
                pass
            put(self.buf)
            self.buf = b""
        r.body = b"".join(parts)
        return r

    def final(self, head: bool = False) -> Resp:
        """The final response, skipping 1xx."""
        while True:
            r = self.response(head)
            if r.status >= 200:
                return r

    def closed(self, wait: float = 3.0) -> bool:
        """True if the peer closes (EOF or reset) within `wait` seconds; unread bytes are dropped."""
        deadline = time.monotonic() + wait
        self.s.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                data = self.s.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not data:
                return True
        return False

    def close(self) -> None:
        try:
            self.s.close()
        except OSError:
            pass


def raw(t, tls: bool = False, server_hostname=None) -> Raw:
    return Raw(t.connect(tls=tls, server_hostname=server_hostname))


def req(method: str, path: str, host: str = "catalog.l7.internal", headers=(), body: bytes | None = None,
        version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    for n, v in headers:
        lines.append(f"{n}: {v}")
    if body is not None and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def get(t, path: str, headers=(), host: str = "catalog.l7.internal", tls: bool = False) -> Resp:
    """One request on a fresh connection."""
    c = raw(t, tls=tls)
    try:
        c.send(req("GET", path, host=host, headers=headers))
        return c.final()
    finally:
        c.close()


def seen(log: list[dict], needle: str) -> list[dict]:
    return [e for e in log if needle in e.get("target", "")]


def drain(t) -> None:
    """Forget records and origin log entries left by earlier cases."""
    time.sleep(0.05)
    t.records()
    t.origin_log()


def wait_records(t, n: int, timeout: float = 5.0) -> list[dict]:
    """At least n records (records may arrive a little after the responses)."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        out += t.records()
        if len(out) >= n or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def origin_log(t, settle: float = 0.1) -> list[dict]:
    time.sleep(settle)
    return t.origin_log()


def expect_allowed(t, path: str, resp: Resp, log=None) -> dict:
    assert resp.status == 200, f"{path}: expected 200, got {resp!r}"
    log = origin_log(t) if log is None else log
    hits = seen(log, path)
    assert hits, f"{path}: allowed, but the origin did not see it (log: {[e['target'] for e in log]})"
    return hits[-1]


def expect_denied(t, path: str, resp: Resp, rule: str | None = None, status: int = 403, log=None) -> None:
    assert resp.status == status, f"{path}: expected {status}, got {resp!r}"
    if status == 403:
        assert resp.body.startswith(b"denied by rule "), resp
        assert resp.header("X-Bulkhead-Reason"), resp
        if rule is not None:
            assert resp.header("X-Bulkhead-Rule") == rule, resp
    log = origin_log(t) if log is None else log
    assert not seen(log, path), f"{path}: denied, yet the origin saw it"


# ------------------------------------------------------------------ match types

@case
def case_methods_and_paths(t):
    drain(t)
    n = nonce()
    expect_allowed(t, f"/items/{n}-a", get(t, f"/items/{n}-a"))
    r = get(t, "/items")
    assert r.status == 200, r
    c = raw(t)
    c.send(req("DELETE", f"/items/{n}-del"))
    expect_denied(t, f"/items/{n}-del", c.final(), rule="catalog-read")
    c.close()
    expect_denied(t, f"/itemsX{n}", get(t, f"/itemsX{n}"))
    expect_denied(t, f"/admin/{n}", get(t, f"/admin/{n}"))
    c = raw(t)
    c.send(req("POST", f"/upload/{n}", body=b"hello world"))
    r = c.final()
    c.close()
    e = expect_allowed(t, f"/upload/{n}", r)
    assert e["body_len"] == 11 and e["method"] == "POST"


@case
def case_glob_paths(t):
    drain(t)
    n = nonce()
    expect_allowed(t, f"/reports/{n}/summary", get(t, f"/reports/{n}/summary"))
    expect_denied(t, f"/reports/{n}/x/summary", get(t, f"/reports/{n}/x/summary"))
    expect_allowed(t, f"/docs/{n}/a/b/c.html", get(t, f"/docs/{n}/a/b/c.html"))
    expect_denied(t, f"/doc/{n}", get(t, f"/doc/{n}"))


@case
def case_hosts(t):
    drain(t)
    n = nonce()
    expect_allowed(t, f"/tenant/{n}-1", get(t, f"/tenant/{n}-1", host="catalog.l7.internal"))
    expect_allowed(t, f"/tenant/{n}-2", get(t, f"/tenant/{n}-2", host="Blue.Tenants.L7.Internal.:80"))
    expect_denied(t, f"/tenant/{n}-3", get(t, f"/tenant/{n}-3", host="a.b.tenants.l7.internal"))
    expect_denied(t, f"/tenant/{n}-4", get(t, f"/tenant/{n}-4", host="tenants.l7.internal"))
    expect_denied(t, f"/tenant/{n}-5", get(t, f"/tenant/{n}-5", host="evil.example"))


@case
def case_headers_every_form(t):
    drain(t)
    n = nonce()
    ok = [
        ("/h/present", [("X-Trace", "1")]),
        ("/h/equals", [("X-Tenant", "blue")]),
        ("/h/glob", [("X-Client", "shop-web")]),
        ("/h/absent", []),
        ("/h/mapping", [("X-Mode", "ro"), ("X-Ver", "v1.2"), ("X-Flag", "")]),
    ]
    bad = [
        ("/h/present", []),
        ("/h/equals", [("X-Tenant", "red")]),
        ("/h/equals", [("X-Tenant", "blue"), ("X-Tenant", "blue")]),  # repeated: ambiguous
        ("/h/glob", [("X-Client", "web-shop")]),
        ("/h/absent", [("X-Debug", "1")]),
        ("/h/mapping", [("X-Mode", "rw"), ("X-Ver", "v1.2"), ("X-Flag", "1")]),
        ("/h/mapping", [("X-Mode", "ro"), ("X-Ver", "v2.0"), ("X-Flag", "1")]),
        ("/h/mapping", [("X-Mode", "ro"), ("X-Ver", "v1.0")]),
    ]
    for i, (p, hs) in enumerate(ok):
        path = f"{p}?n={n}-ok{i}"
        expect_allowed(t, path, get(t, path, headers=hs))
    for i, (p, hs) in enumerate(bad):
        path = f"{p}?n={n}-bad{i}"
        expect_denied(t, path, get(t, path, headers=hs))


@case
def case_jwt(t):
    drain(t)
    m = t.material
    n = nonce()

    def bearer(tok):
        return [("Authorization", f"Bearer {tok}")]

    good = [
        ("hs", {}), ("rs", {}), ("es", {"scope": "catalog.read other"}),
        ("hs", {"aud": ["x", "catalog"]}),
    ]
    for i, (kind, claims) in enumerate(good):
        path = f"/jwt/{kind}/{n}-ok{i}"
        expect_allowed(t, path, get(t, path, headers=bearer(m.jwt(kind, **claims))))
    bad = [
        ("hs", dict(exp_in=-3600), "expired"),
        ("hs", dict(wrong_key=True), "wrong signature"),
        ("hs", dict(aud="billing"), "wrong audience"),
        ("hs", dict(iss="someone-else"), "wrong issuer"),
        ("rs", dict(sub="intruder"), "wrong subject"),
        ("rs", dict(wrong_key=True), "wrong signature"),
        ("es", dict(scope="catalog.write"), "missing scope"),
        ("es", dict(wrong_key=True, scope="catalog.read"), "wrong signature"),
        ("es", dict(scope="catalog.read", nbf=int(time.time()) + 3600), "not yet valid"),
    ]
    for i, (kind, kw, why) in enumerate(bad):
        path = f"/jwt/{kind}/{n}-bad{i}"
        r = get(t, path, headers=bearer(m.jwt(kind, **kw)))
        expect_denied(t, path, r)
    # an HS token presented to the RS entry (algorithm confusion), no token, garbage
    expect_denied(t, f"/jwt/rs/{n}-confused", get(t, f"/jwt/rs/{n}-confused", headers=bearer(m.jwt("hs"))))
    expect_denied(t, f"/jwt/hs/{n}-none", get(t, f"/jwt/hs/{n}-none"))
    expect_denied(t, f"/jwt/hs/{n}-junk", get(t, f"/jwt/hs/{n}-junk", headers=bearer("a.b.c")))


@case
def case_api_key(t):
    drain(t)
    m = t.material
    n = nonce()
    expect_allowed(t, f"/key/{n}-1", get(t, f"/key/{n}-1", headers=[("X-API-Key", m.api_keys[0])]))
    expect_allowed(t, f"/key/{n}-2", get(t, f"/key/{n}-2", headers=[("X-API-Key", m.api_keys[1])]))
    expect_denied(t, f"/key/{n}-3", get(t, f"/key/{n}-3", headers=[("X-API-Key", m.api_keys[0] + "x")]))
    expect_denied(t, f"/key/{n}-4", get(t, f"/key/{n}-4"))
    expect_allowed(t, f"/bearer-key/{n}-5",
                   get(t, f"/bearer-key/{n}-5", headers=[("Authorization", f"Bearer {m.api_keys[0]}")]))
    expect_denied(t, f"/bearer-key/{n}-6",
                  get(t, f"/bearer-key/{n}-6", headers=[("X-API-Key", m.api_keys[0])]))


# ------------------------------------------------------------------ connections

@case
def case_keepalive_allow_deny_allow(t):
    drain(t)
    n = nonce()
    c = raw(t)
    c.send(req("GET", f"/items/{n}-1"))
    assert c.final().status == 200
    c.send(req("GET", f"/admin/{n}-2"))
    r = c.final()
    assert r.status == 403 and r.header("Connection") == "keep-alive", r
    # a denied request with a small body: the body is skipped, the connection survives
    c.send(req("POST", f"/admin/{n}-3", body=b"x" * 1000))
    assert c.final().status == 403
    c.send(req("GET", f"/items/{n}-4"))
    assert c.final().status == 200
    c.close()
    log = origin_log(t)
    assert seen(log, f"/items/{n}-1") and seen(log, f"/items/{n}-4")
    assert not seen(log, f"/admin/{n}")
    # both allowed requests went over one upstream connection
    assert seen(log, f"/items/{n}-1")[0]["conn"] == seen(log, f"/items/{n}-4")[0]["conn"]


@case
def case_denied_unskippable_body_closes(t):
    drain(t)
    n = nonce()
    # chunked body on a denied request: can't be skipped safely -> Connection: close
    c = raw(t)
    c.send(req("POST", f"/admin/{n}-1", headers=[("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n0\r\n\r\n"
           + req("GET", f"/items/{n}-after"))
    r = c.final()
    assert r.status == 403 and r.header("Connection") == "close", r
    assert c.closed()
    c.close()
    # Expect: 100-continue on a denied request: the body may or may not come -> close
    c = raw(t)
    c.send(req("POST", f"/admin/{n}-2", headers=[("Expect", "100-continue"), ("Content-Length", "10")]))
    r = c.final()
    assert r.status == 403 and r.header("Connection") == "close", r
    assert c.closed()
    c.close()
    log = origin_log(t)
    assert not seen(log, n), "the origin saw a request sent after an unskippable denied one"


@case
def case_pipelining(t):
    drain(t)
    n = nonce()
    c = raw(t)
    c.send(req("GET", f"/items/{n}-1") + req("GET", f"/admin/{n}-2")
           + req("POST", f"/upload/{n}-3", body=b"abc") + req("GET", f"/slow/50?{n}-4")
           + req("HEAD", f"/big/1000?{n}-5") + req("GET", f"/items/{n}-6"))
    rs = [c.final(), c.final(), c.final(), c.final(), c.final(head=True), c.final()]
    assert [r.status for r in rs] == [200, 403, 200, 200, 200, 200], rs
    assert rs[0].json()["target"].endswith(f"{n}-1")
    assert rs[2].json()["target"].endswith(f"{n}-3") and rs[2].json()["body_len"] == 3
    assert rs[3].json()["target"].endswith(f"{n}-4")
    assert rs[4].header("Content-Length") == "1000" and rs[4].body == b""
    assert rs[5].json()["target"].endswith(f"{n}-6")
    c.close()
    log = origin_log(t)
    assert [e["target"].rsplit("/", 1)[-1] for e in seen(log, n)] == \
        [f"{n}-1", f"{n}-3", f"50?{n}-4", f"1000?{n}-5", f"{n}-6"]


@case
def case_http10(t):
    drain(t)
    n = nonce()
    c = raw(t)
    c.send(req("GET", f"/items/{n}-1", version="HTTP/1.0"))
    r = c.final()
    assert r.status == 200
    assert c.closed(), "HTTP/1.0 without keep-alive must close"
    c.close()
    c = raw(t)
    c.send(req("GET", f"/items/{n}-2", version="HTTP/1.0", headers=[("Connection", "keep-alive")]))
    assert c.final().status == 200
    c.send(req("GET", f"/items/{n}-3", version="HTTP/1.0", host=None))  # 1.0 may omit Host
    assert c.final().status == 200
    c.close()
    log = origin_log(t)
    assert len(seen(log, n)) == 3


@case
def case_idle_keepalive_closed(t):
    drain(t)
    c = raw(t)
    c.send(req("GET", "/items"))
    assert c.final().status == 200
    t0 = time.monotonic()
    assert c.closed(wait=IDLE_TIMEOUT + 3), "an idle keep-alive connection must be closed"
    assert time.monotonic() - t0 >= IDLE_TIMEOUT - 0.5
    c.close()


# ------------------------------------------------------------------ bodies

@case
def case_chunked_both_ways(t):
    drain(t)
    n = nonce()
    body = bytes(range(256)) * 300
    c = raw(t)
    pieces = [body[i:i + 7000] for i in range(0, len(body), 7000)]
    chunked = b"".join(b"%x;ext=1\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\nX-Sum: 1\r\n\r\n"
    c.send(req("POST", f"/upload/{n}", headers=[("Transfer-Encoding", "chunked")]) + chunked)
    r = c.final()
    e = r.json()
    assert e["body_len"] == len(body) and e["body_sha256"] == hashlib.sha256(body).hexdigest(), e
    assert ["Transfer-Encoding", "chunked"] in e["headers"]
    assert ["X-Sum", "1"] in e["trailers"]
    # chunked response (origin re-framed by the verifier)
    c.send(req("GET", f"/chunked/300000?{n}"))
    r = c.final()
    assert r.status == 200 and r.header("Transfer-Encoding") == "chunked"
    assert r.body == origin_mod.pattern(300000)
    # the connection is still usable
    c.send(req("GET", f"/items/{n}-after"))
    assert c.final().status == 200
    c.close()


@case
def case_large_upload_and_download(t):
    drain(t)
    n = nonce()
    size = 64 * 1024 * 1024
    block = secrets.token_bytes(1 << 20)
    h = hashlib.sha256()
    c = raw(t)
    c.s.settimeout(60)
    c.send(req("PUT", f"/upload/{n}", headers=[("Content-Length", str(size))]))
    for _ in range(size >> 20):
        c.send(block)
        h.update(block)
    r = c.final()
    e = r.json()
    assert e["body_len"] == size and e["body_sha256"] == h.hexdigest()
    got = hashlib.sha256()
    count = [0]

    def sink(b):
        got.update(b)
        count[0] += len(b)

    c.send(req("GET", f"/big/{size}?{n}"))
    r = c.response(sink=sink)
    assert r.status == 200 and count[0] == size
    assert got.hexdigest() == origin_mod.pattern_sha256(size)
    c.close()
    recs = wait_records(t, 2)
    up = [x for x in recs if x["path"] == f"/upload/{n}"]
    down = [x for x in recs if x["path"] == f"/big/{size}"]
    assert up and up[0]["bytes_in"] == size, recs
    assert down and down[0]["bytes_out"] == size, recs


@case
def case_expect_100_continue(t):
    drain(t)
    n = nonce()
    c = raw(t)
    c.send(req("POST", f"/upload/{n}", headers=[("Expect", "100-continue"), ("Content-Length", "5")]))
    r = c.response()
    assert r.status == 100, r
    c.send(b"hello")
    r = c.final()
    assert r.status == 200 and r.json()["body_len"] == 5
    c.close()
    res = t.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect: 100-continue",
                 "--data-binary", "@-", f"http://{t.host}:{t.port}/upload/{n}-curl"], input=b"y" * 5000)
    assert res.stdout.strip() == b"200", res


@case
def case_head_204_304_and_close_delimited(t):
    drain(t)
    n = nonce()
    c = raw(t)
    c.send(req("HEAD", f"/big/5000?{n}"))
    r = c.final(head=True)
    assert r.status == 200 and r.header("Content-Length") == "5000" and not r.body
    c.send(req("HEAD", f"/chunked/5000?{n}"))
    r = c.final(head=True)
    assert r.status == 200 and r.header("Transfer-Encoding") == "chunked"
    for s in (204, 304):
        c.send(req("GET", f"/status/{s}?{n}"))
        assert c.final().status == s
    c.send(req("GET", f"/items/{n}-still"))
    assert c.final().status == 200
    c.send(req("GET", f"/close?{n}"))
    r = c.final()
    assert r.status == 200 and r.json()["target"] == f"/close?{n}"
    assert c.closed()
    c.close()


@case
def case_origin_errors(t):
    drain(t)
    n = nonce()
    for p in ("/bad/clte", "/bad/garbage"):
        c = raw(t)
        c.send(req("GET", f"{p}?{n}"))
        r = c.final()
        assert r.status == 502, (p, r)
        assert c.closed()
        c.close()
    c = raw(t)
    c.send(req("GET", f"/bad/cut?{n}"))
    try:
        r = c.final()
        assert len(r.body) < 100, r  # the client must see the cut, not a complete body
    except EOFError:
        pass
    c.close()
    recs = wait_records(t, 3)
    bad = [x for x in recs if x["path"].startswith("/bad/")]
    assert {x["path"] for x in bad} == {"/bad/clte", "/bad/garbage", "/bad/cut"}, recs
    assert all(x["verdict"] == "error" for x in bad), bad


# ------------------------------------------------------------------ refusals (smuggling)

# (name, bytes to send, acceptable statuses). Each request carries a second request for a
# denied path (/admin/<n>) behind it: the origin must never see it, whatever the framing.
def _smuggle_inputs(n: str) -> list:
    smug = req("GET", f"/admin/{n}")
    H = "Host: catalog.l7.internal\r\n"
    return [
        ("dup-host", f"GET /items HTTP/1.1\r\n{H}Host: evil.example\r\n\r\n".encode() + smug, {400}),
        ("host-vs-absolute", f"GET http://evil.example/items HTTP/1.1\r\n{H}\r\n".encode() + smug, {400}),
        ("no-host-1.1", b"GET /items HTTP/1.1\r\n\r\n" + smug, {400}),
        ("dup-cl", f"POST /upload HTTP/1.1\r\n{H}Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc".encode() + smug, {400}),
        ("conflicting-cl", f"POST /upload HTTP/1.1\r\n{H}Content-Length: 3\r\nContent-Length: 40\r\n\r\nabc".encode() + smug, {400}),
        ("cl-list", f"POST /upload HTTP/1.1\r\n{H}Content-Length: 3, 3\r\n\r\nabc".encode() + smug, {400}),
        ("cl-te", f"POST /upload HTTP/1.1\r\n{H}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode() + smug, {400}),
        ("te-cl", f"POST /upload HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n".encode() + smug, {400}),
        ("te-chunked-identity", f"POST /upload HTTP/1.1\r\n{H}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".encode() + smug, {400, 501}),
        ("te-gzip-chunked", f"POST /upload HTTP/1.1\r\n{H}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".encode() + smug, {400, 501}),
        ("te-xchunked", f"POST /upload HTTP/1.1\r\n{H}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".encode() + smug, {400, 501}),
        ("te-twice", f"POST /upload HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode() + smug, {400, 501}),
        ("te-space-before-colon", f"POST /upload HTTP/1.1\r\n{H}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n".encode() + smug, {400}),
        ("te-vtab", f"POST /upload HTTP/1.1\r\n{H}Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n".encode() + smug, {400, 501}),
        ("te-leading-space-line", f"POST /upload HTTP/1.1\r\n{H} Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n".encode() + smug, {400}),
        ("te-http10", f"POST /upload HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode() + smug, {400}),
        ("obs-fold", f"GET /items HTTP/1.1\r\n{H}X-A: a\r\n b\r\n\r\n".encode() + smug, {400}),
        ("bare-cr", f"GET /items HTTP/1.1\r\n{H}X-A: a\rb\r\n\r\n".encode() + smug, {400}),
        ("nul", f"GET /items HTTP/1.1\r\n{H}X-A: a\x00b\r\n\r\n".encode() + smug, {400}),
        ("bare-lf", b"GET /items HTTP/1.1\nHost: catalog.l7.internal\n\n" + smug, {400}),
        ("bad-chunk-size", f"POST /upload HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n5x\r\nhello\r\n0\r\n\r\n".encode() + smug, {400}),
        ("chunk-size-overflow", f"POST /upload HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n".encode() + smug, {400}),
        ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + smug, {400, 505}),
        ("http2-version", f"GET /items HTTP/2.0\r\n{H}\r\n".encode() + smug, {400, 505}),
        ("http09", b"GET /items\r\n\r\n" + smug, {400, 505}),
        ("bad-version", f"GET /items HTTP/1.2\r\n{H}\r\n".encode() + smug, {400, 505}),
        ("connect", f"CONNECT catalog.l7.internal:80 HTTP/1.1\r\n{H}\r\n".encode() + smug, {400, 405, 501}),
        ("upgrade-h2c", f"GET /items HTTP/1.1\r\n{H}Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n".encode() + smug, {400, 501}),
        ("unknown-method", f"FOO /items HTTP/1.1\r\n{H}\r\n".encode() + smug, {400, 405, 501}),
        ("space-in-target", f"GET /items /x HTTP/1.1\r\n{H}\r\n".encode() + smug, {400}),
        ("encoded-slash", f"GET /items/..%2fadmin HTTP/1.1\r\n{H}\r\n".encode() + smug, {400}),
        ("dot-dot-escape", f"GET /../admin HTTP/1.1\r\n{H}\r\n".encode() + smug, {400}),
        ("header-too-big", f"GET /items HTTP/1.1\r\n{H}X-Big: {'a' * (MAX_HEADER + 100)}\r\n\r\n".encode() + smug, {431}),
        ("many-headers-too-big", (f"GET /items HTTP/1.1\r\n{H}" + "".join(f"X-{i}: {'b' * 90}\r\n" for i in range(120)) + "\r\n").encode() + smug, {431}),
        ("request-line-too-long", f"GET /items?{'q' * (MAX_HEADER + 100)} HTTP/1.1\r\n{H}\r\n".encode() + smug, {414, 431}),
        ("tls-to-plain-app-as-http", b"\x16\x03\x01\x00\x05hello" + smug, None),
    ]


@case
def case_smuggling_refused(t):
    drain(t)
    n = nonce()
    failures = []
    for name, data, statuses in _smuggle_inputs(n):
        c = raw(t)
        try:
            c.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            r = c.final()
        except (EOFError, ConnectionResetError, socket.timeout):
            r = None
        if statuses is None:
            if r is not None:
                failures.append(f"{name}: expected the connection closed without an answer, got {r!r}")
        elif r is None or r.status not in statuses:
            failures.append(f"{name}: expected {sorted(statuses)}, got {r!r}")
        elif r.header("Connection") != "close":
            failures.append(f"{name}: a refusal must close the connection: {r!r}")
        if not c.closed(wait=3):
            failures.append(f"{name}: connection left open after a refusal")
        c.close()
    log = origin_log(t, settle=0.3)
    smuggled = seen(log, f"/admin/{n}")
    assert not smuggled, f"SMUGGLED past the verifier: {smuggled}"
    assert not failures, "\n".join(failures)


@case
def case_smuggle_inside_allowed_body(t):
    """A request hidden in an allowed request's body reaches the origin only as body bytes."""
    drain(t)
    n = nonce()
    hidden = req("GET", f"/admin/{n}-hidden")
    c = raw(t)
    c.send(req("POST", f"/upload/{n}", body=hidden) + req("GET", f"/items/{n}-next"))
    r1, r2 = c.final(), c.final()
    assert r1.status == 200 and r1.json()["body_len"] == len(hidden)
    assert r2.status == 200 and r2.json()["target"] == f"/items/{n}-next"
    c.close()
    c = raw(t)
    body = b"0\r\n\r\n" + hidden
    c.send(req("POST", f"/upload/{n}-2", headers=[("Transfer-Encoding", "chunked")])
           + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    r = c.final()
    assert r.status == 200 and r.json()["body_len"] == len(body)
    c.close()
    log = origin_log(t)
    assert not seen(log, f"/admin/{n}"), "the origin parsed a request out of a body"


@case
def case_normalized_target_forwarded(t):
    drain(t)
    n = nonce()
    r = get(t, f"/items/./{n}/../{n}-x?q=%2F")
    assert r.status == 200, r
    assert r.json()["target"] == f"/items/{n}-x?q=%2F", r.json()
    r = get(t, f"//items//{n}-y")
    assert r.status == 200 and r.json()["target"] == f"/items/{n}-y"
    expect_denied(t, f"/items/../admin/{n}", get(t, f"/items/../admin/{n}"))
    assert not seen(origin_log(t), f"/admin/{n}")


@case
def case_slowloris_408(t):
    drain(t)
    n = nonce()
    c = raw(t)
    c.send(f"GET /items/{n} HTTP/1.1\r\nHost: catalog.l7.internal\r\n".encode())
    t0 = time.monotonic()
    r = None
    try:
        for i in range(40):
            time.sleep(0.2)
            c.send(f"X-Drip-{i}: {i}\r\n".encode())
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        r = c.final()
    except (EOFError, ConnectionResetError):
        r = None
    took = time.monotonic() - t0
    assert r is not None and r.status == 408, r
    assert took < HEADER_TIMEOUT + 2.5, f"slowloris took {took:.1f}s"
    assert c.closed()
    c.close()
    # a connection that never sends anything is closed too
    c = raw(t)
    assert c.closed(wait=HEADER_TIMEOUT + 3)
    c.close()
    assert not seen(origin_log(t), n)


# ------------------------------------------------------------------ clients

@case
def case_curl(t):
    drain(t)
    n = nonce()
    base = f"http://{t.host}:{t.port}"
    res = t.run(["curl", "-sS", "-i", f"{base}/items/{n}-1", f"{base}/admin/{n}-2", f"{base}/items/{n}-3"])
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, res
    assert out.count("HTTP/1.1 200") == 2 and out.count("HTTP/1.1 403") == 1, out
    assert f"denied by rule" in out and "X-Bulkhead-Rule:" in out
    res = t.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "--data-binary", "@-",
                 "-H", "Content-Type: application/octet-stream", f"{base}/upload/{n}-4"], input=b"z" * 300000)
    assert res.stdout.strip() == b"200", res
    res = t.run(["curl", "-sS", "-H", "Transfer-Encoding: chunked", "--data-binary", "@-", f"{base}/upload/{n}-5"],
                input=b"c" * 100000)
    e = json.loads(res.stdout)
    assert e["body_len"] == 100000 and ["Transfer-Encoding", "chunked"] in e["headers"]
    log = origin_log(t)
    assert seen(log, f"{n}-1") and seen(log, f"{n}-3") and seen(log, f"{n}-4") and seen(log, f"{n}-5")
    assert not seen(log, f"{n}-2")


@case
def case_python_http_client(t):
    drain(t)
    n = nonce()
    conn = http.client.HTTPConnection(t.host, t.port, timeout=10)
    conn.sock = t.connect()
    conn.request("GET", f"/items/{n}-1", headers={"Host": "catalog.l7.internal"})
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200 and json.loads(body)["target"] == f"/items/{n}-1"
    conn.request("POST", f"/upload/{n}-2", body=b"q" * 70000, headers={"Host": "catalog.l7.internal"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["body_len"] == 70000
    conn.request("PUT", f"/nope/{n}-3", body=b"q" * 100, headers={"Host": "catalog.l7.internal"})
    r = conn.getresponse()
    assert r.status == 403 and r.getheader("X-Bulkhead-Rule")
    r.read()
    conn.request("GET", f"/items/{n}-4", headers={"Host": "catalog.l7.internal"})
    r = conn.getresponse()
    assert r.status == 200
    r.read()
    conn.close()
    log = origin_log(t)
    assert len(seen(log, n)) == 3 and not seen(log, f"{n}-3")
    # Via and X-Forwarded-For (settings.http via / x_forwarded_for are on in the test policy)
    e = seen(log, f"{n}-1")[0]
    names = {k.lower(): v for k, v in e["headers"]}
    assert names.get("via") == "1.1 bulkhead"
    assert names.get("x-forwarded-for")


# ------------------------------------------------------------------ TLS (vault)

@case
def case_tls_terminated(t):
    drain(t)
    n = nonce()
    url = f"https://{VAULT}:{t.tls_port}"
    resolve = ["--resolve", f"{VAULT}:{t.tls_port}:{t.tls_host}"]
    res = t.run(["curl", "-sS", "--cacert", str(t.ca_file), *resolve, f"{url}/secret/{n}-1"])
    assert res.returncode == 0, res
    e = json.loads(res.stdout)
    assert e["target"] == f"/secret/{n}-1"
    assert e["tls"] is True and e["sni"] == VAULT, "the verifier must re-encrypt to the origin, with SNI"
    res = t.run(["curl", "-sS", "-i", "--cacert", str(t.ca_file), *resolve, f"{url}/admin/{n}-2"])
    assert b"HTTP/1.1 403" in res.stdout and b"denied by rule vault-read" in res.stdout, res
    # Python ssl, keep-alive over TLS: allowed, denied, allowed
    c = raw(t, tls=True)
    c.send(req("GET", f"/secret/{n}-3", host=VAULT))
    assert c.final().status == 200
    c.send(req("GET", f"/admin/{n}-4", host=VAULT))
    assert c.final().status == 403
    c.send(req("POST", f"/secret/{n}-5", host=f"{VAULT}:{t.tls_port}", body=b"s" * 50000))
    r = c.final()
    assert r.status == 200 and r.json()["body_len"] == 50000
    # Host names another name than the TLS server name: 421, never forwarded
    c.send(req("GET", f"/secret/{n}-6", host="other.l7.internal"))
    r = c.final()
    assert r.status == 421, r
    c.close()
    # SNI other.l7.internal (in the certificate) but not the app's name: the Host must be the
    # SNI (else 421), and a Host equal to it is not vault's name (403)
    c = raw(t, tls=True, server_hostname="other.l7.internal")
    c.send(req("GET", f"/secret/{n}-7", host=VAULT))
    assert c.final().status == 421
    c.close()
    c = raw(t, tls=True, server_hostname="other.l7.internal")
    c.send(req("GET", f"/secret/{n}-8", host="other.l7.internal"))
    r = c.final()
    assert r.status == 403 and b"is not app vault's" in r.body, r
    c.close()
    # plain HTTP on the TLS app's port still gets checked (and re-encryption is not invented)
    log = origin_log(t)
    for i in (1, 3, 5):
        assert seen(log, f"{n}-{i}"), i
    for i in (2, 4, 6, 7, 8):
        assert not seen(log, f"{n}-{i}"), i


@case
def case_tls_big_download(t):
    drain(t)
    n = nonce()
    c = raw(t, tls=True)
    size = 8 * 1024 * 1024
    got = hashlib.sha256()
    count = [0]

    def sink(b):
        got.update(b)
        count[0] += len(b)

    c.send(req("GET", f"/big/{size}?{n}", host=VAULT))
    r = c.response(sink=sink)
    assert r.status == 200 and count[0] == size and got.hexdigest() == origin_mod.pattern_sha256(size)
    c.close()


@case
def case_tls_to_plain_app_closed(t):
    """A TLS ClientHello to an app without tls: the verifier can't read it, so it closes."""
    drain(t)
    ctx = ssl.create_default_context(cafile=str(t.ca_file))
    sock = t.connect()
    try:
        with ctx.wrap_socket(sock, server_hostname="catalog.l7.internal") as tls:
            tls.sendall(req("GET", "/items"))
            tls.recv(100)
        raise AssertionError("a TLS handshake succeeded on an app without TLS termination")
    except (ssl.SSLError, ConnectionResetError, OSError):
        pass
    finally:
        sock.close()


# ------------------------------------------------------------------ records

@case
def case_records(t):
    drain(t)
    n = nonce()
    c = raw(t)
    c.send(req("POST", f"/upload/{n}", body=b"r" * 1234))
    r1 = c.final()
    c.send(req("GET", f"/admin/{n}"))
    r2 = c.final()
    c.send(req("GET", f"/big/777?{n}"))
    r3 = c.final()
    c.close()
    assert (r1.status, r2.status, r3.status) == (200, 403, 200)
    c = raw(t)
    c.send(b"GET /items HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert c.final().status == 400
    c.close()
    recs = wait_records(t, 4)
    by = {x["path"]: x for x in recs}
    up = by[f"/upload/{n}"]
    assert up["verdict"] == "allow" and up["rule"] == "catalog-read" and up["status"] == 200
    assert up["bytes_in"] == 1234 and up["bytes_out"] == len(r1.body) and up["method"] == "POST"
    assert up["host"] == "catalog.l7.internal"
    assert 0 <= up["decision_s"] < 0.5 and 0 < up["total_s"] < 5 and up["ttfb_s"] > 0
    den = by[f"/admin/{n}"]
    assert den["verdict"] == "deny" and den["status"] == 403 and den["rule"] and den["reason"]
    assert den["bytes_out"] == 0 and den["ttfb_s"] == 0
    big = by["/big/777"]
    assert big["bytes_out"] == 777 and big["connect_s"] == 0, "reused upstream: connect_s is 0"
    bad = [x for x in recs if x["status"] == 400]
    assert bad and bad[0]["verdict"] == "error" and "Host" in bad[0]["reason"], recs
    for x in recs:
        for k in ("method", "path", "host", "verdict", "rule", "status", "reason", "bytes_in", "bytes_out",
                  "decision_s", "connect_s", "ttfb_s", "total_s"):
            assert k in x, (k, x)
