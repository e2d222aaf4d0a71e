#!/usr/bin/env bash
# Sustained `serve`: offers a constant rate, open loop, for a minute and reads every
# consumer's lag (records behind, summed over shards) from /metrics at 20, 40 and 60 s.
# A rate is sustained when each consumer's lag is bounded and not growing. Prints one JSON
# line per rate with the loadgen's figures (achieved, p50/p99/p999, server CPU), the lag
# samples and the server's peak RSS. Only ever 127.0.0.1.
#
#   bench/scripts/sustain.sh [-b DIR] [-d SECONDS] RATE [RATE …]
#
# DIR holds the `floodgate` to run (default: this checkout's target/release); the loadgen
# beside this checkout's release build is the client. CONFIG=FILE runs the server with
# `--config FILE` (e.g. `[ingest] dedupe_window_ms = 0`, as the issue's figures are taken).
# Example:
#   CONFIG=nodedupe.toml bench/scripts/sustain.sh 150000 200000
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bin_dir=$here/target/release
duration=62
while getopts "b:d:" opt; do
  case $opt in
    b) bin_dir=$OPTARG ;;
    d) duration=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
loadgen=${LOADGEN:-$here/target/release/floodgate-loadgen}
work=$(mktemp -d /tmp/fg-sustain.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=18182

# Each consumer's lag in records, summed over its shards: `consumer=N,…`.
lags() {
  curl -sf "http://127.0.0.1:$port/metrics" |
    awk '/^floodgate_processor_lag_records\{/ {
        c = $0; sub(/.*consumer="/, "", c); sub(/".*/, "", c); sum[c] += $NF }
      END { s = ""; for (c in sum) s = s (s == "" ? "" : ",") "\"" c "\":" sum[c]; print "{" s "}" }'
}

for rate in "$@"; do
  data=$work/data-$rate
  "$bin_dir/floodgate" serve --data-dir "$data" --listen 127.0.0.1:$port \
    ${CONFIG:+--config "$CONFIG"} >"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 1 100); do
    curl -sf http://127.0.0.1:$port/healthz >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$loadgen" --url http://127.0.0.1:$port/v1/events --rate-events "$rate" \
    --duration "$duration" --warmup 2 --server-pid "$server" --out "$work/report-$rate" \
    >"$work/loadgen-$rate.log" 2>&1 &
  client=$!
  samples=()
  for at in 20 40 60; do
    sleep 20
    samples+=("{\"at_s\":$at,\"lag_records\":$(lags)}")
  done
  wait $client || true
  hwm=$(awk '/^VmHWM:/ {print $2 * 1024}' "/proc/$server/status" 2>/dev/null || echo 0)
  kill -TERM $server
  wait $server || true
  rm -rf "$data"
  run=$(python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["steps"][0]))' \
    "$work/report-$rate/report.json")
  echo "{\"offered\":$rate,\"run\":$run,\"lag\":[$(IFS=,; echo "${samples[*]}")],\"peak_rss_bytes\":${hwm:-0}}"
done
