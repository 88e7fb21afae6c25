"""Session setup (offline environment, GPU-test skipping) and fixtures; shared helpers live in ``support.py``."""

import os

import pytest

# Tests never touch the hub: everything they load is built locally or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        if os.environ.get("POSTTRAIN_REQUIRE_CUDA") == "1":  # the GPU machine: a CUDA that fails to start is a failure
            raise pytest.UsageError(
                "POSTTRAIN_REQUIRE_CUDA=1 but torch.cuda.is_available() is False: CUDA did not start "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); see nvidia-smi"
            )
        skip = pytest.mark.skip(reason="needs CUDA (run by scripts/gpu_check.sh on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def run_env(tmp_path):
    """Environment for posttrain subprocesses: offline, one thread per process, quiet."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env
