#!/usr/bin/env bash
# uninstall.sh — remove what scripts/service/install.sh installed (`make uninstall`). Run as root.
#
#   bash scripts/service/uninstall.sh [--keep-config] [--keep-enforcing] [--prefix DIR] [--root DIR]
#
# In order:
#   1. systemctl disable --now bulkhead (the agent exits; like any stop, enforcement stays);
#   2. bulkhead down --state-dir /run/bulkhead: STOPS ENFORCING — detaches the XDP and tc
#      programs, removes the pins under /sys/fs/bpf/bulkhead/, the nft table and the ip rules and
#      routes, restores the sysctls it changed; then removes /run/bulkhead
#      (--keep-enforcing skips this step: the last policy stays enforced with no agent; a later
#      `bulkhead down --state-dir /run/bulkhead` from a checkout's .venv removes it);
#   3. removes /etc/systemd/system/bulkhead.service, PREFIX/venv (and PREFIX once empty),
#      /usr/local/sbin/bulkhead, /etc/bulkhead (--keep-config keeps it), then daemon-reload.
# Safe to re-run: what is already gone is skipped.
#
# Options:
#   --keep-config     keep /etc/bulkhead (policy, options, keys)
#   --keep-enforcing  do not run `bulkhead down`
#   --prefix DIR      the --prefix install.sh was given (default /opt/bulkhead)
#   --root DIR        remove from a staging root made by `install.sh --root DIR`: no systemctl
#                     calls and no `bulkhead down` (a staging root enforces nothing)
#   -h, --help        this text

set -euo pipefail

STATE_DIR=/run/bulkhead
PLUMBING_DIR=/run/bulkhead-plumbing   # shared by every instance on the host: removed only if empty

log() { printf '[uninstall] %s\n' "$*"; }
die() { printf '[uninstall] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

PREFIX=/opt/bulkhead ROOT="" KEEP_CONFIG=0 KEEP_ENFORCING=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep-config) KEEP_CONFIG=1; shift ;;
        --keep-enforcing) KEEP_ENFORCING=1; shift ;;
        --prefix) [[ $# -ge 2 ]] || die "--prefix needs a DIR"; PREFIX="$2"; shift 2 ;;
        --root) [[ $# -ge 2 ]] || die "--root needs a DIR"; ROOT="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$PREFIX" == /* && "$PREFIX" != / ]] || die "--prefix must be an absolute path other than /: $PREFIX"
PREFIX="${PREFIX%/}"
if [[ -n "$ROOT" ]]; then
    [[ -d "$ROOT" ]] || { log "nothing installed under $ROOT (no such directory)"; exit 0; }
    ROOT="$(cd "$ROOT" && pwd)"
    [[ "$ROOT" != / ]] || ROOT=""
fi
[[ -n "$ROOT" || "$(id -u)" -eq 0 ]] || die "must run as root: sudo bash $0"

VENV="$ROOT$PREFIX/venv"
SBIN_LINK="$ROOT/usr/local/sbin/bulkhead"
UNIT="$ROOT/etc/systemd/system/bulkhead.service"
ETC="$ROOT/etc/bulkhead"
SYSTEMD=0
[[ -z "$ROOT" && -d /run/systemd/system ]] && SYSTEMD=1

# ------------------------------------------------------------------ 1. stop the service
if [[ "$SYSTEMD" == 1 ]] && systemctl cat bulkhead.service >/dev/null 2>&1; then
    log "systemctl disable --now bulkhead"
    systemctl disable --now bulkhead.service 2>&1 | sed 's/^/[uninstall]   /' || true
fi

# ------------------------------------------------------------------ 2. stop enforcing
if [[ -n "$ROOT" ]]; then
    :
elif [[ "$KEEP_ENFORCING" == 1 ]]; then
    log "--keep-enforcing: the last policy stays enforced; $STATE_DIR is kept for a later \`bulkhead down\`"
elif [[ -x "$VENV/bin/bulkhead" ]]; then
    log "bulkhead down --state-dir $STATE_DIR (stops enforcing: removes XDP/tc programs, pins, nft table, ip rules)"
    if "$VENV/bin/bulkhead" down --state-dir "$STATE_DIR" 2>&1 | sed 's/^/[uninstall]   /'; [[ "${PIPESTATUS[0]}" -ne 0 ]]; then
        die "bulkhead down failed (see above); nothing else was removed. Fix it and re-run, or --keep-enforcing"
    fi
    rm -rf "$STATE_DIR"
    rmdir "$PLUMBING_DIR" 2>/dev/null || true
else
    log "no $PREFIX/venv/bin/bulkhead: cannot run \`bulkhead down\`; if anything is still enforcing, run it from a checkout's .venv"
fi

# ------------------------------------------------------------------ 3. the files
if [[ -e "$UNIT" || -L "$UNIT" ]]; then
    rm -f "$UNIT"
    log "removed /etc/systemd/system/bulkhead.service"
fi
# Drop-ins (systemctl edit bulkhead) configure this unit only: they go with it, unless the
# config is kept.
if [[ -d "$UNIT.d" && "$KEEP_CONFIG" != 1 ]]; then
    rm -rf "$UNIT.d"
    log "removed /etc/systemd/system/bulkhead.service.d (drop-ins)"
fi
if [[ -L "$SBIN_LINK" ]]; then
    rm -f "$SBIN_LINK"
    log "removed /usr/local/sbin/bulkhead"
elif [[ -e "$SBIN_LINK" ]]; then
    log "kept /usr/local/sbin/bulkhead: not a symlink, so not ours"
fi
if [[ -d "$VENV" ]]; then
    rm -rf "$VENV"
    log "removed $PREFIX/venv"
fi
if [[ -d "$ROOT$PREFIX" ]]; then
    rmdir "$ROOT$PREFIX" 2>/dev/null && log "removed $PREFIX" \
        || log "kept $PREFIX: it holds files install.sh did not put there"
fi
if [[ -d "$ETC" ]]; then
    if [[ "$KEEP_CONFIG" == 1 ]]; then
        log "--keep-config: kept /etc/bulkhead"
    else
        rm -rf "$ETC"
        log "removed /etc/bulkhead"
    fi
fi
if [[ "$SYSTEMD" == 1 ]]; then
    systemctl daemon-reload
    systemctl reset-failed bulkhead.service 2>/dev/null || true
    log "systemctl daemon-reload"
fi
log "done"
