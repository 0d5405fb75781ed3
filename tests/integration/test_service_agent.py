"""What the systemd unit relies on, checked on the host: readiness and reload notifications
($NOTIFY_SOCKET, sd_notify's protocol), `bulkhead reload` and SIGHUP re-reading the policy
files, and a restart onto the pins of the same build that compiles nothing.

The unit itself runs under systemd in the VM (tests/service); here a datagram socket stands in
for systemd's notification socket.
"""
import signal
import socket

import pytest

pytestmark = [pytest.mark.root, pytest.mark.integration]

PAY4 = "198.19.0.10"


@pytest.fixture
def notify_sock(tmp_path):
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(30)
    yield s, str(path)
    s.close()


def messages(sock, until: str) -> list[dict]:
    """Notifications received up to (and including) the one that carries `until` (KEY=VALUE)."""
    got = []
    while True:
        data = sock.recv(65536).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        got.append(fields)
        k, v = until.split("=", 1)
        if fields.get(k) == v:
            return got


def test_ready_reload_and_stopping_are_notified_and_reload_rereads_the_files(gateway, notify_sock):
    sock, path = notify_sock
    agent, topo, R = gateway.agent, gateway.topo, gateway.rule
    policy = gateway.write(gateway.policy_yaml(R("web", "payments", ports=["tcp/8443"])))
    assert agent.stop() == 0
    agent.start(policy, env={"NOTIFY_SOCKET": path})
    ready = messages(sock, "READY=1")[-1]
    assert "enforcing generation" in ready["STATUS"] and "bh-prod" in ready["STATUS"], ready
    assert int(ready["MAINPID"]) > 0
    st = agent.status()
    assert st["datapath"]["compiled"] is False  # the module's agent pinned this build already
    assert f"data path: build {st['datapath']['build_id']} (pinned programs reused, no compile)" \
        in agent.cli("status").stdout
    gen = st["generation"]
    assert topo.tcp("prod", PAY4, 8443).ok
    assert topo.tcp("prod", PAY4, 8444, timeout=gateway.DENY_TIMEOUT).result == "timeout"

    # Edit the file the agent was started with; `bulkhead reload` applies it.
    policy.write_text(gateway.policy_yaml(R("web", "payments", ports=["tcp/8444"])))
    p = agent.cli("reload")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["generation", str(gen + 1)]
    seen = messages(sock, "READY=1")
    assert seen[0].get("RELOADING") == "1", seen
    assert topo.tcp("prod", PAY4, 8444).ok
    assert topo.tcp("prod", PAY4, 8443, timeout=gateway.DENY_TIMEOUT).result == "timeout"

    # A file that no longer validates: exit 2, the running generation stays.
    good = policy.read_text()
    policy.write_text("version: 1\nrules: [\n")
    p = agent.cli("reload")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert f"generation {gen + 1} stays in force" in p.stderr
    assert agent.status()["generation"] == gen + 1
    assert topo.tcp("prod", PAY4, 8444).ok

    # SIGHUP does the same, asynchronously.
    policy.write_text(good.replace("tcp/8444", "tcp/8443"))
    agent.proc.send_signal(signal.SIGHUP)
    messages(sock, "READY=1")
    assert gateway.wait_for(lambda: agent.status()["generation"] == gen + 2, timeout=30)
    assert topo.tcp("prod", PAY4, 8443).ok
    assert agent.running()

    assert agent.stop() == 0
    assert messages(sock, "STOPPING=1")
    # Stopped: still enforcing the last policy.
    assert topo.tcp("prod", PAY4, 8443).ok
    assert topo.tcp("prod", PAY4, 8444, timeout=gateway.DENY_TIMEOUT).result == "timeout"
    agent.start(policy)


def test_reload_json_reports_the_new_generation(gateway):
    import json

    gen = gateway.agent.status()["generation"]
    p = gateway.agent.cli("reload", "--json")
    assert p.returncode == 0, p.stderr
    reply = json.loads(p.stdout)
    assert reply["ok"] is True and reply["generation"] == gen + 1
    assert gateway.agent.status()["generation"] == gen + 1
