"""The public functions of ``trainers/`` carry type hints (every named parameter and the return), and the hints
resolve (``typing.get_type_hints``), so an editor or a type checker reads them as a user would. A module that
imports a transformers / accelerate name only under ``TYPE_CHECKING`` (to keep start-up light) resolves it from
those packages, as a type checker would."""

import importlib
import inspect
import pkgutil
import typing

import accelerate
import pytest
import transformers

import posttrain.trainers


class _TypeCheckingNames(dict):
    """Names a module imports only under TYPE_CHECKING, looked up in transformers and accelerate (lazy modules,
    so ``vars()`` of them does not hold every name)."""

    def __missing__(self, key):
        for package in (transformers, accelerate):
            if hasattr(package, key):
                return getattr(package, key)
        raise KeyError(key)


MODULES = sorted(
    info.name for info in pkgutil.walk_packages(posttrain.trainers.__path__, "posttrain.trainers.") if not info.ispkg
)


@pytest.mark.parametrize("name", MODULES)
def test_public_functions_are_typed(name):
    module = importlib.import_module(name)
    functions = [
        f
        for attr, f in vars(module).items()
        if inspect.isfunction(f) and not attr.startswith("_") and f.__module__ == name
    ]
    for f in functions:
        params = [
            p
            for p in inspect.signature(f).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in ("self", "cls")
        ]
        missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
        missing += ["return"] if inspect.signature(f).return_annotation is inspect.Signature.empty else []
        assert not missing, f"{name}.{f.__name__}: no type hint for {', '.join(missing)}"
        typing.get_type_hints(f, vars(module), _TypeCheckingNames())  # every name in the hints resolves
