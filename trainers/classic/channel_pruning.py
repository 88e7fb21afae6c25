"""Channel (structured) pruning of the gated MLPs of decoder-only language models, whatever ranks the channels.

A gated MLP (Llama, Qwen, Mistral, SmolLM2) computes down_proj(act(gate_proj(x)) * up_proj(x)); its channels are the
down_proj inputs. ``gated_mlps`` finds the MLPs, ``mlp_io`` collects a layer's channel activations Z and its output Y
on calibration tokens, ``prune_gated_mlp`` keeps a set of channels (rows of gate_proj and up_proj, columns of
down_proj, or a re-fit down_proj), and ``calibration_texts`` turns a data set's rows into the text the model reads.
ModHiFi (``trainers/classic/modhifi.py``) scores the channels; any other score can use the same pieces.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from torch import nn


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's MLP with gate_proj, up_proj and down_proj (Llama, Qwen, Mistral, SmolLM2 ...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    mlps = [getattr(layer, "mlp", None) for layer in (layers or [])]
    if not mlps or not all(all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")) for m in mlps):
        raise ValueError(
            f"channel pruning needs decoder layers with a gated MLP (mlp.gate_proj / up_proj / down_proj, as "
            f"Llama, Qwen3 and SmolLM2 have); {type(model).__name__} has none: use e.g. tiny:qwen3 or tiny:llama"
        )
    return mlps


class _Reached(Exception):
    """Raised by ``mlp_io``'s hook: the layer's activations are in, the rest of the forward pass is not needed."""


@torch.no_grad()
def mlp_io(model: nn.Module, mlp: nn.Module, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z, Y) of one gated MLP over the calibration tokens: Z the down_proj input (the channels), Y its output.
    Each forward pass stops at that layer (the layers above it cannot change its input)."""
    zs, ys = [], []

    def hook(module, args, output):
        zs.append(args[0].reshape(-1, args[0].shape[-1]).double())
        ys.append(output.reshape(-1, output.shape[-1]).double())
        raise _Reached

    handle = mlp.down_proj.register_forward_hook(hook)
    try:
        for ids in batches:
            try:
                model(input_ids=ids)
            except _Reached:
                pass
    finally:
        handle.remove()
    return torch.cat(zs), torch.cat(ys)


@torch.no_grad()
def mlp_outputs(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every gated MLP's output over the calibration tokens, one forward pass per batch: [(tokens, hidden)] per layer,
    float32 (the re-fit targets of a whole model at once)."""
    mlps = gated_mlps(model)
    outs: list[list[torch.Tensor]] = [[] for _ in mlps]
    hooks = [
        m.down_proj.register_forward_hook(
            lambda mod, args, out, i=i: outs[i].append(out.reshape(-1, out.shape[-1]).float())
        )
        for i, m in enumerate(mlps)
    ]
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(o) for o in outs]


def calibration_texts(rows: Dataset, tokenizer: Any) -> list[str]:
    """The text of each row: a conversation (prompt + completion messages) through the chat template, else the
    ``text`` column, else prompt + completion strings. No labels are used: it is only what the model reads."""
    cols = rows.column_names
    if "prompt" in cols and "completion" in cols and isinstance(rows[0]["prompt"], list):
        return [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    if "text" in cols:
        return [r["text"] + "\n" for r in rows]
    if "prompt" in cols:
        return [r["prompt"] + r.get("completion", "") + "\n" for r in rows]
    raise ValueError(f"calibration data needs a text, or a prompt (and completion), column; it has {cols}")


@torch.no_grad()
def prune_gated_mlp(mlp: nn.Module, keep: torch.Tensor, w_down: torch.Tensor | None) -> None:
    """Keep channels ``keep`` of a gated MLP in place: rows of gate_proj/up_proj, columns of down_proj (or w_down)."""

    def shrink(lin: nn.Linear, weight: torch.Tensor) -> nn.Linear:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=lin.bias is not None)
        new = new.to(device=lin.weight.device, dtype=lin.weight.dtype)
        new.weight.copy_(weight)
        return new

    bias = lambda lin: lin.bias  # noqa: E731
    for name in ("gate_proj", "up_proj"):
        lin = getattr(mlp, name)
        new = shrink(lin, lin.weight[keep])
        if bias(lin) is not None:
            new.bias.copy_(lin.bias[keep])
        setattr(mlp, name, new)
    down = mlp.down_proj
    new = shrink(down, down.weight[:, keep] if w_down is None else w_down.to(down.weight.dtype))
    if bias(down) is not None:
        new.bias.copy_(down.bias)
    mlp.down_proj = new
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)
