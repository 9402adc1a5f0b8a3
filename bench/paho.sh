#!/usr/bin/env bash
# The Eclipse Paho MQTT interoperability suite (3.1.1 and 5.0), each test in a
# process of its own, direct to Mosquitto and through flowgate with the
# suite's first client id ("myclientid") made a replica of an instance, in one
# run; a markdown table of pass/fail on stdout and in bench/results/.
#
#   bash bench/paho.sh                 # MODE=dispatch (default) or share
#   MODE=share bash bench/paho.sh
#   MODE=plugin bash bench/paho.sh     # flowgate inside Mosquitto 2.1.2 (the plugin)
#   MOSQUITTO=path/to/mosquitto bash bench/paho.sh   # another broker (MODE=plugin: 2.1.2)
#   ONLY=test_subscribe_options bash bench/paho.sh   # tests whose name matches
#
# Every test gets fresh processes: a broker for the direct run, and a broker
# with flowgate in front of it for the flowgate run (persistence off, as the
# suite's own runs), so that no test sees what an earlier one left (the
# instance's session outlives its replicas' connections by design). Needs
# mosquitto, python3, cargo, and ../shared/vendor/paho.mqtt.testing-9d7bb80.tar.gz
# (SUITE=...).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-dispatch}
REPLICA=${REPLICA:-myclientid}
TIMEOUT=${TIMEOUT:-60}
SUITE=${SUITE:-../shared/vendor/paho.mqtt.testing-9d7bb80.tar.gz}
[ -f "$SUITE" ] || { echo "no suite at $SUITE"; exit 1; }
cargo build --release --quiet
if [ "$MODE" = plugin ]; then
  MOSQUITTO=${MOSQUITTO:-$(bash tests/mosquitto21/build.sh)}
  cargo build --release --quiet -p flowgate-mosquitto
fi
MOSQUITTO=${MOSQUITTO:-mosquitto}
work=$(mktemp -d)
# Mosquitto started as root runs as user mosquitto: it reads the plugin TOML here
chmod a+rx "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
tar xzf "$SUITE" -C "$work"
dir=$(find "$work" -type d -name interoperability | head -1)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
broker() { # port [extra config lines]
  cat > "$work/mosquitto-$1.conf" <<CONF
listener $1 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
max_queued_messages 100000
${MOSQUITTO_LOG:+log_type all}
${2:-}
CONF
  "$MOSQUITTO" -c "$work/mosquitto-$1.conf" >/dev/null 2>"$work/mosquitto-$1.log" & pids+=($!)
  for _ in $(seq 50); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done
  echo "mosquitto on $1 did not start"; exit 1
}
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; pids=(); }
start_target() { # direct|flowgate -> sets P, the port to test against
  local up; up=$(port)
  if [ "$1" = flowgate ] && [ "$MODE" = plugin ]; then
    printf 'node_id = "paho"\n[admin]\nlisten = "127.0.0.1:%s"\n[[instance]]\nname = "paho"\nmatch = { client_id = "%s" }\n' \
      "$(port)" "$REPLICA" > "$work/plugin.toml"
    broker "$up" "plugin $PWD/target/release/libflowgate_mosquitto.so
plugin_opt_config $work/plugin.toml"
    P=$up; return
  fi
  broker "$up"
  if [ "$1" = direct ]; then P=$up; return; fi
  cat > "$work/flowgate.toml" <<CONF
node_id = "paho"
[admin]
listen = "127.0.0.1:0"
[mqtt]
listen = "127.0.0.1:0"
upstream = "mqtt://127.0.0.1:$up"
mode = "$MODE"
[[instance]]
name = "paho"
match = { client_id = "$REPLICA" }
CONF
  rm -f "$work/ready.json"
  RUST_LOG=${FLOWGATE_LOG:-warn} target/release/flowgate run --config "$work/flowgate.toml" --ready-file "$work/ready.json" --drain-delay 0s \
    >>"$work/flowgate.log" 2>&1 & pids+=($!)
  for _ in $(seq 100); do [ -s "$work/ready.json" ] && break; sleep 0.1; done
  P=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mqtt"].split(":")[1])' "$work/ready.json")
}

mkdir -p bench/results
out="bench/results/paho-$MODE-$(date +%Y%m%d-%H%M).md"
{
  echo "Eclipse Paho interoperability suite (9d7bb80), Mosquitto $("$MOSQUITTO" -h 2>/dev/null | head -1 | sed 's/.*version //;s/ .*//'),"
  echo "flowgate $MODE mode with client id \`$REPLICA\` a replica; each test alone against fresh processes, ${TIMEOUT} s at most."
  echo
  echo "| suite | test | direct | flowgate |"
  echo "|---|---|---|---|"
} > "$out"
declare -A pass
for module in client_test client_test5; do
  suite=$([ "$module" = client_test ] && echo 3.1.1 || echo 5.0)
  for t in $(python3 bench/paho_run.py "$dir" "$module" x 0 --list); do
    [[ -z "${ONLY:-}" || "$t" == *"$ONLY"* ]] || continue
    row="| $suite | $t |"
    for target in direct flowgate; do
      start_target "$target"; p=$P
      if (cd "$dir" && timeout "$TIMEOUT" python3 "$OLDPWD/bench/paho_run.py" "$dir" "$module" 127.0.0.1 "$p" "$t") \
          >"$work/$module-$t-$target.log" 2>&1; then
        row+=" pass |"; pass[$suite-$target]=$(( ${pass[$suite-$target]:-0} + 1 ))
      else
        row+=" FAIL |"
      fi
      stop_all
    done
    echo "$row" | tee -a "$out"
  done
done
{
  echo
  for suite in 3.1.1 5.0; do
    echo "- $suite: direct ${pass[$suite-direct]:-0}, flowgate ${pass[$suite-flowgate]:-0} passed"
  done
} | tee -a "$out"
echo "table: $out"
