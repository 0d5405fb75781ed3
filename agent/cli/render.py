"""Text rendering of what the agent answers: status, flow events, L7 requests, latency.

Pure functions of the reply dicts, so tests render without an agent.
"""
from __future__ import annotations

import json
import time


def status_text(st: dict) -> str:
    lines = [
        f"generation {st['generation']} (slot {st['active_slot']}), agent pid {st['pid']}, up {st['uptime_s']}s",
        f"policy: {', '.join(st['policy']['files'])}  {st['policy']['apps']} apps, {st['policy']['rules']} rules,"
        f" {st['policy']['policy_entries']} entries, default {st['policy']['settings'].get('default_action')},"
        f" mode {st['policy']['settings'].get('mode')}",
    ]
    dp = st.get("datapath") or {}
    if dp:
        how = "compiled by this agent" if dp.get("compiled") else "pinned programs reused, no compile"
        lines.append(f"data path: build {dp.get('build_id', '?')} ({how})")
    if st.get("fleet"):
        lines.append(fleet_line(st["fleet"]))
    if st.get("transit"):
        lines.append(transit_line(st["transit"]))
    lines += transit_count_lines(st)
    lines.append("interfaces:")
    for i in st["interfaces"]:
        lines.append(f"  {i['name']:<16} ifindex {i['ifindex']:<5} segment {i.get('segment', '?'):<12} xdp {i['mode']:<8}"
                     f" reject via {i.get('reject_path', '?')}")
    lines.append(f"flows cached: {st['flows']['flows4']} IPv4 entries, {st['flows']['flows6']} IPv6 entries")
    lines.append("packets by reason:")
    for name, c in sorted(st["counters"].items(), key=lambda kv: -kv[1]["packets"]):
        if c["packets"]:
            lines.append(f"  {name:<22} {c['verdict']:<7} {c['packets']:>12} pkts {c['bytes']:>14} bytes")
    v = st.get("verifier") or {}
    if v.get("running"):
        req = v.get("requests", {})
        by = ", ".join(f"{k} {n}" for k, n in sorted(req.get("by_verdict", {}).items())) or "none yet"
        lines.append(f"L7 verifier: pid {v.get('pid') or 'restarting'}, port {v.get('port')}, "
                     f"restarts {v.get('restarts', 0)}, requests: {by}")
        conns = req.get("connections", {})
        if conns:
            lines.append("  connections: " + ", ".join(f"{k} {n}" for k, n in sorted(conns.items())))
    else:
        lines.append("L7 verifier: not running (L7 flows are dropped, counted as punt_no_handler)")
    fl = st.get("flow_log") or {}
    if fl:
        lost = f"{fl.get('kernel_lost') or 0} lost in the kernel (ring full), {fl.get('buffer_dropped', 0)} " \
               f"dropped from the agent's buffer of {fl.get('keep')}"
        state = "" if fl.get("running") else f" NOT RUNNING{': ' + fl['error'] if fl.get('error') else ''}"
        lines.append(f"flow log ({fl.get('transport')}){state}: {fl.get('received', 0)} events, {lost}")
        for p in fl.get("pairs", [])[:10]:
            by = ", ".join(f"{k} {n}" for k, n in sorted(p["by_verdict"].items()))
            lines.append(f"  {p['src_app']} -> {p['dst_app']}: {p['new']} new flows ({by or '-'}), {p['end']} ended")
    lines += latency_lines(st.get("latency") or [])
    return "\n".join(lines)


def fleet_line(f: dict) -> str:
    """fleet: gateway gw-east, revision 7 (stale), etcd http://a:2379 unreachable; refused: why"""
    stale = " (stale: etcd has not confirmed it)" if f.get("stale") else ""
    etcd = ", ".join(f.get("etcd") or [])
    conn = "connected" if f.get("connected") else "unreachable" + (f" ({f['etcd_error']})" if f.get("etcd_error") else "")
    line = f"fleet: gateway {f.get('gateway')}, revision {f.get('revision')}{stale}, etcd {etcd} {conn}"
    if f.get("error"):
        line += f"; last refused: {f['error']}"
    return line


def transit_line(t: dict) -> str:
    """transit: gateway gw-east 198.18.100.1, device bhvx-default (ifindex 7), udp/4789; peers gw-west 198.18.100.2"""
    if t.get("address"):
        dev = f"device {t['device']} (ifindex {t['ifindex']})" if t.get("ifindex") else f"device {t.get('device')} MISSING"
        here = f"{t['address']}, {dev}"
    else:
        here = "no transit address (flows to other gateways are dropped: transit_no_tunnel)"
    peers = ", ".join(f"{n} {a}" for n, a in sorted((t.get("peers") or {}).items())) or "none"
    return f"transit: gateway {t.get('gateway')} {here}, udp/{t.get('port')}; peers {peers}"


TRANSIT_DROPS = ("transit_unknown_peer", "transit_bad_identity", "transit_bad_segment", "transit_no_tunnel",
                 "transit_snat_full", "transit_snat_lost")
FABRIC_EVENTS = ("transit_encap", "transit_decap", "vip_nat")


def transit_count_lines(st: dict) -> list[str]:
    """The fabric's counts under the transit line: packets sent to and accepted from other gateways,
    new translated flows, drops by reason (with zeros: what did not happen is worth seeing). Shown
    when the policy has transit here, or when any of them was counted."""
    counters, events = st.get("counters") or {}, st.get("events") or {}
    drops = {r: (counters.get(r) or {}).get("packets", 0) for r in TRANSIT_DROPS}
    evs = {e: events.get(e, 0) for e in FABRIC_EVENTS}
    if not st.get("transit") and not any(drops.values()) and not any(evs.values()):
        return []
    return [f"  packets sent {evs['transit_encap']} (transit_encap), accepted {evs['transit_decap']} (transit_decap);"
            f" translated flows {evs['vip_nat']} (vip_nat)",
            "  dropped: " + ", ".join(f"{r} {n}" for r, n in drops.items())]


def latency_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return ["hop latency: no TCP flow measured yet"]
    lines = ["hop latency at the gateway (ms; server_rtt SYN->SYN-ACK, client_rtt SYN-ACK->ACK, "
             "server_time request->response):",
             f"  {'FROM':<14} {'TO':<14} {'KIND':<12} {'COUNT':>7} {'P50':>9} {'P99':>9} {'MEAN':>9}"]
    for r in rows:
        lines.append(f"  {r['src_app']:<14} {r['dst_app']:<14} {r['kind']:<12} {r['count']:>7} "
                     f"{r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['mean_ms']:>9.3f}")
    return lines


def event_line(e: dict) -> str:
    t = time.strftime("%H:%M:%S", time.localtime(e.get("time", 0))) + f".{int(e.get('time', 0) * 1000) % 1000:03d}"
    client = f"{e['src']}:{e['sport']}" if e["family"] == 4 else f"[{e['src']}]:{e['sport']}"
    server = f"{e['dst']}:{e['dport']}" if e["family"] == 4 else f"[{e['dst']}]:{e['dport']}"
    server += fabric_note(e)
    reason = e["reason"] + (f" (was {e['prev_reason']})" if e.get("prev_reason") else "")
    counts = f"{e['packets']}/{e['bytes']}"
    if e["kind"] == "end":
        counts += f" {e['r_packets']}/{e['r_bytes']}"
    return (f"{t:<12} {e['kind']:<6} {e['segment']:<8} {e['proto']:<5} {client + ' -> ' + server:<48} "
            f"{e['src_app'] + ' -> ' + e['dst_app']:<26} {e['verdict']:<7} {reason:<18} {e['rule']:<20} "
            f"{e.get('sni') or '-':<24} {counts}")


def fabric_note(e: dict) -> str:
    """After the server of a flow through the fabric: " (api 198.18.1.20)" when the client dialed a
    service address (the app and the real address it was translated to; the dialed one is the
    server; " (api by 198.19.255.136)" when the event shows the real address), " via gwb" when the
    other end is behind gateway gwb, " from 198.18.1.1:40000" when this gateway translated the
    client's source into the server's segment (transit_snat). Empty for other flows."""
    note = ""
    if e.get("real") and e["dst"] != e["real"]:
        note += f" ({e['dst_app']} {e['real']})"
    elif e.get("vip"):  # caused by a reply, seen before its translation: the server is the real address
        note += f" ({e['dst_app']} by {e['vip']})"
    if e.get("via"):
        note += f" via {e['via']}"
    if e.get("snat"):
        note += f" from {e['snat']}"
    return note


EVENT_HEADER = (f"{'TIME':<12} {'KIND':<6} {'SEGMENT':<8} {'PROTO':<5} {'CLIENT -> SERVER':<48} "
                f"{'FROM -> TO':<26} {'VERDICT':<7} {'REASON':<18} {'RULE':<20} {'SNI':<24} PKTS/BYTES (REPLY)")


REQUEST_HEADER = (f"{'TIME':<8} {'VERDICT':<7} {'ST':>3} {'METHOD':<7} {'HOST+PATH':<40} {'FROM':<12} "
                  f"{'TO':<12} {'RULE':<20} {'IN':>8} {'OUT':>9}  MS(dec/conn/ttfb/total)  REASON")


def request_line(r: dict) -> str:
    ms = "/".join(f"{(r.get(k) or 0) * 1000:.1f}" for k in ("decision_s", "connect_s", "ttfb_s", "total_s"))
    url = (r.get("host") or "") + (r.get("path") or "")
    to = r.get("dst_app") or "-"
    if r.get("router"):  # routed: router>backend (docs/fabric.md, Routes)
        to = f"{r['router']}>{r.get('backend') or '?'}"
    return (f"{time.strftime('%H:%M:%S', time.localtime(r.get('time', 0))):<8} {r.get('verdict', '?'):<7} "
            f"{r.get('status') or 0:>3} {r.get('method') or '-':<7} {url[:40]:<40} "
            f"{r.get('src_app') or '-':<12} {to:<12} {r.get('rule') or '-':<20} "
            f"{r.get('bytes_in') or 0:>8} {r.get('bytes_out') or 0:>9}  {ms:<23}  {r.get('reason') or ''}")


HOP_HEADER = (f"{'TIME':<8} {'MODE':<12} {'FROM':<12} {'TO':<12} {'VIA':<10} "
              f"{'TOTAL':>8} {'INGRESS':>8} {'BACKBONE':>8} {'APP_VPC':>8} {'APP':>8}  (ms)")


def hop_line(r: dict) -> str:
    """A request between two gateways, timed per hop (telemetry/hops.py): '-' where not measured."""
    h = r.get("hops_ms") or {}
    cols = " ".join(f"{'-' if h.get(k) is None else format(h[k], '.2f' if h[k] < 10 else '.1f'):>8}"
                    for k in ("total", "ingress", "backbone", "app_vpc", "app"))
    return (f"{time.strftime('%H:%M:%S', time.localtime(r.get('time', 0))):<8} {r.get('mode', '?'):<12} "
            f"{r.get('src_app') or '-':<12} {r.get('dst_app') or '-':<12} {r.get('via') or '-':<10} {cols}")


def show_requests(recs: list[dict], hop_recs: list[dict], header: bool, as_json: bool, verdict: str | None,
                  echo) -> None:
    """`bulkhead requests`: the verifier's decisions, then the fabric's requests timed per hop."""
    recs = [r for r in recs if not verdict or r.get("verdict") == verdict]
    if as_json:
        for r in recs + ([] if verdict else hop_recs):
            echo(json.dumps(r, default=str))
        return
    if header or recs:
        if header:
            echo(REQUEST_HEADER)
        for r in recs:
            echo(request_line(r))
    if hop_recs and not verdict:
        if header:
            echo("")
            echo("Between gateways, per hop:")
            echo(HOP_HEADER)
        for r in hop_recs:
            echo(hop_line(r))
