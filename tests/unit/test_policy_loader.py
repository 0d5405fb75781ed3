"""YAML loading: line numbers for keys and items, and loader-level errors."""
from __future__ import annotations

import textwrap

import pytest

from bulkhead.policy import PolicyError, load_policy
from bulkhead.policy.loader import YMap, YSeq, load_yaml
from bulkhead.policy.model import Diags


def _load(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    diags = Diags([str(path)])
    return load_yaml(str(path), diags), diags, str(path)


def test_lines_of_keys_and_items(tmp_path):
    doc, diags, path = _load(tmp_path, """\
        version: 1
        apps:
          - name: web
            addresses:
              - 198.18.1.0/24
              - "fd00::/64"
          - {name: db, segment: core}
        """)
    assert not diags.errors
    assert isinstance(doc, YMap) and doc.file == path
    assert doc.key_lines == {"version": 1, "apps": 2}
    apps = doc["apps"]
    assert isinstance(apps, YSeq) and apps.item_lines == [3, 7]
    assert apps[0].key_lines == {"name": 3, "addresses": 4}
    assert apps[0]["addresses"].item_lines == [5, 6]
    assert apps[1].loc("segment").line == 7
    # Scalars keep their YAML types.
    assert doc["version"] == 1 and apps[0]["addresses"][1] == "fd00::/64"


def test_duplicate_key_is_an_error_and_first_value_is_kept(tmp_path):
    doc, diags, path = _load(tmp_path, """\
        a: 1
        b:
          c: 2
          c: 3
        """)
    assert [str(d) for d in diags.errors] == [f"{path}:4: duplicate key 'c' (first at line 3)"]
    assert doc["b"]["c"] == 2


@pytest.mark.parametrize("text,line,fragment", [
    # An unclosed list is noticed at the end of input (line 2 or 3 by parser).
    ("a: [1,\n b: 2\n", (2, 3), "invalid YAML:"),
    ("a: 1\nb: c: d\n", 2, "invalid YAML:"),
    ("a: 1\n---\nb: 2\n", 2, "invalid YAML:"),  # one document per file
    ("x: &a [*a]\n", 1, "recursive alias"),
    ("base: &b {k: 1}\nm:\n  <<: *b\n", 3, "merge keys (<<) are not supported"),
    ("a: !custom 1\n", 1, "invalid YAML:"),
    ("on: 1\n", 1, "mapping keys must be strings"),
    ("? [a]\n: 1\n", 1, "mapping keys must be plain strings"),
])
def test_loader_errors(tmp_path, text, line, fragment):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    diags = Diags([str(path)])
    load_yaml(str(path), diags)
    assert len(diags.errors) == 1, diags.errors
    d = diags.errors[0]
    assert d.file == str(path)
    assert d.line in (line if isinstance(line, tuple) else (line,))
    assert fragment in d.message


def test_unreadable_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(PolicyError) as e:
        load_policy([missing])
    assert str(e.value) == f"{missing}:1: cannot read: No such file or directory"


def test_not_utf8(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"version: 1\nname: \xff\n")
    with pytest.raises(PolicyError) as e:
        load_policy([str(path)])
    assert str(e.value).startswith(f"{path}:1: cannot read: not UTF-8")


def test_invalid_yaml_through_load_policy(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nsegments:\n  - name: a\n    interfaces: [x\n")
    with pytest.raises(PolicyError) as e:
        load_policy([str(path)])
    [d] = e.value.errors
    assert d.file == str(path) and d.message.startswith("invalid YAML: ")
    assert d.line in (4, 5)  # the unclosed list is noticed at end of input


def test_unquoted_ipv6_in_flow_list_is_a_yaml_error(tmp_path):
    """Documented in docs/policy.md: quote IPv6 addresses that start with '::'."""
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\napps:\n  - addresses: [::1]\n")
    with pytest.raises(PolicyError) as e:
        load_policy([str(path)])
    assert [(d.line, d.message.split(":")[0]) for d in e.value.errors] == [(3, "invalid YAML")]
