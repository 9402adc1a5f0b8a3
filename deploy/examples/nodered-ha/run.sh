#!/usr/bin/env bash
# flowgate (embedded broker, dispatch mode) in front of N Node-RED replicas
# that run the same flows.json with the same fixed MQTT client id.
#
#   deploy/examples/nodered-ha/run.sh [N]        # default N=2; Ctrl-C stops all
#
# Then: http://127.0.0.1:1880/api (balanced), mqtt://127.0.0.1:1883 (publish
# jobs on jobs/..., answers on replies), http://127.0.0.1:9090/status, and the
# editor of all replicas at http://127.0.0.1:1881/ (user admin, the password in
# $WORK/editor-password; Deploy goes to every replica, one at a time).
# Ports and paths can be changed with MQTT_PORT, HTTP_PORT, ADMIN_PORT, EDITOR_PORT,
# REPLICA_BASE (replica i listens on REPLICA_BASE+i), FLOWGATE, NODE_RED,
# WORK (a directory for configs and logs) and READY_FILE (written when every
# replica is connected and answering).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
N=${1:-${N:-2}}
MQTT_PORT=${MQTT_PORT:-1883}
HTTP_PORT=${HTTP_PORT:-1880}
ADMIN_PORT=${ADMIN_PORT:-9090}
EDITOR_PORT=${EDITOR_PORT:-1881}
REPLICA_BASE=${REPLICA_BASE:-18800}
FLOWGATE=${FLOWGATE:-$root/target/release/flowgate}
NODE_RED=${NODE_RED:-$root/tests/node/node_modules/node-red/red.js}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/flowgate-nodered-ha.XXXXXX")}
mkdir -p "$WORK"

if [ ! -x "$FLOWGATE" ]; then
  echo "building flowgate (cargo build --release)"
  (cd "$root" && cargo build --release --quiet)
fi
if [ ! -f "$NODE_RED" ]; then
  echo "installing Node-RED (npm ci --prefix tests/node)"
  npm ci --prefix "$root/tests/node" --no-audit --no-fund --loglevel=error
fi

# the editor's login: user admin, a random password kept in the work directory
if [ ! -s "$WORK/editor-password" ]; then
  (umask 077; head -c 12 /dev/urandom | base64 | tr -d '/+=' > "$WORK/editor-password")
fi
"$FLOWGATE" passwd "$WORK/editors" admin < "$WORK/editor-password" 2>/dev/null

replicas=""
for i in $(seq 1 "$N"); do
  replicas="$replicas\"127.0.0.1:$((REPLICA_BASE + i))\", "
done
cat > "$WORK/flowgate.toml" <<TOML
node_id = "ha-example"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[mqtt]
listen = "127.0.0.1:$MQTT_PORT"
upstream = "embedded"
mode = "dispatch"
[[instance]]
name = "line1"
match = { client_id = "line1-nodered" }
[instance.http]
listen = "127.0.0.1:$HTTP_PORT"
replicas = [${replicas%, }]
[instance.editor]
listen = "127.0.0.1:$EDITOR_PORT"
password_file = "$WORK/editors"
TOML

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$FLOWGATE" run --config "$WORK/flowgate.toml" >"$WORK/flowgate.out" 2>"$WORK/flowgate.log" &
pids+=($!)
for i in $(seq 1 "$N"); do
  dir="$WORK/r$i"
  mkdir -p "$dir"
  cp "$here/flows.json" "$dir/flows.json"
  PORT=$((REPLICA_BASE + i)) REPLICA="r$i" MQTT_HOST=127.0.0.1 MQTT_PORT=$MQTT_PORT \
    node "$NODE_RED" --settings "$here/settings.js" --userDir "$dir" >"$dir/node-red.log" 2>&1 &
  pids+=($!)
done

# ready: every replica's MQTT session is up and every HTTP replica answers /api
admin="http://127.0.0.1:$ADMIN_PORT"
deadline=$((SECONDS + 60))
while :; do
  state=$(curl -fsS "$admin/api/instances" 2>/dev/null || true)
  mqtt=$(printf '%s' "$state" | grep -o '"accepted": true' | wc -l || true)
  up=$(printf '%s' "$state" | grep -o '"up": true' | wc -l || true)
  answering=0
  for i in $(seq 1 "$N"); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$((REPLICA_BASE + i))/api" || true)
    [ "$code" = 200 ] && answering=$((answering + 1))
  done
  if [ "$mqtt" -ge "$N" ] && [ "$up" -ge "$N" ] && [ "$answering" -ge "$N" ]; then
    break
  fi
  if [ $SECONDS -ge $deadline ]; then
    echo "not ready after 60 s: $mqtt/$N MQTT replicas, $up/$N HTTP up, $answering/$N answering; logs in $WORK" >&2
    exit 1
  fi
  sleep 0.2
done
echo "ready: $N Node-RED replicas behind flowgate"
echo "  http://127.0.0.1:$HTTP_PORT/api     the rate-limited API (10/s per replica)"
echo "  mqtt://127.0.0.1:$MQTT_PORT         publish jobs on jobs/..., answers on replies"
echo "  $admin/status      live per-replica view"
echo "  http://127.0.0.1:$EDITOR_PORT/          the editor of all replicas: user admin, password $(cat "$WORK/editor-password")"
echo "  logs and configs in $WORK"
[ -n "${READY_FILE:-}" ] && echo ready >"$READY_FILE"
wait "${pids[0]}"
