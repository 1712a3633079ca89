#!/usr/bin/env bash
# Real-weights parity: DINOv2-S and all-MiniLM-L6-v2 (models/, fetched if missing) in multiclip
# against Hugging Face transformers on 32 openclipart images + captions of data/demo.
# Requires cosine >= 0.9999 for every embedding, and bit-exact preprocessing.
# Usage: scripts/check-real-parity.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-weights.sh
py=$(scripts/python-env.sh)
"$py" scripts/check-real-parity.py "${1:-32}"
cargo test --test backbones real_weights_match_transformers -- --nocapture
