"""The agent's side of the verifier: listening sockets, the child process, restarts.

The agent owns the listening sockets (IP_TRANSPARENT, IPv4 and IPv6, one
port) and hands them to the child (agent/verifier/service.py), so a crashed
verifier loses only its open connections (reset: fail closed) while new ones
wait in the backlog for the restarted child. Between a crash and the new
child taking the policy, the ctl flag L7_READY is off: the data path drops
new L7 packets, counted as punt_no_handler.

Policy changes are two-phase, inside Agent.apply(): prepare() compiles the
bundle's L7 rules in the child (a key file that won't load fails the apply
before the kernel switches), commit() switches after the kernel did.
Records (requests, connection events) arrive on a SOCK_SEQPACKET socket and
are handed to `on_record` in a reader thread.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

import msgpack

from bulkhead.core import wire
from bulkhead.core.names import IP_TRANSPARENT, IPV6_TRANSPARENT
from bulkhead.core.paths import REPO

log = logging.getLogger("bulkhead.verifier")

BACKLOG = 4096
RESTART_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds, by consecutive quick failures
STABLE_AFTER = 30.0  # a child that ran this long resets the backoff


class VerifierError(RuntimeError):
    """The verifier is not there (not started, died, did not answer)."""


class VerifierRefused(VerifierError):
    """The verifier is there and refuses the policy's L7 part: the apply must fail."""


def make_listeners(port: int = 0) -> tuple[list[socket.socket], int]:
    """IPv4 and IPv6 transparent listeners on one port (0: any free port)."""
    for _ in range(20):
        socks = []
        try:
            s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s4)
            s4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s4.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s4.bind(("0.0.0.0", port))
            chosen = s4.getsockname()[1]
            if socket.has_ipv6 and os.path.exists("/proc/sys/net/ipv6"):
                s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                socks.append(s6)
                s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s6.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                s6.bind(("::", chosen))
            for s in socks:
                s.listen(BACKLOG)
                s.set_inheritable(True)
            return socks, chosen
        except OSError:
            for s in socks:
                s.close()
            if port:
                raise
    raise VerifierError("no free port for the verifier's IPv4 and IPv6 listeners")


class Supervisor:
    def __init__(self, maps_dir: str, on_record: Callable[[dict], None],
                 set_ready: Callable[[bool], None], port: int = 0, max_connections: int = 10000):
        self.maps_dir = maps_dir
        self.on_record = on_record
        self.set_ready = set_ready
        self.max_connections = max_connections
        self.listeners, self.port = make_listeners(port)
        self.proc: subprocess.Popen | None = None
        self.cmd: socket.socket | None = None
        self.cmd_lock = threading.Lock()
        self.stopping = threading.Event()
        self.restarts = 0
        self.crashes = collections.Counter()  # exit description -> count
        self.started_at = 0.0
        self.committed: tuple[bytes, int] | None = None  # (packed bundle, generation) in force
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------- process
    def _spawn(self) -> None:
        cmd_parent, cmd_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ev_parent, ev_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ev_child.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        fds = [s.fileno() for s in self.listeners] + [cmd_child.fileno(), ev_child.fileno()]
        for s in (cmd_child, ev_child):
            s.set_inheritable(True)
        argv = [sys.executable, "-m", "bulkhead.verifier.service",
                "--listen-fds", ",".join(str(s.fileno()) for s in self.listeners),
                "--cmd-fd", str(cmd_child.fileno()), "--event-fd", str(ev_child.fileno()),
                "--maps-dir", self.maps_dir, "--max-connections", str(self.max_connections)]
        # `bulkhead` is importable wherever the agent is (it is installed); cwd is the repo so
        # relative paths in the verifier's log lines read as they do in the agent's.
        self.proc = subprocess.Popen(argv, pass_fds=fds, cwd=str(REPO))
        cmd_child.close()
        ev_child.close()
        self.started_at = time.monotonic()
        threading.Thread(target=self._read_events, args=(ev_parent,), daemon=True,
                         name="verifier-events").start()
        try:
            cmd_parent.settimeout(30)
            wire.send_frame(cmd_parent, {"op": "ping"})
            wire.recv_frame(cmd_parent)
        except (OSError, ConnectionError, wire.ControlError) as e:
            cmd_parent.close()
            raise VerifierError(f"the verifier process did not start: {e}") from e
        with self.cmd_lock:
            old, self.cmd = self.cmd, cmd_parent
        if old:
            old.close()
        log.info("verifier running (pid %d, port %d)", self.proc.pid, self.port)

    def _read_events(self, sock: socket.socket) -> None:
        with sock:
            while True:
                try:
                    data = sock.recv(1 << 20)
                except OSError:
                    return
                if not data:
                    return
                try:
                    rec = msgpack.unpackb(data, raw=False)
                except Exception:  # noqa: BLE001
                    continue
                try:
                    self.on_record(rec)
                except Exception:  # noqa: BLE001
                    log.exception("handling a verifier record failed")

    def start(self) -> None:
        """Start the child. If it won't start, the supervisor keeps trying in the
        background; until then L7 flows are dropped (counted as punt_no_handler)."""
        try:
            self._spawn()
        except (VerifierError, OSError) as e:
            log.error("the L7 verifier did not start (L7 flows fail closed until it does): %s", e)
        self._thread = threading.Thread(target=self._watch, daemon=True, name="verifier-supervisor")
        self._thread.start()

    def _watch(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            proc = self.proc
            rc = proc.wait() if proc else None
            if self.stopping.is_set():
                return
            if self.stopping.is_set():
                return
            self.set_ready(False)
            ran = time.monotonic() - self.started_at
            failures = 0 if ran > STABLE_AFTER else failures + 1
            what = f"exit {rc}" if rc is not None and rc >= 0 else f"signal {-rc if rc else '?'}"
            self.crashes[what] += 1
            delay = RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF)) - 1] if failures else RESTART_BACKOFF[0]
            log.error("verifier died (%s) after %.1fs; L7 flows fail closed; restarting in %.1fs",
                      what, ran, delay)
            if self.stopping.wait(delay):
                return
            try:
                self._spawn()
                if self.committed:
                    packed, gen = self.committed
                    self.prepare(packed, gen)
                    self.commit(gen)
                else:
                    continue  # no policy yet: the next apply makes it ready
                self.restarts += 1
                self.set_ready(True)
            except Exception as e:  # noqa: BLE001
                log.error("restarting the verifier failed: %s", e)

    def stop(self) -> None:
        self.stopping.set()
        self.set_ready(False)
        p = self.proc
        if p and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.cmd:
            self.cmd.close()
        for s in self.listeners:
            s.close()

    # ---------------------------------------------------------- commands
    def request(self, req: dict, timeout: float = 60) -> dict:
        with self.cmd_lock:
            if self.cmd is None:
                raise VerifierError("verifier not running")
            self.cmd.settimeout(timeout)
            try:
                wire.send_frame(self.cmd, req)
                reply = wire.recv_frame(self.cmd)
            except (OSError, ConnectionError, wire.ControlError) as e:
                raise VerifierError(f"verifier did not answer {req.get('op')}: {e}") from e
        return reply

    def prepare(self, packed_bundle: bytes, generation: int) -> None:
        self._prepared = (packed_bundle, generation)
        reply = self.request({"op": "prepare", "generation": generation, "bundle": packed_bundle})
        if not reply.get("ok"):
            raise VerifierRefused(f"L7 rules refused: {reply.get('error')}")

    def commit(self, generation: int) -> None:
        """Switch the verifier to `generation` (remembered for restarts even if it is down)."""
        prepared = getattr(self, "_prepared", None)
        if prepared and prepared[1] == generation:
            self.committed = prepared
        reply = self.request({"op": "commit", "generation": generation})
        if not reply.get("ok"):
            raise VerifierError(f"verifier commit failed: {reply.get('error')}")

    def abort(self) -> None:
        try:
            self.request({"op": "abort"}, timeout=5)
        except VerifierError:
            pass

    def status(self) -> dict:
        p = self.proc
        st = {"pid": p.pid if p and p.poll() is None else None, "port": self.port,
              "restarts": self.restarts, "crashes": dict(self.crashes)}
        try:
            st.update(self.request({"op": "stats"}, timeout=2).get("stats", {}))
        except VerifierError as e:
            st["error"] = str(e)
        return st
