"""HTTP/1.1 framing of the L7 verifier, without sockets.

Three layers:
- agent/l7/http1.py helpers (head scanning, chunk framing, our own responses);
- llhttp (httptools) itself: which ambiguous inputs it rejects and which it lets
  through for the engine to refuse — if an httptools upgrade changes that, these fail;
- the engine (connection.Connection) driven through fake transports: what the client gets and
  exactly which bytes would reach the origin, with every input also fed split at
  every byte boundary.
"""
from __future__ import annotations

import re

import httptools
import pytest

from bulkhead.l7 import http1
from bulkhead.l7.settings import http_settings
from bulkhead.verifier.connection import Connection
from bulkhead.verifier.records import FlowContext
from bulkhead.verifier.proxy import new_event_loop
from bulkhead.verifier.upstream import Upstream
from bulkhead.l7.rules import RuleSet, compile_rule

# ------------------------------------------------------------------ helpers (http1.py)


@pytest.mark.parametrize("split", range(0, 30))
def test_find_head_end_across_reads(split):
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY"
    end = data.index(b"\r\n\r\n") + 4
    first, second = data[:split], data[split:]
    k = http1.find_head_end(b"", first)
    if k >= 0:
        assert k == end
        return
    tail = http1.head_tail(b"", first)
    k = http1.find_head_end(tail, second)
    assert k + len(first) == end, (split, k)


def test_find_head_end_tail_of_one_byte_pieces():
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    tail = b""
    for i in range(len(data)):
        piece = data[i:i + 1]
        k = http1.find_head_end(tail, piece)
        if k >= 0:
            assert i == len(data) - 1 and k == 1
            return
        tail = http1.head_tail(tail, piece)
    raise AssertionError("head end not found")


def test_chunk_framing():
    assert b"".join(http1.chunk(b"hello")) == b"5\r\nhello\r\n"
    assert b"".join(http1.chunk(b"x" * 300)) == b"12c\r\n" + b"x" * 300 + b"\r\n"
    assert http1.last_chunk() == b"0\r\n\r\n"
    assert http1.last_chunk([(b"X-Sum", b"1")]) == b"0\r\nX-Sum: 1\r\n\r\n"


@pytest.mark.parametrize("host, names, ok", [
    ("a.example", ["a.example"], True),
    ("b.example", ["a.example"], False),
    ("x.tenants.example", ["*.tenants.example"], True),
    ("x.y.tenants.example", ["*.tenants.example"], False),
    ("tenants.example", ["*.tenants.example"], False),
    (".tenants.example", ["*.tenants.example"], False),
    ("a.example", ["b.example", "*.example"], True),
])
def test_hostname_allowed(host, names, ok):
    assert http1.hostname_allowed(host, names) is ok


@pytest.mark.parametrize("value, ok", [
    (b"chunked", True), (b"Chunked", True), (b" chunked\t", True),
    (b"chunked, identity", False), (b"xchunked", False), (b"gzip, chunked", False), (b"chunked;q=1", False),
])
def test_is_token_chunked(value, ok):
    assert http1.is_token_chunked(value) is ok


@pytest.mark.parametrize("message, saw_te, status", [
    ("Invalid HTTP version", False, 505),
    ("Pause on PRI/Upgrade", False, 505),
    ("Invalid `Transfer-Encoding` header value", False, 501),
    ("Invalid `Transfer-Encoding` header value", True, 400),
    ("Request has invalid `Transfer-Encoding`", False, 501),
    ("Transfer-Encoding can't be present with Content-Length", False, 400),
    ("Duplicate Content-Length", False, 400),
    ("Invalid method encountered", False, 501),
    ("Unexpected whitespace after header value", False, 400),
])
def test_llhttp_error_status(message, saw_te, status):
    assert http1.llhttp_error_status(message, saw_te) == status


def _parse_response(data: bytes):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return status, headers, body


def test_deny_response():
    r = http1.deny_response("catalog-read", "path not allowed", keep_alive=True)
    status, h, body = _parse_response(r)
    assert status == 403 and body == b"denied by rule catalog-read: path not allowed\n"
    assert int(h[b"Content-Length"]) == len(body) and h[b"Connection"] == b"keep-alive"
    assert h[b"X-Bulkhead-Rule"] == b"catalog-read" and h[b"X-Bulkhead-Reason"] == b"path not allowed"
    head = http1.deny_response("r", "x", keep_alive=False, head_only=True)
    assert head.endswith(b"\r\n\r\n") and b"Connection: close" in head and b"denied" not in head


def test_own_responses_cannot_be_split_by_reasons():
    r = http1.error_response(400, "bad\r\nSet-Cookie: a=b\x00\xff")
    status, h, body = _parse_response(r)
    assert status == 400 and b"Set-Cookie" not in h
    assert re.fullmatch(rb"[\x20-\x7e]*", h[b"X-Bulkhead-Reason"])
    assert h[b"Connection"] == b"close"


# ------------------------------------------------------------------ the llhttp layer

class _Events:
    def __init__(self):
        self.headers = []
        self.complete = 0

    def on_header(self, n, v):
        self.headers.append((n, v))

    def on_message_complete(self):
        self.complete += 1


LLHTTP_REJECTS = {
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
    "bare CR": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    "NUL in value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\nHost: a\n\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "duplicate CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "CL with TE": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE chunked, identity": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    "TE twice": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    "TE xchunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "CL sign": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx",
    "CL list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1,1\r\n\r\nx",
    "chunk size junk": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1x\r\nx\r\n0\r\n\r\n",
    "unknown method": b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n",
    "HTTP/1.2": b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
    "tab in target": b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n",
}

# llhttp parses these; the engine must refuse them itself
LLHTTP_ACCEPTS = {
    "duplicate Host": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "missing Host": b"GET / HTTP/1.1\r\n\r\n",
    "TE gzip, chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "TE on HTTP/1.0": b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "HTTP/0.9 line": b"GET /\r\n\r\n",
    "HTTP/2.0 line": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("name", LLHTTP_REJECTS)
def test_llhttp_rejects(name):
    p = httptools.HttpRequestParser(_Events())
    with pytest.raises(httptools.HttpParserError):
        p.feed_data(LLHTTP_REJECTS[name])


@pytest.mark.parametrize("name", LLHTTP_ACCEPTS)
def test_llhttp_lets_through(name):
    ev = _Events()
    httptools.HttpRequestParser(ev).feed_data(LLHTTP_ACCEPTS[name])
    assert ev.complete == 1


def test_llhttp_response_rejects_cl_te_and_duplicate_cl():
    for data in (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
                 b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n"):
        with pytest.raises(httptools.HttpParserError):
            httptools.HttpResponseParser(_Events()).feed_data(data)


# ------------------------------------------------------------------ the engine, no sockets

class FakeTransport:
    def __init__(self):
        self.data = bytearray()
        self.closed = self.aborted = self.eof = False
        self.paused = False

    def write(self, b):
        self.data += b

    def writelines(self, bufs):
        for b in bufs:
            self.data += b

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = self.closed = True

    def is_closing(self):
        return self.closed

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof = True

    def get_extra_info(self, name, default=None):
        return default


class _Sink:
    def __init__(self):
        self.recs = []

    def request(self, ctx, rec):
        self.recs.append(rec)

    def connection(self, ctx, event, detail=""):
        pass


class _FakeVerifier:
    def __init__(self, loop):
        self.loop = loop
        self._conns = set()
        self.sink = _Sink()

    def _sink_conn(self, *a):
        pass


RULES = RuleSet([compile_rule("r", [{"methods": ["GET", "HEAD", "POST"], "paths": ["/ok", "/ok/*"]}])])


@pytest.fixture(scope="module")
def loop():
    lp = new_event_loop()
    yield lp
    lp.close()


class Engine:
    """A client connection with an already-connected fake upstream."""

    def __init__(self, loop, **settings):
        s = http_settings({"via": False, **settings})
        ctx = FlowContext(client=("198.18.20.5", 40000), original_dst=("198.19.20.10", 80), segment="s",
                          src_app="shop", dst_app="catalog", rules=RULES, settings=s)
        self.v = _FakeVerifier(loop)
        self.client = FakeTransport()
        self.origin = FakeTransport()
        self.conn = Connection(self.v, ctx, False)
        self.conn.connection_made(self.client)
        up = Upstream(self.conn)
        up.connection_made(self.origin)
        self.conn.up = up

    def feed(self, data: bytes, step: int = 0) -> "Engine":
        if step:
            for i in range(0, len(data), step):
                self.conn.data_received(data[i:i + step])
        else:
            self.conn.data_received(data)
        return self

    def respond(self, data: bytes) -> "Engine":
        self.conn.up.data_received(data)
        return self

    def statuses(self) -> list[int]:
        return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", bytes(self.client.data))]

    def close(self):
        if self.conn.timer is not None:
            self.conn.timer.cancel()


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

REFUSED = [
    ("dup host", b"GET /ok HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("no host", b"GET /ok HTTP/1.1\r\n\r\n", 400),
    ("host vs authority", b"GET http://b/ok HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("cl-te", b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-cl", b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400),
    ("gzip, chunked", b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("te on 1.0", b"POST /ok HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("obs-fold", b"GET /ok HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n", 400),
    ("http/0.9", b"GET /ok\r\n\r\n", 400),
    ("http/2.0", b"GET /ok HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("connect", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    ("upgrade", b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", 501),
    ("encoded slash", b"GET /ok/%2f.. HTTP/1.1\r\nHost: a\r\n\r\n", 400),
]


@pytest.mark.parametrize("step", [0, 1, 7])
@pytest.mark.parametrize("name, data, status", REFUSED, ids=[r[0] for r in REFUSED])
def test_engine_refuses(loop, name, data, status, step):
    smuggled = b"GET /ok/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    e = Engine(loop).feed(data + smuggled, step)
    assert e.statuses() == [status], bytes(e.client.data)
    assert b"Connection: close" in e.client.data
    assert e.client.closed or e.client.eof
    assert bytes(e.origin.data) == b"", "a refused request must not reach the origin"
    assert e.v.sink.recs[0].verdict == "error" and e.v.sink.recs[0].status == status
    e.close()


@pytest.mark.parametrize("step", [0, 1, 5, 64])
def test_engine_pipelined_allow_deny_allow(loop, step):
    data = (b"GET /ok/1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /no HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /ok/3 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    e = Engine(loop).feed(data, step)
    # only the first request is in flight: the others wait for its response
    assert bytes(e.origin.data) == b"GET /ok/1 HTTP/1.1\r\nHost: a\r\n\r\n"
    assert e.statuses() == []
    e.respond(OK_RESPONSE)
    assert e.statuses() == [200, 403]
    assert bytes(e.origin.data).endswith(b"POST /ok/3 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    e.respond(OK_RESPONSE)
    assert e.statuses() == [200, 403, 200]
    assert [(r.verdict, r.status, r.path) for r in e.v.sink.recs] == [
        ("allow", 200, "/ok/1"), ("deny", 403, "/no"), ("allow", 200, "/ok/3")]
    e.close()


@pytest.mark.parametrize("step", [0, 1, 3])
def test_engine_chunked_request_reframed(loop, step):
    body = b"5;ext=x\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\nHost: evil\r\n\r\n"
    e = Engine(loop).feed(b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body, step)
    sent = bytes(e.origin.data)
    head, _, rest = sent.partition(b"\r\n\r\n")
    # re-framed: same bytes, no extensions, forbidden trailers dropped
    chunks = re.findall(rb"([0-9a-f]+)\r\n", rest)
    assert b"ext" not in rest and b"evil" not in rest and rest.endswith(b"0\r\nX-T: 1\r\n\r\n")
    payload = b""
    pos = 0
    while True:
        k = rest.index(b"\r\n", pos)
        n = int(rest[pos:k], 16)
        if n == 0:
            break
        payload += rest[k + 2:k + 2 + n]
        pos = k + 2 + n + 2
    assert payload == b"hello world" and chunks
    e.close()


@pytest.mark.parametrize("step", [0, 1])
def test_engine_content_length_trailer_cuts_the_origin_off(loop, step):
    body = b"5\r\nhello\r\n0\r\nContent-Length: 9\r\n\r\n"
    e = Engine(loop).feed(b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body, step)
    assert e.statuses() == [400]
    assert b"0\r\n" not in bytes(e.origin.data).partition(b"\r\n\r\n")[2], "the body must not be completed"
    assert e.origin.aborted
    e.close()


def test_engine_forwards_normalized_target_and_adds_via_xff(loop):
    e = Engine(loop, via=True, x_forwarded_for=True)
    e.feed(b"GET /ok/./a/../b?x=%2F HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")
    assert bytes(e.origin.data) == (b"GET /ok/b?x=%2F HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n"
                                    b"Via: 1.1 bulkhead\r\nX-Forwarded-For: 198.18.20.5\r\n\r\n")
    e.close()


def test_engine_head_and_204_keep_framing(loop):
    e = Engine(loop).feed(b"HEAD /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    e.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")  # no body follows a HEAD response
    e.feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    e.respond(b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n")
    e.feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    e.respond(OK_RESPONSE)
    assert e.statuses() == [200, 204, 200]
    assert not e.client.closed
    e.close()


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"not http at all\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
])
def test_engine_malformed_response_502(loop, response):
    e = Engine(loop).feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    e.respond(response)
    assert e.statuses() == [502]
    assert b"Content-Length: 2\r\nTransfer" not in e.client.data
    assert e.client.closed or e.client.eof  # (closed, or half-closed and lingering)
    e.close()


def test_engine_response_then_unsolicited_bytes_cut(loop):
    e = Engine(loop).feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    e.respond(OK_RESPONSE + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
    assert b"evil" not in e.client.data
    assert e.client.aborted
    e.close()


@pytest.mark.parametrize("step", [0, 1, 13])
def test_engine_head_size_limit_exact(loop, step):
    limit = 1024
    base = b"GET /ok HTTP/1.1\r\nHost: a\r\nX-Pad: \r\n\r\n"
    fits = base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (limit - len(base)))
    assert len(fits) == limit
    e = Engine(loop, max_header_bytes=limit).feed(fits, step)
    assert e.statuses() == [] and bytes(e.origin.data).startswith(b"GET /ok")
    e.close()
    over = fits.replace(b"X-Pad: ", b"X-Pad: p")
    e = Engine(loop, max_header_bytes=limit).feed(over, step)
    assert e.statuses() == [431] and bytes(e.origin.data) == b""
    e.close()
    long_line = b"GET /ok?" + b"q" * limit + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    e = Engine(loop, max_header_bytes=limit).feed(long_line, step)
    assert e.statuses()[0] in (414, 431) and bytes(e.origin.data) == b""
    e.close()


def test_engine_denied_small_body_skipped_large_body_closes(loop):
    e = Engine(loop).feed(b"POST /no HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
                          b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    assert e.statuses() == [403] and b"Connection: keep-alive" in e.client.data
    assert bytes(e.origin.data) == b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n"
    e.close()
    e = Engine(loop).feed(b"POST /no HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\nhello")
    assert e.statuses() == [403] and b"Connection: close" in e.client.data
    assert bytes(e.origin.data) == b""
    e.close()
