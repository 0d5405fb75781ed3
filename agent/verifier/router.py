"""Routers (docs/fabric.md, "Routes"): one service address, the backend chosen per connection.

A router is an app with `routes:` and no addresses of its own: its service addresses (VIPs) are
its destination in the kernel, and every app allowed to reach one of its backends has the
action L7 to it on the router's ports, so those connections arrive here. Then:

- TLS (first byte 0x16): the ClientHello is read (tlshello.parse_client_hello: strict,
  bounded to HELLO_MAX bytes of records, records may span reads), its server name picks an `sni` route
  (RouteTable.by_sni), the connection to the backend replays the bytes read, untouched, and the
  two sides are spliced (Splice): no decryption.
- Otherwise HTTP/1.x: RouterConnection (connection.py's Connection) routes every request by
  its normalized Host and path (RouteTable.by_host), decides it for the backend chosen, and
  switches the upstream connection when the backend changes between requests.

The route and the policy are decided together (PairPolicy.decide): the pair (client app,
backend app, tcp, port) as the kernel would judge it from the bundle's policy entries; allow
passes, L7 applies the rule's http entries (HTTP) or refuses (TLS: nothing can be inspected
without terminating), SNI checks the ClientHello's name against the pair's sni entries as the
kernel does; deny, reject or nothing (then settings.default_action) refuses. Refusals are
counted by reason: no_route, route_denied, route_malformed (the verifier's stats and the
connection events the agent counts).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import struct
from typing import Any, NamedTuple, Optional

from bulkhead.datapath import abi
from bulkhead.policy import sni as snilib
from bulkhead.verifier.connection import Connection
from bulkhead.verifier.decide import ALLOW, DENY, REFUSE, Outcome
from bulkhead.verifier.decide import decide as decide_request
from bulkhead.verifier.tlshello import (ALERT_ACCESS_DENIED, ALERT_UNRECOGNIZED_NAME, HELLO_MAX, Hello, Malformed,
                                        alert, parse_client_hello)

log = logging.getLogger("bulkhead.verifier")

# ------------------------------------------------------------------ routes --


@dataclasses.dataclass(frozen=True)
class Route:
    kind: str            # "sni" | "host"
    name: str            # exact, or "*.rest": one label
    path: Optional[str]  # host routes: a path prefix, None = any
    to: str              # the backend app

    def label(self) -> str:
        return f"{self.kind} {self.name}" + (f" {self.path}" if self.path else "")


class RouteTable:
    """One router's routes. Names: an exact name beats a wildcard, a wildcard covers exactly
    one label (the policy's hostname rule, agent/fabric/dns.py Zone.lookup). Host routes: the
    routes of the name chosen (exact, else wildcard), then the longest path prefix among them
    (a route without path matches any); no fallback from an exact name to a wildcard."""

    def __init__(self, routes: list[dict]):
        self.routes = [Route(r["kind"], r["name"].lower(), r.get("path"), r["to"]) for r in routes]
        self.sni: tuple[dict, dict] = ({}, {})  # exact name -> Route, rest -> Route
        self.host: tuple[dict, dict] = ({}, {})  # ... -> [Route], longest path first
        for r in self.routes:
            wild = r.name.startswith("*.")
            key = r.name[2:] if wild else r.name
            if r.kind == "sni":
                self.sni[wild].setdefault(key, r)
            else:
                self.host[wild].setdefault(key, []).append(r)
        for table in self.host:
            for lst in table.values():
                lst.sort(key=lambda r: -len(r.path or ""))

    @staticmethod
    def _pick(tables: tuple[dict, dict], name: str):
        name = name.lower().rstrip(".")
        hit = tables[0].get(name)
        if hit is not None:
            return hit
        label, _, rest = name.partition(".")
        if label and rest:
            return tables[1].get(rest)
        return None

    def by_sni(self, name: Optional[str]) -> Optional[Route]:
        return self._pick(self.sni, name) if name else None

    def by_host(self, host: Optional[str], path: str) -> Optional[Route]:
        if not host:
            return None
        for r in self._pick(self.host, host) or ():
            if r.path is None or path.startswith(r.path):
                return r
        return None


# ------------------------------------------------------------------ policy --


class Verdict(NamedTuple):
    action: str       # "allow" (pass), "l7" (HTTP: the rule's http entries decide), "refuse"
    rule_id: int      # 0: none (the default decided)
    reason: str
    audit: bool = False  # a refusal passed because the rule or the policy is in audit mode


class PairPolicy:
    """The bundle's policy entries (and SNI entries) of the pairs whose destination is one of
    `dst_ids`, looked up as the kernel does (bpf/bulkhead.c bh_classify, bh_sni_decide)."""

    def __init__(self, bundle, dst_ids: set[int]):
        s = bundle.settings
        self.default_allow = s.get("default_action") == "allow"
        self.unknown_allow = s.get("unknown_sni") == "allow"
        self.audit_all = s.get("mode") == "audit"
        self.entries: dict[tuple[int, int], list[tuple]] = {}
        for plen, src, dst, proto, dport, action, flags, rule_id in bundle.policy_entries:
            if dst in dst_ids:
                self.entries.setdefault((src, dst), []).append((plen, proto, dport, action, flags, rule_id))
        for lst in self.entries.values():
            lst.sort(key=lambda e: -e[0])
        self.sni: dict[tuple, tuple] = {}
        for h, src, dst, dport, action, flags, rule_id, _app in bundle.sni_entries:
            if dst in dst_ids:
                self.sni[(h, src, dst, dport)] = (action, flags, rule_id)

    def lookup(self, src: int, dst: int, port: int, proto: int = socket.IPPROTO_TCP) -> Optional[tuple]:
        """(action, flags, rule_id) of the longest matching entry: one port or a range block
        (prefixlen 80+n: the first n bits of the port), any port (72), any protocol (64)."""
        for plen, eproto, dport, action, flags, rule_id in self.entries.get((src, dst), ()):
            if plen == 64 or (eproto == proto and (
                    plen == 72 or (plen >= 80 and (dport ^ port) >> (96 - plen) == 0))):
                return action, flags, rule_id
        return None

    def sni_lookup(self, src: int, dst: int, port: int, name: str) -> Optional[tuple]:
        exact, wild = snilib.lookup_hashes(name)
        for h in (exact, wild):
            if h is None:
                continue
            for p in (port, 0):
                hit = self.sni.get((h, src, dst, p))
                if hit is not None:
                    return hit
        return None

    def decide(self, src: int, dst: int, port: int, tls: bool, name: Optional[str]) -> Verdict:
        """The pair's verdict for a routed connection (tls: a ClientHello naming `name`) or an
        HTTP request (tls False)."""
        hit = self.lookup(src, dst, port)
        if hit is None:
            return self._default("no rule")
        action, flags, rule_id = hit
        audit = self.audit_all or bool(flags & abi.ACTF_AUDIT)
        if action == abi.Action.ALLOW:
            return Verdict("allow", rule_id, "allowed by rule")
        if action == abi.Action.L7:
            if not tls:
                return Verdict("l7", rule_id, "the rule's http entries decide")
            return self._refuse(rule_id, "the rule has http entries: a TLS route can't be inspected "
                                         "without terminating TLS", audit)
        if action == abi.Action.SNI:
            if not tls or not name:
                if self.unknown_allow:
                    return Verdict("allow", rule_id, "no server name: settings.unknown_sni allow")
                return self._refuse(rule_id, "the rule gates on the TLS server name and none was sent", audit)
            sv = self.sni_lookup(src, dst, port, name)
            if sv is None:
                return self._default(f"server name {name} is not the backend's")
            s_action, s_flags, s_rule = sv
            if s_action == abi.Action.ALLOW:
                return Verdict("allow", s_rule, f"server name {name} allowed by rule")
            return self._refuse(s_rule, f"server name {name} denied by rule",
                                self.audit_all or bool(s_flags & abi.ACTF_AUDIT))
        if action in (abi.Action.DENY, abi.Action.REJECT):
            return self._refuse(rule_id, "denied by rule", audit)
        return self._default("no rule")

    def _default(self, why: str) -> Verdict:
        if self.default_allow:
            return Verdict("allow", 0, f"{why}: default_action allow")
        return self._refuse(0, f"{why}: default_action deny", self.audit_all)

    @staticmethod
    def _refuse(rule_id: int, why: str, audit: bool) -> Verdict:
        if audit:
            return Verdict("allow", rule_id, "audit: would deny: " + why, True)
        return Verdict("refuse", rule_id, why)


# ----------------------------------------------------------- per connection --


@dataclasses.dataclass
class Target:
    """Where a routed connection (or request) goes: the backend app and the route that chose it."""

    router: str
    route: Route
    backend: str
    backend_id: int
    verdict: Verdict

    def record(self) -> dict:
        return {"router": self.router, "route": self.route.label(), "backend": self.backend}


class RouterFlow:
    """An accepted connection to a router: its client app and port, routed and decided in the
    policy in force (`current()`: the service's PolicyView, with .routers and .pairs)."""

    def __init__(self, current, router: str, src: str, port: int, stats: dict, sink):
        self.current = current
        self.router = router
        self.src = src
        self.port = port
        self.stats = stats
        self.sink = sink

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def route(self, tls: bool, name: Optional[str], path: str = "/") -> tuple[Optional[Target], str]:
        """(Target, why): the route for a server name (tls) or a Host and path, and the pair's
        verdict for its backend. Target None: no route (why says so)."""
        view = self.current()
        table = view.routers.get(self.router) if view is not None else None
        if table is None:
            return None, f"router {self.router} is not in the policy in force"
        r = table.by_sni(name) if tls else table.by_host(name, path)
        if r is None:
            if tls:
                return None, f"no route for server name {name}" if name else "no server name: no route"
            return None, f"no route for host {name} path {path}"
        src = view.app_by_name.get(self.src)
        dst = view.app_by_name.get(r.to)
        if src is None or dst is None:
            return None, f"route {r.label()}: app {r.to if dst is None else self.src} is not in the policy"
        v = view.pairs.decide(int(src["id"]), int(dst["id"]), self.port, tls, name)
        return Target(self.router, r, r.to, int(dst["id"]), v), v.reason

    def generation(self) -> int:
        view = self.current()
        return view.generation if view is not None else 0

    def rule_name(self, rule_id: int) -> Optional[str]:
        view = self.current()
        return view.rule_names.get(rule_id) if view is not None and rule_id else None

    def report(self, ctx, target: Optional[Target], verdict: str, reason: str, sni: Optional[str],
               t0: float, bytes_in: int = 0, bytes_out: int = 0, total_s: float = 0.0) -> None:
        """One record per routed TLS connection (method TLS, host the server name)."""
        from bulkhead.verifier.records import RequestRecord

        if self.sink is None:
            return
        rule = self.rule_name(target.verdict.rule_id) if target is not None else None
        ctx.bh_cur = target.record() if target is not None else {"router": self.router, "route": None,
                                                                   "backend": None}
        try:
            self.sink.request(ctx, RequestRecord("TLS", "", sni, verdict, rule, 0, reason, bytes_in, bytes_out,
                                                 0.0, 0.0, 0.0, total_s))
        except Exception:
            log.exception("verifier: sink failed")


def reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): the client learns at once (flows refused here and in proxy.py)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class Splice(asyncio.Protocol):
    """One side of a spliced pair: what it receives is written to the other side, with flow
    control (reading pauses while the other side's write buffer is full) and half-close."""

    HIGH = 256 * 1024

    def __init__(self, on_done, count):
        self.peer: Optional["Splice"] = None
        self.transport: Optional[asyncio.Transport] = None
        self.eof = False
        self.closed = False
        self.on_done = on_done
        self.count = count  # callable(nbytes) for bytes received on this side
        self.held: list = []  # bytes received before the peer was connected

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=self.HIGH)
        p = self.peer
        if p is not None and p.held:
            # (an event loop may start reading before the other side exists: keep, then relay)
            held, p.held = p.held, []
            transport.writelines(held)
            if p.eof:
                transport.write_eof()
        if p is not None and p.closed:  # the other side ended before this one was connected
            transport.close()

    def data_received(self, data: bytes):
        self.count(len(data))
        p = self.peer
        if p is None or p.transport is None:
            self.held.append(data)
        elif not p.closed:
            p.transport.write(data)

    def eof_received(self):
        self.eof = True
        p = self.peer
        if p is None or p.transport is None:
            return True  # relayed when the peer connects
        if not p.closed:
            if p.eof:
                p.transport.close()
                return False
            try:
                p.transport.write_eof()
            except (OSError, RuntimeError):
                p.transport.close()
        return True  # keep our write side open for what the peer still sends

    def connection_lost(self, exc):
        self.closed = True
        p = self.peer
        if p is not None and p.transport is not None and not p.closed:
            if exc is not None:
                p.transport.abort()
            else:
                p.transport.close()
        self.on_done(exc)

    def pause_writing(self):
        p = self.peer
        if p is not None and p.transport is not None:
            p.transport.pause_reading()

    def resume_writing(self):
        p = self.peer
        if p is not None and p.transport is not None and not p.closed:
            p.transport.resume_reading()


async def read_hello(loop, sock: socket.socket, timeout: float) -> tuple[bytes, Optional[Hello]]:
    """Read from `sock` until a whole ClientHello is in (bounded, within `timeout`).
    (bytes read, Hello); Hello None: the client closed or the time ran out. Raises Malformed."""
    buf = b""
    deadline = loop.time() + timeout
    while True:
        hello = parse_client_hello(buf)
        if hello is not None:
            return buf, hello
        left = deadline - loop.time()
        if left <= 0:
            return buf, None
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, HELLO_MAX - len(buf) or 1), left)
        except (asyncio.TimeoutError, TimeoutError):
            return buf, None
        except OSError:
            return buf, None
        if not chunk:
            return buf, None
        buf += chunk


async def passthrough(verifier, sock: socket.socket, ctx, router: RouterFlow) -> None:
    """A TLS connection to a router: read the ClientHello, route and decide it, connect to the
    backend, replay what was read and splice. Refusals answer a fatal TLS alert
    (unrecognized_name: no route; access_denied: the pair is refused) or a reset (malformed);
    each is counted and reported."""
    from bulkhead.verifier.records import clock

    loop = verifier.loop
    t0 = clock()
    timeout = float(ctx.settings.get("header_timeout", 10.0))
    try:
        buf, hello = await read_hello(loop, sock, timeout)
    except Malformed as e:
        router.count("route_malformed")
        verifier._sink_conn(ctx, "route_malformed", str(e))
        router.report(ctx, None, "error", f"malformed ClientHello: {e}", None, t0, total_s=clock() - t0)
        reset(sock)
        return
    if hello is None:
        verifier._sink_conn(ctx, "timeout" if clock() - t0 >= timeout else "closed", "no whole ClientHello")
        sock.close()
        return
    target, why = router.route(True, hello.sni)
    if target is None or target.verdict.action != "allow":
        kind = "no_route" if target is None else "route_denied"
        router.count(kind)
        verifier._sink_conn(ctx, kind, why)
        router.report(ctx, target, "deny", why, hello.sni, t0, len(buf), total_s=clock() - t0)
        try:
            sock.send(alert(ALERT_UNRECOGNIZED_NAME if target is None else ALERT_ACCESS_DENIED))
        except OSError:
            pass
        sock.close()
        return
    ctx.bh_target = target
    try:
        up_sock = await asyncio.wait_for(verifier.opener(ctx), float(ctx.settings.get("connect_timeout", 10.0)))
    except (OSError, asyncio.TimeoutError, TimeoutError) as e:
        router.count("upstream_failed")
        verifier._sink_conn(ctx, "upstream_failed", f"{target.backend}: {e}")
        router.report(ctx, target, "error", f"cannot reach {target.backend}: {e}", hello.sni, t0, len(buf),
                      total_s=clock() - t0)
        reset(sock)
        return
    stats = [len(buf), 0]
    done = loop.create_future()
    ended = [0]

    def on_done(exc):
        ended[0] += 1
        if ended[0] == 2 and not done.done():
            done.set_result(None)

    def count_in(n):
        stats[0] += n

    def count_out(n):
        stats[1] += n

    client = Splice(on_done, count_in)
    upstream = Splice(on_done, count_out)
    client.peer, upstream.peer = upstream, client
    try:
        await loop.connect_accepted_socket(lambda: upstream, up_sock)
        upstream.transport.write(buf)  # the ClientHello, as received
        await loop.connect_accepted_socket(lambda: client, sock)
    except (OSError, RuntimeError) as e:
        for side, raw in ((upstream, up_sock), (client, sock)):
            if side.transport is not None:
                side.transport.abort()
            else:
                raw.close()
        verifier._sink_conn(ctx, "error", str(e))
        return
    router.count("routed")
    verifier._sink_conn(ctx, "routed", f"{target.route.label()} -> {target.backend}")
    try:
        await done
    finally:
        for side in (client, upstream):
            if side.transport is not None and not side.closed:
                side.transport.abort()
        router.report(ctx, target, "allow", target.verdict.reason, hello.sni, t0, stats[0], stats[1],
                      total_s=clock() - t0)


# -------------------------------------------------------------------- HTTP --


class AllowAll:
    """FlowContext.rules of a pair the policy allows outright: every request passes, named
    after the rule (or the default) that allowed the pair."""

    def __init__(self, rule: Optional[str], reason: str):
        self.rule, self.reason = rule, reason

    def check(self, req, now=None):
        from bulkhead.l7.rules import Decision

        return Decision(True, self.rule, None, self.reason)


class RouterConnection(Connection):
    """Plain HTTP to a router: each request is routed by its normalized Host and path,
    decided for the backend chosen, and forwarded there; when the next request goes to
    another backend, the upstream connection is replaced (requests are answered in
    order, so one upstream at a time serves the head of the queue)."""

    def __init__(self, verifier, ctx, router: RouterFlow, rules_for):
        super().__init__(verifier, ctx, False)
        self.router = router
        self.rules_for = rules_for  # backend app name -> FlowContext.rules for its L7 rules
        self.up_backend: Optional[str] = None
        self.up_generation = 0
        self._probe = dataclasses.replace(ctx, rules=AllowAll(None, ""), dst_hostnames=[])
        self._ctxs: dict = {}

    def outcome(self, ex):
        # normalize (and refuse what is ambiguous) before routing on Host and path
        o = decide_request(self._probe, ex.method, ex.target, ex.host_hdr, ex.headers, None)
        if o.action == REFUSE:
            return o
        target, why = self.router.route(False, o.host, o.path)
        ex.bh_target = target
        if target is None or target.verdict.action == "refuse":
            kind = "no_route" if target is None else "route_denied"
            self.router.count(kind)
            self.v._sink_conn(self.ctx, kind, why)
            d = Outcome()
            d.action, d.verdict, d.reason, d.path, d.host = DENY, "deny", why, o.path, o.host
            d.status = 421 if target is None else 403
            d.rule = None if target is None else self.router.rule_name(target.verdict.rule_id)
            return d
        v = target.verdict
        key = (self.router.generation(), target.backend, v.action, v.rule_id, v.reason)  # (rule names: per policy)
        bctx = self._ctxs.get(key)
        if bctx is None:
            if len(self._ctxs) >= 64:  # (applies on a long-lived connection)
                self._ctxs.clear()
            rules = (self.rules_for(target.backend) if v.action == "l7"
                     else AllowAll(self.router.rule_name(v.rule_id), v.reason))
            bctx = self._ctxs[key] = dataclasses.replace(self.ctx, dst_app=target.backend, rules=rules,
                                                         dst_hostnames=[])
        return decide_request(bctx, ex.method, ex.target, ex.host_hdr, ex.headers, None)

    def start(self, ex):
        if ex.action == ALLOW:
            t = ex.bh_target
            gen = self.router.generation()
            if self.up_backend != t.backend or self.up_generation != gen:
                # another backend, or a policy applied since the upstream was opened (its reply
                # entry, of the older generation, would be re-judged as the direct pair): forward()
                # closes it and connects anew
                if self.up is not None:
                    self.up.usable = False
                self.up_backend, self.up_generation = t.backend, gen
            self.ctx.bh_target = t
            self.router.count("routed")
        super().start(ex)

    def record(self, ex, status=None, verdict=None, reason=None):
        t = getattr(ex, "bh_target", None)
        self.ctx.bh_cur = t.record() if t is not None else {"router": self.router.router, "route": None,
                                                             "backend": None}
        super().record(ex, status, verdict, reason)
