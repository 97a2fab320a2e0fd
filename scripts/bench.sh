#!/usr/bin/env bash
# Runs the figures of docs/benchmarks.md: each scenario against a fresh release gateway,
# on io_uring and on epoll, printing the summary lines and keeping the JSON reports.
#   scripts/bench.sh [OUT_DIR]   (build first: cargo build --release --workspace --examples)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-out}
mkdir -p "$OUT"
S=bench-secret-0123456789abcdef0123456789
G=${ARCGATE:-target/release/arcgate}
L=${ARCGATE_LOAD:-target/release/arcgate-load}
PORT=${PORT:-28480}
ADMIN=${ADMIN:-29490}

run() { # NAME IO ARGS...
  local name=$1 io=$2; shift 2
  "$G" serve --jwt-secret "$S" --listen 127.0.0.1:$PORT --admin-listen 127.0.0.1:$ADMIN \
    --rate-limit 0 --io "$io" ${GATEWAY_ARGS:-} > "$OUT/$name-$io.log" 2>&1 &
  local gp=$!
  sleep 0.5
  echo "== $name ($io): arcgate-load $*"
  "$L" "$@" --url ws://127.0.0.1:$PORT --secret "$S" --gateway-pid $gp --quiet \
    --json "$OUT/$name-$io.json" 2>&1 | grep -E "setup|messages|flat out|deliveries|latency|gateway|storm|recover|warning" || true
  kill -9 $gp; wait $gp 2>/dev/null || true
}

for io in uring epoll; do
  # Two load-generator processes: one alone is the slower side of a connect burst.
  run connect19k $io connect --agents 19000 --procs 2 --concurrency 64 --duration 5s --sources 127.0.0.1-127.0.0.4
  run flood $io flood --agents 50 --duration 10s
  run flood256 $io flood --agents 200 --in-flight 256 --duration 10s
  run fanout30 $io fanout --clients 1000 --agents 10 --rate 30 --duration 10s
  run fanoutmax $io fanout --clients 1000 --agents 10 --rate 0 --duration 10s
  run storm19k $io storm --agents 19000 --procs 2 --duration 12s --storm-after 3s --sources 127.0.0.1-127.0.0.4
done
run connect40k uring connect --agents 39000 --procs 3 --duration 5s --sources 127.0.0.1-127.0.0.8
# The machine's own floor for the fan-out rows: bare writes to 1,000 loopback sockets.
echo "== loopback floor: 1,000 sockets, 30 bursts/s"
"${LOOPBACK_FLOOR:-target/release/examples/loopback_floor}" --sockets 1000 --rate 30 | tee "$OUT/floor.txt"
