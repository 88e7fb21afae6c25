"""The method-state mechanism (posttrain.trainers.method_state): whole-or-absent files, one clear error for a
checkpoint without the state, and that error on every rank of a launch (no rank left waiting in a broadcast).
The save/restore round trips of each method are in the methods' tests and tests/test_resume_matrix.py."""

import os
import pickle
import shutil
import subprocess

import pytest
import torch
from support import ROOT, method_state, two_process_launch

from posttrain.cli import main
from posttrain.recipes.config import load_recipe
from posttrain.recipes.train import build_trainer
from posttrain.trainers.method_state import STATE_FILE, MissingMethodStateError, save_method_state

SAVE = ["--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1"]


def test_the_state_file_is_whole_or_absent(tmp_path):
    save_method_state({"trainer": {"x": torch.arange(3)}}, tmp_path)
    # a lambda does not pickle: the write fails half-way
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_method_state({"trainer": {"x": lambda: 0}}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary file left behind
    assert torch.equal(method_state(tmp_path)["trainer"]["x"], torch.arange(3))  # the good one is intact


@pytest.fixture(scope="module")
def dpo_checkpoint(tmp_path_factory):
    """checkpoint-1 of stock DPO on the tiny Qwen3 that sparsepo/tiny trains too: weights, but no method state."""
    out = tmp_path_factory.mktemp("dpo")
    assert main(["train", "dpo/tiny", "--output_dir", str(out), *SAVE]) == 0
    assert not (out / "checkpoint-1" / STATE_FILE).exists()
    return out / "checkpoint-1"


def test_a_checkpoint_without_the_state_is_refused_before_the_model_loads(dpo_checkpoint, tmp_path, capsys):
    for recipe, extra in (("sparsepo/tiny", []), ("moe_balance/tiny_sft", ["--model_name_or_path", "tiny:qwen3_moe"])):
        assert (
            main(
                [
                    "train",
                    recipe,
                    "--output_dir",
                    str(tmp_path),
                    "--resume_from_checkpoint",
                    str(dpo_checkpoint),
                    *extra,
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{STATE_FILE} is missing" in err[0] and "start a new run" in err[0], err
    # a stock method without aux-free balancing needs none
    assert (
        main(
            [
                "train",
                "dpo/tiny",
                "--output_dir",
                str(tmp_path / "dpo"),
                "--max_steps",
                "2",
                "--resume_from_checkpoint",
                str(dpo_checkpoint),
            ]
        )
        == 0
    )


def test_the_mechanism_refuses_a_checkpoint_without_an_owners_state(dpo_checkpoint, tmp_path):
    trainer = build_trainer(load_recipe("sparsepo/tiny", {"output_dir": str(tmp_path), "max_steps": 2}))
    with pytest.raises(
        MissingMethodStateError, match=f"{STATE_FILE} is missing: checkpoint .* needs the state of trainer"
    ):
        trainer.train(resume_from_checkpoint=str(dpo_checkpoint))
    # a file without this owner's entry (written by another configuration) is refused too, naming the owner
    save_method_state({"MoEBalanceCallback": None}, dpo_checkpoint)
    try:
        with pytest.raises(MissingMethodStateError, match="has no state of trainer .it holds MoEBalanceCallback"):
            trainer.train(resume_from_checkpoint=str(dpo_checkpoint))
    finally:
        (dpo_checkpoint / STATE_FILE).unlink()


@pytest.mark.slow
def test_the_error_stops_every_rank_of_a_launch(dpo_checkpoint, tmp_path):
    # rank 0 reads the file and broadcasts what it found, or its error: both ranks exit with it, neither hangs
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(dpo_checkpoint, checkpoint)
    save_method_state({"MoEBalanceCallback": None}, checkpoint)  # a file, but not this method's state
    cmd = two_process_launch(
        "cpu_2proc.yaml",
        "-m",
        "posttrain",
        "train",
        "sparsepo/tiny",
        "--output_dir",
        str(tmp_path / "out"),
        "--resume_from_checkpoint",
        str(checkpoint),
    )
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("has no state of trainer") == 2, proc.stderr[-4000:]
