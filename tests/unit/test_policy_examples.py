"""Every policy shipped in policies/ validates and compiles: they are documentation users copy."""
from __future__ import annotations

from pathlib import Path

import pytest

from bulkhead.policy import load_policy

POLICIES = sorted((Path(__file__).resolve().parents[2] / "policies").glob("*.yaml"))


def test_examples_exist():
    assert {p.name for p in POLICIES} >= {"demo.yaml", "example.yaml", "tls-names.yaml"}


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_example_policy_compiles(path):
    text = path.read_text()
    assert text.lstrip().startswith("#"), "each example starts with a comment saying what it shows"
    bundle, _ = load_policy([str(path)])
    assert bundle.policy_entries, "an example that compiles to nothing shows nothing"
    if "hostnames:" in text:
        assert bundle.sni_entries, "hostname apps compile to server-name entries"
