#!/usr/bin/env bash
# provision.sh — turn a Debian 12 debootstrap tree into the `make vm-test` guest.
#
# Runs INSIDE the chroot, as root, called by scripts/vm-test.sh while it builds the image.
# Everything the guest needs is installed here, so the guest itself never needs a network:
#
#   1. apt sources (bookworm, bookworm-updates, bookworm-security) and no service starts
#   2. the stock kernel: linux-image-amd64 (6.1), its initramfs, systemd as init
#   3. the repository's own scripts/setup.sh for the image's kernel release, on a copy of the
#      repo at /root/bulkhead: apt packages, linux-headers-<release>, .venv + pip install.
#      (the guest later replaces the copy's files with the tree under test and keeps .venv)
#   3b. a wheelhouse (/root/wheelhouse) of the project's runtime and build dependencies, for
#      the service tests' offline `pip install` (PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/wheelhouse)
#   4. the boot-time test unit: mounts the 9p shares and runs scripts/vm/guest-run.sh from the
#      shared repo, then powers the guest off, or reboots it when guest-run.sh asks for it
#
# This file is part of the image's cache key: editing it rebuilds the image.
#
# Environment (set by vm-test.sh):
#   VM_MIRROR            Debian archive URL (default http://deb.debian.org/debian)
#   VM_SECURITY_MIRROR   security archive URL (default http://deb.debian.org/debian-security)
#   VM_HOST_RELEASE      the build host's `uname -r`: bcc in the chroot compiles for the
#                        release uname() reports, so setup.sh's compile check needs headers there
#   VM_BUILD_CA          CA bundle for pip's HTTPS during the build (the host's), optional

set -euo pipefail

log() { printf '[vm] [provision] %s\n' "$*"; }
die() { printf '[vm] [provision] ERROR: %s\n' "$*" >&2; exit 1; }

MIRROR="${VM_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${VM_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C.UTF-8 LANG=C.UTF-8
REPO=/root/bulkhead

# ---------------------------------------------------------------- 1. apt
cat > /etc/apt/sources.list <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
EOF
# Packages must not start services inside the build chroot.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
# No documentation or translations: a smaller image, a faster mkfs.
cat > /etc/dpkg/dpkg.cfg.d/01-bulkhead-vm-nodoc <<'EOF'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF

APT_INSTALL=(apt-get install -y -q --no-install-recommends
             -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

log "apt-get update"
apt-get update -q

# ---------------------------------------------------------------- 2. kernel + init
log "installing the stock kernel (linux-image-amd64) and systemd"
"${APT_INSTALL[@]}" linux-image-amd64 initramfs-tools systemd-sysv udev kmod procps \
    iproute2 ca-certificates python3 make
KVER="$(find /lib/modules -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -V | tail -n 1)"
[[ -n "$KVER" && -e "/boot/vmlinuz-$KVER" ]] || die "no kernel found under /lib/modules and /boot"
[[ -e "/boot/initrd.img-$KVER" ]] || update-initramfs -c -k "$KVER"
log "kernel: $KVER"
echo "$KVER" > /etc/bulkhead-vm-kernel

# ---------------------------------------------------------------- 3. setup.sh
# bcc (setup.sh's compile check) looks for headers under the release uname() reports, which
# in a chroot is the host's: point that name at the image kernel's headers while setup runs.
HOST_MODDIR=""
if [[ -n "${VM_HOST_RELEASE:-}" && "$VM_HOST_RELEASE" != "$KVER" && ! -e "/lib/modules/$VM_HOST_RELEASE" ]]; then
    HOST_MODDIR="/lib/modules/$VM_HOST_RELEASE"
fi
cleanup_host_moddir() { [[ -n "$HOST_MODDIR" ]] && rm -rf "$HOST_MODDIR"; return 0; }
trap cleanup_host_moddir EXIT

if [[ -n "${VM_BUILD_CA:-}" && -r "$VM_BUILD_CA" ]]; then
    export PIP_CERT="$VM_BUILD_CA" SSL_CERT_FILE="$VM_BUILD_CA" REQUESTS_CA_BUNDLE="$VM_BUILD_CA"
fi

log "running scripts/setup.sh for kernel $KVER"
# setup.sh installs linux-headers-$KVER (exact match: the stock case) among its packages;
# run it once so the headers exist, then link them for the compile check, then again.
if [[ -n "$HOST_MODDIR" ]]; then
    "${APT_INSTALL[@]}" "linux-headers-$KVER"
    mkdir -p "$HOST_MODDIR"
    ln -sfn "/lib/modules/$KVER/build" "$HOST_MODDIR/build"
    ln -sfn "/lib/modules/$KVER/source" "$HOST_MODDIR/source"
fi
(cd "$REPO" && BULKHEAD_SETUP_KERNEL_RELEASE="$KVER" bash scripts/setup.sh)
cleanup_host_moddir
[[ -d "/lib/modules/$KVER/build" ]] || die "setup.sh left no headers at /lib/modules/$KVER/build"
"$REPO/.venv/bin/python" -c 'import bcc, pytest, pyroute2, scapy' \
    || die "the venv made by setup.sh cannot import its packages"

# ---------------------------------------------------------------- 3b. wheelhouse
# The guest has no network, and the service tests install bulkhead the way a host owner
# does (scripts/service/install.sh: its own venv and pip). pip finds everything here with
# PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/wheelhouse: the runtime dependencies (pyproject's, with
# their own), the build backend (build-system.requires, for pip's isolated build), wheel, pip.
log "wheelhouse for offline pip installs: /root/wheelhouse"
WHEELHOUSE=/root/wheelhouse
mapfile -t DEPS < <("$REPO/.venv/bin/python" - "$REPO/pyproject.toml" <<'PYEOF'
import sys, tomllib
d = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join(d["project"]["dependencies"] + d["build-system"]["requires"]))
PYEOF
)
[[ ${#DEPS[@]} -gt 0 ]] || die "no dependencies read from pyproject.toml"
"$REPO/.venv/bin/python" -m pip wheel -q --progress-bar off -w "$WHEELHOUSE" \
    "${DEPS[@]}" setuptools wheel pip || die "pip wheel for the wheelhouse failed"
# Proof that it is enough: the project installs from it with no index, into a venv that
# sees nothing else (no system site-packages: every dependency must come from the wheelhouse).
python3 -m venv /tmp/wheelhouse-check || die "python3 -m venv failed"
PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELHOUSE" /tmp/wheelhouse-check/bin/pip install -q \
    --progress-bar off "$REPO" || die "the project does not install from the wheelhouse alone"
rm -rf /tmp/wheelhouse-check "$REPO/build"
log "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels"

# ---------------------------------------------------------------- 4. guest config
log "configuring the guest"
echo bulkhead-vm > /etc/hostname
cat > /etc/hosts <<'EOF'
127.0.0.1 localhost bulkhead-vm
::1 localhost ip6-localhost ip6-loopback
EOF
cat > /etc/fstab <<'EOF'
/dev/vda / ext4 rw,errors=remount-ro 0 1
EOF
passwd -d root >/dev/null   # console login without a password (debugging a kept VM)

# The test unit: the guest boots, runs the suite from the shared repo, powers off.
cat > /usr/local/sbin/bulkhead-vm-boot <<'EOF'
#!/bin/bash
# Mount the shares from the host and run the tree's own guest script (scripts/vm/guest-run.sh).
# Its exit status is written by guest-run.sh itself; if it never gets that far, the host
# finds no status file and reports the console log instead.
set -u
modprobe -q 9pnet_virtio 2>/dev/null; modprobe -q 9p 2>/dev/null
mkdir -p /mnt/repo /mnt/results
opts=trans=virtio,version=9p2000.L,msize=262144,cache=none
if ! mount -t 9p -o "$opts,ro" repo /mnt/repo || ! mount -t 9p -o "$opts" results /mnt/results; then
    echo "[vm] [guest] ERROR: could not mount the 9p shares from the host"
    exit 1
fi
bash /mnt/repo/scripts/vm/guest-run.sh
rc=$?
sync
# A clean shutdown, as a host owner's `reboot` is (units stopped in order): guest-run.sh asks
# for another boot by writing /mnt/results/reboot; qemu runs with -no-reboot, so either way
# qemu exits and the host boots the same disk again if asked. --force only if systemd can't.
target=poweroff
[[ -e /mnt/results/reboot ]] && target=reboot
# (The tests' status is in /mnt/results/status; exiting non-zero here would fire the
# unit's FailureAction and force the power-off in the middle of the clean one.) The target,
# not `systemctl poweroff`: that asks logind first, over a D-Bus this image does not have.
echo "[vm] [guest] guest-run.sh exit $rc: $target"
# The shutdown stops this unit: a SIGTERM landing before the exit below would fail the unit
# and its FailureAction would turn the clean reboot into a forced power-off.
trap '' TERM
systemctl --no-block start --job-mode=replace-irreversibly "$target.target" && exit 0
systemctl --force --force "$target"
exit 1
EOF
chmod 755 /usr/local/sbin/bulkhead-vm-boot

cat > /etc/systemd/system/bulkhead-vm-test.service <<'EOF'
[Unit]
Description=bulkhead test suite on the stock kernel (make vm-test)
After=local-fs.target systemd-modules-load.service systemd-udev-settle.service
Wants=systemd-modules-load.service
# Whatever happens, the VM ends: qemu runs with -no-reboot and exits on power-off or reboot.
# bulkhead-vm-boot itself powers off (or reboots) cleanly; a SuccessAction would cut that
# shutdown short when the unit stops, so only a failure forces it.
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/bulkhead-vm-boot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity
LimitNOFILE=65536
TasksMax=infinity

[Install]
WantedBy=multi-user.target
EOF
systemctl enable bulkhead-vm-test.service
systemctl set-default multi-user.target
# Nothing else should write to the serial console or wait for a login.
systemctl mask getty.target serial-getty@ttyS0.service getty@tty1.service \
    systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service \
    2>/dev/null || true

# ---------------------------------------------------------------- tidy
rm -f /usr/sbin/policy-rc.d
apt-get clean
rm -rf /var/lib/apt/lists/* /root/.cache /tmp/* /var/tmp/*
log "done: kernel $KVER, $(du -sh --exclude=/proc --exclude=/sys --exclude=/dev / 2>/dev/null | cut -f1) in the image"
