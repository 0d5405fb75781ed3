"""One gateway following the fleet: a real etcd, a real agent, real packets.

etcd runs inside the lab's gateway namespace on 127.0.0.1 (EtcdServer(netns=...)), so the agent
reaches it as it would a local member; the fleet CLI (publish, status) runs in that namespace
too. The tests share one topology, one etcd and one agent and run in file order, each one
starting from the state the one before left (the revisions climb as a real fleet's do):

    publish -> applied, acknowledged, enforced; a second publish followed by the same process;
    an envelope of an untrusted key, one for another gateway, a replayed older one: refused, the
    old policy enforced, the reason in the status key; the next publish goes through;
    etcd stopped: enforcement unchanged, a restarted agent comes up stale from STATE_DIR/fleet
    (a tampered cache is never used: no verified policy + no etcd = exit 1);
    etcd back: caught up without a restart; the agent killed: not alive within the lease TTL.

The agent's lease TTL is BULKHEAD_FLEET_TTL=3 here (10 s by default), so "not alive" comes soon.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from bulkhead.core.paths import REPO
from bulkhead.datapath import loader
from bulkhead.fleet import store as fstore
from bulkhead.fleet.envelope import seal
from bulkhead.fleet.keys import load_private
from bulkhead.lab.etcd import EtcdServer
from bulkhead.lab.runner import AgentRunner, bulkhead_argv, fleet_args
from bulkhead.lab.topology import in_netns
from bulkhead.policy import load_policy

GW = "gw1"
TTL = 3
PAYMENTS, CATALOG = ("198.19.0.10", 8443), ("198.19.0.20", 8080)
APPS = [
    {"name": "web", "segment": "prod", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
    {"name": "laptops", "segment": "dev", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
    {"name": "payments", "segment": "core", "addresses": ["198.19.0.10/32", "fd00:19::10/128"]},
    {"name": "catalog", "segment": "core", "addresses": ["198.19.0.20/32", "fd00:19::20/128"]},
]


def policy_doc(to: str, gateway: str = GW, core_ifs: tuple[str, ...] = ()) -> str:
    """Default deny; web (prod) may reach `to` (payments on 8443 or catalog on 8080) only.
    core_ifs: more interfaces for the core segment."""
    port = {"payments": "tcp/8443", "catalog": "tcp/8080"}[to]
    ifs = {"prod": ["bh-prod"], "dev": ["bh-dev"], "core": ["bh-core", *core_ifs]}
    return yaml.safe_dump({
        "version": 1,
        "settings": {"default_action": "deny", "mode": "enforce"},
        "gateways": [{"name": gateway}],
        "segments": [{"name": n, "gateway": gateway, "interfaces": i} for n, i in ifs.items()],
        "apps": APPS,
        "rules": [{"name": f"web-{to}", "from": "web", "to": to, "action": "allow", "ports": [port]}],
    }, sort_keys=False)


def wait_for(cond, timeout: float = 20.0, interval: float = 0.1):
    """Poll until cond() is truthy (the value) or the timeout (the last value): state, not time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    return cond()


def wait_until(fetch, ok, timeout: float = 20.0):
    """fetch() until ok(value); the value (the last one at the timeout: the assert shows it)."""
    last = {}

    def cond():
        last["v"] = fetch()
        return ok(last["v"])

    wait_for(cond, timeout)
    return last["v"]


class Fleet:
    """The topology, etcd in its gateway namespace, the signing keys, the agent, helpers."""

    def __init__(self, topo, base):
        self.topo, self.base = topo, base
        self.etcd = EtcdServer(name="bhfleet", netns=topo.gw)
        self.agent = AgentRunner(topo, base / "state")
        self.key, self.other_key = base / "fleet.key", base / "other.key"
        self._n = 0

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`bulkhead ARGS` in the gateway namespace (where etcd listens)."""
        p = self.topo.run("gw", [*bulkhead_argv(), *args], check=False, cwd=str(REPO))
        if check:
            assert p.returncode == 0, f"bulkhead {' '.join(args)}: exit {p.returncode}: {p.stdout}{p.stderr}"
        return p

    def cli_ns(self, argv: list[str]) -> str:
        """Another command in the gateway namespace (etcdctl speaks the v3 API by default in 3.4)."""
        return self.topo.run("gw", argv, env={**os.environ, "ETCDCTL_API": "3"}).stdout

    def write(self, text: str):
        self._n += 1
        p = self.base / f"policy-{self._n:02d}.yaml"
        p.write_text(text)
        return p

    def publish(self, to: str, key=None, gateway: str = GW, core_ifs: tuple[str, ...] = ()) -> int:
        p = self.cli("fleet", "publish", str(self.write(policy_doc(to, gateway, core_ifs))), "--etcd", self.etcd.url,
                     "--key", str(key or self.key))
        return int(p.stdout.split()[-1])

    def fleet_status(self) -> dict:
        return json.loads(self.cli("fleet", "status", "--etcd", self.etcd.url, "--json").stdout)

    def gateway(self) -> dict:
        return next((g for g in self.fleet_status()["gateways"] if g["name"] == GW), {})

    def in_gw(self, fn):
        """fn() in a thread inside the gateway namespace (etcd's 127.0.0.1 is that namespace's)."""
        return in_netns(self.topo.gw, fn)

    def get_policy(self) -> bytes:
        return self.in_gw(lambda: fstore.Store([self.etcd.url]).get(fstore.POLICY_KEY)[0])

    def put_policy(self, raw: bytes) -> None:
        """What an attacker with write access to etcd (and no trusted key) can do."""
        self.in_gw(lambda: fstore.Store([self.etcd.url]).put(fstore.POLICY_KEY, raw))

    def start_agent(self, *args: str) -> int:
        return self.agent.start_fleet(self.etcd.url, GW, f"{self.key}.pub", args=("--metrics", "off", *args),
                                      env={"BULKHEAD_FLEET_TTL": str(TTL)})

    def connects(self) -> int:
        """How often the agents of this module connected to etcd (each opens one watch)."""
        return self.agent.log_path.read_text().count("fleet: connected to etcd")

    def agent_fleet(self) -> dict:
        return self.agent.status()["fleet"]

    def allows(self, dst: tuple[str, int]) -> bool:
        return self.topo.tcp("prod", *dst).ok

    def enforces(self, to: str) -> None:
        """web reaches `to` and not the other one: the policy published for `to` is in force."""
        other = {"payments": CATALOG, "catalog": PAYMENTS}[to]
        mine = {"payments": PAYMENTS, "catalog": CATALOG}[to]
        assert self.allows(mine), f"web -> {to} refused: {self.agent.log()}"
        assert not self.allows(other), f"web -> {'catalog' if to == 'payments' else 'payments'} allowed"


@pytest.fixture(scope="module")
def fleet(topo, tmp_path_factory):
    base = tmp_path_factory.mktemp("fleet")
    f = Fleet(topo, base)
    try:
        f.etcd.start(base / "etcd")
        f.cli("fleet", "keygen", "--key", str(f.key))
        f.cli("fleet", "keygen", "--key", str(f.other_key))
        yield f
    finally:
        f.agent.cleanup()
        f.etcd.cleanup()


def test_agent_run_options_are_checked():
    """--policy and --etcd are exclusive; --etcd needs --gateway and --trust (exit 2, no root needed)."""
    def run(*args, env=None):
        return subprocess.run([*bulkhead_argv(), "agent", "run", *args], check=False, capture_output=True, text=True,
                              cwd=str(REPO), env={**os.environ, **(env or {})})

    p = run("--policy", "x.yaml", "--etcd", "http://127.0.0.1:1")
    assert p.returncode == 2 and "not both" in p.stderr
    p = run("--metrics", "off")
    assert p.returncode == 2 and "--policy FILE" in p.stderr and "--etcd URL" in p.stderr
    p = run("--etcd", "http://127.0.0.1:1", "--gateway", GW)
    assert p.returncode == 2 and "needs --trust FILE.pub" in p.stderr
    p = run(env={"BULKHEAD_ETCD": "http://127.0.0.1:1"})
    assert p.returncode == 2 and "needs --gateway NAME and --trust FILE.pub" in p.stderr
    p = run("--etcd", "ftp://x", "--gateway", GW, "--trust", "k.pub")
    assert p.returncode == 2 and "bad etcd URL" in p.stderr
    p = run("--policy", "x.yaml", "--trust", "k.pub")
    assert p.returncode == 2 and "go with --etcd" in p.stderr


def test_publish_is_applied_acknowledged_and_enforced(fleet):
    assert fleet.publish("payments") == 1
    fleet.start_agent()
    st = wait_until(fleet.agent_fleet, lambda s: not s["stale"])
    assert st and st["revision"] == 1 and st["connected"] and st["error"] is None, fleet.agent_fleet()
    assert st["gateway"] == GW and st["etcd"] == [fleet.etcd.url]
    # Only this gateway's segments are attached.
    assert sorted(i["name"] for i in fleet.agent.status()["interfaces"]) == ["bh-core", "bh-dev", "bh-prod"]
    gw = wait_until(fleet.gateway, lambda g: g.get("applied_revision") == 1 and not g["stale"])
    assert gw and gw["alive"] and gw["error"] is None, fleet.fleet_status()
    fleet.enforces("payments")
    text = fleet.agent.cli("status").stdout
    assert f"fleet: gateway {GW}, revision 1, etcd {fleet.etcd.url} connected" in text, text
    # The cache is the envelope as published, private to root.
    cache = fleet.base / "state" / "fleet" / "last.envelope"
    assert cache.read_bytes() == fleet.get_policy() and cache.stat().st_mode & 0o777 == 0o600


def test_local_apply_is_refused_on_a_fleet_agent(fleet):
    p = fleet.agent.apply(fleet.write(policy_doc("catalog")))
    assert p.returncode == 1 and "follows the fleet" in p.stderr and "bulkhead fleet publish" in p.stderr, p
    fleet.enforces("payments")


def test_second_publish_is_followed_without_restart(fleet):
    pid = fleet.agent.status()["pid"]
    assert fleet.publish("catalog") == 2
    assert wait_for(lambda: fleet.agent_fleet()["revision"] == 2), fleet.agent_fleet()
    assert fleet.agent.status()["pid"] == pid and fleet.agent.running()
    fleet.enforces("catalog")
    assert wait_for(lambda: fleet.gateway().get("applied_revision") == 2), fleet.fleet_status()
    # Followed on the one watch it opened at start, not by reconnecting.
    assert fleet.connects() == 1, fleet.agent.log()


def test_untrusted_key_and_other_gateway_are_refused(fleet):
    rev = fleet.publish("payments", key=fleet.other_key)
    assert rev == 3
    st = wait_until(fleet.agent_fleet, lambda s: s["error"])
    assert st and "not the trusted key" in st["error"] and st["revision"] == 2, fleet.agent_fleet()
    gw = wait_until(fleet.gateway, lambda g: g.get("error"))
    assert "not the trusted key" in gw["error"] and gw["applied_revision"] == 2 and gw["alive"]
    fleet.enforces("catalog")
    # Signed with the trusted key but for another gateway only: nothing of it is ours.
    assert fleet.publish("payments", gateway="gw9") == 4
    assert wait_for(lambda: "'gw1' is not in this policy" in (fleet.agent_fleet()["error"] or "")), \
        fleet.agent_fleet()
    assert fleet.agent_fleet()["revision"] == 2
    fleet.enforces("catalog")


def test_a_bundle_the_data_path_refuses_is_a_refusal(fleet):
    """Verified and newer, but not applicable here (an interface this gateway lacks): refused,
    acknowledged with the data path's reason; the old policy stays."""
    assert fleet.publish("payments", core_ifs=("bh-nope",)) == 5
    st = wait_until(fleet.agent_fleet, lambda s: "bh-nope" in (s["error"] or ""))
    assert "revision 5: apply failed: interfaces not found" in (st["error"] or ""), st
    assert st["revision"] == 2
    gw = wait_until(fleet.gateway, lambda g: "bh-nope" in (g.get("error") or ""))
    assert gw["applied_revision"] == 2 and "apply failed" in gw["error"], gw
    fleet.enforces("catalog")
    assert fleet.topo.run("gw", ["ip", "link", "show", "bh-nope"], check=False).returncode != 0  # really absent


def test_replayed_envelope_is_refused_and_the_next_publish_applies(fleet):
    # A validly signed envelope of an older revision, as an attacker would write it back.
    key = load_private(fleet.key)
    bundle, _ = load_policy([str(fleet.write(policy_doc("payments")))])
    old = seal(bundle.pack(), 1, key)
    fleet.put_policy(old)
    st = wait_until(fleet.agent_fleet, lambda s: "replay" in (s["error"] or ""))
    assert st and "revision 1 is not above the applied 2 (replay?)" in st["error"], fleet.agent_fleet()
    gw = wait_until(fleet.gateway, lambda g: "replay" in (g.get("error") or ""))
    assert gw and gw["applied_revision"] == 2
    fleet.enforces("catalog")
    # The operator's next publish is above everything seen, so it applies.
    assert fleet.publish("payments") == 6
    st = wait_until(fleet.agent_fleet, lambda s: s["revision"] == 6)
    assert st and st["error"] is None, fleet.agent_fleet()
    fleet.enforces("payments")


def test_etcd_down_enforcement_stays_and_a_restart_comes_up_stale(fleet):
    # History compacted past the policy key's last change (acks wrote after it), as etcd's
    # auto-compaction does: the agent's watch after the outage must start from the store's
    # revision, not from the key's mod_revision, which is gone (catch-up would never come).
    rev = fleet.in_gw(lambda: fstore.Store([fleet.etcd.url]).get_rev(fstore.POLICY_KEY))
    assert rev[1] < rev[2], rev
    fleet.cli_ns(["etcdctl", "--endpoints", fleet.etcd.url, "compact", str(rev[2])])
    fleet.etcd.stop()
    st = wait_until(fleet.agent_fleet, lambda s: not s["connected"])
    assert st and st["stale"] and st["revision"] == 6 and st["etcd_error"], fleet.agent_fleet()
    fleet.enforces("payments")
    assert "unreachable" in fleet.agent.cli("status").stdout

    assert fleet.agent.stop() == 0
    fleet.enforces("payments")  # no agent: XDP keeps enforcing
    fleet.start_agent()
    st = fleet.agent_fleet()
    assert st["revision"] == 6 and st["stale"] and not st["connected"], st
    fleet.enforces("payments")
    assert "(stale: etcd has not confirmed it)" in fleet.agent.cli("status").stdout


def test_tampered_cache_is_never_used(fleet):
    """No verified policy and no etcd: exit 1 after --etcd-wait, saying so; enforcement unchanged."""
    assert fleet.agent.stop() == 0
    cache = fleet.base / "state" / "fleet" / "last.envelope"
    good = cache.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01  # inside the bundle: the signature no longer covers it
    cache.write_bytes(bytes(bad))
    try:
        p = fleet.topo.run("gw", [*bulkhead_argv(), "agent", "run", "--state-dir", fleet.agent.state_dir,
                                  "--metrics", "off", "--etcd-wait", "1",
                                  *fleet_args(fleet.etcd.url, GW, f"{fleet.key}.pub")],
                           check=False, cwd=str(REPO), timeout=60)
    finally:
        cache.write_bytes(good)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "refused, not used" in p.stderr
    assert f"no verified policy in {fleet.agent.state_dir}/fleet and etcd unreachable at {fleet.etcd.url}" \
        in p.stderr, p.stderr
    fleet.enforces("payments")
    fleet.start_agent()
    assert fleet.agent_fleet()["revision"] == 6


def test_etcd_back_the_agent_catches_up_without_restart(fleet):
    pid = fleet.agent.status()["pid"]
    connects = fleet.connects()
    fleet.etcd.start()
    # Reconnecting backs off up to 5 s between tries.
    st = wait_until(fleet.agent_fleet, lambda s: s["connected"] and not s["stale"], timeout=30)
    assert st["connected"] and not st["stale"] and st["revision"] == 6, st
    assert fleet.publish("catalog") == 7
    assert wait_for(lambda: fleet.agent_fleet()["revision"] == 7), fleet.agent_fleet()
    assert fleet.agent.status()["pid"] == pid
    fleet.enforces("catalog")
    # One reconnect, then the watch: not a loop of re-reads (a watch from a compacted revision).
    assert fleet.connects() == connects + 1, fleet.agent.log()
    gw = wait_until(fleet.gateway, lambda g: g.get("applied_revision") == 7)
    assert gw["applied_revision"] == 7 and gw["alive"] and not gw["stale"] and gw["error"] is None
    p = fleet.cli("fleet", "status", "--etcd", fleet.etcd.url, "--wait", "7", "--timeout", "10")
    assert p.returncode == 0


def test_killed_agent_is_not_alive_within_the_ttl(fleet):
    assert fleet.gateway()["alive"]
    fleet.agent.stop(signal.SIGKILL)
    gw = wait_until(fleet.gateway, lambda g: not g["alive"], timeout=TTL * 4)
    assert gw and not gw["alive"] and gw["applied_revision"] == 7, fleet.fleet_status()
    fleet.enforces("catalog")  # a dead agent's policy stays in force
    # fleet status --wait: no live gateway is not "done"
    p = fleet.cli("fleet", "status", "--etcd", fleet.etcd.url, "--wait", "7", "--timeout", "0", check=False)
    assert p.returncode == 1


def test_a_key_rotation_overlaps_the_old_and_the_new_key(fleet):
    """--trust twice: envelopes of either key apply, so a rotation never refuses a policy."""
    if fleet.agent.running():
        fleet.agent.stop()
    fleet.start_agent("--trust", f"{fleet.other_key}.pub")
    assert wait_for(lambda: fleet.agent_fleet()["revision"] == 7), fleet.agent_fleet()
    assert fleet.publish("payments", key=fleet.other_key) == 8  # the new key
    assert wait_for(lambda: fleet.agent_fleet()["revision"] == 8), fleet.agent_fleet()
    assert fleet.agent_fleet()["error"] is None
    fleet.enforces("payments")
    assert fleet.publish("catalog", key=fleet.key) == 9  # the old one still verifies meanwhile
    assert wait_for(lambda: fleet.agent_fleet()["revision"] == 9), fleet.agent_fleet()
    fleet.enforces("catalog")
    assert "," in fleet.agent_fleet()["key_id"]  # both key ids, as status shows them


def test_a_start_that_fails_on_the_fleets_policy_says_why_in_etcd(fleet, tmp_path):
    """A fresh agent whose first policy can't be enforced here (an interface this gateway lacks)
    exits 1, removes what it made, and the reason reaches `fleet status`."""
    fleet.agent.stop()
    before = fleet.gateway()["applied_revision"]
    rev = fleet.publish("payments", core_ifs=("bh-nothere",))
    second = AgentRunner(fleet.topo, tmp_path / "state2")
    try:
        with pytest.raises(RuntimeError, match="did not become ready"):
            second.start_fleet(fleet.etcd.url, GW, f"{fleet.key}.pub", args=("--metrics", "off"), timeout=120)
        gw = wait_until(fleet.gateway, lambda g: "agent start failed" in (g.get("error") or ""))
        assert "bh-nothere" in gw["error"], gw
        assert gw["applied_revision"] == before != rev  # what the stopped agent left still enforces
        assert not (loader.PIN_ROOT / loader.instance_name(tmp_path / "state2")).exists()
    finally:
        second.cleanup()
