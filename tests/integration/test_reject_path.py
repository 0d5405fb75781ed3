"""Reject on a veth whose peer has no XDP program: the client gets its answer.

The topology's client and server namespaces are plain veth peers, as a
user's container is (test_topology: test_peers_are_plain_veths). Native XDP's
XDP_TX never reaches such a peer; the loader gives these interfaces the
reject path tc_redirect (bulkhead_tc sends the answer out), and generic XDP
keeps XDP_TX, which is a dev_queue_xmit there. Each test connects from a
client that did nothing special and checks the error the kernel gave it.
Socket timeouts are a few seconds only so that a lost answer fails as a
timeout (TimeoutError), never as a hang.
"""
import errno
import socket

import pytest

from bulkhead.lab.runner import AgentRunner
from bulkhead.lab.topology import Topology, reap_stale

pytestmark = [pytest.mark.root, pytest.mark.integration]

PAY4, PAY6 = "198.19.0.10", "fd00:19::10"
ANSWER_WAIT = 3.0  # seconds; a reset comes in milliseconds, a client's own SYN timeout after ~1 s + 2 s


def connect_error(topo, ns: str, addr: str, port: int) -> OSError | None:
    """What connect() from `ns` raised (None: it connected)."""
    s = topo.socket(ns, socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(ANSWER_WAIT)
    try:
        s.connect((addr, port))
        return None
    except OSError as e:
        return e
    finally:
        s.close()


def udp_error(topo, ns: str, addr: str, port: int) -> OSError | None:
    """What a connected UDP socket raised waiting for an answer to one datagram."""
    s = topo.socket(ns, socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(ANSWER_WAIT)
    try:
        s.connect((addr, port))  # connected: an ICMP error for it surfaces on the socket
        s.send(b"ping")
        s.recv(2048)
        return None
    except OSError as e:
        return e
    finally:
        s.close()


def reject_counts(agent) -> tuple[int, int]:
    """(packets counted reject_rule, answers bulkhead_tc sent out)."""
    st = agent.status()
    return st["counters"]["reject_rule"]["packets"], st["events"]["reject_via_tc"]


def peers_without_xdp(topo) -> None:
    for role in ("prod", "dev", "core"):
        link = topo.run(role, ["ip", "-d", "link", "show", "dev", "eth0"]).stdout
        assert "prog/xdp" not in link, f"{role}: the peer must have no XDP program\n{link}"


@pytest.fixture(scope="module")
def rejecting(gateway):
    """The module's agent (native XDP) with web -> payments rejected on tcp/8443 and udp/5353."""
    peers_without_xdp(gateway.topo)
    gateway.apply(gateway.rule("web", "payments", "reject", ports=["tcp/8443", "udp/5353"]))
    return gateway


def test_native_veth_gets_the_tc_path_in_status(rejecting):
    st = rejecting.agent.status()
    got = {i["name"]: (i["mode"], i["reject_path"]) for i in st["interfaces"]}
    assert got == {n: ("native", "tc_redirect") for n in ("bh-prod", "bh-dev", "bh-core")}
    text = rejecting.agent.cli("status").stdout
    assert text.count("reject via tc_redirect") == 3, text


@pytest.mark.parametrize("addr", [PAY4, PAY6], ids=["v4", "v6"])
def test_rejected_tcp_is_refused_by_a_reset(rejecting, addr):
    r0, tc0 = reject_counts(rejecting.agent)
    err = connect_error(rejecting.topo, "prod", addr, 8443)
    assert isinstance(err, ConnectionRefusedError), f"want ECONNREFUSED (an RST), got {err!r}"
    r1, tc1 = reject_counts(rejecting.agent)
    assert r1 - r0 >= 1
    assert tc1 - tc0 == r1 - r0, "every reject answer went out by bulkhead_tc"


# The reject answer for UDP is ICMP "administratively prohibited" (3/13, ICMPv6 1/1):
# Linux reports those as EHOSTUNREACH and EACCES, not the ECONNREFUSED of a port unreachable.
@pytest.mark.parametrize("addr, want", [(PAY4, errno.EHOSTUNREACH), (PAY6, errno.EACCES)], ids=["v4", "v6"])
def test_rejected_udp_gets_an_icmp_error(rejecting, addr, want):
    r0, tc0 = reject_counts(rejecting.agent)
    err = udp_error(rejecting.topo, "prod", addr, 5353)
    assert isinstance(err, OSError) and err.errno == want, f"want {errno.errorcode[want]}, got {err!r}"
    r1, tc1 = reject_counts(rejecting.agent)
    assert r1 - r0 >= 1
    assert tc1 - tc0 == r1 - r0


def test_allowed_traffic_is_untouched_by_the_tc_program(rejecting):
    """bulkhead_tc sits on every interface: packets without the send-back flag pass as before."""
    rejecting.apply(rejecting.rule("web", "payments", ports=["tcp/8443"]))
    try:
        p = rejecting.topo.tcp("prod", PAY4, 8443, send=b"through\n", timeout=ANSWER_WAIT)
        assert (p.result, p.reply) == ("connected", "hello from payments\nthrough"), p
    finally:
        rejecting.apply(rejecting.rule("web", "payments", "reject", ports=["tcp/8443", "udp/5353"]))


@pytest.fixture(scope="module")
def generic(gateway, tmp_path_factory):
    """A second topology whose agent attaches generic XDP: there XDP_TX is kept."""
    reap_stale(("bht",))
    base = tmp_path_factory.mktemp("bh-generic")
    policy = base / "policy.yaml"
    policy.write_text(gateway.policy_yaml(gateway.rule("web", "payments", "reject", ports=["tcp/8443"])))
    topo = Topology("bht")
    agent = AgentRunner(topo, base / "state")
    try:
        topo.create()
        topo.start_core_servers(payments_ports=(8443,), catalog_ports=(8080,), udp_port=5353)
        peers_without_xdp(topo)
        agent.start(policy, args=("--xdp-mode", "generic"))
        yield topo, agent
    finally:
        agent.cleanup()
        topo.destroy()


def test_generic_xdp_keeps_xdp_tx_and_reaches_the_peer(generic):
    topo, agent = generic
    st = agent.status()
    assert {i["name"]: (i["mode"], i["reject_path"]) for i in st["interfaces"]} == {
        n: ("generic", "xdp_tx") for n in ("bh-prod", "bh-dev", "bh-core")}
    r0, tc0 = reject_counts(agent)
    err = connect_error(topo, "prod", PAY4, 8443)
    assert isinstance(err, ConnectionRefusedError), f"want ECONNREFUSED (an RST), got {err!r}"
    r1, tc1 = reject_counts(agent)
    assert r1 - r0 >= 1 and tc1 == tc0
