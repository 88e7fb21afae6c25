"""Two real processes on CPU over gloo: DDP, DeepSpeed ZeRO-2 and ZeRO-3, for DPO, GRPO and SparsePO (the
constrained-RLHF multipliers' 2-process test is in tests/trainers/test_constrained_rlhf.py, beside the method).

The shipped accelerate configs are used as they are, with --num_processes 2 and --mixed_precision no
(bf16 is for GPUs). DeepSpeed JIT-builds its shm_comm op once per machine (about a minute, cached in
~/.cache/torch_extensions); the client torch optimizer keeps it at that.
"""

import json
import subprocess
import sys

import pytest
from support import ROOT, two_process_launch

pytestmark = pytest.mark.slow

CONFIGS = {
    "ddp": ("cpu_2proc.yaml", "MULTI_CPU", None),
    "zero2": ("zero2.yaml", "DEEPSPEED", 2),
    "zero3": ("zero3.yaml", "DEEPSPEED", 3),
}


def launch(config, recipe, output_dir, env, *extra):
    cmd = two_process_launch(
        config,
        "-m",
        "posttrain",
        "train",
        recipe,
        "--max_steps",
        "2",
        "--output_dir",
        str(output_dir),
        *extra,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((output_dir / "run_summary.json").read_text())


@pytest.mark.parametrize("recipe", ["dpo/tiny", "grpo/tiny", "sparsepo/tiny"])
@pytest.mark.parametrize("backend", list(CONFIGS))
def test_two_processes(backend, recipe, tmp_path, run_env):
    config, distributed_type, zero_stage = CONFIGS[backend]
    summary = launch(config, recipe, tmp_path, run_env)
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    assert summary["distributed_type"] == distributed_type and summary["zero_stage"] == zero_stage


def test_zero3_saves_a_full_checkpoint_that_reloads_in_a_fresh_process(tmp_path, run_env):
    launch("zero3.yaml", "dpo/tiny", tmp_path / "run", run_env, "--learning_rate", "1e-2")
    check = f"""
import torch
from transformers import AutoModelForCausalLM
from posttrain.recipes.tiny import tiny_model_path
trained = AutoModelForCausalLM.from_pretrained({str(tmp_path / "run")!r})
initial = AutoModelForCausalLM.from_pretrained(tiny_model_path("qwen3"))
t, i = trained.state_dict(), initial.state_dict()
assert t.keys() == i.keys(), set(t) ^ set(i)
assert all(t[k].shape == i[k].shape and torch.isfinite(t[k]).all() for k in t)
delta = max((t[k].float() - i[k].float()).abs().max().item() for k in t)
assert delta > 0, "weights did not change"
print("max delta", delta)
"""
    proc = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, env=run_env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0 and "max delta" in proc.stdout, proc.stderr[-3000:]
