"""Transit between gateways with the policy from the fleet (issue 15 with issue 14), real traffic.

The fabric lab (agent/lab/fabriclab.py: gwa and gwb on an underlay, a-cli behind gwa, b-srv
behind gwb, b-cli behind gwb) plus etcd in a namespace of its own, joined to each gateway by a
/30 veth (as agent/lab/fleetlab.py does), so stopping etcd cuts both gateways off at once. Both
agents run `agent run --etcd URL --gateway gwa|gwb --trust FILE.pub`; the operator's CLI
(`bulkhead fleet keygen|publish|status`) runs in the etcd namespace. One signed publish of the
lab's transit policy, then, in order:

- both gateways acknowledge the revision, each bundle has its own transit entry (status);
- a-cli resolves api.apps.example at gwa and reaches api behind gwb across the transit, and
  gwb's flow log names the client's app (web, carried in the GBP id) and gwa;
- HTTP requests across are timed per hop at gwa, whose agent publishes the histograms to etcd:
  `bulkhead fleet latency` shows the app pair with every part;
- etcd stopped (its process gone): both agents say they are stale and disconnected, and still
  a connection opened before carries data, a new connection across works, b-cli (no rule to
  api) gets nothing, and a forged transit packet carrying an identity not behind its sender is
  dropped at gwb;
- etcd still away, gwa's agent restarted: it starts from its cached bundle (stale), with its own
  transit entry, and transit works.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from dnslib import RCODE

from bulkhead.core.paths import REPO
from bulkhead.lab.etcd import EtcdServer
from bulkhead.lab.fabriclab import GATEWAYS, TRANSIT_PORT, FabricLab, host_addr, reap_stale
from bulkhead.lab.runner import AgentRunner, bulkhead_argv
from bulkhead.lab.topology import NETNS_DIR, wait_for
# The transit test's policy (web at gwa may reach api at gwb; partner at gwb has no rule) and helpers.
from test_fabric_transit import DNS_B, PORT, Fabric, _app_id, _seg_id, _wait_counter, _wait_flow, transit_policy

pytestmark = [pytest.mark.root, pytest.mark.integration]

ETCD_V4 = "198.18.250.1"  # on the etcd namespace's lo; gateway i reaches it via 198.18.(210+i).1
LINK_IF = "bh-fleet"  # in each gateway namespace: not a segment's interface, never attached
TTL = 3  # BULKHEAD_FLEET_TTL: the agents' lease, so how soon they notice etcd is gone
WAIT = 30
API = "api.apps.example"




class FabricFleet:
    """The fabric lab, etcd in namespace `etcd_ns`, the key, an agent per gateway."""

    def __init__(self, base: Path):
        self.lab = FabricLab()
        self.base = base
        self.etcd_ns = f"{self.lab.prefix}-etcd"
        self.etcd = EtcdServer(name="bhfabfleet", client_addr=ETCD_V4, netns=self.etcd_ns)
        self.agents = {gw: AgentRunner(self.lab.gateway(gw), base / f"state-{gw}") for gw in GATEWAYS}
        self.key = base / "keys" / "fleet.key"
        self.policy = base / "transit.yaml"
        self.fabric = Fabric(self.lab, self.agents, self.policy)  # vip(), resolve(), flows()

    def create(self) -> None:
        self.lab.create()
        ip = self.lab._ip
        ip("netns", "add", self.etcd_ns)
        ip("-n", self.etcd_ns, "link", "set", "lo", "up")
        ip("-n", self.etcd_ns, "addr", "add", f"{ETCD_V4}/32", "dev", "lo")
        for i, gw in enumerate(GATEWAYS):
            net, gns = f"198.18.{210 + i}", self.lab.ns[gw]
            ip("-n", self.etcd_ns, "link", "add", f"fl{i}", "type", "veth", "peer", "name", LINK_IF, "netns", gns)
            ip("-n", self.etcd_ns, "addr", "add", f"{net}.1/30", "dev", f"fl{i}")
            ip("-n", gns, "addr", "add", f"{net}.2/30", "dev", LINK_IF)
            ip("-n", self.etcd_ns, "link", "set", f"fl{i}", "up")
            ip("-n", gns, "link", "set", LINK_IF, "up")
            ip("-n", gns, "route", "add", f"{ETCD_V4}/32", "via", f"{net}.1")
        self.etcd.start(self.base / "etcd")

    def destroy(self) -> None:
        """Agents down, etcd stopped and its data dir removed, every namespace deleted. Never raises."""
        for a in self.agents.values():
            a.cleanup()
        try:
            self.etcd.stop()
        except Exception:
            pass
        shutil.rmtree(self.base / "etcd", ignore_errors=True)
        self.lab.destroy()
        if (NETNS_DIR / self.etcd_ns).exists():
            subprocess.run(["ip", "netns", "del", self.etcd_ns], capture_output=True)

    def start_agent(self, gw: str) -> int:
        """`agent run --etcd URL --gateway GW --trust KEY.pub` in gw's namespace, until it is ready."""
        return self.agents[gw].start_fleet(self.etcd.url, gw, f"{self.key}.pub", args=("--metrics", "off"),
                                           env={"BULKHEAD_FLEET_TTL": str(TTL),
                                                "BULKHEAD_FLEET_LATENCY_INTERVAL": "1"})

    # ------------------------------------------------------------ the operator's CLI
    def fleet(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [*bulkhead_argv(), "fleet", *args]
        if args[0] != "keygen":
            argv += ["--etcd", self.etcd.url]
        return subprocess.run(["nsenter", f"--net={NETNS_DIR / self.etcd_ns}", *argv], capture_output=True,
                              text=True, timeout=timeout, cwd=str(REPO))

    def publish(self) -> int:
        p = self.fleet("publish", str(self.policy), "--key", str(self.key))
        assert p.returncode == 0 and p.stdout.startswith("revision "), p.stdout + p.stderr
        return int(p.stdout.split()[1])

    def gateways(self) -> dict[str, dict]:
        p = self.fleet("status", "--json")
        assert p.returncode == 0, p.stdout + p.stderr
        return {g["name"]: g for g in json.loads(p.stdout)["gateways"]}


def reap_stale_etcd_ns() -> None:
    """The etcd namespaces of runs whose process is gone (reap_stale() takes the lab's own)."""
    for p in sorted(NETNS_DIR.iterdir()) if NETNS_DIR.exists() else []:
        m = re.match(r"^bhfab(\d+)x\d+-etcd$", p.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", p.name], capture_output=True)


@pytest.fixture(scope="module")
def ff():
    reap_stale()
    reap_stale_etcd_ns()
    base = Path(tempfile.mkdtemp(prefix="bulkhead-fabfleet-"))
    f = FabricFleet(base)
    try:
        f.create()
        f.key.parent.mkdir(mode=0o700)
        p = f.fleet("keygen", "--key", str(f.key))
        assert p.returncode == 0, p.stdout + p.stderr
        f.policy.write_text(yaml.safe_dump(transit_policy(), sort_keys=False))
        for role in ("b-srv", "a-srv"):
            f.lab.serve_echo(role, PORT)
        f.rev = f.publish()
        yield f
    finally:
        f.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_both_gateways_follow_the_fleet_and_acknowledge(ff):
    # Both at once: each start is mostly bcc's compile, and they share nothing but etcd.
    with ThreadPoolExecutor(len(GATEWAYS)) as pool:
        for started in [pool.submit(ff.start_agent, gw) for gw in GATEWAYS]:
            started.result()
    p = ff.fleet("status", "--wait", str(ff.rev), "--timeout", str(WAIT), timeout=WAIT + 30)
    assert p.returncode == 0, p.stdout + p.stderr
    gws = ff.gateways()
    for gw in GATEWAYS:
        g = gws[gw]
        assert (g["alive"], g["applied_revision"], g["stale"], g["error"]) == (True, ff.rev, False, None), g
    for gw, peer in (("gwa", "gwb"), ("gwb", "gwa")):
        st = ff.agents[gw].status()
        assert (st["fleet"]["gateway"], st["fleet"]["revision"]) == (gw, ff.rev), st["fleet"]
        t = st["transit"]
        assert (t["gateway"], t["address"], t["peers"][peer]) == (gw, host_addr(gw), host_addr(peer)), t


def test_client_reaches_the_app_behind_the_other_gateway_with_its_identity(ff):
    vip = ff.fabric.vip(API)
    client, real, sport = host_addr("a-cli"), host_addr("b-srv"), 45201
    r = ff.lab.tcp_echo("a-cli", vip, PORT, b"fleet", src=(client, sport))
    assert r.ok and r.reply == f"b-srv {client}: fleet", r

    def ours(e: dict) -> bool:
        return e["kind"] == "new" and e["src"] == client and e["sport"] == sport and e["dport"] == PORT

    at_b = _wait_flow(ff.fabric, "gwb", ours)
    assert at_b, "no new flow event at gwb"
    e = at_b[-1]
    assert (e["src_app"], e["dst_app"], e["rule"], e["verdict"]) == ("web", "api", "web-api", "pass"), e
    assert (e["segment"], e["peer_segment"], e["via"], e["dst"], e["vip"]) == ("a-cli", "b-srv", "gwa", real, vip), e


def test_fleet_latency_shows_the_requests_timed_per_hop_across_the_fleet(ff):
    """HTTP requests from a-cli to api (behind gwb): gwa times them per hop and its agent publishes
    the histograms to etcd; `bulkhead fleet latency` (the operator's CLI) shows the app pair."""
    vip, n = ff.fabric.vip(API), 3
    for i in range(n):
        r = ff.lab.tcp_echo("a-cli", vip, PORT, f"GET /r{i} HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert r.ok and r.reply.startswith("b-srv "), r

    def latency() -> dict | None:
        p = ff.fleet("latency", "--json")
        assert p.returncode == 0, p.stdout + p.stderr
        out = json.loads(p.stdout)
        rows = {(x["src_app"], x["dst_app"], x["mode"], x["hop"]): x for x in out["latency"]}
        total = rows.get(("web", "api", "http", "total"))
        return out if total and total["count"] >= n else None

    out = wait_for(latency, WAIT, 0.5)
    assert out, ff.fleet("latency", "--json").stdout
    gws = {g["name"]: g for g in out["gateways"]}
    assert gws["gwa"]["used"] and gws["gwa"]["requests"] >= n, gws  # counted at the client's gateway
    assert gws.get("gwb", {"requests": 0})["requests"] == 0, gws
    hops = {x["hop"]: x for x in out["latency"] if (x["src_app"], x["dst_app"], x["mode"]) == ("web", "api", "http")}
    assert set(hops) == {"total", "ingress", "backbone", "app_vpc", "app"}, hops
    assert all(h["p50_ms"] is not None and h["p50_ms"] >= 0 for h in hops.values()), hops
    text = ff.fleet("latency").stdout
    assert any(ln.split()[:3] == ["web", "api", "http"] for ln in text.splitlines()), text


def test_etcd_away_the_transit_keeps_enforcing_the_last_policy(ff):
    vip = ff.fabric.vip(API)
    est = ff.lab.socket("a-cli", socket.AF_INET, socket.SOCK_STREAM)
    est.settimeout(5)
    try:
        est.connect((vip, PORT))  # established through both gateways; the server waits for data
        pid = ff.etcd.proc.pid
        ff.etcd.stop()
        assert not ff.etcd.running() and not Path(f"/proc/{pid}").exists(), "etcd still runs"
        down = wait_for(lambda: all(st["stale"] and not st["connected"]
                                    for st in (ff.agents[gw].status()["fleet"] for gw in GATEWAYS)), WAIT, 0.1)
        assert down, {gw: ff.agents[gw].status()["fleet"] for gw in GATEWAYS}
        est.sendall(b"established")
        assert est.recv(4096) == f"b-srv {host_addr('a-cli')}: established".encode()
    finally:
        est.close()
    for gw in GATEWAYS:
        assert ff.agents[gw].running(), ff.agents[gw].log()
        assert ff.agents[gw].status()["fleet"]["revision"] == ff.rev
    assert ff.fabric.vip(API) == vip  # gwa still answers DNS from the last bundle
    r = ff.lab.tcp_echo("a-cli", vip, PORT, b"new")
    assert r.ok and r.reply == f"b-srv {host_addr('a-cli')}: new", r
    # partner (b-cli) has no rule to api: no name, and the service address gets nothing
    assert ff.fabric.resolve("b-cli", DNS_B[0], API).header.rcode == RCODE.NXDOMAIN
    r = ff.lab.tcp_echo("b-cli", vip, PORT, b"sneak", timeout=1.0)
    assert not r.ok, r
    # a forged transit packet (gwa's address, partner's id: not an app behind gwa) is still dropped
    before = ff.fabric.counters("gwb").get("transit_bad_identity", 0)
    ff.lab.forge_transit("rogue", host_addr("gwa"), "gwb", _seg_id("b-srv"), _app_id(ff.fabric, "partner"), PORT,
                         TRANSIT_PORT, sport=41201)
    assert _wait_counter(ff.fabric, "gwb", "transit_bad_identity", before) >= before + 3


def test_etcd_away_a_restarted_gateway_takes_up_the_transit_from_its_cache(ff):
    """gwa's agent restarted while etcd is away starts from its state dir's verified copy (stale):
    the bundle still has gwa's own transit entry, so transit across works as before."""
    a = ff.agents["gwa"]
    a.stop()
    ff.start_agent("gwa")
    st = a.status()
    assert (st["fleet"]["revision"], st["fleet"]["stale"], st["fleet"]["connected"]) == (ff.rev, True, False), st
    assert (st["transit"]["gateway"], st["transit"]["peers"]["gwb"]) == ("gwa", host_addr("gwb")), st["transit"]
    r = ff.lab.tcp_echo("a-cli", ff.fabric.vip(API), PORT, b"cached")
    assert r.ok and r.reply == f"b-srv {host_addr('a-cli')}: cached", r
