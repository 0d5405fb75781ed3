"""The gateway's DNS (issue 15, part 2): published names resolve to service addresses, per segment.

Real queries from the client namespaces to the gateway's own address (198.18.1.1, on both
bh-prod and bh-dev: the two client segments overlap), over UDP and TCP, through the XDP
program (a segment's `dns:` is a destination its apps may query, udp/53 and tcp/53):
- prod may reach payments (rule web -> payments): A and AAAA give payments' service addresses;
- dev may not: NXDOMAIN for the same name, through the same address;
- a published wildcard covers one label; a name outside the fabric is REFUSED with no upstream,
  and forwarded to `upstream_dns` with one (a dnslib server on the gateway's loopback);
- service addresses stay when an unrelated app is added before them;
- a `dns:` address the gateway doesn't have fails the apply, and the old policy keeps answering;
- a policy without `fabric:` closes the listeners.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import sys
import textwrap

import pytest
import yaml
from dnslib import RCODE, DNSRecord

from bulkhead.lab.topology import recv_exact

pytestmark = [pytest.mark.root, pytest.mark.integration]

GW_DNS = "198.18.1.1"
UPSTREAM = "127.0.0.2"
POOLS = ["198.19.255.0/24", "fd00:ff::/120"]
UPSTREAM_SERVER = textwrap.dedent("""
    import socket, sys
    from dnslib import A, QTYPE, RR, DNSRecord
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 53))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(4096)
        q = DNSRecord.parse(data)
        r = q.reply()
        if str(q.q.qname).rstrip(".") == "outside.example" and q.q.qtype == QTYPE.A:
            r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("198.18.77.7"), ttl=5))
        s.sendto(r.pack(), peer)
""")


def fabric_policy(gw, upstream: list[str] | None = None, dns: list[str] | None = None,
                  extra_apps: list[dict] | None = None) -> str:
    doc = yaml.safe_load(gw.policy_yaml(gw.rule("web", "payments", ports=["tcp/8443"]),
                                        gw.rule("laptops", "catalog", ports=["tcp/8080"])))
    doc["fabric"] = {"service_addresses": POOLS, **({"upstream_dns": upstream} if upstream else {})}
    for seg in doc["segments"]:
        if seg["name"] in ("prod", "dev"):
            seg["dns"] = dns or [GW_DNS]
    for app in doc["apps"]:
        if app["name"] == "payments":
            app["publish"] = ["payments.apps.example"]
        if app["name"] == "catalog":
            app["publish"] = ["*.catalog.example", "catalog.example"]
    doc["apps"] = (extra_apps or []) + doc["apps"]
    return yaml.safe_dump(doc, sort_keys=False)


def query(topo, ns: str, name: str, qtype: str = "A", tcp: bool = False, server: str = GW_DNS):
    q = DNSRecord.question(name, qtype)
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    s = topo.socket(ns, fam, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    s.settimeout(2.0)
    try:
        if tcp:
            s.connect((server, 53))
            data = q.pack()
            s.sendall(struct.pack("!H", len(data)) + data)
            n = struct.unpack("!H", recv_exact(s, 2))[0]
            raw = recv_exact(s, n)
        else:
            s.sendto(q.pack(), (server, 53))
            raw = s.recv(4096)
    except OSError:
        return None
    finally:
        s.close()
    reply = DNSRecord.parse(raw)
    assert reply.header.id == q.header.id
    return reply


def addresses(reply) -> list[str]:
    return sorted(str(rr.rdata) for rr in reply.rr)


@pytest.fixture(scope="module")
def fabric(gateway):
    path = gateway.write(fabric_policy(gateway))
    p = gateway.agent.apply(path)
    assert p.returncode == 0, p.stdout + p.stderr
    return gateway


def test_a_segment_that_may_reach_the_app_gets_its_service_addresses(fabric):
    gw = fabric
    a = query(gw.topo, "prod", "payments.apps.example", "A")
    assert a is not None and a.header.rcode == RCODE.NOERROR and a.header.aa == 1
    (v4,) = addresses(a)
    assert ipaddress.ip_address(v4) in ipaddress.ip_network(POOLS[0])
    aaaa = query(gw.topo, "prod", "PAYMENTS.apps.example.", "AAAA")  # case and trailing dot
    (v6,) = addresses(aaaa)
    assert ipaddress.ip_address(v6) in ipaddress.ip_network(POOLS[1])
    # the same over TCP, and the answer names the agent's allocation
    t = query(gw.topo, "prod", "payments.apps.example", "A", tcp=True)
    assert addresses(t) == [v4]
    st = gw.agent.status()
    assert st["dns"]["queries"].get("noerror", 0) >= 3
    assert {(x["segment"], x["address"]) for x in st["dns"]["listeners"]} == {("prod", GW_DNS), ("dev", GW_DNS)}


def test_a_segment_with_no_rule_to_the_app_gets_nxdomain(fabric):
    gw = fabric
    r = query(gw.topo, "dev", "payments.apps.example", "A")
    assert r is not None and r.header.rcode == RCODE.NXDOMAIN and not r.rr
    # ...while prod, through the same address on its own interface, still gets the answer
    assert query(gw.topo, "prod", "payments.apps.example", "A").header.rcode == RCODE.NOERROR
    # and prod may not see catalog (no rule web -> catalog), dev may
    assert query(gw.topo, "prod", "catalog.example", "A").header.rcode == RCODE.NXDOMAIN
    assert query(gw.topo, "dev", "catalog.example", "A").header.rcode == RCODE.NOERROR


def test_a_wildcard_covers_exactly_one_label_and_other_names_are_refused(fabric):
    gw = fabric
    one = query(gw.topo, "dev", "shop.catalog.example", "A")
    assert one.header.rcode == RCODE.NOERROR and addresses(one) == addresses(query(gw.topo, "dev", "catalog.example"))
    # a type the fabric has no records of: NOERROR with no answer (the name exists)
    mx = query(gw.topo, "dev", "shop.catalog.example", "MX")
    assert mx.header.rcode == RCODE.NOERROR and not mx.rr
    for name in ("a.b.catalog.example", "outside.example"):
        r = query(gw.topo, "dev", name, "A")
        assert r.header.rcode == RCODE.REFUSED, name


def test_names_outside_the_fabric_go_to_the_upstream(fabric):
    gw = fabric
    up = gw.topo.spawn("gw", [sys.executable, "-c", UPSTREAM_SERVER, UPSTREAM],
                       stdout=subprocess.PIPE, text=True)
    try:
        assert up.stdout.readline().strip() == "ready"
        path = gw.write(fabric_policy(gw, upstream=[UPSTREAM]))
        assert gw.agent.apply(path).returncode == 0
        for tcp in (False,):
            r = query(gw.topo, "prod", "outside.example", "A", tcp=tcp)
            assert r is not None and r.header.rcode == RCODE.NOERROR and addresses(r) == ["198.18.77.7"]
        # fabric names are still answered by the gateway, never forwarded
        assert query(gw.topo, "dev", "payments.apps.example").header.rcode == RCODE.NXDOMAIN
        assert gw.agent.status()["dns"]["queries"].get("forwarded", 0) >= 1
    finally:
        up.kill()
        up.wait()
        assert gw.agent.apply(gw.write(fabric_policy(gw))).returncode == 0


def test_service_addresses_stay_when_an_unrelated_app_is_added(fabric):
    gw = fabric
    before = addresses(query(gw.topo, "prod", "payments.apps.example", "A"))
    newcomer = {"name": "aaa-new", "segment": "core", "addresses": ["198.19.0.30/32"],
                "publish": ["new.apps.example"]}
    assert gw.agent.apply(gw.write(fabric_policy(gw, extra_apps=[newcomer]))).returncode == 0
    assert addresses(query(gw.topo, "prod", "payments.apps.example", "A")) == before
    assert gw.agent.apply(gw.write(fabric_policy(gw))).returncode == 0
    assert addresses(query(gw.topo, "prod", "payments.apps.example", "A")) == before


def test_a_dns_address_the_gateway_lacks_fails_the_apply_and_the_old_policy_answers(fabric):
    gw = fabric
    gen = gw.generation()
    p = gw.agent.apply(gw.write(fabric_policy(gw, dns=["198.18.1.53"])))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "198.18.1.53" in p.stderr and "not an address of this gateway" in p.stderr
    assert gw.generation() == gen
    assert query(gw.topo, "prod", "payments.apps.example").header.rcode == RCODE.NOERROR


def test_queries_to_the_dns_address_pass_only_on_port_53(fabric):
    """The segment's `dns:` is a destination for udp/53 and tcp/53 only: other ports are denied."""
    gw = fabric
    before = gw.counters()
    probe = gw.topo.udp("prod", GW_DNS, 5353, timeout=gw.DENY_TIMEOUT)
    assert not probe.ok
    assert gw.delta(before, gw.counters()).get("deny_default", 0) >= 1


def test_a_policy_without_fabric_closes_the_listeners(fabric):
    gw = fabric
    try:
        gw.apply(gw.rule("web", "payments"))
        assert gw.agent.status()["dns"]["listeners"] == []
        assert query(gw.topo, "prod", "payments.apps.example") is None
    finally:
        assert gw.agent.apply(gw.write(fabric_policy(gw))).returncode == 0
    assert query(gw.topo, "prod", "payments.apps.example").header.rcode == RCODE.NOERROR
