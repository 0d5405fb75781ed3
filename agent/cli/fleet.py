"""`bulkhead fleet`: keygen, publish and status for a fleet of gateways that follow one policy.

Exit codes as everywhere: 0 ok, 1 runtime failure (etcd unreachable, --wait timed out),
2 bad input (usage, invalid policy, unreadable key, bad URL).
"""
from __future__ import annotations

import datetime
import json
import sys

import click
from bulkhead.fleet.store import ENV_VAR

ETCD_OPT = click.option(
    "--etcd", "etcd", envvar=ENV_VAR, required=True, metavar="URL[,URL...]",
    help=f"etcd client URL(s), comma-separated for a cluster (default: ${ENV_VAR}).")
JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


def _fail(msg: str, code: int = 1, as_json: bool = False, **extra) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": msg, **extra}))
    click.echo(f"bulkhead: {msg}", err=True)
    sys.exit(code)


def _store(etcd: str, as_json: bool = False):
    from bulkhead.fleet.store import Store, parse_urls

    try:
        return Store(parse_urls(etcd))
    except ValueError as e:
        _fail(str(e), 2, as_json)


@click.group()
def fleet() -> None:
    """One signed policy for every gateway, distributed through etcd.

    \b
    The operator signs and publishes; every gateway's agent
    (`bulkhead agent run --etcd URL --gateway NAME --trust FILE.pub`)
    verifies, applies and acknowledges:
      bulkhead fleet keygen --key /etc/bulkhead/fleet.key      # once; ship fleet.key.pub to gateways
      bulkhead fleet publish policy.yaml --etcd http://etcd1:2379 --key /etc/bulkhead/fleet.key
      bulkhead fleet status --etcd http://etcd1:2379 --wait 7  # until every live gateway applied 7
      bulkhead fleet latency --etcd http://etcd1:2379          # HTTP response time per hop, fleet-wide
    --etcd also reads $BULKHEAD_ETCD; several comma-separated URLs name an etcd cluster.
    """


@fleet.command("keygen")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="Private key file to write (0600); the public key goes to FILE.pub.")
@click.option("--force", is_flag=True, help="Replace existing FILE and FILE.pub.")
@JSON_OPT
def keygen(key_path: str, force: bool, as_json: bool) -> None:
    """Make an Ed25519 signing key: FILE (private, 0600) and FILE.pub (public).

    Keep FILE with whoever publishes; give FILE.pub to every gateway
    (`agent run --trust FILE.pub`). Refuses to overwrite without --force: agents
    that trust the old key refuse everything signed with a new one.
    """
    from bulkhead.fleet.keys import FleetKeyError, key_id, load_public
    from bulkhead.fleet.keys import keygen as make

    try:
        priv, pub = make(key_path, force=force)
    except FleetKeyError as e:
        _fail(str(e), 2, as_json)
    kid = key_id(load_public(pub))
    if as_json:
        click.echo(json.dumps({"ok": True, "key": str(priv), "public_key": str(pub), "key_id": kid}))
    else:
        click.echo(f"wrote {priv} (private, 0600) and {pub} (public); key id {kid}")


@fleet.command("publish")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@ETCD_OPT
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="The private signing key (from `bulkhead fleet keygen`).")
@JSON_OPT
def publish(files: tuple[str, ...], etcd: str, key_path: str, as_json: bool) -> None:
    """Validate POLICY files, compile, sign and publish them as the next revision.

    \b
    Prints "revision N". The revision is above every revision published or
    applied before, so every gateway takes it. Exit 2 with FILE:LINE messages
    for an invalid policy (nothing is written), 2 for an unreadable key,
    1 if etcd is unreachable.
    """
    from bulkhead.fleet.keys import FleetKeyError, load_private
    from bulkhead.fleet.publish import previous_vips, publish_bundle
    from bulkhead.fleet.store import FleetStoreError
    from bulkhead.policy import PolicyError, load_policy

    store = _store(etcd, as_json)
    try:
        private_key, key_error = load_private(key_path), None
    except FleetKeyError as e:
        private_key, key_error = None, e  # reported after the policy's own errors
    try:  # published apps keep the service addresses the policy in the store gave them
        bundle, warnings = load_policy(list(files), previous_vips=previous_vips(store, private_key))
    except PolicyError as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "errors": [str(d) for d in e.errors]}))
        else:
            click.echo(str(e))
        click.echo("bulkhead: policy not published; nothing was written", err=True)
        sys.exit(2)
    if key_error is not None:
        _fail(f"{key_error}; nothing was written", 2, as_json)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    try:
        pub = publish_bundle(store, bundle, private_key, warnings)
    except FleetStoreError as e:
        _fail(f"{e}; nothing was written", 1, as_json)
    if as_json:
        click.echo(json.dumps({"ok": True, **pub.as_dict()}))
    else:
        click.echo(f"revision {pub.revision}")


def _when(t) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _render(st: dict) -> str:
    rev = st["revision"]
    lines = [f"revision {rev}" + ("" if st.get("policy_revision") in (None, rev)
                                  else f" (the policy key holds revision {st['policy_revision']})")]
    rows = [("GATEWAY", "ALIVE", "APPLIED", "STALE", "UPDATED", "STATE")]
    for g in st["gateways"]:
        applied = g["applied_revision"]
        if not g["reported"]:
            state = "never reported"
        elif g["error"]:
            state = f"error: {g['error']}"
        elif applied is not None and applied < rev:
            state = f"behind by {rev - applied}"
        else:
            state = "ok"
        if not g["alive"]:
            state = "NOT ALIVE" + (f"; {state}" if state != "ok" else "")
        rows.append((g["name"], "yes" if g["alive"] else "no", "-" if applied is None else str(applied),
                     "yes" if g["stale"] else "no", _when(g["updated"]), state))
    if len(rows) == 1:
        lines.append("no gateway has reported, and the policy names none")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(lines)


@fleet.command("status")
@ETCD_OPT
@JSON_OPT
@click.option("--wait", "wait_rev", type=click.IntRange(min=1), metavar="REV",
              help="Wait until every live gateway applied revision REV (exit 0), or exit 1 at --timeout.")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds --wait waits.")
def status(etcd: str, as_json: bool, wait_rev: int | None, timeout: float) -> None:
    """Every gateway: alive, the revision it applied, stale, its last error.

    \b
    Lists every gateway that reported, plus those the current policy names
    that never did. alive follows each agent's etcd lease: a dead agent shows
    "no" within its lease TTL (10 s). --wait REV exits 0 once every live gateway
    applied REV or later (and at least one is live), 1 at --timeout; without
    --wait the exit code is 0. Exit 1 if etcd is unreachable.
    """
    from bulkhead.fleet.status import fleet_status, wait_for
    from bulkhead.fleet.store import FleetStoreError

    store = _store(etcd, as_json)
    try:
        if wait_rev is None:
            ok, st = True, fleet_status(store)
        else:
            ok, st = wait_for(store, wait_rev, timeout)
    except FleetStoreError as e:
        _fail(str(e), 1, as_json)
    if as_json:
        out = dict(st)
        if wait_rev is not None:
            out["wait"] = {"revision": wait_rev, "done": ok}
        click.echo(json.dumps(out))
    else:
        click.echo(_render(st))
        if wait_rev is not None and not ok:
            live = [g for g in st["gateways"] if g["alive"]]
            behind = [g["name"] for g in live if (g["applied_revision"] or 0) < wait_rev]
            why = (f"behind: {', '.join(behind)}" if live else "no live gateway")
            click.echo(f"bulkhead: not every live gateway applied revision {wait_rev} within "
                       f"{timeout:g} s ({why})", err=True)
    sys.exit(0 if ok else 1)


def _render_latency(out: dict) -> str:
    from bulkhead.cli.top import HOP_COLS, hop_rows

    def cell(d: dict | None) -> str:
        d = d or {}
        return "/".join("-" if d.get(k) is None else f"{d[k]:.1f}" for k in ("p50_ms", "p99_ms"))

    lines = []
    rows = [("FROM", "TO", "MODE", "REQUESTS", *(c.upper() for c in HOP_COLS))]
    for r in hop_rows({"http_hops": out["latency"]}):
        rows.append((r["src_app"], r["dst_app"], r["mode"], str(r["count"]), *(cell(r.get(c)) for c in HOP_COLS)))
    if len(rows) == 1:
        lines.append("no request between gateways timed yet" if out["gateways"] else
                     "no gateway has published latency (fleet agents do every 10 s, once they timed a request)")
    else:
        lines.append("HTTP response time between gateways, per hop: p50/p99 ms")
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    if out["gateways"]:
        gw = ", ".join(f"{g['name']} ({_gw_note(g)})" for g in out["gateways"])
        lines.append(f"from: {gw}")
    return "\n".join(lines)


def _gw_note(g: dict) -> str:
    if g.get("error"):
        return f"error: {g['error']}"
    age = g.get("age_s")
    when = "?" if age is None else f"{age:.0f} s ago"
    return f"{g['requests']} requests, {when}" if g.get("used") else f"left out, {when}"


@fleet.command("latency")
@ETCD_OPT
@JSON_OPT
@click.option("--app", metavar="NAME", help="Only app pairs with NAME at either end.")
@click.option("--max-age", type=click.FloatRange(min=0), metavar="S",
              help="Leave out gateways that last published more than S seconds ago (a dead agent's numbers).")
def latency(etcd: str, as_json: bool, app: str | None, max_age: float | None) -> None:
    """HTTP response time per hop, per app pair, across every gateway: p50/p99.

    \b
    For requests between two gateways: total (what the client waited) and its
    parts ingress (client <-> its gateway), backbone (gateway <-> gateway),
    app_vpc (far gateway <-> app) and app (the app's own time), in ms, by mode
    (http, or tls_inferred for TLS the gateways don't decrypt). Each fleet agent
    publishes its histograms to /bulkhead/v1/gateways/NAME/latency every 10 s;
    they are summed here, since each request is counted once, at its client's
    gateway. Counts run from each agent's start. Exit 1 if etcd is unreachable.

    \b
    --json prints
      {"gateways": [{"name", "updated", "age_s", "requests", "used", "error"}],
       "latency": [{"src_app", "dst_app", "mode", "hop", "count",
                    "p50_ms", "p99_ms", "mean_ms"}]}
    """
    from bulkhead.fleet.latency import read
    from bulkhead.fleet.store import FleetStoreError
    from bulkhead.telemetry.hops import fleet_summary

    store = _store(etcd, as_json)
    try:
        docs = read(store)
    except FleetStoreError as e:
        _fail(str(e), 1, as_json)
    out = fleet_summary(docs, app=app, max_age=max_age)
    if as_json:
        click.echo(json.dumps({"ok": True, **out}))
    else:
        click.echo(_render_latency(out))
