#!/usr/bin/env bash
# Brings the compose stack up for real with podman on a Debian 12 host
# without an image registry, checks it from outside the containers, tears it
# down (also on failure) and prints one JSON line last.
#
#   deploy/stack-test.sh            (as root; from a clone, ../shared not needed)
#
# Steps: install podman and friends if missing; make the local base image
# localhost/debian:bookworm with debootstrap (cached as a tarball under
# target/); build the project's binaries (cargo, cached in target/) and the
# images (the Dockerfile's `prebuilt` target, local nats-server and
# Prometheus from Debian's packages: deploy/compose.local.yml); bring up
# NATS with JetStream, two workers in JetStream mode and Prometheus with the
# alert rules through podman-compose; then check:
#   1. the stack's load generator (the compose `loadgen` service) gets every
#      answer;
#   2. the stack's Prometheus (HTTP API) sees two worker targets up and
#      sum(profile_worker_results_total) >= the requests sent, and has the
#      alert rules loaded;
#   3. scaling to three workers brings a third target up, and the third
#      worker takes requests;
#   4. new weights copied into the workers plus one message on
#      profiles.control.reload (file watching is off in this stack) show the
#      new `model` in results;
#   5. SIGTERM to one worker in the middle of a load run loses nothing.
# Grafana is not run (no image without a registry); the dashboard's queries
# are checked against a live Prometheus by tests/operations.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH="$PATH:/usr/sbin:/usr/local/sbin"
project=profile-stack
log() { echo "stack-test: $*" >&2; }

# --- what the host needs -----------------------------------------------------
need=()
for tool in podman buildah runc debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
[ -e /usr/lib/cni/dnsname ] || need+=(golang-github-containernetworking-plugin-dnsname)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman buildah runc fuse-overlayfs slirp4netns uidmap debootstrap \
    golang-github-containernetworking-plugin-dnsname curl python3-venv >/dev/null
fi
conf=/etc/containers/containers.conf
if ! grep -q '^runtime = "runc"' "$conf" 2>/dev/null; then
  # crun fails on hybrid cgroups; the default ulimits exceed this kind of
  # host's hard limits.
  mkdir -p /etc/containers
  cat >"$conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
fi
venv=target/stack-venv
if [ ! -x "$venv/bin/podman-compose" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q podman-compose==1.6.0
fi
compose() {
  "$venv/bin/podman-compose" -p "$project" -f docker-compose.yml -f deploy/compose.local.yml "$@"
}

# --- images ------------------------------------------------------------------
base=target/stack/debian-bookworm.tar
mkdir -p target/stack
if ! podman image exists localhost/debian:bookworm; then
  if [ ! -f "$base" ]; then
    log "making the base image with debootstrap"
    rm -rf target/stack/rootfs
    debootstrap --variant=minbase bookworm target/stack/rootfs >target/stack/debootstrap.log
    tar -C target/stack/rootfs -cf "$base" .
    rm -rf target/stack/rootfs
  fi
  podman import "$base" localhost/debian:bookworm >/dev/null
fi
log "building the binaries"
cargo build --release --locked --bins
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export NATS_PORT NATS_MONITOR_PORT PROMETHEUS_PORT GRAFANA_PORT
NATS_PORT=$(free_port); NATS_MONITOR_PORT=$(free_port)
PROMETHEUS_PORT=$(free_port); GRAFANA_PORT=$(free_port)
log "building the images"
compose build nats worker prometheus >target/stack/build.log 2>&1 || {
  tail -30 target/stack/build.log >&2
  exit 1
}

# --- the stack ---------------------------------------------------------------
result=target/stack/result.json
echo '{}' >"$result"
# Everything the project made, whatever compose itself remembers of it
# (`down` does not see replicas added by --scale).
remove_stack() {
  compose down -v >/dev/null 2>&1 || true
  podman ps -aq --filter "label=io.podman.compose.project=$project" | xargs -r podman rm -f >/dev/null 2>&1 || true
  podman pod rm -f "pod_$project" >/dev/null 2>&1 || true
  podman volume rm -f "${project}_nats-data" >/dev/null 2>&1 || true
  podman network rm -f "${project}_default" >/dev/null 2>&1 || true
}
teardown() {
  remove_stack
  python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$result"
}
trap teardown EXIT
note() { python3 - "$result" "$1" "$2" <<'PY'
import json, sys
path, key, value = sys.argv[1:4]
r = json.load(open(path))
try:
    r[key] = json.loads(value)
except ValueError:
    r[key] = value
json.dump(r, open(path, "w"))
PY
}
fail() { log "FAILED: $*"; note failed "\"$*\""; exit 1; }

remove_stack
log "starting NATS, two workers and Prometheus"
compose up -d --scale worker=2 nats worker prometheus >target/stack/up.log 2>&1 || { tail -30 target/stack/up.log >&2; fail "compose up"; }
nats_url=nats://127.0.0.1:$NATS_PORT
prom=http://127.0.0.1:$PROMETHEUS_PORT
# promql EXPR: the first value of an instant query, 0 when there is none
# (or while Prometheus is not answering yet).
promql() { { curl -sf --get "$prom/api/v1/query" --data-urlencode "query=$1" || true; } |
  python3 -c '
import json, sys
try:
    r = json.load(sys.stdin)["data"]["result"]
    print(r[0]["value"][1] if r else 0)
except ValueError:
    print(0)'; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local until=$((SECONDS + $1)) what=$2; shift 2
  until "$@"; do
    [ $SECONDS -lt $until ] || fail "$what"
    sleep 2
  done
}
targets_up() { [ "$(promql 'count(up{job="profile-worker"} == 1)')" -ge "$1" ] 2>/dev/null; }
wait_for 120 "two worker targets up in Prometheus" targets_up 2

# 1. The stack's own load generator.
sent=2000
log "load generator: $sent requests"
compose run -T --rm --entrypoint profile-loadgen loadgen --dir /opt/profile/samples --requests "$sent" --window 64 --json >target/stack/loadgen.json 2>target/stack/loadgen.log ||
  { tail -20 target/stack/loadgen.log >&2; fail "the compose loadgen run"; }
lg_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' target/stack/loadgen.json "$1" ||
  fail "no report from the compose loadgen run (see target/stack/loadgen.log)"; }
answered=$(( $(lg_field results) + $(lg_field errors) ))
note sent "$sent"; note answered "$answered"; note missing "$(lg_field missing)"
[ "$(lg_field missing)" = 0 ] || fail "the load generator misses answers"

# 2. Prometheus in the stack.
results_at_least() { python3 -c "import sys; sys.exit(0 if float('$(promql 'sum(profile_worker_results_total)')') >= $sent else 1)"; }
wait_for 60 "Prometheus counting the results" results_at_least
note workers_up "$(promql 'count(up{job="profile-worker"} == 1)')"
note prometheus_results "$(promql 'sum(profile_worker_results_total)')"
rules=$(curl -sf "$prom/api/v1/rules" | python3 -c 'import json,sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))')
note alert_rules "$rules"
[ "$rules" -gt 0 ] || fail "no alert rules loaded"

# 3. Scale to three workers.
log "scaling to three workers"
compose up -d --scale worker=3 worker >>target/stack/up.log 2>&1 || fail "scaling"
wait_for 120 "a third worker target up" targets_up 3
note workers_up_scaled "$(promql 'count(up{job="profile-worker"} == 1)')"
lg_host() { target/release/profile-loadgen --nats-url "$nats_url" --json "$@"; }
lg_host --requests 3000 --window 256 >target/stack/scaled.json || fail "load on three workers"
busy() { [ "$(promql 'count(increase(profile_worker_requests_total[1m]) > 0)')" -ge 3 ]; }
wait_for 60 "all three workers taking requests" busy
note workers_taking_requests "$(promql 'count(increase(profile_worker_requests_total[1m]) > 0)')"

# 4. Reload by message.
log "reload by profiles.control.reload"
deploy/weights-variant.py weights/gender-cnn.safetensors target/stack/new.safetensors -stack-reload
for c in $(podman ps --filter "label=com.docker.compose.service=worker" --filter "label=com.docker.compose.project=$project" --format '{{.Names}}'); do
  podman cp target/stack/new.safetensors "$c:/opt/profile/weights/gender-cnn.safetensors"
done
target/release/profile-trainer notify --nats-url "$nats_url" 2>>target/stack/loadgen.log || fail "publishing the reload message"
sleep 3
lg_host --requests 300 --window 64 >target/stack/reloaded.json || fail "load after the reload"
models=$(python3 -c 'import json,sys; print(",".join(json.load(open(sys.argv[1]))["models"]))' target/stack/reloaded.json)
note models_after_reload "\"$models\""
case "$models" in *stack-reload*) ;; *) fail "results do not carry the new model" ;; esac
case "$models" in *,*) fail "some results still carry the old model" ;; esac

# 5. SIGTERM to one worker under load (JetStream: nothing lost).
log "SIGTERM to one worker under load"
lg_host --requests 4000 --window 256 --timeout 60 >target/stack/sigterm.json &
load=$!
sleep 2
victim=$(podman ps --filter "label=com.docker.compose.service=worker" --filter "label=com.docker.compose.project=$project" --format '{{.Names}}' | sed -n 1p)
podman kill --signal TERM "$victim" >/dev/null
wait $load || true
note sigterm_missing "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["missing"])' target/stack/sigterm.json)"
note sigterm_worker_exit "$(podman inspect "$victim" --format '{{.State.ExitCode}}')"
[ "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["missing"])' target/stack/sigterm.json)" = 0 ] ||
  fail "requests lost after SIGTERM to a worker"

# The image itself.
note image_user "\"$(podman image inspect localhost/profile-classifier --format '{{.Config.User}}')\""
podman run --rm --entrypoint profile-worker localhost/profile-classifier --help >/dev/null || fail "profile-worker --help in the image"
podman run --rm --entrypoint sh localhost/profile-classifier -c \
  'test "$(id -u)" != 0 && command -v profile-trainer profile-loadgen >/dev/null && test -f weights/gender-cnn.safetensors && test -f weights/blazeface-front.safetensors' ||
  fail "the image lacks a binary or the weights, or runs as root"
note image_checked true
note grafana '"not run: no image without a registry (its queries are checked against a live Prometheus by tests/operations.rs)"'
note ok true
log "all checks passed"
