"""Verdicts on real traffic: allow, deny, reject, audit, directionality, TCP/UDP/ICMP, IPv4/IPv6.

Every test applies its own policy to the module's agent and checks both what
the client saw and which counters moved (status --json).
"""
import pytest

pytestmark = [pytest.mark.root, pytest.mark.integration]

PAY4, PAY6 = "198.19.0.10", "fd00:19::10"
CAT4, CAT6 = "198.19.0.20", "fd00:19::20"
OK_TIMEOUT = 10.0  # seconds a connection that must succeed is given (a bound, not a measurement)


def test_agent_reports_interfaces_and_segments(gateway):
    st = gateway.agent.status()
    got = {i["name"]: (i["segment"], i["mode"]) for i in st["interfaces"]}
    assert got == {"bh-prod": ("prod", "native"), "bh-dev": ("dev", "native"), "bh-core": ("core", "native")}
    for name in got:
        assert gateway.xdp_attached(name)


def test_allowed_tcp_exchanges_data(gateway):
    R = gateway.rule
    gateway.apply(R("web", "payments", ports=["tcp/8443"]))
    before = gateway.counters()
    p = gateway.topo.tcp("prod", PAY4, 8443, send=b"token-allowed\n")
    assert p.result == "connected", p
    assert p.reply == "hello from payments\ntoken-allowed"
    d = gateway.delta(before, gateway.counters())
    assert d.get("allow_rule", 0) >= 3  # SYN, ACK, data (+ FIN)
    assert d.get("allow_reply", 0) >= 2  # SYN-ACK, greeting, echo
    assert not {"deny_rule", "deny_default", "reject_rule"} & set(d)


def test_denied_tcp_times_out(gateway):
    R = gateway.rule
    gateway.apply(R("web", "payments", ports=["tcp/8443"]), R("laptops", "payments", "deny"))
    before = gateway.counters()
    p = gateway.topo.tcp("dev", PAY4, 8443, timeout=gateway.DENY_TIMEOUT)
    assert p.result == "timeout", p
    # a port the allow rule doesn't cover: default deny
    p2 = gateway.topo.tcp("prod", PAY4, 8444, timeout=gateway.DENY_TIMEOUT)
    assert p2.result == "timeout", p2
    d = gateway.delta(before, gateway.counters())
    assert d.get("deny_rule", 0) >= 1 and d.get("deny_default", 0) >= 1, d
    assert "allow_rule" not in d


def test_rejected_tcp_gets_rst_fast(gateway):
    R = gateway.rule
    gateway.apply(R("laptops", "catalog", "reject"))
    before = gateway.counters()
    p = gateway.topo.tcp("dev", CAT4, 8080, timeout=2.0)
    assert p.result == "refused", p
    assert "111" in p.detail  # ECONNREFUSED: an RST, not an ICMP error
    assert p.seconds < gateway.REJECT_FAST, p
    d = gateway.delta(before, gateway.counters())
    assert d.get("reject_rule", 0) >= 1, d
    # the same rule without reject drops instead: the RST is the rule's doing
    gateway.apply(R("laptops", "catalog", "deny"))
    assert gateway.topo.tcp("dev", CAT4, 8080, timeout=gateway.DENY_TIMEOUT).result == "timeout"


def test_audit_rule_passes_and_counts(gateway):
    R = gateway.rule
    gateway.apply(R("laptops", "payments", "deny", mode="audit"))
    before = gateway.counters()
    p = gateway.topo.tcp("dev", PAY4, 8443, send=b"audited\n")
    assert p.result == "connected" and p.reply.endswith("audited"), p
    d = gateway.delta(before, gateway.counters())
    assert d.get("audit_rule", 0) >= 3, d
    assert "deny_rule" not in d
    # enforce the same rule: it bites
    gateway.apply(R("laptops", "payments", "deny"))
    assert gateway.topo.tcp("dev", PAY4, 8443, timeout=gateway.DENY_TIMEOUT).result == "timeout"


def test_global_audit_passes_and_counts(gateway):
    R = gateway.rule
    gateway.apply(R("web", "payments"), R("laptops", "catalog", "reject"), mode="audit")
    before = gateway.counters()
    p1 = gateway.topo.tcp("dev", PAY4, 8443, send=b"a1\n")  # default deny, audited
    p2 = gateway.topo.tcp("dev", CAT4, 8080, send=b"a2\n")  # reject rule, audited
    assert p1.result == "connected", p1
    assert p2.result == "connected", p2
    d = gateway.delta(before, gateway.counters())
    assert d.get("audit_default", 0) >= 3, d
    assert d.get("audit_rule", 0) >= 3, d
    assert not {"deny_default", "deny_rule", "reject_rule"} & set(d), d


def test_directionality(gateway):
    """web may open connections to payments; payments may not open one to web."""
    R = gateway.rule
    topo = gateway.topo
    topo.serve("prod", "web-client", tcp=["198.18.1.10:9000"])
    # Baseline: with default allow the core -> prod path works (routes, listener, plumbing).
    # (what must connect gets OK_TIMEOUT: a slow VM's first connection after an apply may take
    # more than the default 1.5 s; it waits no longer when it connects)
    gateway.apply(default="allow")
    assert topo.tcp("core", "198.18.1.10", 9000, timeout=OK_TIMEOUT).reply == "hello from web-client"

    gateway.apply(R("web", "payments"))
    before = gateway.counters()
    fwd = topo.tcp("prod", PAY4, 8443, send=b"fwd\n", timeout=OK_TIMEOUT)
    assert fwd.result == "connected", fwd
    rev = topo.tcp("core", "198.18.1.10", 9000, timeout=gateway.DENY_TIMEOUT)
    assert rev.result == "timeout", rev
    d = gateway.delta(before, gateway.counters())
    assert d.get("deny_default", 0) >= 1, d  # the server's SYN
    assert d.get("allow_reply", 0) >= 2, d  # the client's flow's replies


def test_udp_allowed_denied_rejected(gateway):
    R = gateway.rule
    gateway.apply(R("web", "payments", ports=["udp/5353"]), R("laptops", "catalog", "reject", ports=["udp/5353"]))
    before = gateway.counters()
    ok = gateway.topo.udp("prod", PAY4, 5353, b"dgram-1")
    assert ok.result == "connected" and ok.reply == "payments: dgram-1", ok
    denied = gateway.topo.udp("dev", PAY4, 5353, b"dgram-2", timeout=gateway.DENY_TIMEOUT)
    assert denied.result == "timeout", denied
    rejected = gateway.topo.udp("dev", CAT4, 5353, b"dgram-3", timeout=2.0)
    assert rejected.result == "refused" and rejected.seconds < gateway.REJECT_FAST, rejected
    # tcp on the same port is not covered by the udp rule
    assert gateway.topo.tcp("prod", PAY4, 8443, timeout=gateway.DENY_TIMEOUT).result == "timeout"
    d = gateway.delta(before, gateway.counters())
    assert d.get("allow_rule", 0) >= 1 and d.get("allow_reply", 0) >= 1, d
    assert d.get("deny_default", 0) >= 2 and d.get("reject_rule", 0) >= 1, d


def test_icmp_ping_allowed_denied(gateway):
    R = gateway.rule
    gateway.apply(R("web", "catalog", ports=["icmp"]))
    before = gateway.counters()
    assert gateway.topo.ping("prod", CAT4).result == "connected"
    assert gateway.topo.ping("prod", CAT6).result == "connected"  # icmp means ICMPv6 too
    assert gateway.topo.ping("dev", CAT4).result == "timeout"
    assert gateway.topo.ping("prod", PAY4).result == "timeout"  # no rule to payments
    d = gateway.delta(before, gateway.counters())
    assert d.get("allow_rule", 0) >= 2 and d.get("allow_reply", 0) >= 2, d
    assert d.get("deny_default", 0) >= 2, d
    # reject answers a ping with an ICMP error
    gateway.apply(R("laptops", "catalog", "reject", ports=["icmp"]))
    assert gateway.topo.ping("dev", CAT4).result == "refused"


def test_ipv6_allowed_denied_rejected(gateway):
    R = gateway.rule
    gateway.apply(R("web", "payments", ports=["tcp/8443"]), R("laptops", "payments", "deny"),
                  R("laptops", "catalog", "reject"))
    before = gateway.counters()
    ok = gateway.topo.tcp("prod", PAY6, 8443, send=b"v6\n")
    assert ok.result == "connected" and ok.reply == "hello from payments\nv6", ok
    denied = gateway.topo.tcp("dev", PAY6, 8443, timeout=gateway.DENY_TIMEOUT)
    assert denied.result == "timeout", denied
    rejected = gateway.topo.tcp("dev", CAT6, 8080, timeout=2.0)
    assert rejected.result == "refused" and rejected.seconds < gateway.REJECT_FAST, rejected
    d = gateway.delta(before, gateway.counters())
    assert d.get("allow_rule", 0) >= 3 and d.get("deny_rule", 0) >= 1 and d.get("reject_rule", 0) >= 1, d
