"""What every eval task shares: loading a checkpoint, its data, batched log-probs and generation, and the
data-parallel split that gives the same numbers on any number of processes.

Data parallelism: the examples are cut into *global* batches of ``batch_size`` first, and process r takes
batches r, r + W, r + 2W, ...; every batch is computed exactly as on one process (same padding, same per-batch
sampling seed), and the per-example results are gathered back in order. So a 2-process eval reproduces the
1-process numbers, not just approximately.

Model loading (``recipes.models``: transformers, TRL), the data layer (datasets), ``trainers.moe_balance`` and
``huggingface_hub`` are imported inside the functions that use them: ``posttrain list evals`` imports this module
and needs none of them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


@dataclass
class EvalContext:
    """The model under evaluation and how to spread work over processes."""

    model: Any
    tokenizer: Any
    name: str  # the checkpoint as given on the command line
    path: str  # where it was loaded from
    seed: int = 0
    limit: int | None = None
    batch_size: int = 8
    world: int = 1
    rank: int = 0
    _gather: Callable[[list], list] | None = field(default=None, repr=False)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def map_batches(self, items: Sequence, fn: Callable[[list, int], list], batch_size: int | None = None) -> list:
        """``fn(batch, batch_index) -> one result per item`` over global batches; every process gets the full,
        ordered list of results. ``batch_index`` seeds anything random in ``fn``."""
        size = batch_size or self.batch_size
        batches = [list(items[i : i + size]) for i in range(0, len(items), size)]
        mine = {b: fn(batches[b], b) for b in range(self.rank, len(batches), self.world)}
        if self.world > 1:
            merged: dict[int, list] = {}
            for part in self._gather([mine]):
                merged.update(part)
            mine = merged
        return [result for b in range(len(batches)) for result in mine[b]]


def load_checkpoint(name: str, peft: str | None = None, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer, resolved path) for a checkpoint folder, hub id or ``tiny:<arch>``. A folder with an
    ``adapter_config.json`` (a LoRA run's output) or ``peft`` loads the adapter on its base model."""
    from transformers import AutoModelForCausalLM
    from trl import ModelConfig

    from posttrain.recipes.models import load_tokenizer, resolve_model_path

    path = resolve_model_path(name)
    adapter = peft or (path if (Path(path) / "adapter_config.json").is_file() else None)
    base = path
    if adapter is not None and adapter == path:
        base = resolve_model_path(
            json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    if Path(base).is_dir():  # biases of patched MoE routers (aux-loss-free balancing) that from_pretrained dropped
        from posttrain.trainers.moe_balance import restore_expert_biases

        restore_expert_biases(model, base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    has_tokenizer = (Path(path) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=path if has_tokenizer else base))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, path


# Result-cache fingerprints. A file under this size is identified by a sha256 of its bytes. A larger one (the weights
# of a real model: SmolLM2-135M is 270 MB, a 7B model 15 GB) by its size, mtime, ctime and inode plus a sha256 of
# its first and last MiB: hashing every byte would cost ~1 s per 135M model and ~1 min per 7B model on *every*
# run, cached or not, while any rewrite, copy or rename of a file sets a new ctime (which, unlike mtime, no tool
# sets back: ``cp -p`` and ``rsync -a`` restore mtimes), and the first MiB holds a safetensors file's header
# (every tensor's name, dtype, shape and offset). A file in the Hugging Face cache is a link to a blob named by
# the sha256 of its content: that name is used as is.
HASH_WHOLE_FILE_BELOW = 64 << 20
_EDGE = 1 << 20
# the files a training run writes beside its weights that no eval reads
NOT_MODEL_FILES = frozenset(
    {"trainer_state.json", "run_summary.json", "training_args.bin", "README.md", "results.json"}
)


def file_fingerprint(path: Path) -> list:
    """[name, size, hash] of one file (see ``HASH_WHOLE_FILE_BELOW``)."""
    real = Path(path).resolve()
    st = real.stat()
    if real.parent.name == "blobs" and len(real.name) == 64:  # the HF cache names LFS blobs by their sha256
        return [Path(path).name, st.st_size, real.name]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        if st.st_size < HASH_WHOLE_FILE_BELOW:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            return [Path(path).name, st.st_size, digest.hexdigest()]
        digest.update(f.read(_EDGE))
        f.seek(max(st.st_size - _EDGE, 0))
        digest.update(f.read(_EDGE))
    return [Path(path).name, st.st_size, digest.hexdigest(), st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def path_fingerprint(path, skip=frozenset()) -> dict:
    """A file's fingerprint, or a folder's: every file under it (names relative to it), but hidden ones and ``skip``."""
    p = Path(path).expanduser()
    if p.is_file():
        return {"file": str(p.resolve()), "content": file_fingerprint(p)}
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and f.name not in skip and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    return {"dir": str(p.resolve()), "files": [[str(f.relative_to(p)), *file_fingerprint(f)[1:]] for f in files]}


def checkpoint_fingerprint(path: str) -> dict:
    """What identifies a checkpoint for the result cache: every file of its folder but a run's logs (weights,
    config, tokenizer, chat template), not its subfolders (checkpoint-N, report/). A hub id is read from the local
    Hugging Face cache (its snapshot folder is named by the commit); one not there is its own fingerprint."""
    p = Path(path)
    if not p.is_dir():
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # not a hub id in the local cache: transformers will fail or fetch it
            return {"id": path}
    files = sorted(
        f for f in p.iterdir() if f.is_file() and f.name not in NOT_MODEL_FILES and not f.name.startswith(".")
    )
    return {"dir": str(p.resolve()), "files": [file_fingerprint(f) for f in files]}


def model_fingerprint(name: str, peft: str | None = None) -> dict:
    """The fingerprint of everything ``load_checkpoint(name, peft)`` reads: the checkpoint and, for a LoRA adapter,
    the adapter and its base model."""
    from posttrain.recipes.models import resolve_model_path

    path = resolve_model_path(name)
    out = {"model": checkpoint_fingerprint(path)}
    adapter = peft or (path if (Path(path) / "adapter_config.json").is_file() else None)
    if adapter is not None:
        out["adapter"] = checkpoint_fingerprint(adapter)
        if adapter == path:
            base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
            out["base"] = checkpoint_fingerprint(resolve_model_path(base))
    return out


# ------------------------------------------------------------------------------------------------ text


def render(tokenizer, prompt, completion=None) -> tuple[str, str]:
    """(prompt text, completion text) as the trainers see them: conversational rows through the chat template,
    the completion being what the template appends after the generation prompt."""
    if isinstance(prompt, str) or prompt is None:
        return prompt or "", _plain(completion)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if completion is None:
        return prompt_text, ""
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError("the chat template does not extend the prompt with the completion; cannot score it")
    return prompt_text, full[len(prompt_text) :]


def _plain(completion) -> str:
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion)


@torch.no_grad()
def completion_logps(model, tokenizer, pairs: list[tuple[str, str]], max_length: int = 1024) -> list[tuple[float, int]]:
    """Sum of log p(completion tokens | prompt) and the number of completion tokens, per (prompt, completion)
    text pair, in one right-padded batch. An empty prompt scores every completion token but the first."""
    ids, starts = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        row = (p + c)[:max_length]
        ids.append(row)
        starts.append(max(len(p), 1))
    width = max(len(r) for r in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in ids], device=model.device)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids], device=model.device)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    out = []
    for i, (row, start) in enumerate(zip(ids, starts)):
        scored = token_logps[i, start - 1 : len(row) - 1]
        out.append((float(scored.sum()), int(scored.numel())))
    return out


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    *,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[str]]:
    """``n`` completions per prompt (greedy when temperature is 0), in one left-padded batch; sampling is seeded
    by ``seed`` alone, so the same batch gives the same text on any process."""
    texts = [render(tokenizer, p)[0] for p in prompts]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sample = temperature > 0
    torch.manual_seed(seed)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        num_return_sequences=n,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [decoded[i * n : (i + 1) * n] for i in range(len(prompts))]


def eval_rows(
    dataset: str,
    task: str,
    *,
    split: str | None = None,
    num_samples: int = 256,
    seed: int = 0,
    limit: int | None = None,
    difficulty: int | None = None,
):
    """Held-out rows for an eval task: a builtin generator is run with the eval seed offset (never the train
    seed), files and hub datasets are read as they are; then checked for the data ``task`` and cut to ``limit``."""
    from posttrain.data.loading import EVAL_SEED_OFFSET, format_for_task, load_source

    builtin = dataset.startswith("builtin:")
    rows = load_source(
        dataset,
        split=split or "train",
        num_samples=num_samples,
        seed=seed + EVAL_SEED_OFFSET if builtin else seed,
        difficulty=difficulty,
    )
    rows = format_for_task(task, rows, f"eval dataset '{dataset}'") if task else rows
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")
