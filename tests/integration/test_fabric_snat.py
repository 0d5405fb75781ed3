"""Source translation at the far gateway (docs/fabric.md "Source translation at the far gateway").

The fabric lab, with b-srv made a host of a VPC whose subnet is the client's own CIDR:
198.18.1.20/24 and fd00:1::20/64 on-link, where the lab gives it a /32 (and /128) and a default
route through gwb. Without translation its answers to a-cli (198.18.1.10, fd00:1::10) stay on its
own link, where nobody has that address: the connection never completes. With `transit_snat` on
b-srv's segment, gwb gives flows from other gateways the segment's own address (its bh-srv
198.18.1.1 / fd00:1::1) and a port it claims, and turns the replies back before they cross:
- the server sees the gateway's address, a-cli its answer as before, and gwb's flow log says
  from which address and port it entered;
- two clients at gwa with the same source port (two addresses of a-cli) reach api at once: they
  leave gwb with distinct ports, the first keeping its own;
- the far gateway still judges by the identity carried (web), never by the address it rewrote.
"""
from __future__ import annotations

import socket

import pytest
import yaml

from bulkhead.lab.fabriclab import FabricLab, host_addr, reap_stale
from bulkhead.lab.runner import AgentRunner
from test_fabric_transit import PORT, Fabric, _wait_flow, transit_policy

pytestmark = [pytest.mark.root, pytest.mark.integration]

SNAT = ("198.18.1.1", "fd00:1::1")  # gwb's addresses on bh-srv, b-srv's segment
SECOND_CLIENT = "198.18.1.11"  # another address of a-cli (web), for two clients on one port


def snat_policy() -> dict:
    p = transit_policy()
    for s in p["segments"]:
        if s["name"] == "b-srv":
            s["transit_snat"] = list(SNAT)
    return p


@pytest.fixture(scope="module")
def fabric(tmp_path_factory):
    reap_stale()
    lab = FabricLab()
    d = tmp_path_factory.mktemp("snat")
    agents: dict[str, AgentRunner] = {}
    try:
        lab.create()
        # b-srv as a VPC host: the client's CIDR is its own link
        for old, new in (("198.18.1.20/32", "198.18.1.20/24"), ("fd00:1::20/128", "fd00:1::20/64")):
            lab.run("b-srv", ["ip", "addr", "del", old, "dev", "eth0"])
            lab.run("b-srv", ["ip", "addr", "add", new, "dev", "eth0", *(["nodad"] if ":" in new else [])])
        lab.run("a-cli", ["ip", "addr", "add", f"{SECOND_CLIENT}/24", "dev", "eth0"])
        plain, snat = d / "plain.yaml", d / "snat.yaml"
        plain.write_text(yaml.safe_dump(transit_policy(), sort_keys=False))
        snat.write_text(yaml.safe_dump(snat_policy(), sort_keys=False))
        lab.serve_echo("b-srv", PORT)
        for gw in ("gwa", "gwb"):
            agents[gw] = AgentRunner(lab.gateway(gw), d / f"state-{gw}")
            agents[gw].start(plain, args=("--gateway", gw, "--metrics", "off"))
        f = Fabric(lab, agents, plain)
        f.snat_policy = snat
        yield f
    finally:
        for a in agents.values():
            a.cleanup()
        lab.destroy()


def apply_everywhere(fabric: Fabric, policy) -> None:
    for gw in ("gwa", "gwb"):
        r = fabric.agents[gw].cli("policy", "apply", str(policy))
        assert r.returncode == 0, r.stdout + r.stderr
    fabric.policy = policy


def connect(fabric: Fabric, vip: str, src: str | None = None, sport: int = 0) -> socket.socket:
    s = fabric.lab.socket("a-cli", socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    if src is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((src, sport))
    s.connect((vip, PORT))
    return s


def test_without_translation_the_on_link_server_answers_past_the_gateway(fabric):
    """The control: what transit_snat is for. The SYN gets through both gateways, the SYN-ACK stays
    on b-srv's link (it looks for 198.18.1.10 there), so the client gets no answer."""
    vip = fabric.vip("api.apps.example")
    r = fabric.lab.tcp_echo("a-cli", vip, PORT, b"lost", timeout=1.5)
    assert not r.ok and r.result == "timeout", r


@pytest.mark.parametrize("family", [4, 6])
def test_with_transit_snat_the_server_sees_the_gateway_and_the_client_its_answer(fabric, family):
    apply_everywhere(fabric, fabric.snat_policy)
    vip = fabric.vip("api.apps.example", family)
    client, sport = host_addr("a-cli", family), 46100 + family
    s = connect(fabric, vip, client, sport)
    try:
        s.sendall(b"translated")
        assert s.recv(4096).decode() == f"b-srv {SNAT[family == 6]}: translated"
    finally:
        s.close()

    def ours(e: dict) -> bool:
        return e["kind"] == "new" and e["src"] == client and e["sport"] == sport

    at_b = _wait_flow(fabric, "gwb", ours)
    assert at_b, "no new flow event at gwb"
    e = at_b[-1]
    # judged by the identity carried, and the translation named: its own port was free
    assert (e["src_app"], e["dst_app"], e["rule"], e["verdict"], e["via"]) == ("web", "api", "web-api", "pass",
                                                                              "gwa"), e
    addr = SNAT[0] if family == 4 else f"[{SNAT[1]}]"
    assert e["snat"] == f"{addr}:{sport}", e
    at_a = _wait_flow(fabric, "gwa", ours)
    assert at_a and at_a[-1]["snat"] is None, at_a  # the client's gateway translates no source
    p = fabric.agents["gwb"].cli("flows")
    assert p.returncode == 0 and f"from {addr}:{sport}" in p.stdout, p.stdout


def test_two_clients_on_one_port_leave_with_distinct_ports(fabric):
    apply_everywhere(fabric, fabric.snat_policy)
    vip = fabric.vip("api.apps.example")
    sport = 46200
    clients = (host_addr("a-cli"), SECOND_CLIENT)
    socks = [connect(fabric, vip, c, sport) for c in clients]  # both established at once
    try:
        for i, s in enumerate(socks):
            s.sendall(f"c{i}".encode())
        assert [s.recv(4096).decode() for s in socks] == [f"b-srv {SNAT[0]}: c{i}" for i in range(2)]
    finally:
        for s in socks:
            s.close()
    at_b = _wait_flow(fabric, "gwb", lambda e: e["kind"] == "new" and e["sport"] == sport and e["src"] in clients,
                      n=2)
    ports = {e["src"]: int(e["snat"].rsplit(":", 1)[1]) for e in at_b}
    assert set(ports) == set(clients), at_b
    assert ports[clients[0]] == sport  # the first keeps its own port
    assert ports[clients[1]] != sport and 32768 <= ports[clients[1]] <= 60999, ports
    counters = fabric.counters("gwb")
    assert counters.get("transit_snat_full", 0) == 0 and counters.get("transit_snat_lost", 0) == 0


def test_an_address_not_on_the_segment_fails_the_apply_and_the_running_policy_stays(fabric, tmp_path):
    apply_everywhere(fabric, fabric.snat_policy)
    p = snat_policy()
    for s in p["segments"]:
        if s["name"] == "b-srv":
            s["transit_snat"] = ["198.18.1.254"]  # no interface of gwb has it
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(p, sort_keys=False))
    r = fabric.agents["gwb"].cli("policy", "apply", str(bad))
    assert r.returncode != 0
    assert "segment b-srv: transit_snat 198.18.1.254 is on none of its interfaces (bh-srv)" in r.stdout + r.stderr
    vip = fabric.vip("api.apps.example")
    assert fabric.lab.tcp_echo("a-cli", vip, PORT, b"kept").reply == f"b-srv {SNAT[0]}: kept"


def test_a_policy_without_it_stops_translating(fabric):
    apply_everywhere(fabric, fabric.snat_policy)
    vip = fabric.vip("api.apps.example")
    assert fabric.lab.tcp_echo("a-cli", vip, PORT, b"on").reply == f"b-srv {SNAT[0]}: on"
    apply_everywhere(fabric, fabric.policy.with_name("plain.yaml"))
    r = fabric.lab.tcp_echo("a-cli", vip, PORT, b"off", timeout=1.5)
    assert not r.ok and r.result == "timeout", r
