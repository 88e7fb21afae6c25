"""The ``posttrain`` command line (also ``python -m posttrain`` and ``accelerate launch -m posttrain``).

    posttrain train RECIPE [--key value | --key=value ...] [--resume | --overwrite_output_dir] [--debug]
    posttrain list [methods|recipes|rewards|data|evals]
    posttrain eval [RECIPE] --model M [--compare M2 ...] --tasks a,b [--output DIR] [--limit N] [--peft ADAPTER]
    posttrain report RUN_DIR
    posttrain filter RECIPE [--output DIR] [--overwrite] [--key value ...]
    posttrain moe upcycle SRC DST --experts N --top_k K [--shared_experts 1] [--noise 0.01] [--seed 0]

A mistake in the input (recipe, override, data) prints one line and exits with code 2; a run stopped on purpose
(non-finite loss) exits with 1, Ctrl-C with 130 (one line: where it stopped, how to resume); ``--debug`` shows the
traceback instead.

Every subcommand imports what it needs inside its function, so ``posttrain --help`` loads no ML library and each
subcommand only what it uses (``python -X importtime -m posttrain --help`` shows it).
"""

from __future__ import annotations

import argparse
import os
import sys

from posttrain import Interrupted, TrainingError, UserError, __version__


def _list(what: str) -> None:
    from posttrain.recipes.config import builtin_recipes
    from posttrain.trainers import METHODS, OPTIMIZERS

    if what in ("all", "methods"):
        print("methods (recipe `method:`):")
        width = max(map(len, METHODS))
        for name, method in sorted(METHODS.items()):
            print(f"  {name:<{width}} task={method.task:<11} {method.description}")
        print("optimizers (recipe `optim:`, options in `optim_args`):")
        for name in sorted(OPTIMIZERS):
            print(f"  {name}")
        print("data stages (recipe keys on any LLM method; alone: posttrain filter RECIPE):")
        print(
            "  data_filter   Deep Ignorance cascade filter: blocklist -> classifier -> optional judge (arXiv "
            "2508.06601)"
        )
        print("  screen        mutual-information feature screening (arXiv 2410.10082): `screen: mi` in scad_mcp")
        print("model tools (recipe keys on any LLM method):")
        print("  synflow_*     SynFlow pruning at load, kept pruned while training (arXiv 2006.05467)")
    if what in ("all", "recipes"):
        print("recipes (posttrain train <name>):")
        for name in builtin_recipes():
            print(f"  {name}")
        print("eval recipes (posttrain eval <name>):")
        for name in builtin_recipes("eval"):
            print(f"  {name}")
    if what in ("all", "rewards"):
        from posttrain.trainers.rewards import REWARDS

        print("reward functions (recipe `reward_funcs:`):")
        for name, (description, _) in sorted(REWARDS.items()):
            print(f"  {name:<18} {description}")
    if what in ("all", "evals"):
        from posttrain.evals.tasks import EVAL_TASKS

        print("eval tasks (posttrain eval --tasks):")
        for name, (_, description, _) in EVAL_TASKS.items():
            print(f"  {name:<18} {description}")
    if what in ("all", "data"):
        from posttrain.data import DATA_TASKS, GENERATORS

        print("built-in datasets (recipe `dataset: builtin:<name>`):")
        for name, entry in sorted(GENERATORS.items()):
            print(f"  {name:<17} {entry.description}")
        print("data task types:")
        for name, description in DATA_TASKS.items():
            print(f"  {name:<11} {description}")


def _train(recipe_name: str, overrides: list[str], resume: bool, overwrite_output_dir: bool = False) -> None:
    from posttrain.recipes.config import load_recipe, parse_overrides

    recipe = load_recipe(recipe_name, parse_overrides(overrides))
    from posttrain.recipes.train import train

    train(recipe, resume=resume, overwrite_output_dir=overwrite_output_dir)
    from posttrain.trainers.runtime import close_process_group

    close_process_group()


def _filter(args, overrides: list[str]) -> None:
    from posttrain.data.cascade_filter import filter_to_folder
    from posttrain.recipes.config import load_recipe, parse_overrides

    filter_to_folder(load_recipe(args.recipe, parse_overrides(overrides)), args.output, args.overwrite)


def _eval(args) -> None:
    from posttrain.evals.harness import load_eval_recipe, make_spec, parse_task_config, run_eval

    values = {
        "model": args.model,
        "peft": args.peft,
        "output": args.output,
        "limit": args.limit,
        "compare": args.compare,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "cache": False if args.no_cache else None,
    }
    if args.tasks or args.task_config:
        tasks = {t.strip(): {} for t in (args.tasks or "").split(",") if t.strip()}
        tasks.update(parse_task_config(args.task_config) if args.task_config else {})
        values["tasks"] = tasks
    if args.recipe:
        spec = load_eval_recipe(args.recipe, values)
    else:
        spec = make_spec({k: v for k, v in values.items() if v is not None})
    run_eval(spec)
    from posttrain.trainers.runtime import close_process_group

    close_process_group()


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage, then the error: two lines. One line, as for every other mistake (exit code 2)."""

    def error(self, message):
        self.exit(2, f"posttrain: error: {message}; see {self.prog} --help\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="posttrain", description="LLM post-training methods as TRL trainers, run from YAML recipes.")
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="run a recipe: a .yaml path or <method>/<name>, then --key value overrides")
    train_p.add_argument("recipe")
    train_p.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir"
    )
    train_p.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="start over in an output_dir that holds "
        "checkpoints, deleting them (without it such a run refuses; --resume continues them)",
    )
    list_p = sub.add_parser("list", help="list methods, recipes, reward functions and built-in datasets")
    list_p.add_argument(
        "what", nargs="?", default="all", choices=["all", "methods", "recipes", "rewards", "data", "evals"]
    )
    moe_p = sub.add_parser("moe", help="mixture-of-experts tools").add_subparsers(dest="moe_command", required=True)
    up = moe_p.add_parser(
        "upcycle",
        help="turn a dense Llama-style model into a DeepSeek-V3-style MoE (GLM-4-MoE "
        "architecture: Llama attention, shared + routed experts, sigmoid router with a selection bias)",
    )
    up.add_argument("src", help="tiny:llama, a local folder or a hub id")
    up.add_argument("dst", help="a new folder for the MoE checkpoint")
    up.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer (copies of the MLP)")
    up.add_argument("--top_k", type=int, required=True, help="routed experts per token")
    up.add_argument("--shared_experts", type=int, default=1, help="shared experts (exact MLP copies), >= 1")
    up.add_argument(
        "--noise",
        type=float,
        default=0.01,
        help="std of the noise on each routed copy, relative to the "
        "copied matrix's std (0: exact copies, the dense model's function)",
    )
    up.add_argument("--seed", type=int, default=0, help="seed of the noise and the router init")
    up.add_argument("--dense_layers", type=int, default=0, help="keep the first N layers dense")
    up.add_argument("--n_group", type=int, default=1, help="expert groups (group-limited routing)")
    up.add_argument("--topk_group", type=int, default=1, help="groups kept per token")

    eval_p = sub.add_parser("eval", help="evaluate checkpoints on registered tasks (or run an eval recipe)")
    eval_p.add_argument("recipe", nargs="?", help="an eval recipe (.yaml path or eval/<name>); flags override it")
    eval_p.add_argument("--model", help="checkpoint folder, hub id or tiny:<arch>")
    eval_p.add_argument("--peft", help="a LoRA adapter folder to load on --model")
    eval_p.add_argument("--tasks", help="comma-separated task names (`posttrain list evals`)")
    eval_p.add_argument("--task_config", help='JSON/YAML mapping task -> options, e.g. \'{"math": {"n": 64}}\'')
    eval_p.add_argument("--output", help="output folder (default runs/eval)")
    eval_p.add_argument("--limit", type=int, help="at most N examples per task")
    eval_p.add_argument("--compare", nargs="+", help="more checkpoints, one column each")
    eval_p.add_argument("--seed", type=int)
    eval_p.add_argument("--batch_size", type=int)
    eval_p.add_argument("--no_cache", action="store_true", help="recompute even when a cached result exists")
    filter_p = sub.add_parser(
        "filter",
        help="run a recipe's data_filter on its training set alone and write the "
        "filtered rows and the per-stage report to a folder; then --key value overrides",
    )
    filter_p.add_argument("recipe", help="a recipe (.yaml path or <method>/<name>) with data_filter keys")
    filter_p.add_argument("--output", help="a new folder (default: the recipe's output_dir + '-filtered')")
    filter_p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    report_p = sub.add_parser("report", help="plot a training run's logged metrics (RUN_DIR/report/)")
    report_p.add_argument("run_dir")
    for command in (train_p, up, eval_p, filter_p, report_p):
        command.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")

    args, rest = parser.parse_known_args(argv)
    debug = getattr(args, "debug", False)
    try:
        if args.command == "list":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            _list(args.what)
        elif args.command == "moe":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            from posttrain.recipes.upcycle import upcycle

            dst = upcycle(
                args.src,
                args.dst,
                args.experts,
                args.top_k,
                args.shared_experts,
                args.noise,
                args.seed,
                args.dense_layers,
                args.n_group,
                args.topk_group,
            )
            print(
                f"posttrain: upcycled {args.src} into {dst} ({args.experts} experts, top-{args.top_k}, "
                f"{args.shared_experts} shared)"
            )
        elif args.command == "filter":
            _filter(args, rest)
        elif args.command in ("eval", "report"):
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            if args.command == "report":
                from posttrain.evals.report import report

                report(args.run_dir)
            else:
                _eval(args)
        else:
            _train(args.recipe, rest, args.resume, args.overwrite_output_dir)
    except UserError as err:
        if debug:
            raise
        print(f"posttrain: error: {err}", file=sys.stderr)
        return _error_exit(2)
    except TrainingError as err:
        if debug:
            raise
        print(f"posttrain: stopped: {err}", file=sys.stderr)
        return _error_exit(1)
    except (Interrupted, KeyboardInterrupt) as err:
        if debug:
            raise
        # every rank of a launch gets the terminal's SIGINT: one line, from the main process
        if os.environ.get("RANK", "0") == "0":
            print(
                f"posttrain: {err if isinstance(err, Interrupted) else 'interrupted before training started'}",
                file=sys.stderr,
            )
        return _error_exit(130)
    except BrokenPipeError:
        # the reader went away (`posttrain list | head`): stop quietly, as `ls | head` does; stdout goes to
        # /dev/null so that the interpreter's own flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


def _error_exit(code: int) -> int:
    """``code``; under a launch the process ends here with it (trainers/runtime.exit_launched_process: an error exit
    must not turn into a SIGABRT at finalization either)."""
    from posttrain.trainers.runtime import exit_launched_process

    exit_launched_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
