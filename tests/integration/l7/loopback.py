"""The loopback harness: the verifier engine in-process, origins on 127.0.0.1.

    with LoopbackTarget(tmp_path) as t:
        cases.case_pipelining(t)

- two origin.py processes: catalog (plain HTTP) and vault (TLS, the vault cert),
  each logging what it receives;
- one Verifier (uvloop, in a thread) with two listeners: the catalog listener
  resolves to the shop -> catalog rules, the vault listener to shop -> vault with
  TLS termination (the app's cert) and re-encryption (the app's CA);
- FlowContexts built from the test policy exactly as the service builds them from
  a bundle: every L7 rule of the app pair, the destination's hostnames, settings.http.

No BPF, no namespaces, nothing but 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

from bulkhead.policy import load_policy
from bulkhead.l7.settings import http_settings
from bulkhead.verifier.records import FlowContext
from bulkhead.verifier.proxy import Verifier, new_event_loop
from bulkhead.verifier.upstream import tcp_opener
from bulkhead.l7.rules import RuleSet, compile_rule

from .material import VAULT_NAME, Material

HERE = Path(__file__).resolve().parent
ORIGIN = HERE / "origin.py"


def start_origin(log: Path, tls: tuple | None = None, host: str = "127.0.0.1") -> tuple[subprocess.Popen, int]:
    argv = [sys.executable, str(ORIGIN), "--listen", f"{host}:0", "--log", str(log)]
    if tls:
        argv += ["--tls", str(tls[0]), str(tls[1])]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = p.stdout.readline().decode()
    if not line.startswith("ready"):
        p.kill()
        raise RuntimeError(f"origin did not start: {line!r} {p.stderr.read().decode()[:500]}")
    return p, int(line.split()[2])


class PolicyContexts:
    """FlowContext material for app pairs of a compiled policy (what the service derives from a bundle)."""

    def __init__(self, policy_path: Path):
        bundle, _ = load_policy([str(policy_path)])
        self.bundle = bundle
        self.settings = http_settings(bundle.settings.get("http"))
        self.apps = {a["name"]: a for a in bundle.apps}
        self.rules = [(r, compile_rule(r["name"], r["http"])) for r in bundle.rules if r.get("http")]

    def ruleset(self, src: str, dst: str) -> RuleSet:
        return RuleSet([c for r, c in self.rules if r["from"] == src and r["to"] == dst])

    def tls(self, app: str):
        t = self.apps[app].get("tls")
        if not t:
            return None, None
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(t["cert"], t["key"])
        client = ssl.create_default_context(cafile=t.get("ca"))
        return server, client

    def context(self, src: str, dst: str, client, original_dst, settings: dict | None = None) -> FlowContext:
        server, cli = self.tls(dst)
        return FlowContext(client=client, original_dst=original_dst, segment=self.apps[src]["segment"],
                           src_app=src, dst_app=dst, rules=self.ruleset(src, dst),
                           dst_hostnames=list(self.apps[dst].get("hostnames") or []),
                           tls_server=server, tls_client=cli, settings=settings or self.settings,
                           flow_id=f"loopback:{client[0]}:{client[1]}->{dst}")


class _Sink:
    def __init__(self):
        self.lock = threading.Lock()
        self.recs: list[dict] = []
        self.events: list[tuple] = []

    def request(self, ctx, rec):
        d = rec.as_dict()
        d["src_app"], d["dst_app"] = ctx.src_app, ctx.dst_app
        with self.lock:
            self.recs.append(d)

    def connection(self, ctx, event, detail=""):
        with self.lock:
            self.events.append((ctx.dst_app if ctx else None, event, detail))


class EngineThread:
    """A Verifier on its own uvloop loop in a daemon thread."""

    def __init__(self, resolver, opener=tcp_opener, max_connections: int = 10000):
        self.sink = _Sink()
        self.loop = new_event_loop()
        self.verifier = Verifier(resolver, opener, self.sink, max_connections=max_connections)
        self.listeners: list[socket.socket] = []
        self.thread: threading.Thread | None = None

    def listen(self, host: str = "127.0.0.1") -> int:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        s.listen(1024)
        self.listeners.append(s)
        return s.getsockname()[1]

    def start(self) -> "EngineThread":
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_until_complete(self.verifier.serve(self.listeners))

        self.thread = threading.Thread(target=run, name="verifier", daemon=True)
        self.thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self.verifier.close(), self.loop)
            try:
                fut.result(10)
            except Exception:
                pass
            self.thread.join(10)
        for s in self.listeners:
            s.close()
        if not self.loop.is_running():
            self.loop.close()

    def records(self) -> list[dict]:
        with self.sink.lock:
            out, self.sink.recs = self.sink.recs, []
        return out

    def events(self) -> list[tuple]:
        with self.sink.lock:
            out, self.sink.events = self.sink.events, []
        return out


class OriginLogs:
    """`target.origin_log()`: the complete JSON lines origin.py --log wrote since the last call."""

    def __init__(self, paths: list[Path]):
        self.pos = {p: 0 for p in paths}

    def __call__(self) -> list[dict]:
        out = []
        for p in self.pos:
            if not p.exists():
                continue
            with open(p, "rb") as f:
                f.seek(self.pos[p])
                data = f.read()
            end = data.rfind(b"\n") + 1
            self.pos[p] += end
            out += [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        return out


class LoopbackTarget:
    """The `target` of cases.py on loopback."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.material = Material.create(self.dir / "material")
        self.ca_file = self.material.ca_file
        self.policy = PolicyContexts(self.material.policy_path)
        self.host = self.tls_host = "127.0.0.1"
        self._procs: list[subprocess.Popen] = []
        self._logs = [self.dir / "catalog.log", self.dir / "vault.log"]
        self.origin_log = OriginLogs(self._logs)
        self.engine: EngineThread | None = None

    # -- lifecycle
    def __enter__(self) -> "LoopbackTarget":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        p, self.catalog_port = start_origin(self._logs[0])
        self._procs.append(p)
        p, self.vault_port = start_origin(self._logs[1], tls=(self.material.vault_cert, self.material.vault_key))
        self._procs.append(p)
        self.engine = EngineThread(self.resolve)
        self.port = self.engine.listen()
        self.tls_port = self.engine.listen()
        self.engine.start()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        for p in self._procs:
            p.kill()
            p.wait(5)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        self._procs.clear()

    async def resolve(self, sock: socket.socket):
        port = sock.getsockname()[1]
        client = sock.getpeername()[:2]
        if port == self.port:
            return self.policy.context("shop", "catalog", client, ("127.0.0.1", self.catalog_port))
        if port == self.tls_port:
            return self.policy.context("shop", "vault", client, ("127.0.0.1", self.vault_port))
        return None

    # -- the target protocol
    def connect(self, tls: bool = False, server_hostname: str | None = None) -> socket.socket:
        s = socket.create_connection((self.tls_host if tls else self.host, self.tls_port if tls else self.port),
                                     timeout=10)
        if tls:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            s = ctx.wrap_socket(s, server_hostname=server_hostname or VAULT_NAME)
        return s

    def run(self, argv, timeout: float = 30, input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, timeout=timeout, input=input)

    def records(self) -> list[dict]:
        return self.engine.records()



def cleanup_env() -> None:
    os.environ.pop("http_proxy", None)
    os.environ.pop("https_proxy", None)
