"""`bulkhead fabric`: what the fabric makes of a policy (docs/fabric.md), without an agent.

Exit codes as everywhere: 0 ok, 2 bad input (an invalid policy).
"""
from __future__ import annotations

import json
import os
import sys

import click


def _wireguard_key(ctx, param, value):
    """`agent run --wireguard-key FILE`: handed to the agent (daemon.agent) as an absolute path."""
    os.environ["BULKHEAD_WIREGUARD_KEY"] = os.path.abspath(value) if value else ""
    return value


wireguard_key_option = click.option(
    "--wireguard-key", metavar="FILE", envvar="BULKHEAD_WIREGUARD_KEY", expose_value=False, callback=_wireguard_key,
    help="This gateway's WireGuard private key (base64, mode 0600), for a policy whose gateways have wireguard: "
         "(docs/fabric.md \"Encryption between gateways\"). Also $BULKHEAD_WIREGUARD_KEY.")


@click.group()
def fabric() -> None:
    """Service addresses, published names and routes (docs/fabric.md)."""


@fabric.command("names")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--segment", "segment", metavar="NAME", help="Only what this segment's clients resolve.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
def names(files: tuple[str, ...], segment: str | None, as_json: bool) -> None:
    """List the published names of FILEs: the app (or router) each belongs to, its service
    addresses, and the segments whose clients get them from the gateway's DNS (every other
    segment gets NXDOMAIN).

    \b
    Service addresses are those a first apply would allocate; a running agent keeps the ones
    it already gave (`bulkhead status --json` shows them under dns).
    """
    from bulkhead.fabric.dns import Zone
    from bulkhead.policy import PolicyError, load_policy

    try:
        bundle, _ = load_policy(list(files))
    except PolicyError as e:
        click.echo(str(e))
        sys.exit(2)
    segs = [s["name"] for s in bundle.segments]
    if segment is not None and segment not in segs:
        click.echo(f"bulkhead: segment {segment!r} is not in the policy (segments: {', '.join(segs)})", err=True)
        sys.exit(2)
    zone = Zone(bundle)
    routes = {a["name"]: a.get("routes") for a in bundle.apps}
    rows = []
    for name, app in sorted([*zone.exact.items(), *((f"*.{k}", v) for k, v in zone.wild.items())]):
        seen_by = [s for s in segs if app in zone.visible.get(s, ())]
        if segment is not None and segment not in seen_by:
            continue
        rows.append({"name": name, "app": app, "service_addresses": bundle.vips.get(app, []),
                     "segments": seen_by, "routes": routes.get(app) or []})
    if as_json:
        click.echo(json.dumps({"names": rows, "dns": {s["name"]: s.get("dns", []) for s in bundle.segments
                                                      if s.get("dns")}}, indent=1))
        return
    if not rows:
        click.echo("no published names" + (f" that segment {segment} resolves" if segment else ""))
        return
    w = max(len(r["name"]) for r in rows)
    wa = max(len(r["app"]) for r in rows)
    for r in rows:
        vips = ", ".join(r["service_addresses"]) or "-"
        click.echo(f"{r['name']:<{w}}  {r['app']:<{wa}}  {vips}  resolved in: {', '.join(r['segments']) or 'none'}")
        for route in r["routes"]:
            what = f"sni {route['name']}" if route["kind"] == "sni" else f"host {route['name']}{route['path'] or ''}"
            click.echo(f"{'':<{w}}    route {what} -> {route['to']}")
