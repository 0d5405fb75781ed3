"""Per-packet cost of deciding a flow on its TLS ClientHello, marginal over
the established-flow path (target <= 60 ns, ../shared/BENCHMARKS.md).

A decided flow is cached, so to run the same ClientHello `repeat` times the
ctl flag BH_CTL_SNI_BENCH makes bulkhead_sni, after it has done everything a
real ClientHello does (parse state lookup, parse, decision, both flow entries
settled), put the flow back as it was: pending, the parse not started. Every
run is the real path, warm, plus those few stores. Measured interleaved with
an established-flow packet of another (allowed) app pair.
"""
from __future__ import annotations

import statistics

import pytest
from scapy.all import IP, TCP, Ether, Raw, raw

from bulkhead.datapath import abi, libbpf
from bulkhead.policy import sni

from .conftest import record, scale_bundle, v4

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
NAME = b"api.example.internal"


def _client_hello(sni_index: int, n_ext: int = 16) -> bytes:
    import struct

    def ext(t, d):
        return struct.pack("!HH", t, len(d)) + d

    names = struct.pack("!H", len(NAME) + 3) + b"\x00" + struct.pack("!H", len(NAME)) + NAME
    others = [ext(0x0a0a + 0x1010 * (i % 4), b"x" * (8 + i)) for i in range(n_ext - 1)]
    exts = others[:sni_index] + [ext(0, names)] + others[sni_index:]
    block = b"".join(exts)
    body = (b"\x03\x03" + b"r" * 32 + b"\x20" + b"s" * 32 + b"\x00\x04\x13\x01\x13\x02\x01\x00"
            + struct.pack("!H", len(block)) + block)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def _clear(dp):
    for name, key in (("flows4", abi.Flow4Key), ("flows6", abi.Flow6Key), ("sni_state", abi.Flow6Key)):
        fd = dp.map_fds[name]
        for k in libbpf.map_keys(fd, key):
            libbpf.map_delete(fd, k)


@pytest.fixture(scope="module")
def sni_dp(bench_dp):
    b = scale_bundle(10)
    # app 5 -> app 6 tcp/443 becomes name-gated; the name allows it
    b.policy_entries = [(e[0], e[1], e[2], e[3], e[4], int(abi.Action.SNI), e[6], e[7])
                        if (e[1], e[2]) == (5, 6) else e for e in b.policy_entries]
    b.sni_entries = [(sni.name_hash(NAME), 5, 6, 443, int(abi.Action.ALLOW), 0, 99, 6)]
    bench_dp.generation += 1
    bench_dp.apply(b, bench_dp.ifindexes, bench_dp.generation)
    return bench_dp


@pytest.mark.parametrize("position", ["first", "last"])
def test_clienthello_marginal_cost(benchmark, sni_dp, position):
    dp, ifindex = sni_dp, sni_dp.ifindexes["seg1"]
    c, s = str(v4(4)), str(v4(5))  # app 5 -> app 6: name-gated
    syn = raw(ETH / IP(src=c, dst=s) / TCP(sport=40000, dport=443, flags="S", seq=99))
    hello = raw(ETH / IP(src=c, dst=s) / TCP(sport=40000, dport=443, flags="PA", seq=100, ack=1)
                / Raw(_client_hello(0 if position == "first" else 15)))
    # app 4 -> app 5 tcp/443: a plain allowed flow, for the established-path reference
    ack = raw(ETH / IP(src=str(v4(3)), dst=c) / TCP(sport=40001, dport=443, flags="A", seq=5, ack=1))
    _clear(dp)
    assert libbpf.prog_test_run_xdp(dp.prog_fd(), syn, ifindex).retval == 2
    assert libbpf.prog_test_run_xdp(dp.prog_fd(), ack, ifindex).retval == 2
    dp.set_ctl_flags(set_bits=abi.CTL_SNI_BENCH)
    try:
        def measure():
            ch, est = [], []
            for _ in range(7):
                r = libbpf.prog_test_run_xdp(dp.prog_fd(), hello, ifindex, repeat=100_000)
                assert r.retval == 2, "the ClientHello must be allowed by name"
                ch.append(r.duration_ns)
                est.append(libbpf.prog_test_run_xdp(dp.prog_fd(), ack, ifindex, repeat=100_000).duration_ns)
            return {"clienthello_ns": statistics.median(ch), "established_ns": statistics.median(est)}

        res = benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        dp.set_ctl_flags(clear_bits=abi.CTL_SNI_BENCH)
    res["marginal_ns"] = res["clienthello_ns"] - res["established_ns"]
    benchmark.extra_info.update(res)
    record(scenario=f"ClientHello, SNI {position} of 16 (over established)", scale=10, verdict="PASS",
           empty_ns=res["established_ns"], ours_ns=res["clienthello_ns"], marginal_ns=res["marginal_ns"])
