"""The recorded OptiBench run of SmolLM2-135M-Instruct (experiments/optibench_smollm2.py, EXPERIMENTS.md): its
metrics are what the task's own scoring gives on its per-problem records, and the figure is drawn from them."""

import json
import sys

import pytest
from support import ROOT, load_experiment

from posttrain.evals.optibench import score


@pytest.fixture(scope="module")
def experiment():
    yield load_experiment("optibench_smollm2")
    sys.modules.pop("optibench_smollm2", None)


def test_recorded_metrics_follow_from_the_records_and_plot(experiment, tmp_path):
    summary = json.loads((ROOT / "experiments" / "results" / "optibench_smollm2.json").read_text())
    assert set(summary) == {"zeroshot", "fewshot"}
    for run in summary.values():
        assert score(run["problems"]) == pytest.approx(run["metrics"], nan_ok=True)
        counts = {}
        for p in run["problems"]:
            counts[p["status"]] = counts.get(p["status"], 0) + 1
        assert counts == run["statuses"]
    experiment.plot(summary, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
