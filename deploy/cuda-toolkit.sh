#!/usr/bin/env bash
# Puts CUDA 13.0's compiler and the libraries candle links against into
# target/cuda-13.0, from NVIDIA's wheels on PyPI, so that `--features cuda`
# builds on a machine with no CUDA install (Debian main has no nvcc). Prints
# the environment to build with:
#
#   eval "$(deploy/cuda-toolkit.sh)"
#   cargo build --release --features cuda
#
# CUDA 13.0 because its PTX loads on drivers from 580 on; a newer nvcc writes
# PTX that older drivers refuse. The driver library (libcuda) is not on PyPI:
# a stub with the driver API's symbol names is built for the link only, and
# the real driver is loaded at run time. CUDA_COMPUTE_CAP (default 90, for
# H100/H200) picks the GPU generation the kernels are compiled for.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${CUDA_TOOLKIT_DIR:-$PWD/target/cuda-13.0}"
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.5.25 nvidia-cublas==13.0.2.14
)

if [ ! -x "$root/bin/nvcc" ]; then
  dl="$root.wheels"
  mkdir -p "$dl"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    -d "$dl" "${wheels[@]}" >&2
  unpack="$root.unpack"
  rm -rf "$unpack" && mkdir -p "$unpack"
  for w in "$dl"/*.whl; do
    python3 -m zipfile -e "$w" "$unpack" >&2
  done
  rm -rf "$root" && mv "$unpack/nvidia/cu13" "$root" && rm -rf "$unpack"
  chmod +x "$root"/bin/* "$root"/nvvm/bin/*
  # Unversioned names for the linker.
  for lib in "$root"/lib/lib*.so.*; do
    ln -sf "$(basename "$lib")" "${lib%%.so.*}.so"
  done
  ln -sfn lib "$root/lib64"
  # libcuda stub: every driver-API function cudarc declares, as an empty
  # symbol; the soname makes the binary load the real libcuda.so.1.
  cudarc=$(cargo metadata --format-version 1 --features cuda 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')
  mkdir -p "$root/lib/stubs"
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc/src/driver/sys/mod.rs" |
    sed -E 's/^pub unsafe fn (.*)/void \1(void) {}/' | sort -u >"$root/lib/stubs/cuda.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$root/lib/stubs/cuda.c"
fi

echo "export CUDA_HOME='$root'"
echo "export PATH='$root/bin':\"\$PATH\""
echo "export LIBRARY_PATH='$root/lib:$root/lib/stubs'\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
echo "export CUDA_COMPUTE_CAP='${CUDA_COMPUTE_CAP:-90}'"
