"""Live forwarding rate through a real gateway namespace (issue 18 part 1; ../shared/BENCHMARKS.md
method 2): Mpps of 64-byte TCP frames counted at the far end, for one established flow and for
new flows (a new source address and port every frame), with the gateway running

  none          no program: the kernel forwards alone
  xdp_pass      a bare XDP_PASS program (the ceiling for anything that passes to the stack)
  xdp_fwd       a minimal XDP forwarder, FIB + redirect and no policy (the ceiling for anything
                forwarded in XDP here: the receiving veth's own NAPI runs on the gateway's core)
  bulkhead N    the agent's datapath (XDP + TC on both interfaces) and its plumbing, N rules
  nft linear N  nftables forward hook, one rule per policy rule, the traffic's rule last
  nft set N     nftables forward hook, one lookup in a concatenated interval set

Each case is measured once per round, three rounds interleaved; the table gives medians. Each round
also measures the generator into an XDP_DROP on the gateway's interface: its offered rate and what
one gateway core can take in at all, so the generator is shown not to be the bottleneck.
Writes build/bench-live-rate.md and docs/live-rate.png (Mpps against rule count).

Knobs: BH_LIVE_RULES=10,1000 (rule counts), BH_LIVE_FRAMES=6000000 (frames per measurement),
BH_LIVE_ROUNDS=3, BH_LIVE_DEFINES="BH_NO_TELEMETRY" (build bulkhead with -D switches: ablations).
"""
from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path

import pytest

from .liverate import LiveLab, bundle, nft_ruleset

ROOT = Path(__file__).resolve().parents[1]
TABLE_FILE = ROOT / "build" / "bench-live-rate.md"
PLOT_FILE = ROOT / "docs" / "live-rate.png"
RULES = [int(x) for x in os.environ.get("BH_LIVE_RULES", "10,1000,10000,100000").split(",")]
FRAMES = int(os.environ.get("BH_LIVE_FRAMES", "6000000"))
ROUNDS = int(os.environ.get("BH_LIVE_ROUNDS", "3"))
TRAFFIC = ("established", "new")


def measure(lab: LiveLab, case: str, res: dict) -> None:
    for traffic in TRAFFIC:
        lab.set_traffic(vary=traffic == "new")
        if traffic == "established":
            lab.run(1000)  # the flow's first packet: judged, cached, then established
        r = lab.run(FRAMES)
        res.setdefault(case, {}).setdefault(traffic, []).append(r)


def one_round(lab: LiveLab, res: dict, setup: dict) -> None:
    # The generator's ceiling: what one gateway core drops at XDP when nothing is forwarded.
    lab.attach_xdp("g", "ga", "lr_count")
    try:
        measure(lab, "xdp_drop on ga", res)
    finally:
        lab.detach_xdp("g", "ga")

    measure(lab, "none", res)

    lab.attach_xdp("g", "ga", "lr_pass")
    try:
        measure(lab, "xdp_pass", res)
    finally:
        lab.detach_xdp("g", "ga")

    lab.attach_xdp("g", "ga", "lr_fwd")
    try:
        measure(lab, "xdp_fwd (no policy)", res)
    finally:
        lab.detach_xdp("g", "ga")

    lab.bulkhead_on()
    try:
        for n in RULES:
            setup.setdefault(f"bulkhead {n}", []).append(lab.bulkhead_policy(bundle(n)))
            before = lab.counters()
            measure(lab, f"bulkhead {n}", res)
            after = lab.counters()
            # The frames were judged by bulkhead's policy, not waved through.
            assert after.get("allow_rule", 0) > before.get("allow_rule", 0), (before, after)
    finally:
        lab.bulkhead_off()

    for form in ("linear", "set"):
        for n in RULES:
            setup.setdefault(f"nft {form} {n}", []).append(lab.nft(nft_ruleset(n, form)))
            try:
                measure(lab, f"nft {form} {n}", res)
            finally:
                lab.nft(None)


def med(res: dict, case: str, traffic: str, key: str = "mpps") -> float:
    return statistics.median(r[key] for r in res[case][traffic])


def machine() -> str:
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                         check=False, capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} CPUs ({cpu}), kernel {os.uname().release}"


def report(res: dict, setup: dict) -> str:
    base = {t: med(res, "xdp_pass", t) for t in TRAFFIC}
    lines = [(f"Live forwarding rate, 64-byte TCP, median of {ROUNDS} interleaved rounds, "
              f"{FRAMES:,} frames per measurement; {machine()}"),
             ("The generator is not the bottleneck: it offers the 'offered' column; 'xdp_drop on ga' is "
              "what the gateway's core takes in at all (XDP_DROP there, nothing forwarded)."),
             "",
             ("| gateway runs | established Mpps | new flows Mpps | est. / XDP_PASS | new / XDP_PASS "
              "| est. / xdp_fwd | new / nft set | offered Mpps | setup s |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in res:
        e, n = med(res, case, "established"), med(res, case, "new")
        rules = case.split()[-1]
        nset = f"nft set {rules}"
        vs_set = f"{n / med(res, nset, 'new'):.2f}x" if nset in res and case != nset else ""
        s = f"{statistics.median(setup[case]):.1f}" if case in setup else ""
        fwd = e / med(res, "xdp_fwd (no policy)", "established")
        lines.append(f"| {case} | {e:.3f} | {n:.3f} | {e / base['established']:.2f}x | "
                     f"{n / base['new']:.2f}x | {fwd:.2f}x | {vs_set} | {med(res, case, 'established', 'gen_mpps'):.2f} | {s} |")
    goals = ["", "| goal | figure | met |", "|---|---|---|"]
    for n in (10, 100_000):
        c = f"bulkhead {n}"
        if c in res:
            x = med(res, c, "established") / base["established"]
            goals.append(f"| established, {n:,} rules >= 3x bare XDP_PASS | {x:.2f}x | {'yes' if x >= 3 else 'no'} |")
    for n in RULES:
        c, best = f"bulkhead {n}", max(med(res, f"nft {f} {n}", "new") for f in ("linear", "set"))
        x = med(res, c, "new") / best
        goals.append(f"| new flows, {n:,} rules >= nftables' best form | {x:.2f}x | {'yes' if x >= 1 else 'no'} |")
    return "\n".join(lines + goals) + "\n"


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    styles = {"established": "-", "new": "--"}
    for who, color in (("bulkhead", "tab:blue"), ("nft set", "tab:green"), ("nft linear", "tab:red")):
        for t in TRAFFIC:
            ax.plot(RULES, [med(res, f"{who} {n}", t) for n in RULES], styles[t], color=color, marker="o",
                    label=f"{who}, {t}")
    for case, color in (("none", "grey"), ("xdp_pass", "black"), ("xdp_fwd (no policy)", "tab:purple")):
        ax.axhline(med(res, case, "established"), color=color, linestyle=":", linewidth=1,
                   label=f"{case.replace('none', 'no program')}, established")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rules")
    ax.set_ylabel("Mpps forwarded (one gateway core)")
    ax.set_title("Gateway forwarding rate, 64-byte TCP (veth, XDP live frames)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(PLOT_FILE)
    plt.close(fig)


@pytest.mark.timeout(7200)
def test_live_rate(benchmark):
    if os.cpu_count() < 2:
        pytest.skip("needs 2 CPUs: the generator on one, the gateway on the other")
    res: dict = {}
    setup: dict = {}
    with LiveLab() as lab:
        benchmark.pedantic(lambda: [one_round(lab, res, setup) for _ in range(ROUNDS)], rounds=1, iterations=1)
        ev = lab.events() if lab.dp else {}
    text = report(res, setup)
    if ev:
        text += "\nbulkhead datapath events over the run: " + ", ".join(f"{k}={v:,}" for k, v in ev.items() if v) + "\n"
    TABLE_FILE.parent.mkdir(exist_ok=True)
    TABLE_FILE.write_text(text)
    plot(res)
    print("\n" + text + f"\n(written to {TABLE_FILE} and {PLOT_FILE})")
    benchmark.extra_info["table"] = text
    # Something was forwarded in every case that allows the traffic.
    for case, by in res.items():
        for t, runs in by.items():
            assert all(r["received"] > 0 for r in runs), (case, t, runs)
