"""Blindspot: deep regression unlearning through a partially trained proxy that never saw the forget set.

Paper: A. K. Tarun, V. S. Chundawat, M. Mandal, M. Kankanhalli, "Deep Regression Unlearning", ICML 2023 (arXiv
2210.08196). Official code: ayushkumartarun/deep-regression-unlearning (``unlearn.py`` and the AgeDB notebook; no
licence seen, nothing copied). Written here from the method's equations:

1. The blindspot (proxy) model B is trained from scratch on the retain set D_r only, and only partially (a few
   epochs): it has never seen the forget set D_f.
2. The original model M is fine-tuned on D_r u D_f with a per-batch loss mixed by the batch's forget fraction c:
       L   = c L_f + (1 - c) L_r
       L_r = L1(M(x), y)                                         on the batch's retain samples
       L_f = L1(M(x), B(x)) + beta_AT sum_l AT(M_l(x), B_l(x))   on the batch's forget samples
       AT(a, b) = mean((n(a^2) - n(b^2))^2)                      attention transfer, n = per-sample L2 normalisation
   For an MLP the "attention map" of a hidden layer is its squared activation vector (there are no spatial
   positions to average channels over); beta_AT = 50 as in the official code.

Baselines (the official notebook's): Gaussian-amnesiac (the forget labels replaced by draws from
N(mean(y_train), std(y_train)), then a fine-tune on the modified full set) and fine-tune (on D_r only). The gold
standard is a model trained from scratch on D_r. Reconstruction notes: every arm here fine-tunes for
``unlearn_epochs`` epochs at a constant Adam learning rate (the notebook's ReduceLROnPlateau and its 1- and 5-epoch
baseline budgets are not reproduced: the arms get the same budget), and the batch size is 32.

The experiment (``posttrain train blindspot/diabetes``): scikit-learn's diabetes (x standardised, y in its original
units), 25 % held out; the forget set is every training sample with y at or below the training 25th percentile (a
contiguous label range, like the paper's AgeDB age <= 30), and the held-out split is divided by the same threshold
into forget-test and retain-test. MLP 10-64-64-1 (ReLU), L1 loss, Adam 1e-3: the original 400 epochs on all of the
training set, gold 400 epochs on D_r, the proxy 30 epochs on D_r, unlearning 40 epochs. A step is one minibatch
of the unlearning fine-tune. The reported ``gap_closed`` = (MAE_f(unl) - MAE_f(orig)) / (MAE_f(gold) - MAE_f(orig)).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer, run_arms

ARMS = ("blindspot", "gaussian_amnesiac", "finetune")


@dataclass
class BlindspotConfig(AuxConfig, max_steps=100_000, eval_every=50, output_dir="runs/blindspot"):
    """A step is one minibatch; max_steps is only a cap, the run stops after unlearn_epochs."""

    arm: str = field(
        default="blindspot",
        metadata={"help": "blindspot (the method), gaussian_amnesiac or finetune (retain only): the baselines."},
    )
    beta_at: float = field(default=50.0, metadata={"help": "Weight of the attention-transfer term in L_f."})
    forget_quantile: float = field(
        default=0.25, metadata={"help": "Forget every training sample with y at or below this quantile of y_train."}
    )
    test_fraction: float = field(default=0.25, metadata={"help": "Held-out share of the data set (seeded split)."})
    hidden: int = field(default=64, metadata={"help": "Width of the MLP's two hidden layers (10-h-h-1)."})
    original_epochs: int = field(default=400, metadata={"help": "Epochs of the original model (and of gold)."})
    proxy_epochs: int = field(default=30, metadata={"help": "Epochs of the partially trained blindspot proxy."})
    unlearn_epochs: int = field(default=40, metadata={"help": "Epochs of the unlearning fine-tune (every arm)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate (all training)."})
    batch_size: int = field(default=32, metadata={"help": "Minibatch size (all training)."})

    def __post_init__(self):
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {', '.join(ARMS)}, got {self.arm!r}")
        if not (self.beta_at >= 0 and math.isfinite(self.beta_at)):
            raise ValueError(f"beta_at must be a finite number >= 0, got {self.beta_at!r}")
        if not 0.05 <= self.forget_quantile <= 0.5:
            raise ValueError(f"forget_quantile must be in [0.05, 0.5], got {self.forget_quantile!r}")
        if not 0.1 <= self.test_fraction <= 0.5:
            raise ValueError(f"test_fraction must be in [0.1, 0.5], got {self.test_fraction!r}")
        self.require_at_least(1, "hidden", "original_epochs", "proxy_epochs", "unlearn_epochs", "batch_size")
        self.require_positive("learning_rate")
        super().__post_init__()


# --- pure math ------------------------------------------------------------------------------------------------


def attention_map(a: torch.Tensor) -> torch.Tensor:
    """n(mean_c a^2): the per-sample L2-normalised attention map. a: (B, C, ...) -> (B, prod spatial); for a
    hidden vector (B, C) there is no spatial axis and the map is the normalised squared activation vector (B, C)."""
    sq = a.square() if a.dim() == 2 else a.square().mean(1).flatten(1)
    return F.normalize(sq, dim=1)


def at_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """AT(a, b) = mean((n(a^2) - n(b^2))^2) over the batch and the map."""
    return (attention_map(a) - attention_map(b)).square().mean()


def blindspot_loss(
    pred: torch.Tensor,
    y: torch.Tensor,
    forget: torch.Tensor,
    proxy_pred: torch.Tensor,
    hidden: list[torch.Tensor],
    proxy_hidden: list[torch.Tensor],
    beta_at: float,
) -> tuple[torch.Tensor, dict]:
    """L = c L_f + (1 - c) L_r for one batch; ``forget`` (B,) bool marks D_f rows, c = its mean.

    pred, y, proxy_pred: (B,); hidden / proxy_hidden: the model's / proxy's hidden activations, each (B, ...).
    A part with no rows in the batch contributes 0 (its weight c or 1 - c is 0 too).
    """
    c = forget.float().mean()
    zero = pred.new_zeros(())
    retain = ~forget
    l_r = F.l1_loss(pred[retain], y[retain]) if retain.any() else zero
    if forget.any():
        l_out = F.l1_loss(pred[forget], proxy_pred[forget])
        l_at = sum((at_loss(h[forget], p[forget]) for h, p in zip(hidden, proxy_hidden)), zero)
    else:
        l_out = l_at = zero
    l_f = l_out + beta_at * l_at
    loss = c * l_f + (1 - c) * l_r
    parts = {"loss": loss, "L_r": l_r, "L_f": l_f, "AT": l_at, "c": c}
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def gaussian_amnesiac_labels(y_train: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """The Gaussian-amnesiac baseline's forget labels: n draws from N(mean(y_train), std(y_train))."""
    return y_train.mean() + y_train.std() * torch.randn(n, generator=generator, dtype=y_train.dtype)


def gap_closed(mae_unl: float, mae_orig: float, mae_gold: float) -> float:
    """(MAE_f(unl) - MAE_f(orig)) / (MAE_f(gold) - MAE_f(orig)): 0 the original, 1 gold (NaN without a gap)."""
    gap = mae_gold - mae_orig
    return (mae_unl - mae_orig) / gap if gap != 0 else math.nan


# --- data and models ------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """10-h-h-1 ReLU regressor whose ``forward_hidden`` also returns the two hidden activations (the AT layers)."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)

    def forward_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h1 = torch.relu(self.l1(x))
        h2 = torch.relu(self.l2(h1))
        return self.out(h2).squeeze(-1), [h1, h2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_hidden(x)[0]


def diabetes_split(seed: int, test_fraction: float, forget_quantile: float) -> dict:
    """Diabetes (offline), x standardised with training statistics, y in original units; forget = y <= threshold."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    te, tr = order[:n_test], order[n_test:]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    x_tr, x_te, y_tr, y_te = t((x[tr] - mu) / sd), t((x[te] - mu) / sd), t(y[tr]), t(y[te])
    threshold = float(np.quantile(y[tr], forget_quantile))
    return {
        "x": x_tr,
        "y": y_tr,
        "forget": y_tr <= threshold,
        "x_test": x_te,
        "y_test": y_te,
        "forget_test": y_te <= threshold,
        "threshold": threshold,
    }


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int, seed: int) -> nn.Module:
    """Adam on the L1 loss, shuffled minibatches (seeded)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            loss = F.l1_loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


@functools.lru_cache(maxsize=8)
def reference_models(
    seed: int,
    test_fraction: float,
    forget_quantile: float,
    hidden: int,
    epochs: int,
    proxy_epochs: int,
    lr: float,
    batch: int,
) -> dict:
    """The original (all of D), gold (D_r, from scratch) and proxy (D_r, partially) models' state_dicts; cached per
    setting so the arms of one experiment start from the same models."""
    d = diabetes_split(seed, test_fraction, forget_quantile)
    retain = ~d["forget"]
    out = {}
    for i, (name, xs, ys, ep) in enumerate(
        (
            ("original", d["x"], d["y"], epochs),
            ("gold", d["x"][retain], d["y"][retain], epochs),
            ("proxy", d["x"][retain], d["y"][retain], proxy_epochs),
        )
    ):
        torch.manual_seed(seed * 1000 + i)
        model = fit(MLP(xs.shape[1], hidden), xs, ys, ep, lr, batch, seed * 1000 + i)
        out[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


# --- the trainer ----------------------------------------------------------------------------------------------


class BlindspotTrainer(AuxTrainer):
    """Unlearning fine-tune of the original model (one arm); one step is one minibatch."""

    method = "blindspot"

    def setup(self) -> None:
        a = self.args
        self.data = d = diabetes_split(a.seed, a.test_fraction, a.forget_quantile)
        refs = reference_models(
            a.seed, a.test_fraction, a.forget_quantile, a.hidden, a.original_epochs, a.proxy_epochs,
            a.learning_rate, a.batch_size,
        )  # fmt: skip
        build = lambda state: MLP(d["x"].shape[1], a.hidden).requires_grad_(False).eval()  # noqa: E731
        self.original, self.gold, self.proxy = build(None), build(None), build(None)
        for model, name in ((self.original, "original"), (self.gold, "gold"), (self.proxy, "proxy")):
            model.load_state_dict(refs[name])
        self.model = copy.deepcopy(self.original).requires_grad_(True).train()
        self.generator = torch.Generator().manual_seed(a.seed + 17)
        x, y, forget = d["x"], d["y"].clone(), d["forget"]
        if a.arm == "gaussian_amnesiac":
            y[forget] = gaussian_amnesiac_labels(d["y"], int(forget.sum()), self.generator)
            forget = torch.zeros_like(forget)  # the modified set is plain regression data
        elif a.arm == "finetune":
            x, y, forget = x[~forget], y[~forget], forget[~forget]
        self.x, self.y, self.forget = x, y, forget
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=a.learning_rate)
        self.order = torch.empty(0, dtype=torch.long)
        self.epoch = 0
        self.reference = {name: self._mae(m) for name, m in (("orig", self.original), ("gold", self.gold))}

    def description(self) -> str:
        return f"blindspot[{self.args.arm}]"

    def _batch(self):
        if len(self.order) == 0:
            self.order = torch.randperm(len(self.x), generator=self.generator)
        idx, self.order = self.order[: self.args.batch_size], self.order[self.args.batch_size :]
        if len(self.order) == 0:
            self.epoch += 1
        return idx

    def training_step(self) -> dict:
        idx = self._batch()
        x, y, forget = self.x[idx], self.y[idx], self.forget[idx]
        pred, hidden = self.model.forward_hidden(x)
        if self.args.arm == "blindspot":
            with torch.no_grad():
                proxy_pred, proxy_hidden = self.proxy.forward_hidden(x)
            loss, info = blindspot_loss(pred, y, forget, proxy_pred, hidden, proxy_hidden, self.args.beta_at)
        else:
            loss = F.l1_loss(pred, y)
            info = {"loss": float(loss.detach())}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return info

    def done(self) -> bool:
        return self.epoch >= self.args.unlearn_epochs

    @torch.no_grad()
    def _mae(self, model: nn.Module) -> dict:
        d = self.data
        err = (model(d["x_test"]) - d["y_test"]).abs()
        return {"mae_f": float(err[d["forget_test"]].mean()), "mae_r": float(err[~d["forget_test"]].mean())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        from scipy.stats import wasserstein_distance  # scipy comes with scikit-learn (pinned in pyproject.toml)

        self.model.eval()
        mae = self._mae(self.model)
        d, orig, gold = self.data, self.reference["orig"], self.reference["gold"]
        xf = d["x_test"][d["forget_test"]]
        self.model.train()
        return {
            **mae,
            "mae_f_orig": orig["mae_f"],
            "mae_r_orig": orig["mae_r"],
            "mae_f_gold": gold["mae_f"],
            "mae_r_gold": gold["mae_r"],
            "gap_closed": gap_closed(mae["mae_f"], orig["mae_f"], gold["mae_f"]),
            "retain_ratio": mae["mae_r"] / orig["mae_r"],
            "wasserstein_to_gold_f": float(wasserstein_distance(self.model(xf).numpy(), self.gold(xf).numpy())),
            "epoch": self.epoch,
        }

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            **self.minibatch_sgd_state(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.load_minibatch_sgd_state(state)
        self.epoch = int(state["epoch"])


def compare_arms(
    seeds: Iterable[int] = (0, 1, 2), arms: Iterable[str] = ARMS, output_dir: str = "runs/blindspot", **overrides
) -> dict[str, list[dict]]:
    """Every arm on the same split and original model per seed -> {arm: [final evaluate() per seed]}."""
    arm_values = {arm: {"arm": arm} for arm in arms}
    return run_arms(BlindspotConfig, BlindspotTrainer, arm_values, seeds, output_dir, expect="criterion", **overrides)
