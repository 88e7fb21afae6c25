"""Print the versions the GPU check runs on and any requirement the installed packages do not meet.

    python3 scripts/env_report.py            # first step of scripts/gpu_check.sh

The GPU machine's image brings its own torch (2.11 + CUDA, not the 2.13 pinned here), transformers 5.17 (shadowed by
the carried 5.24 through PYTHONPATH), accelerate, pyarrow, ...; the wheels are installed with ``--no-deps``, so
nothing else checks that they fit together. Unmet requirements are printed, not fatal: the steps after this one
say whether they matter. Where posttrain comes from is printed too (it must be the installed package, not the
source tree's ``posttrain/`` folder, which lacks the mapped subpackages).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

PACKAGES = (
    "posttrain",
    "torch",
    "triton",
    "transformers",
    "trl",
    "accelerate",
    "peft",
    "datasets",
    "deepspeed",
    "tokenizers",
    "huggingface_hub",
    "safetensors",
    "pyarrow",
    "fsspec",
    "numpy",
    "pydantic",
    "pytest",
)


def unmet(dist: str) -> list[str]:
    """The requirements of ``dist`` (without extras) that the installed versions do not meet."""
    problems = []
    for text in md.requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{dist} needs {req}: not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{dist} needs {req}: {have} installed")
    return problems


def main() -> int:
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for name in PACKAGES:
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            version = "not installed"
        print(f"  {name:16s} {version}")
    import torch

    import posttrain

    print(f"posttrain imported from {posttrain.__file__}")
    importlib.import_module("posttrain.recipes")  # the source tree's posttrain/ has no recipes: this is the check
    print(
        f"torch CUDA build {torch.version.cuda}, CUDA available: {torch.cuda.is_available()}"
        + (
            f", {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}"
            if torch.cuda.is_available()
            else ""
        )
    )
    problems = [
        p
        for dist in ("posttrain", "trl", "transformers", "datasets", "peft", "accelerate", "deepspeed")
        for p in unmet(dist)
    ]
    print("unmet requirements (the image's own versions; not fatal):" if problems else "every requirement is met")
    for problem in problems:
        print(f"  {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
