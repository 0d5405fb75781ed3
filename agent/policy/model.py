"""The validated policy: what validate.py builds and compiler.py reads.

Every object remembers where it was written (`Loc`), because errors that
are found late — overlaps, references across files — must still point the
user at FILE:LINE. Names are kept as strings here; integer ids are the
compiler's business.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, NamedTuple, Optional, Union

from bulkhead.l7.settings import HTTP_DEFAULTS
from bulkhead.policy.ports import PortSpec
from bulkhead.policy.schema import HTTP_SETTINGS_KEYS, TRANSIT_PORT_DEFAULT

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

V4MAPPED_PREFIX = 0xFFFF << 32  # ::ffff:0:0/96 as an integer
V4MAPPED_BITS = 96


@dataclasses.dataclass(frozen=True)
class Diag:
    """One problem in a policy file, printed as FILE:LINE: message."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class PolicyError(Exception):
    """The policy is invalid; `errors` lists every problem found, in file order."""

    def __init__(self, errors: list[Diag]):
        super().__init__(errors)
        self.errors = list(errors)

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.errors)


class Loc(NamedTuple):
    """Where something was written. A NamedTuple: loading 100k rules creates ~1M of these."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class Diags:
    """Collects every error and warning of one load, so all are reported at once.

    Errors sort by the order files were given, then by line: the order a
    user reads them in, whatever order the checks found them.
    """

    def __init__(self, files: list[str]):
        self._order = {f: i for i, f in enumerate(files)}
        self._errors: list[Diag] = []
        self._warnings: list[Diag] = []

    def error(self, loc: Loc, message: str) -> None:
        self._errors.append(Diag(loc.file, loc.line, message))

    def warn(self, loc: Loc, message: str) -> None:
        self._warnings.append(Diag(loc.file, loc.line, message))

    def _sorted(self, diags: list[Diag]) -> list[Diag]:
        seen: set[Diag] = set()
        out = []
        for d in sorted(diags, key=lambda d: (self._order.get(d.file, len(self._order)), d.file, d.line)):
            if d not in seen:
                seen.add(d)
                out.append(d)
        return out

    @property
    def errors(self) -> list[Diag]:
        return self._sorted(self._errors)

    @property
    def warnings(self) -> list[str]:
        """Warning messages in file order, without a FILE:LINE prefix.

        Callers print them as `FILE: warning: MESSAGE`; each message names
        its rule, and rule names are unique, so it is still easy to find.
        """
        return [d.message for d in self._sorted(self._warnings)]


@dataclasses.dataclass
class HttpSettings:
    """`settings.http`: how the L7 verifier proxies requests."""

    # defaults, units and meanings: bulkhead.l7.settings.HttpDefaults
    via: bool = HTTP_DEFAULTS.via
    x_forwarded_for: bool = HTTP_DEFAULTS.x_forwarded_for
    max_header_bytes: int = HTTP_DEFAULTS.max_header_bytes
    header_timeout: float = HTTP_DEFAULTS.header_timeout
    idle_timeout: float = HTTP_DEFAULTS.idle_timeout

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in HTTP_SETTINGS_KEYS}


@dataclasses.dataclass
class Settings:
    default_action: str = "deny"  # deny | allow
    mode: str = "enforce"  # enforce | audit
    unknown_sni: str = "deny"  # deny | allow
    http: HttpSettings = dataclasses.field(default_factory=HttpSettings)

    def as_dict(self) -> dict[str, Any]:
        """Plain values only (the bundle is msgpack)."""
        return {"default_action": self.default_action, "mode": self.mode, "unknown_sni": self.unknown_sni,
                "http": self.http.as_dict()}


@dataclasses.dataclass
class Gateway:
    """One entry of `gateways:`: a host that enforces the segments attached to it."""

    name: str
    loc: Loc
    transit: Any = None  # ip_address: where other gateways reach this one (VXLAN underlay); None = no transit
    transit_loc: Optional[Loc] = None
    # `wireguard:` {"public_key": base64, "endpoint": "ADDR:PORT"}; None = the transit unencrypted
    wireguard: Optional[dict] = None
    wireguard_loc: Optional[Loc] = None


@dataclasses.dataclass
class Segment:
    name: str
    interfaces: list[str]
    loc: Loc
    gateway: Optional[str] = None  # `gateway:` as written; None when absent or malformed
    gateway_loc: Optional[Loc] = None  # where `gateway:` was written, None when absent
    dns: list[Any] = dataclasses.field(default_factory=list)  # ip_address objects: the gateway's DNS here
    dns_loc: Optional[Loc] = None
    # ip_address objects, at most one per family: the source flows from other gateways take here
    transit_snat: list[Any] = dataclasses.field(default_factory=list)
    transit_snat_loc: Optional[Loc] = None


@dataclasses.dataclass(frozen=True)
class Address:
    """One entry of an app's `addresses`, in the 128-bit space the tries use.

    IPv4 is stored IPv4-mapped (::ffff:a.b.c.d) so that one trie and one
    overlap check serve both families. The integer bounds are computed once:
    overlap checks and compilation read them for every address of every app.
    """

    network: IPNetwork
    loc: Loc
    first128: int = dataclasses.field(init=False, repr=False, compare=False)
    last128: int = dataclasses.field(init=False, repr=False, compare=False)
    prefixlen128: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        net = self.network
        if net.version == 4:
            first, plen = V4MAPPED_PREFIX | int(net.network_address), V4MAPPED_BITS + net.prefixlen
        else:
            first, plen = int(net.network_address), net.prefixlen
        object.__setattr__(self, "first128", first)
        object.__setattr__(self, "last128", first + (1 << (128 - plen)) - 1)
        object.__setattr__(self, "prefixlen128", plen)

    @property
    def addr16(self) -> bytes:
        return self.first128.to_bytes(16, "big")

    def __str__(self) -> str:
        return str(self.network)


@dataclasses.dataclass
class Tls:
    """An app's TLS material for the L7 verifier: absolute file paths, never contents."""

    cert: str
    key: str
    ca: Optional[str] = None  # CA bundle to verify the origin when re-encrypting; None = system store


@dataclasses.dataclass
class App:
    name: str
    segment: Optional[str]  # None when missing or malformed (already reported)
    addresses: list[Address]
    ports: Optional[list[PortSpec]]  # None = all
    hostnames: list[str]
    tls: Optional[Tls]
    loc: Loc
    segment_loc: Loc
    ports_loc: Loc
    publish: bool = False  # its DNS names resolve to service addresses through the gateways' DNS
    publish_loc: Optional[Loc] = None
    dns_names: list[str] = dataclasses.field(default_factory=list)  # what DNS answers for (published apps)
    routes: Optional[list["Route"]] = None  # a router: its service address leads to these backends
    routes_loc: Optional[Loc] = None


@dataclasses.dataclass
class Route:
    """One entry of a router app's `routes:` (docs/fabric.md): TLS by server name, HTTP by Host."""

    kind: str  # "sni" | "host"
    name: str  # lowercased; "*.domain" covers one label
    path: Optional[str]  # host routes: a path prefix ("/api/"); None = any
    to: Optional[str]  # the backend app's name
    loc: Loc


@dataclasses.dataclass
class Fabric:
    """`fabric:`: service-address pools (VIPs), the gateways' DNS, the transit's port (docs/fabric.md)."""

    service_addresses: list[Any]  # ip_network objects, in file order; empty only in a transit-only fabric
    upstream_dns: list[Any]  # ip_address objects; empty = names outside the fabric get REFUSED
    dns_ttl: int
    loc: Loc
    transit_port: int = TRANSIT_PORT_DEFAULT  # UDP port of the VXLAN overlay between gateways
    transit_port_loc: Optional[Loc] = None  # where `transit_port:` was written, None when absent


@dataclasses.dataclass
class Rule:
    name: str
    src: Optional[str]  # `from:` app name
    dst: Optional[str]  # `to:` app name
    action: str  # allow | deny | reject
    mode: str  # enforce | audit
    ports: Optional[list[PortSpec]]  # None = all
    http: Optional[list[dict[str, Any]]]  # L7 match entries as written, file paths made absolute
    loc: Loc
    from_loc: Loc
    to_loc: Loc
    ports_loc: Loc
    http_loc: Loc

    @property
    def l7(self) -> bool:
        return self.http is not None


@dataclasses.dataclass
class Policy:
    settings: Settings
    segments: list[Segment]
    apps: list[App]
    rules: list[Rule]
    sources: list[str]
    warnings: list[str] = dataclasses.field(default_factory=list)
    gateways: list[Gateway] = dataclasses.field(default_factory=list)  # empty: a single gateway, no fleet
    fabric: Optional[Fabric] = None  # `fabric:`; None = no DNS, no service addresses

    @property
    def transit(self) -> bool:
        """Whether some gateway has `transit:`: the fabric carries traffic between gateways."""
        return any(g.transit is not None for g in self.gateways)
