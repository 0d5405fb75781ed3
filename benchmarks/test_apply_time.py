"""How long `bulkhead policy apply` of a big policy takes, end to end, and what the maps cost.

Goal (../shared/BENCHMARKS.md, 4): 100,000 rules applied atomically in < 2 s.

A real agent runs in a private namespace (two veths, its own state dir and pins; started with
--map-size policy=1048576 so a 1M-rule policy fits). For each size the benchmark applies policies
of N rules (side x side client/server apps, one allow rule per pair: benchmarks/test_fleet_scale's
generator) with `bulkhead policy apply --json`, the CLI a user runs, and times the whole command.
Four variants differ in the server port, so every policy entry of an apply differs from the
standby slot's (which holds the variant applied two applies before): each measured apply
deletes N stale entries and writes N new ones. The split, measured on the same file:
- compile: load, validate and compile the YAML to a Bundle (in this process, as the CLI does);
- transfer: Bundle.pack, the control-socket frame over a unix socketpair, Bundle.unpack;
- maps: the agent's Datapath.apply (pack the entries, clear and fill the standby slot, flip),
  from the agent's reply;
- rest: the command's wall time minus those (interpreter start and imports of the CLI, the
  agent's gateway plumbing and bookkeeping).
Kernel memory: the `memlock:` of the per-slot maps' fds (/proc/self/fdinfo, opened from the pins)
for the active slot after the apply, less the same maps empty (the other slot at the start):
bytes per rule. Results: build/bench-apply.md (and printed).
"""
from __future__ import annotations

import ctypes as C
import json
import os
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bulkhead.core import wire
from bulkhead.datapath import abi, libbpf, loader
from bulkhead.datapath.maps import map_specs
from bulkhead.lab.runner import bulkhead_argv
from bulkhead.policy import load_policy
from bulkhead.policy.bundle import Bundle

from .summary import goal
from .test_fleet_scale import policy_yaml

SIZES = [int(x) for x in os.environ.get("BULKHEAD_APPLY_RULES", "1000,10000,100000,1000000").split(",")]
GOAL_RULES, GOAL_S = 100_000, 2.0
MAP_SIZES = ("--map-size", "policy=1048576")  # 1M exact policy entries; the default holds 524,288
RESULTS_FILE = Path(__file__).resolve().parents[1] / "build" / "bench-apply.md"
ROWS: list[dict] = []
PORTS = (443, 8443, 9443, 10443)


def policy_file(dir: Path, n: int, variant: int) -> Path:
    p = dir / f"apply-{n}-{variant}.yaml"
    if not p.exists():
        text = policy_yaml(n).replace("bhf-c", "bha-c").replace("bhf-s", "bha-s")
        p.write_text(text.replace("tcp/443", f"tcp/{PORTS[variant]}"))
    return p


def memlock(pin_maps: Path, slot: int) -> int:
    """Bytes the kernel charges for the per-slot maps of `slot` (fdinfo memlock)."""
    total = 0
    for name in map_specs(abi.DEFAULT_SIZES):
        if not name.endswith(f"_{slot}") or name.startswith("seg_map_"):
            continue
        fd = libbpf.obj_get(str(pin_maps / name))
        try:
            for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("memlock:"):
                    total += int(line.split()[1])
        finally:
            os.close(fd)
    return total


def active_slot(pin_maps: Path) -> int:
    fd = libbpf.obj_get(str(pin_maps / "ctl"))
    try:
        v = abi.Ctl()
        libbpf.lib().bpf_map_lookup_elem(fd, C.byref(C.c_uint32(0)), C.byref(v))
        return v.active_slot & 1
    finally:
        os.close(fd)


def transfer_s(bundle: Bundle) -> float:
    """pack, one control frame through a unix socketpair, unpack: what the bundle costs on the wire."""
    a, b = socket.socketpair()
    got = {}
    t0 = time.monotonic()

    def reader():
        got["req"] = wire.recv_frame(b)

    t = threading.Thread(target=reader)
    t.start()
    wire.send_frame(a, {"op": "apply", "bundle": bundle.pack()})
    t.join()
    Bundle.unpack(got["req"]["bundle"])
    dt = time.monotonic() - t0
    a.close(), b.close()
    return dt


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """`bulkhead agent run` in namespace bhapply-<pid> with a one-rule policy (nsenter: only the
    network namespace, so the pins are in the bpffs this process sees)."""
    d = tmp_path_factory.mktemp("apply")
    ns, sd = f"bhapply-{os.getpid()}", d / "state"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("ip", "netns", "add", ns)
    proc = None
    try:
        run("ip", "-n", ns, "link", "set", "lo", "up")
        for ifc in ("bha-c", "bha-s"):
            run("ip", "-n", ns, "link", "add", ifc, "type", "veth", "peer", "name", f"{ifc}p")
            run("ip", "-n", ns, "link", "set", ifc, "up")
            run("ip", "-n", ns, "link", "set", f"{ifc}p", "up")
        start = policy_file(d, 1, 0)
        log = open(d / "agent.log", "w")
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", *bulkhead_argv(), "agent", "run", "--state-dir", str(sd),
                                 *MAP_SIZES, "--policy", str(start)], stdout=subprocess.PIPE, stderr=log,
                                text=True)
        for line in proc.stdout:
            if line.startswith("bulkhead agent ready"):
                break
        else:
            raise RuntimeError(f"agent did not start: {(d / 'agent.log').read_text()[-3000:]}")
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        maps = loader.pin_dir_for(sd) / "maps"
        empty = memlock(maps, 1 - active_slot(maps))
        yield {"ns": ns, "state": sd, "dir": d, "maps": maps, "empty": empty}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *bulkhead_argv(), "down", "--state-dir", str(sd)],
                       capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def cli_apply(agent, path: Path) -> tuple[float, dict]:
    argv = ["nsenter", f"--net=/run/netns/{agent['ns']}", *bulkhead_argv(), "policy", "apply", "--json",
            "--state-dir", str(agent["state"]), str(path)]
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    dt = time.monotonic() - t0
    assert p.returncode == 0, f"apply of {path.name} failed: {p.stdout}{p.stderr}"
    return dt, json.loads(p.stdout.strip().splitlines()[-1])


def table() -> str:
    lines = ["| rules | end to end s | compile s | transfer s | maps s | rest s | kernel memory, MiB | "
             "bytes per rule | goal | met |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in ROWS:
        want = f"< {GOAL_S:.0f} s" if r["rules"] == GOAL_RULES else ""
        met = ("yes" if r["e2e"] < GOAL_S else "no") if want else ""
        lines.append(f"| {r['rules']:,} | {r['e2e']:.2f} | {r['compile']:.2f} | {r['transfer']:.2f} | "
                     f"{r['maps']:.2f} | {r['rest']:.2f} | {r['mem'] / 2**20:.1f} | {r['per_rule']:.0f} | "
                     f"{want} | {met} |")
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n}rules")
def test_apply_time(benchmark, agent, n, capsys):
    files = [policy_file(agent["dir"], n, v) for v in range(4)]
    rounds = 1 if n >= 1_000_000 else 2

    def measure():
        for f in files[:2]:  # both slots hold an N-rule policy of another port
            cli_apply(agent, f)
        e2e, maps = [], []
        for i in range(rounds):
            dt, reply = cli_apply(agent, files[2 + i % 2])
            e2e.append(dt)
            maps.append(reply["seconds"])
        t0 = time.monotonic()
        bundle, _ = load_policy([str(files[2])])
        compile_s = time.monotonic() - t0
        return {"e2e": statistics.median(e2e), "maps": statistics.median(maps), "compile": compile_s,
                "transfer": transfer_s(bundle), "entries": len(bundle.policy_entries)}

    r = benchmark.pedantic(measure, rounds=1, iterations=1)
    r["rest"] = max(0.0, r["e2e"] - r["compile"] - r["transfer"] - r["maps"])
    r["mem"] = memlock(agent["maps"], active_slot(agent["maps"])) - agent["empty"]
    r["rules"], r["per_rule"] = n, r["mem"] / n
    benchmark.extra_info.update(r)
    ROWS.append(r)
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(table())
    with capsys.disabled():
        print("\n" + table() + f"(written to {RESULTS_FILE})")
    assert r["entries"] == n
    is_goal = n == GOAL_RULES
    goal("policy apply", f"{n:,} rules, `bulkhead policy apply` end to end", ours=r["e2e"], unit="s",
         want=f"< {GOAL_S:g} s" if is_goal else "reported", met=r["e2e"] < GOAL_S if is_goal else None,
         note=(f"compile {r['compile']:.2f} s, transfer {r['transfer']:.2f} s, maps + flip {r['maps']:.2f} s, "
               f"rest {r['rest']:.2f} s; kernel memory {r['mem'] / 2**20:.1f} MiB, {r['per_rule']:.0f} B per rule"))
    if is_goal:
        goal("policy apply", f"kernel memory per rule, {n:,} rules (one slot; the standby slot as much)",
             ours=r["per_rule"], unit="B", want="reported", met=None)
