"""Request-target and Host normalization for the L7 verifier.

The verifier decides on a *normalized* request: the path the origin server
will most plausibly serve, with every encoding trick undone. Anything that
two reasonable servers could read differently is refused instead of guessed
(`Refused`, answered with its status and never forwarded):

- raw whitespace, control characters, non-ASCII bytes, `#` or a backslash in
  the target; an invalid %-escape; a decoded `/` (%2F), `\\` (%5C), NUL or
  control character; bytes that are not UTF-8 after decoding;
- a dot-segment carrying parameters (`..;x`, `.;x`: Tomcat reads them as
  dot-segments);
- a path that climbs above the root (`/../x`);
- authority-form (CONNECT), `*` for any method but OPTIONS, schemes other
  than http/https, userinfo in an authority.

What is normalized (RFC 3986 6.2.2): every %-escape is decoded (so patterns
are written in plain text: `/%61dmin` is `/admin`), runs of `/` collapse to
one (`//a///b` is `/a/b`), and dot-segments are resolved (5.2.4):
`/items/../admin` is `/admin`, `/a/./b` is `/a/b`. A trailing `/` is kept
(`/items/` is not `/items`). The query is returned as sent, undecoded.

Because the decision is made on the normalized path, the proxy should forward
that same path (`request_target(path, query)`), so the origin serves exactly
what was checked.
"""
from __future__ import annotations

import ipaddress
import re

__all__ = ["Refused", "normalize_target", "normalize_host", "request_target", "encode_path"]


class Refused(Exception):
    """An ambiguous or malformed request: answer `status`, never pass it on.

    `reason` is short and holds nothing but fixed text and policy-safe
    fragments: it may be logged and sent to the client.
    """

    def __init__(self, status: int, reason: str):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


# A path that needs no work: pchars (minus '%') and '/', no "//", no "/.".
_SIMPLE_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
# Printable ASCII except '#', '\\' (checked separately) — what a target may hold raw.
_TARGET_OK = re.compile(r"[\x21-\x7e]*")
_HEX = "0123456789abcdefABCDEF"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_PORT = re.compile(r"[0-9]{1,5}")
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?")
_HOST_MAX = 253


def normalize_target(method: str, target: str) -> tuple[str, str | None, str | None]:
    """Request-target -> (path, query, authority).

    origin-form "/a/b?x" -> ("/a/b", "x", None); absolute-form "http://h:80/a"
    -> ("/a", None, "h:80") (authority as sent, checked with normalize_host);
    "*" only with OPTIONS -> ("*", None, None). See the module docstring for
    what is normalized and what is refused (always 400, except CONNECT: 405).
    """
    if method == "CONNECT" or method.upper() == "CONNECT":
        raise Refused(405, "CONNECT not allowed")
    if not target:
        raise Refused(400, "empty request target")
    if not _TARGET_OK.fullmatch(target):
        raise Refused(400, "invalid character in request target")
    if "#" in target:
        raise Refused(400, "fragment in request target")
    if "\\" in target:
        raise Refused(400, "backslash in request target")
    authority = None
    c = target[0]
    if c == "/":
        rest = target
    elif target == "*":
        if method.upper() != "OPTIONS":
            raise Refused(400, "'*' target is only for OPTIONS")
        return "*", None, None
    else:
        m = _SCHEME.match(target)
        if m is None:
            raise Refused(400, "malformed request target")
        if m.group(1).lower() not in ("http", "https"):
            raise Refused(400, "unsupported scheme in request target")
        after = target[m.end():]
        end = len(after)
        for sep in "/?":
            i = after.find(sep)
            if 0 <= i < end:
                end = i
        authority = after[:end]
        if "@" in authority:
            raise Refused(400, "userinfo in request target")
        normalize_host(authority)  # validates; raises Refused(400)
        rest = after[end:]
        if not rest or rest[0] == "?":
            rest = "/" + rest
    q = rest.find("?")
    if q >= 0:
        raw_path, query = rest[:q], rest[q + 1:]
    else:
        raw_path, query = rest, None
    return normalize_path(raw_path), query, authority


def normalize_path(raw: str) -> str:
    """Decode and resolve one absolute path (starting with '/'); see the module docstring."""
    if _SIMPLE_PATH.fullmatch(raw) and "//" not in raw and "/." not in raw:
        return raw
    if not raw.startswith("/"):
        raise Refused(400, "malformed request target")
    if "%" in raw:
        raw = _decode(raw)
    out: list[str] = []
    for seg in raw.split("/")[1:]:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if not out:
                raise Refused(400, "path escapes the root")
            out.pop()
            continue
        if seg[0] == "." and (seg.startswith("..;") or seg.startswith(".;")):
            raise Refused(400, "parameters on a dot-segment")
        out.append(seg)
    path = "/" + "/".join(out)
    # A trailing '/' (or a final dot-segment, which names a directory) is kept.
    last = raw.rsplit("/", 1)[1]
    if out and (last in ("", ".", "..")):
        path += "/"
    return path


def _decode(raw: str) -> str:
    parts = raw.split("%")
    buf = bytearray(parts[0].encode("ascii"))
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise Refused(400, "invalid percent-escape in path")
        b = int(part[:2], 16)
        if b == 0x2F:
            raise Refused(400, "encoded slash in path")
        if b == 0x5C:
            raise Refused(400, "encoded backslash in path")
        if b < 0x20 or b == 0x7F:
            raise Refused(400, "encoded control character in path")
        buf.append(b)
        buf += part[2:].encode("ascii")
    try:
        text = buf.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "path is not UTF-8 after decoding") from None
    # C1 controls and other invisible separators make paths read differently.
    for ch in text:
        if "\x80" <= ch <= "\x9f":
            raise Refused(400, "encoded control character in path")
    return text


def normalize_host(value: str) -> str:
    """Host header / authority -> lowercase name without port and trailing dot.

    IPv6 literals stay in brackets, compressed (`[FD00:0::1]:8080` ->
    `[fd00::1]`). Userinfo, an empty value, invalid characters, an empty
    label, or a port that is not 1-65535 -> Refused(400).
    """
    if not value:
        raise Refused(400, "empty host")
    if not value.isascii():
        # Before any case folding: str.lower() maps e.g. KELVIN SIGN to "k".
        raise Refused(400, "malformed host")
    if "@" in value:
        raise Refused(400, "userinfo in host")
    if value[0] == "[":
        end = value.find("]")
        if end < 0:
            raise Refused(400, "malformed host")
        inner, rest = value[1:end], value[end + 1:]
        if rest:
            if rest[0] != ":":
                raise Refused(400, "malformed host")
            _check_port(rest[1:])
        if "%" in inner:
            raise Refused(400, "malformed host")
        try:
            addr = ipaddress.IPv6Address(inner)
        except ValueError:
            raise Refused(400, "malformed host") from None
        return f"[{addr.compressed}]"
    name = value
    colon = value.rfind(":")
    if colon >= 0:
        name = value[:colon]
        _check_port(value[colon + 1:])
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > _HOST_MAX:
        raise Refused(400, "malformed host")
    for label in name.split("."):
        if not _HOST_LABEL.fullmatch(label):
            raise Refused(400, "malformed host")
    return name


def _check_port(text: str) -> None:
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise Refused(400, "bad port in host")


# ------------------------------------------------------------- forwarding --

_KEEP = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/")


def encode_path(path: str) -> str:
    """Percent-encode a normalized path for the wire: what is not a pchar or '/' is escaped."""
    if _SIMPLE_PATH.fullmatch(path):
        return path
    out = []
    for b in path.encode("utf-8"):
        out.append(chr(b) if b in _KEEP else f"%{b:02X}")
    return "".join(out)


def request_target(path: str, query: str | None) -> str:
    """The origin-form target to forward for a normalized (path, query)."""
    if path == "*":
        return "*"
    p = encode_path(path)
    return p if query is None else f"{p}?{query}"
