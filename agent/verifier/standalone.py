"""`bulkhead verifier serve`: the verifier engine as a fixed-upstream reverse proxy.

    bulkhead verifier serve --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000 \\
        --policy policy.yaml --rule web-reads-catalog [--tls-app payments] [--json]

Every request to --listen is checked against the `http:` entries of the named
rule(s) of the policy, exactly as the gateway's verifier checks it (same engine,
same refusals, same records), and allowed ones go to --upstream. One line per
request on stdout. For trying a rule against an origin without a gateway, and
for benchmarks (--quiet).

Exit codes: 0 stopped by a signal, 1 runtime failure (cannot listen), 2 bad
input (policy invalid, unknown rule, a rule without `http:`).
"""
from __future__ import annotations

import asyncio
import datetime
import difflib
import json
import os
import signal
import socket
import ssl
import sys
from typing import Optional, TextIO

from bulkhead.l7.settings import http_settings
from bulkhead.verifier.proxy import Verifier, new_event_loop
from bulkhead.verifier.records import FlowContext, RequestRecord
from bulkhead.verifier.upstream import tcp_opener


class StandaloneError(Exception):
    """Bad input: the message says what and how to fix it (exit 2)."""


def parse_addr(text: str, what: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise StandaloneError(f"{what} must be HOST:PORT (IPv6 as [ADDR]:PORT), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise StandaloneError(f"{what}: write IPv6 addresses in brackets, [ADDR]:PORT, got {text!r}")
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not 0 <= p <= 65535 or (p == 0 and what != "--listen"):
        raise StandaloneError(f"{what}: port must be 1-65535, got {port!r}")
    return host, p


class Setup:
    """What the proxy needs, from a policy file: rules, settings, TLS, hostnames."""

    def __init__(self, policy_path: str, rule_names: list[str], tls_app: Optional[str] = None):
        from bulkhead.policy import PolicyError, load_policy
        from bulkhead.l7.rules import RuleErrors, RuleSet, compile_rule

        try:
            bundle, self.warnings = load_policy([policy_path])
        except PolicyError as e:
            raise StandaloneError(f"the policy is invalid:\n{e}") from None
        by_name = {r["name"]: r for r in bundle.rules}
        apps = {a["name"]: a for a in bundle.apps}
        compiled = []
        self.rules = []
        for name in rule_names:
            r = by_name.get(name)
            if r is None:
                close = difflib.get_close_matches(name, list(by_name), n=1)
                l7 = [n for n, x in by_name.items() if x.get("http")]
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise StandaloneError(f"rule {name!r} is not in {policy_path}{hint}; its L7 rules: "
                                      f"{', '.join(l7) or 'none'}")
            if not r.get("http"):
                raise StandaloneError(f"rule {name!r} has no http: entries, so there is nothing to check per "
                                      "request (the verifier serves L7 rules only)")
            try:
                compiled.append(compile_rule(name, r["http"], base_dir=os.path.dirname(os.path.abspath(policy_path))))
            except RuleErrors as e:
                raise StandaloneError(f"rule {name!r}: {e}") from None
            self.rules.append(r)
        self.ruleset = RuleSet(compiled)
        self.settings = http_settings(bundle.settings.get("http"))
        dst_names = {r["to"] for r in self.rules}
        self.src_app = ",".join(sorted({r["from"] for r in self.rules}))
        self.dst_app = ",".join(sorted(dst_names))
        self.hostnames: list[str] = []
        for d in sorted(dst_names):
            for h in apps.get(d, {}).get("hostnames") or []:
                if h not in self.hostnames:
                    self.hostnames.append(h)
        self.tls_server = self.tls_client = None
        if tls_app is not None:
            app = apps.get(tls_app)
            if app is None:
                close = difflib.get_close_matches(tls_app, list(apps), n=1)
                raise StandaloneError(f"--tls-app {tls_app!r} is not an app of {policy_path}"
                                      + (f" (did you mean {close[0]!r}?)" if close else ""))
            t = app.get("tls")
            if not t:
                raise StandaloneError(f"app {tls_app!r} has no tls: {{cert, key}} to terminate TLS with")
            try:
                self.tls_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                self.tls_server.load_cert_chain(t["cert"], t["key"])
                self.tls_client = ssl.create_default_context(cafile=t.get("ca"))
            except (OSError, ssl.SSLError) as e:
                raise StandaloneError(f"app {tls_app!r}: cannot load its TLS material: {e}") from None
            self.dst_app = tls_app
            self.hostnames = list(app.get("hostnames") or [])


class Printer:
    """One line (or JSON object) per request; buffered, flushed a few times a second."""

    def __init__(self, out: TextIO, as_json: bool, quiet: bool, err: TextIO):
        self.out, self.as_json, self.quiet, self.err = out, as_json, quiet, err
        self.count = {"allow": 0, "deny": 0, "error": 0}
        self.count_only = quiet  # --quiet prints nothing per request: the engine builds no record

    def tally(self, verdict: str) -> None:
        self.count[verdict] = self.count.get(verdict, 0) + 1

    def request(self, ctx: FlowContext, rec: RequestRecord) -> None:
        self.count[rec.verdict] = self.count.get(rec.verdict, 0) + 1
        if self.quiet:
            return
        now = datetime.datetime.now(datetime.timezone.utc)
        if self.as_json:
            d = rec.as_dict()
            d["time"] = now.isoformat(timespec="milliseconds")
            d["client"] = f"{ctx.client[0]}:{ctx.client[1]}"
            self.out.write(json.dumps(d) + "\n")
        else:
            host = rec.host or "-"
            self.out.write(f"{now.strftime('%H:%M:%S.%f')[:-3]} {ctx.client[0]}:{ctx.client[1]} "
                           f"{rec.verdict.upper():<5} {rec.status or '---'} {rec.method or '-'} {host}{rec.path} "
                           f"rule={rec.rule or '-'} {rec.total_s * 1000:.1f}ms in={rec.bytes_in} "
                           f"out={rec.bytes_out} \"{rec.reason}\"\n")

    def connection(self, ctx, event: str, detail: str = "") -> None:
        if self.quiet or event in ("accepted", "closed"):
            return
        who = f"{ctx.client[0]}:{ctx.client[1]}" if ctx is not None else "-"
        self.err.write(f"verifier: connection {who}: {event}{': ' + detail if detail else ''}\n")

    def flush(self) -> None:
        try:
            self.out.flush()
            self.err.flush()
        except (OSError, ValueError):
            pass


def _listen(fam: int, lhost: str, lport: int, reuseport: bool) -> socket.socket:
    ls = socket.socket(fam, socket.SOCK_STREAM)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        ls.bind((lhost, lport))
        ls.listen(1024)
    except BaseException:
        ls.close()
        raise
    return ls


def serve(listen: str, upstream: str, policy: str, rules: list[str], tls_app: Optional[str] = None,
          as_json: bool = False, quiet: bool = False, max_connections: int = 10000,
          out: TextIO = sys.stdout, err: TextIO = sys.stderr, procs: int = 1) -> int:
    """Run until SIGINT/SIGTERM. Raises StandaloneError on bad input (exit 2).

    procs > 1: that many processes (forked after the policy is loaded), each serving its own
    SO_REUSEPORT socket on the one port; this process waits for them and passes signals on."""
    lhost, lport = parse_addr(listen, "--listen")
    uhost, uport = parse_addr(upstream, "--upstream")
    setup = Setup(policy, rules, tls_app)
    fam = socket.AF_INET6 if ":" in lhost else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        socks.append(_listen(fam, lhost, lport, procs > 1))
        for _ in range(1, procs):  # the same port: port 0 was resolved by the first bind
            socks.append(_listen(fam, lhost, socks[0].getsockname()[1], True))
    except OSError as e:
        for ls in socks:
            ls.close()
        err.write(f"bulkhead: cannot listen on {listen}: {e.strerror or e}\n")
        return 1
    bound = socks[0].getsockname()
    where = f"[{bound[0]}]:{bound[1]}" if fam == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
    for w in setup.warnings:
        if "L7 verifier" not in w:
            err.write(f"bulkhead: warning: {w}\n")
    err.write(f"bulkhead verifier: listening on {where} ({'TLS ' + setup.dst_app if setup.tls_server else 'plain HTTP'}"
              f"), upstream {upstream}, rules {', '.join(r['name'] for r in setup.rules)}"
              + (f", Host must be one of {', '.join(setup.hostnames)}" if setup.hostnames else "")
              + (f", {procs} processes" if procs > 1 else "") + "\n")
    err.flush()
    if procs == 1:
        return _serve_one(socks[0], setup, (uhost, uport), as_json, quiet, max_connections, out, err, "")
    out.flush()
    pids: list[int] = []

    def pass_on(signum, _frame):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    # before forking: a signal between two forks still reaches the children forked so far
    old = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    for i, ls in enumerate(socks):
        pid = os.fork()
        if pid == 0:  # the child: serve its socket, never return into the caller
            code = 1
            try:
                for sig in old:
                    signal.signal(sig, signal.SIG_DFL)
                for other in socks:
                    if other is not ls:
                        other.close()
                code = _serve_one(ls, setup, (uhost, uport), as_json, quiet, max_connections, out, err,
                                  f" (process {i}, pid {os.getpid()})")
            finally:
                try:
                    out.flush()
                    err.flush()
                finally:
                    os._exit(code)
        pids.append(pid)
    for ls in socks:
        ls.close()
    code = 0
    try:
        for pid in pids:
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
            rc = os.waitstatus_to_exitcode(status)
            if rc != 0 and code == 0:
                code = 1
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    return code


def _serve_one(ls: socket.socket, setup: Setup, upstream: tuple, as_json: bool, quiet: bool,
               max_connections: int, out: TextIO, err: TextIO, who: str) -> int:
    """One process's event loop on `ls` until SIGINT/SIGTERM."""
    uhost, uport = upstream
    printer = Printer(out, as_json, quiet, err)

    async def resolve(sock: socket.socket) -> FlowContext:
        peer = sock.getpeername()
        return FlowContext(client=(peer[0], peer[1]), original_dst=(uhost, uport), segment="standalone",
                           src_app=setup.src_app, dst_app=setup.dst_app, rules=setup.ruleset,
                           dst_hostnames=setup.hostnames, tls_server=setup.tls_server,
                           tls_client=setup.tls_client, settings=setup.settings,
                           flow_id=f"{peer[0]}:{peer[1]}")

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    verifier = Verifier(resolve, tcp_opener, printer, max_connections=max_connections)

    def flusher():
        printer.flush()
        loop.call_later(0.2, flusher)

    def stop():
        loop.create_task(verifier.close())

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    loop.call_later(0.2, flusher)
    try:
        loop.run_until_complete(verifier.serve([ls]))
    finally:
        printer.flush()
        ls.close()
        loop.close()
    c = printer.count
    err.write(f"bulkhead verifier: stopped{who}; {c.get('allow', 0)} allowed, {c.get('deny', 0)} denied, "
              f"{c.get('error', 0)} errors\n")
    return 0
