#!/usr/bin/env bash
# What the status page costs the gateway: its CPU time over SECONDS with no page open, then
# over SECONDS with /status open in headless Chromium (which reads /v1/status every second).
#
#   scripts/status-cost.sh [SECONDS] [ARCGATE_BINARY]     # defaults: 60, target/release/arcgate
#
# Prints the gateway's CPU time in each window and as a share of one core.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
bin="${2:-target/release/arcgate}"
port=$((20000 + RANDOM % 10000))
admin=$((port + 1))

"$bin" serve --dev --workers 2 --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    >/dev/null 2>&1 &
gw=$!
browser=""
profile="$(mktemp -d -t arcgate-status-cost.XXXXXX)"
cleanup() {
    [ -n "$browser" ] && kill "$browser" 2>/dev/null || true
    kill "$gw" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$profile"
}
trap cleanup EXIT
until (exec 3<>"/dev/tcp/127.0.0.1/$admin") 2>/dev/null; do sleep 0.1; done

# utime + stime of the gateway, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$gw/stat"; }
hz="$(getconf CLK_TCK)"
window() {
    local a b
    a="$(ticks)"
    sleep "$secs"
    b="$(ticks)"
    echo $((b - a))
}

sleep 2
closed="$(window)"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" "http://127.0.0.1:$admin/status" >/dev/null 2>&1 &
browser=$!
sleep 5
open="$(window)"
readings="$(curl -s "http://127.0.0.1:$admin/metrics" | awk '/^arcgate_admin_connections /{print $2}')"

awk -v c="$closed" -v o="$open" -v hz="$hz" -v s="$secs" -v conns="${readings:-?}" 'BEGIN {
    printf "page closed: %.2f s CPU in %d s = %.3f %% of a core\n", c / hz, s, 100 * c / hz / s
    printf "page open:   %.2f s CPU in %d s = %.3f %% of a core (admin connections open: %s)\n", o / hz, s, 100 * o / hz / s, conns
    printf "cost of the open page: %.3f %% of a core\n", 100 * (o - c) / hz / s
}'
