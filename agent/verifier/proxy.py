"""The verifier's engine: an asyncio HTTP/1.1 proxy that checks every request.

One `Verifier` serves listening sockets the caller made (the service's are
IP_TRANSPARENT sockets fed by nftables TPROXY; the standalone mode's are plain).
For each accepted connection:

1. `resolver(sock)` says which flow it is (FlowContext: apps, rules, TLS) — None
   resets the connection (`no_flow`).
2. If the flow's destination app terminates TLS, the first byte is peeked: a TLS
   record (0x16) is terminated with ctx.tls_server; anything else is plain HTTP.
   A TLS ClientHello on a flow without tls_server is closed (`tls_not_terminated`):
   what cannot be read cannot be checked.
3. Requests are framed by llhttp (httptools) plus the checks in http1.py, decided
   by ctx.rules, and answered in order (keep-alive and pipelining). Allowed ones go
   to the original destination over one upstream connection per client connection
   (`opener(ctx)` gives a connected socket; TLS is re-established to the origin if
   the client side was TLS). Denied ones get a 403 from the verifier; ambiguous or
   malformed ones an error status and the connection is closed: never a pass-through.

Performance: asyncio Protocols only (no streams, no per-request tasks), output
batched per read into one writelines() call, lazy timers (one TimerHandle per
connection, re-armed only when a deadline moves earlier).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
import ssl
import struct
import time
from typing import Any, Awaitable, Callable, Optional, Protocol

import httptools

from bulkhead.l7 import http1
from bulkhead.l7.http1 import CRLF, HEAD_END

log = logging.getLogger("bulkhead.verifier")
_clock = time.perf_counter  # record timings (uvloop's loop.time() has 1 ms resolution)

try:  # engineer A's modules; the engine only needs these names
    from bulkhead.l7.normalize import Refused, normalize_host, normalize_target, request_target
    from bulkhead.l7.rules import Request, RuleSet
except ImportError:  # pragma: no cover - while the matching code is not in the tree
    Refused = normalize_host = normalize_target = request_target = Request = RuleSet = None  # type: ignore


DEFAULT_SETTINGS: dict[str, Any] = {
    "via": False,               # add `Via: 1.1 bulkhead` to forwarded requests
    "x_forwarded_for": False,   # add `X-Forwarded-For: <client ip>`
    "max_header_bytes": 16384,  # request line + headers; above: 431 (414 for the target alone)
    "header_timeout": 10.0,     # s: a request head (and a TLS handshake) must arrive within this
    "idle_timeout": 60.0,       # s: idle keep-alive connections, stalled bodies
    # engine knobs (not in the policy schema; the caller may pass them)
    "connect_timeout": 10.0,    # s: opening the upstream connection (incl. TLS) -> 504
    "response_timeout": 60.0,   # s: request sent, no response head yet -> 504
    "discard_body_max": 65536,  # a denied request's Content-Length body up to this is read and dropped
}


def http_settings(settings: Optional[dict]) -> dict:
    """settings["http"] of a bundle (may be None/partial) with every default filled in."""
    out = dict(DEFAULT_SETTINGS)
    for k, v in (settings or {}).items():
        if v is not None:
            out[k] = v
    return out


@dataclasses.dataclass
class FlowContext:
    """What the verifier knows about one accepted connection (from the resolver)."""

    client: tuple                      # (ip, port) of the client
    original_dst: tuple                # (ip, port) the client dialed
    segment: str
    src_app: str
    dst_app: str
    rules: Any                         # rules.RuleSet: check(Request) -> Decision
    dst_hostnames: list = dataclasses.field(default_factory=list)  # Host must be one of these (if any)
    tls_server: Optional[ssl.SSLContext] = None  # terminate client TLS with this
    tls_client: Optional[ssl.SSLContext] = None  # re-encrypt to the origin with this
    settings: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SETTINGS))
    flow_id: str = ""


_RECORD_FIELDS = ("method", "path", "host", "verdict", "rule", "status", "reason", "bytes_in", "bytes_out",
                  "decision_s", "connect_s", "ttfb_s", "total_s")


class RequestRecord:
    """One per request the verifier answered or forwarded.

    A plain __slots__ class (one is made per request on the hot path); as_dict()
    and dict(rec) give the fields.
    """

    __slots__ = _RECORD_FIELDS

    method: str
    path: str
    host: Optional[str]
    verdict: str          # allow | deny | error
    rule: Optional[str]
    status: int           # status the client got (0: none, the connection was cut)
    reason: str
    bytes_in: int         # request body bytes received from the client
    bytes_out: int        # response body bytes sent to the client
    decision_s: float
    connect_s: float      # upstream connect (+ TLS) time; 0 when the connection was reused
    ttfb_s: float         # request sent upstream -> first response byte
    total_s: float        # first request byte -> response complete

    def __init__(self, method: str, path: str, host: Optional[str], verdict: str, rule: Optional[str],
                 status: int, reason: str, bytes_in: int = 0, bytes_out: int = 0, decision_s: float = 0.0,
                 connect_s: float = 0.0, ttfb_s: float = 0.0, total_s: float = 0.0):
        self.method = method
        self.path = path
        self.host = host
        self.verdict = verdict
        self.rule = rule
        self.status = status
        self.reason = reason
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.decision_s = decision_s
        self.connect_s = connect_s
        self.ttfb_s = ttfb_s
        self.total_s = total_s

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in _RECORD_FIELDS}

    def keys(self):
        return _RECORD_FIELDS

    def __getitem__(self, k: str):
        if k not in _RECORD_FIELDS:
            raise KeyError(k)
        return getattr(self, k)

    def __eq__(self, other):
        if other.__class__ is not RequestRecord:
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return "RequestRecord(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in _RECORD_FIELDS) + ")"


class Sink(Protocol):
    def request(self, ctx: FlowContext, rec: RequestRecord) -> None: ...

    def connection(self, ctx: Optional[FlowContext], event: str, detail: str = "") -> None: ...


Resolver = Callable[[socket.socket], Awaitable[Optional[FlowContext]]]
# A connected, non-blocking socket to ctx.original_dst. On cancellation the opener
# must close what it created. The verifier owns the returned socket.
Opener = Callable[[FlowContext], Awaitable[socket.socket]]


async def tcp_opener(ctx: FlowContext) -> socket.socket:
    """The plain opener: a TCP connection to ctx.original_dst (standalone mode, tests)."""
    loop = asyncio.get_running_loop()
    host, port = ctx.original_dst[0], ctx.original_dst[1]
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _NullSink:
    def request(self, ctx, rec):
        pass

    def connection(self, ctx, event, detail=""):
        pass


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing (the connection is ending)."""


# exchange actions
ALLOW, DENY, REFUSE = 1, 2, 3
# body framing
NOBODY, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3
# parse phases of the client side
IDLE, HEAD, BODY = 0, 1, 2

_METHODS = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")}

PIPELINE_MAX = 32          # queued requests beyond the one being served: pause reading
PENDING_MAX = 256 * 1024   # buffered upstream-bound bytes of not-yet-sent requests: pause reading
WRITE_HIGH = 256 * 1024    # transport write buffer high-water marks
LINGER_S = 2.0             # after answering and closing: keep reading (dropping) this long
HEADERS_MAX = 200          # header lines per request


class _Exchange:
    """One request and its response.

    No __slots__: the defaults are class attributes, so making one (per request,
    on the hot path) assigns only what differs.
    """

    method = b""
    target = b""
    version = "1.1"
    trailers: Optional[list] = None
    keep_alive = True
    body = NOBODY
    expect = False
    host_hdr: Optional[bytes] = None
    n_host = n_cl = n_te = 0
    te_chunked = False
    upgrade = False
    action = 0
    status = 0
    reason = ""
    rule: Optional[str] = None
    verdict = ""
    path = ""
    host: Optional[str] = None
    final = False          # the connection ends after this exchange (parsing stopped at it)
    out: Optional[list] = None  # upstream-bound bytes waiting for the upstream
    out_bytes = 0
    streaming = False
    discard = False
    head_out = b""
    req_done = False
    resp_done = False
    resp_started = False   # bytes of a final response went to the client
    resp_status = 0
    sent_1xx = False
    close_after = False
    reused = False
    t_sent = 0.0
    decision_s = connect_s = ttfb_s = 0.0
    bytes_in = bytes_out = 0
    recorded = False

    def __init__(self, t0: float):
        self.t0 = t0
        self.headers: list = []


class _Upstream(asyncio.Protocol):
    """The origin side of one client connection: parses responses, relays them."""

    def __init__(self, conn: "_Conn"):
        self.conn = conn
        self.transport: Optional[asyncio.Transport] = None
        self.parser = None
        self.ex: Optional[_Exchange] = None   # the exchange whose response is awaited
        self.framing = NOBODY
        self.status = 0
        self.reason = b""
        self.headers: list = []
        self.n_cl = self.n_te = 0
        self.chunked = False
        self.keep_alive = True
        self.in_body = False
        self.got_bytes = False
        self.head_only = False   # response to HEAD: only heads are parsed (llhttp can't be told)
        self.tail = b""
        self.closed = False
        self.usable = True       # may carry another request
        self.paused_writing = False
        self.reading_paused = False
        self.trailers: Optional[list] = None
        self.done: Optional[_Exchange] = None  # response complete, handled after the current feed
        self.raw = False  # forward the validated response bytes as received (see begin)

    # -- transport callbacks
    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    def begin(self, ex: _Exchange) -> None:
        """A new request is about to be sent: expect its response.

        Raw mode (HTTP/1.1 clients, not HEAD): llhttp validates the response
        (it refuses CL with TE, repeated CL, obs-fold, bad chunks, ...) and the
        bytes it accepted are relayed as received, without re-building heads or
        re-framing bodies. Otherwise (HTTP/1.0 clients: no 1xx may reach them;
        HEAD: heads fed one by one) the response is re-built from its parts.
        """
        self.ex = ex
        self.head_only = head = ex.method == b"HEAD"
        raw = not head and ex.version == "1.1"
        if self.parser is None or head or raw != self.raw:
            # a parser is reused while responses end cleanly (llhttp resets itself);
            # HEAD needs a fresh one (llhttp can't be told that no body follows)
            self.raw = raw
            self.parser = httptools.HttpResponseParser(_RawView(self) if raw else self)
        self.tail = b""
        self.got_bytes = False
        self.in_body = False

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        ex = self.ex
        if ex is None or self.parser is None:
            # unsolicited bytes: the origin is not speaking request/response
            self.usable = False
            self.transport.abort()
            return
        if not self.got_bytes:
            self.got_bytes = True
            ex.ttfb_s = _clock() - ex.t_sent
            conn.dl_up = 0.0
        if conn.dl_stall:
            conn.dl_stall = conn.loop.time() + conn.idle_timeout
        raw = self.raw
        try:
            if self.head_only:
                self._feed_heads(data)
            else:
                self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad("origin switched protocols")
            raw = False
        except httptools.HttpParserError as e:
            self.parser = None  # llhttp is in its error state now
            if not isinstance(e.__context__, _Stop):
                self._bad(f"malformed response from origin: {e}")
            elif raw and self.done is not None:
                # bytes after a complete response, in the same read: this read can't
                # be relayed whole, and the response in it can't be cut out
                self.done = None
                self.usable = False
                conn.abort_all("the origin sent bytes after its response")
                return
            raw = False
        else:
            if raw:
                conn.cl_buf.append(data)
                if ex.resp_status:
                    ex.resp_started = True
        done = self.done
        if done is not None:
            self.done = None
            conn.response_done(done, self)
        conn.flush_client()

    def _feed_heads(self, data: bytes) -> None:
        """Responses to HEAD: feed exactly one head at a time (1xx heads, then the final one)."""
        mv = memoryview(data)
        pos = 0
        n = len(data)
        while pos < n and self.ex is not None and self.head_only:
            end = http1.find_head_end(self.tail, data, pos)
            piece = mv[pos:] if end < 0 else mv[pos:end]
            self.tail = http1.head_tail(self.tail, piece)
            self.parser.feed_data(piece)
            if end < 0:
                return
            self.tail = b""
            pos = end
        if pos < n:  # bytes after the final head of a HEAD response: not HTTP we can frame
            self.usable = False

    def eof_received(self):
        return False  # close; connection_lost does the rest

    def connection_lost(self, exc):
        self.closed = True
        self.usable = False
        conn = self.conn
        if conn.up is self:
            conn.up = None
        ex = self.ex
        if ex is not None and not ex.resp_done:
            conn.upstream_lost(self, ex, exc)
        self.ex = None

    def pause_writing(self):
        self.paused_writing = True
        self.conn.update_reading()

    def resume_writing(self):
        self.paused_writing = False
        self.conn.update_reading()

    # -- parser callbacks
    def on_message_begin(self):
        if self.ex is None:
            # bytes after the response, before any new request: not ours to read
            self.usable = False
            raise _Stop()
        self.status = 0
        self.reason = b""
        self.headers = []
        self.n_cl = self.n_te = 0
        self.chunked = False
        self.trailers = None
        self.in_body = False

    def on_status(self, reason: bytes):
        self.reason += reason

    def on_header_raw(self, name: bytes, value: bytes):
        """Raw mode: only what framing needs (llhttp refuses CL+TE and repeated CL itself)."""
        if not self.in_body and len(name) in (14, 17):
            ln = name.lower()
            if ln == b"content-length":
                self.n_cl += 1
            elif ln == b"transfer-encoding":
                self.n_te += 1
                self.chunked = http1.is_token_chunked(value.rsplit(b",", 1)[-1])

    def on_header(self, name: bytes, value: bytes):
        if self.in_body:  # trailers of a chunked response
            if self.trailers is None:
                self.trailers = []
            if name.lower() not in http1.FORBIDDEN_TRAILERS:
                self.trailers.append((name, value.rstrip(b" \t")))
            return
        ln = name.lower()
        if ln == b"content-length":
            self.n_cl += 1
        elif ln == b"transfer-encoding":
            self.n_te += 1
            self.chunked = http1.is_token_chunked(value.rsplit(b",", 1)[-1])
        self.headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self):
        ex = self.ex
        conn = self.conn
        p = self.parser
        status = p.get_status_code()
        self.status = status
        version = p.get_http_version()
        if 100 <= status < 200 and status != 101:
            # 100 Continue, 103 Early Hints: relay to HTTP/1.1 clients (never to 1.0 ones)
            if ex.version == "1.1" and not ex.resp_started:
                if not self.raw:
                    conn.cl_buf.append(self._head(version, status, self.headers))
                ex.sent_1xx = True
            return
        if status == 101:  # upgrades are refused, so the origin switched unasked
            self._bad("origin switched protocols unasked")
            raise _Stop()
        if self.n_cl and self.n_te:
            self._bad("origin sent Content-Length with Transfer-Encoding")
            raise _Stop()
        self.keep_alive = p.should_keep_alive()
        if self.head_only or status in (204, 304):
            self.framing = NOBODY
        elif self.n_te:
            self.framing = CHUNKED if self.chunked else UNTIL_CLOSE
        elif self.n_cl:
            self.framing = LENGTH
        else:
            self.framing = UNTIL_CLOSE
        if self.framing == UNTIL_CLOSE:
            self.keep_alive = False
        if not self.keep_alive:
            self.usable = False
        ex.resp_status = status
        client_close = ex.close_after or not ex.keep_alive or self.framing == UNTIL_CLOSE
        if client_close:
            ex.close_after = True
        self.in_body = True
        if self.raw:
            return  # the bytes go out as received once this read is parsed
        ex.resp_started = True
        conn.cl_buf.append(self._head(version, status, self.headers))
        if self.head_only:
            # llhttp would wait for the body a HEAD response announces: done here
            self.parser = None
            self._complete()
            raise _Stop()  # (feed_data raises; data_received hands `done` on)

    def on_body(self, data: bytes):
        ex = self.ex
        ex.bytes_out += len(data)
        if self.raw:
            return
        if self.framing == CHUNKED:
            self.conn.cl_buf.extend(http1.chunk(data))
        else:
            self.conn.cl_buf.append(data)

    def on_message_complete(self):
        status = self.status
        if 100 <= status < 200 and status != 101:
            return
        if self.framing == CHUNKED and not self.raw:
            self.conn.cl_buf.append(http1.last_chunk(self.trailers))
        self._complete()

    # -- helpers
    def _head(self, version: str, status: int, headers: list) -> bytes:
        parts = [b"HTTP/%s %d %s\r\n" % (version.encode(), status, self.reason)]
        for n, v in headers:
            parts += (n, b": ", v, CRLF)
        parts.append(CRLF)
        return b"".join(parts)

    def _complete(self) -> None:
        """The response is complete; the connection moves on once the current feed returns."""
        ex = self.ex
        self.ex = None
        self.in_body = False
        ex.resp_done = True
        self.done = ex

    def _bad(self, why: str) -> None:
        ex = self.ex
        self.usable = False
        self.ex = None
        self.parser = None
        if self.transport is not None:
            self.transport.abort()
        if ex is not None and not ex.resp_done:
            self.conn.upstream_failed(ex, 502, why)

    def finish_until_close(self) -> bool:
        """EOF: a response delimited by close is complete now."""
        if self.ex is not None and self.in_body and self.framing == UNTIL_CLOSE:
            self._complete()
            done, self.done = self.done, None
            self.conn.response_done(done, self)
            return True
        return False


class _RawView:
    """The parser callbacks of an _Upstream in raw mode: no on_status, a minimal on_header
    (httptools only calls what the protocol object has)."""

    __slots__ = ("on_message_begin", "on_header", "on_headers_complete", "on_body", "on_message_complete")

    def __init__(self, up: _Upstream):
        self.on_message_begin = up.on_message_begin
        self.on_header = up.on_header_raw
        self.on_headers_complete = up.on_headers_complete
        self.on_body = up.on_body
        self.on_message_complete = up.on_message_complete


class _Conn(asyncio.Protocol):
    """The client side of one connection."""

    def __init__(self, verifier: "Verifier", ctx: FlowContext, tls: bool):
        self.v = verifier
        self.loop = verifier.loop
        self.ctx = ctx
        s = ctx.settings
        self.max_head = int(s.get("max_header_bytes", 16384))
        self.header_timeout = float(s.get("header_timeout", 10.0))
        self.idle_timeout = float(s.get("idle_timeout", 60.0))
        self.connect_timeout = float(s.get("connect_timeout", 10.0))
        self.response_timeout = float(s.get("response_timeout", 60.0))
        self.discard_max = int(s.get("discard_body_max", 65536))
        extra = []
        if s.get("via"):
            extra.append(b"Via: 1.1 bulkhead\r\n")
        if s.get("x_forwarded_for"):
            extra.append(b"X-Forwarded-For: " + str(ctx.client[0]).encode() + CRLF)
        self.extra_headers = b"".join(extra)
        self.tls = tls
        self.sni: Optional[str] = None
        self.host_raw: Optional[bytes] = None
        self.raw_head: Optional[bytes] = None  # the read being parsed, when it is exactly one head
        self.host_norm: Optional[str] = None
        self.target_key: Optional[tuple] = None  # (method, target) bytes of the last normalized target
        self.target_norm: tuple = ()
        self.transport: Optional[asyncio.Transport] = None
        self.parser = httptools.HttpRequestParser(self)
        self.phase = IDLE
        self.head_count = 0
        self.exact_count = 0
        self.tail = b""
        self.first = True
        self.cur: Optional[_Exchange] = None
        self.queue: collections.deque[_Exchange] = collections.deque()
        self.pending_bytes = 0
        self.up: Optional[_Upstream] = None
        self.connecting: Optional[asyncio.Task] = None
        self.up_buf: list = []
        self.cl_buf: list = []
        self.stopped = False        # no more requests are parsed
        self.closing = False        # closing or closed
        self.client_eof = False
        self.write_paused = False
        self.reading_paused = False
        self.closed = False
        # deadlines (loop time, 0 = none) and the one timer that serves them all
        now = self.loop.time()
        self.dl_head = now + self.header_timeout
        self.dl_idle = 0.0
        self.dl_up = 0.0
        self.dl_stall = 0.0
        self.timer: Optional[asyncio.TimerHandle] = None
        self.timer_at = 0.0

    # ------------------------------------------------------------- transport
    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        if self.tls:
            obj = transport.get_extra_info("ssl_object")
            name = getattr(obj, "_bh_sni", None)
            if name:
                try:
                    self.sni = normalize_host(name)
                except Exception:
                    self.sni = name.lower().rstrip(".")
        self.v._conns.add(self)
        self.arm(self.dl_head)

    def connection_lost(self, exc):
        self.closed = True
        self.closing = True
        self.v._conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.up is not None and self.up.transport is not None:
            self.up.transport.abort()
        self.up = None
        for ex in self.queue:
            if not ex.recorded:
                self.record(ex, status=0, verdict=ex.verdict or "error",
                            reason=ex.reason or "client closed the connection")
        self.queue.clear()
        self.v._sink_conn(self.ctx, "closed", "")

    def pause_writing(self):
        self.write_paused = True
        if self.up is not None and self.up.transport is not None and not self.up.reading_paused:
            self.up.reading_paused = True
            self.up.transport.pause_reading()
        self.update_reading()

    def resume_writing(self):
        self.write_paused = False
        if self.dl_stall:
            self.dl_stall = self.loop.time() + self.idle_timeout
        if self.up is not None and self.up.transport is not None and self.up.reading_paused:
            self.up.reading_paused = False
            self.up.transport.resume_reading()
        self.update_reading()

    def update_reading(self) -> None:
        """Pause reading the client while anything downstream of it is full."""
        if self.closed:
            return
        head = self.queue[0] if self.queue else None
        pause = (self.stopped or self.write_paused or self.pending_bytes > PENDING_MAX
                 or len(self.queue) > PIPELINE_MAX
                 or (head is not None and head.streaming and self.up is not None and self.up.paused_writing))
        if pause and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        elif not pause and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def eof_received(self):
        self.client_eof = True
        if self.stopped:
            return True
        if self.cur is not None or self.phase != IDLE:
            # a request cut short: nothing sensible can be sent on
            self.abort_all("client closed in the middle of a request")
            return False
        if not self.queue:
            self.close()
            return False
        self.queue[-1].close_after = True
        self.stopped = True
        return not self.tls  # keep the write side open to answer (plain TCP only)

    # ------------------------------------------------------------- timers
    def arm(self, when: float) -> None:
        if when and (self.timer is None or when < self.timer_at):
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = when
            self.timer = self.loop.call_at(when, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        if self.closed:
            return
        now = self.loop.time() + 0.001
        if self.dl_head and now >= self.dl_head and not self.stopped:
            self.dl_head = 0.0
            self.v._sink_conn(self.ctx, "timeout", "header")
            ex = self.cur or _Exchange(_clock())
            self.cur = None
            self.phase = IDLE
            self.refuse(ex, 408, f"request head not received within {self.header_timeout:g}s")
        elif self.dl_idle and now >= self.dl_idle:
            self.v._sink_conn(self.ctx, "timeout", "idle")
            self.close()
            return
        elif self.dl_up and now >= self.dl_up:
            self.dl_up = 0.0
            self.v._sink_conn(self.ctx, "timeout", "upstream")
            ex = self.queue[0] if self.queue else None
            if self.up is not None and self.up.transport is not None:
                up = self.up
                self.up = None
                up.ex = None
                up.transport.abort()
            if ex is not None:
                self.upstream_failed(ex, 504, f"origin did not answer within {self.response_timeout:g}s")
        elif self.dl_stall and now >= self.dl_stall and not (self.dl_up and self.queue and self.queue[0].req_done):
            # (while a complete request waits for its response head, response_timeout rules)
            self.v._sink_conn(self.ctx, "timeout", "stall")
            self.abort_all(f"no progress for {self.idle_timeout:g}s")
            return
        nxt = [d for d in (self.dl_head, self.dl_idle, self.dl_up, self.dl_stall) if d and d > now]
        if self.dl_stall and self.dl_stall <= now:  # ignored while waiting for the response head
            nxt.append(self.dl_up or now + 1.0)
        if nxt and not self.closed:
            self.arm(min(nxt))

    # ------------------------------------------------------------- reading
    def data_received(self, data: bytes) -> None:
        if self.stopped:
            return  # answering/closing: the rest is dropped (lingering close)
        if self.first:
            self.first = False
            if not self.tls and data[:1] == b"\x16":
                self.v._sink_conn(self.ctx, "tls_not_terminated", "TLS ClientHello on a flow without TLS termination")
                self.stopped = True
                self.transport.abort()
                return
        if self.dl_idle:
            self.dl_idle = 0.0
        if self.dl_stall:
            self.dl_stall = self.loop.time() + self.idle_timeout
        if self.phase == BODY:
            self._feed(data)
            if self.phase == HEAD:  # the next (pipelined) head started in this read
                self.tail = data[-3:]
        elif not self.tail and data.find(HEAD_END) == len(data) - 4:
            # the common case: this read is exactly one whole head
            self.head_count += len(data)
            self.raw_head = data
            self._feed(data)
            self.raw_head = None
            if self.phase != BODY and not self.stopped and self.head_count > self.max_head:
                self._too_big()
        else:
            self._feed_heads(data)
        self.flush_upstream()
        self.update_reading()

    def _feed_heads(self, data: bytes) -> None:
        """Feed in pieces that end where a head ends, so head sizes are counted exactly."""
        mv = memoryview(data)
        pos = 0
        n = len(data)
        while pos < n and not self.stopped:
            if self.phase == BODY:
                self._feed(mv[pos:])
                return
            end = http1.find_head_end(self.tail, data, pos)
            piece = mv[pos:] if end < 0 else mv[pos:end]
            self.head_count += len(piece)
            self.tail = http1.head_tail(self.tail, piece) if end < 0 else b""
            self._feed(piece)
            if self.phase != BODY and not self.stopped and self.head_count > self.max_head:
                self._too_big()
                return
            if end < 0:
                return
            pos = end

    def _feed(self, data) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # upgrade/CONNECT are refused in on_headers_complete (parsing stopped there)
        except httptools.HttpParserCallbackError as e:
            if not self.stopped:
                log.exception("verifier: parser callback failed", exc_info=e.__context__ or e)
                self._parse_error("internal error", 500)
        except httptools.HttpParserError as e:
            if not self.stopped:
                self._parse_error(str(e))

    def _parse_error(self, message: str, status: int = 0) -> None:
        ex = self.cur
        saw_te = ex is not None and ex.n_te > 0
        if not status:
            status = http1.llhttp_error_status(message, saw_te)
        if ex is None:
            ex = _Exchange(_clock())
        self.cur = None
        if ex in self.queue:
            # the request body was malformed after its head was accepted
            if ex.streaming:
                # the head (and part of the body) already went upstream: cut the origin off
                self.body_failed(ex, status, f"malformed request body: {message}")
                return
            ex.action = REFUSE
            ex.status = status
            ex.reason = f"malformed request body: {message}"
            ex.verdict = "error"
            ex.final = True
            self._drop_out(ex)
            self.stopped = True
            if self.queue[0] is ex:
                self.start(ex)
            self.update_reading()
            return
        self.refuse(ex, status, f"malformed request: {message}")

    def _too_big(self) -> None:
        ex = self.cur or _Exchange(_clock())
        self.cur = None
        self.refuse(ex, 431, f"request head larger than {self.max_head} bytes")

    # -- request parser callbacks
    def on_message_begin(self):
        self.cur = _Exchange(_clock())
        self.phase = HEAD
        self.exact_count = 0
        if self.dl_idle:
            self.dl_idle = 0.0
        if not self.dl_head:
            self.dl_head = self.loop.time() + self.header_timeout
            self.arm(self.dl_head)

    def on_url(self, url: bytes):
        ex = self.cur
        ex.target += url
        if len(ex.target) > self.max_head:
            self.refuse(ex, 414, f"request target longer than {self.max_head} bytes")
            raise _Stop()

    def on_header(self, name: bytes, value: bytes):
        ex = self.cur
        if self.phase == BODY:  # chunked trailers
            if ex.trailers is None:
                ex.trailers = []
            self.head_count += len(name) + len(value) + 4
            if self.head_count > self.max_head:
                self.cur = None
                self.refuse_body(ex, 431, f"trailers larger than {self.max_head} bytes")
                raise _Stop()
            if name.lower() not in http1.FORBIDDEN_TRAILERS:
                ex.trailers.append((name, value.rstrip(b" \t")))
            return
        value = value.rstrip(b" \t")
        headers = ex.headers
        headers.append((name, value))
        n = len(name)
        self.exact_count = c = self.exact_count + n + len(value) + 4
        if c > self.max_head:
            self.refuse(ex, 431, f"request head larger than {self.max_head} bytes")
            raise _Stop()
        if len(headers) > HEADERS_MAX:
            self.refuse(ex, 431, f"more than {HEADERS_MAX} header fields")
            raise _Stop()
        if n != 4 and n != 6 and n != 14 and n != 17:
            return  # not one of the names below
        ln = name.lower()
        if ln == b"host":
            ex.n_host += 1
            ex.host_hdr = value
        elif ln == b"content-length":
            ex.n_cl += 1
        elif ln == b"transfer-encoding":
            ex.n_te += 1
            ex.te_chunked = http1.is_token_chunked(value)
        elif ln == b"expect":
            ex.expect = value.lower() == b"100-continue"

    def on_headers_complete(self):
        ex = self.cur
        p = self.parser
        if self.head_count > self.max_head or self.exact_count > self.max_head:
            self.refuse(ex, 431, f"request head larger than {self.max_head} bytes")
            raise _Stop()
        self.head_count = 0
        self.exact_count = 0
        self.tail = b""
        self.dl_head = 0.0
        ex.method = p.get_method()
        ex.version = p.get_http_version()
        ex.keep_alive = p.should_keep_alive()
        ex.upgrade = p.should_upgrade()
        self.phase = BODY
        if ex.n_te:
            ex.body = CHUNKED
        elif ex.n_cl:
            ex.body = LENGTH  # llhttp: a Content-Length of 0 completes the message right away
        why = self._check_head(ex)
        if why is not None:
            self.refuse(ex, why[0], why[1])
            raise _Stop()
        self.decide(ex)
        self.queue.append(ex)
        if ex.final:
            # a denied request whose body can't be skipped safely: nothing after it is read
            self.stopped = True
            self.cur = None
            if len(self.queue) == 1:
                self.start(ex)
            raise _Stop()
        if len(self.queue) == 1:
            self.start(ex)

    def _check_head(self, ex: _Exchange):
        """Framing and routing ambiguity: (status, reason) to refuse, or None."""
        v = ex.version
        if v != "1.1" and v != "1.0":
            if v == "0.9":
                return 400, "HTTP/0.9 is not supported"
            return 505, f"HTTP/{v} is not supported on this port"
        if ex.method == b"CONNECT":
            return 405, "CONNECT not allowed"
        if ex.method == b"PRI":
            return 505, "HTTP/2 is not supported on this port"
        if ex.upgrade:
            return 501, "protocol upgrade is not supported"
        if ex.n_host > 1:
            return 400, "more than one Host header"
        if ex.n_host == 0 and v == "1.1":
            return 400, "missing Host header"
        if ex.n_cl > 1:
            return 400, "more than one Content-Length header"
        if ex.n_te:
            if ex.n_cl:
                return 400, "Content-Length with Transfer-Encoding"
            if ex.n_te > 1:
                return 400, "more than one Transfer-Encoding header"
            if not ex.te_chunked:
                return 501, "Transfer-Encoding other than chunked"
            if v == "1.0":
                return 400, "Transfer-Encoding in an HTTP/1.0 request"
        return None

    def on_body(self, data: bytes):
        ex = self.cur
        ex.bytes_in += len(data)
        if ex.discard or ex.action != ALLOW:
            return
        if ex.body == CHUNKED:
            self.send_up(ex, http1.chunk(data))
        else:
            self.send_up(ex, (data,))

    def on_message_complete(self):
        ex = self.cur
        self.cur = None
        self.phase = IDLE
        self.head_count = 0
        if ex is None:
            return
        ex.req_done = True
        if ex.body == CHUNKED and ex.action == ALLOW and not ex.discard:
            self.send_up(ex, (http1.last_chunk(ex.trailers),))
        if ex is (self.queue[0] if self.queue else None):
            if ex.resp_done:
                self.exchange_done(ex)

    # ------------------------------------------------------------- deciding
    def decide(self, ex: _Exchange) -> None:
        t = time.perf_counter()
        try:
            self._decide(ex)
        except Exception as e:  # a bug in matching must not pass a request
            if isinstance(e, Refused):
                ex.action, ex.status, ex.reason, ex.verdict = REFUSE, e.status, e.reason, "error"
            else:
                log.exception("verifier: deciding %r failed", ex.target)
                ex.action, ex.status, ex.reason, ex.verdict = REFUSE, 500, "internal error deciding the request", "error"
            ex.final = True
        ex.decision_s = time.perf_counter() - t
        if ex.action == DENY and ex.body != NOBODY:
            if ex.body == LENGTH and not ex.expect and self._content_length(ex) <= self.discard_max:
                ex.discard = True
            else:
                ex.final = True
                ex.close_after = True
        elif ex.action == REFUSE:
            ex.final = True

    def _content_length(self, ex: _Exchange) -> int:
        for n, v in ex.headers:
            if n.lower() == b"content-length":
                return int(v)
        return 0

    def _decide(self, ex: _Exchange) -> None:
        ctx = self.ctx
        method = _METHODS.get(ex.method) or ex.method.decode("ascii")
        tkey = (ex.method, ex.target)
        if tkey == self.target_key:  # keep-alive: the same request target again
            target, path, query, authority = self.target_norm
        else:
            target = ex.target.decode("latin-1")
            path, query, authority = normalize_target(method, target)
            self.target_key, self.target_norm = tkey, (target, path, query, authority)
        ex.path = path
        host = None
        hh = ex.host_hdr
        if hh is not None:
            if hh == self.host_raw:  # keep-alive: the same Host again
                host = self.host_norm
            else:
                host = normalize_host(hh.decode("latin-1"))
                self.host_raw, self.host_norm = hh, host
        if authority is not None:
            a = normalize_host(authority)
            if host is not None and a != host:
                raise Refused(400, f"Host {host} conflicts with the target's authority {a}")
            host = a
        ex.host = host
        if self.tls and self.sni is not None and host != self.sni:
            ex.action, ex.status, ex.verdict = DENY, 421, "deny"
            ex.reason = f"host {host} does not match the TLS server name {self.sni}"
            return
        if ctx.dst_hostnames and (host is None or not http1.hostname_allowed(host, ctx.dst_hostnames)):
            ex.action, ex.status, ex.verdict = DENY, 403, "deny"
            ex.reason = f"host {host} is not app {ctx.dst_app}'s"
            return
        d = ctx.rules.check(Request(method, path, query, host, raw_headers=ex.headers))
        ex.rule = d.rule
        ex.reason = d.reason
        if d.allowed:
            ex.action, ex.verdict = ALLOW, "allow"
            # The origin gets the normalized target: exactly what was checked.
            fwd = ex.target if (path == target and query is None) else request_target(path, query).encode("ascii")
            rh = self.raw_head
            if rh is not None and fwd is ex.target and not (authority is not None and ex.host_hdr is None):
                line = b"%s %s HTTP/%s\r\n" % (ex.method, fwd, ex.version.encode())
                if rh.startswith(line):  # canonical request line: relay the head as received
                    ex.head_out = rh[:-2] + self.extra_headers + CRLF if self.extra_headers else rh
                    ex.out = [ex.head_out]
                    ex.out_bytes = len(ex.head_out)
                    self.pending_bytes += ex.out_bytes
                    return
            parts = [ex.method, b" ", fwd, b" HTTP/", ex.version.encode(), CRLF]
            for n, v in ex.headers:
                parts += (n, b": ", v, CRLF)
            if authority is not None and ex.host_hdr is None:  # HTTP/1.0 absolute-form without Host
                parts += (b"Host: ", authority.encode("ascii"), CRLF)
            parts.append(self.extra_headers)
            parts.append(CRLF)
            ex.head_out = b"".join(parts)
            ex.out = [ex.head_out]
            ex.out_bytes = len(ex.head_out)
            self.pending_bytes += ex.out_bytes
        else:
            ex.action, ex.status, ex.verdict = DENY, 403, "deny"

    # ------------------------------------------------------------- serving
    def refuse(self, ex: _Exchange, status: int, reason: str) -> None:
        """Answer `status` for this (unforwarded) request in its turn, then close."""
        ex.action = REFUSE
        ex.status = status
        ex.reason = reason
        ex.verdict = "error"
        ex.final = True
        self._drop_out(ex)
        self.stopped = True
        if self.cur is ex:
            self.cur = None
        if ex not in self.queue:
            self.queue.append(ex)
            if len(self.queue) == 1:
                self.start(ex)
        self.update_reading()

    def refuse_body(self, ex: _Exchange, status: int, reason: str) -> None:
        if ex.streaming:
            self.body_failed(ex, status, reason)
        else:
            self.refuse(ex, status, reason)

    def _drop_out(self, ex: _Exchange) -> None:
        if ex.out is not None:
            self.pending_bytes -= ex.out_bytes
            ex.out = None
            ex.out_bytes = 0

    def send_up(self, ex: _Exchange, pieces) -> None:
        if ex.streaming:
            self.up_buf.extend(pieces)
        elif ex.out is not None:
            ex.out.extend(pieces)
            n = 0
            for p in pieces:
                n += len(p)
            ex.out_bytes += n
            self.pending_bytes += n

    def flush_upstream(self) -> None:
        buf = self.up_buf
        if buf:
            up = self.up
            if up is not None and up.transport is not None and not up.closed:
                if len(buf) == 1:
                    up.transport.write(buf[0])  # uvloop: write() is the fast path
                else:
                    up.transport.writelines(buf)
            self.up_buf = []

    def flush_client(self) -> None:
        buf = self.cl_buf
        if buf:
            if not self.closed:
                if len(buf) == 1:
                    self.transport.write(buf[0])
                else:
                    self.transport.writelines(buf)
            self.cl_buf = []

    def start(self, ex: _Exchange) -> None:
        """`ex` is at the head of the queue: answer or forward it."""
        if ex.action == ALLOW:
            self.dl_stall = d = self.loop.time() + self.idle_timeout
            if self.timer is None or d < self.timer_at:
                self.arm(d)
            up = self.up
            if up is not None and up.usable and not up.closed and up.ex is None:
                ex.reused = True
                self._send_request(ex, up)
            elif self.connecting is None:
                if up is not None:
                    self.up = None
                    up.usable = False
                    if up.transport is not None:
                        up.transport.close()
                self.connecting = self.loop.create_task(self._connect(ex))
            return
        head_only = ex.method == b"HEAD"
        if ex.action == DENY:
            keep = ex.keep_alive and not ex.final and not ex.close_after
            if not keep:
                ex.close_after = True
            self.cl_buf.append(http1.deny_response(ex.rule, ex.reason, keep_alive=keep,
                                                   head_only=head_only, status=ex.status or 403))
        else:
            self.cl_buf.append(http1.error_response(ex.status, ex.reason, head_only=head_only))
            ex.close_after = True
        self.flush_client()
        ex.resp_done = True
        ex.resp_status = ex.status
        ex.resp_started = True
        if ex.req_done or ex.final:
            self.exchange_done(ex)
        # else: a small denied body is still arriving; it is dropped, then the next request

    async def _connect(self, ex: _Exchange) -> None:
        t0 = self.loop.time()
        c0 = _clock()
        ctx = self.ctx
        sock = None
        try:
            try:
                sock = await asyncio.wait_for(self.v.opener(ctx), self.connect_timeout)
                ssl_ctx = server_hostname = None
                if self.tls:
                    ssl_ctx = ctx.tls_client or _default_client_context()
                    server_hostname = self.sni or ex.host or (ctx.dst_hostnames[0] if ctx.dst_hostnames else None)
                remaining = max(0.1, self.connect_timeout - (self.loop.time() - t0))
                up = _Upstream(self)
                kw = {}
                if ssl_ctx is not None:
                    kw = dict(ssl=ssl_ctx, server_hostname=server_hostname, ssl_handshake_timeout=remaining)
                await asyncio.wait_for(self.loop.create_connection(lambda: up, sock=sock, **kw), remaining)
                sock = None
            except (asyncio.TimeoutError, TimeoutError):
                self.connecting = None
                if sock is not None:
                    sock.close()
                self.upstream_failed(ex, 504, f"connecting to the origin timed out after {self.connect_timeout:g}s")
                return
            except Exception as e:  # OSError, SSLError, and anything an opener may raise
                self.connecting = None
                if sock is not None:
                    sock.close()
                if not isinstance(e, (OSError, ssl.SSLError, ConnectionError)):
                    log.warning("verifier: opening the upstream for %s failed: %r", self.ctx.flow_id, e)
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
                self.upstream_failed(ex, 502, f"cannot reach the origin: {why}")
                return
        except asyncio.CancelledError:
            if sock is not None:
                sock.close()
            raise
        self.connecting = None
        ex.connect_s = _clock() - c0
        if self.closing:
            up.transport.abort()
            return
        self.up = up
        if self.queue and self.queue[0] is ex and ex.action == ALLOW and not ex.resp_done:
            self._send_request(ex, up)
            self.flush_upstream()
            self.update_reading()
        else:
            pass  # the exchange ended while connecting; keep the connection for the next one

    def _send_request(self, ex: _Exchange, up: _Upstream) -> None:
        up.begin(ex)
        ex.streaming = True
        out = ex.out
        ex.out = None
        self.pending_bytes -= ex.out_bytes
        ex.out_bytes = 0
        ex.t_sent = _clock()
        self.dl_up = d = self.loop.time() + self.response_timeout
        if self.timer is None or d < self.timer_at:
            self.arm(d)
        if out:
            if len(out) == 1:
                up.transport.write(out[0])
            else:
                up.transport.writelines(out)

    def response_done(self, ex: _Exchange, up: _Upstream) -> None:
        self.dl_up = 0.0
        if not ex.req_done:
            # the origin answered before the request body ended (e.g. 413, 401 to an
            # Expect: 100-continue): the rest of the body can't be framed safely
            ex.close_after = True
            up.usable = False
        if not up.usable and up.transport is not None:
            if self.up is up:
                self.up = None
            up.transport.close()
        self.exchange_done(ex)

    def exchange_done(self, ex: _Exchange) -> None:
        if not self.queue or self.queue[0] is not ex:
            return
        self.queue.popleft()
        self.dl_stall = 0.0
        self.record(ex)
        if ex.close_after or ex.final:
            self.flush_client()
            self.close()
            return
        if self.queue:
            self.start(self.queue[0])
        elif self.client_eof:
            self.flush_client()
            self.close()
            return
        else:
            if self.cur is None:
                self.dl_idle = d = self.loop.time() + self.idle_timeout
                if self.timer is None or d < self.timer_at:
                    self.arm(d)
        self.update_reading()

    def record(self, ex: _Exchange, status: Optional[int] = None, verdict: Optional[str] = None,
               reason: Optional[str] = None) -> None:
        ex.recorded = True
        sink = self.v.sink
        if sink.__class__ is _NullSink:
            return
        m = ex.method
        rec = RequestRecord(
            _METHODS.get(m) or m.decode("latin-1"), ex.path or ex.target.decode("latin-1"),
            ex.host, verdict or ex.verdict or "error", ex.rule,
            ex.resp_status if status is None else status,
            reason if reason is not None else ex.reason,
            ex.bytes_in, ex.bytes_out, ex.decision_s, ex.connect_s, ex.ttfb_s, _clock() - ex.t0)
        try:
            sink.request(self.ctx, rec)
        except Exception:
            log.exception("verifier: sink failed")

    # ------------------------------------------------------------- failures
    def upstream_failed(self, ex: _Exchange, status: int, why: str) -> None:
        """No usable response for `ex` (connect error, timeout, malformed response)."""
        if ex.resp_done or self.closed:
            return
        self.dl_up = 0.0
        ex.verdict = "error"
        ex.reason = why
        ex.resp_done = True
        ex.final = True
        self.stopped = True
        if ex.resp_started:
            # part of the response already went out: the client must see the cut
            self.record(ex, status=ex.resp_status, reason=why)
            self.flush_client()
            self.transport.abort()
            return
        ex.resp_status = status
        self.cl_buf.append(http1.error_response(status, why, head_only=ex.method == b"HEAD"))
        self.flush_client()
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        self.record(ex, status=status, reason=why)
        self.close()

    def upstream_lost(self, up: _Upstream, ex: _Exchange, exc) -> None:
        if up.finish_until_close():
            self.flush_client()
            return
        if not up.got_bytes and ex.reused and ex.body == NOBODY and not ex.resp_started and not self.closed:
            # a reused connection the origin closed as we sent: send it again on a new one
            ex.reused = False
            ex.streaming = False
            ex.out = [ex.head_out]
            ex.out_bytes = len(ex.head_out)
            self.pending_bytes += ex.out_bytes
            if self.connecting is None:
                self.connecting = self.loop.create_task(self._connect(ex))
            return
        why = "the origin closed the connection" + (f" ({exc})" if exc else "")
        self.upstream_failed(ex, 502, why)

    def body_failed(self, ex: _Exchange, status: int, why: str) -> None:
        """The request body went bad after its head was forwarded: cut the origin off."""
        if self.up is not None and self.up.transport is not None:
            up = self.up
            self.up = None
            up.ex = None
            up.transport.abort()
        ex.verdict = "error"
        ex.reason = why
        self.stopped = True
        if not ex.resp_started:
            ex.resp_status = status
            ex.resp_done = True
            self.cl_buf.append(http1.error_response(status, why))
            self.flush_client()
            if self.queue and self.queue[0] is ex:
                self.queue.popleft()
            self.record(ex, status=status, reason=why)
            self.close()
        else:
            self.record(ex, status=ex.resp_status, reason=why)
            self.abort_all(why)

    def abort_all(self, why: str) -> None:
        self.stopped = True
        for ex in self.queue:
            if not ex.recorded:
                self.record(ex, status=0, verdict="error", reason=why)
        self.queue.clear()
        if self.up is not None and self.up.transport is not None:
            self.up.transport.abort()
        self.up = None
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close after what is written; keep reading (and dropping) briefly so a client
        still sending does not get a reset that would destroy our answer."""
        if self.closing:
            return
        self.closing = True
        self.stopped = True
        self.dl_head = self.dl_idle = self.dl_up = self.dl_stall = 0.0
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()
        self.up = None
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.tls or self.client_eof or not t.can_write_eof():
            t.close()
            return
        try:
            t.write_eof()
        except (OSError, RuntimeError):
            t.close()
            return
        if self.reading_paused:
            self.reading_paused = False
            t.resume_reading()
        self.loop.call_later(LINGER_S, t.close)


def _default_client_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _install_sni_hook(context: ssl.SSLContext) -> None:
    """Remember the client's SNI on its SSLObject (a server-side SSLObject keeps no name)."""
    if getattr(context, "_bh_sni_hook", False):
        return
    previous = context.sni_callback

    def hook(obj, name, ctx):
        try:
            obj._bh_sni = name
        except AttributeError:
            pass
        if previous is not None:
            return previous(obj, name, ctx)
        return None

    context.sni_callback = hook
    context._bh_sni_hook = True


class Verifier:
    """Serve listening sockets: resolve, check, forward or answer each request."""

    def __init__(self, resolver: Resolver, opener: Opener = tcp_opener, sink: Optional[Sink] = None,
                 max_connections: int = 10000):
        self.resolver = resolver
        self.opener = opener
        self.sink = sink or _NullSink()
        self.max_connections = max_connections
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._listeners: list[socket.socket] = []
        self._conns: set[_Conn] = set()
        self._starting: set[asyncio.Task] = set()
        self._closed: Optional[asyncio.Future] = None

    @property
    def connections(self) -> int:
        return len(self._conns) + len(self._starting)

    def _sink_conn(self, ctx, event: str, detail: str = "") -> None:
        try:
            self.sink.connection(ctx, event, detail)
        except Exception:
            log.exception("verifier: sink failed")

    async def serve(self, listeners: list[socket.socket]) -> None:
        """Accept on `listeners` until close(). The sockets stay the caller's."""
        self.loop = asyncio.get_running_loop()
        self._closed = self.loop.create_future()
        self._listeners = list(listeners)
        for ls in self._listeners:
            ls.setblocking(False)
            self.loop.add_reader(ls.fileno(), self._accept, ls)
        try:
            await self._closed
        finally:
            for ls in self._listeners:
                try:
                    self.loop.remove_reader(ls.fileno())
                except (ValueError, OSError):
                    pass

    def _accept(self, ls: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, addr = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving what we have
                log.warning("verifier: accept failed: %s", e)
                return
            if self.connections >= self.max_connections:
                self._sink_conn(None, "overload", f"{addr[0]}:{addr[1]}: {self.max_connections} connections")
                _reset(sock)
                continue
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            task = self.loop.create_task(self._start(sock))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start(self, sock: socket.socket) -> None:
        ctx = None
        try:
            try:
                ctx = await self.resolver(sock)
            except Exception:
                log.exception("verifier: resolver failed")
                ctx = None
            if ctx is None:
                self._sink_conn(None, "no_flow", _peer(sock))
                _reset(sock)
                return
            self._sink_conn(ctx, "accepted", "")
            tls = False
            if ctx.tls_server is not None:
                first = await self._peek(sock, float(ctx.settings.get("header_timeout", 10.0)))
                if first is None:
                    sock.close()
                    self._sink_conn(ctx, "timeout", "no data")
                    return
                if first == b"":
                    sock.close()
                    self._sink_conn(ctx, "closed", "before a request")
                    return
                tls = first == b"\x16"
            conn = _Conn(self, ctx, tls)
            if tls:
                _install_sni_hook(ctx.tls_server)
                try:
                    await self.loop.connect_accepted_socket(
                        lambda: conn, sock, ssl=ctx.tls_server,
                        ssl_handshake_timeout=float(ctx.settings.get("header_timeout", 10.0)))
                except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as e:
                    sock.close()
                    self._sink_conn(ctx, "tls_failed", str(e))
                    return
            else:
                await self.loop.connect_accepted_socket(lambda: conn, sock)
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as e:
            log.exception("verifier: starting a connection failed")
            sock.close()
            self._sink_conn(ctx, "error", str(e))

    async def _peek(self, sock: socket.socket, timeout: float) -> Optional[bytes]:
        fut = self.loop.create_future()
        fd = sock.fileno()

        def ready():
            if not fut.done():
                fut.set_result(None)

        self.loop.add_reader(fd, ready)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            self.loop.remove_reader(fd)
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    async def close(self) -> None:
        """Stop accepting and drop every connection."""
        if self.loop is None:
            return
        for ls in self._listeners:
            try:
                self.loop.remove_reader(ls.fileno())
            except (ValueError, OSError):
                pass
        for t in list(self._starting):
            t.cancel()
        for c in list(self._conns):
            c.abort_all("verifier closing")
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        await asyncio.sleep(0)


def _reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): the client learns at once."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _peer(sock: socket.socket) -> str:
    try:
        p = sock.getpeername()
        return f"{p[0]}:{p[1]}"
    except OSError:
        return "?"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (it is a dependency), asyncio's otherwise."""
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
