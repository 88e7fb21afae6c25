"""GPU-only checks (skipped without CUDA; run by scripts/gpu_check.sh on a lent GPU machine)."""

import json

import pytest
import torch

from posttrain.cli import main

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["dpo/tiny", "grpo/tiny", "sft/tiny"])
def test_tiny_recipe_in_bf16_on_the_gpu(name, tmp_path):
    assert main(["train", name, "--max_steps", "3", "--bf16", "true", "--dtype", "bfloat16", "--output_dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["train_loss"] == summary["train_loss"]  # not NaN


def test_recipe_without_bf16_key_uses_the_trl_default_on_gpu():
    from posttrain.recipes.config import load_recipe

    recipe = load_recipe("dpo/smollm2-135m")
    assert recipe.config.bf16 is True and recipe.config.use_cpu is False and torch.cuda.is_available()
