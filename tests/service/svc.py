"""Helpers of the service tests: the installed service, its lab, traffic through this host.

These tests install bulkhead into the system they run on (scripts/service/install.sh) and
drive it with systemctl, so they run only in the `make vm-test` guest, where systemd is PID 1
(tests/service/conftest.py fails them elsewhere). The lab is tests/service/lab.sh, run at boot
by the bulkhead-lab.service unit installed here; the agent enforces in the root namespace.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import yaml
from bulkhead.lab.topology import Probe, failed_probe, in_netns, recv_exact, recv_line

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WHEELHOUSE = Path(os.environ.get("BULKHEAD_WHEELHOUSE", "/root/wheelhouse"))

UNIT = "bulkhead.service"
LAB_UNIT = "bulkhead-lab.service"
LAB_UNIT_FILE = Path("/etc/systemd/system") / LAB_UNIT
ETC = Path("/etc/bulkhead")
POLICY_FILE = ETC / "policy.yaml"
PREFIX = Path("/opt/bulkhead")
SBIN = Path("/usr/local/sbin/bulkhead")
PIN_ROOT = Path("/sys/fs/bpf/bulkhead")
STATE_DIR = Path("/run/bulkhead")  # the unit's --state-dir (RuntimeDirectory=bulkhead)
# Kept on the guest's disk across the reboot: what boot 1 saw before the reboot.
MARK_DIR = Path("/var/lib/bulkhead-vm")
BEFORE_REBOOT = MARK_DIR / "service-before-reboot.json"
BEFORE_INSTALL = MARK_DIR / "service-before-install.json"

CLIENT_NS, SERVER_NS = "bhsvc-cli", "bhsvc-srv"
GW_IFS = ("bhs-cli", "bhs-srv")
SERVER = "198.18.11.10"
ALLOWED, DENIED, DENIED_UDP = 8080, 9090, 5353
ARRIVALS = Path("/run/bulkhead-lab/arrivals")
DENY_TIMEOUT = 1.0  # seconds a dropped SYN is waited for

# A first start compiles bpf/bulkhead.c: minutes under TCG on a loaded host. Longer than the
# unit's TimeoutStartSec (15 min), so that systemd's verdict, not ours, ends a slow start; the
# tests that start the service have a pytest timeout above this (the install takes minutes too).
START_TIMEOUT = float(os.environ.get("BULKHEAD_AGENT_START_TIMEOUT", "900")) + 300
START_TEST_TIMEOUT = int(START_TIMEOUT) + 1200


def run(argv: list[str], check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run(argv, check=False, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def systemctl(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        p = run(["systemctl", *args], check=False, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        units = [a for a in args if a.endswith(".service")] or [UNIT]
        raise AssertionError(f"systemctl {' '.join(args)}: no answer in {timeout:.0f}s\n"
                             + "\n".join(diagnose(u) for u in units)) from e
    if check and p.returncode != 0:
        units = [a for a in args if a.endswith(".service")] or [UNIT]
        raise AssertionError(f"systemctl {' '.join(args)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}\n"
                             + "\n".join(diagnose(u) for u in units))
    return p


def diagnose(unit: str = UNIT, lines: int = 60) -> str:
    """The unit's status and the end of its journal, for a failure message."""
    st = run(["systemctl", "status", "--no-pager", "-l", "-n", "0", unit], check=False)
    run(["journalctl", "--sync"], check=False)
    jl = run(["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines), "-u", unit], check=False)
    return f"--- systemctl status {unit}\n{st.stdout}{st.stderr}--- journalctl -u {unit}\n{jl.stdout}{jl.stderr}"


def unit_props(unit: str = UNIT, *names: str) -> dict[str, str]:
    names = names or ("ActiveState", "SubState", "MainPID", "InvocationID", "NRestarts",
                      "UnitFileState", "LoadState", "Result")
    out = systemctl("show", unit, "-p", ",".join(names)).stdout
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)


def has_job(unit: str = UNIT) -> bool:
    return unit in systemctl("list-jobs", "--no-legend", "--plain").stdout


def journal(invocation: str) -> str:
    """What one run of the unit logged (by its invocation id: this start, not an earlier one)."""
    run(["journalctl", "--sync"], check=False)
    return run(["journalctl", "--no-pager", "-o", "cat", f"_SYSTEMD_INVOCATION_ID={invocation}"]).stdout


def wait_journal(invocation: str, pattern: str, timeout: float = 60) -> str:
    """The invocation's journal once it has a line matching `pattern` (journald reads the
    agent's stderr asynchronously), or what it has at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        text = journal(invocation)
        if re.search(pattern, text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def status() -> dict:
    p = run([str(SBIN), "status", "--json"], check=False, timeout=60)
    assert p.returncode == 0, f"bulkhead status --json: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def xdp_attached(ifname: str) -> bool:
    return "prog/xdp" in run(["ip", "-d", "link", "show", "dev", ifname]).stdout


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


# ------------------------------------------------------------------ policy
def policy_yaml(tcp_ports: list[int]) -> str:
    """The lab's policy: the client may reach the server on `tcp_ports`, nothing else."""
    doc = {
        "version": 1,
        "settings": {"default_action": "deny", "mode": "enforce"},
        "segments": [{"name": "clients", "interfaces": ["bhs-cli"]},
                     {"name": "servers", "interfaces": ["bhs-srv"]}],
        "apps": [{"name": "client", "segment": "clients", "addresses": ["198.18.10.0/24"]},
                 {"name": "server", "segment": "servers", "addresses": ["198.18.11.0/24"]}],
        "rules": [{"name": "client-to-server", "from": "client", "to": "server", "action": "allow",
                   "ports": [f"tcp/{p}" for p in tcp_ports]}],
    }
    return yaml.safe_dump(doc, sort_keys=False)


LAB_POLICY = policy_yaml([ALLOWED])


# ------------------------------------------------------------------ lab unit
def lab_unit_text() -> str:
    lab = HERE / "lab.sh"
    return f"""# test scaffolding of tests/service (make vm-test): removed by the uninstall test
[Unit]
Description=bulkhead service tests' lab: client and server namespaces behind this host
After=local-fs.target
Before={UNIT}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/bash {lab} up
ExecStop=/bin/bash {lab} down

[Install]
WantedBy=multi-user.target
"""


def install_lab() -> None:
    LAB_UNIT_FILE.write_text(lab_unit_text())
    systemctl("daemon-reload")
    systemctl("enable", "--now", LAB_UNIT)


def remove_lab() -> None:
    """Stop and remove the lab unit (its ExecStop deletes the namespaces); then whatever a
    failed unit left, by running lab.sh down directly. Never raises."""
    systemctl("disable", "--now", LAB_UNIT, check=False)
    LAB_UNIT_FILE.unlink(missing_ok=True)
    systemctl("daemon-reload", check=False)
    systemctl("reset-failed", LAB_UNIT, check=False)
    run(["bash", str(HERE / "lab.sh"), "down"], check=False)


# ------------------------------------------------------------------ traffic
def arrivals(proto: str, port: int) -> int:
    """How many connections/datagrams reached the lab server on proto/port."""
    if not ARRIVALS.exists():
        return 0
    want = f"{proto} {port} "
    return sum(1 for ln in ARRIVALS.read_text().splitlines() if ln.startswith(want))


def tcp(port: int, timeout: float = DENY_TIMEOUT, keep: bool = False):
    """Connect from the client namespace to the server, read its greeting: a Probe (with
    keep=True, (Probe, socket or None))."""
    s = in_netns(CLIENT_NS, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    s.settimeout(timeout)
    try:
        s.connect((SERVER, port))
        probe = Probe("connected", recv_line(s).strip())
    except OSError as e:
        probe = failed_probe(e)
    if keep and probe.ok:
        return probe, s
    s.close()
    return (probe, None) if keep else probe


def udp_send(port: int, payload: bytes = b"probe") -> None:
    s = in_netns(CLIENT_NS, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        s.sendto(payload, (SERVER, port))
    except OSError:
        pass  # an ICMP error from an earlier probe: that one did not get through either
    finally:
        s.close()


def echo(sock: socket.socket, msg: bytes) -> bytes:
    sock.sendall(msg)
    return recv_exact(sock, len(msg))


def assert_enforced(allowed: list[int], denied: list[int]) -> None:
    """Real traffic: every allowed port connects and greets, no denied one reaches the server."""
    for port in allowed:
        p = tcp(port, timeout=10)
        assert p.ok and p.reply == f"hello {port}", f"tcp/{port} should be allowed: {p}"
    for port in denied:
        before = arrivals("tcp", port)
        p = tcp(port)
        assert not p.ok, f"tcp/{port} should be denied, it connected: {p}"
        assert arrivals("tcp", port) == before, f"a SYN to denied tcp/{port} reached the server"


class DeniedProber:
    """Probes a denied flow without pause from the client namespace (TCP connects to DENIED,
    UDP datagrams to DENIED_UDP) until stopped; counts attempts and any that got through."""

    def __init__(self) -> None:
        self.stop_ev = threading.Event()
        self.attempts = 0
        self.through: list[Probe] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop_ev.is_set():
            udp_send(DENIED_UDP)
            p = tcp(DENIED, timeout=0.2)
            self.attempts += 1
            if p.ok:
                self.through.append(p)

    def __enter__(self) -> DeniedProber:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_ev.set()
        self.thread.join(timeout=30)


# ------------------------------------------------------------------ leftovers
def bulkhead_processes() -> list[str]:
    """Processes of the installed agent or the lab (not this test run)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmd = " ".join(a.decode(errors="replace") for a in argv if a)
        if (str(PREFIX) in cmd or str(SBIN) + " " in cmd + " " or "bulkhead agent" in cmd
                or "lab_server.py" in cmd):
            found.append(f"pid {d.name}: {cmd}")
    return found


def nft_tables() -> list[str]:
    out = run(["nft", "list", "tables"], check=False).stdout
    return [ln for ln in out.splitlines() if re.search(r"\bbulkhead", ln)]
