"""Deep-unfolded ISTA and IHT: learned per-layer step sizes, trained supervised or on the objective itself.

Paper: K. Nagahisa, R. Hayakawa, Y. Iiguni, "Comparison between Supervised and Unsupervised Learning in Deep Unfolded
Sparse Signal Recovery", arXiv 2509.01331 (2025). No official code was found; written here from the math.

Problem: y = A x + n, x Bernoulli-Gaussian (each entry nonzero with probability p, then N(0, 1)), A an m x n Gaussian
matrix (entries N(0, 1/m)), n ~ N(0, sigma^2 I).

- Convex case, LASSO: J_1(x) = 1/2 ||y - A x||^2 + lambda ||x||_1, solved by ISTA
      x_{t+1} = S_{lambda gamma}(x_t + gamma A^T (y - A x_t)),   S_tau(v) = sign(v) max(|v| - tau, 0).
- Nonconvex case, l0: J_0(x) = 1/2 ||y - A x||^2 + lambda ||x||_0, solved by IHT
      x_{t+1} = H_{sqrt(2 lambda gamma)}(x_t + gamma A^T (y - A x_t)),   H_tau(v) = v 1(|v| > tau)
  (sqrt(2 lambda gamma) is the threshold of the proximal map of gamma lambda ||.||_0).

Deep unfolding: T iterations become T layers, each with its own learnable step size gamma_t (here learned in log
space, so it stays positive); the threshold stays tied to lambda gamma_t, so a fixed point of every layer is still a
fixed point of the original iteration. Two losses:

- supervised:   E ||x_T - x||^2           (needs the ground truth x),
- unsupervised: E J(x_T)                  (the original objective; needs only y).

Claims tested here (the paper's): for ISTA, supervised training gives the lower NMSE but does not minimise J_1,
while unsupervised DU-ISTA gets close to the LASSO optimum in T = 20 layers; for IHT both trained variants beat
plain IHT on J_0.

What is a reconstruction: whether the paper also unties the thresholds from gamma_t or trains incrementally (layer by
layer) is not known; only gamma_t is learned here, jointly over all layers. The l0 threshold form sqrt(2 lambda
gamma) follows from the objective J_0 (a k-sparse hard-threshold variant is not implemented). The LASSO optimum used as
the reference is computed with 500 FISTA iterations (Beck & Teboulle 2009) rather than 3000 ISTA iterations: the same
minimiser, reached sooner (the gap in J_1 is about 1e-9).

Several variants (``losses: sup,unsup``) are trained side by side on the same fresh batches: their parameters are
disjoint and Adam is element-wise, so this is exactly separate training runs that share the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer

ALGOS = ("ista", "iht")
LOSSES = ("sup", "unsup")


@dataclass
class UnfoldedISTAConfig(AuxConfig, max_steps=500, eval_every=50, output_dir="runs/unfolded_ista"):
    """A step is one Adam step on a fresh batch."""

    algo: str = field(default="ista", metadata={"help": "ista (LASSO, soft threshold) or iht (l0, hard threshold)."})
    losses: str = field(
        default="sup,unsup",
        metadata={
            "help": "Comma-separated training losses, each a separately trained unfolded network on the same "
            "batches: sup (E ||x_T - x||^2) and/or unsup (E J(x_T), the objective)."
        },
    )
    m: int = field(default=50, metadata={"help": "Measurements m (rows of A)."})
    n: int = field(default=100, metadata={"help": "Signal length n (columns of A)."})
    p: float = field(default=0.1, metadata={"help": "Probability that a signal entry is nonzero (Bernoulli-Gaussian)."})
    test_p: float = field(
        default=-1.0,
        metadata={"help": "Nonzero probability of the test signals (-1: the same as p; e.g. 0.2 tests a mismatch)."},
    )
    sigma: float = field(default=0.01, metadata={"help": "Standard deviation of the measurement noise."})
    lambd: float = field(default=0.05, metadata={"help": "Penalty weight lambda of J_1 / J_0."})
    layers: int = field(default=20, metadata={"help": "Unfolded layers T (iterations)."})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate on log gamma_t."})
    batch_size: int = field(default=100, metadata={"help": "Fresh training samples per step."})
    test_samples: int = field(default=1000, metadata={"help": "Held-out samples for the evaluation."})
    reference_iters: int = field(
        default=500,
        metadata={
            "help": "Iterations of the long-run reference: FISTA for the LASSO optimum (500 leave a gap in J_1 of "
            "about 1e-9, below that of 3000 ISTA iterations), IHT to its fixed point for l0."
        },
    )

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        names = [s.strip() for s in str(self.losses).split(",") if s.strip()]
        bad = [s for s in names if s not in LOSSES]
        if not names or bad or len(set(names)) != len(names):
            raise ValueError(f"losses must be a comma-separated subset of {', '.join(LOSSES)}, got {self.losses!r}")
        self.losses = ",".join(names)
        self.require_at_least(1, "m", "n", "layers", "batch_size", "test_samples", "reference_iters")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {self.p!r}")
        if self.test_p != -1.0 and not 0.0 < self.test_p <= 1.0:
            raise ValueError(f"test_p must be in (0, 1] or -1 (same as p), got {self.test_p!r}")
        self.require_non_negative("sigma")
        self.require_positive("lambd", "lr")
        super().__post_init__()


# --- pure math ------------------------------------------------------------------------------------------------


def soft_threshold(v: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """S_tau(v) = sign(v) max(|v| - tau, 0): the proximal map of tau ||.||_1."""
    return torch.relu(v - tau) - torch.relu(-v - tau)  # the same map; the fastest form under autograd on CPU


def hard_threshold(v: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """H_tau(v) = v 1(|v| > tau): the proximal map of (tau^2 / 2) ||.||_0."""
    return v * (v.abs() > tau).to(v.dtype)


def lasso_objective(A: torch.Tensor, y: torch.Tensor, x: torch.Tensor, lambd: float) -> torch.Tensor:
    """J_1 per sample: 1/2 ||y - A x||^2 + lambda ||x||_1; y (B, m), x (B, n) -> (B,)."""
    return 0.5 * ((y - x @ A.T) ** 2).sum(-1) + lambd * x.abs().sum(-1)


def l0_objective(A: torch.Tensor, y: torch.Tensor, x: torch.Tensor, lambd: float) -> torch.Tensor:
    """J_0 per sample: 1/2 ||y - A x||^2 + lambda ||x||_0; y (B, m), x (B, n) -> (B,)."""
    return 0.5 * ((y - x @ A.T) ** 2).sum(-1) + lambd * (x != 0).to(x.dtype).sum(-1)


def objective(algo: str, A: torch.Tensor, y: torch.Tensor, x: torch.Tensor, lambd: float) -> torch.Tensor:
    return lasso_objective(A, y, x, lambd) if algo == "ista" else l0_objective(A, y, x, lambd)


def unfolded_forward(A: torch.Tensor, y: torch.Tensor, gammas: torch.Tensor, lambd: float, algo: str) -> torch.Tensor:
    """x_T of T unfolded ISTA / IHT layers with step sizes ``gammas`` (T,), from x_0 = 0; y (B, m) -> (B, n).

    A leading variant axis is allowed: ``gammas`` (V, T) with y (B, m) gives (V, B, n), each variant its own steps.
    """
    x = y.new_zeros((*gammas.shape[:-1], y.shape[0], A.shape[1]))
    aty = y @ A
    gram = A.T @ A
    for t in range(gammas.shape[-1]):
        g = gammas[..., t, None, None]
        v = x + g * (aty - x @ gram)  # x + gamma A^T (y - A x)
        x = soft_threshold(v, lambd * g) if algo == "ista" else hard_threshold(v, torch.sqrt(2 * lambd * g))
    return x


def fista_lasso(A: torch.Tensor, y: torch.Tensor, lambd: float, iters: int, tol: float = 1e-7) -> torch.Tensor:
    """The LASSO minimiser of every row of y by FISTA (step 1/L), stopped when no entry moves more than ``tol``."""
    step = 1.0 / float(torch.linalg.matrix_norm(A, ord=2) ** 2)
    x = z = y.new_zeros((y.shape[0], A.shape[1]))
    t, aty, gram = 1.0, y @ A, A.T @ A
    for _ in range(iters):
        x_new = soft_threshold(z + step * (aty - z @ gram), lambd * step)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = x_new + ((t - 1) / t_new) * (x_new - x)
        done = float((x_new - x).abs().max()) <= tol
        x, t = x_new, t_new
        if done:
            break
    return x


def iht_fixed_point(A: torch.Tensor, y: torch.Tensor, lambd: float, gamma: float, iters: int) -> torch.Tensor:
    """Plain IHT with a constant step ``gamma`` from x_0 = 0 until no entry changes (a fixed point) or ``iters``."""
    x, aty, gram = y.new_zeros((y.shape[0], A.shape[1])), y @ A, A.T @ A
    tau = math.sqrt(2 * lambd * gamma)
    for _ in range(iters):
        x_new = hard_threshold(x + gamma * (aty - x @ gram), tau)
        done = float((x_new - x).abs().max()) <= 1e-12
        x = x_new
        if done:
            break
    return x


def nmse_db(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """10 log10(sum ||x_hat - x||^2 / sum ||x||^2) over the whole set."""
    return float(10 * torch.log10(((x_hat - x) ** 2).sum() / (x**2).sum()))


def bernoulli_gaussian(samples: int, n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(samples, n) signals: each entry N(0, 1) with probability p, else 0."""
    support = torch.rand(samples, n, generator=generator, dtype=torch.float64) < p
    return torch.randn(samples, n, generator=generator, dtype=torch.float64) * support


def measure(A: torch.Tensor, x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """y = A x + n, n ~ N(0, sigma^2 I); x (B, n) -> (B, m)."""
    return x @ A.T + sigma * torch.randn(x.shape[0], A.shape[0], generator=generator, dtype=x.dtype)


# --- the trainer ----------------------------------------------------------------------------------------------


class UnfoldedISTATrainer(AuxTrainer):
    """Trains T step sizes of DU-ISTA / DU-IHT per loss; a step is one Adam step on a fresh batch."""

    method = "unfolded_ista"
    stateful = ("log_gamma", "optimizer", "generator")

    def setup(self) -> None:
        a = self.args
        self.variants = a.losses.split(",")
        self.generator = torch.Generator().manual_seed(a.seed)  # the training stream (saved for --resume)
        g = torch.Generator().manual_seed(a.seed + 10_000)  # A and the test set: fixed by the seed
        self.A = torch.randn(a.m, a.n, generator=g, dtype=torch.float64) / math.sqrt(a.m)
        self.A32 = self.A.float()
        self.L = float(torch.linalg.matrix_norm(self.A, ord=2) ** 2)
        test_p = a.p if a.test_p == -1.0 else a.test_p
        self.x_test = bernoulli_gaussian(a.test_samples, a.n, test_p, g)
        self.y_test = measure(self.A, self.x_test, a.sigma, g)
        init = math.log(1.0 / self.L)
        self.log_gamma = torch.full((len(self.variants), a.layers), init, dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.log_gamma], lr=a.lr)
        self.baselines = self._baselines()

    def description(self) -> str:
        return f"unfolded_{self.args.algo}[{self.args.losses}]"

    def _baselines(self) -> dict:
        """Plain ISTA / IHT with gamma = 1/L for T iterations, and the long-run reference (fixed by the test set)."""
        a, A, y = self.args, self.A, self.y_test
        fixed = torch.full((a.layers,), 1.0 / self.L, dtype=torch.float64)
        x_t = unfolded_forward(A, y, fixed, a.lambd, a.algo)
        if a.algo == "ista":
            x_ref = fista_lasso(A, y, a.lambd, a.reference_iters)
        else:
            x_ref = iht_fixed_point(A, y, a.lambd, 1.0 / self.L, a.reference_iters)
        out = {}
        for name, x in ((f"{a.algo}_T", x_t), (f"{a.algo}_ref", x_ref)):
            out[f"nmse_db/{name}"] = nmse_db(x, self.x_test)
            out[f"J/{name}"] = float(objective(a.algo, A, y, x, a.lambd).mean())
        return out

    def loss(self, x_hat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum over the variants of each one's loss (mean over the batch); x_hat (V, B, n)."""
        a, total = self.args, x_hat.new_zeros(())
        for v, kind in enumerate(self.variants):
            if kind == "sup":
                total = total + ((x_hat[v] - x) ** 2).sum(-1).mean()
            else:
                total = total + objective(a.algo, self.A32, y, x_hat[v], a.lambd).mean()
        return total

    def training_step(self) -> dict:
        a = self.args
        x = bernoulli_gaussian(a.batch_size, a.n, a.p, self.generator)
        y = measure(self.A, x, a.sigma, self.generator)
        x, y = x.float(), y.float()  # float32 training: half the memory traffic of the (overhead-bound) small ops
        x_hat = unfolded_forward(self.A32, y, self.log_gamma.float().exp(), a.lambd, a.algo)
        loss = self.loss(x_hat, x, y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"train_loss": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        a = self.args
        x_hat = unfolded_forward(self.A, self.y_test, self.log_gamma.exp(), a.lambd, a.algo)
        out = dict(self.baselines)
        for v, kind in enumerate(self.variants):
            out[f"nmse_db/{kind}"] = nmse_db(x_hat[v], self.x_test)
            out[f"J/{kind}"] = float(objective(a.algo, self.A, self.y_test, x_hat[v], a.lambd).mean())
            out[f"gamma/{kind}"] = self.log_gamma[v].exp().tolist()
        return out
