"""Optional key groups of a recipe (``moe_*``, ``data_filter*``, ``synflow_*``, ...): the steps their parsers share.

A group is a set of recipe keys kept beside the method's config, switched on by one key of the group
(``moe_balance``, ``data_filter``). ``pop_key_group`` pops the group's keys from the recipe values, refuses unknown
keys with the group's prefix, a method that cannot take the group, and keys given without the switch, then reads
each value with the recipe's type checker (``coerce``, passed in: the data layer sits below ``recipes``). Every
mistake is a ``RecipeError`` naming where the key was set. The group's own value checks stay with its config.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from posttrain import RecipeError, did_you_mean


def pop_key_group(
    values: dict[str, Any],
    sources: dict[str, str],
    source: str,
    *,
    names: tuple[str, ...],
    config_cls: type,
    switch: str,
    switch_fix: str,
    refusal: str | None,
    coerce: Callable,
    prefix: str | None = None,
    group: str = "",
) -> dict[str, Any] | None:
    """The keyword arguments for ``config_cls``, or None when the recipe sets none of the group's keys.

    ``prefix``: keys starting with it belong to the group, and one not in ``names`` is refused as unknown (``group``
    names the group in that message); without it, only ``names`` are popped. ``refusal``: why the recipe's method
    cannot take the group, ``{keys}`` standing for the keys given (None: it can). ``switch_fix``: what to do when
    keys are given without ``switch``.
    """
    given = {k: values.pop(k) for k in list(values) if (str(k).startswith(prefix) if prefix else k in names)}
    if not given:
        return None
    for key in given:
        if key not in names:
            raise RecipeError(
                f"{sources.get(key, source)}: unknown key '{key}'{did_you_mean(key, names)}; the {group} keys are "
                f"{', '.join(names)}"
            )
    where = sources.get(next(iter(given)), source)
    if refusal is not None:
        raise RecipeError(f"{where}: {refusal.replace('{keys}', ', '.join(given))}")
    if switch not in given:
        raise RecipeError(f"{where}: {', '.join(given)} set but no {switch}; {switch_fix}")
    hints = typing.get_type_hints(config_cls)
    return {k: coerce(v, hints[k], k, sources.get(k, source)) for k, v in given.items()}


def pop_prefixed_keys(
    values: dict[str, Any], sources: dict[str, str], source: str, *, prefix: str, names: tuple[str, ...], group: str
) -> dict[str, Any] | None:
    """Pop the recipe keys that start with ``prefix`` ({key: value}, or None when there is none); one that is not
    in ``names`` is a ValueError naming where it was set (the recipe turns it into a ``RecipeError``)."""
    keys = [k for k in values if str(k).startswith(prefix)]
    if not keys:
        return None
    for key in keys:
        if key not in names:
            raise ValueError(
                f"{sources.get(key, source)}: unknown key '{key}'{did_you_mean(key, names)}; the {group} keys are "
                f"{', '.join(names)}"
            )
    return {k: values.pop(k) for k in keys}


def module_names(value: Any, key: str, where: str) -> str | list[str]:
    """A ``*_modules`` value: ``all-linear``, or Linear module names as a list or a comma-separated string."""
    modules = value
    if isinstance(modules, str) and modules != "all-linear":
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    if modules == "all-linear" or (isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules)):
        return modules
    raise ValueError(f"{where}: {key} expects all-linear or a list of module names, got {value!r}")
