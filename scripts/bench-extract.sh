#!/usr/bin/env bash
# End-to-end extraction benchmark: `multiclip extract` (decode + preprocess + forward + shard
# write, with the prefetching producer) against the PyTorch + transformers peer
# (scripts/bench-extract-peer.py: decode + HF preprocessing + forward, sequential), on the same real
# openclipart images and captions, the same threads (2) and batch sizes, each multiclip run
# directly followed by its peer so both see the same machine load. A precision axis: each pair
# runs in every precision of PRECISIONS (multiclip `--precision P`; the peer in f32, or in bf16
# with `model.to(torch.bfloat16)`), and a bf16 row also gives its ratio to the f32 peer. Also the
# peak RSS of multiclip extract (f32) at two dataset sizes (N and 4N rows).
# Workloads: DINOv2-S image (the N images), MiniLM text (the captions of TEXT_DATA), CLIP ViT-B/32
# (the N images and their captions; full-size random weights in the Hub layout, made once by
# scripts/make-clip-blip-fixtures.py: weights do not change the speed). multiclip's `clip`
# backbone always computes both towers (image and text), so its rows have two peers: image + text
# (the same work) and image only (`get_image_features` alone, a lower bound for the ratio).
#
# Usage: scripts/bench-extract.sh [N_IMAGES]        (default 256)
# Env:   BIN      multiclip binary (default /tmp/mc-bench: copy target/release/multiclip there,
#                 other builds overwrite the shared one)
#        DATA     openclipart dataset in competition format (default data/openclipart-full)
#        TEXT_DATA  dataset whose captions (train + test) the text runs embed (default $DATA)
#        WORK     scratch folder (default /tmp/mc-bench-runs)
#        THREADS  2;  IMAGE_BATCHES "1 8 32";  TEXT_BATCHES "32 256";  PRECISIONS "f32 bf16"
#        CLIP_BATCHES "32" ("" skips CLIP);  CLIP  the CLIP-B/32 directory (default
#                 models/random-clip-b32, made there when missing)
#        MEMORY   1 (0 skips the memory runs; they need 4N rows in $DATA/train.csv)
#        MAX_LOAD wait (up to MAX_WAIT s, default 120) before each pair until the 1-minute load
#                 average is below this (default: no waiting)
# Needs: models/dinov2-small and models/all-MiniLM-L6-v2 (scripts/fetch-weights.sh), the Python
# venv (scripts/python-env.sh), /usr/bin/time. Writes $WORK/results.md (a markdown table).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-256}
BIN=${BIN:-/tmp/mc-bench}
DATA=${DATA:-data/openclipart-full}
TEXT_DATA=${TEXT_DATA:-$DATA}
WORK=${WORK:-/tmp/mc-bench-runs}
THREADS=${THREADS:-2}
IMAGE_BATCHES=${IMAGE_BATCHES:-1 8 32}
TEXT_BATCHES=${TEXT_BATCHES:-32 256}
PRECISIONS=${PRECISIONS:-f32 bf16}
CLIP_BATCHES=${CLIP_BATCHES-32}
CLIP=${CLIP:-models/random-clip-b32}
MEMORY=${MEMORY:-1}
MAX_LOAD=${MAX_LOAD:-}
MAX_WAIT=${MAX_WAIT:-120}
PY=$(scripts/python-env.sh)
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export TOKENIZERS_PARALLELISM=false

[ -x "$BIN" ] || { echo "no binary $BIN: cargo build --release && cp target/release/multiclip $BIN" >&2; exit 1; }
for m in models/dinov2-small models/all-MiniLM-L6-v2; do
  [ -d "$m" ] || { echo "missing $m: run scripts/fetch-weights.sh" >&2; exit 1; }
done
if [ -n "$CLIP_BATCHES" ] && [ ! -f "$CLIP/model.safetensors" ]; then
  echo "making $CLIP (random CLIP ViT-B/32)" >&2
  PYTHONPATH=$(scripts/python-env.sh --pillow-lt13) "$PY" scripts/make-clip-blip-fixtures.py full clip-b32 "$CLIP" >&2
fi
mkdir -p "$WORK"
RESULTS=$WORK/results.md

# A dataset of the first $1 rows of $DATA/train.csv (images by symlink).
subset() {
  local dir=$WORK/data-$1
  if [ ! -f "$dir/train.csv" ]; then
    mkdir -p "$dir"
    ln -sfn "$(realpath "$DATA/data")" "$dir/data"
    head -n $(($1 + 1)) "$DATA/train.csv" >"$dir/train.csv"
  fi
  echo "$dir"
}

load() { cut -d' ' -f1-3 /proc/loadavg; }

wait_quiet() {
  [ -n "$MAX_LOAD" ] || return 0
  local waited=0
  while awk -v max="$MAX_LOAD" '{ exit !($1 >= max) }' /proc/loadavg && [ "$waited" -lt "$MAX_WAIT" ]; do
    sleep 15
    waited=$((waited + 15))
  done
}

# peak RSS in MiB and CPU seconds (user + system, whole process) from a /usr/bin/time -v log
peak_mib() { awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$1"; }
cpu_s() { awk -F': ' '/(User|System) time/ { t += $2 } END { printf "%.0f", t }' "$1"; }

# multiclip LABEL DATASET SPEC BATCH PRECISION -> prints "rate peak_mib cpu_s", keeps the logs
multiclip() {
  local label=$1 dataset=$2 spec=$3 batch=$4 precision=$5 out=$WORK/cache-$1
  rm -rf "$out"
  /usr/bin/time -v -o "$WORK/$label.time" "$BIN" extract --data "$dataset" --part all \
    --backbone "$spec" --batch-size "$batch" --threads "$THREADS" --precision "$precision" \
    --out "$out" \
    >"$WORK/$label.log" 2>"$WORK/$label.err" || { cat "$WORK/$label.err" >&2; exit 1; }
  local rate
  rate=$(sed -n 's/.*computed now in .* s (\([0-9.]*\) rows\/s).*/\1/p' "$WORK/$label.log")
  echo "$rate $(peak_mib "$WORK/$label.time") $(cpu_s "$WORK/$label.time")"
  rm -rf "$out"
}

# peer LABEL KIND DATASET BATCH PRECISION [--sorted] -> prints "rate peak_mib cpu_s"
peer() {
  local label=$1 kind=$2 dataset=$3 batch=$4 precision=$5
  shift 5
  [ "$precision" = f32 ] || set -- "$@" "--$precision"
  /usr/bin/time -v -o "$WORK/$label.time" "$PY" scripts/bench-extract-peer.py "$kind" "$dataset" \
    "$batch" "$WORK/$label.npy" "$@" >"$WORK/$label.log" 2>"$WORK/$label.err" ||
    { cat "$WORK/$label.err" >&2; exit 1; }
  local rate
  rate=$(sed -n 's/.* = \([0-9.]*\) [a-z]*\/s.*/\1/p' "$WORK/$label.log")
  echo "$rate $(peak_mib "$WORK/$label.time") $(cpu_s "$WORK/$label.time")"
  rm -f "$WORK/$label.npy"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

# "(R vs peer f32)" for a reduced-precision row, given its rate and the f32 peer's ("" for f32)
vs_f32() { [ "$1" = f32 ] || [ -z "$3" ] || echo " ($(ratio "$2" "$3") vs peer f32)"; }

# row WORKLOAD UNIT BATCH PRECISION ITEMS MULTICLIP PEER PEER_F32_RATE LOAD_BEFORE: one table row
# (MULTICLIP and PEER as `multiclip` and `peer` print them)
row() {
  local mr mm mc pr pm pc
  read -r mr mm mc <<<"$6"
  read -r pr pm pc <<<"$7"
  echo "| $1 | $3 | $4 | $5 | $mr $2/s | $pr $2/s | $(ratio "$mr" "$pr")$(vs_f32 "$4" "$mr" "$8") | $mm MiB | $pm MiB | $mc / $pc | $9 |" |
    tee -a "$RESULTS"
}

images=$(subset "$N")
{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs);" \
    "threads $THREADS; $(date -u +%FT%TZ); binary $BIN ($(git rev-parse --short HEAD))"
  echo
  echo "| workload | batch | precision | items | multiclip /s | peer /s | ratio | multiclip peak RSS | peer peak RSS | CPU s multiclip / peer | load before (1/5/15 min) |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
} | tee "$RESULTS"

for b in $IMAGE_BATCHES; do
  peer_f32=
  for p in $PRECISIONS; do
    wait_quiet
    before=$(load)
    ours=$(multiclip "dinov2-$p-b$b" "$images" dinov2:models/dinov2-small "$b" "$p")
    theirs=$(peer "peer-dinov2-$p-b$b" image "$images" "$b" "$p")
    [ "$p" = f32 ] && peer_f32=${theirs%% *}
    row "DINOv2-S image, e2e" img "$b" "$p" "$N" "$ours" "$theirs" "$peer_f32" "$before"
  done
done

for b in $CLIP_BATCHES; do
  peer_f32= image_f32=
  for p in $PRECISIONS; do
    wait_quiet
    before=$(load)
    ours=$(multiclip "clip-$p-b$b" "$images" "clip:$CLIP" "$b" "$p")
    theirs=$(peer "peer-clip-$p-b$b" clip "$images" "$b" "$p" "--model=$CLIP")
    image=$(peer "peer-clip-image-$p-b$b" clip "$images" "$b" "$p" "--model=$CLIP" --image-only)
    [ "$p" = f32 ] && peer_f32=${theirs%% *} image_f32=${image%% *}
    row "CLIP-B/32 image + text, e2e (peer image + text)" img "$b" "$p" "$N" "$ours" "$theirs" "$peer_f32" "$before"
    row "CLIP-B/32 image + text, e2e (peer image only)" img "$b" "$p" "$N" "$ours" "$image" "$image_f32" "$before"
  done
done

texts=$TEXT_DATA
n_texts=0
for csv in "$texts/train.csv" "$texts/test.csv"; do
  [ -f "$csv" ] && n_texts=$((n_texts + $(tail -n +2 "$csv" | wc -l)))
done
for b in $TEXT_BATCHES; do
  peer_f32= sorted_f32=
  for p in $PRECISIONS; do
    wait_quiet
    before=$(load)
    ours=$(multiclip "minilm-$p-b$b" "$texts" sentence:models/all-MiniLM-L6-v2 "$b" "$p")
    theirs=$(peer "peer-minilm-$p-b$b" text "$texts" "$b" "$p")
    sorted=$(peer "peer-minilm-sorted-$p-b$b" text "$texts" "$b" "$p" --sorted)
    [ "$p" = f32 ] && peer_f32=${theirs%% *} sorted_f32=${sorted%% *}
    row "MiniLM-L6 text, e2e (peer padded per batch)" texts "$b" "$p" "$n_texts" "$ours" "$theirs" "$peer_f32" "$before"
    row "MiniLM-L6 text, e2e (peer sorted by length)" texts "$b" "$p" "$n_texts" "$ours" "$sorted" "$sorted_f32" "$before"
  done
done

# Memory at two dataset sizes (batch 32, default shard size): bounded by batch and shard, not rows.
[ "$MEMORY" = 1 ] || exit 0
{
  echo
  echo "| multiclip extract dinov2-s, batch 32 | rows | img/s | peak RSS | CPU s | load before |"
  echo "|---|---|---|---|---|---|"
} | tee -a "$RESULTS"
for n in "$N" $((4 * N)); do
  wait_quiet
  before=$(load)
  read -r mr mm mc <<<"$(multiclip "dinov2-mem-$n" "$(subset "$n")" dinov2:models/dinov2-small 32 f32)"
  echo "| | $n | $mr | $mm MiB | $mc | $before |" | tee -a "$RESULTS"
done
