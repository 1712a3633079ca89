#!/usr/bin/env bash
# The prepared GPU check: parity of `multiclip extract` with transformers (f32 and bf16) and its
# end-to-end throughput and GPU memory against the PyTorch peer, for CLIP ViT-L/14 and
# BLIP-ITM-large on random full-size weights (scripts/gpu-check.py says what each step does).
# Written for the lent GPU machine (no Rust, no network, python3 with torch + transformers there):
# build here, carry dist/, run there; writes gpu-check.{json,md} and the logs to $OUT, in 8 minutes.
#
# Usage:
#   scripts/gpu-check.sh --prepare    here: the cuda release build (CUDA_COMPUTE_CAP=90 unless set),
#                                     stripped and xz-compressed to dist/multiclip.xz, plus a
#                                     Pillow < 13 wheel for the machine's Python 3.12 (the
#                                     references' preprocessing) in dist/
#   scripts/gpu-check.sh              there, from the repo root: the device tool's
#                                     run(command="scripts/gpu-check.sh", carry=["dist"], timeout_s=600)
#   scripts/gpu-check.sh --cpu-tiny   here: every step on tiny random models, a few images,
#                                     --device cpu, the fixtures' venv (scripts/python-env.sh), the
#                                     dist/ binary (run against the toolkit's link stubs) if there
# Env: PY (python with torch + transformers), BIN (a multiclip binary instead of dist/'s),
#      WORK (scratch, default /tmp/gpu-check[-tiny]), OUT (results, default $WORK/out),
#      MULTICLIP_CUDA_DIR (the toolkit of scripts/cuda-toolkit.sh), GPU_CHECK_BUDGET (seconds for
#      all steps; default 465 on the GPU: a step that would run past it is cut or skipped, and
#      reported).
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  eval "$(scripts/cuda-toolkit.sh)"
  local target=${CARGO_TARGET_DIR:-target/cuda}
  CARGO_TARGET_DIR=$target cargo build --release --locked --features cuda
  mkdir -p dist
  strip -o dist/multiclip "$target/release/multiclip"
  xz -T0 -9 -c dist/multiclip >dist/multiclip.xz.tmp
  mv dist/multiclip.xz.tmp dist/multiclip.xz
  rm dist/multiclip
  rm -f dist/pillow-*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d dist 'pillow<13'
  ls -l dist >&2
  echo "carry dist/ ($(du -sh dist | cut -f1)): run(command=\"scripts/gpu-check.sh\", carry=[\"dist\"], timeout_s=600)" >&2
}

# The binary from dist/multiclip.xz (unpacked with Python's lzma: no xz needed), or $BIN.
unpack() {
  if [ -n "${BIN:-}" ]; then
    echo "$BIN"
  elif [ -f dist/multiclip.xz ]; then
    "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      dist/multiclip.xz "$work/multiclip"
    chmod +x "$work/multiclip"
    echo "$work/multiclip"
  elif [ "$mode" = cpu-tiny ]; then
    cargo build --release --locked >&2
    echo "${CARGO_TARGET_DIR:-target}/release/multiclip"
  else
    echo "no dist/multiclip.xz (scripts/gpu-check.sh --prepare, then carry dist/) and no BIN" >&2
    exit 1
  fi
}

# Folders holding the CUDA libraries the binary was linked against: the python's nvidia-* wheels
# (cudart, cublas, curand, nvrtc), the driver; in cpu-tiny mode the toolkit's stubs instead.
library_path() {
  local dirs=() site d
  for site in $("$py" -c 'import site; print(" ".join(site.getsitepackages()))'); do
    for d in "$site"/nvidia/*/lib; do [ -d "$d" ] && dirs+=("$d"); done
  done
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do [ -d "$d" ] && dirs+=("$d"); done
  if [ "$mode" = cpu-tiny ]; then
    d=${MULTICLIP_CUDA_DIR:-.cuda/13.0}
    [ -d "$d/lib/stubs" ] && dirs+=("$(cd "$d" && pwd)/lib" "$(cd "$d" && pwd)/lib/stubs")
  fi
  (IFS=:; echo "${dirs[*]}")
}

mode=gpu
case "${1:-}" in
  --prepare) prepare; exit 0 ;;
  --cpu-tiny) mode=cpu-tiny ;;
  "") ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
esac

if [ "$mode" = gpu ]; then
  py=${PY:-/opt/torch/.venv/bin/python3}
  [ -x "$py" ] || py=python3
  work=${WORK:-/tmp/gpu-check}
else
  py=${PY:-$(scripts/python-env.sh)}
  work=${WORK:-/tmp/gpu-check-tiny}
fi
out=${OUT:-$work/out}
mkdir -p "$work" "$out"
export PYTHONUNBUFFERED=1

# The references need Pillow < 13 (scripts/make-clip-blip-fixtures.py says why).
if ! "$py" -c 'import PIL, sys; sys.exit(int(PIL.__version__.split(".")[0]) >= 13)'; then
  if [ "$mode" = cpu-tiny ]; then
    pillow=$(scripts/python-env.sh --pillow-lt13)
  elif compgen -G 'dist/pillow-*.whl' >/dev/null; then
    pillow=$work/pillow
    [ -d "$pillow/PIL" ] || "$py" -m pip install -q --no-index --no-deps --target "$pillow" dist/pillow-*.whl
  else
    echo "warning: Pillow >= 13 and no dist/pillow-*.whl: f32 parity may differ by one 8-bit pixel level" >&2
  fi
  export PYTHONPATH=${pillow:+$pillow${PYTHONPATH:+:$PYTHONPATH}}
fi

bin=$(unpack)
GPU_CHECK_LD_LIBRARY_PATH=$(library_path)
export GPU_CHECK_LD_LIBRARY_PATH
if LD_LIBRARY_PATH=$GPU_CHECK_LD_LIBRARY_PATH ldd "$bin" | grep 'not found' >&2; then
  echo "$bin: libraries not found in $GPU_CHECK_LD_LIBRARY_PATH" >&2
  exit 1
fi
echo "binary $bin; LD_LIBRARY_PATH for it: $GPU_CHECK_LD_LIBRARY_PATH" >&2
"$py" scripts/gpu-check.py main "$mode" "$bin" "$work" "$out"
