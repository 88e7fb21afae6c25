"""The train entry point: recipe -> data (validated) -> model -> TRL trainer -> checkpoints and a summary.

Order matters: data and reward functions are checked before any model loads, so a bad recipe fails in
seconds. The model is handed to TRL as a resolved path with ``model_init_kwargs``: TRL then builds the
policy, the reference model and any ZeRO-3 partitioning itself, exactly as its own scripts do.

Model loading (transformers, TRL), the data layer (datasets) and the method-specific trainers of self-distillation
and the Weight Compander are imported inside ``build_trainer``: an auxiliary run loads none of them.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

from posttrain import Interrupted, UserError
from posttrain.atomic import write_json_atomic
from posttrain.recipes.config import Recipe
from posttrain.recipes.moe import attach_moe, prepare_moe
from posttrain.recipes.output_dir import (
    is_main_process,
    output_dir_lock,
    prepare_fresh_output_dir,
    resume_checkpoint,
    settings_from_checkpoint,
)
from posttrain.trainers import METHODS, OPTIMIZERS, import_object
from posttrain.trainers.classic.base import PLOT_FILE, RESULTS_FILE
from posttrain.trainers.classic.base import STATE_FILE as AUX_STATE_FILE
from posttrain.trainers.method_state import STATE_FILE, MissingMethodStateError
from posttrain.trainers.rewards import reward_functions
from posttrain.trainers.runtime import checkpoint_problem, guarded, latest_checkpoint

# what TRL passes to every reward function besides the dataset columns
_REWARD_PROTOCOL = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}


def check_reward_columns(funcs: list, names: list[str], columns: list[str]) -> None:
    """Every argument a reward function requires must be a dataset column (TRL passes columns by name)."""
    for fn, name in zip(funcs, names):
        if isinstance(fn, str):
            continue  # a reward model reads the prompt and completion only
        required = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        missing = [p for p in required if p not in _REWARD_PROTOCOL and p not in columns]
        if missing:
            raise UserError(
                f"reward function {name!r} needs the dataset column(s) {', '.join(missing)}, but the "
                f"dataset has {columns}; use a dataset with them or another reward function"
            )


def _validate_per_reward_settings(config, funcs: list) -> None:
    if hasattr(config, "validate_for"):  # per-reward-function settings (constrained RLHF thresholds, ...)
        try:
            config.validate_for(len(funcs))
        except ValueError as e:
            raise UserError(f"{e}") from None


def _check_method_state(recipe: Recipe, checkpoint: Path) -> None:
    """A method with state (``method_state`` on its trainer, or aux-free expert biases) resumes only from a checkpoint
    that holds it: say so before the model loads (the mechanism checks each owner's entry again on resume)."""
    stateful = hasattr(METHODS[recipe.method].trainer_cls, "method_state")
    if (stateful or getattr(recipe.moe, "moe_balance", None) == "aux_free") and not (checkpoint / STATE_FILE).is_file():
        raise MissingMethodStateError(
            f"{checkpoint / STATE_FILE} is missing: checkpoint {checkpoint} was not written by a {recipe.method} run"
            f"{' with aux-free balancing' if not stateful else ''}; resume from a checkpoint of the same recipe, "
            "or start a new run"
        )


def build_trainer(recipe: Recipe):
    """Everything up to (not including) ``trainer.train()``: returns the TRL trainer."""
    from posttrain.data import load_task_datasets
    from posttrain.recipes.models import load_tokenizer, model_init_kwargs, peft_config, resolve_model_path

    method, config, model_args = METHODS[recipe.method], recipe.config, recipe.model_args
    if not model_args.model_name_or_path:
        raise UserError(f"{recipe.source}: missing 'model_name_or_path' (a hub id, a local directory or tiny:<arch>)")
    if isinstance(config.resume_from_checkpoint, str):
        problem = checkpoint_problem(config.resume_from_checkpoint)
        if problem:
            raise UserError(f"resume_from_checkpoint: {problem}; use --resume to pick the newest complete one")
        _check_method_state(recipe, Path(config.resume_from_checkpoint))
    datasets = load_task_datasets(
        method.task,
        recipe.data_args,
        recipe.data_filter,
        report_dir=config.output_dir if is_main_process(config) else None,
    )
    extra: dict[str, Any] = {}
    if method.task == "prompt":
        extra["reward_funcs"] = reward_functions(recipe.data_args.reward_funcs, config)
        check_reward_columns(extra["reward_funcs"], recipe.data_args.reward_funcs, datasets["train"].column_names)
        _validate_per_reward_settings(config, extra["reward_funcs"])
    if method.task == "unlearn":  # the trainer iterates the forget set; the retain set rides along
        datasets = {"train": datasets["forget"], "retain": datasets["retain"]}
        extra["retain_dataset"] = datasets["retain"]
    # a missing or damaged model folder is one line here; a first use of tiny:<arch> builds it (with progress bars),
    # so this comes after the data checks, whose errors must be the only output
    model_path = resolve_model_path(model_args.model_name_or_path)

    moe_plan = prepare_moe(recipe, model_path)  # MoE checks on config.json, before the model loads (recipes/moe.py)
    # dtype, attention, trust_remote_code, QLoRA quantization (+ device map); recipe's model_init_kwargs win.
    config.model_init_kwargs = model_init_kwargs(model_args, config)
    trainer_cls = guarded(method.trainer_cls)
    if recipe.self_distill is not None:  # SFT with a ground-truth-mixed target (trainers/classic/self_distill.py)
        from posttrain.trainers.classic.self_distill import check_teacher, self_distill_sft_trainer

        check_teacher(recipe.self_distill, model_path)
        trainer_cls, extra["self_distill"] = self_distill_sft_trainer(trainer_cls), recipe.self_distill
    if recipe.kl_dro is not None:  # SFT with KL-DRO sequence weights (trainers/classic/done.py)
        from posttrain.trainers.classic.done import kl_dro_sft_trainer

        trainer_cls, extra["kl_dro"] = kl_dro_sft_trainer(trainer_cls), recipe.kl_dro
    trainer = trainer_cls(
        model=model_path,
        args=config,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("eval"),
        processing_class=load_tokenizer(model_args, trust_remote_code=getattr(config, "trust_remote_code", False)),
        peft_config=peft_config(model_args, task=method.model),
        **extra,
    )
    if recipe.optimizer is not None:
        # Trainer.create_optimizer reads this attribute (only SFT/Reward take it as an argument); it adds
        # the weight-decay groups but not the learning rate, so that goes in the kwargs.
        import torch

        cls_path, kwargs_path = OPTIMIZERS[recipe.optimizer]
        cls = import_object(cls_path)
        kwargs = {"lr": config.learning_rate, **import_object(kwargs_path)(config.optim_args)}
        if not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
            # a factory (optim: muon) is called with the model and makes its own groups, weight decay included
            kwargs["weight_decay"] = config.weight_decay
        trainer.optimizer_cls_and_kwargs = (cls, kwargs)
    if recipe.weight_compander is not None:  # before train() wraps the model and builds the optimizer
        from posttrain.trainers.classic.weight_compander import attach_weight_compander

        attach_weight_compander(trainer, recipe.weight_compander)
    if recipe.synflow is not None:  # prune before train() builds the optimizer (and loads a checkpoint)
        from posttrain.trainers.classic.synflow import attach_synflow

        attach_synflow(trainer, recipe.synflow)
    if moe_plan is not None:  # before train() wraps the model: the bias buffers exist at DDP/DeepSpeed wrap time
        attach_moe(trainer, recipe, moe_plan)
    return trainer


def train(recipe: Recipe, resume: bool = False, overwrite_output_dir: bool = False) -> dict[str, Any]:
    """Run a recipe to the end; returns the run summary (also written to ``output_dir/run_summary.json``).

    ``resume``: continue from the newest complete checkpoint in ``output_dir`` (from scratch if it holds none).
    ``overwrite_output_dir``: a run from scratch deletes the checkpoints already in ``output_dir`` (without it, it
    refuses them). The main process holds ``output_dir``'s lock for the whole run (``recipes/output_dir.py``).
    """
    if METHODS[recipe.method].task == "aux":
        return train_aux(recipe, resume, overwrite_output_dir)

    config = recipe.config
    main = is_main_process(config)
    with output_dir_lock(config.output_dir, main):
        if resume or config.resume_from_checkpoint is True:
            checkpoint = resume_checkpoint(config.output_dir)
            print(
                f"posttrain: resuming from {checkpoint}"
                if checkpoint
                else f"posttrain: no checkpoint in {config.output_dir}; starting from scratch"
            )
            config.resume_from_checkpoint = str(checkpoint) if checkpoint else None
        elif not config.resume_from_checkpoint:
            prepare_fresh_output_dir(config.output_dir, overwrite_output_dir, main)
        if config.resume_from_checkpoint and main and not checkpoint_problem(config.resume_from_checkpoint):
            warning = settings_from_checkpoint(config.resume_from_checkpoint, config)
            if warning:
                print(warning)
        trainer = build_trainer(recipe)
        try:
            result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
        except KeyboardInterrupt:
            raise Interrupted(where_interrupted(trainer, config.output_dir)) from None
        trainer.save_model(config.output_dir)
        # the whole log history beside the weights (rank 0 writes it), so `posttrain report` draws every run's curves,
        # save_strategy: "no" runs included (without it, only checkpoint-N folders hold a trainer_state.json)
        trainer.save_state()
        summary = run_summary(recipe, trainer, result)
        if trainer.accelerator.is_main_process:
            write_json_atomic(Path(config.output_dir) / "run_summary.json", summary)
            print(format_summary(summary))
    return summary


def train_aux(recipe: Recipe, resume: bool = False, overwrite_output_dir: bool = False) -> dict[str, Any]:
    """An auxiliary method (``trainers/classic/base.py``) under the same output_dir rules as an LLM run: the lock,
    ``--resume`` from the saved state, and no fresh run over a folder that holds another run's state."""
    config = recipe.config
    folder = Path(config.output_dir)
    with output_dir_lock(folder, True):
        previous = [folder / name for name in (AUX_STATE_FILE, RESULTS_FILE, PLOT_FILE) if (folder / name).exists()]
        if previous and not resume:
            if not overwrite_output_dir:
                raise UserError(
                    f"output_dir {folder} already holds a {recipe.method} run ({previous[0].name}); "
                    "continue it with --resume, choose another --output_dir, or pass "
                    "--overwrite_output_dir to delete it and start over"
                )
            for path in previous:
                path.unlink()
            print(f"posttrain: --overwrite_output_dir: deleted {', '.join(p.name for p in previous)} in {folder}")
        has_state = (folder / AUX_STATE_FILE).is_file()
        if resume and previous and not has_state:  # results of a run that left no state: nothing to continue
            raise UserError(
                f"--resume: {folder} holds {previous[0].name} but no {AUX_STATE_FILE} to continue from; "
                "choose another --output_dir, or pass --overwrite_output_dir to start over"
            )
        trainer = METHODS[recipe.method].trainer_cls(config)
        if resume and has_state:
            try:
                trainer.load()
            except ValueError as err:  # the saved run had another config
                raise UserError(
                    f"--resume: {folder / AUX_STATE_FILE}: {err}; rerun with the saved settings, or start "
                    "over with --overwrite_output_dir"
                ) from None
            print(f"posttrain: resuming {recipe.method} from step {trainer.global_step} ({folder / AUX_STATE_FILE})")
        elif resume:
            print(f"posttrain: no {AUX_STATE_FILE} in {folder}; starting from scratch")
        try:
            return trainer.train()
        except KeyboardInterrupt:
            saved = (
                f"rerun the same command with --resume to continue from step {trainer.last_saved_step}"
                if trainer.last_saved_step is not None
                else "no state was saved yet, so a rerun starts over (save_every sets how often it is saved)"
            )
            raise Interrupted(f"interrupted at step {trainer.global_step} of {config.max_steps}; {saved}") from None


def where_interrupted(trainer, output_dir) -> str:
    """The one line for Ctrl-C: the step reached and what ``--resume`` would continue from. A checkpoint cut short
    by the interrupt has no manifest, so ``--resume`` skips it (trainers/runtime.py)."""
    for callback in trainer.callback_handler.callbacks:  # an open tqdm bar would redraw itself after the line
        for bar in (getattr(callback, "training_bar", None), getattr(callback, "prediction_bar", None)):
            if bar is not None:
                bar.close()
    state = trainer.state
    checkpoint = latest_checkpoint(output_dir)
    resume = (
        f"rerun the same command with --resume to continue from {checkpoint}"
        if checkpoint
        else "no checkpoint was saved yet, so a rerun starts over (save_steps sets how often one is written)"
    )
    return f"interrupted at step {state.global_step} of {state.max_steps}; {resume}"


def run_summary(recipe: Recipe, trainer, result) -> dict[str, Any]:
    """The run in numbers: final state, and each logged training metric at its first and last log."""
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]  # per-step training logs
    metrics: dict[str, dict[str, float]] = {}
    for entry in logs:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                metrics.setdefault(key, {"first": float(value)})["last"] = float(value)
    return {
        "method": recipe.method,
        "recipe": recipe.source,
        "model": recipe.model_args.model_name_or_path,
        "output_dir": str(recipe.config.output_dir),
        "global_step": trainer.state.global_step,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "zero_stage": getattr(trainer.accelerator.state.deepspeed_plugin, "zero_stage", None),
        "train_loss": float(result.training_loss),
        "train_runtime_s": float(result.metrics.get("train_runtime", float("nan"))),
        "metrics": metrics,
    }


def format_summary(summary: dict[str, Any]) -> str:
    def fmt(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)

    rows = [
        (k, fmt(summary[k]), "")
        for k in ("method", "model", "global_step", "world_size", "distributed_type", "train_loss", "train_runtime_s")
    ]
    rows += [(k, fmt(v["first"]), fmt(v["last"])) for k, v in sorted(summary["metrics"].items())]
    widths = [max(len(r[i]) for r in rows + [("run summary", "first / value", "last")]) for i in range(3)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(("run summary", "first / value", "last")), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    out.append(f"saved to {summary['output_dir']}")
    return "\n".join(out)
