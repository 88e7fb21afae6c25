"""Aux-loss-free MoE balancing on two real processes over gloo (DDP, DeepSpeed ZeRO-2, ZeRO-3): the loads are counted
over the whole step (Wang et al., arXiv 2408.15664), so they are all-reduced and every rank applies the same update.

Design of the comparison with one process: 16 texts of exactly 15 tokens (no padding anywhere), per-device batch 2
on 2 ranks against batch 4 on 1 rank. accelerate shards the seeded sampler's batches round-robin (rank r takes batch
r, r + 2, ...), so step 1 sees the same 4 rows either way; the bias after step 1 depends only on the loads routed
with the initial weights and a zero bias, so it must be bit-identical to the 1-process run once the loads are
all-reduced (and would not be without: each rank sees only half of them). Later steps differ from the 1-process run
in float rounding of the averaged gradients, so only step 1 is compared there; the two ranks are compared at every
step. Resumes under each backend are in tests/test_resume_matrix.py.
"""

import json
import os
import random
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from support import ROOT, two_process_launch

pytestmark = pytest.mark.slow

HELPER = str(ROOT / "tests" / "helpers" / "moe_ranks.py")
CONFIGS = {
    "ddp": ("cpu_2proc.yaml", "MULTI_CPU", None),
    "zero2": ("zero2.yaml", "DEEPSPEED", 2),
    "zero3": ("zero3.yaml", "DEEPSPEED", 3),
}
ROWS, TOKENS, TOP_K = 4, 15, 2  # rows per optimizer step, tokens per row (14 + EOS), experts per token


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 texts of exactly TOKENS - 1 tiny-tokenizer tokens (SFT appends EOS), as in test_moe_balance.py."""
    from posttrain.recipes.tiny import _WORDS, build_tokenizer

    tok, rng, rows = build_tokenizer(), random.Random(0), []
    while len(rows) < 16:
        text = " ".join(rng.choices(_WORDS, k=10))
        if len(tok(text, add_special_tokens=False)["input_ids"]) == TOKENS - 1:
            rows.append({"text": text})
    path = tmp_path_factory.mktemp("moe_data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(cmd, timeout=900):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def launch(config, record, data, out, *extra):
    run(two_process_launch(config, HELPER, str(record), data, str(out), *extra))
    return [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]


def single(record, data, out, *extra):
    run([sys.executable, HELPER, str(record), data, str(out), "--batch", "4", *extra])
    return json.loads((record / "rank0.json").read_text())


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_one")
    return {
        arch: single(root / f"rec_{arch}", data, root / f"out_{arch}", "--max_steps", "1", "--model", f"tiny:{arch}")
        for arch in ("deepseek_v3", "qwen3_moe")
    }


def saved_biases(checkpoint):
    state = load_file(str(checkpoint / "model.safetensors"))
    keys = sorted(k for k in state if k.endswith("e_score_correction_bias"))
    return [[x.hex() for x in state[k].double().tolist()] for k in keys], {str(state[k].dtype) for k in keys}


def check_ranks_and_step_one(ranks, reference, backend):
    _, distributed_type, zero_stage = CONFIGS[backend]
    r0, r1 = ranks
    assert r0["world"] == 2 and r0["distributed_type"] == distributed_type and r0["zero_stage"] == zero_stage
    assert r0["bias_dtypes"] == ["torch.float32"] * 2
    for a, b in zip(r0["steps"], r1["steps"]):  # every step, bit for bit
        assert a["bias"] == b["bias"] and a["counts"] == b["counts"], a["step"]
    first = r0["steps"][0]
    assert all(sum(c) == ROWS * TOKENS * TOP_K for c in first["counts"])  # both ranks' tokens, once each
    assert first["counts"] == reference["steps"][0]["counts"]
    assert first["bias"] == reference["steps"][0]["bias"]
    assert any(float.fromhex(x) != 0 for layer in first["bias"] for x in layer)


@pytest.mark.parametrize("backend", list(CONFIGS))
def test_biases_identical_on_ranks_equal_one_process_and_saved(backend, data, one_process, tmp_path):
    config = CONFIGS[backend][0]
    ranks = launch(config, tmp_path / "rec", data, tmp_path / "full", "--max_steps", "4", "--save_steps", "2")
    check_ranks_and_step_one(ranks, one_process["deepseek_v3"], backend)
    steps = {s["step"]: s for s in ranks[0]["steps"]}
    # the checkpoints' model.safetensors carry the biases, fp32, as the ranks held them (ZeRO-3: gathered at save)
    for n in (2, 4):
        biases, dtypes = saved_biases(tmp_path / "full" / f"checkpoint-{n}")
        assert biases == steps[n]["bias"] and dtypes == {"torch.float32"}
    # (a run resumed from checkpoint-2 retraces steps 3 and 4: tests/test_resume_matrix.py, on every backend)


def test_patched_qwen3_moe_under_zero3(data, one_process, tmp_path):
    # the bias buffer is installed after ZeRO-3 partitioned the model at load, before DeepSpeed wraps it
    ranks = launch(
        "zero3.yaml",
        tmp_path / "rec",
        data,
        tmp_path / "out",
        "--model",
        "tiny:qwen3_moe",
        "--max_steps",
        "2",
        "--save_steps",
        "2",
    )
    check_ranks_and_step_one(ranks, one_process["qwen3_moe"], "zero3")
    biases, _ = saved_biases(tmp_path / "out" / "checkpoint-2")
    assert biases == ranks[0]["steps"][1]["bias"]
