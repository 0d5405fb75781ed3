#!/usr/bin/env bash
# lab.sh up|down — the service tests' lab around THIS host, which is the gateway: the agent
# that bulkhead.service runs enforces in the root network namespace, as on a real gateway.
#
#   bhsvc-cli  eth0 198.18.10.10/24 --- bhs-cli 198.18.10.1/24 \
#                                                                > this host (bulkhead.service)
#   bhsvc-srv  eth0 198.18.11.10/24 --- bhs-srv 198.18.11.1/24 /
#
# up: the namespaces, the veths, and lab_server.py in bhsvc-srv (greets and echoes on the TCP
# ports, echoes UDP, and logs every arrival to $LAB_RUN/arrivals, which the tests count).
# down: all of it gone (idempotent). Installed by the tests as bulkhead-lab.service (a
# oneshot, Before=bulkhead.service) so that after a reboot the lab is there before the agent
# starts, with no manual step; the server then runs in that unit's cgroup.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAB_RUN=/run/bulkhead-lab
TCP_PORTS=(8080 9090)
UDP_PORTS=(5353)

down() {
    if [[ -r "$LAB_RUN/server.pid" ]]; then
        kill "$(cat "$LAB_RUN/server.pid")" 2>/dev/null || true
    fi
    for ns in bhsvc-cli bhsvc-srv; do
        [[ -e "/run/netns/$ns" ]] && ip netns del "$ns"
    done
    for dev in bhs-cli bhs-srv; do   # gone with their peers' namespaces; a half-made one isn't
        ip link show dev "$dev" >/dev/null 2>&1 && ip link del "$dev"
    done
    rm -rf "$LAB_RUN"
    return 0
}

# link NS GW_IF GW_ADDR PEER_ADDR
link() {
    local ns=$1 gw_if=$2 gw_addr=$3 peer_addr=$4
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "$gw_if" type veth peer name eth0 netns "$ns"
    ip addr add "$gw_addr/24" dev "$gw_if"
    ip link set "$gw_if" up
    ip -n "$ns" addr add "$peer_addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$gw_addr"
}

up() {
    down
    mkdir -p "$LAB_RUN"
    link bhsvc-cli bhs-cli 198.18.10.1 198.18.10.10
    link bhsvc-srv bhs-srv 198.18.11.1 198.18.11.10
    local args=()
    for p in "${TCP_PORTS[@]}"; do args+=(--tcp "198.18.11.10:$p"); done
    for p in "${UDP_PORTS[@]}"; do args+=(--udp "198.18.11.10:$p"); done
    : > "$LAB_RUN/arrivals"
    ip netns exec bhsvc-srv /usr/bin/python3 "$HERE/lab_server.py" --log "$LAB_RUN/arrivals" \
        --ready "$LAB_RUN/ready" "${args[@]}" &
    echo $! > "$LAB_RUN/server.pid"
    for _ in $(seq 1 300); do
        [[ -e "$LAB_RUN/ready" ]] && { echo "lab up: server pid $(cat "$LAB_RUN/server.pid")"; return 0; }
        kill -0 "$(cat "$LAB_RUN/server.pid")" 2>/dev/null || break
        sleep 0.2
    done
    echo "lab: the server did not start" >&2
    down
    return 1
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
