"""Mistakes in the input of ``posttrain train``: each case is a real command line run in its own subprocess, and each
must end with one ``posttrain: error:`` line, exit code 2 and no traceback, before any model loads where the
check allows it (README, "Mistakes in a recipe..."). The eval / report / upcycle and data-file tables live beside
the code they test (tests/evals/, tests/data/) and use the same runner (conftest.run_cli_cases).
"""

import os
import shutil
from pathlib import Path

import pytest
from support import ROOT, assert_one_line_error, run_cli_cases


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Broken inputs on disk: models, recipes, output folders."""
    from posttrain.recipes.tiny import tiny_model_path

    root = tmp_path_factory.mktemp("bad")
    tiny = tiny_model_path("qwen3")
    paths = {"root": root}

    garbage = root / "garbage_config"
    shutil.copytree(tiny, garbage)
    (garbage / "config.json").write_text("{not json")
    paths["garbage_config"] = garbage

    for name, size in (("truncated_weights", 1000), ("empty_weights", 0)):
        folder = root / name
        shutil.copytree(tiny, folder)
        weights = next(folder.glob("*.safetensors"))
        with open(weights, "r+b") as f:
            f.truncate(size)
        paths[name] = folder

    no_weights = root / "no_weights"
    shutil.copytree(tiny, no_weights)
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    paths["no_weights"] = no_weights

    latin1 = root / "latin1.yaml"
    latin1.write_bytes("# caf\xe9\nmethod: sft\nmodel_name_or_path: tiny:qwen3\n".encode("latin-1"))
    paths["latin1_recipe"] = latin1

    duplicate = root / "duplicate.yaml"
    duplicate.write_text((ROOT / "recipes/sft/tiny.yaml").read_text() + "learning_rate: 1.0\n")
    paths["duplicate_recipe"] = duplicate

    if os.geteuid() == 0:  # root writes through any mode bits; sysfs refuses a new folder even to root
        paths["unwritable"] = Path("/sys/posttrain-test/run")
    else:
        locked = root / "read_only"
        locked.mkdir(mode=0o500)
        paths["unwritable"] = locked / "run"

    a_file = root / "a_file"
    a_file.write_text("not a folder\n")
    paths["a_file"] = a_file
    return paths


SFT = ["train", "sft/tiny"]
# case -> (argv from the broken inputs of the `bad` fixture, what the one line must say)
TRAIN_CASES = {
    # --- the model ---------------------------------------------------------------------------------------------------
    "model folder missing": (lambda b: SFT + ["--model_name_or_path", "/nowhere/model"], "/nowhere/model"),
    "model relative path missing": (lambda b: SFT + ["--model_name_or_path", "./no/such/model"], "no/such/model"),
    "model not a hub id": (lambda b: SFT + ["--model_name_or_path", "a/b/c"], "a/b/c"),
    "model garbage config.json": (lambda b: SFT + ["--model_name_or_path", str(b["garbage_config"])], "config.json"),
    "model truncated weights": (lambda b: SFT + ["--model_name_or_path", str(b["truncated_weights"])], "truncated"),
    "model zero-byte weights": (lambda b: SFT + ["--model_name_or_path", str(b["empty_weights"])], "safetensors"),
    "model without weights": (lambda b: SFT + ["--model_name_or_path", str(b["no_weights"])], "no weights"),
    # --- output_dir --------------------------------------------------------------------------------------------------
    "output_dir is a file": (lambda b: SFT + ["--output_dir", str(b["a_file"])], "not a folder"),
    "output_dir under a file": (lambda b: SFT + ["--output_dir", str(b["a_file"] / "run")], "not a folder"),
    "output_dir empty": (lambda b: SFT + ["--output_dir="], "command line: output_dir is empty"),
    "output_dir not writable": (lambda b: SFT + ["--output_dir", str(b["unwritable"])], "cannot be written"),
    # --- values out of range or ignored, named with their source -----------------------------------------------------
    "batch size 0": (
        lambda b: SFT + ["--per_device_train_batch_size", "0"],
        "command line: per_device_train_batch_size",
    ),
    "learning rate -1": (lambda b: SFT + ["--learning_rate", "-1"], "command line: learning_rate"),
    "max_length 0": (lambda b: SFT + ["--max_length", "0"], "command line: max_length"),
    "max_steps -5": (lambda b: SFT + ["--max_steps", "-5"], "command line: max_steps"),
    "max_row_bytes 0": (lambda b: SFT + ["--max_row_bytes", "0"], "command line: max_row_bytes must be at least 1"),
    "dpo beta -1": (lambda b: ["train", "dpo/tiny", "--beta", "-1"], "command line: beta"),
    "unknown report_to": (
        lambda b: SFT + ["--report_to", "wandbb"],
        "unknown report_to 'wandbb' (did you mean 'wandb'?)",
    ),
    "reward_funcs on sft": (
        lambda b: SFT + ["--reward_funcs", "numeric_match"],
        "method 'sft' does not use reward_funcs",
    ),
    "library check of a command-line value": (
        lambda b: SFT + ["--lr_scheduler_type", "bogus"],
        "command line: invalid SFTConfig",
    ),
    "library check names the command line": (
        lambda b: SFT + ["--save_strategy", "steps", "--load_best_model_at_end", "true"],
        "command line: invalid SFTConfig",
    ),
    # --- the command line itself -------------------------------------------------------------------------------------
    "argparse: option of the wrong type": (
        lambda b: ["eval", "--model", "tiny:qwen3", "--limit", "abc"],
        "argument --limit: invalid int value: 'abc'; see posttrain eval --help",
    ),
    "argparse: no command": (lambda b: [], "the following arguments are required: command"),
    # --- recipe files ------------------------------------------------------------------------------------------------
    "recipe not UTF-8": (lambda b: ["train", str(b["latin1_recipe"])], "line 1: not UTF-8"),
    "recipe duplicate key": (lambda b: ["train", str(b["duplicate_recipe"])], "duplicate key 'learning_rate'"),
}


@pytest.fixture(scope="module")
def train_results(bad, tmp_path_factory):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cases = {}
    for i, (case, (argv, _)) in enumerate(TRAIN_CASES.items()):
        argv = argv(bad)  # the cases run in parallel: each its own output_dir (a run locks its folder)
        own = argv[:1] == ["train"] and not any(a.startswith("--output_dir") for a in argv)
        cases[case] = argv + ["--output_dir", str(bad["root"] / f"out{i}")] if own else argv
    return run_cli_cases(cases, env, tmp_path_factory.mktemp("cwd"))


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_bad_input_is_one_line_exit_2(case, train_results):
    assert_one_line_error(train_results[case], TRAIN_CASES[case][1])
    assert "Loading weights" not in train_results[case].stderr  # transformers' bar: a model was loaded first
