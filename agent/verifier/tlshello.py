"""A strict ClientHello reader for routers (router.py): the server name, nothing else.

parse_client_hello(buf) takes the bytes a client sent first, as received: TLS records that may
span reads (None: more are needed). It refuses (Malformed) anything but one well-formed
ClientHello in handshake records: another record type first, a record version other than
3.1-3.3, empty or oversized records, more than RECORDS_MAX records or HELLO_MAX bytes of them,
bytes after the message in its last record, lengths that don't add up, a repeated extension, a
server_name extension that isn't exactly one valid host_name. The bytes are replayed to the
backend untouched: nothing is decrypted, and nothing here keeps state between reads.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

HELLO_MAX = 16384   # bytes: the records carrying a ClientHello, headers included
RECORD_MAX = 16384  # bytes: a TLS plaintext record's payload (RFC 8446 5.1)
RECORDS_MAX = 32    # records a ClientHello may be cut into (a parse per read stays cheap)

# TLS alerts (RFC 8446 6.2)
ALERT_ACCESS_DENIED = 49
ALERT_UNRECOGNIZED_NAME = 112


class Malformed(ValueError):
    """Bytes that are not one well-formed ClientHello: the connection is reset."""


class Hello(NamedTuple):
    sni: Optional[str]  # the host_name, lowercased, one trailing dot dropped; None: none sent
    length: int         # bytes of the records that carried the ClientHello


def _u16(b, i: int) -> int:
    return (b[i] << 8) | b[i + 1]


def parse_client_hello(buf: bytes) -> Optional[Hello]:
    """The ClientHello at the start of `buf` (TLS records as received), or None if more bytes
    are needed. Raises Malformed for anything else: another record type first, a record version
    other than 3.1-3.3, an empty or oversized record, a handshake other than ClientHello, a
    message longer than HELLO_MAX or cut into more than RECORDS_MAX records, bytes after it in
    its last record, inconsistent lengths, a repeated extension, a server_name extension that is not exactly one valid host_name."""
    hs = bytearray()
    pos = 0
    n = len(buf)
    count = 0
    while True:
        if pos < n and count == RECORDS_MAX:
            raise Malformed("ClientHello cut into more than %d records" % RECORDS_MAX)
        count += 1
        if pos + 5 > n:
            if pos + 5 > HELLO_MAX:
                raise Malformed("ClientHello records longer than %d bytes" % HELLO_MAX)
            if n > pos:
                _check_record_head(buf, pos, n)
            return None
        length = _check_record_head(buf, pos, n)
        end = pos + 5 + length
        if end > HELLO_MAX:
            raise Malformed("ClientHello records longer than %d bytes" % HELLO_MAX)
        if end > n:
            # the record is still arriving: check what can be checked already
            if not hs and n - pos > 5 and buf[pos + 5] != 1:
                raise Malformed("first handshake message is not a ClientHello")
            return None
        hs += buf[pos + 5:end]
        pos = end
        if hs[0] != 1:
            raise Malformed("first handshake message is not a ClientHello")
        if len(hs) < 4:
            continue
        mlen = (hs[1] << 16) | (hs[2] << 8) | hs[3]
        if mlen + 4 > HELLO_MAX:
            raise Malformed("ClientHello longer than %d bytes" % HELLO_MAX)
        if len(hs) < mlen + 4:
            continue
        if len(hs) > mlen + 4:
            raise Malformed("bytes after the ClientHello in its record")
        return Hello(_hello_body(memoryview(bytes(hs))[4:]), pos)


def _check_record_head(buf: bytes, pos: int, n: int) -> int:
    """Checks the (possibly partial) record header at pos; its length when complete."""
    if buf[pos] != 0x16:
        raise Malformed("record type %d before the ClientHello" % buf[pos])
    if n > pos + 1 and buf[pos + 1] != 3:
        raise Malformed("record version %d.x" % buf[pos + 1])
    if n > pos + 2 and not 1 <= buf[pos + 2] <= 3:
        raise Malformed("record version 3.%d" % buf[pos + 2])
    if n < pos + 5:
        return 0
    length = _u16(buf, pos + 3)
    if length == 0 or length > RECORD_MAX:
        raise Malformed("record length %d" % length)
    return length


def _hello_body(b: memoryview) -> Optional[str]:
    n = len(b)

    def need(i: int, k: int, what: str) -> None:
        if i + k > n:
            raise Malformed(f"ClientHello cut short in {what}")

    need(0, 34, "version and random")
    if b[0] != 3 or not 1 <= b[1] <= 3:
        raise Malformed("ClientHello version %d.%d" % (b[0], b[1]))
    i = 34
    need(i, 1, "session id")
    sid = b[i]
    if sid > 32:
        raise Malformed("session id longer than 32 bytes")
    i += 1 + sid
    need(i, 2, "cipher suites")
    cs = _u16(b, i)
    if cs < 2 or cs % 2:
        raise Malformed("cipher suites length %d" % cs)
    i += 2
    need(i, cs, "cipher suites")
    i += cs
    need(i, 1, "compression methods")
    cm = b[i]
    if cm < 1:
        raise Malformed("no compression method")
    i += 1
    need(i, cm, "compression methods")
    i += cm
    if i == n:
        return None  # no extensions (TLS 1.2 allows it): no server name
    need(i, 2, "extensions")
    ext_len = _u16(b, i)
    i += 2
    if i + ext_len != n:
        raise Malformed("extensions length %d does not end the ClientHello" % ext_len)
    seen = set()
    name = None
    while i < n:
        need(i, 4, "an extension header")
        etype, elen = _u16(b, i), _u16(b, i + 2)
        i += 4
        need(i, elen, "an extension")
        if etype in seen:
            raise Malformed("extension %d repeated" % etype)
        seen.add(etype)
        if etype == 0:
            name = _server_name(b[i:i + elen])
        i += elen
    return name


def _server_name(e: memoryview) -> str:
    n = len(e)
    if n < 2 or _u16(e, 0) != n - 2 or n == 2:
        raise Malformed("server_name list length")
    i = 2
    name = None
    while i < n:
        if i + 3 > n:
            raise Malformed("server_name entry cut short")
        ntype, nlen = e[i], _u16(e, i + 1)
        i += 3
        if ntype != 0:
            raise Malformed("server_name type %d" % ntype)
        if nlen == 0 or i + nlen > n:
            raise Malformed("host_name length %d" % nlen)
        if name is not None:
            raise Malformed("more than one host_name")
        name = valid_name(bytes(e[i:i + nlen]))
        i += nlen
    return name


_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_.")


def valid_name(raw: bytes) -> str:
    """A server name as routes see it: ASCII letters, digits, '-', '_' in dot-separated labels
    of 1-63 bytes, at most 253 bytes; lowercased, one trailing dot dropped. Else Malformed."""
    name = bytes(c | 0x20 if 0x41 <= c <= 0x5A else c for c in raw)
    if name.endswith(b".") and len(name) > 1:
        name = name[:-1]
    if not name or len(name) > 253 or not _NAME_CHARS.issuperset(name):
        raise Malformed("host_name is not a DNS name")
    if any(not 1 <= len(label) <= 63 for label in name.split(b".")):
        raise Malformed("host_name has an empty or overlong label")
    return name.decode("ascii")


def alert(description: int) -> bytes:
    """A fatal TLS alert record (version 3.1, as a ClientHello's first record may be)."""
    return bytes((0x15, 3, 1, 0, 2, 2, description))
