"""Transit between gateways (issue 15, part 1): apps reach apps behind another gateway, with
their identity carried across, attracted by DNS to a service address the client's gateway owns.

The lab (agent/lab/fabriclab.py): gateways gwa and gwb joined by an underlay bridge, each
running its own `bulkhead agent run --policy FILE --gateway NAME` of one policy:
- a-cli (web, 198.18.1.0/24 at gwa) resolves api.apps.example through gwa's DNS and connects to
  the service address; gwa translates it to api's real address (198.18.1.20, behind gwb: the
  client's own CIDR, on purpose), judges web -> api and sends it to gwb in VXLAN with api's segment
  in the VNI and web's app id in the GBP field; gwb judges it again by that identity and delivers
  it; the reply goes back the same way, and the client sees it come from the service address;
- the server sees the client's real address, and each gateway's flow log has both apps, the other
  gateway and (at gwa) the service address;
- b-cli (partner, at gwb) has no rule to api: NXDOMAIN, and connecting to the service address
  anyway (gwb owns the same ones) gets nothing;
- a-cli reaches a-srv (local, published, at gwa) by its service address: translated, not tunnelled;
- a forged VXLAN packet with web's app id from the underlay's rogue host (no gateway) is dropped
  and counted at gwb (transit_unknown_peer); one from gwa's address with an app id that is not
  behind gwa is dropped too (transit_bad_identity), and one to a segment that is not gwb's
  (transit_bad_segment);
- IPv4 and IPv6.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import yaml
from dnslib import RCODE, DNSRecord

from bulkhead.lab.fabriclab import TRANSIT_PORT, FabricLab, host_addr, reap_stale
from bulkhead.lab.fabriclab import transit_policy as lab_policy
from bulkhead.lab.runner import AgentRunner

pytestmark = [pytest.mark.root, pytest.mark.integration]

PORT = 8080
DNS_A = ("198.18.1.1", "fd00:1::1")
DNS_B = ("198.19.9.1", "fd00:99::1")


def transit_policy() -> dict:
    return lab_policy(
        segments=[
            {"name": "a-cli", "gateway": "gwa", "interfaces": ["bh-cli"], "dns": list(DNS_A)},
            {"name": "a-srv", "gateway": "gwa", "interfaces": ["bh-srv"]},
            {"name": "b-srv", "gateway": "gwb", "interfaces": ["bh-srv"]},
            {"name": "b-cli", "gateway": "gwb", "interfaces": ["bh-cli"], "dns": list(DNS_B)},
        ],
        apps=[
            {"name": "web", "segment": "a-cli", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
            {"name": "local", "segment": "a-srv", "addresses": ["198.19.0.10/32", "fd00:19::10/128"],
             "ports": [f"tcp/{PORT}"], "publish": ["local.apps.example"]},
            {"name": "api", "segment": "b-srv", "addresses": ["198.18.1.20/32", "fd00:1::20/128"],
             "ports": [f"tcp/{PORT}"], "publish": ["api.apps.example"]},
            {"name": "partner", "segment": "b-cli", "addresses": ["198.19.9.0/24", "fd00:99::/64"]},
        ],
        rules=[
            {"name": "web-api", "from": "web", "to": "api", "ports": [f"tcp/{PORT}"]},
            {"name": "web-local", "from": "web", "to": "local", "ports": [f"tcp/{PORT}"]},
        ],
    )


class Fabric:
    def __init__(self, lab: FabricLab, agents: dict[str, AgentRunner], policy: Path):
        self.lab, self.agents, self.policy = lab, agents, policy

    def resolve(self, role: str, server: str, name: str, qtype: str = "A") -> DNSRecord:
        s = self.lab.socket(role, socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            s.sendto(DNSRecord.question(name, qtype).pack(), (server, 53))
            return DNSRecord.parse(s.recv(4096))
        finally:
            s.close()

    def vip(self, name: str, family: int = 4) -> str:
        ans = self.resolve("a-cli", DNS_A[0], name, "A" if family == 4 else "AAAA")
        assert ans.header.rcode == RCODE.NOERROR, ans
        return str(ans.rr[0].rdata)

    def counters(self, gw: str) -> dict[str, int]:
        return self.agents[gw].counters()

    def events(self, gw: str) -> dict[str, int]:
        return self.agents[gw].status().get("events", {})

    def flows(self, gw: str) -> list[dict]:
        """The flow log's events at `gw` (`bulkhead flows --json`: one JSON object per line), all it kept."""
        p = self.agents[gw].cli("flows", "--json", "--limit", "0")
        assert p.returncode == 0, p.stderr
        return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def fabric(tmp_path_factory):
    reap_stale()
    lab = FabricLab()
    d = tmp_path_factory.mktemp("transit")
    agents: dict[str, AgentRunner] = {}
    try:
        lab.create()
        policy = d / "transit.yaml"
        policy.write_text(yaml.safe_dump(transit_policy(), sort_keys=False))
        for role in ("b-srv", "a-srv"):
            lab.serve_echo(role, PORT)
        for gw in ("gwa", "gwb"):
            agents[gw] = AgentRunner(lab.gateway(gw), d / f"state-{gw}")
            agents[gw].start(policy, args=("--gateway", gw, "--metrics", "off"))
        yield Fabric(lab, agents, policy)
    finally:
        for a in agents.values():
            a.cleanup()
        lab.destroy()


@pytest.mark.parametrize("family", [4, 6])
def test_client_reaches_app_behind_other_gateway_by_its_service_address(fabric, family):
    vip = fabric.vip("api.apps.example", family)
    assert vip.startswith("198.19.255." if family == 4 else "fd00:ff::")
    before_a, before_b = fabric.events("gwa"), fabric.events("gwb")
    r = fabric.lab.tcp_echo("a-cli", vip, PORT, b"across")
    assert r.ok, r
    # the server is api behind gwb, and saw the client's own (overlapping) address
    assert r.reply == f"b-srv {host_addr('a-cli', family)}: across", r.reply
    after_a, after_b = fabric.events("gwa"), fabric.events("gwb")
    assert after_a.get("transit_encap", 0) > before_a.get("transit_encap", 0)
    assert after_a.get("transit_decap", 0) > before_a.get("transit_decap", 0)  # the replies
    assert after_b.get("transit_decap", 0) > before_b.get("transit_decap", 0)
    assert after_b.get("transit_encap", 0) > before_b.get("transit_encap", 0)
    assert after_a.get("vip_nat", 0) > before_a.get("vip_nat", 0)


def test_many_connections_across(fabric):
    vip = fabric.vip("api.apps.example")
    for i in range(20):
        r = fabric.lab.tcp_echo("a-cli", vip, PORT, f"n{i}".encode())
        assert r.ok and r.reply.endswith(f": n{i}"), (i, r)


def test_local_published_app_is_translated_not_tunnelled(fabric):
    vip = fabric.vip("local.apps.example")
    before = fabric.events("gwa").get("transit_encap", 0)
    r = fabric.lab.tcp_echo("a-cli", vip, PORT, b"near")
    assert r.ok and r.reply == f"a-srv {host_addr('a-cli')}: near", r
    assert fabric.events("gwa").get("transit_encap", 0) == before


def test_segment_without_a_rule_gets_nxdomain_and_nothing(fabric):
    ans = fabric.resolve("b-cli", DNS_B[0], "api.apps.example")
    assert ans.header.rcode == RCODE.NXDOMAIN
    vip = fabric.vip("api.apps.example")
    r = fabric.lab.tcp_echo("b-cli", vip, PORT, b"sneak", timeout=1.0)
    assert not r.ok, r


def test_wrong_port_across_is_denied_at_the_clients_gateway(fabric):
    vip = fabric.vip("api.apps.example")
    before = fabric.events("gwa").get("transit_encap", 0)
    r = fabric.lab.tcp_echo("a-cli", vip, PORT + 1, b"x", timeout=1.0)
    assert not r.ok
    assert fabric.events("gwa").get("transit_encap", 0) == before


def _app_id(fabric: Fabric, name: str) -> int:
    return [a["name"] for a in transit_policy()["apps"]].index(name) + 1


def _seg_id(name: str) -> int:
    return [s["name"] for s in transit_policy()["segments"]].index(name) + 1


def _forge(fabric: Fabric, role: str, src: str, vni: int, gbp: int, sport: int) -> None:
    """A VXLAN-GBP packet to gwb's transit address, sent from `role` with outer source `src`:
    a TCP SYN from a-cli's address to api's, carrying app id `gbp` into segment `vni`."""
    fabric.lab.forge_transit(role, src, "gwb", vni, gbp, PORT, TRANSIT_PORT, sport=sport)


def _wait_counter(fabric: Fabric, gw: str, name: str, above: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = fabric.counters(gw).get(name, 0)
        if n > above or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def test_forged_transit_from_no_gateway_is_dropped_and_counted(fabric):
    """rogue (198.18.100.66) sends web's identity into api's segment: not a gateway's address."""
    web, seg = _app_id(fabric, "web"), _seg_id("b-srv")
    before = fabric.counters("gwb").get("transit_unknown_peer", 0)
    _forge(fabric, "rogue", host_addr("rogue"), seg, web, 41001)
    assert _wait_counter(fabric, "gwb", "transit_unknown_peer", before) >= before + 3


def test_forged_identity_not_behind_the_sender_is_dropped(fabric):
    """From gwa's own address, but carrying partner's id (an app behind gwb, not gwa)."""
    before = fabric.counters("gwb").get("transit_bad_identity", 0)
    _forge(fabric, "rogue", host_addr("gwa"), _seg_id("b-srv"), _app_id(fabric, "partner"), 41002)
    assert _wait_counter(fabric, "gwb", "transit_bad_identity", before) >= before + 3


def test_transit_into_a_segment_of_another_gateway_is_dropped(fabric):
    before = fabric.counters("gwb").get("transit_bad_segment", 0)
    _forge(fabric, "rogue", host_addr("gwa"), _seg_id("a-srv"), _app_id(fabric, "web"), 41003)
    assert _wait_counter(fabric, "gwb", "transit_bad_segment", before) >= before + 3


def test_status_shows_the_transit(fabric):
    for gw, me, peer in (("gwa", "gwa", "gwb"), ("gwb", "gwb", "gwa")):
        t = fabric.agents[gw].status()["transit"]
        assert t["gateway"] == me
        assert t["address"] == host_addr(me)
        assert t["port"] == TRANSIT_PORT
        assert t["peers"][peer] == host_addr(peer)


def _wait_flow(fabric: Fabric, gw: str, match, timeout: float = 5.0, n: int = 1) -> list[dict]:
    """The events at `gw` that `match`, once there are `n` (the agent reads the ring buffer as
    events come: normally at once), or those there are at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in fabric.flows(gw) if match(e)]
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.parametrize("family", [4, 6])
def test_flow_log_at_both_gateways_names_the_apps_the_other_gateway_and_the_service_address(fabric, family):
    """One connection from a fixed source port, so its events are told from the other tests':
    at gwa web -> api via gwb, dialed at the service address (translated to api's real address);
    at gwb the same flow from web (its identity carried) via gwa, on the client's segment a-cli."""
    vip = fabric.vip("api.apps.example", family)
    client, real, sport = host_addr("a-cli", family), host_addr("b-srv", family), 45150 + family
    r = fabric.lab.tcp_echo("a-cli", vip, PORT, b"logged", src=(client, sport))
    assert r.ok and r.reply == f"b-srv {client}: logged", r

    def ours(e: dict) -> bool:
        return e["kind"] == "new" and e["src"] == client and e["sport"] == sport and e["dport"] == PORT

    at_a = _wait_flow(fabric, "gwa", ours)
    assert at_a, "no new flow event at gwa"
    e = at_a[-1]
    assert (e["src_app"], e["dst_app"], e["rule"], e["verdict"]) == ("web", "api", "web-api", "pass"), e
    assert (e["segment"], e["peer_segment"], e["via"]) == ("a-cli", "b-srv", "gwb"), e
    assert (e["dst"], e["vip"], e["real"]) == (vip, vip, real), e

    at_b = _wait_flow(fabric, "gwb", ours)
    assert at_b, "no new flow event at gwb"
    e = at_b[-1]
    assert (e["src_app"], e["dst_app"], e["rule"], e["verdict"]) == ("web", "api", "web-api", "pass"), e
    assert (e["segment"], e["peer_segment"], e["via"]) == ("a-cli", "b-srv", "gwa"), e
    assert (e["dst"], e["vip"], e["real"]) == (real, vip, real), e  # gwa said so in the VNI

    # the text view says the same
    p = fabric.agents["gwa"].cli("flows")
    assert p.returncode == 0, p.stderr
    server = f"{vip}:{PORT}" if family == 4 else f"[{vip}]:{PORT}"
    assert f"-> {server} (api {real}) via gwb" in p.stdout, p.stdout


def test_an_established_flow_across_survives_both_agents_restarting(fabric):
    """Enforcement lives in the kernel: a connection opened through both gateways keeps working
    while both agents are stopped and started again (pins, flow entries, the transit device kept;
    the device is not made again)."""
    vip = fabric.vip("api.apps.example")
    before = {gw: fabric.agents[gw].status()["transit"]["ifindex"] for gw in ("gwa", "gwb")}
    s = fabric.lab.socket("a-cli", socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((vip, PORT))  # handshake through both gateways; the server waits for data
        for gw in ("gwa", "gwb"):
            fabric.agents[gw].stop()
        s.sendall(b"while-down")  # no agent anywhere: the kernel alone carries it
        assert s.recv(4096) == f"b-srv {host_addr('a-cli')}: while-down".encode()
    finally:
        s.close()
    for gw in ("gwa", "gwb"):
        fabric.agents[gw].start(fabric.policy, args=("--gateway", gw, "--metrics", "off"))
    assert {gw: fabric.agents[gw].status()["transit"]["ifindex"] for gw in ("gwa", "gwb")} == before
    r = fabric.lab.tcp_echo("a-cli", vip, PORT, b"after")
    assert r.ok and r.reply == f"b-srv {host_addr('a-cli')}: after", r
