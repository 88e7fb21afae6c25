"""The ``lm_eval`` eval task: EleutherAI's lm-evaluation-harness (Gao et al., https://github.com/EleutherAI/
lm-evaluation-harness) on the in-memory model, its options passed through as ``lm_eval`` / ``simple_evaluate``
name them, its numbers kept as it reports them.

- options: ``num_fewshot``, ``apply_chat_template``, ``fewshot_as_multiturn``, ``system_instruction``,
  ``gen_kwargs`` (a mapping, e.g. ``{max_gen_toks: 64}``), ``log_samples`` and the four seeds, whose defaults are
  lm-eval's own (``lm_eval/defaults.py``: random 0, numpy / torch / few-shot 1234), so a task gives the number
  ``lm_eval --tasks ...`` gives. ``fewshot_as_multiturn`` defaults to lm-eval's default (True when a chat template
  is applied, as ``lm_eval`` turns it on then);
- metrics: every ``metric,filter`` key as lm-eval writes it (``exact_match,strict`` and ``exact_match,loose`` stay
  apart), its ``metric_stderr,filter`` beside it, named ``<task>/<metric>,<filter>``; group aggregates (a group
  YAML with ``aggregate_metric_list``) are named ``group:<group>/<metric>,<filter>`` and also returned apart under
  ``groups`` with ``group_subtasks``, as lm-eval's ``results`` / ``groups`` split them; ``sample_len`` and
  ``alias`` are not metrics and are left out;
- ``log_samples``: lm-eval's per-document records are returned under ``samples``; the harness writes them beside
  ``results.json`` (``samples/<model>__lm_eval.json``);
- ``n-shot``, ``versions`` and ``n-samples`` are returned as lm-eval gives them.

Data-parallel under ``accelerate launch`` as lm-eval itself is (``accelerate launch -m lm_eval``): every process
wraps its copy of the model, lm-eval splits the documents by rank, gathers the per-document metrics on rank 0 and
aggregates them there; the result is then shared with the other processes.
"""

from __future__ import annotations

import functools
import json

from posttrain.evals.common import EvalContext

# lm_eval/defaults.py: DEFAULT_RANDOM_SEED, DEFAULT_OTHER_SEED (tests/evals/test_lm_harness.py checks them)
LM_EVAL_RANDOM_SEED = 0
LM_EVAL_OTHER_SEED = 1234


def lm_eval(
    ctx: EvalContext,
    tasks: tuple = (),
    include_path: str | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    apply_chat_template: bool | str = False,
    fewshot_as_multiturn: bool | None = None,
    system_instruction: str | None = None,
    gen_kwargs: dict | None = None,
    log_samples: bool = False,
    random_seed: int = LM_EVAL_RANDOM_SEED,
    numpy_random_seed: int = LM_EVAL_OTHER_SEED,
    torch_random_seed: int = LM_EVAL_OTHER_SEED,
    fewshot_random_seed: int = LM_EVAL_OTHER_SEED,
    include_defaults: bool = True,
):
    """EleutherAI lm-evaluation-harness tasks on the in-memory model (offline with local task YAMLs under
    ``include_path``, e.g. ``dataset_path: json`` on a local JSONL); options as ``lm_eval`` names them.
    ``include_defaults: false`` (``TaskManager``'s option) skips indexing lm-eval's own task YAMLs (about 20 s)
    when every task is under ``include_path``."""
    check_lm_eval(tasks=tasks, apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=ctx.model, tokenizer=ctx.tokenizer, batch_size=batch_size, device=str(ctx.device))
    if ctx.world > 1:  # lm-eval's own data parallelism, set up as HFLM does it under `accelerate launch`
        from accelerate import Accelerator

        lm.accelerator, lm._rank, lm._world_size = Accelerator(), ctx.rank, ctx.world
    out = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=ctx.limit,
        task_manager=task_manager(include_path, include_defaults),
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=bool(apply_chat_template) if fewshot_as_multiturn is None else fewshot_as_multiturn,
        system_instruction=system_instruction,
        gen_kwargs=gen_kwargs,
        log_samples=log_samples,
        random_seed=random_seed,
        numpy_random_seed=numpy_random_seed,
        torch_random_seed=torch_random_seed,
        fewshot_random_seed=fewshot_random_seed,
    )
    result = lm_eval_result(out) if ctx.rank == 0 else None  # lm-eval returns the results on rank 0 only
    return ctx._gather([result])[0] if ctx.world > 1 else result


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, include_defaults: bool = True):
    """lm-eval's task index, built once per process (every compared checkpoint reuses it)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def lm_eval_result(out: dict) -> dict:
    """The task result of a ``simple_evaluate`` output: the metrics as the module docstring names them."""
    groups = out.get("groups", {})
    metrics = {}
    for prefix, table in (("", {k: v for k, v in out["results"].items() if k not in groups}), ("group:", groups)):
        for name, values in table.items():
            for key, value in values.items():
                if key in ("alias", "sample_len", "name") or "," not in key:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue  # lm-eval writes "N/A" for a stderr it could not compute
                metrics[f"{prefix}{name}/{key}"] = float(value)
    result = {
        "metrics": metrics,
        "groups": {g: _numbers(v) for g, v in groups.items()},
        "group_subtasks": out.get("group_subtasks", {}),
        "n-shot": out.get("n-shot", {}),
        "versions": out.get("versions", {}),
        "n-samples": out.get("n-samples", {}),
    }
    if "samples" in out:
        result["samples"] = json.loads(json.dumps(out["samples"], default=str))
    return json.loads(json.dumps(result, default=str))


def _numbers(values: dict) -> dict:
    return {
        k: float(v) for k, v in values.items() if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def check_lm_eval(tasks, apply_chat_template=False, fewshot_as_multiturn=None, **_) -> None:
    if not tasks:
        raise ValueError("name the lm-evaluation-harness tasks in its config, e.g. tasks: [my_task]")
    if fewshot_as_multiturn and not apply_chat_template:  # as lm_eval's own command line refuses it
        raise ValueError(
            "fewshot_as_multiturn: true needs apply_chat_template: true (the few-shot turns are chat "
            "messages); set both, or drop fewshot_as_multiturn"
        )
