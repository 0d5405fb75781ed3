"""The flow log: flow events from the data path, decoded with names, kept in a bounded buffer.

The XDP program sends one `struct bh_flow_event` (abi.FlowEvent) per
  - new flow (`new`): the first judgment of a flow, whatever the verdict
    (denies and flow collisions too);
  - verdict change (`change`): a policy swap re-judged the flow to another
    verdict or rule, or its TLS server name was decided (then `sni` is set and
    `prev_reason` is sni_pending);
  - flow end (`end`): its first FIN or RST, one per flow, with the packets and
    bytes of both directions. Flows that end without one (UDP, ICMP, a TCP flow
    that just goes idle or is evicted from the flow table) get no end event.
The tuple always reads client -> server.

Records come through a BPF ring buffer (a perf buffer on kernels without
one, `use_perf`); a consumer thread decodes them into dicts with app, rule
and segment NAMES from the bundle of the event's generation (and, for a flow
through the fabric, the other gateway it goes `via`, the service address
`vip` the client dialed and the `real` address it was translated to:
FabricNames), and keeps the
last `keep` in a deque with a monotonically increasing `seq`. Loss is
counted in both places it can happen: the kernel counts records it could not
put in a full ring (events['flow_event_lost']); the agent counts records that
fell out of its buffer before anyone read them (`since()` tells a follower
how many it missed).

Also here, pure and unit-tested: the hop-latency summary (percentiles
interpolated within the kernel's log2 buckets) and the bookkeeping that turns
the flow table's live packet/byte counts into monotonic counters.
"""
from __future__ import annotations

import collections
import ctypes as C
import dataclasses
import ipaddress
import itertools
import logging
import socket
import threading
import time
from typing import Callable, Iterable

from bulkhead.core.names import proto_name
from bulkhead.datapath import abi
from bulkhead.telemetry import hops

log = logging.getLogger("bulkhead.flowlog")

KIND_NAMES = {abi.FlowEv.NEW: "new", abi.FlowEv.CHANGE: "change", abi.FlowEv.END: "end", abi.FlowEv.HOP: "hop"}
LAT_KINDS = {abi.Lat.SERVER_RTT: "server_rtt", abi.Lat.CLIENT_RTT: "client_rtt", abi.Lat.SERVER_TIME: "server_time"}
BY_NAME = "(by name)"  # abi.APP_ANY: an app named by hostnames, not decided yet
DEFAULT_RULE = "(default)"  # rule id 0: settings.default_action (or no rule involved)
DEFAULT_KEEP = 10000
PERF_PAGES = 64  # per-CPU perf buffer pages (perf fallback only)

# names(generation) -> (apps, rules, segments), each id -> name, optionally a fourth element:
# the generation's FabricNames (None: no fabric)
NamesFn = Callable[[int], "tuple"]


@dataclasses.dataclass(frozen=True)
class FabricNames:
    """What naming a flow through the fabric takes, read off a bundle's fab_entries (kept whole
    when the bundle is cut to one gateway): see fabric_names()."""

    local: frozenset  # segment ids of this gateway (the bundle's segments)
    gateway_of: dict  # segment id -> the name of the gateway it is behind (every segment of the policy)
    # addr16 of a service address, or of the real address one translates to -> (vip, real) as text
    nat: dict
    # (segment id, family) -> the address flows from other gateways take in it (transit_snat)
    snat: dict = dataclasses.field(default_factory=dict)

    def via(self, segment_id: int, peer_segment: int) -> str | None:
        """The other gateway of a flow through the transit: that of whichever of its two
        segments (the client's, the server's) is not this gateway's."""
        for seg in (peer_segment, segment_id):
            if seg and seg not in self.local:
                return self.gateway_of.get(seg, f"(gateway of segment {seg})")
        return None


def fabric_names(bundle) -> FabricNames | None:
    """A bundle's FabricNames (None without fab_entries). Gateway ids are 1-based in
    bundle.gateways order (the FAB_SEG entries' a); FAB_VIP/FAB_REAL pair each service address
    with the real address the kernel translates it to, looked up either way (an event caused by a
    reply reads the real address as its destination: XDP sees the packet before TC translates)."""
    if not bundle.fab_entries:
        return None
    gws = list(bundle.gateways)
    gateway_of: dict[int, str] = {}
    nat: dict[bytes, tuple[str, str]] = {}
    snat: dict[tuple[int, int], str] = {}
    for kind, ident, key, a, _b, val in bundle.fab_entries:
        if kind == abi.FAB_SEG and a:
            gateway_of[ident] = gws[a - 1] if a <= len(gws) else f"gw#{a}"
        elif kind == abi.FAB_VIP:
            nat[bytes(key)] = (addr16(key), addr16(val))
        elif kind == abi.FAB_REAL:
            nat.setdefault(bytes(key), (addr16(val), addr16(key)))
        elif kind in (abi.FAB_SNAT4, abi.FAB_SNAT6):
            snat[(ident, 4 if kind == abi.FAB_SNAT4 else 6)] = addr16(val)
    return FabricNames(frozenset(s["id"] for s in bundle.segments), gateway_of, nat, snat)


def reason_name(r: int) -> str:
    try:
        return abi.Reason(r).name.lower()
    except ValueError:
        return str(r)


def app_name(apps: dict[int, str], app_id: int) -> str:
    if app_id == abi.APP_ANY:
        return BY_NAME
    return apps.get(app_id, "-" if app_id == 0 else f"app#{app_id}")


def rule_name(rules: dict[int, str], rule_id: int) -> str:
    return rules.get(rule_id, DEFAULT_RULE if rule_id == 0 else f"rule#{rule_id}")


def addr16(raw) -> str:
    a = ipaddress.IPv6Address(bytes(raw))
    return str(a.ipv4_mapped) if a.ipv4_mapped else str(a)


def monotonic_offset() -> float:
    """Seconds to add to a CLOCK_MONOTONIC time (bpf_ktime_get_ns) to get wall-clock time."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


def decode(ev: abi.FlowEvent, names: NamesFn, offset: float) -> dict:
    """One FlowEvent -> a dict with names (raises ValueError on a record that makes no sense)."""
    kind = KIND_NAMES.get(ev.kind)
    if kind is None:
        raise ValueError(f"unknown flow event kind {ev.kind}")
    if ev.family not in (4, 6):
        raise ValueError(f"unknown address family {ev.family}")
    n = names(ev.generation)
    apps, rules, segs = n[0], n[1], n[2]
    fab: FabricNames | None = n[3] if len(n) > 3 else None
    sni = None
    if ev.sni_len:
        n = min(ev.sni_len, abi.SNI_LOG_LEN)
        sni = bytes(ev.sni[:n]).rstrip(b"\0").rstrip(b".").decode("ascii", "replace")
        if ev.sni_len > abi.SNI_LOG_LEN:
            sni += "…"  # the kernel logs the first SNI_LOG_LEN bytes of a longer name
    via = vip = real = None
    if ev.flags & abi.FLOWF_TRANSIT:
        via = fab.via(ev.segment_id, ev.peer_segment) if fab else None
    # NAT: translated here; VIA_VIP: translated at the client's gateway (the VNI said so)
    if ev.flags & (abi.FLOWF_NAT | abi.FLOWF_VIA_VIP) and fab:
        vip, real = fab.nat.get(bytes(ev.daddr), (None, None))
    snat = None
    if ev.xflags & abi.FLOWX_SNAT:
        # translated here: the client enters the server's segment from the segment's address
        a = fab.snat.get((ev.peer_segment, ev.family), "?") if fab else "?"
        snat = f"{a if ev.family == 4 else f'[{a}]'}:{socket.ntohs(ev.snat_port_be)}"
    return {
        "time": round(ev.ts_ns / 1e9 + offset, 6),
        "kind": kind,
        "segment": segs.get(ev.segment_id, str(ev.segment_id)),
        "peer_segment": segs.get(ev.peer_segment, str(ev.peer_segment)) if ev.peer_segment else None,
        "family": ev.family,
        "proto": proto_name(ev.proto),
        "src": addr16(ev.saddr), "sport": socket.ntohs(ev.sport_be),
        "dst": addr16(ev.daddr), "dport": socket.ntohs(ev.dport_be),
        "src_app": app_name(apps, ev.src_app),
        "dst_app": app_name(apps, ev.dst_app),
        "rule": rule_name(rules, ev.rule_id),
        "verdict": abi.verdict_of(ev.reason),
        "reason": reason_name(ev.reason),
        "prev_reason": reason_name(ev.prev_reason) if ev.kind == abi.FlowEv.CHANGE and ev.prev_reason else None,
        "audit": bool(ev.flags & abi.ACTF_AUDIT) or ev.reason in abi.AUDIT_REASONS,
        "by_reply": bool(ev.flags & abi.FLOWF_REPLY),
        "tcp_flags": ev.tcp_flags,
        "sni": sni,
        "generation": ev.generation,
        "packets": ev.packets, "bytes": ev.bytes,
        "r_packets": ev.r_packets, "r_bytes": ev.r_bytes,
        # the fabric (None otherwise): the other gateway of a flow through the transit; the
        # service address the client dialed and the app's real address it was translated to
        "via": via, "vip": vip, "real": real,
        # the source the client's packets took into the server's segment (its transit_snat), or None
        "snat": snat,
    }


def matches(e: dict, app: str | None = None, verdict: str | None = None, rule: str | None = None) -> bool:
    if app and app not in (e["src_app"], e["dst_app"]):
        return False
    if verdict and e["verdict"] != verdict:
        return False
    if rule and e["rule"] != rule:
        return False
    return True


class FlowLog:
    """Decoded flow events in a bounded buffer, fed by a consumer thread (start/stop)."""

    MAX_PAIRS = 4096  # recent app pairs kept for `status` (apps x apps; the oldest go first)
    MAX_NAMES = 65536  # server names of recent TLS flows, for the flow table (the oldest go first)

    def __init__(self, names: NamesFn, keep: int = DEFAULT_KEEP):
        self.names = names
        self._ring = None  # libbpf.RingBuffer when opened from a map fd
        self.keep = keep
        self.lock = threading.Lock()
        self.buf: collections.deque = collections.deque(maxlen=keep) if keep > 0 else collections.deque(maxlen=0)
        self.seq = 0
        self.received = 0
        self.by_kind: collections.Counter = collections.Counter()
        self.buffer_dropped = 0  # fell out of the deque (older than the last `keep`)
        self.bad = 0  # records that could not be decoded
        self.perf_lost = 0  # perf fallback: records the perf buffer reported lost (also counted by the kernel)
        self.pairs: dict[tuple[str, str], dict] = {}
        # (client segment id, saddr16, sport_be, daddr16, dport_be) -> the server name its
        # ClientHello asked for: the kernel keeps only the name's hashes in the flow entries.
        self.names_seen: collections.OrderedDict = collections.OrderedDict()
        self.offset = monotonic_offset()
        self._offset_at = time.monotonic()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.use_perf = False
        self.error: str | None = None
        self.hops = hops.HopLog()  # BH_FE_HOP: requests between two gateways, timed per hop

    # ------------------------------------------------------------ ingest
    def ingest_raw(self, data, size: int) -> None:
        """The ring/perf buffer callback: copy the record out (its memory is the kernel's)."""
        try:
            ev = abi.FlowEvent()
            if size < C.sizeof(ev):
                raise ValueError(f"flow event of {size} bytes, expected {C.sizeof(ev)}")
            C.memmove(C.byref(ev), data, C.sizeof(ev))
            self.ingest(ev)
        except Exception as e:  # never take the consumer (or the agent) down
            self._bad(e)

    def ingest(self, ev: abi.FlowEvent) -> dict | None:
        now = time.monotonic()
        if now - self._offset_at > 60:  # follow wall-clock steps (NTP), cheaply
            self.offset, self._offset_at = monotonic_offset(), now
        try:
            rec = decode(ev, self.names, self.offset)
        except Exception as e:
            self._bad(e)
            return None
        if ev.kind == abi.FlowEv.HOP:  # a request, not a flow: to the per-hop log
            with self.lock:
                self.received += 1
                self.by_kind[rec["kind"]] += 1
            self.hops.add(hops.record(ev, rec))
            return rec
        with self.lock:
            self.seq += 1
            self.received += 1
            rec["seq"] = self.seq
            self.by_kind[rec["kind"]] += 1
            if self.buf.maxlen is not None and len(self.buf) == self.buf.maxlen:
                self.buffer_dropped += 1
            self.buf.append(rec)
            self._pair(rec)
            if rec["sni"]:
                self._remember_name(ev, rec["sni"])
        return rec

    def _remember_name(self, ev: abi.FlowEvent, name: str) -> None:
        key = (ev.segment_id, bytes(ev.saddr), ev.sport_be, bytes(ev.daddr), ev.dport_be)
        self.names_seen[key] = name
        self.names_seen.move_to_end(key)
        while len(self.names_seen) > self.MAX_NAMES:
            self.names_seen.popitem(last=False)

    def server_name(self, segment_id: int, saddr16: bytes, sport_be: int, daddr16: bytes, dport_be: int) -> str | None:
        """The server name a TLS flow (client -> server, on the client's segment) asked for, if logged."""
        with self.lock:
            return self.names_seen.get((segment_id, bytes(saddr16), sport_be, bytes(daddr16), dport_be))

    def _bad(self, e: Exception) -> None:
        with self.lock:
            self.bad += 1
            n = self.bad
        if n <= 10 or n % 1000 == 0:
            log.warning("flow event not decoded (%d so far): %s", n, e)

    def _pair(self, rec: dict) -> None:
        key = (rec["src_app"], rec["dst_app"])
        p = self.pairs.get(key)
        if p is None:
            if len(self.pairs) >= self.MAX_PAIRS:
                oldest = min(self.pairs, key=lambda k: self.pairs[k]["last"])
                del self.pairs[oldest]
            p = self.pairs[key] = {"src_app": key[0], "dst_app": key[1], "new": 0, "end": 0, "change": 0,
                                   "by_verdict": collections.Counter(), "last": 0.0}
        p[rec["kind"]] += 1
        if rec["kind"] == "new":
            p["by_verdict"][rec["verdict"]] += 1
        p["last"] = rec["time"]

    # ------------------------------------------------------------- query
    def since(self, after: int | None, limit: int = 1000, app: str | None = None, verdict: str | None = None,
              rule: str | None = None) -> tuple[int, list[dict], int]:
        """(seq to continue from, matching events, events lost).

        after None: the most recent `limit` matching events, and the current seq.
        after N: the oldest `limit` matching events with seq > N (so a follower
        pages forward without skipping), and the seq of the last one examined.
        lost: events with seq > after that already fell out of the buffer.
        limit 0: no limit.
        """
        with self.lock:
            oldest = self.buf[0]["seq"] if self.buf else self.seq + 1
            if after is None:
                out = [e for e in self.buf if matches(e, app, verdict, rule)]
                return self.seq, (out[-limit:] if limit else out), 0
            if after > self.seq:  # the follower knew an earlier agent: this one starts over
                after = 0
            lost = max(0, oldest - 1 - after)
            out, last = [], max(after, oldest - 1)
            if after < self.seq:
                for e in itertools.islice(self.buf, max(0, after - oldest + 1), None):
                    last = e["seq"]
                    if matches(e, app, verdict, rule):
                        out.append(dict(e))
                        if limit and len(out) >= limit:
                            break
            return last, out, lost

    def stats(self) -> dict:
        with self.lock:
            return {"received": self.received, "by_kind": dict(self.by_kind), "buffer_dropped": self.buffer_dropped,
                    "bad": self.bad, "perf_lost": self.perf_lost, "kept": len(self.buf), "keep": self.keep,
                    "seq": self.seq, "transport": "perf" if self.use_perf else "ringbuf",
                    "running": bool(self._thread and self._thread.is_alive()), "error": self.error}

    def recent_pairs(self, limit: int = 50) -> list[dict]:
        with self.lock:
            ps = sorted(self.pairs.values(), key=lambda p: -p["last"])[:limit]
            return [{**p, "by_verdict": dict(p["by_verdict"])} for p in ps]

    # ---------------------------------------------------------- consumer
    def start(self, bpf, use_perf: bool = False, page_cnt: int = PERF_PAGES, map_name: bytes = b"flow_events") -> None:
        """Open the loaded program's flow_events map and poll it on a thread.

        bpf: the bcc BPF object that compiled the program, or the fd of its flow_events ring
        buffer (an agent that reused pinned programs has only the pinned map).

        use_perf: the program was built with -DBH_EVENTS_PERF (kernels without
        BPF_MAP_TYPE_RINGBUF): the map is a perf event array, one buffer per CPU.
        """
        self.use_perf = use_perf
        if isinstance(bpf, int):  # a map fd: the pinned ring buffer of programs reused without a compile
            if use_perf:
                raise ValueError("a perf buffer is opened through the compiled BPF object, not a map fd")
            from bulkhead.datapath.libbpf import RingBuffer

            self._ring = RingBuffer(bpf, self.ingest_raw)
            poll = self._ring.poll
        elif use_perf:
            bpf[map_name].open_perf_buffer(lambda _cpu, data, size: self.ingest_raw(data, size),
                                           page_cnt=page_cnt, lost_cb=self._perf_lost)
            poll = bpf.perf_buffer_poll
        else:
            bpf[map_name].open_ring_buffer(lambda _ctx, data, size: self.ingest_raw(data, size))
            poll = bpf.ring_buffer_poll
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(poll,), name="flowlog", daemon=True)
        self._thread.start()

    def _perf_lost(self, n: int) -> None:
        with self.lock:
            self.perf_lost += n

    def _run(self, poll) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                poll(200)  # ms; the callbacks run on this thread
                failures = 0
            except Exception as e:  # keep polling: a transient error must not end the flow log
                failures += 1
                self.error = f"{type(e).__name__}: {e}"
                if failures <= 3:
                    log.exception("flow event poll failed")
                self._stop.wait(min(5.0, 0.1 * failures))

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        stuck = False
        if self._thread:
            self._thread.join(timeout)
            stuck = self._thread.is_alive()
            self._thread = None
        ring, self._ring = self._ring, None
        if ring is not None and not stuck:  # a poll still running would use freed memory
            ring.close()


# ------------------------------------------------------------------ latency
def percentile(buckets: list[int], bounds: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of a log2 histogram, interpolated linearly inside its bucket.

    bounds[b] is bucket b's upper bound; its lower bound is bounds[b-1] (0 for
    bucket 0). The last bucket also holds everything above its lower bound: a
    value there is reported within [lower, upper], i.e. a lower estimate.
    """
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    cum = 0
    for b, n in enumerate(buckets):
        if n <= 0:
            continue
        if cum + n >= rank:
            lo = bounds[b - 1] if b > 0 else 0.0
            hi = bounds[b]
            return lo + (hi - lo) * max(0.0, rank - cum) / n
        cum += n
    return bounds[len(buckets) - 1]


def latency_summary(lat: dict, bounds: list[float], app: Callable[[int], str]) -> list[dict]:
    """Datapath.latency() -> [{src_app, dst_app, kind, count, p50_ms, p99_ms, mean_ms}], merged by names."""
    merged: dict[tuple[str, str, str], dict] = {}
    for (s, d, kind), h in lat.items():
        key = (app(s), app(d), LAT_KINDS.get(kind, str(kind)))
        m = merged.setdefault(key, {"buckets": [0] * len(h["buckets"]), "count": 0, "sum_s": 0.0})
        m["buckets"] = [a + b for a, b in zip(m["buckets"], h["buckets"])]
        m["count"] += h["count"]
        m["sum_s"] += h["sum_s"]
    out = []
    for (s, d, kind), m in sorted(merged.items()):
        if not m["count"]:
            continue
        if m["count"] == 1:  # one sample: its exact value is the sum
            p50 = p99 = m["sum_s"]
        else:
            p50, p99 = percentile(m["buckets"], bounds, 0.5), percentile(m["buckets"], bounds, 0.99)
        out.append({"src_app": s, "dst_app": d, "kind": kind, "count": m["count"],
                    "p50_ms": round(p50 * 1e3, 3), "p99_ms": round(p99 * 1e3, 3),
                    "mean_ms": round(m["sum_s"] / m["count"] * 1e3, 3)})
    return out


# --------------------------------------------------------- monotonic totals
class FlowTotals:
    """Monotonic packets/bytes per label set from snapshots of the flow table.

    Each scrape walks the table: `update([(entry id, labels, packets, bytes)])`.
    An entry's counts so far are "live"; when the entry vanishes (evicted,
    expired), its counts go down (the key was re-created by a new flow), or
    its labels change (re-judged to another rule/verdict), what it had counted
    under the old labels is moved to an archive, which only grows. Totals =
    archive + live, so every label set's total never decreases.
    Packets that arrive between the last scrape and an eviction are not seen.
    """

    def __init__(self):
        self.entries: dict = {}  # id -> [labels, base_packets, base_bytes, packets, bytes]
        self.archive: dict[tuple, list[int]] = {}
        self.lock = threading.Lock()

    def _retire(self, labels: tuple, base_p: int, base_b: int, p: int, b: int) -> None:
        a = self.archive.setdefault(labels, [0, 0])
        a[0] += max(0, p - base_p)
        a[1] += max(0, b - base_b)

    def update(self, snapshot: Iterable[tuple]) -> dict[tuple, tuple[int, int]]:
        with self.lock:
            seen = set()
            for ident, labels, p, b in snapshot:
                seen.add(ident)
                e = self.entries.get(ident)
                if e is None:
                    self.entries[ident] = [labels, 0, 0, p, b]
                    continue
                if p < e[3] or b < e[4]:  # a new flow on this key: the old one is over
                    self._retire(e[0], e[1], e[2], e[3], e[4])
                    e[:] = [labels, 0, 0, p, b]
                elif labels != e[0]:  # same flow, new verdict/rule: count on from here under the new labels
                    self._retire(e[0], e[1], e[2], e[3], e[4])
                    e[:] = [labels, e[3], e[4], p, b]
                else:
                    e[3], e[4] = p, b
            for ident in [i for i in self.entries if i not in seen]:
                e = self.entries.pop(ident)
                self._retire(e[0], e[1], e[2], e[3], e[4])
            totals = {k: [v[0], v[1]] for k, v in self.archive.items()}
            for labels, bp, bb, p, b in self.entries.values():
                t = totals.setdefault(labels, [0, 0])
                t[0] += p - bp
                t[1] += b - bb
            return {k: (v[0], v[1]) for k, v in totals.items()}
