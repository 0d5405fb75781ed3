"""Tests that need a kernel feature this project's development hosts lack, run in the VM of
`make vm-test` (Debian 12's stock 6.1 kernel, see docs/testing-vm.md) and only there.

The host's `make test` does not collect this directory (the Makefile's TEST_DIRS leaves it out):
on a host without the feature they could only skip, and make test allows no skips. The VM's
default selection (scripts/vm/guest-run.sh) runs it; there a test skips only if the kernel lacks
the feature, and says "kernel feature" in the reason, which guest-run.sh checks.

They reuse the integration labs and helpers, so tests/integration is importable from here.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
