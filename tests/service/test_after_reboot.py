"""bulkhead as a systemd service, second boot: enforcing again with no manual step, then an
uninstall that leaves nothing (issue 17).

Runs after scripts/vm/guest-run.sh rebooted the guest (BULKHEAD_VM_PHASE=after-reboot); nothing
here starts anything: bulkhead-lab.service and bulkhead.service came up by themselves at boot,
because test_service.py enabled them. The module's finalizer removes the service and the lab
whatever failed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from bulkhead.datapath import plumbing

from . import svc

pytestmark = [pytest.mark.root, pytest.mark.after_reboot]


def wait_settled(unit: str, timeout: float) -> dict:
    """The unit's properties once its boot-time start has finished, one way or the other
    (this test unit runs alongside the boot: the agent may still be compiling)."""
    deadline = time.monotonic() + timeout
    while True:
        props = svc.unit_props(unit)
        busy = props.get("ActiveState") in ("activating", "deactivating", "reloading") or svc.has_job(unit)
        if not busy or time.monotonic() > deadline:
            return props
        time.sleep(1)


@pytest.fixture(scope="module", autouse=True)
def remove_everything_at_the_end():
    yield
    if (svc.LAB_UNIT_FILE.parent / svc.UNIT).exists() or svc.ETC.exists() or svc.PREFIX.exists():
        svc.run(["bash", str(svc.REPO / "scripts/service/uninstall.sh")], check=False, timeout=600)
    if svc.SBIN.exists():
        svc.run([str(svc.SBIN), "down"], check=False, timeout=120)
    svc.remove_lab()


@pytest.mark.timeout(svc.START_TEST_TIMEOUT)
def test_enforcing_after_the_reboot():
    if not svc.BEFORE_REBOOT.exists():
        pytest.fail(f"boot 1 left no {svc.BEFORE_REBOOT}: the service was not installed, enabled "
                    "and enforcing before the reboot (see boot 1's failures in pytest.log)",
                    pytrace=False)
    before = json.loads(svc.BEFORE_REBOOT.read_text())
    assert svc.boot_id() != before["boot_id"], "same boot id as before: the guest did not reboot"

    lab = wait_settled(svc.LAB_UNIT, 120)
    assert lab["ActiveState"] == "active", f"{svc.LAB_UNIT} after boot: {lab}"
    props = wait_settled(svc.UNIT, svc.START_TIMEOUT)
    assert props["ActiveState"] == "active" and props["SubState"] == "running", \
        f"{svc.UNIT} after boot: {props}\n{svc.journal(props.get('InvocationID', ''))[-3000:]}"
    # Came up by itself on the first try: a failed start that Restart= retried is a defect at
    # boot (the lab is ordered before it).
    assert props["NRestarts"] == "0", f"{svc.UNIT} needed {props['NRestarts']} restarts at boot"

    for ifname in svc.GW_IFS:
        assert svc.xdp_attached(ifname), f"no XDP on {ifname} after the boot"
    st = svc.status()
    assert st["policy"]["checksum"] == before["checksum"], "another policy than before the reboot"
    assert sorted(i["name"] for i in st["interfaces"]) == sorted(svc.GW_IFS)
    svc.assert_enforced(allowed=[svc.ALLOWED], denied=[svc.DENIED])


def test_uninstall_leaves_nothing():
    """uninstall.sh, then the lab scaffolding removed: no unit, files, pins, nft tables,
    processes, plumbing; XDP detached before the lab's interfaces go."""
    st = svc.status() if svc.SBIN.exists() and svc.unit_props()["ActiveState"] == "active" else {}
    p = svc.run(["bash", str(svc.REPO / "scripts/service/uninstall.sh")], check=False, timeout=600)
    assert p.returncode == 0, f"uninstall.sh: exit {p.returncode}\n{p.stdout}\n{p.stderr}"

    left = []
    # before the lab goes: its interfaces would take XDP and TC with them
    for ifname in svc.GW_IFS:
        if svc.xdp_attached(ifname):
            left.append(f"XDP on {ifname}")
        tc = svc.run(["tc", "filter", "show", "dev", ifname, "ingress"], check=False).stdout
        if "bulkhead" in tc:
            left.append(f"TC on {ifname}: {tc.strip()}")
    svc.remove_lab()

    props = svc.unit_props()
    if props.get("LoadState") != "not-found":
        left.append(f"{svc.UNIT}: {props}")
    for unit_dir in ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system",
                     "/run/systemd/system"):
        for pattern in ("bulkhead*", "*.wants/bulkhead*"):
            # (bulkhead-vm-test.service is the VM harness's, not the install's)
            left += [str(f) for f in Path(unit_dir).glob(pattern) if not f.name.startswith("bulkhead-vm-")]
    for path in (svc.PREFIX, svc.ETC, svc.SBIN, svc.LAB_UNIT_FILE, svc.STATE_DIR):
        if path.exists() or path.is_symlink():
            left.append(str(path))
    if svc.PIN_ROOT.exists() and any(svc.PIN_ROOT.iterdir()):
        left.append(f"pins: {sorted(str(q) for q in svc.PIN_ROOT.iterdir())}")
    if st.get("pin_dir") and Path(st["pin_dir"]).exists():
        left.append(f"the service's pins {st['pin_dir']}")
    left += [f"nft table {t}" for t in svc.nft_tables()]
    left += svc.bulkhead_processes()
    if plumbing.RECORD_DIR.exists() and any(plumbing.RECORD_DIR.iterdir()):
        left.append(f"plumbing records {sorted(q.name for q in plumbing.RECORD_DIR.iterdir())}")
    for fam in ("-4", "-6"):
        for ln in svc.run(["ip", fam, "rule"]).stdout.splitlines():
            if "proto 176" in ln or "0xb0000" in ln:
                left.append(f"ip {fam} rule {ln}")
        routes = svc.run(["ip", fam, "route", "show", "table", "all", "proto", "176"]).stdout.strip()
        if routes:
            left.append(f"ip {fam} routes: {routes}")
    for ns in (svc.CLIENT_NS, svc.SERVER_NS):
        if Path("/run/netns", ns).exists():
            left.append(f"netns {ns}")
    for ifname in svc.GW_IFS:
        if svc.run(["ip", "link", "show", "dev", ifname], check=False).returncode == 0:
            left.append(f"link {ifname}")
    if svc.BEFORE_INSTALL.exists():
        want = json.loads(svc.BEFORE_INSTALL.read_text())["ip_forward"]
        got = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        if got != want:
            left.append(f"net.ipv4.ip_forward = {got} (was {want} before the install)")
    assert left == [], "left behind after uninstall:\n  " + "\n  ".join(left)
