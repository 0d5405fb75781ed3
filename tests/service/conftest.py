"""The service tests: bulkhead installed as a systemd service, in the `make vm-test` guest.

They install into the system they run on and drive it with systemctl, so they need systemd as
PID 1 (the VM; not the development hosts, where systemd is installed but not init). They are
not under tests/unit|bpf|integration, so `make test` does not collect them; scripts/vm/guest-run.sh
runs them last, in two halves around a reboot of the guest:

  boot 1 (BULKHEAD_VM_PHASE unset): test_service.py — install, enable --now, reload, restart;
         it leaves the service installed and enabled for the reboot
  boot 2 (BULKHEAD_VM_PHASE=after-reboot): test_after_reboot.py — enforcing after the boot
         with no manual step, then uninstall leaves nothing

Tests marked `after_reboot` run only in the second half, the others only in the first.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

AFTER_REBOOT = os.environ.get("BULKHEAD_VM_PHASE", "") == "after-reboot"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "after_reboot: runs on the VM's second boot (BULKHEAD_VM_PHASE=after-reboot)"
    )


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    keep, drop = [], []
    for item in items:
        if here not in Path(str(item.fspath)).parents or (item.get_closest_marker("after_reboot") is not None) == AFTER_REBOOT:
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip()
    except OSError as e:
        return f"unknown ({e})"


@pytest.fixture(scope="session", autouse=True)
def systemd_is_init():
    # A failure, not a skip: selected here, these tests must run; elsewhere they cannot.
    if _pid1() != "systemd" or not Path("/run/systemd/system").is_dir():
        pytest.fail(
            f"tests/service needs systemd as PID 1 (PID 1 here is {_pid1()!r}): they install "
            "bulkhead as a service into this system, so they run only in the stock-kernel VM: "
            'VM_TESTS="tests/service" make vm-test (docs/testing-vm.md)',
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail("tests/service must run as root (they install into the system)", pytrace=False)
