"""Two gateways following one signed policy through one etcd (issue 14), with real traffic.

agent/lab/fleetlab.py builds two full lab topologies (gw-a, gw-b: each its own gw, prod, dev
and core namespaces), an agent per gateway in its gateway namespace with its own state and pin
dir, and etcd in a namespace of its own with a veth to each gateway. The policy gives each
gateway its own segments and opposite rules, so a gateway enforcing the other's half (or the
wrong revision) shows in its traffic:

    A: gw-a's web may reach its payments, is rejected (RST) by its catalog; gw-b the other way
    B: the same, swapped

The tests run in order, each from where the last left the fleet: publish A and see both
acknowledge and enforce it; publish B, both follow; publish with a key no agent trusts and
replay revision 1's envelope: both refused everywhere, B still enforced, status says why;
stop etcd: B still enforced, an agent restarted comes up stale from its state dir; start etcd:
a new publish reaches both; rotate the signing key as docs/fleet.md says; kill an agent: status
says it is not alive.
"""
from __future__ import annotations

import base64
import json
import signal
import time
import urllib.request

import pytest

from bulkhead.lab.fleetlab import FleetLab
from bulkhead.lab.topology import in_netns, reap_stale

GATEWAYS = ["gw-a", "gw-b"]
TTL = 3  # the agents' lease (BULKHEAD_FLEET_TTL): a killed agent is "not alive" within it
WAIT = 30  # `fleet status --wait` timeout, and how long a state change is waited for
DENY = 1.0  # seconds a probe waits (the denials here are rejects: they answer at once)


def policy(lab: FleetLab, variant: str) -> str:
    return str(lab.write_policy(variant))


def assert_enforces(lab: FleetLab, variant: str) -> None:
    assert lab.traffic(timeout=DENY) == lab.want(variant), f"traffic is not what policy {variant} says"


def gateways(lab: FleetLab) -> dict[str, dict]:
    return {g["name"]: g for g in lab.status()["gateways"]}


def wait_for(cond, timeout: float = WAIT, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    return cond()


def etcd_kv(lab: FleetLab, op: str, body: dict) -> dict:
    """etcd's JSON gateway (/v3/kv/OP) from the etcd namespace: the raw key, as an attacker
    with write access to etcd sees it, not through bulkhead's client."""
    def call() -> dict:
        req = urllib.request.Request(f"{lab.url}/v3/kv/{op}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    return in_netns(lab.etcd_ns, call)


def etcd_get(lab: FleetLab, key: str) -> bytes:
    r = etcd_kv(lab, "range", {"key": base64.b64encode(key.encode()).decode()})
    return base64.b64decode(r["kvs"][0]["value"])


def etcd_put(lab: FleetLab, key: str, value: bytes) -> None:
    etcd_kv(lab, "put", {"key": base64.b64encode(key.encode()).decode(),
                         "value": base64.b64encode(value).decode()})


POLICY_KEY = "/bulkhead/v1/policy"


@pytest.fixture(scope="module")
def lab():
    reap_stale(("bht",))
    fl = FleetLab(GATEWAYS, kind="bht")
    try:
        fl.create()
        fl.key = fl.keygen("fleet.key")
        fl.revs = {}
        yield fl
    finally:
        fl.destroy()


def start_agent(lab: FleetLab, name: str) -> None:
    lab.start_agent(name, f"{lab.key}.pub", env={"BULKHEAD_FLEET_TTL": str(TTL)})


def test_publish_every_gateway_acknowledges_and_enforces(lab):
    rev = lab.publish(policy(lab, "A"), lab.key)
    lab.revs["A"] = rev
    lab.envelope_a = etcd_get(lab, POLICY_KEY)  # replayed later
    for name in lab.gateways:
        start_agent(lab, name)
    p = lab.wait(rev, timeout=WAIT)
    assert p.returncode == 0, f"fleet status --wait {rev}: {p.stdout}{p.stderr}"
    gws = gateways(lab)
    for name in lab.gateways:
        g = gws[name]
        assert (g["alive"], g["applied_revision"], g["stale"], g["error"]) == (True, rev, False, None), g
    assert_enforces(lab, "A")


def test_a_change_is_followed_by_all(lab):
    rev = lab.publish(policy(lab, "B"), lab.key)
    assert rev > lab.revs["A"]
    lab.revs["B"] = rev
    p = lab.wait(rev, timeout=WAIT)
    assert p.returncode == 0, f"fleet status --wait {rev}: {p.stdout}{p.stderr}"
    assert_enforces(lab, "B")
    digests = {g["digest"] for g in (gw.agent.status()["fleet"] for gw in lab.gateways.values())}
    assert len(digests) == 1, "both gateways run the same bundle"


def test_an_untrusted_key_is_refused_everywhere(lab):
    rogue = lab.keygen("rogue.key")
    rev = lab.publish(policy(lab, "A"), rogue)  # etcd takes it: only the agents can say no
    assert rev > lab.revs["B"]
    refused = wait_for(lambda: all(g["error"] and "not the trusted key" in g["error"]
                                   for g in gateways(lab).values()) and gateways(lab))
    assert refused, f"not refused on every gateway: {gateways(lab)}"
    for g in refused.values():
        assert g["applied_revision"] == lab.revs["B"] and g["alive"], g
    # --wait for the rogue revision cannot succeed: nobody applied it.
    p = lab.wait(rev, timeout=2)
    assert p.returncode == 1, p.stdout + p.stderr
    assert_enforces(lab, "B")


def test_a_replayed_old_envelope_is_refused(lab):
    etcd_put(lab, POLICY_KEY, lab.envelope_a)  # validly signed, revision 1: a rollback attempt
    refused = wait_for(lambda: all(g["error"] and "not above the applied" in g["error"]
                                   for g in gateways(lab).values()) and gateways(lab))
    assert refused, f"replay not refused on every gateway: {gateways(lab)}"
    for g in refused.values():
        assert g["applied_revision"] == lab.revs["B"], g
    assert_enforces(lab, "B")


def test_etcd_down_enforcement_unchanged_and_a_restarted_agent_comes_up_stale(lab):
    lab.etcd.stop()
    gw_a, gw_b = lab.gateways["gw-a"], lab.gateways["gw-b"]
    assert wait_for(lambda: gw_b.agent.status()["fleet"]["stale"]), gw_b.agent.status()["fleet"]
    assert_enforces(lab, "B")
    gw_a.agent.stop()
    assert_enforces(lab, "B")  # no agent: the pinned programs go on
    start_agent(lab, "gw-a")  # etcd is away: only its state dir can start it
    fleet = gw_a.agent.status()["fleet"]
    assert (fleet["revision"], fleet["stale"], fleet["connected"]) == (lab.revs["B"], True, False), fleet
    assert_enforces(lab, "B")
    p = lab.fleet("status", "--json")
    assert p.returncode == 1 and lab.url in p.stderr, p.stdout + p.stderr


def test_etcd_back_a_new_publish_reaches_everyone(lab):
    lab.etcd.start()
    rev = lab.publish(policy(lab, "A"), lab.key)
    assert rev > lab.revs["B"] + 1  # above the rogue revision too
    p = lab.wait(rev, timeout=WAIT)
    assert p.returncode == 0, f"fleet status --wait {rev}: {p.stdout}{p.stderr}"
    gws = gateways(lab)
    for name in lab.gateways:
        g = gws[name]
        assert (g["alive"], g["applied_revision"], g["stale"], g["error"]) == (True, rev, False, None), g
    assert_enforces(lab, "A")
    lab.revs["A2"] = rev


def test_key_rotation_publish_with_the_new_key_then_restart_with_the_new_trust(lab):
    """docs/fleet.md's rotation with one trusted key: the new key's publish is refused by agents
    that trust the old one, and taken by each once it restarts trusting the new one."""
    new = lab.keygen("fleet-2.key")
    rev = lab.publish(policy(lab, "B"), new)
    refused = wait_for(lambda: all(g["error"] and "not the trusted key" in g["error"]
                                   for g in gateways(lab).values()) and gateways(lab))
    assert refused, f"the new key's bundle was not refused on every gateway: {gateways(lab)}"
    assert_enforces(lab, "A")
    for name, gw in lab.gateways.items():
        gw.agent.stop()
        lab.start_agent(name, f"{new}.pub", env={"BULKHEAD_FLEET_TTL": str(TTL)})
        fleet = gw.agent.status()["fleet"]
        assert fleet["revision"] == rev, f"{name} restarted with the new trust: {fleet}"
    p = lab.wait(rev, timeout=WAIT)
    assert p.returncode == 0, f"fleet status --wait {rev}: {p.stdout}{p.stderr}"
    assert all(g["error"] is None for g in gateways(lab).values()), gateways(lab)
    assert_enforces(lab, "B")
    lab.revs["rotated"] = rev


def test_a_killed_agent_is_not_alive(lab):
    gw_b = lab.gateways["gw-b"]
    gw_b.agent.stop(signal.SIGKILL)
    dead = wait_for(lambda: not gateways(lab)["gw-b"]["alive"] and gateways(lab))
    assert dead, gateways(lab)
    assert dead["gw-a"]["alive"] and dead["gw-b"]["applied_revision"] == lab.revs["rotated"], dead
    # Only live gateways are waited for: the dead one does not block a rollout.
    p = lab.wait(lab.revs["rotated"], timeout=WAIT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_enforces(lab, "B")  # gw-b's data path outlives its agent
