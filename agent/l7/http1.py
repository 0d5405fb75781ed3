"""HTTP/1.1 framing helpers shared by the verifier engine (proxy.py) and its tests.

Pure functions, no I/O: header checks that llhttp (httptools) does not do itself,
head scanning, re-framing of chunked bodies, and the responses the verifier writes
on its own behalf (403 denials, 4xx/5xx refusals).

What llhttp already rejects (strict mode, httptools 0.9 / llhttp 9), measured:
obs-fold, bare CR, bare LF, NUL and other control characters in values, invalid
header-name characters (incl. whitespace before the colon), duplicate
Content-Length, Content-Length with Transfer-Encoding, Transfer-Encoding whose
last coding is not `chunked`, a repeated `chunked`, malformed Content-Length
(sign, spaces, commas, overflow), malformed chunk sizes, unknown methods,
versions other than 0.9/1.x/2.0, spaces or control characters in the target.

What llhttp lets through and the verifier refuses here: HTTP/0.9 and HTTP/2.0
request lines, `Transfer-Encoding: gzip, chunked` (any coding but exactly
`chunked`), Transfer-Encoding on HTTP/1.0, a repeated Host, a missing Host on
HTTP/1.1, trailing whitespace in values (stripped), CONNECT, Upgrade requests.
"""
from __future__ import annotations

from http import HTTPStatus

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"

# llhttp error messages -> the status the client gets. Anything else is 400.
_LLHTTP_STATUS = (
    ("Content-Length", 400),  # "Transfer-Encoding can't be present with Content-Length", duplicates
    ("Invalid HTTP version", 505),
    ("Pause on PRI/Upgrade", 505),
    ("Transfer-Encoding", 501),  # "Request has invalid `Transfer-Encoding`", "Invalid `Transfer-Encoding` header value"
    ("Invalid method", 501),
)


def llhttp_error_status(message: str, saw_transfer_encoding: bool = False) -> int:
    """The status for a request llhttp refused with `message`.

    A Transfer-Encoding error after a Transfer-Encoding header was already seen is
    a repeated header (400); otherwise an unsupported coding (501).
    """
    for needle, status in _LLHTTP_STATUS:
        if needle in message:
            if status == 501 and needle == "Transfer-Encoding" and saw_transfer_encoding:
                return 400
            return status
    return 400


def find_head_end(tail: bytes, data, start: int = 0) -> int:
    """Index in `data` just past the first CRLFCRLF at or after `start`, or -1.

    `tail` is the last (up to 3) bytes seen before `data` while still inside the
    head, so a terminator split across two reads is found too. `data` may be
    bytes or a memoryview-able buffer.
    """
    if tail:
        joined = tail + bytes(data[start:start + 3])
        k = joined.find(HEAD_END)
        if k >= 0:
            return start + k + 4 - len(tail)
    k = data.find(HEAD_END, start)
    return -1 if k < 0 else k + 4


def head_tail(prev_tail: bytes, piece) -> bytes:
    """The last 3 bytes of prev_tail + piece (what find_head_end needs next time)."""
    if len(piece) >= 3:
        return bytes(piece[-3:])
    return (prev_tail + bytes(piece))[-3:]


def chunk(data) -> list:
    """One chunk of a chunked body: [size line, data, CRLF] (data not copied)."""
    return [b"%x\r\n" % len(data), data, CRLF]


def last_chunk(trailers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """The zero-size chunk, trailers (if any) and the final CRLF."""
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(n + b": " + v + CRLF for n, v in trailers) + CRLF


# Trailer fields that must never travel in trailers: framing, routing, auth.
FORBIDDEN_TRAILERS = frozenset({
    b"content-length", b"transfer-encoding", b"host", b"content-type", b"content-encoding",
    b"content-range", b"trailer", b"te", b"connection", b"keep-alive", b"upgrade", b"expect",
    b"authorization", b"proxy-authorization", b"cookie", b"set-cookie", b"cache-control",
    b"max-forwards", b"range", b"www-authenticate", b"proxy-authenticate",
})


def hostname_allowed(host: str, names) -> bool:
    """True if `host` equals one of `names` or matches a one-label wildcard (*.example)."""
    for name in names:
        if name.startswith("*."):
            suffix = name[1:]  # ".example"
            if host.endswith(suffix):
                label = host[: -len(suffix)]
                if label and "." not in label:
                    return True
        elif host == name:
            return True
    return False


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def header_safe(text: str, limit: int = 200) -> str:
    """A string usable as a header value: printable ASCII only, bounded length."""
    out = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return out[:limit]


def simple_response(status: int, body: str, *, keep_alive: bool, head_only: bool = False,
                    headers: list[tuple[str, str]] | None = None) -> bytes:
    """A complete response the verifier writes itself (text body, Content-Length framed)."""
    payload = body.encode("utf-8", "replace")
    lines = [f"HTTP/1.1 {status} {phrase(status)}", "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(payload)}", "Connection: " + ("keep-alive" if keep_alive else "close")]
    for name, value in headers or ():
        lines.append(f"{name}: {header_safe(value)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return head if head_only else head + payload


def deny_response(rule: str | None, reason: str, *, keep_alive: bool, head_only: bool = False,
                  status: int = 403) -> bytes:
    """403 (or 421) with `denied by rule R: reason` and the X-Bulkhead-* headers."""
    who = rule if rule else "-"
    body = f"denied by rule {who}: {reason}\n"
    return simple_response(status, body, keep_alive=keep_alive, head_only=head_only,
                           headers=[("X-Bulkhead-Rule", who), ("X-Bulkhead-Reason", reason)])


def error_response(status: int, reason: str, *, head_only: bool = False) -> bytes:
    """A refusal: the request was not forwarded, the connection closes after it."""
    return simple_response(status, f"{phrase(status).lower()}: {reason}\n", keep_alive=False,
                           head_only=head_only, headers=[("X-Bulkhead-Reason", reason)])


def is_token_chunked(value: bytes) -> bool:
    """True only for a Transfer-Encoding value that is exactly `chunked` (any case, OWS trimmed)."""
    return value.strip(b" \t").lower() == b"chunked"
