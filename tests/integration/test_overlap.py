"""Overlapping CIDRs: prod and dev clients are both 198.18.1.10 (and fd00:1::10).

The data path tells them apart by ingress segment; the gateway plumbing
(conntrack mark -> fwmark -> per-segment route table) routes each reply back
into the segment its flow came from. Without the plumbing, every reply to
198.18.1.10 would leave by the main table's first route (bh-prod) and dev's
connections would hang.
"""
import threading

import pytest

from bulkhead.datapath.marks import segment_mark

pytestmark = [pytest.mark.root, pytest.mark.integration]

PAY4, PAY6 = "198.19.0.10", "fd00:19::10"


def test_same_ip_prod_allowed_dev_denied(gateway):
    R = gateway.rule
    gateway.apply(R("web", "payments"), R("laptops", "payments", "deny"))
    before = gateway.counters()
    prod = gateway.topo.tcp("prod", PAY4, 8443, send=b"prod\n")
    dev = gateway.topo.tcp("dev", PAY4, 8443, timeout=gateway.DENY_TIMEOUT)
    assert prod.result == "connected" and prod.reply.endswith("prod"), prod
    assert dev.result == "timeout", dev
    d = gateway.delta(before, gateway.counters())
    assert d.get("allow_rule", 0) >= 3 and d.get("deny_rule", 0) >= 1, d

    # and the other way round: only the segment decides
    gateway.apply(R("web", "payments", "deny"), R("laptops", "payments"))
    assert gateway.topo.tcp("prod", PAY4, 8443, timeout=gateway.DENY_TIMEOUT).result == "timeout"
    dev = gateway.topo.tcp("dev", PAY4, 8443, send=b"dev\n")
    assert dev.result == "connected" and dev.reply.endswith("dev"), dev


@pytest.mark.parametrize("server", [PAY4, PAY6], ids=["ipv4", "ipv6"])
def test_same_ip_both_allowed_simultaneously(gateway, server):
    """Connections from both segments at once, each gets its own replies."""
    R = gateway.rule
    topo = gateway.topo
    gateway.apply(R("web", "payments"), R("laptops", "payments"))
    per_segment = 6
    socks = {}  # (segment, i) -> socket
    errors = []
    lock = threading.Lock()

    def open_one(seg, i):
        # Distinct source ports: two namespaces on one kernel pick correlated ephemeral ports
        # (the port offset hash has no netns in it), and two live flows with one 5-tuple are
        # refused by design (test_same_five_tuple_from_two_segments_is_refused).
        sport = 42000 + i + (100 if seg == "dev" else 0)
        probe, s = topo.tcp(seg, server, 8443, timeout=3.0, send=f"{seg}-{i}-open\n".encode(), keep=True,
                            sport=sport)
        with lock:
            if probe.ok and probe.reply.endswith(f"{seg}-{i}-open"):
                socks[(seg, i)] = s
            else:
                errors.append((seg, i, probe))
                if s:
                    s.close()

    threads = [threading.Thread(target=open_one, args=(seg, i)) for i in range(per_segment) for seg in ("prod", "dev")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert len(socks) == 2 * per_segment
        # All open at once; talk on every one, interleaving the segments.
        for rnd in range(3):
            for (seg, i), s in sorted(socks.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                msg = f"{seg}-{i}-round{rnd}\n".encode()
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(len(msg) - len(got))
                    assert chunk, f"{seg}-{i}: connection closed"
                    got += chunk
                assert got == msg, (seg, i, got)
        # Each reply found its segment by the mark XDP gave it (BH_MARK_SEG | the client's
        # segment, datapath/plumbing.py), not by conntrack: the flows never entered it.
        ct = gateway.gw("conntrack", "-L", "-p", "tcp", "--dport", "8443", *(["-f", "ipv6"] if ":" in server else []))
        assert f"mark={segment_mark(gateway.SEG_ID['prod'])}" not in ct, ct
        assert f"mark={segment_mark(gateway.SEG_ID['dev'])}" not in ct, ct
        assert "dport=8443" not in ct, ct
    finally:
        for s in socks.values():
            s.close()


def test_same_five_tuple_from_two_segments_is_refused(gateway):
    """Same source port too: replies could not tell the flows apart, so the second is dropped."""
    R = gateway.rule
    gateway.apply(R("web", "payments"), R("laptops", "payments"))
    before = gateway.counters()
    first, s = gateway.topo.tcp("prod", PAY4, 8443, send=b"first\n", keep=True, sport=41000)
    try:
        assert first.ok, first
        second = gateway.topo.tcp("dev", PAY4, 8443, timeout=gateway.DENY_TIMEOUT, sport=41000)
        assert second.result == "timeout", second
        d = gateway.delta(before, gateway.counters())
        assert d.get("flow_collision", 0) >= 1, d
        # the first connection is unharmed
        s.sendall(b"still-here\n")
        assert s.recv(64) == b"still-here\n"
    finally:
        s.close()


def test_replies_follow_the_segment_not_the_main_table(gateway):
    """The plumbing is what routes dev's replies: without its ip rules, dev hangs."""
    R = gateway.rule
    topo = gateway.topo
    gateway.apply(R("web", "payments"), R("laptops", "payments"))
    assert topo.tcp("dev", PAY4, 8443, send=b"x\n").ok
    rules = [ln for ln in gateway.gw("ip", "rule").splitlines() if "proto 176" in ln and ln.startswith("20000:")]
    assert len(rules) == 3, rules  # one per segment (20001 is the L7 verifier's)
    dev_mark = segment_mark(gateway.SEG_ID["dev"])
    topo.run("gw", ["ip", "rule", "del", "fwmark", f"{dev_mark:#x}/0xff00ffff", "table", str(dev_mark)])
    try:
        assert topo.tcp("dev", PAY4, 8443, timeout=gateway.DENY_TIMEOUT).result == "timeout"
        assert topo.tcp("prod", PAY4, 8443, send=b"y\n").ok
    finally:
        gateway.apply(R("web", "payments"), R("laptops", "payments"))  # re-apply restores the rule
    assert topo.tcp("dev", PAY4, 8443, send=b"z\n").ok
