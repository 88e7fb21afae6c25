"""The auxiliary-trainer base: the loop, the files it writes, and a resume that ends at the same numbers."""

import json
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from posttrain.trainers.classic.base import PLOT_FILE, RESULTS_FILE, STATE_FILE, AuxConfig, AuxTrainer

torch.set_num_threads(1)


@dataclass
class NoisyConfig(AuxConfig):
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate."})
    max_steps: int = field(default=40, metadata={"help": "SGD steps."})
    eval_every: int = field(default=10, metadata={"help": "Log every this many steps."})
    stop_below: float = field(default=-1.0, metadata={"help": "Stop once the loss is below this."})


class NoisyTrainer(AuxTrainer):
    """A toy that draws from every RNG the base restores: torch (init, noise), NumPy's Generator, NumPy's global
    state and Python's random; a resume that misses any one of them ends at other numbers."""

    method = "noisy"

    def setup(self):
        self.w = torch.nn.Parameter(torch.randn(5))
        self.opt = torch.optim.Adam([self.w], lr=self.args.lr)

    def loss(self):
        return float((self.w.detach() ** 2).sum())

    def training_step(self):
        target = torch.randn(5) * 0.1 + float(self.rng.normal()) * 0.01
        target += np.random.rand() * 0.01 + random.random() * 0.01
        self.opt.zero_grad()
        loss = ((self.w - target) ** 2).sum()
        loss.backward()
        self.opt.step()
        return {"train_loss": loss.item()}

    def evaluate(self):
        return {"loss": self.loss()}

    def done(self):
        return self.loss() < self.args.stop_below

    def state_dict(self):
        return {**super().state_dict(), "w": self.w.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.load_state_dict(state["opt"])


class Killed(NoisyTrainer):
    def training_step(self):
        if self.global_step == 25:
            raise KeyboardInterrupt
        return super().training_step()


def test_train_writes_results_plot_and_state(tmp_path):
    final = NoisyTrainer(NoisyConfig(output_dir=str(tmp_path))).train(verbose=False)
    assert final["step"] == 40 and final["stopped_by"] == "max_steps"
    results = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert results["method"] == "noisy" and results["config"]["lr"] == 0.1
    assert [h["step"] for h in results["history"]] == [10, 20, 30, 40]
    assert results["final"]["loss"] == final["loss"] == results["history"][-1]["loss"]
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.load(tmp_path / STATE_FILE, weights_only=False)["step"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([RESULTS_FILE, PLOT_FILE, STATE_FILE])  # no temp files


def test_resume_from_saved_state_ends_at_the_same_numbers(tmp_path):
    full = NoisyTrainer(NoisyConfig(output_dir=str(tmp_path / "full")))
    expected = full.train(verbose=False)

    # A run that saves every 15 steps and is killed in step 26: its last saved state is step 15's.
    first = Killed(NoisyConfig(output_dir=str(tmp_path / "cut"), save_every=15))
    with pytest.raises(KeyboardInterrupt):
        first.train(verbose=False)
    assert first.last_saved_step == 15 and first.global_step == 25
    torch.randn(100), np.random.rand(7), random.random()  # the process goes on drawing: must not matter

    resumed = NoisyTrainer(NoisyConfig(output_dir=str(tmp_path / "cut"), save_every=15))
    final = resumed.train(verbose=False, resume=True)
    assert final["step"] == 40
    assert final["loss"] == expected["loss"]
    assert torch.equal(resumed.w, full.w)
    got = json.loads((tmp_path / "cut" / RESULTS_FILE).read_text())["history"]
    assert got == json.loads((tmp_path / "full" / RESULTS_FILE).read_text())["history"]


def test_resume_refuses_another_config(tmp_path):
    NoisyTrainer(NoisyConfig(output_dir=str(tmp_path))).train(verbose=False)
    with pytest.raises(ValueError, match=r"lr \(saved 0.1, now 0.2\)"):
        NoisyTrainer(NoisyConfig(output_dir=str(tmp_path), lr=0.2)).train(verbose=False, resume=True)
    # run controls may change: a longer guard, another folder
    assert NoisyTrainer(NoisyConfig(output_dir=str(tmp_path), max_seconds=5.0)).load()


def test_stops_on_criterion_and_on_max_seconds(tmp_path):
    final = NoisyTrainer(NoisyConfig(output_dir=str(tmp_path / "a"), stop_below=0.5, max_steps=10_000)).train(
        verbose=False
    )
    assert final["stopped_by"] == "criterion" and final["loss"] < 0.5 and final["step"] < 10_000
    final = NoisyTrainer(NoisyConfig(output_dir=str(tmp_path / "b"), max_steps=10**9, max_seconds=0.05)).train(
        verbose=False
    )
    assert final["stopped_by"] == "max_seconds" and 0 < final["step"] < 10**9


def test_config_checks():
    for bad, name in (
        (dict(max_steps=0), "max_steps"),
        (dict(eval_every=0), "eval_every"),
        (dict(max_seconds=0.0), "max_seconds"),
        (dict(save_every=-1), "save_every"),
    ):
        with pytest.raises(ValueError, match=name):
            NoisyConfig(**bad)


def test_cli_resume_and_output_dir_rules(tmp_path, capsys):
    """`posttrain train <aux recipe>`: a fresh run refuses a folder holding a run, --resume continues the saved
    state to the uninterrupted run's numbers, a changed setting on --resume is one line, --overwrite_output_dir
    starts over."""
    from posttrain.cli import main
    from posttrain.recipes.config import load_recipe
    from posttrain.trainers.classic.fedau import FedAUTrainer

    small = ["--max_steps", "60", "--eval_every", "20", "--num_clients", "20"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["train", "fedau/quadratic_fedau", *small, "--output_dir", a]) == 0
    expected = json.loads((tmp_path / "a" / RESULTS_FILE).read_text())["final"]

    overrides = dict(zip(small[::2], small[1::2]), **{"--output_dir": b})
    recipe = load_recipe("fedau/quadratic_fedau", {k[2:]: v for k, v in overrides.items()})
    partial = FedAUTrainer(recipe.config)
    for _ in range(30):
        partial.step()
    partial.save()
    capsys.readouterr()
    assert main(["train", "fedau/quadratic_fedau", *small, "--output_dir", b]) == 2
    assert "already holds a fedau run (aux_state.pt)" in capsys.readouterr().err
    assert main(["train", "fedau/quadratic_fedau", *small, "--output_dir", b, "--resume"]) == 0
    assert "resuming fedau from step 30" in capsys.readouterr().out
    final = json.loads((tmp_path / "b" / RESULTS_FILE).read_text())["final"]
    assert final["round"] == 60 and final["excess_loss"] == expected["excess_loss"]

    assert main(["train", "fedau/quadratic_fedau", *small, "--output_dir", b, "--resume", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "seed (saved 0, now 3)" in err and "\n" not in err
    assert main(["train", "fedau/quadratic_fedau", *small, "--output_dir", b, "--overwrite_output_dir"]) == 0
    (tmp_path / "b" / STATE_FILE).unlink()  # results without a state: --resume has nothing to continue
    capsys.readouterr()
    assert main(["train", "fedau/quadratic_fedau", *small, "--output_dir", b, "--resume"]) == 2
    assert "holds results.json but no aux_state.pt" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / RESULTS_FILE).read_text())["final"]["excess_loss"] == expected["excess_loss"]
