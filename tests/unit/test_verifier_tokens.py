"""Bearer JWT and API-key checks, with keys generated here (no secrets in the repo)."""
from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from bulkhead.l7 import tokens as tokenlib
from bulkhead.l7.rules import Request, RuleErrors, compile_rule

NOW = 1_700_000_000.0
SECRET = b"s" * 40


def pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_cert(key) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    import datetime
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2040, 1, 1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (d / "rsa.pub").write_bytes(pem_public(rsa_key))
    (d / "rsa.crt").write_bytes(pem_cert(rsa_key))
    (d / "ec.pub").write_bytes(pem_public(ec_key))
    (d / "hs.secret").write_bytes(SECRET + b"\n")
    (d / "short.secret").write_bytes(b"tooshort\n")
    (d / "rsa.key").write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    (d / "keys.txt").write_text("# service keys\n\nkey-alpha-123\n  key-beta-456  \n")
    (d / "empty.txt").write_text("# nothing\n\n")
    return {"dir": str(d), "rsa": rsa_key, "rsa_other": rsa_other, "ec": ec_key}


def claims(**kw):
    c = {"exp": NOW + 300, "iss": "idp", "aud": "catalog", "sub": "svc-a"}
    c.update(kw)
    return {k: v for k, v in c.items() if v is not None}


def check(entries, keys, headers, now=NOW):
    rule = compile_rule("r", entries, keys["dir"])
    return rule.check(Request("GET", "/", None, None, tuple(headers)), now=now)


def bearer(token):
    return [("authorization", f"Bearer {token}")]


def b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


# --- JWT: valid tokens per key type ---------------------------------------------------

def test_hs256_rs256_es256_and_certificate_accept_valid_tokens(keys):
    cases = [
        ("hs.secret", SECRET, "HS256"),
        ("rsa.pub", keys["rsa"], "RS256"),
        ("rsa.crt", keys["rsa"], "RS256"),
        ("ec.pub", keys["ec"], "ES256"),
    ]
    for keyfile, signer, alg in cases:
        token = jwt.encode(claims(), signer, algorithm=alg)
        d = check([{"tokens": [{"jwt": keyfile}]}], keys, bearer(token))
        assert d.allowed, (keyfile, d)


def test_default_algorithm_follows_the_key(keys):
    v = tokenlib.compile_token({"jwt": "ec.pub"}, keys["dir"])[0]
    assert v.algorithms == ["ES256"]
    v = tokenlib.compile_token({"jwt": "hs.secret"}, keys["dir"])[0]
    assert v.algorithms == ["HS256"]
    v = tokenlib.compile_token({"jwt": "rsa.pub", "algorithms": ["RS256", "PS256"]}, keys["dir"])[0]
    assert v.algorithms == ["RS256", "PS256"]
    token = jwt.encode(claims(), keys["rsa"], algorithm="PS256")
    assert check([{"tokens": [{"jwt": "rsa.pub", "algorithms": ["RS256", "PS256"]}]}], keys, bearer(token)).allowed
    assert check([{"tokens": [{"jwt": "rsa.pub"}]}], keys, bearer(token)).reason == "token algorithm not accepted"


# --- JWT: time -----------------------------------------------------------------------

@pytest.mark.parametrize("kw,now,reason", [
    ({"exp": NOW - 31}, NOW, "token expired"),
    ({"exp": NOW - 29}, NOW, None),  # within the 30 s leeway
    ({"nbf": NOW + 31}, NOW, "token not yet valid"),
    ({"nbf": NOW + 29}, NOW, None),
    ({"exp": None}, NOW, "token lacks exp claim"),
    ({"exp": "tomorrow"}, NOW, "token exp claim invalid"),
    ({"exp": True}, NOW, "token exp claim invalid"),
])
def test_time_claims(keys, kw, now, reason):
    token = jwt.encode(claims(**kw), SECRET, algorithm="HS256")
    d = check([{"tokens": [{"jwt": "hs.secret"}]}], keys, bearer(token), now=now)
    assert d.allowed is (reason is None)
    if reason:
        assert d.reason == reason


def test_cached_token_still_expires(keys):
    rule = compile_rule("r", [{"tokens": [{"jwt": "rsa.pub"}]}], keys["dir"])
    token = jwt.encode(claims(exp=NOW + 60), keys["rsa"], algorithm="RS256")
    r = Request("GET", "/", None, None, tuple(bearer(token)))
    assert rule.check(r, now=NOW).allowed
    assert rule.check(r, now=NOW + 60).allowed
    d = rule.check(r, now=NOW + 100)
    assert not d.allowed and d.reason == "token expired"


def test_cache_is_bounded(keys, monkeypatch):
    monkeypatch.setattr(tokenlib, "CACHE_SIZE", 4)
    v = tokenlib.compile_token({"jwt": "hs.secret"}, keys["dir"])[0]
    for i in range(10):
        v.verified_claims(jwt.encode(claims(jti=str(i)), SECRET, algorithm="HS256"))
    assert len(v._cache) == 4


# --- JWT: signatures and algorithms ---------------------------------------------------

def test_wrong_signature(keys):
    token = jwt.encode(claims(), keys["rsa_other"], algorithm="RS256")
    assert check([{"tokens": [{"jwt": "rsa.pub"}]}], keys, bearer(token)).reason == "token signature invalid"
    token = jwt.encode(claims(), b"x" * 40, algorithm="HS256")
    assert check([{"tokens": [{"jwt": "hs.secret"}]}], keys, bearer(token)).reason == "token signature invalid"
    # A tampered payload with the original signature.
    good = jwt.encode(claims(), SECRET, algorithm="HS256")
    h, _, s = good.split(".")
    forged = f"{h}.{b64(claims(sub='admin'))}.{s}"
    assert check([{"tokens": [{"jwt": "hs.secret"}]}], keys, bearer(forged)).reason == "token signature invalid"


def test_rs256_public_key_used_as_hs256_secret_is_refused(keys):
    """The classic algorithm confusion: HMAC-sign with the RSA public key's PEM bytes."""
    import hashlib
    import hmac
    pub = pem_public(keys["rsa"])
    header, payload = b64({"alg": "HS256", "typ": "JWT"}), b64(claims())
    sig = hmac.new(pub, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    d = check([{"tokens": [{"jwt": "rsa.pub"}]}], keys, bearer(token))
    assert not d.allowed and d.reason == "token algorithm not accepted"
    # And the policy cannot ask for it.
    with pytest.raises(RuleErrors) as e:
        compile_rule("r", [{"tokens": [{"jwt": "rsa.pub", "algorithms": ["HS256"]}]}], keys["dir"])
    assert e.value.errors[0].where == (0, "tokens", 0, "algorithms", 0)
    assert "does not fit the key" in e.value.errors[0].message


def test_ec_token_against_rsa_key_and_vice_versa(keys):
    token = jwt.encode(claims(), keys["ec"], algorithm="ES256")
    assert check([{"tokens": [{"jwt": "rsa.pub"}]}], keys, bearer(token)).reason == "token algorithm not accepted"
    token = jwt.encode(claims(), keys["rsa"], algorithm="RS256")
    assert check([{"tokens": [{"jwt": "ec.pub"}]}], keys, bearer(token)).reason == "token algorithm not accepted"


def test_alg_none_is_refused(keys):
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
    for keyfile in ("hs.secret", "rsa.pub", "ec.pub"):
        d = check([{"tokens": [{"jwt": keyfile}]}], keys, bearer(token))
        assert not d.allowed and d.reason == "token algorithm not accepted"
    with pytest.raises(RuleErrors) as e:
        compile_rule("r", [{"tokens": [{"jwt": "rsa.pub", "algorithms": ["none"]}]}], keys["dir"])
    assert "never accepted" in e.value.errors[0].message


@pytest.mark.parametrize("token", ["abc", "a.b", "a.b.c.d", "!!.!!.!!", "e30.e30.", "x" * 20000])
def test_malformed_tokens(keys, token):
    d = check([{"tokens": [{"jwt": "hs.secret"}]}], keys, bearer(token))
    assert not d.allowed and d.reason in ("token malformed", "missing bearer token", "token algorithm not accepted")
    assert token not in d.reason


# --- JWT: claims -----------------------------------------------------------------------

@pytest.mark.parametrize("item,kw,reason", [
    ({"iss": "idp"}, {}, None),
    ({"iss": "idp"}, {"iss": "evil"}, "token issuer mismatch"),
    ({"iss": "idp"}, {"iss": None}, "token issuer mismatch"),
    ({"aud": "catalog"}, {}, None),
    ({"aud": "catalog"}, {"aud": ["x", "catalog"]}, None),
    ({"aud": "catalog"}, {"aud": "orders"}, "token audience mismatch"),
    ({"aud": "catalog"}, {"aud": ["x"]}, "token audience mismatch"),
    ({"aud": "catalog"}, {"aud": None}, "token audience mismatch"),
    ({}, {"aud": "anything"}, None),  # no aud condition: any aud is fine
    ({"sub": "svc-a"}, {}, None),
    ({"sub": "svc-a"}, {"sub": "svc-b"}, "token subject mismatch"),
    ({"scope": ["read"]}, {"scope": "read write"}, None),
    ({"scope": ["read", "write"]}, {"scope": "read write"}, None),
    ({"scope": ["read", "write"]}, {"scope": "read"}, "token scope lacks write"),
    ({"scope": ["write"]}, {"scp": ["read", "write"]}, None),
    ({"scope": ["write"]}, {"scp": ["read"]}, "token scope lacks write"),
    ({"scope": "read write"}, {"scp": "write read"}, None),
    ({"scope": ["read"]}, {}, "token scope lacks read"),
    ({"scope": ["read"]}, {"scope": "readonly"}, "token scope lacks read"),
])
def test_claims(keys, item, kw, reason):
    token = jwt.encode(claims(**kw), SECRET, algorithm="HS256")
    d = check([{"tokens": [dict({"jwt": "hs.secret"}, **item)]}], keys, bearer(token))
    assert d.allowed is (reason is None), d
    if reason:
        assert d.reason == reason


# --- bearer header forms ----------------------------------------------------------------

def test_bearer_header_forms(keys):
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    entries = [{"tokens": [{"jwt": "hs.secret"}]}]
    assert check(entries, keys, [("authorization", f"bearer {token}")]).allowed
    assert check(entries, keys, []).reason == "missing bearer token"
    assert check(entries, keys, [("authorization", f"Basic {token}")]).reason == "missing bearer token"
    assert check(entries, keys, [("authorization", token)]).reason == "missing bearer token"
    d = check(entries, keys, bearer(token) + bearer(token))
    assert d.reason == "header authorization repeated"


# --- API keys ---------------------------------------------------------------------------

def test_api_keys(keys):
    entries = [{"tokens": [{"api_key": "keys.txt"}]}]
    assert check(entries, keys, [("x-api-key", "key-alpha-123")]).allowed
    assert check(entries, keys, [("x-api-key", "key-beta-456")]).allowed
    assert check(entries, keys, [("x-api-key", "key-gamma")]).reason == "api key not accepted"
    assert check(entries, keys, [("x-api-key", "# service keys")]).reason == "api key not accepted"
    assert check(entries, keys, []).reason == "missing api key"
    assert check(entries, keys, [("x-token", "key-alpha-123")]).reason == "missing api key"
    d = check(entries, keys, [("x-api-key", "key-alpha-123"), ("x-api-key", "x")])
    assert d.reason == "header x-api-key repeated"


def test_api_key_in_other_header_and_bearer_form(keys):
    entries = [{"tokens": [{"api_key": "keys.txt", "header": "X-Service-Key"}]}]
    assert check(entries, keys, [("x-service-key", "key-alpha-123")]).allowed
    assert check(entries, keys, [("x-api-key", "key-alpha-123")]).reason == "missing api key"
    entries = [{"tokens": [{"api_key": "keys.txt", "header": "authorization"}]}]
    assert check(entries, keys, [("authorization", "Bearer key-alpha-123")]).allowed
    assert check(entries, keys, [("authorization", "key-alpha-123")]).reason == "missing api key"
    assert check(entries, keys, [("authorization", "Bearer key-nope")]).reason == "api key not accepted"


def test_any_token_item_may_verify_and_the_presented_one_explains(keys):
    entries = [{"tokens": [{"jwt": "rsa.pub"}, {"api_key": "keys.txt"}]}]
    assert check(entries, keys, [("x-api-key", "key-alpha-123")]).allowed
    token = jwt.encode(claims(), keys["rsa"], algorithm="RS256")
    assert check(entries, keys, bearer(token)).allowed
    # A wrong API key is the more telling reason than the absent bearer token.
    assert check(entries, keys, [("x-api-key", "nope")]).reason == "api key not accepted"
    assert check(entries, keys, []).reason == "missing bearer token"


# --- secrets never leak -----------------------------------------------------------------

def test_reasons_and_reprs_never_contain_secrets(keys):
    secrets = ["key-alpha-123", "key-beta-456", SECRET.decode()]
    rule = compile_rule("r", [{"tokens": [{"jwt": "hs.secret"}, {"api_key": "keys.txt"}]}], keys["dir"])
    tokens_sent = [
        jwt.encode(claims(exp=NOW - 100), SECRET, algorithm="HS256"),
        jwt.encode(claims(), b"y" * 40, algorithm="HS256"),
        "garbage.token.value",
    ]
    reasons = []
    for t in tokens_sent:
        for hdrs in (bearer(t), [("x-api-key", t)]):
            d = rule.check(Request("GET", "/", None, None, tuple(hdrs)), now=NOW)
            assert not d.allowed
            reasons.append(d.reason)
            assert t not in d.reason
    text = " ".join(reasons) + repr(rule) + "".join(repr(v) for e in rule.entries for v in [e])
    for v in (tokenlib.compile_token({"api_key": "keys.txt"}, keys["dir"])[0],
              tokenlib.compile_token({"jwt": "hs.secret"}, keys["dir"])[0]):
        text += repr(v) + str(vars(v).get("path"))
    for s in secrets:
        assert s not in text


def test_api_key_file_errors_never_print_the_key(keys, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("good-key\nbad key with spaces\n")
    with pytest.raises(RuleErrors) as e:
        compile_rule("r", [{"tokens": [{"api_key": str(bad)}]}])
    msg = e.value.errors[0].message
    assert "line 2" in msg and "bad key" not in msg and "good-key" not in msg


# --- compile errors ---------------------------------------------------------------------

@pytest.mark.parametrize("item,where,frag", [
    ({"jwt": "short.secret"}, ("jwt",), "at least 32 bytes"),
    ({"jwt": "rsa.key"}, ("jwt",), "holds a private key"),
    ({"jwt": "missing.pem"}, ("jwt",), "cannot read key file"),
    ({"jwt": 5}, ("jwt",), "must be a key file path"),
    ({"jwt": "rsa.pub", "algorithms": "RS256"}, ("algorithms",), "non-empty list"),
    ({"jwt": "rsa.pub", "algorithms": ["RS999"]}, ("algorithms", 0), "unknown algorithm"),
    ({"jwt": "ec.pub", "algorithms": ["RS256"]}, ("algorithms", 0), "does not fit the key"),
    ({"jwt": "rsa.pub", "aud": ["a"]}, ("aud",), "non-empty string"),
    ({"jwt": "rsa.pub", "scope": []}, ("scope",), "non-empty list"),
    ({"jwt": "rsa.pub", "scope": ["a b"]}, ("scope", 0), "one word"),
    ({"jwt": "rsa.pub", "header": "x"}, ("header",), "unknown key 'header'"),
    ({"api_key": "empty.txt"}, ("api_key",), "holds no keys"),
    ({"api_key": "keys.txt", "header": "bad header"}, ("header",), "header name"),
    ({"api_key": "keys.txt", "iss": "x"}, ("iss",), "unknown key 'iss'"),
    ({"jwt": "rsa.pub", "api_key": "keys.txt"}, (), "exactly one of"),
])
def test_token_compile_errors(keys, item, where, frag):
    with pytest.raises(RuleErrors) as e:
        compile_rule("r", [{"tokens": [item]}], keys["dir"])
    errs = e.value.errors
    assert errs[0].where == (0, "tokens", 0) + where
    assert frag in errs[0].message


def test_relative_key_paths_resolve_against_base_dir(keys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the key directory
    v, problems = tokenlib.compile_token({"jwt": "rsa.pub"}, keys["dir"])
    assert not problems and v.path == f"{keys['dir']}/rsa.pub"
    assert tokenlib.resolve("/abs/k", "/base") == "/abs/k"
    assert tokenlib.resolve("k", "/base/dir") == "/base/dir/k"
    assert tokenlib.resolve("../k", "/base/dir") == "/base/k"


def test_real_clock_is_used_without_now(keys):
    token = jwt.encode({"exp": time.time() + 60}, SECRET, algorithm="HS256")
    rule = compile_rule("r", [{"tokens": [{"jwt": "hs.secret"}]}], keys["dir"])
    assert rule.check(Request("GET", "/", None, None, tuple(bearer(token)))).allowed
    token = jwt.encode({"exp": time.time() - 60}, SECRET, algorithm="HS256")
    assert not rule.check(Request("GET", "/", None, None, tuple(bearer(token)))).allowed
