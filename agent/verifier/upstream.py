"""The origin side of a client connection: connecting to it, relaying its responses.

One Upstream per client connection at a time, reused for the connection's next request while
responses end cleanly (Connection.start). Responses are parsed by llhttp, which refuses the
ambiguous ones (CL with TE, repeated CL, obs-fold, bad chunks): the client then gets a 502,
never bytes the verifier could not frame.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Awaitable, Callable, Optional

import httptools

from bulkhead.l7 import http1
from bulkhead.l7.http1 import CRLF
from bulkhead.verifier.decide import ALLOW
from bulkhead.verifier.records import CHUNKED, LENGTH, NOBODY, UNTIL_CLOSE, Exchange, FlowContext, clock

log = logging.getLogger("bulkhead.verifier")

WRITE_HIGH = 256 * 1024    # bytes: transport write buffer high-water mark (both sides)

# A connected, non-blocking socket to ctx.original_dst. On cancellation the opener
# must close what it created. The verifier owns the returned socket.
Opener = Callable[[FlowContext], Awaitable[socket.socket]]


class Stop(Exception):
    """Raised inside a parser callback to stop parsing (the connection is ending)."""


class UpstreamError(Exception):
    """The origin could not be reached: answer `status` (502, 504) with `why`."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status
        self.why = why


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


async def open_upstream(conn, ex: Exchange) -> Upstream:
    """An Upstream for `conn`, connected to the origin within conn.connect_timeout (TLS included:
    re-established to the origin when the client side was TLS). Raises UpstreamError."""
    loop = conn.loop
    ctx = conn.ctx
    timeout = conn.connect_timeout
    t0 = loop.time()
    sock = None
    try:
        sock = await asyncio.wait_for(conn.v.opener(ctx), timeout)
        ssl_ctx = server_hostname = None
        if conn.tls:
            ssl_ctx = ctx.tls_client or _default_client_context()
            server_hostname = conn.sni or ex.host or (ctx.dst_hostnames[0] if ctx.dst_hostnames else None)
        remaining = max(0.1, timeout - (loop.time() - t0))
        up = Upstream(conn)
        kw = {}
        if ssl_ctx is not None:
            kw = dict(ssl=ssl_ctx, server_hostname=server_hostname, ssl_handshake_timeout=remaining)
        await asyncio.wait_for(loop.create_connection(lambda: up, sock=sock, **kw), remaining)
        return up
    except (asyncio.TimeoutError, TimeoutError):
        if sock is not None:
            sock.close()
        raise UpstreamError(504, f"connecting to the origin timed out after {timeout:g}s") from None
    except asyncio.CancelledError:
        if sock is not None:
            sock.close()
        raise
    except Exception as e:  # OSError, SSLError, and anything an opener may raise
        if sock is not None:
            sock.close()
        if not isinstance(e, (OSError, ssl.SSLError, ConnectionError)):
            log.warning("verifier: opening the upstream for %s failed: %r", ctx.flow_id, e)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise UpstreamError(502, f"cannot reach the origin: {why}") from None


def forward(conn, ex: Exchange) -> None:
    """Send allowed `ex` (at the head of conn's queue) on conn's upstream if that can carry
    another request, else on a new connection."""
    up = conn.up
    if up is not None and up.usable and not up.closed and up.ex is None:
        ex.reused = True
        up.send(ex)
    elif conn.connecting is None:
        if up is not None:
            conn.up = None
            up.usable = False
            if up.transport is not None:
                up.transport.close()
        conn.connecting = conn.loop.create_task(connect(conn, ex))


async def connect(conn, ex: Exchange) -> None:
    """conn.connecting: open an upstream for `ex`, then send it (or answer 502/504)."""
    c0 = clock()
    try:
        up = await open_upstream(conn, ex)
    except UpstreamError as e:
        conn.connecting = None
        conn.upstream_failed(ex, e.status, e.why)
        return
    conn.connecting = None
    ex.connect_s = clock() - c0
    if conn.closing:
        up.transport.abort()
        return
    conn.up = up
    if conn.queue and conn.queue[0] is ex and ex.action == ALLOW and not ex.resp_done:
        up.send(ex)
        conn.flush_upstream()
        conn.update_reading()
    # else: the exchange ended while connecting; keep the connection for the next one


def _default_client_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class Upstream(asyncio.Protocol):
    """The origin side of one client connection: parses responses, relays them."""

    def __init__(self, conn):
        # conn: the connection.Connection this serves (unannotated: connection imports us)
        self.conn = conn
        self.transport: Optional[asyncio.Transport] = None
        self.parser = None
        self.ex: Optional[Exchange] = None   # the exchange whose response is awaited
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
        self.done: Optional[Exchange] = None  # response complete, handled after the current feed
        self.raw = False  # forward the validated response bytes as received (see begin)

    # -- transport callbacks
    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    def begin(self, ex: Exchange) -> None:
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
            ex.ttfb_s = clock() - ex.t_sent
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
            if not isinstance(e.__context__, Stop):
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
            self._response_done(done)
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
            self._lost(ex, exc)
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
            raise Stop()
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
        self.on_header_raw(name, value)  # the framing counts
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
            raise Stop()
        if self.n_cl and self.n_te:
            self._bad("origin sent Content-Length with Transfer-Encoding")
            raise Stop()
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
            raise Stop()  # (feed_data raises; data_received hands `done` on)

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
            self._response_done(done)
            return True
        return False


    def send(self, ex: Exchange) -> None:
        """Send `ex`'s head and the body bytes buffered so far; the rest streams (Connection.send_up)."""
        conn = self.conn
        self.begin(ex)
        ex.streaming = True
        out = ex.out
        ex.out = None
        conn.pending_bytes -= ex.out_bytes
        ex.out_bytes = 0
        ex.t_sent = clock()
        conn.dl_up = d = conn.loop.time() + conn.response_timeout
        if conn.timer is None or d < conn.timer_at:
            conn.arm(d)
        if out:
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)

    def _response_done(self, ex: Exchange) -> None:
        conn = self.conn
        conn.dl_up = 0.0
        if not ex.req_done:
            # the origin answered before the request body ended (e.g. 413, 401 to an
            # Expect: 100-continue): the rest of the body can't be framed safely
            ex.close_after = True
            self.usable = False
        if not self.usable and self.transport is not None:
            if conn.up is self:
                conn.up = None
            self.transport.close()
        conn.exchange_done(ex)

    def _lost(self, ex: Exchange, exc) -> None:
        """The origin closed (or the connection broke) before `ex`'s response was complete."""
        conn = self.conn
        if self.finish_until_close():
            conn.flush_client()
            return
        if not self.got_bytes and ex.reused and ex.body == NOBODY and not ex.resp_started and not conn.closed:
            # a reused connection the origin closed as we sent: send it again on a new one
            ex.reused = False
            ex.streaming = False
            ex.out = [ex.head_out]
            ex.out_bytes = len(ex.head_out)
            conn.pending_bytes += ex.out_bytes
            if conn.connecting is None:
                conn.connecting = conn.loop.create_task(connect(conn, ex))
            return
        why = "the origin closed the connection" + (f" ({exc})" if exc else "")
        conn.upstream_failed(ex, 502, why)


class _RawView:
    """The parser callbacks of an Upstream in raw mode: no on_status, a minimal on_header
    (httptools only calls what the protocol object has)."""

    __slots__ = ("on_message_begin", "on_header", "on_headers_complete", "on_body", "on_message_complete")

    def __init__(self, up: Upstream):
        self.on_message_begin = up.on_message_begin
        self.on_header = up.on_header_raw
        self.on_headers_complete = up.on_headers_complete
        self.on_body = up.on_body
        self.on_message_complete = up.on_message_complete
