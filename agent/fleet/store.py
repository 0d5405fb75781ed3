"""etcd through its JSON gateway (etcd3gw): the fleet's key layout, reads, writes, leases, watches.

Key layout (all under PREFIX):
    policy                  the current signed envelope (bytes)
    revision                decimal text: the highest revision ever published
    gateways/NAME/status    JSON, persistent: what gateway NAME applied, or why it refused
    gateways/NAME/alive     bound to the agent's lease: present = the agent is alive
    gateways/NAME/latency   JSON, persistent: the gateway's per-hop request histograms (fleet/latency.py)

`Store(urls)` takes one URL per cluster member and fails over between them: a request that
can't connect to one member goes to the next, and the member that answered is used first
from then on. Only "no member answered" is a FleetStoreError naming every URL; anything else
etcd says is a FleetStoreError with etcd's message.

etcd3gw's own watch hides a broken stream (its iterator then waits forever), so `watch` reads
the gateway's stream itself: the iterator raises FleetStoreError when the stream ends without
a cancel, and WatchCompacted when the start revision is gone (re-read, then watch again).
"""
from __future__ import annotations

import base64
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as gw_exc
from etcd3gw.client import Etcd3Client

PREFIX = "/bulkhead/v1/"
POLICY_KEY = PREFIX + "policy"
REVISION_KEY = PREFIX + "revision"
GATEWAYS_PREFIX = PREFIX + "gateways/"
ENV_VAR = "BULKHEAD_ETCD"
API_PATH = "/v3/"  # etcd >= 3.4 (Debian 12 ships 3.4.23); saves etcd3gw's /version discovery
# etcd errors that are one member's trouble (cut off from the leader, no quorum on its side):
# the request is tried on the next member.
MEMBER_TROUBLE = ("no leader", "request timed out", "leader changed", "not capable", "stopped")
ALIVE_TTL = 10  # seconds: the agent's lease; keepalive every ~TTL/3


def env_seconds(name: str, default, whole: bool = False, lo: float = 0, hi: float | None = None):
    """A number of seconds from the environment variable `name` (unset or empty: `default`);
    ValueError naming the variable for text that isn't one, or one outside [lo, hi]."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        v = int(raw) if whole else float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: not a {'whole ' if whole else ''}number of seconds") from None
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name}={raw!r}: " + (f"at least {lo:g} seconds" if hi is None
                                                 else f"between {lo:g} and {hi:g} seconds"))
    return v


def status_key(gateway: str) -> str:
    return f"{GATEWAYS_PREFIX}{gateway}/status"


def alive_key(gateway: str) -> str:
    return f"{GATEWAYS_PREFIX}{gateway}/alive"


def latency_key(gateway: str) -> str:
    return f"{GATEWAYS_PREFIX}{gateway}/latency"


class FleetStoreError(Exception):
    """etcd unreachable (the message names every URL tried) or an etcd error."""


class WatchCompacted(FleetStoreError):
    """The watch's start revision was compacted away: read the key again, watch from there."""

    def __init__(self, message: str, compact_revision: int):
        super().__init__(message)
        self.compact_revision = compact_revision


def parse_urls(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """"http://a:2379,http://b:2379" (or a list of such) -> ["http://a:2379", ...]; ValueError says why."""
    if text is None:
        text = ""
    parts = text if isinstance(text, (list, tuple)) else [text]
    urls: list[str] = []
    for part in parts:
        for u in str(part).split(","):
            u = u.strip().rstrip("/")
            if not u:
                continue
            s = urlsplit(u)
            try:
                port = s.port
            except ValueError:
                port = None
            if s.scheme not in ("http", "https") or not s.hostname or port is None \
                    or s.path or s.query or s.fragment or s.username:
                raise ValueError(f"bad etcd URL {u!r}: expected http(s)://HOST:PORT "
                                 "(comma-separated for a cluster)")
            if u not in urls:
                urls.append(u)
    if not urls:
        raise ValueError(f"no etcd URL given (--etcd URL[,URL...] or ${ENV_VAR})")
    return urls


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _prefix_end(prefix: str) -> bytes:
    b = bytearray(prefix.encode())
    b[-1] += 1  # keys are ASCII here; "/" + 1 = "0"
    return bytes(b)


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    type: str  # "PUT" or "DELETE"
    key: str
    value: bytes  # b"" for DELETE
    mod_revision: int


class Store:
    def __init__(self, urls: list[str] | str, timeout: float = 5):
        self.urls = parse_urls(urls)
        self.timeout = timeout
        self._clients = []
        for u in self.urls:
            s = urlsplit(u)
            self._clients.append(Etcd3Client(host=s.hostname, port=s.port, protocol=s.scheme,
                                             timeout=timeout, api_path=API_PATH))
        self._first = 0  # the member that answered last
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Store({','.join(self.urls)})"

    # ------------------------------------------------------------------ transport
    def _order(self) -> list[int]:
        n = len(self._clients)
        return [(self._first + i) % n for i in range(n)]

    def _unreachable(self, errors: list[str]) -> FleetStoreError:
        return FleetStoreError(f"etcd unreachable at {', '.join(self.urls)}: {'; '.join(errors)}")

    def _post(self, path: str, payload: dict) -> dict:
        errors = []
        for i in self._order():
            c = self._clients[i]
            try:
                out = c.post(c.get_url(path), json=payload)
            except (gw_exc.ConnectionFailedError, gw_exc.ConnectionTimeoutError) as e:
                errors.append(f"{self.urls[i]}: {_short(e)}")
                continue
            except gw_exc.Etcd3Exception as e:
                msg = _etcd_message(e)
                if any(m in msg for m in MEMBER_TROUBLE):
                    errors.append(f"{self.urls[i]}: {msg}")  # this member can't serve; another may
                    continue
                raise FleetStoreError(f"etcd at {self.urls[i]}: {msg}") from None
            self._first = i
            return out
        raise self._unreachable(errors)

    # ------------------------------------------------------------------ keys
    def _range(self, key: str, range_end: bytes | None = None) -> dict:
        payload: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            payload["range_end"] = _b64(range_end)
        return self._post("/kv/range", payload)

    @staticmethod
    def _kv(item: dict) -> KV:
        return KV(_unb64(item.get("key")).decode(), _unb64(item.get("value")),
                  int(item.get("mod_revision", 0)), int(item.get("lease", 0)))

    def get_rev(self, key: str) -> tuple[bytes | None, int, int]:
        """(value or None, the key's mod_revision (0 if absent), the store's revision at the read)."""
        out = self._range(key)
        rev = int(out.get("header", {}).get("revision", 0))
        kvs = out.get("kvs") or []
        if not kvs:
            return None, 0, rev
        kv = self._kv(kvs[0])
        return kv.value, kv.mod_revision, rev

    def get(self, key: str) -> tuple[bytes | None, int]:
        value, mod, _ = self.get_rev(key)
        return value, mod

    def get_prefix(self, prefix: str) -> list[KV]:
        out = self._range(prefix, _prefix_end(prefix))
        return [self._kv(i) for i in out.get("kvs") or []]

    def put(self, key: str, value: str | bytes, lease: int | None = None) -> int:
        """Write key; returns the store revision of the write."""
        payload: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            payload["lease"] = lease
        out = self._post("/kv/put", payload)
        return int(out.get("header", {}).get("revision", 0))

    def delete(self, key: str, prefix: bool = False) -> int:
        """Delete key (or every key under it with prefix=True); how many were deleted."""
        payload: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            payload["range_end"] = _b64(_prefix_end(key))
        out = self._post("/kv/deleterange", payload)
        return int(out.get("deleted", 0))

    def txn(self, payload: dict) -> dict:
        return self._post("/kv/txn", payload)

    def put_if_unchanged(self, guard_key: str, guard_mod_revision: int,
                         puts: list[tuple[str, str | bytes]]) -> bool:
        """In one transaction: if guard_key's mod_revision is still guard_mod_revision (0: the key
        does not exist), write every (key, value) of puts. True if written."""
        out = self.txn({
            "compare": [{"key": _b64(guard_key), "result": "EQUAL", "target": "MOD",
                         "mod_revision": guard_mod_revision}],
            "success": [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in puts],
            "failure": [],
        })
        return bool(out.get("succeeded", False))

    # ------------------------------------------------------------------ leases
    def lease(self, ttl: int = ALIVE_TTL) -> int:
        """A new lease of `ttl` seconds; its id."""
        out = self._post("/lease/grant", {"TTL": int(ttl), "ID": 0})
        if out.get("error"):
            raise FleetStoreError(f"lease grant: {out['error']}")
        return int(out["ID"])

    def refresh(self, lease_id: int) -> int:
        """Keep the lease alive; its TTL, or -1 if it already expired (grant a new one then)."""
        out = self._post("/lease/keepalive", {"ID": lease_id})
        return int(out.get("result", {}).get("TTL", -1))

    def revoke(self, lease_id: int) -> None:
        """End the lease now (its keys go at once); a lease already gone is fine."""
        try:
            self._post("/kv/lease/revoke", {"ID": lease_id})
        except FleetStoreError as e:
            if "not found" not in str(e):
                raise

    # ------------------------------------------------------------------ watch
    def watch(self, key: str, start_revision: int | None = None, prefix: bool = False
              ) -> tuple[Iterator[Event], Callable[[], None]]:
        """Events on `key` (or every key under it with prefix=True) from start_revision on.

        Start from the store revision of the read the watcher acts on, plus one (get_rev's third
        value): the key's own mod_revision may lie below a compaction made since, which other
        keys' writes make likely. Returns (iterator, cancel). The iterator ends after cancel(); it raises FleetStoreError
        if the stream breaks (etcd went away: reconnect and watch again from the last revision
        seen + 1) and WatchCompacted if start_revision is no longer kept.
        """
        create: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            create["range_end"] = _b64(_prefix_end(key))
        if start_revision:
            create["start_revision"] = start_revision
        errors = []
        resp = url = None
        for i in self._order():
            c = self._clients[i]
            try:
                # No read timeout: a quiet key sends nothing for as long as it stays quiet.
                r = c.session.post(c.get_url("/watch"), json={"create_request": create},
                                   stream=True, timeout=(self.timeout, None))
            except requests.exceptions.RequestException as e:
                errors.append(f"{self.urls[i]}: {_short(e)}")
                continue
            if r.status_code != 200:
                text = r.text
                r.close()
                raise FleetStoreError(f"etcd at {self.urls[i]}: watch refused: {r.status_code} {text[:200]}")
            resp, url = r, self.urls[i]
            self._first = i
            break
        if resp is None:
            raise self._unreachable(errors)
        cancelled = threading.Event()

        def cancel() -> None:
            if cancelled.is_set():
                return
            cancelled.set()
            # Unblock a reader sitting in recv() in another thread: shut the socket down (a
            # close() alone leaves that recv() waiting for etcd's next byte).
            _shutdown(resp)
            resp.close()

        def events() -> Iterator[Event]:
            try:
                for line in _lines(resp):
                    if cancelled.is_set():
                        return
                    try:
                        chunk = json.loads(line)
                    except ValueError:
                        raise FleetStoreError(f"etcd at {url}: watch stream: not JSON: {line[:200]!r}") from None
                    if "error" in chunk:
                        raise FleetStoreError(f"etcd at {url}: watch: {chunk['error']}")
                    res = chunk.get("result", {})
                    if int(res.get("compact_revision", 0) or 0):
                        raise WatchCompacted(f"etcd at {url}: revision {start_revision} compacted "
                                             f"(oldest kept {res['compact_revision']})",
                                             int(res["compact_revision"]))
                    if res.get("canceled"):
                        raise FleetStoreError(f"etcd at {url}: watch cancelled by etcd: "
                                              f"{res.get('cancel_reason', '?')}")
                    for ev in res.get("events") or []:
                        kv = ev.get("kv", {})
                        yield Event(ev.get("type", "PUT"), _unb64(kv.get("key")).decode(),
                                    _unb64(kv.get("value")), int(kv.get("mod_revision", 0)))
            except requests.exceptions.RequestException as e:
                if not cancelled.is_set():
                    raise FleetStoreError(f"etcd at {url}: watch stream broke: {_short(e)}") from None
                return
            except (AttributeError, ValueError, OSError) as e:
                # urllib3 raises these when cancel() closes the response under the reader
                if not cancelled.is_set():
                    raise FleetStoreError(f"etcd at {url}: watch stream broke: {e}") from None
                return
            if not cancelled.is_set():
                raise FleetStoreError(f"etcd at {url}: watch stream ended (etcd stopped?)")

        return events(), cancel


def _lines(resp: requests.Response) -> Iterator[bytes]:
    """The stream's non-empty lines (one JSON message each). requests' iter_lines rescans
    everything pending on every chunk, quadratic for a multi-megabyte envelope: look for the
    newline in the new chunk only."""
    parts: list[bytes] = []
    for chunk in resp.iter_content(chunk_size=None):
        while chunk:
            nl = chunk.find(b"\n")
            if nl < 0:
                parts.append(chunk)
                break
            parts.append(chunk[:nl])
            line = b"".join(parts)
            parts = []
            chunk = chunk[nl + 1:]
            if line.strip():
                yield line
    tail = b"".join(parts)
    if tail.strip():
        yield tail


def _shutdown(resp: requests.Response) -> None:
    sock = None
    for path in (("raw", "_fp", "fp", "raw", "_sock"), ("raw", "_connection", "sock"),
                 ("raw", "connection", "sock")):
        obj = resp
        try:
            for attr in path:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if isinstance(obj, socket.socket):
            sock = obj
            break
    if sock is None:
        return
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as s:
            s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _short(e: Exception) -> str:
    # etcd3gw keeps the message in detail_text (its str() is empty)
    text = str(getattr(e, "detail_text", None) or e)
    for marker in ("Connection refused", "timed out", "Name or service not known",
                   "No route to host", "Network is unreachable"):
        if marker in text:
            return marker.lower()
    return text[:200]


def _etcd_message(e: gw_exc.Etcd3Exception) -> str:
    detail = getattr(e, "detail_text", None) or str(e)
    try:
        return json.loads(detail).get("error", detail)
    except (ValueError, AttributeError):
        return str(detail)[:300]
