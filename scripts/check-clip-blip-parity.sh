#!/usr/bin/env bash
# Full-size parity check of the clip and blip backbones against Hugging Face transformers (not run
# in CI: needs Python with torch + transformers, ~8 GB of disk and ~15 minutes on 2 cores to make
# the models once, then ~6 CPU-minutes per run: 13 min wall at load 7).
# Makes random-weight models with the Hub's full-size configs (CLIP ViT-B/32 and ViT-L/14,
# BLIP-ITM base and large) under $MODELS/random-* (once), then
# 1. f32 parity: runs the ignored test `full_size_matches_transformers` in tests/clip_blip.rs: PNG
#    files -> multiclip backbone -> every output within 1e-4 of transformers in f32;
# 2. bf16 fidelity: `multiclip extract --precision f32` and `--precision bf16` (`--dtype f32`) of
#    the first $BF16_ROWS rows of data/demo/train.csv (real images and captions), and
#    scripts/clip-blip-cosines.py: lowest / mean row cosine of every output, bf16 vs f32 and both
#    vs transformers f32; fails when a bf16 row is below cosine 0.999 to f32.
# Usage: scripts/check-clip-blip-parity.sh [clip-b32 clip-l14 blip-base blip-large]
# Env:   MODELS     where the random models live (default models, git-ignored)
#        BF16_ROWS  rows of the bf16 check (default 8; 0 skips it)
#        F32_TEST   0 skips step 1
set -euo pipefail
cd "$(dirname "$0")/.."
names=("${@:-clip-b32 clip-l14 blip-base blip-large}")
read -r -a names <<<"${names[*]}"
MODELS=${MODELS:-models}
BF16_ROWS=${BF16_ROWS:-8}
F32_TEST=${F32_TEST:-1}
py=$(scripts/python-env.sh)
pillow=$(scripts/python-env.sh --pillow-lt13)
dirs=()
for name in "${names[@]}"; do
  dir=$(realpath -m "$MODELS/random-$name")
  if [ ! -f "$dir/parity/expected.safetensors" ]; then
    echo "making $dir" >&2
    PYTHONPATH="$pillow" "$py" scripts/make-clip-blip-fixtures.py full "$name" "$dir" 2>&1 |
      grep -v 'Loading weights\|Writing model' >&2
  fi
  dirs+=("$dir")
done
if [ "$F32_TEST" != 0 ]; then
  MULTICLIP_PARITY_DIRS=$(IFS=,; echo "${dirs[*]}") \
    cargo test --release --test clip_blip full_size_matches_transformers -- --ignored --nocapture
fi
[ "$BF16_ROWS" != 0 ] || exit 0

cargo build --release
bin=${CARGO_TARGET_DIR:-target}/release/multiclip
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/data"
ln -s "$PWD/data/demo/data" "$work/data/data"
head -n $((BF16_ROWS + 1)) data/demo/train.csv >"$work/data/train.csv"
echo
echo "bf16 fidelity: $BF16_ROWS rows of data/demo/train.csv; cells: lowest / mean row cosine"
echo
echo "| model | output (per-row shape) | vectors | bf16 vs f32 | bf16 vs transformers | f32 vs transformers |"
echo "|---|---|---|---|---|---|"
status=0
for dir in "${dirs[@]}"; do
  family=${dir##*/random-}
  family=${family%%-*}
  spec="$family:\"$dir\""
  if [ "$family" = clip ]; then spec="$spec:image_tokens=true"; fi
  for precision in f32 bf16; do
    "$bin" extract --data "$work/data" --part train --backbone "$spec" --precision "$precision" \
      --dtype f32 --out "$work/cache-$precision" >"$work/extract.log" 2>&1 ||
      { cat "$work/extract.log" >&2; exit 1; }
  done
  PYTHONPATH="$pillow" "$py" scripts/clip-blip-cosines.py "$dir" "$work/data" \
    "$work/cache-f32" "$work/cache-bf16" || status=1
  rm -rf "$work/cache-f32" "$work/cache-bf16"
done
exit "$status"
