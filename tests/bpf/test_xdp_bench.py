"""The benchmark hooks are in the benchmarks' build only (-DBH_BENCH).

`xdp` is the object the agent loads; `xdp_bench` the same source built as
benchmarks/conftest.py builds it. The production object has no reference
programs and ignores the ctl flags BH_CTL_BYPASS_FLOWS, BH_CTL_SNI_BENCH and
BH_CTL_BENCH_NEW_FLOW;
the bench build honours them, so each check below can fail.
"""
from __future__ import annotations

import pytest
from scapy.all import IP, UDP, Raw

from bulkhead.datapath import abi, loader

from .conftest import C4, PAY4, E, R, X
from .test_xdp_sni import client_hello, send_hello, sni_bundle

BUILDS = [pytest.param("xdp", False, id="production"), pytest.param("xdp_bench", True, id="bench")]


def test_only_the_bench_build_has_the_reference_program(xdp, xdp_bench):
    from bcc import BPF

    with pytest.raises(Exception, match="Unknown program"):
        xdp.dp.bpf.load_func(loader.EMPTY_PROG.encode(), BPF.XDP)
    assert loader.EMPTY_PROG not in xdp.dp.fns
    assert xdp_bench.dp.prog_fd(loader.EMPTY_PROG) > 0
    for name in (loader.FLOOR_PROG,):  # the established path's floor (parse + one flow-table hit)
        with pytest.raises(Exception, match="Unknown program"):
            xdp.dp.bpf.load_func(name.encode(), BPF.XDP)
        assert xdp_bench.dp.prog_fd(name) > 0


@pytest.mark.parametrize("build, hooked", BUILDS)
def test_bypass_flows_flag(request, build, hooked):
    """With the flag, the bench build judges every packet as a new flow and caches nothing."""
    x = request.getfixturevalue(build)
    x.dp.set_ctl_flags(set_bits=abi.CTL_BYPASS_FLOWS)
    frame = E / IP(src=C4, dst=PAY4) / UDP(sport=41999, dport=53) / Raw(b"q")
    x.expect(frame, "prod", X.PASS, R.ALLOW_RULE)
    x.expect(frame, "prod", X.PASS, R.ALLOW_RULE)
    # production: one flow, its forward entry (2 packets) and its reply entry
    assert sorted(f.packets for _, f in x.flows(4)) == ([] if hooked else [0, 2])


@pytest.mark.parametrize("build, hooked", BUILDS)
def test_sni_bench_flag(request, build, hooked):
    """With the flag, the bench build puts a decided flow back to pending (both entries)."""
    x = request.getfixturevalue(build)
    x.apply(sni_bundle())
    x.dp.set_ctl_flags(set_bits=abi.CTL_SNI_BENCH)
    v = send_hello(x, client_hello(b"pay.example.internal"))
    assert v.reasons == {R.ALLOW_RULE: 1}
    reasons = sorted(R(f.reason).name for _, f in x.flows(4))
    assert reasons == (["SNI_PENDING", "SNI_PENDING"] if hooked else ["ALLOW_REPLY", "ALLOW_RULE"])


@pytest.mark.parametrize("build, hooked", BUILDS)
def test_bench_new_flow_flag(request, build, hooked):
    """With the flag, the bench build makes every packet a new 5-tuple: a flow (two entries) per packet."""
    x = request.getfixturevalue(build)
    x.dp.set_ctl_flags(set_bits=abi.CTL_BENCH_NEW_FLOW)
    try:
        frame = E / IP(src=C4, dst=PAY4) / UDP(sport=41998, dport=53) / Raw(b"q")
        x.expect(frame, "prod", X.PASS, R.ALLOW_RULE)
        x.expect(frame, "prod", X.PASS, R.ALLOW_RULE)
    finally:
        x.dp.set_ctl_flags(clear_bits=abi.CTL_BENCH_NEW_FLOW)
    entries = sorted(f.packets for _, f in x.flows(4))
    assert entries == ([0, 0, 1, 1] if hooked else [0, 2])
