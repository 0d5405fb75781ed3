"""Agent lifecycle: enforcement survives the agent, a restart reuses pins, `down` leaves nothing.

The tests in this module run in order on one agent: restart, then down,
then the plumbing on its own (no agent) including `down` without state.
"""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bulkhead.core.paths import REPO
from bulkhead.datapath import marks, plumbing
from bulkhead.datapath import libbpf, loader
from bulkhead.lab.runner import bulkhead_argv

pytestmark = [pytest.mark.root, pytest.mark.integration]

PAY4, CAT4 = "198.19.0.10", "198.19.0.20"
GW_IFS = ("bh-prod", "bh-dev", "bh-core")
RP = "/proc/sys/net/ipv4/conf/{}/rp_filter"


def pinned_map_ids(pin_dir: Path) -> dict[str, int]:
    ids = {}
    for p in sorted((pin_dir / "maps").iterdir()):
        fd = libbpf.obj_get(str(p))
        try:
            ids[p.name] = libbpf.map_info(fd).id
        finally:
            os.close(fd)
    return ids


def pinned_prog_ids(pin_dir: Path) -> dict[str, int]:
    ids = {}
    for name in loader.PINNED_PROGS:
        fd = libbpf.obj_get(str(pin_dir / name))
        try:
            ids[name] = libbpf.prog_info(fd).id
        finally:
            os.close(fd)
    return ids


def echo(sock, msg: bytes) -> bytes:
    sock.sendall(msg)
    got = b""
    while len(got) < len(msg):
        chunk = sock.recv(len(msg) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def leftovers(gateway, instance: str | None = None) -> list[str]:
    """Everything bulkhead could have left in the gateway; [] when clean."""
    found = []
    for ifname in GW_IFS:
        if gateway.xdp_attached(ifname):
            found.append(f"XDP on {ifname}")
        tc = gateway.gw("tc", "qdisc", "show", "dev", ifname) + gateway.gw("tc", "filter", "show", "dev", ifname, "ingress")
        if "clsact" in tc or "bulkhead_tc" in tc:
            found.append(f"TC on {ifname}: {tc.strip()}")
    if "bulkhead" in gateway.gw("nft", "list", "tables"):
        found.append("nft: " + gateway.gw("nft", "list", "tables"))
    for fam in ("-4", "-6"):
        for ln in gateway.gw("ip", fam, "rule").splitlines():
            if "proto 176" in ln or "0xb0000" in ln:
                found.append(f"ip {fam} rule {ln}")
        routes = gateway.gw("ip", fam, "route", "show", "table", "all", "proto", "176").strip()
        if routes:
            found.append(f"ip {fam} routes: {routes}")
    # what the gateway had before the agent: `down` restores it (forwarding may well be on)
    for path, want in gateway.found.items():
        if gateway.sysctl(path) != want:
            found.append(f"{path} = {gateway.sysctl(path)}")
    if instance:
        pin_dir = loader.PIN_ROOT / instance
        if pin_dir.exists():
            found.append(f"pins {pin_dir}")
        record = plumbing.RECORD_DIR / f"{gw_cookie(gateway)}-{instance}.json"
        if record.exists():
            found.append(f"record {record}")
    return found


def gw_cookie(gateway) -> str:
    """The gateway netns's name in plumbing records (other test runs have their own)."""
    return gateway.topo.run("gw", [sys.executable, "-c", "from bulkhead.datapath.plumbing import netns_cookie; "
                                   "print(netns_cookie())"], cwd=str(REPO)).stdout.strip()


def test_plumbing_in_place_while_running(gateway):
    R = gateway.rule
    gateway.apply(R("web", "payments"), R("laptops", "payments", "deny"))
    assert "bulkhead_" in gateway.gw("nft", "list", "tables")
    assert gateway.sysctl(plumbing.FWD_V4) == "1" and gateway.sysctl(plumbing.FWD_V6) == "1"
    assert all(gateway.sysctl(RP.format(i)) == "2" for i in GW_IFS)
    for fam in ("-4", "-6"):
        rules = [ln for ln in gateway.gw("ip", fam, "rule").splitlines() if "proto 176" in ln]
        # one per segment, and the L7 verifier's local delivery of steered packets
        assert len([r for r in rules if r.startswith("20000:")]) == 3, rules
        assert [r.split("\t", 1)[1] for r in rules if r.startswith("20001:")] == [
            "from all fwmark 0xc000000/0xff000000 lookup 201326592 proto 176"], rules
        assert "local default dev lo" in gateway.gw("ip", fam, "route", "show", "table", "201326592")
    for ifname in GW_IFS:
        assert "bulkhead_tc" in gateway.gw("tc", "filter", "show", "dev", ifname, "ingress")
    assert "tproxy" in gateway.gw("nft", "list", "ruleset")


def test_restart_keeps_enforcing_and_reuses_pins(gateway):
    R = gateway.rule
    topo, agent = gateway.topo, gateway.agent
    gen = gateway.apply(R("web", "payments"), R("laptops", "payments", "deny"))
    instance = gateway.agent.status()["instance"]
    pin_dir = loader.PIN_ROOT / instance
    ids_before = pinned_map_ids(pin_dir)
    probe, conn = topo.tcp("prod", PAY4, 8443, send=b"before\n", keep=True)
    assert probe.ok, probe
    try:
        assert agent.stop(signal.SIGTERM) == 0
        # Agent gone: XDP, pins and plumbing stay and keep enforcing.
        assert all(gateway.xdp_attached(i) for i in GW_IFS)
        assert pin_dir.exists()
        assert echo(conn, b"while-down\n") == b"while-down\n"
        assert topo.tcp("prod", PAY4, 8443, send=b"new\n").ok
        assert topo.tcp("dev", PAY4, 8443, timeout=gateway.DENY_TIMEOUT).result == "timeout"
        assert agent.cli("status").returncode != 0  # nobody on the socket

        # Start again on the same state dir, no `down` in between.
        progs_before = pinned_prog_ids(pin_dir)
        log_before = agent.log_path.read_text()
        policy = sorted(gateway.policy_dir.glob("policy-*.yaml"))[-1]
        new_gen = agent.start(policy)
        assert new_gen == gen + 1
        assert pinned_map_ids(pin_dir) == ids_before  # same maps, not new ones
        # The same build: the pinned programs are taken as they are, nothing is compiled.
        assert pinned_prog_ids(pin_dir) == progs_before
        started = agent.log_path.read_text()[len(log_before):]
        assert "reusing pinned programs (build " in started and "compiled and loaded" not in started, started
        assert echo(conn, b"after\n") == b"after\n"
        assert topo.tcp("dev", PAY4, 8443, timeout=gateway.DENY_TIMEOUT).result == "timeout"
        st = agent.status()
        assert st["generation"] == gen + 1
        assert st["datapath"]["compiled"] is False and st["datapath"]["build_id"]
        assert st["flow_log"]["running"] and not st["flow_log"]["error"]  # the pinned ring buffer, reopened
        assert {i["name"] for i in st["interfaces"]} == set(GW_IFS)
        assert gateway.apply(R("web", "payments")) == gen + 2
    finally:
        conn.close()


def test_upgrade_compiles_first_and_replaces_the_programs_without_a_gap(gateway):
    """Pins marked as another build's (what an upgraded bulkhead finds): the new agent compiles
    while the old programs keep enforcing, then swaps the program pins and attachments; the
    maps, and the flows in them, carry over."""
    R = gateway.rule
    topo, agent = gateway.topo, gateway.agent
    gen = gateway.generation()
    pin_dir = loader.PIN_ROOT / agent.status()["instance"]
    maps_before, progs_before = pinned_map_ids(pin_dir), pinned_prog_ids(pin_dir)
    probe, conn = topo.tcp("prod", PAY4, 8443, send=b"before\n", keep=True)
    assert probe.ok, probe
    try:
        assert agent.stop() == 0
        (mark,) = pin_dir.glob(loader.BUILD_MARK + "*")
        mark.rename(pin_dir / f"{loader.BUILD_MARK}0000000000000000")
        log_before = agent.log_path.read_text()
        agent.start(sorted(gateway.policy_dir.glob("policy-*.yaml"))[-1])
        started = agent.log_path.read_text()[len(log_before):]
        assert "compiling: the pinned programs can't be reused: they are another build's" in started, started
        assert "compiled and loaded" in started, started
        progs_after = pinned_prog_ids(pin_dir)
        assert all(progs_after[n] != progs_before[n] for n in progs_before), (progs_before, progs_after)
        after = pinned_map_ids(pin_dir)
        assert after.pop(loader.FLOW_EVENTS) != maps_before.pop(loader.FLOW_EVENTS)  # a compile makes a new ring
        assert after == maps_before
        assert [m.name for m in pin_dir.glob(loader.BUILD_MARK + "*")] == [mark.name]
        st = agent.status()
        assert st["datapath"]["compiled"] is True and st["generation"] == gen + 1
        attached = {m for i in GW_IFS for m in re.findall(r"prog/xdp id (\d+)", gateway.gw("ip", "-d", "link", "show", "dev", i))}
        assert attached == {str(progs_after[loader.XDP_PROG])}, attached
        assert echo(conn, b"after\n") == b"after\n"
        assert topo.tcp("dev", PAY4, 8443, timeout=gateway.DENY_TIMEOUT).result == "timeout"
        assert gateway.apply(R("web", "payments")) == gen + 2
    finally:
        conn.close()


def test_down_leaves_nothing(gateway):
    agent = gateway.agent
    instance = agent.status()["instance"]
    assert leftovers(gateway, None)  # sanity: there is something to remove
    p = agent.down()
    assert p.returncode == 0, p.stdout + p.stderr
    agent.stop()  # down asked it to exit; reap the process
    assert leftovers(gateway, instance) == []
    assert not (Path(agent.state_dir) / "bulkhead.sock").exists()
    # again: nothing to do, still fine
    assert agent.down().returncode == 0
    assert leftovers(gateway, instance) == []
    # and enforcement is really gone: the gateway forwards again exactly as it did before the
    # agent (nothing, or everything: no XDP is left to deny the flow bulkhead denied)
    forwarded = gateway.topo.tcp("prod", PAY4, 8443, timeout=gateway.DENY_TIMEOUT).result == "connected"
    assert forwarded == (gateway.found[plumbing.FWD_V4] == "1"), gateway.found


def _run_plumbing(gateway, code: str) -> subprocess.CompletedProcess:
    """Run `code` with the demo-like bundle as `b` and ifindexes as `idx`, in the gateway netns."""
    prelude = (
        "import sys, yaml\n"
        "from pyroute2 import IPRoute\n"
        "from bulkhead.datapath.plumbing import Plumbing, remove_all\n"
        "from bulkhead.policy import load_policy\n"
        "b, _ = load_policy([sys.argv[1]])\n"
        "with IPRoute() as ipr:\n"
        "    idx = {n: ipr.link_lookup(ifname=n)[0] for s in b.segments for n in s['interfaces']}\n"
    )
    policy = gateway.write(gateway.policy_yaml(gateway.rule("web", "payments")))
    return gateway.topo.run("gw", [sys.executable, "-c", prelude + code, str(policy)], check=False,
                            cwd=str(REPO))


def test_plumbing_apply_is_idempotent_and_follows_the_policy(gateway):
    def snapshot():
        return (gateway.gw("nft", "list", "table", "inet", "bulkhead_t_idem"),
                gateway.gw("ip", "rule"), gateway.gw("ip", "-6", "rule"),
                gateway.gw("ip", "route", "show", "table", "all", "proto", "176"),
                gateway.gw("ip", "-6", "route", "show", "table", "all", "proto", "176"))

    p = _run_plumbing(gateway, "Plumbing('t-idem').apply(b, idx)")
    assert p.returncode == 0, p.stderr
    first = snapshot()
    p = _run_plumbing(gateway, "Plumbing('t-idem').apply(b, idx)\nPlumbing('t-idem').apply(b, idx)")
    assert p.returncode == 0, p.stderr
    assert snapshot() == first
    assert "198.18.1.0/24 dev bh-dev table" in first[3]

    # Drop segment dev from the bundle: its rule, table and rp_filter go back.
    p = _run_plumbing(gateway, "b.segments = [s for s in b.segments if s['name'] != 'dev']\n"
                               "Plumbing('t-idem').apply(b, idx)")
    assert p.returncode == 0, p.stderr
    dev_mark = marks.segment_mark(gateway.SEG_ID["dev"])
    assert f"{dev_mark:#x}" not in gateway.gw("ip", "rule")
    assert "bh-dev" not in gateway.gw("ip", "route", "show", "table", "all", "proto", "176")
    assert gateway.sysctl(RP.format("bh-dev")) == gateway.found[RP.format("bh-dev")]
    assert gateway.sysctl(RP.format("bh-prod")) == "2"

    p = _run_plumbing(gateway, "Plumbing('t-idem').remove()\nPlumbing('t-idem').remove()")
    assert p.returncode == 0, p.stderr
    assert leftovers(gateway, "t-idem") == []


def test_down_without_state_removes_all_plumbing(gateway, tmp_path):
    """`bulkhead down` with an empty state dir still finds and removes bulkhead plumbing."""
    p = _run_plumbing(gateway, "Plumbing('t-orphan-a').apply(b, idx)\n")
    assert p.returncode == 0, p.stderr
    assert "bulkhead_t_orphan_a" in gateway.gw("nft", "list", "tables")
    empty = tmp_path / "empty-state"
    empty.mkdir()
    r = gateway.topo.run("gw", [*bulkhead_argv(), "down", "--state-dir", str(empty)], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert leftovers(gateway, "t-orphan-a") == []
