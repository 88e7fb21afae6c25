"""Expert biases of patched routers (Qwen2-MoE, Qwen3-MoE, Mixtral) survive save and load bit for bit.

transformers 5.24 saves some modules under their hub names (Mixtral's ``mlp`` as ``block_sparse_moe``), so the
checkpoint's bias keys need not be the model's; ``load_expert_biases`` maps them as ``from_pretrained`` does. One real
``posttrain train`` per architecture (aux-free, 2 steps) feeds four checks: ``posttrain eval`` routes with the trained
biases, ``from_pretrained`` + ``restore_expert_biases`` restores them, a missing bias is one clear error, and a run
resumed from its checkpoint-1 ends with the same biases.
"""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from posttrain.cli import main
from posttrain.trainers.moe_balance import install_expert_bias, restore_expert_biases
from posttrain.trainers.moe_routers import BIAS_NAME, expert_biases, find_routers, load_expert_biases

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral"]


def _layer(key):
    return int(re.search(r"layers\.(\d+)\.", key).group(1))


def _by_layer(model):
    """{layer index: bias} of a model's routers, named independently of any checkpoint renaming."""
    return {_layer(name): bias for (name, _), bias in zip(find_routers(model), expert_biases(model), strict=True)}


def _run_args(arch):
    return [
        "--model_name_or_path",
        f"tiny:{arch}",
        "--max_steps",
        "2",
        "--moe_bias_rule",
        "proportional",
        "--moe_bias_rate",
        "0.05",
        "--moe_bias_on_softmax",
        "true",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
    ]


@pytest.fixture(scope="module", params=ARCHS)
def trained(request, tmp_path_factory):
    """(arch, output folder, {layer: bias as saved}) of a 2-step aux-free SFT run of the tiny ``arch`` model."""
    arch = request.param
    out = tmp_path_factory.mktemp(f"bias-{arch}")
    # proportional steps of 0.05 x load error: no layer's bias comes back to exactly zero (sign steps can cancel),
    # and the values use the whole fp32 mantissa, so "bit for bit" means something
    assert main(["train", "moe_balance/tiny_sft", *_run_args(arch), "--output_dir", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        saved = {_layer(k): f.get_tensor(k) for k in f.keys() if k.endswith(BIAS_NAME)}
    assert sorted(saved) == [0, 1] and all(b.dtype == torch.float32 and b.abs().sum() > 0 for b in saved.values())
    # what was saved is what training ended with: the logged bias norm of the last step
    last = json.loads((out / "run_summary.json").read_text())["metrics"]["moe/bias_norm"]["last"]
    assert torch.cat(list(saved.values())).double().norm().item() == pytest.approx(last, rel=1e-6)
    return arch, out, saved


def _assert_same(model, saved):
    got = _by_layer(model)
    assert sorted(got) == sorted(saved)
    for layer, bias in saved.items():
        assert got[layer].dtype == torch.float32 and torch.equal(got[layer], bias), layer


def test_eval_cli_routes_with_the_trained_biases(trained, tmp_path, monkeypatch):
    import posttrain.evals.common as common

    arch, out, saved = trained
    loaded = []
    real = common.load_checkpoint

    def spy(*args, **kwargs):  # the harness imports load_checkpoint at run time: record what it evaluates
        result = real(*args, **kwargs)
        loaded.append(result[0])
        return result

    monkeypatch.setattr(common, "load_checkpoint", spy)
    assert (
        main(
            [
                "eval",
                "--model",
                str(out),
                "--tasks",
                "moe_balance,perplexity",
                "--limit",
                "4",
                "--no_cache",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert len(loaded) == 1
    _assert_same(loaded[0], saved)
    results = json.loads((tmp_path / "results.json").read_text())["results"][str(out)]
    assert set(results["moe_balance"]["per_layer"]) == {"layer0", "layer1"}
    assert results["perplexity"]["metrics"]["perplexity"] > 0


def test_from_pretrained_then_restore(trained):
    from transformers import AutoModelForCausalLM

    arch, out, saved = trained
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any(k.endswith(BIAS_NAME) for k in model.state_dict())  # stock transformers drops them
    assert restore_expert_biases(model, out) == 2
    _assert_same(model, saved)
    assert restore_expert_biases(model, out) == 0  # already there: nothing to do


def test_missing_bias_is_one_clear_error(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    arch, out, _ = trained
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if not (k.endswith(BIAS_NAME) and _layer(k) == 1)}
    save_file(kept, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(out)
    install_expert_bias(model)
    with pytest.raises(KeyError, match=rf"no saved {BIAS_NAME} for 1 of 2 routers: model\.layers\.1\.mlp\.gate\."):
        load_expert_biases(model, tmp_path)


def test_resume_restores_the_biases(trained, tmp_path):
    # --resume from checkpoint-1 (the method state carries the biases under the model's own names, whatever the
    # checkpoint layout calls them) must end step 2 with the uninterrupted run's biases, bit for bit
    arch, out, saved = trained
    assert (
        main(
            [
                "train",
                "moe_balance/tiny_sft",
                *_run_args(arch),
                "--output_dir",
                str(tmp_path),
                "--resume_from_checkpoint",
                str(out / "checkpoint-1"),
            ]
        )
        == 0
    )
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        resumed = {_layer(k): f.get_tensor(k) for k in f.keys() if k.endswith(BIAS_NAME)}
    assert sorted(resumed) == sorted(saved) and all(torch.equal(resumed[k], saved[k]) for k in saved)
