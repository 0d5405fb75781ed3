"""The test topology itself: cleanup even when half-made, stale reaping, plain veth peers."""
import subprocess
import sys

import pytest

from bulkhead.lab import topology
from bulkhead.lab.topology import NETNS_DIR, Topology, reap_stale

pytestmark = [pytest.mark.root, pytest.mark.integration]


def namespaces(prefix: str) -> list[str]:
    return sorted(p.name for p in NETNS_DIR.glob(f"{prefix}-*")) if NETNS_DIR.exists() else []


def test_half_made_topology_is_removed():
    class Broken(Topology):
        def _ip(self, *args):
            if "route" in args:  # after every namespace and link exists
                raise RuntimeError("boom")
            super()._ip(*args)

    t = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        with t:
            pass
    assert namespaces(t.prefix) == []
    t.destroy()  # idempotent
    assert namespaces(t.prefix) == []


def test_destroy_stops_spawned_processes_and_namespaces():
    t = Topology()
    with t:
        assert namespaces(t.prefix) == sorted(t.ns.values())
        srv = t.serve("core", "x", tcp=["198.19.0.10:7000"])
        assert srv.poll() is None
    assert srv.poll() is not None
    assert namespaces(t.prefix) == []


def test_reap_stale_only_takes_dead_owners():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = f"bht{dead.pid}x0-gw", Topology().ns["gw"]  # live: this process
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = reap_stale(("bht",))
        assert stale in removed and live not in removed
        assert not (NETNS_DIR / stale).exists() and (NETNS_DIR / live).exists()
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_peers_are_plain_veths():
    """Like a user's container: no XDP program and no GRO on the peers, so nothing there
    drains an XDP_TX'd frame, and the reject tests cover the path that must reach them."""
    with Topology() as t:
        for role in ("prod", "dev", "core"):
            link = t.run(role, ["ip", "-d", "link", "show", "dev", topology.PEER_IF]).stdout
            assert "prog/xdp" not in link, link
            feats = t.run(role, ["ethtool", "-k", topology.PEER_IF]).stdout
            assert "generic-receive-offload: off" in feats, feats
        # the overlap is real: both clients have the same address
        for role in ("prod", "dev"):
            assert "198.18.1.10/24" in t.run(role, ["ip", "-4", "addr", "show", "dev", "eth0"]).stdout
