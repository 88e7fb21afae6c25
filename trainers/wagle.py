"""WAGLE: weight attribution-guided LLM unlearning (arXiv 2410.17509).

Official code: OPTML-Group/WAGLE (MIT) at commit 31275e87c03e0f23bb01413eb3f19eada4a404d0:
``src/unlearn/generate_mask.py`` score type ``snip_advanced`` is WAGLE, ``src/unlearn/GA.py`` GradDiff (``GA_FT``)
and NPO (``NPO_FT``), ``src/unlearn/CL.py`` PO (``CL_FT``), ``src/unlearn/base.py`` the masked step,
``configs/unlearn/Tofu/*.json`` the shipped hyper-parameters. Written anew from a description of that code (nothing
copied); only the paper's abstract was read, so the equations below are the code's.

Delta from ``transformers.Trainer``: an unlearning loss on paired (forget, retain) batches, and the gradients are
multiplied by a fixed 0/1 weight mask after gradient clipping and before ``optimizer.step()``.

Phase 1, the mask (model.eval(); per batch b the plain token-mean next-token CE, HF ``outputs.loss``, not negated):

    g_f = sum_b grad CE(forget_b)        g_r = sum_b grad CE(retain_b)      summed, not averaged, over batches
    S_j = (theta_j - g_r,j / gamma) * g_f,j                                  every entry of every trainable tensor
    m_j = 1  iff  |S_j| is among the global top int(n * ratio) of all n entries (ratio = fraction *updated*)

  baselines on the same API: snip |theta g_f|, magnitude |theta|, random U[0, 1) (seeded), dense (all ones).
  For PO masks the forget CE is the CE of the refusal answer (official ``snip_advanced_CL``).

Phase 2, the objective (lambda = ``retain_weight``, beta = 0.1 hard-coded in the official code):

    graddiff  L = -CE_f + lambda CE_r
    npo       L = -(2 / beta) log sigmoid(beta (CE_f^theta - CE_f^ref)) + lambda CE_r   (batch token-mean CE, not
              the NPO paper's sequence log-likelihood sum; ref = frozen copy of the initial model)
    po        L = CE(forget question -> refusal answer) + lambda CE_r
    step      backward -> clip_grad_norm (unmasked grads) -> grad *= m -> optimizer.step()

Distributed: DDP sums are all-reduced and p.grad is masked (``_MaskAfterClipping``). DeepSpeed ZeRO-1/2/3 clips the
flat fp32 partitions inside its ``step()``: a step pre-hook on its inner optimizer masks each rank's partition
(``install_partition_mask``). Under ZeRO-3 phase 1 runs through the engine and stays sharded: each rank scores
its own pieces of the parameters, and the radix select sums its histograms over the ranks (``_zero3_mask``).

State: the mask and the retain-stream position are the trainer's method state (``method_state.MethodStateMixin``:
in every checkpoint, restored on resume under every backend, so a resumed run skips phase 1). The mask is also
written to ``output_dir/wagle_mask.safetensors``, for another run's ``mask_path``.

Scale: the top-k threshold is found by a radix select over 8-bit histograms of order-preserving integer keys,
chunk by chunk (4 passes for float32 scores, 8 for float64), never by sorting or concatenating all entries; ties at
the threshold go to the earliest entries in (dict order, row-major) order, i.e. exactly a *stable* descending sort.

Doubts: (1) the official ranking uses an unstable ``torch.argsort``, so on exact ties the masks may differ;
(2) S is not scale-invariant: multiplying both gradient sums by c reweights theta against g_r / gamma, so data
parallelism (DDP averages over ranks) or a backward that divides by the accumulation steps must be undone with
``grad_scale`` to match the official single-process sums; (3) with the shipped gamma = 1e-6 the theta term is
negligible and |S| ~ |g_r g_f| / gamma; (4) official accumulates bf16 grads in ``.grad``; we sum every model's
batches in float32 (``accumulate_gradients``: a bf16 model's batch gradients are folded into float32 sums), so fewer
ties in |S|; (5) AdamW's
decoupled weight decay still shrinks masked weights (official behaviour, kept); (6) int(n * ratio) keeps the
official float rounding (int(100 * 0.29) = 28); (7) the paper's form as secondary sources give it,
theta g_f - g_r g_f / gamma, is the same S (not checked in the paper).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from posttrain.atomic import write_atomic
from posttrain.trainers.method_state import MethodStateMixin
from posttrain.trainers.runtime import sum_over_ranks

MASK_FILE = "wagle_mask.safetensors"
OBJECTIVES = ("graddiff", "npo", "po")
MASK_METHODS = ("wagle", "random", "magnitude", "snip", "dense")


@dataclass
class WAGLEConfig(TrainingArguments):
    """TrainingArguments plus the WAGLE settings; defaults from the official TOFU GradDiff+WAGLE config."""

    objective: str = field(
        default="graddiff",
        metadata={"help": "unlearning loss: graddiff (GA+FT), npo (NPO+FT) or po (refusal answers, CL+FT)."},
    )
    mask_method: str = field(
        default="wagle",
        metadata={
            "help": (
                "wagle (|(theta - g_r/gamma) g_f|), random, magnitude (|theta|), snip (|theta g_f|) or dense (all "
                "weights; ignores mask_ratio)."
            )
        },
    )
    mask_ratio: float = field(
        default=0.95,
        metadata={
            "help": (
                "fraction of weights updated (global top int(n*ratio)); official: TOFU 0.95 GradDiff/NPO, 0.8 PO; "
                "WMDP 0.4 GradDiff, 0.6 NPO."
            )
        },
    )
    gamma: float = field(
        default=1e-6, metadata={"help": "Hessian-diagonal constant gamma ('mu' in the official configs: 1e-6)."}
    )
    npo_beta: float = field(default=0.1, metadata={"help": "NPO inverse temperature beta (official: 0.1, hard-coded)."})
    retain_weight: float = field(default=1.0, metadata={"help": "weight lambda of the retain CE in every objective."})
    mask_path: str | None = field(
        default=None,
        metadata={
            "help": (
                "load this saved mask (safetensors) instead of computing one; it must match the model's trainable "
                "parameters."
            )
        },
    )
    mask_seed: int = field(default=0, metadata={"help": "seed of the random mask baseline."})
    attribution_batches: int = field(
        default=-1,
        metadata={"help": "paired batches used for the gradient sums of phase 1; -1: the whole forget loader."},
    )
    keep_grads_on_cpu: bool = field(
        default=False, metadata={"help": "keep the phase-1 gradient sums and scores on CPU (saves accelerator memory)."}
    )
    mask_chunk_size: int = field(
        default=2**22, metadata={"help": "entries processed at once by the global top-k threshold search."}
    )
    attribution_micro_batch: int = field(
        default=1,
        metadata={
            "help": (
                "phase 1 runs each batch this many rows at a time, each piece's token-sum CE divided by the whole "
                "batch's answer tokens: the batch's token-mean gradient with the activations of a smaller batch (0: "
                "whole batches)."
            )
        },
    )
    # official training arguments (TOFU GradDiff+WAGLE): warmup max(1, max_steps // 10) ~ ratio 0.1
    learning_rate: float = field(default=7e-6, metadata={"help": "official: 7e-6 TOFU GradDiff, 1e-5 NPO, 2e-5 PO."})
    weight_decay: float = field(default=0.1, metadata={"help": "official: 0.1 TOFU, 0.0 WMDP."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "official: 5."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "official: 1 (x 4 accumulation steps)."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "official: 4."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "official: max(1, max_steps // 10) steps; a float < 1 is a ratio."}
    )
    # data and model loading (trainer side)
    max_length: int = field(default=512, metadata={"help": "tokens per example (prompt + answer), cut on the right."})
    prompt_template: str = field(
        default="{prompt}",
        metadata={
            "help": (
                "format of plain-string prompts (conversational ones use the chat template), e.g. '[INST] {prompt} "
                "[/INST]' for TOFU's Llama-2."
            )
        },
    )
    model_init_kwargs: dict | None = field(
        default=None,
        metadata={
            "help": "keyword arguments of from_pretrained when the model is given as a path (set by the recipe loader)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        if self.mask_method not in MASK_METHODS:
            raise ValueError(f"mask_method={self.mask_method!r}; valid: {', '.join(MASK_METHODS)}")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1] (got {self.mask_ratio})")
        if not self.gamma > 0 or not self.npo_beta > 0:
            raise ValueError(f"gamma and npo_beta must be > 0 (got {self.gamma}, {self.npo_beta})")
        if self.attribution_micro_batch < 0:
            raise ValueError(f"attribution_micro_batch must be >= 0 (got {self.attribution_micro_batch})")
        if self.mask_chunk_size < 1 or self.attribution_batches == 0 or self.attribution_batches < -1:
            raise ValueError("mask_chunk_size must be >= 1 and attribution_batches -1 or >= 1")
        if self.max_length < 2 or "{prompt}" not in self.prompt_template:
            raise ValueError(
                f"max_length must be >= 2 and prompt_template must contain '{{prompt}}' (got {self.max_length}, "
                f"{self.prompt_template!r})"
            )


# ----------------------------------------------------------------------------------------------- pure math


def attribution_scores(params, grad_forget, grad_retain, gamma):
    """WAGLE scores {name: |(theta - g_r / gamma) * g_f|} in float32, on the device of the forget gradients."""
    _check_names(params, grad_forget, "grad_forget")
    _check_names(params, grad_retain, "grad_retain")
    out = {}
    for name, theta in params.items():
        gf = grad_forget[name].float()
        theta, gr = theta.detach().to(gf.device, torch.float32), grad_retain[name].to(gf.device, torch.float32)
        out[name] = ((theta - gr / gamma) * gf).abs()
    return out


def _attribution_scores_(grad_retain, theta, grad_forget, gamma):
    """``attribution_scores`` of one tensor written into the float32 ``grad_retain`` (consumed): no parameter-sized
    temporaries. The same floats: -g_r / gamma + theta is theta - g_r / gamma."""
    gf = grad_forget.to(grad_retain.device)
    return grad_retain.div_(-gamma).add_(theta.to(grad_retain.device, torch.float32)).mul_(gf).abs_()


def snip_scores(params, grad_forget):
    """SNIP baseline {name: |theta * g_f|} (WAGLE without the retain correction)."""
    _check_names(params, grad_forget, "grad_forget")
    return {
        n: (t.detach().to(grad_forget[n].device, torch.float32) * grad_forget[n].float()).abs()
        for n, t in params.items()
    }


def magnitude_scores(params):
    """Magnitude baseline {name: |theta|}."""
    return {n: t.detach().float().abs() for n, t in params.items()}


def random_scores(shapes, seed=0):
    """Random baseline: U[0, 1) scores from one CPU generator seeded once, tensors drawn in dict order.
    ``shapes`` maps names to shapes or tensors (only their shapes are used), so every rank draws the same."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(tuple(s.shape if isinstance(s, torch.Tensor) else s), generator=g) for n, s in shapes.items()}


def _keys(x, wide):
    """Order-preserving integer keys of floats: a < b iff key(a) < key(b); -0.0 is mapped to +0.0 first."""
    x = x.to(torch.float64 if wide else torch.float32)
    if torch.isnan(x).any():
        raise ValueError("NaN in the mask scores")
    bits = torch.where(x == 0, torch.zeros_like(x), x).view(torch.int64 if wide else torch.int32)
    return bits ^ ((bits >> (63 if wide else 31)) & (2**63 - 1 if wide else 2**31 - 1))


def _chunks(tensor, size):
    flat = tensor.reshape(-1)
    return [flat[i : i + size] for i in range(0, flat.numel(), size)]


def top_ratio_mask(scores, ratio, chunk_size=2**24, group=None):
    """{name: bool mask}, True for the global top int(n * ratio) scores over all tensors together, exactly.

    The k-th largest score is found by radix select: one 256-bin histogram of the next 8 key bits per pass, over
    chunks of ``chunk_size`` entries, restricted to the entries that share the high bits found so far. Entries
    above it are all kept; entries equal to it are kept in (dict order, row-major) order until k are taken.

    ``group`` (a torch.distributed process group, e.g. ``torch.distributed.group.WORLD``): ``scores`` are this
    rank's shards, each a contiguous piece of its flattened tensor, rank r's piece before rank r + 1's (ZeRO-3's
    partitioning). Counts and histograms are summed over the ranks, and ties are taken in the order (name, rank,
    entry): every rank gets its part of the mask of the whole tensors, entry for entry (a collective: all ranks,
    same names in the same order)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1] (got {ratio})")

    def total(t):  # over the shards of all ranks, or of this process alone
        return t if group is None else sum_over_ranks(t, group)

    local = torch.tensor(
        [sum(s.numel() for s in scores.values()), sum(int(torch.isnan(s).sum()) for s in scores.values())]
    )
    n, nans = total(local).tolist()
    if nans:
        raise ValueError("NaN in the mask scores")
    k = int(n * ratio)
    if k == 0 or k == n:
        return {name: torch.full(s.shape, k > 0, dtype=torch.bool, device=s.device) for name, s in scores.items()}
    wide = any(s.dtype == torch.float64 for s in scores.values())
    width = 64 if wide else 32
    prefix, need = 0, k  # need: rank of the k-th largest key among the keys that share the prefix
    for shift in range(width - 8, -1, -8):
        top = shift == width - 8
        hist = torch.zeros(256, dtype=torch.int64)
        for s in scores.values():
            for chunk in _chunks(s, chunk_size):
                key = _keys(chunk, wide)
                if not top:
                    key = key[(key >> (shift + 8)) == prefix]
                digit = ((key >> shift) & 255) ^ (128 if top else 0)  # top byte: sign flipped, so unsigned order
                hist += torch.bincount(digit.long(), minlength=256).cpu()
        hist = total(hist)
        at_least = hist.flip(0).cumsum(0)  # at_least[i]: entries whose digit >= 255 - i
        i = int(torch.searchsorted(at_least, need))
        digit = 255 - i
        need -= int(at_least[i] - hist[digit])
        prefix = digit - 128 if top else prefix * 256 + digit
    threshold = prefix  # and the first `need` ties of the global order are kept
    ties = torch.tensor(
        [sum(int((_keys(c, wide) == threshold).sum()) for c in _chunks(s, chunk_size)) for s in scores.values()],
        dtype=torch.int64,
    )
    if group is None:
        before = ties.cumsum(0) - ties  # ties in the tensors before each one
    else:
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        table = torch.zeros(world, len(ties), dtype=torch.int64)
        table[rank] = ties
        table = total(table)  # [rank, tensor]: every rank's tie counts
        before = table.sum(0).cumsum(0) - table.sum(0) + table[:rank].sum(0)  # earlier tensors, then earlier ranks
    quota = (need - before).clamp(min=0).minimum(ties).tolist()  # ties this rank keeps in each tensor
    masks = {}
    for (name, s), left in zip(scores.items(), quota):
        parts = []
        for chunk in _chunks(s, chunk_size):
            key = _keys(chunk, wide)
            keep, tie = key > threshold, key == threshold
            if left > 0:
                take = tie & (tie.cumsum(0) <= left)
                left -= int(take.sum())
                keep |= take
            parts.append(keep)
        masks[name] = (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=s.device)).view(s.shape)
    return masks


def graddiff_loss(forget_ce, retain_ce, retain_weight=1.0):
    """GradDiff (official GA+FT): -CE_f + lambda CE_r."""
    return -forget_ce + retain_weight * retain_ce


def npo_forget_term(forget_ce, ref_forget_ce, beta=0.1):
    """Official NPO term on batch token-mean CEs: -(2 / beta) log sigmoid(beta (CE_theta - CE_ref))."""
    return -(2.0 / beta) * F.logsigmoid(beta * (forget_ce - ref_forget_ce))


def npo_loss(forget_ce, ref_forget_ce, retain_ce, beta=0.1, retain_weight=1.0):
    """NPO+FT: the NPO forget term + lambda CE_r."""
    return npo_forget_term(forget_ce, ref_forget_ce, beta) + retain_weight * retain_ce


def po_loss(refusal_ce, retain_ce, retain_weight=1.0):
    """PO (official CL+FT): CE of the forget questions with refusal answers + lambda CE_r."""
    return refusal_ce + retain_weight * retain_ce


def _check_names(reference, other, what):
    if set(reference) != set(other):
        missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        raise KeyError(f"{what} does not match the parameters: missing {missing[:5]}, unexpected {extra[:5]}")


# ----------------------------------------------------------------------------------------------- model side


def _is_zero3(p):
    return hasattr(p, "ds_id")


def _full_shape(p):
    return tuple(p.ds_shape) if _is_zero3(p) else tuple(p.shape)


def trainable_parameters(model):
    """(name, parameter) of the parameters the mask covers: every trainable one (tied weights once), named as
    in the bare model (a DDP / DeepSpeed / compiled wrapper is looked through, so no ``module.`` prefix)."""
    from accelerate.utils import extract_model_from_parallel

    return [(n, p) for n, p in extract_model_from_parallel(model).named_parameters() if p.requires_grad]


def _zero3_range(p):
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


def accumulate_gradients(model, loader, loss_fn=None, *, max_batches=None, to_cpu=False, grad_scale=1.0, backward=None):
    """{name: float32 sum over batches of grad_scale * grad loss_fn(model, batch)}; loss_fn defaults to the
    model's own token-mean CE ``model(**batch).loss``. Runs in eval mode (official), restores the mode.

    ``model`` may be the DDP / DeepSpeed wrapper (forward, backward and zero_grad go through it). ``backward``:
    the caller's (e.g. ``accelerator.backward``). ``grad_scale`` undoes what the stack does to the plain sum:
    world_size under DDP or DeepSpeed (ranks are averaged), the accumulation steps if ``backward`` divides by them.
    ZeRO-3: the engine's optimizer adds up the reduced gradient partitions over the batches (every rank must run
    the same number of batches), and each rank returns its own flat pieces of the sums (``_zero3_range``): no
    parameter-sized gradient is ever gathered.

    The sums are float32 whatever the model's dtype. A float32 parameter's batches add up in ``p.grad`` itself; a
    bf16 / fp16 parameter's ``p.grad`` would add them up in bf16 / fp16 (8 / 11 mantissa bits: the official code's
    behaviour, which rounds the sums and creates ties in |S|), so each batch's gradient is folded into a float32 sum
    right after its backward and ``p.grad`` is released: one float32 copy of those parameters (the result itself)
    plus one low-precision gradient. Each batch's gradient is still computed in the parameters' dtype."""
    was_training = model.training
    model.eval()
    params = trainable_parameters(model)
    zero3 = any(_is_zero3(p) for _, p in params)
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
                grad = p.grad if p.grad is not None else torch.zeros(_full_shape(p), device=p.device)
                grad = grad.detach().to("cpu", torch.float32) * grad_scale  # a new tensor
                if name in sums:
                    sums[name] += grad
                else:
                    sums[name] = grad
        if batches and (direct or zero3):
            for name, p in params:
                if zero3:
                    from deepspeed.utils import safe_get_local_grad

                    grad = safe_get_local_grad(p).reshape(-1)[: _zero3_range(p)[1]]  # a view of DeepSpeed's buffer
                elif name in folded:
                    grad = folded.pop(name)
                else:
                    grad = p.grad if p.grad is not None else torch.zeros(_full_shape(p), device=p.device)
                    p.grad = None  # the summed gradient is ours now
                grad = grad.detach().to("cpu" if to_cpu else grad.device, torch.float32, copy=zero3)
                sums[name] = grad.mul_(grad_scale) if grad_scale != 1 else grad
    finally:
        _zero_grads(model)
        model.train(was_training)
    if not batches:
        raise ValueError("accumulate_gradients: the loader gave no batch")
    return sums


def build_mask(
    model,
    method,
    ratio,
    grad_forget=None,
    grad_retain=None,
    gamma=1e-6,
    seed=0,
    chunk_size=2**24,
    device=None,
    consume=False,
):
    """The phase-1 mask of ``method`` (MASK_METHODS) over the model's trainable parameters; scores go to
    ``device`` (default: where they are computed). ``consume=True`` empties the gradient dicts as the scores are
    made, so scores and gradient sums never coexist in full (peak: model + the two sums)."""
    named = trainable_parameters(model)
    if method == "dense":
        return {n: torch.ones(_full_shape(p), dtype=torch.bool, device=device) for n, p in named}
    if method == "random":
        return top_ratio_mask(random_scores({n: _full_shape(p) for n, p in named}, seed), ratio, chunk_size)
    if method not in ("wagle", "snip", "magnitude"):
        raise ValueError(f"mask method {method!r}; valid: {', '.join(MASK_METHODS)}")
    if (method != "magnitude" and grad_forget is None) or (method == "wagle" and grad_retain is None):
        raise ValueError(
            f"mask method {method!r} needs the forget{' and retain' if method == 'wagle' else ''} gradient sums"
        )
    if any(_is_zero3(p) for _, p in named):
        raise ValueError("build_mask needs whole parameters; under ZeRO-3 WAGLETrainer scores each rank's pieces")
    scores = {}
    for name, p in named:
        one = {name: p.detach()}
        if consume and method == "wagle" and grad_retain[name].dtype == torch.float32:
            # in place in the retain sum, which is consumed anyway: no parameter-sized temporaries
            s = {name: _attribution_scores_(grad_retain.pop(name), p.detach(), grad_forget[name], gamma)}
        elif method == "wagle":
            s = attribution_scores(one, {name: grad_forget[name]}, {name: grad_retain[name]}, gamma)
        elif method == "snip":
            s = snip_scores(one, {name: grad_forget[name]})
        else:
            s = magnitude_scores(one)
        scores[name] = s[name].to(device)  # scores are new tensors (abs), never views of a gathered parameter
        if consume:
            for sums in (grad_forget, grad_retain):
                if sums is not None:
                    sums.pop(name, None)
    return top_ratio_mask(scores, ratio, chunk_size)


def apply_gradient_mask(model, mask):
    """Zero the gradients of masked-out entries (``p.grad`` of plain, DDP models). Call after clipping, before
    ``optimizer.step()``; a trainable parameter with a gradient but no mask entry is an error."""
    for name, p in trainable_parameters(model):
        if p.grad is None:
            continue
        if name not in mask:
            raise KeyError(f"no mask for parameter {name!r}")
        p.grad.masked_fill_(~mask[name].to(p.grad.device), 0)


def partition_masks(engine, mask):
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


def install_partition_mask(engine, mask):
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


def mask_density(mask):
    """Fraction of entries updated (True), for logging."""
    total = sum(m.numel() for m in mask.values())
    return sum(int(m.sum()) for m in mask.values()) / max(total, 1)


def save_mask(mask, path, metadata=None):
    """Write the mask as bool safetensors, atomically (temporary file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save_file

    tensors = {n: m.detach().to("cpu", torch.bool).contiguous() for n, m in mask.items()}
    write_atomic(
        path, lambda tmp: save_file(tensors, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    )


def load_mask(path, reference=None, device="cpu"):
    """Read a saved mask (names sorted); with ``reference`` checked by ``check_mask``."""
    from safetensors.torch import load_file

    mask = load_file(str(path), device=str(device))
    return mask if reference is None else check_mask(mask, reference, path)


def check_mask(mask, reference, source):
    """``mask`` in the order of ``reference`` (a model, or {name: tensor or shape}) after checking that it has exactly
    the reference's (trainable) parameter names and shapes and bool entries, else one ValueError naming them."""
    if isinstance(reference, torch.nn.Module):
        shapes = {n: _full_shape(p) for n, p in trainable_parameters(reference)}
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


# ----------------------------------------------------------------------------------------------- data side

# PO targets. The official code reads a file of polite refusals (``files/data/polite_refusal_responses``, not copied
# here); this fixed list stands in for it: forget row i is answered with REFUSALS[i % len(REFUSALS)], so the targets
# are the same on every run.
REFUSALS = (
    "I'm sorry, but I don't have any information about that.",
    "I'm not able to answer that question.",
    "I don't know anything about that.",
    "That is not something I can help with.",
    "I'm afraid I can't say.",
    "I have no knowledge of that.",
    "Sorry, I cannot provide that information.",
    "I'd rather not answer that.",
)
_FIELDS = ("input_ids", "attention_mask", "labels")


def encode_example(tokenizer, prompt, completion=None, max_length=512, prompt_template="{prompt}"):
    """{"input_ids", "labels"} of one example, labels -100 on the prompt. Conversational rows go through the chat
    template (prompt and answer tokenized apart, as TRL does); plain strings are ``prompt_template`` + completion +
    EOS; a text row (``completion`` None) is all target. Cut to ``max_length`` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if isinstance(prompt, list):
        head_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(head_text):
            raise ValueError("the chat template renders the prompt differently inside the whole conversation")
        head = tokenizer(head_text, add_special_tokens=False)["input_ids"]
        tail = tokenizer(full[len(head_text) :], add_special_tokens=False)["input_ids"]
    elif completion is None:
        head, tail = [], tokenizer(prompt)["input_ids"] + eos
    else:
        head = tokenizer(prompt_template.format(prompt=prompt))["input_ids"]
        tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
    ids, labels = (head + tail)[:max_length], ([-100] * len(head) + tail)[:max_length]
    if all(label == -100 for label in labels[1:]):
        raise ValueError(f"an example has no answer token within max_length={max_length}; raise max_length")
    return {"input_ids": ids, "labels": labels}


def encode_row(tokenizer, row, max_length=512, prompt_template="{prompt}", answer=None):
    """``encode_example`` of a dataset row ({prompt, completion} or {text}); ``answer`` replaces the completion
    (a plain string, wrapped as an assistant message for conversational rows)."""
    if "prompt" not in row or "completion" not in row:
        if answer is not None:
            raise ValueError("refusal answers need {prompt, completion} rows, not {text}")
        return encode_example(tokenizer, row["text"], None, max_length)
    completion = (
        row["completion"]
        if answer is None
        else ([{"role": "assistant", "content": answer}] if isinstance(row["prompt"], list) else answer)
    )
    return encode_example(tokenizer, row["prompt"], completion, max_length, prompt_template)


def collate(rows, pad_id, prefix=""):
    """Right-padded {"input_ids", "attention_mask", "labels"} from the rows' ``prefix``-ed token lists."""
    length = max(len(r[prefix + "input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r[prefix + "input_ids"])
        ids[i, :n], labels[i, :n], attention[i, :n] = (
            torch.tensor(r[prefix + "input_ids"]),
            torch.tensor(r[prefix + "labels"]),
            1,
        )
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def stream_indices(n, seed, start, count):
    """Positions start .. start+count-1 of the endless retain order perm_0 + perm_1 + ..., where perm_c is
    ``torch.randperm(n)`` seeded with seed + c: a pure function of the position, so a resumed run (or another rank)
    finds its retain rows from a counter alone."""
    out, position = [], start
    while len(out) < count:
        cycle, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + cycle))
        take = perm[offset : offset + count - len(out)].tolist()
        out += take
        position += len(take)
    return out


# ----------------------------------------------------------------------------------------------- trainer


def _pieces(batches, size):
    """(piece of ``size`` rows, answer tokens of its whole batch) for every batch: see ``_piece_loss``."""
    for batch in batches:
        tokens = (batch["labels"][:, 1:] != -100).sum()
        for i in range(0, batch["input_ids"].size(0), size):
            yield {k: v[i : i + size] for k, v in batch.items()}, tokens


def _piece_loss(model, item):
    # token-sum CE of the piece / answer tokens of its batch: the pieces' gradients add up to the gradient of the
    # batch's token-mean CE (HF's ``outputs.loss``), with the activations of one piece
    piece, tokens = item
    logits = model(input_ids=piece["input_ids"], attention_mask=piece["attention_mask"]).logits[:, :-1]
    labels = piece["labels"][:, 1:]
    return (
        F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        / tokens
    )


class _MaskAfterClipping(TrainerCallback):
    """clip -> mask -> step. transformers 5.24 ``Trainer._run_epoch`` (trainer.py L1936-1944) runs
    ``_clip_grad_norm`` (clips in place, returns the unmasked pre-clip norm), ``_get_grad_norm``, then
    ``callback_handler.on_pre_optimizer_step``, then ``self.optimizer.step()``: this hook sees the clipped grads."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.mask is not None and not self.trainer.is_deepspeed_enabled:  # DeepSpeed: install_partition_mask
            apply_gradient_mask(self.trainer.model, self.trainer.mask)  # the bare model: DDP's reduced p.grad


class WAGLETrainer(MethodStateMixin, Trainer):
    """Masked unlearning on paired (forget, retain) batches (module docstring). The Trainer iterates the forget set
    (its sampler, sharding and resume skipping); micro-step k of rank r takes retain rows (k * world + r) * B ...
    of ``stream_indices`` (B = per_device_train_batch_size), and the counter k is saved in every checkpoint."""

    loss_is_scaled_for_ga = False  # compute_loss gives per-batch means: the Trainer divides by the accumulation steps

    def __init__(
        self,
        model,
        args,
        train_dataset,
        retain_dataset,
        processing_class,
        eval_dataset=None,
        peft_config=None,
        **kwargs,
    ):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from transformers.integrations import is_deepspeed_zero3_enabled

        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
        tokenizer = processing_class
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        ref = None
        if args.objective == "npo":  # ZeRO-3 partitions weights as they load: load the reference, don't copy a shard
            ref = (
                (
                    AutoModelForCausalLM.from_pretrained(model.config._name_or_path, **(args.model_init_kwargs or {}))
                    if is_deepspeed_zero3_enabled()
                    else copy.deepcopy(model)
                )
                .eval()
                .requires_grad_(False)
            )
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        enc = dict(tokenizer=tokenizer, max_length=args.max_length, prompt_template=args.prompt_template)
        self.forget_rows = []
        for i, row in enumerate(train_dataset):
            item = encode_row(row=row, **enc)
            if args.objective == "po":
                item.update(
                    {
                        f"refusal_{k}": v
                        for k, v in encode_row(row=row, answer=REFUSALS[i % len(REFUSALS)], **enc).items()
                    }
                )
            self.forget_rows.append(item)
        self.retain_rows = [encode_row(row=row, **enc) for row in retain_dataset]
        if not self.forget_rows or not self.retain_rows:
            raise ValueError("WAGLE needs a non-empty forget set and retain set")
        if eval_dataset is not None:
            eval_dataset = Dataset.from_list([encode_row(row=row, **enc) for row in eval_dataset])
        super().__init__(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(self.forget_rows),
            eval_dataset=eval_dataset,
            data_collator=self._collate,
            processing_class=tokenizer,
            **kwargs,
        )
        if self.is_fsdp_enabled:
            raise ValueError(
                "WAGLE masks the gradients between clipping and the optimizer step, which FSDP does not "
                "expose: run it with DDP (accelerate_configs/multi_gpu.yaml) or DeepSpeed (zero1/2/3.yaml)"
            )
        if ref is not None and self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            ref = prepare_deepspeed(ref, self.accelerator)  # an inference engine (ZeRO-3: partitioned like the policy)
        self.ref_model = ref.to(self.args.device) if ref is not None and not self.is_deepspeed_enabled else ref
        self.mask, self.mask_info, self.micro_step = None, {}, 0
        self._stream_seed = args.data_seed if args.data_seed is not None else args.seed
        self._metrics = {}
        self.add_callback(_MaskAfterClipping(self))

    def _collate(self, rows):
        pad = self.processing_class.pad_token_id
        batch = collate(rows, pad)
        if "refusal_input_ids" in rows[0]:
            batch.update({f"refusal_{k}": v for k, v in collate(rows, pad, "refusal_").items()})
        return batch

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # already tokenized; the refusal columns must reach the collator

    def retain_batch(self, position):
        """The retain batch that starts at ``position`` of the retain stream."""
        rows = stream_indices(len(self.retain_rows), self._stream_seed, position, self.args.per_device_train_batch_size)
        return collate([self.retain_rows[i] for i in rows], self.processing_class.pad_token_id)

    # --- phase 1: the mask, before DDP or ZeRO-1/2 wraps the model, through the engine under ZeRO-3 -------------

    def _zero3(self):
        from transformers.integrations import is_deepspeed_zero3_enabled

        return self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if not self._zero3():  # the parameters are whole: phase 1 on the bare model
            if self.is_deepspeed_enabled:
                self.model.to(self.args.device)  # the Trainer leaves it where it loaded until deepspeed.initialize
            self.setup_mask()
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self._zero3():  # partitioned as they loaded: phase 1 runs through the engine
            self.setup_mask()
        if self.is_deepspeed_enabled:
            self._mask_hooks = install_partition_mask(model, self.mask)
        return model, train_dataloader

    def setup_mask(self):
        """The mask restored from a checkpoint (``load_method_state``), or ``mask_path``, or built (phase 1); same on
        every rank; placed next to the parameters and saved into output_dir."""
        args, model = self.args, self.model
        restored = self.mask is not None
        if restored:
            mask, source = self.mask, self.mask_info["source"]
        elif args.mask_path:
            mask, source = load_mask(args.mask_path, model), args.mask_path
        else:
            grad_forget = grad_retain = None
            if args.mask_method in ("wagle", "snip"):
                forget, retain = self.attribution_batches()
                grad_forget = self.gradient_sums(forget)
                grad_retain = self.gradient_sums(retain) if args.mask_method == "wagle" else None
            if self._zero3():
                mask = self._zero3_mask(grad_forget, grad_retain)
            else:
                mask = build_mask(
                    model,
                    args.mask_method,
                    args.mask_ratio,
                    grad_forget,
                    grad_retain,
                    args.gamma,
                    args.mask_seed,
                    args.mask_chunk_size,
                    consume=True,
                )
            source = "phase 1"
        # next to the parameters; under DeepSpeed on the host (install_partition_mask copies each rank's part)
        devices = {n: "cpu" if self.is_deepspeed_enabled else p.device for n, p in trainable_parameters(model)}
        mask = {n: m.to(devices[n]) for n, m in mask.items()}
        if self.accelerator.num_processes > 1 and not restored:  # rank 0's mask, bit for bit, on every rank
            for name, m in mask.items():
                as_bytes = m.to(self.accelerator.device, torch.uint8)  # NCCL broadcasts device tensors only
                torch.distributed.broadcast(as_bytes, src=0)
                mask[name] = as_bytes.bool().to(devices[name])
        self.mask = mask
        self.mask_info = {
            "method": args.mask_method,
            "ratio": args.mask_ratio,
            "gamma": args.gamma,
            "objective": args.objective,
            "density": mask_density(mask),
            "source": source,
        }
        if args.should_save:
            save_mask(mask, Path(args.output_dir) / MASK_FILE, self.mask_info)

    def attribution_batches(self):
        """This rank's (forget, retain) batches of phase 1: global batch j holds forget rows j*B ... (dataset order)
        and retain stream positions j*B ...; rank r takes j = r, r + world, ... (all J = ceil(n/B), or
        ``attribution_batches``), so the summed gradients are those of one process over the same J batches."""
        size, world, rank = (
            self.args.per_device_train_batch_size,
            self.accelerator.num_processes,
            self.accelerator.process_index,
        )
        total = math.ceil(len(self.forget_rows) / size)
        if self.args.attribution_batches > 0:
            total = min(total, self.args.attribution_batches)
        prefix = "refusal_" if self.args.objective == "po" else ""  # official snip_advanced_CL: the refusal CE
        pad = self.processing_class.pad_token_id
        forget = [collate(self.forget_rows[j * size : (j + 1) * size], pad, prefix) for j in range(rank, total, world)]
        retain = [self.retain_batch(j * size) for j in range(rank, total, world)]
        return forget, retain

    def gradient_sums(self, batches):
        """accumulate_gradients over this rank's batches, all-reduced (summed) over the ranks. ZeRO-3: summed by
        DeepSpeed, and each rank gets its own flat pieces of the sums (``_zero3_range``)."""
        if self._zero3():
            return self._zero3_gradient_sums(batches)
        model, micro = self.model, self.args.attribution_micro_batch
        if batches and micro:
            sums = accumulate_gradients(
                model,
                _pieces((self._prepare_inputs(b) for b in batches), micro),
                loss_fn=_piece_loss,
                to_cpu=self.args.keep_grads_on_cpu,
            )
        elif batches:
            sums = accumulate_gradients(
                model, (self._prepare_inputs(b) for b in batches), to_cpu=self.args.keep_grads_on_cpu
            )
        else:  # fewer global batches than ranks: this rank adds zeros
            device = "cpu" if self.args.keep_grads_on_cpu else self.args.device
            sums = {n: torch.zeros(_full_shape(p), device=device) for n, p in trainable_parameters(model)}
        for t in sums.values():
            t.copy_(sum_over_ranks(t))
        return sums

    def _zero3_gradient_sums(self, batches):
        # every rank must run as many forward/backward passes as the others (each pass gathers the layers from all
        # ranks): this rank's pieces, then zero-weight passes up to the largest count; DeepSpeed averages over ranks
        engine, world, size = self.model_wrapped, self.accelerator.num_processes, self.args.per_device_train_batch_size
        items = [
            (piece, tokens, 1.0)
            for piece, tokens in _pieces(
                (self._prepare_inputs(b) for b in batches), self.args.attribution_micro_batch or size
            )
        ]
        count = torch.tensor(len(items), device=self.accelerator.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        if not items:  # fewer global batches than ranks: zero-weight passes on a forget row
            row = self._prepare_inputs(collate(self.forget_rows[:1], self.processing_class.pad_token_id))
            items = [(*next(_pieces([row], 1)), 0.0)]
        filler = (*items[0][:2], 0.0)
        items += [filler] * (int(count) - len(items))
        return accumulate_gradients(
            engine,
            items,
            lambda model, item: _piece_loss(model, item[:2]) * item[2],
            to_cpu=self.args.keep_grads_on_cpu,
            grad_scale=world,
            backward=lambda loss: engine.backward(loss, scale_wrt_gas=False),
        )

    def _zero3_mask(self, grad_forget, grad_retain):
        # phase 1 without whole parameters or sums: each rank scores its own pieces (fp32 master weights, official
        # formulas), the threshold and tie order are global (top_ratio_mask over shards), then the mask pieces are
        # all-gathered into whole masks (1 byte per weight, on the host)
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_fp32_param

        args, world = self.args, self.accelerator.num_processes
        named = trainable_parameters(self.model)
        if any(p._z3_optimizer._get_param_partition_world_size(p) != world for _, p in named):
            raise NotImplementedError(
                "WAGLE's ZeRO-3 phase 1 needs every parameter partitioned over all ranks "
                "(no MiCS or hpZ secondary partitions)"
            )
        g, scores = torch.Generator().manual_seed(args.mask_seed), {}
        for name, p in named:
            start, length = _zero3_range(p)
            theta = safe_get_local_fp32_param(p).reshape(-1)[:length]
            if args.mask_method == "wagle":
                scores[name] = _attribution_scores_(grad_retain.pop(name), theta, grad_forget.pop(name), args.gamma)
            elif args.mask_method == "snip":
                gf = grad_forget.pop(name)
                scores[name] = gf.mul_(theta.to(gf.device)).abs_()
            elif args.mask_method == "magnitude":
                scores[name] = theta.abs()
            elif args.mask_method == "random":  # the draws of random_scores, whole tensors in order, then this piece
                scores[name] = torch.rand(_full_shape(p), generator=g).reshape(-1)[start : start + length].clone()
            else:  # dense
                scores[name] = torch.ones(length)
        pieces = top_ratio_mask(
            scores,
            1.0 if args.mask_method == "dense" else args.mask_ratio,
            args.mask_chunk_size,
            group=dist.group.WORLD,
        )
        mask = {}
        for name, p in named:
            mine = torch.zeros(p.partition_numel(), dtype=torch.uint8, device=self.accelerator.device)
            mine[: pieces[name].numel()] = pieces[name].to(mine.device)
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine, group=p._z3_optimizer._get_param_partition_group(p))
            mask[name] = torch.cat(parts)[: p.ds_numel].view(_full_shape(p)).bool().cpu()
        return mask

    # --- phase 2: the unlearning step --------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        retain = self.retain_batch((self.micro_step * world + rank) * self.args.per_device_train_batch_size)
        self.micro_step += 1
        return super().training_step(
            model, {**inputs, **{f"retain_{k}": v for k, v in retain.items()}}, num_items_in_batch
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args

        def part(prefix):
            return {k: inputs[prefix + k] for k in _FIELDS}

        if "retain_input_ids" not in inputs:  # evaluation batches: the plain CE
            outputs = model(**part(""))
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        forget = part("refusal_" if args.objective == "po" else "")
        forget_ce, retain_ce = model(**forget).loss, model(**part("retain_")).loss
        if args.objective == "graddiff":
            loss = graddiff_loss(forget_ce, retain_ce, args.retain_weight)
        elif args.objective == "npo":
            with torch.no_grad():
                ref_ce = self.ref_model(**forget).loss
            loss = npo_loss(forget_ce, ref_ce, retain_ce, args.npo_beta, args.retain_weight)
        else:
            loss = po_loss(forget_ce, retain_ce, args.retain_weight)
        for key, value in (("forget_loss", forget_ce), ("retain_loss", retain_ce)):  # po: forget_loss is the refusal CE
            self._metrics.setdefault(key, []).append(self.accelerator.gather(value.detach().float()).mean().item())
        return (loss, None) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training log: the method's metrics since the last one
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._metrics.items() if v}}
            if self.mask is not None:
                logs["mask_density"] = self.mask_info["density"]
            self._metrics = {}
        super().log(logs, start_time)

    # --- method state (method_state.MethodStateMixin) -------------------------------------------------------

    def method_state(self):
        """The mask (bool, on the host) and the retain-stream position: a resumed run continues both."""
        if self.mask is None:
            return None
        return {
            "mask": {n: m.to("cpu") for n, m in self.mask.items()},
            "mask_info": dict(self.mask_info),
            "micro_step": self.micro_step,
        }

    def load_method_state(self, state):
        self.mask = check_mask(state["mask"], self.model, "of the checkpoint")
        self.mask_info = dict(state["mask_info"])  # how the mask was made (phase 1, a mask_path), not where it was read
        self.micro_step = int(state["micro_step"])
