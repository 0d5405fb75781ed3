"""Policy changes on a live gateway: atomic swaps under traffic, failed applies change nothing."""
import threading
import time

import pytest

pytestmark = [pytest.mark.root, pytest.mark.integration]

PAY4, CAT4 = "198.19.0.10", "198.19.0.20"


def test_reapply_under_traffic_is_atomic(gateway):
    """10 applies while an established connection talks nonstop: no hiccup, no leak."""
    R = gateway.rule
    topo = gateway.topo
    # Both policies allow web -> payments tcp/8443; neither lets laptops reach payments.
    policy_a = gateway.write(gateway.policy_yaml(
        R("web", "payments", ports=["tcp/8443"]), R("laptops", "catalog", "reject")))
    policy_b = gateway.write(gateway.policy_yaml(
        R("web", "catalog"), R("web", "payments", ports=["tcp/8000-9000"]), R("laptops", "payments", "deny")))
    p = gateway.agent.apply(policy_a)
    assert p.returncode == 0, p.stderr
    gen0 = int(p.stdout.split()[-1])

    probe, conn = topo.tcp("prod", PAY4, 8443, send=b"start\n", keep=True, timeout=2.0)
    assert probe.ok, probe
    stop = threading.Event()
    stats = {"echo_ok": 0, "echo_fail": [], "new_ok": 0, "new_fail": [], "leak": []}

    def talk():
        i = 0
        while not stop.is_set():
            msg = f"m{i:06d}\n".encode()
            try:
                conn.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = conn.recv(len(msg) - len(got))
                    if not chunk:
                        raise ConnectionError("closed")
                    got += chunk
                if got != msg:
                    raise ValueError(f"got {got!r}")
                stats["echo_ok"] += 1
            except Exception as e:  # noqa: BLE001 - recorded, asserted below
                stats["echo_fail"].append(repr(e))
                return
            i += 1

    def new_connections():
        while not stop.is_set():
            p = topo.tcp("prod", PAY4, 8443, send=b"n\n", timeout=2.0)
            if p.ok:
                stats["new_ok"] += 1
            else:
                stats["new_fail"].append(p)

    def forbidden():
        while not stop.is_set():
            p = topo.tcp("dev", PAY4, 8443, timeout=0.3)
            if p.result != "timeout":
                stats["leak"].append(p)

    threads = [threading.Thread(target=f) for f in (talk, new_connections, forbidden)]
    for t in threads:
        t.start()
    gens = []
    try:
        time.sleep(0.3)
        for i in range(10):
            r = gateway.agent.apply(policy_b if i % 2 == 0 else policy_a)
            assert r.returncode == 0, r.stdout + r.stderr
            gens.append(int(r.stdout.split()[-1]))
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        conn.close()
    assert gens == list(range(gen0 + 1, gen0 + 11))
    assert not stats["echo_fail"], stats["echo_fail"]
    assert not stats["new_fail"], stats["new_fail"]
    assert not stats["leak"], stats["leak"]
    assert stats["echo_ok"] > 100 and stats["new_ok"] > 10, stats
    assert gateway.generation() == gen0 + 10


def test_bad_policy_fails_and_old_stays(gateway):
    R = gateway.rule
    topo = gateway.topo
    gen = gateway.apply(R("web", "payments"), R("laptops", "catalog", "reject"))

    def behaves_as_before():
        assert topo.tcp("prod", PAY4, 8443, send=b"ok\n").ok
        assert topo.tcp("dev", PAY4, 8443, timeout=gateway.DENY_TIMEOUT).result == "timeout"
        assert topo.tcp("dev", CAT4, 8080).result == "refused"

    behaves_as_before()
    # Invalid: a rule naming an app that doesn't exist.
    bad = gateway.write(gateway.policy_yaml(R("web", "nosuchapp"), default="allow"))
    p = gateway.agent.apply(bad)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert f"{bad}:" in p.stdout and "nosuchapp" in p.stdout, p.stdout
    # Not YAML at all.
    garbage = gateway.write("version: 1\nsegments: [\n")
    assert gateway.agent.apply(garbage).returncode == 2
    assert gateway.generation() == gen
    behaves_as_before()

    # Valid policy the agent cannot apply (an interface this gateway doesn't have).
    segments = [{"name": "prod", "interfaces": ["bh-prod"]}, {"name": "dev", "interfaces": ["bh-nope"]},
                {"name": "core", "interfaces": ["bh-core"]}]
    missing = gateway.write(gateway.policy_yaml(R("web", "payments"), default="allow", segments=segments))
    p = gateway.agent.apply(missing)
    assert p.returncode != 0, p.stdout
    assert gateway.generation() == gen
    behaves_as_before()
    st = gateway.agent.status()
    assert {i["name"] for i in st["interfaces"]} == {"bh-prod", "bh-dev", "bh-core"}
