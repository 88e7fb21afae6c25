"""Durability: exact resume after a kill, --resume picks only complete checkpoints, NaN/inf guard."""

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from conftest import assert_same_state, method_state
from posttrain.cli import main
from posttrain.recipes.config import load_recipe
from posttrain.recipes.train import build_trainer
from posttrain.trainers.method_state import STATE_FILE
from posttrain.trainers.runtime import NonFiniteError, latest_checkpoint

CHECKPOINTED = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1}


class _Killed(Exception):
    pass


class KillAfterSave(TrainerCallback):
    """Dies right after checkpoint-N is on disk, as a preempted job would."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Killed


def step_losses(folder) -> dict[int, float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.mark.parametrize("name", ["dpo/tiny", "grpo/tiny", "sparsepo/tiny", "constrained_rlhf/tiny"])
def test_killed_run_resumes_on_the_same_trajectory(name, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", name, "--output_dir", str(full), *[f"--{k}={v}" for k, v in CHECKPOINTED.items()]]) == 0
    reference = step_losses(full / "checkpoint-4")
    assert sorted(reference) == [1, 2, 3, 4]

    trainer = build_trainer(load_recipe(name, {**CHECKPOINTED, "output_dir": str(cut)}))
    trainer.add_callback(KillAfterSave(2))
    with pytest.raises(_Killed):
        trainer.train()
    assert latest_checkpoint(cut).name == "checkpoint-2" and not (cut / "checkpoint-4").exists()

    assert main(["train", name, "--output_dir", str(cut), "--resume", *[f"--{k}={v}" for k, v in CHECKPOINTED.items()]]) == 0
    resumed = step_losses(cut / "checkpoint-4")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), (step, resumed, reference)
    # and the final weights agree too
    a = AutoModelForCausalLM.from_pretrained(full / "checkpoint-4")
    b = AutoModelForCausalLM.from_pretrained(cut / "checkpoint-4")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    # the method state (SparsePO's mask networks, the multipliers and their SGD momentum) continues exactly too
    if name in ("dpo/tiny", "grpo/tiny"):  # stock trainers: no method state, no file
        assert not (full / "checkpoint-4" / STATE_FILE).exists()
        return
    full_state, cut_state = method_state(full / "checkpoint-4"), method_state(cut / "checkpoint-4")
    assert_same_state(full_state, cut_state, atol=1e-6)
    if name.startswith("constrained"):  # bit for bit, and they did move after the checkpoint
        assert_same_state(full_state, cut_state)
        x, x2 = full_state["trainer"]["multipliers"], method_state(full / "checkpoint-2")["trainer"]["multipliers"]
        assert not torch.equal(x["lam"], x2["lam"])
        assert x["optimizer"]["state"][0]["momentum_buffer"].abs().sum() > 0
    if name.startswith("sparsepo"):
        assert full_state["trainer"]["mask_networks"]


def test_resume_never_picks_a_half_written_checkpoint(tmp_path):
    assert main(["train", "dpo/tiny", "--output_dir", str(tmp_path), *[f"--{k}={v}" for k, v in CHECKPOINTED.items()]]) == 0
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    # killed mid-save: weights written, trainer_state.json (written last) missing or cut short
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-6" / "trainer_state.json").unlink()
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-8")
    state = tmp_path / "checkpoint-8" / "trainer_state.json"
    state.write_text(state.read_text()[:50])
    (tmp_path / "checkpoint-10").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert latest_checkpoint(tmp_path / "nothing") is None
    # an explicit incomplete checkpoint is refused before any model loads
    assert main(["train", "dpo/tiny", "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(tmp_path / "checkpoint-6")]) == 2


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    assert main(["train", "dpo/tiny", "--output_dir", str(tmp_path), "--max_steps", "1", "--resume"]) == 0
    assert "starting from scratch" in capsys.readouterr().out


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(poison, tmp_path):
    recipe = load_recipe("dpo/tiny", {**CHECKPOINTED, "max_steps": 6, "output_dir": str(tmp_path)})
    trainer = build_trainer(recipe)

    class PoisonAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:  # the third optimizer step
                value = float(poison)
                model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * value)

    trainer.add_callback(PoisonAtStep3())
    with pytest.raises(NonFiniteError, match=r"non-finite loss.* at step 3 .*checkpoint-2"):
        trainer.train()
    assert latest_checkpoint(tmp_path).name == "checkpoint-2" and not (tmp_path / "checkpoint-4").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_gradient_alone_is_caught(tmp_path):
    trainer = build_trainer(load_recipe("dpo/tiny", {"max_steps": 3, "output_dir": str(tmp_path), "logging_steps": 1}))

    class PoisonGradient(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                next(model.parameters()).register_hook(lambda g: g * math.inf)

    trainer.add_callback(PoisonGradient())
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm at step 2 .*no checkpoint was saved yet"):
        trainer.train()


def test_cli_reports_a_stopped_run_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("posttrain.recipes.train.build_trainer", _nan_trainer(build_trainer))
    assert main(["train", "dpo/tiny", "--output_dir", str(tmp_path), "--max_steps", "2"]) == 1
    err = capsys.readouterr().err  # shared with progress bars, which end their lines with \r only
    ours = [line[line.index("posttrain:"):] for line in err.split("\n") if "posttrain:" in line]
    assert len(ours) == 1 and ours[0].startswith("posttrain: stopped: non-finite loss"), ours


def _nan_trainer(build):
    def wrapped(recipe):
        trainer = build(recipe)
        trainer.model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * math.nan)
        return trainer

    return wrapped
