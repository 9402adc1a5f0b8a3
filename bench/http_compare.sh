#!/usr/bin/env bash
# HTTP balancer benchmark: the same two replicas (nginx answering a small
# body) behind flowgate and behind nginx as the balancer, same load tool
# (wrk), alternating rounds in one run; medians and ratios on stdout and in
# bench/results/. Each balancer is a process of its own next to the replicas'
# nginx (LAYOUT=shared runs the nginx balancer inside the replicas' worker
# processes instead, as the first runs of this script did). A second flowgate
# ("flowgate-routes") runs with the public route check on (the default
# `block_admin`): the replicas serve a Node-RED-like `GET /flows` with 20
# `http in` routes, so each request is matched as on a real instance.
# KEYS=1 adds key affinity: every request carries `x-device: d{0..999}`
# (a wrk script), and two more balancers take it: flowgate with
# `balance = "key-hash"`, `key = "header:x-device"` ("flowgate-keyhash") and
# nginx with `hash $http_x_device consistent` ("nginx-hash").
# Usage: bash bench/http_compare.sh   (ROUNDS=5 DURATION=8 CONNS=50 LAYOUT=separate KEYS=)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
LAYOUT=${LAYOUT:-separate}
DURATION=${DURATION:-8}
CONNS=${CONNS:-50}
KEYS=${KEYS:-}
for tool in nginx wrk python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install nginx-light wrk)"; exit 1; }
done
cargo build --release --quiet
work=$(mktemp -d)
chmod 755 "$work"  # nginx workers (nobody) read the flows files in it
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
R1=$(port); R2=$(port); NG=$(port); NH=$(port)

# what the replicas' "flows" publish: 20 http in routes, /api/:id among them
python3 - "$work" <<'PY'
import json, sys
nodes = [{"id": "t", "type": "tab"}]
for i in range(19):
    nodes.append({"id": f"n{i}", "type": "http in", "z": "t", "url": f"/route{i}/:id", "method": "get"})
nodes.append({"id": "api", "type": "http in", "z": "t", "url": "/api", "method": "get"})
json.dump({"rev": "bench", "flows": nodes}, open(f"{sys.argv[1]}/flows.json", "w"))
json.dump({"httpNodeRoot": "/"}, open(f"{sys.argv[1]}/settings.json", "w"))
PY

# nginx configs: the replicas, and nginx as the balancer (2 worker processes each)
nginx_conf() { # dir, servers...
  mkdir -p "$1"
  cat > "$1/nginx.conf" <<CONF
worker_processes 2;
pid $1/nginx.pid;
error_log $1/error.log warn;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000;
  $2
}
CONF
}
nr="location = /flows { default_type application/json; alias $work/flows.json; }
    location = /settings { default_type application/json; alias $work/settings.json; }"
replicas="server { listen 127.0.0.1:$R1; $nr location / { return 200 \"replica-1 ok\\n\"; } }
  server { listen 127.0.0.1:$R2; $nr location / { return 200 \"replica-2 ok\\n\"; } }"
balancer="upstream replicas { server 127.0.0.1:$R1; server 127.0.0.1:$R2; least_conn; keepalive 64; }
  server {
    listen 127.0.0.1:$NG;
    location / {
      proxy_pass http://replicas;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }"
if [ -n "$KEYS" ]; then
  nginx_conf "$work/balancer-hash" "upstream replicas { server 127.0.0.1:$R1; server 127.0.0.1:$R2; hash \$http_x_device consistent; keepalive 64; }
  server {
    listen 127.0.0.1:$NH;
    location / {
      proxy_pass http://replicas;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }"
  nginx -c "$work/balancer-hash/nginx.conf" -p "$work/balancer-hash" & pids+=($!)
  cat > "$work/keys.lua" <<'LUA'
math.randomseed(os.time())
request = function()
  wrk.headers["x-device"] = "d" .. math.random(0, 999)
  return wrk.format(nil)
end
LUA
fi
if [ "$LAYOUT" = shared ]; then
  nginx_conf "$work/replicas" "$replicas
  $balancer"
else
  nginx_conf "$work/replicas" "$replicas"
  nginx_conf "$work/balancer" "$balancer"
  nginx -c "$work/balancer/nginx.conf" -p "$work/balancer" & pids+=($!)
fi
nginx -c "$work/replicas/nginx.conf" -p "$work/replicas" & pids+=($!)

cat > "$work/flowgate.toml" <<CONF
node_id = "bench"
[admin]
listen = "127.0.0.1:0"
[mqtt]
listen = "127.0.0.1:0"
upstream = "mqtt://127.0.0.1:1"
mode = "share"
[[instance]]
name = "web"
match = { client_id = "web" }
[instance.http]
listen = "127.0.0.1:0"
replicas = ["127.0.0.1:$R1", "127.0.0.1:$R2"]
block_admin = false
CONF
RUST_LOG=warn target/release/flowgate run --config "$work/flowgate.toml" --ready-file "$work/ready.json" --drain-delay 0s >/dev/null & pids+=($!)
sed -e '/^block_admin = false$/d' "$work/flowgate.toml" > "$work/flowgate-routes.toml"
RUST_LOG=info target/release/flowgate run --config "$work/flowgate-routes.toml" --ready-file "$work/ready-routes.json" --drain-delay 0s >"$work/routes.log" 2>&1 & pids+=($!)
if [ -n "$KEYS" ]; then
  sed -e 's/^block_admin = false$/block_admin = false\nbalance = "key-hash"\nkey = "header:x-device"/' "$work/flowgate.toml" > "$work/flowgate-keyhash.toml"
  RUST_LOG=warn target/release/flowgate run --config "$work/flowgate-keyhash.toml" --ready-file "$work/ready-keyhash.json" --drain-delay 0s >/dev/null & pids+=($!)
  for _ in $(seq 100); do [ -s "$work/ready-keyhash.json" ] && break; sleep 0.1; done
  FK=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"][0])' "$work/ready-keyhash.json")
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$NH/" >/dev/null && curl -sf "http://$FK/" >/dev/null && break; sleep 0.1; done
  WRK_KEYS=(-s "$work/keys.lua")
else
  WRK_KEYS=()
fi
for _ in $(seq 100); do [ -s "$work/ready.json" ] && [ -s "$work/ready-routes.json" ] && break; sleep 0.1; done
FG=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"][0])' "$work/ready.json")
FR=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"][0])' "$work/ready-routes.json")
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$NG/" >/dev/null && curl -sf "http://$FG/" >/dev/null && curl -sf "http://$FR/api" >/dev/null && break; sleep 0.1; done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$FR/flows")" = 403 ] || { echo "flowgate-routes does not check routes"; exit 1; }
FRA=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' "$work/ready-routes.json")
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$FR/api")" = 200 ] || { echo "flowgate-routes does not pass /api:"; cat "$work/routes.log"; exit 1; }

run() { # name url -> "rps p50_ms p99_ms errors"
  wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "${WRK_KEYS[@]}" "$2" 2>/dev/null | python3 -c '
import re,sys
t=sys.stdin.read()
def ms(v,u): return float(v)*{"us":0.001,"ms":1,"s":1000}[u]
rps=float(re.search(r"Requests/sec:\s+([\d.]+)",t).group(1))
lat={m.group(1):ms(m.group(2),m.group(3)) for m in re.finditer(r"\s(50|99)%\s+([\d.]+)(us|ms|s)",t)}
err=re.search(r"Non-2xx or 3xx responses: (\d+)",t)
sock=re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",t)
e=(int(err.group(1)) if err else 0)+(sum(map(int,sock.groups())) if sock else 0)
p50=lat.get("50",0); p99=lat.get("99",0)
print(f"{rps:.0f} {p50:.3f} {p99:.3f} {e}")'
}
declare -A res
targets=(nginx flowgate flowgate-routes)
[ -n "$KEYS" ] && targets+=(nginx-hash flowgate-keyhash)
for r in $(seq "$ROUNDS"); do
  for target in "${targets[@]}"; do
    url="http://127.0.0.1:$NG/api"; [ "$target" = flowgate ] && url="http://$FG/api"
    [ "$target" = flowgate-routes ] && url="http://$FR/api"
    [ "$target" = nginx-hash ] && url="http://127.0.0.1:$NH/api"
    [ "$target" = flowgate-keyhash ] && url="http://$FK/api"
    res[$target]+="$(run "$target" "$url");"
  done
done
median() { python3 -c 'import sys,statistics; v=[l.split() for l in sys.argv[1].split(";") if l]; print(" ".join(f"{statistics.median(float(x[i]) for x in v):.3f}".rstrip("0").rstrip(".") for i in range(4)))' "$1"; }
read -r n_rps n_p50 n_p99 n_err <<<"$(median "${res[nginx]}")"
read -r f_rps f_p50 f_p99 f_err <<<"$(median "${res[flowgate]}")"
read -r r_rps r_p50 r_p99 r_err <<<"$(median "${res[flowgate-routes]}")"
mkdir -p bench/results
out="bench/results/http-$(date +%Y%m%d-%H%M).md"
{
  echo "HTTP, 2 replicas (nginx \`return 200\`), layout $LAYOUT, wrk -t2 -c$CONNS -d${DURATION}s, medians of $ROUNDS alternating rounds, $(nproc) cores"
  echo
  echo "| balancer | req/s | p50 ms | p99 ms | errors |"
  echo "|---|---|---|---|---|"
  echo "| nginx $(nginx -v 2>&1 | sed 's/.*\///') | $n_rps | $n_p50 | $n_p99 | $n_err |"
  echo "| flowgate | $f_rps | $f_p50 | $f_p99 | $f_err |"
  echo "| flowgate, route check on | $r_rps | $r_p50 | $r_p99 | $r_err |"
  if [ -n "$KEYS" ]; then
    read -r nh_rps nh_p50 nh_p99 nh_err <<<"$(median "${res[nginx-hash]}")"
    read -r k_rps k_p50 k_p99 k_err <<<"$(median "${res[flowgate-keyhash]}")"
    echo "| nginx, \`hash \$http_x_device consistent\` | $nh_rps | $nh_p50 | $nh_p99 | $nh_err |"
    echo "| flowgate, \`key-hash\` on \`header:x-device\` | $k_rps | $k_p50 | $k_p99 | $k_err |"
    echo
    echo "every request carries x-device: d0..d999 (wrk script); the least-inflight rows above carry it too"
    python3 -c "print(f'key-hash/least-inflight: req/s x{$k_rps/$f_rps:.2f}; flowgate key-hash/nginx hash: req/s x{$k_rps/$nh_rps:.2f}, p99 x{$k_p99/$nh_p99:.2f}')"
  fi
  echo
  python3 -c "print(f'flowgate/nginx: req/s x{$f_rps/$n_rps:.2f}, p99 x{$f_p99/$n_p99:.2f}')"
  python3 -c "print(f'route check on/off: req/s x{$r_rps/$f_rps:.2f}, p99 x{$r_p99/$f_p99:.2f}; on/nginx: req/s x{$r_rps/$n_rps:.2f}')"
  echo
  echo "raw rounds (rps p50 p99 errors): nginx ${res[nginx]} flowgate ${res[flowgate]} flowgate-routes ${res[flowgate-routes]}${KEYS:+ nginx-hash ${res[nginx-hash]} flowgate-keyhash ${res[flowgate-keyhash]}}"
} | tee "$out"
