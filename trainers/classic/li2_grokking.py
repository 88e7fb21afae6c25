"""Li2 grokking: group arithmetic learnt by a two-layer network, with the Li2 feature-emergence statistics.

Paper: Y. Tian, "Provable Scaling Laws of Feature Emergence from Learning Dynamics of Grokking" (2025, arXiv
2509.21519), the Li2 framework. Official code: facebookresearch/luckmatters, ssl/real-dataset/cogo/
(modular_addition_simple2.py, config/dyn_madd.yaml); its license was not found, so this is written from the paper
and the description of the setup, not from that code.

Task: an abelian group G = Z_{m1} x ... x Z_{mk} of order M (default Z_M, modular addition); every pair (a, b) of
G^2 is a sample with label a + b. A random fraction ``train_fraction`` of the M^2 pairs is the training set.

Model (no biases): h = sigma(W_a e_a + W_b e_b) with K hidden units, sigma(z) = z^2 (or ReLU), y_hat = V h.
W = [W_a W_b] is one K x 2M matrix (one hidden layer on the concatenated one-hot inputs), V is M x K; both are
initialised N(0, 1/fan_in) with fan_in = M for W (each one-hot half) and K for V. Full-batch training with CE, or
MSE against the centred one-hot targets Y - 1/M.

The Li2 stages: (I) lazy learning, the top layer memorises (ridge V = (F^T F + eta I)^-1 F^T Y) while the hidden
weights barely move; (II) weight decay prunes the memorising solution, the backpropagated gradient G_F becomes
informative and each hidden unit independently climbs an energy whose maxima are the group's irreducible
representations (Fourier modes for Z_M); (III) units interact through V and the features diversify; Muon, whose
orthogonalised updates equalise singular directions, is predicted to help here. The sample complexity needed to
generalise scales as M log M: the repository's critical fraction is n / M^2 = 2.7482 ln M / M.

Statistics logged at every evaluation (as the repository's stats tracker; definitions written here):
- ``fourier_concentration``: for each row of W_a (a function on G), the energy of its dominant non-trivial
  character pair {k, -k} divided by its total non-trivial energy (DFT over G, the trivial character k = 0 left
  out); the mean over hidden units. Random rows give about 1 / (number of pairs); pure Fourier features give 1.
- ``grad_f_norm``: ||G_F||_F = ||(Y - F V^T) V||_F on the training set, Y the centred one-hot targets and F the
  n x K hidden activations: the backpropagated gradient of the MSE loss at the hidden layer (up to a constant).
- ``fft_offdiag_ratio``: mean |off-diagonal| / mean |diagonal| of the n x n kernel F F^T after subtracting each
  column's mean: how far the samples' hidden representations are from mutually orthogonal.

Optimizers: Adam with L2 weight decay (the repository's default), SGD with momentum 0.9, or Muon
(``torch.optim.Muon``: Nesterov momentum 0.95, 5 Newton-Schulz steps, decoupled weight decay, default lr 1e-2 and
weight decay 1e-2) on the hidden matrix W with Adam on V, as the repository pairs them. Reconstructed, not the
repository's exact setup: its MuonEnhanced varies the Newton-Schulz coefficients per iteration (torch's Muon uses
fixed ones), and it gives V's Adam the same lr and weight decay as Muon; here V keeps the Adam run's (lr,
weight_decay), so a Muon run differs from the Adam run only in the hidden matrix's optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer

ACTIVATIONS = ("sqr", "relu")
LOSSES = ("ce", "mse")
OPTIMIZERS = ("adam", "sgd", "muon")
CRITICAL_RATIO_MULTIPLIER = 2.7482  # the repository's critical_ratio_multiplier


@dataclass
class Li2GrokkingConfig(AuxConfig, max_steps=3000, output_dir="runs/li2_grokking"):
    """A step is one full-batch epoch (one optimizer step); eval_every logs the statistics every this many epochs."""

    moduli: list[int] = field(
        default_factory=lambda: [127],
        metadata={"help": "The group Z_m1 x ... x Z_mk as its moduli ([127]: modular addition mod 127)."},
    )
    hidden_size: int = field(default=512, metadata={"help": "Hidden units K."})
    train_fraction: float = field(default=0.3, metadata={"help": "Fraction of the M^2 pairs used for training."})
    activation: str = field(default="sqr", metadata={"help": f"Hidden activation, one of {', '.join(ACTIVATIONS)}."})
    loss: str = field(default="ce", metadata={"help": "ce (cross-entropy) or mse (against centred one-hot targets)."})
    optimizer: str = field(
        default="adam",
        metadata={
            "help": f"One of {', '.join(OPTIMIZERS)}; muon: Muon on the hidden matrix W, Adam (lr, weight_decay) on V."
        },
    )
    lr: float = field(default=1e-3, metadata={"help": "Learning rate of Adam / SGD."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay of Adam / SGD (L2, in the gradient)."})
    muon_lr: float = field(default=1e-2, metadata={"help": "Muon's learning rate on W (optimizer: muon)."})
    muon_weight_decay: float = field(default=1e-2, metadata={"help": "Muon's decoupled weight decay on W."})
    stop_at_test_acc: float = field(
        default=0.0,
        metadata={"help": "Stop once a logged test accuracy reaches this (0: never; e.g. 0.9 to time grokking)."},
    )

    def __post_init__(self):
        self.require_choice(activation=ACTIVATIONS, loss=LOSSES, optimizer=OPTIMIZERS)
        if not self.moduli or any(int(m) < 2 for m in self.moduli):
            raise ValueError(f"moduli must be a non-empty list of integers >= 2, got {self.moduli!r}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction!r}")
        if not 0.0 <= self.stop_at_test_acc <= 1.0:
            raise ValueError(f"stop_at_test_acc must be in [0, 1], got {self.stop_at_test_acc!r}")
        self.require_at_least(1, "hidden_size")
        self.require_positive("lr", "muon_lr")
        self.require_non_negative("weight_decay", "muon_weight_decay")
        super().__post_init__()


# --- the pure math ----------------------------------------------------------------------------------------


def group_table(moduli: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (a, b) of G = Z_m1 x ... x Z_mk (elements as flat C-order indices) and their sums a + b."""
    moduli = tuple(int(m) for m in moduli)
    order = math.prod(moduli)
    a, b = (x.ravel() for x in np.meshgrid(np.arange(order), np.arange(order), indexing="ij"))
    digits = (np.stack(np.unravel_index(a, moduli)) + np.stack(np.unravel_index(b, moduli))) % np.array(moduli)[:, None]
    return a, b, np.ravel_multi_index(tuple(digits), moduli)


def critical_fraction(order: int) -> float:
    """The repository's critical training fraction n / M^2 = 2.7482 ln M / M."""
    return CRITICAL_RATIO_MULTIPLIER * math.log(order) / order


def fourier_concentration(rows: np.ndarray, moduli: Sequence[int]) -> float:
    """Mean over rows of (energy of the dominant non-trivial character pair {k, -k}) / (non-trivial energy).

    ``rows`` is (units, M): each row a function on G. The DFT over G is the k-dimensional DFT of the row reshaped
    to the moduli; a real row has |X_k| = |X_-k|, so a character and its conjugate count as one feature.
    """
    moduli = tuple(int(m) for m in moduli)
    power = np.abs(np.fft.fftn(rows.reshape(-1, *moduli), axes=tuple(range(1, len(moduli) + 1)))) ** 2
    power = power.reshape(len(rows), -1)
    neg = np.ravel_multi_index(
        tuple((-np.array(np.unravel_index(np.arange(power.shape[1]), moduli))) % np.array(moduli)[:, None]), moduli
    )  # index of -k for every k
    pair = np.where(neg == np.arange(power.shape[1]), power, power + power[:, neg])
    pair[:, 0] = 0.0  # the trivial character (the row's mean) is left out
    total = power[:, 1:].sum(axis=1)
    return float(np.mean(pair.max(axis=1) / np.maximum(total, 1e-30)))


def backprop_grad_norm(feats: torch.Tensor, V: torch.Tensor, targets: torch.Tensor) -> float:
    """||G_F||_F = ||(Y - F V^T) V||_F: the residual of the top layer sent back to the hidden layer."""
    return float(torch.linalg.matrix_norm((targets - feats @ V.T) @ V))


def kernel_offdiag_ratio(feats: torch.Tensor) -> float:
    """mean |off-diagonal| / mean |diagonal| of F F^T (n x n) with each column's mean subtracted."""
    kernel = feats @ feats.T
    kernel = (kernel - kernel.mean(dim=0, keepdim=True)).abs()
    n = kernel.shape[0]
    diag = kernel.diagonal().sum()
    return float((kernel.sum() - diag) / (n * (n - 1)) / (diag / n))


def first_step_reaching(history: list[dict], key: str, value: float) -> int | None:
    """The first logged step at which ``history[key] >= value`` (None if never)."""
    return next((h["step"] for h in history if h.get(key, -math.inf) >= value), None)


# --- the trainer ------------------------------------------------------------------------------------------


class Li2GrokkingTrainer(AuxTrainer):
    """Full-batch training on G x G -> G; one step() is one optimizer step on the whole training set."""

    method = "li2_grokking"

    def setup(self) -> None:
        a = self.args
        self.order = math.prod(int(m) for m in a.moduli)
        x, y, label = (torch.from_numpy(t) for t in group_table(a.moduli))
        perm = torch.from_numpy(self.rng.permutation(len(label)))
        n_train = max(1, int(round(a.train_fraction * len(label))))
        self.train_idx, self.test_idx = perm[:n_train].sort().values, perm[n_train:].sort().values
        self.x, self.y, self.label = x, y, label
        M, K = self.order, a.hidden_size
        self.W = torch.nn.Parameter(torch.randn(K, 2 * M) / math.sqrt(M))
        self.V = torch.nn.Parameter(torch.randn(M, K) / math.sqrt(K))
        if a.optimizer == "muon":
            self.optimizers = [
                torch.optim.Muon([self.W], lr=a.muon_lr, weight_decay=a.muon_weight_decay),
                torch.optim.Adam([self.V], lr=a.lr, weight_decay=a.weight_decay),
            ]
        elif a.optimizer == "sgd":
            self.optimizers = [torch.optim.SGD([self.W, self.V], lr=a.lr, momentum=0.9, weight_decay=a.weight_decay)]
        else:
            self.optimizers = [torch.optim.Adam([self.W, self.V], lr=a.lr, weight_decay=a.weight_decay)]

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """F: the (n, K) hidden activations of the pairs ``idx``."""
        pre = (self.W[:, self.x[idx]] + self.W[:, self.order + self.y[idx]]).T
        return pre.square() if self.args.activation == "sqr" else torch.relu(pre)

    def centred_targets(self, idx: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.label[idx], self.order).float() - 1.0 / self.order

    def loss_and_acc(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        out = self.hidden(idx) @ self.V.T
        if self.args.loss == "ce":
            loss = F.cross_entropy(out, self.label[idx])
        else:
            loss = (out - self.centred_targets(idx)).square().sum(dim=1).mean()
        return loss, float((out.argmax(dim=1) == self.label[idx]).float().mean())

    def training_step(self) -> dict:
        for opt in self.optimizers:
            opt.zero_grad()
        loss, acc = self.loss_and_acc(self.train_idx)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        return {"train_loss": loss.item(), "train_acc": acc}

    @torch.no_grad()
    def evaluate(self) -> dict:
        train_loss, train_acc = self.loss_and_acc(self.train_idx)
        test_loss, test_acc = self.loss_and_acc(self.test_idx)
        feats = self.hidden(self.train_idx)
        return {
            "train_loss": float(train_loss),
            "train_acc": train_acc,
            "test_loss": float(test_loss),
            "test_acc": test_acc,
            "fourier_concentration": fourier_concentration(self.W[:, : self.order].numpy(), self.args.moduli),
            "grad_f_norm": backprop_grad_norm(feats, self.V, self.centred_targets(self.train_idx)),
            "fft_offdiag_ratio": kernel_offdiag_ratio(feats),
            "step_test_acc_90": first_step_reaching(self.history, "test_acc", 0.9),
        }

    def done(self) -> bool:
        target = self.args.stop_at_test_acc
        return target > 0 and bool(self.history) and self.history[-1]["test_acc"] >= target

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "W": self.W.detach().clone(),
            "V": self.V.detach().clone(),
            "train_idx": self.train_idx.clone(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.W.copy_(state["W"])
            self.V.copy_(state["V"])
        if not torch.equal(state["train_idx"], self.train_idx):
            raise ValueError("cannot resume: the saved run used another train/test split")
        for opt, saved in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(saved)
