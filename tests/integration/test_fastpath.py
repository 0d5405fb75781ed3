"""The XDP fast path with real TCP through the gateway (issue 18): the clients' and servers'
veth ends have an XDP program, so the agent finds the gateway's interfaces redirect targets;
an allowed flow is then forwarded in XDP both ways (bulkhead_forward: fwd_redirect), the
stack's forwarding counter (Ip ForwDatagrams) stays still, and conntrack never sees the flow.
Sockets behind veths leave TCP checksums to offload; with that on (the default) packets take
the stack, marked (fwd_csum_partial); with it off, as from a NIC, they are redirected.

prod's and dev's clients share 198.18.1.10: a reply only reaches the right one if it was
looked up in its client segment's table (the main table's route points at bh-prod).
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
from bulkhead.datapath import probe
from bulkhead.lab.topology import (
    PAYMENTS_V4,
    PAYMENTS_V6,
    PEER_IF,
    Topology,
    in_netns,
    reap_stale,
)

pytestmark = [pytest.mark.root, pytest.mark.integration]

XDP_FLAGS_DRV_MODE = 1 << 2
MESSAGES = 100


@pytest.fixture(scope="module")
def topo():
    """The integration topology, with an XDP_PASS program on every client and server end."""
    from bcc import BPF

    reap_stale(("bht",))
    t = Topology("bht")
    b = BPF(src_file=str(Path(__file__).with_name("xdp_pass.bpf.c")))
    fn = b.load_func("xdp_pass", BPF.XDP)
    try:
        t.create()
        for role in ("prod", "dev", "core"):
            in_netns(t.name(role), lambda: BPF.attach_xdp(PEER_IF, fn, XDP_FLAGS_DRV_MODE))
        t.start_core_servers(payments_ports=(8443,), catalog_ports=(8080,), udp_port=5353)
        yield t
    finally:
        t.destroy()  # the namespaces take the veths and their XDP programs with them
        b.cleanup()


def forwarded_by_stack(gateway) -> int:
    """Ip: ForwDatagrams of the gateway namespace (IPv4 packets the kernel forwarded)."""
    lines = [ln.split() for ln in gateway.gw("cat", "/proc/net/snmp").splitlines() if ln.startswith("Ip:")]
    return int(lines[1][lines[0].index("ForwDatagrams")])


def forwarded_by_stack6(gateway) -> int:
    for ln in gateway.gw("cat", "/proc/net/snmp6").splitlines():
        if ln.startswith("Ip6OutForwDatagrams"):
            return int(ln.split()[1])
    raise AssertionError("no Ip6OutForwDatagrams in /proc/net/snmp6")


def events(gateway) -> dict[str, int]:
    return gateway.agent.status()["events"]


def ping_pong(gateway, client: str, addr: str) -> None:
    """Connect, then MESSAGES request/echo round trips, each one segment each way."""
    probe, s = gateway.topo.tcp(client, addr, 8443, keep=True)
    assert probe.ok, probe
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(MESSAGES):
            msg = f"{client} {i:04d}\n".encode()
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(len(msg) - len(got))
                assert chunk, "the connection closed"
                got += chunk
            assert got == msg
    finally:
        s.close()


def conntrack_lines(gateway, *args: str) -> list[str]:
    out = gateway.topo.run("gw", ["conntrack", "-L", *args], check=False)
    return [ln for ln in out.stdout.splitlines() if ln.strip()]


def checksum_offload(topo, on: bool) -> None:
    """The clients' and servers' veth ends leave TCP/UDP checksums to offload (the default), or
    their sockets finish them, as frames from a NIC or a forwarding router arrive."""
    for role in ("prod", "dev", "core"):
        topo.run(role, ["ethtool", "-K", PEER_IF, "tx", "on" if on else "off"])


@pytest.fixture
def complete_checksums(topo):
    checksum_offload(topo, False)
    try:
        yield
    finally:
        checksum_offload(topo, True)


@pytest.fixture(scope="module")
def allowed(gateway):
    gateway.apply(gateway.rule("web", "payments", ports=["tcp/8443", "udp/5353"]),
                  gateway.rule("laptops", "payments", ports=["tcp/8443"]))
    return gateway


@pytest.mark.parametrize("client,addr,stack", [
    ("prod", PAYMENTS_V4, forwarded_by_stack),
    ("dev", PAYMENTS_V4, forwarded_by_stack),
    ("prod", PAYMENTS_V6, forwarded_by_stack6),
])
def test_allowed_flow_is_forwarded_in_xdp_both_ways(allowed, complete_checksums, client, addr, stack):
    ev0, fwd0 = events(allowed), stack(allowed)
    ping_pong(allowed, client, addr)
    ev1, fwd1 = events(allowed), stack(allowed)
    d = {k: ev1[k] - ev0[k] for k in ev1 if k.startswith("fwd_")}
    if client == "dev" and probe.probe_fib_lookup_tbid() is not True:
        # No per-table FIB lookup in XDP (upstream kernels before 6.8): the main table's route to 198.18.1.10
        # leaves by bh-prod, so dev's replies go to the stack, marked, and its ip rule routes
        # them by dev's table; the requests are still redirected.
        assert d["fwd_redirect"] >= MESSAGES and d["fwd_other_segment"] >= MESSAGES, d
        return
    # Each round trip is a segment each way: both directions went by redirect...
    assert d["fwd_redirect"] >= 2 * MESSAGES, d
    # ...and the stack forwarded only the handshake's first packets, before the gateway had
    # resolved the neighbours (fwd_no_neigh), if even those.
    assert fwd1 - fwd0 <= d["fwd_no_neigh"] + 4, (fwd0, fwd1)


def test_checksums_left_to_offload_go_through_the_stack(allowed):
    """Sockets behind veths (checksum offload on) send unfinished TCP checksums: every such
    packet goes to the stack (fwd_csum_partial), marked to skip conntrack; the flow works."""
    ev0 = events(allowed)
    ping_pong(allowed, "prod", PAYMENTS_V4)
    ev1 = events(allowed)
    assert ev1["fwd_csum_partial"] - ev0["fwd_csum_partial"] >= 2 * MESSAGES
    assert ev1["fwd_redirect"] - ev0["fwd_redirect"] < MESSAGES  # pure ACKs carry full checksums here


def test_fast_path_flows_never_touch_conntrack(allowed):
    """The gateway's conntrack is in use (a fragmented datagram keeps it, as local delivery
    does), yet it holds nothing of the TCP flows forwarded in XDP or passed up marked."""
    allowed.gw("conntrack", "-F")
    ping_pong(allowed, "prod", PAYMENTS_V4)
    s = allowed.topo.socket("prod", socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(2)
        s.connect((PAYMENTS_V4, 5353))
        s.send(b"x" * 3000)  # more than the 1500-byte MTU: sent as fragments
        assert s.recv(8192).endswith(b"x" * 3000)  # the echo (after the server's name)
    finally:
        s.close()
    assert conntrack_lines(allowed, "-p", "udp", "--dport", "5353"), "conntrack should track the fragments"
    assert conntrack_lines(allowed, "-p", "tcp", "--dport", "8443") == []
