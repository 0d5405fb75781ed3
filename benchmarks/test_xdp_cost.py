"""Per-packet cost of the XDP program (BPF_PROG_TEST_RUN), marginal over empty XDP.

Targets (../shared/BENCHMARKS.md): established flow <= 35 ns, new flow
(segment + two identity lookups + policy) <= 100 ns, and 100k apps+rules
<= 1.3x the cost at 10. The new-flow path is forced on every run with
ctl flag BH_CTL_BYPASS_FLOWS (no flow-cache lookup or insert), so the same
frame repeated never hits a cache entry.
"""
from __future__ import annotations

import pytest
from scapy.all import IP, TCP, Ether, IPv6, raw

from bulkhead.datapath import abi

from .conftest import measure, record, scale_bundle, v4, v6

SCALES = [10, 1_000, 100_000]
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
XDP_NAMES = {1: "DROP", 2: "PASS", 3: "TX"}


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


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("path", ["established", "new_flow"])
def test_xdp_marginal_cost(benchmark, scaled, family, path):
    n, dp = scaled
    frame = frames(n)[family]
    ifindex = dp.ifindexes["seg1"]
    if path == "established":
        dp.set_ctl_flags(clear_bits=abi.CTL_BYPASS_FLOWS)
        from bulkhead.datapath import libbpf

        assert libbpf.prog_test_run_xdp(dp.prog_fd(), frame, ifindex).retval == 2  # creates the flow entry
    else:
        dp.set_ctl_flags(set_bits=abi.CTL_BYPASS_FLOWS)
    try:
        result = benchmark.pedantic(measure, args=(dp, frame, ifindex), rounds=1, iterations=1)
    finally:
        dp.set_ctl_flags(clear_bits=abi.CTL_BYPASS_FLOWS)
    assert result["retval"] == 2, "the benchmark frame must be an allowed flow"
    benchmark.extra_info.update(result)
    record(scenario=f"{path} {family}", scale=n, verdict=XDP_NAMES[result["retval"]], **result)
