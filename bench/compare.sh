#!/usr/bin/env bash
# The same MQTT load direct to Mosquitto, through flowgate (share mode) and
# through HAProxy (TCP mode), in one run, alternating targets.
#
#   bash bench/compare.sh            # ROUNDS=3 DURATION=5 RATE=5000 by default
#   FG_THREADS=1 bash bench/compare.sh   # flowgate with worker_threads = 1
#
# For each QoS (0, 1) x payload size (64, 1024 B): at saturation (--rate 0)
# for throughput, then at a fixed RATE msgs/s for latency; each measured run is
# DURATION seconds (the first second is warm-up), ROUNDS rounds, the targets'
# order rotated every round. Prints a markdown table and writes it, with the
# raw JSON lines, to bench/results/mqtt-YYYYMMDD-HHMM.{md,jsonl}.
# Everything listens on 127.0.0.1 on free ephemeral ports; every process
# started here is stopped on exit. Needs mosquitto, haproxy, python3, cargo.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
RATE=${RATE:-5000}
SUBSCRIBERS=${SUBSCRIBERS:-2}
PUBLISHERS=${PUBLISHERS:-1}
QOSES=${QOSES:-"0 1"}
SIZES=${SIZES:-"64 1024"}
# flowgate's worker_threads (both modes); empty: one per core
FG_THREADS=${FG_THREADS:-}
# the load tool's clients: 3.1.1 (default) or 5
CLIENTS=${CLIENTS:-3.1.1}
# every publish retained (RETAIN=1): the brokers' durable path
RETAIN=${RETAIN:-}
# which targets, in this order: direct flowgate dispatch dispatch-3.1.1 haproxy
# (the default), and the bundled broker with and without its store beside
# Mosquitto with persistence on:
#   TARGETS="embedded embedded-durable direct mosquitto-persist" RETAIN=1 bash bench/compare.sh
# dispatch mode with completion acknowledgement (`complete`, the subscribers
# publishing a result per message) beside dispatch without it:
#   TARGETS="dispatch dispatch-complete" QOSES=1 bash bench/compare.sh
# and flowgate inside Mosquitto 2.1.2 (the plugin) beside the bare 2.1.2 broker
# and the share-mode proxy in front of that broker:
#   TARGETS="mosquitto21 plugin flowgate21" bash bench/compare.sh
# PIN=1 runs those two brokers on CPU 0 and the load tool on CPU 1 (on 2 cores
# the scheduler's placement otherwise moves saturation figures by +-20%):
#   PIN=1 TARGETS="mosquitto21 plugin" bash bench/compare.sh
PIN=${PIN:-}
TARGETS=(${TARGETS:-direct flowgate dispatch dispatch-3.1.1 haproxy})

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export CARGO_TARGET_DIR=$TARGET_DIR

WORK=$(mktemp -d /tmp/flowgate-bench.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    echo "logs and configs kept in $WORK" >&2
}
trap cleanup EXIT

log() { echo "[compare] $*" >&2; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_port PORT PID NAME: until PORT accepts, or fail if PID died / 10 s passed
wait_port() {
    local i
    for i in $(seq 100); do
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then
            return 0
        fi
        kill -0 "$2" 2>/dev/null || { log "$3 exited; see $WORK"; return 1; }
        sleep 0.1
    done
    log "$3 does not listen on $1 after 10 s"
    return 1
}

# --- build ---------------------------------------------------------------
log "building flowgate (release) and the load tool into $TARGET_DIR"
cargo build --release --quiet
BENCH_BIN=$(cargo bench --no-run --bench mqtt_load --message-format=json 2>"$WORK/cargo-bench.log" |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "mqtt_load" and m.get("executable"):
        print(m["executable"])') || true
[[ -x $BENCH_BIN ]] || { log "no mqtt_load executable; see $WORK/cargo-bench.log"; exit 1; }
FLOWGATE_BIN=$TARGET_DIR/release/flowgate

# --- Mosquitto -----------------------------------------------------------
MOSQ_PORT=$(free_port)
cat >"$WORK/mosquitto.conf" <<EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
max_queued_messages 1000000
max_inflight_messages 0
log_dest stderr
log_type error
log_type warning
EOF
mosquitto -c "$WORK/mosquitto.conf" 2>"$WORK/mosquitto.log" &
MOSQ_PID=$!
PIDS+=("$MOSQ_PID")
wait_port "$MOSQ_PORT" "$MOSQ_PID" mosquitto

wanted() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }

# start_mosquitto NAME [SED_ARGS...]: another Mosquitto like the first, its
# config passed through `sed SED_ARGS`, on a free port; sets STARTED_PORT and
# STARTED_PID
start_mosquitto() {
    local name=$1
    shift
    STARTED_PORT=$(free_port)
    sed -e "s/^listener $MOSQ_PORT /listener $STARTED_PORT /" "$@" "$WORK/mosquitto.conf" >"$WORK/$name.conf"
    mosquitto -c "$WORK/$name.conf" 2>"$WORK/$name.log" &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_port "$STARTED_PORT" "$STARTED_PID" "$name"
}

# start_flowgate NAME CONFIG: runs flowgate on CONFIG; sets FG_STARTED_PID and
# FG_STARTED_ADDR
start_flowgate() {
    "$FLOWGATE_BIN" run --config "$2" --ready-file "$WORK/ready-$1.json" --drain-delay 0s \
        >"$WORK/flowgate-$1.out" 2>"$WORK/flowgate-$1.log" &
    FG_STARTED_PID=$!
    PIDS+=("$FG_STARTED_PID")
    for _ in $(seq 100); do
        [[ -s $WORK/ready-$1.json ]] && break
        kill -0 "$FG_STARTED_PID" 2>/dev/null || { log "flowgate ($1) exited; see $WORK/flowgate-$1.log"; exit 1; }
        sleep 0.1
    done
    FG_STARTED_ADDR=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mqtt"])' "$WORK/ready-$1.json")
}

# --- flowgate (share mode) -------------------------------------------------
cat >"$WORK/flowgate.toml" <<EOF
node_id = "bench"
$([[ -n $FG_THREADS ]] && echo "worker_threads = $FG_THREADS")
[admin]
listen = "127.0.0.1:0"
[mqtt]
listen = "127.0.0.1:0"
upstream = "mqtt://127.0.0.1:$MOSQ_PORT"
mode = "share"
[[instance]]
name = "bench"
match = { client_id = "bench-replica" }
EOF
start_flowgate share "$WORK/flowgate.toml"
FG_PID=$FG_STARTED_PID FG_ADDR=$FG_STARTED_ADDR
FG_ADMIN=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' "$WORK/ready-share.json")

# --- flowgate (dispatch mode), in front of a second, identical Mosquitto ----
# (its persistent upstream session subscribes bench/# and would otherwise
# receive, and make the broker queue, every other target's messages)
start_mosquitto mosquitto-2
MOSQ2_PORT=$STARTED_PORT MOSQ2_PID=$STARTED_PID
sed -e 's/mode = "share"/mode = "dispatch"/' -e 's/node_id = "bench"/node_id = "benchd"/' \
    -e "s/127.0.0.1:$MOSQ_PORT/127.0.0.1:$MOSQ2_PORT/" \
    "$WORK/flowgate.toml" >"$WORK/flowgate-dispatch.toml"
start_flowgate dispatch "$WORK/flowgate-dispatch.toml"
FGD_PID=$FG_STARTED_PID FGD_ADDR=$FG_STARTED_ADDR

# --- flowgate (dispatch mode, 3.1.1 upstream session), a third Mosquitto ------
# (the upstream session as it was before MQTT 5 upstream, in the same run)
start_mosquitto mosquitto-3
MOSQ3_PORT=$STARTED_PORT MOSQ3_PID=$STARTED_PID
sed -e "s/127.0.0.1:$MOSQ2_PORT\"/127.0.0.1:$MOSQ3_PORT\"\nupstream_protocol = \"3.1.1\"/" \
    -e 's/node_id = "benchd"/node_id = "benchd3"/' \
    "$WORK/flowgate-dispatch.toml" >"$WORK/flowgate-dispatch3.toml"
start_flowgate dispatch3 "$WORK/flowgate-dispatch3.toml"
FGD3_PID=$FG_STARTED_PID FGD3_ADDR=$FG_STARTED_ADDR

# --- flowgate (dispatch mode) with completion acknowledgement, a fourth Mosquitto
# (the load tool's subscribers publish a result done/{publisher} per message)
MOSQ4_PID=$MOSQ_PID FGDC_PID=$MOSQ_PID
if wanted dispatch-complete; then
    start_mosquitto mosquitto-4
    MOSQ4_PORT=$STARTED_PORT MOSQ4_PID=$STARTED_PID
    sed -e "s/127.0.0.1:$MOSQ2_PORT/127.0.0.1:$MOSQ4_PORT/" -e 's/node_id = "benchd"/node_id = "benchdc"/' \
        "$WORK/flowgate-dispatch.toml" >"$WORK/flowgate-dispatch-complete.toml"
    echo 'complete = { topic = "done/#", correlate = "topic:1" }' >>"$WORK/flowgate-dispatch-complete.toml"
    start_flowgate dispatch-complete "$WORK/flowgate-dispatch-complete.toml"
    FGDC_PID=$FG_STARTED_PID FGDC_ADDR=$FG_STARTED_ADDR
fi

# --- flowgate on its bundled broker (dispatch), store off and on ----------------
EMB_PID=$MOSQ_PID EMBD_PID=$MOSQ_PID MOSQP_PID=$MOSQ_PID
if wanted embedded || wanted embedded-durable; then
    sed -e "s|upstream = \"mqtt://127.0.0.1:$MOSQ_PORT\"|upstream = \"embedded\"|" \
        -e 's/mode = "share"/mode = "dispatch"/' -e 's/node_id = "bench"/node_id = "benche"/' \
        "$WORK/flowgate.toml" >"$WORK/flowgate-embedded.toml"
    { echo 'data_dir = ""'; cat "$WORK/flowgate-embedded.toml"; } >"$WORK/flowgate-embedded-off.toml"
    { echo "data_dir = \"$WORK/store\""; cat "$WORK/flowgate-embedded.toml"; } >"$WORK/flowgate-embedded-on.toml"
    start_flowgate embedded "$WORK/flowgate-embedded-off.toml"
    EMB_PID=$FG_STARTED_PID EMB_ADDR=$FG_STARTED_ADDR
    start_flowgate embedded-durable "$WORK/flowgate-embedded-on.toml"
    EMBD_PID=$FG_STARTED_PID EMBD_ADDR=$FG_STARTED_ADDR
fi

# --- Mosquitto with persistence on (its default autosave) ------------------------
if wanted mosquitto-persist; then
    mkdir -p "$WORK/mosquitto-persist"
    start_mosquitto mosquitto-persist -e 's/^persistence false/persistence true/' \
        -e "\$a persistence_location $WORK/mosquitto-persist/"
    MOSQP_PORT=$STARTED_PORT MOSQP_PID=$STARTED_PID
fi

# --- Mosquitto 2.1.2: bare, with the flowgate plugin, and behind the proxy ----
MOSQ21_PID=$MOSQ_PID PLUGIN_PID=$MOSQ_PID FG21_PID=$MOSQ_PID
if wanted mosquitto21 || wanted plugin || wanted flowgate21; then
    MOSQ21_BIN=$(bash tests/mosquitto21/build.sh)
    log "building the plugin (release)"
    cargo build --release --quiet -p flowgate-mosquitto
    MOSQ21_PORT=$(free_port)
    sed -e "s/^listener $MOSQ_PORT /listener $MOSQ21_PORT /" "$WORK/mosquitto.conf" >"$WORK/mosquitto21.conf"
    pin_broker=(); [[ -n $PIN ]] && pin_broker=(taskset -c 0)
    "${pin_broker[@]}" "$MOSQ21_BIN" -c "$WORK/mosquitto21.conf" 2>"$WORK/mosquitto21.log" &
    MOSQ21_PID=$!
    PIDS+=("$MOSQ21_PID")
    wait_port "$MOSQ21_PORT" "$MOSQ21_PID" mosquitto21
    # the same broker, the same settings, the plugin loaded: the load tool's
    # subscribers connect as replicas of one instance (as through flowgate)
    # Mosquitto started as root runs as user mosquitto: it must read the TOML
    chmod a+rx "$WORK"
    PLUGIN_PORT=$(free_port)
    cat >"$WORK/plugin.toml" <<EOF2
node_id = "benchp"
[admin]
listen = "127.0.0.1:$(free_port)"
[[instance]]
name = "bench"
match = { client_id = "bench-replica" }
EOF2
    { sed -e "s/^listener $MOSQ_PORT /listener $PLUGIN_PORT /" "$WORK/mosquitto.conf"
      echo "plugin $TARGET_DIR/release/libflowgate_mosquitto.so"
      echo "plugin_opt_config $WORK/plugin.toml"; } >"$WORK/mosquitto21-plugin.conf"
    "${pin_broker[@]}" "$MOSQ21_BIN" -c "$WORK/mosquitto21-plugin.conf" 2>"$WORK/mosquitto21-plugin.log" &
    PLUGIN_PID=$!
    PIDS+=("$PLUGIN_PID")
    wait_port "$PLUGIN_PORT" "$PLUGIN_PID" mosquitto21-plugin
    sed -e "s/127.0.0.1:$MOSQ_PORT/127.0.0.1:$MOSQ21_PORT/" -e 's/node_id = "bench"/node_id = "bench21"/' \
        "$WORK/flowgate.toml" >"$WORK/flowgate21.toml"
    start_flowgate share21 "$WORK/flowgate21.toml"
    FG21_PID=$FG_STARTED_PID FG21_ADDR=$FG_STARTED_ADDR
fi

# --- HAProxy (TCP mode) ----------------------------------------------------
HA_PORT=$(free_port)
cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn 1000
defaults
    mode tcp
    option tcp-smart-accept
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend mqtt
    bind 127.0.0.1:$HA_PORT
    default_backend mosquitto
backend mosquitto
    server mosq 127.0.0.1:$MOSQ_PORT
EOF
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
HA_PID=$!
PIDS+=("$HA_PID")
wait_port "$HA_PORT" "$HA_PID" haproxy

log "mosquitto 127.0.0.1:$MOSQ_PORT (pid $MOSQ_PID), flowgate $FG_ADDR (pid $FG_PID, admin $FG_ADMIN), haproxy 127.0.0.1:$HA_PORT (pid $HA_PID)"

# --- runs --------------------------------------------------------------------
STAMP=$(date +%Y%m%d-%H%M)
mkdir -p bench/results
JSONL=bench/results/mqtt-$STAMP.jsonl
MD=bench/results/mqtt-$STAMP.md
: >"$JSONL"

run_one() { # TARGET QOS SIZE RATE ROUND
    local target=$1 qos=$2 size=$3 rate=$4 round=$5 addr extra=() proxy_cpu=() mosq_pid=$MOSQ_PID
    case $target in
        direct) addr=127.0.0.1:$MOSQ_PORT; extra=(--share --sub-id-unique) ;;
        flowgate) addr=$FG_ADDR; proxy_cpu=(--cpu "proxy=$FG_PID") ;;
        dispatch) addr=$FGD_ADDR; proxy_cpu=(--cpu "proxy=$FGD_PID"); mosq_pid=$MOSQ2_PID ;;
        dispatch-3.1.1) addr=$FGD3_ADDR; proxy_cpu=(--cpu "proxy=$FGD3_PID"); mosq_pid=$MOSQ3_PID ;;
        dispatch-complete) addr=$FGDC_ADDR; extra=(--complete); proxy_cpu=(--cpu "proxy=$FGDC_PID"); mosq_pid=$MOSQ4_PID ;;
        haproxy) addr=127.0.0.1:$HA_PORT; extra=(--share --sub-id-unique); proxy_cpu=(--cpu "proxy=$HA_PID") ;;
        embedded) addr=$EMB_ADDR; proxy_cpu=(--cpu "proxy=$EMB_PID"); mosq_pid=$EMB_PID ;;
        embedded-durable) addr=$EMBD_ADDR; proxy_cpu=(--cpu "proxy=$EMBD_PID"); mosq_pid=$EMBD_PID ;;
        mosquitto-persist) addr=127.0.0.1:$MOSQP_PORT; extra=(--share --sub-id-unique); mosq_pid=$MOSQP_PID ;;
        mosquitto21) addr=127.0.0.1:$MOSQ21_PORT; extra=(--share --sub-id-unique); mosq_pid=$MOSQ21_PID ;;
        plugin) addr=127.0.0.1:$PLUGIN_PORT; mosq_pid=$PLUGIN_PID ;;
        flowgate21) addr=$FG21_ADDR; proxy_cpu=(--cpu "proxy=$FG21_PID"); mosq_pid=$MOSQ21_PID ;;
    esac
    [[ -n $RETAIN ]] && extra+=(--retain)
    local line
    local pin_tool=(); [[ -n $PIN ]] && pin_tool=(taskset -c 1)
    if ! line=$("${pin_tool[@]}" "$BENCH_BIN" --target "$addr" --label "$target" --qos "$qos" --size "$size" \
        --rate "$rate" --duration "$DURATION" --subscribers "$SUBSCRIBERS" \
        --publishers "$PUBLISHERS" "${extra[@]}" --cpu "mosquitto=$mosq_pid" "${proxy_cpu[@]}" \
        $([[ $CLIENTS == 5 ]] && echo --v5) \
        2>>"$WORK/mqtt_load.log"); then
        log "mqtt_load failed: $target qos=$qos size=$size rate=$rate round=$round (see $WORK/mqtt_load.log)"
        line="{\"target_label\":\"$target\",\"qos\":$qos,\"size\":$size,\"rate_target\":$rate,\"failed\":true}"
    fi
    for pid in "$MOSQ_PID" "$MOSQ2_PID" "$MOSQ3_PID" "$FG_PID" "$FGD_PID" "$FGD3_PID" "$HA_PID" \
        "$EMB_PID" "$EMBD_PID" "$MOSQP_PID" "$MOSQ21_PID" "$PLUGIN_PID" "$FG21_PID" "$MOSQ4_PID" "$FGDC_PID"; do
        kill -0 "$pid" 2>/dev/null || { log "process $pid died (see $WORK)"; exit 1; }
    done
    line=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["round"]=int(sys.argv[2]); print(json.dumps(d))' "$line" "$round")
    echo "$line" >>"$JSONL"
    log "$line"
    sleep 0.5
}

N=${#TARGETS[@]}
for qos in $QOSES; do
    for size in $SIZES; do
        for rate in 0 "$RATE"; do
            for round in $(seq "$ROUNDS"); do
                for i in $(seq 0 $((N - 1))); do # rotate the order each round
                    run_one "${TARGETS[$(((i + round - 1) % N))]}" "$qos" "$size" "$rate" "$round"
                done
            done
        done
    done
done

# --- report ------------------------------------------------------------------
python3 - "$JSONL" "$ROUNDS" "$DURATION" "$RATE" "$SUBSCRIBERS" "$PUBLISHERS" "$PIN" >"$MD" <<'EOF'
import json, statistics, sys
path, rounds, duration, rate, subs, pubs, pinned = sys.argv[1:]
runs = [json.loads(l) for l in open(path)]
def pick(qos, size, rate_target, target):
    return [r for r in runs if r["qos"] == qos and r["size"] == size
            and r["rate_target"] == rate_target and r["target_label"] == target]
def med(rs, key, sub=None):
    vals = [(r.get(key) or {}).get(sub) if sub else r.get(key) for r in rs if not r.get("failed")]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None
def lost(rs):
    if any(r.get("failed") for r in rs):
        return "FAILED"
    return str(sum(r["lost"] for r in rs))
def f(v, fmt="{:,.0f}"):
    return "n/a" if v is None else fmt.format(v)
cases = sorted({(r["qos"], r["size"]) for r in runs})
print(f"MQTT {runs[0].get('protocol', '3.1.1')} clients. Saturation (`--rate 0`), {subs} shared subscribers, {pubs} publisher(s), "
      f"{duration} s per run (1 s warm-up), median of {rounds} alternating rounds; "
      f"latency at a fixed {int(rate):,} msg/s. Lost = sent - received after drain, summed over all runs of that row.\n")
print("target flowgate = share mode; dispatch = flowgate in dispatch mode (MQTT 5 upstream session; a second process, its own broker); dispatch-3.1.1 = the same with `upstream_protocol = \"3.1.1\"` (a third).\n")
if any(r["target_label"] in ("mosquitto21", "plugin", "flowgate21") for r in runs):
    print(("Brokers on CPU 0, the load tool on CPU 1 (`PIN=1`). " if pinned else "") + "mosquitto21 = Mosquitto 2.1.2 built from ../shared/vendor (clients share with `$share/` themselves, as direct); plugin = the same broker with flowgate inside it (`flowgate-mosquitto`, release build), the load tool's subscribers connecting as replicas of one instance; flowgate21 = the share-mode proxy in front of mosquitto21; `vs off` here = against mosquitto21.\n")
if any(r["target_label"].startswith(("embedded", "mosquitto-")) for r in runs):
    print("embedded = flowgate in dispatch mode on its bundled broker, `data_dir = \"\"` (keeps nothing); embedded-durable = the same with its store on (a process of its own); mosquitto-persist = Mosquitto with `persistence true` (default autosave); `vs off` = embedded-durable / embedded, mosquitto-persist / direct." + (" Every publish retained (`RETAIN=1`)." if any(r.get("retain") for r in runs) else "") + "\n")
print("| QoS | size | target | msgs/s (sat) | vs direct | vs haproxy | vs off | p50 µs @rate | p99 µs @rate | lost (sat / rate) | CPU % tool / mosquitto / proxy (sat) |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
OFF = {"embedded-durable": "embedded", "mosquitto-persist": "direct", "plugin": "mosquitto21",
       "flowgate21": "mosquitto21"}
for qos, size in cases:
    targets = [t for t in ("direct", "flowgate", "dispatch", "dispatch-3.1.1", "haproxy", "embedded",
                           "embedded-durable", "mosquitto-persist", "mosquitto21", "plugin", "flowgate21")
               if pick(qos, size, 0, t)]
    sat = {t: med(pick(qos, size, 0, t), "msgs_per_s") for t in targets}
    for t in targets:
        s, fixed = pick(qos, size, 0, t), pick(qos, size, int(rate), t)
        ratio = lambda base: f(sat[t] / sat[base], "{:.2f}x") if sat[t] and sat.get(base) else "n/a"
        cpu = " / ".join(f(med(s, "cpu_pct", k)) for k in ("tool", "mosquitto", "proxy")) if t != "direct" \
            else " / ".join(f(med(s, "cpu_pct", k)) for k in ("tool", "mosquitto")) + " / -"
        print(f"| {qos} | {size} B | {t} | {f(sat[t])} | {ratio('direct') if t != 'direct' else '1.00x'} | "
              f"{ratio('haproxy') if t in ('flowgate', 'dispatch', 'dispatch-3.1.1') else '-'} | "
              f"{ratio(OFF[t]) if t in OFF else '-'} | {f(med(fixed, 'p50_us'))} | "
              f"{f(med(fixed, 'p99_us'))} | {lost(s)} / {lost(fixed)} | {cpu} |")
EOF
# flowgate's own counters after every run: errors, rewrites, connections
python3 -c 'import sys, urllib.request; print(urllib.request.urlopen("http://" + sys.argv[1] + "/metrics", timeout=5).read().decode())' \
    "$FG_ADMIN" >"$WORK/flowgate-metrics.txt" || log "cannot read flowgate /metrics"
{
    echo
    echo "flowgate $(git describe --always --dirty 2>/dev/null || echo '?') (worker_threads ${FG_THREADS:-one per core}), $(nproc) CPUs," \
        "$(mosquitto -h 2>/dev/null | head -1 || true), $(haproxy -v | head -1 | cut -d' ' -f1-3)."
    echo "flowgate counters at the end (\`/metrics\`):"
    echo '```'
    grep -E '^flowgate_mqtt_(errors|rewrites|connections)_total' "$WORK/flowgate-metrics.txt" || echo "(no error, rewrite or connection samples)"
    echo '```'
    if wanted embedded-durable; then
        python3 -c 'import json,sys,urllib.request; a=json.load(open(sys.argv[1]))["admin"]; print(urllib.request.urlopen("http://"+a+"/metrics", timeout=5).read().decode())' \
            "$WORK/ready-embedded-durable.json" >"$WORK/embedded-durable-metrics.txt" || log "cannot read embedded-durable /metrics"
        echo "embedded-durable's store at the end (commits batch the changes; the histogram is how long a change waits to be on disk):"
        echo '```'
        grep -E '^flowgate_broker_(store|retained|session|queued)' "$WORK/embedded-durable-metrics.txt" | grep -v '_bucket' || true
        grep -E '^flowgate_broker_store_commit_seconds_bucket' "$WORK/embedded-durable-metrics.txt" || true
        echo '```'
    fi
} >>"$MD"
cat "$MD"
log "table: $MD, raw runs: $JSONL"
