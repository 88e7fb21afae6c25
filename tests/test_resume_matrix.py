"""The resume matrix: every method with state x {2-process DDP, ZeRO-2, ZeRO-3}, on real gloo launches.

For each case an uninterrupted 4-step run and a run resumed from its checkpoint-2 must log the same losses and save
the same method state at steps 3 and 4 (1e-6), both ranks must hold the same state bit for bit, and the state must
have moved after checkpoint-2 (or the comparison would prove nothing). One launch per backend runs every case
(tests/helpers/resume_matrix.py), to keep CI time in check. The single-process resumes are in test_durability.py,
test_wagle.py and test_moe_balance.py.
"""

import json
import os
import subprocess

import pytest
import torch
from support import ROOT, assert_same_state, method_state, two_process_launch

pytestmark = pytest.mark.slow

BACKENDS = {
    "ddp": ("cpu_2proc.yaml", "MULTI_CPU", None),
    "zero2": ("zero2.yaml", "DEEPSPEED", 2),
    "zero3": ("zero3.yaml", "DEEPSPEED", 3),
}
MOE = {"moe_bias_rate": 1e-2, "learning_rate": 1e-2}
SOFTMAX_MOE = {**MOE, "moe_bias_on_softmax": True}  # Qwen3-MoE / Mixtral route with softmax: allowed explicitly
# case -> (recipe, overrides): every method with state, ALF-LB on three router families (DeepSeek-V3's own bias,
# patched Qwen3-MoE and Mixtral, whose checkpoint renames its router)
CASES = {
    "sparsepo": ("sparsepo/tiny", {"learning_rate": 1e-3}),
    # two optimizer steps per generation batch: the per-optimizer-step multipliers step mid-generation
    "constrained_rlhf": ("constrained_rlhf/tiny", {"steps_per_generation": 2}),
    "constrained_grpo": ("constrained_grpo/tiny", {}),
    "wagle": ("wagle/tiny", {"objective": "npo", "mask_ratio": 0.5}),  # NPO: its reference is a second engine
    "moe_deepseek_v3": ("moe_balance/tiny_sft", MOE),
    "moe_qwen3_moe": ("moe_balance/tiny_sft", {**SOFTMAX_MOE, "model_name_or_path": "tiny:qwen3_moe"}),
    "moe_mixtral": ("moe_balance/tiny_sft", {**SOFTMAX_MOE, "model_name_or_path": "tiny:mixtral"}),
}


@pytest.fixture(scope="module", params=list(BACKENDS))
def matrix(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"resume-{request.param}")
    cmd = two_process_launch(
        BACKENDS[request.param][0], str(ROOT / "tests" / "helpers" / "resume_matrix.py"), str(out), json.dumps(CASES)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return request.param, out


def logged(folder) -> dict[int, dict]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry for entry in history if "loss" in entry}


def differs(a, b) -> bool:
    try:
        assert_same_state(a, b)
    except AssertionError:
        return True
    return False


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_continues_the_same_trajectory(matrix, case):
    backend, out = matrix
    full, resumed = out / case / "full", out / case / "resumed"
    _, distributed_type, zero_stage = BACKENDS[backend]
    ranks = {
        run: [torch.load(out / case / run / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        for run in ("full", "resumed")
    }
    assert ranks["full"][0]["meta"] == {"world": 2, "distributed_type": distributed_type, "zero_stage": zero_stage}
    assert not (resumed / "checkpoint-2").exists() and (resumed / "checkpoint-3").is_dir()
    a, b = logged(full / "checkpoint-4"), logged(resumed / "checkpoint-4")
    for step in (3, 4):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6), (step, a[step], b[step])
        assert_same_state(
            method_state(resumed / f"checkpoint-{step}"),
            method_state(full / f"checkpoint-{step}"),
            atol=1e-6,
            where=f"checkpoint-{step}",
        )
    assert differs(method_state(full / "checkpoint-2"), method_state(full / "checkpoint-4"))  # the state moved
    for run, (r0, r1) in ranks.items():  # what each rank holds at the end: the same bits, and what was saved
        assert_same_state(r0["state"], r1["state"], where=f"{run} rank 1")
        assert_same_state(r0["state"], method_state(out / case / run / "checkpoint-4"), where=f"{run} saved")
