"""TangleNAS: weight-entangled gradient-based architecture search, against a DARTS supernet with separate weights.

Paper: R. S. Sukthanker, A. Krishnakumar, M. Safari, F. Hutter, "Weight-Entanglement Meets Gradient-Based Neural
Architecture Search", arXiv 2312.10440 (2023; AutoML-Conf 2024, PMLR 256); official code automl/TangleNAS, whose
licence was not verified. Written here from the paper's description (its "weight superposition"); no code copied.

One-shot NAS over a supernet. DARTS (Liu et al., arXiv 1806.09055) runs every candidate op o_i of a choice and mixes
their outputs, sum_i a_i o_i(x), with a = sampler(alpha): memory grows with the number of candidates. When the
candidates are the same op at different sizes (here: the width d_i of a hidden layer), TangleNAS makes them share
one superset weight W (d_max rows) -- candidate i is the leading slice W[:d_i] -- and mixes the *weights*:

    W_mix = sum_i a_i * pad(W[:d_i]),   b_mix = sum_i a_i * pad(b[:d_i]),   h = relu(x W_mix^T + b_mix)

one op per choice, so the parameters and activations are those of the largest candidate alone. The sampler gives
a: DARTS softmax(alpha), DrNAS a Dirichlet sample, GDAS a hard Gumbel-softmax (``nas_space.arch_weights``).
Training is bi-level and first order: a weight step on a train minibatch (AdamW), then an architecture step on a
val minibatch (Adam, lr 3e-4, betas (0.5, 0.999), weight decay 1e-3: DARTS's settings). The found architecture is
the argmax per choice; it inherits its slices of the supernet (``inherited_test_acc``) and is retrained from scratch
(``retrain_test_acc``).

The experiment (``posttrain train tanglenas/digits``): digits, an MLP 64-d1-d2-10 with d1, d2 in {16, 64, 128}
(entangled as slices of 128; 9 architectures), 300 iterations, against the ``darts`` arm whose candidates have
separate weights. The architecture loss adds a parameter-count penalty kappa * E_a[#params] / #params(largest)
(normalised so kappa is unitless; E over the independent choices is exact, ``expected_params``), kappa = 0.2
calibrated so that the knee of the accuracy-size curve, 64-64, is the penalised optimum (EXPERIMENTS.md). The penalty is
this experiment's addition: the paper searches without one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer
from posttrain.trainers.classic.nas_space import (
    N_CLASSES,
    N_FEATURES,
    SAMPLERS,
    Batches,
    accuracy,
    arch_weights,
    count_params,
    digits_splits,
    mlp,
    mlp_accuracy,
)

ARMS = ("tanglenas", "darts")


@dataclass
class TangleNASConfig(AuxConfig, max_steps=300, eval_every=50, output_dir="runs/tanglenas"):
    """A step is one search iteration: one weight step and one arch step."""

    arm: str = field(
        default="tanglenas",
        metadata={
            "help": "tanglenas: one superset weight per layer, candidates are its leading slices, weights mixed; "
            "darts: separate weights per candidate width, outputs mixed."
        },
    )
    sampler: str = field(
        default="darts", metadata={"help": "Mixing weights from alpha: darts (softmax), drnas (Dirichlet), gdas."}
    )
    widths: list = field(default_factory=lambda: [16, 64, 128], metadata={"help": "Candidate widths of each layer."})
    layers: int = field(default=2, metadata={"help": "Searchable hidden layers."})
    kappa: float = field(
        default=0.2,
        metadata={"help": "Weight of the parameter penalty kappa * E[#params] / #params(largest) in the arch loss."},
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the supernet weights."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay of the supernet weights."})
    arch_learning_rate: float = field(default=3e-4, metadata={"help": "Adam learning rate of alpha (DARTS: 3e-4)."})
    arch_weight_decay: float = field(default=1e-3, metadata={"help": "Adam weight decay of alpha (DARTS: 1e-3)."})
    alpha_init: float = field(default=1e-3, metadata={"help": "alpha starts as alpha_init * N(0, 1) (DARTS)."})
    tau_max: float = field(default=10.0, metadata={"help": "GDAS temperature at step 0 (linear decay)."})
    tau_min: float = field(default=0.1, metadata={"help": "GDAS temperature at the last step."})
    batch_size: int = field(default=64, metadata={"help": "Minibatch of both the weight and the arch step."})
    retrain_steps: int = field(
        default=300, metadata={"help": "AdamW steps to retrain the argmax architecture at the end (0: skip)."}
    )

    def __post_init__(self):
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        widths = list(self.widths) if isinstance(self.widths, (list, tuple)) else None
        if not widths or len(widths) < 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be a list of >= 2 positive integers, got {self.widths!r}")
        if widths != sorted(set(widths)):
            raise ValueError(f"widths must be increasing and distinct (slices of the largest), got {self.widths!r}")
        self.widths = widths
        self.require_at_least(1, "layers")
        self.require_positive("learning_rate", "arch_learning_rate", "tau_max", "tau_min")
        self.require_non_negative("kappa", "weight_decay", "arch_weight_decay", "alpha_init", "retrain_steps")
        self.require_at_least(1, "batch_size")
        super().__post_init__()


# --- pure math -----------------------------------------------------------------------------------------------


def entangled_weight(w: torch.Tensor, a: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """sum_i a_i * pad(w[:d_i]): the mixture of the leading-row slices of ``w`` (a weight (d_max, in) or bias)."""
    rows = w.shape[0]
    pad = [0, 0] * (w.dim() - 1)
    return sum(a[i] * F.pad(w[:d], pad + [0, rows - d]) for i, d in enumerate(widths))


def child_params(arch: tuple[int, ...] | list[int], d_in: int = N_FEATURES, d_out: int = N_CLASSES) -> int:
    """Parameters (weights and biases) of the MLP d_in -> arch -> d_out."""
    dims = [d_in, *arch, d_out]
    return sum((a + 1) * b for a, b in zip(dims[:-1], dims[1:]))


def expected_params(
    a: list[torch.Tensor], widths: list[int], d_in: int = N_FEATURES, d_out: int = N_CLASSES
) -> torch.Tensor:
    """E[#params] of the child when layer l's width is d_i with probability a[l][i], the layers independent:
    sum over the layer pairs of (E[d_{l-1}] + 1) E[d_l], exact because E[d_{l-1} d_l] = E[d_{l-1}] E[d_l]."""
    w = torch.tensor(widths, dtype=a[0].dtype)
    dims = [torch.tensor(float(d_in)), *[(al * w).sum() for al in a], torch.tensor(float(d_out))]
    return sum((x + 1) * y for x, y in zip(dims[:-1], dims[1:]))


def alpha_entropy(alpha: torch.Tensor) -> float:
    """Mean over the choices of the entropy of softmax(alpha), in nats (log 3 = 1.0986 at uniform)."""
    p = torch.softmax(alpha, dim=-1)
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())


# --- the supernets -------------------------------------------------------------------------------------------


def inherit(arch: tuple[int, ...], rows: list[tuple[torch.Tensor, torch.Tensor]], head: nn.Linear) -> nn.Sequential:
    """The child ``mlp(arch)`` holding the supernet's weights: ``rows`` gives each searchable layer's (weight, bias)
    for its chosen width, over the largest previous width (the first d_prev columns are kept), then the head."""
    net, d_prev = mlp(arch), N_FEATURES
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin, (weight, bias), d in zip(linears, rows, arch):
            lin.weight.copy_(weight[:, :d_prev])
            lin.bias.copy_(bias)
            d_prev = d
        linears[-1].weight.copy_(head.weight[:, :d_prev])
        linears[-1].bias.copy_(head.bias)
    return net


class EntangledMLP(nn.Module):
    """Each searchable layer is ONE Linear(d_prev_max, d_max); candidate widths are its leading rows."""

    def __init__(self, widths: list[int], layers: int):
        super().__init__()
        self.widths, d_max = widths, widths[-1]
        dims = [N_FEATURES] + [d_max] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(d_max, N_CLASSES)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        for layer, al in zip(self.hidden, a):
            w, b = entangled_weight(layer.weight, al, self.widths), entangled_weight(layer.bias, al, self.widths)
            x = F.relu(F.linear(x, w, b))
        return self.head(x)

    def child(self, arch: tuple[int, ...]) -> nn.Sequential:
        """The argmax architecture with its slices of the supernet weights (the paper's inheritance)."""
        return inherit(arch, [(layer.weight[:d], layer.bias[:d]) for layer, d in zip(self.hidden, arch)], self.head)


class SeparateMLP(nn.Module):
    """DARTS: each searchable layer holds one Linear(d_prev_max, d_i) per candidate; their outputs are mixed,
    zero-padded to d_max."""

    def __init__(self, widths: list[int], layers: int):
        super().__init__()
        self.widths, d_max = widths, widths[-1]
        dims = [N_FEATURES] + [d_max] * layers
        self.hidden = nn.ModuleList(nn.ModuleList(nn.Linear(a, d) for d in widths) for a in dims[:-1])
        self.head = nn.Linear(d_max, N_CLASSES)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        d_max = self.widths[-1]
        for ops, al in zip(self.hidden, a):
            x = sum(al[i] * F.pad(F.relu(op(x)), (0, d_max - op.out_features)) for i, op in enumerate(ops))
        return self.head(x)

    def child(self, arch: tuple[int, ...]) -> nn.Sequential:
        chosen = [ops[self.widths.index(d)] for ops, d in zip(self.hidden, arch)]
        return inherit(arch, [(op.weight, op.bias) for op in chosen], self.head)


def activation_units(arm: str, widths: list[int], layers: int) -> int:
    """Hidden units computed per example in one forward pass: d_max per layer entangled, sum_i d_i for DARTS."""
    return layers * (widths[-1] if arm == "tanglenas" else sum(widths))


def enumerate_space(widths: list[int], layers: int, data: dict, steps: int, seed: int) -> dict[tuple, float]:
    """Every architecture of the space retrained from scratch (``mlp_accuracy``): {arch: test accuracy}."""
    return {arch: mlp_accuracy(arch, data, steps, seed) for arch in itertools.product(widths, repeat=layers)}


# --- the trainer ---------------------------------------------------------------------------------------------


class TangleNASTrainer(AuxTrainer):
    """Bi-level one-shot search on digits; one step is one weight step (train) and one alpha step (val)."""

    method = "tanglenas"
    stateful = ("net", "alpha", "opt_w", "opt_a", "train_batches", "val_batches", "gumbel")

    def setup(self) -> None:
        args = self.args
        self.data = digits_splits(args.seed)
        net_cls = EntangledMLP if args.arm == "tanglenas" else SeparateMLP
        self.net = net_cls(args.widths, args.layers)
        self.alpha = nn.Parameter(args.alpha_init * torch.randn(args.layers, len(args.widths)))
        self.opt_w = torch.optim.AdamW(self.net.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.opt_a = torch.optim.Adam(
            [self.alpha], lr=args.arch_learning_rate, betas=(0.5, 0.999), weight_decay=args.arch_weight_decay
        )
        self.train_batches = Batches(*self.data["train"], args.batch_size, args.seed)
        self.val_batches = Batches(*self.data["val"], args.batch_size, args.seed + 1)
        self.gumbel = torch.Generator().manual_seed(args.seed + 2)
        self.max_child = child_params([args.widths[-1]] * args.layers)
        self.retrained: dict = {}

    def description(self) -> str:
        return f"tanglenas[{self.args.arm},{self.args.sampler}]"

    def tau(self) -> float:
        a = self.args
        return a.tau_max - (a.tau_max - a.tau_min) * min(self.global_step / max(a.max_steps - 1, 1), 1.0)

    def _a(self) -> torch.Tensor:
        return arch_weights(self.alpha, self.args.sampler, self.tau(), self.gumbel)

    def training_step(self) -> dict:
        self.net.train()
        x, y = self.train_batches.next()  # weight step: alpha fixed
        train_loss = F.cross_entropy(self.net(x, self._a().detach()), y)
        self.opt_w.zero_grad(set_to_none=True)
        train_loss.backward()
        self.opt_w.step()
        x, y = self.val_batches.next()  # arch step (first order): the weights fixed
        a = self._a()
        val_loss = F.cross_entropy(self.net(x, a), y)
        penalty = expected_params(list(a), self.args.widths) / self.max_child
        self.opt_a.zero_grad(set_to_none=True)
        self.net.zero_grad(set_to_none=True)
        (val_loss + self.args.kappa * penalty).backward()
        self.opt_a.step()
        return {
            "train_loss": float(train_loss.detach()),
            "val_loss": float(val_loss.detach()),
            "expected_params": float(penalty.detach()),
        }

    def argmax_arch(self) -> tuple[int, ...]:
        return tuple(self.args.widths[i] for i in self.alpha.detach().argmax(-1).tolist())

    @torch.no_grad()
    def evaluate(self) -> dict:
        arch = self.argmax_arch()
        self.net.eval()
        a_soft = torch.softmax(self.alpha.detach(), -1)
        out = {
            "alpha_entropy": alpha_entropy(self.alpha.detach()),
            "argmax_arch": "-".join(map(str, arch)),
            "supernet_val_acc": float(
                (self.net(self.data["val"][0], a_soft).argmax(-1) == self.data["val"][1]).float().mean()
            ),
            "inherited_test_acc": accuracy(self.net.child(arch), *self.data["test"]),
            "supernet_params": count_params(self.net),
            "activation_units": activation_units(self.args.arm, self.args.widths, self.args.layers),
        }
        for layer, p in enumerate(a_soft.tolist()):
            out.update({f"p{layer}/{w}": v for w, v in zip(self.args.widths, p)})
        if self.args.retrain_steps and self.global_step >= self.args.max_steps:
            if arch not in self.retrained:
                with torch.enable_grad():
                    self.retrained[arch] = mlp_accuracy(arch, self.data, self.args.retrain_steps, self.args.seed)
            out["retrain_test_acc"] = self.retrained[arch]
        return out


def memory_ratio(widths: list[int], layers: int) -> dict[str, float]:
    """Entangled over separate supernet: parameter count and hidden units per forward pass."""
    ent, sep = EntangledMLP(widths, layers), SeparateMLP(widths, layers)
    return {
        "params_tanglenas": count_params(ent),
        "params_darts": count_params(sep),
        "param_ratio": count_params(ent) / count_params(sep),
        "unit_ratio": activation_units("tanglenas", widths, layers) / activation_units("darts", widths, layers),
    }


def ranks(scores: dict) -> dict:
    """1-based rank of each architecture by score, highest first (ties share the better rank)."""
    values = sorted(scores.values(), reverse=True)
    return {arch: 1 + values.index(v) for arch, v in scores.items()}


def search(seed: int, **overrides) -> dict:
    """One search without files: ``max_steps`` steps, then ``evaluate()`` (with the argmax retrained)."""
    trainer = TangleNASTrainer(TangleNASConfig(seed=seed, **overrides))
    for _ in range(trainer.args.max_steps):
        trainer.step()
    return trainer.evaluate()
