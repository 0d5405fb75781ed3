"""The decision for one request, as pure functions: no sockets, no event loop.

check_head(ex) refuses a head whose framing or routing is ambiguous (HTTP/0.9 and 2, CONNECT,
upgrades, repeated Host or Content-Length, CL with TE, TE other than chunked).

decide(ctx, method, target, host_hdr, headers, sni) takes a head that check_head let through
and the FlowContext of its connection, and returns an Outcome: ALLOW (with the target to
forward: exactly what was checked), DENY (403, or 421 for a Host that is not the TLS server
name) or REFUSE (an error status: the request is ambiguous, or deciding it failed), with the
fields of its RequestRecord.

In order: the request target and the Host are normalized (normalize.py refuses ambiguity);
an absolute-form target's authority must agree with the Host; on a TLS connection the Host must
be the server name the client sent; the Host must be one of the destination app's hostnames
(if it has any); then ctx.rules decides. A punt is never an implicit allow: a flow without
rules is denied, and a failure while deciding refuses the request.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

from bulkhead.l7 import http1
from bulkhead.l7.normalize import Refused, normalize_host, normalize_target, request_target
from bulkhead.l7.rules import Request
from bulkhead.verifier.records import METHODS, Exchange, FlowContext

log = logging.getLogger("bulkhead.verifier")

# Outcome.action
ALLOW, DENY, REFUSE = 1, 2, 3

NO_RULE = "no L7 rule for this flow in the policy in force"

class Outcome:
    """The decision for one request, and the RequestRecord fields it determines.

    A plain class whose defaults are class attributes (one is made per request, on the hot
    path): decide() assigns only what differs.
    """

    action = REFUSE
    status = 0                    # what the verifier answers (DENY, REFUSE); 0 for ALLOW
    verdict = "error"             # allow | deny | error
    reason = ""
    rule: Optional[str] = None
    path = ""                     # normalized ("" if the target could not be)
    host: Optional[str] = None    # normalized Host (or the target's authority)
    forward: Optional[bytes] = None   # ALLOW: the target to send; the given bytes object if unchanged
    add_host: Optional[bytes] = None  # ALLOW: an HTTP/1.0 absolute-form request without Host gets this

    _FIELDS = ("action", "status", "verdict", "reason", "rule", "path", "host", "forward", "add_host")

    def __repr__(self) -> str:
        return "Outcome(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self._FIELDS) + ")"


def check_head(ex: Exchange) -> Optional[tuple[int, str]]:
    """Framing and routing ambiguity of a request head as llhttp framed it (version, method,
    upgrade, Host / Content-Length / Transfer-Encoding counts): (status, reason) to refuse, or None."""
    v = ex.version
    if v != "1.1" and v != "1.0":
        if v == "0.9":
            return 400, "HTTP/0.9 is not supported"
        return 505, f"HTTP/{v} is not supported on this port"
    if ex.method == b"CONNECT":
        return 405, "CONNECT not allowed"
    if ex.method == b"PRI":
        return 505, "HTTP/2 is not supported on this port"
    if ex.upgrade:
        return 501, "protocol upgrade is not supported"
    if ex.n_host > 1:
        return 400, "more than one Host header"
    if ex.n_host == 0 and v == "1.1":
        return 400, "missing Host header"
    if ex.n_cl > 1:
        return 400, "more than one Content-Length header"
    if ex.n_te:
        if ex.n_cl:
            return 400, "Content-Length with Transfer-Encoding"
        if ex.n_te > 1:
            return 400, "more than one Transfer-Encoding header"
        if not ex.te_chunked:
            return 501, "Transfer-Encoding other than chunked"
        if v == "1.0":
            return 400, "Transfer-Encoding in an HTTP/1.0 request"
    return None


# Keep-alive connections repeat their target and Host: normalize each distinct one once.
# Bounded: a target is at most max_header_bytes, so the caches hold at most a few MB.
@functools.lru_cache(maxsize=256)
def _target(method: str, target: bytes) -> tuple:
    text = target.decode("latin-1")
    return (text, *normalize_target(method, text))


@functools.lru_cache(maxsize=256)
def _host(value: bytes) -> str:
    return normalize_host(value.decode("latin-1"))


def decide(ctx: FlowContext, method: bytes, target: bytes, host_hdr: Optional[bytes], headers: list,
           sni: Optional[str] = None) -> Outcome:
    """The Outcome of one request head (headers: (name, value) byte pairs as received).

    sni: the normalized TLS server name on a TLS connection that sent one, else None.
    Never raises.
    """
    o = Outcome()
    try:
        _decide(o, ctx, method, target, host_hdr, headers, sni)
    except Refused as e:
        o.action, o.status, o.reason, o.verdict = REFUSE, e.status, e.reason, "error"
    except Exception:  # a bug in matching must not pass a request
        log.exception("verifier: deciding %r failed", target)
        o.action, o.status, o.reason, o.verdict = REFUSE, 500, "internal error deciding the request", "error"
    return o


def _decide(o: Outcome, ctx: FlowContext, method_b: bytes, target_b: bytes, host_hdr: Optional[bytes],
            headers: list, sni: Optional[str]) -> None:
    """Fill `o` step by step: a refusal raised part-way keeps what is known (path, host) for the record."""
    method = METHODS.get(method_b) or method_b.decode("ascii")
    target, path, query, authority = _target(method, target_b)
    o.path = path
    host = _host(host_hdr) if host_hdr is not None else None
    if authority is not None:
        a = normalize_host(authority)
        if host is not None and a != host:
            raise Refused(400, f"Host {host} conflicts with the target's authority {a}")
        host = a
    o.host = host
    if sni is not None and host != sni:
        o.action, o.status, o.verdict = DENY, 421, "deny"
        o.reason = f"host {host} does not match the TLS server name {sni}"
        return
    if ctx.dst_hostnames and (host is None or not http1.hostname_allowed(host, ctx.dst_hostnames)):
        o.action, o.status, o.verdict = DENY, 403, "deny"
        o.reason = f"host {host} is not app {ctx.dst_app}'s"
        return
    if ctx.rules is None:
        o.action, o.status, o.verdict, o.reason = DENY, 403, "deny", NO_RULE
        return
    d = ctx.rules.check(Request(method, path, query, host, raw_headers=headers))
    o.rule = d.rule
    o.reason = d.reason
    if not d.allowed:
        o.action, o.status, o.verdict = DENY, 403, "deny"
        return
    # The origin gets the normalized target: exactly what was checked.
    o.forward = target_b if (path == target and query is None) else request_target(path, query).encode("ascii")
    if authority is not None and host_hdr is None:
        o.add_host = authority.encode("ascii")
    o.action, o.verdict = ALLOW, "allow"
