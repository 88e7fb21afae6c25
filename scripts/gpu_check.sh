#!/usr/bin/env bash
# All GPU checks and benchmarks in one call on a lent GPU machine (see BENCHMARKS.md):
#   here, once:   ../shared/tools/device-wheels.sh          (packs trl, datasets, deepspeed... into .whl/)
#   device run:   bash scripts/gpu_check.sh                 with carry [".whl"], timeout ~480 s
# Writes nvidia-smi.txt, gpu_tests.txt, bench_*.json and gpu_check.log under $OUT.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false POSTTRAIN_CACHE=/tmp/posttrain-cache
nvidia-smi > "$OUT/nvidia-smi.txt"; head -12 "$OUT/nvidia-smi.txt"
cd /tmp && python3 -c "import posttrain, trl, deepspeed; print('posttrain', posttrain.__version__, 'trl', trl.__version__)"; cd - >/dev/null

echo "== gpu-marked tests"
if python3 -c "import pytest" 2>/dev/null; then
  timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
else
  echo "pytest is not installed on this machine: skipped" | tee "$OUT/gpu_tests.txt"
fi

# A 0.5B Qwen2-shaped random model (no download: the lent machine reaches nothing), bf16, single GPU. Each method
# against its TRL parent in one process on the same batches (bench/compare.py), then ALF-LB and WAGLE phase 1.
BENCH=(--model qwen2-0.5b-random --bf16 true --dtype bfloat16 --steps 10 --warmup 2)
echo "== bench: single GPU, method vs parent"
timeout 90 python3 bench/compare.py sparsepo "${BENCH[@]}" --per_device_train_batch_size 8 --max_length 512 \
  --out "$OUT/bench_sparsepo.json"
timeout 110 python3 bench/compare.py thr_grpo "${BENCH[@]}" --per_device_train_batch_size 8 --num_generations 8 \
  --max_completion_length 128 --out "$OUT/bench_thr_grpo.json"
# the recipe's VADER / profanity rewards are not among the carried wheels: two built-in streams instead
timeout 110 python3 bench/compare.py constrained_rlhf "${BENCH[@]}" --reward_funcs "[length_fraction, length_penalty]" \
  --constraint_thresholds "[0.5, 0.0]" --per_device_train_batch_size 8 --num_generations 8 --max_completion_length 128 \
  --out "$OUT/bench_constrained_rlhf.json"
timeout 60 python3 bench/moe_bench.py --steps 40 --out "$OUT/bench_moe_balance.json"
echo "== bench: WAGLE phase 1 (the CUDA allocator's peak against model + 3 fp32 copies)"
timeout 80 python3 bench/wagle_attribution.py --model qwen2-0.5b-random --out "$OUT/bench_wagle_attribution.json"
echo "== done"
