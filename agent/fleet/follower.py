"""The agent side of the fleet: watch etcd, verify, apply, acknowledge, keep the last verified bundle.

    f = Follower(["http://etcd:2379"], "gw-east", "fleet.key.pub", "/run/bulkhead", apply)
    first = f.initial(wait=30)        # cached verified envelope, else etcd's (retried until `wait`)
    agent.start(first.bundle)         # the daemon starts its data path with it
    f.applied(first)                  # cache it, acknowledge
    f.start()                         # thread: get + watch, f.apply for every newer envelope

Nothing is applied that the trusted key did not sign (envelope.open_verified before the bundle is
unpacked), nor a revision at or below the applied one (a replayed envelope must not roll the
gateway back). A refusal keeps the running policy and is acknowledged with its reason.
STATE_DIR/fleet/last.envelope holds the raw envelope of the last successful apply (written
atomically, 0600, only after the apply succeeded); an agent restarted while etcd is away comes
up from it, verified again, and says it runs stale until etcd confirms.

etcd away: the data path keeps enforcing; the thread reconnects with backoff (0.5 s .. 5 s),
then re-gets and re-watches (no restart). Acknowledgement: the persistent status key (JSON, on
every change) and the alive key bound to a lease (TTL BULKHEAD_FLEET_TTL, default 10 s; kept alive
every TTL/3): an agent that dies loses its alive key within the TTL.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bulkhead.fleet import keys
from bulkhead.fleet import store as fstore
from bulkhead.fleet.envelope import EnvelopeError, open_verified
from bulkhead.policy.bundle import Bundle

log = logging.getLogger("bulkhead.fleet")

DEFAULT_TTL = fstore.ALIVE_TTL  # seconds; the alive key outlives a dead agent by at most this
BACKOFF_MIN, BACKOFF_MAX = 0.5, 5.0
CACHE_NAME = "last.envelope"


def lease_ttl() -> int:
    """BULKHEAD_FLEET_TTL (seconds, >= 2; tests make it short), else DEFAULT_TTL."""
    return fstore.env_seconds("BULKHEAD_FLEET_TTL", DEFAULT_TTL, whole=True, lo=2)


class _Same(Exception):
    """The envelope is the one applied (a re-get after a reconnect): nothing to do, no refusal."""


class FollowerError(RuntimeError):
    """The agent can't start following: no verified policy to start from (exit 1)."""


@dataclasses.dataclass
class Candidate:
    """A verified envelope cut down to this gateway, not applied yet."""

    revision: int
    digest: str
    bundle: Bundle  # for_gateway(name) of the envelope's bundle
    raw: bytes  # the envelope as stored, for the cache
    cached: bool = False  # came from STATE_DIR/fleet, not from etcd


class Follower:
    def __init__(self, store_urls: list[str], gateway: str,
                 trust_path: str | os.PathLike | list[str | os.PathLike],
                 state_dir: str | os.PathLike, apply: Callable[[Bundle, int], None],
                 ttl: int | None = None):
        self.urls = list(store_urls)
        self.gateway = gateway
        paths = trust_path if isinstance(trust_path, (list, tuple)) else [trust_path]
        if not paths:
            raise ValueError("the fleet needs at least one trusted key (--trust FILE.pub)")
        # Several during a key rotation: envelopes signed by any of them are accepted.
        self.public_keys = [keys.load_public(p) for p in paths]  # FleetKeyError: a bad --trust stops the start
        self.key_id = ",".join(keys.key_id(k) for k in self.public_keys)
        self.dir = Path(state_dir) / "fleet"
        self.apply_fn = apply
        self.ttl = lease_ttl() if ttl is None else ttl
        self.lock = threading.Lock()
        self.applied_revision = 0
        self.digest: str | None = None
        self.stale = True  # until etcd confirmed what we run
        self.connected = False
        self.error: str | None = None
        self.etcd_error: str | None = None  # why etcd is away, while it is
        self.agent_id = f"{socket.gethostname()}/{os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cancel: Callable[[], None] | None = None
        self._store: fstore.Store | None = None
        self._lease = None
        self.latency = None  # fleet.latency.Publisher: the agent's per-hop histograms, put while connected

    def publish_latency(self, source: Callable[[], list[dict]]) -> None:
        """Put `source()` (hops.HopLog.export) to this gateway's latency key, from the keepalive
        thread, every fleet.latency.publish_interval() s while connected (ValueError: a bad interval)."""
        from bulkhead.fleet.latency import Publisher

        self.latency = Publisher(self.gateway, source, self.agent_id)

    # ------------------------------------------------------------ verify
    def check(self, raw: bytes, cached: bool = False) -> Candidate:
        """Verify `raw` and cut it to this gateway; EnvelopeError / ValueError say why not."""
        sealed = open_verified(raw, self.public_keys)  # signature first: nothing unsigned is unpacked
        if sealed.revision == self.applied_revision and sealed.digest == self.digest:
            raise _Same()
        if sealed.revision <= self.applied_revision:
            raise EnvelopeError("replay", f"revision {sealed.revision} is not above the applied "
                                f"{self.applied_revision} (replay?)")
        try:
            bundle = Bundle.unpack(sealed.bundle)
        except Exception as e:  # signed but unreadable: a publisher of another version
            raise EnvelopeError("bundle", f"revision {sealed.revision}: bundle unreadable: {e}") from None
        try:
            mine = bundle.for_gateway(self.gateway)
        except ValueError as e:
            raise EnvelopeError("gateway", f"revision {sealed.revision}: {e}") from None
        return Candidate(sealed.revision, sealed.digest, mine, bytes(raw), cached)

    def cached(self) -> Candidate | None:
        """STATE_DIR/fleet/last.envelope, verified again (never trusted as written)."""
        path = self.dir / CACHE_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("fleet: cannot read %s: %s", path, e)
            return None
        try:
            return self.check(raw, cached=True)
        except (EnvelopeError, ValueError) as e:
            log.error("fleet: %s refused, not used: %s", path, e)
            return None

    # ------------------------------------------------------------- start
    def initial(self, wait: float) -> Candidate:
        """What the agent starts with: the cached envelope, else etcd's, retried for `wait` s."""
        c = self.cached()
        if c is not None:
            log.info("fleet: starting from %s (revision %d), stale until etcd confirms",
                     self.dir / CACHE_NAME, c.revision)
            return c
        deadline = time.monotonic() + wait
        delay, why = BACKOFF_MIN, "not tried"
        while True:
            try:
                raw, _ = self._connect().get(fstore.POLICY_KEY)
                if raw is None:
                    why = f"etcd at {', '.join(self.urls)} has no policy yet (publish one with `bulkhead fleet publish`)"
                else:
                    return self.check(raw)
            except fstore.FleetStoreError as e:
                why = f"etcd unreachable at {', '.join(self.urls)} ({e})"
                self._store = None
            except (EnvelopeError, ValueError) as e:
                why = f"the policy in etcd is refused: {e}"
                self._note_refusal(str(e))
            if time.monotonic() + delay > deadline:
                raise FollowerError(f"no verified policy in {self.dir} and {why}")
            log.warning("fleet: waiting for a policy: %s; retry in %.1fs", why, delay)
            if self._stop.wait(delay):
                raise FollowerError("stopped while waiting for a policy")
            delay = min(BACKOFF_MAX, delay * 2)

    def applied(self, c: Candidate) -> None:
        """`c` is enforced now: keep it (cache), remember it, acknowledge."""
        self._write_cache(c.raw)
        with self.lock:
            self.applied_revision, self.digest = c.revision, c.digest
            self.error = None
            # A cached envelope is what we ran before; only etcd says it is still current.
            self.stale = c.cached or not self.connected
        log.info("fleet: applied revision %d (%s)%s", c.revision, c.digest[:12], " (stale)" if self.stale else "")
        self._ack()

    def _write_cache(self, raw: bytes) -> None:
        """The raw envelope to STATE_DIR/fleet/last.envelope: 0600 from the start, renamed into place."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.dir / f".{CACHE_NAME}.{os.getpid()}"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / CACHE_NAME)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following; the alive key goes with the lease (at once if etcd answers)."""
        self._stop.set()
        cancel = self._cancel
        if cancel:
            try:
                cancel()
            except Exception as e:  # the stream may already be gone
                log.debug("fleet: watch cancel: %s", e)
        if self._thread:
            self._thread.join(timeout=5)
        lease, store = self._lease, self._store
        if lease is not None and store is not None:
            try:
                store.revoke(lease)
            except Exception as e:
                log.debug("fleet: lease revoke: %s", e)

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        with self.lock:
            return {"etcd": self.urls, "gateway": self.gateway, "connected": self.connected,
                    "revision": self.applied_revision, "digest": self.digest, "stale": self.stale,
                    "error": self.error, "etcd_error": self.etcd_error, "key_id": self.key_id,
                    "latency_error": self.latency.error if self.latency else None}

    def _ack_doc(self) -> dict:
        with self.lock:
            return {"name": self.gateway, "applied_revision": self.applied_revision, "digest": self.digest,
                    "stale": self.stale, "error": self.error, "updated": time.time(), "agent": self.agent_id}

    def _ack(self) -> None:
        """The status key; a failure is only logged (the next change or reconnect writes it)."""
        st = self._store
        if st is None or not self.connected:
            return
        try:
            st.put(fstore.status_key(self.gateway), json.dumps(self._ack_doc()).encode())
        except fstore.FleetStoreError as e:
            log.warning("fleet: acknowledgement not written: %s", e)

    def start_failed(self, why: str) -> None:
        """The agent could not start on the policy it had: put the reason in this gateway's status
        key (best effort), so `fleet status` shows it rather than an old acknowledgement. What a
        previous agent acknowledged as applied stays there: its programs still enforce it."""
        self._note_refusal(f"agent start failed: {why}")
        try:
            st = self._store or self._connect()
            raw, _ = st.get(fstore.status_key(self.gateway))
            doc = json.loads(raw) if raw else self._ack_doc()
            doc.update(error=self.error, updated=time.time(), agent=self.agent_id)
            st.put(fstore.status_key(self.gateway), json.dumps(doc).encode())
        except Exception as e:  # noqa: BLE001 -- etcd away too: the journal has it
            log.warning("fleet: the start failure was not written to etcd: %s", e)

    def _note_refusal(self, why: str) -> None:
        with self.lock:
            self.error = why
        log.error("fleet: refused: %s; revision %d stays in force", why, self.applied_revision)

    # ------------------------------------------------------------ follow
    def offer(self, raw: bytes | None) -> bool:
        """An envelope from etcd: apply it if verified and newer; True if applied."""
        if raw is None:  # deleted: keep enforcing what we have
            log.warning("fleet: the policy key was deleted; revision %d stays in force", self.applied_revision)
            return False
        try:
            c = self.check(raw)
        except _Same:
            return False
        except (EnvelopeError, ValueError) as e:
            self._note_refusal(str(e))
            self._ack()
            return False
        try:
            self.apply_fn(c.bundle, c.revision)
        except Exception as e:  # the data path refused it: the old policy is still in force
            self._note_refusal(f"revision {c.revision}: apply failed: {e}")
            self._ack()
            return False
        self.applied(c)
        return True

    def _connect(self) -> fstore.Store:
        if self._store is None:
            self._store = fstore.Store(self.urls)
        return self._store

    def _run(self) -> None:
        delay = BACKOFF_MIN
        while not self._stop.is_set():
            trace = False
            try:
                self._follow()
                why = "the watch ended"
            except fstore.FleetStoreError as e:
                why = str(e)
            except Exception as e:  # noqa: BLE001 -- never let the follower thread die
                why, trace = f"{type(e).__name__}: {e}", True
            if self._stop.is_set():
                return
            with self.lock:
                if self.connected:  # it was up, then went away: back off afresh
                    delay = BACKOFF_MIN
                self.connected = False
                self.stale = True
                self.etcd_error = why
            self._cancel = None
            log.warning("fleet: etcd unreachable (%s); enforcing revision %d, retry in %.1fs",
                        why, self.applied_revision, delay, exc_info=trace)
            if self._stop.wait(delay):
                return
            delay = min(BACKOFF_MAX, delay * 2)

    def _follow(self) -> None:
        st = self._connect()
        self._lease = st.lease(self.ttl)
        st.put(fstore.alive_key(self.gateway), self.agent_id.encode(), lease=self._lease)
        raw, _, rev = st.get_rev(fstore.POLICY_KEY)
        # Watch before acting on the get: an event after `rev` is never missed. From the store's
        # revision at the read, not the key's mod_revision: that one may be compacted away already.
        events, cancel = st.watch(fstore.POLICY_KEY, start_revision=rev + 1)
        self._cancel = cancel
        with self.lock:
            self.connected = True
            self.etcd_error = None
        log.info("fleet: connected to etcd at %s", ", ".join(self.urls))
        keeper = threading.Thread(target=self._keepalive, args=(st, self._lease, cancel),
                                  name="fleet-lease", daemon=True)
        keeper.start()
        if raw is not None:
            self.offer(raw)  # refused or not newer: the refusal (if any) is in the status
        with self.lock:
            self.stale = False  # etcd answered: what we enforce is the newest we accept
        self._ack()
        try:
            for ev in events:
                if self._stop.is_set():
                    break
                self.offer(ev.value if ev.type != "DELETE" else None)
        finally:
            cancel()
        if not self._stop.is_set():
            raise fstore.FleetStoreError(f"the watch on etcd at {', '.join(self.urls)} ended")

    def _keepalive(self, st, lease, cancel) -> None:
        """Refresh the lease every TTL/3 (a failure ends the watch, so _run reconnects); between
        refreshes, the latency histograms when due."""
        pub = self.latency
        wake = self.ttl / 3 if pub is None else min(self.ttl / 3, pub.interval)
        next_refresh = time.monotonic() + self.ttl / 3
        while not self._stop.wait(wake):
            if self._cancel is not cancel:
                return
            if pub is not None:
                try:
                    pub.maybe_publish(st)
                except Exception as e:  # noqa: BLE001 -- the source failed: never the lease's problem
                    log.warning("fleet: latency not published: %s", e)
            if time.monotonic() < next_refresh:
                continue
            next_refresh = time.monotonic() + self.ttl / 3
            try:
                if st.refresh(lease) < 0:
                    raise fstore.FleetStoreError(f"lease {lease:x} expired")
            except Exception as e:
                log.warning("fleet: lease keepalive failed (%s): reconnecting", e)
                cancel()
                return
