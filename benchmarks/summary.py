"""One table for the whole `make bench` run.

Every benchmark states its headline figures through `goal(...)`: what it
measured, bulkhead's figure, the baseline's (measured in the same run), the
ratio, the goal and whether it is met. `conftest.pytest_sessionfinish` prints
the table last and writes it to build/bench-summary.md (and .json), so a run
of any subset of the benchmarks still ends with one table of what it ran.

    from .summary import goal
    goal("live rate", "established flow, 10 rules", ours=1.2, baseline=0.66, unit="Mpps",
         ratio=1.2 / 0.66, want=">= 3x bare XDP_PASS", met=1.2 / 0.66 >= 3,
         baseline_is="bare XDP_PASS")

`ratio` is bulkhead over the baseline unless `ratio_is` says otherwise; a goal
that is an absolute figure (ns, s) leaves baseline and ratio None.
"""
from __future__ import annotations

import json
from pathlib import Path

SUMMARY_MD = Path(__file__).resolve().parents[1] / "build" / "bench-summary.md"
SUMMARY_JSON = SUMMARY_MD.with_suffix(".json")

ROWS: list[dict] = []


def goal(benchmark: str, figure: str, *, ours: float | None, unit: str, want: str, met: bool | None,
         baseline: float | None = None, baseline_is: str = "", ratio: float | None = None,
         ratio_is: str = "", note: str = "") -> dict:
    """Record one headline figure against its goal (met None: no goal, reported only)."""
    row = {"benchmark": benchmark, "figure": figure, "ours": ours, "unit": unit, "baseline": baseline,
           "baseline_is": baseline_is, "ratio": ratio, "ratio_is": ratio_is, "want": want,
           "met": met, "note": note}
    ROWS.append(row)
    return row


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        s = f"{x:,.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return f"{s} {unit}".strip()


def table(rows: list[dict] | None = None) -> list[str]:
    rows = ROWS if rows is None else rows
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
        lines.append(f"| {r['benchmark']} | {fig} | {_num(r['ours'], r['unit'])} | {base} | {ratio} | "
                     f"{r['want']} | {met} |")
    n_met = sum(1 for r in rows if r["met"] is True)
    n_goal = sum(1 for r in rows if r["met"] is not None)
    lines += ["", f"{n_met} of {n_goal} goals met."]
    return lines


def write(machine: str = "") -> list[str]:
    if not ROWS:
        return []
    lines = table()
    if machine:
        lines = [f"Machine: {machine}", ""] + lines
    SUMMARY_MD.parent.mkdir(exist_ok=True)
    SUMMARY_MD.write_text("\n".join(lines) + "\n")
    SUMMARY_JSON.write_text(json.dumps({"machine": machine, "rows": ROWS}, indent=1) + "\n")
    return lines


def machine() -> str:
    import os
    import platform

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu or platform.processor()}, {os.cpu_count()} CPUs, kernel {platform.release()}"
