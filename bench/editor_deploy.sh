#!/usr/bin/env bash
# Deploy through the editor listener, timed, with N real Node-RED replicas
# under load. For each N in COUNTS, starts deploy/examples/nodered-ha (flowgate
# + N Node-RED 4.1 replicas, each capped at 10 calls/s), logs in to the editor
# listener, drives `flowgate loadtest http` at 5 x N calls/s in three steps
# (before, during, after), and in the middle of step 2 sends the editor's
# Deploy (POST /flows, API v2, a full deploy: the example's flows plus one
# comment node) and times it until the answer (what the editor waits for before
# it says "Successfully deployed"). Writes bench/results/editor-<date>/summary.md.
#
#   bash bench/editor_deploy.sh          # COUNTS="2 3 5" STEP=6s
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${COUNTS:-2 3 5}
STEP=${STEP:-6s}
cargo build --release --quiet
[ -d tests/node/node_modules/node-red ] || npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
bin=target/release/flowgate
out=bench/results/editor-$(date -u +%Y%m%d-%H%M)
mkdir -p "$out"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
step_s=${STEP%s}

summary="$out/summary.md"
{
  echo "# Deploy from the editor listener, N Node-RED 4.1 replicas under load"
  echo
  echo "\`bash bench/editor_deploy.sh\` (COUNTS=\"$COUNTS\" STEP=$STEP), $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
  echo
  echo "| replicas | Deploy answered (s) | calls/s offered | before: achieved/s, p99 ms | during: achieved/s, p99 ms | after: achieved/s, p99 ms | failed calls |"
  echo "|---|---|---|---|---|---|---|"
} >"$summary"

for n in $COUNTS; do
  work=$(mktemp -d)
  mqtt=$(port); http=$(port); admin=$(port); editor=$(port); base=$(( $(port) % 20000 + 30000 ))
  MQTT_PORT=$mqtt HTTP_PORT=$http ADMIN_PORT=$admin EDITOR_PORT=$editor REPLICA_BASE=$base WORK=$work \
    READY_FILE=$work/ready FLOWGATE=$bin bash deploy/examples/nodered-ha/run.sh "$n" >"$work/run.out" 2>&1 &
  runner=$!
  for _ in $(seq 1 900); do [ -f "$work/ready" ] && break; sleep 0.1; done
  [ -f "$work/ready" ] || { echo "example did not start with $n replicas:"; cat "$work/run.out"; kill $runner; exit 1; }
  pw=$(cat "$work/editor-password")
  token=$(curl -fsS -XPOST "http://127.0.0.1:$editor/auth/token" \
    --data "client_id=node-red-editor&grant_type=password&scope=&username=admin&password=$pw" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -fsS -H "authorization: Bearer $token" -H "Node-RED-API-Version: v2" \
    "http://127.0.0.1:$editor/flows" >"$work/current.json"
  python3 - "$work/current.json" "$work/deploy.json" <<'PY'
import json, sys
cur = json.load(open(sys.argv[1]))
flows = cur["flows"] + [{"id": "bench0000000001", "type": "comment", "z": cur["flows"][0]["id"],
                         "name": "deployed by bench/editor_deploy.sh", "wires": []}]
json.dump({"flows": flows, "rev": cur["rev"]}, open(sys.argv[2], "w"))
PY
  rate=$((5 * n))
  echo "== $n replicas: $rate calls/s, Deploy in step 2"
  "$bin" loadtest http --url "http://127.0.0.1:$http/api" --ramp "$rate,$rate,$rate" --step "$STEP" \
    --timeout 60s --out "$out/http-$n" >"$work/loadtest.out" 2>&1 &
  load=$!
  sleep "$(python3 -c "print($step_s * 1.4)")"
  took=$(curl -sS -o "$work/answer.json" -w '%{http_code} %{time_total}' -XPOST \
    -H "authorization: Bearer $token" -H "content-type: application/json" \
    -H "Node-RED-API-Version: v2" -H "Node-RED-Deployment-Type: full" \
    --data-binary @"$work/deploy.json" "http://127.0.0.1:$editor/flows")
  wait $load
  echo "   Deploy: HTTP ${took% *} in ${took#* } s: $(cat "$work/answer.json")"
  [ "${took% *}" = 200 ] || { echo "Deploy failed"; cat "$work/answer.json"; kill $runner; exit 1; }
  kill $runner; wait $runner 2>/dev/null || true
  node -e '
    const r = require(process.argv[1]); const [n, took, rate] = process.argv.slice(2);
    const cell = (s) => `${s.achieved_rate.toFixed(1)}, ${s.latency_ms ? s.latency_ms.p99.toFixed(0) : "-"}`;
    console.log(`| ${n} | ${Number(took).toFixed(2)} | ${rate} | ${cell(r.steps[0])} | ${cell(r.steps[1])} | ${cell(r.steps[2])} | ${r.totals.errors} of ${r.totals.sent} |`);
  ' "$PWD/$out/http-$n/report.json" "$n" "${took#* }" "$rate" >>"$summary"
  rm -rf "$work"
done
echo
cat "$summary"
