"""What a model name means and whether a local model folder is whole, read without loading a model.

A name is a local folder, ``tiny:<arch>`` or a hub id (``org/name``); ``looks_like_path`` tells a folder that is
not there from a hub id, so a mistyped path is refused in one line instead of being sent to the hub.
``check_model_folder`` refuses a folder that ``from_pretrained`` would fail on, from its config and the weights'
headers. Nothing here imports torch or transformers: ``posttrain eval`` and the recipe checks use it before any
model loads (``file_problem``, in the torch-importing ``trainers.runtime``, is imported where it is called).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from posttrain import UserError

# a hub repo id: "name" or "org/name" (huggingface_hub's validate_repo_id, less its length limit)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name))


def looks_like_path(name: str) -> bool:
    """``name`` is written as a filesystem path (absolute, relative with ``./``, ``../`` or ``~``, or not a hub id)."""
    return name.startswith(("/", "./", "../", "~")) or not is_hub_id(name)


def check_model_folder(folder: Path, name: str | None = None) -> None:
    """A local model folder that ``from_pretrained`` would fail on (deep in transformers, after a long traceback, or
    after the other models loaded): refuse it here in one line. Reads config.json and the weights' headers only."""
    name = name or str(folder)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        configs, patterns = ["adapter_config.json"], ("adapter_model.safetensors", "adapter_model.bin")
    else:
        configs, patterns = ["config.json"], ("*.safetensors", "pytorch_model*.bin")
    for config in configs:
        path = folder / config
        if not path.is_file():
            raise UserError(
                f"model {name!r}: {path} is missing, so this is not a saved model folder; give the "
                "folder a save_pretrained (or a training run's output_dir) wrote"
            )
        try:
            parsed = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(
                f"model {name!r}: {path} is not valid JSON ({err}); restore it from the original model"
            ) from None
        if not isinstance(parsed, dict) or (config == "config.json" and "model_type" not in parsed):
            raise UserError(
                f"model {name!r}: {path} has no 'model_type', so transformers cannot tell the "
                "architecture; restore it from the original model"
            )
    from posttrain.trainers.runtime import file_problem  # torch

    weights = sorted({p for pattern in patterns for p in folder.glob(pattern)})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (UnicodeDecodeError, ValueError, KeyError, AttributeError) as err:
            raise UserError(
                f"model {name!r}: {index} is unreadable ({type(err).__name__}: {err}); restore it from "
                "the original model"
            ) from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise UserError(
                f"model {name!r}: the shard(s) {', '.join(missing)} named in {index.name} are missing; "
                "copy the whole model folder again"
            )
    if not weights:
        raise UserError(
            f"model {name!r}: {folder} has no weights ({' or '.join(patterns)}); copy the whole model "
            "folder again, or give the folder a save_pretrained wrote"
        )
    for path in weights:
        problem = file_problem(path)
        if problem:
            raise UserError(
                f"model {name!r}: {path} is truncated or damaged ({problem}); copy it again from the original model"
            )
