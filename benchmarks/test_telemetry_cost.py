"""What visibility costs the established path: the same program compiled with
and without telemetry (-DBH_NO_TELEMETRY: no flow events, no pair counts, no
hop timing), measured interleaved in one run (../shared/BENCHMARKS.md method 1).
Target (issue 5): <= 10 ns more per established-flow packet than without.

On the established path telemetry is one test of the entry's timing bits and
the packet's FIN/RST flags; the measured packets (handshake, first payload
each way, first FIN/RST: about six per TCP flow) take a tail call into
bulkhead_observe and back: a per-flow cost, not a per-packet one.

BH_BENCH_PLAIN="-D names" (default BH_NO_TELEMETRY) sets what the reference
program is compiled with besides BH_BENCH, for ablations.
"""
from __future__ import annotations

import os
import statistics

import pytest
from scapy.all import IP, TCP, Ether, IPv6, raw

from bulkhead.datapath import abi, libbpf, loader

from .conftest import bench_defines, interleaved, record, ring_counter, scale_bundle, v4, v6
from .summary import goal

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


@pytest.fixture(scope="module")
def pair(bench_dp):
    """(with telemetry, without) loaded in the same namespace, the same 10-app policy."""
    pin = loader.PIN_ROOT / f"bench-notel-{os.getpid()}"
    plain = loader.Datapath(pin, defines=bench_defines(os.environ.get("BH_BENCH_PLAIN", "BH_NO_TELEMETRY"))).load()
    try:
        bundle = scale_bundle(10)
        bench_dp.generation += 1
        bench_dp.apply(bundle, bench_dp.ifindexes, bench_dp.generation)
        plain.apply(bundle, bench_dp.ifindexes, 1)
        yield bench_dp, plain
    finally:
        loader.remove_pins(pin)


def with_and_without(tel, plain, frame: bytes, ifindex: int):
    r = interleaved(tel.prog_fd(), plain.prog_fd(), frame, ifindex, rounds=9)
    assert r["retval"] == r["retval_b"] == 2, "the benchmark frame must pass"
    return r["a_ns"], r["b_ns"], r["diff_ns"]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_telemetry_cost_on_established_path(benchmark, pair, family):
    tel, plain = pair
    l3 = IP(src=str(v4(4)), dst=str(v4(5))) if family == "ipv4" else IPv6(src=str(v6(4)), dst=str(v6(5)))
    frame = raw(ETH / l3 / TCP(sport=40001, dport=443, flags="A"))
    ifindex = tel.ifindexes["seg1"]
    for dp in pair:  # create the flow entry in both
        assert libbpf.prog_test_run_xdp(dp.prog_fd(), frame, ifindex).retval == 2
    with_ns, without_ns, extra = benchmark.pedantic(
        with_and_without, args=(tel, plain, frame, ifindex), rounds=1, iterations=1)
    benchmark.extra_info.update(with_ns=with_ns, without_ns=without_ns, extra_ns=extra)
    record(scenario=f"established {family}: telemetry vs none", scale=10, empty_ns=without_ns, ours_ns=with_ns,
           marginal_ns=extra, verdict="PASS")
    goal("XDP per packet", f"telemetry's extra per established packet, {family}", ours=extra, unit="ns",
         baseline=without_ns, baseline_is="built without telemetry", want="<= 10 ns", met=extra <= 10,
         note=f"{with_ns:.0f} ns with, {without_ns:.0f} ns without, interleaved")


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_telemetry_cost_on_new_flow_events_delivered(benchmark, pair, family):
    """A new flow's telemetry (pair count + a flow event written into the ring),
    with the ring drained before every round so that every event is delivered.
    Both builds skip the flow table here (BH_CTL_BYPASS_FLOWS): the difference is
    telemetry alone; test_xdp_cost's new_flow takes the whole real path."""
    tel, plain = pair
    l3 = IP(src=str(v4(4)), dst=str(v4(5))) if family == "ipv4" else IPv6(src=str(v6(4)), dst=str(v6(5)))
    frame = raw(ETH / l3 / TCP(sport=40002, dport=443, flags="A"))
    ifindex = tel.ifindexes["seg1"]
    ring_counter(tel)
    repeat = 10_000  # fits the 2 MiB ring (176 bytes a record)
    lost0 = tel.events()["flow_event_lost"]

    def run():
        a, b, d = [], [], []
        for dp in pair:
            dp.set_ctl_flags(set_bits=abi.CTL_BYPASS_FLOWS)
        try:
            for _ in range(9):
                tel.bpf.ring_buffer_consume()
                ra = libbpf.prog_test_run_xdp(tel.prog_fd(), frame, ifindex, repeat=repeat)
                rb = libbpf.prog_test_run_xdp(plain.prog_fd(), frame, ifindex, repeat=repeat)
                a.append(ra.duration_ns)
                b.append(rb.duration_ns)
                d.append(ra.duration_ns - rb.duration_ns)
        finally:
            for dp in pair:
                dp.set_ctl_flags(clear_bits=abi.CTL_BYPASS_FLOWS)
            tel.bpf.ring_buffer_consume()
        return statistics.median(a), statistics.median(b), statistics.median(d)

    with_ns, without_ns, extra = benchmark.pedantic(run, rounds=1, iterations=1)
    assert tel.events()["flow_event_lost"] == lost0, "every event must have been delivered"
    benchmark.extra_info.update(with_ns=with_ns, without_ns=without_ns, extra_ns=extra)
    record(scenario=f"new flow {family}: telemetry (events delivered) vs none", scale=10, empty_ns=without_ns,
           ours_ns=with_ns, marginal_ns=extra, verdict="PASS")
    goal("XDP per packet", f"telemetry's extra per new flow (pair count + event delivered), {family}", ours=extra,
         unit="ns", baseline=without_ns, baseline_is="built without telemetry", want="–", met=None,
         note="flow table skipped in both builds")
