"""CLI behaviour that needs no agent: error replies, and what the installed code imports."""
from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from bulkhead.cli import main as cli


def test_requests_follow_stops_on_an_error_reply(monkeypatch):
    """An agent that answers with an error mid-follow ends the command (exit 1, the message)."""
    replies = iter([
        {"ok": True, "seq": 3, "requests": []},
        {"ok": False, "error": "verifier gone"},
        {"ok": True, "seq": 4, "requests": []},  # never asked for: the command must stop first
    ])
    calls = []

    def fake(state_dir, op, **kw):
        calls.append((op, kw))
        return next(replies)

    monkeypatch.setattr(cli, "_agent_request", fake)
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    r = CliRunner().invoke(cli.main, ["requests", "--follow", "--state-dir", "/nonexistent"])
    assert r.exit_code == 1, r.output
    assert "verifier gone" in r.output
    assert len(calls) == 2 and calls[1] == ("requests", {"after": 3, "hop_after": 0, "limit": 0})


SCAPY_BLOCKED = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "scapy" or name.startswith("scapy."):
            raise ImportError("scapy is a test dependency only")
sys.meta_path.insert(0, Block())
import bulkhead
for m in pkgutil.walk_packages(bulkhead.__path__, "bulkhead."):
    if m.name.endswith("__main__"):
        continue
    importlib.import_module(m.name)
print("imported", len(sys.modules))
"""


def test_the_agent_imports_without_scapy():
    """scapy is in the test extra only: every module of the installed package imports without it."""
    p = subprocess.run([sys.executable, "-c", SCAPY_BLOCKED], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("imported")


def test_demo_fleet_and_fabric_are_two_demos():
    r = CliRunner().invoke(cli.main, ["demo", "--fleet", "--fabric"])
    assert r.exit_code == 2, r.output
    assert "pick one" in r.output


def test_demo_picks_the_demo_asked_for(monkeypatch):
    """`demo`, `demo --fleet`, `demo --fabric`: each runs its own module's main() (as root)."""
    from bulkhead.lab import demo, demo_fabric, demo_fleet

    ran = []
    for mod, code in ((demo, 0), (demo_fleet, 1), (demo_fabric, 130)):
        monkeypatch.setattr(mod, "main", lambda m=mod, c=code: ran.append(m.__name__) or c)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    got = [CliRunner().invoke(cli.main, ["demo", *flag]).exit_code for flag in ([], ["--fleet"], ["--fabric"])]
    assert got == [0, 1, 130]
    assert ran == ["bulkhead.lab.demo", "bulkhead.lab.demo_fleet", "bulkhead.lab.demo_fabric"]
