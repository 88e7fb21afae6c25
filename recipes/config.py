"""Recipes: flat YAML files that only set values, parsed into (model args, data args, method config).

A recipe is a path to a ``.yaml`` file or a built-in name ``<method>/<name>`` (``recipes/<method>/<name>.yaml``,
shipped as package data). Its ``method:`` key picks the registry entry; every other key is a field of
TRL's ``ModelConfig``, of ``DataArguments`` or of the method's config dataclass (a key that several of them
have is set in all of them). Command-line overrides ``--key value`` / ``--key=value`` are applied on top.

Every mistake becomes one ``UserError`` line that names the file and the key: unknown keys (with the
closest valid key), values of the wrong type, unknown methods (with the valid ones), missing files.
Nothing here loads a model. The key groups whose modules import torch or datasets (``data_filter*``, the
self-distillation and Weight Compander keys, TRL's ``ModelConfig`` and ``DataArguments``) are imported inside
``build_recipe``, where a recipe uses them: ``posttrain list`` and the recipe checks load neither.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from posttrain import RecipeError, did_you_mean
from posttrain.recipes.moe import check_moe_recipe, moe_keys, parse_moe_keys
from posttrain.trainers import METHODS, OPTIMIZERS, import_object

RECIPES_DIR = Path(__file__).resolve().parent


# The key groups an LLM recipe may add beside its method config, as ``optim`` and the moe_* keys are: Recipe field ->
# (key prefix, parser). A parser pops its group's keys from the values and checks them (nothing loads), returning its
# args (None when the recipe has none) or raising ValueError with the file and key.
RECIPE_KEY_GROUPS = {
    "self_distill": ("self_distill_", "posttrain.trainers.classic.self_distill:parse_self_distill_keys"),
    "weight_compander": ("weight_compander", "posttrain.trainers.classic.weight_compander:parse_weight_compander_keys"),
    "synflow": ("synflow", "posttrain.trainers.classic.synflow:parse_synflow_keys"),  # SynFlow pruning before training
    "kl_dro": ("kl_dro", "posttrain.trainers.classic.done:parse_kl_dro_keys"),  # KL-DRO sequence weights on sft
}


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, which turns
    ``save_strategy: no`` (or ``--save_strategy no``) into False."""


def _construct_mapping(loader, node, deep=False):
    """PyYAML keeps the last of two equal keys without a word; a recipe that sets a key twice is a mistake."""
    first: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first set on line {first[key] + 1}); keep one of them",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: the base constructor reports it
            pass
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor("tag:yaml.org,2002:map", lambda loader, node: _construct_mapping(loader, node, deep=True))
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class Recipe:
    method: str
    source: str  # the file, for messages
    config: Any  # the method's config dataclass (a TRL config for LLM methods)
    model_args: Any = None  # trl.ModelConfig; None for auxiliary methods
    data_args: Any = None  # posttrain.data.DataArguments; None for auxiliary methods
    optimizer: str | None = None  # a posttrain optimizer from OPTIMIZERS (``optim: lion_k``), else None
    moe: Any = None  # MoEBalanceConfig when the recipe sets ``moe_balance`` (posttrain.recipes.moe), else None
    data_filter: Any = None  # CascadeFilterConfig when the recipe sets ``data_filter`` (posttrain.data.cascade_filter)
    self_distill: Any = (
        None  # SelfDistillArgs when the recipe sets ``self_distill_*`` (trainers/classic/self_distill.py)
    )
    weight_compander: Any = (
        None  # CompanderArgs when the recipe sets ``weight_compander*`` (trainers/classic/weight_compander.py)
    )
    synflow: Any = None  # SynFlowArgs when the recipe sets ``synflow_*`` (trainers/classic/synflow.py)
    kl_dro: Any = None  # KLDROArgs when the recipe sets ``kl_dro_*`` (trainers/classic/done.py)


def builtin_recipes(kind: str = "train") -> list[str]:
    """Shipped recipes as ``<method>/<name>``, found recursively: training recipes, or with ``kind="eval"`` the
    eval recipes under ``recipes/eval/`` (``posttrain eval eval/<name>``)."""
    names = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
    return [n for n in names if n.startswith("eval/") == (kind == "eval")]


def find_recipe(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    hint = did_you_mean(name.removesuffix(".yaml"), builtin_recipes())
    raise RecipeError(
        f"recipe '{name}' not found: no such file and no built-in recipe '{name}'{hint}; "
        "'posttrain list' shows the built-in recipes"
    )


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs; a ``--flag`` followed by another flag (or nothing) is True.

    Values are read as YAML scalars/lists ("2" -> 2, "true" -> True, "[a, b]" -> list), then checked
    against the field's type like recipe values.
    """
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise RecipeError(f"command line: expected --key value, got '{arg}'")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        try:
            overrides[key.replace("-", "_")] = read_yaml(value) if value != "" else ""
        except yaml.YAMLError:
            overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


def read_recipe_file(path: Path):
    """The YAML value of a recipe file (train or eval); not UTF-8, invalid YAML or a duplicate key is one
    ``RecipeError`` naming the file and the line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RecipeError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the recipe as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    try:
        return read_yaml(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise RecipeError(f"{path}{line}: not valid YAML ({problem})") from None


def load_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    path = find_recipe(name)
    values = read_recipe_file(path)
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a flat mapping of keys to values, got {type(values).__name__}")
    sources = {key: str(path) for key in values}
    for key, value in (overrides or {}).items():
        values[key], sources[key] = value, "command line"
    return build_recipe(values, sources, str(path))


def build_recipe(values: dict[str, Any], sources: dict[str, str], source: str) -> Recipe:
    values = dict(values)
    method = values.pop("method", None)
    if method is None:
        raise RecipeError(f"{source}: missing 'method:' key; valid methods: {', '.join(sorted(METHODS))}")
    if method not in METHODS:
        hint = did_you_mean(str(method), METHODS)
        raise RecipeError(
            f"{sources['method']}: unknown method '{method}'{hint}; valid methods: {', '.join(sorted(METHODS))}"
        )
    entry = METHODS[method]

    optimizer = None
    if values.get("optim") in OPTIMIZERS:
        # TrainingArguments only knows its own optimizers: keep ours aside and let the trainer
        # build it (``Trainer.optimizer_cls_and_kwargs``); the config keeps a valid placeholder.
        optimizer = values.pop("optim")

    moe = None
    if any(str(key).startswith("moe_") for key in values):
        # MoE load balancing works with any LLM trainer: kept beside the method config, like ``optim``.
        moe = parse_moe_keys(values, sources, source, method, entry.task, coerce)

    data_filter = None
    if any(str(key).startswith("data_filter") for key in values):
        # the Deep Ignorance cascade filter on the training rows, any LLM method: kept beside the method config
        from posttrain.data.cascade_filter import parse_filter_keys

        data_filter = parse_filter_keys(values, sources, source, method, entry.task, coerce)

    groups = {}
    for name, (prefix, parser) in RECIPE_KEY_GROUPS.items():
        groups[name] = None
        if any(str(key).startswith(prefix) for key in values):  # import the group's module only when it is used
            try:
                groups[name] = import_object(parser)(values, sources, source, method, entry.task)
            except ValueError as err:
                raise RecipeError(str(err)) from None
    if groups["kl_dro"] is not None and groups["self_distill"] is not None:
        raise RecipeError(f"{source}: kl_dro_* and self_distill_* both replace the SFT loss; use one of them")

    if entry.task == "aux":
        classes = {"config": entry.config_cls}
    else:
        from trl import ModelConfig

        from posttrain.data import DataArguments

        classes = {"model": ModelConfig, "data": DataArguments, "config": entry.config_cls}
    hints = {role: _field_types(cls) for role, cls in classes.items()}

    kwargs: dict[str, dict[str, Any]] = {role: {} for role in classes}
    if "use_cpu" in hints["config"] and not _has_gpu():
        # Unset values mean "this hardware's default", so one recipe runs on CPU and GPU alike.
        # TRL turns an unset bf16 into True, which TrainingArguments rejects without a GPU; and only
        # use_cpu=True lets accelerate see a torchrun launch as MULTI_CPU (gloo), otherwise every
        # rank silently trains alone.
        if "bf16" not in values and "fp16" not in values:
            kwargs["config"]["bf16"] = False
        kwargs["config"].setdefault("use_cpu", True)
    for key, value in values.items():
        roles = [role for role in classes if key in hints[role]]
        if not roles:
            valid = sorted(set().union(*hints.values()) | {"method"} | (_moe_names() if entry.task != "aux" else set()))
            hint = did_you_mean(key, valid)
            where = sources.get(key, source)
            raise RecipeError(f"{where}: unknown key '{key}' for method '{method}'{hint}")
        for role in roles:
            kwargs[role][key] = coerce(value, hints[role][key], key, sources.get(key, source))

    _check_values(kwargs, sources, source, method, entry.task)
    built = {}
    for role, cls in classes.items():
        try:
            with warnings.catch_warnings():
                if "gradient_checkpointing" not in values:
                    # TRL's configs default the name transformers 5 deprecated (gradient_checkpointing=True): a
                    # FutureWarning on every run that the recipe cannot fix
                    warnings.filterwarnings("ignore", "`gradient_checkpointing", FutureWarning)
                built[role] = cls(**kwargs[role])
        except (ValueError, TypeError) as err:
            message = " ".join(str(err).split())
            raise RecipeError(
                f"{_blame(message, kwargs[role], sources, source)}: invalid {cls.__name__} for method "
                f"'{method}': {message}"
            ) from err
    if "data" in built and hasattr(built["config"], "check_data_args"):  # a method's checks across the two roles
        try:
            built["config"].check_data_args(built["data"])
        except ValueError as err:
            given = {k: v for role in kwargs.values() for k, v in role.items()}
            raise RecipeError(f"{_blame(str(err), given, sources, source)}: {err}") from None
    if optimizer is not None:
        _check_optimizer_args(optimizer, built["config"], source)
    if moe is not None:
        check_moe_recipe(values, built["config"], moe, sources, source)
    return Recipe(
        method,
        source,
        built["config"],
        built.get("model"),
        built.get("data"),
        optimizer,
        moe,
        data_filter=data_filter,
        **groups,
    )


# recipe key -> (test, what it must be) for values whose wrong sign or zero the libraries accept and reinterpret
# (max_steps -5 trains for num_train_epochs, a negative beta flips the preference) or reject deep inside training
# (batch size 0 in torch's sampler). Checked on the values a recipe or the command line gives, before any model loads.
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_POSITIVE = (lambda v: v > 0, "greater than 0")
_NOT_NEGATIVE = (lambda v: v >= 0, "at least 0")
VALUE_RULES: dict[str, tuple] = {
    "per_device_train_batch_size": _AT_LEAST_1,
    "per_device_eval_batch_size": _AT_LEAST_1,
    "gradient_accumulation_steps": _AT_LEAST_1,
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (train for num_train_epochs) or at least 1"),
    "num_train_epochs": _POSITIVE,
    "learning_rate": _NOT_NEGATIVE,
    "weight_decay": _NOT_NEGATIVE,
    "warmup_steps": _NOT_NEGATIVE,
    "max_grad_norm": _NOT_NEGATIVE,
    "logging_steps": _POSITIVE,
    "save_steps": _POSITIVE,
    "eval_steps": _POSITIVE,
    "save_total_limit": _AT_LEAST_1,
    "max_length": _AT_LEAST_1,
    "max_prompt_length": _AT_LEAST_1,
    "max_completion_length": _AT_LEAST_1,
    "num_generations": _AT_LEAST_1,
    "beta": _NOT_NEGATIVE,
    "temperature": _POSITIVE,
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "num_samples": _AT_LEAST_1,  # the data keys' own checks (data/args.py) cannot tell the recipe from the command line
    "max_samples": _AT_LEAST_1,
    "max_row_bytes": _AT_LEAST_1,
    "seed": _NOT_NEGATIVE,
    "data_seed": _NOT_NEGATIVE,
    "dataloader_num_workers": _NOT_NEGATIVE,
}
# data keys that only one kind of method reads: anywhere else they would be ignored without a word
TASK_ONLY_KEYS: dict[str, str] = {"reward_funcs": "prompt", "retain_dataset": "unlearn", "retain_config": "unlearn"}


def _check_values(
    kwargs: dict[str, dict[str, Any]], sources: dict[str, str], source: str, method: str, task: str
) -> None:
    given = {k: v for role in kwargs.values() for k, v in role.items() if k in sources}  # not the CPU defaults
    for key, value in given.items():
        where = sources.get(key, source)
        rule = VALUE_RULES.get(key)
        if rule and isinstance(value, (int, float)) and not isinstance(value, bool) and not rule[0](value):
            raise RecipeError(f"{where}: {key} must be {rule[1]}, got {value!r}")
        if key in TASK_ONLY_KEYS and TASK_ONLY_KEYS[key] != task:
            users = ", ".join(sorted(n for n, m in METHODS.items() if m.task == TASK_ONLY_KEYS[key]))
            raise RecipeError(f"{where}: method '{method}' does not use {key} (only {users} do); remove it")
    if given.get("output_dir") == "":
        raise RecipeError(f"{sources['output_dir']}: output_dir is empty; give the folder the run writes to")
    if "report_to" in given:
        _check_report_to(given["report_to"], sources["report_to"])


def _check_report_to(value, where: str) -> None:
    """transformers accepts any name here and fails when the Trainer builds its callbacks (or ignores it)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = [value] if isinstance(value, str) else list(value or [])
    for name in names:
        if name in ("all", "none"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            hint = did_you_mean(str(name), INTEGRATION_TO_CALLBACK)
            raise RecipeError(
                f"{where}: unknown report_to {name!r}{hint}; valid: none, all, "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
            )
        if name not in get_available_reporting_integrations():
            raise RecipeError(
                f"{where}: report_to {name!r}: its package is not installed; install it "
                f"(pip install {name.replace('_', '-')}) or use report_to: none"
            )


def _blame(message: str, values: dict[str, Any], sources: dict[str, str], source: str) -> str:
    """Where the values a library's message names were set (a --key on the command line is not the file): the keys
    it names, or string values it quotes; else the file, saying whether the command line overrode any key."""
    named = sorted(
        {
            sources[k]
            for k, v in values.items()
            if k in sources
            and (re.search(rf"\b{re.escape(k)}\b", message) or (isinstance(v, str) and len(v) > 2 and v in message))
        }
    )
    if named:
        return " and ".join(named)
    return source + (" with command-line overrides" if "command line" in sources.values() else "")


def _moe_names() -> set[str]:
    return set(moe_keys())


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _check_optimizer_args(name: str, config, source: str) -> None:
    try:
        import_object(OPTIMIZERS[name][1])(getattr(config, "optim_args", None))
    except ValueError as err:
        raise RecipeError(f"{source}: invalid optim_args for optim '{name}': {err}") from err


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


# --- type checking of recipe values ------------------------------------------------------------------------

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class _Mismatch(Exception):
    pass


def coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    try:
        return _convert(value, tp)
    except _Mismatch:
        raise RecipeError(
            f"{where}: key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        ) from None


def _convert(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        # Prefer a member that takes the value as it is, so "auto" stays a str and 3 stays an int.
        for member in sorted(members, key=lambda m: not _exact(value, m)):
            try:
                return _convert(value, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch
    if origin in (list, tuple) or tp in (list, tuple):
        item = args[0] if args else Any
        items = value if isinstance(value, (list, tuple)) else _split_list(value)
        return [_convert(v, item) for v in items]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise _Mismatch from None
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise _Mismatch from None
    return value  # a type we don't check (callables, nested configs): the dataclass validates it


def _split_list(value: Any) -> list:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [value]


def _exact(value: Any, tp: Any) -> bool:
    base = typing.get_origin(tp) or tp
    return isinstance(base, type) and isinstance(value, base) and not (isinstance(value, bool) and base is int)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))
