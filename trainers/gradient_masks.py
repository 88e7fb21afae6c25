"""Fixed 0/1 gradient masks over a model's parameters, under plain, DDP and DeepSpeed ZeRO-1/2/3 models.

What a masked-update method (WAGLE; any "update only these weights" fine-tuning) needs from the stack, apart from its
scores: the parameters a mask covers (``trainable_parameters``: bare names, tied weights once), gradient sums over
batches in float32 that never gather a ZeRO-3 parameter (``accumulate_gradients``), applying the mask after clipping
and before the optimizer step (``apply_gradient_mask`` on ``p.grad``; ``install_partition_mask`` on DeepSpeed's flat
fp32 partitions, via ``partition_masks`` from deepspeed 0.19.8's ZeRO optimizers), and masks on disk
(``save_mask`` / ``load_mask`` / ``check_mask``: bool safetensors, written atomically).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from posttrain.atomic import write_atomic


def check_names(reference: Iterable[str], other: Iterable[str], what: str) -> None:
    if set(reference) != set(other):
        missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        raise KeyError(f"{what} does not match the parameters: missing {missing[:5]}, unexpected {extra[:5]}")


def is_zero3(p: Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_shape(p: Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if is_zero3(p) else tuple(p.shape)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the parameters the mask covers: every trainable one (tied weights once), named as
    in the bare model (a DDP / DeepSpeed / compiled wrapper is looked through, so no ``module.`` prefix)."""
    from accelerate.utils import extract_model_from_parallel

    return [(n, p) for n, p in extract_model_from_parallel(model).named_parameters() if p.requires_grad]


def zero3_range(p: Tensor) -> tuple[int, int]:
    """(start, length) of this rank's real entries of a ZeRO-3 parameter: rank k of its partition group holds
    entries [k c, (k + 1) c) of the flattened parameter (c = ``partition_numel()``; the last ranks' pieces may be
    short or empty: padding)."""
    count = p.partition_numel()
    start = count * p._z3_optimizer._get_param_partition_rank(p)
    return start, max(0, min(count, p.ds_numel - start))


def _is_deepspeed_engine(model):
    return hasattr(model, "zero_optimization") and hasattr(model, "optimizer")


def _zero_grads(model):
    if _is_deepspeed_engine(model):
        model.zero_grad()  # p.grad
        if model.optimizer is not None:  # the reduced partitions: the next backward overwrites them, not adds to them
            model.optimizer.zero_grad()
    else:
        model.zero_grad(set_to_none=True)


def accumulate_gradients(
    model: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None,
    *,
    max_batches: int | None = None,
    to_cpu: bool = False,
    grad_scale: float = 1.0,
    backward: Callable[[Tensor], None] | None = None,
) -> dict[str, Tensor]:
    """{name: float32 sum over batches of grad_scale * grad loss_fn(model, batch)}; loss_fn defaults to the
    model's own token-mean CE ``model(**batch).loss``. Runs in eval mode (official), restores the mode.

    ``model`` may be the DDP / DeepSpeed wrapper (forward, backward and zero_grad go through it). ``backward``:
    the caller's (e.g. ``accelerator.backward``). ``grad_scale`` undoes what the stack does to the plain sum:
    world_size under DDP or DeepSpeed (ranks are averaged), the accumulation steps if ``backward`` divides by them.
    ZeRO-3: the engine's optimizer adds up the reduced gradient partitions over the batches (every rank must run
    the same number of batches), and each rank returns its own flat pieces of the sums (``zero3_range``): no
    parameter-sized gradient is ever gathered.

    The sums are float32 whatever the model's dtype. A float32 parameter's batches add up in ``p.grad`` itself; a
    bf16 / fp16 parameter's ``p.grad`` would add them up in bf16 / fp16 (8 / 11 mantissa bits: the official code's
    behaviour, which rounds the sums and creates ties in |S|), so each batch's gradient is folded into a float32 sum
    right after its backward and ``p.grad`` is released: one float32 copy of those parameters (the result itself)
    plus one low-precision gradient. Each batch's gradient is still computed in the parameters' dtype."""
    was_training = model.training
    model.eval()
    params = trainable_parameters(model)
    zero3 = any(is_zero3(p) for _, p in params)
    # Plain parameters: backward itself sums the batches' gradients into p.grad, which then becomes the result (no
    # second copy of the parameters). ZeRO-3: DeepSpeed sums into its partitions. CPU sums: copied batch by batch.
    direct = not to_cpu and not zero3
    sums, folded, batches = {}, {}, 0
    try:
        _zero_grads(model)
        for step, batch in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            batches += 1
            if not direct and not zero3:
                _zero_grads(model)
            loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
            (backward or torch.Tensor.backward)(loss)
            if direct:
                for name, p in params:  # low-precision grads: summed in float32, batch by batch (see above)
                    if p.grad is not None and p.grad.dtype != torch.float32:
                        if name in folded:
                            folded[name].add_(p.grad)
                        else:
                            folded[name] = p.grad.detach().to(torch.float32, copy=True)
                        p.grad = None
            if direct or zero3:
                continue
            for name, p in params:
                grad = p.grad if p.grad is not None else torch.zeros(full_shape(p), device=p.device)
                grad = grad.detach().to("cpu", torch.float32) * grad_scale  # a new tensor
                if name in sums:
                    sums[name] += grad
                else:
                    sums[name] = grad
        if batches and (direct or zero3):
            for name, p in params:
                if zero3:
                    from deepspeed.utils import safe_get_local_grad

                    grad = safe_get_local_grad(p).reshape(-1)[: zero3_range(p)[1]]  # a view of DeepSpeed's buffer
                elif name in folded:
                    grad = folded.pop(name)
                else:
                    grad = p.grad if p.grad is not None else torch.zeros(full_shape(p), device=p.device)
                    p.grad = None  # the summed gradient is ours now
                grad = grad.detach().to("cpu" if to_cpu else grad.device, torch.float32, copy=zero3)
                sums[name] = grad.mul_(grad_scale) if grad_scale != 1 else grad
    finally:
        _zero_grads(model)
        model.train(was_training)
    if not batches:
        raise ValueError("accumulate_gradients: the loader gave no batch")
    return sums


def apply_gradient_mask(model: nn.Module, mask: dict[str, Tensor]) -> None:
    """Zero the gradients of masked-out entries (``p.grad`` of plain, DDP models). Call after clipping, before
    ``optimizer.step()``; a trainable parameter with a gradient but no mask entry is an error."""
    for name, p in trainable_parameters(model):
        if p.grad is None:
            continue
        if name not in mask:
            raise KeyError(f"no mask for parameter {name!r}")
        p.grad.masked_fill_(~mask[name].to(p.grad.device), 0)


def partition_masks(engine: nn.Module, mask: dict[str, Tensor]) -> dict[int, Tensor]:
    """{id(tensor): bool mask} for the flat fp32 tensors a DeepSpeed ZeRO optimizer steps on this rank: the ZeRO-1/2
    partition of each group (a parameter's piece is its ``_hp_mapping`` fragment) or the ZeRO-3 partition of each
    sub-group (``grad_position``; rank k holds entries [k c, (k + 1) c) of the flattened parameter, c its partition
    size). Padding entries are masked (their gradients are zero anyway)."""
    opt, names = engine.optimizer, {id(p): n for n, p in trainable_parameters(engine)}
    out = {}
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3 (deepspeed 0.19.8 stage3.py)
        for i, group in enumerate(opt.fp16_groups):
            flat = opt.fp32_partitioned_groups_flat[i]
            local = torch.zeros(flat.numel(), dtype=torch.bool)
            for p in (p for p in group if id(p) in names):
                _, offset, count = opt.grad_position[opt.get_param_id(p)]
                start = count * opt._get_param_partition_rank(p)
                real = max(0, min(count, p.ds_numel - start))
                local[offset : offset + real] = mask[names[id(p)]].reshape(-1)[start : start + real].cpu()
            out[id(flat)] = local.to(flat.device)
    elif hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2 (stage_1_and_2.py)
        for i, group in enumerate(opt.bit16_groups):
            flat = opt.single_partition_of_fp32_groups[i]
            local = torch.zeros(flat.numel(), dtype=torch.bool)
            for p in (p for p in group if id(p) in names and getattr(p, "_hp_mapping", None) is not None):
                hp, lp = p._hp_mapping.hp_fragment_address, p._hp_mapping.lp_fragment_address
                local[hp.start : hp.start + hp.numel] = (
                    mask[names[id(p)]].reshape(-1)[lp.start : lp.start + lp.numel].cpu()
                )
            out[id(flat)] = local.to(flat.device)
    else:
        raise ValueError(
            f"WAGLE under DeepSpeed needs ZeRO stage 1, 2 or 3 (the optimizer is {type(opt).__name__}): "
            "set zero_stage in the accelerate config"
        )
    return out


def install_partition_mask(engine: nn.Module, mask: dict[str, Tensor]) -> list:
    """Mask a DeepSpeed engine's gradients after its clipping and before its optimizer step: ZeRO optimizers clip
    the flat fp32 partition gradients inside ``step()`` and then call the inner torch optimizer's ``step()``, so a
    step pre-hook on that optimizer sees the clipped gradients (the order of ``apply_gradient_mask``). Returns the
    hook handles."""
    masks = partition_masks(engine, mask)

    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for t in group["params"]:
                if t.grad is None:
                    continue
                if id(t) not in masks:
                    raise KeyError(
                        "DeepSpeed stepped a tensor with no WAGLE mask (not a ZeRO partition of this engine)"
                    )
                t.grad.masked_fill_(~masks[id(t)], 0)

    inner = [getattr(engine.optimizer, name, None) for name in ("optimizer", "backup_optimizer")]  # offload: both
    return [o.register_step_pre_hook(hook) for o in inner if isinstance(o, torch.optim.Optimizer)]


def mask_density(mask: dict[str, Tensor]) -> float:
    """Fraction of entries updated (True), for logging."""
    total = sum(m.numel() for m in mask.values())
    return sum(int(m.sum()) for m in mask.values()) / max(total, 1)


def save_mask(mask: dict[str, Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write the mask as bool safetensors, atomically (temporary file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save_file

    tensors = {n: m.detach().to("cpu", torch.bool).contiguous() for n, m in mask.items()}
    write_atomic(
        path, lambda tmp: save_file(tensors, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    )


def load_mask(
    path: str | os.PathLike, reference: nn.Module | dict | None = None, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Read a saved mask (names sorted); with ``reference`` checked by ``check_mask``."""
    from safetensors.torch import load_file

    mask = load_file(str(path), device=str(device))
    return mask if reference is None else check_mask(mask, reference, path)


def check_mask(mask: dict[str, Tensor], reference: nn.Module | dict, source: object) -> dict[str, Tensor]:
    """``mask`` in the order of ``reference`` (a model, or {name: tensor or shape}) after checking that it has exactly
    the reference's (trainable) parameter names and shapes and bool entries, else one ValueError naming them."""
    if isinstance(reference, torch.nn.Module):
        shapes = {n: full_shape(p) for n, p in trainable_parameters(reference)}
    else:
        shapes = {n: tuple(s.shape if isinstance(s, torch.Tensor) else s) for n, s in reference.items()}
    missing, extra = sorted(set(shapes) - set(mask)), sorted(set(mask) - set(shapes))
    wrong = [
        f"{n} {tuple(mask[n].shape)} != {shapes[n]}" for n in shapes if n in mask and tuple(mask[n].shape) != shapes[n]
    ]
    wrong += [f"{n} has dtype {m.dtype}" for n, m in mask.items() if m.dtype != torch.bool]
    if missing or extra or wrong:
        raise ValueError(
            f"mask {source} does not match the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {extra[:5]} ({len(extra)}), wrong {wrong[:5]} ({len(wrong)})"
        )
    return {n: mask[n] for n in shapes}  # the reference's order (safetensors sorts names)
