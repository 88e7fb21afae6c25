"""SynFlow: data-free pruning at initialisation by iterative synaptic-flow conservation, a model tool.

Paper: H. Tanaka, D. Kunin, D. L. K. Yamins, S. Ganguli, "Pruning neural networks without any data by iteratively
conserving synaptic flow", NeurIPS 2020, arXiv 2006.05467 (Algorithm 1). HideNseek (arXiv 2206.04385) uses it on
the server to prune the random initial weights before federated training. Written here from the paper's math.

- Linearise: every parameter theta is replaced by |theta| (the signs are restored afterwards).
- Synaptic flow: R = 1^T f(1; |theta| * mu), the network's summed output on an all-ones input, with the current
  mask mu applied. For a bias-free chain of Linear and ReLU layers R = 1^T (prod_l |W_l|) 1.
- Score: S(theta) = |theta * dR/dtheta| (synaptic saliency). In a bias-free feed-forward chain the scores of every
  layer sum to R (the conservation law of the paper's Theorem 2), which is what keeps SynFlow from collapsing a
  layer at high sparsity.
- Iterate n times (paper: n = 100) with an exponential schedule: at iteration k keep the global top
  density^(k/n) fraction of the prunable parameters by score, the scores recomputed on the masked network.

``synflow_prune(model, density, ...)`` works on any ``torch.nn.Module``: the prunable tensors are the weights of
its Linear and Conv layers (``modules`` narrows them by name, as peft's ``target_modules``), biases and norms are
left alone, and the all-ones input is given by ``input_shape`` or by a ``forward(model)`` callable. For a Hugging
Face causal LM ``causal_lm_forward()`` feeds an all-ones ``inputs_embeds`` (the embedding table is not on that path
and is not pruned). It returns the masks and a report, and by default zeroes the pruned weights in place;
``keep_pruned(model, masks)`` adds gradient hooks so that SGD/Adam/AdamW training keeps them at zero (a zero
gradient leaves Adam's moments and decoupled weight decay of a zero weight at zero). Scoring runs in the model's
dtype unless ``dtype`` is given (e.g. float64 for deep networks, whose product of layer sums can overflow).

In LLM recipes the keys ``synflow_density`` (fraction kept), ``synflow_modules`` (``all-linear`` or a list of Linear
module names) and ``synflow_iterations`` (default 100) prune the loaded model before training and keep it pruned
(``attach_synflow``). Query and key projections get almost no saliency on the all-ones input (every position is the
same vector, so attention is near-uniform whatever q and k are) and are removed entirely: leave them out. Not
combined with LoRA (refused) and untested under DeepSpeed ZeRO-3 / FSDP, whose sharded weights the hooks do not see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from posttrain.key_groups import module_names, pop_prefixed_keys

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def keep_schedule(density: float, iterations: int) -> list[float]:
    """The fraction kept after each of the ``iterations`` rounds: density^(k/n), k = 1..n (ends at ``density``)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    return [density ** (k / iterations) for k in range(1, iterations + 1)]


def prunable_parameters(model: nn.Module, modules: list[str] | str | None = None) -> dict[str, nn.Parameter]:
    """``{name: weight}`` of the model's Linear/Conv layers; ``modules`` (a list of module names, matched as the
    name or its last component(s), or None / ``all-linear`` for all of them) selects a subset."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE) or getattr(module, "weight", None) is None:
            continue
        if modules not in (None, "all-linear") and not any(name == m or name.endswith("." + m) for m in modules):
            continue
        found[f"{name}.weight" if name else "weight"] = module.weight
    if not found:
        raise ValueError(f"no Linear/Conv weight in the model matches modules={modules!r}")
    return found


def global_top_mask(scores: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the ``round(keep * n)`` highest scores over all tensors together (ties broken by
    ``torch.topk``'s order)."""
    flat = torch.cat([s.detach().flatten().double() for s in scores.values()])
    k = int(round(keep * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        chosen[torch.topk(flat, k, sorted=False).indices] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


@contextlib.contextmanager
def linearised(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Inside the block every parameter is |theta| (times its mask), the model in eval mode (batch norms use their
    running statistics, dropout is off); the parameters and the mode are restored exactly after it."""
    every = dict(model.named_parameters())
    originals = {name: p.detach().clone() for name, p in every.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, p in every.items():
                p.abs_()
                if masks is not None and name in masks:
                    p.mul_(masks[name])
        yield
    finally:
        with torch.no_grad():
            for name, p in every.items():
                p.copy_(originals[name])
        model.train(was_training)


def synflow_scores(
    model: nn.Module,
    forward: Callable[[nn.Module], torch.Tensor],
    params: dict[str, nn.Parameter],
    masks: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """One SynFlow scoring pass: ``({name: |theta * dR/dtheta|}, R)`` with R = sum of ``forward(model)`` on the
    linearised (all parameters made |theta|), masked network. The model's parameters are restored exactly."""
    with linearised(model, masks):
        flags = [p.requires_grad for p in params.values()]
        for p in params.values():
            p.requires_grad_(True)
        try:
            out = forward(model).sum()
            grads = torch.autograd.grad(out, list(params.values()), allow_unused=True)
        finally:
            for p, flag in zip(params.values(), flags):
                p.requires_grad_(flag)
        r = float(out.detach())
        scores = {}
        for (name, p), g in zip(params.items(), grads):
            scores[name] = torch.zeros_like(p) if g is None else (p.detach() * g).abs()
    return scores, r


def causal_lm_forward(seq_len: int = 4) -> Callable[[nn.Module], torch.Tensor]:
    """The all-ones input of a Hugging Face causal LM: ``inputs_embeds`` of ones, shape (1, seq_len, hidden);
    the logits are the output."""

    def forward(model: nn.Module) -> torch.Tensor:
        hidden = model.get_input_embeddings().weight.shape[1]
        ref = next(model.parameters())
        embeds = torch.ones(1, seq_len, hidden, dtype=ref.dtype, device=ref.device)
        return model(inputs_embeds=embeds, use_cache=False).logits

    return forward


def synflow_prune(
    model: nn.Module,
    density: float,
    input_shape: tuple[int, ...] | None = None,
    forward: Callable[[nn.Module], torch.Tensor] | None = None,
    iterations: int = 100,
    modules: list[str] | str | None = None,
    dtype: torch.dtype | None = None,
    apply: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Prune ``model`` at initialisation to ``density`` (fraction of the prunable weights kept) with SynFlow.

    ``input_shape`` (without the batch dimension) gives the all-ones input ``torch.ones(1, *input_shape)``;
    ``forward(model) -> Tensor`` replaces it for models that take other inputs (``causal_lm_forward()``). Returns
    ``(masks, report)``: boolean masks keyed by parameter name and ``{"density", "layer_density", "flow",
    "iterations"}`` where ``flow`` is R of the pruned network. ``apply``: zero the pruned weights in place.
    """
    keep = keep_schedule(density, iterations)
    if (input_shape is None) == (forward is None):
        raise ValueError("give exactly one of input_shape and forward")
    if forward is None:
        shape = tuple(int(s) for s in input_shape)

        def forward(m: nn.Module) -> torch.Tensor:
            ref = next(m.parameters())
            return m(torch.ones(1, *shape, dtype=ref.dtype, device=ref.device))

    params = prunable_parameters(model, modules)
    old_dtype = next(model.parameters()).dtype
    if dtype is not None and dtype != old_dtype:
        model.to(dtype)  # exact both ways for float32/bfloat16 -> float64 -> back
    try:
        masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()}
        for fraction in keep:
            scores, _ = synflow_scores(model, forward, params, masks)
            masks = global_top_mask(scores, fraction)
        flow = synaptic_flow(model, forward, masks)
    finally:
        if dtype is not None and dtype != old_dtype:
            model.to(old_dtype)
    if apply:
        apply_masks(model, masks)
    return masks, {
        "density": mask_density(masks),
        "layer_density": {name: float(m.float().mean()) for name, m in masks.items()},
        "flow": flow,
        "iterations": int(iterations),
    }


def synaptic_flow(
    model: nn.Module, forward: Callable[[nn.Module], torch.Tensor], masks: dict[str, torch.Tensor] | None = None
) -> float:
    """R = 1^T f(1; |theta| * mu): the synaptic flow of the linearised, masked network (parameters restored)."""
    with linearised(model, masks), torch.no_grad():
        return float(forward(model).sum())


def mask_density(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of entries kept over all masks together."""
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned entries of the named parameters in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].dtype))


def keep_pruned(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Gradient hooks that zero the gradient of pruned entries, so training keeps them at zero (SGD, Adam and
    AdamW's decoupled decay leave a zero weight with zero gradient at zero). Returns the hook handles."""
    params = dict(model.named_parameters())
    handles = []
    for name, mask in masks.items():
        keep = mask.to(params[name].dtype)
        handles.append(params[name].register_hook(lambda g, keep=keep: g * keep))
    return handles


# --- LLM recipes: ``synflow_*`` keys on any recipe with a model --------------------------------------------------

SYNFLOW_KEYS = ("synflow_density", "synflow_modules", "synflow_iterations")


@dataclass
class SynFlowArgs:
    density: float = 1.0
    modules: list[str] | str = "all-linear"
    iterations: int = 100


def parse_synflow_keys(values: dict, sources: dict, source: str, method: str, task: str) -> SynFlowArgs | None:
    """Pop the ``synflow_*`` keys from a recipe's values and check them (nothing loads); ValueError names the key and
    where it was set."""
    popped = pop_prefixed_keys(values, sources, source, prefix="synflow", names=SYNFLOW_KEYS, group="SynFlow")
    if popped is None:
        return None
    given = {k.removeprefix("synflow_"): v for k, v in popped.items()}
    where = lambda k: sources.get(f"synflow_{k}", source)  # noqa: E731
    if task == "aux":
        raise ValueError(f"{where(next(iter(given)))}: synflow_* keys apply to LLM recipes; method '{method}' has none")
    for key in ("density", "modules"):
        if key not in given:
            raise ValueError(
                f"{source}: synflow_* keys need synflow_density (fraction kept, in (0, 1]) and synflow_modules (a list "
                "of Linear module names such as [v_proj, o_proj, gate_proj, up_proj, down_proj])"
            )
    args = SynFlowArgs()
    density = given["density"]
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"{where('density')}: synflow_density expects a number in (0, 1], got {density!r}")
    args.density = float(density)
    args.modules = module_names(given["modules"], "synflow_modules", where("modules"))
    if "iterations" in given:
        it = given["iterations"]
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise ValueError(f"{where('iterations')}: synflow_iterations expects an integer >= 1, got {it!r}")
        args.iterations = it
    return args


def attach_synflow(trainer: Any, args: SynFlowArgs) -> dict:
    """Prune ``trainer.model`` with SynFlow before ``train()`` and keep the pruned weights at zero while it trains.

    The mask is computed from the loaded model, before a resumed run loads its checkpoint, so a resume finds the
    same mask (SynFlow is deterministic). Scored in float32 when the model is in a 16-bit dtype."""
    from posttrain import UserError

    model = trainer.model
    if hasattr(model, "peft_config"):
        raise UserError("synflow_* keys prune the full weights; they do not combine with use_peft (LoRA)")
    dtype = torch.float32 if next(model.parameters()).dtype in (torch.float16, torch.bfloat16) else None
    try:
        masks, report = synflow_prune(
            model,
            args.density,
            forward=causal_lm_forward(),
            iterations=args.iterations,
            modules=args.modules,
            dtype=dtype,
        )
    except ValueError as err:
        raise UserError(f"synflow: {err}") from None
    keep_pruned(model, masks)
    empty = [name for name, m in masks.items() if not m.any()]
    print(
        f"posttrain: SynFlow kept {report['density']:.4f} of the weights of {len(masks)} tensors"
        + (f"; {len(empty)} pruned entirely (e.g. {empty[0]})" if empty else "")
    )
    trainer.synflow = report
    return report
