"""Shared machinery of the small neural-architecture-search trainers (TangleNAS, ENAS): data, samplers, retraining.

- ``digits_splits``: scikit-learn's bundled digits (offline, 1797 images of 8x8 pixels scaled to [0, 1]) in a
  seeded train / val / test split. NAS is bi-level: the weights train on ``train``, the architecture (alpha or a
  controller) on ``val``, and a found architecture is judged on ``test``.
- ``Batches``: an epoch-shuffled minibatch stream on its own torch Generator (its state is resumable).
- ``arch_weights``: the three one-shot samplers of the mixing weights a = sampler(alpha): DARTS (softmax; Liu et
  al., arXiv 1806.09055), DrNAS (a Dirichlet sample with concentration elu(alpha) + 1, reparameterised; Chen et al.,
  arXiv 2006.10355, Sec. 3.1) and GDAS (hard Gumbel-softmax, straight-through; Dong & Yang, arXiv 1910.04465).
- ``mlp_accuracy`` / ``train_mlp``: a fixed-width ReLU MLP trained from scratch (AdamW) and its accuracy: the
  "retrain the found architecture" step and the exhaustive enumeration of a small space.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLERS = ("darts", "drnas", "gdas")
N_FEATURES, N_CLASSES = 64, 10  # digits


def digits_splits(seed: int, n_val: int = 400, n_test: int = 400) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """digits in a seeded split: {"train", "val", "test"} -> (x float32 (n, 64) in [0, 1], y long (n,))."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    if not (0 < n_val and 0 < n_test and n_val + n_test < len(x) - 100):
        raise ValueError(f"n_val {n_val} + n_test {n_test} leave too few of digits' {len(x)} images to train on")
    order = np.random.default_rng(seed).permutation(len(x))
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


class Batches:
    """Minibatches of (x, y) without replacement within an epoch, reshuffled each epoch by a seeded Generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.order) < self.batch_size:
            self.order = torch.randperm(len(self.x), generator=self.generator)
        idx, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()


def arch_weights(
    alpha: torch.Tensor, sampler: str, tau: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The mixing weights a (same shape as the logits ``alpha``, last axis the candidates, summing to 1).

    darts: softmax(alpha). drnas: a ~ Dirichlet(elu(alpha) + 1), reparameterised (torch's rsample), so gradients
    reach alpha. gdas: one-hot of argmax(alpha + Gumbel noise) in the forward pass with the gradient of
    softmax((alpha + noise) / tau) (straight-through). ``generator`` drives the Gumbel noise; the Dirichlet uses
    torch's global generator (``torch.distributions`` takes none).
    """
    if sampler == "darts":
        return torch.softmax(alpha, dim=-1)
    if sampler == "drnas":
        return torch.distributions.Dirichlet(F.elu(alpha) + 1.0).rsample()
    if sampler == "gdas":
        u = torch.rand(alpha.shape, generator=generator, dtype=alpha.dtype).clamp(1e-10, 1 - 1e-10)
        soft = torch.softmax((alpha - torch.log(-torch.log(u))) / tau, dim=-1)
        hard = F.one_hot(soft.argmax(-1), alpha.shape[-1]).to(soft.dtype)
        return hard - soft.detach() + soft
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def mlp(widths: tuple[int, ...] | list[int]) -> nn.Sequential:
    """64 -> widths[0] -> ... -> widths[-1] -> 10, ReLU between (PyTorch's default initialisation)."""
    layers, d_in = [], N_FEATURES
    for w in widths:
        layers += [nn.Linear(d_in, int(w)), nn.ReLU()]
        d_in = int(w)
    return nn.Sequential(*layers, nn.Linear(d_in, N_CLASSES))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def train_mlp(
    widths: tuple[int, ...] | list[int],
    data: dict,
    steps: int,
    seed: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    model: nn.Module | None = None,
) -> nn.Module:
    """Train ``mlp(widths)`` (or ``model``, e.g. weights inherited from a supernet) on data["train"] with AdamW.

    The initialisation draws from torch's global generator seeded with ``seed`` inside ``fork_rng``: the caller's
    random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = mlp(widths) if model is None else model
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    batches = Batches(*data["train"], batch_size, seed)
    net.train()
    for _ in range(steps):
        x, y = batches.next()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


def mlp_accuracy(widths: tuple[int, ...] | list[int], data: dict, steps: int, seed: int, split: str = "test") -> float:
    """Accuracy on ``split`` of ``mlp(widths)`` retrained from scratch for ``steps`` AdamW steps."""
    return accuracy(train_mlp(widths, data, steps, seed), *data[split])


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
