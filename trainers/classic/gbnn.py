"""GBNN: a one-hidden-layer network trained sequentially, unit group by unit group, by gradient boosting.

Paper: S. Emami, G. Martinez-Munoz, "Sequential Training of Neural Networks with Gradient Boosting" (2019; IEEE
Access version 2023). Official code: GAA-UAM/GBNN (LGPL-2.1; built on scikit-learn's MLPRegressor). Nothing is
copied from it: this module is written from the boosting equations below.

Gradient boosting (Friedman 2001) whose base learners are tiny one-hidden-layer networks h_m with u hidden units
(logistic activation). The additive model F_T = F_0 + sum_m eta rho_m h_m *is* one network with T u hidden units.

    F_0 = argmin_c sum_i L(y_i, c)
    for m = 1..T:
        r = -dL/dF at F_{m-1}                              (the pseudo-residuals)
        fit h_m (u units) to r by least squares on a random subsample of the training set
        rho_m = one Newton step of min_rho sum_i L(y_i, F_{m-1} + rho h_m) from rho = 0 (on the whole training
                set: our choice, the formulas do not say which points)
        F_m = F_{m-1} + eta rho_m h_m

- squared:    L = (y - F)^2 / 2,        F_0 = mean y,                            r = y - F,      rho_m = 1
- binary:     L = log(1 + exp(-2 y F)), F_0 = 1/2 log((1 + ybar) / (1 - ybar)),  r = 2y / (1 + exp(2 y F)),
              y in {-1, 1},                                                       rho_m = sum r h / sum h^2 r (2y - r)
- multiclass: L = -log softmax(F)_y,    F_0 = 0,                                 r = Y - softmax(F) (Y one-hot),
                                                                                  rho_m = sum h r / sum h^2 p (1 - p)

(the binary loss is the paper's log-exponential one, so P(y = 1) = sigmoid(2F); the multiclass rho is one scalar per
stage, Newton's step with the Hessian's diagonal summed over samples and classes). The stage nets are fit with Adam
or L-BFGS on mean (h - r)^2 + weight_decay (||W||^2 + ||v||^2).

``to_single_network()`` assembles the one network: the hidden layer stacks every stage's units (W_m, b_m), the
output weights are eta rho_m v_m and the output bias F_0 + sum eta rho_m c_m; for the binary loss the output is
multiplied by 2 so that it is the logit of P(y = 1).

The comparison is a jointly trained MLP with the same T u sigmoid hidden units and the same loss (Adam, full batch).

A failure mode (this project's second experiment): with eta = 0.5, one L-BFGS unit per stage and no weight decay on
diabetes, the test error falls for a few units and then jumps by orders of magnitude. A unit fit without decay on
half the training set can become a steep sigmoid step (input weights of norm ~1e3) with a huge output weight (seed
1's 9th unit: v = -554), near its bias on the points it fits and hundreds away across the step; the squared loss's
rho = 1 takes it in full. Training and test error jump together; later stages bring the training loss back down, on
the training points only, and the test error stays ruined. eta = 0.1 with weight decay 1e-3 in the stage nets
avoids it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer

LOSSES = ("squared", "binary", "multiclass")
DATASETS = {
    "breast_cancer": "binary",
    "diabetes": "squared",
    "digits": "multiclass",
    "wine": "multiclass",
    "iris": "multiclass",
}
STAGE_OPTIMIZERS = ("adam", "lbfgs")
DTYPE = torch.float64


# The defaults are the official repository's (200 one-unit stages, eta 1, subsample 0.5, L-BFGS with 200 iterations,
# logistic units); the recipes hold the experiments' settings.
@dataclass
class GBNNConfig(AuxConfig, max_steps=200, eval_every=1, output_dir="runs/gbnn"):
    """A step is one boosting stage (max_steps is the number of stages T)."""

    dataset: str = field(
        default="breast_cancer",
        metadata={"help": f"scikit-learn data set, one of {', '.join(DATASETS)} (its loss: {DATASETS})."},
    )
    test_fraction: float = field(default=0.3, metadata={"help": "Held-out fraction (stratified for classification)."})
    units_per_stage: int = field(default=1, metadata={"help": "Hidden units u of each stage net."})
    eta: float = field(default=1.0, metadata={"help": "Shrinkage eta of each stage's Newton step."})
    subsample: float = field(default=0.5, metadata={"help": "Fraction of the training set each stage net is fit on."})
    stage_optimizer: str = field(default="lbfgs", metadata={"help": f"One of {', '.join(STAGE_OPTIMIZERS)}."})
    stage_lr: float = field(default=0.05, metadata={"help": "Adam learning rate of a stage net (lbfgs: 1, unused)."})
    stage_iters: int = field(default=200, metadata={"help": "Iterations of a stage net's fit (Adam steps or L-BFGS)."})
    stage_weight_decay: float = field(
        default=0.0,
        metadata={"help": "L2 weight decay on a stage net's weights (not biases): + wd (||W||^2 + ||v||^2)."},
    )
    joint_baseline: bool = field(
        default=True,
        metadata={"help": "Also train a joint MLP with max_steps x units_per_stage units; logged as joint_*."},
    )
    joint_lr: float = field(default=0.01, metadata={"help": "Adam learning rate of the joint MLP."})
    joint_iters: int = field(default=1000, metadata={"help": "Full-batch Adam iterations of the joint MLP."})

    def __post_init__(self):
        self.require_choice(dataset=DATASETS, stage_optimizer=STAGE_OPTIMIZERS)
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if not 0.0 < self.subsample <= 1.0:
            raise ValueError(f"subsample must be in (0, 1], got {self.subsample!r}")
        self.require_at_least(1, "units_per_stage", "stage_iters", "joint_iters")
        self.require_positive("eta", "stage_lr", "joint_lr")
        self.require_non_negative("stage_weight_decay")
        super().__post_init__()

    @property
    def loss(self) -> str:
        return DATASETS[self.dataset]


# --- pure math: losses, pseudo-residuals, Newton steps ----------------------------------------------------------
# y: (n,) targets for "squared", (n,) in {-1, 1} for "binary", (n, K) one-hot for "multiclass"; F: (n,) or (n, K).


def initial_score(y: torch.Tensor, loss: str) -> torch.Tensor:
    """F_0 = argmin_c sum_i L(y_i, c): mean y; 1/2 log((1 + ybar) / (1 - ybar)); zeros(K)."""
    if loss == "squared":
        return y.mean()
    if loss == "binary":
        ybar = y.mean().clamp(-1 + 1e-12, 1 - 1e-12)
        return 0.5 * torch.log((1 + ybar) / (1 - ybar))
    return torch.zeros(y.shape[1], dtype=y.dtype)


def loss_value(y: torch.Tensor, Fx: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean L(y_i, F_i): (y - F)^2 / 2; log(1 + exp(-2 y F)); -log softmax(F)_y."""
    if loss == "squared":
        return 0.5 * ((y - Fx) ** 2).mean()
    if loss == "binary":
        return F.softplus(-2 * y * Fx).mean()
    return -(y * F.log_softmax(Fx, dim=1)).sum(1).mean()


def negative_gradient(y: torch.Tensor, Fx: torch.Tensor, loss: str) -> torch.Tensor:
    """r = -dL/dF: y - F; 2y / (1 + exp(2 y F)); Y - softmax(F)."""
    if loss == "squared":
        return y - Fx
    if loss == "binary":
        return 2 * y * torch.sigmoid(-2 * y * Fx)
    return y - F.softmax(Fx, dim=1)


def newton_step(y: torch.Tensor, Fx: torch.Tensor, h: torch.Tensor, loss: str) -> float:
    """rho = -(sum dL/dF h) / (sum d2L/dF2 h^2); 1 for the squared loss (the table in the module docstring)."""
    if loss == "squared":
        return 1.0
    r = negative_gradient(y, Fx, loss)
    if loss == "binary":
        curvature = r * (2 * y - r)  # d2L/dF2 = 4 e^{2yF} / (1 + e^{2yF})^2, as r (2y - r) since y^2 = 1
    else:
        p = F.softmax(Fx, dim=1)
        curvature = p * (1 - p)
    denom = float((h**2 * curvature).sum())
    return float((r * h).sum()) / denom if denom > 0 else 0.0


# --- pure math: the stage net and its fit -------------------------------------------------------------------


class StageNet(torch.nn.Module):
    """h(x) = sigmoid(x W^T + b) v + c: u logistic units, K outputs."""

    def __init__(self, in_dim: int, units: int, out_dim: int):
        super().__init__()
        self.hidden = torch.nn.Linear(in_dim, units, dtype=DTYPE)
        self.out = torch.nn.Linear(units, out_dim, dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sigmoid(self.hidden(x)))

    def penalty(self) -> torch.Tensor:
        return (self.hidden.weight**2).sum() + (self.out.weight**2).sum()


def fit_stage(
    x: torch.Tensor,
    r: torch.Tensor,
    units: int,
    optimizer: str = "adam",
    lr: float = 0.05,
    iters: int = 200,
    weight_decay: float = 0.0,
) -> StageNet:
    """A fresh stage net (torch's default init, from the global torch RNG) fit to r by mean (h - r)^2 + wd penalty."""
    target = r.reshape(len(r), -1)
    net = StageNet(x.shape[1], units, target.shape[1])

    def objective():
        return ((net(x) - target) ** 2).mean() + weight_decay * net.penalty()

    if optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for _ in range(iters):
            opt.zero_grad()
            objective().backward()
            opt.step()
    else:
        opt = torch.optim.LBFGS(net.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = objective()
            value.backward()
            return value

        opt.step(closure)
    return net.requires_grad_(False)


def stage_output(net: StageNet, x: torch.Tensor, loss: str) -> torch.Tensor:
    """h_m(x) shaped like F: (n,) for one output, (n, K) for the multiclass loss."""
    out = net(x)
    return out if loss == "multiclass" else out[:, 0]


def to_single_network(
    f0: torch.Tensor, stages: list[StageNet], rhos: list[float], eta: float, loss: str
) -> torch.nn.Sequential:
    """The boosted ensemble as one Linear(d, T u) -> Sigmoid -> Linear(T u, K) network.

    Output: F(x) for the squared and multiclass losses, 2 F(x) (the logit of P(y = 1)) for the binary loss.
    """
    scale = 2.0 if loss == "binary" else 1.0
    W = torch.cat([s.hidden.weight for s in stages])
    b = torch.cat([s.hidden.bias for s in stages])
    V = torch.cat([eta * rho * s.out.weight for s, rho in zip(stages, rhos)], dim=1)
    c = f0.reshape(-1) + sum(eta * rho * s.out.bias for s, rho in zip(stages, rhos))
    net = torch.nn.Sequential(
        torch.nn.Linear(W.shape[1], W.shape[0], dtype=DTYPE),
        torch.nn.Sigmoid(),
        torch.nn.Linear(W.shape[0], V.shape[0], dtype=DTYPE),
    )
    with torch.no_grad():
        net[0].weight.copy_(W)
        net[0].bias.copy_(b)
        net[2].weight.copy_(scale * V)
        net[2].bias.copy_(scale * c)
    return net.requires_grad_(False)


def fit_joint_mlp(
    x: torch.Tensor, y: torch.Tensor, loss: str, units: int, lr: float, iters: int, seed: int
) -> torch.nn.Sequential:
    """The baseline: Linear -> Sigmoid -> Linear with ``units`` hidden units, trained jointly on the same loss with
    full-batch Adam. Initialised from its own generator, so it leaves the global torch RNG alone."""
    out_dim = y.shape[1] if loss == "multiclass" else 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], units, dtype=DTYPE),
            torch.nn.Sigmoid(),
            torch.nn.Linear(units, out_dim, dtype=DTYPE),
        )
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(iters):
        opt.zero_grad()
        out = net(x)
        loss_value(y, out if loss == "multiclass" else out[:, 0], loss).backward()
        opt.step()
    return net.requires_grad_(False)


def score(y: torch.Tensor, Fx: torch.Tensor, loss: str) -> float:
    """Test metric: MSE (squared loss) or accuracy (sign of F; argmax of F)."""
    if loss == "squared":
        return float(((y - Fx) ** 2).mean())
    if loss == "binary":
        return float((torch.where(Fx >= 0, 1.0, -1.0) == y).double().mean())
    return float((Fx.argmax(1) == y.argmax(1)).double().mean())


def load_dataset(name: str, test_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """scikit-learn's data set, split (stratified for classification), X standardised on the training part; y as the
    loss needs it (standardised for regression, {-1, 1} for binary, one-hot for multiclass)."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    loss = DATASETS[name]
    stratify = y if loss != "squared" else None
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_fraction, random_state=seed, stratify=stratify)
    scaler = StandardScaler().fit(X_tr)
    X_tr, X_te = scaler.transform(X_tr), scaler.transform(X_te)
    if loss == "squared":
        mean, std = y_tr.mean(), y_tr.std()
        y_tr, y_te = (y_tr - mean) / std, (y_te - mean) / std
    elif loss == "binary":
        y_tr, y_te = 2.0 * y_tr - 1.0, 2.0 * y_te - 1.0
    else:
        k = int(y.max()) + 1
        y_tr, y_te = np.eye(k)[y_tr], np.eye(k)[y_te]
    return tuple(torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (X_tr, y_tr, X_te, y_te))


# --- trainer --------------------------------------------------------------------------------------------------


class GBNNTrainer(AuxTrainer):
    """Gradient-boosted one-hidden-layer network; one step is one boosting stage."""

    method = "gbnn"

    def setup(self) -> None:
        args = self.args
        self.loss = args.loss
        self.x_train, self.y_train, self.x_test, self.y_test = load_dataset(args.dataset, args.test_fraction, args.seed)
        self.f0 = initial_score(self.y_train, self.loss)
        self.stages: list[StageNet] = []
        self.rhos: list[float] = []
        self._reset_scores()
        self.joint: dict = {}
        if args.joint_baseline:
            net = fit_joint_mlp(
                self.x_train,
                self.y_train,
                self.loss,
                args.max_steps * args.units_per_stage,
                args.joint_lr,
                args.joint_iters,
                seed=args.seed + 1,
            )
            with torch.no_grad():
                out_tr, out_te = net(self.x_train), net(self.x_test)
            if self.loss != "multiclass":
                out_tr, out_te = out_tr[:, 0], out_te[:, 0]
            self.joint = {
                "joint_train_loss": float(loss_value(self.y_train, out_tr, self.loss)),
                "joint_test_loss": float(loss_value(self.y_test, out_te, self.loss)),
                f"joint_test_{self.metric}": score(self.y_test, out_te, self.loss),
            }

    @property
    def metric(self) -> str:
        return "mse" if self.loss == "squared" else "accuracy"

    def description(self) -> str:
        a = self.args
        return f"gbnn[{a.dataset}, {a.units_per_stage} unit(s)/stage, eta={a.eta:g}]"

    def _reset_scores(self) -> None:
        self.F_train = self.f0.expand(self.y_train.shape).clone()
        self.F_test = self.f0.expand(self.y_test.shape).clone()

    def training_step(self) -> dict:
        a = self.args
        r = negative_gradient(self.y_train, self.F_train, self.loss)
        n = len(r)
        idx = torch.as_tensor(np.sort(self.rng.choice(n, size=max(1, round(a.subsample * n)), replace=False)))
        net = fit_stage(
            self.x_train[idx],
            r[idx],
            a.units_per_stage,
            a.stage_optimizer,
            a.stage_lr,
            a.stage_iters,
            a.stage_weight_decay,
        )
        with torch.no_grad():
            h_train = stage_output(net, self.x_train, self.loss)
            rho = newton_step(self.y_train, self.F_train, h_train, self.loss)
            self.F_train += a.eta * rho * h_train
            self.F_test += a.eta * rho * stage_output(net, self.x_test, self.loss)
        self.stages.append(net)
        self.rhos.append(rho)
        return {"rho": rho}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The staged ensemble's raw score F(x) = F_0 + sum_m eta rho_m h_m(x), stage by stage."""
        with torch.no_grad():
            out = self.f0.expand((len(x), *self.y_train.shape[1:])).clone()
            for net, rho in zip(self.stages, self.rhos):
                out += self.args.eta * rho * stage_output(net, x, self.loss)
        return out

    def to_single_network(self) -> torch.nn.Sequential:
        """The ensemble as one network (see ``to_single_network``): F(x), or 2 F(x) for the binary loss."""
        return to_single_network(self.f0, self.stages, self.rhos, self.args.eta, self.loss)

    def evaluate(self) -> dict:
        return {
            "units": len(self.stages) * self.args.units_per_stage,
            "train_loss": float(loss_value(self.y_train, self.F_train, self.loss)),
            "test_loss": float(loss_value(self.y_test, self.F_test, self.loss)),
            f"train_{self.metric}": score(self.y_train, self.F_train, self.loss),
            f"test_{self.metric}": score(self.y_test, self.F_test, self.loss),
            **self.joint,
        }

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "stages": [{k: v.clone() for k, v in s.state_dict().items()} for s in self.stages],
            "rhos": list(self.rhos),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        d, k = self.x_train.shape[1], (self.y_train.shape[1] if self.loss == "multiclass" else 1)
        self.stages = []
        with torch.random.fork_rng(devices=[]):  # building a net draws its init: keep the restored RNG untouched
            for params in state["stages"]:
                net = StageNet(d, self.args.units_per_stage, k)
                net.load_state_dict(params)
                self.stages.append(net.requires_grad_(False))
        self.rhos = [float(r) for r in state["rhos"]]
        self._reset_scores()  # F on both splits, rebuilt stage by stage exactly as training accumulated it
        with torch.no_grad():
            for net, rho in zip(self.stages, self.rhos):
                self.F_train += self.args.eta * rho * stage_output(net, self.x_train, self.loss)
                self.F_test += self.args.eta * rho * stage_output(net, self.x_test, self.loss)


def staged_scores(trainer: GBNNTrainer) -> list[float]:
    """Training loss after each stage so far (from F_0), recomputed from the stored stages."""
    F_train = trainer.f0.expand(trainer.y_train.shape).clone()
    out = [float(loss_value(trainer.y_train, F_train, trainer.loss))]
    with torch.no_grad():
        for net, rho in zip(trainer.stages, trainer.rhos):
            F_train += trainer.args.eta * rho * stage_output(net, trainer.x_train, trainer.loss)
            out.append(float(loss_value(trainer.y_train, F_train, trainer.loss)))
    return out


def max_uptick(losses: list[float]) -> float:
    """The largest relative increase loss[t] / loss[t-1] - 1 over the sequence (0 if it never increases)."""
    return max([0.0] + [b / a - 1.0 for a, b in zip(losses, losses[1:]) if a > 0 and math.isfinite(b)])
