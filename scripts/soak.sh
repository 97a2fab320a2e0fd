#!/usr/bin/env bash
# A long run of a realistic fleet against one gateway, sampling its RSS: the leak check of
# docs/benchmarks.md. Prints the RSS after the warm-up, at the end and the growth between.
# By default 100 minutes, measuring the last hour: a fresh heap settles in the first 40.
#   scripts/soak.sh OUT_DIR [DURATION_S] [WARMUP_S]   (env: ARCGATE, ARCGATE_LOAD, PORT, ADMIN,
#   AGENTS, PROCS, SOURCES, STATUS_RATE, GATEWAY_ARGS; build first: cargo build --release --workspace)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/soak.sh OUT_DIR [DURATION_S] [WARMUP_S]}
DURATION=${2:-6000}
WARMUP=${3:-2400}
mkdir -p "$OUT"
S=soak-secret-0123456789abcdef0123456789
G=${ARCGATE:-target/release/arcgate}
L=${ARCGATE_LOAD:-target/release/arcgate-load}
PORT=${PORT:-28480}
ADMIN=${ADMIN:-29490}
AGENTS=${AGENTS:-19000}

"$G" serve --jwt-secret "$S" --listen 127.0.0.1:$PORT --admin-listen 127.0.0.1:$ADMIN \
  ${GATEWAY_ARGS:-} > "$OUT/gateway.log" 2>&1 &
gp=$!
trap 'kill -9 $gp 2>/dev/null || true' EXIT
sleep 0.5
# A fleet at realistic rates: heartbeats every 30 s, metrics every minute, status changes,
# players, commands, 100 dashboards, and every agent reconnecting about once an hour.
# The gateway keeps each server's latest status: a status rate high enough to have seen
# every server during the warm-up (STATUS_RATE=400 for 19,000 agents) separates that
# stored state from a leak.
"$L" steady --url ws://127.0.0.1:$PORT --secret "$S" --gateway-pid $gp --quiet \
  --agents "$AGENTS" --clients 100 --heartbeat-interval 30s --metrics-interval 60s \
  --status-rate "${STATUS_RATE:-10}" --player-rate 2 --command-rate 1 --churn "$((AGENTS / 3600 + 1))" \
  --procs "${PROCS:-2}" --sources "${SOURCES:-127.0.0.1-127.0.0.4}" --duration "${DURATION}s" \
  --json "$OUT/report.json" > "$OUT/load.txt" 2>&1 &
lp=$!

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$gp/status"; }
echo "seconds rss_kb" > "$OUT/rss.txt"
start=$(date +%s)
while kill -0 $lp 2>/dev/null; do
  t=$(($(date +%s) - start))
  [ "$t" -le "$DURATION" ] && echo "$t $(rss_kb)" >> "$OUT/rss.txt"
  sleep 30
done
wait $lp || { tail -3 "$OUT/load.txt"; echo "the load generator failed: $OUT/load.txt"; exit 1; }
awk -v w="$WARMUP" 'NR > 1 { if (!base && $1 >= w) { base = $2; bt = $1 } last = $2; lt = $1 }
  END { printf "rss after warm-up (%d s): %d KiB; at %d s: %d KiB; growth %.2f %%\n",
        bt, base, lt, last, (last - base) * 100 / base }' "$OUT/rss.txt" | tee "$OUT/growth.txt"
grep -E "setup|messages|deliveries|commands|errors|lost|gateway" "$OUT/load.txt" || true
