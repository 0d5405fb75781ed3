"""Helpers for the L7 verifier benchmark: processes we start and always stop, HAProxy
configurations, wrk runs with exact figures, CPU accounting.

Everything runs on 127.0.0.1. Processes are started in their own session
(process group) and stopped by that group id, so nothing outlives the test,
also when it fails or times out.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

# The network namespace this process was in when pytest imported us (collection, before any
# fixture ran). conftest's bench_dp moves the whole process into a fresh namespace, whose
# loopback is down, for the rest of the session; our processes must live on a working lo.
_HOME_NETNS = os.open("/proc/self/ns/net", os.O_RDONLY)
_CLONE_NEWNET = 0x40000000

CPU_PROXY = 0   # the proxy under test (HAProxy or the verifier), alone on this core
CPU_CLIENT = 1  # wrk and the origin

# wrk prints its figures through this done() hook as one JSON line (latency in µs), so
# nothing is parsed from wrk's rounded human output ("1.10ms").
_DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""
# Paced: every connection waits a random 0..2*D ms (mean D) before each request (wrk's
# delay() hook), so the offered load is about connections / (D + latency): a fixed,
# moderate rate well below every target's capacity, where latency is the proxy's own and
# not queueing. Random, because with a fixed delay the connections stay in lockstep and
# every request arrives in a burst of `connections` that queue behind each other.
_PACED_LUA = """
math.randomseed(os.time())
delay = function() return math.random(0, 2 * %d) end
"""


def have(*tools: str) -> list[str]:
    """The tools among `tools` that are missing from PATH."""
    return [t for t in tools if shutil.which(t) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0] if isinstance(proc.args, list) else proc.args} exited "
                               f"with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class Procs:
    """Started processes, each in its own process group; stop() ends every one of them."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], cpu: Optional[int] = None,
              env: Optional[dict] = None) -> subprocess.Popen:
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu)] + argv
        log = open(self.workdir / f"{name}.log", "wb")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=env)
        finally:
            log.close()
        self.procs.append((name, p))
        return p

    def log(self, name: str, tail: int = 3000) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        self.procs.clear()


def _setns(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def home_netns():
    """Run the body in the network namespace we were imported in; switch back after."""
    cur = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        same = os.fstat(cur).st_ino == os.fstat(_HOME_NETNS).st_ino
        if not same:
            _setns(_HOME_NETNS)
        try:
            yield
        finally:
            if not same:
                _setns(cur)
    finally:
        os.close(cur)


@contextlib.contextmanager
def workspace():
    """A temporary directory and a Procs whose processes are stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix="bhbench-l7-") as d:
        procs = Procs(Path(d))
        try:
            yield procs
        finally:
            procs.stop()


# ---------------------------------------------------------------- HAProxy configurations

_HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn 4096
    tune.bufsize 16384
    # no log: neither side of the comparison logs requests
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
"""

ORIGIN_BODY = "ok\n"


def haproxy_origin_cfg(port: int) -> str:
    """The origin: HAProxy answering every request itself with a fixed 200 (no backend,
    no file I/O, keep-alive): the cheapest HTTP/1.1 server at hand."""
    return _HAPROXY_GLOBAL + f"""\
frontend origin
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string "{ORIGIN_BODY.strip()}\\n"
"""


def haproxy_acl_cfg(port: int, origin_port: int) -> str:
    """HAProxy as the reverse proxy under test, with the ACL of the verifier's rule:
    methods GET|HEAD, paths "/items" (exact) or "/items/*" (prefix "/items/"); any
    other request gets 403 from the proxy itself."""
    return _HAPROXY_GLOBAL + f"""\
frontend acl
    bind 127.0.0.1:{port}
    acl method_ok method GET HEAD
    acl path_ok path /items
    acl path_ok path_beg /items/
    http-request deny deny_status 403 unless method_ok path_ok
    default_backend origin
backend origin
    http-reuse safe
    server origin 127.0.0.1:{origin_port}
"""


def start_haproxy(procs: Procs, name: str, cfg: str, port: int, cpu: int) -> subprocess.Popen:
    path = procs.workdir / f"{name}.cfg"
    path.write_text(cfg)
    chk = subprocess.run(["haproxy", "-c", "-q", "-f", str(path)], capture_output=True, text=True)
    if chk.returncode != 0:
        raise RuntimeError(f"haproxy -c {path}: {chk.stdout}{chk.stderr}")
    p = procs.start(name, ["haproxy", "-db", "-f", str(path)], cpu=cpu)  # -db: foreground
    try:
        wait_port(port, p)
    except RuntimeError as e:
        raise RuntimeError(f"{name}: {e}\n{procs.log(name)}") from None
    return p


# ---------------------------------------------------------------- the verifier's policy

RULE = "web-reads-catalog"
HTTP_ENTRY = {"methods": ["GET", "HEAD"], "paths": ["/items", "/items/*"]}


def verifier_policy_yaml() -> str:
    """A policy whose rule RULE carries the same ACL as haproxy_acl_cfg()."""
    import yaml

    policy = {
        "version": 1,
        "settings": {"default_action": "deny", "mode": "enforce"},
        "segments": [{"name": "prod", "interfaces": ["bh-prod"]},
                     {"name": "core", "interfaces": ["bh-core"]}],
        "apps": [{"name": "web", "segment": "prod", "addresses": ["127.0.0.1/32"]},
                 {"name": "catalog", "segment": "core", "addresses": ["127.0.0.2/32"], "ports": ["tcp/80"]}],
        "rules": [{"name": RULE, "from": "web", "to": "catalog", "http": [HTTP_ENTRY]}],
    }
    return yaml.safe_dump(policy, sort_keys=False)


# ---------------------------------------------------------------- one raw request

def http_status(port: int, method: str, target: str, timeout: float = 5.0) -> int:
    """Send one HTTP/1.1 request (Connection: close) and return the response's status."""
    req = (f"{method} {target} HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n"
           f"Content-Length: 0\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(req)
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    line = buf.split(b"\r\n", 1)[0].split()
    if len(line) < 2 or not line[0].startswith(b"HTTP/1."):
        raise RuntimeError(f"{method} {target} on port {port}: no HTTP response ({buf[:200]!r})")
    return int(line[1])


# ---------------------------------------------------------------- CPU accounting

def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU (busy, total) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals[:8]]
                idle = v[3] + v[4]  # idle + iowait
                out[int(name[3:])] = (sum(v) - idle, sum(v))
    return out


def background_busy(seconds: float = 1.0) -> dict[int, float]:
    """Busy % of each CPU over `seconds` while we run nothing: other tenants of the VM."""
    c0 = _cpu_times()
    time.sleep(seconds)
    c1 = _cpu_times()
    return {cpu: round(100.0 * (c1[cpu][0] - c0[cpu][0]) / max(1, c1[cpu][1] - c0[cpu][1]), 1)
            for cpu in sorted(c1)}


def _group_cpu_s(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes, all threads included."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])    # utime (field 14)
            system += int(fields[12])  # stime (field 15)
        except (OSError, IndexError, ValueError):
            pass
    return user / tick, system / tick


def pin(pid: int, cpu: int) -> None:
    """Move a running process, every thread of it and of its children, onto one CPU."""
    for p in _descendants(pid):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, {cpu})


def serving_children(pid: int) -> list[int]:
    """The processes serving under `verifier serve --procs N` started as `pid` (taskset execs
    in place, so pid is the parent that forked them), oldest first."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return sorted(int(c) for c in f.read().split())
    except OSError:
        return []


def qemu_running() -> bool:
    """A qemu VM (the project's `make vm-test`, or anyone's) shares this box's CPUs."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().startswith("qemu"):
                        return True
            except OSError:
                pass
    return False


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (taskset execs in place; the verifier may fork)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


# ---------------------------------------------------------------- wrk

@dataclasses.dataclass
class WrkResult:
    target: str
    profile: str
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    errors: dict
    cpu_busy: dict          # CPU index -> busy % during the run
    proxy_cpu_us_per_req: Optional[float]  # CPU time the proxy under test spent per request
    proxy_user_us_per_req: Optional[float]  # ... of which in user space
    proxy_sys_us_per_req: Optional[float]   # ... of which in the kernel (syscalls, loopback TCP)
    command: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class WrkProfile:
    name: str
    threads: int
    connections: int
    duration_s: int
    warmup_s: int
    delay_ms: int = 0   # > 0: paced (see _PACED_LUA)
    proxy_cpu: int = CPU_PROXY  # where the proxy under test runs (wrk and the origin: CPU_CLIENT)

    def describe(self) -> str:
        pace = (f" -s paced.lua (each connection waits a random 0-{2 * self.delay_ms} ms, mean {self.delay_ms}, "
                f"before each request)") if self.delay_ms else ""
        return f"wrk -t{self.threads} -c{self.connections} -d{self.duration_s}s --latency{pace}"

    def placement(self) -> str:
        if self.proxy_cpu == CPU_CLIENT:
            return f"proxy, wrk and origin all on CPU {CPU_CLIENT}"
        return f"proxy alone on CPU {self.proxy_cpu}, wrk + origin on CPU {CPU_CLIENT}"



def wrk_command(profile: WrkProfile, url: str, script: Path, duration_s: int) -> list[str]:
    return ["taskset", "-c", str(CPU_CLIENT), "wrk", f"-t{profile.threads}", f"-c{profile.connections}",
            f"-d{duration_s}s", "--timeout", "5s", "--latency", "-s", str(script), url]


def run_wrk(workdir: Path, target: str, profile: WrkProfile, url: str,
            proxy_pid: Optional[int] = None, duration_s: Optional[int] = None) -> WrkResult:
    """One wrk run of `profile` against `url` (duration_s overrides the profile's, for warmups)."""
    script = workdir / f"{profile.name}.lua"
    script.write_text(_DONE_LUA + (_PACED_LUA % profile.delay_ms if profile.delay_ms else ""))
    duration_s = duration_s or profile.duration_s
    cmd = wrk_command(profile, url, script, duration_s)
    pids = _descendants(proxy_pid) if proxy_pid else []
    c0, g0 = _cpu_times(), _group_cpu_s(pids)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 30)
    c1, g1 = _cpu_times(), _group_cpu_s(pids)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"no figures from wrk: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    j = json.loads(line[len("BENCHJSON "):])
    dur = j["duration_us"] / 1e6

    def per_req(seconds: float) -> Optional[float]:
        return seconds * 1e6 / j["requests"] if (pids and j["requests"]) else None

    busy = {cpu: round(100.0 * (c1[cpu][0] - c0[cpu][0]) / max(1, c1[cpu][1] - c0[cpu][1]), 1)
            for cpu in sorted(c1)}
    return WrkResult(
        target=target, profile=profile.name, requests=j["requests"], duration_s=dur,
        rps=j["requests"] / dur if dur else 0.0,
        p50_ms=j["p50_us"] / 1000, p90_ms=j["p90_us"] / 1000, p99_ms=j["p99_us"] / 1000,
        p999_ms=j["p999_us"] / 1000, mean_ms=j["lat_mean_us"] / 1000, max_ms=j["lat_max_us"] / 1000,
        errors={k[4:]: j[k] for k in j if k.startswith("err_")},
        cpu_busy=busy,
        proxy_cpu_us_per_req=per_req(g1[0] + g1[1] - g0[0] - g0[1]),
        proxy_user_us_per_req=per_req(g1[0] - g0[0]),
        proxy_sys_us_per_req=per_req(g1[1] - g0[1]),
        command=" ".join(Path(a).name if a == str(script) else a for a in cmd),
    )
