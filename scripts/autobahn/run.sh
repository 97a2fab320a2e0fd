#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzingclient against a WebSocket server.
#
#   scripts/autobahn/run.sh HOST PORT [CASES] [AGENT]
#
# CASES  comma-separated case patterns, e.g. '*' or '1.*,2.*,9.1.1'
#        (default: $AUTOBAHN_CASES or '*')
# AGENT  name used in the reports (default: $AUTOBAHN_AGENT or 'server')
# Env:
#   AUTOBAHN_EXCLUDE      cases to skip, comma-separated (default '12.*,13.*':
#                         permessage-deflate); set to '' to run everything
#   AUTOBAHN_PATH         URL path on the server (default '/')
#   AUTOBAHN_REPORT_DIR   keep the JSON/HTML reports here (default: a temp dir,
#                         removed on success, kept and printed on failure)
#   AUTOBAHN_STRICT_CLOSE 1: also fail cases whose closing behaviour is
#                         FAILED or UNCLEAN (default 0: only 'behavior' counts)
#   AUTOBAHN_TIMEOUT      seconds before the whole run is killed (default 3600)
#   AUTOBAHN_WAIT         seconds to wait for HOST:PORT to accept (default 10)
#   AUTOBAHN_HOME         install dir used by install.sh (default /opt/autobahn-testsuite)
#
# Prints one line per failing case, a per-group summary, and last
# 'N passed, M failed'. Passed: OK, NON-STRICT, INFORMATIONAL (and
# UNIMPLEMENTED for 12.*/13.*). Anything else, and any case that did not run,
# is failed. Exit 0 only when nothing failed.
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
HOST="$1"; PORT="$2"
CASES="${3:-${AUTOBAHN_CASES:-*}}"
AGENT="${4:-${AUTOBAHN_AGENT:-server}}"
EXCLUDE="${AUTOBAHN_EXCLUDE-12.*,13.*}"
URLPATH="${AUTOBAHN_PATH:-/}"
TIMEOUT="${AUTOBAHN_TIMEOUT:-3600}"
WAIT="${AUTOBAHN_WAIT:-10}"
STRICT_CLOSE="${AUTOBAHN_STRICT_CLOSE:-0}"
AUTOBAHN_HOME="${AUTOBAHN_HOME:-/opt/autobahn-testsuite}"
VENV="$AUTOBAHN_HOME/venv"
PY="$VENV/bin/python"

if [ ! -x "$VENV/bin/wstest" ]; then
  echo "wstest not found in $VENV: run $(dirname "$0")/install.sh first (as root)" >&2
  exit 2
fi

# Wait until the server accepts TCP connections.
deadline=$((SECONDS + WAIT))
until (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; do
  if [ $SECONDS -ge $deadline ]; then
    echo "nothing accepts connections on $HOST:$PORT" >&2
    echo "0 passed, 1 failed"
    exit 1
  fi
  sleep 0.2
done

work="$(mktemp -d -t autobahn.XXXXXX)"
keep=0
# shellcheck disable=SC2317  # invoked by the trap
cleanup() { if [ "$keep" = 0 ]; then rm -rf "$work"; fi; }
trap cleanup EXIT
outdir="${AUTOBAHN_REPORT_DIR:-$work/reports}"
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"

case "$HOST" in *:*) urlhost="[$HOST]" ;; *) urlhost="$HOST" ;; esac
URL="ws://$urlhost:$PORT$URLPATH"

"$PY" - "$work/spec.json" "$outdir" "$AGENT" "$URL" "$CASES" "$EXCLUDE" <<'EOF'
import json, sys
path, outdir, agent, url, cases, exclude = sys.argv[1:7]
split = lambda s: [c.strip() for c in s.split(",") if c.strip()]
spec = {"outdir": outdir,
        "servers": [{"agent": agent, "url": url}],
        "cases": split(cases),
        "exclude-cases": split(exclude),
        "exclude-agent-cases": {}}
json.dump(spec, open(path, "w"), indent=2)
EOF

start=$SECONDS
set +e
(cd "$work" && timeout "$TIMEOUT" "$VENV/bin/wstest" -m fuzzingclient -s spec.json) \
  > "$work/wstest.log" 2>&1
rc=$?
set -e
elapsed=$((SECONDS - start))

set +e
"$PY" - "$outdir" "$AGENT" "$work/wstest.log" "$STRICT_CLOSE" "$elapsed" <<'EOF'
import json, os, re, sys
outdir, agent, logfile, strict_close, elapsed = sys.argv[1:6]
log = open(logfile).read()
m = re.search(r"Cases = \[(.*)\]", log)
planned = re.findall(r"'([^']+)'", m.group(1)) if m else []
try:
    index = json.load(open(os.path.join(outdir, "index.json"))).get(agent, {})
except (IOError, ValueError):
    index = {}

def key(c):
    return tuple(int(x) for x in c.split("."))

PASS = ("OK", "NON-STRICT", "INFORMATIONAL")
passed = failed = 0
groups = {}
not_run = []
for case in sorted(set(planned) | set(index), key=key):
    r = index.get(case)
    group = case.split(".")[0]
    if r is None:
        beh, close, ok = "NOT RUN", "-", False
        not_run.append(case)
    else:
        beh, close = r.get("behavior"), r.get("behaviorClose")
        ok = beh in PASS or (beh == "UNIMPLEMENTED" and group in ("12", "13"))
        if ok and strict_close == "1" and close in ("FAILED", "UNCLEAN"):
            ok = False
    g = groups.setdefault(int(group), {})
    g[beh] = g.get(beh, 0) + 1
    if ok:
        passed += 1
    else:
        failed += 1
        if r is not None:
            report = os.path.join(outdir, re.sub(r"\.json$", ".html", r.get("reportfile", "")))
            print("FAILED %s: %s (close=%s, code=%s) %s"
                  % (case, beh, close, r.get("remoteCloseCode"), report))
if not_run:
    print("FAILED (not run; did the server stop answering?): %s" % " ".join(not_run))
for g in sorted(groups):
    print("  %3s.*  %s" % (g, ", ".join("%s %d" % kv for kv in sorted(groups[g].items()))))
if not planned and not index:
    print("wstest produced no results; its log:")
    print(log[-3000:])
    failed = max(failed, 1)
print("autobahn: %d cases in %ss" % (passed + failed, elapsed))
print("%d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
EOF
status=$?
set -e
if [ $rc -ne 0 ]; then
  echo "wstest exited with $rc (124 = timed out after ${TIMEOUT}s); log: $work/wstest.log" >&2
  keep=1
  status=1
fi
if [ $status -ne 0 ]; then
  keep=1
  echo "reports: $outdir" >&2
fi
exit $status
