"""Weight Compander (WC-like): the compander's contract, the digits mechanism criteria, and the LLM wiring (tiny
Qwen3, full weights and LoRA): the function is kept at attach, saves reload in plain transformers / peft with the
companded weights baked in, and --resume restores v, bound and slope."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from posttrain.trainers.classic.weight_compander import (
    Compander,
    apply_weight_compander,
    baked_state_dict,
    compand,
    compand_inverse,
    companded_layers,
    compare_arms,
    inverse_softplus,
)

torch.set_num_threads(1)


def test_compander_contract_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        bound, slope = float(torch.rand(1, generator=g)) * 2 + 0.05, 1 + float(torch.rand(1, generator=g)) * 4
        c = Compander(bound, slope).double()
        assert c.bound.item() == pytest.approx(bound) and c.slope.item() == pytest.approx(slope)
        v = torch.randn(1000, generator=g, dtype=torch.float64) * 3
        w = c(v)
        torch.testing.assert_close(c(-v), -w)  # odd
        assert (w.abs() <= c.bound).all() and (w.abs() < c.bound).any()  # bounded (tanh rounds to 1 far out)
        order = torch.argsort(v)
        assert (torch.diff(w[order]) >= 0).all()  # monotone
        zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(c(zero).sum(), zero)
        assert grad.item() == pytest.approx(slope)  # WC'(0) = slope > 1
        inside = torch.rand(100, generator=g, dtype=torch.float64) * 1.8 * bound - 0.9 * bound
        torch.testing.assert_close(compand(compand_inverse(inside, c.bound, c.slope), c.bound, c.slope), inside)
    assert inverse_softplus(0.3) == pytest.approx(float(torch.log(torch.expm1(torch.tensor(0.3, dtype=torch.float64)))))
    with pytest.raises(ValueError, match="slope"):
        Compander(0.5, 1.0)


def test_any_linear_keeps_its_function_and_learns_theta():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    before = net(x).detach()
    names = apply_weight_compander(net, "all-linear", bound_scale=2.0, slope=3.0, exclude=())
    assert names == ["0", "2"] and set(companded_layers(net)) == {"0", "2"}
    torch.testing.assert_close(net(x), before, atol=1e-6, rtol=1e-5)
    net(x).square().sum().backward()
    comp = net[0].parametrizations.weight
    assert comp.original.grad is not None and comp[0].rho.grad is not None and comp[0].sigma.grad is not None
    baked = baked_state_dict(net)
    assert set(baked) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    plain = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    plain.load_state_dict(baked)
    torch.testing.assert_close(plain(x), net(x))


def test_digits_mechanism_criteria(tmp_path):
    """Spec criteria on the 5-seed means: (a) max |w| under WC <= 0.7 x baseline; (b) fewer near-zero weights
    (|w| < 1e-2 std w); (c) test accuracy >= baseline - 0.5 pp. The generalisation gain is reported, not gated."""
    runs = compare_arms(seeds=(0, 1, 2, 3, 4), output_dir=str(tmp_path))
    mean = {
        arm: {k: float(np.mean([r[k] for r in rows])) for k in ("max_abs_w", "near_zero_frac", "test_acc")}
        for arm, rows in runs.items()
    }
    base, wc = mean["baseline"], mean["wc"]
    assert wc["max_abs_w"] <= 0.7 * base["max_abs_w"], mean
    assert wc["near_zero_frac"] < base["near_zero_frac"], mean
    assert wc["test_acc"] >= base["test_acc"] - 0.005, mean
    bounds = [v for k, v in runs["wc"][0].items() if k.startswith("bound/")]
    assert len(bounds) == 3 and all(b != pytest.approx(0.25, abs=1e-4) for b in bounds)  # bound was learned
    assert (tmp_path / "wc-seed0" / "results.json").is_file()


def test_digits_resume_continues_the_same_trajectory(tmp_path):
    from posttrain.trainers.classic.weight_compander import WeightCompanderConfig, WeightCompanderTrainer

    cfg = dict(max_steps=12, output_dir=str(tmp_path))
    full = WeightCompanderTrainer(WeightCompanderConfig(**cfg))
    for _ in range(12):
        full.step()
    part = WeightCompanderTrainer(WeightCompanderConfig(**cfg))
    for _ in range(5):
        part.step()
    resumed = WeightCompanderTrainer(WeightCompanderConfig(**cfg))
    resumed.load_state_dict(part.state_dict())
    for _ in range(7):
        resumed.step()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# --- LLM recipes ------------------------------------------------------------------------------------------------


def _batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def _logits(model, batch):
    model.eval()  # LoRA dropout off
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits


def test_llm_attach_keeps_the_model_and_saves_plain_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.recipes.config import load_recipe
    from posttrain.recipes.train import build_trainer

    over = {"max_steps": 2, "output_dir": str(tmp_path / "run"), "save_strategy": "steps", "save_steps": 1}
    stock = build_trainer(load_recipe("sft/tiny", over))
    trainer = build_trainer(load_recipe("weight_compander/tiny", over))
    batch = _batch(trainer)
    torch.testing.assert_close(_logits(trainer.model, batch), _logits(stock.model, batch), atol=1e-5, rtol=1e-4)
    layers = companded_layers(trainer.model)
    assert len(layers) == 14 and not any("lm_head" in n for n in layers)  # 2 layers x 7 projections
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    # the final folder is a plain transformers model with WC(v) baked in
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run"), dtype=torch.float32)
    torch.testing.assert_close(_logits(plain, batch), _logits(trainer.model, batch), atol=1e-6, rtol=1e-5)
    name = next(iter(layers))
    comp = layers[name].parametrizations.weight[0]
    assert plain.get_submodule(name).weight.abs().max() < comp.bound
    # --resume restores v, bound and slope (method_state.pt) and continues the same trajectory
    resumed = build_trainer(load_recipe("weight_compander/tiny", {**over, "output_dir": str(tmp_path / "run2")}))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    for (n, a), (m, b) in zip(trainer.model.named_parameters(), resumed.model.named_parameters()):
        assert n == m
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)
    state = torch.load(tmp_path / "run" / "checkpoint-1" / "method_state.pt")["WeightCompanderCallback"]
    assert set(state) == set(layers)


def test_llm_lora_compands_the_adapters(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.recipes.config import load_recipe
    from posttrain.recipes.train import build_trainer

    over = {
        "max_steps": 2,
        "output_dir": str(tmp_path),
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "weight_compander_modules": "all-linear",
        "weight_compander_bound": 0.05,
        "weight_compander_slope": 3.0,
        "learning_rate": 1e-2,
        "save_strategy": "steps",
        "save_steps": 1,
    }
    trainer = build_trainer(load_recipe("sft/tiny", over))
    layers = companded_layers(trainer.model)
    assert len(layers) == 8 and all(
        ".lora_A." in n or ".lora_B." in n for n in layers
    )  # 2 layers x 2 x (A, B): all-linear means every adapter, no frozen Linear
    base_weight = trainer.model.get_submodule(next(iter(layers)).split(".lora_")[0]).base_layer
    assert not hasattr(base_weight, "parametrizations")  # the frozen base weight is left as it is
    trainer.train()
    trainer.save_model(str(tmp_path))
    adapter_keys = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert set(adapter_keys) == {"q_proj", "v_proj"}
    batch = _batch(trainer)
    base = AutoModelForCausalLM.from_pretrained(
        trainer.model.base_model.model.config._name_or_path, dtype=torch.float32
    )
    reloaded = PeftModel.from_pretrained(base, str(tmp_path))
    torch.testing.assert_close(_logits(reloaded, batch), _logits(trainer.model, batch), atol=1e-6, rtol=1e-5)
    lora_b = [m.weight.detach() for n, m in layers.items() if ".lora_B." in n]
    assert max(float(w.abs().max()) for w in lora_b) > 0  # B moved off zero through the compander
    # --resume of a LoRA run restores the adapters' v, bound and slope and continues the same trajectory
    resumed = build_trainer(load_recipe("sft/tiny", {**over, "output_dir": str(tmp_path / "resumed")}))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    trainer.model.train(), resumed.model.train()
    for (n, a), (m, b) in zip(trainer.model.named_parameters(), resumed.model.named_parameters()):
        assert n == m
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"weight_compander_slope": 1.0, "weight_compander_modules": "all-linear"}, "slope must be a number > 1"),
        (
            {"weight_compander_bond": 1.0, "weight_compander_modules": "all-linear"},
            "did you mean 'weight_compander_bound'",
        ),
        ({"weight_compander_slope": 2.0}, "need weight_compander_modules"),
        (
            {
                "weight_compander_modules": "all-linear",
                "weight_compander_bound": 0.1,
                "weight_compander_bound_scale": 2.0,
            },
            "not both",
        ),
    ],
)
def test_bad_llm_keys_are_one_clear_error(over, message):
    from posttrain import RecipeError
    from posttrain.recipes.config import load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe("sft/tiny", over)
    with pytest.raises(RecipeError, match="auxiliary trainer"):
        load_recipe("fedau/quadratic_fedau", {"weight_compander_modules": "all-linear"})
