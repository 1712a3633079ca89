#!/usr/bin/env bash
# Full-size parity check of the clip and blip backbones against Hugging Face transformers (not run
# in CI: needs Python with torch + transformers, ~8 GB of disk and ~15 minutes on 2 cores).
# Makes random-weight models with the Hub's full-size configs (CLIP ViT-B/32 and ViT-L/14,
# BLIP-ITM base and large) under models/random-* (git-ignored), then runs the ignored test
# `full_size_matches_transformers` in tests/clip_blip.rs: PNG files -> multiclip backbone ->
# every output within 1e-4 of transformers in f32.
# Usage: scripts/check-clip-blip-parity.sh [clip-b32 clip-l14 blip-base blip-large]
set -euo pipefail
cd "$(dirname "$0")/.."
names=("${@:-clip-b32 clip-l14 blip-base blip-large}")
read -r -a names <<<"${names[*]}"
py=$(scripts/python-env.sh)
pillow=$(scripts/python-env.sh --pillow-lt13)
dirs=()
for name in "${names[@]}"; do
  dir=models/random-$name
  if [ ! -f "$dir/parity/expected.safetensors" ]; then
    echo "making $dir" >&2
    PYTHONPATH="$pillow" "$py" scripts/make-clip-blip-fixtures.py full "$name" "$dir" 2>&1 |
      grep -v 'Loading weights\|Writing model' >&2
  fi
  dirs+=("$PWD/$dir")
done
MULTICLIP_PARITY_DIRS=$(IFS=,; echo "${dirs[*]}") \
  cargo test --release --test clip_blip full_size_matches_transformers -- --ignored --nocapture
