"""Real process launches: the console script, and accelerate with 1 and 2 processes (gloo on CPU)."""

import json
import subprocess

import pytest
from support import BIN, ROOT

pytestmark = pytest.mark.slow


def _run(cmd, env, timeout=600):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_console_script_trains_dpo_tiny(tmp_path, run_env):
    proc = _run(
        [str(BIN / "posttrain"), "train", "dpo/tiny", "--max_steps", "2", "--output_dir", str(tmp_path)], run_env
    )
    assert "run summary" in proc.stdout
    assert json.loads((tmp_path / "run_summary.json").read_text())["global_step"] == 2


@pytest.mark.parametrize("num_processes", [1, 2])
def test_accelerate_launch(num_processes, tmp_path, run_env):
    # --multi_gpu with no GPU: accelerate runs torchrun and picks MULTI_CPU + gloo (2 real processes);
    # --cpu would silently run one.
    flags = ["--multi_gpu", "--num_processes", "2"] if num_processes == 2 else ["--num_processes", "1"]
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        *flags,
        "-m",
        "posttrain",
        "train",
        "dpo/tiny",
        "--max_steps",
        "2",
        "--output_dir",
        str(tmp_path),
    ]
    _run(cmd, run_env)
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["world_size"] == num_processes and summary["global_step"] == 2
