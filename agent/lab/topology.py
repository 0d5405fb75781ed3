"""A gateway topology in network namespaces, for the demo and the integration tests.

    <p>-prod  eth0 198.18.1.10/24 fd00:1::10/64 ----- bh-prod \\
    <p>-dev   eth0 198.18.1.10/24 fd00:1::10/64 ----- bh-dev   >  <p>-gw (bulkhead)
    <p>-core  eth0 198.19.0.10/24 198.19.0.20/24 ---- bh-core /
                   fd00:19::10/64 fd00:19::20/64

The gateway has 198.18.1.1/24 + fd00:1::1/64 on BOTH bh-prod and bh-dev (the
two client segments overlap on purpose) and 198.19.0.1/24 + fd00:19::1/64 on
bh-core; every other namespace routes by default via the gateway. Forwarding
on the gateway is left off: the agent's plumbing turns it on.

`<p>` is unique per Topology (pid + counter), so parallel test runs and the
demo never collide; interface names are per namespace, so every topology
has its own bh-prod. Only 198.18.0.0/15 and fd00::/8 are used.

The client/server-side peers are plain veths, as in a user's container or
namespace: no XDP program, GRO off. So reject answers reach them only by the
path the loader picks for a veth (reject path tc_redirect, see
loader.choose_reject_path), which the reject tests thereby cover.

Facts this relies on:
- `ip netns exec` remounts /sys, so /sys/fs/bpf pins made inside it vanish
  with it: run the agent with gw_cmd() (nsenter --net, root mount namespace).

Servers: lab/servers.py (started in a namespace by Topology.serve). The agent in the gateway
and the CLI around it: lab/runner.py.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import itertools
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bulkhead.core.paths import REPO

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

CLIENT_V4, CLIENT_V6 = "198.18.1.10", "fd00:1::10"
GW_CLIENT_V4, GW_CLIENT_V6 = "198.18.1.1", "fd00:1::1"
PAYMENTS_V4, PAYMENTS_V6 = "198.19.0.10", "fd00:19::10"
CATALOG_V4, CATALOG_V6 = "198.19.0.20", "fd00:19::20"
GW_CORE_V4, GW_CORE_V6 = "198.19.0.1", "fd00:19::1"

ROLES = ("gw", "prod", "dev", "core")
REFUSED_ERRNOS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.EACCES, errno.ENETUNREACH, errno.EPERM)
# gateway interface -> (peer namespace role, gateway addresses, peer addresses, peer default gw)
LINKS = {
    "bh-prod": ("prod", ["198.18.1.1/24", "fd00:1::1/64"], ["198.18.1.10/24", "fd00:1::10/64"],
                (GW_CLIENT_V4, GW_CLIENT_V6)),
    "bh-dev": ("dev", ["198.18.1.1/24", "fd00:1::1/64"], ["198.18.1.10/24", "fd00:1::10/64"],
               (GW_CLIENT_V4, GW_CLIENT_V6)),
    "bh-core": ("core", ["198.19.0.1/24", "fd00:19::1/64"],
                ["198.19.0.10/24", "198.19.0.20/24", "fd00:19::10/64", "fd00:19::20/64"],
                (GW_CORE_V4, GW_CORE_V6)),
}
PEER_IF = "eth0"
STALE_RE = re.compile(r"^(bht|bhdemo)(\d+)x\d+-(gw|prod|dev|core|etcd)$")  # etcd: lab/fleetlab.py

_counter = itertools.count()
_libc = None


def _setns(path: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({path}): {os.strerror(e)}")
    finally:
        os.close(fd)


def in_netns(ns: str, fn):
    """fn() in a thread that entered network namespace `ns` (this thread stays where it is); its
    value, or its exception re-raised here. Sockets made there keep their namespace."""
    out: dict = {}

    def work():
        try:
            _setns(str(NETNS_DIR / ns))
            out["v"] = fn()
        except BaseException as e:  # handed to the caller
            out["e"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]
    return out.get("v")


def reap_stale(kinds: tuple[str, ...] = ("bht", "bhdemo")) -> list[str]:
    """Delete namespaces left by topologies whose process is gone (a crashed run)."""
    removed = []
    if not NETNS_DIR.exists():
        return removed
    for p in sorted(NETNS_DIR.iterdir()):
        m = STALE_RE.match(p.name)
        if not m or m.group(1) not in kinds:
            continue
        if Path(f"/proc/{m.group(2)}").exists():
            continue
        subprocess.run(["ip", "netns", "del", p.name], capture_output=True)
        removed.append(p.name)
    return removed


@dataclasses.dataclass
class Probe:
    """What one connection attempt did."""

    result: str  # connected | refused | timeout | error
    reply: str = ""
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result == "connected"


def wait_for(cond, timeout: float = 5.0, interval: float = 0.05):
    """cond()'s first true value within `timeout` seconds, polled every `interval`, else its last."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    return cond()


def failed_probe(e: OSError) -> "Probe":
    """What a socket error says about a probe: refused fast (RST, or an ICMP
    unreachable: filtered (v4) -> EHOSTUNREACH, prohibited (v6) -> EACCES),
    timed out (dropped), or some other error."""
    if isinstance(e, ConnectionRefusedError):
        return Probe("refused", detail=str(e))
    if isinstance(e, (socket.timeout, TimeoutError)):
        return Probe("timeout", detail=str(e))
    return Probe("refused" if e.errno in REFUSED_ERRNOS else "error", detail=f"{type(e).__name__}: {e}")


class Lab:
    """A lab is a context manager: create() on enter (destroy() if that fails half-way, so a
    failed build leaves nothing), destroy() on exit. Subclasses define both."""

    def create(self):
        raise NotImplementedError

    def destroy(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    @staticmethod
    def _ip(*args: str) -> None:
        p = subprocess.run(["ip", *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")

    def _fresh_netns(self, name: str) -> None:
        """Namespace `name`, new (a leftover of ours by that name, from a crashed run, is deleted
        first), with loopback up and no IPv6 DAD: addresses are usable at once (the links are
        point-to-point veths or one bridge)."""
        if (NETNS_DIR / name).exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._ip("netns", "add", name)
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
                        "net.ipv6.conf.default.accept_dad=0"], check=True, capture_output=True)
        self._ip("-n", name, "link", "set", "lo", "up")


class Topology(Lab):
    def __init__(self, kind: str = "bht"):
        if kind not in ("bht", "bhdemo"):
            raise ValueError("kind is bht (tests) or bhdemo (the demo)")
        self.prefix = f"{kind}{os.getpid()}x{next(_counter)}"
        self.ns = {role: f"{self.prefix}-{role}" for role in ROLES}
        self.gw = self.ns["gw"]
        self.procs: list[subprocess.Popen] = []
        self.created = False

    def name(self, ns: str) -> str:
        return self.ns.get(ns, ns)

    def create(self) -> "Topology":
        self.created = True
        for role in ROLES:
            self._fresh_netns(self.ns[role])
        for gw_if, (role, gw_addrs, peer_addrs, (v4gw, v6gw)) in LINKS.items():
            peer_ns = self.ns[role]
            self._ip("-n", self.gw, "link", "add", gw_if, "type", "veth", "peer", "name", PEER_IF,
                     "netns", peer_ns)
            for a in gw_addrs:
                self._ip("-n", self.gw, "addr", "add", a, "dev", gw_if, *(["nodad"] if ":" in a else []))
            for a in peer_addrs:
                self._ip("-n", peer_ns, "addr", "add", a, "dev", PEER_IF, *(["nodad"] if ":" in a else []))
            self._ip("-n", self.gw, "link", "set", gw_if, "up")
            self._ip("-n", peer_ns, "link", "set", PEER_IF, "up")
            self._ip("-n", peer_ns, "route", "add", "default", "via", v4gw)
            self._ip("-n", peer_ns, "-6", "route", "add", "default", "via", v6gw)
        return self

    def destroy(self) -> None:
        """Stop what we spawned and delete every namespace. Idempotent, never raises."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.terminate()
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        for role in ROLES:
            if (NETNS_DIR / self.ns[role]).exists():
                subprocess.run(["ip", "netns", "del", self.ns[role]], capture_output=True)

    # ------------------------------------------------------------ commands
    def cmd(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name(ns), *argv]

    def gw_cmd(self, argv: list[str]) -> list[str]:
        """A command in the gateway's network namespace that keeps /sys (and /sys/fs/bpf)."""
        return ["nsenter", f"--net={NETNS_DIR / self.gw}", *argv]

    def run(self, ns: str, argv: list[str], check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        full = self.gw_cmd(argv) if ns == "gw" else self.cmd(ns, argv)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        p = subprocess.run(full, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(full)}: exit {p.returncode}: {(p.stderr or '').strip()}")
        return p

    def spawn(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        """A background process in `ns`; destroy() stops it. ns "gw" uses nsenter (see gw_cmd)."""
        full = self.gw_cmd(argv) if ns == "gw" else self.cmd(ns, argv)
        p = subprocess.Popen(full, **kw)
        self.procs.append(p)
        return p

    # -------------------------------------------------------------- sockets
    def socket(self, ns: str, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in `ns` (created by a thread that entered it), usable from here."""
        return in_netns(self.name(ns), lambda: socket.socket(family, type_))

    def tcp(self, ns: str, addr: str, port: int, timeout: float = 1.5, send: bytes | None = None,
            keep: bool = False, sport: int | None = None):
        """Connect from `ns`, read the greeting, optionally send `send` and read its echo.

        Returns a Probe, or (Probe, socket) with keep=True (socket None unless connected).
        sport fixes the source port.
        """
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = self.socket(ns, fam, socket.SOCK_STREAM)
        s.settimeout(timeout)
        if sport is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
        t0 = time.monotonic()
        probe = Probe("error")
        try:
            s.connect((addr, port))
            reply = recv_line(s)
            if send is not None:
                s.sendall(send)
                reply += recv_exact(s, len(send)).decode(errors="replace")
            probe = Probe("connected", reply.strip())
        except OSError as e:
            probe = failed_probe(e)
        probe.seconds = time.monotonic() - t0
        if keep and probe.ok:
            return probe, s
        s.close()
        return (probe, None) if keep else probe

    def udp(self, ns: str, addr: str, port: int, payload: bytes = b"ping", timeout: float = 1.5) -> Probe:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = self.socket(ns, fam, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        t0 = time.monotonic()
        try:
            s.connect((addr, port))  # connected: an ICMP unreachable surfaces as ECONNREFUSED
            s.send(payload)
            data = s.recv(2048)
            probe = Probe("connected", data.decode(errors="replace"))
        except OSError as e:
            probe = failed_probe(e)
        finally:
            s.close()
        probe.seconds = time.monotonic() - t0
        return probe

    def ping(self, ns: str, addr: str, timeout: float = 1.0) -> Probe:
        t0 = time.monotonic()
        p = self.run(ns, ["ping", "-n", "-c", "1", "-W", str(max(1, round(timeout))), addr], check=False)
        secs = time.monotonic() - t0
        if p.returncode == 0:
            return Probe("connected", "echo reply", secs)
        out = (p.stdout + p.stderr).strip().splitlines()
        # An ICMP error back (bulkhead's reject: v4 "Packet filtered", v6 "Administratively prohibited")
        errors = [ln for ln in out if ln.startswith("From ")]
        if errors:
            return Probe("refused", seconds=secs, detail=errors[0])
        return Probe("timeout", seconds=secs, detail=out[-1] if out else "")

    # -------------------------------------------------------------- servers
    def serve(self, ns: str, name: str, tcp: list[str] = (), udp: list[str] = (),
              http: list[str] = ()) -> subprocess.Popen:
        """Start a greeting/echo server (and HTTP origin) in `ns` and wait until it listens."""
        argv = [sys.executable, "-m", "bulkhead.lab.servers", name]
        for a in tcp:
            argv += ["--tcp", a]
        for a in udp:
            argv += ["--udp", a]
        for a in http:
            argv += ["--http", a]
        p = self.spawn(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       cwd=str(REPO))
        line = p.stdout.readline()
        if line.strip() != "ready":
            p.kill()
            raise RuntimeError(f"server {name} did not start: {line!r} {p.stderr.read()[-2000:]}")
        return p

    def start_core_servers(self, payments_ports=(8443,), catalog_ports=(8080,), udp_port=5353,
                           catalog_http_ports=()) -> None:
        """payments on 198.19.0.10/fd00:19::10, catalog on .20/::20: TCP ports + UDP echo
        (+ catalog_http_ports: a minimal HTTP origin)."""
        for name, (v4, v6), ports, http in (
                ("payments", (PAYMENTS_V4, PAYMENTS_V6), payments_ports, ()),
                ("catalog", (CATALOG_V4, CATALOG_V6), catalog_ports, catalog_http_ports)):
            self.serve("core", name,
                       tcp=[f"{v4}:{p}" for p in ports] + [f"[{v6}]:{p}" for p in ports],
                       udp=[f"{v4}:{udp_port}", f"[{v6}]:{udp_port}"],
                       http=[f"{v4}:{p}" for p in http] + [f"[{v6}]:{p}" for p in http])


def recv_line(s: socket.socket, limit: int = 4096) -> str:
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("peer closed")
        buf += chunk
    return buf


# ------------------------------------------------------------------ server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bulkhead.lab.topology")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("reap", help="delete namespaces of crashed topologies")
    ap.parse_args(argv)
    for n in reap_stale():
        print(f"deleted netns {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
