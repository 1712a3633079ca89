#!/usr/bin/env bash
# Forward-only throughput of the clip and blip backbones (multiclip, candle) against PyTorch +
# transformers on the same random full-size weights, 2 threads each, run back to back so both
# see the same machine load. Needs the models of scripts/check-clip-blip-parity.sh.
# Usage: scripts/bench-clip-blip.sh [repeats]
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
py=$(scripts/python-env.sh)
cargo build --release --example bench_clip_blip
bench=${CARGO_TARGET_DIR:-target}/release/examples/bench_clip_blip
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
run() {
  "$bench" "$@" | grep forward
  "$py" scripts/bench-clip-blip-peer.py "$@" 2>/dev/null | grep forward
}
uptime
run clip models/random-clip-b32 32 "$repeats"
run clip models/random-clip-b32 32 "$repeats" 16
run blip models/random-blip-base 8 "$repeats" 15
uptime
