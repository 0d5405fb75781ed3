"""WireGuard under the transit (docs/fabric.md "Encryption between gateways"), in the fabric lab.

- Where the kernel has no wireguard module (this may be such a host): the two gateways run a
  policy with plain transit; applying the same policy with `wireguard:` on gwa fails with the
  module-missing error, and a-cli still reaches api across (the running policy stays).
- Where it has the module: tests/vm/test_wireguard_traffic.py (run in the VM of `make vm-test`) sends real
  traffic over it, with this file's lab and helpers.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import yaml
from bulkhead.lab.fabriclab import UNDER_IF, FabricLab, host_addr, reap_stale
from bulkhead.lab.runner import AgentRunner
from test_fabric_transit import PORT, Fabric, transit_policy

pytestmark = [pytest.mark.root, pytest.mark.integration,
              pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools (wg) not installed")]

WG_PORT = 51820
OVERLAY = {"gwa": "198.18.150.1", "gwb": "198.18.150.2"}


def kernel_has_wireguard() -> bool:
    ns = f"bhwgprobe-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(["ip", "-n", ns, "link", "add", "wgprobe", "type", "wireguard"],
                              capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def keypair(d, gw: str) -> tuple[str, str]:
    priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True).stdout.strip()
    path = d / f"{gw}.key"
    path.write_text(priv + "\n")
    os.chmod(path, 0o600)
    return str(path), pub


def wireguard_policy(pubs: dict[str, str], overlay: bool) -> dict:
    p = transit_policy()
    for g in p["gateways"]:
        if overlay:
            g["transit"] = OVERLAY[g["name"]]
        g["wireguard"] = {"public_key": pubs[g["name"]], "endpoint": f"{host_addr(g['name'])}:{WG_PORT}"}
    return p


@pytest.fixture
def lab_dir(tmp_path):
    reap_stale()
    lab = FabricLab()
    agents: dict[str, AgentRunner] = {}
    try:
        lab.create()
        lab.serve_echo("b-srv", PORT)
        yield lab, agents, tmp_path
    finally:
        for a in agents.values():
            a.cleanup()
        lab.destroy()


def test_without_the_module_an_encrypted_policy_is_refused_and_the_running_one_stays(lab_dir):
    if kernel_has_wireguard():
        pytest.skip("the kernel has the wireguard module: the refusal is not reachable here")
    lab, agents, d = lab_dir
    plain = d / "plain.yaml"
    plain.write_text(yaml.safe_dump(transit_policy(), sort_keys=False))
    key, pub_a = keypair(d, "gwa")
    _, pub_b = keypair(d, "gwb")
    for gw in ("gwa", "gwb"):
        agents[gw] = AgentRunner(lab.gateway(gw), d / f"state-{gw}")
        agents[gw].start(plain, args=("--gateway", gw, "--metrics", "off", "--wireguard-key", key))
    fab = Fabric(lab, agents, plain)
    vip = fab.vip("api.apps.example")
    assert fab.lab.tcp_echo("a-cli", vip, PORT, b"before").ok
    enc = d / "wg.yaml"
    enc.write_text(yaml.safe_dump(wireguard_policy({"gwa": pub_a, "gwb": pub_b}, overlay=True), sort_keys=False))
    r = agents["gwa"].cli("policy", "apply", str(enc))
    assert r.returncode != 0
    assert "kernel has no wireguard module" in (r.stdout + r.stderr), r.stdout + r.stderr
    r = fab.lab.tcp_echo("a-cli", vip, PORT, b"after")
    assert r.ok and r.reply.endswith("after"), r
    assert agents["gwa"].status()["transit"]["wireguard"] is None
