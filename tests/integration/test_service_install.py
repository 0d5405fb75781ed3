"""scripts/service/install.sh and uninstall.sh into a staging root (--root): the exact files, an
installed package that works without the repo, an upgrade that keeps /etc/bulkhead, and an
uninstall that leaves nothing.

pip installs into the fresh venv from pip's configured sources, like a real install (PIP_* in
the environment are passed on); --system-site-packages and pip's wheel cache keep it to ~15 s,
the upgrade run to ~5 s. No systemctl is called with --root, so it runs on a host without systemd
as PID 1; the service itself is tested in the VM (tests/service/).
"""
from __future__ import annotations

import filecmp
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "scripts" / "service"
PREFIX = "/opt/bulkhead-test"  # not the default: install.sh must rewrite the unit's paths
POLICY = ROOT / "policies" / "demo.yaml"
CONFIG = {"etc/bulkhead/policy.yaml", "etc/bulkhead/bulkhead.env"}
FILES = CONFIG | {"etc/systemd/system/bulkhead.service", "usr/local/sbin/bulkhead"}
# the parents install.sh creates in an empty staging root; a real / has them already
PARENTS = {"etc", "etc/systemd", "etc/systemd/system", "usr", "usr/local", "usr/local/sbin", "opt"}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.run(["bash", str(SERVICE / script), *args], check=False, capture_output=True, text=True,
                       timeout=600, cwd="/", env=env)
    assert p.returncode == 0, f"{script} {' '.join(args)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def tree(root: Path, skip: Path | None = None) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if skip is not None and d == skip:
            dirnames[:] = []
            filenames = []
        for name in [*dirnames, *filenames]:
            out.add(str((d / name).relative_to(root)))
    return out


@pytest.fixture
def staged(tmp_path):
    root = tmp_path / "root"
    try:
        yield root
    finally:
        # uninstall is what is tested; this only makes sure a failed test leaves no venv behind
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_install_upgrade_uninstall(staged):
    root = staged
    venv = root / PREFIX.lstrip("/") / "venv"
    out = run("install.sh", "--root", str(root), "--prefix", PREFIX, "--policy", str(POLICY)).stdout
    assert "[install] staging root" in out and "systemctl enable --now bulkhead" in out, out

    # exactly these files, besides the venv
    assert tree(root, skip=venv) - PARENTS == FILES | {"etc/bulkhead", PREFIX.lstrip("/"),
                                                       f"{PREFIX.lstrip('/')}/venv"}
    link = root / "usr/local/sbin/bulkhead"
    assert link.is_symlink() and os.readlink(link) == f"{PREFIX}/venv/bin/bulkhead"
    unit = (root / "etc/systemd/system/bulkhead.service").read_text()
    assert unit == (SERVICE / "bulkhead.service").read_text().replace("/opt/bulkhead/", f"{PREFIX}/")
    assert f"ExecStart={PREFIX}/venv/bin/bulkhead agent run" in unit
    assert (root / "etc/bulkhead/policy.yaml").read_bytes() == POLICY.read_bytes()
    assert (root / "etc/bulkhead/bulkhead.env").read_bytes() == (SERVICE / "bulkhead.env").read_bytes()

    # the installed package stands on its own: its own BPF sources, no path into the repo
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    code = ("import bulkhead; from bulkhead.core.paths import BPF_DIR, SOURCE_TREE;"
            "assert SOURCE_TREE is None, SOURCE_TREE; assert (BPF_DIR / 'bulkhead.c').exists();"
            "print(bulkhead.__file__); print(BPF_DIR)")
    p = subprocess.run([str(py), "-c", code],
                       check=False, capture_output=True, text=True, cwd="/", env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    pkg_file, bpf_dir = p.stdout.split()
    assert Path(pkg_file).is_relative_to(venv) and Path(bpf_dir).is_relative_to(venv), p.stdout
    cmp = filecmp.dircmp(ROOT / "bpf", bpf_dir, ignore=["__pycache__"])
    assert not (cmp.left_only or cmp.right_only or cmp.diff_files), "installed bpf/ differs from the repo's"
    assert not filecmp.dircmp(ROOT / "bpf/include", Path(bpf_dir) / "include").diff_files
    site = next(venv.glob("lib/python3*/site-packages"))
    leaks = [str(f) for f in site.iterdir() if f.suffix in (".pth", ".egg-link") and str(ROOT) in f.read_text()]
    assert not leaks, f"the venv points into the repo: {leaks}"
    p = subprocess.run([str(venv / "bin" / "bulkhead"), "--help"], check=False, capture_output=True, text=True, cwd="/",
                       env=env, timeout=60)
    assert p.returncode == 0 and "agent" in p.stdout and "reload" in p.stdout, p.stderr

    # an upgrade: the package again, /etc/bulkhead exactly as the owner left it
    (root / "etc/bulkhead/bulkhead.env").write_text("BULKHEAD_POLICY=--policy /etc/bulkhead/mine.yaml\n")
    (root / "etc/bulkhead/policy.yaml").write_text("# edited\n")
    out = run("install.sh", "--root", str(root), "--prefix", PREFIX).stdout
    assert f"upgrading {PREFIX}/venv" in out and out.count("never overwritten") == 2, out
    assert (root / "etc/bulkhead/bulkhead.env").read_text() == "BULKHEAD_POLICY=--policy /etc/bulkhead/mine.yaml\n"
    assert (root / "etc/bulkhead/policy.yaml").read_text() == "# edited\n"
    assert tree(root, skip=venv) - PARENTS == FILES | {"etc/bulkhead", PREFIX.lstrip("/"),
                                                       f"{PREFIX.lstrip('/')}/venv"}

    # a --policy that does not validate stops the install before anything outside the venv changes
    bad = root.parent / "bad.yaml"
    bad.write_text("version: 1\nsegments: [{name: x, interfaces: []}]\nrules: nope\n")
    before = {f: (root / f).read_bytes() for f in CONFIG}
    p = subprocess.run(["bash", str(SERVICE / "install.sh"), "--root", str(root), "--prefix", PREFIX,
                        "--policy", str(bad)], check=False, capture_output=True, text=True, timeout=600, cwd="/", env=env)
    assert p.returncode != 0 and "does not validate" in p.stderr, (p.stdout, p.stderr)
    assert {f: (root / f).read_bytes() for f in CONFIG} == before

    # --keep-config keeps /etc/bulkhead and nothing else; a second run removes the rest
    out = run("uninstall.sh", "--root", str(root), "--prefix", PREFIX, "--keep-config").stdout
    assert tree(root) - PARENTS == CONFIG | {"etc/bulkhead"}, out
    out = run("uninstall.sh", "--root", str(root), "--prefix", PREFIX).stdout
    assert tree(root) - PARENTS == set(), out
    assert all((root / d).is_dir() and not any(f.is_file() for f in (root / d).iterdir()) for d in PARENTS)
    run("uninstall.sh", "--root", str(root), "--prefix", PREFIX)  # idempotent

