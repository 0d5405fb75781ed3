"""The test tree itself: pytest's default import mode (prepend) imports a test file outside a
package under its bare basename, so two such files with one name make a collection error in any
run that collects both (the VM's default selection collects tests/unit and tests/vm together,
the host's make test doesn't: this is how that run broke once)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def module_names(root: Path) -> dict[str, list[str]]:
    """What each test file outside a package is imported as -> the files."""
    seen: dict[str, list[str]] = defaultdict(list)
    for f in sorted(root.rglob("*.py")):
        if "__pycache__" in f.parts or not (f.name.startswith("test_") or f.name == "conftest.py"):
            continue
        if (f.parent / "__init__.py").exists():
            continue  # imported by its package's dotted name
        if f.name == "conftest.py":
            continue  # pytest imports conftests by path
        seen[f.stem].append(str(f.relative_to(root)))
    return seen


def test_no_two_test_modules_share_a_name():
    clashes = {name: files for name, files in module_names(TESTS).items() if len(files) > 1}
    assert clashes == {}, f"test files imported under one name (rename one, or make a package): {clashes}"


def test_the_check_catches_a_clash(tmp_path):
    for d in ("unit", "vm"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "test_same.py").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "test_same.py").write_text("")
    names = module_names(tmp_path)
    assert sorted(names["test_same"]) == ["unit/test_same.py", "vm/test_same.py"]
