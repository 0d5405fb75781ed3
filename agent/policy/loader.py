"""Read a policy file into plain Python values that remember their line numbers.

PyYAML's `safe_load` forgets where things were and silently lets a
duplicated key override the first one. Both matter for a security policy:
every error must say FILE:LINE, and a second `action:` in a rule must not
quietly win. So we build the document ourselves from the parser's event
stream (every event carries its line) into `YMap`/`YSeq`, dict/list
subclasses that also record the line of every key and every item.

Why events rather than `yaml.compose`: with libyaml, parsing events for a
100,000-rule policy takes ~1 s here, while composing PyYAML's node graph
from the same events takes ~10 s. Scalars are still typed by PyYAML's own
resolver and constructor, so values mean exactly what `safe_load` says.

Scalars keep YAML 1.1 typing (`1` is an int, `no` is False): the validator
reports a wrong type with a hint rather than guessing what was meant.
"""
from __future__ import annotations

from typing import Any, Optional

import yaml

from bulkhead.policy.model import Diags, Loc

# libyaml is ~10x faster than the pure-Python parser, which matters for
# policies with tens of thousands of rules; both give the same marks.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# The first characters for which YAML 1.1 has an implicit type (int, bool, null, ...): a plain
# scalar starting with any other character is a string without asking the resolver, whose regex
# walk was a fifth of loading a 100k-rule file. Recurring plain scalars (keys, actions, segment
# names) are resolved once per file (_Builder.tags, bounded).
_TYPED_FIRST = frozenset(_Loader.yaml_implicit_resolvers)
_TAG_CACHE_MAX = 4096


_tuple_new = tuple.__new__


class YMap(dict):
    """A YAML mapping: a dict that knows its file, its line and each key's line."""

    file: str
    line: int
    key_lines: dict[str, int]

    def loc(self, key: Optional[str] = None) -> Loc:
        """Where `key` was written, or where the mapping starts."""
        line = self.key_lines.get(key) if key is not None else None
        # tuple.__new__ directly: Loc(...) goes through a generated Python __new__, and the
        # validator asks ~5 locations per rule (500k at 100k rules)
        return _tuple_new(Loc, (self.file, self.line if line is None else line))


class YSeq(list):
    """A YAML sequence: a list that knows its file, its line and each item's line."""

    file: str
    line: int
    item_lines: list[int]

    def loc(self, index: Optional[int] = None) -> Loc:
        if index is not None and 0 <= index < len(self.item_lines):
            return Loc(self.file, self.item_lines[index])
        return Loc(self.file, self.line)


def type_name(value: Any) -> str:
    """What a user would call the YAML type of `value`, for error messages."""
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, (YSeq, list)):
        return "a list" if value else "an empty list"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def load_yaml(path: str, diags: Diags) -> Any:
    """Parse one file. On failure report `path:LINE: ...` and return None.

    Returns the document converted to YMap/YSeq/scalars; an empty document
    is returned as None without an error (the validator decides whether an
    empty policy is acceptable). Problems inside a well-formed document
    (duplicate keys, non-string keys) are reported and the rest is kept.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except OSError as e:
        diags.error(Loc(path, 1), f"cannot read: {e.strerror or e}")
        return None
    except UnicodeDecodeError as e:
        diags.error(Loc(path, 1), f"cannot read: not UTF-8 text ({e.reason} at byte {e.start})")
        return None

    loader = _Loader(text)
    try:
        return _Builder(path, loader, diags).document()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = e.problem or e.context or "syntax error"
        if e.context and e.problem:
            problem = f"{problem} ({e.context})"
        diags.error(Loc(path, line), f"invalid YAML: {problem}")
        return None
    except yaml.YAMLError as e:
        diags.error(Loc(path, 1), f"invalid YAML: {e}")
        return None
    finally:
        loader.dispose()


class _SyntaxError(Exception):
    """A structural YAML problem found by the builder itself: ends the file."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


_BAD = object()  # a scalar that could not be constructed (already reported)


class _Builder:
    """Builds YMap/YSeq/scalars from parser events, reporting as it goes."""

    def __init__(self, path: str, loader: Any, diags: Diags):
        self.path = path
        self.loader = loader
        self.diags = diags
        self.anchors: dict[str, Any] = {}
        # Anchors whose node is still being built: an alias to one of them
        # (`x: &a [*a]`) is a recursive structure, which no policy needs.
        self.open_anchors: set[str] = set()
        self.tags: dict[str, str] = {}  # plain scalar -> its resolved tag

    def error(self, event: yaml.Event, message: str) -> None:
        self.diags.error(Loc(self.path, event.start_mark.line + 1), message)

    def document(self) -> Any:
        try:
            return self._document()
        except _SyntaxError as e:
            self.diags.error(Loc(self.path, e.line), f"invalid YAML: {e}")
            return None

    def _document(self) -> Any:
        get = self.loader.get_event
        get()  # StreamStartEvent
        ev = get()
        if isinstance(ev, yaml.StreamEndEvent):
            return None  # nothing but comments
        root = self.node(get())  # after DocumentStartEvent
        get()  # DocumentEndEvent
        ev = get()
        if not isinstance(ev, yaml.StreamEndEvent):
            raise _SyntaxError(ev.start_mark.line + 1, "a policy file holds one document; found another")
        return root

    def node(self, ev: yaml.Event) -> Any:
        if isinstance(ev, yaml.AliasEvent):
            if ev.anchor in self.open_anchors:
                raise _SyntaxError(ev.start_mark.line + 1, "recursive alias")
            if ev.anchor not in self.anchors:
                raise _SyntaxError(ev.start_mark.line + 1, f"found undefined alias {ev.anchor!r}")
            return self.anchors[ev.anchor]
        anchor = ev.anchor
        if isinstance(ev, yaml.ScalarEvent):
            value = self.scalar(ev)
            value = None if value is _BAD else value
        else:
            if anchor is not None:
                self.open_anchors.add(anchor)
            value = self.sequence(ev) if isinstance(ev, yaml.SequenceStartEvent) else self.mapping(ev)
            if anchor is not None:
                self.open_anchors.discard(anchor)
        if anchor is not None:
            self.anchors[anchor] = value
        return value

    def _value(self, ev: yaml.Event) -> Any:
        """node(ev), with the common case (a scalar without an anchor) one call shorter."""
        if type(ev) is yaml.ScalarEvent and ev.anchor is None:
            value = self.scalar(ev)
            return None if value is _BAD else value
        return self.node(ev)

    def scalar(self, ev: yaml.ScalarEvent) -> Any:
        """The scalar's value, typed exactly as PyYAML's safe loader would type it."""
        tag, value = ev.tag, ev.value
        if tag is None and ev.implicit[0] and value and value[0] not in _TYPED_FIRST and None not in _TYPED_FIRST:
            return value
        if tag is None or tag == "!":
            cacheable = tag is None and ev.implicit[0]
            tag = self.tags.get(value) if cacheable else None
            if tag is None:
                tag = self.loader.resolve(yaml.ScalarNode, value, ev.implicit)
                if cacheable and len(self.tags) < _TAG_CACHE_MAX:
                    self.tags[value] = tag
        if tag == _STR_TAG:
            return ev.value  # the common case, without constructor overhead
        if tag == _MERGE_TAG:
            self.error(ev, "YAML merge keys (<<) are not supported: write the keys out")
            return _BAD
        node = yaml.ScalarNode(tag, ev.value, ev.start_mark, ev.end_mark, ev.style)
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            self.error(ev, f"invalid YAML: {problem}")
            return _BAD

    def sequence(self, start: yaml.Event) -> YSeq:
        seq = YSeq()
        seq.file, seq.line, seq.item_lines = self.path, start.start_mark.line + 1, []
        get = self.loader.get_event
        while True:
            ev = get()
            if isinstance(ev, yaml.SequenceEndEvent):
                return seq
            seq.item_lines.append(ev.start_mark.line + 1)
            seq.append(self._value(ev))

    def mapping(self, start: yaml.Event) -> YMap:
        m = YMap()
        m.file, m.line, m.key_lines = self.path, start.start_mark.line + 1, {}
        get = self.loader.get_event
        while True:
            kev = get()
            if isinstance(kev, yaml.MappingEndEvent):
                return m
            kline = kev.start_mark.line + 1
            if isinstance(kev, yaml.ScalarEvent):
                key = self.scalar(kev)
            else:
                key = self.node(kev)  # alias or collection: consume it whole
                if not isinstance(key, str):
                    self.error(kev, "mapping keys must be plain strings, not a list or mapping")
                    key = _BAD
            value = self._value(get())
            if key is _BAD:
                continue
            if not isinstance(key, str):
                hint = " (YAML reads on/off/yes/no as booleans: quote it)" if isinstance(key, bool) else ""
                self.error(kev, f"mapping keys must be strings, got {type_name(key)}{hint}")
                continue
            if key in m:
                self.error(kev, f"duplicate key {key!r} (first at line {m.key_lines[key]})")
                continue
            m[key] = value
            m.key_lines[key] = kline
