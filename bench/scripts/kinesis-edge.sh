#!/usr/bin/env bash
# Edge throughput into Kinesis (kinesalite, from tools/emulators; `scripts/emulators`
# installs it) with KPL aggregation on and off: for each round and mode, a fresh
# kinesalite and stream (4 shards), `floodgate ingest` (release build) on it, and
# floodgate-loadgen (closed loop, 32 connections, 100-event batches) for DURATION seconds.
# Prints one JSON line per run and the median per mode. Only ever 127.0.0.1.
#
#   bench/scripts/kinesis-edge.sh [-r ROUNDS] [-d SECONDS]
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
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=$here/target/release/floodgate
loadgen=$here/target/release/floodgate-loadgen
kinesalite=$here/tools/emulators/node_modules/.bin/kinesalite
work=$(mktemp -d /tmp/fg-kinesis.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
kport=14567
port=18182
results=$work/results.jsonl
for round in $(seq 1 "$rounds"); do
  for aggregation in true false; do
    "$kinesalite" --port $kport --createStreamMs 0 --shardLimit 100 >"$work/kinesalite.log" 2>&1 &
    kpid=$!
    for _ in $(seq 1 100); do
      (exec 3<>/dev/tcp/127.0.0.1/$kport) 2>/dev/null && break
      sleep 0.1
    done
    data=$work/data-$aggregation-$round
    cat >"$work/config.toml" <<TOML
data_dir = "$data"
[ingest]
dedupe_window_ms = 0
[stream]
backend = "kinesis"
[stream.kinesis]
stream_name = "bench"
endpoint_url = "http://127.0.0.1:$kport"
shards = 4
aggregation = $aggregation
TOML
    "$bin" aws init --config "$work/config.toml" >/dev/null
    "$bin" ingest --config "$work/config.toml" --listen 127.0.0.1:$port >"$work/server.log" 2>&1 &
    server=$!
    for _ in $(seq 1 100); do
      curl -sf http://127.0.0.1:$port/healthz >/dev/null 2>&1 && break
      sleep 0.1
    done
    out=$("$loadgen" --url http://127.0.0.1:$port/v1/events --duration "$duration" 2>&1 | tail -1)
    echo "{\"aggregation\":$aggregation,\"round\":$round,\"loadgen\":$out}" | tee -a "$results"
    kill "$server" "$kpid" 2>/dev/null || true
    wait "$server" "$kpid" 2>/dev/null || true
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
for mode in (True, False):
    rates = [r["loadgen"]["events_per_sec"] for r in runs if r["aggregation"] is mode]
    p99 = [r["loadgen"]["p99_ms"] for r in runs if r["aggregation"] is mode]
    if rates:
        print(f"aggregation={str(mode).lower()}: median {statistics.median(rates):,.0f} events/s, p99 {statistics.median(p99):.1f} ms, over {len(rates)} runs: {rates}")
PY
