#!/usr/bin/env bash
# flowgate's memory: RSS idle (default config with the embedded broker, and
# with a Mosquitto upstream), then with N idle MQTT connections held open,
# each kind on a fresh flowgate: replicas of one instance (dispatch mode) and
# pass-through clients. Usage: bash bench/footprint.sh   (N=3000; the
# open-file limit must allow N+100 for replicas and 2N+100 for pass-through)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-3000}
# pass-through holds two sockets per client (client and upstream)
need=$((2 * N + 100))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$need" ]; then
  echo "N=$N needs an open-file limit of $need; the hard limit here is $(ulimit -Hn)"
  exit 1
fi
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$need" ] || ulimit -n "$need"
cargo build --release --quiet
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; pkill -P $$ 2>/dev/null || true; cp "$work"/fg.log /tmp/fp/last-fg.log 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss() { awk '/VmRSS/{printf "%.1f", $2/1024}' "/proc/$1/status"; }
ready() { for _ in $(seq 100); do [ -s "$1" ] && return 0; sleep 0.1; done; echo "flowgate did not start"; exit 1; }

cat > "$work/hold.py" <<'PY'
# opens N MQTT 3.1.1 connections (CONNECT, CONNACK checked) and holds them
import socket, struct, sys
host, port, n, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
socks = []
for i in range(n):
    cid = f"{prefix}{i}".encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack(">H", 600) + struct.pack(">H", len(cid)) + cid
    s = socket.create_connection((host, port))
    s.sendall(b"\x10" + bytes([len(body)]) + body)
    socks.append(s)
    if len(socks) % 200 == 0 or len(socks) == n:
        for t in socks[-(len(socks) % 200 or 200):]:
            t.settimeout(30)
            r = t.recv(4)
            assert r[:1] == b"\x20" and r[3:4] == b"\x00", r
print("held", len(socks), flush=True)
sys.stdin.read()
PY

# idle, default config (embedded broker), own ports
sed -e 's/^listen = "127.0.0.1:1883"/listen = "127.0.0.1:0"/' -e 's/^listen = "127.0.0.1:9090"/listen = "127.0.0.1:0"/' \
  config/flowgate.toml > "$work/default.toml"
target/release/flowgate run --config "$work/default.toml" --ready-file "$work/r0.json" --drain-delay 0s >/dev/null 2>&1 & p=$!; pids+=($p)
ready "$work/r0.json"; sleep 1
echo "idle, default config (embedded broker): $(rss $p) MB"
kill $p; wait $p 2>/dev/null || true

MQ=$(port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\nlog_dest stderr\nlog_type error\n' "$MQ" > "$work/mosq.conf"
mosquitto -c "$work/mosq.conf" 2>"$work/mosq.log" & pids+=($!)
for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$MQ) 2>/dev/null && break; sleep 0.1; done
cat > "$work/fg.toml" <<CONF
node_id = "footprint"
[admin]
listen = "127.0.0.1:0"
[mqtt]
listen = "127.0.0.1:0"
upstream = "mqtt://127.0.0.1:$MQ"
mode = "dispatch"
[[instance]]
name = "line1"
match = { client_id_prefix = "replica-" }
CONF
hold() { # prefix label
  target/release/flowgate run --config "$work/fg.toml" --ready-file "$work/r.json" --drain-delay 0s >/dev/null 2>"$work/fg.log" & local p=$!
  pids+=($p); rm -f "$work/r.json" 2>/dev/null; ready "$work/r.json"; sleep 1
  local addr before after
  addr=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mqtt"])' "$work/r.json")
  before=$(rss $p)
  mkfifo "$work/in.$1"
  python3 "$work/hold.py" "${addr%:*}" "${addr#*:}" "$N" "$1" < "$work/in.$1" > "$work/held.$1" & local h=$!
  exec 9> "$work/in.$1"
  for _ in $(seq 300); do grep -q held "$work/held.$1" 2>/dev/null && break; sleep 0.5; done
  grep -q held "$work/held.$1" || { echo "could not hold $N connections"; cat "$work/held.$1"; exit 1; }
  sleep 2
  after=$(rss $p)
  echo "$N idle $2: $before -> $after MB ($(python3 -c "print(round(($after-$before)*1024/$N,1))") KB each)"
  exec 9>&-
  wait $h 2>/dev/null || true
  kill $p; wait $p 2>/dev/null || true
}
hold replica- "replicas of one instance (dispatch mode), Mosquitto upstream"
hold client- "pass-through clients, Mosquitto upstream"
