"""The agent's side of the verifier: listening sockets, the child processes, restarts.

The agent owns the listening sockets (IP_TRANSPARENT, IPv4 and IPv6, one
port) and hands them to the children (agent/verifier/service.py), so a crashed
verifier loses only its open connections (reset: fail closed) while new ones
wait in the backlog for the restarted child. Between a crash and the new
child taking the policy, the ctl flag L7_READY is off: the data path drops
new L7 packets, counted as punt_no_handler.

N processes (`procs`; `bulkhead agent run --verifier-procs N`): one set of
listeners per child, all bound to the one port with SO_REUSEPORT, so the
kernel spreads connections over the children by their 4-tuple hash (TPROXY's
listener lookup selects within the group the same way) and no accept queue is
shared. Each child keeps its own sockets across its restarts. L7_READY is on
only while every child is up and holds the policy in force (a dead child's
share of connections would otherwise wait in its backlog).

Policy changes are two-phase, inside Agent.apply(): prepare() compiles the
bundle's L7 rules in every child (a key file that won't load fails the apply
before the kernel switches; one refusal aborts the prepared generation in all),
commit() switches every child after the kernel did (a child that fails to
commit is killed and restarted onto the committed policy, so none keeps judging
by the old one). Records (requests, connection events; one record or a list of
them per message) arrive on a SOCK_SEQPACKET socket per child and are handed to
`on_record` in a reader thread, with `pid` saying which child.
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
from typing import Callable, Optional

import msgpack

from bulkhead.core import wire
from bulkhead.core.names import IP_TRANSPARENT, IPV6_TRANSPARENT
from bulkhead.core.paths import REPO

log = logging.getLogger("bulkhead.verifier")

BACKLOG = 4096
RESTART_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds, by consecutive quick failures
STABLE_AFTER = 30.0  # a child that ran this long resets the backoff
PROCS_ENV = "BULKHEAD_VERIFIER_PROCS"  # what `agent run --verifier-procs N` sets
MAX_PROCS = 64


class VerifierError(RuntimeError):
    """The verifier is not there (not started, died, did not answer)."""


class VerifierRefused(VerifierError):
    """The verifier is there and refuses the policy's L7 part: the apply must fail."""


def procs_from_env() -> int:
    """How many verifier processes to run: $BULKHEAD_VERIFIER_PROCS, default 1."""
    text = os.environ.get(PROCS_ENV, "").strip()
    if not text:
        return 1
    try:
        n = int(text)
    except ValueError:
        raise VerifierError(f"{PROCS_ENV}={text!r} is not a number of processes") from None
    if not 1 <= n <= MAX_PROCS:
        raise VerifierError(f"{PROCS_ENV}={n}: must be 1..{MAX_PROCS}")
    return n


def _listener(family: int, port: int, reuseport: bool) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            s.bind(("::", port))
        else:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.bind(("0.0.0.0", port))
    except BaseException:
        s.close()
        raise
    return s


def make_listener_sets(n: int, port: int = 0) -> tuple[list[list[socket.socket]], int]:
    """n sets of transparent listeners (IPv4, and IPv6 where the host has it) on one port
    (0: any free port). With n > 1 every socket has SO_REUSEPORT, each set a member of the
    port's group; an ephemeral bind never joins an existing group, so no other program's
    sockets share the chosen port by accident."""
    reuse = n > 1
    v6 = socket.has_ipv6 and os.path.exists("/proc/sys/net/ipv6")
    for _ in range(20):
        sets: list[list[socket.socket]] = []
        try:
            first = _listener(socket.AF_INET, port, reuse)
            sets.append([first])
            chosen = first.getsockname()[1]
            if v6:
                sets[0].append(_listener(socket.AF_INET6, chosen, reuse))
            for _i in range(1, n):
                one = [_listener(socket.AF_INET, chosen, reuse)]
                sets.append(one)
                if v6:
                    one.append(_listener(socket.AF_INET6, chosen, reuse))
            for one in sets:
                for s in one:
                    s.listen(BACKLOG)
                    s.set_inheritable(True)
            return sets, chosen
        except OSError:
            for one in sets:
                for s in one:
                    s.close()
            if port:
                raise
    raise VerifierError("no free port for the verifier's IPv4 and IPv6 listeners")


def make_listeners(port: int = 0) -> tuple[list[socket.socket], int]:
    """IPv4 and IPv6 transparent listeners on one port (0: any free port)."""
    sets, chosen = make_listener_sets(1, port)
    return sets[0], chosen


class _Child:
    """One verifier process: its listeners (kept across restarts), process and command socket."""

    def __init__(self, index: int, listeners: list[socket.socket]):
        self.index = index
        self.listeners = listeners
        self.proc: Optional[subprocess.Popen] = None
        self.cmd: Optional[socket.socket] = None
        self.cmd_lock = threading.Lock()
        self.started_at = 0.0
        self.up = False  # running and holding the committed policy (or no policy yet)
        self.thread: Optional[threading.Thread] = None

    @property
    def pid(self) -> Optional[int]:
        p = self.proc
        return p.pid if p is not None and p.poll() is None else None


class Supervisor:
    def __init__(self, maps_dir: str, on_record: Callable[[dict], None],
                 set_ready: Callable[[bool], None], port: int = 0, max_connections: int = 10000,
                 procs: Optional[int] = None):
        self.maps_dir = maps_dir
        self.on_record = on_record
        self.set_ready = set_ready
        self.max_connections = max_connections
        self.procs = procs_from_env() if procs is None else int(procs)
        if not 1 <= self.procs <= MAX_PROCS:
            raise VerifierError(f"verifier processes must be 1..{MAX_PROCS}, got {self.procs}")
        sets, self.port = make_listener_sets(self.procs, port)
        self.children = [_Child(i, ls) for i, ls in enumerate(sets)]
        self.stopping = threading.Event()
        self.restarts = 0
        self.crashes = collections.Counter()  # exit description -> count
        self.committed: tuple[bytes, int] | None = None  # (packed bundle, generation) in force
        self._prepared: tuple[bytes, int] | None = None
        self._state_lock = threading.Lock()  # children's `up` and the ready flag

    # compatibility with callers and tests of the one-process supervisor
    @property
    def listeners(self) -> list[socket.socket]:
        return [s for c in self.children for s in c.listeners]

    @property
    def proc(self) -> Optional[subprocess.Popen]:
        return self.children[0].proc

    @property
    def started_at(self) -> float:
        return min(c.started_at for c in self.children)

    # ----------------------------------------------------------- processes
    def _spawn(self, child: _Child) -> None:
        cmd_parent, cmd_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ev_parent, ev_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ev_child.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        fds = [s.fileno() for s in child.listeners] + [cmd_child.fileno(), ev_child.fileno()]
        for s in (cmd_child, ev_child):
            s.set_inheritable(True)
        argv = [sys.executable, "-m", "bulkhead.verifier.service",
                "--listen-fds", ",".join(str(s.fileno()) for s in child.listeners),
                "--cmd-fd", str(cmd_child.fileno()), "--event-fd", str(ev_child.fileno()),
                "--maps-dir", self.maps_dir, "--max-connections", str(self.max_connections)]
        # `bulkhead` is importable wherever the agent is (it is installed); cwd is the repo so
        # relative paths in the verifier's log lines read as they do in the agent's.
        try:
            child.proc = subprocess.Popen(argv, pass_fds=fds, cwd=str(REPO))
        finally:
            cmd_child.close()
            ev_child.close()
        child.started_at = time.monotonic()
        threading.Thread(target=self._read_events, args=(ev_parent, child.proc.pid), daemon=True,
                         name=f"verifier-events-{child.index}").start()
        try:
            cmd_parent.settimeout(30)
            wire.send_frame(cmd_parent, {"op": "ping"})
            wire.recv_frame(cmd_parent)
        except (OSError, ConnectionError, wire.ControlError) as e:
            cmd_parent.close()
            raise VerifierError(f"verifier process {child.index} did not start: {e}") from e
        with child.cmd_lock:
            old, child.cmd = child.cmd, cmd_parent
        if old:
            old.close()
        log.info("verifier %d running (pid %d, port %d)", child.index, child.proc.pid, self.port)

    def _read_events(self, sock: socket.socket, pid: int) -> None:
        with sock:
            while True:
                try:
                    data = sock.recv(1 << 22)
                except OSError:
                    return
                if not data:
                    return
                try:
                    recs = msgpack.unpackb(data, raw=False)
                except Exception:  # noqa: BLE001
                    continue
                for rec in recs if isinstance(recs, list) else (recs,):
                    if not isinstance(rec, dict):
                        continue
                    rec.setdefault("pid", pid)
                    try:
                        self.on_record(rec)
                    except Exception:  # noqa: BLE001
                        log.exception("handling a verifier record failed")

    def start(self) -> None:
        """Start the children. One that won't start is retried in the background; until
        every child is up with the policy, L7 flows are dropped (counted as punt_no_handler)."""
        for child in self.children:
            try:
                self._spawn(child)
                child.up = True
            except (VerifierError, OSError) as e:
                log.error("L7 verifier %d did not start (L7 flows fail closed until it does): %s",
                          child.index, e)
                p = child.proc
                if p is not None and p.poll() is None:
                    p.kill()  # its watcher counts it and starts another
        for child in self.children:
            child.thread = threading.Thread(target=self._watch, args=(child,), daemon=True,
                                            name=f"verifier-supervisor-{child.index}")
            child.thread.start()

    def _mark(self, child: _Child, up: bool) -> None:
        with self._state_lock:
            child.up = up
            ready = all(c.up for c in self.children) and self.committed is not None
            if not up:
                self.set_ready(False)
            elif ready:
                self.set_ready(True)

    def _watch(self, child: _Child) -> None:
        failures = 0
        while not self.stopping.is_set():
            proc = child.proc
            if proc is None:  # never started: try again after the backoff
                rc, ran = None, 0.0
            else:
                rc = proc.wait()
                ran = time.monotonic() - child.started_at
            if self.stopping.is_set():
                return
            self._mark(child, False)
            failures = 0 if ran > STABLE_AFTER else failures + 1
            if proc is not None:
                what = f"exit {rc}" if rc is not None and rc >= 0 else f"signal {-rc if rc else '?'}"
                self.crashes[what] += 1
            else:
                what = "not started"
            delay = RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF)) - 1] if failures else RESTART_BACKOFF[0]
            log.error("verifier %d died (%s) after %.1fs; L7 flows fail closed; restarting in %.1fs",
                      child.index, what, ran, delay)
            if self.stopping.wait(delay):
                return
            try:
                child.proc = None
                self._spawn(child)
                committed = self.committed
                if committed:
                    packed, gen = committed
                    self._request(child, {"op": "prepare", "generation": gen, "bundle": packed}, check=True)
                    self._request(child, {"op": "commit", "generation": gen}, check=True)
                if proc is not None:
                    self.restarts += 1
                self._mark(child, True)
            except Exception as e:  # noqa: BLE001
                log.error("restarting verifier %d failed: %s", child.index, e)
                p = child.proc
                if p is not None and p.poll() is None:
                    p.kill()  # the loop waits for it and tries again

    def stop(self) -> None:
        self.stopping.set()
        self.set_ready(False)
        for child in self.children:
            p = child.proc
            if p and p.poll() is None:
                p.terminate()
        for child in self.children:
            p = child.proc
            if p is None:
                continue
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for child in self.children:
            if child.cmd:
                child.cmd.close()
            for s in child.listeners:
                s.close()

    # ---------------------------------------------------------- commands
    def _request(self, child: _Child, req: dict, timeout: float = 60, check: bool = False) -> dict:
        with child.cmd_lock:
            if child.cmd is None:
                raise VerifierError(f"verifier {child.index} not running")
            child.cmd.settimeout(timeout)
            try:
                wire.send_frame(child.cmd, req)
                reply = wire.recv_frame(child.cmd)
            except (OSError, ConnectionError, wire.ControlError) as e:
                raise VerifierError(f"verifier {child.index} did not answer {req.get('op')}: {e}") from e
        if check and not reply.get("ok"):
            raise VerifierError(f"verifier {child.index}: {req.get('op')} failed: {reply.get('error')}")
        return reply

    def _all(self, req: dict, timeout: float = 60) -> list[tuple[_Child, dict | Exception]]:
        """`req` to every child at once (a prepare compiles in all of them in parallel)."""
        out: list = [None] * len(self.children)

        def one(i: int, child: _Child) -> None:
            try:
                out[i] = (child, self._request(child, req, timeout))
            except VerifierError as e:
                out[i] = (child, e)

        if len(self.children) == 1:
            one(0, self.children[0])
            return out
        threads = [threading.Thread(target=one, args=(i, c), daemon=True) for i, c in enumerate(self.children)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    def request(self, req: dict, timeout: float = 60) -> dict:
        """`req` to the first child (ping, stats of one process)."""
        return self._request(self.children[0], req, timeout)

    def prepare(self, packed_bundle: bytes, generation: int) -> None:
        """Compile `generation` in every child. A refusal by any aborts it in all (the apply
        fails: VerifierRefused). A child that is down (VerifierError: the agent applies
        anyway, L7 flows fail closed) takes the generation when its watcher restarts it."""
        self._prepared = (packed_bundle, generation)
        results = self._all({"op": "prepare", "generation": generation, "bundle": packed_bundle})
        refused = [(c, r) for c, r in results if isinstance(r, dict) and not r.get("ok")]
        if refused:
            self.abort()
            raise VerifierRefused(f"L7 rules refused: {refused[0][1].get('error')}")
        missing = [r for c, r in results if isinstance(r, Exception)]
        if missing:
            raise VerifierError(str(missing[0]))

    def commit(self, generation: int) -> None:
        """Switch every child to `generation` (remembered for restarts even if one is down).
        A child that doesn't take it is killed: it comes back with this generation."""
        prepared = self._prepared
        if prepared and prepared[1] == generation:
            self.committed = prepared
        failed = []
        for child, r in self._all({"op": "commit", "generation": generation}):
            if isinstance(r, Exception) or not r.get("ok"):
                failed.append((child, r if isinstance(r, Exception) else r.get("error")))
        # (set_ready is not called here: the agent calls commit holding the lock its flag
        # setter takes, and sets L7_READY itself when commit returns; the watchers clear it)
        for child, _ in failed:
            p = child.proc
            if p is not None and p.poll() is None:
                p.kill()  # its watcher clears L7_READY and restarts it onto self.committed
        if failed:
            raise VerifierError(f"verifier {failed[0][0].index} commit failed: {failed[0][1]}")

    def abort(self) -> None:
        self._all({"op": "abort"}, timeout=5)

    def status(self) -> dict:
        pids = [c.pid for c in self.children]
        st = {"pid": pids[0], "pids": pids, "procs": self.procs, "port": self.port,
              "restarts": self.restarts, "crashes": dict(self.crashes)}
        totals: collections.Counter = collections.Counter()
        errors = []
        for child, r in self._all({"op": "stats"}, timeout=2):
            if isinstance(r, Exception):
                errors.append(str(r))
                continue
            for k, v in (r.get("stats") or {}).items():
                if isinstance(v, (int, float)):
                    totals[k] += v
        st.update(totals)
        if errors:
            st["error"] = "; ".join(errors)
        return st
