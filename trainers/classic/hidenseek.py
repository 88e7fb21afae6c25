"""HideNseek: federated lottery tickets by server-side SynFlow pruning and a client-learned sign supermask.

Paper: A. K. Vallapuram, P. Zhou, Y. D. Kwon, L. H. Lee, H. Xu, P. Hui, "HideNseek: Federated Lottery Ticket via
Server-side Pruning and Sign Supermask", arXiv 2206.04385, 2022. No official code was found and only the abstract
and a summary were available: this is a **reconstruction** from what they state.

- The server draws random weights W0 (seeded) and prunes them once, data-free, with SynFlow (arXiv 2006.05467;
  ``posttrain.trainers.classic.synflow``) to a binary mask M of the target density. W0 is never trained.
- Clients learn a sign supermask over the unpruned weights: W_eff = M * sign(tau) * W0, where tau are real scores
  trained through a straight-through estimator (forward sign(tau), backward identity).
- Each round the sampled clients start from the server's tau, train locally, and upload sign(tau_k): one bit per
  unpruned weight. The server averages the uploads, tau <- mean_k sign(tau_k) (FedAvg on the signs: the sign of
  the mean is the clients' majority vote and its size their agreement). UNVERIFIED: the paper's exact score
  initialisation, optimiser, aggregation of the bits and whether some layers stay personal.

Arms of the comparison (``arm``), on the same data split, clients and W0:

- ``hidenseek``: the method above;
- ``binary_supermask``: edge-popup (Ramanujan et al., arXiv 1911.13299): scores s over ALL weights, the layer keeps
  the top-density fraction of |s| (W_eff = topk(|s|) * W0, straight-through gradient to every score), FedAvg on
  the float scores (32 bits per weight);
- ``fedavg``: dense FedAvg of the trained weights (32 bits per weight).

The experiment (this project's, after the paper's setting): scikit-learn's digits, 80/20 split, the training part
spread over 10 clients by a Dirichlet(0.5) label split; MLP 64-200-200-10 without biases, density 0.2, 30 rounds,
5 clients per round, 2 local epochs of minibatches of 32. A step is one round. The server aggregation is FedAU's
``aggregate`` (``posttrain.trainers.classic.fedau``) with unit weights divided by the participants.

Choices of this reconstruction (none is from the paper): W0 is Kaiming normal at the kept fan-in, std
sqrt(2 / (density fan_in)), as edge-popup scales its fixed weights; scores start uniform in [-1, 1]; the clients'
local optimizer is Adam, fresh every round (lr 0.15 for the 1-bit arm, 0.05 for edge-popup; plain SGD cannot move
the +-0.2..1 scores a mean of signs gives within two local epochs); dense FedAvg uses SGD 0.1 with momentum 0.9.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer
from posttrain.trainers.classic.fedau import aggregate
from posttrain.trainers.classic.synflow import synflow_prune

ARMS = ("hidenseek", "binary_supermask", "fedavg")
UPLOADS = ("sign", "scores")
OPTIMIZERS = ("sgd", "adam")
FLOAT_BITS = 32


@dataclass
class HideNseekConfig(AuxConfig, max_steps=30, eval_every=1, output_dir="runs/hidenseek"):
    """A step is one communication round."""

    arm: str = field(default="hidenseek", metadata={"help": f"One of {', '.join(ARMS)}."})
    num_clients: int = field(default=10, metadata={"help": "Number of clients."})
    clients_per_round: int = field(default=5, metadata={"help": "Clients sampled (uniformly, no repeats) per round."})
    local_epochs: int = field(default=2, metadata={"help": "Local epochs over the client's data per round."})
    batch_size: int = field(default=32, metadata={"help": "Local minibatch size."})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Concentration of the Dirichlet label split."})
    hidden: int = field(default=200, metadata={"help": "Width of the two hidden layers (MLP 64-h-h-10)."})
    density: float = field(default=0.2, metadata={"help": "Fraction of weights kept (hidenseek, binary_supermask)."})
    pruning_iterations: int = field(default=100, metadata={"help": "SynFlow pruning iterations (paper: 100)."})
    optimizer: str = field(
        default="adam", metadata={"help": f"Local optimizer (fresh every round), one of {', '.join(OPTIMIZERS)}."}
    )
    local_lr: float = field(
        default=0.05,
        metadata={"help": "Local learning rate (scores, or weights); tuned: hidenseek 0.15, binary 0.05, fedavg 0.1."},
    )
    momentum: float = field(default=0.9, metadata={"help": "Local SGD momentum (reset every round)."})
    score_init: float = field(default=1.0, metadata={"help": "Scores start uniform in [-score_init, score_init]."})
    upload: str = field(
        default="sign", metadata={"help": "hidenseek: upload sign(tau) (1 bit) or the float scores (32 bits)."}
    )
    test_fraction: float = field(default=0.2, metadata={"help": "Held-out fraction of digits for the accuracy."})

    def __post_init__(self):
        self.require_choice(arm=ARMS, optimizer=OPTIMIZERS, upload=UPLOADS)
        self.require_at_least(
            1, "num_clients", "clients_per_round", "local_epochs", "batch_size", "hidden", "pruning_iterations"
        )
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) must be <= num_clients ({self.num_clients})"
            )
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        self.require_positive("dirichlet_alpha", "local_lr", "score_init")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        super().__post_init__()


# --- pure math -----------------------------------------------------------------------------------------------------


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tau):
        return torch.where(tau >= 0, 1.0, -1.0).to(tau.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def sign_ste(tau: torch.Tensor) -> torch.Tensor:
    """sign(tau) in {-1, +1} (0 -> +1) forward; the identity backward (straight-through estimator)."""
    return _SignSTE.apply(tau)


class _TopKSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, density):
        k = int(round(density * scores.numel()))
        mask = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
        if k > 0:
            mask[torch.topk(scores.flatten(), k, sorted=False).indices] = 1.0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def topk_ste(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Edge-popup's mask: 1 on the round(density * n) largest scores of the tensor, 0 elsewhere; identity backward."""
    return _TopKSTE.apply(scores, density)


def sign_supermask_weight(w0: torch.Tensor, tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HideNseek's effective weight M * sign(tau) * W0 (gradient to tau through the straight-through sign)."""
    return mask * sign_ste(tau) * w0


def binary_supermask_weight(w0: torch.Tensor, scores: torch.Tensor, density: float) -> torch.Tensor:
    """Edge-popup's effective weight topk(|s|) * W0 (gradient to every score through the straight-through top-k)."""
    return topk_ste(scores.abs(), density) * w0


def dirichlet_split(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_size: int = 10
) -> list[np.ndarray]:
    """Non-IID label split: for each class, its samples go to the clients in Dirichlet(alpha) proportions.
    Redrawn until every client holds at least ``min_size`` samples. Returns one index array per client."""
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) split gives every one of {num_clients} clients {min_size} samples")


def uplink_bits(arm: str, upload: str, num_weights: int, num_kept: int) -> int:
    """Bits one client sends per round: hidenseek sends sign(tau) (1 bit) or tau (32) per UNPRUNED weight; the
    binary supermask sends a float score per weight; dense FedAvg a float per weight."""
    if arm == "hidenseek":
        return num_kept * (1 if upload == "sign" else FLOAT_BITS)
    return num_weights * FLOAT_BITS


def rounds_to_fraction(accuracy: list[float], fraction: float = 0.8) -> int:
    """The first round (1-based) whose accuracy reaches ``fraction`` x the final accuracy."""
    target = fraction * accuracy[-1]
    return next(r + 1 for r, a in enumerate(accuracy) if a >= target)


# --- trainer -------------------------------------------------------------------------------------------------------


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, hidden, bias=False),
        nn.ReLU(),
        nn.Linear(hidden, hidden, bias=False),
        nn.ReLU(),
        nn.Linear(hidden, 10, bias=False),
    )


class HideNseekTrainer(AuxTrainer):
    """Simulated federated training on digits; one step() is one communication round."""

    method = "hidenseek"

    def setup(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        a = self.args
        x, y = load_digits(return_X_y=True)
        # Data, split, clients and W0 come first from the seed, so every arm of a seed sees the same problem (W0 the
        # same draws, scaled by 1/sqrt(density) in the supermask arms).
        x_tr, x_te, y_tr, y_te = train_test_split(
            x / 16.0, y, test_size=a.test_fraction, random_state=a.seed, stratify=y
        )
        self.x_tr, self.y_tr = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr)
        self.x_te, self.y_te = torch.tensor(x_te, dtype=torch.float32), torch.tensor(y_te)
        self.clients = dirichlet_split(y_tr, a.num_clients, a.dirichlet_alpha, self.rng)
        self.net = mlp(a.hidden)
        kept = a.density if a.arm != "fedavg" else 1.0
        with torch.no_grad():  # W0: Kaiming normal for ReLU at the kept fan-in, std sqrt(2 / (density fan_in))
            for p in self.net.parameters():
                p.normal_(0.0, float(np.sqrt(2.0 / (kept * p.shape[1]))))
        self.names = [n for n, _ in self.net.named_parameters()]
        self.w0 = {n: p.detach().clone() for n, p in self.net.named_parameters()}
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.masks, self.prune_report = None, None
        if a.arm == "hidenseek":
            # server-side, data-free: SynFlow on a copy of the random net (the copy's weights get zeroed)
            masks, self.prune_report = synflow_prune(
                copy.deepcopy(self.net), a.density, input_shape=(64,), iterations=a.pruning_iterations
            )
            self.masks = {n: m.float() for n, m in masks.items()}
        gen = torch.Generator().manual_seed(a.seed + 1)
        if a.arm == "fedavg":
            self.server = {n: w.clone() for n, w in self.w0.items()}
        else:  # scores uniform in [-score_init, score_init]: random signs (hidenseek), a random top-k (edge-popup)
            self.server = {n: (torch.rand(w.shape, generator=gen) * 2 - 1) * a.score_init for n, w in self.w0.items()}
        self.num_weights = sum(w.numel() for w in self.w0.values())
        self.num_kept = int(sum(m.sum() for m in self.masks.values())) if self.masks else self.num_weights

    def description(self) -> str:
        return f"hidenseek[{self.args.arm}]"

    def effective(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a = self.args
        if a.arm == "fedavg":
            return state
        if a.arm == "hidenseek":
            return {n: sign_supermask_weight(self.w0[n], state[n], self.masks[n]) for n in self.names}
        return {n: binary_supermask_weight(self.w0[n], state[n], a.density) for n in self.names}

    def logits(self, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, self.effective(state), (x,))

    def local_train(self, k: int) -> dict[str, torch.Tensor]:
        a = self.args
        state = {n: v.clone().requires_grad_(True) for n, v in self.server.items()}
        if a.optimizer == "adam":
            opt = torch.optim.Adam(list(state.values()), lr=a.local_lr)
        else:
            opt = torch.optim.SGD(list(state.values()), lr=a.local_lr, momentum=a.momentum)
        idx = self.clients[k]
        for _ in range(a.local_epochs):
            order = idx[self.rng.permutation(len(idx))]
            for start in range(0, len(order), a.batch_size):
                b = torch.from_numpy(order[start : start + a.batch_size])
                loss = F.cross_entropy(self.logits(state, self.x_tr[b]), self.y_tr[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        out = {n: v.detach() for n, v in state.items()}
        if a.arm == "hidenseek" and a.upload == "sign":
            out = {n: torch.where(v >= 0, 1.0, -1.0) * self.masks[n] for n, v in out.items()}  # 1 bit per kept weight
        return out

    def training_step(self) -> dict:
        a = self.args
        chosen = np.sort(self.rng.choice(a.num_clients, a.clients_per_round, replace=False))
        uploads = [self.local_train(k) for k in chosen]
        participating = np.zeros(a.num_clients, dtype=bool)
        participating[chosen] = True
        for n in self.names:
            rows = np.stack([u[n].flatten().double().numpy() for u in uploads])
            mean = aggregate(rows, participating, np.ones(a.num_clients), len(chosen))
            self.server[n] = torch.from_numpy(mean).float().view_as(self.server[n])
        return {
            "round": self.global_step + 1,
            "uplink_bits": len(chosen) * uplink_bits(a.arm, a.upload, self.num_weights, self.num_kept),
        }

    def evaluate(self) -> dict:
        with torch.no_grad():
            logits = self.logits(self.server, self.x_te)
            acc = float((logits.argmax(1) == self.y_te).float().mean())
            weights = self.effective(self.server)
        nonzero = sum(int((w != 0).sum()) for w in weights.values())
        return {"round": self.global_step, "test_accuracy": acc, "density": nonzero / self.num_weights}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "server": {n: v.clone() for n, v in self.server.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.server = {n: v.clone() for n, v in state["server"].items()}


# Learning rates picked on seed 0 from small grids (EXPERIMENTS.md): the 1-bit arm needs larger Adam steps to move
# scores that restart each round at +-0.2..1 (a mean of 5 signs); dense FedAvg trains weights, not scores, with SGD.
ARM_DEFAULTS = {"hidenseek": {"local_lr": 0.15}, "fedavg": {"optimizer": "sgd", "local_lr": 0.1}}


def compare_arms(arms: Iterable[str] = ARMS, seeds: Iterable[int] = (0, 1, 2), **overrides) -> dict:
    """Run every arm on every seed -> {arm: [results per seed]}, each {"accuracy": per-round curve, "final",
    "rounds_to_80", "uplink_bits" (per round)}. ``ARM_DEFAULTS`` apply under ``overrides``; an arm name with a suffix
    (``hidenseek:scores``) takes its settings from ``variants``. Each run writes
    ``<output_dir>/<arm>-seed<seed>/results.json``."""
    base = overrides.pop("output_dir", HideNseekConfig.output_dir)
    variants = overrides.pop("variants", {})
    out: dict[str, list[dict]] = {}
    for label in arms:
        arm = label.split(":")[0]
        kw = {**ARM_DEFAULTS.get(arm, {}), **overrides, **variants.get(label, {})}
        for seed in seeds:
            folder = os.path.join(base, f"{label.replace(':', '-')}-seed{seed}")
            cfg = HideNseekConfig(arm=arm, seed=seed, eval_every=1, output_dir=folder, **kw)
            tr = HideNseekTrainer(cfg)
            final = tr.train(verbose=False)
            if final["stopped_by"] != "max_steps":  # a truncated run is not comparable with the others
                raise RuntimeError(f"{label} seed {seed} hit max_seconds after {final['round']} rounds")
            curve = [h["test_accuracy"] for h in tr.history]
            out.setdefault(label, []).append(
                {
                    "accuracy": curve,
                    "final": final["test_accuracy"],
                    "rounds_to_80": rounds_to_fraction(curve, 0.8),
                    "uplink_bits": tr.history[-1]["uplink_bits"],
                    "density": final["density"],
                }
            )
    return out
