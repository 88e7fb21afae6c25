"""The command line: listing, one-line errors with exit code 2, --debug, both entry points."""

import subprocess
import sys

import pytest
from support import BIN, ROOT

from posttrain.cli import main


def test_list_shows_methods_recipes_rewards_and_data(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in (
        "dpo",
        "grpo",
        "fedau",
        "lion_k",
        "li2_grokking",
        "muon",
        "dpo/tiny",
        "numeric_match",
        "length_penalty",
        "arithmetic",
        "preference",
    ):
        assert word in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "dpo/tinyy"], "not found"),
        (["train", "dpo/tiny", "--learnig_rate", "1"], "unknown key 'learnig_rate'"),
        (["train", "dpo/tiny", "--max_steps", "many"], "expects int"),
        (["train", "grpo/tiny", "--reward_funcs", "nope"], "unknown reward function"),
        (["train", "dpo/tiny", "--dataset", "builtin:nothing"], "nothing"),
        (
            ["train", "grpo/tiny", "--dataset", "builtin:review_prompts", "--difficulty", "null"],
            "'numeric_match' needs the dataset column(s) answer",
        ),
        (["train", "grpo/tiny", "--reward_funcs", "rm:/nowhere"], "not a saved model directory"),
        (["train", "constrained_rlhf/tiny", "--constraint_thresholds", "[0.1]"], "constraint_thresholds has 1 values"),
        (["train", "constrained_rlhf/tiny", "--formulation", "ppo"], "formulation='ppo'"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("posttrain: error:") and message in err and "\n" not in err


def test_console_script_and_module_give_the_same_clean_error(run_env):
    for cmd in ([str(BIN / "posttrain")], [sys.executable, "-m", "posttrain"]):
        proc = subprocess.run(
            [*cmd, "train", "dpo/tiny", "--bta", "1"], capture_output=True, text=True, env=run_env, cwd=ROOT
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "did you mean 'beta'" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    debug = subprocess.run(
        [*cmd, "train", "dpo/tiny", "--bta", "1", "--debug"], capture_output=True, text=True, env=run_env, cwd=ROOT
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_reader_that_stops_early_gets_no_traceback(run_env):
    # `posttrain list | head -1`: the pipe closes while posttrain still prints
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=run_env,
        bufsize=0,
    )
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.communicate(timeout=120)[1].decode()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert proc.returncode in (0, 141)
