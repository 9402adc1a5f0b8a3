#!/usr/bin/env bash
# "Proving it": the seed 002 experiment with flowgate's own commands. For each
# replica count N, starts deploy/examples/nodered-ha (flowgate + N real
# Node-RED replicas, each capped at 10 calls/s and 10 jobs/s by a delay node
# in rate mode), then drives `flowgate loadtest http` at the rate-limited API
# and `flowgate loadtest mqtt` at the jobs flow with the same ramp.
# Writes bench/results/prove-<date>/{http,mqtt}-<N>/report.{json,svg} and a
# summary (summary.md) of the last step: achieved vs N x 10.
#
#   bash bench/prove.sh          # COUNTS="1 2 3" RAMP=5,10,20,40 STEP=5s
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${COUNTS:-1 2 3}
RAMP=${RAMP:-5,10,20,40}
STEP=${STEP:-5s}
# long enough that no request is abandoned in a replica's queue: an abandoned
# request still costs the replica its slot (seed 002's client waited too)
TIMEOUT=${TIMEOUT:-60s}
cargo build --release --quiet
[ -d tests/node/node_modules/node-red ] || npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
bin=target/release/flowgate
out=bench/results/prove-$(date -u +%Y%m%d-%H%M)
mkdir -p "$out"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

summary="$out/summary.md"
{
  echo "# flowgate loadtest against N Node-RED replicas (10/s each)"
  echo
  echo "\`bash bench/prove.sh\` (COUNTS=\"$COUNTS\" RAMP=$RAMP STEP=$STEP), $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
  echo
  echo "| kind | replicas | target/s (last step) | achieved/s | x (N x 10) | errors | shares |"
  echo "|---|---|---|---|---|---|---|"
} >"$summary"

for n in $COUNTS; do
  work=$(mktemp -d)
  mqtt=$(port); http=$(port); admin=$(port); base=$(( $(port) % 20000 + 30000 ))
  MQTT_PORT=$mqtt HTTP_PORT=$http ADMIN_PORT=$admin REPLICA_BASE=$base WORK=$work \
    READY_FILE=$work/ready FLOWGATE=$bin bash deploy/examples/nodered-ha/run.sh "$n" >"$work/run.out" 2>&1 &
  runner=$!
  for _ in $(seq 1 600); do [ -f "$work/ready" ] && break; sleep 0.1; done
  [ -f "$work/ready" ] || { echo "example did not start with $n replicas:"; cat "$work/run.out"; kill $runner; exit 1; }
  echo "== $n replica(s): http"
  "$bin" loadtest http --url "http://127.0.0.1:$http/api" --ramp "$RAMP" --step "$STEP" \
    --timeout "$TIMEOUT" --out "$out/http-$n"
  echo "== $n replica(s): mqtt"
  "$bin" loadtest mqtt --broker "127.0.0.1:$mqtt" --topic 'jobs/{seq}' --qos 1 \
    --reply-topic replies --ramp "$RAMP" --step "$STEP" --timeout "$TIMEOUT" --out "$out/mqtt-$n"
  kill $runner; wait $runner 2>/dev/null || true
  for kind in http mqtt; do
    node -e '
      const r = require(process.argv[1]); const n = Number(process.argv[2]);
      const s = r.steps[r.steps.length - 1];
      const shares = Object.entries(s.replicas).map(([k, v]) => `${k} ${(v.share * 100).toFixed(0)}%`).join(", ");
      console.log(`| ${r.kind} | ${n} | ${s.target_rate} | ${s.achieved_rate.toFixed(1)} | ${(s.achieved_rate / (10 * n)).toFixed(3)} | ${r.totals.errors} | ${shares} |`);
    ' "$PWD/$out/$kind-$n/report.json" "$n" >>"$summary"
  done
  rm -rf "$work"
done
echo
cat "$summary"
