"""The L7 case matrix (tests/integration/l7/cases.py) through the real gateway.

The same cases the loopback harness runs against the engine in-process, here
with a client in the prod namespace, origins in core, and everything in
between real: XDP marks the flow, bulkhead_tc copies the mark, TPROXY hands
the connection to the agent's verifier process, which finds the flow in the
kernel's flow table, decides each request, and reaches the origin from the
client's own address through the upstream entry it wrote for XDP.

The test policy (l7/policy.yaml, made by l7/material.py with real keys and
certificates) is moved onto the standard topology: segment clients = bh-prod,
servers = bh-core; shop = the prod clients, catalog = 198.19.0.20 (tcp/80),
vault = 198.19.0.10 (tcp/443, TLS terminated by the verifier).
"""
from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bulkhead.core.paths import REPO
from bulkhead.lab.runner import AgentRunner
from bulkhead.lab.topology import CATALOG_V4, PAYMENTS_V4
from l7 import cases
from l7.loopback import OriginLogs
from l7.material import VAULT_NAME, Material

pytestmark = [pytest.mark.root, pytest.mark.integration, pytest.mark.timeout(180)]

ORIGIN = REPO / "tests" / "integration" / "l7" / "origin.py"


def gateway_policy(material: Material, out: Path) -> Path:
    doc = yaml.safe_load(material.policy_path.read_text())
    ifaces = {"clients": ["bh-prod"], "servers": ["bh-core"]}
    for seg in doc["segments"]:
        seg["interfaces"] = ifaces[seg["name"]]
    addrs = {"shop": ["198.18.1.0/24", "fd00:1::/64"], "catalog": [f"{CATALOG_V4}/32"],
             "vault": [f"{PAYMENTS_V4}/32"]}
    for app in doc["apps"]:
        app["addresses"] = addrs[app["name"]]
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


class GatewayTarget:
    """The `target` of cases.py through the gateway (see cases.py for the protocol)."""

    def __init__(self, topo, agent: AgentRunner, material: Material, logs: list[Path]):
        self.topo, self.agent, self.material = topo, agent, material
        self.ca_file = material.ca_file
        self.host, self.port = CATALOG_V4, 80
        self.tls_host, self.tls_port = PAYMENTS_V4, 443
        self.origin_log = OriginLogs(logs)
        self._seq = self._last_seq()

    def connect(self, tls: bool = False, server_hostname: str | None = None) -> socket.socket:
        s = self.topo.socket("prod", socket.AF_INET)
        s.settimeout(10)
        s.connect((self.tls_host, self.tls_port) if tls else (self.host, self.port))
        if tls:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            s = ctx.wrap_socket(s, server_hostname=server_hostname or VAULT_NAME)
        return s

    def run(self, argv, timeout: float = 30, input: bytes | None = None) -> subprocess.CompletedProcess:
        return self.topo.run("prod", list(argv), check=False, timeout=timeout, input=input, text=False)

    def _requests(self) -> list[dict]:
        p = self.agent.cli("requests", "--json", "--limit", "0")
        assert p.returncode == 0, p.stderr
        return [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]

    def _last_seq(self) -> int:
        recs = self._requests()
        return recs[-1]["seq"] if recs else 0

    def records(self) -> list[dict]:
        recs = [r for r in self._requests() if r["seq"] > self._seq]
        if recs:
            self._seq = recs[-1]["seq"]
        return recs


@pytest.fixture(scope="module")
def target(topo, tmp_path_factory):
    base = tmp_path_factory.mktemp("l7gw")
    material = Material.create(base / "material")
    logs = [base / "catalog.log", base / "vault.log"]
    for (addr, port), log, tls in (((CATALOG_V4, 80), logs[0], None),
                                   ((PAYMENTS_V4, 443), logs[1], (material.vault_cert, material.vault_key))):
        argv = [sys.executable, str(ORIGIN), "--listen", f"{addr}:{port}", "--log", str(log)]
        if tls:
            argv += ["--tls", str(tls[0]), str(tls[1])]
        p = topo.spawn("core", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
        line = p.stdout.readline()
        assert line.startswith("ready"), f"origin on {addr}:{port} did not start: {line!r}"
    agent = AgentRunner(topo, base / "state")
    try:
        agent.start(gateway_policy(material, base / "policy.yaml"))
        yield GatewayTarget(topo, agent, material, logs)
    finally:
        agent.cleanup()


@pytest.mark.parametrize("case", cases.CASES, ids=cases.ids())
def test_case(case, target):
    case(target)


def test_matrix_traffic_was_steered_in_the_kernel(target):
    """Sanity for the whole module: the packets went through bh_steer, and the
    verifier resolved every connection it accepted from the kernel's flow table."""
    st = target.agent.status()
    assert st["counters"]["l7_steer"]["packets"] > 0
    assert st["counters"]["l7_upstream"]["packets"] > 0
    assert st["verifier"]["no_flow"] == 0 and st["verifier"]["upstream_failed"] == 0, st["verifier"]
