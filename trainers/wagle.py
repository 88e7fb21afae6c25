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

Scale: the global top-k is an exact radix select that never sorts or concatenates all entries; ties at the threshold
go to the earliest entries in (dict order, row-major) order, i.e. exactly a *stable* descending sort
(``trainers/radix_topk.py``). Gradient sums, the masked step under DDP / ZeRO and the mask files are generic
machinery: ``trainers/gradient_masks.py``; the forget / retain encoding and the retain stream: ``data/unlearning.py``.

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
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from posttrain.data.unlearning import ENCODED_FIELDS, REFUSALS, collate, encode_row, stream_indices
from posttrain.trainers.gradient_masks import (
    accumulate_gradients,
    apply_gradient_mask,
    check_mask,
    check_names,
    full_shape,
    install_partition_mask,
    is_zero3,
    load_mask,
    mask_density,
    save_mask,
    trainable_parameters,
    zero3_range,
)
from posttrain.trainers.method_state import MethodStateMixin
from posttrain.trainers.radix_topk import top_ratio_mask
from posttrain.trainers.runtime import sum_over_ranks
from posttrain.trainers.trl_seam import prepare_deepspeed

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


def attribution_scores(
    params: dict[str, Tensor], grad_forget: dict[str, Tensor], grad_retain: dict[str, Tensor], gamma: float
) -> dict[str, Tensor]:
    """WAGLE scores {name: |(theta - g_r / gamma) * g_f|} in float32, on the device of the forget gradients."""
    check_names(params, grad_forget, "grad_forget")
    check_names(params, grad_retain, "grad_retain")
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


def snip_scores(params: dict[str, Tensor], grad_forget: dict[str, Tensor]) -> dict[str, Tensor]:
    """SNIP baseline {name: |theta * g_f|} (WAGLE without the retain correction)."""
    check_names(params, grad_forget, "grad_forget")
    return {
        n: (t.detach().to(grad_forget[n].device, torch.float32) * grad_forget[n].float()).abs()
        for n, t in params.items()
    }


def magnitude_scores(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Magnitude baseline {name: |theta|}."""
    return {n: t.detach().float().abs() for n, t in params.items()}


def random_scores(shapes: dict[str, Tensor | tuple[int, ...]], seed: int = 0) -> dict[str, Tensor]:
    """Random baseline: U[0, 1) scores from one CPU generator seeded once, tensors drawn in dict order.
    ``shapes`` maps names to shapes or tensors (only their shapes are used), so every rank draws the same."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(tuple(s.shape if isinstance(s, torch.Tensor) else s), generator=g) for n, s in shapes.items()}


def graddiff_loss(forget_ce: Tensor, retain_ce: Tensor, retain_weight: float = 1.0) -> Tensor:
    """GradDiff (official GA+FT): -CE_f + lambda CE_r."""
    return -forget_ce + retain_weight * retain_ce


def npo_forget_term(forget_ce: Tensor, ref_forget_ce: Tensor, beta: float = 0.1) -> Tensor:
    """Official NPO term on batch token-mean CEs: -(2 / beta) log sigmoid(beta (CE_theta - CE_ref))."""
    return -(2.0 / beta) * F.logsigmoid(beta * (forget_ce - ref_forget_ce))


def npo_loss(
    forget_ce: Tensor, ref_forget_ce: Tensor, retain_ce: Tensor, beta: float = 0.1, retain_weight: float = 1.0
) -> Tensor:
    """NPO+FT: the NPO forget term + lambda CE_r."""
    return npo_forget_term(forget_ce, ref_forget_ce, beta) + retain_weight * retain_ce


def po_loss(refusal_ce: Tensor, retain_ce: Tensor, retain_weight: float = 1.0) -> Tensor:
    """PO (official CL+FT): CE of the forget questions with refusal answers + lambda CE_r."""
    return refusal_ce + retain_weight * retain_ce


def build_mask(
    model: nn.Module,
    method: str,
    ratio: float,
    grad_forget: dict[str, Tensor] | None = None,
    grad_retain: dict[str, Tensor] | None = None,
    gamma: float = 1e-6,
    seed: int = 0,
    chunk_size: int = 2**24,
    device: torch.device | str | None = None,
    consume: bool = False,
) -> dict[str, Tensor]:
    """The phase-1 mask of ``method`` (MASK_METHODS) over the model's trainable parameters; scores go to
    ``device`` (default: where they are computed). ``consume=True`` empties the gradient dicts as the scores are
    made, so scores and gradient sums never coexist in full (peak: model + the two sums)."""
    named = trainable_parameters(model)
    if method == "dense":
        return {n: torch.ones(full_shape(p), dtype=torch.bool, device=device) for n, p in named}
    if method == "random":
        return top_ratio_mask(random_scores({n: full_shape(p) for n, p in named}, seed), ratio, chunk_size)
    if method not in ("wagle", "snip", "magnitude"):
        raise ValueError(f"mask method {method!r}; valid: {', '.join(MASK_METHODS)}")
    if (method != "magnitude" and grad_forget is None) or (method == "wagle" and grad_retain is None):
        raise ValueError(
            f"mask method {method!r} needs the forget{' and retain' if method == 'wagle' else ''} gradient sums"
        )
    if any(is_zero3(p) for _, p in named):
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
        DeepSpeed, and each rank gets its own flat pieces of the sums (``zero3_range``)."""
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
            sums = {n: torch.zeros(full_shape(p), device=device) for n, p in trainable_parameters(model)}
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
            start, length = zero3_range(p)
            theta = safe_get_local_fp32_param(p).reshape(-1)[:length]
            if args.mask_method == "wagle":
                scores[name] = _attribution_scores_(grad_retain.pop(name), theta, grad_forget.pop(name), args.gamma)
            elif args.mask_method == "snip":
                gf = grad_forget.pop(name)
                scores[name] = gf.mul_(theta.to(gf.device)).abs_()
            elif args.mask_method == "magnitude":
                scores[name] = theta.abs()
            elif args.mask_method == "random":  # the draws of random_scores, whole tensors in order, then this piece
                scores[name] = torch.rand(full_shape(p), generator=g).reshape(-1)[start : start + length].clone()
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
            mask[name] = torch.cat(parts)[: p.ds_numel].view(full_shape(p)).bool().cpu()
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
            return {k: inputs[prefix + k] for k in ENCODED_FIELDS}

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
