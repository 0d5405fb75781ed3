"""The signed, revisioned policy envelope every gateway verifies before it applies anything.

    msgpack {"format": 2, "revision": N, "published_at": float, "key_id": hex16,
             "encoding": "zlib" | "identity", "digest": sha256 hex of the stored bundle bytes,
             "bundle": bytes (Bundle.pack(), compressed as `encoding` says), "sig": bytes}

The signature covers SIGN_CONTEXT + msgpack([format, revision, published_at, key_id, encoding,
digest, bundle]): the revision is signed, so a store writer without the key can neither forge a
policy nor relabel an old one as new (replay is refused by the agent's revision check instead).
`open_verified` checks shape, key id, digest and signature before anything decompresses or
unpacks the bundle: zlib and the bundle parser never see bytes the trusted key did not sign.

Why compressed: every watching gateway receives the whole envelope, base64 inside etcd's JSON
gateway, on every publish; a 10k-rule bundle shrinks about 7x with zlib level 1 (docs/benchmarks.md,
Fleet), and that fan-out is what bounds publish-to-all-acknowledged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import zlib
from collections.abc import Sequence

import msgpack
from bulkhead.fleet.keys import key_id as _key_id
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

ENVELOPE_FORMAT = 2
SIGN_CONTEXT = b"bulkhead-policy-v2\0"
MAX_ENVELOPE = 64 << 20  # bytes; far above a 100k-rule bundle, bounds what a store writer can make us parse
MAX_BUNDLE = 256 << 20   # bytes of a decompressed bundle (the control socket's frame limit)
ENCODINGS = ("zlib", "identity")
ZLIB_LEVEL = 1           # 7.7x on a 10k-rule bundle in 3.4 ms; higher levels buy little more
FIELDS = {"format", "revision", "published_at", "key_id", "encoding", "digest", "bundle", "sig"}


class EnvelopeError(Exception):
    """Why an envelope is refused: str(e) is the reason, e.reason a short tag for status/metrics."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Sealed:
    revision: int
    digest: str
    bundle: bytes  # Bundle.pack() bytes, verified and decompressed; Bundle.unpack them to use
    key_id: str
    published_at: float


def _signed_message(fmt: int, revision: int, published_at: float, kid: str, encoding: str,
                    digest: str, bundle: bytes) -> bytes:
    return SIGN_CONTEXT + msgpack.packb([fmt, revision, published_at, kid, encoding, digest, bundle],
                                        use_bin_type=True)


def seal(bundle_bytes: bytes, revision: int, private_key: Ed25519PrivateKey,
         published_at: float | None = None, encoding: str = "zlib") -> bytes:
    """The envelope for `bundle_bytes` at `revision`, signed with `private_key`."""
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
        raise ValueError(f"revision must be a positive integer, not {revision!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    if len(bundle_bytes) > MAX_BUNDLE:
        raise ValueError(f"bundle of {len(bundle_bytes)} bytes exceeds {MAX_BUNDLE}")
    published_at = float(time.time() if published_at is None else published_at)
    kid = _key_id(private_key.public_key())
    stored = zlib.compress(bundle_bytes, ZLIB_LEVEL) if encoding == "zlib" else bytes(bundle_bytes)
    digest = hashlib.sha256(stored).hexdigest()
    sig = private_key.sign(_signed_message(ENVELOPE_FORMAT, revision, published_at, kid, encoding,
                                           digest, stored))
    return msgpack.packb({"format": ENVELOPE_FORMAT, "revision": revision,
                          "published_at": published_at, "key_id": kid, "encoding": encoding,
                          "digest": digest, "bundle": stored, "sig": sig}, use_bin_type=True)


def _decompress(d: dict) -> bytes:
    """The verified bundle bytes as Bundle.pack() made them; bounded, so a signed but absurd
    bundle (a key holder's mistake) can't exhaust memory."""
    if d["encoding"] == "identity":
        return bytes(d["bundle"])
    z = zlib.decompressobj()
    try:
        out = z.decompress(d["bundle"], MAX_BUNDLE)
    except zlib.error as e:
        raise EnvelopeError("malformed", f"malformed envelope: revision {d['revision']}'s bundle does not "
                            f"decompress ({e})") from None
    if z.unconsumed_tail or not z.eof:
        raise EnvelopeError("malformed", f"malformed envelope: revision {d['revision']}'s bundle is truncated "
                            f"or decompresses to more than {MAX_BUNDLE} bytes")
    return out


def _unpack(raw: bytes) -> dict:
    if not isinstance(raw, (bytes, bytearray)):
        raise EnvelopeError("malformed", f"malformed envelope: {type(raw).__name__}, not bytes")
    if len(raw) > MAX_ENVELOPE:
        raise EnvelopeError("malformed", f"malformed envelope: {len(raw)} bytes (at most {MAX_ENVELOPE})")
    try:
        d = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise EnvelopeError("malformed", f"malformed envelope: not msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise EnvelopeError("malformed", f"malformed envelope: a {type(d).__name__}, not a map")
    if "format" in d and d["format"] != ENVELOPE_FORMAT:
        raise EnvelopeError("format", f"unsupported envelope format {d['format']!r} "
                            f"(this agent reads format {ENVELOPE_FORMAT}; upgrade it)")
    missing, extra = FIELDS - set(d), set(d) - FIELDS
    if missing or extra:
        what = [f"missing {sorted(missing)}"] * bool(missing) + [f"unknown {sorted(extra)}"] * bool(extra)
        raise EnvelopeError("malformed", f"malformed envelope: fields {', '.join(what)}")
    types = {"revision": int, "published_at": float, "key_id": str, "encoding": str, "digest": str,
             "bundle": bytes, "sig": bytes}
    for name, t in types.items():
        if not isinstance(d[name], t) or isinstance(d[name], bool):
            raise EnvelopeError("malformed", f"malformed envelope: {name} is a {type(d[name]).__name__}, "
                                f"not {t.__name__}")
    if d["revision"] < 1 or not math.isfinite(d["published_at"]):
        raise EnvelopeError("malformed", "malformed envelope: revision below 1 or published_at not finite")
    if d["encoding"] not in ENCODINGS:
        raise EnvelopeError("malformed", f"malformed envelope: encoding {d['encoding']!r} is not one of "
                            f"{', '.join(ENCODINGS)}")
    return d


def peek_revision(raw: bytes) -> int | None:
    """The revision an envelope claims, unverified (publish uses it only to go above it), or None."""
    try:
        return _unpack(raw)["revision"]
    except EnvelopeError:
        return None


def peek_bundle(raw: bytes) -> bytes | None:
    """The bundle bytes an envelope carries, UNVERIFIED (fleet status only reads the gateway names
    to list the ones that never reported; nothing applies them), or None."""
    try:
        return _decompress(_unpack(raw))
    except EnvelopeError:
        return None


def open_verified(raw: bytes, public_key: Ed25519PublicKey | Sequence[Ed25519PublicKey]) -> Sealed:
    """Check `raw` against the trusted key (or keys: during a rotation a gateway trusts the old and
    the new one); the verified content, or EnvelopeError(reason)."""
    d = _unpack(raw)
    trusted = {_key_id(k): k for k in ((public_key,) if isinstance(public_key, Ed25519PublicKey) else public_key)}
    if d["key_id"] not in trusted:
        names = ", ".join(sorted(trusted))
        raise EnvelopeError("key", f"signed by key {d['key_id']}, not the trusted key{'s' if len(trusted) > 1 else ''} {names}")
    public_key = trusted[d["key_id"]]
    # The digest first, only because it names the cheaper, clearer fault (bundle bytes changed);
    # the signature below covers the digest and the bundle both, so neither check alone is trusted.
    if hashlib.sha256(d["bundle"]).hexdigest() != d["digest"]:
        raise EnvelopeError("digest", f"digest mismatch: revision {d['revision']}'s bundle is not the "
                            "one its digest names (altered in the store?)")
    msg = _signed_message(d["format"], d["revision"], d["published_at"], d["key_id"], d["encoding"],
                          d["digest"], d["bundle"])
    try:
        public_key.verify(d["sig"], msg)
    except InvalidSignature:
        raise EnvelopeError("signature", f"signature invalid (revision {d['revision']} claims key "
                            f"{d['key_id']}: altered in the store?)") from None
    return Sealed(revision=d["revision"], digest=d["digest"], bundle=_decompress(d),
                  key_id=d["key_id"], published_at=d["published_at"])
