"""Request timing per hop: the VNI's 7-bit code, the parts, the histograms (agent/telemetry/hops.py)."""
from __future__ import annotations

import pytest

from bulkhead.telemetry import hops

U = 1 / hops.UNIT_S  # units of 1024 ns per second


def test_code_is_never_zero_and_fits_seven_bits():
    for u in (0, 1, 15, 16, 255, 256, 10**4, 10**6, 2**22, 2**31):
        assert 1 <= hops.code(u) <= 127


@pytest.mark.parametrize("seconds", [0.0003, 0.002, 0.0072, 0.03, 0.0325, 0.1, 0.75, 2.5])
def test_code_round_trip_is_within_a_sixteenth(seconds):
    u = int(seconds * U)
    back = hops.units(hops.code(u))
    assert abs(back - u) <= u / 16 + 16, (u, back)


def test_codes_are_monotonic_and_saturate():
    decoded = [hops.units(c) for c in range(1, 128)]
    assert decoded == sorted(decoded) and len(set(decoded)) == 127
    assert hops.code(10**9) == 127  # ~17 min: "4.0 s or more"
    assert hops.units(127) == pytest.approx(4.03 * U, rel=0.01)


def test_parts_add_up_to_the_total():
    # client 5 ms, backbone 20 ms, app VPC 2 ms, app 30 ms
    crtt, far_srtt = int(0.005 * U), int(0.002 * U)
    far = int(0.032 * U)
    near = far + int(0.020 * U)
    p = hops.parts(crtt, near, far, far_srtt)
    assert p["ingress"] == pytest.approx(0.005, abs=1e-5)
    assert p["backbone"] == pytest.approx(0.020, abs=1e-5)
    assert p["app_vpc"] == pytest.approx(0.002, abs=1e-5)
    assert p["app"] == pytest.approx(0.030, abs=1e-5)
    assert p["total"] == pytest.approx(sum(p[k] for k in ("ingress", "backbone", "app_vpc", "app")), abs=1e-5)


def test_unknown_times_leave_their_parts_unknown():
    p = hops.parts(0, int(0.01 * U), 0, 0)  # no handshake seen, far gateway told nothing
    assert p == {"ingress": None, "backbone": None, "app_vpc": None, "app": None, "total": None}
    p = hops.parts(int(0.001 * U), int(0.01 * U), int(0.004 * U), 0)
    assert p["backbone"] == pytest.approx(0.006, abs=1e-5) and p["app_vpc"] is None and p["app"] is None


def test_histograms_merge_across_gateways_into_p50_p99():
    a, b = hops.HopLog(), hops.HopLog()
    for i in range(99):
        a.add({"time": 0, "src_app": "web", "dst_app": "api", "mode": "http",
               "hops_ms": {"backbone": 20.0, "app": None}})
    b.add({"time": 0, "src_app": "web", "dst_app": "api", "mode": "http", "hops_ms": {"backbone": 300.0}})
    rows = hops.summary(hops.merge(hops.merge({}, a.export()), b.export()))
    assert [(r["hop"], r["count"]) for r in rows] == [("backbone", 100)]
    assert 17.5 <= rows[0]["p50_ms"] <= 20.0
    assert rows[0]["p99_ms"] <= 20.0 and rows[0]["mean_ms"] == pytest.approx((99 * 20 + 300) / 100)
    with pytest.raises(ValueError):
        hops.merge({}, [{"src_app": "x", "dst_app": "y", "hop": "app", "mode": "http", "buckets": [1],
                         "count": 1, "sum_s": 0.1}])


def test_since_and_reply():
    log = hops.HopLog(keep=3)
    for i in range(5):
        log.add({"time": i, "src_app": "web", "dst_app": "api", "mode": "tls_inferred", "hops_ms": {}})
    assert [r["seq"] for r in log.since(None, 0)] == [3, 4, 5]
    assert [r["seq"] for r in log.since(4, 0)] == [5]
    rep = log.reply({"hop_after": 3, "limit": 1})
    assert rep["hop_seq"] == 5 and [r["seq"] for r in rep["hop_requests"]] == [5]
