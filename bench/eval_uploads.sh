#!/usr/bin/env bash
# The per-kind accuracy table of the model card: evaluates a weights file on
# ../shared/data/faces/test and on every folder of the upload-like set made
# by bench/make_uploads.py (built first when missing; needs python3 with
# Pillow and numpy, installed into target/uploads-venv when absent).
#
#   bench/eval_uploads.sh [--hard] [--seed N] [WEIGHTS] [extra profile-trainer eval flags...]
#
# --hard evaluates the harder copy instead (`make_uploads.py --hard --seed 11`,
# in target/uploads-hard): the same kinds with smaller, further-off, more
# rotated, darker and more compressed faces.
# --seed N evaluates another draw of the same kinds from the same faces
# (`make_uploads.py --seed N`, in target/uploads[-hard]-seedN), to see how
# far the figures move between draws; the defaults are 7 and 11 (--hard).
#
# Prints one Markdown table: pictures, accuracy, "no face" answers, faces
# missed, faces found where there is none. `noface` holds pictures without a
# face at their own sizes; `noface_small` the same kinds made small and
# over-compressed as `tiny` is (both outside the kinds' mean). A missed face and a face found in
# a picture without one both count as wrong answers.
set -euo pipefail
cd "$(dirname "$0")/.."
uploads=target/uploads
hard=()
seed=7
if [ "${1:-}" = --hard ]; then
  uploads=target/uploads-hard
  hard=(--hard)
  seed=11
  shift
fi
if [ "${1:-}" = --seed ]; then
  [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "--seed takes a number" >&2; exit 2; }
  seed=$2
  uploads=$uploads-seed$seed
  shift 2
fi
make=("${hard[@]}" --seed "$seed")
weights=${1:-weights/gender-cnn.safetensors}
shift || true
if [ ! -f "$uploads/noface_small/profile.csv" ]; then
  py=python3
  if ! python3 -c 'import PIL, numpy' 2>/dev/null; then
    [ -x target/uploads-venv/bin/python ] || {
      python3 -m venv target/uploads-venv
      target/uploads-venv/bin/pip install -q pillow numpy
    }
    py=target/uploads-venv/bin/python
  fi
  "$py" bench/make_uploads.py --out "$uploads" "${make[@]}"
fi
cargo build --release --quiet --bin profile-trainer
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
sets=("test=../shared/data/faces/test")
for kind in aligned offcentre loose tight rotated grey dim tiny large_png webp noface noface_small; do
  sets+=("$kind=$uploads/$kind")
done
for s in "${sets[@]}"; do
  name=${s%%=*}
  target/release/profile-trainer eval --weights "$weights" --data "${s#*=}" --json "$@" \
    > "$out/$name.json"
done
python3 - "$out" "${sets[@]}" <<'PY'
import json, sys
out = sys.argv[1]
print("| set | pictures | accuracy | answered no face | faces missed | faces found in no-face pictures |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
kinds = []
for s in sys.argv[2:]:
    name = s.split("=")[0]
    r = json.load(open(f"{out}/{name}.json"))
    f = r["faces"]
    print(f"| {name} | {r['n']} | {r['accuracy']:.4f} | {f['answered_no_face']} | {f['missed']} | {f['false_faces']} |")
    if name not in ("test", "aligned", "noface", "noface_small"):
        kinds.append(r["accuracy"])
if kinds:
    print(f"\nupload-like kinds: mean {sum(kinds)/len(kinds):.4f}, lowest {min(kinds):.4f}")
for name in ("test", "offcentre"):
    r = json.load(open(f"{out}/{name}.json"))
    groups = ", ".join(f"{g['group']} {g['accuracy']:.3f}" for g in r["by_race"] + r["by_age"])
    print(f"\n{name} by group: {groups}")
PY
