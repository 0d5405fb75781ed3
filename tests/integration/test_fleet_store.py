"""The fleet's store side against a real etcd: publish, revisions, status, failover, watches.

One etcd (agent/lab/etcd.py: the distribution's binary on 127.0.0.1, free ports, a temporary
data dir) serves the module; every test starts from an empty /bulkhead/v1/ and the server is
stopped and its dir removed at the end, also when a test fails. Gateways are simulated by
writing their status keys and lease-bound alive keys as an agent does (the agent itself is
tests/integration/test_fleet_gateways.py's). The CLI runs as a real process, so its exit codes
and messages are the ones an operator gets.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest
from bulkhead.fleet import envelope, keys, publish
from bulkhead.fleet.status import fleet_status
from bulkhead.fleet.store import (
    GATEWAYS_PREFIX,
    POLICY_KEY,
    PREFIX,
    REVISION_KEY,
    FleetStoreError,
    Store,
    WatchCompacted,
    alive_key,
    status_key,
)
from bulkhead.lab.etcd import EtcdCluster, EtcdServer
from bulkhead.lab.runner import bulkhead_argv
from bulkhead.policy import Bundle, load_policy

POLICY = """\
version: 1
settings:
  default_action: deny
segments:
  - name: prod
    interfaces: [bh-prod]
  - name: core
    interfaces: [bh-core]
apps:
  - name: web
    segment: prod
    addresses: [198.18.1.0/24]
  - name: payments
    segment: core
    addresses: [198.19.0.10/32]
rules:
  - name: web-payments
    from: web
    to: payments
    ports: [tcp/443]
"""
# The same, for three gateways: gw-north has a segment but (in the test) never reports.
FLEET_POLICY = POLICY.replace("segments:\n", "gateways:\n  - name: gw-east\n  - name: gw-north\n"
                              "  - name: gw-west\nsegments:\n").replace(
    "    interfaces: [bh-prod]\n", "    gateway: gw-east\n    interfaces: [bh-prod]\n").replace(
    "    interfaces: [bh-core]\n", "    gateway: gw-east\n    interfaces: [bh-core]\n"
    "  - name: north\n    gateway: gw-north\n    interfaces: [bh-n]\n"
    "  - name: west\n    gateway: gw-west\n    interfaces: [bh-w]\n")
WAIT = 30.0  # seconds a condition that must come true is given (a bound, not a measurement)


@pytest.fixture(scope="module")
def etcd():
    server = EtcdServer(name="bhtest")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
    assert not server.running()


@pytest.fixture
def store(etcd):
    s = Store([etcd.url])
    s.delete(PREFIX, prefix=True)
    return s


@pytest.fixture
def key(tmp_path):
    priv, pub = keys.keygen(tmp_path / "fleet.key")
    return priv, pub


@pytest.fixture
def policy_file(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    return p


def cli(*args: str, etcd: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("BULKHEAD_ETCD", None)
    if etcd is not None:
        env["BULKHEAD_ETCD"] = etcd  # the default of every --etcd
    return subprocess.run([*bulkhead_argv(), "fleet", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def dead_url() -> str:
    """A loopback port nothing listens on (bound, then closed: connect is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def report(store: Store, name: str, applied: int | None, lease: int | None = None, error=None,
           stale=False) -> None:
    """What an agent writes: its status (persistent) and, if a lease is given, its alive key."""
    store.put(status_key(name), json.dumps({
        "name": name, "applied_revision": applied, "digest": None, "stale": stale, "error": error,
        "updated": time.time(), "agent": f"test/{os.getpid()}"}))
    if lease is not None:
        store.put(alive_key(name), "1", lease=lease)


def until(cond, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


# ---------------------------------------------------------------- publish
def test_publish_writes_revision_1_then_2_signed_and_verifiable(store, etcd, key, policy_file):
    priv, pub = key
    for n in (1, 2):
        r = cli("publish", str(policy_file), "--etcd", etcd.url, "--key", str(priv))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"revision {n}"
        raw, _ = store.get(POLICY_KEY)
        sealed = envelope.open_verified(raw, keys.load_public(pub))
        assert sealed.revision == n
        assert store.get(REVISION_KEY)[0] == str(n).encode()
    bundle, _ = load_policy([str(policy_file)])
    assert Bundle.unpack(sealed.bundle).checksum == bundle.checksum
    assert sealed.key_id == keys.key_id(keys.load_public(pub))


def test_publish_json_and_the_etcd_env_var(store, etcd, key, policy_file):
    r = cli("publish", str(policy_file), "--key", str(key[0]), "--json", etcd=etcd.url)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["revision"] == 1 and out["envelope_bytes"] > 0 and out["bundle_bytes"] > 0


def test_publish_of_an_invalid_policy_exits_2_with_file_line_and_writes_nothing(store, etcd, key,
                                                                                 policy_file, tmp_path):
    assert cli("publish", str(policy_file), "--etcd", etcd.url, "--key", str(key[0])).returncode == 0
    before = store.get_prefix(PREFIX)
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("    from: web\n", "    from: nosuchapp\n"))
    r = cli("publish", str(bad), "--etcd", etcd.url, "--key", str(key[0]))
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = POLICY.splitlines().index("    from: web") + 1
    assert f"{bad}:{line}:" in r.stdout and "nosuchapp" in r.stdout
    assert "nothing was written" in r.stderr
    assert store.get_prefix(PREFIX) == before  # same keys, values and mod revisions


def test_publish_with_an_unreadable_key_is_bad_input_and_writes_nothing(store, etcd, key, policy_file):
    r = cli("publish", str(policy_file), "--etcd", etcd.url, "--key", str(key[1]))  # the .pub
    assert r.returncode == 2 and "this is a public key" in r.stderr
    assert store.get_prefix(PREFIX) == []


def test_concurrent_publishers_get_distinct_consecutive_revisions(etcd, store, key, policy_file):
    """Two publishers that read the same highest revision: the transaction lets one win, the
    other re-reads and takes the next; many racing threads never share a revision."""
    bundle, _ = load_policy([str(policy_file)])
    priv = keys.load_private(key[0])
    both_read = threading.Barrier(2, timeout=WAIT)

    class RacingStore(Store):
        raced = False

        def put_if_unchanged(self, *a, **kw):
            if not self.raced:
                self.raced = True
                both_read.wait()  # both have read "highest 0" before either writes
            return super().put_if_unchanged(*a, **kw)

    results: list = []

    def one():
        results.append(publish.publish_bundle(RacingStore([etcd.url]), bundle, priv))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.revision for p in results) == [1, 2]
    assert sorted(p.tries for p in results) == [1, 2]  # the loser retried, once

    # Many at once, each with its own client: distinct revisions, none lost.
    results.clear()

    def many():
        s = Store([etcd.url])
        for _ in range(5):
            results.append(publish.publish_bundle(s, bundle, priv))

    threads = [threading.Thread(target=many) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    revs = sorted(p.revision for p in results)
    assert revs == list(range(3, 33))
    assert store.get(REVISION_KEY)[0] == b"32"
    assert envelope.peek_revision(store.get(POLICY_KEY)[0]) == 32


def test_concurrent_cli_publishes_get_distinct_revisions(etcd, store, key, policy_file):
    procs = [subprocess.Popen([*bulkhead_argv(), "fleet", "publish", str(policy_file), "--etcd", etcd.url,
                               "--key", str(key[0])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(o.strip() for o, _ in outs) == [f"revision {n}" for n in (1, 2, 3, 4)]


def test_a_replayed_old_envelope_does_not_lower_the_next_revision(etcd, store, key, policy_file):
    """An attacker with etcd write access puts revision 1's envelope back and resets the
    revision key; the agents refuse it (they applied 2). The operator's next publish must be
    above 2, or every agent would refuse it as a replay too."""
    priv = str(key[0])
    for _ in range(2):
        assert cli("publish", str(policy_file), "--etcd", etcd.url, "--key", priv).returncode == 0
    # what revision 1 looked like, re-made the way it was (signed, genuine, just old)
    old = envelope.seal(load_policy([str(policy_file)])[0].pack(), 1, keys.load_private(priv))
    store.put(POLICY_KEY, old)
    store.put(REVISION_KEY, "1")
    lease = store.lease(10)
    try:
        report(store, "gw-east", 2, lease=lease, error="revision 1 is not above the applied 2 (replay?)")
        r = cli("publish", str(policy_file), "--etcd", etcd.url, "--key", priv)
        assert r.stdout.strip() == "revision 3", r.stderr
        # The revision key gone altogether and a gateway that had applied more than etcd remembers
        # (etcd restored from an old backup): still above what every agent applied.
        store.delete(REVISION_KEY)
        store.put(POLICY_KEY, old)
        report(store, "gw-west", 7)
        r = cli("publish", str(policy_file), "--etcd", etcd.url, "--key", priv)
        assert r.stdout.strip() == "revision 8", r.stderr
        # A garbled revision key is only one floor among the others.
        store.put(REVISION_KEY, "not a number")
        assert publish.highest_seen(store)[0] == 8
    finally:
        store.revoke(lease)


# ---------------------------------------------------------------- status
def test_status_lists_reported_and_policy_named_gateways(etcd, store, key, policy_file):
    assert cli("publish", str(policy_file), "--etcd", etcd.url, "--key", str(key[0])).returncode == 0
    fleet_policy = policy_file.with_name("fleet.yaml")
    fleet_policy.write_text(FLEET_POLICY)
    r = cli("publish", str(fleet_policy), "--etcd", etcd.url, "--key", str(key[0]), "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["gateways"] == ["gw-east", "gw-north", "gw-west"]
    lease = store.lease(10)
    try:
        report(store, "gw-east", 2, lease=lease)
        report(store, "gw-west", 1, error="signature invalid (revision 9 claims key abc)")
        r = cli("status", "--etcd", etcd.url, "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["revision"] == 2
        gws = {g["name"]: g for g in st["gateways"]}
        assert sorted(gws) == ["gw-east", "gw-north", "gw-west"]
        assert {k: gws["gw-east"][k] for k in ("alive", "applied_revision", "stale", "error")} == \
            {"alive": True, "applied_revision": 2, "stale": False, "error": None}
        assert gws["gw-west"]["alive"] is False and gws["gw-west"]["error"].startswith("signature invalid")
        assert gws["gw-north"]["alive"] is False and gws["gw-north"]["applied_revision"] is None
        text = cli("status", "--etcd", etcd.url).stdout
        assert "revision 2" in text
        assert "never reported" in text and "signature invalid" in text and "NOT ALIVE" in text
    finally:
        store.revoke(lease)


def test_alive_follows_the_lease(etcd, store):
    """An agent that stops keeping its lease alive (killed) shows not alive once the TTL runs out;
    its persistent status stays, so the operator still sees what it last applied."""
    lease = store.lease(2)
    report(store, "gw-east", 4, lease=lease)
    assert fleet_status(store)["gateways"][0]["alive"] is True
    assert store.refresh(lease) > 0
    # no more keepalives: etcd ends the lease and deletes the alive key with it
    until(lambda: not fleet_status(store)["gateways"][0]["alive"], "the alive key gone after the TTL")
    g = fleet_status(store)["gateways"][0]
    assert (g["name"], g["applied_revision"]) == ("gw-east", 4)
    assert store.refresh(lease) == -1  # an expired lease says so (the agent then grants a new one)


def test_status_wait_exits_0_when_every_live_gateway_applied_and_1_at_the_timeout(etcd, store):
    store.put(REVISION_KEY, "3")
    lease = store.lease(10)
    try:
        report(store, "gw-east", 3, lease=lease)
        report(store, "gw-dead", 1)  # no alive key: not counted
        r = cli("status", "--etcd", etcd.url, "--wait", "3", "--timeout", "5")
        assert r.returncode == 0, (r.stdout, r.stderr)
        r = cli("status", "--etcd", etcd.url, "--wait", "4", "--timeout", "0.5", "--json")
        assert r.returncode == 1
        assert json.loads(r.stdout)["wait"] == {"revision": 4, "done": False}
        r = cli("status", "--etcd", etcd.url, "--wait", "4", "--timeout", "0.5")
        assert r.returncode == 1 and "behind: gw-east" in r.stderr

        # Waiting, then the gateway catches up: --wait returns 0 without running out its timeout.
        p = subprocess.Popen([*bulkhead_argv(), "fleet", "status", "--etcd", etcd.url, "--wait", "4",
                              "--timeout", str(WAIT * 2)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            report(store, "gw-east", 4, lease=lease)
            out, err = p.communicate(timeout=WAIT * 3)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, (out, err)
    finally:
        store.revoke(lease)
    # No live gateway at all is not "every gateway applied".
    r = cli("status", "--etcd", etcd.url, "--wait", "1", "--timeout", "0.3")
    assert r.returncode == 1 and "no live gateway" in r.stderr


# ---------------------------------------------------------------- etcd away, several members
def test_etcd_unreachable_exits_1_naming_the_url(key, policy_file):
    url = dead_url()
    for args in (("status",), ("publish", str(policy_file), "--key", str(key[0]))):
        r = cli(*args, "--etcd", url)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "etcd unreachable" in r.stderr and url in r.stderr


def test_a_stopped_etcd_is_unreachable_and_comes_back_with_its_data(tmp_path, key, policy_file):
    server = EtcdServer(name="bhstop")
    try:
        server.start(tmp_path / "etcd")
        assert cli("publish", str(policy_file), "--etcd", server.url, "--key", str(key[0])).returncode == 0
        server.stop()
        r = cli("status", "--etcd", server.url)
        assert r.returncode == 1 and server.url in r.stderr
        server.start()
        r = cli("publish", str(policy_file), "--etcd", server.url, "--key", str(key[0]))
        assert r.stdout.strip() == "revision 2", r.stderr
    finally:
        server.cleanup()
    assert not server.running() and (tmp_path / "etcd").exists()  # a given data dir is the caller's


def test_several_urls_with_the_first_dead_still_work(etcd, store, key, policy_file):
    urls = f"{dead_url()},{etcd.url}"
    r = cli("publish", str(policy_file), "--etcd", urls, "--key", str(key[0]))
    assert r.returncode == 0 and r.stdout.strip() == "revision 1", r.stderr
    r = cli("status", "--json", etcd=urls)
    assert r.returncode == 0 and json.loads(r.stdout)["revision"] == 1
    s = Store(urls)
    it, cancel = s.watch(POLICY_KEY, start_revision=1)
    try:
        assert envelope.peek_revision(next(it).value) == 1
    finally:
        cancel()


def test_a_three_member_cluster_keeps_serving_with_a_member_down(key, policy_file):
    """The etcd a production fleet runs: a member dies, the others have the data and a quorum;
    with two down there is no quorum, and the error names every member."""
    cluster = EtcdCluster(3, name="bhclu")
    try:
        cluster.start()
        urls = ",".join(cluster.urls)
        assert cli("publish", str(policy_file), "--etcd", urls, "--key", str(key[0])).returncode == 0
        s = Store(cluster.urls)
        it, cancel = s.watch(POLICY_KEY, start_revision=s.get_rev(POLICY_KEY)[2] + 1)
        cluster.members[0].kill()  # the member the store (and its watch) used first
        with pytest.raises(FleetStoreError, match="watch stream"):
            next(it)
        cancel()
        r = cli("publish", str(policy_file), "--etcd", urls, "--key", str(key[0]))
        assert r.stdout.strip() == "revision 2", r.stderr
        _, _, rev = s.get_rev(POLICY_KEY)  # a watch again, now on a live member
        it, cancel = s.watch(POLICY_KEY, start_revision=rev)
        try:
            assert envelope.peek_revision(next(it).value) == 2
        finally:
            cancel()
        cluster.members[1].kill()
        r = cli("status", "--etcd", urls)
        assert r.returncode == 1 and "etcd unreachable" in r.stderr
        assert all(u in r.stderr for u in cluster.urls)
    finally:
        cluster.cleanup()
    assert not any(m.running() for m in cluster.members)


# ---------------------------------------------------------------- watches (what the follower uses)
def test_watch_sees_every_put_from_the_start_revision_and_ends_on_cancel(store):
    _, _, rev = store.get_rev(POLICY_KEY)
    it, cancel = store.watch(POLICY_KEY, start_revision=rev + 1)
    got = []
    try:
        for n in (1, 2, 3):
            store.put(POLICY_KEY, f"v{n}")
        for ev in it:
            got.append((ev.type, ev.value))
            if len(got) == 3:
                break
    finally:
        cancel()
    assert got == [("PUT", b"v1"), ("PUT", b"v2"), ("PUT", b"v3")]
    assert list(it) == []  # cancelled: the iterator ends, it does not hang


def test_cancel_unblocks_a_watch_waiting_in_another_thread(store):
    it, cancel = store.watch(POLICY_KEY)
    done = threading.Event()
    caught: list = []

    def reader():
        try:
            caught.extend(it)
        except BaseException as e:  # a cancel must not look like a broken stream
            caught.append(e)
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    cancel()
    assert done.wait(WAIT), "cancel() left the reader blocked"
    assert caught == []


def test_a_prefix_watch_sees_gateways_come_and_go(store):
    _, _, rev = store.get_rev(GATEWAYS_PREFIX)
    it, cancel = store.watch(GATEWAYS_PREFIX, start_revision=rev + 1, prefix=True)
    try:
        lease = store.lease(5)
        store.put(alive_key("gw-a"), "1", lease=lease)
        store.revoke(lease)
        evs = [next(it), next(it)]
    finally:
        cancel()
    assert [(e.type, e.key) for e in evs] == [("PUT", alive_key("gw-a")), ("DELETE", alive_key("gw-a"))]


def test_a_watch_raises_when_etcd_goes_away(tmp_path):
    server = EtcdServer(name="bhwatch")
    try:
        server.start(tmp_path / "etcd")
        it, cancel = Store([server.url]).watch(POLICY_KEY)
        server.kill()
        with pytest.raises(FleetStoreError, match="watch stream"):
            next(it)
        cancel()
    finally:
        server.cleanup()


def test_a_watch_from_a_compacted_revision_says_so(store):
    for n in range(3):
        store.put(POLICY_KEY, f"v{n}")
    _, _, rev = store.get_rev(POLICY_KEY)
    store._post("/kv/compaction", {"revision": rev, "physical": True})
    it, cancel = store.watch(POLICY_KEY, start_revision=rev - 2)
    try:
        with pytest.raises(WatchCompacted) as ei:
            next(it)
        assert ei.value.compact_revision == rev
    finally:
        cancel()
    # What a watcher must do: watch from the store revision of its read (get_rev's third value),
    # not from the key's mod_revision, which other keys' writes leave below the compaction.
    store.put(status_key("gw-a"), "{}")
    store._post("/kv/compaction", {"revision": store.get_rev(POLICY_KEY)[2], "physical": True})
    _, mod, rev = store.get_rev(POLICY_KEY)
    assert mod < rev
    it, cancel = store.watch(POLICY_KEY, start_revision=rev + 1)
    try:
        store.put(POLICY_KEY, "after")
        assert next(it).value == b"after"
    finally:
        cancel()


def test_a_publish_keeps_the_service_addresses_of_the_published_policy(store, etcd, key, tmp_path):
    """docs/fabric.md: the publisher reads the allocation back from the store (verified with its
    own key), so an app keeps its address even where a newcomer's name-derived place is the same."""
    import ipaddress

    from bulkhead.policy.vips import _place, _usable

    priv, pub = key
    pool = ipaddress.ip_network("198.19.255.0/30")  # two usable addresses: a collision is easy
    place = lambda name: _place(name, 4, [pool], set())  # noqa: E731
    newcomer = next(f"app{i}" for i in range(100) if place(f"app{i}") == place("payments"))

    def policy(first: str | None) -> str:
        doc = POLICY.replace("rules:", "fabric:\n  service_addresses: [198.19.255.0/30]\nrules:")
        doc = doc.replace("    addresses: [198.19.0.10/32]\n",
                          "    addresses: [198.19.0.10/32]\n    publish: [payments.apps.example]\n")
        if first:
            doc = doc.replace("apps:\n", f"apps:\n  - name: {first}\n    segment: core\n"
                                         f"    addresses: [198.19.0.40/32]\n    publish: [{first}.example]\n")
        p = tmp_path / f"p-{first}.yaml"
        p.write_text(doc)
        return str(p)

    def published() -> dict:
        raw, _ = store.get(POLICY_KEY)
        return Bundle.unpack(envelope.open_verified(raw, keys.load_public(pub)).bundle).vips

    assert cli("publish", policy(None), "--etcd", etcd.url, "--key", str(priv)).returncode == 0
    before = published()["payments"]
    assert _usable(pool)[0] <= int(ipaddress.ip_address(before[0])) <= _usable(pool)[1]
    # compiled alone, the newcomer (first in the file) would take payments' place
    alone, _ = load_policy([policy(newcomer)])
    assert alone.vips[newcomer] == before
    r = cli("publish", policy(newcomer), "--etcd", etcd.url, "--key", str(priv))
    assert r.returncode == 0, r.stderr
    after = published()
    assert after["payments"] == before and after[newcomer] != before


# ---------------------------------------------------------------- latency (issue 16)
def _hop_log(pairs: dict[tuple[str, str], tuple[int, float]]):
    """A gateway's HopLog: n HTTP requests per (src, dst), each part `base` ms times its weight."""
    from bulkhead.telemetry.hops import HopLog

    log = HopLog()
    for (src, dst), (n, base) in pairs.items():
        for _ in range(n):
            parts = {"ingress": base, "backbone": 4 * base, "app_vpc": base / 2, "app": 6 * base}
            log.add({"time": time.time(), "src_app": src, "dst_app": dst, "mode": "http",
                     "hops_ms": {**parts, "total": sum(parts.values())}})
    return log


def test_fleet_latency_sums_every_gateways_histograms(etcd, store):
    """Two gateways publish as their agents do (fleet/latency.Publisher, the real store); the CLI
    sums the histograms per app pair: counts add up, percentiles fall in the right buckets."""
    from bulkhead.fleet.latency import Publisher
    from bulkhead.fleet.store import latency_key

    east = _hop_log({("web", "api"): (30, 5.0)})
    west = _hop_log({("web", "api"): (10, 5.0), ("batch", "db"): (4, 50.0)})
    pubs = [Publisher("gw-east", east.export, "test/1", interval=0.0),
            Publisher("gw-west", west.export, "test/2", interval=0.0)]
    assert all(p.maybe_publish(store) for p in pubs)
    _, mod = store.get(latency_key("gw-east"))
    assert not pubs[0].maybe_publish(store), "unchanged histograms are not written again"
    assert store.get(latency_key("gw-east"))[1] == mod
    r = cli("latency", "--etcd", etcd.url, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [(g["name"], g["requests"], g["used"]) for g in out["gateways"]] == [("gw-east", 30, True),
                                                                             ("gw-west", 14, True)]
    rows = {(x["src_app"], x["dst_app"], x["hop"]): x for x in out["latency"]}
    assert rows[("web", "api", "total")]["count"] == 40 and rows[("batch", "db", "total")]["count"] == 4
    assert 15.0 < rows[("web", "api", "backbone")]["p50_ms"] <= 20.0  # 20 ms: in (15, 17.5, 20]
    assert 250.0 < rows[("batch", "db", "app")]["p99_ms"] <= 300.0
    assert {x["mode"] for x in out["latency"]} == {"http"}
    # --app: pairs with that app at either end only
    only = json.loads(cli("latency", "--etcd", etcd.url, "--json", "--app", "db").stdout)
    assert {(x["src_app"], x["dst_app"]) for x in only["latency"]} == {("batch", "db")}
    # one more request at gw-east: the next publish replaces its document, the sum follows
    east.add({"time": time.time(), "src_app": "web", "dst_app": "api", "mode": "http",
              "hops_ms": {"ingress": 1.0, "backbone": 1.0, "app_vpc": 1.0, "app": 1.0, "total": 4.0}})
    assert pubs[0].maybe_publish(store)
    out = json.loads(cli("latency", "--etcd", etcd.url, "--json").stdout)
    assert {(x["src_app"], x["hop"]): x["count"] for x in out["latency"]}[("web", "total")] == 41
    text = cli("latency", "--etcd", etcd.url).stdout
    assert "per hop: p50/p99 ms" in text and "BACKBONE" in text and "APP_VPC" in text, text
    line = next(ln for ln in text.splitlines() if ln.startswith("web"))
    assert line.split()[:4] == ["web", "api", "http", "41"], text
    assert "gw-east (31 requests" in text and "gw-west (14 requests" in text, text


def test_fleet_latency_leaves_out_old_and_unreadable_documents(etcd, store):
    from bulkhead.fleet.latency import Publisher
    from bulkhead.fleet.store import latency_key

    old = Publisher("gw-old", _hop_log({("web", "api"): (3, 5.0)}).export, "test/3", interval=0.0)
    assert old.maybe_publish(store)
    doc = json.loads(store.get(latency_key("gw-old"))[0])
    doc["updated"] -= 3600  # its agent died an hour ago
    store.put(latency_key("gw-old"), json.dumps(doc))
    store.put(latency_key("gw-bad"), "not json")
    new = Publisher("gw-new", _hop_log({("web", "api"): (2, 5.0)}).export, "test/4", interval=0.0)
    assert new.maybe_publish(store)
    out = json.loads(cli("latency", "--etcd", etcd.url, "--json", "--max-age", "60").stdout)
    gws = {g["name"]: g for g in out["gateways"]}
    assert gws["gw-old"]["used"] is False and gws["gw-old"]["age_s"] >= 3600
    assert gws["gw-bad"]["used"] is False and gws["gw-bad"]["error"].startswith("unreadable")
    assert gws["gw-new"]["used"] is True
    assert {(x["hop"], x["count"]) for x in out["latency"] if x["hop"] == "total"} == {("total", 2)}
    # without --max-age the dead gateway's numbers count
    out = json.loads(cli("latency", "--etcd", etcd.url, "--json").stdout)
    assert {(x["hop"], x["count"]) for x in out["latency"] if x["hop"] == "total"} == {("total", 5)}


def test_fleet_latency_with_nothing_published_and_with_etcd_away(etcd, store):
    r = cli("latency", "--etcd", etcd.url)
    assert r.returncode == 0 and "no gateway has published latency" in r.stdout, r.stdout
    r = cli("latency", "--etcd", dead_url(), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False, (r.stdout, r.stderr)
