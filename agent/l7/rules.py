"""L7 rules: compile a rule's `http:` entries once, match normalized requests fast.

A rule's `http:` is a list of entries; a request is allowed when it matches
one entry, and it matches an entry when every condition the entry gives
holds (AND). Conditions are tried cheapest first — methods, paths, hosts,
headers, tokens — and the first that fails ends the entry; the entry that
got furthest explains a denial.

The Request must already be normalized (normalize.normalize_target,
normalize_host): matching is plain string work here.

    rule = compile_rule("web-reads-catalog", [{"methods": ["GET"], "paths": ["/items/*"]}])
    RuleSet([rule]).check(Request("GET", "/items/1", None, "catalog", ()))
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any, Callable, Optional

from bulkhead.l7 import tokens as tokenlib
from bulkhead.l7.tokens import REPEATED

__all__ = ["Request", "Decision", "RuleError", "RuleErrors", "HttpRule", "RuleSet", "compile_rule",
           "HTTP_KEYS"]

HTTP_KEYS = ("methods", "paths", "hosts", "headers", "tokens")
HEADER_COND_KEYS = ("equals", "glob", "present")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 7230 token (methods, header names)
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PATH_BAD = re.compile(r"[\x00-\x20\x7f\\#%]")


class Request:
    """One normalized request (read-only by convention).

    A plain __slots__ class, not a frozen dataclass: one is built per request on the
    verifier's hot path. `headers` may be given decoded, or as `raw_headers` — the
    (name, value) byte pairs as received — decoded only if a condition reads them.
    """

    __slots__ = ("method", "path", "query", "host", "_headers", "_raw")

    method: str  # as received; matched upper-cased
    path: str  # normalized (normalize_target)
    query: Optional[str]
    host: Optional[str]  # normalized (normalize_host), None if absent

    def __init__(self, method: str, path: str, query: Optional[str], host: Optional[str],
                 headers: Optional[tuple] = (), raw_headers: Optional[list] = None):
        self.method = method
        self.path = path
        self.query = query
        self.host = host
        self._headers = None if raw_headers is not None else tuple(headers or ())
        self._raw = raw_headers

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """(lowercased name, value), received order, duplicates kept."""
        h = self._headers
        if h is None:
            h = self._headers = tuple([(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in self._raw])
        return h

    def _key(self) -> tuple:
        return (self.method, self.path, self.query, self.host, self.headers)

    def __eq__(self, other):
        if other.__class__ is not Request:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Request(method={self.method!r}, path={self.path!r}, query={self.query!r}, "
                f"host={self.host!r}, headers={self.headers!r})")


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: Optional[str]  # the rule that allowed / the rule that denied
    entry: Optional[int]  # index of the matching (or furthest) http entry
    reason: str  # short, safe to log and to send


class RuleError(ValueError):
    """One problem in a rule's `http:` list; `where` is its path inside that list."""

    def __init__(self, where: tuple, message: str):
        super().__init__(where, message)
        self.where = tuple(where)
        self.message = message

    def __str__(self) -> str:
        if not self.where:
            return f"http: {self.message}"
        rest = "".join(f"[{w}]" if isinstance(w, int) else f".{w}" for w in self.where[1:])
        return f"http entry {self.where[0] + 1}{(' ' + rest.lstrip('.')) if rest else ''}: {self.message}"


class RuleErrors(ValueError):
    """Every problem found compiling one rule."""

    def __init__(self, errors: list[RuleError]):
        super().__init__(errors)
        self.errors = list(errors)

    def __str__(self) -> str:
        return "; ".join(str(e) for e in self.errors)


def _describe(v: Any) -> str:
    return tokenlib._describe(v)


# ----------------------------------------------------------------- matching --

class _Ctx:
    """Per-request state shared by every entry and rule: the header index is built once."""

    __slots__ = ("req", "method", "now", "_hdr")

    def __init__(self, req: Request, now: Optional[float]):
        self.req = req
        m = req.method
        # ASCII only: str.upper() folds some non-ASCII letters into ASCII ones.
        self.method = m.upper() if m.isascii() else m
        self.now = now
        self._hdr: Optional[dict] = None

    def header(self, name: str):
        """The value of header `name` (lowercase), None if absent, REPEATED if sent twice or more."""
        h = self._hdr
        if h is None:
            h = {}
            for k, v in self.req.headers:
                h[k] = REPEATED if k in h else v
            self._hdr = h
        return h.get(name)


Cond = Callable[[_Ctx], Optional[str]]  # None = holds, else the reason it does not


class _Entry:
    __slots__ = ("conds", "static")

    def __init__(self, conds: list[Cond], static: bool = False):
        self.conds = tuple(conds)
        self.static = static  # only methods/paths/hosts: the outcome depends on (method, path, host) alone


def _safe(text: str, limit: int = 64) -> str:
    """Request-supplied text for a reason: printable ASCII only, bounded."""
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    cut = "".join(c if (c.isascii() and c.isprintable()) else "?" for c in text[:limit])
    return cut + ("..." if len(text) > limit else "")


def _methods_cond(methods: frozenset) -> Cond:
    def cond(ctx: _Ctx) -> Optional[str]:
        if ctx.method in methods:
            return None
        return f"method {_safe(ctx.method, 32)} not allowed"
    return cond


def _paths_cond(exact: frozenset, prefixes: tuple, regex: Optional[re.Pattern]) -> Cond:
    match = regex.fullmatch if regex is not None else None

    def cond(ctx: _Ctx) -> Optional[str]:
        p = ctx.req.path
        if p in exact or (prefixes and p.startswith(prefixes)) or (match is not None and match(p)):
            return None
        return "path not allowed"
    return cond


def _hosts_cond(exact: frozenset, wild: frozenset) -> Cond:
    def cond(ctx: _Ctx) -> Optional[str]:
        h = ctx.req.host
        if h is None:
            return "missing host"
        if h in exact:
            return None
        if wild:
            dot = h.find(".")
            # Wildcards match DNS names only, never an IPv4 literal's labels.
            if dot > 0 and h[0] != "[" and not h[-1].isdigit() and h[dot + 1:] in wild:
                return None
        return f"host {_safe(h, 80)} not allowed"
    return cond


def _header_cond(name: str, kind: str, arg: Any) -> Cond:
    """kind: present | absent | equals | glob (arg: compiled regex)."""
    if kind == "absent":
        def cond(ctx: _Ctx) -> Optional[str]:
            v = ctx.header(name)
            if v is None:
                return None
            return f"header {name} repeated" if v is REPEATED else f"header {name} present"
        return cond

    def cond(ctx: _Ctx) -> Optional[str]:  # noqa: F811
        v = ctx.header(name)
        if v is None:
            return f"header {name} missing"
        if v is REPEATED:
            return f"header {name} repeated"
        if kind == "present" or (kind == "equals" and v == arg) or (kind == "glob" and arg.fullmatch(v)):
            return None
        return f"header {name} value not allowed"
    return cond


def _tokens_cond(verifiers: list) -> Cond:
    def cond(ctx: _Ctx) -> Optional[str]:
        first = None
        presented = None
        for v in verifiers:
            ok, reason, shown = v.check(ctx.header, ctx.now)
            if ok:
                return None
            if first is None:
                first = reason
            if shown and presented is None:
                presented = reason
        # The most telling reason: why a credential that was sent failed, else what is missing.
        return presented or first
    return cond


# ---------------------------------------------------------------- compiling --

def _path_pattern(p: str, where: tuple, errors: list[RuleError]):
    """-> ("exact", s) | ("prefix", s) | ("glob", regex source) | None (error recorded)."""
    if not isinstance(p, str) or not p.startswith("/"):
        errors.append(RuleError(where, f"a path must be a string starting with '/', got {_describe(p)}"))
        return None
    if _PATH_BAD.search(p):
        errors.append(RuleError(where, f"path {p!r}: write paths decoded, without %-escapes, spaces, control "
                                       "characters, '\\' or '#' (requests are matched after decoding)"))
        return None
    segs = p.split("/")[1:]
    if any(s in (".", "..") for s in segs):
        errors.append(RuleError(where, f"path {p!r} has a dot-segment; requests are matched with "
                                       "dot-segments resolved, so write the path they resolve to"))
        return None
    if "//" in p:
        errors.append(RuleError(where, f"path {p!r} has an empty segment (//); request paths are "
                                       "matched with // collapsed, so it could never match"))
        return None
    if "***" in p:
        errors.append(RuleError(where, f"path {p!r}: use * (within a segment) or ** (across segments)"))
        return None
    if "*" not in p and "?" not in p:
        return "exact", p
    if p.endswith("/*") and "*" not in p[:-1] and "?" not in p:
        return "prefix", p[:-1]
    out = []
    i = 0
    while i < len(p):
        c = p[i]
        if c == "*":
            if p.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(c))
        i += 1
    return "glob", "".join(out)


def _host_pattern(h: Any, where: tuple, errors: list[RuleError]):
    """-> ("exact", name) | ("wild", suffix after "*.") | None."""
    if not isinstance(h, str) or not h or not h.isascii():
        errors.append(RuleError(where, f"a host must be an ASCII DNS name (IDNs in their xn-- form), "
                                       f"got {_describe(h)}"))
        return None
    name = h.lower()
    if name.endswith("."):
        name = name[:-1]
    if name.startswith("[") and name.endswith("]"):
        try:
            return "exact", f"[{ipaddress.IPv6Address(name[1:-1]).compressed}]"
        except ValueError:
            errors.append(RuleError(where, f"host {h!r} is not a valid IPv6 literal"))
            return None
    try:
        return "exact", str(ipaddress.IPv4Address(name))
    except ValueError:
        pass
    labels = name.split(".")
    wild = labels[0] == "*"
    check = labels[1:] if wild else labels
    why = None
    if len(name) > 253:
        why = "a DNS name is at most 253 characters"
    elif wild and not check:
        why = "'*' alone matches any host: leave hosts out instead"
    elif "*" in "".join(check):
        why = "'*' is allowed only as the whole left-most label, as in *.example.com"
    elif not all(_LABEL.fullmatch(lab) for lab in check):
        why = "each label is 1-63 letters, digits or '-', not starting or ending with '-'"
    if why:
        errors.append(RuleError(where, f"host {h!r} is invalid: {why}"))
        return None
    return ("wild", ".".join(check)) if wild else ("exact", name)


def _glob_value(g: str) -> re.Pattern:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in g), re.DOTALL)


def _string_list(entry: dict, key: str, where: tuple, errors: list[RuleError], what: str) -> Optional[list]:
    v = entry[key]
    if not isinstance(v, list) or not v:
        errors.append(RuleError(where + (key,), f"{key} must be a non-empty list of {what}, got {_describe(v)}"))
        return None
    return v


def _compile_headers(spec: Any, where: tuple, errors: list[RuleError]) -> list[Cond]:
    conds: list[Cond] = []
    seen: set[str] = set()
    if isinstance(spec, list):
        if not spec:
            errors.append(RuleError(where, "headers must be a non-empty mapping or list of header names"))
        for i, name in enumerate(spec):
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                errors.append(RuleError(where + (i,), f"a header name must be a token like x-tenant, "
                                                      f"got {_describe(name)}"))
                continue
            low = name.lower()
            if low not in seen:
                seen.add(low)
                conds.append(_header_cond(low, "present", None))
        return conds
    if not isinstance(spec, dict) or not spec:
        errors.append(RuleError(where, "headers must be a non-empty mapping (name: condition) or list of "
                                       f"header names, got {_describe(spec)}"))
        return conds
    for name, cond in spec.items():
        w = where + (name,)
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            errors.append(RuleError(w, f"a header name must be a token like x-tenant, got {_describe(name)}"))
            continue
        low = name.lower()
        if low in seen:
            errors.append(RuleError(w, f"header {low} is given twice (names are case-insensitive)"))
            continue
        seen.add(low)
        kind, arg = None, None
        if isinstance(cond, bool):
            kind = "present" if cond else "absent"
        elif isinstance(cond, str):
            kind, arg = ("glob", _glob_value(cond)) if ("*" in cond or "?" in cond) else ("equals", cond)
        elif isinstance(cond, dict):
            unknown = [k for k in cond if k not in HEADER_COND_KEYS]
            if unknown or len(cond) != 1:
                errors.append(RuleError(w + tuple(unknown[:1]), f"header {low}: a condition mapping has exactly one of "
                                           f"{', '.join(HEADER_COND_KEYS)}, got {sorted(map(str, cond))}"))
                continue
            (k, v), = cond.items()
            if k == "present":
                if not isinstance(v, bool):
                    errors.append(RuleError(w + (k,), f"header {low}: present must be true or false, "
                                                      f"got {_describe(v)}"))
                    continue
                kind = "present" if v else "absent"
            else:
                if not isinstance(v, str):
                    errors.append(RuleError(w + (k,), f"header {low}: {k} must be a string, got {_describe(v)} "
                                                      "(quote numbers)"))
                    continue
                kind, arg = (k, _glob_value(v) if k == "glob" else v)
        else:
            errors.append(RuleError(w, f"header {low}: the condition must be true, false, a string or a "
                                       f"mapping ({', '.join(HEADER_COND_KEYS)}), got {_describe(cond)} "
                                       "(quote numbers)"))
            continue
        conds.append(_header_cond(low, kind, arg))
    return conds


def _compile_entry(i: int, entry: Any, base_dir: Optional[str], errors: list[RuleError]) -> Optional[_Entry]:
    where = (i,)
    if not isinstance(entry, dict):
        errors.append(RuleError(where, f"each http entry must be a mapping with keys {', '.join(HTTP_KEYS)}, "
                                       f"got {_describe(entry)}"))
        return None
    before = len(errors)
    for key in entry:
        if key not in HTTP_KEYS:
            errors.append(RuleError(where + (key,), f"unknown key {key!r}; allowed keys: {', '.join(HTTP_KEYS)}"))
    if not any(k in entry for k in HTTP_KEYS):
        errors.append(RuleError(where, "this entry has no conditions, so it matches every request: "
                                       "remove http to allow all"))
        return None
    conds: list[Cond] = []
    if "methods" in entry:
        items = _string_list(entry, "methods", where, errors, "HTTP methods like [GET, HEAD]")
        methods = set()
        for j, m in enumerate(items or []):
            if not isinstance(m, str) or not _TOKEN.fullmatch(m):
                errors.append(RuleError(where + ("methods", j), f"a method must be a token like GET, "
                                                                f"got {_describe(m)}"))
            else:
                methods.add(m.upper())
        if methods:
            conds.append(_methods_cond(frozenset(methods)))
    if "paths" in entry:
        items = _string_list(entry, "paths", where, errors, "paths like \"/items/*\"")
        exact, prefixes, globs = set(), [], []
        for j, p in enumerate(items or []):
            r = _path_pattern(p, where + ("paths", j), errors)
            if r is None:
                continue
            kind, s = r
            (exact.add(s) if kind == "exact" else prefixes.append(s) if kind == "prefix" else globs.append(s))
        if exact or prefixes or globs:
            regex = re.compile("|".join(f"(?:{g})" for g in globs), re.DOTALL) if globs else None
            conds.append(_paths_cond(frozenset(exact), tuple(prefixes), regex))
    if "hosts" in entry:
        items = _string_list(entry, "hosts", where, errors, "host names")
        exact, wild = set(), set()
        for j, h in enumerate(items or []):
            r = _host_pattern(h, where + ("hosts", j), errors)
            if r is not None:
                (exact if r[0] == "exact" else wild).add(r[1])
        if exact or wild:
            conds.append(_hosts_cond(frozenset(exact), frozenset(wild)))
    if "headers" in entry:
        conds.extend(_compile_headers(entry["headers"], where + ("headers",), errors))
    if "tokens" in entry:
        items = _string_list(entry, "tokens", where, errors, "token checks like {jwt: FILE}")
        verifiers = []
        for j, item in enumerate(items or []):
            v, problems = tokenlib.compile_token(item, base_dir)
            for sub, msg in problems:
                errors.append(RuleError(where + ("tokens", j) + tuple(sub), msg))
            if v is not None:
                verifiers.append(v)
        if verifiers:
            conds.append(_tokens_cond(verifiers))
    if len(errors) > before:
        return None
    return _Entry(conds, static="headers" not in entry and "tokens" not in entry)


class HttpRule:
    """One rule's compiled `http:` list."""

    __slots__ = ("name", "entries")

    def __init__(self, name: str, entries: list[_Entry]):
        self.name = name
        self.entries = tuple(entries)

    def __repr__(self) -> str:
        return f"HttpRule({self.name!r}, {len(self.entries)} entries)"

    def _check(self, ctx: _Ctx) -> tuple[int, int, Optional[str]]:
        """(entry index, conditions passed, reason) of the match (reason None) or of the furthest entry."""
        best = (0, -1, "no http entry")
        for i, entry in enumerate(self.entries):
            passed = 0
            for cond in entry.conds:
                reason = cond(ctx)
                if reason is not None:
                    if passed > best[1]:
                        best = (i, passed, reason)
                    break
                passed += 1
            else:
                return i, passed, None
        return best

    def check(self, req: Request, now: Optional[float] = None) -> Decision:
        i, _, reason = self._check(_Ctx(req, now))
        if reason is None:
            return Decision(True, self.name, i, "allowed")
        return Decision(False, self.name, i if self.entries else None, reason)


class RuleSet:
    """The L7 rules that govern one flow (one app pair and port).

    A request is allowed if an entry of any rule matches; the Decision names
    that rule. Otherwise it is denied, naming the rule and entry that got
    furthest (ties: the earlier rule) and why that entry failed.
    """

    __slots__ = ("rules", "_cache")

    CACHE_MAX = 4096

    def __init__(self, rules: list[HttpRule]):
        self.rules = tuple(rules)
        # Decisions of a rule set whose every entry looks only at the method, path and
        # host are cached by (method, path, host): Decisions are immutable, and a new
        # policy makes a new RuleSet (with an empty cache).
        static = all(e.static for r in self.rules for e in r.entries)
        self._cache: Optional[dict] = {} if static else None

    def check(self, req: Request, now: Optional[float] = None) -> Decision:
        cache = self._cache
        if cache is not None:
            key = (req.method, req.path, req.host)
            d = cache.get(key)
            if d is None:
                d = self._check(req, now)
                if len(cache) >= self.CACHE_MAX:
                    cache.clear()
                cache[key] = d
            return d
        return self._check(req, now)

    def _check(self, req: Request, now: Optional[float]) -> Decision:
        ctx = _Ctx(req, now)
        best = None
        for rule in self.rules:
            i, passed, reason = rule._check(ctx)
            if reason is None:
                return Decision(True, rule.name, i, "allowed")
            if best is None or passed > best[2]:
                best = (rule, i, passed, reason)
        if best is None:
            return Decision(False, None, None, "no L7 rule for this flow")
        rule, i, _, reason = best
        return Decision(False, rule.name, i, reason)


def compile_rule(name: str, entries: list[dict], base_dir: Optional[str] = None) -> HttpRule:
    """Compile one rule's `http:` list (plain dicts as in the YAML).

    Key and API-key files are loaded now (relative paths against base_dir).
    Raises RuleErrors carrying every problem, each with its `where` inside
    the list, e.g. (0, "tokens", 1, "jwt").
    """
    errors: list[RuleError] = []
    compiled: list[_Entry] = []
    if not isinstance(entries, list) or not entries:
        raise RuleErrors([RuleError((), f"http must be a non-empty list of request matches (keys "
                                        f"{', '.join(HTTP_KEYS)}), got {_describe(entries)}")])
    for i, entry in enumerate(entries):
        e = _compile_entry(i, entry, base_dir, errors)
        if e is not None:
            compiled.append(e)
    if errors:
        raise RuleErrors(errors)
    return HttpRule(name, compiled)
