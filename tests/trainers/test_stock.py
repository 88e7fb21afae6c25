"""Every tiny LLM recipe runs 2 real training steps through the CLI, in this process (the auxiliary methods' tiny
recipes, e.g. modhifi/tiny, are a different kind of run: their own test files run them)."""

import json
import math

import pytest
import torch

from posttrain.cli import main
from posttrain.recipes.config import builtin_recipes, find_recipe, read_recipe_file
from posttrain.trainers import METHODS

TINY = [
    name
    for name in builtin_recipes()
    if name.endswith("/tiny") and METHODS[read_recipe_file(find_recipe(name))["method"]].task != "aux"
]


@pytest.mark.parametrize("name", TINY)
def test_tiny_recipe_runs_two_steps(name, tmp_path):
    assert main(["train", name, "--max_steps", "2", "--output_dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["world_size"] == 1
    assert math.isfinite(summary["train_loss"])
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()


def test_lion_k_drives_an_llm_recipe(tmp_path):
    from posttrain.recipes.config import load_recipe
    from posttrain.recipes.train import build_trainer
    from posttrain.trainers.classic.lion_k import LionK

    recipe = load_recipe(
        "dpo/tiny",
        {"optim": "lion_k", "optim_args": "K=l2", "max_steps": 2, "output_dir": str(tmp_path), "weight_decay": 0.1},
    )
    trainer = build_trainer(recipe)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(optimizer, LionK)
    group = optimizer.param_groups[0]
    assert group["K"] == "l2" and group["initial_lr"] == recipe.config.learning_rate and group["weight_decay"] == 0.1
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "Lion-K updated no parameter"


@pytest.mark.parametrize("name", ["dpo/tiny", "reward/tiny"])
def test_lora_through_model_config(name, tmp_path):
    argv = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj,v_proj"]
    assert main(["train", name, "--max_steps", "2", "--output_dir", str(tmp_path), *argv]) == 0
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    if name == "reward/tiny":  # the fresh score head must be trained and saved with the adapter
        assert adapter["task_type"] == "SEQ_CLS"
