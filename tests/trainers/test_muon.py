"""optim: muon: the parameter split, the combined optimizer against torch's two, and a tiny DPO run resumed exactly."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.cli import main
from posttrain.recipes.config import load_recipe
from posttrain.recipes.models import resolve_model_path
from posttrain.recipes.train import build_trainer
from posttrain.trainers.muon import MuonWithAdamW, muon_kwargs, split_for_muon

torch.set_num_threads(1)


def test_split_puts_hidden_matrices_on_muon_and_the_rest_on_adamw():
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:qwen3"), dtype=torch.float32)
    muon, adamw = (dict(part) for part in split_for_muon(model))
    assert muon and all(p.ndim == 2 for p in muon.values())
    assert {n.rsplit(".", 2)[-2] for n in muon} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert "model.embed_tokens.weight" in adamw and all("norm" in n or "embed" in n or "lm_head" in n for n in adamw)
    assert set(muon) | set(adamw) == {n for n, p in model.named_parameters() if p.requires_grad}
    model.get_output_embeddings().weight.requires_grad_(False)  # frozen parameters go nowhere
    assert "lm_head.weight" not in dict(split_for_muon(model)[1])


def test_split_finds_embeddings_by_type_not_only_by_name():
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:gpt2"), dtype=torch.float32)
    muon, adamw = (dict(part) for part in split_for_muon(model))
    embeddings = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert embeddings == {"transformer.wte", "transformer.wpe"}
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= set(adamw)
    assert muon and all(".h." in n and p.ndim == 2 for n, p in muon.items())


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(8, 5, generator=g), torch.randn(3, 8, generator=g), torch.randn(8, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(6)]
    return params, grads


def test_combined_optimizer_is_torch_muon_plus_adamw_and_restores_its_state():
    params, grads = _problem()
    ours = [p.clone().requires_grad_(True) for p in params]
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = MuonWithAdamW([ours[0]], [ours[1]], [ours[2]], lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    muon = torch.optim.Muon([ref[0]], lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    adamw = torch.optim.AdamW(
        [{"params": [ref[1]], "weight_decay": 0.1}, {"params": [ref[2]], "weight_decay": 0.0}], lr=0.02
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # a scheduler reaches both halves
    for step, grad in enumerate(grads[:3]):
        for p, q, gr in zip(ours, ref, grad):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        sched.step()
        muon.step()
        adamw.step()
        for o in (muon, adamw):
            for group in o.param_groups:
                group["lr"] = 0.02 / (2 + step)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert opt._parts[0].param_groups[0]["lr"] == pytest.approx(0.02 / 4)

    saved = copy.deepcopy(opt.state_dict())  # as from a checkpoint file: no tensor shared with the live optimizer
    fresh = [p.detach().clone().requires_grad_(True) for p in ours]
    other = MuonWithAdamW([fresh[0]], [fresh[1]], [fresh[2]], lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    other.load_state_dict(saved)
    for grad in grads[3:]:
        for a, b, gr in zip(ours, fresh, grad):
            a.grad, b.grad = gr.clone(), gr.clone()
        opt.step()
        other.step()
    for a, b in zip(ours, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert other._parts[0].state is other.state and torch.equal(
        other.state[fresh[0]]["momentum_buffer"], opt.state[ours[0]]["momentum_buffer"]
    )


def test_muon_kwargs():
    assert muon_kwargs(None) == {"betas": (0.9, 0.999)}
    assert muon_kwargs("momentum=0.9, nesterov=false,ns_steps=3,adjust_lr_fn=original,beta2=0.95,eps=1e-6") == {
        "momentum": 0.9,
        "nesterov": False,
        "ns_steps": 3,
        "adjust_lr_fn": "original",
        "betas": (0.9, 0.95),
        "eps": 1e-6,
    }
    for bad, word in (
        ("lr=1", "unknown key 'lr'"),
        ("momentum", "key=value"),
        ("adjust_lr_fn=moonshot", "original"),
        ("momentum=1.5", r"\[0, 1\)"),
        ("ns_steps=0", "ns_steps"),
        ("nesterov=maybe", "true or false"),
    ):
        with pytest.raises(ValueError, match=word):
            muon_kwargs(bad)
    from posttrain import UserError

    with pytest.raises(UserError, match="invalid optim_args for optim 'muon'"):
        load_recipe("dpo/tiny", {"optim": "muon", "optim_args": "momentum=2"})


CHECKPOINTED = {
    "max_steps": 4,
    "save_strategy": "steps",
    "save_steps": 2,
    "logging_steps": 1,
    "optim": "muon",
    "learning_rate": 1e-3,
    "weight_decay": 0.1,
}


def test_tiny_dpo_run_with_muon_resumes_on_the_same_trajectory(tmp_path):
    from transformers import TrainerCallback

    full, cut = tmp_path / "full", tmp_path / "cut"
    trainer = build_trainer(load_recipe("dpo/tiny", {**CHECKPOINTED, "output_dir": str(full)}))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(optimizer, MuonWithAdamW)
    muon, adamw = optimizer._parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert muon.param_groups[0]["weight_decay"] == 0.1 and muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    assert muon.param_groups[0]["initial_lr"] == 1e-3 and muon.param_groups[0]["lr"] < 1e-3  # the scheduler drives it
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.embed_tokens.weight" in moved

    class Killed(Exception):
        pass

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Killed

    trainer = build_trainer(load_recipe("dpo/tiny", {**CHECKPOINTED, "output_dir": str(cut)}))
    trainer.add_callback(KillAfterSave())
    with pytest.raises(Killed):
        trainer.train()
    assert (
        main(
            [
                "train",
                "dpo/tiny",
                "--output_dir",
                str(cut),
                "--resume",
                *[f"--{k}={v}" for k, v in CHECKPOINTED.items()],
            ]
        )
        == 0
    )

    def losses(folder):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return {e["step"]: e["loss"] for e in history if "loss" in e}

    reference, resumed = losses(full / "checkpoint-4"), losses(cut / "checkpoint-4")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), (step, resumed, reference)
    a = torch.load(full / "checkpoint-4" / "optimizer.pt", weights_only=True)
    b = torch.load(cut / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert a["state"].keys() == b["state"].keys() and any("momentum_buffer" in s for s in a["state"].values())
    for key in a["state"]:
        for name, value in a["state"][key].items():
            torch.testing.assert_close(b["state"][key][name], value, rtol=0, atol=1e-6, msg=f"{key}/{name}")
