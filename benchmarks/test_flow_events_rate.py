"""Flow events per second the agent consumes without loss (issue 5).

The producer is the XDP program itself: BPF_PROG_TEST_RUN with the ctl flag
BH_CTL_BYPASS_FLOWS makes every run a new flow, so every run writes one
flow event into the ring buffer. It is paced in 10 ms batches at a target
rate for one second; the consumer is the agent's own FlowLog thread (decode,
names, bounded buffer), exactly as in `bulkhead agent run`. A rate passes when
the kernel counted no lost event and the FlowLog received every one. The
result is the highest passing rate, reported with the first failing one.
"""
from __future__ import annotations

import os
import time

import pytest
from scapy.all import IP, UDP, Ether, Raw, raw

from bulkhead.telemetry import flowlog
from bulkhead.datapath import abi, libbpf, loader

from .conftest import bench_defines, record, scale_bundle, v4
from .summary import goal

RATES = [10_000, 25_000, 50_000, 100_000, 200_000, 400_000]


@pytest.fixture(scope="module")
def producer(bench_dp):
    pin = loader.PIN_ROOT / f"bench-rate-{os.getpid()}"
    dp = loader.Datapath(pin, defines=bench_defines()).load()  # BH_CTL_BYPASS_FLOWS needs the hooks
    try:
        dp.apply(scale_bundle(10), bench_dp.ifindexes, 1)
        dp.ifindexes = bench_dp.ifindexes
        yield dp
    finally:
        loader.remove_pins(pin)


def _run_at(dp, log, frame: bytes, ifindex: int, rate: int) -> tuple[int, int, int]:
    """(sent, received, lost) for one second at `rate` events/s."""
    batch = max(1, rate // 100)
    lost0, got0 = dp.events()["flow_event_lost"], log.received
    sent = 0
    t0 = time.monotonic()
    for i in range(100):
        libbpf.prog_test_run_xdp(dp.prog_fd(), frame, ifindex, repeat=batch)
        sent += batch
        pause = t0 + (i + 1) * 0.01 - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    deadline = time.monotonic() + 3
    while log.received - got0 < sent and time.monotonic() < deadline:
        lost = dp.events()["flow_event_lost"] - lost0
        if log.received - got0 + lost >= sent:
            break
        time.sleep(0.05)
    return sent, log.received - got0, dp.events()["flow_event_lost"] - lost0


def test_flow_events_consumed_without_loss(benchmark, producer):
    dp = producer
    names = lambda _gen: ({}, {}, {})  # noqa: E731 -- ids stay ids: the decode work is the same
    log = flowlog.FlowLog(names, keep=flowlog.DEFAULT_KEEP)
    log.start(dp.bpf)
    frame = raw(Ether() / IP(src=str(v4(4)), dst=str(v4(5))) / UDP(sport=40003, dport=443) / Raw(b"x"))
    ifindex = dp.ifindexes["seg1"]
    results = {}
    dp.set_ctl_flags(set_bits=abi.CTL_BYPASS_FLOWS)
    try:
        def sweep():
            for rate in RATES:
                sent, got, lost = _run_at(dp, log, frame, ifindex, rate)
                results[rate] = (sent, got, lost)
                assert got + lost == sent, f"at {rate}/s: {sent} sent, {got} received, {lost} counted lost"
                if lost:
                    break
            return results
        benchmark.pedantic(sweep, rounds=1, iterations=1)
    finally:
        dp.set_ctl_flags(clear_bits=abi.CTL_BYPASS_FLOWS)
        log.stop()
    ok = [r for r, (_s, _g, lost) in results.items() if not lost]
    failed = [r for r, (_s, _g, lost) in results.items() if lost]
    benchmark.extra_info.update(rates={r: {"sent": s, "received": g, "lost": lo} for r, (s, g, lo) in results.items()},
                                max_lossless=max(ok) if ok else 0)
    print(f"\nflow events/s without loss: {max(ok) if ok else 0:,}"
          + (f" (loss from {min(failed):,}/s)" if failed else " (no loss at any rate tried)"))
    for r, (s, g, lo) in results.items():
        print(f"  {r:>8,}/s: sent {s:,} received {g:,} lost {lo:,}")
    goal("flow events", "flow events/s the agent's FlowLog consumes without loss", ours=max(ok) if ok else 0,
         unit="events/s", want="reported", met=None,
         note=(f"loss from {min(failed):,}/s" if failed else f"no loss at any rate tried, up to {max(RATES):,}/s")
              + "; rates tried " + ", ".join(f"{r:,}" for r in RATES))
    assert ok, "events were lost even at the lowest rate"
