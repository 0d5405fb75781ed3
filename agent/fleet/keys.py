"""Ed25519 signing keys for fleet policies: `keygen`, `load_private`, `load_public`, `key_id`.

The private key (PKCS8 PEM, unencrypted, mode 0600 from the moment the file exists) stays with
whoever publishes; PATH.pub (SubjectPublicKeyInfo PEM) goes to every gateway as its trust
anchor. `key_id` is the first 16 hex digits of sha256 over the raw 32 public bytes: the
envelope names the key it was signed with, so an agent can say "signed by another key" rather
than just "bad signature".
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)


class FleetKeyError(Exception):
    """A key file that can't be written or read; the message names the file and why."""


def pub_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.pub")


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    # Created with the final mode: a private key must never exist readable by others, even briefly.
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # an existing file overwritten with --force keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def keygen(path: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """Write a new private key to PATH (0600) and its public key to PATH.pub (0644).

    Refuses (FleetKeyError) to overwrite either file unless force. Returns both paths.
    """
    priv_p, pub_p = Path(path), pub_path(path)
    if not force:
        for p in (priv_p, pub_p):
            if p.exists():
                raise FleetKeyError(f"{p}: already exists (use --force to replace the key; agents "
                                    "trusting the old key will refuse policies signed with the new one)")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        _write_new(priv_p, priv, 0o600, force)
        _write_new(pub_p, pub, 0o644, force)
    except FileExistsError as e:
        raise FleetKeyError(f"{e.filename}: already exists (use --force to replace the key)") from None
    except OSError as e:
        raise FleetKeyError(f"{e.filename or path}: {e.strerror}") from None
    return priv_p, pub_p


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise FleetKeyError(f"{path}: cannot read the {what}: {e.strerror}") from None


def load_private(path: str | os.PathLike) -> Ed25519PrivateKey:
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        hint = " (this is a public key: sign with the private one)" if b"PUBLIC KEY" in data else ""
        raise FleetKeyError(f"{path}: not a PEM private key{hint}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FleetKeyError(f"{path}: not an Ed25519 key ({type(key).__name__}); make one with "
                            "`bulkhead fleet keygen`")
    return key


def load_public(path: str | os.PathLike) -> Ed25519PublicKey:
    data = _read(path, "trusted public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        hint = " (this is a private key: give the agent FILE.pub)" if b"PRIVATE KEY" in data else ""
        raise FleetKeyError(f"{path}: not a PEM public key{hint}: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise FleetKeyError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]
