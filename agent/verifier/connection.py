"""The client side of one connection: limits, timeouts, keep-alive, pipelining, answering in order.

Connection = RequestReader (reader.py: llhttp framing, head sizes, framing checks) + what this
module adds: each framed head is decided (decide.py) and queued; the queue is answered in order.
Allowed requests are forwarded over the connection's Upstream (upstream.py), denied ones get a
403 from the verifier, ambiguous or malformed ones an error status and the connection is
closed: never a pass-through.

Flow control: reading the client pauses while the client's write buffer, the upstream's, the
bytes waiting for the upstream (PENDING_MAX) or the pipelined requests (PIPELINE_MAX) are full.
Output is batched per read into one writelines() call. Timers are lazy: one TimerHandle per
connection, re-armed only when a deadline moves earlier.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Optional

import httptools

from bulkhead.l7 import http1
from bulkhead.l7.http1 import CRLF
from bulkhead.l7.normalize import normalize_host
from bulkhead.l7.settings import HTTP_DEFAULTS
from bulkhead.verifier.decide import ALLOW, DENY, REFUSE
from bulkhead.verifier.decide import decide as decide_request
from bulkhead.verifier.reader import IDLE, RequestReader
from bulkhead.verifier.records import LENGTH, METHODS, NOBODY, Exchange, FlowContext, NullSink, RequestRecord, clock
from bulkhead.verifier.upstream import WRITE_HIGH, Upstream, forward

log = logging.getLogger("bulkhead.verifier")

PIPELINE_MAX = 32          # queued requests beyond the one being served: pause reading
PENDING_MAX = 256 * 1024   # bytes: buffered upstream-bound bytes of not-yet-sent requests: pause reading
LINGER_S = 2.0             # seconds: after answering and closing, keep reading (dropping) this long


class Connection(RequestReader, asyncio.Protocol):
    """The client side of one connection."""

    def __init__(self, verifier, ctx: FlowContext, tls: bool):
        # verifier: the proxy.Verifier serving this connection (unannotated: proxy imports us)
        self.v = verifier
        self.loop = verifier.loop
        self.ctx = ctx
        s = ctx.settings
        d = HTTP_DEFAULTS  # (a caller's settings may be partial)
        self.max_head = int(s.get("max_header_bytes", d.max_header_bytes))
        self.header_timeout = float(s.get("header_timeout", d.header_timeout))
        self.idle_timeout = float(s.get("idle_timeout", d.idle_timeout))
        self.connect_timeout = float(s.get("connect_timeout", d.connect_timeout))
        self.response_timeout = float(s.get("response_timeout", d.response_timeout))
        self.discard_max = int(s.get("discard_body_max", d.discard_body_max))
        extra = []
        if s.get("via"):
            extra.append(b"Via: 1.1 bulkhead\r\n")
        if s.get("x_forwarded_for"):
            extra.append(b"X-Forwarded-For: " + str(ctx.client[0]).encode() + CRLF)
        self.extra_headers = b"".join(extra)
        self.tls = tls
        self.sni: Optional[str] = None
        self.raw_head: Optional[bytes] = None  # the read being parsed, when it is exactly one head
        self.transport: Optional[asyncio.Transport] = None
        self.parser = httptools.HttpRequestParser(self)
        self.phase = IDLE
        self.head_count = 0
        self.exact_count = 0
        self.tail = b""
        self.first = True
        self.cur: Optional[Exchange] = None
        self.queue: collections.deque[Exchange] = collections.deque()
        self.pending_bytes = 0
        self.up: Optional[Upstream] = None
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
            ex = self.cur or Exchange(clock())
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

    # ------------------------------------------------------------- deciding
    def decide(self, ex: Exchange) -> None:
        t = clock()
        o = self.outcome(ex)
        # (only the fields that differ from Exchange's defaults: every attribute an instance
        # gets costs, and an allowed request keeps status 0)
        ex.path, ex.host, ex.rule, ex.reason = o.path, o.host, o.rule, o.reason
        ex.action, ex.verdict = o.action, o.verdict
        if o.status:
            ex.status = o.status
        if o.action == ALLOW:
            self._forward_head(ex, o.forward, o.add_host)
        ex.decision_s = clock() - t
        if ex.action == DENY and ex.body != NOBODY:
            if ex.body == LENGTH and not ex.expect and self._content_length(ex) <= self.discard_max:
                ex.discard = True
            else:
                ex.final = True
                ex.close_after = True
        elif ex.action == REFUSE:
            ex.final = True

    def outcome(self, ex: Exchange):
        """The decide.Outcome of a framed head (router.RouterConnection routes first)."""
        return decide_request(self.ctx, ex.method, ex.target, ex.host_hdr, ex.headers, self.sni if self.tls else None)

    def _content_length(self, ex: Exchange) -> int:
        for n, v in ex.headers:
            if n.lower() == b"content-length":
                return int(v)
        return 0

    def _forward_head(self, ex: Exchange, target: bytes, add_host: Optional[bytes]) -> None:
        """The head the origin gets: the one received when it is already canonical, else rebuilt."""
        rh = self.raw_head
        if rh is not None and target is ex.target and add_host is None:
            line = b"%s %s HTTP/%s\r\n" % (ex.method, target, ex.version.encode())
            if rh.startswith(line):  # canonical request line: relay the head as received
                ex.head_out = rh[:-2] + self.extra_headers + CRLF if self.extra_headers else rh
                ex.out = [ex.head_out]
                ex.out_bytes = len(ex.head_out)
                self.pending_bytes += ex.out_bytes
                return
        parts = [ex.method, b" ", target, b" HTTP/", ex.version.encode(), CRLF]
        for n, v in ex.headers:
            parts += (n, b": ", v, CRLF)
        if add_host is not None:
            parts += (b"Host: ", add_host, CRLF)
        parts.append(self.extra_headers)
        parts.append(CRLF)
        ex.head_out = b"".join(parts)
        ex.out = [ex.head_out]
        ex.out_bytes = len(ex.head_out)
        self.pending_bytes += ex.out_bytes

    # ------------------------------------------------------------- serving
    def refuse(self, ex: Exchange, status: int, reason: str) -> None:
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

    def refuse_body(self, ex: Exchange, status: int, reason: str) -> None:
        if ex.streaming:
            self.body_failed(ex, status, reason)
        else:
            self.refuse(ex, status, reason)

    def _drop_out(self, ex: Exchange) -> None:
        if ex.out is not None:
            self.pending_bytes -= ex.out_bytes
            ex.out = None
            ex.out_bytes = 0

    def send_up(self, ex: Exchange, pieces) -> None:
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


    def start(self, ex: Exchange) -> None:
        """`ex` is at the head of the queue: answer or forward it."""
        if ex.action == ALLOW:
            self.dl_stall = d = self.loop.time() + self.idle_timeout
            if self.timer is None or d < self.timer_at:
                self.arm(d)
            forward(self, ex)
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

    def exchange_done(self, ex: Exchange) -> None:
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

    def record(self, ex: Exchange, status: Optional[int] = None, verdict: Optional[str] = None,
               reason: Optional[str] = None) -> None:
        ex.recorded = True
        sink = self.v.sink
        if sink.__class__ is NullSink:
            return
        if getattr(sink, "count_only", False):  # a sink that only counts verdicts: no record is built
            sink.tally(verdict or ex.verdict or "error")
            return
        m = ex.method
        rec = RequestRecord(
            METHODS.get(m) or m.decode("latin-1"), ex.path or ex.target.decode("latin-1"),
            ex.host, verdict or ex.verdict or "error", ex.rule,
            ex.resp_status if status is None else status,
            reason if reason is not None else ex.reason,
            ex.bytes_in, ex.bytes_out, ex.decision_s, ex.connect_s, ex.ttfb_s, clock() - ex.t0)
        try:
            sink.request(self.ctx, rec)
        except Exception:
            log.exception("verifier: sink failed")

    # ------------------------------------------------------------- failures
    def upstream_failed(self, ex: Exchange, status: int, why: str) -> None:
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

    def body_failed(self, ex: Exchange, status: int, why: str) -> None:
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
