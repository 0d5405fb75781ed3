"""Per-packet cost of the XDP program (BPF_PROG_TEST_RUN), marginal over empty XDP.

Goals (issue 18 part 3, ../shared/BENCHMARKS.md): established flow <= 35 ns, a new
flow with its flow event delivered <= 100 ns, and 100k apps+rules <= 1.3x the cost
at 10.

Every path runs with ctl flag BH_CTL_NO_FASTPATH: the verdict, without the hand-off
to bulkhead_forward (the fast path's forwarding is measured live, test_live_rate.py).
Without the flag the figures would be the same but by accident: BPF_PROG_TEST_RUN's
`repeat` runs reuse one xdp_buff, so once the 32-byte metadata area is used up (two
runs) bpf_xdp_adjust_meta fails and the program passes the packet plainly (the
fwd_* events count a handful of hand-offs per 200,000 runs).

- established: the same allowed frame, its flow entry made by a first run: one
  flow-table hit and the verdict.
- new_flow: the real path. Ctl flag BH_CTL_BENCH_NEW_FLOW (-DBH_BENCH only) gives
  every run a new 5-tuple (source port and key pad from a per-CPU counter): a
  flow-table miss, both entries inserted into the LRU, which the benchmark fills
  first so that every insert evicts, and the flow event reserved in the ring. The
  ring is drained between calls and `repeat` stays below its capacity, so every
  event is delivered (the test checks: none counted lost).
- established also runs the reference program bulkhead_bench_lookup (-DBH_BENCH
  only), interleaved: parse, the ctl word, the segment and one flow-table hit,
  nothing else: the floor any flow-cached verdict pays (the note of the goal row).
- classify: the classification alone (ctl flag BH_CTL_BYPASS_FLOWS: no flow-table
  lookup or insert): what "new flow" measured before issue 18.
"""
from __future__ import annotations

import statistics

import pytest
from scapy.all import IP, TCP, Ether, IPv6, raw

from bulkhead.datapath import abi, libbpf, loader

from .conftest import measure, record, ring_counter, scale_bundle, v4, v6
from .summary import goal

SCALES = [10, 1_000, 100_000]
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
XDP_NAMES = {1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}
NEW_FLOW_REPEAT = 10_000  # below the ring's ~11,900 records (2 MiB, 176 bytes each)
GOALS = {"established": 35, "new_flow": 100}
BY: dict[tuple[str, str, int], float] = {}


def frames(n: int) -> dict[str, bytes]:
    """Client app 5 -> its allowed destination app 6, port 443."""
    c, s = 4, 5  # app ids 5 and 6 (index + 1)
    return {
        "ipv4": raw(ETH / IP(src=str(v4(c)), dst=str(v4(s))) / TCP(sport=40000, dport=443, flags="A")),
        "ipv6": raw(ETH / IPv6(src=str(v6(c)), dst=str(v6(s))) / TCP(sport=40000, dport=443, flags="A")),
    }


@pytest.fixture(scope="module", params=SCALES, ids=lambda n: f"{n}apps")
def scaled(request, bench_dp):
    n = request.param
    bench_dp.generation += 1
    bench_dp.apply(scale_bundle(n), bench_dp.ifindexes, bench_dp.generation)
    return n, bench_dp


def established_floor(dp, frame: bytes, ifindex: int, rounds: int = 7, repeat: int = 200_000) -> dict:
    """measure(), and the floor program in the same rounds (its marginal over empty)."""
    from .conftest import interleaved

    r = measure(dp, frame, ifindex, rounds, repeat)
    f = interleaved(dp.prog_fd(loader.FLOOR_PROG), dp.prog_fd(loader.EMPTY_PROG), frame, ifindex, rounds, repeat)
    assert f["retval"] == 2, "the floor program must find the flow entry"
    r["floor_ns"] = f["diff_ns"]
    return r


def new_flow_real(dp, frame: bytes, ifindex: int, rounds: int = 7) -> dict:
    """Interleaved with empty, every run a new flow into a full flow table, events drained."""
    seen = ring_counter(dp)
    cap = dp.sizes["BH_MAX_FLOWS"]
    ev0 = dp.events()
    # Fill the family's table (two entries per flow) so that every insert below evicts.
    libbpf.prog_test_run_xdp(dp.prog_fd(), frame, ifindex, repeat=cap // 2 + 10_000)
    dp.bpf.ring_buffer_consume()
    ev1, seen1 = dp.events(), seen[0]
    empty = dp.prog_fd(loader.EMPTY_PROG)
    a, b, d = [], [], []
    for _ in range(rounds):
        dp.bpf.ring_buffer_consume()
        ra = libbpf.prog_test_run_xdp(dp.prog_fd(), frame, ifindex, repeat=NEW_FLOW_REPEAT)
        dp.bpf.ring_buffer_consume()
        rb = libbpf.prog_test_run_xdp(empty, frame, ifindex, repeat=NEW_FLOW_REPEAT)
        a.append(ra.duration_ns)
        b.append(rb.duration_ns)
        d.append(ra.duration_ns - rb.duration_ns)
    dp.bpf.ring_buffer_consume()
    ev2 = dp.events()
    return {"empty_ns": statistics.median(b), "ours_ns": statistics.median(a), "marginal_ns": statistics.median(d),
            "retval": ra.retval, "events_delivered": seen[0] - seen1,
            "events_lost": ev2["flow_event_lost"] - ev1["flow_event_lost"],
            "entries_inserted": ev2["flow_entry_new"] - ev0["flow_entry_new"], "table_capacity": cap}


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("path", ["established", "new_flow", "classify"])
def test_xdp_marginal_cost(benchmark, scaled, family, path):
    n, dp = scaled
    frame = frames(n)[family]
    ifindex = dp.ifindexes["seg1"]
    flag = {"established": 0, "new_flow": abi.CTL_BENCH_NEW_FLOW, "classify": abi.CTL_BYPASS_FLOWS}[path]
    if path == "established":
        assert libbpf.prog_test_run_xdp(dp.prog_fd(), frame, ifindex).retval == 2  # creates the flow entry
    dp.set_ctl_flags(set_bits=flag | abi.CTL_NO_FASTPATH)
    try:
        if path == "new_flow":
            result = benchmark.pedantic(new_flow_real, args=(dp, frame, ifindex), rounds=1, iterations=1)
        elif path == "established":
            result = benchmark.pedantic(established_floor, args=(dp, frame, ifindex), rounds=1, iterations=1)
        else:
            result = benchmark.pedantic(measure, args=(dp, frame, ifindex), rounds=1, iterations=1)
    finally:
        dp.set_ctl_flags(clear_bits=flag | abi.CTL_NO_FASTPATH)
    assert result["retval"] == 2, "the benchmark frame must be an allowed flow"
    note = ""
    if path == "new_flow":
        runs = 7 * NEW_FLOW_REPEAT
        assert result["events_lost"] == 0, "every flow event must be delivered"
        assert result["events_delivered"] >= runs, "every run must have made a flow event"
        assert result["entries_inserted"] > result["table_capacity"], "the table must be full: inserts evict"
        note = (f"{result['events_delivered']:,} events delivered, {result['events_lost']} lost; "
                f"{result['entries_inserted']:,} entries inserted into a {result['table_capacity']:,}-entry LRU")
    if path == "established":
        note = f"floor: parse + one flow-table hit {result['floor_ns']:.0f} ns (bulkhead_bench_lookup, same rounds)"
    benchmark.extra_info.update(result)
    record(scenario=f"{path} {family}", scale=n, verdict=XDP_NAMES[result["retval"]], **{
        k: result[k] for k in ("empty_ns", "ours_ns", "marginal_ns")})
    m = result["marginal_ns"]
    BY[(path, family, n)] = m
    label = {"established": "established flow", "new_flow": "new flow, table full, event delivered",
             "classify": "new flow's classification alone (no flow table)"}[path]
    if n == 10:
        want = GOALS.get(path)
        goal("XDP per packet", f"{label}, {family}, 10 rules", ours=m, unit="ns",
             want=f"<= {want} ns" if want else "–", met=(m <= want) if want else None, note=note)
    if n == SCALES[-1] and (path, family, 10) in BY and BY[(path, family, 10)] > 0:
        r = m / BY[(path, family, 10)]
        goal("XDP per packet", f"{label}, {family}: 100k rules against 10", ours=r, unit="x",
             want="<= 1.3x", met=r <= 1.3, note=f"{m:.0f} ns at 100k, {BY[(path, family, 10)]:.0f} ns at 10")
