#!/usr/bin/env bash
# Vagrant provisioning for bulkhead: the repository's own scripts/setup.sh (what `make setup`
# runs), on the repo synced to /vagrant. Runs as root on `vagrant up` / `vagrant provision`.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# Ubuntu ships python3-bpfcc in 'universe'; cloud boxes sometimes have it disabled.
if grep -qi ubuntu /etc/os-release && ! grep -rqs '^[^#].*universe' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    apt-get update -q
    apt-get install -y -q software-properties-common
    add-apt-repository -y universe
fi
command -v make >/dev/null || { apt-get update -q; apt-get install -y -q make; }

cd /vagrant
bash scripts/setup.sh
echo "bulkhead: ready on $(. /etc/os-release; echo "$PRETTY_NAME"), kernel $(uname -r)."
echo "bulkhead: run the tests with: vagrant ssh -c 'cd /vagrant && sudo make test'"
