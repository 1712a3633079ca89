#!/usr/bin/env bash
# Quality study on the full openclipart set (docs/results.md): every head x loss of multiclip on
# cached DINOv2-S + MiniLM features, trained on the train part of the seeded split, thresholds
# tuned on validation, scored on the held-out test part (test.csv + test_labels.csv).
#
#   scripts/quality-study.sh grid      # every head x loss with the default hyper-parameters
#   scripts/quality-study.sh sweep     # hyper-parameters of the best heads (picked on validation)
#   scripts/quality-study.sh table     # the markdown table of everything run so far
#   scripts/quality-study.sh all       # extract (resumable) + split + grid + sweep + table
#   scripts/quality-study.sh one NAME HEAD LOSS [train flags...]   # a single run
#   scripts/quality-study.sh ensembles # issue 14: `multiclip sweep` of SWEEP_FILE (ranked on
#                                      # validation) with its top-3 ensemble, and 5-fold ensembles
#                                      # of its best run and of the defaults, all scored on test
#   scripts/quality-study.sh ensembles-table   # their markdown table
#   scripts/quality-study.sh tokens    # issue 14: caches with DINOv2 patch tokens, MiniLM token
#                                      # states and the label names (TOKEN_TRAIN_CACHE /
#                                      # TOKEN_TEST_CACHE), then label-name initialisation (cosine
#                                      # probe, gat, ml_decoder), zero-shot, and ml_decoder over
#                                      # the tokens; rows in TOKEN_OUT/results.tsv
#
# Resumable: a run whose results row exists is skipped. One training process at a time.
# MC (the multiclip binary, default target/release/multiclip), DATA, OUT, SWEEP_FILE (whose
# [sweep] out must be SWEEP_OUT) and JOBS (runs / members at once) can be overridden.
set -euo pipefail
cd "$(dirname "$0")/.."

MC=${MC:-target/release/multiclip}
DATA=${DATA:-data/openclipart-full}
BACKBONE=${BACKBONE:-dinov2:models/dinov2-small+sentence:models/all-MiniLM-L6-v2}
TRAIN_CACHE=${TRAIN_CACHE:-cache/oc-train}
TEST_CACHE=${TEST_CACHE:-cache/oc-test}
SPLIT=${SPLIT:-checkpoints/oc/split.json}
OUT=${OUT:-checkpoints/oc/study}
SEED=${SEED:-3407}
RESULTS=$OUT/results.tsv
LOGS=$OUT/logs
SWEEP_FILE=${SWEEP_FILE:-sweeps/openclipart.toml}
SWEEP_OUT=${SWEEP_OUT:-checkpoints/oc/sweep}
JOBS=${JOBS:-1}
ENSEMBLES=$OUT/ensembles.tsv
TOKEN_BACKBONE=${TOKEN_BACKBONE:-dinov2:models/dinov2-small:image_tokens=true+sentence:models/all-MiniLM-L6-v2:text_tokens=true}
TOKEN_TRAIN_CACHE=${TOKEN_TRAIN_CACHE:-cache/oc-train-tok}
TOKEN_TEST_CACHE=${TOKEN_TEST_CACHE:-cache/oc-test-tok}
TOKEN_OUT=${TOKEN_OUT:-checkpoints/oc/tokens}

HEADS=(mlp mlp:hidden=0 router router+multistage "router:inputs=image+text" ensemble gat
    ml_decoder:input=text)
LOSSES=(bce smoothing focal zlpr asl angular margin)
# STUDY_HEADS / STUDY_LOSSES (space-separated) restrict the grid.
[[ -n ${STUDY_HEADS:-} ]] && read -ra HEADS <<<"$STUDY_HEADS"
[[ -n ${STUDY_LOSSES:-} ]] && read -ra LOSSES <<<"$STUDY_LOSSES"

mkdir -p "$OUT" "$LOGS"
[[ -f $RESULTS ]] || printf 'name\thead\tloss\targs\tval_map\tval_micro_f1\tval_macro_f1\ttest_map\ttest_micro_f1\ttest_macro_f1\tseconds\n' >"$RESULTS"

extract() {
    for part in train test; do
        local cache=$TRAIN_CACHE
        [[ $part == test ]] && cache=$TEST_CACHE
        "$MC" extract --data "$DATA" --part "$part" --backbone "$BACKBONE" --out "$cache" \
            --shard-rows 512 --on-error skip
    done
    [[ -f $SPLIT ]] || "$MC" dataset split "$DATA" --seed "$SEED" --val-fraction 0.15 --out "$SPLIT"
}

# metrics LOG -> "mAP micro-F1 macro-F1" from the output of `multiclip evaluate`.
metrics() {
    awk '$1 == "micro" { mi = $4 } $1 == "macro" { ma = $4 } $1 == "mAP" { m = $2 }
         END { if (m == "" || mi == "") exit 1; print m "\t" mi "\t" ma }' "$1"
}

# run NAME HEAD LOSS [extra train flags...]: train, evaluate on val and test, append a row.
run() {
    local name=$1 spec=$2 head=$2 loss=$3
    shift 3
    # One training process at a time (another run of this script may be training).
    while pgrep -f -- "$MC train " >/dev/null; do sleep 5; done
    if cut -f1 "$RESULTS" | grep -qx "$name"; then return 0; fi
    local flags=("$@")
    if [[ $head == *+multistage ]]; then
        head=${head%+multistage}
        flags+=(--multistage)
    fi
    local start=$SECONDS
    echo "== $name: --head $head --loss $loss ${flags[*]}"
    # A finished checkpoint (its report is written last) whose scoring was interrupted is kept.
    [[ -f $OUT/$name.report.html ]] || rm -f "$OUT/$name".*
    if [[ ! -f $OUT/$name.report.html ]] && ! "$MC" train --cache "$TRAIN_CACHE" --split "$SPLIT" --data "$DATA" --head "$head" \
        --loss "$loss" --seed "$SEED" --out "$OUT" --name "$name" "${flags[@]}" \
        >"$LOGS/$name.train.log" 2>&1; then
        echo "   FAILED (see $LOGS/$name.train.log)"
        tail -3 "$LOGS/$name.train.log"
        return 0
    fi
    local seconds=$((SECONDS - start))
    "$MC" evaluate --checkpoint "$OUT/$name" --part val >"$LOGS/$name.val.log" 2>&1
    "$MC" evaluate --checkpoint "$OUT/$name" --part test --cache "$TEST_CACHE" \
        >"$LOGS/$name.test.log" 2>&1
    local val test
    val=$(metrics "$LOGS/$name.val.log")
    test=$(metrics "$LOGS/$name.test.log")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$spec" "$loss" "${*:-}" "$val" "$test" \
        "$seconds" >>"$RESULTS"
    echo "   val $val | test $test | ${seconds}s"
}

slug() { tr ':=+,' '-_p_' <<<"$1"; }

# Every head x loss; ordered so that partial results are useful: the MLP with every loss, every
# head with BCE, then the rest.
grid() {
    local head loss
    for loss in "${LOSSES[@]}"; do run "mlp__$loss" mlp "$loss"; done
    for head in "${HEADS[@]}"; do run "$(slug "$head")__bce" "$head" bce; done
    for head in "${HEADS[@]}"; do
        for loss in "${LOSSES[@]}"; do
            run "$(slug "$head")__$loss" "$head" "$loss"
        done
    done
}

# The best (head, loss) pairs of the grid by validation micro-F1 (never by test).
best_on_val() {
    awk -F'\t' 'NR > 1 && $4 == "" { print $6 "\t" $2 "\t" $3 }' "$RESULTS" | sort -gr | head -n "$1"
}

sweep() {
    local n=${SWEEP_TOP:-3}
    best_on_val "$n" | while IFS=$'\t' read -r _ head loss; do
        local base
        base="$(slug "$head")__$loss"
        run "$base--lr1e-2" "$head" "$loss" --lr 1e-2
        run "$base--lr1e-3" "$head" "$loss" --lr 1e-3
        run "$base--wd0.1" "$head" "$loss" --weight-decay 0.1
        run "$base--bs64" "$head" "$loss" --batch-size 64
        run "$base--bs1024" "$head" "$loss" --batch-size 1024
        run "$base--pat30" "$head" "$loss" --patience 30 --epochs 300
        run "$base--metric-map" "$head" "$loss" --metric map
        run "$base--const" "$head" "$loss" --schedule constant
        if [[ $head == mlp* || $head == router* || $head == ensemble* ]]; then
            local sep=":"
            [[ $head == *:* ]] && sep=","
            [[ $head == mlp:hidden=0 ]] && continue
            local plain=${head%+multistage} ms=""
            [[ $head == *+multistage ]] && ms="+multistage"
            run "$base--drop0.3" "$plain${sep}dropout=0.3$ms" "$loss"
            run "$base--drop0.5" "$plain${sep}dropout=0.5$ms" "$loss"
            run "$base--h2048-drop0.5" "$plain${sep}hidden=2048,dropout=0.5$ms" "$loss"
            run "$base--h256" "$plain${sep}hidden=256$ms" "$loss"
        fi
    done
}

# The baselines of scripts/baselines.py (BASELINES, a tsv), as a markdown table.
baseline_table() {
    awk -F'\t' 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i
            print "| model | features | test mAP | micro-F1 at 0.5 | micro-F1 greedy 0.01..0.80 (macro) | micro-F1 exact search (macro) |"
            print "|---|---|---|---|---|---|"; next }
        { printf "| %s | %s | %.3f | %.3f | %.3f (%.3f) | %.3f (%.3f) |\n", $c["model"], $c["features"],
            $c["test_map"], $c["test_micro_0.5"], $c["test_micro_greedy"], $c["test_macro_greedy"],
            $c["test_micro_exact"], $c["test_macro_exact"] }' "$1"
}

# score NAME WHAT CHECKPOINT VAL_LOG: the validation numbers of VAL_LOG (a train or evaluate
# log) and the test numbers of CHECKPOINT, as a row of ensembles.tsv.
score() {
    local name=$1 what=$2 checkpoint=$3 val_log=$4
    [[ -f $ENSEMBLES ]] || printf 'name\twhat\tval_map\tval_micro_f1\tval_macro_f1\ttest_map\ttest_micro_f1\ttest_macro_f1\n' >"$ENSEMBLES"
    if cut -f1 "$ENSEMBLES" | grep -qx "$name"; then return 0; fi
    "$MC" evaluate --checkpoint "$checkpoint" --part test --cache "$TEST_CACHE" >"$LOGS/$name.test.log" 2>&1
    printf '%s\t%s\t%s\t%s\n' "$name" "$what" "$(metrics "$val_log")" "$(metrics "$LOGS/$name.test.log")" >>"$ENSEMBLES"
    echo "   $name: val $(metrics "$val_log") | test $(metrics "$LOGS/$name.test.log")"
}

# kfold NAME FOLD_ROWS [train flags...]: a 5-fold ensemble, scored on validation where that is
# honest (held-out ids with --fold-rows train; out of fold with all) and on test.
kfold() {
    local name=$1 rows=$2
    shift 2
    [[ -f $OUT/$name.json ]] || "$MC" train "$@" --folds 5 --fold-rows "$rows" --jobs "$JOBS" \
        --out "$OUT" --name "$name" >"$LOGS/$name.train.log" 2>&1
    local val_log=$LOGS/$name.train.log
    if [[ $rows == train ]]; then
        "$MC" evaluate --checkpoint "$OUT/$name" --part val >"$LOGS/$name.val.log" 2>&1
        val_log=$LOGS/$name.val.log
    fi
    score "$name" "5-fold ensemble ($rows rows): $*" "$OUT/$name" "$val_log"
}

ensembles() {
    echo "== load before: $(uptime)"
    "$MC" sweep "$SWEEP_FILE" --jobs "$JOBS" --ensemble-top 3 | tee "$LOGS/sweep.log"
    # Every run of the sweep and the top-3 ensemble (chosen on validation) on test.
    local rank run
    while IFS=, read -r rank run _; do
        [[ $rank =~ ^[0-9]+$ ]] || continue
        "$MC" evaluate --checkpoint "$SWEEP_OUT/$run" --part val >"$LOGS/$run.val.log" 2>&1
        score "$run" "sweep rank $rank" "$SWEEP_OUT/$run" "$LOGS/$run.val.log"
    done <"$SWEEP_OUT/sweep.csv"
    "$MC" evaluate --checkpoint "$SWEEP_OUT/top-3" --part val >"$LOGS/top-3.val.log" 2>&1
    score top-3 "mean of the sweep's 3 best runs" "$SWEEP_OUT/top-3" "$LOGS/top-3.val.log"
    # 5-fold ensembles of the sweep's best run (its flags from --list) and of the defaults.
    local best flags rows
    best=$(awk -F, 'NR == 2 { print $2 }' "$SWEEP_OUT/sweep.csv")
    flags=$("$MC" sweep "$SWEEP_FILE" --list | awk -v run="$best" '$3 == run { $1 = $2 = $3 = ""; print }')
    eval "local best_flags=($flags)"
    # The defaults: `train` needs a head; mlp is the documented default.
    local base=(--cache "$TRAIN_CACHE" --data "$DATA" --split "$SPLIT" --seed "$SEED" --head mlp)
    for rows in all train; do
        kfold "best-5fold-$rows" "$rows" "${best_flags[@]}"
        kfold "default-5fold-$rows" "$rows" "${base[@]}"
    done
    echo "== load after: $(uptime)"
}

# Label names and token sequences: the caches (resumable), then each run through `run` on them.
tokens() {
    "$MC" extract --data "$DATA" --part train --backbone "$TOKEN_BACKBONE" --out "$TOKEN_TRAIN_CACHE" \
        --shard-rows 512 --on-error skip --label-names
    "$MC" extract --data "$DATA" --part test --backbone "$TOKEN_BACKBONE" --out "$TOKEN_TEST_CACHE" \
        --shard-rows 512 --on-error skip
    du -sh "$TOKEN_TRAIN_CACHE" "$TOKEN_TEST_CACHE" "$TRAIN_CACHE" "$TEST_CACHE"
    TRAIN_CACHE=$TOKEN_TRAIN_CACHE TEST_CACHE=$TOKEN_TEST_CACHE OUT=$TOKEN_OUT "$0" tokens-runs
}

tokens_runs() {
    local probe="mlp:hidden=0,cosine=true,inputs=text"
    local mld="ml_decoder:inputs=image_tokens+text_tokens,d_model=256,heads=4,ffn=512"
    local short=(--epochs 12 --patience 4 --batch-size 64)
    run zeroshot-cos-text "$probe,queries=labels" angular --epochs 0
    run cos-text-labels "$probe,queries=labels" angular
    run cos-text-random "$probe" angular
    run gat-labels "gat:queries=labels" smoothing
    run gat-random gat smoothing
    run mld-tokens-random "$mld" smoothing "${short[@]}"
    run mld-tokens-labels "$mld,queries=labels" smoothing "${short[@]}"
}

ensembles_table() {
    awk -F'\t' 'NR == 1 {
            print "| run | what | val mAP | val micro-F1 | test mAP | test micro-F1 (tuned) | test macro-F1 |"
            print "|---|---|---|---|---|---|---|"; next }
        { printf "| `%s` | %s | %.3f | %.3f | %.3f | %.3f | %.3f |\n", $1, $2, $3, $4, $6, $7, $8 }' "$ENSEMBLES"
}

table() {
    [[ -f ${BASELINES:-$OUT/../baselines.tsv} ]] && baseline_table "${BASELINES:-$OUT/../baselines.tsv}" && echo
    awk -F'\t' 'NR == 1 {
            print "| head | loss | extra flags | val mAP | val micro-F1 | test mAP | test micro-F1 (tuned) | test macro-F1 | s |"
            print "|---|---|---|---|---|---|---|---|---|"; next }
        { printf "| `%s` | %s | %s | %.3f | %.3f | %.3f | %.3f | %.3f | %s |\n",
            $2, $3, ($4 == "" ? "" : "`" $4 "`"), $5, $6, $8, $9, $10, $11 }' "$RESULTS"
}

case ${1:-all} in
extract) extract ;;
grid) grid ;;
sweep) sweep ;;
table) table ;;
one) shift && run "$@" ;;
ensembles) ensembles ;;
ensembles-table) ensembles_table ;;
tokens) tokens ;;
tokens-runs) tokens_runs ;;
all) extract && grid && sweep && table ;;
*) echo "usage: $0 [extract|grid|sweep|table|all|ensembles|ensembles-table|tokens|one NAME HEAD LOSS FLAGS...]" >&2 && exit 2 ;;
esac
