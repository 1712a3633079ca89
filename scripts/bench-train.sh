#!/usr/bin/env bash
# Training-speed benchmark (docs/benchmarks.md, "Stage 2: head training"): multiclip's trainer
# (examples/train_bench.rs) and the PyTorch peer (scripts/bench-train-peer.py) on the same
# synthetic caches, run back to back so that both see the same machine load.
# Usage: scripts/bench-train.sh [OUT_DIR]   (default target/bench-train; appends to OUT_DIR/results.log)
# Env: THREADS (default 2), EPOCHS (mlp/router epochs, default 2), ML_DECODER_ROWS (rows of the
# ml_decoder probes, default 1024; 2048 at batch 2048), PRECISIONS (default "f32 bf16": multiclip's
# --precision and the peer's f32 / bf16 autocast, each configuration run for every precision back
# to back), HEADS (default "mlp router ml_decoder"), MEMORY=0 to skip the memory runs,
# SKIP_BUILD=1 to reuse the built example, BENCH_BIN=path to run another build of it.
# On a loaded machine export OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP threads otherwise spin while
# descheduled and its wall and CPU times balloon (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-train}"
threads="${THREADS:-2}"
epochs="${EPOCHS:-2}"
mld_rows="${ML_DECODER_ROWS:-1024}"
read -ra precisions <<<"${PRECISIONS:-f32 bf16}"
read -ra heads <<<"${HEADS:-mlp router ml_decoder}"
has_head() { [[ " ${heads[*]} " == *" $1 "* ]]; }
mkdir -p "$out"
log="$out/results.log"
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --example train_bench
bench="${BENCH_BIN:-${CARGO_TARGET_DIR:-target}/release/examples/train_bench}"
py="$(scripts/python-env.sh)"
export RAYON_NUM_THREADS="$threads"
# multiclip's default (src/runtime.rs), spelled out for binaries built before it.
export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}"

ours() { "$bench" --dir "$out" "$@" 2>/dev/null | grep SUMMARY | tee -a "$log"; }
peer() {
  local head="$1" batch="$2"; shift 2
  local cache="cache-25500" data="data-25500"
  if [ "$head" = ml_decoder ]; then cache="cache-25500-tokens"; data="data-25500-tokens"; fi
  "$py" scripts/bench-train-peer.py --cache "$out/$cache" --data "$out/$data" --head "$head" \
    --batch-size "$batch" --threads "$threads" "$@" 2>/dev/null | grep SUMMARY | tee -a "$log"
}
load() { cut -d' ' -f1-3 /proc/loadavg; }

echo "# $(date -u +%FT%TZ) threads=$threads, $(nproc) cpus, load $(load)" | tee -a "$log"
"$bench" --dir "$out" --head mlp --prepare
"$bench" --dir "$out" --head mlp --prepare --scale 4
"$bench" --dir "$out" --head ml_decoder --prepare
for head in mlp router; do
  has_head "$head" || continue
  for batch in 256 4096; do
    echo "# load $(load)" | tee -a "$log"
    for p in "${precisions[@]}"; do
      ours --head "$head" --batch-size "$batch" --epochs "$epochs" --precision "$p"
    done
    for p in "${precisions[@]}"; do
      peer "$head" "$batch" --epochs "$epochs" --precision "$p"
    done
  done
done
for batch in 256 2048; do
  has_head ml_decoder || continue
  rows=$(( batch > mld_rows ? batch : mld_rows ))
  echo "# load $(load)" | tee -a "$log"
  for p in "${precisions[@]}"; do
    ours --head ml_decoder --batch-size "$batch" --epochs 1 --train-rows "$rows" --precision "$p"
  done
  for p in "${precisions[@]}"; do
    peer ml_decoder "$batch" --epochs 1 --train-rows "$rows" --precision "$p"
  done
done
# Memory: the same 25,500 training rows drawn from caches of 1x and 4x the size.
if [ "${MEMORY:-1}" = 1 ]; then
  for scale in 1 4; do
    for batch in 256 4096; do ours --head mlp --batch-size "$batch" --epochs 1 --scale "$scale"; done
  done
fi
echo "# done $(date -u +%FT%TZ), load $(load)" | tee -a "$log"
