#!/usr/bin/env bash
# install.sh — install bulkhead as a systemd service (`make install`). Run as root from the repo.
#
#   bash scripts/service/install.sh [--policy FILE] [--prefix DIR] [--root DIR]
#
# Installs exactly these, and nothing else (docs/operations.md "Run as a service"):
#   PREFIX/venv/                        a venv of /usr/bin/python3 with its system site packages
#                                       (the distribution's bcc bindings), bulkhead installed into
#                                       it as a plain package with bpf/ as package data: the repo
#                                       can be deleted afterwards
#   /usr/local/sbin/bulkhead            symlink to PREFIX/venv/bin/bulkhead
#   /etc/systemd/system/bulkhead.service
#   /etc/bulkhead/policy.yaml           from --policy FILE, else an example to edit (audit mode)
#   /etc/bulkhead/bulkhead.env          the agent's options (policy files or fleet settings)
# Files already in /etc/bulkhead are never overwritten. It does not enable or start the service.
#
# Re-running it is an upgrade: the venv gets the repo's current version, /etc/bulkhead stays as
# it is, systemd re-reads the unit. A running agent keeps running the version it started with
# until `systemctl restart bulkhead` (--restart does that with `systemctl try-restart`).
#
# Python packages come from pip's usual sources; PIP_NO_INDEX / PIP_FIND_LINKS (and the other
# PIP_* variables) are honoured, so an offline host installs from a wheelhouse. The package is
# built with the venv's own setuptools (--no-build-isolation): a wheelhouse needs the
# dependencies only (plus `wheel` where neither the system's python3-wheel nor setuptools >= 70.1
# provides bdist_wheel).
#
# Options:
#   --policy FILE   install FILE as /etc/bulkhead/policy.yaml (validated first)
#   --prefix DIR    where the venv goes (default /opt/bulkhead)
#   --root DIR      install under DIR instead of / (a staging root, for tests and packagers):
#                   no systemctl calls, no root needed. The venv's scripts name the path they
#                   were built at (DIR/PREFIX/venv), so such a venv runs only from there.
#   --restart       after an upgrade, `systemctl try-restart bulkhead` (restarts it if running)
#   -h, --help      this text

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SERVICE_SRC="$REPO_ROOT/scripts/service"
SYSTEM_PYTHON=/usr/bin/python3   # the only interpreter the distribution's bcc bindings load in
UNIT_PREFIX=/opt/bulkhead        # what scripts/service/bulkhead.service says; replaced by --prefix

log() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

POLICY="" PREFIX="$UNIT_PREFIX" ROOT="" RESTART=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --policy) [[ $# -ge 2 ]] || die "--policy needs a FILE"; POLICY="$2"; shift 2 ;;
        --prefix) [[ $# -ge 2 ]] || die "--prefix needs a DIR"; PREFIX="$2"; shift 2 ;;
        --root) [[ $# -ge 2 ]] || die "--root needs a DIR"; ROOT="$2"; shift 2 ;;
        --restart) RESTART=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$PREFIX" == /* ]] || die "--prefix must be an absolute path: $PREFIX"
PREFIX="${PREFIX%/}"
if [[ -n "$ROOT" ]]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
    [[ "$ROOT" != / ]] || ROOT=""
fi
if [[ -n "$POLICY" ]]; then
    [[ -f "$POLICY" ]] || die "--policy $POLICY: no such file"
    POLICY="$(cd "$(dirname "$POLICY")" && pwd)/$(basename "$POLICY")"
fi

VENV="$ROOT$PREFIX/venv"
SBIN_LINK="$ROOT/usr/local/sbin/bulkhead"
UNIT="$ROOT/etc/systemd/system/bulkhead.service"
ETC="$ROOT/etc/bulkhead"

# ------------------------------------------------------------------ preconditions
if [[ -z "$ROOT" ]]; then
    [[ "$(id -u)" -eq 0 ]] || die "must run as root (it writes $PREFIX, /etc and /usr/local/sbin): sudo bash $0"
    command -v systemctl >/dev/null || die "systemctl not found: the service needs systemd"
fi
[[ -x "$SYSTEM_PYTHON" ]] || die "$SYSTEM_PYTHON not found (Debian/Ubuntu's python3)"
"$SYSTEM_PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$SYSTEM_PYTHON cannot make a venv: apt-get install python3-venv (or run scripts/setup.sh)"
"$SYSTEM_PYTHON" -c 'import bcc' 2>/dev/null \
    || die "$SYSTEM_PYTHON cannot import bcc: apt-get install python3-bpfcc (scripts/setup.sh installs everything the agent needs)"
command -v nft >/dev/null || die "nft not found: apt-get install nftables (or run scripts/setup.sh)"
if [[ ! -e "/lib/modules/$(uname -r)/build" ]]; then
    log "WARNING: no kernel headers at /lib/modules/$(uname -r)/build: the agent's first compile will fail (scripts/setup.sh installs them)"
fi

# ------------------------------------------------------------------ the venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
upgrade=0
if [[ -x "$VENV/bin/python" ]] && grep -qx "home = ${SYSTEM_PYTHON%/*}" "$VENV/pyvenv.cfg" 2>/dev/null \
        && grep -qx "include-system-site-packages = true" "$VENV/pyvenv.cfg"; then
    upgrade=1
    old_version="$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("bulkhead"))' 2>/dev/null || echo unknown)"
    log "upgrading $PREFIX/venv (installed: bulkhead $old_version)"
else
    [[ ! -e "$VENV" ]] || { log "replacing $PREFIX/venv (not a venv of $SYSTEM_PYTHON with system site packages)"; rm -rf "$VENV"; }
    log "creating $PREFIX/venv ($SYSTEM_PYTHON -m venv --system-site-packages)"
    mkdir -p "${VENV%/*}"
    "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --quiet)

# --no-build-isolation: build with the venv's setuptools (ensurepip's, or the system's through
# the system site packages) instead of fetching setuptools into a throw-away build env.
if ! "$VENV/bin/python" - <<'EOF'
import sys
import setuptools
v = tuple(int(x) for x in setuptools.__version__.split(".")[:2])
if v < (64, 0):
    sys.exit(1)
if v < (70, 1):  # setuptools' own bdist_wheel came in 70.1; before it, the `wheel` package
    import wheel  # noqa: F401
EOF
then
    log "installing build requirements into the venv: setuptools>=64 wheel"
    "${PIP[@]}" install 'setuptools>=64' wheel
fi

# Build from a copy, so the repo is not written to (pip's build/ and egg-info dirs) and files
# there that are not part of the package cannot leak in.
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
mkdir "$BUILD/src" "$BUILD/dist"
tar -C "$REPO_ROOT" --exclude=__pycache__ -cf - pyproject.toml README.md agent bpf policies \
    | tar -C "$BUILD/src" -xf -
"${PIP[@]}" wheel --no-build-isolation --no-deps --wheel-dir "$BUILD/dist" "$BUILD/src" \
    || die "building the bulkhead wheel failed"
WHEEL="$(echo "$BUILD"/dist/bulkhead-*.whl)"
[[ -f "$WHEEL" ]] || die "no wheel built in $BUILD/dist"
log "installing ${WHEEL##*/} and its dependencies into $PREFIX/venv"
"${PIP[@]}" install "$WHEEL"
if [[ "$upgrade" == 1 ]]; then
    # the same version number may still be other code: replace it whatever pip thinks
    "${PIP[@]}" install --no-deps --force-reinstall "$WHEEL"
fi

# The installed package must be whole without the repo: its own bpf/ and every import.
(cd / && env -u PYTHONPATH "$VENV/bin/python" - <<'EOF'
import importlib, pkgutil, sys
import bulkhead
from bulkhead.core.paths import BPF_DIR, SOURCE_TREE
assert SOURCE_TREE is None, f"the installed package resolved a source tree: {SOURCE_TREE}"
for f in ("bulkhead.c", "include/maps.h"):
    assert (BPF_DIR / f).is_file(), f"{BPF_DIR / f} missing from the installed package"
for m in pkgutil.walk_packages(bulkhead.__path__, "bulkhead."):
    if m.name.endswith(".__main__"):
        continue  # runs the CLI
    importlib.import_module(m.name)
import bcc  # noqa: F401  (through the system site packages)
EOF
) || die "the installed package is incomplete (see above)"
"$VENV/bin/bulkhead" --help >/dev/null || die "$PREFIX/venv/bin/bulkhead --help failed"

if [[ -n "$POLICY" ]]; then
    "$VENV/bin/bulkhead" policy validate "$POLICY" >/dev/null \
        || die "--policy $POLICY does not validate: $PREFIX/venv/bin/bulkhead policy validate $POLICY"
fi

# ------------------------------------------------------------------ command, unit
mkdir -p "${SBIN_LINK%/*}"
ln -sfn "$PREFIX/venv/bin/bulkhead" "$SBIN_LINK"
log "linked /usr/local/sbin/bulkhead -> $PREFIX/venv/bin/bulkhead"

mkdir -p "${UNIT%/*}"
sed "s|$UNIT_PREFIX/|$PREFIX/|g" "$SERVICE_SRC/bulkhead.service" > "$UNIT.tmp"
chmod 0644 "$UNIT.tmp"
mv -f "$UNIT.tmp" "$UNIT"
log "installed /etc/systemd/system/bulkhead.service"

# ------------------------------------------------------------------ /etc/bulkhead
mkdir -p "$ETC"
chmod 0755 "$ETC"
# put SRC NAME: install /etc/bulkhead/NAME from SRC unless there is one (never overwritten)
put() {
    if [[ -e "$ETC/$2" ]]; then
        log "kept /etc/bulkhead/$2 (exists; never overwritten)"
        if [[ "$2" == policy.yaml && -n "$POLICY" ]] && ! cmp -s "$1" "$ETC/$2"; then
            log "  --policy $POLICY differs from it; to use it: cp $POLICY /etc/bulkhead/policy.yaml && systemctl reload bulkhead"
        fi
        return
    fi
    install -m 0644 "$1" "$ETC/$2"
    log "installed /etc/bulkhead/$2${3:+ ($3)}"
}
if [[ -n "$POLICY" ]]; then
    put "$POLICY" policy.yaml "from $POLICY"
else
    put "$SERVICE_SRC/policy.example.yaml" policy.yaml "an example: edit it, its interfaces do not exist"
fi
put "$SERVICE_SRC/bulkhead.env" bulkhead.env

# ------------------------------------------------------------------ systemd
if [[ -n "$ROOT" ]]; then
    log "staging root $ROOT: no systemctl calls"
elif [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    log "systemctl daemon-reload"
    if [[ "$upgrade" == 1 ]] && systemctl -q is-active bulkhead; then
        if [[ "$RESTART" == 1 ]]; then
            log "systemctl try-restart bulkhead (the new agent compiles before it replaces the running program)"
            systemctl try-restart bulkhead
        else
            log "bulkhead is running the version it started with; run \`systemctl restart bulkhead\` to switch:"
            log "  the new agent compiles before it replaces the running program, enforcement does not stop"
        fi
    fi
else
    log "systemd is not running here (not PID 1): no daemon-reload"
fi

log "done. Next:"
[[ -n "$POLICY" ]] || log "  edit /etc/bulkhead/policy.yaml (the example names interfaces that do not exist)"
log "  check /etc/bulkhead/bulkhead.env (metrics address, or the fleet settings)"
if [[ "$upgrade" == 0 ]]; then
    log "  systemctl enable --now bulkhead     # then: bulkhead status; journalctl -u bulkhead"
fi
