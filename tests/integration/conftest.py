"""Integration fixtures: a netns gateway topology, a running agent, policies.

Each test module gets one topology (agent/lab/topology.py: prod and dev clients
that share 198.18.1.10, a core namespace with the payments and catalog
servers) and one agent started in the gateway namespace with nsenter, so the
XDP program is compiled once per module. Tests change behaviour with
`bulkhead policy apply` of a policy built by `policy()`. Everything is torn
down in finalizers, also when a test fails: `bulkhead down`, then the
namespaces (which takes veths, nft tables and ip rules with them), then
any pins left under /sys/fs/bpf/bulkhead/<instance>.

Only addresses in 198.18.0.0/15 and fd00::/8, only in namespaces made here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bulkhead.datapath.plumbing import FWD_V4, FWD_V6
from bulkhead.lab.runner import AgentRunner
from bulkhead.lab.topology import Topology, reap_stale, wait_for  # noqa: F401 -- the fixtures' helper

DENY_TIMEOUT = 1.0  # seconds a dropped SYN/datagram is waited for
REJECT_FAST = 0.5  # a reject must answer well within this

APPS = [
    {"name": "web", "segment": "prod", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
    {"name": "laptops", "segment": "dev", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
    {"name": "payments", "segment": "core", "addresses": ["198.19.0.10/32", "fd00:19::10/128"]},
    {"name": "catalog", "segment": "core", "addresses": ["198.19.0.20/32", "fd00:19::20/128"]},
]
SEGMENTS = [
    {"name": "prod", "interfaces": ["bh-prod"]},
    {"name": "dev", "interfaces": ["bh-dev"]},
    {"name": "core", "interfaces": ["bh-core"]},
]
# Segment ids follow SEGMENTS order (the compiler numbers them from 1).
SEG_ID = {"prod": 1, "dev": 2, "core": 3}


def rule(src: str, dst: str, action: str = "allow", ports: list[str] | None = None,
         mode: str | None = None, name: str | None = None) -> dict:
    r = {"name": name or f"{src}-{dst}-{action}-{'-'.join(ports or ['all'])}".replace("/", "")}
    r.update({"from": src, "to": dst, "action": action})
    if ports:
        r["ports"] = ports
    if mode:
        r["mode"] = mode
    return r


def policy_yaml(*rules: dict, default: str = "deny", mode: str = "enforce",
                segments: list[dict] | None = None, apps: list[dict] | None = None) -> str:
    doc = {
        "version": 1,
        "settings": {"default_action": default, "mode": mode},
        "segments": segments or SEGMENTS,
        "apps": apps or APPS,
        "rules": list(rules),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counters that moved, by reason name."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}




class Gateway:
    """What a test needs: the topology, the agent, and policy helpers.

    Test modules can't import from conftest (tests/conftest.py shares the
    name), so the helpers travel on this fixture object.
    """

    rule = staticmethod(rule)
    policy_yaml = staticmethod(policy_yaml)
    delta = staticmethod(delta)
    wait_for = staticmethod(wait_for)
    DENY_TIMEOUT = DENY_TIMEOUT
    REJECT_FAST = REJECT_FAST
    SEG_ID = SEG_ID

    def __init__(self, topo: Topology, agent: AgentRunner, policy_dir: Path):
        self.topo = topo
        self.agent = agent
        self.policy_dir = policy_dir
        self._n = 0
        # The gateway's sysctls before any agent touched them: `down` restores these, and a
        # new namespace inherits forwarding from the root one (on by Docker, on gateways).
        ifs = [i for i in self.gw("ls", "/proc/sys/net/ipv4/conf").split() if i.startswith("bh-")]
        self.found = {path: self.sysctl(path)
                      for path in (FWD_V4, FWD_V6, *(f"/proc/sys/net/ipv4/conf/{i}/rp_filter" for i in ifs))}

    def write(self, text: str) -> Path:
        self._n += 1
        p = self.policy_dir / f"policy-{self._n:03d}.yaml"
        p.write_text(text)
        return p

    def apply(self, *rules: dict, **kw) -> int:
        """Apply a policy made of `rules`; returns the new generation (asserts success)."""
        path = self.write(policy_yaml(*rules, **kw))
        p = self.agent.apply(path)
        assert p.returncode == 0, f"apply failed ({p.returncode}): {p.stdout}{p.stderr}\n{path.read_text()}"
        gen = int(p.stdout.split()[-1])
        return gen

    def counters(self) -> dict[str, int]:
        return self.agent.counters()

    def generation(self) -> int:
        return self.agent.status()["generation"]

    def sysctl(self, path: str) -> str:
        return self.topo.run("gw", ["cat", path]).stdout.strip()

    def xdp_attached(self, ifname: str) -> bool:
        return "prog/xdp" in self.topo.run("gw", ["ip", "-d", "link", "show", "dev", ifname]).stdout

    def gw(self, *argv: str) -> str:
        """stdout of a command in the gateway namespace."""
        return self.topo.run("gw", list(argv)).stdout


@pytest.fixture(scope="module")
def topo():
    reap_stale(("bht",))
    t = Topology("bht")
    try:
        t.create()
        t.start_core_servers(payments_ports=(8443, 8444), catalog_ports=(8080,), udp_port=5353)
        yield t
    finally:
        t.destroy()


@pytest.fixture(scope="module")
def gateway(topo, tmp_path_factory, request):
    """A running agent in the gateway, started once per module with a deny-all policy
    (and the module's AGENT_ARGS, more `agent run` options, if it has them)."""
    base = tmp_path_factory.mktemp("bh")
    state_dir = base / "state"
    policies = base / "policies"
    policies.mkdir()
    agent = AgentRunner(topo, state_dir)
    gw = Gateway(topo, agent, policies)
    try:
        agent.start(gw.write(policy_yaml()), args=tuple(getattr(request.module, "AGENT_ARGS", ())))
        yield gw
    finally:
        agent.cleanup()

