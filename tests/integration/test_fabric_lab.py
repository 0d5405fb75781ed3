"""The two-gateway lab the fabric is tested in (agent/lab/fabriclab.py), without bulkhead:
every link works, the overlap is real, and destroy() leaves nothing."""
from __future__ import annotations

import pytest

from bulkhead.lab.fabriclab import HOSTS, FabricLab, host_addr, reap_stale
from bulkhead.lab.topology import NETNS_DIR

pytestmark = [pytest.mark.root, pytest.mark.integration]


def test_the_lab_links_work_and_destroy_leaves_nothing():
    reap_stale()
    with FabricLab() as lab:
        for fam in (4, 6):
            # the underlay: gateways and the rogue host see each other
            assert lab.ping("gwa", host_addr("gwb", fam)).ok
            assert lab.ping("rogue", host_addr("gwa", fam)).ok
            # every end host reaches its gateway
            for role, (gw, _, gw_addrs, _) in HOSTS.items():
                addr = next(a.split("/")[0] for a in gw_addrs if (":" in a) == (fam == 6))
                assert lab.ping(role, addr).ok, (role, fam)
        # the overlap is real: a-cli and b-srv are in the same CIDR behind different gateways
        assert host_addr("a-cli").rsplit(".", 1)[0] == host_addr("b-srv").rsplit(".", 1)[0]
        # with forwarding on, a gateway routes between its own segments (what the agent's plumbing does)
        lab.run("gwa", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        lab.serve_echo("a-srv", 7000)
        for fam in (4, 6):
            probe = lab.tcp_echo("a-cli", host_addr("a-srv", fam), 7000, b"hi")
            assert probe.ok and probe.reply == f"a-srv {host_addr('a-cli', fam)}: hi", probe
        names = list(lab.ns.values())
    assert not [n for n in names if (NETNS_DIR / n).exists()]
