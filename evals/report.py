"""``posttrain report RUN_DIR``: plots of a training run's logged metrics.

Read from what the run folder holds (``find_run_log``): its ``trainer_state.json`` (every run writes one beside its
weights; older runs only in their ``checkpoint-N`` folders), an auxiliary trainer's ``results.json`` history
(FedAU), or, for a run that has neither (``save_strategy: "no"`` before runs wrote trainer_state.json), its
``run_summary.json``, which holds each metric's first and last logged value only: a table, no curves.
Metrics are grouped by their prefix (``loss``, ``rewards/...``, ``constrained/...``, ``mask/...``): one PNG per
group under ``RUN_DIR/report/``, plus ``report.md`` with each metric's first, last, min and max.

``trainers.runtime`` (torch) and matplotlib are imported inside the functions that use them (start-up time of
``posttrain``).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from posttrain import UserError
from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot


def finish_experiment(
    result: dict, started: float, format_table: Callable[[dict], str], plot, out: Path | None, name: str
) -> dict:
    """The end of an experiment script: stamp ``result`` with the seconds since ``started``, print its table and
    time and, unless ``out`` is None, write ``out/<name>.json`` (atomically) and ``plot(result, out/<name>.png)``."""
    result["seconds"] = round(time.time() - started, 1)
    print(format_table(result))
    print(f"({result['seconds']} s)")
    if out is not None:
        path = write_json_atomic(Path(out) / f"{name}.json", result, indent=1)
        png = plot(result, Path(out) / f"{name}.png")
        print(f"wrote {path}" + (f" and {png}" if png else ""))
    return result


def find_trainer_state(run_dir: Path) -> Path | None:
    """RUN_DIR/trainer_state.json, else the one of its newest checkpoint, else None."""
    from posttrain.trainers.runtime import latest_checkpoint

    direct = run_dir / "trainer_state.json"
    if direct.is_file():
        return direct
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is not None and (checkpoint / "trainer_state.json").is_file():
        return checkpoint / "trainer_state.json"
    return None


def find_run_log(run_dir: Path) -> tuple[str, Path]:
    """(kind, file) of the richest log a run folder holds: "trainer_state" (a Trainer's log_history), "history"
    (an auxiliary trainer's results.json, e.g. FedAU's) or "summary" (run_summary.json: first and last values)."""
    state = find_trainer_state(run_dir)
    if state is not None:
        return "trainer_state", state
    results = run_dir / "results.json"
    if results.is_file():
        payload = _read_json(results)
        if isinstance(payload, dict) and isinstance(payload.get("history"), list):
            return "history", results
        if isinstance(payload, dict) and "results" in payload and "models" in payload:
            raise UserError(
                f"{run_dir} is the output of `posttrain eval`: its tables are in results.md and its plots "
                "beside it; `posttrain report` reads a training run's output_dir"
            )
    if (run_dir / "run_summary.json").is_file():
        return "summary", run_dir / "run_summary.json"
    raise UserError(
        f"{run_dir}: no trainer_state.json, run_summary.json or results.json here (nor a checkpoint-N "
        "folder); give a training run's output_dir"
        + ("" if run_dir.is_dir() else ", which this is not: no such folder")
    )


def _read_json(file: Path):
    fix = "give a checkpoint-N folder of the run instead: each holds the trainer_state.json of its step"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{file} cannot be read ({err.strerror}); fix its permissions or {fix}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is corrupt (not UTF-8 text: byte {err.start}); {fix}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is corrupt (not JSON: {err.msg}, line {err.lineno}); {fix}") from None


def summary_metrics(summary_file: Path) -> dict[str, tuple[float, float]]:
    """metric -> (first, last) logged value, from a run_summary.json."""
    summary = _read_json(summary_file)
    metrics = summary.get("metrics") if isinstance(summary, dict) else None
    if not isinstance(metrics, dict):
        raise UserError(
            f"{summary_file} has no metrics mapping, so it is not a posttrain run_summary.json (or it is "
            "damaged); give a training run's output_dir"
        )
    return {
        name: (float(v["first"]), float(v["last"]))
        for name, v in metrics.items()
        if isinstance(v, dict) and {"first", "last"} <= set(v)
    }


def read_log_history(state_file: Path) -> list[dict]:
    """The ``log_history`` of a trainer_state.json; a file that cannot be read or parsed is named as corrupt (not as
    missing: it is there)."""
    state = _read_json(state_file)
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise UserError(
            f"{state_file} has no log_history list of log entries, so it is not a Trainer's "
            "trainer_state.json (or it is damaged); give a training run's output_dir"
        )
    return history


def series(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, values) of the training logs (evaluation logs keep their eval_ prefix); an auxiliary
    trainer's history counts ``round`` for ``step``."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        step = entry.get("step", entry.get("round"))
        for key, value in entry.items():
            if key in ("step", "epoch", "round") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    return out


def report(run_dir: str, log=print) -> Path:
    plt = pyplot()

    run = Path(run_dir)
    kind, log_file = find_run_log(run)
    out = run / "report"
    if kind == "summary":
        return _summary_report(run, log_file, out, log)
    if kind == "history":
        history = _read_json(log_file)["history"]
        if not all(isinstance(entry, dict) for entry in history):
            raise UserError(f"{log_file}: its history is not a list of log entries (damaged?); rerun the recipe")
    else:
        history = read_log_history(log_file)
    metrics = series(history)
    if not metrics:
        raise UserError(f"{log_file}: no logged metrics (set logging_steps)")
    state_file = log_file
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(metrics):
        groups[name.split("/")[0]].append(name)
    for group, names in groups.items():
        cols = min(3, len(names))
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            steps, values = metrics[name]
            ax.plot(steps, values, marker="." if len(values) < 50 else None)
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("step", fontsize=7)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / f"{group.replace(' ', '_')}.png", dpi=100)
        plt.close(fig)
    lines = [
        f"# {run}",
        "",
        f"from `{state_file}`",
        "",
        "| metric | first | last | min | max |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(metrics):
        v = metrics[name][1]
        lines.append(f"| {name} | {v[0]:.4g} | {v[-1]:.4g} | {min(v):.4g} | {max(v):.4g} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    log(f"report: {len(groups)} plots and report.md in {out}")
    return out


def _summary_report(run: Path, summary_file: Path, out: Path, log) -> Path:
    metrics = summary_metrics(summary_file)
    if not metrics:
        raise UserError(f"{summary_file}: no logged metrics (set logging_steps)")
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {run}",
        "",
        f"from `{summary_file}`: the first and last logged value of each metric only (this run "
        "folder has no trainer_state.json to draw curves from)",
        "",
        "| metric | first | last |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {first:.4g} | {last:.4g} |" for name, (first, last) in sorted(metrics.items())]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    log(f"report: report.md in {out} (first and last values from run_summary.json; no trainer_state.json for curves)")
    return out
