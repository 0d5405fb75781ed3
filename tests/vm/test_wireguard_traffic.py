"""WireGuard under the transit with real traffic (docs/fabric.md "Encryption between gateways").

Needs the kernel's wireguard module, which the VM's Debian 6.1 kernel has: the failure path of a
kernel without it is tested on the host (tests/integration/test_fabric_wireguard.py and
test_wireguard_device.py).

- The plumbing alone, in a throwaway namespace: the device is made, keyed, peered and routed; a
  policy without wireguard removes it and keeps the VXLAN device; remove() takes both. Without a
  plumbing record (a lost /run) `bulkhead down`'s sweep takes a stray WireGuard device too.
- The fabric lab: two gateways with wireguard: their transit addresses on the WireGuard devices,
  a-cli reaches api behind gwb, and on gwa's underlay there is only WireGuard (no VXLAN in the
  clear); status shows the peer and its handshake.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from bulkhead.lab.fabriclab import UNDER_IF, host_addr
from bulkhead.lab.runner import AgentRunner
from test_fabric_transit import PORT, Fabric
from test_fabric_wireguard import WG_PORT, kernel_has_wireguard, keypair, lab_dir, wireguard_policy  # noqa: F401
from test_wireguard_device import PEER_KEY, VX, WG, ifindex, ns, run  # noqa: F401

pytestmark = [pytest.mark.root, pytest.mark.integration,
              pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools (wg) not installed")]


@pytest.fixture(scope="module", autouse=True)
def _module():
    if not kernel_has_wireguard():
        pytest.skip("missing kernel feature: the wireguard module")


def test_the_device_is_made_keyed_routed_and_removed(ns):
    run(ns, f"p.apply(b, {{}}, transit_port=4789, wg=(wg, {ns['key']!r}))")
    dump = subprocess.run(["ip", "netns", "exec", ns["name"], "wg", "show", WG, "dump"], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    assert dump[0].split("\t")[2] == "51820"
    peer = dump[1].split("\t")
    assert peer[0] == PEER_KEY and peer[2] == "198.18.50.2:51821" and peer[3] == "198.18.100.2/32"
    addrs = subprocess.run(["ip", "-n", ns["name"], "-j", "addr", "show", WG], capture_output=True, text=True).stdout
    assert "198.18.100.1" in addrs
    route = subprocess.run(["ip", "-n", ns["name"], "route", "get", "198.18.100.2"], capture_output=True,
                           text=True).stdout
    assert f"dev {WG}" in route
    # no route to the peer's endpoint here: a 1500 underlay is assumed, WireGuard's 80 and VXLAN's 50 off it
    assert (mtu(ns, WG), mtu(ns, VX)) == (1420, 1370)
    # a policy without wireguard: the device goes, the VXLAN device stays, at its own MTU again
    run(ns, "p.apply(b, {}, transit_port=4789)")
    assert ifindex(ns, WG) is None and ifindex(ns, VX) and mtu(ns, VX) == 1500
    run(ns, f"p.apply(b, {{}}, transit_port=4789, wg=(wg, {ns['key']!r}))")
    run(ns, "p.remove()")
    assert ifindex(ns, WG) is None and ifindex(ns, VX) is None


def mtu(ns, dev: str) -> int:
    out = subprocess.run(["ip", "-n", ns["name"], "-j", "link", "show", dev], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)[0]["mtu"]


def test_without_a_record_the_sweep_removes_stray_wireguard_devices(ns):
    run(ns, f"p.apply(b, {{}}, transit_port=4789, wg=(wg, {ns['key']!r}))")
    subprocess.run(["ip", "-n", ns["name"], "link", "add", "bhwg-stray", "type", "wireguard"], check=True)
    for path in Path(ns["env"]["BULKHEAD_PLUMBING_DIR"]).glob("*.json"):
        path.unlink()  # a lost /run: no record
    run(ns, "p.remove()")  # no record, nobody else here: sweeps this netns
    assert ifindex(ns, WG) is None and ifindex(ns, "bhwg-stray") is None and ifindex(ns, VX) is None
    run(ns, f"p.apply(b, {{}}, transit_port=4789, wg=(wg, {ns['key']!r}))")
    subprocess.run(["ip", "-n", ns["name"], "link", "add", "bhwg-stray", "type", "wireguard"], check=True)
    run(ns, "from bulkhead.datapath.plumbing import remove_all; remove_all()")
    assert ifindex(ns, WG) is None and ifindex(ns, "bhwg-stray") is None and ifindex(ns, VX) is None


def test_transit_over_wireguard_carries_traffic_and_hides_vxlan(lab_dir):
    lab, agents, d = lab_dir
    keys, pubs = {}, {}
    for gw in ("gwa", "gwb"):
        keys[gw], pubs[gw] = keypair(d, gw)
    policy = d / "wg.yaml"
    policy.write_text(yaml.safe_dump(wireguard_policy(pubs, overlay=True), sort_keys=False))
    for gw in ("gwa", "gwb"):
        agents[gw] = AgentRunner(lab.gateway(gw), d / f"state-{gw}")
        agents[gw].start(policy, args=("--gateway", gw, "--metrics", "off", "--wireguard-key", keys[gw]))
    fab = Fabric(lab, agents, policy)
    vip = fab.vip("api.apps.example")
    cap = d / "under.txt"
    with open(cap, "w") as out:
        dump = lab.spawn("gwa", ["tcpdump", "-l", "-n", "-i", UNDER_IF, "udp"], stdout=out,
                         stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)  # tcpdump has no readiness signal; it needs a moment to attach
        r = fab.lab.tcp_echo("a-cli", vip, PORT, b"sealed")
        assert r.ok and r.reply == f"b-srv {host_addr('a-cli')}: sealed", r
        # full-size segments both ways (1400 bytes of payload and the reply's more), through the MTUs below
        big = bytes(range(65, 91)) * 54
        r = fab.lab.tcp_echo("a-cli", vip, PORT, big)
        assert r.ok and r.reply.endswith(big.decode()), r
        time.sleep(0.5)
    finally:
        dump.terminate()
        dump.wait(5)
    text = cap.read_text()
    assert f".{WG_PORT}:" in text, text
    assert ".4789:" not in text and "VXLAN" not in text, text
    # the underlay is 1600: WireGuard's device 1600 - 80, the VXLAN device inside it 1520 - 50 (IPv4 transit)
    links = {li["ifname"]: li["mtu"] for li in json.loads(subprocess.run(
        ["ip", "-n", lab.ns["gwa"], "-j", "link", "show"], capture_output=True, text=True, check=True).stdout)}
    assert sorted(v for k, v in links.items() if k.startswith(("bhwg-", "bhvx-"))) == [1470, 1520], links
    wg = agents["gwa"].status()["transit"]["wireguard"]
    assert wg["device"].startswith("bhwg-") and wg["listen_port"] == WG_PORT
    assert wg["peers"]["gwb"]["endpoint"] == f"{host_addr('gwb')}:{WG_PORT}"
    assert wg["peers"]["gwb"]["latest_handshake"] > 0
