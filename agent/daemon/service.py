"""The agent process: checks before anything is compiled, start, readiness, reload, exit.

`bulkhead agent run` and the systemd unit (scripts/service/bulkhead.service, Type=notify) run
this. Order matters: everything that can be checked without touching the kernel is checked
first (the policy, the capabilities, a live agent on the socket, the kernel's features, the
interfaces and whether the policy fits the maps), so a bad start fails in a second and leaves
nothing. A start that fails later removes what it created (Agent.abandon) unless it adopted a
previous agent's pins: those stay enforcing. systemd hears READY=1 only once the policy is
enforced on every interface; SIGHUP and `bulkhead reload` re-read the policy files.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from bulkhead.core import wire
from bulkhead.core.notify import notify
from bulkhead.daemon.agent import Agent, AgentError, resolve_ifindexes
from bulkhead.daemon.control import ControlServer
from bulkhead.datapath import abi, probe
from bulkhead.datapath.errors import DatapathError
from bulkhead.datapath.maps import misfits
from bulkhead.telemetry import flowlog

log = logging.getLogger("bulkhead.agent")

# linux/capability.h: what the data path needs in the effective set
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF, CAP_PERFMON = 12, 21, 39, 38


def effective_caps(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_caps(caps: int) -> list[str]:
    """CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON (kernels before 5.8 have only it)."""
    has = lambda c: bool(caps >> c & 1)  # noqa: E731
    out = []
    if not (has(CAP_BPF) or has(CAP_SYS_ADMIN)):
        out.append("CAP_BPF (load programs, create and pin maps)")
    if not (has(CAP_PERFMON) or has(CAP_SYS_ADMIN)):
        out.append("CAP_PERFMON (programs that read packet memory beyond bounds checks, bpf_ktime)")
    if not has(CAP_NET_ADMIN):
        out.append("CAP_NET_ADMIN (attach XDP and TC, nftables, ip rules, the verifier's sockets)")
    return out


def preflight(agent: Agent, bundle) -> None:
    """What must hold before the program is compiled: the policy's interfaces exist here and
    the policy fits the maps. Raises AgentError saying what does not."""
    ifindexes = resolve_ifindexes(bundle)
    problems = misfits(bundle, dict(abi.DEFAULT_SIZES, **agent.sizes), ifindexes)
    if problems:
        raise AgentError("the policy does not fit the maps: " + "; ".join(problems))


def run(policy_paths: list[str], state_dir: str, metrics_addr: str | None, xdp_mode: str = "auto",
        sizes: dict[str, int] | None = None, events_keep: int = flowlog.DEFAULT_KEEP,
        fleet: dict | None = None, gateway: str | None = None) -> int:
    """Run until SIGTERM/SIGINT. The policy comes from `policy_paths` (with `gateway`: that
    gateway's part of it, on every reload and apply too; a policy without that gateway is
    refused, exit 2), or with `fleet`
    ({"urls", "gateway", "trust", "wait"}) from etcd through a Follower (bulkhead.fleet.follower):
    its first verified envelope (the cached one in STATE_DIR/fleet, else etcd's, waited for up to
    fleet["wait"] seconds: none by then is exit 1) starts the data path, later ones are applied."""
    agent = Agent(state_dir, xdp_mode, sizes=sizes, events_keep=events_keep,
                  gateway=fleet["gateway"] if fleet is not None else gateway)
    bundle = first = None
    expected: tuple[type, ...] = (AgentError, DatapathError, wire.ControlError)  # said in one line, no trace
    if fleet is None:
        from bulkhead.policy import PolicyError, load_policy

        try:
            bundle, warnings = load_policy(policy_paths)
        except PolicyError as e:
            print(str(e), flush=True)
            return 2
        try:
            bundle = agent.mine(bundle)
        except ValueError as e:  # --gateway NAME is not in the policy's gateways:
            print(f"bulkhead: {e}", flush=True)
            return 2
        for w in warnings:
            log.warning("%s", w)
        agent.policy_paths = [str(Path(p).resolve()) for p in policy_paths]
    else:
        from bulkhead.fleet.follower import Follower, FollowerError
        from bulkhead.fleet.keys import FleetKeyError

        expected += (FollowerError,)

        try:
            agent.follower = Follower(fleet["urls"], fleet["gateway"], fleet["trust"], state_dir,
                                      lambda b, revision: agent.apply(b))
            agent.follower.publish_latency(agent.flowlog.hops.export)  # `bulkhead fleet latency`
        except (FleetKeyError, ValueError) as e:
            print(f"bulkhead: {e}", flush=True)
            return 2
    missing = missing_caps(effective_caps())
    if missing:
        log.error("the agent lacks capabilities: %s", "; ".join(missing))
        return 1
    server = ControlServer(state_dir, agent.handle)
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        server.ensure_free()  # before touching the kernel: never fight a live agent
        probe.require(log)  # logs missing kernel features; raises naming a required one
        if agent.follower is not None:
            first = agent.follower.initial(fleet["wait"])  # FollowerError: nothing verified to start from
            bundle = first.bundle
        preflight(agent, bundle)
        gen = agent.start(bundle)
        if first is not None:
            agent.follower.applied(first)
        server.start()
    except Exception as e:  # noqa: BLE001 -- any start failure: say why, undo this start, exit 1
        if not isinstance(e, expected):
            log.exception("agent start failed")
        log.error("%s", e)
        try:
            undone = agent.abandon()
        except Exception as e2:  # noqa: BLE001
            log.exception("removing what the failed start created: %s", e2)
            undone = []
        if agent.follower is not None and first is not None:
            agent.follower.start_failed(str(e))
        if undone:
            log.error("start failed: removed what it created (%s)", "; ".join(undone))
        elif agent.dp is not None and not agent.dp.fresh:
            log.error("start failed: the pins it adopted stay in place and keep enforcing (`bulkhead down` removes them)")
        return 1
    if agent.follower is not None:
        agent.follower.start()  # from here on etcd's newer envelopes are applied as they come
    if metrics_addr:
        from bulkhead.telemetry import metrics

        try:
            metrics.serve(agent, metrics_addr)
        except (OSError, ValueError) as e:
            log.error("metrics exporter not started on %s: %s", metrics_addr, e)

    reload_asked = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop_event.set())
    signal.signal(signal.SIGHUP, lambda *_: (reload_asked.append(1), agent.stop_event.set()))
    revision = f" revision={first.revision}" if first is not None else ""
    compiled = "compiled" if agent.dp.compiled else f"reused pins of build {agent.dp.build_id}"
    print(f"bulkhead agent ready generation={gen} interfaces={','.join(sorted(agent.interfaces))}{revision} "
          f"({compiled})", flush=True)
    notify(READY=1, STATUS=agent.ready_status(), MAINPID=os.getpid())
    try:
        while True:
            agent.stop_event.wait(1.0)
            if reload_asked:  # SIGHUP: the same as `bulkhead reload`, reported in the log
                reload_asked.clear()
                agent.stop_event.clear()
                agent.reload()
                continue
            if agent.stop_event.is_set():
                break
    finally:
        notify(STOPPING=1, STATUS="stopping: XDP stays attached and enforcing")
        if agent.follower is not None:
            agent.follower.stop()
        server.stop()
        agent.stop()
    log.info("agent exiting; XDP stays attached and enforcing (use `bulkhead down` to remove)")
    return 0


