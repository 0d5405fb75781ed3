"""L7 rule matching: every condition type allowed and denied, reasons, compile errors."""
from __future__ import annotations

import pytest

from bulkhead.l7.rules import (
    Decision,
    HttpRule,
    Request,
    RuleError,
    RuleErrors,
    RuleSet,
    compile_rule,
)


def req(method="GET", path="/", host=None, headers=(), query=None):
    return Request(method, path, query, host, tuple((k.lower(), v) for k, v in headers))


def allowed(entries, r, **kw):
    return compile_rule("r", entries).check(r, **kw).allowed


# --- methods ----------------------------------------------------------------------

def test_methods():
    rule = compile_rule("r", [{"methods": ["get", "HEAD"]}])
    assert rule.check(req("GET")) == Decision(True, "r", 0, "allowed")
    assert rule.check(req("get")).allowed
    assert rule.check(req("HEAD")).allowed
    d = rule.check(req("DELETE"))
    assert d == Decision(False, "r", 0, "method DELETE not allowed")


def test_non_ascii_method_is_not_case_folded_into_an_allowed_one():
    rule = compile_rule("r", [{"methods": ["POST"]}])
    assert "\u017f".upper() == "S"  # LATIN SMALL LETTER LONG S
    assert not rule.check(req("po\u017ft")).allowed


def test_method_in_reason_is_bounded_and_printable():
    d = compile_rule("r", [{"methods": ["GET"]}]).check(req("X" * 200))
    assert not d.allowed and len(d.reason) < 80


# --- paths ------------------------------------------------------------------------

PATHS = [
    # pattern, path, matches
    ("/items", "/items", True),
    ("/items", "/items/", False),
    ("/items", "/items/1", False),
    ("/items", "/ITEMS", False),  # case-sensitive
    ("/items/*", "/items/", True),
    ("/items/*", "/items/1", True),
    ("/items/*", "/items/1/2/3", True),  # a prefix: any depth
    ("/items/*", "/items", False),
    ("/items/*", "/itemsx", False),
    ("/items/*", "/items-old/1", False),
    ("/*", "/", True),
    ("/*", "/anything/at/all", True),
    ("/a/*/c", "/a/b/c", True),
    ("/a/*/c", "/a/b/x/c", False),
    ("/a/*/c", "/a/c", False),
    ("/a/**/c", "/a/b/x/c", True),
    ("/a/**/c", "/a/b/c", True),
    ("/a/**", "/a/", True),
    ("/a/**", "/a", False),
    ("/files/*.json", "/files/x.json", True),
    ("/files/*.json", "/files/x.json.bak", False),
    ("/files/*.json", "/files/d/x.json", False),
    ("/files/**.json", "/files/d/x.json", True),
    ("/v?/x", "/v1/x", True),
    ("/v?/x", "/v10/x", False),
    ("/v?/x", "/v//x", False),
    ("/a.b", "/aXb", False),  # '.' is literal
    ("/a+(b)", "/a+(b)", True),  # regex characters are literal
    ("/caf\u00e9", "/caf\u00e9", True),
    ("/items/*/*", "/items/1/2", True),  # not a prefix (two wildcards): a glob
    ("/items/*/*", "/items/1/2/3", False),
]


@pytest.mark.parametrize("pattern,path,want", PATHS)
def test_paths(pattern, path, want):
    d = compile_rule("r", [{"paths": [pattern]}]).check(req(path=path))
    assert d.allowed is want
    if not want:
        assert d.reason == "path not allowed"


def test_paths_mixed_kinds_in_one_list():
    rule = compile_rule("r", [{"paths": ["/health", "/items/*", "/v?/**/x"]}])
    for p in ("/health", "/items/9", "/v2/a/b/x"):
        assert rule.check(req(path=p)).allowed, p
    for p in ("/health/", "/items", "/v22/a/x", "/other"):
        assert not rule.check(req(path=p)).allowed, p


def test_query_is_ignored_and_options_star_never_matches_paths():
    rule = compile_rule("r", [{"paths": ["/a", "/**"]}])
    assert rule.check(req(path="/a", query="x=1")).allowed
    assert not rule.check(req("OPTIONS", "*")).allowed
    assert compile_rule("r", [{"methods": ["OPTIONS"]}]).check(req("OPTIONS", "*")).allowed


# --- hosts ------------------------------------------------------------------------

HOSTS = [
    (["api.example.internal"], "api.example.internal", True),
    (["API.Example.Internal."], "api.example.internal", True),
    (["api.example.internal"], "web.example.internal", False),
    (["*.example.internal"], "api.example.internal", True),
    (["*.example.internal"], "a.b.example.internal", False),  # exactly one label
    (["*.example.internal"], "example.internal", False),
    (["*.example.internal"], "xexample.internal", False),
    (["198.19.0.20"], "198.19.0.20", True),
    (["*.0.0.20"], "10.0.0.20", False),  # wildcards never match address labels
    (["[FD00::1]"], "[fd00::1]", True),
    (["a.example", "*.b.example"], "x.b.example", True),
]


@pytest.mark.parametrize("hosts,host,want", HOSTS)
def test_hosts(hosts, host, want):
    d = compile_rule("r", [{"hosts": hosts}]).check(req(host=host))
    assert d.allowed is want
    if not want:
        assert d.reason == f"host {host} not allowed"


def test_request_without_host_never_matches_hosts():
    d = compile_rule("r", [{"hosts": ["*.example"]}]).check(req(host=None))
    assert d == Decision(False, "r", 0, "missing host")


# --- headers ----------------------------------------------------------------------

HEADERS = [
    # condition, request headers, allowed, reason when denied
    ({"x-tenant": "blue"}, [("X-Tenant", "blue")], True, None),
    ({"x-tenant": "blue"}, [("x-tenant", "Blue")], False, "header x-tenant value not allowed"),
    ({"x-tenant": "blue"}, [], False, "header x-tenant missing"),
    ({"x-tenant": "blue"}, [("x-tenant", "blue"), ("x-tenant", "blue")], False, "header x-tenant repeated"),
    ({"X-Tenant": "blue"}, [("x-tenant", "blue")], True, None),  # names case-insensitive
    ({"x-tenant": "team-*"}, [("x-tenant", "team-a")], True, None),
    ({"x-tenant": "team-*"}, [("x-tenant", "team-")], True, None),
    ({"x-tenant": "team-*"}, [("x-tenant", "xteam-a")], False, "header x-tenant value not allowed"),
    ({"x-v": "v?"}, [("x-v", "v1")], True, None),
    ({"x-v": "v?"}, [("x-v", "v12")], False, "header x-v value not allowed"),
    ({"x-v": "a.c"}, [("x-v", "abc")], False, "header x-v value not allowed"),  # literal dot
    ({"x-debug": True}, [("x-debug", "")], True, None),
    ({"x-debug": True}, [], False, "header x-debug missing"),
    ({"x-debug": False}, [], True, None),
    ({"x-debug": False}, [("x-debug", "1")], False, "header x-debug present"),
    ({"x-debug": False}, [("x-debug", "1"), ("x-debug", "2")], False, "header x-debug repeated"),
    ({"x-a": {"equals": "*"}}, [("x-a", "*")], True, None),
    ({"x-a": {"equals": "*"}}, [("x-a", "x")], False, "header x-a value not allowed"),
    ({"x-a": {"glob": "a*"}}, [("x-a", "abc")], True, None),
    ({"x-a": {"glob": "a*"}}, [("x-a", "bac")], False, "header x-a value not allowed"),
    ({"x-a": {"present": True}}, [("x-a", "1")], True, None),
    ({"x-a": {"present": False}}, [("x-a", "1")], False, "header x-a present"),
    ({"x-a": {"present": False}}, [("x-b", "1")], True, None),
    (["x-a", "X-B"], [("x-a", "1"), ("x-b", "2")], True, None),
    (["x-a", "x-b"], [("x-a", "1")], False, "header x-b missing"),
    (["x-a"], [("x-a", "1"), ("x-a", "1")], False, "header x-a repeated"),
    ({"x-a": "1", "x-b": "2"}, [("x-b", "2"), ("x-a", "1")], True, None),
    ({"x-a": "1", "x-b": "2"}, [("x-a", "1"), ("x-b", "3")], False, "header x-b value not allowed"),
    # A header not named in a condition may repeat freely.
    ({"x-a": "1"}, [("x-a", "1"), ("accept", "a"), ("accept", "b")], True, None),
]


@pytest.mark.parametrize("cond,headers,want,reason", HEADERS)
def test_headers(cond, headers, want, reason):
    d = compile_rule("r", [{"headers": cond}]).check(req(headers=headers))
    assert d.allowed is want, d
    if not want:
        assert d.reason == reason


# --- entries, AND, OR, reasons --------------------------------------------------------

def test_conditions_within_an_entry_all_hold():
    rule = compile_rule("r", [{"methods": ["POST"], "paths": ["/orders"], "hosts": ["shop.example"],
                               "headers": {"x-tenant": "blue"}}])
    ok = req("POST", "/orders", "shop.example", [("x-tenant", "blue")])
    assert rule.check(ok).allowed
    assert rule.check(req("GET", "/orders", "shop.example", [("x-tenant", "blue")])).reason == \
        "method GET not allowed"
    assert rule.check(req("POST", "/x", "shop.example", [("x-tenant", "blue")])).reason == "path not allowed"
    assert rule.check(req("POST", "/orders", "x.example", [("x-tenant", "blue")])).reason == \
        "host x.example not allowed"
    assert rule.check(req("POST", "/orders", "shop.example", [])).reason == "header x-tenant missing"


def test_any_entry_may_match_and_the_decision_names_it():
    rule = compile_rule("r", [
        {"methods": ["GET", "HEAD"], "paths": ["/items", "/items/*"]},
        {"methods": ["POST"], "paths": ["/orders"]},
    ])
    assert rule.check(req("GET", "/items/3")) == Decision(True, "r", 0, "allowed")
    assert rule.check(req("POST", "/orders")) == Decision(True, "r", 1, "allowed")
    # POST /items: entry 0 fails on the method (0 conditions passed), entry 1 on the path
    # (1 passed): entry 1 got furthest and explains the denial.
    assert rule.check(req("POST", "/items")) == Decision(False, "r", 1, "path not allowed")
    # DELETE fails both at the first condition: the earlier entry explains.
    assert rule.check(req("DELETE", "/items")) == Decision(False, "r", 0, "method DELETE not allowed")


def test_ruleset_across_two_rules():
    a = compile_rule("reads", [{"methods": ["GET"], "paths": ["/items/*"]}])
    b = compile_rule("writes", [{"methods": ["POST"], "paths": ["/orders"], "headers": {"x-tenant": "blue"}}])
    rs = RuleSet([a, b])
    assert rs.check(req("GET", "/items/1")) == Decision(True, "reads", 0, "allowed")
    assert rs.check(req("POST", "/orders", headers=[("x-tenant", "blue")])) == \
        Decision(True, "writes", 0, "allowed")
    # Fails both rules at the method: the first rule is named.
    assert rs.check(req("PUT", "/items/1")) == Decision(False, "reads", 0, "method PUT not allowed")
    # Gets furthest in the second rule (method and path hold): that rule explains.
    assert rs.check(req("POST", "/orders")) == Decision(False, "writes", 0, "header x-tenant missing")
    assert RuleSet([]).check(req()) == Decision(False, None, None, "no L7 rule for this flow")


def test_check_does_not_depend_on_header_order_or_case_of_method():
    rule = compile_rule("r", [{"methods": ["GET"], "headers": {"a": "1", "b": "2"}}])
    h1, h2 = [("a", "1"), ("b", "2")], [("b", "2"), ("a", "1")]
    assert rule.check(req("get", headers=h1)).allowed and rule.check(req("GET", headers=h2)).allowed


# --- compile errors -------------------------------------------------------------------

def errors(entries, base_dir=None):
    with pytest.raises(RuleErrors) as e:
        compile_rule("r", entries, base_dir)
    for err in e.value.errors:
        assert isinstance(err, RuleError) and isinstance(err, ValueError)
    return [(err.where, err.message) for err in e.value.errors]


COMPILE_ERRORS = [
    # entries, [(where, fragment)]
    ([{}], [((0,), "matches every request: remove http to allow all")]),
    (["GET"], [((0,), "each http entry must be a mapping")]),
    ([{"methods": "GET"}], [((0, "methods"), "methods must be a non-empty list")]),
    ([{"methods": []}], [((0, "methods"), "methods must be a non-empty list")]),
    ([{"methods": ["GET", "BAD METHOD", 7]}], [((0, "methods", 1), "a method must be a token"),
                                               ((0, "methods", 2), "got the number 7")]),
    ([{"paths": ["items"]}], [((0, "paths", 0), "starting with '/'")]),
    ([{"paths": ["/a/../b"]}], [((0, "paths", 0), "dot-segment")]),
    ([{"paths": ["/a/./b"]}], [((0, "paths", 0), "dot-segment")]),
    ([{"paths": ["/a/.."]}], [((0, "paths", 0), "dot-segment")]),
    ([{"paths": ["/%61dmin"]}], [((0, "paths", 0), "%-escapes")]),
    ([{"paths": ["/a b"]}], [((0, "paths", 0), "%-escapes")]),
    ([{"paths": ["/a\\b"]}], [((0, "paths", 0), "'\\'")]),
    ([{"paths": ["/a//b"]}], [((0, "paths", 0), "empty segment")]),
    ([{"paths": ["/a/***"]}], [((0, "paths", 0), "use * (within a segment) or **")]),
    ([{"hosts": ["*"]}], [((0, "hosts", 0), "leave hosts out")]),
    ([{"hosts": ["a.*.example"]}], [((0, "hosts", 0), "left-most label")]),
    ([{"hosts": ["-a.example"]}], [((0, "hosts", 0), "each label")]),
    ([{"hosts": ["[zz]"]}], [((0, "hosts", 0), "IPv6")]),
    ([{"hosts": ["caf\u00e9.example"]}], [((0, "hosts", 0), "xn--")]),
    ([{"headers": {}}], [((0, "headers"), "non-empty mapping")]),
    ([{"headers": []}], [((0, "headers"), "non-empty mapping or list")]),
    ([{"headers": "x-a"}], [((0, "headers"), "got the string 'x-a'")]),
    ([{"headers": {"x a": "1"}}], [((0, "headers", "x a"), "a header name must be a token")]),
    ([{"headers": {"x-a": 1}}], [((0, "headers", "x-a"), "quote numbers")]),
    ([{"headers": {"x-a": None}}], [((0, "headers", "x-a"), "got nothing (null)")]),
    ([{"headers": {"x-a": {"equals": "1", "glob": "2"}}}], [((0, "headers", "x-a"), "exactly one of")]),
    ([{"headers": {"x-a": {"regex": "."}}}], [((0, "headers", "x-a", "regex"), "exactly one of")]),
    ([{"headers": {"x-a": {"present": "yes"}}}], [((0, "headers", "x-a", "present"), "true or false")]),
    ([{"headers": {"x-a": {"glob": 3}}}], [((0, "headers", "x-a", "glob"), "must be a string")]),
    ([{"headers": {"X-A": "1", "x-a": "2"}}], [((0, "headers", "x-a"), "given twice")]),
    ([{"headers": ["ok", 5]}], [((0, "headers", 1), "a header name must be a token")]),
    ([{"cookies": ["a"]}], [((0, "cookies"), "unknown key 'cookies'"),
                            ((0,), "matches every request")]),
    ([{"methods": ["GET"], "verbs": ["GET"]}], [((0, "verbs"), "unknown key 'verbs'")]),
    ([{"tokens": [{}]}], [((0, "tokens", 0), "exactly one of jwt")]),
    ([{"tokens": ["x"]}], [((0, "tokens", 0), "each tokens item must be a mapping")]),
    ([{"tokens": {"jwt": "k"}}], [((0, "tokens"), "tokens must be a non-empty list")]),
    ([{"tokens": [{"jwt": "/nonexistent/k.pem"}]}], [((0, "tokens", 0, "jwt"), "cannot read key file")]),
    ([{"tokens": [{"api_key": "/nonexistent/keys"}]}], [((0, "tokens", 0, "api_key"), "cannot read API key file")]),
    # Every problem is reported, across entries.
    ([{"methods": "GET"}, {"paths": ["x"]}, {"methods": ["GET"]}],
     [((0, "methods"), "non-empty list"), ((1, "paths", 0), "starting with '/'")]),
]


@pytest.mark.parametrize("entries,want", COMPILE_ERRORS, ids=[str(c[0])[:60] for c in COMPILE_ERRORS])
def test_compile_errors(entries, want):
    got = errors(entries)
    assert [w for w, _ in got] == [w for w, _ in want], got
    for (_, msg), (_, frag) in zip(got, want):
        assert frag in msg


@pytest.mark.parametrize("entries", [None, [], {"methods": ["GET"]}])
def test_http_must_be_a_non_empty_list(entries):
    assert errors(entries) == [((), errors(entries)[0][1])]
    assert "non-empty list" in errors(entries)[0][1]


def test_rule_error_str_names_the_entry_and_key():
    assert str(RuleError((0, "tokens", 1, "jwt"), "boom")) == "http entry 1 tokens[1].jwt: boom"
    assert str(RuleError((2,), "boom")) == "http entry 3: boom"
    assert str(RuleError((), "boom")) == "http: boom"
    assert "boom" in str(RuleErrors([RuleError((0,), "boom")]))


def test_compiled_rule_type_and_name():
    rule = compile_rule("web-reads", [{"methods": ["GET"]}])
    assert isinstance(rule, HttpRule) and rule.name == "web-reads"
