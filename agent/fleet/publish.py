"""`bulkhead fleet publish`: validate, compile, seal, write the next revision.

The next revision is above everything the fleet has seen: max(the `revision` key, the
revision the envelope in `policy` claims, every gateway's applied_revision) + 1. So after a
store writer replays an old envelope into `policy` (agents refuse it), or a revision key is
reset, the operator's next publish is still above what every agent applied and goes through
everywhere. Envelope and revision are written in one transaction guarded by the `revision`
key's mod_revision: of two concurrent publishers one wins, the other re-reads and retries,
so no two publishes share a revision.
"""
from __future__ import annotations

import dataclasses
import json
import time

from bulkhead.fleet import envelope, keys
from bulkhead.fleet.store import (
    GATEWAYS_PREFIX,
    POLICY_KEY,
    REVISION_KEY,
    FleetStoreError,
    Store,
)
from bulkhead.policy import Bundle, load_policy

MAX_TRIES = 50  # concurrent publishers: each lost race costs one re-read


@dataclasses.dataclass
class Published:
    revision: int
    digest: str
    key_id: str
    envelope_bytes: int
    bundle_bytes: int
    gateways: list[str]
    warnings: list[str]
    tries: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _int(text: bytes | None) -> int:
    try:
        n = int((text or b"0").decode().strip() or 0)
    except (UnicodeDecodeError, ValueError):
        return 0  # a garbled key is only a floor; the other sources still count
    return max(n, 0)


def highest_seen(store: Store) -> tuple[int, int]:
    """(the highest revision the fleet has seen, the `revision` key's mod_revision to guard on)."""
    rev_value, rev_mod = store.get(REVISION_KEY)
    highest = _int(rev_value)
    env, _ = store.get(POLICY_KEY)
    if env is not None:
        highest = max(highest, envelope.peek_revision(env) or 0)
    for kv in store.get_prefix(GATEWAYS_PREFIX):
        if kv.key.endswith("/status"):
            try:
                applied = json.loads(kv.value).get("applied_revision")
            except (ValueError, AttributeError):
                continue
            if isinstance(applied, int) and not isinstance(applied, bool):
                highest = max(highest, applied)
    return highest, rev_mod


def publish_bundle(store: Store, bundle: Bundle, private_key, warnings: list[str] | None = None
                   ) -> Published:
    """Seal `bundle` at the next revision and write it; FleetStoreError if etcd is unreachable."""
    data = bundle.pack()
    for tries in range(1, MAX_TRIES + 1):
        highest, guard = highest_seen(store)
        revision = highest + 1
        sealed = envelope.seal(data, revision, private_key, published_at=time.time())
        try:
            written = store.put_if_unchanged(REVISION_KEY, guard,
                                             [(REVISION_KEY, str(revision)), (POLICY_KEY, sealed)])
        except FleetStoreError as e:
            if "request is too large" in str(e):
                raise FleetStoreError(f"{e}: the envelope is {len(sealed)} bytes, above this etcd's "
                                      "--max-request-bytes (1.5 MiB by default); raise it on every "
                                      "member (see docs/fleet.md)") from None
            raise
        if written:
            opened = envelope.open_verified(sealed, private_key.public_key())
            return Published(revision=revision, digest=opened.digest, key_id=opened.key_id,
                             envelope_bytes=len(sealed), bundle_bytes=len(data),
                             gateways=list(bundle.gateways), warnings=list(warnings or []),
                             tries=tries)
    raise FleetStoreError(f"publish: lost the race for the next revision {MAX_TRIES} times "
                          "(that many concurrent publishers?)")


def previous_vips(store: Store, private_key) -> dict | None:
    """The service addresses (`vips`) of the policy in the store, if it carries this key's
    signature: the next publish keeps them (docs/fabric.md). None when there is none to keep
    (nothing published, another key, etcd unreachable: the publish itself then says so)."""
    if private_key is None:
        return None
    try:
        env, _ = store.get(POLICY_KEY)
        if env is None:
            return None
        return Bundle.unpack(envelope.open_verified(env, private_key.public_key()).bundle).vips or None
    except (envelope.EnvelopeError, ValueError, FleetStoreError):
        return None  # allocate afresh (name-derived places)


def publish_files(store: Store, files: list[str], key_path: str) -> Published:
    """Validate and compile `files`, load the key, publish. PolicyError (nothing written) for an
    invalid policy, FleetKeyError for the key, FleetStoreError for etcd. Published apps keep the
    service addresses the current policy in the store gave them."""
    try:
        private_key = keys.load_private(key_path)
    except keys.FleetKeyError:
        load_policy(list(files))  # an invalid policy is reported first, as before
        raise
    bundle, warnings = load_policy(list(files), previous_vips=previous_vips(store, private_key))
    return publish_bundle(store, bundle, private_key, warnings)
