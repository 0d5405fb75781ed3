"""Fleet keys and envelopes without etcd: what verifies, and every way a bundle is refused.

Each refusal must name its reason (EnvelopeError.reason and a message an operator can act on),
because the agent puts that text in its status key and `bulkhead fleet status` shows it.
"""
from __future__ import annotations

import hashlib
import os
import stat

import msgpack
import pytest
from bulkhead.cli.main import main
from bulkhead.fleet import envelope, keys
from bulkhead.fleet.envelope import EnvelopeError, open_verified, seal
from bulkhead.policy import Bundle
from click.testing import CliRunner

BUNDLE = Bundle(settings={"default_action": "deny", "mode": "enforce", "unknown_sni": "deny"},
                segments=[{"id": 1, "name": "prod", "interfaces": ["bh-prod"]}], apps=[], rules=[],
                src_entries=[], dst_entries=[], policy_entries=[]).pack()


@pytest.fixture
def keypair(tmp_path):
    priv, pub = keys.keygen(tmp_path / "fleet.key")
    return keys.load_private(priv), keys.load_public(pub)


@pytest.fixture
def other(tmp_path):
    priv, pub = keys.keygen(tmp_path / "other.key")
    return keys.load_private(priv), keys.load_public(pub)


def _fields(raw: bytes) -> dict:
    return msgpack.unpackb(raw, raw=False)


def _repack(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def refused(raw, pub) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as ei:
        open_verified(raw, pub)
    return ei.value


# ---------------------------------------------------------------- keys
def test_keygen_writes_a_private_key_0600_and_a_public_one(tmp_path):
    priv, pub = keys.keygen(tmp_path / "k")
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert pub == tmp_path / "k.pub"
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes() and b"BEGIN PUBLIC KEY" in pub.read_bytes()
    assert keys.key_id(keys.load_public(pub)) == keys.key_id(keys.load_private(priv))
    assert len(keys.key_id(keys.load_public(pub))) == 16


def test_keygen_refuses_to_overwrite_without_force(tmp_path):
    priv, pub = keys.keygen(tmp_path / "k")
    before = priv.read_bytes()
    with pytest.raises(keys.FleetKeyError, match="already exists"):
        keys.keygen(tmp_path / "k")
    assert priv.read_bytes() == before
    os.chmod(priv, 0o644)
    keys.keygen(tmp_path / "k", force=True)
    assert priv.read_bytes() != before
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600  # --force fixes a loosened mode too


def test_the_private_key_is_never_readable_by_others_even_with_a_loose_umask(tmp_path):
    old = os.umask(0)
    try:
        priv, _ = keys.keygen(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600


def test_loading_the_wrong_kind_of_file_says_what_it_is(tmp_path):
    priv, pub = keys.keygen(tmp_path / "k")
    with pytest.raises(keys.FleetKeyError, match="this is a public key"):
        keys.load_private(pub)
    with pytest.raises(keys.FleetKeyError, match="this is a private key"):
        keys.load_public(priv)
    with pytest.raises(keys.FleetKeyError, match="cannot read"):
        keys.load_public(tmp_path / "missing.pub")
    (tmp_path / "junk").write_text("hello")
    with pytest.raises(keys.FleetKeyError, match="not a PEM"):
        keys.load_private(tmp_path / "junk")


# ---------------------------------------------------------------- envelopes
def test_a_sealed_bundle_opens_with_its_revision_digest_and_bytes(keypair):
    priv, pub = keypair
    raw = seal(BUNDLE, 7, priv, published_at=1234.5)
    s = open_verified(raw, pub)
    assert (s.revision, s.bundle, s.published_at) == (7, BUNDLE, 1234.5)
    d = _fields(raw)
    assert d["encoding"] == "zlib" and len(d["bundle"]) < len(BUNDLE)  # stored compressed
    assert s.digest == hashlib.sha256(d["bundle"]).hexdigest() == d["digest"]
    assert s.key_id == keys.key_id(pub)
    assert Bundle.unpack(s.bundle).segments[0]["name"] == "prod"
    plain = open_verified(seal(BUNDLE, 8, priv, encoding="identity"), pub)
    assert plain.bundle == BUNDLE and plain.digest == hashlib.sha256(BUNDLE).hexdigest()


def test_a_signed_bundle_that_does_not_decompress_is_malformed(keypair, monkeypatch):
    """zlib sees only signed bytes; a signed stream that is cut or too big is still refused."""
    import zlib

    from bulkhead.fleet import envelope
    priv, pub = keypair
    cut = zlib.compress(BUNDLE, 1)[:-5]
    monkeypatch.setattr(envelope.zlib, "compress", lambda data, level: cut)
    e = refused(seal(BUNDLE, 3, priv), pub)
    assert e.reason == "malformed" and "truncated" in str(e)
    monkeypatch.undo()
    raw = seal(BUNDLE, 4, priv)  # well-formed, but larger than this agent will inflate
    monkeypatch.setattr(envelope, "MAX_BUNDLE", len(BUNDLE) - 1)
    e = refused(raw, pub)
    assert e.reason == "malformed" and f"more than {len(BUNDLE) - 1} bytes" in str(e)


def test_a_tampered_bundle_is_refused(keypair):
    priv, pub = keypair
    d = _fields(seal(BUNDLE, 3, priv))
    d["bundle"] = d["bundle"][:-1] + bytes([d["bundle"][-1] ^ 1])
    e = refused(_repack(d), pub)
    assert e.reason == "digest" and "digest mismatch" in str(e)
    # ... and with the digest fixed to match, the signature still doesn't cover it
    d["digest"] = hashlib.sha256(d["bundle"]).hexdigest()
    e = refused(_repack(d), pub)
    assert e.reason == "signature" and "signature invalid" in str(e)


def test_a_tampered_revision_is_refused(keypair):
    """Relabelling an old envelope as new (to get it past the agent's replay check) breaks the signature."""
    priv, pub = keypair
    d = _fields(seal(BUNDLE, 3, priv))
    d["revision"] = 99
    e = refused(_repack(d), pub)
    assert e.reason == "signature" and "revision 99" in str(e)


@pytest.mark.parametrize("field, value", [("published_at", 1.0), ("sig", b"\0" * 64)])
def test_any_other_signed_field_changed_is_refused(keypair, field, value):
    priv, pub = keypair
    d = _fields(seal(BUNDLE, 3, priv))
    d[field] = value
    assert refused(_repack(d), pub).reason == "signature"


def test_a_bundle_signed_by_another_key_is_refused_naming_both_keys(keypair, other):
    _, pub = keypair
    other_priv, other_pub = other
    e = refused(seal(BUNDLE, 3, other_priv), pub)
    assert e.reason == "key"
    assert keys.key_id(other_pub) in str(e) and keys.key_id(pub) in str(e)


def test_another_key_claiming_the_trusted_key_id_is_refused_by_the_signature(keypair, other):
    priv, pub = keypair
    other_priv, _ = other
    d = _fields(seal(BUNDLE, 3, other_priv))
    d["key_id"] = keys.key_id(pub)
    assert refused(_repack(d), pub).reason == "signature"


@pytest.mark.parametrize("raw, says", [
    (b"", "not msgpack"),
    (b"\xc1garbage", "not msgpack"),
    (msgpack.packb([1, 2, 3]), "not a map"),
    (msgpack.packb({"format": 2}), "missing"),
    ("text", "not bytes"),
])
def test_malformed_envelopes_are_refused(keypair, raw, says):
    _, pub = keypair
    e = refused(raw, pub)
    assert e.reason == "malformed" and says in str(e)


def test_wrong_field_types_and_extra_fields_are_malformed(keypair):
    priv, pub = keypair
    good = _fields(seal(BUNDLE, 3, priv))
    for field, value in [("revision", "3"), ("revision", True), ("revision", 0),
                         ("bundle", "text"), ("published_at", 3)]:
        d = dict(good, **{field: value})
        assert refused(_repack(d), pub).reason == "malformed", (field, value)
    assert "unknown ['x']" in str(refused(_repack(dict(good, x=1)), pub))


def test_a_different_format_is_refused_as_such(keypair):
    priv, pub = keypair
    d = _fields(seal(BUNDLE, 3, priv))
    d["format"] = 1  # the uncompressed envelopes of before: an older publisher
    e = refused(_repack(d), pub)
    assert e.reason == "format" and "format 1" in str(e)


def test_the_signature_covers_a_context_string(keypair):
    """A signature made over the bare fields (another use of the same key) is not an envelope's."""
    priv, pub = keypair
    d = _fields(seal(BUNDLE, 3, priv))
    d["sig"] = priv.sign(msgpack.packb([2, 3, d["published_at"], d["key_id"], d["encoding"], d["digest"],
                                        d["bundle"]], use_bin_type=True))
    assert refused(_repack(d), pub).reason == "signature"


def test_seal_refuses_a_revision_below_one(keypair):
    priv, _ = keypair
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            seal(BUNDLE, bad, priv)


def test_peek_revision_reads_unverified_and_never_raises(keypair):
    priv, _ = keypair
    assert envelope.peek_revision(seal(BUNDLE, 41, priv)) == 41
    assert envelope.peek_revision(b"junk") is None


# ---------------------------------------------------------------- CLI (no etcd needed)
def test_cli_keygen_and_its_refusal(tmp_path):
    r = CliRunner().invoke(main, ["fleet", "keygen", "--key", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    assert "key id" in r.output and (tmp_path / "k.pub").exists()
    r = CliRunner().invoke(main, ["fleet", "keygen", "--key", str(tmp_path / "k")])
    assert r.exit_code == 2 and "already exists" in r.output


def test_cli_bad_etcd_url_is_bad_input(tmp_path):
    r = CliRunner().invoke(main, ["fleet", "status", "--etcd", "etcd1:2379"])
    assert r.exit_code == 2 and "expected http(s)://HOST:PORT" in r.output
    r = CliRunner().invoke(main, ["fleet", "status"], env={"BULKHEAD_ETCD": ""})
    assert r.exit_code == 2 and "--etcd" in r.output


# ---------------------------------------------------------------- URLs and --wait's rule
@pytest.mark.parametrize("text, urls", [
    ("http://127.0.0.1:2379", ["http://127.0.0.1:2379"]),
    (" http://a:1, https://b:2/ ,http://a:1", ["http://a:1", "https://b:2"]),
    (["http://a:1,http://b:2", "http://c:3"], ["http://a:1", "http://b:2", "http://c:3"]),
    ("http://[fd00::1]:2379", ["http://[fd00::1]:2379"]),
])
def test_parse_urls(text, urls):
    from bulkhead.fleet.store import parse_urls
    assert parse_urls(text) == urls


@pytest.mark.parametrize("text", ["", " , ", "127.0.0.1:2379", "http://a", "http://a:99999",
                                  "ftp://a:1", "http://a:1/v3", "http://u@a:1"])
def test_parse_urls_refuses(text):
    from bulkhead.fleet.store import parse_urls
    with pytest.raises(ValueError, match="etcd URL"):
        parse_urls(text)


def test_wait_counts_live_gateways_only_and_needs_one():
    from bulkhead.fleet.status import done

    def gw(alive, applied):
        return {"alive": alive, "applied_revision": applied}
    assert done({"gateways": [gw(True, 3), gw(False, 1)]}, 3)
    assert not done({"gateways": [gw(True, 3), gw(True, 2)]}, 3)
    assert not done({"gateways": [gw(True, None)]}, 1)  # alive, never applied anything
    assert not done({"gateways": [gw(False, 9)]}, 1)
    assert not done({"gateways": []}, 1)


def test_a_rotation_trusts_several_keys_and_the_signature_is_checked_with_the_named_one(keypair, other, tmp_path):
    (old_priv, old_pub), (new_priv, new_pub) = keypair, other
    both = [old_pub, new_pub]
    assert open_verified(seal(BUNDLE, 1, old_priv), both).revision == 1
    assert open_verified(seal(BUNDLE, 2, new_priv), both).key_id == keys.key_id(new_pub)
    third_priv, _ = keys.keygen(tmp_path / "third.key")
    e = refused(seal(BUNDLE, 3, keys.load_private(third_priv)), both)
    assert e.reason == "key" and "not the trusted keys" in str(e)
    # The key id names which trusted key must verify: a signature by another key under a
    # trusted id is still refused.
    d = _fields(seal(BUNDLE, 4, keys.load_private(third_priv)))
    d["key_id"] = keys.key_id(new_pub)
    assert refused(_repack(d), both).reason == "signature"
