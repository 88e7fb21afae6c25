"""Weight Compander ("WC-like"): every weight of a Linear layer reparameterised as w = WC(v), bounded and expansive.

Paper: E. Cakaj, J. Mehnert, B. Yang, "Weight Compander: A Simple Weight Reparameterization for Regularization",
arXiv 2306.16993, 2023 (Bosch). No official code was found. Only the abstract was available here, so the exact
closed form of the compander and its defaults are NOT the paper's: this is a **WC-like** reconstruction that keeps
the properties the abstract states and nothing more:

- the trained parameter is v; the layer uses w = WC(v), an odd, monotone function;
- it saturates, |w| < bound: no single weight can dominate;
- its slope at 0 is > 1, which pushes small weights away from zero ("more democratic" use of weights);
- its hyper-parameters can be learned jointly with the weights.

The form used here (reconstruction): WC(v) = bound * tanh(slope * v / bound), with learnable, constrained
per-layer parameters bound = softplus(rho) > 0 and slope = 1 + softplus(sigma) > 1. The stored v is initialised
with ``right_inverse`` so that the effective weights start equal to the layer's weights (clipped into
(-bound, bound)): a pretrained model computes the same function when the compander is attached.

It is a ``torch.nn.utils.parametrize`` parametrisation (``Compander``), so it works on any ``nn.Linear``:

- ``apply_weight_compander(model, modules, ...)`` attaches it; in LLM recipes the keys
  ``weight_compander_modules`` (``all-linear`` or a list of module names, as peft's ``target_modules``),
  ``weight_compander_bound`` (an absolute bound) or ``weight_compander_bound_scale`` (bound = scale x the layer's
  initial max |w|; default), ``weight_compander_slope`` and ``weight_compander_learnable`` do it
  (``attach_weight_compander``).
- With LoRA (``use_peft``) the compander wraps the adapters' A and B matrices of the named layers, the weights that
  train, and leaves the frozen base weights as they are (companding a frozen base would change the pretrained
  model and train nothing). B starts at zero, so its bound comes from ``bound_scale / sqrt(in_features)`` unless
  ``weight_compander_bound`` is given.
- Saving: every saved folder (checkpoints and the final model) holds the companded weights baked in as plain
  ``weight`` tensors, so ``AutoModelForCausalLM.from_pretrained`` (or peft's adapter loading) reads it as any
  other model; the stored v and each layer's rho and sigma go in ``method_state.pt``, from which ``--resume``
  restores them exactly.
- Tested on one process (CPU). Under DeepSpeed ZeRO-3 or FSDP the sharded weights are not gathered for the
  parametrisation; that combination is untested.

The digits experiment (``WeightCompanderTrainer``, ``posttrain train weight_compander/digits_wc``): scikit-learn's
bundled digits with 300 training images, an MLP 64-256-256-10, AdamW 1e-3, weight decay 1e-4, 150 epochs of
minibatches of 100 (450 steps); baseline against WC-like with learnable bound and slope (initial bound 0.25, slope
2). A step is
one minibatch. Weight decay is AdamW's decoupled decay: with torch's ``Adam(weight_decay=...)`` (an L2 term in the
gradient) Adam's normalisation turns the decay of the weights of the always-blank digit pixels, which get no
data gradient, into lr-sized steps to zero in both arms, and that dominates the near-zero-weight statistic
(measured: 16.7% of the baseline's and 18.8% of WC's weights near zero; EXPERIMENTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from posttrain.key_groups import module_names, pop_prefixed_keys
from posttrain.trainers.classic.base import AuxConfig, AuxTrainer, run_arms


@dataclass
class WeightCompanderConfig(AuxConfig, max_steps=450, eval_every=50, output_dir="runs/weight_compander"):
    """A step is one minibatch (the default 450 = 150 epochs of 300 images in minibatches of 100)."""

    compander: bool = field(
        default=True,
        metadata={
            "help": "Reparameterise every Linear weight as bound*tanh(slope*v/bound) "
            "(the WC-like arm); false: the plain baseline."
        },
    )
    bound: float = field(default=0.25, metadata={"help": "Initial bound of |w| (per layer, learnable)."})
    slope: float = field(default=2.0, metadata={"help": "Initial slope at 0 (> 1, per layer, learnable)."})
    learnable: bool = field(default=True, metadata={"help": "Learn bound and slope jointly with the weights."})
    train_size: int = field(
        default=300, metadata={"help": "Training images drawn from digits (the rest is the test set)."}
    )
    hidden: int = field(default=256, metadata={"help": "Width of the two hidden layers."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(
        default=1e-4,
        metadata={"help": "AdamW (decoupled) weight decay on the weights v, both arms; none on bound and slope."},
    )
    decoupled_weight_decay: bool = field(
        default=True,
        metadata={"help": "AdamW's decoupled decay; false: torch Adam's L2 weight_decay (see the module docstring)."},
    )
    batch_size: int = field(default=100, metadata={"help": "Minibatch size."})

    def __post_init__(self):
        self.require_at_least(1, "hidden", "batch_size")
        if not 10 <= self.train_size <= 1500:
            raise ValueError(
                f"train_size must be in [10, 1500] (digits has 1797 images; the rest is the test set), "
                f"got {self.train_size!r}"
            )
        check_bound_slope(self.bound, self.slope)
        self.require_positive("learning_rate")
        self.require_non_negative("weight_decay")
        super().__post_init__()


def check_bound_slope(bound: float | None, slope: float) -> None:
    if bound is not None and not (isinstance(bound, (int, float)) and bound > 0 and math.isfinite(bound)):
        raise ValueError(f"bound must be a number > 0, got {bound!r}")
    if not (isinstance(slope, (int, float)) and slope > 1 and math.isfinite(slope)):
        raise ValueError(f"slope must be a number > 1 (the compander expands near 0), got {slope!r}")


# --- pure math ------------------------------------------------------------------------------------------------


def compand(v: torch.Tensor, bound: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """WC(v) = bound * tanh(slope * v / bound): odd, monotone, |WC| < bound, WC'(0) = slope."""
    return bound * torch.tanh(slope * v / bound)


def compand_inverse(w: torch.Tensor, bound: torch.Tensor, slope: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A v with WC(v) = w, w clipped into (-bound, bound) first (atanh is infinite at the bound)."""
    return bound / slope * torch.atanh((w / bound).clamp(-1 + eps, 1 - eps))


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y > 0 (log(expm1(y)), stable for large y)."""
    return y + math.log(-math.expm1(-y))


def weight_stats(weights: list[torch.Tensor]) -> dict:
    """max |w| and the fraction of near-zero weights (|w| < 1e-2 std(w)) over all the given weights together."""
    w = torch.cat([t.detach().reshape(-1) for t in weights]).double()
    return {
        "max_abs_w": float(w.abs().max()),
        "near_zero_frac": float((w.abs() < 1e-2 * w.std()).double().mean()),
        "std_w": float(w.std()),
    }


class Compander(nn.Module):
    """The parametrisation: ``forward(v)`` is the weight the layer uses; rho and sigma are this layer's theta."""

    def __init__(self, bound: float, slope: float, learnable: bool = True):
        super().__init__()
        check_bound_slope(bound, slope)
        self.rho = nn.Parameter(torch.tensor(inverse_softplus(bound)), requires_grad=learnable)
        self.sigma = nn.Parameter(torch.tensor(inverse_softplus(slope - 1.0)), requires_grad=learnable)

    @property
    def bound(self) -> torch.Tensor:
        return F.softplus(self.rho)

    @property
    def slope(self) -> torch.Tensor:
        return 1.0 + F.softplus(self.sigma)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return compand(v, self.bound.to(v.dtype), self.slope.to(v.dtype))

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return compand_inverse(w.float(), self.bound, self.slope).to(w.dtype)


def _matches(name: str, modules) -> bool:
    if modules == "all-linear":
        return True
    return any(name == m or name.endswith("." + m) for m in modules)


def companded_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: module}`` of the Linear layers whose weight carries a ``Compander``."""
    return {
        name: m
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], Compander)
    }


def apply_weight_compander(
    model: nn.Module,
    modules: str | Sequence[str] = "all-linear",
    bound: float | None = None,
    bound_scale: float = 2.0,
    slope: float = 2.0,
    learnable: bool = True,
    exclude: Sequence[str] = ("lm_head", "score"),
) -> list[str]:
    """Attach a ``Compander`` to the weight of every matching ``nn.Linear`` (a name in ``modules`` or
    ``"all-linear"``; ``exclude`` names are skipped, like peft's all-linear skips the output head). With peft LoRA
    layers the adapters' A and B are companded instead of the base weight. Returns the companded module names.

    The bound is ``bound`` when given, else ``bound_scale`` x the layer's initial max |w| (1/sqrt(in_features) for an
    all-zero weight such as LoRA's B).
    """
    is_lora = lambda m: isinstance(getattr(m, "lora_A", None), nn.ModuleDict)  # noqa: E731 - a peft LoRA layer
    lora = any(is_lora(m) for m in model.modules())
    names = []
    targets = []
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short in exclude or not _matches(name, modules):
            continue
        if lora:  # a LoRA model: the adapters of the matching LoRA layers, never a frozen Linear
            if is_lora(module):
                for adapter in module.lora_A:
                    targets += [
                        (f"{name}.lora_A.{adapter}", module.lora_A[adapter]),
                        (f"{name}.lora_B.{adapter}", module.lora_B[adapter]),
                    ]
        elif isinstance(module, nn.Linear):
            targets.append((name, module))
    for name, module in targets:
        if parametrize.is_parametrized(module, "weight"):
            continue
        w = module.weight.detach()
        b = bound if bound is not None else bound_scale * (float(w.abs().max()) or 1.0 / math.sqrt(w.shape[1]))
        comp = Compander(b, slope, learnable).to(w.device)
        parametrize.register_parametrization(module, "weight", comp)
        names.append(name)
    if not names:
        raise ValueError(f"weight_compander: no Linear layer matches {modules!r}")
    return names


def baked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each companded weight as a plain ``<layer>.weight`` tensor (WC(v) evaluated) and
    the parametrisation entries (v, rho, sigma) left out: what a plain transformers / peft model loads."""
    state = model.state_dict()
    for name, module in companded_layers(model).items():
        prefix = f"{name}.parametrizations.weight."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state[f"{name}.weight"] = module.weight.detach()
    return state


# --- the LLM recipe keys and their wiring ---------------------------------------------------------------------

WC_KEYS = (
    "weight_compander_modules",
    "weight_compander_bound",
    "weight_compander_bound_scale",
    "weight_compander_slope",
    "weight_compander_learnable",
)


@dataclass
class CompanderArgs:
    modules: object = "all-linear"
    bound: float | None = None
    bound_scale: float = 2.0
    slope: float = 2.0
    learnable: bool = True


def parse_weight_compander_keys(
    values: dict, sources: dict, source: str, method: str, task: str
) -> CompanderArgs | None:
    """Pop the ``weight_compander_*`` keys from a recipe's values and check them (nothing loads); ValueError names
    the key and where it was set."""
    popped = pop_prefixed_keys(
        values, sources, source, prefix="weight_compander", names=WC_KEYS, group="Weight Compander"
    )
    if popped is None:
        return None
    given = {k.removeprefix("weight_compander_"): v for k, v in popped.items()}
    where = lambda k: sources.get(f"weight_compander_{k}", source)  # noqa: E731
    if task == "aux":
        raise ValueError(
            f"{where(next(iter(given)))}: weight_compander_* keys apply to LLM recipes; method '{method}' "
            "is an auxiliary trainer (the weight_compander method has its own 'compander' key)"
        )
    if "modules" not in given:
        raise ValueError(
            f"{source}: weight_compander_* keys need weight_compander_modules (all-linear, or a list of "
            "Linear module names such as [q_proj, v_proj])"
        )
    args = CompanderArgs()
    args.modules = module_names(given["modules"], "weight_compander_modules", where("modules"))
    for key in ("bound", "bound_scale", "slope"):
        if key in given:
            value = given[key]
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where(key)}: weight_compander_{key} expects a number, got {given[key]!r}")
            setattr(args, key, float(value))
    if "learnable" in given:
        if not isinstance(given["learnable"], bool):
            raise ValueError(
                f"{where('learnable')}: weight_compander_learnable expects true or false, got {given['learnable']!r}"
            )
        args.learnable = given["learnable"]
    try:
        check_bound_slope(args.bound, args.slope)
        if not args.bound_scale > 0:
            raise ValueError(f"bound_scale must be > 0, got {args.bound_scale!r}")
    except ValueError as err:
        raise ValueError(f"{source}: weight_compander_{err}") from None
    if "bound" in given and "bound_scale" in given:
        raise ValueError(
            f"{where('bound')}: give weight_compander_bound (absolute) or weight_compander_bound_scale "
            "(relative to each layer's max |w|), not both"
        )
    return args


class WeightCompanderCallback:
    """Method state of the compander in an LLM run: each layer's stored v, rho and sigma (``method_state.pt``)."""

    has_method_state = True

    def __init__(self, model: nn.Module):
        self.model = model

    def _layers(self):
        return companded_layers(self.model)

    def method_state(self) -> dict:
        return {
            name: {
                "original": m.parametrizations.weight.original.detach().cpu().clone(),
                "rho": m.parametrizations.weight[0].rho.detach().cpu().clone(),
                "sigma": m.parametrizations.weight[0].sigma.detach().cpu().clone(),
            }
            for name, m in self._layers().items()
        }

    @torch.no_grad()
    def load_method_state(self, state: dict) -> None:
        layers = self._layers()
        if set(state) != set(layers):
            raise ValueError(
                f"the checkpoint's companded layers differ from this run's: saved {len(state)}, "
                f"now {len(layers)}; resume with the same weight_compander_* keys"
            )
        for name, m in layers.items():
            m.parametrizations.weight.original.copy_(state[name]["original"])
            m.parametrizations.weight[0].rho.copy_(state[name]["rho"])
            m.parametrizations.weight[0].sigma.copy_(state[name]["sigma"])


def attach_weight_compander(trainer: Any, args: CompanderArgs) -> list[str]:
    """Compand the recipe's Linear layers of ``trainer.model`` (before ``train()`` builds the optimizer), save baked
    weights, keep v/rho/sigma as method state, and keep rho and sigma out of weight decay."""
    from transformers import TrainerCallback

    model = trainer.model
    try:
        names = apply_weight_compander(model, args.modules, args.bound, args.bound_scale, args.slope, args.learnable)
    except ValueError as err:
        from posttrain import UserError

        raise UserError(str(err)) from None

    callback_cls = type("WeightCompanderCallback", (WeightCompanderCallback, TrainerCallback), {})
    trainer.add_callback(callback_cls(model))
    save = trainer._save

    def _save(output_dir=None, state_dict=None):  # transformers Trainer._save(output_dir, state_dict)
        if state_dict is None:
            state_dict = baked_state_dict(trainer.accelerator.unwrap_model(trainer.model))
        return save(output_dir, state_dict)

    trainer._save = _save
    decay_names = trainer.get_decay_parameter_names

    def get_decay_parameter_names(model):  # the compander's theta is no weight: no decay on it
        return [n for n in decay_names(model) if not n.endswith((".0.rho", ".0.sigma"))]

    trainer.get_decay_parameter_names = get_decay_parameter_names
    trainer.weight_compander = names
    return names


# --- the digits experiment ------------------------------------------------------------------------------------


def digits_split(train_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (offline), pixels scaled to [0, 1]; a seeded train/test split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    tr, te = order[:train_size], order[train_size:]
    return x[tr], y[tr], x[te], y[te]


class WeightCompanderTrainer(AuxTrainer):
    """Digits MLP, baseline or WC-like; one step is one AdamW minibatch step."""

    method = "weight_compander"

    def setup(self) -> None:
        args = self.args
        self.x, self.y, self.x_test, self.y_test = digits_split(args.train_size, args.seed)
        h = args.hidden
        self.model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
        if args.compander:
            apply_weight_compander(
                self.model, "all-linear", bound=args.bound, slope=args.slope, learnable=args.learnable, exclude=()
            )
        theta = [p for n, p in self.model.named_parameters() if n.endswith((".rho", ".sigma"))]
        weights = [p for n, p in self.model.named_parameters() if not n.endswith((".rho", ".sigma"))]
        groups = [{"params": weights, "weight_decay": args.weight_decay}]
        if theta:
            groups.append({"params": theta, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW if args.decoupled_weight_decay else torch.optim.Adam
        self.optimizer = optimizer(groups, lr=args.learning_rate)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.order = torch.empty(0, dtype=torch.long)

    def description(self) -> str:
        return f"weight_compander[{'wc' if self.args.compander else 'baseline'}]"

    def _batch(self):
        bs = self.args.batch_size
        if len(self.order) == 0:
            self.order = torch.randperm(len(self.x), generator=self.generator)
        idx, self.order = self.order[:bs], self.order[bs:]
        return self.x[idx], self.y[idx]

    def training_step(self) -> dict:
        x, y = self._batch()
        self.model.train()
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}

    def effective_weights(self) -> list[torch.Tensor]:
        return [m.weight.detach() for m in self.model if isinstance(m, nn.Linear)]

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        acc = lambda x, y: float((self.model(x).argmax(-1) == y).float().mean())  # noqa: E731
        out = {
            "train_acc": acc(self.x, self.y),
            "test_acc": acc(self.x_test, self.y_test),
            **weight_stats(self.effective_weights()),
        }
        for name, m in companded_layers(self.model).items():
            comp = m.parametrizations.weight[0]
            out[f"bound/{name}"], out[f"slope/{name}"] = comp.bound.item(), comp.slope.item()
        return out

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            **self.minibatch_sgd_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.load_minibatch_sgd_state(state)


def compare_arms(seeds: Iterable[int] = (0, 1, 2, 3, 4), **overrides) -> dict:
    """Baseline and WC-like on the same splits and initial weights per seed -> {arm: [final evaluate() per seed]}."""
    base = overrides.pop("output_dir", WeightCompanderConfig.output_dir)
    arms = {"baseline": {"compander": False}, "wc": {"compander": True}}
    return run_arms(WeightCompanderConfig, WeightCompanderTrainer, arms, seeds, base, **overrides)
