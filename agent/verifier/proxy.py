"""The verifier's engine: an asyncio HTTP/1.1 proxy that checks every request.

One `Verifier` serves listening sockets the caller made (the service's are
IP_TRANSPARENT sockets fed by nftables TPROXY; the standalone mode's are plain).
For each accepted connection:

1. `resolver(sock)` says which flow it is (FlowContext: apps, rules, TLS) — None
   resets the connection (`no_flow`).
2. A router's flow (docs/fabric.md, Routes) goes to router.py: a ClientHello is routed by
   its server name and spliced to the backend untouched, HTTP is routed per request.
   If the flow's destination app terminates TLS, the first byte is peeked: a TLS
   record (0x16) is terminated with ctx.tls_server; anything else is plain HTTP.
   A TLS ClientHello on a flow without tls_server is closed (`tls_not_terminated`):
   what cannot be read cannot be checked.
3. A Connection (connection.py, reader.py) frames the requests, decide.py decides
   each one, and they are answered in order (keep-alive and pipelining). Allowed
   ones go to the original destination over one upstream connection per client
   connection at a time (upstream.py: `opener(ctx)` gives a connected socket; TLS
   is re-established to the origin if the client side was TLS). The sink gets a
   RequestRecord per request and the connection events (records.py).

Performance: asyncio Protocols only (no streams, no per-request tasks), output
batched per read into one writelines() call, lazy timers.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Awaitable, Callable, Optional

from bulkhead.l7.settings import HTTP_DEFAULTS
from bulkhead.verifier import router as routerlib
from bulkhead.verifier.connection import Connection
from bulkhead.verifier.records import FlowContext, NullSink, Sink
from bulkhead.verifier.upstream import Opener, tcp_opener

log = logging.getLogger("bulkhead.verifier")

Resolver = Callable[[socket.socket], Awaitable[Optional[FlowContext]]]


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
        self.sink = sink or NullSink()
        self.max_connections = max_connections
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._listeners: list[socket.socket] = []
        self._conns: set[Connection] = set()
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
                routerlib.reset(sock)
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
                routerlib.reset(sock)
                return
            self._sink_conn(ctx, "accepted", "")
            tls = False
            router = getattr(ctx, "bh_router", None)
            if router is not None:
                # a router (docs/fabric.md, Routes): TLS by server name (passthrough), else HTTP by Host
                first = await self._peek(sock, float(ctx.settings.get("header_timeout", HTTP_DEFAULTS.header_timeout)))
                if not first:
                    sock.close()
                    self._sink_conn(ctx, "timeout" if first is None else "closed", "before a request")
                    return
                if first == b"\x16":
                    await routerlib.passthrough(self, sock, ctx, router)
                    return
                conn = routerlib.RouterConnection(self, ctx, router, ctx.bh_rules_for)
                await self.loop.connect_accepted_socket(lambda: conn, sock)
                return
            if ctx.tls_server is not None:
                first = await self._peek(sock, float(ctx.settings.get("header_timeout", HTTP_DEFAULTS.header_timeout)))
                if first is None:
                    sock.close()
                    self._sink_conn(ctx, "timeout", "no data")
                    return
                if first == b"":
                    sock.close()
                    self._sink_conn(ctx, "closed", "before a request")
                    return
                tls = first == b"\x16"
            conn = Connection(self, ctx, tls)
            if tls:
                _install_sni_hook(ctx.tls_server)
                try:
                    await self.loop.connect_accepted_socket(
                        lambda: conn, sock, ssl=ctx.tls_server,
                        ssl_handshake_timeout=float(ctx.settings.get("header_timeout", HTTP_DEFAULTS.header_timeout)))
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
