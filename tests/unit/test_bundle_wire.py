"""Bundle.pack/unpack: the checksum read off the bytes, the slow path for other layouts, and the
packed bytes an unpacked bundle hands on."""
from __future__ import annotations

import hashlib

import msgpack
import pytest

from bulkhead.core.paths import REPO
from bulkhead.policy import bundle as bundle_mod
from bulkhead.policy import load_policy
from bulkhead.policy.bundle import Bundle


@pytest.fixture(scope="module")
def packed() -> bytes:
    b, _ = load_policy([str(REPO / "policies" / "example.yaml")])
    return b.pack()


def test_roundtrip_keeps_bytes_and_checksum(packed):
    b = Bundle.unpack(packed)
    assert b.pack() == packed
    d = msgpack.unpackb(packed, raw=False)
    assert b.checksum == d["checksum"]
    fresh = Bundle(**{k: getattr(b, k) for k in b.__dataclass_fields__})  # no remembered bytes
    assert fresh.pack() == packed and fresh.checksum == b.checksum


def test_checksum_is_read_off_the_bytes(packed, monkeypatch):
    def no_repack(content):
        raise AssertionError("unpack re-packed a bundle laid out as pack() writes it")

    monkeypatch.setattr(Bundle, "_digest", staticmethod(no_repack))
    Bundle.unpack(packed)


def test_a_flipped_byte_is_refused(packed):
    i = packed.index(b"payments") + 2  # inside the content, not the checksum entry
    bad = packed[:i] + bytes([packed[i] ^ 0x01]) + packed[i + 1:]
    with pytest.raises(ValueError, match="checksum mismatch"):
        Bundle.unpack(bad)


def test_another_layout_is_checked_by_re_packing(packed):
    """The checksum first, not last: the fast check can't read it, the re-pack verifies."""
    d = msgpack.unpackb(packed, raw=False)
    checksum = d.pop("checksum")
    other = msgpack.packb({"checksum": checksum, **d}, use_bin_type=True)
    assert not bundle_mod._checksum_covers(other, checksum)
    assert Bundle.unpack(other).checksum == checksum
    wrong = msgpack.packb({"checksum": hashlib.sha256(b"x").hexdigest(), **d}, use_bin_type=True)
    with pytest.raises(ValueError, match="checksum mismatch"):
        Bundle.unpack(wrong)
