"""Benchmark fixtures: one netns, one compile, bundles of any size built directly.

Method (../shared/BENCHMARKS.md, method 1): BPF_PROG_TEST_RUN runs a program
on one frame `repeat` times and the kernel reports the mean ns per run. The
empty XDP program is measured in the same rounds, interleaved, and every
figure we report is the marginal cost: ours minus empty.
"""
from __future__ import annotations

import ipaddress
import os
import statistics
from pathlib import Path

import pytest

from bulkhead.datapath import abi, libbpf, loader
from bulkhead.policy.bundle import Bundle

RESULTS: list[dict] = []

# Every benchmark build has the benchmark hooks (-DBH_BENCH: the ctl flags
# BH_CTL_BYPASS_FLOWS, BH_CTL_SNI_BENCH and BH_CTL_BENCH_NEW_FLOW, the reference program
# bulkhead_empty), which the production object leaves out.
BENCH_DEFINES = ("BH_BENCH",)


def bench_defines(extra: str = "") -> tuple[str, ...]:
    """-D switches of a benchmark build: BH_BENCH plus `extra` (space-separated names)."""
    return BENCH_DEFINES + tuple(extra.split())
RESULTS_FILE = Path(__file__).resolve().parents[1] / "build" / "bench-results.md"


@pytest.fixture(scope="session")
def bench_dp():
    from pyroute2 import IPRoute, netns

    name = f"bhbench-{os.getpid()}"
    orig = os.open("/proc/self/ns/net", os.O_RDONLY)
    pin = loader.PIN_ROOT / f"bench-{os.getpid()}"
    netns.create(name)
    try:
        netns.setns(name)
        with IPRoute() as ipr:
            ipr.link("add", ifname="seg1", kind="veth", peer="seg1p")
            ipr.link("add", ifname="seg2", kind="veth", peer="seg2p")
            idx = {n: ipr.link_lookup(ifname=n)[0] for n in ("seg1", "seg2")}
        # BH_BENCH_DEFINES="NAME ...": build also with -DNAME (ablations, e.g. BH_NO_TELEMETRY)
        dp = loader.Datapath(pin, defines=bench_defines(os.environ.get("BH_BENCH_DEFINES", ""))).load()
        dp.ifindexes = idx
        dp.generation = 0
        yield dp
    finally:
        loader.remove_pins(pin)
        netns.setns(orig)
        os.close(orig)
        netns.remove(name)


def v4(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.0")) + i)


def v6(i: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(int(ipaddress.IPv6Address("fd00:be::")) + i)


def scale_bundle(n: int) -> Bundle:
    """n apps in segment 1 (one IPv4 /32 and one IPv6 /128 each) and n rules
    app i -> app i+1 tcp/443, so every map holds ~n entries per family."""
    m = loader.v4mapped
    src, dst, pol = [], [], []
    for i in range(n):
        app = i + 1
        src.append((1, m(v4(i)), 128, app))
        src.append((1, m(v6(i)), 128, app))
        dst.append((m(v4(i)), 128, app, 2))
        dst.append((m(v6(i)), 128, app, 2))
        pol.append((abi.POLICY_PLEN_PORT_BASE + 16, app, (i + 1) % n + 1, 6, 443, int(abi.Action.ALLOW), 0, app))
    return Bundle(
        settings={"default_action": "deny", "mode": "enforce", "unknown_sni": "deny"},
        segments=[{"id": 1, "name": "clients", "interfaces": ["seg1"]},
                  {"id": 2, "name": "servers", "interfaces": ["seg2"]}],
        apps=[], rules=[], src_entries=src, dst_entries=dst, policy_entries=pol,
    )


def interleaved(fd_a: int, fd_b: int, frame: bytes, ifindex: int, rounds: int = 7,
                repeat: int = 200_000) -> dict:
    """Run program a, then b, `rounds` times; median ns of each and of a - b."""
    a, b, d = [], [], []
    for _ in range(rounds):
        ra = libbpf.prog_test_run_xdp(fd_a, frame, ifindex, repeat=repeat)
        rb = libbpf.prog_test_run_xdp(fd_b, frame, ifindex, repeat=repeat)
        a.append(ra.duration_ns)
        b.append(rb.duration_ns)
        d.append(ra.duration_ns - rb.duration_ns)
    return {"a_ns": statistics.median(a), "b_ns": statistics.median(b), "diff_ns": statistics.median(d),
            "retval": ra.retval, "retval_b": rb.retval}


def measure(dp, frame: bytes, ifindex: int, rounds: int = 7, repeat: int = 200_000) -> dict:
    """Interleave empty and ours; return median ns of each and of the difference."""
    r = interleaved(dp.prog_fd(), dp.prog_fd(loader.EMPTY_PROG), frame, ifindex, rounds, repeat)
    return {"empty_ns": r["b_ns"], "ours_ns": r["a_ns"], "marginal_ns": r["diff_ns"], "retval": r["retval"]}


def ring_counter(dp) -> list[int]:
    """Open dp's flow_events ring once (bcc) and count what is read: [records read so far].
    Every benchmark that drains the ring (dp.bpf.ring_buffer_consume()) shares it."""
    if not hasattr(dp, "_bench_seen"):
        seen = [0]
        dp.bpf[b"flow_events"].open_ring_buffer(lambda _c, _d, _s: seen.__setitem__(0, seen[0] + 1))
        dp._bench_seen = seen
    return dp._bench_seen


def record(**row) -> None:
    RESULTS.append(row)


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    lines = ["| scenario | apps+rules | empty ns | bulkhead ns | marginal ns | XDP verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for r in RESULTS:
        lines.append(f"| {r['scenario']} | {r['scale']:,} | {r['empty_ns']:.0f} | {r['ours_ns']:.0f} | "
                     f"{r['marginal_ns']:.0f} | {r['verdict']} |")
    by = {(r["scenario"], r["scale"]): r["marginal_ns"] for r in RESULTS}
    ratios = []
    for scen in sorted({r["scenario"] for r in RESULTS}):
        lo, hi = by.get((scen, 10)), by.get((scen, 100_000))
        if lo and hi:
            ratios.append(f"| {scen} | {hi / lo:.2f}x |")
    if ratios:
        lines += ["", "| scenario | marginal at 100k / at 10 |", "|---|---:|"] + ratios
    RESULTS_FILE.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\n(written to {RESULTS_FILE})")


def pytest_sessionstart(session):
    from . import summary

    summary.started()


def _runs(terminalreporter) -> list[dict]:
    """Each benchmark test's outcome and seconds (setup + call + teardown), from the reports."""
    by: dict[str, dict] = {}
    for key in ("passed", "failed", "skipped", "error", "xfailed", "xpassed"):
        for rep in terminalreporter.stats.get(key, []):
            nodeid = getattr(rep, "nodeid", None)
            if not nodeid:
                continue
            r = by.setdefault(nodeid, {"file": nodeid.split("::")[0], "test": nodeid, "outcome": "",
                                       "seconds": 0.0, "why": ""})
            r["seconds"] += getattr(rep, "duration", 0.0) or 0.0
            when = getattr(rep, "when", "call")
            if rep.skipped and isinstance(rep.longrepr, tuple):
                r["outcome"], r["why"] = "skipped", str(rep.longrepr[2]).removeprefix("Skipped: ")
            elif rep.failed:
                r["outcome"] = "failed" if when == "call" else "error"
            elif when == "call" and not r["outcome"]:
                r["outcome"] = "passed"
    return list(by.values())


# A wrapper run first (tryfirst), so what follows its yield runs after the terminal reporter's own
# summaries (failures, -ra's short summary): the table is the last thing before pytest's final line.
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The one table of the run (benchmarks/summary.py), printed last."""
    yield
    from . import summary

    lines = summary.write(summary.machine(), _runs(terminalreporter))
    if lines:
        terminalreporter.write_sep("=", "bulkhead benchmarks: figures against their goals")
        for line in lines:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(written to {summary.SUMMARY_MD} and {summary.SUMMARY_JSON.name})")
