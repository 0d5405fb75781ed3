"""The transit device's lifetime (plumbing + datapath/transit.py), in a throwaway network namespace.

No BPF program is compiled: the plumbing makes, keeps, recreates and removes the VXLAN device
on its own; the agent attaches bulkhead_transit_in to it (tests with traffic: the fabric lab).
`bulkhead down` of a state dir whose agent is gone (crashed) removes the device it recorded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from bulkhead.core.paths import REPO
from bulkhead.lab.runner import bulkhead_argv

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

INSTANCE = "t-transit"
DEV = "bhvx-t-transit"


@pytest.fixture
def ns(tmp_path):
    name = f"bhtx-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield {"name": name, "env": {**os.environ, "BULKHEAD_PLUMBING_DIR": str(tmp_path / "plumbing")},
               "tmp": tmp_path}
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run(ns, code: str) -> subprocess.CompletedProcess:
    """`code` in the namespace, with `Plumbing` and an empty-segment bundle `b` at hand."""
    prelude = textwrap.dedent(f"""\
        from bulkhead.datapath.plumbing import Plumbing, remove_all
        from bulkhead.datapath import transit
        from bulkhead.policy.bundle import Bundle
        b = Bundle(settings={{}}, segments=[], apps=[], rules=[], src_entries=[], dst_entries=[], policy_entries=[])
        p = Plumbing({INSTANCE!r})
        """)
    r = subprocess.run(["ip", "netns", "exec", ns["name"], sys.executable, "-c", prelude + code],
                       capture_output=True, text=True, env=ns["env"], cwd=str(REPO), timeout=60)
    assert r.returncode == 0, r.stderr
    return r


def link(ns) -> dict | None:
    r = subprocess.run(["ip", "netns", "exec", ns["name"], "ip", "-d", "-j", "link", "show", DEV],
                       capture_output=True, text=True)
    if r.returncode:
        return None
    (info,) = json.loads(r.stdout)
    return info


def sysctl(ns, path: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns["name"], "cat", path], capture_output=True,
                          text=True).stdout.strip()


def test_the_plumbing_makes_recreates_and_removes_the_device(ns):
    r = run(ns, "p.apply(b, {}, transit_port=4789); print(p.transit_ifindex)")
    info = link(ns)
    data = info["linkinfo"]["info_data"]
    assert info["linkinfo"]["info_kind"] == "vxlan" and data.get("external") and data.get("gbp")
    assert data["port"] == 4789 and "UP" in info["flags"]
    assert int(r.stdout) == info["ifindex"]
    assert sysctl(ns, f"/proc/sys/net/ipv4/conf/{DEV}/rp_filter") == "0"

    # the same port again: the device (and a filter on it) stays
    run(ns, "p.apply(b, {}, transit_port=4789)")
    assert link(ns)["ifindex"] == info["ifindex"]
    # another port: made again (VXLAN can't change its port in place)
    run(ns, "p.apply(b, {}, transit_port=8472)")
    assert link(ns)["linkinfo"]["info_data"]["port"] == 8472
    # a policy without transit: gone, and its rp_filter is no longer recorded
    run(ns, "p.apply(b, {})")
    assert link(ns) is None
    rec = json.loads(next((ns["tmp"] / "plumbing").glob(f"*-{INSTANCE}.json")).read_text())
    assert "transit" not in rec and not any(DEV in k for k in rec["sysctls"])

    run(ns, "p.apply(b, {}, transit_port=4789)")
    run(ns, "p.remove()")
    assert link(ns) is None


def test_down_removes_the_device_of_an_agent_that_is_gone(ns):
    """An agent that crashed left its state dir and the plumbing record: `bulkhead down` (another
    process, no agent on the socket) removes the device with the rest."""
    from bulkhead.datapath import loader

    state = ns["tmp"] / "state"
    state.mkdir()
    instance = loader.instance_name(state)
    (state / "state.json").write_text(json.dumps({"instance": instance, "interfaces": {}}))
    dev = f"bhvx-{instance.removeprefix('sd-')}"[:15]
    r = subprocess.run(["ip", "netns", "exec", ns["name"], sys.executable, "-c",
                        f"from bulkhead.datapath.plumbing import Plumbing\n"
                        f"from bulkhead.policy.bundle import Bundle\n"
                        f"b = Bundle(settings={{}}, segments=[], apps=[], rules=[], src_entries=[], dst_entries=[], "
                        f"policy_entries=[])\nPlumbing({instance!r}).apply(b, {{}}, transit_port=4789)"],
                       capture_output=True, text=True, env=ns["env"], cwd=str(REPO), timeout=60)
    assert r.returncode == 0, r.stderr
    show = ["ip", "netns", "exec", ns["name"], "ip", "link", "show", dev]
    assert subprocess.run(show, capture_output=True).returncode == 0
    d = subprocess.run(["ip", "netns", "exec", ns["name"], *bulkhead_argv(), "down", "--state-dir", str(state)],
                       capture_output=True, text=True, env=ns["env"], cwd=str(REPO), timeout=60)
    assert d.returncode == 0, d.stderr
    assert subprocess.run(show, capture_output=True).returncode != 0


def test_remove_all_sweeps_transit_devices_without_a_record(ns):
    run(ns, "p.apply(b, {}, transit_port=4789)")
    for path in (ns["tmp"] / "plumbing").glob("*.json"):
        path.unlink()  # a lost /run: no record
    run(ns, "remove_all()")
    assert link(ns) is None
