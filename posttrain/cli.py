"""The ``posttrain`` command line (also ``python -m posttrain`` and ``accelerate launch -m posttrain``).

    posttrain train RECIPE [--key value | --key=value ...] [--resume] [--debug]
    posttrain list [methods|recipes|rewards|data]

A mistake in the input (recipe, override, data) prints one line and exits with code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from posttrain import TrainingError, UserError, __version__


def _list(what: str) -> None:
    from posttrain.recipes.config import builtin_recipes
    from posttrain.trainers import METHODS, OPTIMIZERS

    if what in ("all", "methods"):
        print("methods (recipe `method:`):")
        for name, method in sorted(METHODS.items()):
            print(f"  {name:<10} task={method.task:<11} {method.description}")
        print("optimizers (recipe `optim:`, options in `optim_args`):")
        for name in sorted(OPTIMIZERS):
            print(f"  {name}")
    if what in ("all", "recipes"):
        print("recipes (posttrain train <name>):")
        for name in builtin_recipes():
            print(f"  {name}")
    if what in ("all", "rewards"):
        from posttrain.trainers.rewards import REWARDS

        print("reward functions (recipe `reward_funcs:`):")
        for name, (description, _) in sorted(REWARDS.items()):
            print(f"  {name:<15} {description}")
    if what in ("all", "data"):
        from posttrain.data import GENERATORS, TASKS

        print("built-in datasets (recipe `dataset: builtin:<name>`):")
        for name, entry in sorted(GENERATORS.items()):
            print(f"  {name:<17} {entry.description}")
        print("data task types:")
        for name, description in TASKS.items():
            print(f"  {name:<11} {description}")


def _train(recipe_name: str, overrides: list[str], resume: bool) -> None:
    from posttrain.recipes.config import load_recipe, parse_overrides

    recipe = load_recipe(recipe_name, parse_overrides(overrides))
    from posttrain.recipes.train import train

    train(recipe, resume=resume)
    _close_process_group()


def _close_process_group() -> None:
    """Leave the process group together: without this, one rank of a DeepSpeed/gloo launch could exit while
    the other's communication threads are still alive, and die with 'terminate called without an active
    exception' (SIGABRT) after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain", description="LLM post-training methods as TRL trainers, run from YAML recipes.")
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="run a recipe: a .yaml path or <method>/<name>, then --key value overrides")
    train_p.add_argument("recipe")
    train_p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    train_p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    list_p = sub.add_parser("list", help="list methods, recipes, reward functions and built-in datasets")
    list_p.add_argument("what", nargs="?", default="all", choices=["all", "methods", "recipes", "rewards", "data"])

    args, rest = parser.parse_known_args(argv)
    debug = getattr(args, "debug", False)
    try:
        if args.command == "list":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            _list(args.what)
        else:
            _train(args.recipe, rest, args.resume)
    except UserError as err:
        if debug:
            raise
        print(f"posttrain: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        if debug:
            raise
        print(f"posttrain: stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
