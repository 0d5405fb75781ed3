"""A single-member etcd for tests, the demo and the benchmark: `EtcdServer`.

Runs the distribution's `etcd` binary (Debian's etcd-server) as a child process, never the
system service: free ports, a data dir of its own (temporary unless given), listening only
on `client_addr` (loopback or a lab address), inside a network namespace if `netns` names one
(nsenter --net, as the lab runs the agent). `start()` returns once /health answers true.
The ports are chosen once, so a `stop()` then `start()` on the same data dir comes back at the
same `url` with the same data (how the tests take etcd down and bring it back).

    with EtcdServer() as etcd:         # temporary data dir, removed at exit
        Store([etcd.url]).put(...)

`EtcdCluster(3)` runs three such members as one cluster (a member killed, the others keep the
data and the quorum), for the failover tests.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bulkhead.lab.topology import NETNS_DIR, _setns

ETCD_BIN = "etcd"
HEALTHY_WITHIN = 10.0  # seconds; a fresh single member is healthy in well under 3 s


def _free_ports(addr: str, n: int) -> list[int]:
    """n distinct ports free on addr now (all held open together, so no two are the same)."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(fam, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((addr, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


class EtcdServer:
    def __init__(self, name: str = "bhetcd", client_addr: str = "127.0.0.1",
                 netns: str | None = None, client_port: int | None = None,
                 peer_port: int | None = None, max_request_bytes: int | None = None):
        self.name = name
        self.client_addr = client_addr
        self.netns = netns
        self._client_port = client_port
        self._peer_port = peer_port
        self.max_request_bytes = max_request_bytes  # None: etcd's default (1.5 MiB)
        self.initial_cluster: str | None = None  # "name=peer_url,..." when a member of an EtcdCluster
        self.proc: subprocess.Popen | None = None
        self.data_dir: Path | None = None
        self._own_dir = False
        self.log_path: Path | None = None
        self._log = None

    # ------------------------------------------------------------------ addresses
    def _ports(self) -> tuple[int, int]:
        if self._client_port is None or self._peer_port is None:
            if self.netns:
                # A namespace made by the lab has no other listener: etcd's usual ports are free.
                self._client_port = self._client_port or 2379
                self._peer_port = self._peer_port or 2380
            else:
                cport, pport = _free_ports(self.client_addr, 2)
                self._client_port = self._client_port or cport
                self._peer_port = self._peer_port or pport
        return self._client_port, self._peer_port

    @property
    def url(self) -> str:
        cport, _ = self._ports()
        return f"http://{_host(self.client_addr)}:{cport}"

    @property
    def peer_url(self) -> str:
        _, pport = self._ports()
        return f"http://{_host(self.client_addr)}:{pport}"

    # ------------------------------------------------------------------ lifecycle
    def argv(self) -> list[str]:
        assert self.data_dir is not None
        argv = [ETCD_BIN, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
                "--initial-cluster-state", "new", "--initial-cluster-token", self.name.split("-")[0],
                "--log-level", "warn", "--logger", "zap"]
        if self.max_request_bytes:
            argv += ["--max-request-bytes", str(self.max_request_bytes)]
        if self.netns:
            argv = ["nsenter", f"--net={NETNS_DIR / self.netns}", *argv]
        return argv

    def start(self, data_dir: str | os.PathLike | None = None, wait: bool = True) -> EtcdServer:
        """Start etcd (on `data_dir`, else the one of the last start, else a temporary one) and
        wait until it is healthy (wait=False: the caller waits, as a cluster's members must all
        be started before any is healthy)."""
        if self.running():
            return self
        if shutil.which(ETCD_BIN) is None:
            raise RuntimeError("etcd is not installed (Debian/Ubuntu: apt-get install etcd-server "
                               "etcd-client; `make setup` does it)")
        if data_dir is not None:
            self.data_dir = Path(data_dir)
            self.data_dir.mkdir(parents=True, exist_ok=True)
        elif self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="bhetcd-"))
            self._own_dir = True
        os.chmod(self.data_dir, 0o700)  # etcd refuses (warns about) a group/world-readable dir
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.etcd.log"
        self._log = open(self.log_path, "ab")
        # Own process group: the test's ^C does not reach it first, and stop() ends it alone.
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        if not wait:
            return self
        try:
            self._wait_healthy()
        except BaseException:
            self._end(signal.SIGKILL)
            raise
        return self

    def _health(self) -> bool:
        out: dict = {}

        def work():
            try:
                if self.netns:
                    _setns(str(NETNS_DIR / self.netns))
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    out["ok"] = json.loads(r.read()).get("health") == "true"
            except (OSError, ValueError):
                out["ok"] = False

        # A thread of its own: setns changes only the calling thread's namespace.
        t = threading.Thread(target=work, daemon=True)
        t.start()
        t.join()
        return out.get("ok", False)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTHY_WITHIN
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited at start (exit {self.proc.returncode if self.proc else '?'}): "
                                   f"{self.log_tail()}")
            if self._health():
                return
            time.sleep(0.05)
        raise RuntimeError(f"etcd at {self.url} not healthy within {HEALTHY_WITHIN:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace").strip() if self.log_path else ""
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _end(self, sig: int) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop etcd (SIGTERM, then SIGKILL after 10 s); keeps the data dir for a later start()."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crashed member (the data dir stays)."""
        self._end(signal.SIGKILL)

    def cleanup(self) -> None:
        """Stop and remove the data dir if it was a temporary one. Never raises."""
        try:
            self.stop()
        finally:
            if self._own_dir and self.data_dir is not None:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                if self.log_path is not None:
                    try:
                        self.log_path.unlink()
                    except OSError:
                        pass
                self.data_dir = None
                self._own_dir = False

    def __enter__(self) -> EtcdServer:
        return self.start() if not self.running() else self

    def __exit__(self, *exc) -> None:
        self.cleanup()


class EtcdCluster:
    """n EtcdServer members on client_addr forming one cluster (for failover tests): `.members`,
    `.urls` (every member's client URL), `.start()`, `.cleanup()`, a context manager."""

    def __init__(self, n: int = 3, name: str = "bhcluster", client_addr: str = "127.0.0.1"):
        self.members = [EtcdServer(f"{name}-{i}", client_addr) for i in range(n)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self) -> EtcdCluster:
        try:
            for m in self.members:
                m.start(wait=False)
            for m in self.members:
                m._wait_healthy()  # healthy = this member sees a leader: a quorum is up
        except BaseException:
            self.cleanup()
            raise
        return self

    def cleanup(self) -> None:
        for m in self.members:
            m.cleanup()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
