"""One table for the whole `make bench` run.

Every benchmark states its headline figures through `goal(...)`: what it
measured, bulkhead's figure, the baseline's (measured in the same run), the
ratio, the goal and whether it is met. `conftest.pytest_terminal_summary` prints
the table last and writes it to build/bench-summary.md (and .json), so a run
of any subset of the benchmarks still ends with one table of what it ran,
headed by the command, the machine, the date and the commit, and followed by
each benchmark file's outcome and run time.

    from .summary import goal
    goal("live rate", "established flow, 10 rules", ours=1.2, baseline=0.66, unit="Mpps",
         ratio=1.2 / 0.66, want=">= 3x bare XDP_PASS", met=1.2 / 0.66 >= 3,
         baseline_is="bare XDP_PASS")

`ratio` is bulkhead over the baseline unless `ratio_is` says otherwise; a goal
that is an absolute figure (ns, s) leaves baseline and ratio None; `met` None
is a figure reported without a goal.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_MD = ROOT / "build" / "bench-summary.md"
SUMMARY_JSON = SUMMARY_MD.with_suffix(".json")

ROWS: list[dict] = []
START: dict = {}  # set by conftest.pytest_sessionstart: time and load average when the run began

# What the table is not: proofs that are tests (in `make test`), named under it so a reader of the
# table knows where they are.
ELSEWHERE = [
    ("No mixed-policy packet while policies swap under load: a test, not a benchmark "
    "(tests/integration/test_mixed_policy.py, in `make test`; docs/benchmarks.md, Policy apply)."),
]

LEGEND = [
    ("bulkhead: bulkhead's figure; baseline: what it is compared with, measured in the same run "
    "(side by side, interleaved where the benchmark says so); ratio: bulkhead / baseline unless "
    "the cell says otherwise; met: **met** / **not met** against the goal, – where a figure is "
    "reported without a goal (or the run was too small for the goal to apply)."),
]


def goal(benchmark: str, figure: str, *, ours: float | None, unit: str, want: str, met: bool | None,
         baseline: float | None = None, baseline_is: str = "", ratio: float | None = None,
         ratio_is: str = "", note: str = "") -> dict:
    """Record one headline figure against its goal (met None: no goal, reported only)."""
    row = {"benchmark": benchmark, "figure": figure, "ours": ours, "unit": unit, "baseline": baseline,
           "baseline_is": baseline_is, "ratio": ratio, "ratio_is": ratio_is, "want": want,
           "met": None if met is None else bool(met), "note": note}
    ROWS.append(row)
    return row


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    sep = "" if unit == "x" else " "
    if isinstance(x, int):
        return f"{x:,}{sep}{unit}".strip()
    if abs(x) >= 100:
        s = f"{x:,.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    elif abs(x) >= 0.1 or x == 0:
        s = f"{x:.2f}"
    else:
        s = f"{x:.3g}"
    return f"{s}{sep}{unit}".strip()


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def grouped(rows: list[dict]) -> list[dict]:
    """The rows of each benchmark together (benchmarks in the order they first reported, rows in
    the order they came): a file's rows may be stated at different times of the session."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["benchmark"], []).append(r)
    return [r for group in by.values() for r in group]


def table(rows: list[dict] | None = None) -> list[str]:
    rows = grouped(ROWS if rows is None else rows)
    lines = ["| benchmark | figure | bulkhead | baseline | ratio | goal | met |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        base = _num(r["baseline"], r["unit"]) if r["baseline"] is not None else "–"
        if r["baseline_is"]:
            base += f" ({r['baseline_is']})"
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        if r["ratio_is"]:
            ratio += f" ({r['ratio_is']})"
        met = {True: "**met**", False: "**not met**", None: "–"}[r["met"]]
        fig = r["figure"] + (f" ({r['note']})" if r["note"] else "")
        lines.append("| " + " | ".join(_cell(c) for c in (r["benchmark"], fig, _num(r["ours"], r["unit"]), base,
                                                          ratio, r["want"], met)) + " |")
    n_met = sum(1 for r in rows if r["met"] is True)
    n_goal = sum(1 for r in rows if r["met"] is not None)
    lines += ["", f"{n_met} of {n_goal} goals met; {len(rows) - n_goal} figures reported without a goal."]
    return lines


# ------------------------------------------------------------------ the run around the table
def commit() -> str:
    def git(*a: str) -> str:
        p = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=False)
        return p.stdout.strip() if p.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--", "agent", "bpf", "benchmarks")
    return head + (" (with uncommitted changes in agent/, bpf/ or benchmarks/)" if dirty else "")


def knobs() -> dict[str, str]:
    """The benchmarks' environment knobs set for this run (BH_*, BULKHEAD_*): a run with any of them
    is not the documented one (fewer rounds, other sizes, an ablation build)."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("BH_", "BULKHEAD_")) and k != "BULKHEAD_SETUP_BENCH"}


def command() -> str:
    argv = [Path(sys.executable).name if a == sys.executable else a for a in sys.argv]
    if argv and argv[0].endswith(("pytest", "__main__.py")):
        argv = ["python", "-m", "pytest", *argv[1:]]
    return " ".join(shlex.quote(a) for a in argv)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def started() -> None:
    import time

    START.update(wall=time.time(), mono=time.monotonic(), load=loadavg())


def header(machine: str) -> list[str]:
    import time

    utc = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    when = f"{utc(START['wall'])}, {_hms(time.monotonic() - START['mono'])} wall time" if START else utc(time.time())
    load = f"; load average {START['load']} at the start, {loadavg()} at the end" if START else ""
    out = [f"- Command: `{command()}` (in {ROOT}; `sudo make bench` runs every benchmark)",
           f"- Machine: {machine}{load}",
           f"- Date: {when}; commit {commit()}"]
    k = knobs()
    if k:
        out.append("- Knobs set (a reduced or altered run, not the documented figures): "
                   + ", ".join(f"`{a}={b}`" for a, b in k.items()))
    return out


def runs_table(runs: list[dict]) -> list[str]:
    """Per benchmark file: what its tests did and how long the file took (setup to teardown)."""
    if not runs:
        return []
    by: dict[str, dict] = {}
    for r in runs:
        f = by.setdefault(r["file"], {"seconds": 0.0, "outcomes": {}, "why": []})
        f["seconds"] += r["seconds"]
        if r["outcome"]:
            f["outcomes"][r["outcome"]] = f["outcomes"].get(r["outcome"], 0) + 1
        if r.get("why") and r["why"] not in f["why"]:
            f["why"].append(r["why"])
    lines = ["| benchmark file | tests | run time |", "|---|---|---:|"]
    for name, f in by.items():
        what = ", ".join(f"{n} {o}" for o, n in f["outcomes"].items())
        if f["why"]:
            what += " (" + "; ".join(f["why"])[:300] + ")"
        lines.append(f"| {name} | {_cell(what)} | {_hms(f['seconds'])} |")
    total = sum(f["seconds"] for f in by.values())
    lines.append(f"| all | | {_hms(total)} |")
    return lines


def _hms(s: float) -> str:
    m, s = divmod(round(s), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def write(machine: str = "", runs: list[dict] | None = None) -> list[str]:
    runs = runs or []
    if not ROWS and not runs:
        return []
    lines = header(machine or _machine()) + [""] + table() + [""]
    lines += [f"- {x}" for x in LEGEND + ELSEWHERE]
    rt = runs_table(runs)
    if rt:
        lines += [""] + rt
    SUMMARY_MD.parent.mkdir(exist_ok=True)
    SUMMARY_MD.write_text("\n".join(lines) + "\n")
    SUMMARY_JSON.write_text(json.dumps({"command": command(), "machine": machine, "commit": commit(),
                                        "knobs": knobs(), "rows": ROWS, "runs": runs}, indent=1) + "\n")
    return lines


def machine() -> str:
    """CPU model, CPUs, kernel."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu or platform.processor()}, {os.cpu_count()} CPUs, kernel {platform.release()}"


_machine = machine
