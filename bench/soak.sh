#!/usr/bin/env bash
# Soak: one worker (default flags, core mode) on a private nats-server under
# a steady open-loop load for DURATION seconds (default 1800), in windows of
# WINDOW seconds (default 300), with its weights file replaced every 60 s by
# an atomic rename (alternating two files that differ in their version, so
# every replacement is a real reload). Reports RSS at start and end, missing
# answers, p99 per window, and the reloads the worker counted.
#
#   bench/soak.sh [RATE] [DURATION] [WINDOW]
#
# RATE defaults to half of what this worker answers at saturation, measured
# first on this machine (3,000 requests, window 200). Needs the release
# binaries, nats-server, curl, python3 and ../shared/data/faces/test (or
# DATA=folder).
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-}
duration=${2:-1800}
window=${3:-300}
data=${DATA:-../shared/data/faces/test}
export PATH="$PATH:/usr/sbin"
tmp=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
mport=$(free_port)
nats-server -a 127.0.0.1 -p "$port" >"$tmp/nats.log" 2>&1 &
npid=$!
wpid=
rpid=
trap 'kill $rpid $wpid $npid 2>/dev/null || true; rm -rf "$tmp"' EXIT
# Two valid weights files that differ only in their metadata version.
cp weights/gender-cnn.safetensors "$tmp/a.safetensors"
deploy/weights-variant.py "$tmp/a.safetensors" "$tmp/b.safetensors" -soak
cp "$tmp/a.safetensors" "$tmp/weights.safetensors"
sleep 0.5
url=nats://127.0.0.1:$port
target/release/profile-worker --nats-url "$url" --metrics-addr "127.0.0.1:$mport" \
  --weights "$tmp/weights.safetensors" 2>"$tmp/worker.log" &
wpid=$!
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null && break; sleep 0.1; done
lg() { target/release/profile-loadgen --nats-url "$url" --dir "$data" --json "$@"; }
lg --requests 500 --window 64 >/dev/null # warm-up
if [ -z "$rate" ]; then
  rate=$(lg --requests 3000 --window 200 |
    python3 -c 'import json,sys; print(max(1, round(json.load(sys.stdin)["throughput"] / 2)))')
  echo "saturation measured: soaking at $rate requests/s" >&2
fi
rss() { awk '/VmRSS/ {print $2}' "/proc/$wpid/status"; }
rss_start=$(rss)
(
  i=0
  while sleep 60; do
    i=$((i + 1))
    if [ $((i % 2)) -eq 1 ]; then src=b; else src=a; fi
    cp "$tmp/$src.safetensors" "$tmp/next.safetensors"
    mv "$tmp/next.safetensors" "$tmp/weights.safetensors"
  done
) &
rpid=$!
windows=$((duration / window))
for w in $(seq "$windows"); do
  lg --rate "$rate" --requests $((rate * window)) --window 100000000 --timeout 10 \
    >"$tmp/window$w.json" || true
  echo "window $w/$windows done" >&2
done
rss_end=$(rss)
curl -s "http://127.0.0.1:$mport/metrics" >"$tmp/metrics"
python3 - "$tmp" "$windows" "$rss_start" "$rss_end" "$rate" "$window" <<'PY'
import json, sys
tmp, n, rss0, rss1, rate, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
rows = []
for w in range(1, n + 1):
    r = json.load(open(f"{tmp}/window{w}.json"))
    rows.append({"window": w, "sent": r["sent"], "missing": r["missing"], "errors": r["errors"],
                 "models": len(r.get("models", {})), "p50_ms": r["latency_ms"]["p50"],
                 "p99_ms": r["latency_ms"]["p99"], "results_per_s": round(r["throughput"], 1)})
reloads = {}
for line in open(f"{tmp}/metrics"):
    if line.startswith("profile_worker_model_reloads_total{"):
        k, v = line.rsplit(" ", 1)
        reloads[k.split('"')[1]] = int(float(v))
print("| window | requests | missing | errors | models seen | p50 ms | p99 ms | results/s |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    start = (r["window"] - 1) * window // 60
    print(f"| {start}-{start + window // 60} min | {r['sent']} | {r['missing']} | {r['errors']} | {r['models']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['results_per_s']} |")
print(json.dumps({"rate": float(rate), "rss_start_mb": round(rss0 / 1024, 1), "rss_end_mb": round(rss1 / 1024, 1),
                  "missing": sum(r["missing"] for r in rows), "sent": sum(r["sent"] for r in rows),
                  "reloads": reloads, "p99_ms_by_window": [r["p99_ms"] for r in rows]}))
PY
