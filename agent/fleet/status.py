"""`bulkhead fleet status`: every gateway, whether it is alive, what it applied, why it refused.

A gateway is listed if it has a status key, an alive key, or the current policy names it (one
that never reported shows alive false, applied_revision null). `alive` is the lease-bound
alive key: it goes within the agent's lease TTL of the agent dying. The policy's gateway names
are read from the envelope without verifying it (this command holds no trusted key; the names
only decide which rows to show).
"""
from __future__ import annotations

import dataclasses
import json
import time

import msgpack
from bulkhead.fleet.envelope import peek_bundle, peek_revision
from bulkhead.fleet.store import GATEWAYS_PREFIX, POLICY_KEY, REVISION_KEY, Store

POLL = 0.2  # seconds between reads while --wait waits


@dataclasses.dataclass
class GatewayStatus:
    name: str
    alive: bool = False
    applied_revision: int | None = None
    digest: str | None = None
    stale: bool = False
    error: str | None = None
    updated: float | None = None
    agent: str | None = None
    in_policy: bool = False
    reported: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _policy_gateways(raw: bytes | None) -> tuple[int | None, list[str]]:
    """(the envelope's revision, the gateways its bundle names), unverified; (None, []) if unreadable."""
    if raw is None:
        return None, []
    try:
        packed = peek_bundle(raw)
        bundle = msgpack.unpackb(packed, raw=False, strict_map_key=False) if packed else {}
        names = [str(n) for n in bundle.get("gateways") or []]
        return peek_revision(raw), names
    except Exception:  # anything a store writer may have put there
        return None, []


def _revision(text: bytes | None) -> int:
    try:
        return int((text or b"0").decode().strip() or 0)
    except (UnicodeDecodeError, ValueError):
        return 0


def fleet_status(store: Store) -> dict:
    """{"revision": N, "policy_revision": M|None, "gateways": [GatewayStatus.as_dict(), ...]}."""
    rev_raw, _ = store.get(REVISION_KEY)
    pol_raw, _ = store.get(POLICY_KEY)
    policy_rev, names = _policy_gateways(pol_raw)
    gws: dict[str, GatewayStatus] = {}
    for kv in store.get_prefix(GATEWAYS_PREFIX):
        name, _, leaf = kv.key[len(GATEWAYS_PREFIX):].rpartition("/")
        if not name:
            continue
        g = gws.setdefault(name, GatewayStatus(name))
        if leaf == "alive":
            g.alive = True
        elif leaf == "status":
            g.reported = True
            try:
                d = json.loads(kv.value)
            except ValueError:
                g.error = "status key is not JSON"
                continue
            if not isinstance(d, dict):
                g.error = "status key is not a JSON object"
                continue
            rev = d.get("applied_revision")
            g.applied_revision = rev if isinstance(rev, int) and not isinstance(rev, bool) else None
            g.digest = d.get("digest")
            g.stale = bool(d.get("stale", False))
            g.error = d.get("error")
            g.updated = d.get("updated")
            g.agent = d.get("agent")
    for n in names:
        gws.setdefault(n, GatewayStatus(n)).in_policy = True
    return {"revision": _revision(rev_raw), "policy_revision": policy_rev,
            "gateways": [gws[n].as_dict() for n in sorted(gws)]}


def done(status: dict, revision: int) -> bool:
    """Every live gateway applied >= revision, and at least one is live (no agent = not done)."""
    live = [g for g in status["gateways"] if g["alive"]]
    return bool(live) and all((g["applied_revision"] or 0) >= revision for g in live)


def wait_for(store: Store, revision: int, timeout: float) -> tuple[bool, dict]:
    """Read status until done(revision) or timeout; (done, the last status)."""
    deadline = time.monotonic() + timeout
    while True:
        st = fleet_status(store)
        if done(st, revision):
            return True, st
        left = deadline - time.monotonic()
        if left <= 0:
            return False, st
        time.sleep(min(POLL, left))
