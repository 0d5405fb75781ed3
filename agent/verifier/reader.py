"""The request side of a client connection: feeding llhttp, counting head sizes, framing checks.

RequestReader is half of verifier.connection.Connection (a mixin: the two share one object, so the
per-byte path has no extra hops). It reads the fields Connection.__init__ sets for it (parser,
phase, cur, head_count, exact_count, tail, raw_head, first, max_head, header_timeout) and the
connection's deadlines, and hands each framed request head to Connection.decide, then to the
queue that Connection answers in order; what it refuses goes to Connection.refuse.

Reads are fed in pieces that end where a head ends, so a head's size is counted exactly
(max_header_bytes) however the client splits or pipelines it.
"""
from __future__ import annotations

import logging

import httptools

from bulkhead.l7 import http1
from bulkhead.l7.http1 import HEAD_END
from bulkhead.verifier.decide import ALLOW, REFUSE, check_head
from bulkhead.verifier.records import CHUNKED, LENGTH, Exchange, clock
from bulkhead.verifier.upstream import Stop

log = logging.getLogger("bulkhead.verifier")

# parse phases of the client side
IDLE, HEAD, BODY = 0, 1, 2

HEADERS_MAX = 200          # header lines per request


class RequestReader:
    """The parser callbacks and the feeding of client bytes to llhttp (see the module docstring)."""

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
            ex = Exchange(clock())
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
        ex = self.cur or Exchange(clock())
        self.cur = None
        self.refuse(ex, 431, f"request head larger than {self.max_head} bytes")

    # -- request parser callbacks
    def on_message_begin(self):
        self.cur = Exchange(clock())
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
            raise Stop()

    def on_header(self, name: bytes, value: bytes):
        ex = self.cur
        if self.phase == BODY:  # chunked trailers
            if ex.trailers is None:
                ex.trailers = []
            self.head_count += len(name) + len(value) + 4
            if self.head_count > self.max_head:
                self.cur = None
                self.refuse_body(ex, 431, f"trailers larger than {self.max_head} bytes")
                raise Stop()
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
            raise Stop()
        if len(headers) > HEADERS_MAX:
            self.refuse(ex, 431, f"more than {HEADERS_MAX} header fields")
            raise Stop()
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
            raise Stop()
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
        why = check_head(ex)
        if why is not None:
            self.refuse(ex, why[0], why[1])
            raise Stop()
        self.decide(ex)
        self.queue.append(ex)
        if ex.final:
            # a denied request whose body can't be skipped safely: nothing after it is read
            self.stopped = True
            self.cur = None
            if len(self.queue) == 1:
                self.start(ex)
            raise Stop()
        if len(self.queue) == 1:
            self.start(ex)

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
