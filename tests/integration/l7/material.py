"""Keys, certificates, tokens and the policy for the L7 cases, generated per session.

    m = Material.create(tmpdir)      # writes everything into tmpdir
    m.policy_path                    # policy.yaml with real key paths
    m.jwt("hs", aud="catalog")       # a signed bearer token
    m.api_keys[0]                    # a valid API key

Nothing here touches the network. Key files stay in the temp dir the caller owns.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import secrets
import time
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "policy.yaml"

VAULT_NAME = "vault.l7.internal"
ISSUER = "l7-issuer"


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _cert(subject_cn: str, key, issuer_name, issuer_key, *, ca: bool, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
         .issuer_name(issuer_name)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclasses.dataclass
class Material:
    dir: Path
    policy_path: Path
    ca_file: Path
    vault_cert: Path
    vault_key: Path
    api_keys: list
    _hs_secret: bytes
    _rs_key: object
    _es_key: object
    _other_rs_key: object

    @classmethod
    def create(cls, directory, template: Path = TEMPLATE) -> "Material":
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        # CA and the vault app's certificate (EC keys: fast to make)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bulkhead l7 test CA")])
        ca_cert = _cert("bulkhead l7 test CA", ca_key, ca_name, ca_key, ca=True)
        vault_key = ec.generate_private_key(ec.SECP256R1())
        vault_cert = _cert(VAULT_NAME, vault_key, ca_name, ca_key, ca=False,
                           sans=[VAULT_NAME, "other.l7.internal"])
        (d / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        (d / "vault.crt").write_bytes(vault_cert.public_bytes(serialization.Encoding.PEM))
        (d / "vault.key").write_bytes(_pem_private(vault_key))
        os.chmod(d / "vault.key", 0o600)
        # JWT keys
        hs = secrets.token_urlsafe(48).encode()
        (d / "hs256.secret").write_bytes(hs + b"\n")
        rs = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (d / "rs256.pub").write_bytes(_pem_public(rs))
        es = ec.generate_private_key(ec.SECP256R1())
        (d / "es256.pub").write_bytes(_pem_public(es))
        other_rs = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        # API keys
        keys = [secrets.token_urlsafe(24), secrets.token_urlsafe(24)]
        (d / "api.keys").write_text("# test API keys\n" + "\n".join(keys) + "\n")
        policy = d / "policy.yaml"
        policy.write_text(template.read_text().replace("{dir}", str(d)))
        return cls(d, policy, d / "ca.crt", d / "vault.crt", d / "vault.key", keys, hs, rs, es, other_rs)

    def jwt(self, kind: str, *, wrong_key: bool = False, exp_in: float = 300, **claims) -> str:
        """A bearer token: kind hs|rs|es; claims default to iss=l7-issuer, aud=catalog, sub=shop-svc."""
        now = int(time.time())
        body = {"iss": ISSUER, "aud": "catalog", "sub": "shop-svc", "iat": now, "exp": int(now + exp_in)}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        if kind == "hs":
            key = self._hs_secret if not wrong_key else secrets.token_bytes(48)
            return jwt.encode(body, key, algorithm="HS256")
        if kind == "rs":
            return jwt.encode(body, self._other_rs_key if wrong_key else self._rs_key, algorithm="RS256")
        if kind == "es":
            key = ec.generate_private_key(ec.SECP256R1()) if wrong_key else self._es_key
            return jwt.encode(body, key, algorithm="ES256")
        raise ValueError(kind)
