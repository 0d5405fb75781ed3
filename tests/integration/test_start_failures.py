"""A start that fails leaves nothing behind, and one that adopted pins leaves them enforcing.

What can be checked before the compile is (the policy, the interfaces, whether the policy fits
the maps, the kernel's features: tests/unit/test_probe.py), so those starts fail without
compiling. A failure after the compile (here: native XDP demanded on an interface whose driver
has none, `lo`) removes what that start created: attachments, plumbing, the verifier, the pins.
"""
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from bulkhead.core.paths import REPO
from bulkhead.datapath import loader, plumbing
from bulkhead.lab.runner import AgentRunner, bulkhead_argv

pytestmark = [pytest.mark.root, pytest.mark.integration]

GW_IFS = ("bh-prod", "bh-dev", "bh-core")
PAY4 = "198.19.0.10"


APPS = [
    {"name": "web", "segment": "prod", "addresses": ["198.18.1.0/24"]},
    {"name": "laptops", "segment": "dev", "addresses": ["198.18.1.0/24"]},
    {"name": "payments", "segment": "core", "addresses": ["198.19.0.10/32"]},
]


class Bare:
    """The module's topology with no agent of the fixtures' in it: these tests start their own."""

    DENY_TIMEOUT = 1.0

    def __init__(self, topo, policy_dir: Path):
        self.topo, self.policy_dir, self.n = topo, policy_dir, 0

    def write(self, text: str) -> Path:
        self.n += 1
        p = self.policy_dir / f"policy-{self.n}.yaml"
        p.write_text(text)
        return p

    def gw(self, *argv: str) -> str:
        return self.topo.run("gw", list(argv)).stdout

    def xdp_attached(self, ifname: str) -> bool:
        return "prog/xdp" in self.gw("ip", "-d", "link", "show", "dev", ifname)


def policy(gateway, core_ifs=("bh-core",)) -> Path:
    doc = {"version": 1, "settings": {"default_action": "deny"},
           "segments": [{"name": "prod", "interfaces": ["bh-prod"]}, {"name": "dev", "interfaces": ["bh-dev"]},
                        {"name": "core", "interfaces": list(core_ifs)}],
           "apps": APPS, "rules": [{"name": "web-payments", "from": "web", "to": "payments", "action": "allow"}]}
    return gateway.write(yaml.safe_dump(doc, sort_keys=False))


@pytest.fixture(scope="module")
def gateway(topo, tmp_path_factory):
    base = tmp_path_factory.mktemp("bhfail")
    return Bare(topo, base)


def run_agent(topo, state_dir: Path, policy_path: Path, *args: str, timeout: float = 600):
    """`agent run` to its end (these starts fail): (exit code, the agent's log)."""
    argv = topo.gw_cmd([*bulkhead_argv(), "agent", "run", "--policy", str(policy_path),
                        "--state-dir", str(state_dir), "--metrics", "off", *args])
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    return p.returncode, p.stdout + p.stderr


def leftovers(gateway, state_dir: Path) -> list[str]:
    instance = loader.instance_name(state_dir)
    found = []
    pin_dir = loader.PIN_ROOT / instance
    if pin_dir.exists():
        found.append(f"pins {pin_dir}")
    found += [f"temporary pins {p}" for p in loader.PIN_ROOT.glob(f"tmp-{instance}-*")]
    for ifname in (*GW_IFS, "lo"):
        if gateway.xdp_attached(ifname):
            found.append(f"XDP on {ifname}")
        tc = gateway.gw("tc", "filter", "show", "dev", ifname, "ingress")
        if "bulkhead_tc" in tc:
            found.append(f"TC on {ifname}")
    table = plumbing.TABLE_PREFIX + instance.replace("-", "_")
    if table in gateway.gw("nft", "list", "tables"):
        found.append(f"nft table {table}")
    for fam in ("-4", "-6"):
        found += [f"ip {fam} rule {ln}" for ln in gateway.gw("ip", fam, "rule").splitlines() if "proto 176" in ln]
    procs = subprocess.run(["pgrep", "-af", str(state_dir)], capture_output=True, text=True).stdout.strip()
    if procs:
        found.append(f"processes: {procs}")
    return found


@pytest.fixture
def fresh_state(tmp_path, gateway):
    state_dir = tmp_path / "state"
    yield state_dir
    runner = AgentRunner(gateway.topo, state_dir)
    runner.cleanup()


def test_missing_interface_fails_before_compiling_and_leaves_nothing(gateway, fresh_state):
    rc, out = run_agent(gateway.topo, fresh_state, policy(gateway, core_ifs=("bh-core", "bh-nothere")))
    assert rc == 1, out
    assert "interfaces not found in this network namespace: bh-nothere (segment core)" in out, out
    assert "compiled and loaded" not in out and "reusing pinned programs" not in out, out
    assert leftovers(gateway, fresh_state) == []


def test_policy_too_big_for_the_maps_fails_before_compiling(gateway, fresh_state):
    rc, out = run_agent(gateway.topo, fresh_state, policy(gateway), "--map-size", "ident=1")
    assert rc == 1, out
    assert "does not fit the maps" in out and "--map-size ident=N" in out, out
    assert "compiled and loaded" not in out, out
    assert leftovers(gateway, fresh_state) == []


def test_malformed_policy_exits_2_and_leaves_nothing(gateway, fresh_state):
    bad = gateway.write("version: 1\nsegments: [\n")
    rc, out = run_agent(gateway.topo, fresh_state, bad)
    assert rc == 2, out
    assert leftovers(gateway, fresh_state) == []


def test_failure_after_the_compile_removes_what_the_start_created(gateway, fresh_state):
    # lo has no native XDP: the attach fails after bh-prod and bh-dev were attached.
    rc, out = run_agent(gateway.topo, fresh_state, policy(gateway, core_ifs=("bh-core", "lo")),
                        "--xdp-mode", "native")
    assert rc == 1, out
    assert "compiled and loaded" in out, out
    assert "lo: native XDP failed" in out, out
    assert "removed what it created" in out, out
    assert leftovers(gateway, fresh_state) == []


def test_failed_start_onto_adopted_pins_leaves_them_enforcing(gateway, fresh_state):
    topo = gateway.topo
    runner = AgentRunner(topo, fresh_state)
    runner.start(policy(gateway), args=("--metrics", "off"))
    instance = runner.status()["instance"]
    assert runner.stop() == 0
    assert topo.tcp("prod", PAY4, 8443).ok
    rc, out = run_agent(topo, fresh_state, policy(gateway, core_ifs=("bh-core", "lo")), "--xdp-mode", "native")
    assert rc == 1, out
    assert "the pins it adopted stay in place and keep enforcing" in out, out
    assert (loader.PIN_ROOT / instance).exists()
    assert all(gateway.xdp_attached(i) for i in GW_IFS)
    assert topo.tcp("prod", PAY4, 8443).ok
    assert topo.tcp("dev", PAY4, 8443, timeout=gateway.DENY_TIMEOUT).result == "timeout"
    assert not subprocess.run(["pgrep", "-af", str(fresh_state)], capture_output=True, text=True).stdout
    assert os.path.exists(fresh_state)
