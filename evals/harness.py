"""``posttrain eval``: run registered tasks on one or more checkpoints; cache, tables and plots.

    posttrain eval --model runs/dpo-smollm2 --compare HuggingFaceTB/SmolLM2-135M-Instruct --tasks preference,perplexity
    posttrain eval recipes/eval/tiny.yaml                       # an eval recipe: the same keys in YAML
    accelerate launch --num_processes 2 -m posttrain eval ...  # data-parallel; the same numbers as 1 process

Each (checkpoint, task, task config, limit, seed) result is cached under ``$POSTTRAIN_CACHE/evals``, keyed by
everything that determines its numbers (``cache_key``): the files of the evaluated checkpoint and of every other
model the task loads (``reference``, ``retain_model``, ``reward_model``), the dataset and lm-eval task files, the
eval and data code, and the library versions; so a re-run only loads models whose results are missing or stale. The
output
folder gets ``results.json`` (numbers, configs, versions), ``results.md`` (one column per checkpoint) and PNG
plots: one bar chart per task, pass@k curves, MaxVio per layer. Task options are read with the recipes' type
checker (``recipes.config.coerce``), so they read and fail like recipe keys.

The modules that import torch, transformers or datasets (the tasks, checkpoint loading) are imported inside the
functions that use them: checking an eval spec loads none.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import json
import platform
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain import UserError, __version__
from posttrain.atomic import write_json_atomic
from posttrain.model_folder import looks_like_path
from posttrain.paths import cache_dir, not_a_folder
from posttrain.plots import pyplot
from posttrain.recipes.config import coerce, find_recipe, read_recipe_file, read_yaml

RESULTS_VERSION = 1


@dataclass
class EvalSpec:
    models: list[str]
    tasks: dict[str, dict] = field(default_factory=dict)  # name -> config
    output: str = "runs/eval"
    limit: int | None = None
    seed: int = 0
    batch_size: int = 8
    peft: str | None = None
    cache: bool = True


def parse_tasks(value, where: str = "command line") -> dict[str, dict]:
    """``"a,b"``, ``["a", "b"]`` or ``{"a": {config}, "b": null}`` -> {name: config}, checked against EVAL_TASKS: option
    names and types (read like recipe values), then the task's own check (``CHECKS``). ``where``: for messages."""
    from posttrain.evals.tasks import CHECKS, EVAL_TASKS

    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, (list, tuple)):
        value = {name: {} for name in value}
    if not isinstance(value, dict) or not value:
        raise UserError(
            f"{where}: tasks: give task names (--tasks a,b) or, in an eval recipe, a mapping task -> config"
        )
    unknown = [name for name in value if name not in EVAL_TASKS]
    if unknown:
        raise UserError(
            f"{where}: unknown eval task(s) {', '.join(map(repr, unknown))}; valid: {', '.join(EVAL_TASKS)}"
        )
    tasks = {}
    for name, config in value.items():
        if not isinstance(config, (dict, type(None))):
            raise UserError(
                f"{where}: eval task '{name}': its options must be a mapping option -> value, got "
                f'{config!r}; e.g. {{"math": {{"n": 64}}}}'
            )
        config = dict(config or {})
        params = inspect.signature(EVAL_TASKS[name][0]).parameters
        bad = [k for k in config if k not in params or k == "ctx"]
        if bad:
            raise UserError(
                f"{where}: eval task '{name}' has no option(s) {', '.join(map(str, bad))}; "
                f"valid: {', '.join(p for p in params if p != 'ctx')}"
            )
        hints = typing.get_type_hints(EVAL_TASKS[name][0])
        config = {k: coerce(v, hints.get(k, Any), k, f"{where}: eval task '{name}'") for k, v in config.items()}
        if name in CHECKS:
            defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
            try:
                CHECKS[name](**{**defaults, **config})
            except ValueError as err:
                raise UserError(f"{where}: eval task '{name}': {err}") from None
        tasks[name] = config
    return tasks


def parse_task_config(text: str) -> dict:
    """``--task_config``: a JSON/YAML mapping task -> options (checked by ``parse_tasks``)."""
    example = 'e.g. \'{"math": {"n": 64}}\''
    value = _read_yaml(text, "command line: --task_config", f"give a mapping task -> options, {example}")
    if not isinstance(value, dict):
        raise UserError(
            f"command line: --task_config must be a mapping task -> options, {example}; got "
            f"{type(value).__name__} {value!r}"
        )
    return value


def _read_yaml(text: str, where: str, fix: str):
    try:
        return read_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark and "\n" in text.strip() else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise UserError(f"{where}{line}: not valid YAML/JSON ({problem}); {fix}") from None


# the keys of an eval recipe (and of the eval command line), with their types
EVAL_KEYS = {
    "model": str,
    "compare": Any,
    "tasks": Any,
    "output": str,
    "limit": int,
    "seed": int,
    "batch_size": int,
    "peft": str,
    "cache": bool,
}


def load_eval_recipe(path: str, overrides: dict[str, Any]) -> EvalSpec:
    """An eval recipe (YAML with model, compare, tasks, output, limit, seed, batch_size, peft) plus CLI overrides."""
    file = find_recipe(path)
    values = read_recipe_file(file)
    if not isinstance(values, dict):
        raise UserError(
            f"{file}: an eval recipe is a mapping of keys ({', '.join(EVAL_KEYS)}) to values, "
            f"got {type(values).__name__}"
        )
    # each value is blamed on where it came from: the recipe file, or the command line that overrides it
    sources = {key: str(file) for key in values}
    for key, value in overrides.items():
        if value is not None:
            values[key], sources[key] = value, "command line"
    return make_spec(values, where=str(file), sources=sources)


def make_spec(values: dict[str, Any], where: str = "command line", sources: dict[str, str] | None = None) -> EvalSpec:
    """The checked spec of ``values``; ``sources``: key -> where its value came from (default ``where``). Nothing
    here loads a model: every mistake is found before the first one loads."""

    def source(key: str) -> str:
        return (sources or {}).get(key, where)

    unknown = sorted(set(values) - set(EVAL_KEYS), key=str)
    if unknown:
        raise UserError(
            f"{source(unknown[0])}: unknown eval key(s) {', '.join(map(str, unknown))}; "
            f"valid: {', '.join(sorted(EVAL_KEYS))}"
        )
    values = {
        k: v if v is None or EVAL_KEYS[k] is Any else coerce(v, EVAL_KEYS[k], k, source(k)) for k, v in values.items()
    }
    if not values.get("model"):
        raise UserError(f"{where}: name the checkpoint to evaluate (--model PATH_OR_HUB_ID)")
    compare = values.get("compare") or []
    compare = [compare] if isinstance(compare, str) else list(compare)
    for name in [values["model"], *compare]:
        _check_model(name)
    # 0 and negative numbers are refused, not read as "everything" (limit) or the default (batch_size)
    limit, batch_size = values.get("limit"), values.get("batch_size")
    if limit is not None and limit < 1:
        raise UserError(f"{source('limit')}: limit must be >= 1 (got {limit}); leave it out to evaluate every example")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"{source('batch_size')}: batch_size must be >= 1 (got {batch_size}); leave it out for 8")
    output = values.get("output")
    if output is not None:
        _check_output(output, source("output"))
    return EvalSpec(
        models=[values["model"], *compare],
        tasks=parse_tasks(values.get("tasks") or "", source("tasks")),
        output=output or "runs/eval",
        limit=limit,
        seed=values.get("seed") or 0,
        batch_size=8 if batch_size is None else batch_size,
        peft=values.get("peft"),
        cache=values.get("cache", True) is not False,
    )


def _check_output(output: str, where: str) -> None:
    # the folder is written after every model has been evaluated: a bad one must fail now, not then
    if not output.strip():
        raise UserError(f"{where}: output is empty; name a folder for the results, or leave it out for runs/eval")
    problem = not_a_folder(Path(output))
    if problem:
        raise UserError(f"{where}: output {output}{problem}; name a new or existing folder")


def _check_model(name: str) -> None:
    # a path that does not exist fails here, before any model loads (``resolve_model_path``'s test for a path);
    # hub ids are checked by transformers, tiny:<arch> by resolve_model_path
    if not name.startswith("tiny:") and looks_like_path(name) and not Path(name).expanduser().exists():
        raise UserError(f"checkpoint {name!r} does not exist; give a checkpoint folder, a hub id or tiny:<arch>")


# ------------------------------------------------------------------------------------------------- running


def _versions() -> dict:
    import torch
    import transformers
    import trl

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "posttrain": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "lm_eval": version("lm_eval"),
        "datasets": version("datasets"),
        "peft": version("peft"),
        "python": platform.python_version(),
    }


def is_model_option(name: str) -> bool:
    """A task option that names a checkpoint the task loads (``reference``, ``retain_model``, ``reward_model``, any
    ``*_model``): the cache key holds its weights' fingerprint, not just its name."""
    return name == "reference" or name.endswith("_model")


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """sha256 over the source of the eval tasks and the data code (builtin generators, loading, formatting): a
    posttrain version string does not move when that code is edited, and either edit can change a number."""
    import posttrain.data
    import posttrain.evals

    digest = hashlib.sha256()
    for package in (posttrain.evals, posttrain.data):
        for file in sorted(Path(package.__file__).parent.glob("*.py")):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _referenced_files(folder: Path) -> list[Path]:
    """Files named in the YAML task files under ``folder`` that lie outside it (lm-eval ``data_files`` and the like),
    read as a path from the current folder or the YAML's own."""
    found = set()
    for yaml_file in sorted(folder.rglob("*.y*ml")):
        for token in re.findall(r"[^\s'\"\[\]{},:]*[/.][^\s'\"\[\]{},]*", yaml_file.read_text(errors="replace")):
            for candidate in (Path(token).expanduser(), yaml_file.parent / token):
                try:
                    if candidate.is_file() and folder.resolve() not in candidate.resolve().parents:
                        found.add(candidate.resolve())
                except OSError:  # a token too long or odd to be a path
                    pass
    return sorted(found)


def input_fingerprint(name: str, value):
    """What a task option's value stands for: a checkpoint's weights (``is_model_option``), a local file or folder's
    content (dataset files, lm-eval ``include_path`` with the files its YAMLs name), else the value itself (builtin
    generators are their arguments plus ``_code_fingerprint``; hub datasets their id)."""
    from posttrain.evals.common import model_fingerprint, path_fingerprint

    if isinstance(value, (list, tuple)):
        return [input_fingerprint(name, v) for v in value]
    if not isinstance(value, str) or not value:
        return value
    if is_model_option(name):
        return model_fingerprint(value)
    if name not in ("dataset", "include_path") and not (
        "/" in value or value.startswith(("~", ".")) or Path(value).suffix
    ):
        return value  # a split, column or reward name: not read as a path even if the current folder has one so named
    local = Path(value).expanduser()
    try:
        exists = local.exists()
    except OSError:
        exists = False
    if not exists:
        return value
    out = path_fingerprint(local)
    if local.is_dir():
        out["referenced"] = [path_fingerprint(f) for f in _referenced_files(local)]
    return out


def cache_key(path: str, peft, task: str, config: dict, spec: EvalSpec) -> dict:
    """Everything that determines a task's numbers: the evaluated checkpoint (and adapter), each input the task
    reads (its options with their defaults filled in, see ``input_fingerprint``), limit / seed / batch size, the
    code of the tasks and data, and the versions of posttrain and the libraries that compute them."""
    from posttrain.evals.common import model_fingerprint
    from posttrain.evals.tasks import EVAL_TASKS

    params = inspect.signature(EVAL_TASKS[task][0]).parameters
    options = {k: p.default for k, p in params.items() if k != "ctx" and p.default is not inspect.Parameter.empty}
    options.update(config)
    return {
        "model": model_fingerprint(path, peft),
        "task": task,
        "config": config,
        "inputs": {k: input_fingerprint(k, v) for k, v in sorted(options.items())},
        "limit": spec.limit,
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "version": RESULTS_VERSION,
        "code": _code_fingerprint(),
        "versions": _versions(),
    }


def _cache_path(model: str, path: str, peft, task: str, config: dict, spec: EvalSpec) -> Path:
    key = cache_key(path, peft, task, config, spec)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir() / "evals" / f"{task}-{digest}.json"


def run_eval(spec: EvalSpec, log=print) -> dict:
    """Evaluate every model on every task (cached), write results.json / results.md / plots; returns results."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    from posttrain.evals.common import EvalContext, load_checkpoint
    from posttrain.evals.tasks import EVAL_TASKS
    from posttrain.recipes.models import resolve_model_path

    state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True a CPU launch stays one process
    # every checkpoint is resolved (and a broken local folder refused) before the first one loads
    paths = {model_name: resolve_model_path(model_name) for model_name in spec.models}
    results: dict[str, dict] = {}
    for model_name in spec.models:
        path = paths[model_name]
        peft = spec.peft if model_name == spec.models[0] else None
        results[model_name] = {}
        pending = {}
        for task, config in spec.tasks.items():
            cached = _cache_path(model_name, path, peft, task, config, spec)
            if spec.cache and cached.is_file():
                results[model_name][task] = json.loads(cached.read_text())
                log(f"{model_name} / {task}: cached")
            else:
                pending[task] = cached
        if not pending:
            continue
        model, tokenizer, _ = load_checkpoint(model_name, peft=peft, device=str(state.device))
        context = functools.partial(
            EvalContext,
            model,
            tokenizer,
            model_name,
            path,
            seed=spec.seed,
            limit=spec.limit,
            batch_size=spec.batch_size,
        )
        ctx = context(world=state.num_processes, rank=state.process_index, _gather=gather_object)
        for task, cached in pending.items():
            fn, _, parallel = EVAL_TASKS[task]
            log(f"{model_name} / {task} ...")
            if parallel or state.num_processes == 1:
                out = fn(ctx, **spec.tasks[task])
            else:  # single-process task: rank 0 computes, the others receive its result
                holder = [fn(context(), **spec.tasks[task]) if state.is_main_process else None]
                out = broadcast_object_list(holder)[0]
            out["config"] = spec.tasks[task]
            results[model_name][task] = out
            if state.is_main_process:
                write_json_atomic(cached, out)
        del model, ctx, context
    report = {
        "models": spec.models,
        "tasks": spec.tasks,
        "limit": spec.limit,
        "seed": spec.seed,
        "processes": state.num_processes,
        "versions": _versions(),
        "results": results,
    }
    if state.is_main_process:
        out_dir = Path(spec.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_samples(report, out_dir)
        write_json_atomic(out_dir / "results.json", report)
        table = markdown_table(report)
        (out_dir / "results.md").write_text(table)
        plots = write_plots(report, out_dir)
        log(table)
        log(
            f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}"
            + (f", {len(plots)} plots" if plots else "")
        )
    state.wait_for_everyone()
    return report


# ------------------------------------------------------------------------------------------------ output


def write_samples(report: dict, out_dir: Path) -> None:
    """Per-document records a task returned under ``samples`` (lm-eval's ``log_samples``) go to
    ``samples/<model>__<task>.json`` beside results.json, which keeps the file's name in their place."""

    for model_name, tasks in report["results"].items():
        for task, out in tasks.items():
            if "samples" in out:
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
                path = out_dir / "samples" / f"{safe}__{task}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, out.pop("samples"))
                out["samples_file"] = str(path.relative_to(out_dir))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(report: dict) -> str:
    """One row per (task, metric), one column per checkpoint."""
    models = report["models"]
    lines = ["| task | metric | " + " | ".join(f"`{m}`" for m in models) + " |", "|---|---|" + "---|" * len(models)]
    for task in report["tasks"]:
        metrics = []
        for m in models:
            metrics += [k for k in report["results"][m][task]["metrics"] if k not in metrics]
        for metric in metrics:
            cells = [_fmt(report["results"][m][task]["metrics"].get(metric, "")) for m in models]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    notes = []  # what a task says about how to read its metrics (e.g. preference without a reference)
    for task in report["tasks"]:
        for m in models:
            note = report["results"][m][task].get("note")
            if note and f"{task}: {note}" not in notes:
                notes.append(f"{task}: {note}")
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    """Per-task bars across checkpoints, pass@k curves, MaxVio per layer. Needs matplotlib (skipped without)."""
    try:
        plt = pyplot()
    except ImportError:
        return []
    models, written = report["models"], []
    labels = [Path(m).name or m for m in models]
    for task in report["tasks"]:
        per_model = [report["results"][m][task] for m in models]
        metrics = [k for k in per_model[0]["metrics"] if all(k in r["metrics"] for r in per_model)]
        if metrics:
            fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics) + 1, 3.2), squeeze=False)
            for ax, metric in zip(axes[0], metrics):
                ax.bar(
                    range(len(models)),
                    [r["metrics"][metric] for r in per_model],
                    color=[f"C{i}" for i in range(len(models))],
                )
                ax.set_xticks(range(len(models)), labels, rotation=20, fontsize=7)
                ax.set_title(metric, fontsize=9)
            fig.suptitle(task)
            fig.tight_layout()
            written.append(out_dir / f"{task}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
        for key, kind in (("curves", "curve"), ("per_layer", "layers")):
            if not any(key in r for r in per_model):
                continue
            fig, ax = plt.subplots(figsize=(5, 3.4))
            for i, (label, r) in enumerate(zip(labels, per_model)):
                if kind == "curve":
                    for name, curve in r.get("curves", {}).items():
                        ax.plot(curve["x"], curve["y"], marker="o", color=f"C{i}", label=f"{label}")
                        ax.set_xscale("log", base=2)
                        ax.set_xlabel("k")
                        ax.set_ylabel(name)
                else:
                    layers = r.get("per_layer", {})
                    ax.plot(range(len(layers)), list(layers.values()), marker="o", color=f"C{i}", label=label)
                    ax.set_xlabel("MoE layer")
                    ax.set_ylabel("MaxVio_global")
            ax.legend(fontsize=7)
            ax.set_title(task)
            fig.tight_layout()
            written.append(out_dir / f"{task}_{kind}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written
