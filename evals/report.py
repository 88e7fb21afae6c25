"""``posttrain report RUN_DIR``: plots of a training run's logged metrics, from its ``trainer_state.json``.

Metrics are grouped by their prefix (``loss``, ``rewards/...``, ``constrained/...``, ``mask/...``): one PNG per
group under ``RUN_DIR/report/``, plus ``report.md`` with each metric's first, last, min and max.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from posttrain import UserError


def find_trainer_state(run_dir: Path) -> Path:
    """RUN_DIR/trainer_state.json, else the one of its newest checkpoint."""
    from posttrain.trainers.runtime import latest_checkpoint

    direct = run_dir / "trainer_state.json"
    if direct.is_file():
        return direct
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is not None and (checkpoint / "trainer_state.json").is_file():
        return checkpoint / "trainer_state.json"
    raise UserError(f"{run_dir}: no trainer_state.json here or in a checkpoint-N folder; give a run's output_dir "
                    "(save_strategy must have written at least one checkpoint)")


def read_log_history(state_file: Path) -> list[dict]:
    """The ``log_history`` of a trainer_state.json; a file that cannot be read or parsed is named as corrupt (not as
    missing: it is there)."""
    fix = "give a checkpoint-N folder of the run instead: each holds the trainer_state.json of its step"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{state_file} cannot be read ({err.strerror}); fix its permissions or {fix}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{state_file} is corrupt (not UTF-8 text: byte {err.start}); {fix}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{state_file} is corrupt (not JSON: {err.msg}, line {err.lineno}); {fix}") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise UserError(f"{state_file} has no log_history list of log entries, so it is not a Trainer's "
                        "trainer_state.json (or it is damaged); give a training run's output_dir")
    return history


def series(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, values) of the training logs (evaluation logs keep their eval_ prefix)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            if key in ("step", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    return out


def report(run_dir: str, log=print) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    state_file = find_trainer_state(run)
    metrics = series(read_log_history(state_file))
    if not metrics:
        raise UserError(f"{state_file}: no logged metrics (set logging_steps)")
    out = run / "report"
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
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / f"{group.replace(' ', '_')}.png", dpi=100)
        plt.close(fig)
    lines = [f"# {run}", "", f"from `{state_file}`", "", "| metric | first | last | min | max |", "|---|---|---|---|---|"]
    for name in sorted(metrics):
        v = metrics[name][1]
        lines.append(f"| {name} | {v[0]:.4g} | {v[-1]:.4g} | {min(v):.4g} | {max(v):.4g} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    log(f"report: {len(groups)} plots and report.md in {out}")
    return out
