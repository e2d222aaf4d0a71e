#!/usr/bin/env bash
# Same-run throughput of several floodgate builds: for each round, each build in turn runs
# `ingest` and `serve` on a fresh data directory while floodgate-loadgen (closed loop, 32
# connections, 100-event batches of fresh booking.requested) saturates it, and then the
# bare hyper server (`floodgate-bare`: reads the body, answers 200, nothing else) takes the
# same load, as the ceiling; prints one JSON line per run (with the server's peak RSS) and
# the median per (build, role). Only ever 127.0.0.1.
#
#   bench/scripts/throughput.sh [-r ROUNDS] [-d SECONDS] NAME=DIR [NAME=DIR …]
#
# DIR holds that build's `floodgate`; the loadgen beside this checkout's release build is
# used for every build (the same client for all). CONFIG=FILE runs every server with
# `--config FILE` (e.g. `[ingest] dedupe_window_ms = 0`, as the issue's figures are taken).
# Example:
#   bench/scripts/throughput.sh before=/work/bin-before after=target/release
set -euo pipefail
rounds=3
duration=20
while getopts "r:d:" opt; do
  case $opt in
    r) rounds=$OPTARG ;;
    d) duration=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
here=$(cd "$(dirname "$0")/../.." && pwd)
loadgen=${LOADGEN:-$here/target/release/floodgate-loadgen}
bare=${BARE:-$here/target/release/floodgate-bare}
work=$(mktemp -d /tmp/fg-throughput.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=18181
results=$work/results.jsonl
# The load against the server on $port, whose pid is $1; prints the loadgen's JSON line
# with the server's peak RSS (VmHWM, bytes) added.
load() {
  local line hwm
  line=$("$loadgen" --url http://127.0.0.1:$port/v1/events --duration "$duration" --warmup 3 | tail -1)
  hwm=$(awk '/^VmHWM:/ {print $2 * 1024}' "/proc/$1/status" 2>/dev/null || echo 0)
  echo "${line%\}},\"peak_rss_bytes\":${hwm:-0}}"
}
for round in $(seq 1 "$rounds"); do
  for build in "$@"; do
    name=${build%%=*}
    bin=${build#*=}/floodgate
    for role in ingest serve; do
      data=$work/data-$name-$role-$round
      "$bin" "$role" --data-dir "$data" --listen 127.0.0.1:$port ${CONFIG:+--config "$CONFIG"} \
        >"$work/server.log" 2>&1 &
      server=$!
      for _ in $(seq 1 100); do
        curl -sf http://127.0.0.1:$port/healthz >/dev/null 2>&1 && break
        sleep 0.1
      done
      line=$(load $server)
      kill -TERM $server
      wait $server || true
      rm -rf "$data"
      echo "{\"build\":\"$name\",\"role\":\"$role\",\"round\":$round,\"run\":$line}" | tee -a "$results"
    done
  done
  if [ -x "$bare" ]; then
    "$bare" --listen 127.0.0.1:$port >"$work/bare.log" 2>&1 &
    server=$!
    for _ in $(seq 1 100); do
      curl -s http://127.0.0.1:$port/ >/dev/null 2>&1 && break
      sleep 0.1
    done
    line=$(load $server)
    kill -TERM $server
    wait $server || true
    echo "{\"build\":\"hyper\",\"role\":\"bare\",\"round\":$round,\"run\":$line}" | tee -a "$results"
  fi
done
python3 - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
keys = sorted({(r["build"], r["role"]) for r in runs}, key=lambda k: (k[1], k[0]))
for b, role in keys:
    rs = [r["run"] for r in runs if r["build"] == b and r["role"] == role]
    eps = statistics.median(r["events_per_sec"] for r in rs)
    p99 = statistics.median(r["p99_ms"] for r in rs)
    failed = sum(r["requests_failed"] for r in rs)
    rss = max(r.get("peak_rss_bytes", 0) for r in rs)
    print(json.dumps({"median": True, "build": b, "role": role, "runs": len(rs),
                      "events_per_sec": round(eps), "p99_ms": round(p99, 1), "requests_failed": failed,
                      "peak_rss_mib": round(rss / 2**20, 1)}))
PY
