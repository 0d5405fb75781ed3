"""bulkhead as a systemd service, first boot: install, enable, reload, restart (issue 17).

In order, on one installed service: each later test needs what the earlier ones set up, and
fails at once with the reason when that is missing (not with a misleading traffic failure).
The service is left installed and enabled: the guest then reboots and test_after_reboot.py
checks it comes back enforcing, then uninstalls it. Real traffic only, through this host
between the lab's namespaces (tests/service/lab.sh), 198.18.10.0/24 -> 198.18.11.0/24.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from . import svc

pytestmark = [pytest.mark.root]


def require_active() -> dict:
    props = svc.unit_props()
    if props.get("ActiveState") != "active":
        pytest.fail(f"precondition: {svc.UNIT} is not active ({props}); see the first failing "
                    "test above (test_install_and_enable)", pytrace=False)
    return props


@pytest.mark.timeout(svc.START_TEST_TIMEOUT)
def test_install_and_enable(tmp_path):
    """install.sh from the repo (offline: the image's wheelhouse), then `systemctl enable
    --now bulkhead` returns once enforcing (Type=notify): traffic enforced right away."""
    for p in (svc.ETC, svc.PREFIX, svc.SBIN, svc.LAB_UNIT_FILE.parent / svc.UNIT):
        assert not p.exists(), f"{p} exists before the install: the guest is not clean"
    assert svc.WHEELHOUSE.is_dir(), f"{svc.WHEELHOUSE} missing: the image predates the wheelhouse (VM_REBUILD=1)"
    svc.MARK_DIR.mkdir(parents=True, exist_ok=True)
    svc.BEFORE_INSTALL.write_text(json.dumps({
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()}))

    svc.install_lab()
    assert svc.unit_props(svc.LAB_UNIT)["ActiveState"] == "active"
    for ifname in svc.GW_IFS:
        assert not svc.xdp_attached(ifname), f"XDP on {ifname} before bulkhead runs"

    policy = tmp_path / "lab-policy.yaml"
    policy.write_text(svc.LAB_POLICY)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(svc.WHEELHOUSE)}
    p = svc.run(["bash", str(svc.REPO / "scripts/service/install.sh"), "--policy", str(policy)],
                check=False, timeout=1200, env=env)
    assert p.returncode == 0, f"install.sh: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    for path in (svc.PREFIX / "venv/bin/bulkhead", svc.SBIN, svc.ETC / "bulkhead.env",
                 svc.POLICY_FILE, svc.LAB_UNIT_FILE.parent / svc.UNIT):
        assert path.exists(), f"install.sh did not install {path}"
    assert svc.POLICY_FILE.read_text() == svc.LAB_POLICY
    assert svc.unit_props()["LoadState"] == "loaded"

    svc.systemctl("enable", "--now", svc.UNIT, timeout=svc.START_TIMEOUT)
    # Type=notify: enable --now returned, so READY=1 came, so the policy is enforced already.
    props = svc.unit_props()
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["UnitFileState"] == "enabled", props
    for ifname in svc.GW_IFS:
        assert svc.xdp_attached(ifname), f"{svc.UNIT} is ready but no XDP on {ifname}"
    st = svc.status()
    assert st["generation"] >= 1, st["generation"]
    assert sorted(i["name"] for i in st["interfaces"]) == sorted(svc.GW_IFS), st["interfaces"]
    svc.assert_enforced(allowed=[svc.ALLOWED], denied=[svc.DENIED])

    # The first start on this boot had no pins to reuse: it compiled (the counterpart of the
    # restart's "no compile" below, so that one is not a constant).
    assert st.get("datapath", {}).get("compiled") is True, st.get("datapath")
    log = svc.wait_journal(props["InvocationID"], r"compiled and loaded")
    assert re.search(r"compiled and loaded bpf/bulkhead\.c in [\d.]+s", log), log[-3000:]


def _reload_with(text: str) -> tuple[int, str]:
    svc.POLICY_FILE.write_text(text)
    p = svc.systemctl("reload", svc.UNIT, check=False, timeout=600)
    return p.returncode, p.stdout + p.stderr


def test_reload_applies_an_edited_policy():
    """Edit /etc/bulkhead/policy.yaml, `systemctl reload`: the new policy is enforced (the
    denied port now connects, then is denied again), generation up, same process."""
    before = require_active()
    gen0 = svc.status()["generation"]
    try:
        rc, out = _reload_with(svc.policy_yaml([svc.ALLOWED, svc.DENIED]))
        assert rc == 0, f"systemctl reload: exit {rc}\n{out}"
        gen1 = svc.status()["generation"]
        assert gen1 > gen0, (gen0, gen1)
        arrived = svc.arrivals("tcp", svc.DENIED)
        svc.assert_enforced(allowed=[svc.ALLOWED, svc.DENIED], denied=[])
        assert svc.arrivals("tcp", svc.DENIED) == arrived + 1

        rc, out = _reload_with(svc.LAB_POLICY)
        assert rc == 0, f"systemctl reload: exit {rc}\n{out}"
        gen2 = svc.status()["generation"]
        assert gen2 > gen1, (gen1, gen2)
        svc.assert_enforced(allowed=[svc.ALLOWED], denied=[svc.DENIED])
        after = svc.unit_props()
        assert after["MainPID"] == before["MainPID"], "a reload must not restart the agent"
        assert after["ActiveState"] == "active", after
    finally:
        svc.POLICY_FILE.write_text(svc.LAB_POLICY)


@pytest.mark.parametrize("bad", [
    "version: 1\nsettings: [default_action: allow\n",                     # not YAML
    svc.LAB_POLICY.replace("to: server", "to: nosuchapp"),                # unknown reference
], ids=["yaml-syntax", "unknown-app"])
def test_reload_of_a_malformed_policy_fails_and_keeps_the_old(bad):
    """A reload of a malformed policy fails (`systemctl reload` exit != 0), the service stays
    up with the old policy, generation unchanged."""
    assert bad != svc.LAB_POLICY
    before = require_active()
    gen0 = svc.status()["generation"]
    try:
        rc, out = _reload_with(bad)
        assert rc != 0, f"systemctl reload of a malformed policy succeeded\n{out}"
        after = svc.unit_props()
        assert after["ActiveState"] == "active" and after["MainPID"] == before["MainPID"], after
        assert svc.status()["generation"] == gen0
        svc.assert_enforced(allowed=[svc.ALLOWED], denied=[svc.DENIED])
    finally:
        svc.POLICY_FILE.write_text(svc.LAB_POLICY)


@pytest.mark.timeout(svc.START_TEST_TIMEOUT)
def test_restart_keeps_connections_and_denials():
    """`systemctl restart bulkhead` with an established connection open through the gateway:
    it still carries data afterwards; a denied flow probed without pause all through the
    restart never reaches the server; the new agent reused the pins (no compile)."""
    before = require_active()
    probe, conn = svc.tcp(svc.ALLOWED, timeout=10, keep=True)
    assert probe.ok, probe
    try:
        conn.settimeout(30)
        assert svc.echo(conn, b"before the restart\n") == b"before the restart\n"
        tcp0, udp0 = svc.arrivals("tcp", svc.DENIED), svc.arrivals("udp", svc.DENIED_UDP)
        with svc.DeniedProber() as prober:
            while prober.attempts < 2:  # probing before the restart begins
                time.sleep(0.05)
            first = prober.attempts
            svc.systemctl("restart", svc.UNIT, timeout=svc.START_TIMEOUT)
            during = prober.attempts - first
            last = prober.attempts
            while prober.attempts < last + 2:  # and after it is ready
                time.sleep(0.05)
        after = svc.unit_props()
        assert after["ActiveState"] == "active", after
        assert after["InvocationID"] != before["InvocationID"], "the unit did not restart"
        assert after["MainPID"] != before["MainPID"], "the agent process did not change"
        assert during >= 1, "no probe ran while the service restarted: the test proved nothing"
        assert prober.through == [], f"denied tcp/{svc.DENIED} connected during the restart: {prober.through}"
        assert svc.arrivals("tcp", svc.DENIED) == tcp0, "a denied TCP SYN reached the server"
        assert svc.arrivals("udp", svc.DENIED_UDP) == udp0, \
            f"denied UDP reached the server ({prober.attempts} probes sent)"
        assert svc.echo(conn, b"after the restart\n") == b"after the restart\n"
    finally:
        conn.close()
    svc.assert_enforced(allowed=[svc.ALLOWED], denied=[svc.DENIED])

    log = svc.wait_journal(after["InvocationID"], r"reusing pinned programs")
    assert re.search(r"reusing pinned programs \(build \S+\): no compile", log), \
        f"the restart's journal does not say it reused the pins:\n{log[-3000:]}"
    assert "compiled and loaded" not in log, f"the restart compiled:\n{log[-3000:]}"
    assert svc.status().get("datapath", {}).get("compiled") is False, svc.status().get("datapath")


def test_enabled_for_the_reboot():
    """Last on the first boot: enabled (nothing else is done for the reboot), and what the
    after-reboot tests compare against, kept on the guest's disk."""
    require_active()
    assert svc.systemctl("is-enabled", svc.UNIT).stdout.strip() == "enabled"
    assert svc.systemctl("is-enabled", svc.LAB_UNIT).stdout.strip() == "enabled"
    assert svc.POLICY_FILE.read_text() == svc.LAB_POLICY
    st = svc.status()
    svc.BEFORE_REBOOT.write_text(json.dumps({
        "boot_id": svc.boot_id(), "checksum": st["policy"]["checksum"],
        "build_id": st.get("datapath", {}).get("build_id")}))
    os.sync()
