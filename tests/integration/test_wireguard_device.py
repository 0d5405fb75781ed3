"""WireGuard under the transit (datapath/wireguard.py via the plumbing), in a throwaway network
namespace; no BPF program is compiled.

Here the kernel may have no wireguard module: then the apply must fail with that error and
leave the running transit device as it was (nothing is sent in the clear). With the module,
tests/vm/test_wireguard_traffic.py (the VM of `make vm-test`) checks the device is made, keyed, peered,
routed and removed again, with this file's helpers.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from bulkhead.core.paths import REPO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

INSTANCE = "t-wg"
VX, WG = "bhvx-t-wg", "bhwg-t-wg"
PEER_KEY = base64.b64encode(bytes(range(1, 33))).decode()


def kernel_has_wireguard() -> bool:
    name = f"bhwgp{os.getpid() % 100000}"
    ns = f"bhwgprobe-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(["ip", "-n", ns, "link", "add", name, "type", "wireguard"], capture_output=True)
        return r.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def ns(tmp_path):
    name = f"bhwg-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    key = tmp_path / "wg.key"
    key.write_text(base64.b64encode(bytes(range(2, 34))).decode() + "\n")
    os.chmod(key, 0o600)
    try:
        yield {"name": name, "env": {**os.environ, "BULKHEAD_PLUMBING_DIR": str(tmp_path / "plumbing")},
               "key": str(key)}
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run(ns, code: str, check: bool = True) -> subprocess.CompletedProcess:
    prelude = textwrap.dedent(f"""\
        from bulkhead.datapath.plumbing import Plumbing
        from bulkhead.datapath import wireguard
        from bulkhead.policy.bundle import Bundle
        b = Bundle(settings={{}}, segments=[], apps=[], rules=[], src_entries=[], dst_entries=[], policy_entries=[])
        p = Plumbing({INSTANCE!r})
        wg = {{"listen_port": 51820, "public_key": "unused", "address": "198.18.100.1", "prefix": 32,
              "peers": {{"gw-west": {{"public_key": {PEER_KEY!r}, "endpoint": "198.18.50.2:51821",
                                     "address": "198.18.100.2"}}}}}}
        """)
    r = subprocess.run(["ip", "netns", "exec", ns["name"], sys.executable, "-c", prelude + code],
                       capture_output=True, text=True, env=ns["env"], cwd=str(REPO), timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def ifindex(ns, dev: str) -> int | None:
    r = subprocess.run(["ip", "-n", ns["name"], "-j", "link", "show", dev], capture_output=True, text=True)
    return None if r.returncode else json.loads(r.stdout)[0]["ifindex"]


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools (wg) not installed")
def test_without_the_module_the_apply_fails_and_the_transit_stays(ns):
    if kernel_has_wireguard():
        pytest.skip("the kernel has the wireguard module: the failure path is not reachable here")
    run(ns, "p.apply(b, {}, transit_port=4789)")  # the running policy: transit unencrypted
    before = ifindex(ns, VX)
    assert before
    r = run(ns, f"p.apply(b, {{}}, transit_port=4789, wg=(wg, {ns['key']!r}))", check=False)
    assert r.returncode != 0
    assert "WireguardError" in r.stderr and "kernel has no wireguard module" in r.stderr
    assert ifindex(ns, VX) == before  # the running transit device untouched
    assert ifindex(ns, WG) is None
    run(ns, "p.remove()")
    assert ifindex(ns, VX) is None


def test_a_key_readable_by_others_is_refused_before_anything(ns):
    os.chmod(ns["key"], 0o644)
    r = run(ns, f"p.apply(b, {{}}, transit_port=4789, wg=(wg, {ns['key']!r}))", check=False)
    assert r.returncode != 0 and "group or others may read it" in r.stderr
    assert ifindex(ns, VX) is None and ifindex(ns, WG) is None
    r = run(ns, "p.apply(b, {}, transit_port=4789, wg=(wg, '/nonexistent/wg.key'))", check=False)
    assert r.returncode != 0 and "No such file" in r.stderr


def test_down_without_a_record_sweeps_by_name_and_kind_only(ns):
    """No plumbing record (a lost /run): the no-record removal sweeps the WireGuard devices named
    like bulkhead's with the VXLAN ones; a device of another kind by such a name is not ours and
    stays. (A real stray WireGuard device is swept in the VM: tests/vm/test_wireguard_traffic.py.)"""
    run(ns, "p.apply(b, {}, transit_port=4789)")
    subprocess.run(["ip", "-n", ns["name"], "link", "add", WG, "type", "bridge"], check=True)
    for path in (Path(ns["env"]["BULKHEAD_PLUMBING_DIR"])).glob("*.json"):
        path.unlink()
    r = run(ns, "from bulkhead.datapath import transit\n"
                "print(transit.remove_recorded({}, p.transit_device, sweep=True), wireguard.devices())")
    assert r.stdout.strip() == "[] []"
    assert ifindex(ns, VX) is None and ifindex(ns, WG)
    run(ns, "p.remove()")  # no record, nobody else here: the same sweep, nothing left to fail on
    assert ifindex(ns, WG)
