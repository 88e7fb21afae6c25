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

# 0.5B Qwen2-shaped random model, bf16, single GPU, method vs parent in one process (stock vs stock for now).
BENCH=(--model qwen2-0.5b-random --bf16 true --dtype bfloat16 --steps 10 --warmup 2)
echo "== bench: single GPU"
timeout 120 python3 bench/compare.py dpo "${BENCH[@]}" --per_device_train_batch_size 8 --max_length 512 --out "$OUT/bench_dpo.json"
timeout 150 python3 bench/compare.py grpo "${BENCH[@]}" --per_device_train_batch_size 8 --num_generations 8 \
  --max_completion_length 128 --out "$OUT/bench_grpo.json"
echo "== bench: ZeRO-2, 1 GPU (two launches)"
MODEL=$(python3 -c "import sys; sys.path.insert(0, 'bench'); from compare import random_qwen2_05b; print(random_qwen2_05b())")
timeout 150 python3 bench/launch_compare.py dpo --config accelerate_configs/zero2.yaml --num_processes 1 \
  --model_name_or_path "$MODEL" --bf16 true --dtype bfloat16 --max_steps 10 --per_device_train_batch_size 8 \
  --max_length 512 --logging_steps 5 --out "$OUT/bench_dpo_zero2.json"
echo "== done"
