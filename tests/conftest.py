"""Session-wide pytest hooks for bulkhead's tests.

On our machines every test can run (root, bcc, kernel headers, netns: `make setup` installs
them), so a skipped test means something is broken and would otherwise hide behind a green
run. With strict skips on, any skip makes the session fail, and the summary lists each
skipped test with its reason.

Strict skips are on when:
  - BULKHEAD_STRICT_SKIPS=1, or
  - CI is set (CI=true), unless BULKHEAD_STRICT_SKIPS=0 turns them off explicitly.

Fixtures live elsewhere: tests/bpf/conftest.py (BPF_PROG_TEST_RUN) and
tests/integration/conftest.py (namespaces). Keep this file to session-wide policy.
"""

import os

import pytest

# Skips that an option asked for, not a missing capability: pytest-benchmark skips the
# ordinary tests under --benchmark-only and the benchmarks under --benchmark-skip.
_REQUESTED_SKIP_MARKERS = ("--benchmark-only", "--benchmark-skip")

_skips = []  # (nodeid, reason) in the order they happened


def _strict_skips() -> bool:
    explicit = os.environ.get("BULKHEAD_STRICT_SKIPS", "").strip()
    if explicit:
        return explicit not in ("0", "false", "no")
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no")


def _skip_reason(report) -> str:
    # A skip's longrepr is (path, lineno, "Skipped: reason").
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, lineno, reason = longrepr
        reason = reason.removeprefix("Skipped: ")
        return f"{reason} ({path}:{lineno})"
    return str(longrepr)


def _record(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):  # xfail is not a skip
        return
    reason = _skip_reason(report)
    if any(marker in reason for marker in _REQUESTED_SKIP_MARKERS):
        return
    _skips.append((report.nodeid, reason))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "root: needs root (BPF syscalls, bpffs, netns, nftables)"
    )
    config.addinivalue_line(
        "markers", "integration: builds network namespaces and sends real traffic"
    )


def pytest_runtest_logreport(report):
    _record(report)


def pytest_collectreport(report):
    # A module-level pytest.skip() / importorskip() skips the whole file at collection.
    _record(report)


def pytest_sessionfinish(session, exitstatus):
    if _skips and _strict_skips() and exitstatus in (
        pytest.ExitCode.OK,
        pytest.ExitCode.NO_TESTS_COLLECTED,
    ):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _skips or not _strict_skips():
        return
    terminalreporter.section("skipped tests fail this run (strict skips)", red=True)
    terminalreporter.line(
        "CI or BULKHEAD_STRICT_SKIPS=1 is set, and on our machines nothing should skip:"
    )
    for nodeid, reason in _skips:
        terminalreporter.line(f"  SKIPPED {nodeid}: {reason}", red=True)
    terminalreporter.line(
        f"{len(_skips)} skipped; fix the cause (usually: run `make setup` as root), "
        "or set BULKHEAD_STRICT_SKIPS=0 to allow skips locally."
    )
