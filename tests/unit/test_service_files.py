"""scripts/service/: the unit, its environment file and the example policy say what the agent needs.

- bulkhead.service passes `systemd-analyze verify` (with ExecStart pointed at an executable that
  exists here) and has the settings docs/operations.md promises: Type=notify, ExecReload, the
  state and plumbing dirs kept across restarts, the hardening;
- its CapabilityBoundingSet is exactly the capability table of docs/operations.md;
- bulkhead.env expanded into ExecStart the way systemd does it is an `agent run` command line
  click accepts, for a policy file and for the commented fleet variant;
- the example policy validates and names interfaces that are not there (so an untouched example
  fails to start instead of enforcing something);
- install.sh and uninstall.sh parse and document their options.
The installer itself runs in tests/integration/test_service_install.py.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bulkhead.cli.main import main as cli
from bulkhead.datapath import loader
from bulkhead.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "scripts" / "service"
UNIT = SERVICE / "bulkhead.service"
ENV = SERVICE / "bulkhead.env"
EXAMPLE = SERVICE / "policy.example.yaml"
OPS = ROOT / "docs" / "operations.md"
PREFIX = "/opt/bulkhead"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> [(key, value)] in order (keys repeat in units). Strict about what systemd
    would ignore or misread: text outside a section, a line that is no assignment."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {n}: continuation lines make the unit hard to read"
        m = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if m:
            current = m.group(1)
            assert current not in sections, f"line {n}: section [{current}] twice"
            sections[current] = []
            continue
        assert current is not None, f"line {n}: outside any section: {raw!r}"
        m = re.fullmatch(r"([A-Za-z]+)=(.*)", line)
        assert m, f"line {n}: not KEY=VALUE: {raw!r}"
        sections[current].append((m.group(1), m.group(2).strip()))
    return sections


UNIT_TEXT = UNIT.read_text()
SECTIONS = parse_unit(UNIT_TEXT)


def one(section: str, key: str) -> str:
    values = [v for k, v in SECTIONS[section] if k == key]
    assert len(values) == 1, f"[{section}] {key}: {len(values)} assignments, want 1"
    return values[0]


def words(section: str, key: str) -> set[str]:
    return {w for k, v in SECTIONS[section] if k == key for w in v.split()}


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify on `unit_text` with the installed paths replaced by this venv's
    bulkhead (verify insists ExecStart's binary exists). Needs no running systemd."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (Debian: the systemd package)"
    here = str(Path(sys.executable).parent / "bulkhead")
    assert Path(here).exists(), f"{here}: the venv has no bulkhead script"
    unit = tmp_path / "bulkhead.service"
    unit.write_text(unit_text.replace(f"{PREFIX}/venv/bin/bulkhead", here))
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          check=False, capture_output=True, text=True, timeout=60)


def test_unit_passes_systemd_analyze_verify(tmp_path):
    p = verify(UNIT_TEXT, tmp_path)
    assert p.returncode == 0 and not p.stderr.strip(), f"exit {p.returncode}:\n{p.stderr}"


def test_systemd_analyze_verify_catches_a_bad_unit(tmp_path):
    """The check above can fail: a typo'd key and a bad value are reported."""
    bad = UNIT_TEXT.replace("Type=notify", "Type=notfy").replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    p = verify(bad, tmp_path)
    assert "notfy" in p.stderr and "NoNewPrivilege" in p.stderr, p.stderr


def test_unit_structure():
    assert set(SECTIONS) == {"Unit", "Service", "Install"}
    assert one("Install", "WantedBy") == "multi-user.target"


def test_unit_lifecycle():
    assert one("Service", "Type") == "notify"
    assert one("Service", "NotifyAccess") == "main"  # the agent notifies, not its verifier child
    assert one("Service", "EnvironmentFile") == "-/etc/bulkhead/bulkhead.env"
    assert one("Service", "ExecStart") == (
        f"{PREFIX}/venv/bin/bulkhead agent run --state-dir /run/bulkhead $BULKHEAD_POLICY $BULKHEAD_OPTS")
    assert one("Service", "ExecReload") == f"{PREFIX}/venv/bin/bulkhead reload --state-dir /run/bulkhead"
    assert one("Service", "KillMode") == "mixed"
    assert one("Service", "Restart") == "on-failure"
    assert one("Service", "RestartPreventExitStatus") == "2"
    assert re.fullmatch(r"\d+min", one("Service", "TimeoutStartSec")), "a first compile under TCG takes minutes"
    assert int(one("Unit", "StartLimitBurst")) <= 10  # a start that always fails must stop retrying
    assert one("Service", "StandardOutput") == one("Service", "StandardError") == "journal"


def test_unit_state_paths_are_the_agents():
    """The runtime dirs the unit keeps across restarts are where the agent keeps its state and
    the plumbing records, and bpffs (where loader pins) is writable."""
    assert words("Service", "RuntimeDirectory") == {"bulkhead", "bulkhead-plumbing"}
    assert one("Service", "RuntimeDirectoryPreserve") == "yes"
    assert loader.DEFAULT_STATE_DIR == "/run/bulkhead"
    plumbing = (ROOT / "agent" / "datapath" / "plumbing.py").read_text()
    assert 'os.environ.get("BULKHEAD_PLUMBING_DIR", "/run/bulkhead-plumbing")' in plumbing
    assert str(loader.BPFFS) == "/sys/fs/bpf"
    # the agent writes ip_forward and rp_filter (datapath/plumbing.py) under read-only /proc/sys
    assert words("Service", "ReadWritePaths") == {"/sys/fs/bpf", "/proc/sys/net"}
    assert 'FWD_V4 = "/proc/sys/net/' in plumbing


def test_unit_hardening():
    want = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "no", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "ProtectClock": "yes", "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "SystemCallArchitectures": "native",
        "AmbientCapabilities": "", "LimitMEMLOCK": "infinity",
    }
    assert {k: one("Service", k) for k in want} == want
    # bcc compiles against /lib/modules/*/build, which ProtectKernelModules=yes hides
    assert "ProtectKernelModules" not in dict(SECTIONS["Service"])
    assert words("Service", "RestrictAddressFamilies") == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    allowed = [v for k, v in SECTIONS["Service"] if k == "SystemCallFilter" and not v.startswith("~")]
    assert allowed == ["@system-service bpf perf_event_open"]


def documented_capabilities() -> set[str]:
    """The capability table of docs/operations.md's "Run as a service": | `CAP_X` | why |"""
    text = OPS.read_text()
    start = text.index("## Run as a service")
    section = text[start:text.find("\n## ", start + 1)]
    return set(re.findall(r"^\| `(CAP_[A-Z_]+)` \|", section, re.MULTILINE))


def test_capabilities_are_the_documented_ones():
    caps = words("Service", "CapabilityBoundingSet")
    assert caps == {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"}
    assert documented_capabilities() == caps


def test_capabilities_satisfy_the_agents_own_check():
    """The agent refuses to start without what it needs (daemon/service.py); the unit's set is
    enough, and each capability in it is one the check asks for."""
    from bulkhead.daemon import service

    bits = {"CAP_BPF": service.CAP_BPF, "CAP_PERFMON": service.CAP_PERFMON, "CAP_NET_ADMIN": service.CAP_NET_ADMIN}
    caps = words("Service", "CapabilityBoundingSet")
    mask = sum(1 << bits[c] for c in caps)
    assert service.missing_caps(mask) == []
    for c in caps:
        assert service.missing_caps(mask & ~(1 << bits[c])), f"{c} is in the unit but the agent does not need it"


# ------------------------------------------------------------------ bulkhead.env
def read_env(text: str) -> dict[str, str]:
    """EnvironmentFile= as systemd reads it: KEY=VALUE, # comments, later assignments win."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"not KEY=VALUE: {line!r}"
        assert not set(value) & set("\"'\\$"), f"{key}: keep values to plain words: {value!r}"
        env[key] = value
    return env


def exec_argv(env: dict[str, str], line: str) -> list[str]:
    """A command line with unbraced $VARS replaced as systemd does: split at whitespace into
    zero or more words."""
    out = []
    for word in line.split():
        if word.startswith("$"):
            out += env.get(word[1:], "").split()
        else:
            out.append(word)
    return out


def agent_run_params(argv: list[str]) -> dict:
    assert argv[:3] == [f"{PREFIX}/venv/bin/bulkhead", "agent", "run"], argv
    run = cli.commands["agent"].commands["run"]
    return run.make_context("run", argv[3:]).params


def test_env_file_makes_a_policy_file_command_line():
    env = read_env(ENV.read_text())
    params = agent_run_params(exec_argv(env, one("Service", "ExecStart")))
    assert params["policy_files"] == ("/etc/bulkhead/policy.yaml",)
    assert params["state_dir"] == "/run/bulkhead" and params["etcd"] is None
    assert params["metrics_addr"] == "127.0.0.1:9477"


def test_env_file_fleet_variant_makes_a_fleet_command_line():
    """Uncommenting the two fleet lines gives --etcd/--gateway/--trust and no --policy (they
    exclude each other)."""
    text = ENV.read_text()
    fleet = re.findall(r"^#(BULKHEAD_[A-Z]+=.*)$", text, re.MULTILINE)
    assert [line.split("=")[0] for line in fleet] == ["BULKHEAD_POLICY", "BULKHEAD_OPTS"]
    env = read_env(text + "\n" + "\n".join(fleet) + "\n")
    params = agent_run_params(exec_argv(env, one("Service", "ExecStart")))
    assert params["policy_files"] == ()
    assert params["etcd"] and params["gateway"] and params["trust"] == ("/etc/bulkhead/fleet.pub",)


def test_exec_reload_is_a_reload_command():
    argv = exec_argv({}, one("Service", "ExecReload"))
    assert argv[1] == "reload"
    params = cli.commands["reload"].make_context("reload", argv[2:]).params
    assert params["state_dir"] == "/run/bulkhead"


# ------------------------------------------------------------------ example policy
def test_example_policy_validates_in_audit_mode_and_must_be_edited():
    load_policy([str(EXAMPLE)])  # raises PolicyError if it does not validate
    doc = EXAMPLE.read_text()
    assert re.search(r"^  mode: audit\b", doc, re.MULTILINE), "the example must drop nothing"
    ifaces = re.findall(r"interfaces: \[([^\]]+)\]", doc)
    assert ifaces and all(i.strip().startswith("edit-me") for x in ifaces for i in x.split(","))
    assert all(not Path("/sys/class/net", i.strip()).exists() for x in ifaces for i in x.split(","))


# ------------------------------------------------------------------ scripts
@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
def test_scripts_parse_and_document_their_options(script):
    path = SERVICE / script
    assert subprocess.run(["bash", "-n", str(path)], check=False, capture_output=True).returncode == 0
    p = subprocess.run(["bash", str(path), "--help"], check=False, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    opts = set(re.findall(r"^\s+(--[a-z-]+)", p.stdout, re.MULTILINE))
    parsed = set(re.findall(r"^\s+(--[a-z-]+)\)", path.read_text(), re.MULTILINE))
    assert opts == parsed and "--root" in opts and "--prefix" in opts, (opts, parsed)
    bad = subprocess.run(["bash", str(path), "--no-such-option"], check=False, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "unknown argument" in bad.stderr
