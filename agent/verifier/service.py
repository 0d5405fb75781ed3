"""The verifier process: what the agent supervises (agent/verifier/supervisor.py).

Started as `python -m bulkhead.verifier.service` with inherited descriptors:
  --listen-fds  the listening sockets (IP_TRANSPARENT, owned by the agent so
                connections queue across a restart)
  --cmd-fd      request/reply channel from the agent (length-prefixed msgpack):
                {"op": "prepare", "generation", "bundle"}  compile, hold
                {"op": "commit", "generation"}             switch to it
                {"op": "abort"} / {"op": "stats"} / {"op": "ping"}
  --event-fd    SOCK_SEQPACKET to the agent: one msgpack record per message
                (requests and connection events); never blocks -- a full
                socket drops the record and counts it (events_lost)
  --maps-dir    the instance's pinned maps (flows4/flows6)

Per accepted connection (resolve): the original destination is the socket's
own address (TPROXY keeps it), the client its peer; the kernel's flow entry
for (client -> destination) says which apps and segment it belongs to. CIDRs
overlap across segments, so the entry is looked up in every segment of the
policy; the data path refuses the same 5-tuple live from two segments
(flow_collision), so at most one fresh L7 entry can match. No entry, no
policy: the connection is reset (a punt is never an implicit allow).

Upstream (open_upstream): a socket bound to the client's own IP
(IP_TRANSPARENT, a port the kernel picks) with the origin segment's routing
mark, so the origin sees the client and answers through the gateway; the
reply-direction flow entry is written before connecting, so XDP steers the
origin's answers to this socket (reason l7_upstream).

Rules are looked up per request in the policy in force, by app names: a
`policy apply` changes what the next request on an open connection may do.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import errno
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Any

import msgpack

from bulkhead.core import wire
from bulkhead.core.names import IP_TRANSPARENT, IPV6_TRANSPARENT, SO_MARK
from bulkhead.datapath import abi
from bulkhead.datapath.marks import segment_mark
from bulkhead.datapath.flowtable import FlowTable
from bulkhead.l7.settings import http_settings
from bulkhead.policy import ports as portlib
from bulkhead.policy.bundle import Bundle

log = logging.getLogger("bulkhead.verifier")


class PolicyError(ValueError):
    """The bundle's L7 part can't be used (a key file that won't load...): apply fails."""


@dataclasses.dataclass
class _L7Rule:
    name: str
    src: str
    dst: str
    audit: bool
    ports: Any  # portlib.PortSet
    compiled: Any  # rules.HttpRule


class PolicyView:
    """The L7 part of one bundle, compiled: rule sets per (src app, dst app, port)."""

    def __init__(self, bundle: Bundle, generation: int):
        from bulkhead.l7.rules import RuleErrors, compile_rule

        self.generation = generation
        self.settings = dict(bundle.settings)
        self.http = http_settings(self.settings.get("http"))
        self.audit_all = self.settings.get("mode") == "audit"
        self.segments = {int(s["id"]): s["name"] for s in bundle.segments}
        self.app_by_id = {int(a["id"]): a for a in bundle.apps}
        self.app_by_name = {a["name"]: a for a in bundle.apps}
        self.rules: list[_L7Rule] = []
        problems = []
        for r in bundle.rules:
            if not r.get("l7"):
                continue
            try:
                compiled = compile_rule(r["name"], r.get("http") or [])
            except RuleErrors as e:
                problems += [f"rule {r['name']}: {err}" for err in e.errors]
                continue
            dst = self.app_by_name.get(r["to"], {})
            ports = portlib.intersect(
                portlib.portset([portlib.parse_port_spec(p) for p in r.get("ports") or []] or None),
                portlib.portset([portlib.parse_port_spec(p) for p in dst.get("ports") or []] or None))
            self.rules.append(_L7Rule(r["name"], r["from"], r["to"], r.get("mode") == "audit", ports, compiled))
        self.tls: dict[str, tuple[ssl.SSLContext, ssl.SSLContext]] = {}
        for a in bundle.apps:
            t = a.get("tls")
            if not t:
                continue
            try:
                server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                server.load_cert_chain(t["cert"], t["key"])
                client = ssl.create_default_context(cafile=t.get("ca"))
            except (OSError, ssl.SSLError, KeyError) as e:
                problems.append(f"app {a['name']}: tls: {e}")
                continue
            self.tls[a["name"]] = (server, client)
        if problems:
            raise PolicyError("; ".join(problems))
        self._cache: dict[tuple, tuple] = {}
        # Routers (docs/fabric.md, Routes): their routes, and the policy of their backends' pairs
        from bulkhead.verifier.router import PairPolicy, RouteTable

        self.rule_names = {int(r["id"]): r["name"] for r in bundle.rules}
        self.routers = {a["name"]: RouteTable(a["routes"]) for a in bundle.apps if a.get("routes") is not None}
        backends = {int(self.app_by_name[r.to]["id"]) for t in self.routers.values() for r in t.routes
                    if r.to in self.app_by_name}
        self.pairs = PairPolicy(bundle, backends) if backends else None

    def app_name(self, app_id: int) -> str | None:
        a = self.app_by_id.get(app_id)
        return a["name"] if a else None

    def ruleset(self, src: str, dst: str | None, dport: int):
        """(RuleSet or None, hostnames the Host must name, audit) for a flow's apps and port.
        dst None: a hostname-only destination (matched by name): every L7 rule from
        src to such an app applies, and the Host decides which app it is."""
        key = (src, dst, dport)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        from bulkhead.l7.rules import RuleSet

        chosen, hostnames = [], []
        for r in self.rules:
            if r.src != src:
                continue
            app = self.app_by_name.get(r.dst, {})
            if dst is None:
                if app.get("addresses"):
                    continue
            elif r.dst != dst:
                continue
            if r.ports is not None and not any(lo <= dport <= hi for lo, hi in r.ports.get(6, ())):
                continue
            chosen.append(r)
            hostnames += [h for h in app.get("hostnames") or [] if h not in hostnames]
        if dst is not None:
            hostnames = list(self.app_by_name.get(dst, {}).get("hostnames") or [])
        audit = self.audit_all or (bool(chosen) and all(r.audit for r in chosen))
        out = (RuleSet([r.compiled for r in chosen]) if chosen else None, hostnames, audit)
        self._cache[key] = out
        return out


class LiveRules:
    """FlowContext.rules: the rules of the policy in force, looked up per request."""

    def __init__(self, svc: "Service", src: str, dst: str | None, dport: int):
        self.svc, self.src, self.dst, self.dport = svc, src, dst, dport

    def check(self, req, now: float | None = None):
        from bulkhead.l7.rules import Decision
        from bulkhead.verifier.decide import NO_RULE

        view = self.svc.current
        rs, _, audit = view.ruleset(self.src, self.dst, self.dport) if view else (None, [], False)
        if rs is None:
            return Decision(False, None, None, NO_RULE)
        d = rs.check(req, now)
        if not d.allowed and audit:
            return Decision(True, d.rule, d.entry, "audit: would deny: " + d.reason)
        return d


class EventSink:
    """Records to the agent over SOCK_SEQPACKET; never blocks the event loop.

    Batched: records made during one turn of the event loop go out as one message (a
    msgpack list, at most BATCH_MAX records), so a busy verifier makes one send per loop
    turn rather than one per request. A full socket drops the batch and counts it."""

    BATCH_MAX = 256

    def __init__(self, sock: socket.socket | None, loop: asyncio.AbstractEventLoop | None = None):
        self.sock = sock
        self.loop = loop
        self.lost = 0
        self.sent = 0
        self.batch: list[dict] = []
        self.pid = os.getpid()
        if sock is not None:
            sock.setblocking(False)

    def _send(self, rec: dict) -> None:
        if self.sock is None:
            return
        b = self.batch
        b.append(rec)
        if len(b) == 1 and self.loop is not None:
            self.loop.call_soon(self.flush)
        elif len(b) >= self.BATCH_MAX or self.loop is None:
            self.flush()

    def flush(self) -> None:
        b = self.batch
        if not b:
            return
        self.batch = []
        try:
            self.sock.send(msgpack.packb(b, use_bin_type=True))
            self.sent += len(b)
        except OSError:  # BlockingIOError (full), EMSGSIZE, the agent gone
            self.lost += len(b)

    def _flow(self, ctx) -> dict:
        if ctx is None:
            return {"pid": self.pid}
        d = getattr(ctx, "_bh_record_flow", None)
        if d is not None:
            return d
        d = ctx._bh_record_flow = {"segment": ctx.segment, "src_app": ctx.src_app, "dst_app": ctx.dst_app,
                "client": f"{ctx.client[0]}:{ctx.client[1]}",
                "dst": f"{ctx.original_dst[0]}:{ctx.original_dst[1]}", "flow_id": ctx.flow_id,
                "pid": self.pid}
        return d

    def request(self, ctx, rec) -> None:
        d = rec.as_dict() if hasattr(rec, "as_dict") else (
            dataclasses.asdict(rec) if dataclasses.is_dataclass(rec) else dict(rec))
        if d.get("verdict") == "allow" and str(d.get("reason") or "").startswith("audit:"):
            d["verdict"] = "audit"  # forwarded, but a rule would have denied it
        cur = getattr(ctx, "bh_cur", None)
        if cur is not None:  # a router's request: the route and the backend chosen (the pair's dst)
            self._send({"t": "request", "time": time.time(), **self._flow(ctx),
                        **({"dst_app": cur["backend"]} if cur.get("backend") else {}), **cur, **d})
            return
        self._send({"t": "request", "time": time.time(), **self._flow(ctx), **d})

    def connection(self, ctx, event: str, detail: str = "") -> None:
        self._send({"t": "conn", "time": time.time(), "event": event, "detail": detail, **self._flow(ctx)})


class Service:
    def __init__(self, maps_dir: str, sink: EventSink):
        self.ft = FlowTable(maps_dir)
        self.sink = sink
        self.views: dict[int, PolicyView] = {}
        self.current: PolicyView | None = None
        self.pending: PolicyView | None = None
        # routed / no_route / route_denied / route_malformed: connections and requests to routers
        self.stats = {"resolved": 0, "no_flow": 0, "upstream_failed": 0, "routed": 0, "no_route": 0,
                      "route_denied": 0, "route_malformed": 0}

    # ---------------------------------------------------------- commands
    def command(self, req: dict) -> dict:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "generation": self.current.generation if self.current else 0}
        if op == "prepare":
            try:
                bundle = Bundle.unpack(req["bundle"])
                self.pending = PolicyView(bundle, int(req["generation"]))
            except Exception as e:  # noqa: BLE001 -- any failure refuses the apply
                self.pending = None
                return {"ok": False, "error": str(e)}
            return {"ok": True, "l7_rules": len(self.pending.rules)}
        if op == "commit":
            gen = int(req["generation"])
            if self.pending is None or self.pending.generation != gen:
                return {"ok": False, "error": f"nothing prepared for generation {gen}"}
            self.views[gen] = self.pending
            self.current = self.pending
            self.pending = None
            for g in sorted(self.views)[:-4]:
                del self.views[g]
            return {"ok": True}
        if op == "abort":
            self.pending = None
            return {"ok": True}
        if op == "stats":
            return {"ok": True, "stats": {**self.stats, "events_sent": self.sink.sent,
                                          "events_lost": self.sink.lost}}
        return {"ok": False, "error": f"unknown op {op!r}"}

    # ------------------------------------------------------ per connection
    async def resolve(self, sock: socket.socket):
        from bulkhead.verifier.records import FlowContext

        view = self.current
        try:
            dst = sock.getsockname()[:2]
            cli = sock.getpeername()[:2]
        except OSError:
            return None
        if view is None:
            self.stats["no_flow"] += 1
            return None
        best = None
        for seg in list(view.segments):
            try:
                f = self.ft.lookup(cli[0], dst[0], cli[1], dst[1], 6, seg)
            except (OSError, ValueError):
                f = None
            if f is None or f.flags & abi.FLOWF_REPLY or f.reason != abi.Reason.L7_STEER:
                continue
            if best is None or f.last_seen_ns > best[0].last_seen_ns:
                best = (f, seg)
        if best is None:
            self.stats["no_flow"] += 1
            log.warning("no L7 flow entry for %s:%d -> %s:%d: connection reset", cli[0], cli[1], dst[0], dst[1])
            return None
        f, seg = best
        fview = self.views.get(f.generation, view)
        src = fview.app_name(f.src_app)
        dst_app = None if f.dst_app == abi.APP_ANY else fview.app_name(f.dst_app)
        if src is None:
            self.stats["no_flow"] += 1
            return None
        router = dst_app if dst_app in view.routers else None
        _, hostnames, _ = view.ruleset(src, dst_app, dst[1]) if router is None else (None, [], False)
        tls = view.tls.get(dst_app) if dst_app else None
        ctx = FlowContext(
            client=(cli[0], cli[1]), original_dst=(dst[0], dst[1]),
            segment=view.segments.get(seg, str(seg)), src_app=src, dst_app=dst_app or "(by name)",
            rules=LiveRules(self, src, dst_app, dst[1]), dst_hostnames=hostnames,
            tls_server=tls[0] if tls else None, tls_client=tls[1] if tls else None,
            settings=view.http, flow_id=f"{seg}:{cli[0]}:{cli[1]}->{dst[0]}:{dst[1]}",
        )
        ctx.bh_flow = (f, seg)  # for open_upstream
        if router is not None:
            from bulkhead.verifier.router import RouterFlow

            ctx.rules = None
            ctx.bh_router = RouterFlow(lambda: self.current, router, src, dst[1], self.stats, self.sink)
            ctx.bh_rules_for = lambda backend, src=src, port=dst[1]: LiveRules(self, src, backend, port)
        self.stats["resolved"] += 1
        return ctx

    async def open_upstream(self, ctx, *_ignored) -> socket.socket:
        """A connected, non-blocking socket to the original destination, from the client's address."""
        f, seg = ctx.bh_flow
        dst = ctx.original_dst
        cli_ip = ctx.client[0]
        target = getattr(ctx, "bh_target", None)
        if target is not None:
            f, dst = self._routed(ctx, f, target)
        if not f.peer_segment:
            self.stats["upstream_failed"] += 1
            raise OSError(errno.EHOSTUNREACH, "the origin's segment is unknown: its answers could not be let in")
        v6 = ipaddress.ip_address(dst[0]).version == 6
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        try:
            if v6:
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, segment_mark(f.peer_segment))
            s.bind((cli_ip, 0))
            self.ft.steer_upstream(f, seg, (cli_ip, s.getsockname()[1]), dst)
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, dst)
            return s
        except BaseException:
            self.stats["upstream_failed"] += 1
            s.close()
            raise


    def _routed(self, ctx, f: abi.Flow, target) -> tuple[abi.Flow, tuple]:
        """A routed connection's upstream: the backend's host address of the client's family,
        the router's port, and the flow entry as the pair (client, backend) it was decided as
        (the reply entry written from it lets the backend's answers reach the upstream socket)."""
        view = self.current
        app = view.app_by_name.get(target.backend) if view is not None else None
        if app is None:
            raise OSError(errno.EHOSTUNREACH, f"backend {target.backend} is not in the policy in force")
        ip = ipaddress.ip_address(ctx.client[0])
        family = 4 if ip.version == 4 or ip.ipv4_mapped else 6
        addr = None
        for a in app.get("addresses") or []:
            net = ipaddress.ip_network(a)
            if net.version == family and net.num_addresses == 1:
                addr = net.network_address
                break
        if addr is None:
            raise OSError(errno.EHOSTUNREACH, f"backend {target.backend} has no IPv{family} host address")
        seg_id = next((i for i, n in view.segments.items() if n == app.get("segment")), 0)
        g = abi.Flow()
        ctypes.memmove(ctypes.addressof(g), ctypes.addressof(f), ctypes.sizeof(abi.Flow))
        g.dst_app = target.backend_id
        g.rule_id = target.verdict.rule_id
        g.peer_segment = seg_id
        # the generation the pair was decided in (the client's entry may be older: an entry of
        # an older generation is re-judged by the kernel as the direct pair, which no longer
        # steers the backend's answers here)
        g.generation = view.generation
        host = str(addr) if family == 6 or ":" not in ctx.client[0] else f"::ffff:{addr}"
        return g, (host, ctx.original_dst[1])


def _command_thread(svc: Service, sock: socket.socket, on_eof) -> None:
    while True:
        try:
            req = wire.recv_frame(sock)
        except (ConnectionError, OSError, wire.ControlError):
            on_eof()
            return
        try:
            reply = svc.command(req)
        except Exception as e:  # noqa: BLE001
            log.exception("command %r failed", req.get("op"))
            reply = {"ok": False, "error": str(e)}
        try:
            wire.send_frame(sock, reply)
        except OSError:
            on_eof()
            return


async def _amain(args) -> int:
    from bulkhead.verifier.proxy import Verifier

    loop = asyncio.get_running_loop()
    listeners = [socket.socket(fileno=int(fd)) for fd in args.listen_fds.split(",") if fd]
    for s in listeners:
        s.setblocking(False)
    sink = EventSink(socket.socket(fileno=args.event_fd) if args.event_fd >= 0 else None, loop)
    svc = Service(args.maps_dir, sink)
    stop = asyncio.Event()
    cmd = socket.socket(fileno=args.cmd_fd)
    threading.Thread(target=_command_thread, args=(svc, cmd, lambda: loop.call_soon_threadsafe(stop.set)),
                     daemon=True, name="commands").start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    verifier = Verifier(svc.resolve, svc.open_upstream, sink, max_connections=args.max_connections)
    server = asyncio.ensure_future(verifier.serve(listeners))
    sink.connection(None, "ready", f"pid {os.getpid()}")
    await stop.wait()
    await verifier.close()
    server.cancel()
    sink.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bulkhead-verifier", description=__doc__.splitlines()[0])
    ap.add_argument("--listen-fds", required=True)
    ap.add_argument("--cmd-fd", type=int, required=True)
    ap.add_argument("--event-fd", type=int, default=-1)
    ap.add_argument("--maps-dir", required=True)
    ap.add_argument("--max-connections", type=int, default=10000)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_amain(args))


if __name__ == "__main__":
    sys.exit(main())
