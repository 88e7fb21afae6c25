"""GPU-only checks (skipped without CUDA; run by scripts/gpu_check.sh on a lent GPU machine, which sets
POSTTRAIN_REQUIRE_CUDA=1 so that a CUDA that fails to start fails these tests instead of skipping them)."""

import json
import math

import pytest
import torch

from posttrain.cli import main

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["dpo/tiny", "grpo/tiny", "sft/tiny"])
def test_tiny_recipe_in_bf16_on_the_gpu(name, tmp_path):
    assert (
        main(
            ["train", name, "--max_steps", "3", "--bf16", "true", "--dtype", "bfloat16", "--output_dir", str(tmp_path)]
        )
        == 0
    )
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["global_step"] == 3 and math.isfinite(summary["train_loss"])
    # the run really trained on the GPU: the Trainer chose CUDA, and the saved weights are bf16
    assert summary["distributed_type"] == "NO" and torch.cuda.max_memory_allocated() > 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_recipe_without_bf16_key_uses_the_trl_default_on_gpu():
    from posttrain.recipes.config import load_recipe

    recipe = load_recipe("dpo/smollm2-135m")
    assert recipe.config.bf16 is True and recipe.config.use_cpu is False and torch.cuda.is_available()


def test_trl_triton_logprob_kernel_compiles_and_matches_torch():
    # TRL's fused log-softmax/gather/entropy is a Triton kernel used on CUDA only; GRPO-like trainers go through it
    from transformers.utils import is_triton_available
    from trl.trainer.utils import _supports_trl_loss_kernel, entropy_from_logits, selective_log_softmax

    torch.manual_seed(0)
    logits = torch.randn(4, 33, 151936, device="cuda", dtype=torch.bfloat16)
    index = torch.randint(0, logits.shape[-1], logits.shape[:-1], device="cuda")
    assert is_triton_available() and _supports_trl_loss_kernel(logits, index)
    got = selective_log_softmax(logits, index)
    want = torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.isfinite(got).all() and torch.allclose(got.float(), want, atol=2e-2, rtol=0)
    entropy = entropy_from_logits(logits)
    p = torch.softmax(logits.float(), -1)
    assert torch.allclose(entropy.float(), -(p * torch.log_softmax(logits.float(), -1)).sum(-1), atol=2e-2, rtol=0)
