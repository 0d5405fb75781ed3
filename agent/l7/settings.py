"""`settings.http`: how the L7 verifier proxies requests, and the one place their defaults live.

The policy's `settings.http` (policy/model.py HttpSettings, keys in policy/schema.py) carries
the first five fields below into the bundle; the verifier fills in the rest with http_settings().
The engine knobs are not in the policy schema: callers of the engine (tests, `bulkhead verifier
serve`) may set them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class HttpDefaults:
    via: bool = False              # add `Via: 1.1 bulkhead` to forwarded requests
    x_forwarded_for: bool = False  # add `X-Forwarded-For: <client ip>`
    max_header_bytes: int = 16384  # bytes: request line + headers; above: 431 (414 for the target alone)
    # Timeouts are written as integers: the policy's defaults go into the bundle as they are
    # written here, and 10 and 10.0 pack differently (the bundle's checksum would change).
    header_timeout: float = 10     # seconds: a request head (and a TLS handshake) must arrive within this
    idle_timeout: float = 60       # seconds: idle keep-alive connections, stalled bodies
    # engine knobs (not in the policy schema)
    connect_timeout: float = 10    # seconds: opening the upstream connection (incl. TLS); then 504
    response_timeout: float = 60   # seconds: request sent, no response head yet; then 504
    discard_body_max: int = 65536  # bytes: a denied request's Content-Length body up to this is read and dropped


HTTP_DEFAULTS = HttpDefaults()
_DEFAULTS_DICT = dataclasses.asdict(HTTP_DEFAULTS)


def http_settings(settings: Optional[Mapping[str, Any]]) -> dict:
    """settings["http"] of a bundle (may be None or partial) with every default filled in."""
    out = dict(_DEFAULTS_DICT)
    for k, v in (settings or {}).items():
        if v is not None:
            out[k] = v
    return out
