"""Where the BPF sources and example policies are: the source tree, or the installed package.

Run from a checkout (setup.sh's editable .venv) the agent compiles the repo's bpf/ as it is on
disk, so an edit takes effect on the next start. Installed (scripts/service/install.sh, a plain
`pip install`), bpf/ and policies/ are package data, `bulkhead.bpf` and `bulkhead.policies`
(pyproject.toml), and the repo may be gone.
"""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]   # agent/, installed as `bulkhead`


def _source_tree() -> Path | None:
    tree = PACKAGE_DIR.parent
    # pyproject.toml too: site-packages could hold some other distribution's top-level `bpf`
    if (tree / "pyproject.toml").is_file() and (tree / "bpf" / "bulkhead.c").is_file():
        return tree
    return None


SOURCE_TREE = _source_tree()
# The working directory of the agent's children (the verifier, the lab's servers): the checkout,
# else the installed package, a directory that exists either way.
REPO = SOURCE_TREE if SOURCE_TREE is not None else PACKAGE_DIR
BPF_DIR = (SOURCE_TREE / "bpf") if SOURCE_TREE is not None else PACKAGE_DIR / "bpf"
POLICIES_DIR = (SOURCE_TREE / "policies") if SOURCE_TREE is not None else PACKAGE_DIR / "policies"
