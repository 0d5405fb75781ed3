#!/usr/bin/env bash
# setup.sh — install everything bulkhead needs on a Debian 12 / Ubuntu 22.04+ host.
#
# Usage (as root, from anywhere):   bash scripts/setup.sh
#
# What it does, in order:
#   1. apt packages: bcc (python3-bpfcc), clang/llvm, libbpf, nftables, iproute2, etcd and the
#      tools the tests use. Only missing ones are installed; `apt-get update` runs once,
#      and only when something has to be installed.
#   2. kernel headers at /lib/modules/$(uname -r)/{build,source} (bcc compiles C at load
#      time and needs them). Where no package matches the running kernel, the headers of
#      the distribution's current kernel are linked in instead (fine for programs that use
#      only UAPI structs, which is all bulkhead does).
#   3. bpffs mounted at /sys/fs/bpf (pinned maps live there).
#   4. a virtualenv .venv made with the *system* python and its site-packages, because
#      Debian/Ubuntu's bcc bindings exist only for /usr/bin/python3; then
#      `pip install -e '.[test]'` (console script .venv/bin/bulkhead).
#   5. checks: `import bcc` in the venv, a tiny bcc compile, libbpf's
#      bpf_prog_test_run_opts (used by the BPF tests through ctypes).
#
# Re-running is cheap: apt state is checked with dpkg every time, but pip runs only when
# pyproject.toml, this script or the set of agent/**/__init__.py files changed (hash kept
# in .venv/.setup-stamp), or an import fails.
#
# Environment knobs:
#   BULKHEAD_SETUP_DRY_RUN=1          print the commands that would change the system, run none
#   BULKHEAD_SETUP_KERNEL_RELEASE=X   act for kernel release X instead of `uname -r`
#                                     (only for testing the headers fallback)
#   BULKHEAD_SETUP_FORCE=1            reinstall the Python packages even if the stamp matches
#   BULKHEAD_SETUP_BENCH=1            also install the benchmarks' packages (BENCH below: haproxy,
#                                     wrk); `make bench` sets it, `make setup`/`make test` don't

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.setup-stamp"
SYSTEM_PYTHON=/usr/bin/python3   # the only interpreter the distribution's bcc bindings load in
DRY_RUN="${BULKHEAD_SETUP_DRY_RUN:-0}"
WANT_BENCH="${BULKHEAD_SETUP_BENCH:-0}"
KVER="${BULKHEAD_SETUP_KERNEL_RELEASE:-$(uname -r)}"

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

log()  { printf '[setup] %s\n' "$*"; }
warn() { printf '[setup] WARNING: %s\n' "$*" >&2; }
die()  { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# run CMD...: execute, or only print it under BULKHEAD_SETUP_DRY_RUN=1.
run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '[setup] [dry-run] %s\n' "$*"
    else
        "$@"
    fi
}

# -------------------------------------------------------------------- preconditions

[[ "$(id -u)" -eq 0 ]] || die "must run as root (bcc, bpffs and apt need it): sudo bash scripts/setup.sh"
command -v apt-get >/dev/null && command -v dpkg-query >/dev/null \
    || die "this script supports Debian 12 and Ubuntu 22.04+ (apt/dpkg not found)"

OS_ID=unknown OS_LIKE="" OS_VERSION=""
if [[ -r /etc/os-release ]]; then
    # shellcheck disable=SC1091
    OS_ID="$(. /etc/os-release; echo "${ID:-unknown}")"
    OS_LIKE="$(. /etc/os-release; echo "${ID_LIKE:-}")"
    OS_VERSION="$(. /etc/os-release; echo "${VERSION_ID:-}")"
fi
case "$OS_ID $OS_LIKE" in
    *ubuntu*) DISTRO=ubuntu ;;
    *debian*) DISTRO=debian ;;
    *) DISTRO=debian; warn "untested distribution '$OS_ID'; treating it as Debian" ;;
esac
ARCH="$(dpkg --print-architecture)"
log "host: $OS_ID $OS_VERSION ($ARCH), kernel $KVER$([[ "$DRY_RUN" == 1 ]] && echo ', DRY RUN')"

# -------------------------------------------------------------------- apt helpers

APT_UPDATED=0
apt_update_once() {
    [[ "$APT_UPDATED" == 1 ]] && return 0
    log "apt-get update"
    run apt-get update -q || warn "apt-get update failed; continuing with the package lists we have"
    APT_UPDATED=1
}

# installed PKG: true if dpkg has PKG fully installed (cheap, no network).
installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

# available PKG: true if the archive has an installable candidate for PKG.
available() {
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')"
    [[ -n "$cand" && "$cand" != "(none)" ]]
}

APT_INSTALL=(apt-get install -y -q --no-install-recommends
             -o DPkg::Lock::Timeout=300
             -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

# apt_install PKG...: install those of PKG that the archive has; report the others.
# Sets MISSING_FROM_ARCHIVE to the packages that could not be installed.
MISSING_FROM_ARCHIVE=()
apt_install() {
    local want=() p
    for p in "$@"; do
        if available "$p"; then want+=("$p"); else MISSING_FROM_ARCHIVE+=("$p"); fi
    done
    [[ ${#want[@]} -eq 0 ]] && return 0
    log "installing apt packages: ${want[*]}"
    if ! run "${APT_INSTALL[@]}" "${want[@]}"; then
        # One bad package makes apt refuse the whole set: retry one by one to find it.
        warn "apt-get install of the whole set failed; retrying package by package"
        for p in "${want[@]}"; do
            installed "$p" && continue
            run "${APT_INSTALL[@]}" "$p" || MISSING_FROM_ARCHIVE+=("$p")
        done
    fi
}

# -------------------------------------------------------------------- 1. apt packages

# Essential: nothing works without these.
ESSENTIAL=(python3-bpfcc clang llvm nftables iproute2 python3-venv)
# Useful: tests, demo and debugging use them; a missing one is reported, not fatal.
USEFUL=(bpfcc-tools ethtool conntrack python3-dev curl openssl socat tcpdump iputils-ping kmod make)
# The fleet's store: the tests, the demo and the benchmark run their own etcd (agent/lab/etcd.py);
# the package's system service is never started here (there is no systemd in CI either).
USEFUL+=(etcd-server etcd-client)
# WireGuard under the transit (docs/fabric.md "Encryption between gateways"): `wg` sets keys and peers.
USEFUL+=(wireguard-tools)

# libbpf: bulkhead calls bpf_prog_test_run_opts from libbpf.so.1 through ctypes. libbpf1
# is in Debian 12 and Ubuntu 23.04+; Ubuntu 22.04 only has libbpf0 (0.5, too old for
# that symbol), which we install anyway and report below.
LIBBPF_PKG=libbpf1
if ! installed libbpf1 && ! installed libbpf0; then
    if ! available libbpf1; then
        apt_update_once
        available libbpf1 || LIBBPF_PKG=libbpf0
    fi
elif installed libbpf0 && ! installed libbpf1; then
    LIBBPF_PKG=libbpf0
fi
USEFUL+=("$LIBBPF_PKG")

# Bench-only (BULKHEAD_SETUP_BENCH=1, i.e. `make bench`): the L7 verifier benchmark compares
# the verifier with HAProxy, loaded by wrk (benchmarks/test_verifier_http.py); the live-rate
# benchmark plots with matplotlib (benchmarks/test_live_rate.py). A missing one
# is reported, not fatal: that benchmark then skips with the reason.
BENCH=(haproxy wrk python3-matplotlib)
[[ "$WANT_BENCH" == 1 ]] || BENCH=()

missing=()
for p in "${ESSENTIAL[@]}" "${USEFUL[@]}" "${BENCH[@]}"; do
    installed "$p" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    apt_update_once
    apt_install "${missing[@]}"
else
    log "apt packages: all present"
fi
# The etcd-server package enables (and on a systemd host starts) a system etcd on
# 127.0.0.1:2379. bulkhead's tests, demo and benchmark run their own (agent/lab/etcd.py) and a
# production etcd is set up on purpose (docs/fleet.md), so one installed here is switched off.
if [[ " ${missing[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null; then
    log "etcd-server: disabling the package's system service (bulkhead starts its own etcd where it needs one)"
    run systemctl disable etcd.service >/dev/null 2>&1 || true
    run systemctl stop etcd.service >/dev/null 2>&1 || true
fi

# -------------------------------------------------------------------- 2. kernel headers

MODDIR="/lib/modules/$KVER"

# newest_headers FLAVOUR: the newest /usr/src/linux-headers-<ver>-<abi>-FLAVOUR directory.
# Plain flavour only: -cloud-amd64 / -rt-amd64 / -lowlatency variants are skipped.
newest_headers() {
    local d
    d="$(find /usr/src -mindepth 1 -maxdepth 1 -type d -regextype posix-extended \
            -regex "/usr/src/linux-headers-[0-9][0-9.]*-[0-9]+-$1" 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$d" ]] && printf '%s\n' "$d"
}

ensure_headers() {
    if [[ -d "$MODDIR/build" ]]; then
        log "kernel headers: $MODDIR/build -> $(readlink -f "$MODDIR/build")"
        [[ -d "$MODDIR/source" ]] || warn "$MODDIR/source is missing; bcc falls back to build/"
        return 0
    fi

    # A package for exactly this kernel: the normal case on stock Debian/Ubuntu kernels.
    local exact="linux-headers-$KVER"
    if installed "$exact" || { apt_update_once; available "$exact"; }; then
        installed "$exact" || apt_install "$exact"
        if [[ -d "$MODDIR/build" || "$DRY_RUN" == 1 ]]; then
            log "kernel headers: $exact"
            return 0
        fi
        warn "$exact is installed but $MODDIR/build is still missing; linking it by hand"
        if [[ -d "/usr/src/$exact" ]]; then
            run mkdir -p "$MODDIR"
            run ln -sfn "/usr/src/$exact" "$MODDIR/build"
            [[ -d "$MODDIR/source" ]] || run ln -sfn "/usr/src/$exact" "$MODDIR/source"
            return 0
        fi
    fi

    # No package for this (custom) kernel: use the distribution's current headers.
    local meta flavour build source
    if [[ "$DISTRO" == ubuntu ]]; then
        meta=linux-headers-generic
        flavour=generic
    else
        meta="linux-headers-$ARCH"
        flavour="$ARCH"
    fi
    installed "$meta" || apt_install "$meta"
    build="$(newest_headers "$flavour")" || build=""
    if [[ -z "$build" ]]; then
        if [[ "$DRY_RUN" == 1 ]]; then
            log "[dry-run] would link $MODDIR/{build,source} to the newest /usr/src/linux-headers-*-$flavour"
            return 0
        fi
        die "no kernel headers for $KVER: no package linux-headers-$KVER, and no /usr/src/linux-headers-*-$flavour after installing $meta. Install headers for this kernel so that $MODDIR/build exists."
    fi
    # Debian splits a kernel's headers into <ver>-<flavour> (generated files, Makefile)
    # and <ver>-common (the tree); Ubuntu's <ver>-generic already reaches everything.
    source="$build"
    if [[ "$DISTRO" == debian && -d "${build%-"$flavour"}-common" ]]; then
        source="${build%-"$flavour"}-common"
    fi
    log "NOTE: no headers package for kernel $KVER; using headers of a nearby kernel:"
    log "      $MODDIR/build  -> $build"
    log "      $MODDIR/source -> $source"
    log "      (enough for bcc programs that use only UAPI structs, as bulkhead's do)"
    run mkdir -p "$MODDIR"
    run ln -sfn "$build" "$MODDIR/build"
    run ln -sfn "$source" "$MODDIR/source"
}
ensure_headers

# Fail here, with the reason, rather than later inside a test.
if [[ "$DRY_RUN" != 1 ]]; then
    if [[ ${#MISSING_FROM_ARCHIVE[@]} -gt 0 ]]; then
        warn "not available from the package archive: ${MISSING_FROM_ARCHIVE[*]}"
    fi
    fatal=()
    for p in "${ESSENTIAL[@]}"; do installed "$p" || fatal+=("$p"); done
    [[ ${#fatal[@]} -eq 0 ]] || die "essential packages missing: ${fatal[*]} (check the apt sources; Ubuntu needs 'universe' for python3-bpfcc)"
    for p in "${USEFUL[@]}"; do
        installed "$p" || warn "package $p is not installed; some tests or the demo may fail"
    done
    for p in "${BENCH[@]}"; do
        installed "$p" || warn "package $p is not installed; the benchmarks that need it will skip"
    done
    [[ -d "$MODDIR/build" ]] || die "kernel headers missing: $MODDIR/build does not exist"
fi

# -------------------------------------------------------------------- 3. bpffs

if mountpoint -q /sys/fs/bpf; then
    log "bpffs: mounted at /sys/fs/bpf"
else
    log "bpffs: mounting at /sys/fs/bpf"
    run mkdir -p /sys/fs/bpf 2>/dev/null || true
    run mount -t bpf bpf /sys/fs/bpf || die "could not mount bpffs at /sys/fs/bpf (is this a container without CAP_SYS_ADMIN?)"
fi

# -------------------------------------------------------------------- 4. venv + pip

if [[ "$DRY_RUN" == 1 ]]; then
    log "[dry-run] would create $VENV with $SYSTEM_PYTHON --system-site-packages and pip install -e '.[test]'"
    log "dry run done: nothing was changed"
    exit 0
fi

[[ -x "$SYSTEM_PYTHON" ]] || die "$SYSTEM_PYTHON not found (python3 from the distribution is required: bcc's bindings are built for it)"

# A venv made by another interpreter (pyenv, /usr/local) or without system site-packages
# can't import bcc: rebuild it.
venv_ok() {
    local cfg="$VENV/pyvenv.cfg"
    [[ -x "$VENV/bin/python" && -r "$cfg" ]] || return 1
    grep -Eq '^include-system-site-packages *= *true' "$cfg" || return 1
    grep -Eq "^home *= *$(dirname "$SYSTEM_PYTHON")\$" "$cfg" || return 1
    "$VENV/bin/python" -c 'import sys' 2>/dev/null
}
if ! venv_ok; then
    if [[ -e "$VENV" ]]; then
        log "venv: $VENV was not made by $SYSTEM_PYTHON with system site-packages; recreating it"
        rm -rf "$VENV"
    fi
    log "venv: creating $VENV ($SYSTEM_PYTHON --system-site-packages)"
    "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV" \
        || die "could not create the venv (is python3-venv installed?)"
fi
PY="$VENV/bin/python"

# The editable install records which of agent/'s directories are namespace packages (no
# __init__.py); when one gains an __init__.py it must be reinstalled, or that file never runs.
package_layout() {
    (cd "$REPO_ROOT" && find agent -name __pycache__ -prune -o -name __init__.py -print 2>/dev/null | LC_ALL=C sort)
}
want_stamp="$( { cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/scripts/setup.sh"; package_layout; } | sha256sum | cut -d' ' -f1)"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"
IMPORTS='import bcc, click, yaml, msgpack, pyroute2, scapy, prometheus_client, etcd3gw, cryptography, pytest, pytest_benchmark, pytest_timeout'

fresh_install=0
if [[ "${BULKHEAD_SETUP_FORCE:-0}" == 1 || "$want_stamp" != "$have_stamp" ]] \
    || [[ ! -x "$VENV/bin/bulkhead" ]] \
    || ! "$PY" -c "$IMPORTS" 2>/dev/null; then
    log "pip: installing bulkhead (editable) with runtime and test dependencies"
    rm -f "$STAMP"
    (cd "$REPO_ROOT" && "$PY" -m pip install -q --progress-bar off -e '.[test]') \
        || die "pip install -e '.[test]' failed (see the pip output above)"
    fresh_install=1
else
    log "pip: up to date (stamp matches)"
fi

# -------------------------------------------------------------------- 5. checks

"$PY" -c 'import bcc' 2>/dev/null || die "the venv cannot import bcc: python3-bpfcc must be installed for $SYSTEM_PYTHON and the venv must use --system-site-packages (try: make clean && make setup)"
"$PY" -c "$IMPORTS" || die "the venv is missing Python packages (try: BULKHEAD_SETUP_FORCE=1 bash scripts/setup.sh)"

# A real compile proves the headers work; it takes a second, so only after an install.
if [[ "$fresh_install" == 1 ]]; then
    log "check: bcc compiles a trivial program against the kernel headers"
    "$PY" - <<'EOF' || die "bcc could not compile a trivial program: check the kernel headers under /lib/modules/$(uname -r)/"
from bcc import BPF
BPF(text="int probe(void *ctx) { return 0; }")
EOF
fi

# bpf_prog_test_run_opts came with libbpf 0.7; the BPF tests call it through ctypes.
if ! "$PY" - <<'EOF'
import ctypes, sys
for name in ("libbpf.so.1", "libbpf.so.0"):
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        continue
    if hasattr(lib, "bpf_prog_test_run_opts"):
        sys.exit(0)
sys.exit(1)
EOF
then
    warn "no libbpf with bpf_prog_test_run_opts (needs libbpf.so.1 / libbpf >= 0.7): the BPF_PROG_TEST_RUN tests will fail"
fi

echo "$want_stamp" > "$STAMP"
log "done: $("$PY" --version) in $VENV, bcc $("$PY" -c 'import bcc, importlib.metadata as m; print(m.version("bcc"))' 2>/dev/null || echo '?'), entry point $VENV/bin/bulkhead"
