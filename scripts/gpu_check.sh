#!/usr/bin/env bash
# bash scripts/gpu_check.sh             on a lent GPU machine: device run with carry [".whl"], timeout_s 420
# bash scripts/gpu_check.sh --dry-run   here, on a CPU: the same steps in a device-like environment, at tiny size
#
# All GPU checks and benchmarks in one call (see BENCHMARKS.md). Before it, here, once: ../shared/tools/device-wheels.sh
# packs trl, datasets, deepspeed, ... into .whl/. The steps share one time budget (GPU_CHECK_BUDGET, 330 s), so the
# whole call ends inside a 7-minute timeout and a rerun still fits in a session's 15 device minutes; a step that
# runs out of time is stopped and recorded (the benches write their results after every measured step). Each step's
# exit code goes into a table at the end, and the script exits non-zero if any step failed. Under $OUT (6 files):
# gpu_check.log (everything, nvidia-smi included) and bench_*.json.
#
# The dry run builds a venv like the device image (/tmp/gpu-dry/venv: the image's packages, transformers 5.17,
# this machine's torch 2.13 CPU wheel where the image has 2.11 + CUDA), installs the carried wheels into a --target
# folder on PYTHONPATH exactly as on the device (the Python-3.12-only wheels swapped for this interpreter's build
# of the same version), and runs every step's Python entry with CUDA absent: the GPU tests are only collected
# (imported), the benches run at tiny size.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT"
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
BUDGET=${GPU_CHECK_BUDGET:-330}
START=$SECONDS  # reset after the dry run's venv build
if [ $DRY = 1 ]; then
  WORK=/tmp/gpu-dry; OUT=${OUT:-$WORK/out}; SITE=$WORK/site
else
  OUT=${OUT:-$PWD/gpu_out}; SITE=/tmp/site
fi
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
# unbuffered, so a step stopped by its timeout leaves its output; safe path, so `python3 -m ...` and pytest import
# the installed posttrain, not the source tree's posttrain/ folder (which lacks the mapped subpackages)
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export POSTTRAIN_CACHE=${POSTTRAIN_CACHE:-/tmp/posttrain-cache}

NAMES=(); CODES=(); TIMES=()
step() {  # step NAME MAX_SECONDS CMD...: run under the smaller of its own limit and what is left of the budget
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - (SECONDS - START) )); [ "$left" -lt "$limit" ] && limit=$left
  local t0=$SECONDS rc
  echo; echo "== $name (limit ${limit} s, $(( SECONDS - START )) s into the run)"
  if [ "$limit" -le 5 ]; then echo "no time left: skipped"; rc=124
  else timeout -k 5 "$limit" "$@"; rc=$?; fi
  NAMES+=("$name"); CODES+=("$rc"); TIMES+=("$(( SECONDS - t0 ))")
  echo "== $name: exit $rc after $(( SECONDS - t0 )) s"
}

summary() {
  echo; echo "| step | exit | seconds |"; echo "|---|---|---|"
  local failed=0
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${CODES[$i]} | ${TIMES[$i]} |"; [ "${CODES[$i]}" = 0 ] || failed=1
  done
  echo "total $(( SECONDS - START )) s; $([ $failed = 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED')"
  exit $failed
}
trap summary EXIT

if [ $DRY = 1 ]; then
  # a venv like the device image (its package list: /work/.library/device/KINDS.md)
  if [ ! -x $WORK/venv/bin/python3 ]; then
    python3 -m venv $WORK/venv || exit 1
    $WORK/venv/bin/pip install -q --progress-bar off torch==2.13.0 transformers==5.17.0 accelerate==1.15.0 numpy pyarrow pandas psutil \
      pyyaml safetensors tokenizers huggingface_hub tqdm pytest matplotlib jinja2 einops msgpack ninja py-cpuinfo \
      regex filelock fsspec xxhash requests setuptools wheel typer packaging 2> >(grep -v "^WARNING: Location" >&2) \
      || { rm -rf $WORK/venv; exit 1; }
  fi
  export PATH=$WORK/venv/bin:$PATH
  # the carried wheels, with those built for Python 3.12 only replaced by this interpreter's build of the same version
  rm -rf $WORK/whl && mkdir -p $WORK/whl && cp .whl/*.whl $WORK/whl/ || { echo "no .whl/: run ../shared/tools/device-wheels.sh"; exit 1; }
  for w in $WORK/whl/*-cp312-*.whl $WORK/whl/*-py312-*.whl; do
    [ -e "$w" ] || continue
    base=$(basename "$w"); name=${base%%-*}; rest=${base#*-}; version=${rest%%-*}; rm "$w"
    python3 -m pip download -q --no-deps --only-binary=:all: -d $WORK/whl "$name==$version" 2> >(grep -v "^WARNING: Location" >&2) || exit 1
  done
  WHEELS=$WORK/whl; START=$SECONDS
else
  WHEELS=.whl
  nvidia-smi; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
fi

rm -rf "$SITE"
step "install wheels + posttrain" 90 bash -c "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target $SITE $WHEELS/*.whl && PYTHONPATH=$SITE python3 -m pip install -q --no-index --no-deps \
  --no-build-isolation --upgrade --target $SITE ."
[ "${CODES[0]}" = 0 ] || exit 1
export PYTHONPATH=$SITE
step "versions" 60 python3 scripts/env_report.py

# A 0.5B Qwen2-shaped random model (no download: the lent machine reaches nothing), bf16, one GPU. Each method against
# its TRL parent in one process on the same batch (bench/compare.py). The generating methods get rewards that read
# the token ids (a random model writes nothing a real reward can score), so THR sees mixed groups and constrained
# RLHF two live reward streams; DPO/SparsePO get 512-token pairs, so the DPO step's MFU means something.
TMP=$(mktemp -d)
pairs() {  # pairs PROMPT_WORDS COMPLETION_WORDS: 64 preference pairs of common words (the tiny tokenizer's pieces)
  python3 - "$TMP/pairs.jsonl" "$1" "$2" <<'EOF'
import json, random, sys
rng = random.Random(0)
words = "the of and to in is that for it as with was on be by this are or from at an which have not one all".split()
text = lambda n: " ".join(rng.choice(words) for _ in range(int(n)))
with open(sys.argv[1], "w") as f:
    for _ in range(64):  # completions start with a space, so no token merges across the prompt/completion boundary
        f.write(json.dumps({"prompt": text(sys.argv[2]), "chosen": " " + text(sys.argv[3]), "rejected": " " + text(sys.argv[3])}) + "\n")
EOF
}
if [ $DRY = 1 ]; then
  step "gpu tests (collected only: no CUDA)" 100 python3 -m pytest -m gpu -q -p no:cacheprovider --collect-only tests/test_gpu.py
  SIZE=(--steps 1 --warmup 0); GEN=(--max_completion_length 8); LEN=(--max_length 64); WAGLE=(--model tiny:qwen3 --examples 4 --batch 2)
  MOE=(--steps 2 --warmup 0); pairs 5 10
else
  step "gpu tests" 100 env POSTTRAIN_REQUIRE_CUDA=1 python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py
  SIZE=(--model qwen2-0.5b-random --bf16 true --dtype bfloat16 --steps 6 --warmup 2); GEN=(--max_completion_length 64)
  LEN=(--max_length 512); WAGLE=(--model qwen2-0.5b-random); MOE=(--steps 20 --warmup 4); pairs 60 250
fi
step "bench sparsepo vs dpo" 75 python3 bench/compare.py sparsepo "${SIZE[@]}" --dataset "$TMP/pairs.jsonl" \
  --per_device_train_batch_size 8 "${LEN[@]}" --kl_chunk_size 512 --out "$OUT/bench_sparsepo.json"
step "bench thr_grpo vs grpo" 75 python3 bench/compare.py thr_grpo "${SIZE[@]}" --reward_funcs "[bench_id_parity]" \
  --per_device_train_batch_size 8 --num_generations 8 "${GEN[@]}" --out "$OUT/bench_thr_grpo.json"
step "bench constrained_rlhf vs rloo" 75 python3 bench/compare.py constrained_rlhf "${SIZE[@]}" \
  --reward_funcs "[bench_even_id_fraction, bench_id_parity]" --constraint_thresholds "[0.5, 0.5]" \
  --per_device_train_batch_size 8 --num_generations 8 "${GEN[@]}" --out "$OUT/bench_constrained_rlhf.json"
step "bench wagle phase 1" 50 python3 bench/wagle_attribution.py "${WAGLE[@]}" --out "$OUT/bench_wagle_attribution.json"
step "bench moe_balance" 40 python3 bench/moe_bench.py "${MOE[@]}" --out "$OUT/bench_moe_balance.json"
rm -rf "$TMP"
