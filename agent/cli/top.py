"""bulkhead top: a live view of the busiest app pairs, denials and hop latencies.

Everything the view shows comes from the agent's control socket:

- ``status``: counters by reason (packet/byte rates between two refreshes),
  data-path events (new flows per second), the verifier, and ``latency``
  (hop-latency percentiles per app pair) when the agent reports it;
- ``flows``: the flow table, aggregated by (source app, destination app);
- ``flow_events``: the flow log, for recent denials and would-be denials
  (audit). An agent without that op still gets both panels, from the
  flow table's denied and audited entries.

Frame building is pure (plain dicts in, a plain dict out: ``build_frame``),
so it is tested without an agent; ``render`` turns a frame into rich
renderables and ``run`` is the refresh loop the CLI calls.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable

from bulkhead.core.names import AUDIT, PASS, REJECT, VERDICTS
from bulkhead.datapath import abi

DENIED = frozenset({"drop", "reject"})
# Flow-table entries fetched per refresh: the flows op reads the table entry by entry.
MAX_FLOWS = 5000
# Flow events fetched per verdict and refresh, and denials kept for each panel.
EVENTS_PER_POLL = 100
KEEP_EVENTS = 200

Fetch = Callable[..., dict]


class TopError(RuntimeError):
    """The agent answered, but not with what the view needs."""


# ------------------------------------------------------------ classification
def verdict_of(rec: dict) -> str:
    """pass | drop | reject | audit for a flow-table entry, a flow event or a counter.

    A record that names its reason is classified by it (abi.verdict_of, the one classification
    every room uses: audit_rule/audit_default are "audit", whatever the verdict field says, as the
    data path reports those packets as passed). Without a reason, the record's own fields decide.
    """
    verdict = str(rec.get("verdict") or "")
    reason = str(rec.get("reason") or "").upper()
    if reason in abi.Reason.__members__:
        return abi.verdict_of(abi.Reason[reason])
    if rec.get("audit") and verdict in ("", PASS):
        return AUDIT  # no reason to go by: the audit flag on a passed record
    if verdict in VERDICTS:
        return verdict
    if verdict == "tx":
        return REJECT
    return verdict or "?"


def _num(x: Any) -> float:
    try:
        return float(x or 0)
    except (TypeError, ValueError):
        return 0.0


def _delta(cur: float, prev: float | None) -> float:
    """Counter increase; a counter that went backwards was reset (maps re-created): count from zero."""
    if prev is None or cur < prev:
        return cur
    return cur - prev


# --------------------------------------------------------------------- rates
def counter_rates(prev: dict | None, cur: dict, dt: float | None) -> dict | None:
    """Packet and byte rates from two `status` counter snapshots ({reason: {verdict, packets, bytes}}).

    Returns {"by_verdict": {verdict: {"pps", "bps"}} for every class in VERDICTS,
    "by_reason": [{"reason", "verdict", "pps", "bps"}] busiest first, zero rows left out},
    or None without a previous snapshot or a positive interval. bps is bytes per second.
    """
    if prev is None or not dt or dt <= 0:
        return None
    by_verdict = {v: {"pps": 0.0, "bps": 0.0} for v in VERDICTS}
    by_reason = []
    for reason, c in (cur or {}).items():
        if not isinstance(c, dict):
            continue
        p = prev.get(reason) if isinstance(prev.get(reason), dict) else {}
        pps = _delta(_num(c.get("packets")), _num(p.get("packets")) if p else None) / dt
        bps = _delta(_num(c.get("bytes")), _num(p.get("bytes")) if p else None) / dt
        verdict = verdict_of({"verdict": c.get("verdict"), "reason": reason})
        slot = by_verdict.setdefault(verdict, {"pps": 0.0, "bps": 0.0})
        slot["pps"] += pps
        slot["bps"] += bps
        if pps:
            by_reason.append({"reason": reason, "verdict": verdict, "pps": pps, "bps": bps})
    by_reason.sort(key=lambda r: (-r["pps"], r["reason"]))
    return {"by_verdict": by_verdict, "by_reason": by_reason}


def event_rate(prev: dict | None, cur: dict | None, name: str, dt: float | None) -> float | None:
    """Per-second rate of one data-path event counter (status "events")."""
    if prev is None or cur is None or name not in cur or not dt or dt <= 0:
        return None
    return _delta(_num(cur.get(name)), _num(prev.get(name)) if name in prev else None) / dt


# --------------------------------------------------------------------- pairs
def flow_key(f: dict) -> tuple:
    return (f.get("segment"), f.get("direction"), f.get("proto"), f.get("src"), f.get("sport"),
            f.get("dst"), f.get("dport"))


def aggregate_pairs(flows: Iterable[dict], prev_flows: Iterable[dict] | None = None,
                    dt: float | None = None) -> list[dict]:
    """Flow-table entries summed by (src_app, dst_app), busiest (bytes, then flows) first.

    A flow is counted once, by its forward entry (client -> server): `flows`,
    `packets`, `bytes`, `verdicts` ({verdict: flows}) and `rules` ({rule: flows})
    come from forward entries. A passing flow's reply entry carries the same apps;
    its counters go to `reply_packets` / `reply_bytes`. `bps` is the pair's bytes
    per second (both directions) since `prev_flows`, when given with dt > 0:
    an entry absent before (or whose counters went backwards: a new flow on the
    same tuple) counts from zero.
    """
    prev_bytes = None
    if prev_flows is not None and dt and dt > 0:
        prev_bytes = {flow_key(f): _num(f.get("bytes")) for f in prev_flows}
    pairs: dict[tuple[str, str], dict] = {}
    for f in flows:
        key = (str(f.get("src_app") or "-"), str(f.get("dst_app") or "-"))
        p = pairs.get(key)
        if p is None:
            p = pairs[key] = {"src_app": key[0], "dst_app": key[1], "flows": 0, "packets": 0, "bytes": 0,
                              "reply_packets": 0, "reply_bytes": 0, "verdicts": {}, "rules": {},
                              "bps": None, "_moved": 0.0}
        pkts, byts = int(_num(f.get("packets"))), int(_num(f.get("bytes")))
        if f.get("direction") == "reply":
            p["reply_packets"] += pkts
            p["reply_bytes"] += byts
        else:
            p["flows"] += 1
            p["packets"] += pkts
            p["bytes"] += byts
            v = verdict_of(f)
            p["verdicts"][v] = p["verdicts"].get(v, 0) + 1
            rule = str(f.get("rule") or "(default)")
            p["rules"][rule] = p["rules"].get(rule, 0) + 1
        if prev_bytes is not None:
            p["_moved"] += _delta(byts, prev_bytes.get(flow_key(f)))
    out = []
    for p in pairs.values():
        moved = p.pop("_moved")
        if prev_bytes is not None:
            p["bps"] = moved / dt
        out.append(p)
    out.sort(key=lambda p: (-(p["bytes"] + p["reply_bytes"]), -p["flows"], p["src_app"], p["dst_app"]))
    return out


# ------------------------------------------------------------------ denials
def _denial_row(rec: dict, source: str) -> dict:
    return {
        "time": rec.get("time"),
        "idle_s": rec.get("idle_s"),
        "kind": rec.get("kind") or ("flow" if source == "flows" else None),
        "verdict": verdict_of(rec),
        "src_app": rec.get("src_app") or "-",
        "dst_app": rec.get("dst_app") or "-",
        "rule": rec.get("rule") or "(default)",
        "reason": rec.get("reason") or "",
        "segment": rec.get("segment"),
        "proto": rec.get("proto"),
        "src": rec.get("src"),
        "dst": rec.get("dst"),
        "dport": rec.get("dport"),
        "sni": rec.get("sni"),
        "packets": rec.get("packets"),
        "seq": rec.get("seq"),
        "source": source,
    }


def denials_from_flows(flows: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """(denials, would_deny) from flow-table entries (forward only), most recently seen first:
    the fallback when the agent has no flow log."""
    denied, audit = [], []
    for f in flows:
        if f.get("direction") == "reply":
            continue
        v = verdict_of(f)
        if v in DENIED:
            denied.append(_denial_row(f, "flows"))
        elif v == "audit":
            audit.append(_denial_row(f, "flows"))
    key = lambda r: _num(r.get("idle_s"))  # noqa: E731
    return sorted(denied, key=key), sorted(audit, key=key)


class EventLog:
    """The newest denials and would-be denials from the agent's flow log (op flow_events).

    Each refresh asks for the most recent events of each verdict shown (the
    agent filters by verdict: drop, reject, audit), so the panels stay current
    however busy the log is: a top view skips, it does not page through a
    backlog. Events already held are recognised by their `seq`. Keeps the
    newest `keep` of each panel and the kernel's count of events lost to a full
    ring buffer. `available` turns False when the agent has no flow log (an
    older agent: unknown op); the frame then falls back to the flow table.
    """

    VERDICTS = ("drop", "reject", "audit")

    def __init__(self, keep: int = KEEP_EVENTS, per_poll: int = EVENTS_PER_POLL):
        self.keep = keep
        self.per_poll = per_poll
        self.available = True
        self.error: str | None = None
        self.kernel_lost: int | None = None
        self._denied: dict = {}
        self._audit: dict = {}

    @staticmethod
    def _key(e: dict):
        if e.get("seq") is not None:
            return e["seq"]
        return (e.get("time"), e.get("kind"), e.get("src"), e.get("sport"), e.get("dst"), e.get("dport"))

    @staticmethod
    def _newest(rows: dict) -> list[dict]:
        return sorted(rows.values(), key=lambda r: (_num(r.get("time")), _num(r.get("seq"))), reverse=True)

    def update(self, replies: Iterable[dict | None]) -> None:
        """Take the flow_events replies of one refresh ({ok, seq, events, lost, kernel_lost} each)."""
        replies = list(replies)
        bad = next((r for r in replies if not r or not r.get("ok")), None)
        if bad is not None or not replies:
            self.available = False
            self.error = (bad or {}).get("error")
            return
        self.available, self.error = True, None
        for reply in replies:
            if reply.get("kernel_lost") is not None:
                self.kernel_lost = int(_num(reply["kernel_lost"]))
            for e in reply.get("events") or []:
                if e.get("kind") == "end":
                    continue  # listed when judged (new) or re-judged (change)
                v = verdict_of(e)
                target = self._denied if v in DENIED else self._audit if v == "audit" else None
                if target is not None:
                    target.setdefault(self._key(e), _denial_row(e, "events"))
        for rows in (self._denied, self._audit):
            if len(rows) > self.keep:
                newest = self._newest(rows)[: self.keep]
                rows.clear()
                rows.update((self._key(r), r) for r in newest)

    @property
    def denials(self) -> list[dict]:
        """Drops and rejects, newest first."""
        return self._newest(self._denied)

    @property
    def would_deny(self) -> list[dict]:
        """Audit (would have been denied; passed), newest first."""
        return self._newest(self._audit)

    def poll(self, fetch: Fetch) -> None:
        if self.available:
            self.update([fetch("flow_events", verdict=v, limit=self.per_poll) for v in self.VERDICTS])


# ------------------------------------------------------------------ latency
def latency_rows(status: dict) -> list[dict] | None:
    """Hop-latency rows from status["latency"], most samples first; None if the agent
    does not report latency at all (an empty list: nothing timed yet)."""
    rows = status.get("latency")
    if rows is None:
        return None
    out = []
    for r in rows if isinstance(rows, list) else []:
        if not isinstance(r, dict):
            continue
        out.append({
            "src_app": r.get("src_app") or "-",
            "dst_app": r.get("dst_app") or "-",
            "kind": r.get("kind") or "?",
            "count": int(_num(r.get("count"))),
            "p50_ms": r.get("p50_ms"),
            "p99_ms": r.get("p99_ms"),
            "mean_ms": r.get("mean_ms"),
        })
    out.sort(key=lambda r: (-r["count"], r["src_app"], r["dst_app"], r["kind"]))
    return out


HOP_COLS = ("total", "ingress", "backbone", "app_vpc", "app")


def hop_rows(status: dict) -> list[dict]:
    """status["http_hops"] (telemetry/hops.py summary rows) -> one row per (pair, mode): p50/p99 per hop."""
    rows: dict[tuple, dict] = {}
    for r in status.get("http_hops") or []:
        key = (r.get("src_app") or "-", r.get("dst_app") or "-", r.get("mode") or "?")
        row = rows.setdefault(key, {"src_app": key[0], "dst_app": key[1], "mode": key[2], "count": 0})
        row[r.get("hop")] = {"p50_ms": r.get("p50_ms"), "p99_ms": r.get("p99_ms")}
        row["count"] = max(row["count"], int(_num(r.get("count"))))
    return sorted(rows.values(), key=lambda r: (-r["count"], r["src_app"], r["dst_app"], r["mode"]))


# -------------------------------------------------------------------- frame
def build_frame(cur: dict, prev: dict | None = None, events: EventLog | None = None, rows: int = 10) -> dict:
    """One view of the agent, as plain data (what `--json` prints).

    `cur` and `prev` are samples {"t": monotonic seconds, "status": status op
    result, "flows": flows op result}; `prev` (the sample of the last refresh)
    gives rates. `events` is the followed flow log, if any. Tables hold at most
    `rows` rows.
    """
    st = cur.get("status") or {}
    flows = cur.get("flows") or []
    dt = None
    if prev is not None:
        dt = _num(cur.get("t")) - _num(prev.get("t"))
        if dt <= 0:
            dt = None
    pst = (prev or {}).get("status") or {}
    pol = st.get("policy") or {}
    settings = pol.get("settings") or {}
    notes: list[str] = []

    rates = counter_rates(pst.get("counters") if prev else None, st.get("counters") or {}, dt)
    if rates is not None:
        rates["new_flows_per_s"] = event_rate(pst.get("events"), st.get("events"), "flow_new", dt)
        rates["by_reason"] = rates["by_reason"][:rows]

    pairs = aggregate_pairs(flows, (prev or {}).get("flows") if prev else None, dt)

    if events is not None and events.available:
        denials, would_deny = events.denials, events.would_deny
        loss = {"kernel_lost": events.kernel_lost}
        source = "events"
    else:
        denials, would_deny = denials_from_flows(flows)
        loss = None
        source = "flows"
        notes.append("denials from the flow table (the agent has no flow log)")
    fl = st.get("flow_log")
    if isinstance(fl, dict) and fl.get("running") is False:
        notes.append(f"the agent's flow log is not running{': ' + str(fl['error']) if fl.get('error') else ''}")

    latency = latency_rows(st)
    if latency is None:
        notes.append("the agent reports no hop latency")
    elif not latency:
        notes.append("no hop-latency samples yet (TCP flows whose SYN crosses the gateway)")

    ver = st.get("verifier") or {}
    verifier = {"running": bool(ver.get("running")), "pid": ver.get("pid"), "port": ver.get("port"),
                "restarts": ver.get("restarts", 0), "requests": (ver.get("requests") or {}).get("by_verdict", {})}

    return {
        "time": time.time(),
        "interval_s": dt,
        "agent": {"pid": st.get("pid"), "uptime_s": st.get("uptime_s"), "generation": st.get("generation"),
                  "mode": settings.get("mode"), "default_action": settings.get("default_action"),
                  "files": pol.get("files") or []},
        "flows_cached": st.get("flows") or {},
        "rates": rates,
        "pairs": pairs[:rows],
        "pairs_total": len(pairs),
        "flows_seen": len(flows),
        "denials": denials[:rows],
        "would_deny": would_deny[:rows],
        "denials_source": source,
        "event_loss": loss,
        "latency": (latency or [])[:rows],
        "http_hops": hop_rows(st)[:rows],
        "verifier": verifier,
        "notes": notes,
    }


def sample(fetch: Fetch, max_flows: int = MAX_FLOWS) -> dict:
    """Status and flow table, now."""
    st = fetch("status")
    if not st.get("ok"):
        raise TopError(st.get("error") or "status failed")
    fl = fetch("flows", limit=max_flows)
    if not fl.get("ok"):
        raise TopError(fl.get("error") or "flows failed")
    return {"t": time.monotonic(), "status": st.get("status") or {}, "flows": fl.get("flows") or []}


# ---------------------------------------------------------------- rendering
def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}" if n == int(n) or abs(n) >= 10 else f"{n:.1f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_ms(x: Any) -> str:
    if x is None:
        return "-"
    x = _num(x)
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def fmt_duration(s: Any) -> str:
    s = int(_num(s))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


VERDICT_STYLE = {"pass": "green", "drop": "red", "reject": "magenta", "audit": "yellow"}


def _when(r: dict) -> str:
    t = r.get("time")
    if isinstance(t, (int, float)) and t > 1e9:
        return time.strftime("%H:%M:%S", time.localtime(t))
    if r.get("idle_s") is not None:
        return f"{_num(r['idle_s']):.0f}s ago"
    return ""


def render(frame: dict):
    """A rich renderable for one frame."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    a = frame.get("agent") or {}
    head = Text()
    head.append("bulkhead top", style="bold")
    head.append(f"  generation {a.get('generation', '?')}  mode {a.get('mode') or '?'}"
                f"  default {a.get('default_action') or '?'}  agent pid {a.get('pid', '?')}"
                f" up {fmt_duration(a.get('uptime_s'))}")
    fc = frame.get("flows_cached") or {}
    if fc:
        head.append(f"  flow entries {sum(int(_num(v)) for v in fc.values())}")

    rates = frame.get("rates")
    rl = Text()
    if rates is None:
        rl.append("rates: waiting for a second sample", style="dim")
    else:
        for v in VERDICTS:
            r = rates["by_verdict"].get(v, {})
            label = "audit (would deny)" if v == "audit" else v
            rl.append(f"{label} ", style=VERDICT_STYLE[v])
            rl.append(f"{fmt_count(r.get('pps'))} pkt/s {fmt_bytes(r.get('bps'))}/s   ")
        if rates.get("new_flows_per_s") is not None:
            rl.append(f"new flows {fmt_count(rates['new_flows_per_s'])}/s")

    pairs = Table(title="Busiest app pairs", title_justify="left", expand=True, pad_edge=False)
    for col, just in (("FROM", "left"), ("TO", "left"), ("FLOWS", "right"), ("VERDICTS", "left"),
                      ("RULES", "left"), ("PKTS", "right"), ("BYTES fwd/reply", "right"), ("RATE", "right")):
        pairs.add_column(col, justify=just, no_wrap=col not in ("RULES",))
    for p in frame.get("pairs") or []:
        verdicts = Text()
        for v, n in sorted((p.get("verdicts") or {}).items(), key=lambda kv: -kv[1]):
            verdicts.append(f"{v} {n} ", style=VERDICT_STYLE.get(v, ""))
        rules = ", ".join(r for r, _ in sorted((p.get("rules") or {}).items(), key=lambda kv: -kv[1])[:3])
        pairs.add_row(Text(p["src_app"]), Text(p["dst_app"]), str(p["flows"]), verdicts, Text(rules),
                      fmt_count(p["packets"]),
                      f"{fmt_bytes(p['bytes'])} / {fmt_bytes(p['reply_bytes'])}",
                      "-" if p.get("bps") is None else f"{fmt_bytes(p['bps'])}/s")
    if not frame.get("pairs"):
        pairs.add_row("(no flows)", "", "", "", "", "", "", "")

    def denial_table(title: str, rows: list[dict]):
        t = Table(title=title, title_justify="left", expand=True, pad_edge=False)
        with_sni = any(r.get("sni") for r in rows)
        for col in ("WHEN", "FROM", "TO", "VERDICT", "RULE", "REASON", "DESTINATION") + (("SNI",) if with_sni else ()):
            t.add_column(col, no_wrap=True)
        for r in rows:
            dest = f"{r.get('dst') or ''}:{r.get('dport') if r.get('dport') is not None else ''}"
            if r.get("proto"):
                dest += f"/{r['proto']}"
            t.add_row(_when(r), Text(str(r["src_app"])), Text(str(r["dst_app"])),
                      Text(r["verdict"], style=VERDICT_STYLE.get(r["verdict"], "")), Text(str(r["rule"])),
                      Text(str(r["reason"])), Text(dest if dest != ":" else ""),
                      *((Text(str(r.get("sni") or "")),) if with_sni else ()))
        if not rows:
            t.add_row("(none)", *[""] * (len(t.columns) - 1))
        return t

    loss = frame.get("event_loss")
    suffix = ""
    if loss and loss.get("kernel_lost"):
        suffix = f" - {loss['kernel_lost']} flow events lost in the kernel (ring buffer full)"
    denials = denial_table("Recent denials (drop / reject)" + suffix, frame.get("denials") or [])
    would = denial_table("Would deny (audit: passed, not dropped)", frame.get("would_deny") or [])

    lat = Table(title="Hop latency at the gateway (ms)", title_justify="left", expand=True, pad_edge=False)
    for col, just in (("FROM", "left"), ("TO", "left"), ("KIND", "left"), ("SAMPLES", "right"),
                      ("P50", "right"), ("P99", "right"), ("MEAN", "right")):
        lat.add_column(col, justify=just, no_wrap=True)
    for r in frame.get("latency") or []:
        lat.add_row(Text(str(r["src_app"])), Text(str(r["dst_app"])), Text(str(r["kind"])), fmt_count(r["count"]), fmt_ms(r.get("p50_ms")),
                    fmt_ms(r.get("p99_ms")), fmt_ms(r.get("mean_ms")))
    if not frame.get("latency"):
        lat.add_row("(no samples)", "", "", "", "", "", "")

    hop = Table(title="HTTP between gateways, per hop: p50/p99 ms", title_justify="left", expand=True, pad_edge=False)
    for col in ("FROM", "TO", "MODE", "REQUESTS", *(c.upper() for c in HOP_COLS)):
        hop.add_column(col, justify="left" if col in ("FROM", "TO", "MODE") else "right", no_wrap=True)
    for r in frame.get("http_hops") or []:
        hop.add_row(Text(str(r["src_app"])), Text(str(r["dst_app"])), Text(str(r["mode"])), fmt_count(r["count"]),
                    *(f"{fmt_ms((r.get(c) or {}).get('p50_ms'))}/{fmt_ms((r.get(c) or {}).get('p99_ms'))}"
                      for c in HOP_COLS))
    v = frame.get("verifier") or {}
    vl = Text()
    if v.get("running"):
        req = ", ".join(f"{k} {n}" for k, n in sorted((v.get("requests") or {}).items())) or "no requests yet"
        vl.append("L7 verifier ", style="bold")
        vl.append(f"up, pid {v.get('pid') or 'restarting'}, port {v.get('port')}, restarts {v.get('restarts', 0)}: {req}")
    else:
        vl.append("L7 verifier not running", style="dim")
    parts = [head, rl, pairs, denials, would, lat, *([hop] if frame.get("http_hops") else []), vl]
    parts += [Text(n, style="dim") for n in frame.get("notes") or []]
    return Group(*parts)


# --------------------------------------------------------------------- loop
def run(fetch: Fetch, interval: float = 2.0, once: bool = False, as_json: bool = False, rows: int = 10,
        max_flows: int = MAX_FLOWS, console=None) -> int:
    """Refresh every `interval` seconds until Ctrl-C, or print one frame with `once`.

    `fetch(op, **kw)` asks the agent; its errors (no agent) propagate to the
    caller, after the live display has given the terminal back. With `as_json`
    each frame is one line of JSON.
    """
    import json

    from rich.console import Console

    if console is None:
        # Piped or redirected (scripts, --once > file): wide enough not to cut names; COLUMNS overrides.
        console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=160)
    events = EventLog()
    prev: dict | None = None
    pause = max(interval, 0.1) if not once else interval

    def frame_now() -> dict:
        nonlocal prev
        events.poll(fetch)
        cur = sample(fetch, max_flows)
        frame = build_frame(cur, prev, events, rows)
        prev = cur
        return frame

    def emit_json(frame: dict) -> None:
        console.file.write(json.dumps(frame, default=str) + "\n")
        console.file.flush()

    try:
        if once:
            if interval > 0:
                # Rates need two samples: take one, wait, then build the frame.
                frame_now()
                time.sleep(interval)
            frame = frame_now()
            emit_json(frame) if as_json else console.print(render(frame))
            return 0
        if as_json:
            while True:
                emit_json(frame_now())
                time.sleep(pause)
        from rich.live import Live

        with Live(render(frame_now()), console=console, auto_refresh=False, screen=console.is_terminal,
                  transient=False) as live:
            while True:
                time.sleep(pause)
                live.update(render(frame_now()), refresh=True)
    except KeyboardInterrupt:
        return 0
