"""Helpers the test files share: ``from support import ...`` (``tests/`` is on pytest's ``pythonpath``).

They live here, not in ``conftest.py``: pytest runs with ``--import-mode=importlib``, so a conftest is not an
importable module.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def load_experiment(name: str):
    """Import ``experiments/<name>.py`` (not a package) as a module; the caller removes it from sys.modules."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module


def method_state(folder) -> dict:
    """The method state saved in a checkpoint or output folder (``posttrain.trainers.method_state``)."""
    import torch

    from posttrain.trainers.method_state import STATE_FILE

    return torch.load(Path(folder) / STATE_FILE, weights_only=True)


def assert_same_state(a, b, atol=0.0, where="state"):
    """Nested dicts / lists of tensors and numbers equal: bit for bit at atol 0, else within atol."""
    import torch

    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for key in a:
            assert_same_state(a[key], b[key], atol, f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, atol, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, (where, a, b)
        if atol == 0 or a.dtype == torch.bool:
            assert torch.equal(a, b), where
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=where)
    elif isinstance(a, float) and atol:
        assert abs(a - b) <= atol, (where, a, b)
    else:
        assert a == b, (where, a, b)


def run_cli_cases(cases: dict, env: dict, cwd, workers: int = 2, timeout: int = 300) -> dict:
    """Run each ``posttrain`` argv of ``cases`` (id -> argv list) in its own subprocess, ``workers`` at a time;
    returns id -> CompletedProcess. For the table-driven bad-input tests: each case is a real command line."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def run(argv):
        return subprocess.run(
            [str(BIN / "posttrain"), *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
        )

    with ThreadPoolExecutor(workers) as pool:
        futures = {case: pool.submit(run, argv) for case, argv in cases.items()}
        return {case: future.result() for case, future in futures.items()}


def assert_one_line_error(proc, message: str, code: int = 2) -> None:
    """The README's promise for a mistake: exit ``code``, one stderr line naming it, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == code, f"exit {proc.returncode} (want {code}); stderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in err and len(err.splitlines()) == 1, f"not one line:\n{err[-3000:]}"
    assert err.startswith("posttrain: "), err
    assert message in err, f"{message!r} not in: {err}"


def free_port() -> int:
    """A TCP port free on this machine now, for a launch's rendezvous: a fixed port collides with any other run
    (another test session, a second CI) that holds it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_refused(argv: list[str], message: str, capsys, output_dir) -> str:
    """In-process ``posttrain <argv> --output_dir <output_dir>`` is refused: exit 2, one stderr line holding
    ``message``, and nothing written to ``output_dir``. Returns the line, for further checks."""
    from posttrain.cli import main

    capsys.readouterr()
    assert main([*argv, "--output_dir", str(output_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not Path(output_dir).exists()  # refused before anything ran
    return err


def one_process_launch(*program: str) -> list[str]:
    """The ``accelerate launch`` command line of a 1-process run (the reference a 2-process run is compared with)."""
    return [str(BIN / "accelerate"), "launch", "--num_processes", "1", *program]


def two_process_launch(config: str, *program: str) -> list[str]:
    """The ``accelerate launch`` command line of a 2-process CPU run with a shipped accelerate config (``cpu_2proc``,
    ``zero2``, ``zero3`` ...; bf16 is for GPUs, so mixed precision is off) on a free port; ``program`` is the script
    or ``-m ...`` and its arguments."""
    return [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / config),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        *program,
    ]
