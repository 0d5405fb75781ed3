#!/usr/bin/env bash
# guest-run.sh — the part of `make vm-test` that runs INSIDE the guest, at boot.
#
# Started by /usr/local/sbin/bulkhead-vm-boot (see provision.sh) from the read-only 9p share
# of the repo at /mnt/repo; results go to the read-write share /mnt/results:
#   pytest.log   pytest's output (the host streams it while the tests run)
#   junit.xml    per-test results
#   probe.txt    the kernel's BPF features as agent/datapath/probe.py finds them
#   status       the exit status the host's `make vm-test` exits with (written last)
#
# Two boots when the selection has service tests (tests/service): the first boot runs the
# selection (the service tests leave bulkhead installed and enabled), then asks the host for
# another boot (writes reboot, and bulkhead-vm-boot reboots the guest cleanly); the host boots
# the same disk again and this script, seeing boot 2 in /mnt/results/boot and its own marker
# on the disk, runs the after-reboot service tests (BULKHEAD_VM_PHASE=after-reboot, see
# tests/service/conftest.py) into pytest-after-reboot.log and junit-after-reboot.xml, and
# writes the status of both runs.
#
# Not in the image on purpose: editing this file needs no image rebuild.
# The host passes its settings in /mnt/results/config (VM_TESTS, VM_PYTEST_ARGS,
# VM_PYTEST_TIMEOUT, VM_ACCEL).

set -uo pipefail

SHARE=/mnt/repo
RESULTS=/mnt/results
REPO=/root/bulkhead          # where the image's .venv was built (provision.sh)
T0=$SECONDS

BOOT="$(cat "$RESULTS/boot" 2>/dev/null || echo 1)"
# On the guest's own disk: proof that boot 2 runs on what boot 1 left (and boot 1's status).
MARK_DIR=/var/lib/bulkhead-vm
log() { printf '[vm] [guest +%ds] [boot %s] %s\n' "$((SECONDS - T0))" "$BOOT" "$*"; }
finish() {
    echo "$1" > "$RESULTS/status"
    sync
    log "status $1 after $((SECONDS - T0))s; powering off"
    exit "$1"
}

# shellcheck disable=SC1091
[[ -r "$RESULTS/config" ]] && . "$RESULTS/config"
VM_PYTEST_TIMEOUT="${VM_PYTEST_TIMEOUT:-1200}"

# The default selection: every unit and BPF_PROG_TEST_RUN test, and the integration tests
# that cover each verdict (allow/deny/reject over TCP, UDP, ICMP, IPv4 and IPv6), audit
# mode, directionality, overlapping CIDRs in two segments, atomic re-apply, a failed apply,
# and an agent restart that reuses its pins, then `bulkhead down`; and L7 steering through
# the gateway (XDP metadata -> TC mark -> TPROXY -> the verifier, transparent upstream); the
# gateway's DNS per segment, routers and transit between two gateways (the fabric), and
# WireGuard under the transit (tests/vm: the host's make test does not collect it).
# What depends on the kernel, within CI's 90 minutes (each integration module's bcc compile takes
# about 2 min under TCG): every crafted-frame test; enforcement; L7 steering, whose XDP-metadata
# path only kernels with bpf_xdp_adjust_meta take (the development hosts' lacks it); the fabric
# lab's transit (DNS attraction, VIPs, identity, forged packets) and SNI/Host routing. Left to
# the host's make test: tests/unit (no kernel), overlap, apply, the DNS server's details, source
# translation, lifecycle (docs/testing-vm.md).
DEFAULT_TESTS=(
    tests/bpf
    tests/integration/test_enforcement.py
    tests/integration/test_l7_gateway.py
    tests/integration/test_fabric_routes.py
    tests/integration/test_fabric_transit.py
    # tests that need a kernel feature the development hosts lack (WireGuard): VM only
    tests/vm
    # last: they install bulkhead as a service on this system (systemd is PID 1 here), and
    # their after-reboot half runs on the second boot
    tests/service
)

log "kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB, accel ${VM_ACCEL:-?}"

# shellcheck disable=SC2206
EXTRA=(${VM_PYTEST_ARGS:-})
# Skips don't fail pytest here (BULKHEAD_STRICT_SKIPS=0); instead every skip must name a
# kernel feature this kernel lacks (the one legitimate reason), checked from the junit file.
export BULKHEAD_STRICT_SKIPS=0 CI='' PYTHONUNBUFFERED=1
# bcc compiles under TCG take minutes on a loaded host: an agent start may take that long
export BULKHEAD_AGENT_START_TIMEOUT="${BULKHEAD_AGENT_START_TIMEOUT:-900}"

# run_pytest LOG JUNIT ARGS...: pytest with its output straight to the results share, which the
# host streams (the serial console is slow under TCG, and a verifier log can be tens of
# thousands of lines); returns its status, or 1 for a skip that names no missing kernel feature.
run_pytest() {
    local plog=$1 junit=$2 rc bad_skips
    shift 2
    log "pytest $* ${EXTRA[*]} (timeout ${VM_PYTEST_TIMEOUT}s per test)"
    # --session-timeout: a run that would outlast VM_TIMEOUT stops after its current test and
    # still prints its failures, rather than being killed with them unprinted.
    .venv/bin/python -m pytest -ra -v -p no:cacheprovider --timeout="$VM_PYTEST_TIMEOUT" \
        ${VM_SESSION_TIMEOUT:+--session-timeout="$VM_SESSION_TIMEOUT"} \
        --junitxml="$junit" --durations=15 "$@" "${EXTRA[@]}" > "$plog" 2>&1
    rc=$?
    log "pytest exit status $rc"
    [[ "$rc" -eq 5 ]] && log "ERROR: pytest collected no tests"
    if [[ -r "$junit" ]]; then
        bad_skips="$(.venv/bin/python - "$junit" <<'EOF'
import sys
import xml.etree.ElementTree as ET

bad = []
for case in ET.parse(sys.argv[1]).iter("testcase"):
    for sk in case.findall("skipped"):
        reason = (sk.get("message") or "") + " " + (sk.text or "")
        if "kernel feature" not in reason:
            bad.append(f"{case.get('classname')}::{case.get('name')}: {reason.strip()}")
print("\n".join(bad))
EOF
)"
        if [[ -n "$bad_skips" ]]; then
            log "ERROR: skips that do not name a missing kernel feature:"
            printf '%s\n' "$bad_skips" | sed 's/^/  /'
            [[ "$rc" -eq 0 ]] && rc=1
        fi
    fi
    return "$rc"
}

if [[ "$BOOT" != 1 ]]; then
    # The tree, its .venv and what the service tests installed are as boot 1 left them: no copy.
    if [[ "$BOOT" != 2 || ! -r "$MARK_DIR/boot1-status" ]]; then
        log "ERROR: boot $BOOT, but this disk has no $MARK_DIR/boot1-status from boot 1 (the disk did not persist, or boot 1 did not ask for this boot)"
        finish 1
    fi
    rc1="$(cat "$MARK_DIR/boot1-status")"
    log "after the reboot: boot 1's tests exited $rc1; running the after-reboot service tests"
    cd "$REPO" || finish 1
    BULKHEAD_VM_PHASE=after-reboot run_pytest "$RESULTS/pytest-after-reboot.log" \
        "$RESULTS/junit-after-reboot.xml" tests/service
    rc2=$?
    [[ "$rc1" -ne 0 ]] && finish "$rc1"
    finish "$rc2"
fi

# The tree under test replaces the image's copy; the image's .venv stays (it was built for
# this path, from the same pyproject.toml and setup.sh: they are part of the image's key).
log "copying the repo from the host share"
find "$REPO" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
tar -C "$SHARE" --exclude=./.venv --exclude=./.git --exclude='__pycache__' \
    --exclude=./.pytest_cache --exclude='*.egg-info' --exclude=./.benchmarks -cf - . \
    | tar -C "$REPO" -xf - || { log "ERROR: copying the repo failed"; finish 1; }
cd "$REPO" || finish 1

# The same set-up the host runs; here it must find everything in place (no network).
log "scripts/setup.sh (expected: nothing to install)"
if ! bash scripts/setup.sh; then
    log "ERROR: setup.sh failed in the guest: the image is stale or broken (VM_REBUILD=1 rebuilds it)"
    finish 1
fi

log "kernel feature probes (agent/datapath/probe.py)"
if .venv/bin/python -m bulkhead.datapath.probe > "$RESULTS/probe.txt" 2>&1; then :; fi
sed 's/^/  /' "$RESULTS/probe.txt"

if [[ -n "${VM_TESTS:-}" ]]; then
    read -r -a TESTS <<< "$VM_TESTS"
else
    TESTS=("${DEFAULT_TESTS[@]}")
fi
# Service tests in the selection: their after-reboot half needs a second boot.
wants_reboot=0
for t in "${TESTS[@]}"; do
    [[ "$t" == tests/service || "$t" == tests/service/* ]] && wants_reboot=1
done

run_pytest "$RESULTS/pytest.log" "$RESULTS/junit.xml" "${TESTS[@]}"
rc=$?
if [[ "$wants_reboot" == 1 ]]; then
    mkdir -p "$MARK_DIR"
    echo "$rc" > "$MARK_DIR/boot1-status"
    sync
    : > "$RESULTS/reboot"
    sync
    log "service tests selected: rebooting for the after-reboot tests (boot 1's status $rc is kept)"
    exit 0
fi
finish "$rc"
