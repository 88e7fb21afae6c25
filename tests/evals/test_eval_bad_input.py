"""Mistakes in the input of ``posttrain eval``, ``posttrain report`` and ``posttrain moe upcycle``: each case is a
real command line run in its own subprocess (conftest.run_cli_cases), and each must end with one
``posttrain: error:`` line naming what is wrong and where, exit code 2 and no traceback, before any model loads
where the check allows it (README: "a mistake in the input prints one line and exits with code 2").
"""

import os
import shutil
from pathlib import Path

import pytest
from support import assert_one_line_error, run_cli_cases

PATHS = (
    "root",
    "cut_ckpt",
    "a_file",
    "full_dir",
    "recipe",
    "recipe_limit0",
    "recipe_pass_at_k",
    "recipe_not_yaml",
    "recipe_list",
    "recipe_latin1",
    "run_garbage",
    "run_no_log_history",
)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Broken inputs on disk: a truncated checkpoint, eval recipes, runs with a corrupt trainer_state.json."""
    from posttrain.recipes.tiny import tiny_model_path

    root = tmp_path_factory.mktemp("bad_eval")
    paths = {"root": root}

    cut = root / "cut_ckpt"
    shutil.copytree(tiny_model_path("qwen3"), cut)
    with open(next(cut.glob("*.safetensors")), "r+b") as f:
        f.truncate(1000)
    paths["cut_ckpt"] = cut

    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("not a folder\n")
    paths["full_dir"] = root / "full_dir"
    paths["full_dir"].mkdir()
    (paths["full_dir"] / "something").write_text("x\n")

    recipes = {
        "recipe": "model: tiny:qwen3\ntasks: {perplexity: {}}\nlimit: 2\n",
        "recipe_limit0": "model: tiny:qwen3\ntasks: {perplexity: {}}\nlimit: 0\n",
        "recipe_pass_at_k": "model: tiny:qwen3\ntasks:\n  math: {n: 2}\n",
        "recipe_not_yaml": "model: tiny:qwen3\ntasks: {perplexity: {}\n",
        "recipe_list": "- model: tiny:qwen3\n",
    }
    for name, text in recipes.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(text)
    paths["recipe_latin1"] = root / "recipe_latin1.yaml"
    paths["recipe_latin1"].write_bytes("# caf\xe9\nmodel: tiny:qwen3\ntasks: {perplexity: {}}\n".encode("latin-1"))

    paths["run_garbage"] = root / "run_garbage"
    paths["run_garbage"].mkdir()
    (paths["run_garbage"] / "trainer_state.json").write_bytes(b"\x00\xff\xfe garbage {")
    paths["run_no_log_history"] = root / "run_no_log_history"
    paths["run_no_log_history"].mkdir()
    (paths["run_no_log_history"] / "trainer_state.json").write_text('{"global_step": 3}\n')
    return paths


def _cases(bad) -> dict:
    out = str(bad["root"] / "out")
    ev = ["eval", "--model", "tiny:qwen3", "--output", out, "--no_cache"]
    ppl = ev + ["--tasks", "perplexity"]
    dst = str(bad["root"] / "moe")
    up = ["moe", "upcycle", "tiny:llama"]
    return {
        # --- eval: --task_config ----------------------------------------------------------------------------------
        "task_config not YAML": (ev + ["--task_config", '{"math": {"n": 4'], "command line: --task_config"),
        "task_config a list": (ev + ["--task_config", "[1, 2]"], "command line: --task_config"),
        "task_config options not a mapping": (ev + ["--task_config", '{"math": 5}'], "eval task 'math'"),
        "task_config unknown task": (ev + ["--task_config", '{"maths": {}}'], "command line: unknown eval task"),
        "task_config unknown option": (
            ev + ["--task_config", '{"math": {"samples": 3}}'],
            "command line: eval task 'math' has no option(s) samples",
        ),
        "task_config option of wrong type": (ev + ["--task_config", '{"math": {"n": "many"}}'], "'n' expects int"),
        "math pass@k with k > n": (
            ev + ["--task_config", '{"math": {"n": 4}}'],
            "command line: eval task 'math': pass@16",
        ),
        "math greedy n > 1": (
            ev + ["--task_config", '{"math": {"n": 2, "k": [1, 2], "temperature": 0}}'],
            "temperature",
        ),
        # --- eval: values out of range, named with their source ----------------------------------------------------
        "limit -3": (ppl + ["--limit", "-3"], "command line: limit"),
        "limit 0": (ppl + ["--limit", "0"], "command line: limit"),
        "batch_size 0": (ppl + ["--batch_size", "0"], "command line: batch_size"),
        "output empty": (ev[:3] + ["--tasks", "perplexity", "--output="], "command line: output"),
        "output is a file": (ev[:3] + ["--tasks", "perplexity", "--output", str(bad["a_file"])], "not a folder"),
        "output under a file": (
            ev[:3] + ["--tasks", "perplexity", "--output", str(bad["a_file"] / "out")],
            "not a folder",
        ),
        "truncated checkpoint": (
            ["eval", "--model", str(bad["cut_ckpt"]), "--tasks", "perplexity", "--output", out],
            "cut_ckpt",
        ),
        # --- eval recipes: the recipe's values are blamed on the recipe, the command line's on the command line ----
        "recipe limit 0": (["eval", str(bad["recipe_limit0"]), "--output", out], f"{bad['recipe_limit0']}: limit"),
        "recipe pass@k with k > n": (
            ["eval", str(bad["recipe_pass_at_k"]), "--output", out],
            f"{bad['recipe_pass_at_k']}: eval task 'math': pass@16",
        ),
        "recipe, command-line limit -3": (
            ["eval", str(bad["recipe"]), "--output", out, "--limit", "-3"],
            "command line: limit",
        ),
        "recipe, command-line batch_size 0": (
            ["eval", str(bad["recipe"]), "--output", out, "--batch_size", "0"],
            "command line: batch_size",
        ),
        "recipe, command-line task_config": (
            ["eval", str(bad["recipe"]), "--output", out, "--task_config", '{"math": {"n": 4}}'],
            "command line: eval task 'math'",
        ),
        "recipe not YAML": (["eval", str(bad["recipe_not_yaml"]), "--output", out], f"{bad['recipe_not_yaml']} line"),
        "recipe not a mapping": (["eval", str(bad["recipe_list"]), "--output", out], str(bad["recipe_list"])),
        "recipe not UTF-8": (
            ["eval", str(bad["recipe_latin1"]), "--output", out],
            f"{bad['recipe_latin1']} line 1: not UTF-8",
        ),
        # --- report ----------------------------------------------------------------------------------------------
        "report garbage trainer_state.json": (["report", str(bad["run_garbage"])], "trainer_state.json is corrupt"),
        "report trainer_state.json without log_history": (["report", str(bad["run_no_log_history"])], "log_history"),
        "report no run": (["report", str(bad["root"] / "no_run")], "no trainer_state.json"),
        # --- moe upcycle -----------------------------------------------------------------------------------------
        "upcycle source missing": (
            ["moe", "upcycle", "/nowhere/src", dst, "--experts", "4", "--top_k", "2"],
            "/nowhere/src",
        ),
        "upcycle destination is a file": (up + [str(bad["a_file"]), "--experts", "4", "--top_k", "2"], "not a folder"),
        "upcycle destination under a file": (
            up + [str(bad["a_file"] / "moe"), "--experts", "4", "--top_k", "2"],
            "not a folder",
        ),
        "upcycle destination not empty": (up + [str(bad["full_dir"]), "--experts", "4", "--top_k", "2"], "not empty"),
        "upcycle experts 0": (up + [dst, "--experts", "0", "--top_k", "1"], "experts (0)"),
        "upcycle top_k > experts": (up + [dst, "--experts", "2", "--top_k", "3"], "top_k (3)"),
        "upcycle source not Llama-style": (
            ["moe", "upcycle", "tiny:qwen3", dst, "--experts", "4", "--top_k", "2"],
            "dense Llama-style",
        ),
    }


CASE_IDS = list(_cases({name: Path("/x") / name for name in PATHS}))


@pytest.fixture(scope="module")
def results(bad, tmp_path_factory):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cases = _cases(bad)
    return run_cli_cases({case: argv for case, (argv, _) in cases.items()}, env, tmp_path_factory.mktemp("cwd"))


@pytest.mark.parametrize("case", CASE_IDS)
def test_eval_report_upcycle_bad_input_is_one_line_exit_2(case, bad, results):
    assert_one_line_error(results[case], _cases(bad)[case][1])
    assert not (bad["root"] / "moe").exists()  # no case got as far as writing a model
