#!/usr/bin/env bash
# Training-speed benchmark (docs/benchmarks.md, "Stage 2: head training"): multiclip's trainer
# (examples/train_bench.rs) and the PyTorch peer (scripts/bench-train-peer.py) on the same
# synthetic caches, run back to back so that both see the same machine load.
# Usage: scripts/bench-train.sh [OUT_DIR]   (default target/bench-train; logs to OUT_DIR/results.log)
# Env: THREADS (default 2), REPEATS (default 1), ML_DECODER_ROWS (rows per ml_decoder probe, 2048).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-train}"
threads="${THREADS:-2}"
repeats="${REPEATS:-1}"
mld_rows="${ML_DECODER_ROWS:-2048}"
mkdir -p "$out"
log="$out/results.log"
cargo build --release --example train_bench
bench="${CARGO_TARGET_DIR:-target}/release/examples/train_bench"
py="$(scripts/python-env.sh)"
export RAYON_NUM_THREADS="$threads"

ours() { "$bench" --dir "$out" "$@" 2>/dev/null | grep SUMMARY | tee -a "$log"; }
peer() {
  local head="$1" batch="$2" extra="${3:-}" cache="cache-25500" data="data-25500"
  if [ "$head" = ml_decoder ]; then cache="cache-25500-tokens"; data="data-25500-tokens"; fi
  "$py" scripts/bench-train-peer.py --cache "$out/$cache" --data "$out/$data" --head "$head" \
    --batch-size "$batch" --threads "$threads" $extra 2>/dev/null | grep SUMMARY | tee -a "$log"
}

echo "# $(date -u +%FT%TZ) threads=$threads $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
"$bench" --dir "$out" --head mlp --prepare
"$bench" --dir "$out" --head mlp --prepare --scale 4
"$bench" --dir "$out" --head ml_decoder --prepare
for r in $(seq "$repeats"); do
  for head in mlp router; do
    for batch in 256 4096; do
      ours --head "$head" --batch-size "$batch" --epochs 3
      CANDLE_NUM_THREADS=1 ours --head "$head" --batch-size "$batch" --epochs 3
      peer "$head" "$batch" "--epochs 3"
    done
  done
  for batch in 256 2048; do
    ours --head ml_decoder --batch-size "$batch" --epochs 1 --train-rows "$mld_rows"
    CANDLE_NUM_THREADS=1 ours --head ml_decoder --batch-size "$batch" --epochs 1 --train-rows "$mld_rows"
    peer ml_decoder "$batch" "--epochs 1 --train-rows $mld_rows"
  done
done
# Memory: the same 25,500 training rows drawn from a cache of 1x and 4x the size.
for scale in 1 4; do
  for batch in 256 4096; do ours --head mlp --batch-size "$batch" --epochs 1 --scale "$scale"; done
done
echo "# done $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
