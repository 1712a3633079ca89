#!/usr/bin/env bash
# Installs what `cargo build --features cuda` needs, without a GPU and without NVIDIA's installer:
# a pinned CUDA 13.0 toolkit from PyPI wheels (nvcc, ptxas, cicc/libnvvm, the crt, cudart and CCCL
# headers, libcudart), each wheel checked against its sha256, unpacked into one folder that works
# as CUDA_HOME; plus link stubs under lib/stubs for the libraries that no small wheel ships:
# libcuda (the driver), and nvrtc, cublas, cublasLt and curand (real wheels: ~550 MB, only to link).
# A stub is a tiny shared object with the real library's soname that defines every function cudarc
# declares for it (taken from cudarc's own sources, the version in Cargo.lock); each returns 34
# (CUDA_ERROR_STUB_LIBRARY). The binary records the sonames and finds the real libraries at run
# time (driver, or a CUDA runtime install such as PyTorch's nvidia-* wheels). Never put lib/stubs
# on LD_LIBRARY_PATH where a real driver is meant to load.
#
# Usage: eval "$(scripts/cuda-toolkit.sh [DIR])"   then   cargo build --release --features cuda
#   DIR: where the toolkit goes (default $MULTICLIP_CUDA_DIR, else .cuda/13.0 in this repo,
#        git-ignored). Wheels are kept beside it in DIR/../wheels, so a re-install downloads nothing.
# Idempotent: a complete install (same pins, same cudarc) is reused; otherwise it is rebuilt in a
# temporary folder and moved into place. Progress goes to stderr; stdout is only the environment:
#   CUDA_HOME, PATH (nvcc), CUDA_COMPUTE_CAP (80 unless set: sm_80 PTX, JIT-compiled by the driver
#   on any GPU from Ampere on; 90 builds sm_90a for H100/H200 only), CUDARC_CUDA_VERSION (13000).
# Needs: python3 with pip, unzip, gcc, and cargo (to fetch cudarc's sources if they are missing).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-${MULTICLIP_CUDA_DIR:-$repo/.cuda/13.0}}
mkdir -p "$(dirname "$dir")"
dir=$(cd "$(dirname "$dir")" && pwd)/$(basename "$dir")
wheels=$(dirname "$dir")/wheels

# name==version, wheel file, sha256 (PyPI's digest). 13.0 to match the 580 drivers (CUDA 13.0):
# a driver refuses PTX of a newer ISA than its CUDA version.
PINS="
nvidia-cuda-nvcc==13.0.88 nvidia_cuda_nvcc-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-nvvm==13.0.88 nvidia_nvvm-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-crt==13.0.88 nvidia_cuda_crt-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-cuda-runtime==13.0.96 nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-cccl==13.0.85 nvidia_cuda_cccl-13.0.85-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
"
# cudarc module, stub file, soname of the real library.
STUBS="
driver libcuda.so libcuda.so.1
nvrtc libnvrtc.so libnvrtc.so.13
cublas libcublas.so libcublas.so.13
cublaslt libcublasLt.so libcublasLt.so.13
curand libcurand.so libcurand.so.10
"

print_env() {
  echo "export CUDA_HOME=$dir"
  echo "export PATH=$dir/bin:\$PATH"
  echo "export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}"
  echo "export CUDARC_CUDA_VERSION=13000"
}

# The cudarc sources of the version Cargo.lock pins (fetched by cargo if missing).
cudarc_src() {
  local ver src
  ver=$(awk '$0 == "name = \"cudarc\"" { getline; gsub(/"/, "", $3); print $3 }' "$repo/Cargo.lock")
  [ -n "$ver" ] || { echo "cudarc is not in Cargo.lock" >&2; exit 1; }
  for attempt in 1 2; do
    src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$ver" 2>/dev/null | head -n1)
    [ -n "$src" ] && { echo "$src"; return; }
    [ "$attempt" = 1 ] && (cd "$repo" && cargo fetch --locked >&2)
  done
  echo "cudarc-$ver sources not found under ${CARGO_HOME:-$HOME/.cargo}/registry/src" >&2
  exit 1
}

src=$(cudarc_src)
stamp="pins $(echo "$PINS $STUBS" | sha256sum | cut -c1-16), $(basename "$src")"
if [ -f "$dir/.multiclip-toolkit" ] && [ "$(cat "$dir/.multiclip-toolkit")" = "$stamp" ]; then
  print_env
  exit 0
fi

started=$SECONDS
mkdir -p "$wheels"
tmp=$(mktemp -d "$dir.partial.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
while read -r spec file sha; do
  [ -n "$spec" ] || continue
  if [ ! -f "$wheels/$file" ] || ! echo "$sha  $wheels/$file" | sha256sum --check --status; then
    rm -f "$wheels/$file"
    echo "downloading $spec" >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" "$spec" >&2
  fi
  echo "$sha  $wheels/$file" | sha256sum --check --quiet >&2 ||
    { echo "sha256 mismatch for $wheels/$file: removed, nothing installed" >&2; rm -f "$wheels/$file"; exit 1; }
  unzip -q -o "$wheels/$file" 'nvidia/cu13/*' -d "$tmp/unpacked"
done <<<"$PINS"
mv "$tmp/unpacked/nvidia/cu13" "$tmp/toolkit"
# -lcudart (candle-kernels) needs the unversioned name; the wheel ships only the soname.
ln -s libcudart.so.13 "$tmp/toolkit/lib/libcudart.so"

mkdir -p "$tmp/toolkit/lib/stubs"
while read -r module file soname; do
  [ -n "$module" ] || continue
  # Every `fn NAME(` in cudarc's `extern "C"` blocks for this library (all CUDA versions: a
  # superset is harmless).
  grep -A1 'extern "C" {' "$src/src/$module/sys/mod.rs" | sed -n 's/^ *fn \([A-Za-z0-9_]*\)(.*/\1/p' |
    sort -u | sed 's/.*/int &(void) { return 34; }/' >"$tmp/$module.c"
  [ -s "$tmp/$module.c" ] || { echo "no functions found for $module in $src" >&2; exit 1; }
  gcc -shared -fPIC -O0 -Wl,-soname,"$soname" -o "$tmp/toolkit/lib/stubs/$file" "$tmp/$module.c" \
    -Wno-builtin-declaration-mismatch
  ln -s "$file" "$tmp/toolkit/lib/stubs/$soname"
done <<<"$STUBS"

"$tmp/toolkit/bin/nvcc" --version | tail -n2 >&2
echo "$stamp" >"$tmp/toolkit/.multiclip-toolkit"
rm -rf "$dir"
mv "$tmp/toolkit" "$dir"
echo "CUDA toolkit in $dir ($(du -sh "$dir" | cut -f1), $((SECONDS - started)) s)" >&2
print_env
