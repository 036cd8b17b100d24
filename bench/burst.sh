#!/usr/bin/env bash
# The worker's memory bounds under hostile load, on a private nats-server
# (max_payload 8 MB), default worker flags plus any given after the kind:
#
#   bench/burst.sh burst [N]   N (default 150000) requests of the fixture
#                              faces (about 5 KB each) published by one client
#                              as fast as it goes, then 1,000 more.
#   bench/burst.sh png         four 16-bit RGBA 6300x6300 PNGs (all zero,
#                              309 KB each) sent together amid 1,000 normal
#                              requests.
#
# Prints one JSON line: the worker's peak RSS (VmHWM), what loadgen saw
# answered and missing, and the worker's counters. Needs the release
# binaries (cargo build --release), nats-server, curl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-burst}
shift || true
n=150000
if [ "$kind" = burst ] && [ $# -gt 0 ] && [[ $1 != --* ]]; then n=$1; shift; fi
export PATH="$PATH:/usr/sbin"
tmp=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
mport=$(free_port)
echo "max_payload: 8MB" >"$tmp/nats.conf"
nats-server -a 127.0.0.1 -p "$port" -c "$tmp/nats.conf" >"$tmp/nats.log" 2>&1 &
npid=$!
wpid=
trap 'kill $wpid $npid 2>/dev/null || true; rm -rf "$tmp"' EXIT
sleep 0.5
url=nats://127.0.0.1:$port
target/release/profile-worker --nats-url "$url" --metrics-addr "127.0.0.1:$mport" "$@" 2>"$tmp/worker.log" &
wpid=$!
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null && break; sleep 0.1; done
lg() { target/release/profile-loadgen --nats-url "$url" --json "$@"; }
case "$kind" in
burst)
  lg --requests "$n" --rate 1000000 --window 100000000 --timeout 5 >"$tmp/first.json" || true
  lg --requests 1000 --window 64 --timeout 10 >"$tmp/second.json" || true
  ;;
png)
  mkdir "$tmp/png"
  python3 - "$tmp/png" <<'PY'
import struct, sys, zlib
side = 6300
def chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
row = b"\0" * (1 + side * 8)  # filter byte + 16-bit RGBA zeros
z = zlib.compressobj(9)
idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
png = (b"\x89PNG\r\n\x1a\n"
       + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0))
       + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
for i in range(4):
    open(f"{sys.argv[1]}/big{i}.png", "wb").write(png)
PY
  lg --requests 1000 --window 64 --timeout 20 >"$tmp/first.json" &
  faces=$!
  sleep 0.3
  lg --dir "$tmp/png" --window 4 --timeout 20 >"$tmp/second.json" || true
  wait $faces || true
  ;;
*) echo "usage: bench/burst.sh burst [N] | png [worker flags]" >&2; exit 2 ;;
esac
curl -s "http://127.0.0.1:$mport/metrics" >"$tmp/metrics"
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$wpid/status")
python3 - "$tmp" "$hwm" "$kind" <<'PY'
import json, sys
tmp, hwm_kb, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = {}
for line in open(f"{tmp}/metrics"):
    if line.startswith("profile_worker_") and not line.startswith("#"):
        name, value = line.rsplit(" ", 1)
        m[name] = float(value)
def total(prefix):
    return int(sum(v for k, v in m.items() if k.startswith(prefix)))
runs = {}
for part in ("first", "second"):
    try:
        r = json.load(open(f"{tmp}/{part}.json"))
        runs[part] = {k: r.get(k) for k in ("sent", "results", "errors", "missing", "errors_by_code")}
    except Exception as e:
        runs[part] = {"failed": str(e)}
print(json.dumps({
    "kind": kind,
    "peak_rss_mb": round(hwm_kb / 1024, 1),
    "runs": runs,
    "worker_requests": total("profile_worker_requests_total"),
    "worker_results": total("profile_worker_results_total"),
    "worker_errors": total("profile_worker_errors_total"),
    "dropped": {k.split('"')[1]: int(v) for k, v in m.items() if k.startswith("profile_worker_dropped_total")},
}))
PY
