"""`bulkhead top`: the per-hop break-down of requests between gateways (status["http_hops"])."""
from __future__ import annotations

import io

from bulkhead.cli import top
from bulkhead.telemetry import hops


def status_with_hops() -> dict:
    log = hops.HopLog()
    for i in range(4):
        log.add({"time": 0, "src_app": "web", "dst_app": "api", "mode": "http",
                 "hops_ms": {"ingress": 5.0, "backbone": 20.0, "app_vpc": 2.0, "app": 30.0, "total": 57.0}})
    log.add({"time": 0, "src_app": "web", "dst_app": "api", "mode": "tls_inferred",
             "hops_ms": {"ingress": 5.0, "backbone": 21.0, "app_vpc": None, "app": None, "total": 60.0}})
    return {"http_hops": log.summary()}


def test_one_row_per_pair_and_mode_with_p50_p99_per_hop():
    rows = top.hop_rows(status_with_hops())
    assert [(r["src_app"], r["dst_app"], r["mode"], r["count"]) for r in rows] == [
        ("web", "api", "http", 4), ("web", "api", "tls_inferred", 1)]
    http = rows[0]
    assert 17.5 < http["backbone"]["p50_ms"] <= 20.0 and 25.0 < http["app"]["p50_ms"] <= 30.0
    assert "app" not in rows[1], "a part that was not measured has no cell"


def test_frame_and_render_show_the_break_down():
    frame = top.build_frame({"t": 0, "status": status_with_hops(), "flows": []})
    assert [r["mode"] for r in frame["http_hops"]] == ["http", "tls_inferred"]
    from rich.console import Console

    con = Console(file=io.StringIO(), width=200, color_system=None)
    con.print(top.render(frame))
    out = con.file.getvalue()
    assert "HTTP between gateways, per hop" in out and "BACKBONE" in out and "tls_inferred" in out
    assert top.build_frame({"t": 0, "status": {}, "flows": []})["http_hops"] == []
    con = Console(file=io.StringIO(), width=200, color_system=None)
    con.print(top.render(top.build_frame({"t": 0, "status": {}, "flows": []})))
    assert "per hop" not in con.file.getvalue(), "no table until there is something to show"
