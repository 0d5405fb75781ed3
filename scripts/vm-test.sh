#!/usr/bin/env bash
# vm-test.sh — run bulkhead's tests on Debian 12's stock kernel (6.1) in a qemu VM.
#
# Usage (as root, from anywhere):   bash scripts/vm-test.sh      (= sudo make vm-test)
#
#   1. build, once, a Debian 12 image with the stock linux-image-amd64 kernel: debootstrap from
#      the Debian archive, then scripts/vm/provision.sh in the chroot (which runs the repo's own
#      scripts/setup.sh for the image's kernel: bcc, clang, headers, nftables, .venv, ...).
#      Cached outside the repo in $VM_CACHE/<key>/, where <key> hashes everything the image is
#      made from (provision.sh, setup.sh, pyproject.toml, the package layout, this recipe's
#      version): change one and the next run rebuilds. mkfs.ext4 -d makes the disk from the
#      tree directly: no loop device, no mount on the host.
#   2. boot it with qemu (KVM when /dev/kvm works, else TCG) on a per-run qcow2 overlay of the
#      cached disk (thrown away after the run), the repo shared read-only over 9p and a
#      results directory shared read-write. When the guest asks for a reboot (it writes
#      results/reboot and reboots; qemu runs with -no-reboot and exits), the host boots the
#      same overlay again, up to VM_MAX_BOOTS times: the service tests check what comes back.
#   3. the guest runs scripts/vm/guest-run.sh from the shared repo: copies the tree, checks it
#      with setup.sh (offline), probes the kernel's BPF features, runs pytest (tests/unit,
#      tests/bpf and a subset of tests/integration, see guest-run.sh), writes the log, the
#      JUnit XML and its exit status to the results share, and powers off.
#   4. the host prints the guest's console as it goes ([guest] lines), copies the results to
#      $VM_CACHE/last-run/ and exits with the guest's test status.
#
# Environment knobs:
#   VM_CACHE=/var/cache/bulkhead-vm   where images (and the last run's results) are kept
#   VM_ACCEL=auto|kvm|tcg             auto: KVM if a probe boot works, else TCG
#   VM_CPUS=2  VM_MEM=4096            guest size (MiB)
#   VM_TIMEOUT=3600                   seconds the guest may run (all its boots) before it is killed
#   VM_MAX_BOOTS=2                    boots the guest may ask for (the service tests reboot once)
#   VM_PYTEST_TIMEOUT=1200            pytest-timeout per test inside the guest (TCG is slow)
#   VM_TESTS="tests/unit ..."         override the test selection (pytest arguments)
#   VM_PYTEST_ARGS="-x"               extra pytest arguments
#   VM_REBUILD=1                      rebuild the image even if the cache has it
#   VM_MIRROR, VM_SECURITY_MIRROR     Debian archive URLs (default deb.debian.org)
#
# Nothing is left behind on success, failure or interrupt: qemu is killed, temporary
# directories are removed, and the chroot's mounts live in a private mount namespace.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VM_CACHE="${VM_CACHE:-/var/cache/bulkhead-vm}"
VM_ACCEL="${VM_ACCEL:-auto}"
VM_CPUS="${VM_CPUS:-2}"
VM_MEM="${VM_MEM:-4096}"
VM_TIMEOUT="${VM_TIMEOUT:-3600}"
VM_MAX_BOOTS="${VM_MAX_BOOTS:-2}"
VM_PYTEST_TIMEOUT="${VM_PYTEST_TIMEOUT:-1200}"
VM_MIRROR="${VM_MIRROR:-http://deb.debian.org/debian}"
VM_SECURITY_MIRROR="${VM_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SUITE=bookworm
# Bump when the build steps in this file change in a way that needs a new image.
RECIPE_VERSION=1

export DEBIAN_FRONTEND=noninteractive

T0=$SECONDS
elapsed() { local s=$((SECONDS - ${1:-$T0})); printf '%dm%02ds' $((s / 60)) $((s % 60)); }
log()  { printf '[vm +%s] %s\n' "$(elapsed)" "$*"; }
warn() { printf '[vm] WARNING: %s\n' "$*" >&2; }
die()  { printf '[vm] ERROR: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ cleanup
WORK=""        # per-run temp dir (console log, results share)
BUILD_DIR=""   # image build in progress (removed unless it completed)
QEMU_PID=""
TAIL_PID=""
BUILD_PID=""   # unshare running the image build
stop_tails() {
    [[ -n "$TAIL_PID" ]] || return 0
    pkill -P "$TAIL_PID" 2>/dev/null || true   # the tails and filters of this run's subshell only
    kill "$TAIL_PID" 2>/dev/null || true
    wait "$TAIL_PID" 2>/dev/null || true
    TAIL_PID=""
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$QEMU_PID" ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
        log "stopping qemu (pid $QEMU_PID)"
        kill "$QEMU_PID" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    stop_tails
    if [[ -n "$BUILD_PID" ]] && kill -0 "$BUILD_PID" 2>/dev/null; then
        log "stopping the image build (pid $BUILD_PID and its namespace)"
        # unshare --fork ignores SIGTERM while it waits; SIGKILL it and --kill-child's
        # death signal kills the namespace's init, which takes every process in it along.
        kill -KILL "$BUILD_PID" 2>/dev/null || true
        wait "$BUILD_PID" 2>/dev/null || true
    fi
    [[ -n "$BUILD_DIR" && -d "$BUILD_DIR" ]] && rm -rf --one-file-system "$BUILD_DIR"
    [[ -n "$WORK" && -d "$WORK" ]] && rm -rf --one-file-system "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ------------------------------------------------------------------ preconditions
[[ "$(id -u)" -eq 0 ]] || die "must run as root (debootstrap, chroot, qemu): sudo make vm-test"
[[ "$(uname -m)" == x86_64 ]] || die "only x86_64 hosts are supported (the guest is amd64)"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v unshare >/dev/null || need+=(util-linux)
command -v flock >/dev/null || need+=(util-linux)
if [[ ${#need[@]} -gt 0 ]]; then
    command -v apt-get >/dev/null || die "missing: ${need[*]} (and no apt-get to install them)"
    log "installing host tools: ${need[*]}"
    apt-get update -q >/dev/null || warn "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
        || die "could not install ${need[*]}"
fi

# ------------------------------------------------------------------ cache key
package_layout() {
    (cd "$REPO_ROOT" && find agent -name __pycache__ -prune -o -name __init__.py -print 2>/dev/null | LC_ALL=C sort)
}
KEY="$( {
    echo "recipe=$RECIPE_VERSION suite=$SUITE mirror=$VM_MIRROR security=$VM_SECURITY_MIRROR"
    cat "$REPO_ROOT/scripts/vm/provision.sh" "$REPO_ROOT/scripts/setup.sh" "$REPO_ROOT/pyproject.toml"
    package_layout
} | sha256sum | cut -c1-16)"
IMAGE_DIR="$VM_CACHE/debian12-$KEY"

mkdir -p "$VM_CACHE"
chmod 700 "$VM_CACHE"

# ------------------------------------------------------------------ image build
# build_image: debootstrap + provision.sh in a private mount namespace, then mkfs.ext4 -d.
build_image() {
    local t_build=$SECONDS root
    BUILD_DIR="$(mktemp -d "$VM_CACHE/.build-$KEY-XXXXXX")"
    root="$BUILD_DIR/root"
    mkdir -p "$root"
    log "building image debian12-$KEY (Debian $SUITE, stock kernel) in $BUILD_DIR"
    log "  build log: $BUILD_DIR/build.log (printed if the build fails)"

    # The repo copy the image's .venv is made for: sources only, no .venv/.git/caches.
    mkdir -p "$root/root/bulkhead"
    tar -C "$REPO_ROOT" --exclude=./.venv --exclude=./.git --exclude='__pycache__' \
        --exclude=./.pytest_cache --exclude='*.egg-info' --exclude=./.benchmarks -cf - . \
        | tar -C "$root/root/bulkhead" -xf -
    cp /etc/ssl/certs/ca-certificates.crt "$BUILD_DIR/host-ca.crt" 2>/dev/null || true

    # Everything runs in private mount and PID namespaces: debootstrap's and the chroot's
    # mounts (proc, sys, dev) vanish with them, and when unshare dies (cleanup kills it) its
    # child, the namespace's init, gets SIGKILL and takes every build process with it.
    # In the background, so that a signal to this script is handled at once.
    # shellcheck disable=SC2016
    unshare --mount --propagation private --pid --fork --kill-child env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        ROOT="$root" BUILD_DIR="$BUILD_DIR" SUITE="$SUITE" \
        VM_MIRROR="$VM_MIRROR" VM_SECURITY_MIRROR="$VM_SECURITY_MIRROR" \
        VM_HOST_RELEASE="$(uname -r)" \
        bash -euo pipefail -c '
            log() { printf "[vm] %s\n" "$*"; }
            log "  debootstrap $SUITE (minbase) from $VM_MIRROR"
            debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOT/" "$VM_MIRROR" \
                >>"$BUILD_DIR/build.log" 2>&1
            cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
            if [[ -s "$BUILD_DIR/host-ca.crt" ]]; then
                cp "$BUILD_DIR/host-ca.crt" "$ROOT/tmp/host-ca.crt"
                export VM_BUILD_CA=/tmp/host-ca.crt
            fi
            mount -t proc proc "$ROOT/proc"
            mount --rbind /sys "$ROOT/sys"
            mount --rbind /dev "$ROOT/dev"
            log "  provisioning (scripts/vm/provision.sh in the chroot)"
            set +e +o pipefail
            chroot "$ROOT" env -i PATH="$PATH" HOME=/root TERM=dumb \
                VM_MIRROR="$VM_MIRROR" VM_SECURITY_MIRROR="$VM_SECURITY_MIRROR" \
                VM_HOST_RELEASE="$VM_HOST_RELEASE" VM_BUILD_CA="${VM_BUILD_CA:-}" \
                bash /root/bulkhead/scripts/vm/provision.sh 2>&1 \
                | tee -a "$BUILD_DIR/build.log" | grep --line-buffered -E "^\[(vm|setup)\]"
            st=("${PIPESTATUS[@]}")
            test "${st[0]}" -eq 0
        ' &
    BUILD_PID=$!
    if ! wait "$BUILD_PID"; then
        BUILD_PID=""
        echo "----- last lines of $BUILD_DIR/build.log"
        tail -n 60 "$BUILD_DIR/build.log" || true
        die "image build failed"
    fi
    BUILD_PID=""
    [[ -s "$root/etc/bulkhead-vm-kernel" ]] || die "provisioning did not finish (no /etc/bulkhead-vm-kernel)"
    rm -f "$root/tmp/host-ca.crt" "$BUILD_DIR/host-ca.crt"
    : > "$root/etc/resolv.conf"

    local kver size_mb
    kver="$(cat "$root/etc/bulkhead-vm-kernel")"
    cp "$root/boot/vmlinuz-$kver" "$BUILD_DIR/vmlinuz"
    cp "$root/boot/initrd.img-$kver" "$BUILD_DIR/initrd.img"
    echo "$kver" > "$BUILD_DIR/kernel-release"
    # The tree's size plus room for what the tests write (the disk is a per-run overlay anyway).
    size_mb=$(( $(du -sm --apparent-size "$root" | cut -f1) * 12 / 10 + 3072 ))
    log "  mkfs.ext4 -d: ${size_mb} MiB sparse disk from the tree"
    mkfs.ext4 -q -F -L bulkhead-vm -E lazy_itable_init=1 -d "$root" "$BUILD_DIR/rootfs.img" "${size_mb}M" \
        >>"$BUILD_DIR/build.log" 2>&1 || { tail -n 20 "$BUILD_DIR/build.log"; die "mkfs.ext4 failed"; }
    rm -rf --one-file-system "$root"
    echo "built $(date -u +%FT%TZ) in $(elapsed "$t_build"), kernel $kver" > "$BUILD_DIR/ok"
    rm -rf "$IMAGE_DIR"
    mv "$BUILD_DIR" "$IMAGE_DIR"
    BUILD_DIR=""
    # Older images are dead weight (several GB each): keep only this one.
    find "$VM_CACHE" -mindepth 1 -maxdepth 1 -name 'debian12-*' ! -path "$IMAGE_DIR" -exec rm -rf {} +
    log "image built in $(elapsed "$t_build"): kernel $kver"
}

exec 9>"$VM_CACHE/.lock"
if ! flock -n 9; then
    log "another vm-test holds $VM_CACHE/.lock; waiting for it"
    flock 9
fi
# Leftovers of builds that were killed hard (a trap can't run on SIGKILL).
find "$VM_CACHE" -mindepth 1 -maxdepth 1 -name '.build-*' -exec rm -rf --one-file-system {} +

if [[ "${VM_REBUILD:-0}" == 1 || ! -e "$IMAGE_DIR/ok" ]]; then
    build_image
else
    log "image debian12-$KEY is cached ($(cat "$IMAGE_DIR/ok"))"
fi
KVER="$(cat "$IMAGE_DIR/kernel-release")"

# ------------------------------------------------------------------ boot
WORK="$(mktemp -d /tmp/bulkhead-vm-XXXXXX)"
mkdir -p "$WORK/results"
chmod 777 "$WORK/results"

# kvm_works: boot the guest kernel with no root under KVM; a working KVM prints the kernel's
# banner within seconds (then panics on the missing root and qemu exits on -no-reboot).
kvm_works() {
    [[ -r /dev/kvm && -w /dev/kvm ]] || return 1
    local out="$WORK/kvm-probe.log" ok=1
    : > "$out"
    qemu-system-x86_64 -accel kvm -cpu host -m 256 -nodefaults -display none \
        -no-reboot -serial "file:$out" -kernel "$IMAGE_DIR/vmlinuz" \
        -append "console=ttyS0 panic=-1 root=/dev/nonexistent" </dev/null >/dev/null 2>&1 &
    QEMU_PID=$!
    # Where nested KVM is broken the guest spins without printing anything.
    for _ in $(seq 1 40); do
        if grep -q "Linux version" "$out" 2>/dev/null; then ok=0; break; fi
        kill -0 "$QEMU_PID" 2>/dev/null || break
        sleep 0.2
    done
    kill -9 "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=""
    return "$ok"
}
# shellcheck disable=SC2054  # the commas belong to qemu's -accel option
case "$VM_ACCEL" in
    kvm) ACCEL=(-accel kvm -cpu host) ;;
    tcg) ACCEL=(-accel tcg,thread=multi -cpu max) ;;
    auto)
        if kvm_works; then ACCEL=(-accel kvm -cpu host)
        else ACCEL=(-accel tcg,thread=multi -cpu max); fi ;;
    *) die "VM_ACCEL must be auto, kvm or tcg" ;;
esac
ACCEL_NAME="${ACCEL[1]%%,*}"
[[ "$ACCEL_NAME" == tcg ]] && log "KVM is not usable here: TCG (software emulation; tests run several times slower)"

# The guest's disk for this run: its writes survive a reboot (the service tests reboot), the
# cached image stays untouched (qemu opens a backing file read-only).
qemu-img create -q -f qcow2 -b "$IMAGE_DIR/rootfs.img" -F raw "$WORK/disk.qcow2" \
    || die "qemu-img create of the run's overlay failed"

# What the guest runs: guest-run.sh reads this file from the results share.
{
    printf 'VM_PYTEST_TIMEOUT=%q\n' "$VM_PYTEST_TIMEOUT"
    # pytest's own budget per boot: ends it (failures printed) 5 min before the guest is killed
    printf 'VM_SESSION_TIMEOUT=%q\n' "$(( VM_TIMEOUT > 600 ? VM_TIMEOUT - 300 : VM_TIMEOUT ))"
    printf 'VM_TESTS=%q\n' "${VM_TESTS:-}"
    printf 'VM_PYTEST_ARGS=%q\n' "${VM_PYTEST_ARGS:-}"
    printf 'VM_ACCEL=%q\n' "$ACCEL_NAME"
} > "$WORK/results/config"

# boot N: qemu on the overlay until the guest powers off (or reboots: -no-reboot makes that an
# exit too, and a panic ends the run rather than looping). Its console goes to console-N.log.
boot_guest() {
    local n=$1
    echo "$n" > "$WORK/results/boot"
    rm -f "$WORK/results/reboot"
    : > "$WORK/console-$n.log"
    qemu-system-x86_64 \
        "${ACCEL[@]}" -smp "$VM_CPUS" -m "$VM_MEM" \
        -machine q35 -nodefaults -display none -no-reboot -no-user-config \
        -kernel "$IMAGE_DIR/vmlinuz" -initrd "$IMAGE_DIR/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 quiet loglevel=3 systemd.show_status=error panic=-1 net.ifnames=0" \
        -drive "file=$WORK/disk.qcow2,format=qcow2,if=virtio,cache=unsafe,aio=threads" \
        -virtfs "local,path=$REPO_ROOT,mount_tag=repo,security_model=none,readonly=on,id=repo" \
        -virtfs "local,path=$WORK/results,mount_tag=results,security_model=none,id=results" \
        -serial "file:$WORK/console-$n.log" -monitor none -nic none \
        </dev/null >>"$WORK/qemu.log" 2>&1 &
    QEMU_PID=$!
}

log "booting Debian 12, kernel $KVER ($ACCEL_NAME, $VM_CPUS cpus, $VM_MEM MiB); repo $REPO_ROOT shared read-only"
: > "$WORK/qemu.log"
: > "$WORK/results/pytest.log"
: > "$WORK/results/pytest-after-reboot.log"
: > "$WORK/console-1.log"
T_BOOT=$SECONDS

# Stream the consoles (boot, [vm] [guest] lines) and pytest's per-test lines as they come
# (tail -F waits for the files of later boots; -q: no file-name headers).
(
    consoles=()
    for n in $(seq 1 "$VM_MAX_BOOTS"); do consoles+=("$WORK/console-$n.log"); done
    tail -q -n +1 -F "${consoles[@]}" 2>/dev/null | sed -u 's/\r//g; s/^/[guest] /' &
    tail -q -n +1 -F "$WORK/results/pytest.log" "$WORK/results/pytest-after-reboot.log" 2>/dev/null \
        | grep --line-buffered -E ' (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)( |$)|^collected|^=+ .*(passed|failed|error|no tests)' \
        | sed -u 's/^/[pytest] /' &
    wait
) &
TAIL_PID=$!

timed_out=0
boots=0
too_many_boots=0
qrc=0
while :; do
    boots=$((boots + 1))
    (( boots > 1 )) && log "the guest asked for a reboot: boot $boots of at most $VM_MAX_BOOTS (same disk)"
    boot_guest "$boots"
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        if (( SECONDS - T_BOOT > VM_TIMEOUT )); then
            timed_out=1
            warn "the guest ran longer than VM_TIMEOUT=${VM_TIMEOUT}s: killing it"
            kill "$QEMU_PID" 2>/dev/null || true
            break
        fi
        sleep 2
    done
    wait "$QEMU_PID" 2>/dev/null && qrc=0 || qrc=$?
    QEMU_PID=""
    [[ "$timed_out" == 0 && -e "$WORK/results/reboot" && ! -s "$WORK/results/status" ]] || break
    if (( boots >= VM_MAX_BOOTS )); then
        too_many_boots=1
        warn "the guest asked for boot $((boots + 1)), more than VM_MAX_BOOTS=$VM_MAX_BOOTS"
        break
    fi
done
sleep 1
stop_tails
[[ -s "$WORK/qemu.log" ]] && sed 's/^/[qemu] /' "$WORK/qemu.log"

# ------------------------------------------------------------------ results
LAST="$VM_CACHE/last-run"
rm -rf "$LAST"
mkdir -p "$LAST"
cp -a "$WORK/results/." "$LAST/" 2>/dev/null || true
# (made for tail -F; empty when the guest did not reboot)
[[ -s "$LAST/pytest-after-reboot.log" ]] || rm -f "$LAST/pytest-after-reboot.log"
for n in $(seq 1 "$boots"); do
    (( boots > 1 )) && echo "===== boot $n"
    cat "$WORK/console-$n.log"
done > "$LAST/console.log"
log "guest ran $(elapsed "$T_BOOT") in $boots boot(s) (last qemu exit $qrc); total $(elapsed); results in $LAST/"

# pytest's summary, and on failure the start of the first failure (the full logs are in $LAST):
# the first boot's run, then the after-reboot run if there was one.
for plog in "$LAST/pytest.log" "$LAST/pytest-after-reboot.log"; do
    [[ -s "$plog" ]] || continue
    [[ "$plog" == *after-reboot* ]] && log "after the reboot ($(basename "$plog")):"
    # (|| true: head closing the pipe early is not an error)
    sed -n '/^=* short test summary info =*$/,$p' "$plog" | head -n 80 | sed 's/^/[pytest] /' || true
    if grep -qE '^=+ (FAILURES|ERRORS) =+$' "$plog"; then
        log "first failure (the full output is in $plog):"
        sed -n '/^=\+ \(FAILURES\|ERRORS\) =\+$/,$p' "$plog" | head -n 40 | sed 's/^/[pytest] /' || true
        # A program the verifier refused: its verdict is the line before "processed N insns".
        if grep -q '^processed [0-9]* insns' "$plog"; then
            log "verifier verdicts:"
            grep -h -B1 '^processed [0-9]* insns' "$plog" | grep -v '^processed\|^--' \
                | sort | uniq -c | sed 's/^/[pytest] /' || true
        fi
    fi
done
status="$(cat "$WORK/results/status" 2>/dev/null || true)"
if [[ "$timed_out" == 1 ]]; then
    die "timed out after ${VM_TIMEOUT}s (see $LAST/console.log)"
fi
if [[ "$too_many_boots" == 1 ]]; then
    die "the guest asked for more than VM_MAX_BOOTS=$VM_MAX_BOOTS boots (see $LAST/console.log)"
fi
if [[ -z "$status" ]]; then
    die "the guest wrote no test status: it did not boot or crashed (see $LAST/console.log)"
fi
if [[ "$status" != 0 ]]; then
    log "FAILED on kernel $KVER: guest test status $status"
    exit "$status"
fi
log "OK: the suite passed on kernel $KVER"
exit 0
