"""Durability: exact resume after a kill, --resume picks only complete checkpoints, NaN/inf guard, no non-finite
checkpoint, one run per output_dir."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from support import BIN, ROOT, assert_same_state, method_state, two_process_launch
from transformers import AutoModelForCausalLM, TrainerCallback

from posttrain.cli import main
from posttrain.recipes.config import load_recipe
from posttrain.recipes.train import build_trainer
from posttrain.trainers.method_state import STATE_FILE
from posttrain.trainers.runtime import MANIFEST, NonFiniteError, checkpoint_problem, latest_checkpoint, read_manifest

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

    assert (
        main(["train", name, "--output_dir", str(cut), "--resume", *[f"--{k}={v}" for k, v in CHECKPOINTED.items()]])
        == 0
    )
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
    assert (
        main(["train", "dpo/tiny", "--output_dir", str(tmp_path), *[f"--{k}={v}" for k, v in CHECKPOINTED.items()]])
        == 0
    )
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
    assert (
        main(
            [
                "train",
                "dpo/tiny",
                "--output_dir",
                str(tmp_path),
                "--resume_from_checkpoint",
                str(tmp_path / "checkpoint-6"),
            ]
        )
        == 2
    )


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
    ours = [line[line.index("posttrain:") :] for line in err.split("\n") if "posttrain:" in line]
    assert len(ours) == 1 and ours[0].startswith("posttrain: stopped: non-finite loss"), ours


def _nan_trainer(build):
    def wrapped(recipe):
        trainer = build(recipe)
        trainer.model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * math.nan)
        return trainer

    return wrapped


def one_line(err: str) -> str:
    """The single posttrain line on stderr (progress bars share it, ending their lines with \\r only)."""
    ours = [line[line.index("posttrain:") :] for line in err.split("\n") if "posttrain:" in line]
    assert len(ours) == 1, ours
    return ours[0]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A dpo/tiny run with complete checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "dpo/tiny", "--output_dir", str(out), *[f"--{k}={v}" for k, v in CHECKPOINTED.items()]]) == 0
    return out


@pytest.mark.parametrize("damage", ["missing", "truncated"])
@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors"])
def test_a_checkpoint_missing_or_damaging_a_file_the_resume_reads_is_never_resumed(
    name, damage, two_checkpoints, tmp_path, capsys
):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    path = out / "checkpoint-4" / name
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert latest_checkpoint(out).name == "checkpoint-2" and str(path) in checkpoint_problem(out / "checkpoint-4")
    # an explicit path: one line naming the file, before any model loads
    capsys.readouterr()
    assert (
        main(["train", "dpo/tiny", "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-4")])
        == 2
    )
    line = one_line(capsys.readouterr().err)
    assert line.startswith("posttrain: error: resume_from_checkpoint:") and str(path) in line, line
    # --resume: falls back to checkpoint-2, says why, and retraces the run's step 3
    assert (
        main(
            [
                "train",
                "dpo/tiny",
                "--output_dir",
                str(out),
                "--resume",
                *[f"--{k}={v}" for k, v in CHECKPOINTED.items()],
                "--max_steps=3",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert f"skipping checkpoint-4: {path}" in said and f"resuming from {out / 'checkpoint-2'}" in said, said
    assert step_losses(out / "checkpoint-3")[3] == pytest.approx(
        step_losses(two_checkpoints / "checkpoint-4")[3], abs=1e-6
    )


def test_save_only_model_checkpoints_are_not_resumable(tmp_path, capsys):
    args = ["train", "dpo/tiny", "--output_dir", str(tmp_path), *[f"--{k}={v}" for k, v in CHECKPOINTED.items()]]
    assert main([*args, "--save_only_model=true", "--max_steps=2"]) == 0
    assert "save_only_model" in checkpoint_problem(tmp_path / "checkpoint-2") and latest_checkpoint(tmp_path) is None
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "no complete checkpoint" in line and "cannot be resumed exactly" in line, line


def test_the_manifest_is_written_last_and_lists_every_file(two_checkpoints):
    checkpoint = two_checkpoints / "checkpoint-4"
    listed = set(read_manifest(checkpoint)["files"])
    on_disk = {str(f.relative_to(checkpoint)) for f in checkpoint.rglob("*") if f.is_file() and f.name != MANIFEST}
    assert listed == on_disk and {"optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors"} <= listed
    assert (checkpoint / MANIFEST).stat().st_mtime >= max((checkpoint / f).stat().st_mtime for f in listed)


def test_no_checkpoint_with_non_finite_weights_is_written(tmp_path):
    # step 3's update makes the weights infinite (finite loss and gradient: the step guard has nothing to see)
    trainer = build_trainer(load_recipe("dpo/tiny", {**CHECKPOINTED, "save_steps": 1, "output_dir": str(tmp_path)}))

    class HugeStepAt3(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 2:
                for group in optimizer.param_groups:
                    group["lr"] = 1e40

    trainer.add_callback(HugeStepAt3())
    with pytest.raises(
        NonFiniteError,
        match=r"non-finite weights after step 3; checkpoint-3 was not written; "
        r"the last good checkpoint is .*checkpoint-2 ",
    ):
        trainer.train()
    assert [c.name for c in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize("save", ["checkpoint", "final model"])
def test_cli_stops_before_writing_non_finite_weights(save, tmp_path, capsys):
    saving = ["--save_strategy=steps", "--save_steps=1"] if save == "checkpoint" else ["--save_strategy=no"]
    assert (
        main(["train", "dpo/tiny", "--output_dir", str(tmp_path), "--max_steps=1", "--learning_rate=1e40", *saving])
        == 1
    )
    line = one_line(capsys.readouterr().err)
    expected = (
        "after step 1; checkpoint-1 was not written"
        if save == "checkpoint"
        else "at the end of training (step 1); the final model was not saved"
    )
    assert line.startswith(f"posttrain: stopped: non-finite weights {expected}; no checkpoint was saved yet"), line
    assert not list(tmp_path.glob("checkpoint-*")) and not list(tmp_path.glob("*.safetensors"))


def test_a_fresh_run_refuses_a_folder_with_checkpoints(two_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    capsys.readouterr()
    assert main(["train", "dpo/tiny", "--output_dir", str(out), "--max_steps=1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"output_dir {out} already holds checkpoints (checkpoint-2, checkpoint-4)" in line and "--resume" in line
    assert latest_checkpoint(out).name == "checkpoint-4"
    # --overwrite_output_dir starts over: the old checkpoints go, so a later --resume cannot pick one of them
    assert (
        main(
            [
                "train",
                "dpo/tiny",
                "--output_dir",
                str(out),
                "--overwrite_output_dir",
                *[f"--{k}={v}" for k, v in CHECKPOINTED.items()],
                "--save_steps=1",
                "--max_steps=1",
            ]
        )
        == 0
    )
    assert [c.name for c in out.glob("checkpoint-*")] == ["checkpoint-1"]


def test_a_second_run_into_a_running_runs_folder_refuses(tmp_path, monkeypatch):
    second = {}

    class StartAnotherRun(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:  # the first run holds the folder: a real second process tries it
                cmd = [
                    sys.executable,
                    "-m",
                    "posttrain",
                    "train",
                    "dpo/tiny",
                    "--output_dir",
                    str(tmp_path),
                    "--resume",
                ]
                second["proc"] = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)

    def with_callback(recipe):
        trainer = build_trainer(recipe)
        trainer.add_callback(StartAnotherRun())
        return trainer

    monkeypatch.setattr("posttrain.recipes.train.build_trainer", with_callback)
    assert main(["train", "dpo/tiny", "--output_dir", str(tmp_path), "--max_steps=2"]) == 0
    proc = second["proc"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert one_line(proc.stderr) == (
        f"posttrain: error: output_dir {tmp_path} is in use by another posttrain run (pid "
        f"{os.getpid()}, lock {tmp_path / '.posttrain.lock'}); wait for it to end, or "
        "choose another --output_dir"
    )


def test_a_resume_names_the_settings_its_checkpoint_overrides(two_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    shutil.rmtree(out / "checkpoint-4")
    args = ["train", "dpo/tiny", "--output_dir", str(out), *[f"--{k}={v}" for k, v in CHECKPOINTED.items()]]
    capsys.readouterr()
    assert main([*args, "--resume", "--learning_rate=0.5", "--weight_decay=0.25"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "posttrain: warning" in line]
    assert len(said) == 1 and "keeps learning_rate=" in said[0] and "(this run: 0.5)" in said[0], said
    assert "weight_decay=0.0 (this run: 0.25)" in said[0], said

    # and that is what happened: step 4 ran at the uninterrupted run's learning rate, not at 0.5
    def logged(folder):
        return {
            e["step"]: e["learning_rate"]
            for e in json.loads((folder / "trainer_state.json").read_text())["log_history"]
            if "loss" in e
        }  # noqa: E731

    assert logged(out / "checkpoint-4")[4] == logged(two_checkpoints / "checkpoint-4")[4]
    # a resume with the same settings says nothing
    shutil.rmtree(out / "checkpoint-4")
    assert main([*args, "--resume"]) == 0
    assert "posttrain: warning" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_deepspeed_zero2_checkpoint_is_complete_until_a_shard_is_damaged(tmp_path, run_env):
    cmd = two_process_launch(
        "zero2.yaml",
        "-m",
        "posttrain",
        "train",
        "dpo/tiny",
        "--output_dir",
        str(tmp_path),
        *[f"--{k}={v}" for k, v in CHECKPOINTED.items()],
        "--save_steps=1",
        "--max_steps=2",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for step in (1, 2):
        assert checkpoint_problem(tmp_path / f"checkpoint-{step}") is None
    manifest = read_manifest(tmp_path / "checkpoint-2")
    files = set(manifest["files"])
    assert manifest["world_size"] == 2 and {"latest", "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt"} <= files
    shards = sorted(f for f in files if f.startswith("global_step2/") and f.endswith("optim_states.pt"))
    assert len(shards) == 2, files
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    # rank 1's optimizer shard cut short, or rank 1's RNG state gone: the resume falls back to checkpoint-1
    shard = tmp_path / "checkpoint-2" / shards[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert str(shard) in checkpoint_problem(tmp_path / "checkpoint-2")
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"
    (tmp_path / "checkpoint-1" / "rng_state_1.pth").unlink()
    assert latest_checkpoint(tmp_path) is None


def test_ctrl_c_stops_in_one_line_exit_130_and_the_run_resumes(tmp_path, run_env):
    """SIGINT mid-training (what Ctrl-C sends): exit 130, a last line saying where the run stopped and what --resume
    continues from, no KeyboardInterrupt traceback; and that resume works."""
    import signal
    import time

    out = tmp_path / "run"
    argv = [
        str(BIN / "posttrain"),
        "train",
        "sft/tiny",
        "--output_dir",
        str(out),
        "--max_steps",
        "100000",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
    ]
    # a shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler (CI may run us that way): the run gets the disposition of a terminal's foreground job
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=run_env,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 600
    while latest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    checkpoint = latest_checkpoint(out)
    assert last.startswith("posttrain: interrupted at step ") and " of 100000; " in last, last
    assert last.endswith(f"rerun the same command with --resume to continue from {checkpoint}"), last
    step = int(checkpoint.name.split("-")[1])
    assert step >= 2 and int(last.split("at step ")[1].split()[0]) >= step

    resumed = subprocess.run(
        argv[:-8] + ["--max_steps", str(step + 1), "--resume", "--save_strategy", "no"],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=ROOT,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint}" in resumed.stdout
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == step + 1


def test_ctrl_c_before_training_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    import posttrain.recipes.train as train_module

    def interrupted(recipe):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "build_trainer", interrupted)
    assert main(["train", "sft/tiny", "--output_dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "posttrain: interrupted before training started"
