"""The MoE routers of transformers models: finding them, reading and restoring their expert-bias buffers, counting
their routing.

transformers 5.24's DeepSeek-V3, GLM-4-MoE, Qwen2/3-MoE and Mixtral routers (``*TopkRouter`` / ``*TopKRouter``) return
``(router_logits, weights, indices)``; ``find_routers`` lists them, ``RoutingCounter`` counts the tokens each expert
receives with forward hooks (pads and gradient-checkpointing recomputations left out), ``all_reduce_counts`` sums the
counts over data-parallel ranks. The bias buffer (``e_score_correction_bias``, DeepSeek-V3's name) is read by
``expert_biases``; ``load_expert_biases`` / ``restore_expert_biases`` bring saved biases back into a model, mapping
checkpoint names to runtime names (transformers converts the experts' layout on save). ALF-LB
(``trainers/moe_balance.py``) and the MaxVio eval (``evals/moe_load.py``) are the users.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from posttrain.trainers.runtime import sum_over_ranks

BIAS_NAME = "e_score_correction_bias"  # DeepSeek-V3's buffer name; install_expert_bias uses it too
# Routers whose forward(hidden) returns (router_logits, topk_weights, topk_indices) with softmax affinities and
# no bias (transformers 5.24): install_expert_bias (trainers/moe_balance.py) patches these.
SOFTMAX_ROUTERS = ("Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "MixtralTopKRouter")


def expert_counts(indices: Tensor, num_experts: int, mask: Tensor | None = None) -> Tensor:
    """Tokens routed to each expert: bincount of indices (..., k) over the tokens where ``mask`` (...) is true."""
    idx = indices.reshape(-1, indices.shape[-1])
    if mask is not None:
        idx = idx[mask.reshape(-1).bool()]
    return torch.bincount(idx.reshape(-1), minlength=num_experts)


def is_router(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return name.endswith("topkrouter") or isinstance(getattr(module, "_buffers", {}).get(BIAS_NAME), torch.Tensor)


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The MoE routers of a transformers model, in module order: ``[(qualified name, module)]``.

    A router is a module whose class name ends in ``TopkRouter``/``TopKRouter`` (DeepSeek-V3, GLM-4-MoE, Qwen2/3-MoE,
    Mixtral in transformers 5.24, all returning ``(router_logits, weights, indices)``) or that owns an
    ``e_score_correction_bias`` buffer.
    """
    return [(n, m) for n, m in model.named_modules() if is_router(m)]


def router_num_experts(module: nn.Module) -> int:
    for attr in ("num_experts", "n_routed_experts"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return module.weight.shape[0]


def layer_label(name: str, i: int) -> str:
    m = re.search(r"layers\.(\d+)\.", name + ".")
    return f"layer{m.group(1)}" if m else f"router{i}"


def expert_biases(model_or_routers: nn.Module | Sequence[tuple[str, nn.Module]]) -> list[Tensor]:
    """The bias buffers of every router, in order (raises if a router has none: see install_expert_bias)."""
    routers = model_or_routers if isinstance(model_or_routers, list) else find_routers(model_or_routers)
    out = []
    for name, mod in routers:
        b = mod._buffers.get(BIAS_NAME)
        if not isinstance(b, torch.Tensor):
            raise ValueError(
                f"router {name} ({type(mod).__name__}) has no {BIAS_NAME} buffer; call install_expert_bias(model) first"
            )
        out.append(b)
    return out


def checkpoint_to_runtime_names(model: nn.Module) -> Callable[[str], str]:
    """A function mapping a key as saved in a checkpoint to ``model``'s own state-dict key, by the renaming that
    ``from_pretrained`` applies: transformers 5.24 writes some modules under their hub names (Mixtral's ``mlp`` as
    ``block_sparse_moe``) and maps them back on load, and the biases of patched routers must follow the same rule.

    Mirrors step 1 of ``convert_and_load_state_dict_in_model`` (core_model_loading.py L1875-1895): the model's
    ``get_model_conversion_mapping`` (as modeling_utils.py L4411 calls it, without a user ``key_mapping`` or a
    quantizer), all renamings then at most one converter via ``rename_source_key`` (which also adds or strips the
    base-model prefix), and the original key when only that one is the model's. ``model`` must already hold the
    biases (``install_expert_bias``): the prefix handling looks the keys up in its state dict.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    own = model.state_dict()

    def runtime_name(key):
        renamed, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if renamed not in own and key in own:
            renamed, _ = rename_source_key(key, [], [], model.base_model_prefix, own)
        return renamed

    return runtime_name


def saved_biases(folder: str | os.PathLike) -> dict[str, str]:
    """``{checkpoint key: safetensors file}`` of every ``e_score_correction_bias`` saved in ``folder``."""
    from pathlib import Path

    from safetensors import safe_open

    found = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            found.update({k: f for k in handle.keys() if k.endswith(BIAS_NAME)})
    return found


def load_expert_biases(model: nn.Module, folder: str | os.PathLike) -> int:
    """Copy the ``e_score_correction_bias`` tensors saved in ``folder``'s safetensors files into ``model``.

    For patched Qwen/Mixtral models (see install_expert_bias); DeepSeek-V3's biases load with the model already.
    Saved keys are mapped to the model's names as ``from_pretrained`` maps them (``checkpoint_to_runtime_names``).
    Raises KeyError naming the routers whose bias ``folder`` lacks. Returns the number of tensors loaded.
    """
    from safetensors import safe_open

    runtime_name = checkpoint_to_runtime_names(model)
    saved = {runtime_name(k): (k, f) for k, f in saved_biases(folder).items()}
    own = [k for k in model.state_dict() if k.endswith(BIAS_NAME)]
    missing = [k for k in own if k not in saved]
    if missing:
        unmatched = sorted(key for name, (key, _) in saved.items() if name not in own)
        raise KeyError(
            f"{folder} has no saved {BIAS_NAME} for {len(missing)} of {len(own)} routers: "
            f"{', '.join(missing)}"
            + (f" (saved under names the model lacks: {', '.join(unmatched)})" if unmatched else "")
        )
    with torch.no_grad():
        for k in own:
            key, f = saved[k]
            with safe_open(str(f), framework="pt") as handle:
                tensor = handle.get_tensor(key)
            getattr(model.get_submodule(k.rsplit(".", 1)[0]), BIAS_NAME).copy_(tensor.to(torch.float32))
    return len(own)


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


class RoutingCounter:
    """Accumulates per-layer expert loads of a transformers MoE model over the micro-batches of a step.

    A forward hook on each router reads the selected indices from its output (``out[-1]``: DeepSeek-V3's
    ``topk_indices``, i.e. the model's own biased, group-limited choice, modeling_deepseek_v3.py L152/L158) and adds
    their bincount to ``counts[layer]`` (on the router's device; no host sync).

    Counting each token once under gradient checkpointing: the checkpoint recomputes the layer's forward inside
    backward (transformers' ``GradientCheckpointingLayer`` wraps ``forward``, so the router's hooks fire again; both
    ``use_reentrant=False``, transformers' default, and ``use_reentrant=True``). A recomputation always runs inside
    the autograd engine, where ``torch._C._current_graph_task_id()`` is the running graph task's id, while the
    ordinary forward runs outside it (id -1), so the hook skips calls made during a backward pass (torch's own
    non-reentrant checkpoint keys its recomputations by this id, torch/utils/checkpoint.py L1170 in 2.13; the one
    exception, unpacking a checkpointed saved tensor by hand outside backward, is not done by training code). Testing
    ``torch.is_grad_enabled()`` instead would not work: the reentrant checkpoint runs the *original* forward under
    no_grad and the recomputation with grad.

    ``ignore_padding``: a forward pre-hook on ``model`` keeps the call's ``attention_mask`` keyword; when it is 2-D
    with as many entries as the router's tokens, pad positions are left out. ``count_no_grad=False`` also skips
    forwards run under no_grad (e.g. TRL's generation and old-log-prob passes, which would otherwise add to the
    step's loads); it is incompatible with reentrant checkpointing (see above). ``training_only`` skips routers in
    eval mode.
    """

    def __init__(self, model, ignore_padding=True, count_no_grad=True, training_only=False):
        self.model = model
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no MoE router (no *TopkRouter module)")
        self.names = [layer_label(n, i) for i, (n, _) in enumerate(self.routers)]
        self.num_experts = [router_num_experts(m) for _, m in self.routers]
        self.ignore_padding = ignore_padding
        self.count_no_grad = count_no_grad
        self.training_only = training_only
        self.enabled = True
        self._mask = None
        self.counts = [
            torch.zeros(e, dtype=torch.long, device=m.weight.device)
            for e, (_, m) in zip(self.num_experts, self.routers)
        ]
        self._handles = [m.register_forward_hook(self._make_hook(i)) for i, (_, m) in enumerate(self.routers)]
        if ignore_padding:
            self._handles.append(model.register_forward_pre_hook(self._keep_mask, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._drop_mask))

    def _keep_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _drop_mask(self, module, args, output):
        self._mask = None

    def _make_hook(self, i):
        def hook(module, args, output):
            if not self.enabled or in_backward():  # gradient-checkpointing recomputation: already counted
                return
            if not self.count_no_grad and not torch.is_grad_enabled():
                return
            if self.training_only and not module.training:
                return
            indices = output[-1]
            if not (isinstance(indices, torch.Tensor) and not indices.is_floating_point()):
                raise TypeError(f"router {self.routers[i][0]} did not return integer top-k indices last")
            mask = self._mask
            if mask is not None and mask.numel() != indices.numel() // indices.shape[-1]:
                mask = None  # not this forward's tokens (e.g. a generation step): count every token
            if self.counts[i].device != indices.device:  # built before DeepSpeed/accelerate moved the model
                self.counts[i] = self.counts[i].to(indices.device)
            self.counts[i] += expert_counts(
                indices, self.num_experts[i], None if mask is None else mask.to(indices.device)
            )

        return hook

    def reset(self):
        for c in self.counts:
            c.zero_()

    def stacked(self):
        """Counts as one (L, E) tensor (all layers must have the same E)."""
        return torch.stack(self.counts)

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def all_reduce_counts(counts: Tensor) -> Tensor:
    """Sum a list of per-layer counts over data-parallel ranks (no-op without torch.distributed); returns a new list
    of int64 tensors."""
    flat = sum_over_ranks(torch.cat([c.reshape(-1).to(torch.long) for c in counts]))  # one collective for all layers
    return [part.view_as(c) for part, c in zip(flat.split([c.numel() for c in counts]), counts)]
