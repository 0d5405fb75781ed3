"""The decision for one request (agent/verifier/decide.py), called directly: no sockets, no loop.

Each case is a request head as llhttp framed it, the flow it arrived on, and the Outcome the
verifier must reach: what the client is answered and what the request record says.
"""
from __future__ import annotations

import time

import jwt
import pytest

from bulkhead.l7.rules import Decision, RuleSet, compile_rule
from bulkhead.verifier.decide import ALLOW, DENY, NO_RULE, REFUSE, check_head, decide
from bulkhead.verifier.records import Exchange, FlowContext

SECRET = b"k" * 40
API_KEY = "svc-key-0123456789"


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    (d / "hs.secret").write_bytes(SECRET + b"\n")
    (d / "keys.txt").write_text(API_KEY + "\n")
    return str(d)


@pytest.fixture(scope="module")
def rules(keydir):
    return RuleSet([
        compile_rule("reads", [{"methods": ["GET", "HEAD"], "paths": ["/items", "/items/*"]}]),
        compile_rule("writes", [{"methods": ["POST"], "paths": ["/orders"],
                                 "tokens": [{"api_key": "keys.txt"}]}], keydir),
        compile_rule("admin", [{"methods": ["GET"], "paths": ["/admin/*"], "tokens": [{"jwt": "hs.secret"}]}],
                     keydir),
    ])


def flow(rules, hostnames=("catalog.internal",)) -> FlowContext:
    return FlowContext(client=("198.18.20.5", 40000), original_dst=("198.19.20.10", 80), segment="prod",
                       src_app="shop", dst_app="catalog", rules=rules, dst_hostnames=list(hostnames))


def token(key=SECRET, **claims) -> str:
    return jwt.encode({"exp": time.time() + 300, **claims}, key, algorithm="HS256")


H = b"catalog.internal"

# id, method, target, Host (None: no Host header), extra headers, TLS server name,
# expected (action, status, verdict, rule, path, host, reason or a part of it)
CASES = [
    ("allowed method and path", b"GET", b"/items/42", H, [], None,
     (ALLOW, 0, "allow", "reads", "/items/42", "catalog.internal", "allowed")),
    ("allowed HEAD, Host with case and port", b"HEAD", b"/items", b"Catalog.Internal:80", [], None,
     (ALLOW, 0, "allow", "reads", "/items", "catalog.internal", "allowed")),
    ("denied path", b"GET", b"/private", H, [], None,
     (DENY, 403, "deny", "reads", "/private", "catalog.internal", "path not allowed")),
    ("denied method", b"DELETE", b"/items/42", H, [], None,
     (DENY, 403, "deny", "reads", "/items/42", "catalog.internal", "method DELETE not allowed")),
    ("dot segments cannot climb out of an allowed prefix", b"GET", b"/items/../private", H, [], None,
     (DENY, 403, "deny", "reads", "/private", "catalog.internal", "path not allowed")),
    ("host not the app's", b"GET", b"/items", b"evil.example", [], None,
     (DENY, 403, "deny", None, "/items", "evil.example", "host evil.example is not app catalog's")),
    ("host missing on an app with hostnames", b"GET", b"/items", None, [], None,
     (DENY, 403, "deny", None, "/items", None, "host None is not app catalog's")),
    ("host not the TLS server name", b"GET", b"/items", H, [], "other.internal",
     (DENY, 421, "deny", None, "/items", "catalog.internal", "does not match the TLS server name other.internal")),
    ("host is the TLS server name", b"GET", b"/items", H, [], "catalog.internal",
     (ALLOW, 0, "allow", "reads", "/items", "catalog.internal", "allowed")),
    ("API key missing", b"POST", b"/orders", H, [], None,
     (DENY, 403, "deny", "writes", "/orders", "catalog.internal", "missing api key")),
    ("API key invalid", b"POST", b"/orders", H, [(b"X-Api-Key", b"guessed")], None,
     (DENY, 403, "deny", "writes", "/orders", "catalog.internal", "api key not accepted")),
    ("API key valid", b"POST", b"/orders", H, [(b"X-Api-Key", API_KEY.encode())], None,
     (ALLOW, 0, "allow", "writes", "/orders", "catalog.internal", "allowed")),
    ("bearer token missing", b"GET", b"/admin/users", H, [], None,
     (DENY, 403, "deny", "admin", "/admin/users", "catalog.internal", "missing bearer token")),
    ("bearer token signed with another key", b"GET", b"/admin/users", H,
     [(b"Authorization", b"Bearer " + token(b"x" * 40).encode())], None,
     (DENY, 403, "deny", "admin", "/admin/users", "catalog.internal", "token signature invalid")),
    ("bearer token valid", b"GET", b"/admin/users", H, [(b"Authorization", b"Bearer " + token().encode())], None,
     (ALLOW, 0, "allow", "admin", "/admin/users", "catalog.internal", "allowed")),
    ("ambiguous: encoded slash", b"GET", b"/items/%2f..", H, [], None,
     (REFUSE, 400, "error", None, "", None, "encoded slash in path")),
    ("ambiguous: Host conflicts with the absolute-form authority", b"GET", b"http://other.internal/items", H, [],
     None, (REFUSE, 400, "error", None, "/items", None, "conflicts with the target's authority")),
    ("ambiguous: a Host that is no host name", b"GET", b"/items", b"catalog internal", [], None,
     (REFUSE, 400, "error", None, "/items", None, "malformed host")),
]


@pytest.mark.parametrize("name, method, target, host, headers, sni, want", CASES, ids=[c[0] for c in CASES])
def test_decide(rules, name, method, target, host, headers, sni, want):
    hdrs = ([(b"Host", host)] if host is not None else []) + headers
    o = decide(flow(rules), method, target, host, hdrs, sni)
    action, status, verdict, rule, path, got_host, reason = want
    assert (o.action, o.status, o.verdict, o.rule, o.path, o.host) == (action, status, verdict, rule, path, got_host), o
    assert reason in o.reason, o
    assert (o.forward is not None) is (action == ALLOW), "only an allowed request has a target to forward"


def test_no_rule_for_the_flow_is_a_deny(rules):
    # a punt is never an implicit allow: no rules at all, and a rule set with no rule in it
    for rs in (None, RuleSet([])):
        o = decide(flow(rs, hostnames=()), b"GET", b"/items", H, [(b"Host", H)])
        assert (o.action, o.status, o.verdict, o.rule) == (DENY, 403, "deny", None), o
        assert o.forward is None
    o = decide(flow(None, hostnames=()), b"GET", b"/items", H, [(b"Host", H)])
    assert o.reason == NO_RULE


def test_the_service_has_no_policy_yet_deny(rules):
    """The gateway's rules (service.LiveRules) answer for a flow the policy in force has no rule for."""
    from bulkhead.verifier.service import LiveRules

    class NoPolicy:
        current = None

    o = decide(flow(LiveRules(NoPolicy(), "shop", "catalog", 80), hostnames=()), b"GET", b"/items", H,
               [(b"Host", H)])
    assert (o.action, o.status, o.verdict, o.reason) == (DENY, 403, "deny", NO_RULE), o


def test_a_failure_while_deciding_refuses(rules, caplog):
    class Broken:
        def check(self, req, now=None):
            raise RuntimeError("bug in matching")

    o = decide(flow(Broken(), hostnames=()), b"GET", b"/items", H, [(b"Host", H)])
    assert (o.action, o.status, o.verdict) == (REFUSE, 500, "error"), o
    assert o.reason == "internal error deciding the request" and o.forward is None
    assert "deciding" in caplog.text


def test_forwarded_target_is_what_was_checked(rules):
    fl = flow(rules)
    target = b"/items/42"
    o = decide(fl, b"GET", target, H, [(b"Host", H)])
    assert o.forward is target, "a canonical target is forwarded as received"
    o = decide(fl, b"GET", b"/items/./a/../b?x=%2F", H, [(b"Host", H)])
    assert o.action == ALLOW and o.forward == b"/items/b?x=%2F" and o.path == "/items/b"
    assert o.add_host is None


def test_http10_absolute_form_without_host_gets_one(rules):
    o = decide(flow(rules), b"GET", b"http://catalog.internal/items", None, [])
    assert o.action == ALLOW and o.host == "catalog.internal" and o.forward == b"/items"
    assert o.add_host == b"catalog.internal"


def test_decision_depends_on_its_inputs_only(rules):
    """The same head on two flows: the flow's hostnames decide, nothing kept from the first call."""
    head = (b"GET", b"/items", b"shop.internal", [(b"Host", b"shop.internal")])
    assert decide(flow(rules, hostnames=("shop.internal",)), *head).action == ALLOW
    assert decide(flow(rules), *head).action == DENY
    assert decide(flow(rules, hostnames=("shop.internal",)), *head).action == ALLOW


def test_rules_see_the_normalized_request():
    seen = []

    class Spy:
        def check(self, req, now=None):
            seen.append((req.method, req.path, req.query, req.host, req.headers))
            return Decision(False, "spy", 0, "no")

    decide(flow(Spy(), hostnames=()), b"PATCH", b"/a/%7e/./b?q=1", b"Example.COM.", [(b"X-T", b"v")])
    assert seen == [("PATCH", "/a/~/b", "q=1", "example.com", (("x-t", "v"),))]


def head(version="1.1", method=b"GET", upgrade=False, n_host=1, n_cl=0, n_te=0, te_chunked=False) -> Exchange:
    ex = Exchange(0.0)
    ex.version, ex.method, ex.upgrade = version, method, upgrade
    ex.n_host, ex.n_cl, ex.n_te, ex.te_chunked = n_host, n_cl, n_te, te_chunked
    return ex


HEADS = [
    ("plain GET", head(), None),
    ("HTTP/1.0 without Host", head(version="1.0", n_host=0), None),
    ("chunked body", head(method=b"POST", n_te=1, te_chunked=True), None),
    ("one Content-Length", head(method=b"POST", n_cl=1), None),
    ("HTTP/0.9", head(version="0.9"), (400, "HTTP/0.9 is not supported")),
    ("HTTP/2.0", head(version="2.0"), (505, "HTTP/2.0 is not supported on this port")),
    ("CONNECT", head(method=b"CONNECT"), (405, "CONNECT not allowed")),
    ("h2 preface", head(method=b"PRI"), (505, "HTTP/2 is not supported on this port")),
    ("upgrade", head(upgrade=True), (501, "protocol upgrade is not supported")),
    ("two Hosts", head(n_host=2), (400, "more than one Host header")),
    ("HTTP/1.1 without Host", head(n_host=0), (400, "missing Host header")),
    ("two Content-Lengths", head(n_cl=2), (400, "more than one Content-Length header")),
    ("CL with TE", head(n_cl=1, n_te=1, te_chunked=True), (400, "Content-Length with Transfer-Encoding")),
    ("two TEs", head(n_te=2, te_chunked=True), (400, "more than one Transfer-Encoding header")),
    ("TE not chunked", head(n_te=1), (501, "Transfer-Encoding other than chunked")),
    ("TE on HTTP/1.0", head(version="1.0", n_te=1, te_chunked=True), (400, "Transfer-Encoding in an HTTP/1.0 request")),
]


@pytest.mark.parametrize("name, ex, want", HEADS, ids=[h[0] for h in HEADS])
def test_check_head(name, ex, want):
    assert check_head(ex) == want
