"""Request-target and Host normalization: what is rewritten, what is refused."""
from __future__ import annotations

import pytest

from bulkhead.l7.normalize import (
    Refused,
    encode_path,
    normalize_host,
    normalize_target,
    request_target,
)

TARGETS = [
    # (method, target) -> (path, query, authority)
    (("GET", "/"), ("/", None, None)),
    (("GET", "/a/b?x"), ("/a/b", "x", None)),
    (("GET", "/a?"), ("/a", "", None)),
    (("GET", "/a?b=%2F&c=..%00"), ("/a", "b=%2F&c=..%00", None)),  # the query is not decoded
    (("GET", "/%61dmin"), ("/admin", None, None)),
    (("GET", "/%41%44MIN"), ("/ADMIN", None, None)),  # case is kept: paths are case-sensitive
    (("GET", "/items/../admin"), ("/admin", None, None)),
    (("GET", "/items/%2e%2e/admin"), ("/admin", None, None)),  # encoded dot-segment
    (("GET", "/items/.%2E/admin"), ("/admin", None, None)),
    (("GET", "/a/./b"), ("/a/b", None, None)),
    (("GET", "/a/b/."), ("/a/b/", None, None)),
    (("GET", "/a/b/.."), ("/a/", None, None)),
    (("GET", "/a/.."), ("/", None, None)),
    (("GET", "//a"), ("/a", None, None)),
    (("GET", "/a//b///c"), ("/a/b/c", None, None)),
    (("GET", "/items/"), ("/items/", None, None)),  # a trailing slash is kept
    (("GET", "/items//"), ("/items/", None, None)),
    (("GET", "/items//../admin"), ("/admin", None, None)),  # collapse first, then resolve
    (("GET", "/.well-known/x"), ("/.well-known/x", None, None)),
    (("GET", "/a/...b"), ("/a/...b", None, None)),
    (("GET", "/a;x=1/b"), ("/a;x=1/b", None, None)),
    (("GET", "/caf%C3%A9"), ("/caf\u00e9", None, None)),  # UTF-8 decodes
    (("GET", "/a%20b"), ("/a b", None, None)),
    (("GET", "/100%25"), ("/100%", None, None)),  # decoded once only
    (("GET", "/%2561dmin"), ("/%61dmin", None, None)),  # no double decoding
    (("get", "/x"), ("/x", None, None)),
    (("GET", "http://h:80/a"), ("/a", None, "h:80")),
    (("GET", "http://Example.internal/a/../b?q"), ("/b", "q", "Example.internal")),
    (("GET", "HTTPS://h"), ("/", None, "h")),
    (("GET", "http://h?q=1"), ("/", "q=1", "h")),
    (("GET", "http://[fd00::1]:8080/x"), ("/x", None, "[fd00::1]:8080")),
    (("OPTIONS", "*"), ("*", None, None)),
    (("options", "*"), ("*", None, None)),
]


@pytest.mark.parametrize("args,want", TARGETS, ids=[t[0][1] for t in TARGETS])
def test_normalize_target(args, want):
    assert normalize_target(*args) == want


REFUSED = [
    # (method, target, status, reason fragment)
    ("GET", "/a%2Fb", 400, "encoded slash"),
    ("GET", "/a%2fb", 400, "encoded slash"),
    ("GET", "/a%5Cb", 400, "encoded backslash"),
    ("GET", "/a%00", 400, "control"),
    ("GET", "/a%0d%0aX:1", 400, "control"),
    ("GET", "/a%7F", 400, "control"),
    ("GET", "/a%C2%85", 400, "control"),  # U+0085 (NEL), a C1 control
    ("GET", "/%zz", 400, "percent-escape"),
    ("GET", "/%4", 400, "percent-escape"),
    ("GET", "/a%", 400, "percent-escape"),
    ("GET", "/%ff", 400, "not UTF-8"),
    ("GET", "/%C3%28", 400, "not UTF-8"),
    ("GET", "/%C0%AF", 400, "not UTF-8"),  # overlong '/'
    ("GET", "/..", 400, "escapes the root"),
    ("GET", "/../x", 400, "escapes the root"),
    ("GET", "/a/../../x", 400, "escapes the root"),
    ("GET", "/%2e%2e/x", 400, "escapes the root"),
    ("GET", "/public/..;/admin", 400, "dot-segment"),
    ("GET", "/public/.;x/admin", 400, "dot-segment"),
    ("GET", "/a\\b", 400, "backslash"),
    ("GET", "/a\\..\\admin", 400, "backslash"),
    ("GET", "/a b", 400, "invalid character"),
    ("GET", "/a\tb", 400, "invalid character"),
    ("GET", "/a\x00", 400, "invalid character"),
    ("GET", "/caf\u00e9", 400, "invalid character"),  # raw non-ASCII
    ("GET", "/a#frag", 400, "fragment"),
    ("GET", "", 400, "empty"),
    ("GET", "*", 400, "only for OPTIONS"),
    ("GET", "a/b", 400, "malformed"),
    ("GET", "example.com:443", 400, "malformed"),
    ("CONNECT", "example.com:443", 405, "CONNECT"),
    ("connect", "example.com:443", 405, "CONNECT"),
    ("GET", "ftp://h/a", 400, "scheme"),
    ("GET", "http://u@h/a", 400, "userinfo"),
    ("GET", "http://u:p@h:80/a", 400, "userinfo"),
    ("GET", "http:///a", 400, "empty host"),
    ("GET", "http://h:99999/a", 400, "port"),
    ("GET", "http://h:x/a", 400, "port"),
    ("GET", "http://h/a/../../b", 400, "escapes the root"),
]


@pytest.mark.parametrize("method,target,status,frag", REFUSED, ids=[repr(t[1]) for t in REFUSED])
def test_refused_targets(method, target, status, frag):
    with pytest.raises(Refused) as e:
        normalize_target(method, target)
    assert e.value.status == status
    assert frag in e.value.reason
    assert target not in e.value.reason or len(target) < 3  # reasons are fixed text


HOSTS = [
    ("example.internal", "example.internal"),
    ("EXAMPLE.internal.", "example.internal"),
    ("Example.Internal:8080", "example.internal"),
    ("example.internal.:80", "example.internal"),
    ("h", "h"),
    ("my_host.lan", "my_host.lan"),
    ("198.19.0.20", "198.19.0.20"),
    ("198.19.0.20:80", "198.19.0.20"),
    ("[fd00::1]", "[fd00::1]"),
    ("[fd00::1]:8080", "[fd00::1]"),
    ("[FD00:0:0::1]", "[fd00::1]"),
    ("h:65535", "h"),
]


@pytest.mark.parametrize("value,want", HOSTS)
def test_normalize_host(value, want):
    assert normalize_host(value) == want


BAD_HOSTS = [
    ("", "empty"),
    ("u@h", "userinfo"),
    ("u:p@h:80", "userinfo"),
    ("h:99999", "port"),
    ("h:0", "port"),
    ("h:", "port"),
    ("h:-1", "port"),
    ("h:80:80", "malformed"),
    ("a..b", "malformed"),
    (".", "malformed"),
    ("-a.b", "malformed"),
    ("a b", "malformed"),
    ("a/b", "malformed"),
    ("a\\b", "malformed"),
    ("h\x00", "malformed"),
    ("caf\u00e9.example", "malformed"),
    ("\u212aey.example", "malformed"),  # KELVIN SIGN lowercases to "k": refused, not folded
    ("[fd00::1", "malformed"),
    ("[fd00::1]x", "malformed"),
    ("[zz::1]", "malformed"),
    ("[fe80::1%eth0]", "malformed"),
    ("[fd00::1]:99999", "port"),
    ("a" * 64 + ".example", "malformed"),
    (("a" * 60 + ".") * 5, "malformed"),
]


@pytest.mark.parametrize("value,frag", BAD_HOSTS)
def test_refused_hosts(value, frag):
    with pytest.raises(Refused) as e:
        normalize_host(value)
    assert e.value.status == 400
    assert frag in e.value.reason


def test_refused_carries_status_and_reason():
    e = Refused(400, "bad")
    assert (e.status, e.reason, str(e)) == (400, "bad", "400 bad")


@pytest.mark.parametrize("target", [
    "/a/b?x=1", "/caf%C3%A9", "/a%20b", "/100%25", "/a%3Fb?c", "/a%23b", "/%7Euser/x", "/a;b=c/d",
])
def test_forwarded_target_normalizes_to_the_same_request(target):
    """What the proxy forwards reads back as exactly what was checked (idempotent)."""
    path, query, _ = normalize_target("GET", target)
    again = request_target(path, query)
    assert normalize_target("GET", again) == (path, query, None)


def test_encode_path():
    assert encode_path("/a b/caf\u00e9?#%") == "/a%20b/caf%C3%A9%3F%23%25"
    assert encode_path("/plain/path-1_~.x") == "/plain/path-1_~.x"
    assert request_target("*", None) == "*"
    assert request_target("/a", "") == "/a?"
