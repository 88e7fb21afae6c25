"""``posttrain report RUN`` on every run folder a recipe writes: a save_strategy "no" run (every tiny recipe), the
same run as it was before runs wrote trainer_state.json (run_summary.json only), an auxiliary trainer's folder
(FedAU's results.json), and an eval output, which it names as such."""

import json

import torch

from posttrain.cli import main
from posttrain.evals.report import series

torch.set_num_threads(1)


def test_report_on_a_save_strategy_no_run(tmp_path):
    run = tmp_path / "dpo"
    assert main(["train", "dpo/tiny", "--output_dir", str(run), "--max_steps", "3"]) == 0
    assert not list(run.glob("checkpoint-*"))  # dpo/tiny: save_strategy "no"
    assert main(["report", str(run)]) == 0
    history = [e for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert [e["step"] for e in history] == [1, 2, 3]
    assert (run / "report" / "loss.png").stat().st_size > 1000
    table = (run / "report" / "report.md").read_text()
    losses = [e["loss"] for e in history]
    assert f"| loss | {losses[0]:.4g} | {losses[-1]:.4g} | {min(losses):.4g} | {max(losses):.4g} |" in table
    # a run folder from before runs wrote trainer_state.json: run_summary.json alone gives first and last values
    (run / "trainer_state.json").unlink()
    summary = json.loads((run / "run_summary.json").read_text())
    assert main(["report", str(run)]) == 0
    table = (run / "report" / "report.md").read_text()
    assert "first and last logged value of each metric only" in table
    first, last = summary["metrics"]["loss"]["first"], summary["metrics"]["loss"]["last"]
    assert (first, last) == (losses[0], losses[-1])
    assert f"| loss | {first:.4g} | {last:.4g} |" in table


def test_report_on_an_auxiliary_run_and_on_an_eval_output(tmp_path, capsys):
    run = tmp_path / "fedau"
    assert (
        main(["train", "fedau/quadratic_fedau", "--output_dir", str(run), "--max_steps", "40", "--eval_every", "10"])
        == 0
    )
    history = json.loads((run / "results.json").read_text())["history"]
    assert main(["report", str(run)]) == 0
    table = (run / "report" / "report.md").read_text()
    excess = [e["excess_loss"] for e in history]
    assert len(excess) == 4 and f"| excess_loss | {excess[0]:.4g} | {excess[-1]:.4g} |" in table
    assert series(history)["excess_loss"] == ([10, 20, 30, 40], excess)  # plotted against the round
    assert (run / "report" / "excess_loss.png").stat().st_size > 1000
    evals = tmp_path / "ev"
    evals.mkdir()
    (evals / "results.json").write_text(json.dumps({"models": ["tiny:llama"], "tasks": {}, "results": {}}))
    capsys.readouterr()
    assert main(["report", str(evals)]) == 2
    assert "output of `posttrain eval`" in capsys.readouterr().err
