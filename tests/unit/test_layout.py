"""The rooms of agent/ and which may import which (docs/architecture.md draws them).

Imports go down only:

    cli -> daemon -> {telemetry, verifier, lab, fleet, fabric} -> {policy, datapath} -> l7 -> core

policy takes only the ABI mirror (`datapath.abi`) from datapath: compiling a policy must never
load a program. Every import is read from the source (function-level ones too, so a "lazy"
import can't hide a cycle), absolute `bulkhead.` imports only.
"""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "agent"  # installed as `bulkhead`

# room -> what it may import besides itself ("room" or "room.module")
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "l7": {"core"},
    "datapath": {"core"},
    "policy": {"core", "l7", "datapath.abi"},
    "telemetry": {"core", "l7", "policy", "datapath"},
    "verifier": {"core", "l7", "policy", "datapath"},
    "lab": {"core", "policy", "datapath"},
    "fleet": {"core", "policy"},
    "fabric": {"core", "policy", "datapath"},
    "daemon": {"core", "l7", "policy", "datapath", "telemetry", "verifier", "fleet", "fabric"},
    "cli": {"core", "l7", "policy", "datapath", "telemetry", "verifier", "lab", "fleet", "fabric", "daemon"},
}
# Longer than ~600 lines on purpose: one idea each, splitting would scatter it.
LONG_OK: dict[str, str] = {
    # One mirror per C struct, enum and constant, in the C headers' order; split, it would
    # still be one list (tests/unit/test_abi.py and tests/bpf/test_abi_btf.py check it whole).
    "datapath/abi.py": "the Python mirror of the C ABI (bpf/include/*.h)",
}
MAX_LINES = 600


def modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).with_suffix("")
        parts = [x for x in rel.parts if x != "__init__"]
        mods[".".join(["bulkhead", *parts])] = p
    return mods


MODS = modules()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported bulkhead module) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "bulkhead"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "bulkhead":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((node.lineno, sub if sub in MODS else node.module))
    return out


def room_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def allowed(src: str, dst: str) -> bool:
    rs, rd = room_of(src), room_of(dst)
    if rs == rd:
        return True
    if rs == "" or rd == "":
        return False  # the top package imports nothing, and nothing imports it
    rules = ALLOWED[rs]
    return rd in rules or ".".join(dst.split(".")[1:3]) in rules


def violations(mods: dict[str, Path]) -> list[str]:
    bad = []
    for mod, path in mods.items():
        for line, dst in imports_of(path):
            if not allowed(mod, dst):
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                bad.append(f"{where}:{line}: {room_of(mod) or 'bulkhead'} may not import "
                           f"{dst} (allowed: {', '.join(sorted(ALLOWED.get(room_of(mod), ()))) or 'nothing'})")
    return bad


def test_every_room_is_known_and_a_package():
    rooms = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert rooms == set(ALLOWED), f"rooms on disk {sorted(rooms)} vs ALLOWED {sorted(ALLOWED)}"
    for room in rooms:
        assert (PKG / room / "__init__.py").exists(), f"agent/{room} has no __init__.py"
        assert not [p for p in (PKG / room).iterdir() if p.is_dir() and p.name != "__pycache__"], \
            f"agent/{room} has subfolders: rooms are flat"
    loose = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside any room: {loose}"


def test_imports_go_down_only():
    bad = violations(MODS)
    assert not bad, "imports against the direction of docs/architecture.md:\n" + "\n".join(bad)


def test_the_direction_check_catches_a_violation(tmp_path):
    """The check itself: a policy module importing the loader must be reported."""
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    from bulkhead.datapath import loader\n")
    bad = violations({"bulkhead.policy.bad": fake})
    assert len(bad) == 1 and "policy may not import bulkhead.datapath.loader" in bad[0]
    fake.write_text("from bulkhead.datapath import abi\n")
    assert violations({"bulkhead.policy.bad": fake}) == []


def test_no_import_cycles():
    graph = {m: {d for _, d in imports_of(p) if d in MODS and d != m} for m, p in MODS.items()}
    # Tarjan's strongly connected components; any component of 2+ modules is a cycle.
    index, low, on, stack, sccs, n = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not sccs, f"import cycles: {sccs}"


def test_imports_are_absolute_and_never_agent():
    bad = []
    for path in [*PKG.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom):
                if node.level and path.is_relative_to(PKG):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: relative import")
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: imports {n} (the package is `bulkhead`)"
                    for n in names if n == "agent" or n.startswith("agent.")]
    assert not bad, "\n".join(bad)
    # module paths in strings (python -m X, -c "from X import"): never agent.*
    for path in PKG.rglob("*.py"):
        for m in re.finditer(r"""(?:["']-m["'],\s*["']|-m\s+|from\s+|import\s+)agent\.\w+""", path.read_text()):
            bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not bad, "\n".join(bad)


def test_installed_packages_are_the_rooms():
    """pyproject maps agent/ to `bulkhead` and lists every room: nothing installs as `agent`.
    bpf/ and policies/ ride along as data packages (core/paths.py finds them once installed)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = {"bulkhead.bpf": "bpf", "bulkhead.policies": "policies"}
    assert cfg["package-dir"] == {"bulkhead": "agent", **data}
    assert set(cfg["packages"]) == {"bulkhead", *(f"bulkhead.{r}" for r in ALLOWED), *data}
    assert set(cfg["package-data"]) == set(data)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"bulkhead": "bulkhead.cli.main:main"}


@pytest.mark.parametrize("mod", sorted(MODS))
def test_modules_stay_readable(mod):
    path = MODS[mod]
    rel = str(path.relative_to(PKG))
    n = len(path.read_text().splitlines())
    if rel in LONG_OK:
        return
    assert n <= MAX_LINES, f"agent/{rel} has {n} lines (over {MAX_LINES}): split it by role, " \
                           "or add it to LONG_OK with the one idea it holds"
