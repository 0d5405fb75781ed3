"""bulkhead command line.

Exit codes: 0 ok, 1 runtime failure, 2 bad input (usage, invalid policy).
Every command that talks to the agent takes --state-dir (default /run/bulkhead).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import click

from bulkhead.cli import fabric, fleet, render  # fabric, fleet: the groups, each in its own module
from bulkhead.core import wire
from bulkhead.core.names import VERDICTS
from bulkhead.datapath.loader import DEFAULT_STATE_DIR

STATE_DIR_OPT = click.option(
    "--state-dir", default=DEFAULT_STATE_DIR, show_default=True, envvar="BULKHEAD_STATE_DIR",
    help="Agent state directory; the control socket is STATE_DIR/bulkhead.sock.",
)
JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


def _fail(msg: str, code: int = 1):
    click.echo(f"bulkhead: {msg}", err=True)
    sys.exit(code)


def _agent_request(state_dir: str, op: str, **kw) -> dict:
    try:
        reply = wire.request(state_dir, op, **kw)
    except wire.ControlError as e:
        _fail(str(e))
    except (OSError, ConnectionError) as e:
        _fail(f"control socket: {e}")
    return reply


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """bulkhead: application segmentation for Linux gateway hosts, enforced in XDP.

    Apps are identified by segment (where traffic comes from) plus addresses
    and ports; policies say which app may talk to which. Start with
    `bulkhead policy validate FILE`, run `bulkhead agent run --policy FILE`,
    and change policy live with `bulkhead policy apply FILE`.
    """
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ------------------------------------------------------------------ policy
@main.group()
def policy() -> None:
    """Validate policy files and apply them to a running agent."""


@policy.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@JSON_OPT
def policy_validate(files: tuple[str, ...], as_json: bool) -> None:
    """Check policy FILEs; print FILE:LINE: message for every problem (exit 2)."""
    from bulkhead.policy import PolicyError, load_policy

    results, failed = [], False
    for f in files:
        try:
            bundle, warnings = load_policy([f])
        except PolicyError as e:
            failed = True
            results.append({"file": f, "ok": False, "errors": [str(d) for d in e.errors]})
            continue
        results.append({"file": f, "ok": True, "warnings": warnings, "apps": len(bundle.apps),
                        "rules": len(bundle.rules), "policy_entries": len(bundle.policy_entries)})
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            if r["ok"]:
                for w in r["warnings"]:
                    click.echo(f"{r['file']}: warning: {w}", err=True)
                click.echo(f"{r['file']}: ok ({r['apps']} apps, {r['rules']} rules, {r['policy_entries']} policy entries)")
            else:
                for line in r["errors"]:
                    click.echo(line)
    sys.exit(2 if failed else 0)


@policy.command("apply")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@STATE_DIR_OPT
@JSON_OPT
def policy_apply(files: tuple[str, ...], state_dir: str, as_json: bool) -> None:
    """Validate FILEs, then swap the running agent's policy atomically.

    Prints the new generation. On any error the old policy stays in force
    and the exit code is non-zero (2: invalid policy, 1: the agent refused).
    """
    from bulkhead.policy import PolicyError, load_policy

    try:  # published apps keep the service addresses the running policy gave them
        previous_vips = wire.request(state_dir, "vips").get("vips")
    except (wire.ControlError, OSError, ConnectionError):
        previous_vips = None  # no agent: the apply below says so
    try:
        bundle, warnings = load_policy(list(files), previous_vips=previous_vips)
    except PolicyError as e:
        click.echo(str(e))
        click.echo("bulkhead: policy not applied; the running policy stays in force", err=True)
        sys.exit(2)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    _report_apply(_agent_request(state_dir, "apply", bundle=bundle.pack(), timeout=300), as_json, "apply")


def _report_apply(reply: dict, as_json: bool, what: str) -> None:
    """An apply's or reload's answer: the new generation, or why not and which one stays (exit 1/2)."""
    if as_json:
        click.echo(json.dumps(reply))
    if not reply.get("ok"):
        if not as_json:
            click.echo(f"bulkhead: {what} failed: {reply.get('error')}", err=True)
            click.echo(f"bulkhead: generation {reply.get('generation', '?')} stays in force", err=True)
        sys.exit(int(reply.get("code", 1)))
    if not as_json:
        for w in reply.get("warnings") or ():
            click.echo(f"warning: {w}", err=True)
        click.echo(f"generation {reply['generation']}")


@main.command()
@STATE_DIR_OPT
@JSON_OPT
def reload(state_dir: str, as_json: bool) -> None:
    """Make the running agent re-read the policy files it was started with.

    The same atomic apply as `policy apply`: prints the new generation, and on
    any error the old policy stays in force (exit 2: the files don't validate,
    1: the agent refused or follows the fleet). The service unit's ExecReload
    (`systemctl reload bulkhead`); SIGHUP to the agent does the same, reported
    only in its log.
    """
    _report_apply(_agent_request(state_dir, "reload", timeout=300), as_json, "reload")


# --map-size NAME -> the consts.h knob it sets (abi.DEFAULT_SIZES)
MAP_SIZE_NAMES = {
    "flows": "BH_MAX_FLOWS", "frags": "BH_MAX_FRAGS", "ident": "BH_MAX_IDENT", "policy": "BH_MAX_POLICY",
    "ifindex": "BH_MAX_IFINDEX", "sni_names": "BH_MAX_SNI", "sni_state": "BH_MAX_SNI_PARSE",
    "lat_hist": "BH_MAX_LAT", "pair_flows": "BH_MAX_PAIRS", "events_ring_pages": "BH_EVENT_RING_PAGES",
}
MAP_SIZE_MAX = 1 << 26


def parse_map_sizes(items) -> dict[str, int]:
    """["flows=1024", "events-ring-pages=1", "BH_MAX_LAT=64"] -> {BH_*: N}; ValueError says what is wrong."""
    from bulkhead.datapath.abi import DEFAULT_SIZES

    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        key = name.strip()
        if key.upper() in DEFAULT_SIZES:
            key = key.upper()
        else:
            key = MAP_SIZE_NAMES.get(key.lower().replace("-", "_"), "")
        if not sep or not key:
            raise ValueError(f"--map-size {item!r}: expected NAME=N with NAME one of "
                             f"{', '.join(MAP_SIZE_NAMES)} (or a BH_* name)")
        try:
            n = int(value.strip(), 0)
        except ValueError:
            raise ValueError(f"--map-size {item!r}: {value.strip()!r} is not a number") from None
        if not 1 <= n <= MAP_SIZE_MAX:
            raise ValueError(f"--map-size {item!r}: must be between 1 and {MAP_SIZE_MAX}")
        if key == "BH_EVENT_RING_PAGES" and n & (n - 1):
            raise ValueError(f"--map-size {item!r}: the event ring's pages must be a power of two")
        out[key] = n
    return out


# ------------------------------------------------------------------- agent
@main.group()
def agent() -> None:
    """Run the enforcement agent."""


@agent.command("run")
@click.option("--policy", "policy_files", multiple=True, type=click.Path(dir_okay=False),
              help="Policy file (repeatable); a gateway with no fleet. Exclusive with --etcd.")
@click.option("--etcd", "etcd", envvar="BULKHEAD_ETCD", metavar="URL[,URL...]",
              help="Follow the fleet's signed policy in etcd (default $BULKHEAD_ETCD); needs --gateway, --trust.")
@click.option("--gateway", metavar="NAME", help="This gateway in the policy's gateways: (needs --etcd or --policy).")
@click.option("--trust", type=click.Path(dir_okay=False), metavar="FILE.pub", multiple=True,
              help="With --etcd: the public key policies must be signed with (`bulkhead fleet keygen`). "
              "Repeatable: during a key rotation trust the old and the new key, publish with the new one, "
              "then drop the old.")
@click.option("--etcd-wait", default=30.0, show_default=True, type=click.FloatRange(min=0), metavar="S",
              help="With --etcd and no verified policy in STATE_DIR/fleet: how long to wait for etcd's "
              "before exiting 1.")
@STATE_DIR_OPT
@click.option("--metrics", "metrics_addr", default="127.0.0.1:9477", show_default=True,
              help="Prometheus listen address HOST:PORT; 'off' disables.")
@click.option("--xdp-mode", type=click.Choice(["auto", "native", "generic"]), default="auto", show_default=True,
              help="XDP attach mode; auto tries native (driver) mode first.")
@click.option("--map-size", "map_sizes", multiple=True, metavar="NAME=N",
              help="Size of a BPF map (repeatable): " + ", ".join(f"{k} ({v})" for k, v in MAP_SIZE_NAMES.items())
              + "; events_ring_pages must be a power of two (4 KiB pages). Pinned maps of another size are "
              "refused: `bulkhead down` first.")
@click.option("--events-keep", default=10000, show_default=True, type=click.IntRange(min=0),
              help="Flow events the agent keeps for `bulkhead flows` (older ones are dropped, counted).")
@click.option("--verifier-procs", default=1, show_default=True, type=click.IntRange(1, 64), metavar="N",
              envvar="BULKHEAD_VERIFIER_PROCS", help="L7 verifier processes (SO_REUSEPORT on one port).")
@fabric.wireguard_key_option
def agent_run(policy_files, etcd, gateway, trust, etcd_wait, state_dir, metrics_addr, xdp_mode, map_sizes,
              events_keep, verifier_procs) -> None:
    """Run the agent in the foreground.

    Attaches XDP to the interfaces the policy's segments name, enforces, and
    serves STATE_DIR/bulkhead.sock. Stopping the agent leaves enforcement in
    place (so a restart opens no window); `bulkhead down` removes it.

    With --gateway NAME it enforces gateway NAME's segments and transit (a policy without NAME
    is refused). With --etcd the policy is the fleet's: the newest envelope signed by --trust
    whose revision is above the applied one. It starts from STATE_DIR/fleet/last.envelope if
    there is one (stale until etcd answers); without one it waits --etcd-wait, then exits 1.
    """
    try:
        sizes = parse_map_sizes(map_sizes)
    except ValueError as e:
        _fail(str(e), 2)
    if policy_files and etcd and click.get_current_context().get_parameter_source("etcd") \
            == click.core.ParameterSource.ENVIRONMENT:
        etcd = None  # an explicit --policy wins over $BULKHEAD_ETCD; only --etcd and --policy clash
    if bool(policy_files) == bool(etcd):
        _fail("agent run takes --policy FILE (a gateway on its own) or --etcd URL (the fleet's policy; "
              "also $BULKHEAD_ETCD), " + ("not both" if policy_files else "one of them"), 2)
    fleet = None
    if etcd:
        from bulkhead.fleet.store import parse_urls

        missing = [o for o, v in (("--gateway NAME", gateway), ("--trust FILE.pub", trust)) if not v]
        if missing:
            _fail(f"agent run --etcd needs {' and '.join(missing)}", 2)
        try:
            fleet = {"urls": parse_urls(etcd), "gateway": gateway, "trust": list(trust), "wait": etcd_wait}
        except ValueError as e:
            _fail(str(e), 2)
    elif trust:
        _fail("--trust FILE.pub: signing keys go with --etcd (a policy from --policy is not signed)", 2)
    if os.geteuid() != 0:
        _fail("the agent needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN)")
    os.environ["BULKHEAD_VERIFIER_PROCS"] = str(verifier_procs)  # read by verifier.supervisor
    from bulkhead.daemon import service as daemon

    sys.exit(daemon.run(list(policy_files), state_dir, None if metrics_addr == "off" else metrics_addr, xdp_mode,
                        sizes=sizes, events_keep=events_keep, fleet=fleet, gateway=gateway))



# ------------------------------------------------------------------ status
@main.command()
@STATE_DIR_OPT
@JSON_OPT
def status(state_dir: str, as_json: bool) -> None:
    """Agent state: interfaces, generation, counters by reason; with transit, its packets and drops."""
    reply = _agent_request(state_dir, "status")
    if not reply.get("ok"):
        _fail(reply.get("error", "status failed"))
    click.echo(json.dumps(reply["status"], indent=2) if as_json else render.status_text(reply["status"]))


@main.command()
@STATE_DIR_OPT
@JSON_OPT
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing flow events as the data path sends them (until Ctrl-C).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=0),
              help="Most recent events (--table: flow-table entries) to show first; 0: all the agent kept.")
@click.option("--app", metavar="NAME", help="Only flows from or to app NAME.")
@click.option("--verdict", type=click.Choice(VERDICTS),
              help="Only this verdict (audit: would have been denied, passed in audit mode).")
@click.option("--rule", metavar="NAME", help="Only flows decided by rule NAME ('(default)': the default action).")
@click.option("--table", is_flag=True,
              help="Show the kernel's flow table (live entries, one per direction) instead of the event log.")
@click.option("--latency", is_flag=True, help="Show only the per-app-pair hop latency summary.")
@click.option("--interval", default=0.3, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between polls of the agent with --follow.")
def flows(state_dir: str, as_json: bool, follow: bool, limit: int, app: str | None, verdict: str | None,
          rule: str | None, table: bool, latency: bool, interval: float) -> None:
    """Flow events: new flows, verdict changes and flow ends, with apps, rule, verdict, segment.

    The data path sends an event when a flow is first judged (`new`, any verdict), when its verdict
    or rule changes (`change`: a policy apply, or a TLS server name decided), and at its first FIN or
    RST (`end`, with the packets/bytes of both directions; UDP/ICMP flows have no end event). Without
    --follow: the most recent events the agent kept. With --follow: then every new one as it comes; if
    events were lost (the kernel's ring was full, or this command fell behind the agent's buffer) a
    line `# N events lost` goes to stderr.

    \b
    Output: time, kind, segment (the client's), protocol, client -> server,
    source app -> destination app, verdict (pass, drop, reject, audit),
    reason, rule, TLS server name, packets/bytes (client -> server; end
    events also server -> client). --json prints one JSON object per line.
    Fabric: `VIP:PORT (APP REAL)` a service address translated to APP's REAL,
    `via GW` the other end is behind gateway GW; --json: vip, real, via.
    Below the events: hop latency per app pair measured at the gateway
    (p50/p99/mean of SYN->SYN-ACK, SYN-ACK->ACK and request->response).

    \b
    Examples:
      bulkhead flows --verdict drop            # what was denied lately
      bulkhead flows --follow --app payments   # live flows from/to payments
      bulkhead flows --json --follow | jq .    # JSON lines
      bulkhead flows --table                   # the flow table itself
    """
    if latency:
        reply = _agent_request(state_dir, "latency")
        if not reply.get("ok"):
            _fail(reply.get("error", "latency failed"))
        if as_json:
            for r in reply["latency"]:
                click.echo(json.dumps(r))
        else:
            click.echo("\n".join(render.latency_lines(reply["latency"])))
        return
    if table:
        _flow_table(state_dir, as_json, follow, limit, app, verdict, rule, interval)
        return
    filters = {"app": app, "verdict": verdict, "rule": rule}
    reply = _agent_request(state_dir, "flow_events", limit=limit, **filters)
    if not reply.get("ok"):
        _fail(reply.get("error", "flow_events failed"), int(reply.get("code", 1)))

    def show(events: list[dict]) -> None:
        for e in events:
            click.echo(json.dumps(e) if as_json else render.event_line(e))

    if not as_json:
        click.echo(render.EVENT_HEADER)
    show(reply["events"])
    if not follow:
        if not as_json:
            lat = _agent_request(state_dir, "latency")
            click.echo("")
            click.echo("\n".join(render.latency_lines(lat.get("latency") or [])))
        return
    seq, kernel_lost = reply["seq"], reply.get("kernel_lost") or 0
    try:
        while True:
            time.sleep(interval)
            reply = _agent_request(state_dir, "flow_events", after=seq, limit=5000, **filters)
            if not reply.get("ok"):
                _fail(reply.get("error", "flow_events failed"))
            if reply["seq"] < seq:
                click.echo("# the agent restarted: following its new event log", err=True)
            lost = reply.get("lost", 0)
            klost = reply.get("kernel_lost") or 0
            if klost > kernel_lost:
                lost += klost - kernel_lost
            kernel_lost = max(kernel_lost, klost)
            if lost:
                click.echo(f"# {lost} events lost", err=True)
            seq = reply["seq"]
            show(reply["events"])
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


def _flow_table(state_dir: str, as_json: bool, follow: bool, limit: int, app, verdict, rule,
                interval: float) -> None:
    """The flow table's live entries (bulkhead flows --table)."""
    seen: dict[tuple, int] = {}

    def keep(f: dict) -> bool:
        v = "audit" if f.get("reason") in ("audit_rule", "audit_default") else f["verdict"]
        return ((not app or app in (f["src_app"], f["dst_app"])) and (not verdict or v == verdict)
                and (not rule or f["rule"] == rule))

    def show(fl: list[dict], header: bool) -> None:
        fl = [f for f in fl if keep(f)]
        if as_json:
            for f in fl:
                click.echo(json.dumps(f))
            return
        if header:
            click.echo(f"{'SEGMENT':<10} {'DIR':<7} {'PROTO':<6} {'SOURCE':<28} {'DESTINATION':<28} "
                       f"{'FROM':<12} {'TO':<12} {'VERDICT':<7} {'REASON':<16} {'RULE':<20} {'PKTS':>6}  SNI")
        for f in fl:
            click.echo(f"{f['segment']:<10} {f['direction']:<7} {f['proto']:<6} {f['src'] + ':' + str(f['sport']):<28} "
                       f"{f['dst'] + ':' + str(f['dport']):<28} {f['src_app']:<12} {f['dst_app']:<12} "
                       f"{f['verdict']:<7} {f['reason']:<16} {f['rule']:<20} {f['packets']:>6}  {f.get('sni') or ''}")

    req_limit = limit or 1_000_000
    reply = _agent_request(state_dir, "flows", limit=req_limit)
    if not reply.get("ok"):
        _fail(reply.get("error", "flows failed"))
    show(reply["flows"], True)
    if not follow:
        return
    for f in reply["flows"]:
        seen[(f["segment"], f["proto"], f["src"], f["sport"], f["dst"], f["dport"])] = f["generation"]
    try:
        while True:
            time.sleep(interval)
            reply = _agent_request(state_dir, "flows", limit=req_limit)
            new = []
            for f in reversed(reply.get("flows", [])):
                k = (f["segment"], f["proto"], f["src"], f["sport"], f["dst"], f["dport"])
                if seen.get(k) != f["generation"]:
                    seen[k] = f["generation"]
                    new.append(f)
            show(new, False)
    except KeyboardInterrupt:
        pass


@main.command()
@STATE_DIR_OPT
@JSON_OPT
@click.option("--follow", is_flag=True, help="Keep printing requests as the verifier decides them.")
@click.option("--limit", default=50, show_default=True, help="Most recent requests to show.")
@click.option("--verdict", type=click.Choice(["allow", "deny", "audit", "error"]), help="Only this verdict.")
def requests(state_dir: str, as_json: bool, follow: bool, limit: int, verdict: str | None) -> None:
    """HTTP requests: those the L7 verifier decided, and those between two gateways, per hop.

    Verifier lines: time, verdict, status, method, host and path, source app ->
    destination app, the rule, bytes, the latency split (decision / upstream
    connect / upstream first byte / total, in ms) and the reason. Requests
    between two gateways (the fabric, measured in the kernel; TLS inferred
    from TCP timing, mode tls_inferred): the client's total response time and
    its parts: ingress, backbone, app VPC, app (docs/visibility.md). The agent
    keeps the last 2000 of each. --json: one JSON object per line.
    """
    def show(reply: dict, header: bool) -> None:
        render.show_requests(reply.get("requests", []), reply.get("hop_requests", []), header, as_json, verdict,
                             click.echo)

    reply = _agent_request(state_dir, "requests", limit=limit)
    if not reply.get("ok"):
        _fail(reply.get("error", "requests failed"))
    show(reply, True)
    seq, hop_seq = reply.get("seq", 0), reply.get("hop_seq", 0)
    try:
        while follow:
            time.sleep(0.5)
            reply = _agent_request(state_dir, "requests", after=seq, hop_after=hop_seq, limit=0)
            if not reply.get("ok"):  # the agent answered, but with an error: say it, don't poll on
                _fail(reply.get("error", "requests failed"))
            seq, hop_seq = reply.get("seq", seq), reply.get("hop_seq", hop_seq)
            show(reply, False)
    except KeyboardInterrupt:
        pass


# -------------------------------------------------------------------- down
@main.command()
@STATE_DIR_OPT
@JSON_OPT
def down(state_dir: str, as_json: bool) -> None:
    """Stop the agent, detach every program, remove pins and plumbing."""
    if os.geteuid() != 0:
        _fail("down needs root")
    from bulkhead.daemon import teardown

    report = teardown.down(state_dir)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in report["actions"] or ["nothing to remove"]:
            click.echo(line)
    sys.exit(0 if not report["errors"] else 1)


# -------------------------------------------------------------------- demo
@main.command()
@click.option("--fleet", is_flag=True,
              help="Two gateways following one policy published through etcd (make demo-fleet).")
@click.option("--fabric", is_flag=True, help="An app reaching an app behind another gateway (make demo-fabric).")
def demo(fleet: bool, fabric: bool) -> None:
    """Build a demo topology in network namespaces, enforce policies/demo.yaml
    with real traffic, show who reached what and why, then clean up."""
    if fleet and fabric:
        _fail("--fleet and --fabric are two demos: pick one", 2)
    if os.geteuid() != 0:
        _fail("the demo needs root (it creates network namespaces)")
    import importlib

    sys.exit(importlib.import_module("bulkhead.lab.demo" + ("_fabric" if fabric else "_fleet" if fleet else "")).main())


# ---------------------------------------------------------------- verifier
@main.group()
def verifier() -> None:
    """The L7 (HTTP) verifier on its own, without a gateway."""


@verifier.command("serve")
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Where clients connect (IPv6 as [ADDR]:PORT; port 0 picks one).")
@click.option("--upstream", required=True, metavar="HOST:PORT", help="The origin allowed requests go to.")
@click.option("--policy", "policy_file", required=True, type=click.Path(dir_okay=False),
              help="Policy file holding the rule.")
@click.option("--rule", "rules", required=True, multiple=True, metavar="NAME",
              help="L7 rule whose http: entries decide each request (repeatable: any rule may allow).")
@click.option("--tls-app", metavar="APP",
              help="Terminate TLS with APP's tls cert/key (re-encrypting to the upstream, verified with "
                   "its tls ca); plain HTTP is still served on the same port.")
@JSON_OPT
@click.option("--quiet", is_flag=True, help="No line per request (benchmarks).")
@click.option("--max-connections", default=10000, show_default=True, help="Per process; beyond: reset at once.")
@click.option("--procs", default=1, show_default=True, type=click.IntRange(1, 64), help="Processes (SO_REUSEPORT).")
def verifier_serve(listen, upstream, policy_file, rules, tls_app, as_json, quiet, max_connections, procs) -> None:
    """Check every request to --listen against a policy rule; forward the allowed ones.

    A fixed-upstream reverse proxy running the gateway verifier's engine: the
    same HTTP/1.1 framing checks (ambiguous requests are refused, never passed
    on), the same matching of the rule's http: entries (methods, paths, hosts,
    headers, JWTs, API keys), 403 with `denied by rule R: reason` for the rest.
    If the rule's destination app has hostnames, the Host must name one of them.
    Prints one line per request (--json: one JSON record). Ctrl-C stops.

    \b
    Example:
      bulkhead verifier serve --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000 \\
          --policy policies/example.yaml --rule web-reads-catalog
      curl -i http://127.0.0.1:8080/items      # allowed: the origin answers
      curl -i -X DELETE http://127.0.0.1:8080/items   # 403 denied by rule ...

    Exit codes: 0 stopped, 1 cannot listen, 2 bad input (invalid policy,
    unknown rule, a rule without http:).
    """
    from bulkhead.verifier.standalone import StandaloneError, serve
    try:
        code = serve(listen, upstream, policy_file, list(rules), tls_app, as_json, quiet, max_connections, procs=procs)
    except StandaloneError as e:
        _fail(str(e), 2)
    sys.exit(code)


# --------------------------------------------------------------------- top
@main.command()
@STATE_DIR_OPT
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between refreshes (rates are measured over it).")
@click.option("--once", is_flag=True,
              help="Print one frame and exit (samples twice, --interval apart, for the rates; "
                   "--interval 0: one sample, no rates).")
@JSON_OPT
@click.option("--rows", default=10, show_default=True, type=click.IntRange(min=1), help="Rows per table.")
def top(state_dir: str, interval: float, once: bool, as_json: bool, rows: int) -> None:
    """Live view of the busiest app pairs, denials and hop latencies.

    \b
    Refreshes every --interval seconds until Ctrl-C:
      - packets and bytes per second by verdict (pass, drop, reject, and
        audit: would-be denials that were passed), new flows per second;
      - the busiest app pairs in the flow table: flows, verdicts, rules,
        bytes each way, bytes per second;
      - recent denials (drop/reject) from the flow log, and would-be denials
        (audit) in a panel of their own;
      - hop latency per app pair measured at the gateway (p50/p99/mean of
        server_rtt, client_rtt, server_time), and the L7 verifier's state.

    \b
    Examples:
      bulkhead top                       # live, until Ctrl-C
      bulkhead top --once                # one frame (takes --interval seconds)
      bulkhead top --once --json | jq '.pairs[0]'
    With --json and no --once, one JSON frame per line per refresh.
    """
    from bulkhead.cli import top as top_mod

    try:
        sys.exit(top_mod.run(lambda op, **kw: wire.request(state_dir, op, **kw),
                             interval, once, as_json, rows))
    except wire.ControlError as e:
        _fail(str(e))
    except top_mod.TopError as e:
        _fail(str(e))
    except (OSError, ConnectionError) as e:
        _fail(f"control socket: {e}")


main.add_command(fleet.fleet)
main.add_command(fabric.fabric)


if __name__ == "__main__":
    main()
