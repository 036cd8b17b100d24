#!/usr/bin/env bash
# End-to-end benchmark: a private nats-server, one profile-worker (release
# build, shipped weights), and profile-loadgen over the 200x200 JPEGs of
# ../shared/data/faces/test:
#   1. saturation: N requests (default 10000), window 256 -> results/s
#   2. open loop at 50% of that rate -> latency percentiles
#   3. a trickle at 10 requests/s -> latency percentiles
# and the worker's batch-size distribution. Prints one Markdown table.
#
#   bench/e2e.sh [requests]        (run from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
N=${1:-10000}
DATA=${DATA:-../shared/data/faces/test}
[ -f "$DATA/profile.csv" ] || { echo "missing $DATA (the shared test set)" >&2; exit 1; }
cargo build --release --bins -q
tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nats-server -a 127.0.0.1 -p "$port" >"$tmp/nats.log" 2>&1 &
nats_pid=$!
trap 'kill $worker_pid $nats_pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
sleep 0.5
export NATS_URL="nats://127.0.0.1:$port"
RUST_LOG=warn target/release/profile-worker --metrics-addr "127.0.0.1:$mport" ${WORKER_ARGS:-} &
worker_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
lg() { target/release/profile-loadgen --dir "$DATA" --json "$@"; }
lg --requests 500 --window 64 >/dev/null                      # warm-up
sat=$(lg --requests "$N" --window 256)
rate=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['throughput'])" "$sat")
half=$(python3 -c "print(round($rate/2))")
halfrep=$(lg --requests "$(python3 -c "print(min($N, int($half*10)))")" --rate "$half" --window 100000)
trickle=$(lg --requests 200 --rate 10 --window 100000)
metrics=$(curl -s "http://127.0.0.1:$mport/metrics")
python3 - "$sat" "$halfrep" "$trickle" "$metrics" <<'PY'
import json, sys
sat, half, trickle = (json.loads(a) for a in sys.argv[1:4])
metrics = sys.argv[4]
print("| run | requests | results/s | missing | p50 ms | p90 ms | p99 ms | max ms |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for name, r in [("saturation, window 256", sat), ("open loop at 50%", half), ("trickle 10/s", trickle)]:
    l = r["latency_ms"]
    print(f"| {name} | {r['sent']} | {r['throughput']:.0f} | {r['missing']} | {l['p50']:.1f} | {l['p90']:.1f} | {l['p99']:.1f} | {l['max']:.1f} |")
buckets = []
for line in metrics.splitlines():
    if line.startswith("profile_worker_batch_size_bucket"):
        le = line.split('le="')[1].split('"')[0]
        buckets.append((le, float(line.rsplit(" ", 1)[1])))
prev, parts = 0.0, []
for le, c in buckets:
    if c - prev > 0:
        parts.append(f"<={le}: {int(c - prev)}")
    prev = c
print()
print("batch sizes (count of forward passes): " + ", ".join(parts))
acc = sat.get("accuracy")
if acc is not None:
    print(f"accuracy over the saturation run: {acc:.4f}")
PY
