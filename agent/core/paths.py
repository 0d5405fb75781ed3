"""Where things are in the source tree (bpf/*.c is compiled from it at run time)."""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]   # agent/, installed as `bulkhead`
REPO = PACKAGE_DIR.parent
BPF_DIR = REPO / "bpf"
POLICIES_DIR = REPO / "policies"
