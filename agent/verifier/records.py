"""What the engine passes around: what is known about a connection (FlowContext, from the
resolver), one request while it is served (Exchange), what is reported when it ends
(RequestRecord), and who receives the reports (Sink).

A sink gets one RequestRecord per request the verifier answered or forwarded, and connection
events: accepted, closed, no_flow (the resolver knew no flow: reset), overload (max_connections:
reset), timeout (detail: header | idle | upstream | stall | no data), tls_not_terminated,
tls_failed, error.
"""
from __future__ import annotations

import dataclasses
import ssl
import time
from typing import Any, Optional, Protocol

from bulkhead.l7.settings import http_settings

clock = time.perf_counter  # record timings (uvloop's loop.time() has 1 ms resolution)

METHODS = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")}

# body framing, of requests (Exchange.body) and of responses (Upstream.framing)
NOBODY, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3


@dataclasses.dataclass
class FlowContext:
    """What the verifier knows about one accepted connection (from the resolver)."""

    client: tuple                      # (ip, port) of the client
    original_dst: tuple                # (ip, port) the client dialed
    segment: str
    src_app: str
    dst_app: str
    rules: Any                         # rules.RuleSet (check(Request) -> Decision); None: no rule, deny
    dst_hostnames: list = dataclasses.field(default_factory=list)  # Host must be one of these (if any)
    tls_server: Optional[ssl.SSLContext] = None  # terminate client TLS with this
    tls_client: Optional[ssl.SSLContext] = None  # re-encrypt to the origin with this
    settings: dict = dataclasses.field(default_factory=lambda: http_settings(None))  # l7.settings
    flow_id: str = ""


class Exchange:
    """One request and its response.

    No __slots__: the defaults are class attributes, so making one (per request,
    on the hot path) assigns only what differs.
    """

    method = b""
    target = b""
    version = "1.1"
    trailers: Optional[list] = None
    keep_alive = True
    body = NOBODY
    expect = False
    host_hdr: Optional[bytes] = None
    n_host = n_cl = n_te = 0
    te_chunked = False
    upgrade = False
    action = 0             # decide.ALLOW | DENY | REFUSE
    status = 0
    reason = ""
    rule: Optional[str] = None
    verdict = ""
    path = ""
    host: Optional[str] = None
    final = False          # the connection ends after this exchange (parsing stopped at it)
    out: Optional[list] = None  # upstream-bound bytes waiting for the upstream
    out_bytes = 0
    streaming = False
    discard = False
    head_out = b""
    req_done = False
    resp_done = False
    resp_started = False   # bytes of a final response went to the client
    resp_status = 0
    sent_1xx = False
    close_after = False
    reused = False
    t_sent = 0.0
    decision_s = connect_s = ttfb_s = 0.0
    bytes_in = bytes_out = 0
    recorded = False

    def __init__(self, t0: float):
        self.t0 = t0
        self.headers: list = []


_RECORD_FIELDS = ("method", "path", "host", "verdict", "rule", "status", "reason", "bytes_in", "bytes_out",
                  "decision_s", "connect_s", "ttfb_s", "total_s")


class RequestRecord:
    """One per request the verifier answered or forwarded.

    A plain __slots__ class (one is made per request on the hot path); as_dict()
    and dict(rec) give the fields.
    """

    __slots__ = _RECORD_FIELDS

    method: str
    path: str
    host: Optional[str]
    verdict: str          # allow | deny | error
    rule: Optional[str]
    status: int           # status the client got (0: none, the connection was cut)
    reason: str
    bytes_in: int         # request body bytes received from the client
    bytes_out: int        # response body bytes sent to the client
    decision_s: float
    connect_s: float      # upstream connect (+ TLS) time; 0 when the connection was reused
    ttfb_s: float         # request sent upstream -> first response byte
    total_s: float        # first request byte -> response complete

    def __init__(self, method: str, path: str, host: Optional[str], verdict: str, rule: Optional[str],
                 status: int, reason: str, bytes_in: int = 0, bytes_out: int = 0, decision_s: float = 0.0,
                 connect_s: float = 0.0, ttfb_s: float = 0.0, total_s: float = 0.0):
        self.method = method
        self.path = path
        self.host = host
        self.verdict = verdict
        self.rule = rule
        self.status = status
        self.reason = reason
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.decision_s = decision_s
        self.connect_s = connect_s
        self.ttfb_s = ttfb_s
        self.total_s = total_s

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in _RECORD_FIELDS}

    def keys(self):
        return _RECORD_FIELDS

    def __getitem__(self, k: str):
        if k not in _RECORD_FIELDS:
            raise KeyError(k)
        return getattr(self, k)

    def __eq__(self, other):
        if other.__class__ is not RequestRecord:
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return "RequestRecord(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in _RECORD_FIELDS) + ")"


class Sink(Protocol):
    count_only: bool  # True: the engine calls tally(verdict) instead of request(ctx, record)

    def tally(self, verdict: str) -> None: ...

    def request(self, ctx: FlowContext, rec: RequestRecord) -> None: ...

    def connection(self, ctx: Optional[FlowContext], event: str, detail: str = "") -> None: ...


class NullSink:
    """No one listens: the connection skips building records."""

    count_only = False

    def request(self, ctx, rec):
        pass

    def connection(self, ctx, event, detail=""):
        pass
