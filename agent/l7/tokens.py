"""Credential checks for L7 rules: bearer JWTs and API keys.

A `tokens:` item compiles to a verifier (`compile_token`), which checks one
request's headers (`check(get_header, now)`). Key material is loaded when
the rule is compiled, so a missing or unusable key file is a policy error,
not a runtime surprise.

Nothing secret ever leaves this module: reasons are fixed strings plus names
from the policy, and reprs show file paths only. API keys are kept as
SHA-256 digests.

JWT: the key file decides the algorithm family — a PEM RSA key or
certificate -> RS256 (RS384/RS512/PS256/PS384/PS512 when listed), EC P-256 ->
ES256 (P-384 ES384, P-521 ES512), Ed25519 -> EdDSA; a file that is not PEM
is an HMAC secret (HS256/HS384/HS512) of at least 32 bytes. `none` and any
algorithm of another family are refused at compile time; PyJWT refuses
tokens whose header names an algorithm not in the list. The signature is
checked once per token string (bounded LRU cache); the claims (exp, nbf,
iss, aud, sub, scope) are checked on every request against `now`, so a
cached token still expires on time.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

__all__ = ["REPEATED", "JwtVerifier", "ApiKeyVerifier", "compile_token", "LEEWAY"]

# get_header(name) returns the value, None (absent), or REPEATED.
REPEATED = object()
HeaderGetter = Callable[[str], Any]

LEEWAY = 30.0  # seconds of clock skew allowed for exp / nbf
MIN_SECRET = 32  # bytes of an HMAC secret
CACHE_SIZE = 1024  # verified tokens kept per verifier
MAX_TOKEN = 16384

JWT_KEYS = ("jwt", "algorithms", "iss", "aud", "sub", "scope")
API_KEY_KEYS = ("api_key", "header")

RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
HMAC_ALGS = ("HS256", "HS384", "HS512")
EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
ALL_ALGS = RSA_ALGS + HMAC_ALGS + tuple(EC_ALGS.values()) + ("EdDSA",)

_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_KEY_OK = re.compile(r"[\x21-\x7e]+")

Problems = list  # list[tuple[tuple, str]]: (where below the item, message)


def _describe(v: Any) -> str:
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if v is None:
        return "nothing (null)"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {v!r}"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return type(v).__name__


def resolve(path: str, base_dir: Optional[str]) -> str:
    """A policy path made absolute: relative to the policy file's directory."""
    if not os.path.isabs(path) and base_dir:
        path = os.path.join(base_dir, path)
    return os.path.abspath(path)


def bearer(value: Any) -> Optional[str]:
    """The token of an `Authorization: Bearer <token>` value, or None."""
    if not isinstance(value, str):
        return None
    m = _BEARER.fullmatch(value)
    return m.group(1) if m else None


# ------------------------------------------------------------------- JWT --

class JwtVerifier:
    """One `{jwt: KEYFILE, ...}` item."""

    kind = "jwt"

    def __init__(self, path: str, key: Any, algorithms: list[str], iss: Optional[str],
                 aud: Optional[str], sub: Optional[str], scopes: tuple[str, ...]):
        self.path = path
        self._key = key
        self.algorithms = algorithms
        self.iss, self.aud, self.sub, self.scopes = iss, aud, sub, scopes
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._jwt = jwt.PyJWT()
        self._options = {"verify_signature": True, "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False, "verify_aud": False, "verify_iss": False, "require": []}

    def __repr__(self) -> str:
        return f"JwtVerifier({self.path!r}, algorithms={self.algorithms})"

    def check(self, get_header: HeaderGetter, now: Optional[float] = None) -> tuple[bool, str, bool]:
        """(ok, reason, a credential was presented)."""
        value = get_header("authorization")
        if value is None:
            return False, "missing bearer token", False
        if value is REPEATED:
            return False, "header authorization repeated", True
        token = bearer(value)
        if token is None:
            return False, "missing bearer token", False
        claims = self.verified_claims(token)
        if isinstance(claims, str):
            return False, claims, True
        reason = self.check_claims(claims, time.time() if now is None else now)
        return reason is None, reason or "token accepted", True

    def verified_claims(self, token: str):
        """The token's claims if its signature verifies, else a reason (cached either way)."""
        cache = self._cache
        hit = cache.get(token)
        if hit is not None:
            cache.move_to_end(token)
            return hit
        result = self._verify(token)
        cache[token] = result
        if len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
        return result

    def _verify(self, token: str):
        if len(token) > MAX_TOKEN or not _JWS.fullmatch(token):
            return "token malformed"
        try:
            claims = self._jwt.decode(token, self._key, algorithms=self.algorithms, options=self._options)
        except jwt.InvalidSignatureError:
            return "token signature invalid"
        except jwt.InvalidAlgorithmError:
            return "token algorithm not accepted"
        except (jwt.DecodeError, jwt.InvalidKeyError):
            return "token malformed"
        except jwt.PyJWTError:
            return "token invalid"
        except Exception:  # noqa: BLE001 — a hostile token must never crash the proxy
            return "token invalid"
        if not isinstance(claims, dict):
            return "token malformed"
        return claims

    def check_claims(self, claims: dict, now: float) -> Optional[str]:
        exp = claims.get("exp")
        if exp is None:
            return "token lacks exp claim"
        if not _is_number(exp):
            return "token exp claim invalid"
        if now > exp + LEEWAY:
            return "token expired"
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _is_number(nbf):
                return "token nbf claim invalid"
            if now + LEEWAY < nbf:
                return "token not yet valid"
        if self.iss is not None and claims.get("iss") != self.iss:
            return "token issuer mismatch"
        if self.aud is not None:
            aud = claims.get("aud")
            if not (aud == self.aud or (isinstance(aud, list) and self.aud in aud)):
                return "token audience mismatch"
        if self.sub is not None and claims.get("sub") != self.sub:
            return "token subject mismatch"
        if self.scopes:
            have: set = set()
            scope = claims.get("scope")
            if isinstance(scope, str):
                have.update(scope.split())
            scp = claims.get("scp")
            if isinstance(scp, list):
                have.update(s for s in scp if isinstance(s, str))
            elif isinstance(scp, str):
                have.update(scp.split())
            for s in self.scopes:
                if s not in have:
                    return f"token scope lacks {s}"
        return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_jwt_key(path: str) -> tuple[Any, tuple[str, ...], str]:
    """(key for PyJWT, algorithms the key allows, default algorithm). Raises ValueError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read key file {path}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        secret = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
        if len(secret) < MIN_SECRET:
            raise ValueError(f"key file {path}: not a PEM key or certificate, and as an HMAC secret it is "
                             f"{len(secret)} bytes; HS256 secrets must be at least {MIN_SECRET} bytes")
        return secret, HMAC_ALGS, "HS256"
    if b"PRIVATE KEY-----" in data:
        raise ValueError(f"key file {path} holds a private key: give the public key or certificate")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except Exception:  # noqa: BLE001 — cryptography raises several types
        raise ValueError(f"key file {path}: not a readable PEM public key or certificate") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"key file {path}: RSA key of {key.key_size} bits; at least 2048 are required")
        return key, RSA_ALGS, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGS.get(key.curve.name)
        if alg is None:
            raise ValueError(f"key file {path}: EC curve {key.curve.name} is not supported "
                             "(P-256, P-384, P-521)")
        return key, (alg,), alg
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key, ("EdDSA",), "EdDSA"
    raise ValueError(f"key file {path}: unsupported key type {type(key).__name__}")


def _compile_jwt(item: dict, base_dir: Optional[str], problems: Problems) -> Optional[JwtVerifier]:
    path = item.get("jwt")
    key = allowed = default = None
    if not isinstance(path, str) or not path:
        problems.append((("jwt",), f"jwt must be a key file path, got {_describe(path)}"))
        path = None
    else:
        path = resolve(path, base_dir)
        try:
            key, allowed, default = load_jwt_key(path)
        except ValueError as e:
            problems.append((("jwt",), str(e)))
    algorithms = [default] if default else []
    if "algorithms" in item:
        algs = item["algorithms"]
        if not isinstance(algs, list) or not algs:
            problems.append((("algorithms",), f"algorithms must be a non-empty list like [RS256], "
                                              f"got {_describe(algs)}"))
        else:
            algorithms = []
            for i, a in enumerate(algs):
                if not isinstance(a, str):
                    problems.append((("algorithms", i), f"algorithm must be a string, got {_describe(a)}"))
                elif a.lower() == "none":
                    problems.append((("algorithms", i), "algorithm none is never accepted: tokens must be signed"))
                elif a not in ALL_ALGS:
                    problems.append((("algorithms", i), f"unknown algorithm {a!r}; known: {', '.join(ALL_ALGS)}"))
                elif allowed is not None and a not in allowed:
                    problems.append((("algorithms", i), f"algorithm {a} does not fit the key in {path} "
                                                        f"(it allows {', '.join(allowed)})"))
                elif a not in algorithms:
                    algorithms.append(a)
    claims: dict[str, Optional[str]] = {}
    for name in ("iss", "aud", "sub"):
        v = item.get(name)
        if v is not None and (not isinstance(v, str) or not v):
            problems.append(((name,), f"{name} must be a non-empty string, got {_describe(v)}"))
            v = None
        claims[name] = v
    scopes: list[str] = []
    if "scope" in item:
        sc = item["scope"]
        if isinstance(sc, str) and sc.split():
            scopes = sc.split()
        elif isinstance(sc, list) and sc:
            for i, s in enumerate(sc):
                if not isinstance(s, str) or not s or len(s.split()) != 1:
                    problems.append((("scope", i), f"each scope must be one word, got {_describe(s)}"))
                else:
                    scopes.append(s)
        else:
            problems.append((("scope",), f"scope must be a non-empty list of scopes, got {_describe(sc)}"))
    if key is None or not algorithms:
        return None
    return JwtVerifier(path, key, algorithms, claims["iss"], claims["aud"], claims["sub"], tuple(scopes))


# --------------------------------------------------------------- API keys --

class ApiKeyVerifier:
    """One `{api_key: KEYSFILE, header: NAME}` item; keys held as SHA-256 digests."""

    kind = "api_key"

    def __init__(self, path: str, header: str, digests: frozenset):
        self.path = path
        self.header = header
        self._digests = digests
        self._bearer = header == "authorization"

    def __repr__(self) -> str:
        return f"ApiKeyVerifier({self.path!r}, header={self.header!r}, keys={len(self._digests)})"

    def check(self, get_header: HeaderGetter, now: Optional[float] = None) -> tuple[bool, str, bool]:
        value = get_header(self.header)
        if value is None:
            return False, "missing api key", False
        if value is REPEATED:
            return False, f"header {self.header} repeated", True
        if self._bearer:
            value = bearer(value)
            if value is None:
                return False, "missing api key", False
        if hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest() in self._digests:
            return True, "api key accepted", True
        return False, "api key not accepted", True


def load_api_keys(path: str) -> frozenset:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read API key file {path}: {e.strerror or e}") from None
    digests = set()
    for n, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if not _KEY_OK.fullmatch(text):
            # Say where, never what: the line is a secret.
            raise ValueError(f"API key file {path}, line {n}: a key is printable ASCII without spaces")
        digests.add(hashlib.sha256(line).digest())
    if not digests:
        raise ValueError(f"API key file {path} holds no keys (one key a line; blank lines and # comments "
                         "are ignored)")
    return frozenset(digests)


def _compile_api_key(item: dict, base_dir: Optional[str], problems: Problems) -> Optional[ApiKeyVerifier]:
    path = item.get("api_key")
    digests = None
    if not isinstance(path, str) or not path:
        problems.append((("api_key",), f"api_key must be a key file path, got {_describe(path)}"))
        path = None
    else:
        path = resolve(path, base_dir)
        try:
            digests = load_api_keys(path)
        except ValueError as e:
            problems.append((("api_key",), str(e)))
    header = item.get("header", "x-api-key")
    if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header):
        problems.append((("header",), f"header must be a header name, got {_describe(header)}"))
        header = None
    if digests is None or header is None:
        return None
    return ApiKeyVerifier(path, header.lower(), digests)


# ----------------------------------------------------------------- compile --

def compile_token(item: Any, base_dir: Optional[str]) -> tuple[Optional[object], Problems]:
    """One `tokens:` item -> (verifier or None, problems as (where below the item, message))."""
    problems: Problems = []
    if not isinstance(item, dict):
        return None, [((), f"each tokens item must be a mapping like {{jwt: FILE}} or {{api_key: FILE}}, "
                           f"got {_describe(item)}")]
    if ("jwt" in item) == ("api_key" in item):
        return None, [((), "a tokens item needs exactly one of jwt (a key file) or api_key (a keys file)")]
    allowed = JWT_KEYS if "jwt" in item else API_KEY_KEYS
    for k in item:
        if k not in allowed:
            problems.append(((k,), f"unknown key {k!r} in a {'jwt' if 'jwt' in item else 'api_key'} item; "
                                   f"allowed keys: {', '.join(allowed)}"))
    if "jwt" in item:
        v = _compile_jwt(item, base_dir, problems)
    else:
        v = _compile_api_key(item, base_dir, problems)
    return (None if problems else v), problems
