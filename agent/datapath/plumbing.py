"""Gateway plumbing: route each reply back into the segment its flow came from.

XDP decides per flow, but it does not route: allowed packets go up the stack
and the kernel forwards them. Two segments may use the same CIDR (prod and dev
both 198.18.1.0/24), so the main routing table alone cannot say on which
interface a reply to 198.18.1.10 must leave. This module makes the kernel
remember it, per connection, with conntrack:

  nft table `inet bulkhead_<instance>`:
    untracked (filter, hook prerouting, priority raw):
      meta mark & 0xff000000 == MARK_SEG  ->  notrack
    prerouting (filter, priority mangle):
      ct direction original, iifname in segment S  ->  ct mark := MARK(S)
      ct direction reply,    ct mark is MARK(S)    ->  meta mark := MARK(S)
    output (route, priority mangle): the same reply rule, so replies the
      gateway itself generates (ICMP errors, a ping to its own address) are
      rerouted too.
  ip rule (v4 and v6), priority RULE_PRIORITY:
      fwmark MARK(S)/MARK_MASK lookup table TABLE(S)
  table TABLE(S): copies of the main table's unicast routes whose output
      device is one of S's interfaces (connected and static), protocol
      RT_PROTO, resynchronised on every apply().
  transit: the VXLAN device bhvx-<instance>, rp_filter 0 (datapath/transit.py).
  sysctls: net.ipv4.conf.<if>.rp_filter = 2 (loose) on segment interfaces
      (strict mode would drop dev's packets: the main table's route back to
      198.18.1.10 points at bh-prod); net.ipv4.ip_forward and
      net.ipv6.conf.all.forwarding = 1. Old values are recorded and restored.

Conntrack only where it has a job (issue 18): the XDP program forwards allowed flows it does
not steer itself (bulkhead_forward: bpf_fib_lookup + bpf_redirect, they never reach the stack),
and what it passes up of them carries MARK(S) of the segment the packet leaves by (a reply:
its client's segment; a forward packet: segment 0, the main table) in skb->mark, via metadata
and bulkhead_tc. The ip rule routes such a reply like the ct mark did, and the `untracked` chain
keeps all of them out of conntrack. Conntrack (and the ct-mark rules above) still see: steered
L7 flows (TPROXY), packets to the gateway itself (its replies are routed back by ct mark),
fragments, and packets of a driver without XDP metadata (generic XDP), which XDP can't mark.

Marks: MARK(S) = 0x0b000000 | segment_id, compared under MARK_MASK =
0xff00ffff. The top byte 0x0b says "bulkhead", the low 16 bits are the segment
id (1..65535, as in the data path). Bits 0x00ff0000 are left to others: every
write keeps them (`mark & 0x00ff0000 | MARK(S)`), and ip rules ignore them.
Table ids equal the mark value, so `ip rule` and `ip route show table` read
alike. A miss in a segment table (a destination the segment has no route to)
falls through to the main table.

L7 steering (when the agent runs the verifier, apply(verifier_port=P)):
  XDP marks the packets of L7 flows (BH_MARK_L7 | segment, copied into
  skb->mark by bulkhead_tc) and the replies to the verifier's upstream
  connections. In the same nft table:
    prerouting: meta mark & 0xff000000 == MARK_L7, tcp  ->  tproxy to :P
      (an established socket of the 4-tuple first -- the verifier's upstream
      connections -- else the verifier's listener on port P)
  ip rule (v4 and v6), priority L7_RULE_PRIORITY:
      fwmark MARK_L7/0xff000000 lookup table L7_TABLE
  table L7_TABLE: local 0.0.0.0/0 dev lo, local ::/0 dev lo (deliver locally)
  The verifier's upstream sockets carry the destination segment's mark
  (SO_MARK), so they leave through that segment's table.

Ownership: everything is named after the instance (loader.instance_name) or
tagged with RT_PROTO (rules and routes), and what apply() changed is recorded
in RECORD_DIR/<netns cookie>-<instance>.json, so remove() undoes exactly that,
also from another process (`bulkhead down`) after the agent has exited.
The netns cookie (SO_NETNS_COOKIE) is never reused while the machine is up, so
a record can never be mistaken for another namespace's.

Limits: one bulkhead instance per network namespace owns the marks (segment
ids of two instances would collide); apply() warns if it finds another
instance's table. Conntrack has no segment in its key: two live flows with the
same 5-tuple from two segments are one conntrack entry, which is why the data
path refuses the second one (reason flow_collision). New connections *into* a
segment (server -> client) are routed by the main table as usual.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import subprocess
from pathlib import Path

from bulkhead.core.names import SO_NETNS_COOKIE
from bulkhead.datapath import transit
from bulkhead.datapath.marks import (
    L7_TABLE,
    MARK_KEEP,
    MARK_L7,
    MARK_L7_MASK,
    MARK_MASK,
    MARK_SEG,
    segment_mark,
)

log = logging.getLogger("bulkhead.plumbing")

RULE_PRIORITY = 20000  # our ip rules; 20000-20099 reserved for bulkhead
L7_RULE_PRIORITY = RULE_PRIORITY + 1
RTN_LOCAL = 2
RT_PROTO = 176  # routes and rules we create (unassigned in /etc/iproute2/rt_protos)
TABLE_PREFIX = "bulkhead_"
RECORD_DIR = Path(os.environ.get("BULKHEAD_PLUMBING_DIR", "/run/bulkhead-plumbing"))

RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTM_F_CLONED = 0x200
IFNAME_OK = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")

FWD_V4 = "/proc/sys/net/ipv4/ip_forward"
FWD_V6 = "/proc/sys/net/ipv6/conf/all/forwarding"


class PlumbingError(RuntimeError):
    pass


def rp_filter_path(ifname: str) -> str:
    return f"/proc/sys/net/ipv4/conf/{ifname}/rp_filter"


def netns_cookie() -> str:
    """A name for the current network namespace that is never reused until reboot."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        return "c%d" % int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:  # kernel < 5.14: the inode (reusable, but good enough there)
        return "i%d" % os.stat("/proc/self/ns/net").st_ino
    finally:
        s.close()


def _families() -> list[int]:
    fams = [socket.AF_INET]
    if os.path.exists("/proc/sys/net/ipv6"):
        fams.append(socket.AF_INET6)
    return fams


# ------------------------------------------------------------------ sysctls
def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _write_sysctl(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError as e:
        log.warning("cannot set %s=%s: %s", path, value, e)
        return False


# --------------------------------------------------------------------- nft
def _nft(script: str) -> None:
    try:
        p = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True, timeout=30)
    except FileNotFoundError as e:
        raise PlumbingError("nft not found: install nftables") from e
    if p.returncode != 0:
        raise PlumbingError(f"nft failed: {p.stderr.strip()}\n--- ruleset ---\n{script}")


def nft_tables() -> list[str]:
    """Names of every bulkhead-owned inet table in this netns."""
    try:
        p = subprocess.run(["nft", "-j", "list", "tables", "inet"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return []
    if p.returncode != 0:
        return []
    names = []
    for item in json.loads(p.stdout or "{}").get("nftables", []):
        t = item.get("table")
        if t and t.get("family") == "inet" and t.get("name", "").startswith(TABLE_PREFIX):
            names.append(t["name"])
    return names


def _nft_delete_table(name: str) -> None:
    # "add, then delete" in one transaction: no error when it was already gone.
    _nft(f"table inet {name}\ndelete table inet {name}\n")


def ruleset(table: str, instance: str, segments: list[tuple[int, list[str]]],
            verifier_port: int | None = None) -> str:
    """The nft script that (re)creates our table atomically. segments: (id, [ifname])."""
    lines = [f"table inet {table}", f"delete table inet {table}", f"table inet {table} {{"]
    lines.append(f'  comment "bulkhead gateway plumbing, instance {instance}"')
    ingress, replies = [], []
    for seg_id, ifnames in segments:
        mark = segment_mark(seg_id)
        lines += [
            f"  chain seg_{seg_id} {{",
            f"    ct mark set ct mark and {MARK_KEEP:#010x} or {mark:#010x}",
            "  }",
            f"  chain reply_{seg_id} {{",
            f"    meta mark set meta mark and {MARK_KEEP:#010x} or {mark:#010x}",
            "  }",
        ]
        ingress += [f'"{n}" : jump seg_{seg_id}' for n in ifnames]
        replies.append(f"{mark:#010x} : jump reply_{seg_id}")
    reply_rule = f"    ct direction reply ct mark and {MARK_MASK:#010x} vmap {{ {', '.join(replies)} }}"
    # Before conntrack (priority raw): packets XDP marked as forwarded without steering
    # (bh_fwd_handoff; MARK_SEG | the segment they leave by) never create or look up an entry.
    lines += ["  chain untracked {", "    type filter hook prerouting priority raw; policy accept;",
              f"    meta mark and {MARK_L7_MASK:#010x} == {MARK_SEG:#010x} notrack", "  }"]
    lines += ["  chain prerouting {", "    type filter hook prerouting priority mangle; policy accept;"]
    if ingress:
        lines.append(f"    ct direction original iifname vmap {{ {', '.join(ingress)} }}")
    if replies:
        lines.append(reply_rule)
    if verifier_port:
        steer = f"meta mark and {MARK_L7_MASK:#010x} == {MARK_L7:#010x} meta l4proto tcp"
        lines += [f"    meta nfproto ipv4 {steer} tproxy ip to :{int(verifier_port)}",
                  f"    meta nfproto ipv6 {steer} tproxy ip6 to :{int(verifier_port)}"]
    lines += ["  }", "  chain output {", "    type route hook output priority mangle; policy accept;"]
    if replies:
        lines.append(reply_rule)
    lines += ["  }", "}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------ rules, routes
def _ipr():
    from pyroute2 import IPRoute  # imported late: unit tests import this module without it

    return IPRoute()


def _attr(msg, name, default=None):
    for k, v in msg.get("attrs", []):
        if k == name:
            return v
    return default


def _rule_key(msg) -> tuple | None:
    """(family, priority, fwmark, fwmask, table) of one of our rules, else None."""
    if _attr(msg, "FRA_PROTOCOL") != RT_PROTO:
        return None
    return (msg["family"], _attr(msg, "FRA_PRIORITY", 0), _attr(msg, "FRA_FWMARK", 0),
            _attr(msg, "FRA_FWMASK", 0), _attr(msg, "FRA_TABLE", msg.get("table")))


def our_rules(ipr) -> set[tuple]:
    found = set()
    for fam in _families():
        for msg in ipr.get_rules(family=fam):
            k = _rule_key(msg)
            if k:
                found.add(k)
    return found


def _rule(ipr, cmd: str, key: tuple, ignore: tuple[int, ...]) -> None:
    """ip rule add/del of one of ours; `ignore`: errnos that mean it is already so."""
    fam, prio, mark, mask, table = key
    try:
        ipr.rule(cmd, family=fam, priority=prio, fwmark=mark, fwmask=mask, table=table,
                 protocol=RT_PROTO, action="FR_ACT_TO_TBL")
    except Exception as e:
        if getattr(e, "code", None) not in ignore:
            raise


def _add_rule(ipr, key: tuple) -> None:
    _rule(ipr, "add", key, (errno.EEXIST,))


def _del_rule(ipr, key: tuple) -> None:
    _rule(ipr, "del", key, (errno.ENOENT, errno.ESRCH))


def _route_spec(msg, table: int, oifs: set[int]) -> dict | None:
    """A main-table route restricted to `oifs`, as kwargs for ipr.route(), or None."""
    if msg.get("type") != RTN_UNICAST or msg.get("flags", 0) & RTM_F_CLONED:
        return None
    spec = {"family": msg["family"], "dst_len": msg["dst_len"], "tos": msg.get("tos", 0),
            "scope": msg.get("scope", 0), "type": RTN_UNICAST, "table": table, "proto": RT_PROTO}
    dst = _attr(msg, "RTA_DST")
    if dst is not None:
        spec["dst"] = dst
    prio = _attr(msg, "RTA_PRIORITY")
    if prio is not None:
        spec["priority"] = prio
    prefsrc = _attr(msg, "RTA_PREFSRC")
    if prefsrc is not None:
        spec["prefsrc"] = prefsrc
    oif = _attr(msg, "RTA_OIF")
    if oif is not None:
        if oif not in oifs:
            return None
        spec["oif"] = oif
        gw = _attr(msg, "RTA_GATEWAY")
        if gw is not None:
            spec["gateway"] = gw
        return spec
    hops = _attr(msg, "RTA_MULTIPATH")
    if hops:
        keep = [h for h in hops if h.get("oif") in oifs]
        if not keep:
            return None
        if len(keep) == 1:
            spec["oif"] = keep[0]["oif"]
            gw = _attr(keep[0], "RTA_GATEWAY")
            if gw is not None:
                spec["gateway"] = gw
        else:
            spec["multipath"] = [
                {k: v for k, v in (("oif", h["oif"]), ("gateway", _attr(h, "RTA_GATEWAY")),
                                   ("hops", h.get("hops", 0))) if v is not None}
                for h in keep
            ]
        return spec
    return None  # nexthop objects (RTA_NH_ID) and blackholes are not copied


def _spec_key(spec: dict) -> tuple:
    mp = tuple(sorted((h["oif"], h.get("gateway")) for h in spec.get("multipath", [])))
    return (spec["family"], spec.get("dst"), spec["dst_len"], spec.get("tos", 0), spec.get("priority"),
            spec.get("oif"), spec.get("gateway"), mp)


def _routes_in(ipr, table: int) -> list[dict]:
    out = []
    for fam in _families():
        for msg in ipr.get_routes(family=fam, table=table):
            if _attr(msg, "RTA_TABLE", msg.get("table")) != table or msg.get("proto") != RT_PROTO:
                continue
            spec = _route_spec(msg, table, {_attr(msg, "RTA_OIF")} | {h.get("oif") for h in _attr(msg, "RTA_MULTIPATH") or []})
            if spec:
                out.append(spec)
    return out


def _del_route(ipr, spec: dict) -> None:
    kw = {k: v for k, v in spec.items() if k in ("family", "dst", "dst_len", "tos", "priority", "table", "oif", "gateway", "scope")}
    try:
        ipr.route("del", **kw)
    except Exception as e:
        if getattr(e, "code", None) not in (errno.ESRCH, errno.ENOENT):
            raise


def _add_route(ipr, spec: dict) -> None:
    try:
        # append: a segment with two interfaces may have the same prefix on both
        ipr.route("append", **spec)
    except Exception as e:
        if getattr(e, "code", None) != errno.EEXIST:
            raise


def sync_table(ipr, table: int, oifs: set[int]) -> int:
    """Make `table` hold the main-table routes via `oifs`. Returns routes changed."""
    want = {}
    for fam in _families():
        for msg in ipr.get_routes(family=fam, table=RT_TABLE_MAIN):
            if _attr(msg, "RTA_TABLE", msg.get("table")) != RT_TABLE_MAIN:
                continue
            spec = _route_spec(msg, table, oifs)
            if spec:
                want[_spec_key(spec)] = spec
    have = {_spec_key(s): s for s in _routes_in(ipr, table)}
    changed = 0
    # Add before delete: a route that only changed (new metric, new gateway) is never missing.
    for k, spec in want.items():
        if k not in have:
            _add_route(ipr, spec)
            changed += 1
    for k, spec in have.items():
        if k not in want:
            _del_route(ipr, spec)
            changed += 1
    return changed


def flush_table(ipr, table: int) -> None:
    for spec in _routes_in(ipr, table):
        _del_route(ipr, spec)
    for fam, dst_len in _local_routes(ipr, table):
        _set_local_route(ipr, table, fam, dst_len, add=False)


def _local_routes(ipr, table: int) -> set[tuple[int, int]]:
    """(family, dst_len) of our `local` routes in `table` (the L7 table holds default ones)."""
    out = set()
    for fam in _families():
        for msg in ipr.get_routes(family=fam, table=table):
            if (_attr(msg, "RTA_TABLE", msg.get("table")) == table and msg.get("proto") == RT_PROTO
                    and msg.get("type") == RTN_LOCAL):
                out.add((fam, msg["dst_len"]))
    return out


def _set_local_route(ipr, table: int, fam: int, dst_len: int, add: bool) -> None:
    dst = "0.0.0.0" if fam == socket.AF_INET else "::"
    try:
        ipr.route("add" if add else "del", family=fam, dst=dst, dst_len=dst_len, table=table,
                  type=RTN_LOCAL, proto=RT_PROTO, scope=254, oif=socket.if_nametoindex("lo"))
    except Exception as e:
        if getattr(e, "code", None) not in ((errno.EEXIST,) if add else (errno.ESRCH, errno.ENOENT)):
            raise


def _all_our_tables(ipr) -> set[int]:
    tables = set()
    for fam in _families():
        for msg in ipr.get_routes(family=fam):  # no table given: every table
            if msg.get("proto") == RT_PROTO:
                tables.add(_attr(msg, "RTA_TABLE", msg.get("table")))
    return tables


# ------------------------------------------------------------------ record
def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _restore_sysctls(rec: dict, keep_forwarding: bool) -> None:
    for path, old in sorted(rec.get("sysctls", {}).items()):
        if path in (FWD_V4, FWD_V6) and keep_forwarding:
            log.info("leaving %s on: another bulkhead instance in this netns still routes", path)
            continue
        if os.path.exists(path):
            _write_sysctl(path, old)


class Plumbing:
    """The plumbing of one agent instance in the current network namespace."""

    def __init__(self, instance: str):
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", instance):
            raise PlumbingError(f"instance name {instance!r} is not usable in an nft table name")
        self.instance = instance
        self.table = TABLE_PREFIX + instance.replace("-", "_")
        self.record_path = RECORD_DIR / f"{netns_cookie()}-{instance}.json"
        self.transit_device = transit.device_name(instance)
        self.transit_ifindex = 0  # the transit device's, after apply() with a transit port (0: none)

    # ---------------------------------------------------------------- apply
    def apply(self, bundle, ifindexes: dict[str, int], verifier_port: int | None = None,
              transit_port: int | None = None, wg: tuple = (None, None)) -> None:
        """Make the plumbing match `bundle`'s segments (and steer to a verifier on `verifier_port`,
        the transit device on UDP `transit_port`: self.transit_ifindex, if given). Idempotent."""
        segments = []  # (segment id, [ifname], {ifindex})
        for seg in bundle.segments:
            names = [n for n in seg["interfaces"] if n in ifindexes]
            for n in names:
                if not IFNAME_OK.match(n):
                    raise PlumbingError(f"interface name {n!r} cannot be written into an nft ruleset")
            if names:
                segments.append((int(seg["id"]), names, {ifindexes[n] for n in names}))
        others = [t for t in nft_tables() if t != self.table]
        if others:
            log.warning("other bulkhead plumbing in this netns (%s): segment marks may collide; "
                        "run one agent per network namespace", ", ".join(others))

        rec = _load(self.record_path)
        rec.setdefault("instance", self.instance)
        rec.setdefault("sysctls", {})
        rec.setdefault("tables", [])
        rec.setdefault("rules", [])
        rec["nft_table"] = self.table

        # 0. The transit device, before the sysctls: its rp_filter is one of them.
        self.transit_ifindex = transit.sync(rec, self.transit_device, transit_port, lambda r: _save(self.record_path, r), wg)

        # 1. Sysctls: record the old value before the first change, then set.
        want_rp = {rp_filter_path(n): "2" for _, names, _ in segments for n in names}
        want_rp.update(transit.sysctls(self.transit_device) if transit_port else {})
        for path in sorted(p for p in rec["sysctls"] if "/rp_filter" in p and p not in want_rp):
            if os.path.exists(path):  # an interface the policy no longer names
                _write_sysctl(path, rec["sysctls"][path])
            del rec["sysctls"][path]
        changes = sorted(want_rp.items())
        changes += [(FWD_V4, "1")] + ([(FWD_V6, "1")] if os.path.exists(FWD_V6) else [])
        for path, value in changes:
            old = _read_sysctl(path)
            if old is None or old == value:
                continue
            rec["sysctls"].setdefault(path, old)
            _save(self.record_path, rec)
            _write_sysctl(path, value)

        # 2. Routing: tables and rules before the marks that use them.
        want_tables = {segment_mark(sid): oifs for sid, _, oifs in segments}
        want_rules = {(fam, RULE_PRIORITY, t, MARK_MASK, t) for t in want_tables for fam in _families()}
        l7_tables = {L7_TABLE} if verifier_port else set()
        want_rules |= {(fam, L7_RULE_PRIORITY, MARK_L7, MARK_L7_MASK, L7_TABLE)
                       for _ in l7_tables for fam in _families()}
        rec["tables"] = sorted(set(rec["tables"]) | set(want_tables) | l7_tables)
        rec["rules"] = sorted({tuple(r) for r in rec["rules"]} | want_rules)
        _save(self.record_path, rec)
        with _ipr() as ipr:
            for table, oifs in sorted(want_tables.items()):
                n = sync_table(ipr, table, oifs)
                if n:
                    log.info("table %#x: %d route(s) synced from main", table, n)
            for table in l7_tables:
                have_local = _local_routes(ipr, table)
                for fam in _families():
                    if (fam, 0) not in have_local:
                        _set_local_route(ipr, table, fam, 0, add=True)
            have = our_rules(ipr)
            for key in sorted(want_rules - have):
                _add_rule(ipr, key)
            for key in sorted(r for r in have if r not in want_rules and r[4] in set(rec["tables"])):
                _del_rule(ipr, key)
            for table in sorted(set(rec["tables"]) - set(want_tables) - l7_tables):
                flush_table(ipr, table)
        rec["tables"] = sorted(set(want_tables) | l7_tables)
        rec["rules"] = sorted(want_rules)

        # 3. Marks: one atomic nft transaction replaces the whole table.
        _nft(ruleset(self.table, self.instance, [(sid, names) for sid, names, _ in segments], verifier_port))
        _save(self.record_path, rec)
        log.info("plumbing: %d segment(s), nft table inet %s", len(segments), self.table)

    # --------------------------------------------------------------- remove
    def remove(self) -> None:
        """Undo what apply() did in this netns. Never fails because something is already gone."""
        errors = []
        try:
            _nft_delete_table(self.table)
        except PlumbingError as e:
            errors.append(str(e))
        rec = _load(self.record_path)
        others = nft_tables()
        # The recorded transit device (no record: this instance's, and all of them if no one else is here).
        errors += transit.remove_recorded(rec, self.transit_device, sweep=not rec and not others)
        with _ipr() as ipr:
            if rec:
                rules = {tuple(r) for r in rec.get("rules", [])}
                tables = set(rec.get("tables", []))
            elif not others:
                # No record (lost /run?): nobody else here, so every tagged rule/route is ours.
                rules, tables = set(), _all_our_tables(ipr)
            else:
                rules, tables = set(), set()
            for key in our_rules(ipr):
                if key in rules or key[4] in tables or (not rec and not others):
                    try:
                        _del_rule(ipr, key)
                    except Exception as e:
                        errors.append(f"rule {key}: {e}")
            for table in sorted(tables):
                try:
                    flush_table(ipr, table)
                except Exception as e:
                    errors.append(f"table {table:#x}: {e}")
        _restore_sysctls(rec, keep_forwarding=bool(others))
        self.record_path.unlink(missing_ok=True)
        if errors:
            raise PlumbingError("; ".join(errors))


def remove_all() -> None:
    """Remove every bulkhead table, rule and route in this netns, and restore recorded sysctls."""
    errors = []
    for name in nft_tables():
        try:
            _nft_delete_table(name)
        except PlumbingError as e:
            errors.append(str(e))
    with _ipr() as ipr:
        for key in our_rules(ipr):
            try:
                _del_rule(ipr, key)
            except Exception as e:
                errors.append(f"rule {key}: {e}")
        for table in sorted(_all_our_tables(ipr)):
            try:
                flush_table(ipr, table)
            except Exception as e:
                errors.append(f"table {table:#x}: {e}")
    for path in sorted(RECORD_DIR.glob(f"{netns_cookie()}-*.json")):
        rec = _load(path)
        errors += transit.remove_recorded(rec, None, sweep=False)
        _restore_sysctls(rec, keep_forwarding=False)
        path.unlink(missing_ok=True)
    errors += transit.remove_recorded({}, None, sweep=True)
    if errors:
        raise PlumbingError("; ".join(errors))
