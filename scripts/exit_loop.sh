#!/usr/bin/env bash
# scripts/exit_loop.sh [--runs N] [--load] [--only REGEX] [--logs DIR] [--port P]
#
# Exit-code soak test for 2-process CPU launches (a launch that trained correctly could still die with
# SIGABRT, "terminate called without an active exception", at interpreter exit). Runs every 2-process helper of
# tests/helpers/ and a 2-process `posttrain train --max_steps 2` of every tiny train recipe, N times each (default
# 30), round-robin so that an interrupted soak still has balanced counts, with the accelerate config the tests use
# (accelerate_configs/cpu_2proc.yaml: DDP over gloo).
#
#   --runs N      runs per target (default 30)
#   --load        keep one busy-looping process in the background (on a 2-core machine the ranks then fight for
#                 the CPU, as in a busy CI run)
#   --only REGEX  only the targets whose name matches (e.g. --only 'crlhf|train:grpo')
#   --logs DIR    where results.tsv and the logs of failing runs go (default: a new /tmp/exit_loop.XXXXXX); set
#                 `ulimit -c unlimited` first to keep a crashing rank's core dump beside its log
#   --port P      first rendezvous port; run i uses P + i % 100 (default 29800, away from the tests' 295xx)
#
# Prints a table (target, runs, non-zero exits, signals seen) and exits 1 if any run failed. One full round is
# 18 launches.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/.venv/bin}
RUNS=30 LOAD=0 ONLY=. LOGS="" PORT=29800
while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --load) LOAD=1; shift ;;
        --only) ONLY=$2; shift 2 ;;
        --logs) LOGS=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
LOGS=${LOGS:-$(mktemp -d /tmp/exit_loop.XXXXXX)}
mkdir -p "$LOGS/fail"
RESULTS=$LOGS/results.tsv
: > "$RESULTS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

TARGETS=(helper:crlhf_ranks helper:moe_ranks helper:resume_matrix helper:thr_split_group helper:wagle_distributed)
for r in sparsepo/tiny dpo/tiny kto/tiny reward/tiny sft/tiny grpo/tiny rloo/tiny thr_grpo/tiny constrained_rlhf/tiny \
         constrained_grpo/tiny wagle/tiny moe_balance/tiny_sft moe_balance/tiny_grpo; do
    TARGETS+=("train:$r")
done
SELECTED=()
for t in "${TARGETS[@]}"; do [[ $t =~ $ONLY ]] && SELECTED+=("$t"); done
[ ${#SELECTED[@]} -gt 0 ] || { echo "no target matches $ONLY" >&2; exit 2; }

HOG=""
table() {
    [ -n "$HOG" ] && kill "$HOG" 2>/dev/null
    echo
    printf '%-32s %5s %9s  %s\n' target runs non-zero signals
    local t failed=0
    for t in "${SELECTED[@]}"; do
        awk -F'\t' -v t="$t" '$1 == t { n++; if ($3 != 0) { bad++; if ($4 != "") sig[$4]++ } }
            END { s = ""; for (k in sig) s = s k "x" sig[k] " "; printf "%-32s %5d %9d  %s\n", t, n, bad, s }' "$RESULTS"
    done
    failed=$(awk -F'\t' '$3 != 0' "$RESULTS" | wc -l)
    echo "results: $RESULTS; logs of failing runs: $LOGS/fail"
    [ "$failed" -eq 0 ]
}
trap 'table; exit 130' INT TERM

if [ "$LOAD" = 1 ]; then
    "$BIN/python" -c 'while 1: pass' &
    HOG=$!
fi

# moe_ranks reads a text file; the same 16 rows of exactly 15 tokens as tests/test_moe_distributed.py's fixture.
MOE_DATA=$LOGS/moe_data.jsonl
"$BIN/python" - "$MOE_DATA" <<'EOF'
import json, random, sys
from posttrain.recipes.tiny import _WORDS, build_tokenizer
tok, rng, rows = build_tokenizer(), random.Random(0), []
while len(rows) < 16:
    text = " ".join(rng.choices(_WORDS, k=10))
    if len(tok(text, add_special_tokens=False)["input_ids"]) == 14:
        rows.append({"text": text})
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows))
EOF

n=0
for ((i = 1; i <= RUNS; i++)); do
    for t in "${SELECTED[@]}"; do
        work=$(mktemp -d "$LOGS/run.XXXXXX")
        launch=("$BIN/accelerate" launch --config_file "$ROOT/accelerate_configs/cpu_2proc.yaml" --num_processes 2
                --mixed_precision no --main_process_port $((PORT + n % 100)))
        case $t in
            helper:moe_ranks) cmd=("${launch[@]}" "$ROOT/tests/helpers/moe_ranks.py" "$work/rec" "$MOE_DATA" "$work/out") ;;
            # one case (a 4-step run and its resume) keeps a round short; tests/test_resume_matrix.py runs them all
            helper:resume_matrix) cmd=("${launch[@]}" "$ROOT/tests/helpers/resume_matrix.py" "$work/out"
                                       '{"constrained_rlhf": ["constrained_rlhf/tiny", {}]}') ;;
            helper:*) cmd=("${launch[@]}" "$ROOT/tests/helpers/${t#helper:}.py" "$work/out") ;;
            train:*) cmd=("${launch[@]}" -m posttrain train "${t#train:}" --max_steps 2 --output_dir "$work/out") ;;
        esac
        start=$SECONDS
        # run inside $work: with `ulimit -c unlimited` a crashing rank leaves its core there
        (cd "$work" && timeout 900 "${cmd[@]}") > "$work/log" 2>&1
        rc=$?
        # torchrun names a dead rank's signal ("exitcode : -6"); 124 is our timeout
        sig=$(grep -oE 'exitcode *: *-[0-9]+' "$work/log" | grep -oE '[0-9]+$' | sort -u | sed 's/^/SIG/' | paste -sd, -)
        printf '%s\t%d\t%d\t%s\t%d\n' "$t" "$i" "$rc" "$sig" $((SECONDS - start)) >> "$RESULTS"
        printf '%s run %d: rc=%d %s (%ds)\n' "$t" "$i" "$rc" "$sig" $((SECONDS - start))
        if [ "$rc" -ne 0 ]; then
            rm -rf "$work/out" "$work/rec"
            mv "$work" "$LOGS/fail/${t//[:\/]/_}-$i"
        else
            rm -rf "$work"
        fi
        n=$((n + 1))
    done
done
table
