#!/usr/bin/env bash
# Load benchmark of `multiclip serve` on loopback, beside the offline rate on the same images.
#
# 1. Offline: `multiclip extract --part all` + `multiclip predict --cache` on DATA (wall-clock
#    seconds of both commands, model loading included), and extract's own rows/s.
# 2. Online: `multiclip serve` on 127.0.0.1 with the checkpoint; wrk POSTs multipart
#    /v1/classify requests cycling through the same images and captions, at each concurrency for
#    its duration (closed loop: each connection sends its next request when the answer arrives).
#    Throughput and p50/p99 latency from wrk, batch sizes and forward times from the server's
#    /metrics, the server's RSS sampled every 2 s.
#
# Usage: scripts/bench-serve.sh
# Env:   BIN          multiclip binary (default target/release/multiclip)
#        CHECKPOINT   default checkpoints/demo/mlp_dinov2-sentence_smoothing_v1_lr0.003_bs256_seed3407_f1
#                     (its backbone, models/dinov2-small + models/all-MiniLM-L6-v2, under the
#                     current folder)
#        DATA         dataset whose train + test images and captions are used (default data/demo)
#        WORK         scratch folder (default /tmp/mc-bench-serve)
#        THREADS      CPU threads of the model, offline and online (default 2)
#        LEVELS       "CONCURRENCY:SECONDS ..." (default "1:30 8:30 32:120")
#        MAX_BATCH    32;  MAX_WAIT_MS 5;  PORT 8391 (loopback only)
# Needs: wrk (Debian: apt-get install wrk), python3. Writes $WORK/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/multiclip}
CHECKPOINT=${CHECKPOINT:-checkpoints/demo/mlp_dinov2-sentence_smoothing_v1_lr0.003_bs256_seed3407_f1}
DATA=${DATA:-data/demo}
WORK=${WORK:-/tmp/mc-bench-serve}
THREADS=${THREADS:-2}
LEVELS=${LEVELS:-1:30 8:30 32:120}
MAX_BATCH=${MAX_BATCH:-32}
MAX_WAIT_MS=${MAX_WAIT_MS:-5}
PORT=${PORT:-8391}
URL=http://127.0.0.1:$PORT
export RAYON_NUM_THREADS=$THREADS RUST_LOG=warn

[ -x "$BIN" ] || { echo "no binary $BIN: cargo build --release" >&2; exit 1; }
[ -f "$CHECKPOINT.json" ] || { echo "no checkpoint $CHECKPOINT (multiclip run pipelines/demo.toml)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }
rm -rf "$WORK"
mkdir -p "$WORK/bodies"
RESULTS=$WORK/results.md
load() { cut -d' ' -f1-3 /proc/loadavg; }
spec=$(python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print((d.get("inputs") or d["cache"])["backbone"]["id"])' "$CHECKPOINT.json")

# --- 1. offline: extract + predict ---
offline_load=$(load)
start=$(date +%s.%N)
"$BIN" extract --data "$DATA" --part all --backbone "$spec" --threads "$THREADS" \
  --out "$WORK/cache" >"$WORK/extract.log"
middle=$(date +%s.%N)
"$BIN" predict --cache "$WORK/cache" --checkpoint "$CHECKPOINT" --out "$WORK/predictions.csv" \
  >"$WORK/predict.log"
end=$(date +%s.%N)
rows=$(($(wc -l <"$WORK/predictions.csv") - 1))
extract_s=$(awk -v a="$start" -v b="$middle" 'BEGIN { printf "%.1f", b - a }')
predict_s=$(awk -v a="$middle" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
offline_rate=$(awk -v n="$rows" -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", n / (b - a) }')
extract_rate=$(sed -n 's/.*computed now in .* s (\([0-9.]*\) rows\/s).*/\1/p' "$WORK/extract.log")

# --- 2. online ---
# One multipart body per row (image file + caption), and the wrk script that cycles through them.
"$BIN" dataset records "$DATA" >"$WORK/records.jsonl"
python3 - "$DATA" "$WORK/records.jsonl" "$WORK/bodies" <<'PY'
import json, os, sys
data, records, out = sys.argv[1:4]
paths = []
for line in open(records, encoding="utf-8"):
    row = json.loads(line)
    image = open(os.path.join(data, "data", row["id"]), "rb").read()
    body = (b"--multiclip-bench\r\nContent-Disposition: form-data; name=\"image\"; "
            b"filename=\"x\"\r\n\r\n" + image + b"\r\n--multiclip-bench\r\n"
            b"Content-Disposition: form-data; name=\"caption\"\r\n\r\n"
            + row["caption"].encode() + b"\r\n--multiclip-bench--\r\n")
    path = os.path.join(out, "%05d.bin" % len(paths))
    open(path, "wb").write(body)
    paths.append(path)
open(os.path.join(out, "list.txt"), "w").write("\n".join(paths) + "\n")
PY
cat >"$WORK/classify.lua" <<'LUA'
local bodies = {}
local n = 0
function init(args)
  for path in io.lines(args[1]) do
    local f = io.open(path, "rb")
    bodies[#bodies + 1] = f:read("*a")
    f:close()
  end
  n = math.random(#bodies)
end
function request()
  n = n % #bodies + 1
  return wrk.format("POST", "/v1/classify",
    { ["Content-Type"] = "multipart/form-data; boundary=multiclip-bench" }, bodies[n])
end
LUA

"$BIN" serve --checkpoint "$CHECKPOINT" --addr "127.0.0.1:$PORT" --max-batch "$MAX_BATCH" \
  --max-wait-ms "$MAX_WAIT_MS" --max-queue 256 >"$WORK/serve.log" 2>"$WORK/serve.err" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
until curl -sf "$URL/v2/health/ready" >/dev/null; do
  kill -0 "$server" 2>/dev/null || { cat "$WORK/serve.err" >&2; exit 1; }
  sleep 0.5
done
rss_mib() { awk '/VmRSS/ { printf "%.0f\n", $2 / 1024 }' "/proc/$server/status"; }
metric() { curl -sf "$URL/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
# A few requests first, so that the first level does not pay the first allocations.
wrk -t1 -c1 -d3s -s "$WORK/classify.lua" "$URL" -- "$WORK/bodies/list.txt" >/dev/null
ready_rss=$(rss_mib)

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs);" \
    "threads $THREADS; $(date -u +%FT%TZ); $BIN ($(git rev-parse --short HEAD)); $rows rows of $DATA"
  echo
  echo "offline: extract $extract_s s + predict $predict_s s = $offline_rate rows/s end to end" \
    "(extract alone $extract_rate rows/s without model loading); load before $offline_load"
  echo
  echo "| concurrency | seconds | requests | non-2xx | throughput | vs offline | p50 | p99 | mean batch | mean forward | RSS start / end / max | load before |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
} | tee "$RESULTS"

for level in $LEVELS; do
  c=${level%%:*}
  seconds=${level##*:}
  before=$(load)
  batches0=$(metric multiclip_batch_size_count)
  rows0=$(metric multiclip_batch_size_sum)
  forward0=$(metric multiclip_forward_seconds_sum)
  rss_start=$(rss_mib)
  : >"$WORK/rss-$c.txt"
  (while kill -0 "$server" 2>/dev/null; do rss_mib >>"$WORK/rss-$c.txt"; sleep 2; done) &
  sampler=$!
  wrk -t1 -c"$c" -d"${seconds}s" --timeout 60s --latency -s "$WORK/classify.lua" "$URL" -- \
    "$WORK/bodies/list.txt" >"$WORK/wrk-$c.txt"
  kill "$sampler"
  wait "$sampler" 2>/dev/null || true
  batches=$(awk -v a="$batches0" -v b="$(metric multiclip_batch_size_count)" 'BEGIN { print b - a }')
  mean_batch=$(awk -v a="$rows0" -v b="$(metric multiclip_batch_size_sum)" -v n="$batches" \
    'BEGIN { if (n > 0) printf "%.1f", (b - a) / n; else printf "none" }')
  mean_forward=$(awk -v a="$forward0" -v b="$(metric multiclip_forward_seconds_sum)" -v n="$batches" \
    'BEGIN { if (n > 0) printf "%.0f ms", 1000 * (b - a) / n; else printf "none" }')
  requests=$(awk '/requests in/ { print $1 }' "$WORK/wrk-$c.txt")
  bad=$(awk '/Non-2xx/ { print $NF }' "$WORK/wrk-$c.txt")
  rate=$(awk '/^Requests\/sec/ { printf "%.2f", $2 }' "$WORK/wrk-$c.txt")
  p50=$(awk '$1 == "50%" { print $2 }' "$WORK/wrk-$c.txt")
  p99=$(awk '$1 == "99%" { print $2 }' "$WORK/wrk-$c.txt")
  rss_max=$(sort -n "$WORK/rss-$c.txt" | tail -n1)
  echo "| $c | $seconds | $requests | ${bad:-0} | $rate req/s | $(awk -v a="$rate" -v b="$offline_rate" 'BEGIN { printf "%.2fx", a / b }') | $p50 | $p99 | $mean_batch | $mean_forward | $rss_start / $(rss_mib) / $rss_max MiB | $before |" |
    tee -a "$RESULTS"
done
echo | tee -a "$RESULTS"
echo "server RSS when ready and warmed up: $ready_rss MiB; samples every 2 s in $WORK/rss-*.txt" |
  tee -a "$RESULTS"
