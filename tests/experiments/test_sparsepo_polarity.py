"""The SparsePO polarity-pair experiment (experiments/sparsepo_polarity.py, EXPERIMENTS.md).

The slow test runs its ``--quick`` version (~45 s on one CPU core) and checks the qualitative effect that a
broken SparsePO would lose: the learned mask grows from its ~5e-3 initialisation and puts more mass on the
tokens where chosen and rejected differ than elsewhere. Thresholds are calibrated on the quick run: the
learned-mask ratio (differing / elsewhere) was 3.63 for seed 1 (the test's seed) and 6.76 / 4.01 / 4.31 for
seeds 2-4, against 1.28 / 1.82 / 0.95 / 0.51 at initialisation; mask@differing rose 37-403x. The full run's
criterion (ratio >= 3) is reported in EXPERIMENTS.md, not asserted here.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "sparsepo_polarity.py"


def load_script():
    spec = importlib.util.spec_from_file_location("sparsepo_polarity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_differing_tokens_equal_and_unequal_lengths():
    # rows [chosen; rejected] of two pairs; completion = where completion_mask is 1; 0 = padding
    ids = torch.tensor(
        [
            [5, 6, 10, 11, 12, 13, 0],  # pair 0 chosen:  10 11 12 13     (same length as rejected, token 11 flips)
            [5, 6, 10, 20, 30, 13, 14],  # pair 1 chosen:  10 20 30 13 14  (vs 10 21 22 23 13 14: unequal length)
            [5, 6, 10, 99, 12, 13, 0],  # pair 0 rejected
            [5, 10, 21, 22, 23, 13, 14],  # pair 1 rejected (prompt one token shorter, to check positions)
        ]
    )
    cm = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 1, 1],
        ]
    )
    diff = load_script().differing_tokens(ids, cm)
    assert diff.tolist() == [
        [False, False, False, True, False, False, False],
        [False, False, False, True, True, False, False],  # common prefix 10, common suffix 13 14
        [False, False, False, True, False, False, False],
        [False, False, True, True, True, False, False],
    ]


def test_kl_at_margin_interpolates():
    kl_at_margin = load_script().kl_at_margin
    trajectory = [
        {"margin": 0.0, "kl_shared": 0.0},
        {"margin": 2.0, "kl_shared": 10.0},
        {"margin": 4.0, "kl_shared": 30.0},
    ]
    assert kl_at_margin(trajectory, 3.0) == pytest.approx(20.0)
    assert kl_at_margin(trajectory, 5.0) is None


@pytest.mark.slow
def test_quick_experiment_learned_mask_concentrates_on_differing_tokens(tmp_path, run_env):
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=run_env,
        check=True,
        timeout=300,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    result = json.loads((tmp_path / "sparsepo_polarity.json").read_text())
    assert (tmp_path / "sparsepo_polarity.png").stat().st_size > 0
    runs = result["variants"]
    assert set(runs) == {"TDPO-1", "SparsePO learned", "SparsePO activation"}
    for name, run in runs.items():
        m = run["metrics"]
        assert 1 <= m["differing_tokens_per_pair"] <= 3, name  # 1-2 flipped words, "sad" is two tokens
        assert m["chunked_vs_plain_max_abs_diff"] < 1e-3, name  # trainer's chunked terms = plain forwards
        assert m["accuracy"] >= 0.9 and m["margin"] > 0, name  # every variant learns the preference

    uniform = runs["TDPO-1"]["metrics"]  # TDPO-1: masks are exactly 1, the baseline ratio
    assert (
        uniform["mask_diff"] == uniform["mask_else"] == 1.0 and uniform["ratio"] == 1.0 and uniform["sparsity"] == 0.0
    )

    activation = runs["SparsePO activation"]["metrics"]  # MaPO: min-max rescaled per sequence
    assert 0.0 <= activation["mask_min"] and activation["mask_max"] <= 1.0 + 1e-6

    learned, initial = runs["SparsePO learned"]["metrics"], runs["SparsePO learned"]["initial"]
    assert learned["mask_min"] >= 0.0  # ReLU
    assert learned["mask_diff"] >= 10 * initial["mask_diff"]  # the mask network is trained, upwards where it matters
    assert learned["ratio"] >= 2.0  # and it concentrates on the differing tokens (3.63 when calibrated)
