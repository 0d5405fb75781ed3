"""The agent: owns the data path of one state dir, applies policy, answers the CLI.

Lifecycle (the process around it is daemon/service.py): load the policy (bad
policy: exit 2 before touching the kernel), load/reuse the pinned programs and
maps (no compile when they are this build's), start the L7 verifier (a supervised
child process, agent/verifier/), attach XDP and the TC steering program to
every interface the policy names, apply, set up the gateway plumbing, then
serve the control socket until SIGTERM/SIGINT. Exiting leaves XDP, pins and plumbing in place
on purpose: enforcement continues, and the next agent picks it all up.
`bulkhead down` is what removes them.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import os
import socket
import threading
import time
from pathlib import Path

from bulkhead.core.names import CLOCK_MONOTONIC_COARSE, VERDICTS, proto_name
from bulkhead.daemon.l7records import L7Records
from bulkhead.daemon.state import prog_name, read_state, write_state, xdp_prog_ids
from bulkhead.telemetry import flowlog
from bulkhead.datapath import abi, loader, transit, wireguard
from bulkhead.fabric import snat
from bulkhead.policy.bundle import Bundle

log = logging.getLogger("bulkhead.agent")


class AgentError(RuntimeError):
    """A runtime failure: exit code 1."""


def resolve_ifindexes(bundle: Bundle) -> dict[str, int]:
    idx, missing = {}, []
    for seg in bundle.segments:
        for ifname in seg["interfaces"]:
            try:
                idx[ifname] = socket.if_nametoindex(ifname)
            except OSError:
                missing.append(f"{ifname} (segment {seg['name']})")
    if missing:
        raise AgentError("interfaces not found in this network namespace: " + ", ".join(missing))
    return idx


def _addr(raw: bytes) -> str:
    a = ipaddress.IPv6Address(bytes(raw))
    return str(a.ipv4_mapped) if a.ipv4_mapped else str(a)


class Agent:
    def __init__(self, state_dir: str, xdp_mode: str = "auto", sizes: dict[str, int] | None = None,
                 events_keep: int = flowlog.DEFAULT_KEEP, events_perf: bool = False, gateway: str | None = None):
        self.state_dir = Path(state_dir)
        self.instance = loader.instance_name(state_dir)
        self.pin_dir = loader.pin_dir_for(state_dir)
        self.xdp_mode = xdp_mode
        self.sizes = dict(sizes or {})  # map size overrides (abi.DEFAULT_SIZES keys), --map-size
        # Flow events: ring buffer, or a perf buffer where the kernel has no ring buffer (the
        # program must then be built with -DBH_EVENTS_PERF; the loader decides, see flowlog.py).
        self.events_perf = events_perf
        self.flowlog = flowlog.FlowLog(self.names_for, keep=events_keep)
        self._names: dict[int, tuple] = {}  # generation -> (apps, rules, segments, FabricNames | None)
        self.applies: collections.Counter = collections.Counter()  # "ok" | "failed" -> n
        # map name -> entries written by the last apply into that slot's maps (per-slot policy maps)
        self.slot_entries: dict[str, int] = {}
        self.dp: loader.Datapath | None = None
        self.plumbing = None
        self.bundle: Bundle | None = None
        self.bundles: dict[int, Bundle] = {}  # generation -> bundle, for names of cached flows
        self.interfaces: dict[str, dict] = {}  # ifname -> {ifindex, segment, mode}
        self.lock = threading.Lock()
        self.last_apply: dict = {}
        self.started = time.time()
        self.stop_event = threading.Event()
        self.verifier = None  # bulkhead.verifier.supervisor.Supervisor
        self.dns = None  # bulkhead.fabric.dns.DnsServer, once a policy has `fabric:`
        self.l7 = L7Records()
        self.follower = None  # bulkhead.fleet.follower.Follower when the fleet supplies the policy
        self._previous_progs: dict[str, int | None] = {}  # ifname -> XDP program id the previous agent attached
        self.policy_paths: list[str] = []  # the files `reload` re-reads (none when the fleet supplies the policy)
        # This gateway's name in the policy's `gateways:` (--gateway; a fleet agent's too): policies
        # from files are cut to its segments (Bundle.for_gateway), and its transit is set up.
        self.gateway = gateway
        # The transit of the applied policy: transit.plan() + "device", "ifindex"; None without.
        self.transit: dict | None = None
        # WireGuard (--wireguard-key FILE, read when a policy encrypts the transit); the applied plan
        self.wireguard_key: str | None = os.environ.get("BULKHEAD_WIREGUARD_KEY") or None
        self.wireguard: dict | None = None

    def mine(self, bundle: Bundle) -> Bundle:
        """What this agent enforces of a whole policy: with a gateway name, that gateway's part
        (ValueError when the policy has no such gateway). The fleet's bundles come cut already."""
        if self.gateway is None or self.follower is not None:
            return bundle
        return bundle.for_gateway(self.gateway)

    # ---------------------------------------------------------------- start
    def start(self, bundle: Bundle) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        from bulkhead.datapath.plumbing import Plumbing  # imported late: needs nft/pyroute2 only at runtime

        self.plumbing = Plumbing(self.instance)
        self.dp = loader.Datapath(self.pin_dir, self.sizes)
        self.dp.load()
        previous = read_state(self.state_dir)
        self._previous_progs = {n: i.get("prog_id") for n, i in previous.get("interfaces", {}).items()}
        if os.environ.get("BULKHEAD_NO_VERIFIER") != "1":
            from bulkhead.verifier.supervisor import Supervisor

            self.verifier = Supervisor(str(self.pin_dir / "maps"), self.l7.add, self._set_l7_ready)
            self.verifier.start()
        gen = self.apply(bundle)
        # Interfaces a previous agent attached that this policy no longer names.
        for ifname in previous.get("interfaces", {}):
            if ifname not in self.interfaces:
                self._detach_if_ours(ifname)
        self._count_other_slot()
        try:
            if "BH_NO_TELEMETRY" in getattr(self.dp, "defines", ()):
                raise RuntimeError("the data path was built without telemetry (BH_NO_TELEMETRY)")
            # The loader says whether the program was built with -DBH_EVENTS_PERF (Datapath.events_perf).
            perf = self.events_perf or bool(getattr(self.dp, "events_perf", False))
            self.flowlog.start(self.dp.bpf if perf or self.dp.events_fd is None else self.dp.events_fd,
                               use_perf=perf)
        except Exception as e:  # the agent enforces without its flow log; status and metrics say so
            self.flowlog.error = f"{type(e).__name__}: {e}"
            log.error("flow log unavailable: %s", e)
        return gen

    def _count_other_slot(self) -> None:
        """Entries of the inactive slot's maps, written by an earlier agent: counted once."""
        slot = 1 - (self.dp.ctl().active_slot & 1)
        for name in ("src_host", "src_ident", "dst_host", "dst_ident", "pol_exact", "policy", "sni_names", "fab"):
            mname = f"{name}_{slot}"
            if mname not in self.slot_entries:
                try:
                    self.slot_entries[mname] = self.dp.occupancy(mname)
                except Exception as e:
                    log.debug("counting %s: %s", mname, e)

    def _detach_if_ours(self, ifname: str) -> None:
        """Ours: the program pinned now, or the one the previous agent recorded attaching there
        (an upgrade replaced the pin). Both are known without CAP_SYS_ADMIN, which reading a
        program by id would need; the name check remains for state files older than prog_id."""
        if self._is_ours(ifname, xdp_prog_ids().get(ifname)):
            loader.Datapath.detach(ifname)
            loader.Datapath.detach_tc(ifname)
            log.info("detached XDP from %s (no longer in policy)", ifname)

    def _set_l7_ready(self, ready: bool) -> None:
        """ctl flag L7_READY: steer L7 flows (a verifier listens) or drop them, counted."""
        with self.lock:
            if ready:
                self.dp.set_ctl_flags(set_bits=abi.CTL_L7_READY)
            else:
                self.dp.set_ctl_flags(clear_bits=abi.CTL_L7_READY)

    def _is_ours(self, ifname: str, pid: int | None) -> bool:
        if not pid:
            return False
        recorded = self._previous_progs.get(ifname)
        return pid in (self.xdp_prog_id(), recorded) or (
            recorded is None and prog_name(pid).startswith(loader.XDP_PROG[:15]))

    def xdp_prog_id(self) -> int:
        return loader.libbpf.prog_info(self.dp.prog_fd()).id

    def stop(self) -> None:
        """Agent exit: stop the verifier; L7 flows are dropped (counted) until the next agent."""
        self.flowlog.stop()
        if self.dns is not None:
            self.dns.stop()
        if self.verifier:
            self.verifier.stop()

    def abandon(self) -> list[str]:
        """A start that failed: remove what it created, when it created the pin tree. A start that
        adopted a previous agent's pins leaves them (and their attachments) enforcing."""
        self.stop()
        if self.dp is None or not self.dp.fresh:
            return []
        done = []
        for ifname in list(self.interfaces):
            loader.Datapath.detach(ifname)
            loader.Datapath.detach_tc(ifname)
            done.append(f"detached {ifname}")
        self.interfaces.clear()
        if self.plumbing is not None:
            try:
                self.plumbing.remove()
                done.append("removed the gateway plumbing")
            except Exception as e:  # noqa: BLE001 -- keep removing the rest
                log.error("removing the plumbing of the failed start: %s", e)
        loader.remove_pins(self.pin_dir)
        done.append(f"removed {self.pin_dir}")
        from bulkhead.daemon.state import STATE_FILE

        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        return done

    # ---------------------------------------------------------------- names
    def names_for(self, generation: int) -> tuple:
        """(apps, rules, segments) id -> name for a generation, and its flowlog.FabricNames (None
        without a fabric); the current policy's if unknown. Segments include the other gateways'
        (Bundle.segment_names), so flows through the transit name both ends."""
        n = self._names.get(generation)
        if n is None:
            b = self.bundles.get(generation) or self.bundle
            if b is None:
                return {}, {}, {}, None
            n = (b.app_names(), b.rule_names(), b.segment_names(), flowlog.fabric_names(b))
            if generation in self.bundles:
                self._names[generation] = n
        return n

    def app_name(self, app_id: int) -> str:
        """Name of an app id for counters kept across policies: newest policy that knows it."""
        return self._name_any(0, app_id, flowlog.app_name)

    def rule_name(self, rule_id: int) -> str:
        return self._name_any(1, rule_id, flowlog.rule_name)

    def _name_any(self, which: int, ident: int, fmt) -> str:
        gens = sorted(dict(self.bundles), reverse=True)
        for g in gens:
            names = self.names_for(g)[which]
            if ident in names:
                return names[ident]
        return fmt(self.names_for(gens[0])[which] if gens else {}, ident)

    def latency_summary(self) -> list[dict]:
        return flowlog.latency_summary(self.dp.latency(), self.dp.latency_bounds(), self.app_name)

    def flow_events(self, after: int | None, limit: int, app: str | None = None, verdict: str | None = None,
                    rule: str | None = None) -> dict:
        seq, events, lost = self.flowlog.since(after, limit, app=app, verdict=verdict, rule=rule)
        try:
            kernel_lost = self.dp.events().get("flow_event_lost", 0)
        except Exception:
            kernel_lost = None
        return {"ok": True, "seq": seq, "events": events, "lost": lost, "kernel_lost": kernel_lost}

    # ---------------------------------------------------------------- apply
    def apply(self, bundle: Bundle) -> int:
        """Apply atomically; on any error the running policy stays in force."""
        try:
            gen = self._apply(bundle)
        except Exception:
            self.applies["failed"] += 1
            raise
        self.applies["ok"] += 1
        return gen

    def _record_slot_entries(self, bundle: Bundle, slot: int) -> None:
        """What this apply wrote into the slot's maps (bulkhead_map_entries of per-slot maps)."""
        exact = (abi.POLICY_PLEN_EXACT, abi.POLICY_PLEN_ANY_PORT, abi.POLICY_PLEN_ANY_PROTO)
        src_host = sum(1 for e in bundle.src_entries if e[2] == 128)
        dst_host = sum(1 for e in bundle.dst_entries if e[1] == 128)
        pol_exact = sum(1 for e in bundle.policy_entries if e[0] in exact)
        self.slot_entries.update({
            f"seg_map_{slot}": sum(len(s["interfaces"]) for s in bundle.segments),
            f"src_host_{slot}": src_host, f"src_ident_{slot}": len(bundle.src_entries) - src_host,
            f"dst_host_{slot}": dst_host, f"dst_ident_{slot}": len(bundle.dst_entries) - dst_host,
            f"pol_exact_{slot}": pol_exact, f"policy_{slot}": len(bundle.policy_entries) - pol_exact,
            f"sni_names_{slot}": len(bundle.sni_entries),
            # + this gateway's SELF entry, written with transit (fill.pack_slot)
            f"fab_{slot}": len(bundle.fab_entries) + (1 if self.transit is not None else 0),
        })

    def _apply(self, bundle: Bundle) -> int:
        with self.lock:
            ifindexes = resolve_ifindexes(bundle)
            seg_of = {i: s["name"] for s in bundle.segments for i in s["interfaces"]}
            newly = []  # attached by this attempt: a failure takes them off again
            # Enforced before this agent (a restart adopting pins): a failed first apply leaves them on.
            before = set()
            if any(n not in self.interfaces for n in ifindexes):  # one netlink dump, only when attaching
                before = {n for n, pid in xdp_prog_ids().items() if n not in self.interfaces and self._is_ours(n, pid)}
            try:
                for ifname in ifindexes:
                    new = ifname not in self.interfaces or self.interfaces[ifname]["ifindex"] != ifindexes[ifname]
                    if new and ifname not in before:
                        newly.append(ifname)
                    # TC before XDP: XDP may hand reject answers to it (reject path tc_redirect).
                    self.dp.attach_tc(ifname)  # idempotent: also re-takes interfaces of a previous agent
                    if new:
                        mode = self.dp.attach(ifname, self.xdp_mode)
                        self.interfaces[ifname] = {"ifindex": ifindexes[ifname], "mode": mode,
                                                   "reject_path": self.dp.reject_path(ifindexes[ifname]),
                                                   "prog_id": self.xdp_prog_id()}
                # Plumbing before the flip: if it fails, nothing has switched yet. It makes the transit
                # device too (this gateway has a transit address): SELF names its ifindex.
                plan = transit.plan(bundle, self.gateway)
                port = plan["port"] if plan and plan["address"] else None
                if bundle.transit and plan is None:
                    log.warning("the policy has transit but this agent runs as no gateway of it (--gateway NAME): "
                                "it enforces every segment as its own and sends nothing through the transit")
                wg_plan = wireguard.plan(bundle, self.gateway) if port else None
                self.plumbing.apply(bundle, ifindexes, self.verifier.port if self.verifier else None,
                                    transit_port=port, wg=(wg_plan, self.wireguard_key))
                ifindex = self.plumbing.transit_ifindex if port else 0
                if port:
                    self.dp.attach_tc(self.plumbing.transit_device, loader.TRANSIT_PROG)
                generation = self.dp.active_generation() + 1
                # The verifier compiles the L7 rules (and loads key files) before the kernel switches.
                if self.verifier:
                    from bulkhead.verifier.supervisor import VerifierRefused

                    try:
                        self.verifier.prepare(bundle.pack(), generation)
                    except VerifierRefused:
                        raise
                    except Exception as e:  # down: apply anyway, L7 flows fail closed until it is back
                        log.error("L7 verifier unavailable (%s): L7 flows are dropped until it is back", e)
                # The gateway's DNS listeners open before the switch: a missing address fails here.
                if bundle.fabric and self.dns is None:
                    from bulkhead.fabric.dns import DnsServer

                    self.dns = DnsServer()
                if self.dns is not None:
                    self.dns.prepare(bundle, set(ifindexes))
                if port:  # transit_snat addresses on their segments' interfaces (docs/fabric.md)
                    snat.check(bundle)
                result = self.dp.apply(bundle, ifindexes, generation, fab_self=transit.fab_self(plan, ifindex))
            except Exception:
                # The old slot is still active: put back what this attempt changed.
                if self.dns is not None:
                    self.dns.abort()
                if self.verifier:
                    self.verifier.abort()
                for ifname in newly:
                    loader.Datapath.detach(ifname)
                    loader.Datapath.detach_tc(ifname)
                    self.interfaces.pop(ifname, None)
                if self.bundle is not None:
                    try:
                        self._restore_plumbing()
                    except Exception as e:
                        log.error("restoring the previous gateway plumbing failed: %s", e)
                raise
            if self.dns is not None:
                self.dns.commit()
            if self.verifier:
                try:
                    self.verifier.commit(generation)
                    self.dp.set_ctl_flags(set_bits=abi.CTL_L7_READY)
                except Exception as e:  # the kernel switched: L7 flows fail closed until it recovers
                    log.error("verifier did not take generation %d: %s", generation, e)
            for ifname in list(self.interfaces):
                if ifname not in ifindexes:
                    loader.Datapath.detach(ifname)
                    loader.Datapath.detach_tc(ifname)
                    del self.interfaces[ifname]
            for ifname, info in self.interfaces.items():
                info["segment"] = seg_of[ifname]
            self.bundle = bundle
            self.wireguard = wg_plan
            self.transit = None if plan is None else {
                **plan, "device": self.plumbing.transit_device if port else None, "ifindex": ifindex}
            self.checksum = bundle.checksum  # computed once: costly for 100k-rule bundles
            self.bundles[generation] = bundle
            for g in sorted(self.bundles)[:-4]:  # keep a few generations for flow names
                del self.bundles[g]
                self._names.pop(g, None)
            self._record_slot_entries(bundle, result["slot"])
            self.last_apply = {**result, "time": time.time(), "rules": len(bundle.rules),
                               "entries": len(bundle.policy_entries)}
            write_state(self.state_dir, {
                "instance": self.instance,
                "pin_dir": str(self.pin_dir),
                "generation": generation,
                "interfaces": self.interfaces,
                "policy": bundle.source,
                "checksum": self.checksum,
                "pid": os.getpid(),
            })
            log.info("applied generation %d (%d rules, %d policy entries) in %.3fs",
                     generation, len(bundle.rules), len(bundle.policy_entries), result["seconds"])
            return generation

    def _restore_plumbing(self) -> None:
        """After a failed apply: the plumbing of the policy in force. Its transit device is kept
        when the failed apply left it as it was; when it had to be made again (another port, or
        removed), bulkhead_transit_in goes back on it and the active slot's SELF gets its ifindex."""
        old = self.transit
        port = old["port"] if old and old["device"] else None
        self.plumbing.apply(self.bundle, resolve_ifindexes(self.bundle),
                            self.verifier.port if self.verifier else None, transit_port=port,
                            wg=(self.wireguard, self.wireguard_key))
        if port:
            self.dp.attach_tc(self.plumbing.transit_device, loader.TRANSIT_PROG)
            if self.plumbing.transit_ifindex != old["ifindex"]:
                old["ifindex"] = self.plumbing.transit_ifindex
                self.dp.set_fab_self(self.dp.ctl().active_slot & 1, transit.fab_self(old, old["ifindex"]))

    def reload(self) -> dict:
        """Re-read the policy files this agent was started with and apply them (the same atomic
        apply: a refused policy leaves the running one). code 2: the files don't validate."""
        if not self.policy_paths:
            f = self.follower
            where = f"gateway {f.gateway}, etcd {', '.join(f.urls)}" if f else "no policy files"
            return {"ok": False, "code": 1, "generation": self.dp.active_generation(),
                    "error": f"nothing to re-read: this agent follows the fleet ({where}); "
                             "publish with `bulkhead fleet publish`"}
        from bulkhead.core.notify import notify
        from bulkhead.policy import PolicyError, load_policy

        notify(RELOADING=1, STATUS="re-reading " + " ".join(self.policy_paths))
        try:
            try:
                bundle, warnings = load_policy(self.policy_paths,
                                               previous_vips=self.bundle.vips if self.bundle else None)
                bundle = self.mine(bundle)
            except (PolicyError, ValueError) as e:
                log.error("reload: %s: generation %d stays in force", e, self.dp.active_generation())
                return {"ok": False, "code": 2, "error": str(e), "generation": self.dp.active_generation()}
            for w in warnings:
                log.warning("%s", w)
            try:
                gen = self.apply(bundle)
            except Exception as e:
                log.error("reload failed, generation %d stays in force: %s", self.dp.active_generation(), e)
                return {"ok": False, "code": 1, "error": str(e), "generation": self.dp.active_generation()}
            log.info("reloaded %s: generation %d", " ".join(self.policy_paths), gen)
            return {"ok": True, "generation": gen, "seconds": self.last_apply.get("seconds"), "warnings": warnings}
        finally:
            notify(READY=1, STATUS=self.ready_status())

    def ready_status(self) -> str:
        return (f"enforcing generation {self.dp.active_generation()} on "
                f"{', '.join(sorted(self.interfaces)) or 'no interfaces'}")

    # --------------------------------------------------------------- status
    def status(self) -> dict:
        b = self.bundle
        return {
            "instance": self.instance,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "generation": self.dp.active_generation(),
            "active_slot": self.dp.ctl().active_slot,
            "pin_dir": str(self.pin_dir),
            "datapath": {"build_id": self.dp.build_id, "compiled": self.dp.compiled},
            "policy": {"files": b.source, "checksum": self.checksum, "settings": b.settings,
                       "segments": len(b.segments), "apps": len(b.apps), "rules": len(b.rules),
                       "policy_entries": len(b.policy_entries), "warnings": b.warnings},
            "last_apply": self.last_apply,
            # reject_path as the kernel has it (if_cfg), not as this process remembers it.
            "interfaces": [{"name": n, **info, "reject_path": self.dp.reject_path(info["ifindex"])}
                           for n, info in sorted(self.interfaces.items())],
            "counters": self.dp.counters(),
            "events": self.dp.events(),
            "flows": self.dp.flow_count(),
            "verifier": self.verifier_status(),
            "flow_log": self.flow_log_status(),
            "latency": self._safe(self.latency_summary, []),
            "http_hops": self._safe(self.flowlog.hops.summary, []),  # requests between gateways, per hop
            "fleet": self.follower.status() if self.follower else None,
            "dns": self.dns.status() if self.dns else None,
            "transit": self._safe(self.transit_status, None),
        }

    def transit_status(self) -> dict | None:
        """This gateway's transit (None: the policy has none, or the agent runs with no gateway name);
        the device's ifindex as the kernel has it now (0: gone, or none made: no transit address)."""
        t = self.transit
        if t is None:
            return None
        ifindex = 0
        if t["device"]:
            dev = transit.device(t["device"])
            ifindex = dev["ifindex"] if dev and dev.get("kind") == "vxlan" else 0
        return {"device": t["device"], "ifindex": ifindex, "port": t["port"], "address": t["address"],
                "gateway": t["gateway"], "gateway_id": t["gateway_id"], "peers": dict(t["peers"]),
                "wireguard": self._safe(lambda: wireguard.status(self.wireguard, self.instance), None)}

    @staticmethod
    def _safe(fn, default):
        try:
            return fn()
        except Exception as e:
            log.warning("status: %s failed: %s", getattr(fn, "__name__", fn), e)
            return default

    def flow_log_status(self) -> dict:
        st = self.flowlog.stats()
        st["kernel_lost"] = self._safe(lambda: self.dp.events().get("flow_event_lost", 0), None)
        st["pairs"] = self.flowlog.recent_pairs(20)
        return st

    def verifier_status(self) -> dict:
        if not self.verifier:
            return {"running": False}
        st = {"running": True, **self.verifier.status()}
        st["requests"] = self.l7.totals()
        return st

    def flows(self, limit: int = 1000) -> list[dict]:
        """Current flow-table entries with names, most recent first."""
        now_ns = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
        out = []
        for fam, k, v in self.dp.flow_entries():  # batch reads, one syscall per 4096 entries
            if fam == "flows4":
                src = str(ipaddress.IPv4Address(socket.ntohl(k.saddr_be)))
                dst = str(ipaddress.IPv4Address(socket.ntohl(k.daddr_be)))
            else:
                src, dst = _addr(k.saddr), _addr(k.daddr)
            sni = self._sni_name(fam, k, v)
            apps, rules, segs = self.names_for(v.generation)[:3]  # cached per generation
            out.append({
                "segment": segs.get(k.segment_id, str(k.segment_id)),
                "direction": "reply" if v.flags & abi.FLOWF_REPLY else "forward",
                "proto": proto_name(k.proto),
                "src": src, "sport": socket.ntohs(k.sport_be),
                "dst": dst, "dport": socket.ntohs(k.dport_be),
                "src_app": apps.get(v.src_app, "-"),
                "dst_app": apps.get(v.dst_app, "(by name)" if v.dst_app == abi.APP_ANY else "-"),
                "rule": rules.get(v.rule_id, "(default)"),
                "reason": abi.Reason(v.reason).name.lower() if v.reason in abi.Reason._value2member_map_ else str(v.reason),
                "verdict": abi.verdict_of(v.reason),
                "audit": bool(v.flags & abi.ACTF_AUDIT),
                "generation": v.generation,
                "packets": v.packets, "bytes": v.bytes,
                "idle_s": round(max(0, now_ns - v.last_seen_ns) / 1e9, 1),
                "sni": sni,
            })
        out.sort(key=lambda f: f["idle_s"])
        return out[:limit]

    def _sni_name(self, fam: str, k, v) -> str | None:
        """The server name a TLS flow asked for. The flow entries keep only the
        name's hashes; the name comes from the flow log (the kernel's decision
        event carries it), keyed by the forward 5-tuple on the client's segment."""
        if k.proto != 6 or not v.sni_flags & abi.FSNI_NAME:
            return None
        if fam == "flows4":
            s16 = loader.v4mapped(ipaddress.IPv4Address(socket.ntohl(k.saddr_be)))
            d16 = loader.v4mapped(ipaddress.IPv4Address(socket.ntohl(k.daddr_be)))
        else:
            s16, d16 = bytes(k.saddr), bytes(k.daddr)
        if v.flags & abi.FLOWF_REPLY:
            return self.flowlog.server_name(v.peer_segment, d16, k.dport_be, s16, k.sport_be)
        return self.flowlog.server_name(k.segment_id, s16, k.sport_be, d16, k.dport_be)

    # -------------------------------------------------------------- control
    def handle(self, req: dict) -> dict:
        op = req["op"]
        if op == "ping":
            return {"ok": True, "generation": self.dp.active_generation()}
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op == "flows":
            return {"ok": True, "flows": self.flows(int(req.get("limit", 1000)))}
        if op == "flow_events":
            after = req.get("after")
            verdict = req.get("verdict") or None
            if verdict is not None and verdict not in VERDICTS:
                return {"ok": False, "code": 2, "error": f"verdict must be one of {', '.join(VERDICTS)}"}
            return self.flow_events(None if after is None else int(after), int(req.get("limit", 1000)),
                                    app=req.get("app") or None, verdict=verdict, rule=req.get("rule") or None)
        if op == "latency":
            return {"ok": True, "latency": self.latency_summary()}
        if op == "vips":  # `policy apply` keeps published apps' service addresses where they are
            return {"ok": True, "vips": self.bundle.vips if self.bundle else {}}
        if op == "requests":  # the verifier's, and the fabric's timed per hop (telemetry/hops.py)
            seq, recs = self.l7.since(int(req.get("after", 0)), int(req.get("limit", 1000)))
            return {"ok": True, "seq": seq, "requests": recs, **self.flowlog.hops.reply(req)}
        if op == "apply":
            if self.follower is not None:
                f = self.follower
                return {"ok": False, "code": 1, "generation": self.dp.active_generation(),
                        "error": f"this agent follows the fleet (gateway {f.gateway}, etcd {', '.join(f.urls)}): "
                                 "publish with `bulkhead fleet publish`"}
            try:
                bundle = Bundle.unpack(req["bundle"])
            except Exception as e:
                return {"ok": False, "code": 2, "error": f"bad bundle: {e}"}
            try:
                bundle = self.mine(bundle)
            except ValueError as e:  # the policy has no gateway of this agent's name
                return {"ok": False, "code": 2, "error": str(e), "generation": self.dp.active_generation()}
            try:
                gen = self.apply(bundle)
            except Exception as e:
                log.error("apply failed, generation %d stays in force: %s", self.dp.active_generation(), e)
                return {"ok": False, "code": 1, "error": str(e), "generation": self.dp.active_generation()}
            return {"ok": True, "generation": gen, "seconds": self.last_apply.get("seconds")}
        if op == "reload":
            return self.reload()
        if op == "shutdown":
            self.stop_event.set()
            return {"ok": True}
        return {"ok": False, "code": 2, "error": f"unknown op {op!r}"}
