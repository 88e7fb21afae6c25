"""Shallow networks with bandlimited random weights: random hidden units, a fitted linear readout.

Paper: M. Li, S. Sonoda, F. Cao, Y. G. Wang, J. Liang, "How Powerful are Shallow Neural Networks with Bandlimited
Random Weights?" (arXiv 2020, later an ICML version; the arXiv id and venue were not confirmed here). No official code
was found; written from the math.

A random-vector functional-link (extreme-learning) network with N hidden units

    f_N(x) = sum_{j=1..N} c_j sigma(a_j . x - b_j)

draws its hidden parameters (a_j, b_j) i.i.d. from a distribution with bounded support, |a_j| <= Omega (the
"band"), and fits only the readout c. The paper proves a lower bound on the approximation error: when the target's
Fourier (ridgelet) mass lies outside the band Omega allows, inf_c ||f - f_N|| stays above a constant that does not
shrink with N; a wide enough band gives back the usual upper bounds. The bound's constants could not be confirmed,
so the experiment checks the qualitative effect only.

Here (the paper's setting, in the form we could verify):
- a_j ~ U[-Omega, Omega]^d, b_j ~ U[-Omega, Omega];
- H[i, j] = sigma(a_j . x_i - b_j), sigma = tanh (or logistic sigmoid, ReLU);
- the ridge readout c = (H^T H + n lambda I)^-1 H^T y with a tiny lambda (1e-8) that exposes the approximation
  limit rather than regularising it away.

The experiment (``BandlimitedTrainer``, ``posttrain train bandlimited/omega2``): x ~ U[-1, 1] (2000 training and 1000
test points), targets sin(k pi x) for several k at once (they share H: one factorisation, one right-hand side per
k), and a width scan: step i fits the first ``widths[i]`` units of one draw of max(widths) units, so each wider net
contains the narrower one. A target of frequency k pi needs |a| of about k pi (tanh(a x - b) has its spectrum
around |a|): Omega = 2 cannot fit sin(16 pi x) at any width, Omega = 200 can.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg  # scipy comes with scikit-learn (a pinned dependency)

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer

ACTIVATIONS = ("tanh", "sigmoid", "relu")


@dataclass
class BandlimitedConfig(AuxConfig, max_steps=3, eval_every=1, output_dir="runs/bandlimited"):
    """A step is one width of the scan (max_steps at most len(widths))."""

    omega: float = field(
        default=20.0, metadata={"help": "Band Omega: a_j ~ U[-Omega, Omega]^d, b_j ~ U[-Omega, Omega]."}
    )
    widths: list[int] = field(
        default_factory=lambda: [100, 400, 1600],
        metadata={"help": "Width scan: step i fits the first widths[i] hidden units (increasing)."},
    )
    frequencies: list[float] = field(
        default_factory=lambda: [1, 4, 16, 64], metadata={"help": "Targets sin(k pi x), one per k, fitted together."}
    )
    activation: str = field(
        default="tanh", metadata={"help": f"Hidden activation sigma: one of {', '.join(ACTIVATIONS)}."}
    )
    ridge: float = field(default=1e-8, metadata={"help": "Ridge lambda of c = (H^T H + n lambda I)^-1 H^T y."})
    n_train: int = field(default=2000, metadata={"help": "Training points x ~ U[-1, 1]."})
    n_test: int = field(default=1000, metadata={"help": "Test points x ~ U[-1, 1]."})

    def __post_init__(self):
        self.require_choice(activation=ACTIVATIONS)
        self.require_positive("omega")
        self.require_non_negative("ridge")
        if not self.widths or any(int(w) < 1 for w in self.widths) or list(self.widths) != sorted(set(self.widths)):
            raise ValueError(f"widths must be increasing positive integers, got {self.widths!r}")
        if not self.frequencies:
            raise ValueError("frequencies must name at least one k (targets sin(k pi x))")
        self.require_at_least(1, "n_train", "n_test")
        if int(self.max_steps) > len(self.widths):
            raise ValueError(
                f"max_steps ({self.max_steps}) exceeds the {len(self.widths)} widths of the scan: one step fits one "
                f"width; set max_steps to at most {len(self.widths)} or list more widths"
            )
        super().__post_init__()


# --- pure math ------------------------------------------------------------------------------------------------


def sample_bandlimited(rng: np.random.Generator, n_units: int, dim: int, omega: float) -> tuple[np.ndarray, np.ndarray]:
    """Hidden weights a (n_units, dim) ~ U[-Omega, Omega]^dim and biases b (n_units,) ~ U[-Omega, Omega]."""
    a = rng.uniform(-omega, omega, size=(n_units, dim))
    b = rng.uniform(-omega, omega, size=n_units)
    return a, b


def hidden_features(x: np.ndarray, a: np.ndarray, b: np.ndarray, activation: str = "tanh") -> np.ndarray:
    """H[i, j] = sigma(a_j . x_i - b_j) for x (n, dim): (n, n_units)."""
    z = x @ a.T - b
    if activation == "tanh":
        return np.tanh(z)
    if activation == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, overflow-free
    if activation == "relu":
        return np.maximum(z, 0.0)
    raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")


def ridge_readout(H: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """c = (H^T H + n lambda I)^-1 H^T y, y (n,) or (n, targets): a Cholesky solve of the normal equations.

    With lambda = 0 and a rank-deficient H it falls back to the least-squares solution (scipy's lstsq). This is the
    solve scikit-learn's Ridge(alpha=n lambda, fit_intercept=False, solver="cholesky") does; written with scipy so the
    Gram matrix is formed once for every target.
    """
    n = H.shape[0]
    gram = H.T @ H
    if ridge > 0:
        gram[np.diag_indices_from(gram)] += n * ridge
        try:
            return scipy.linalg.solve(gram, H.T @ y, assume_a="pos", check_finite=False)
        except np.linalg.LinAlgError:  # not numerically positive definite: lstsq below
            pass
    return scipy.linalg.lstsq(H, y, check_finite=False)[0]


def gram_condition(H: np.ndarray, ridge: float) -> float:
    """cond(H^T H + n lambda I): from the eigenvalues of that matrix (its smallest is about n lambda once H is
    numerically rank-deficient); with lambda = 0 from the singular values of H, inf if H is rank-deficient."""
    n, width = H.shape
    if ridge > 0:
        gram = H.T @ H
        gram[np.diag_indices_from(gram)] += n * ridge
        e = scipy.linalg.eigvalsh(gram, check_finite=False)
        return float(e[-1] / e[0]) if e[0] > 0 else float("inf")
    s = scipy.linalg.svdvals(H, check_finite=False)
    return float((s[0] / s[-1]) ** 2) if width <= n and s[-1] > 0 else float("inf")


def sine_targets(x: np.ndarray, frequencies: Sequence[float]) -> np.ndarray:
    """sin(k pi x_1) for each k: (n, len(frequencies))."""
    return np.sin(np.pi * x[:, :1] * np.asarray(frequencies, dtype=float)[None, :])


def mse_per_column(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.mean((pred - y) ** 2, axis=0)


# --- trainer --------------------------------------------------------------------------------------------------


def _k_name(k: float) -> str:
    return f"{k:g}".replace(".", "p")


class BandlimitedTrainer(AuxTrainer):
    """Random tanh features with a band-limited draw and a ridge readout; one step fits the next width of the scan."""

    method = "bandlimited"

    def setup(self) -> None:
        args = self.args
        # The problem and the one draw of max(widths) units come first, so a seed fixes them for every width.
        self.x_train = self.rng.uniform(-1.0, 1.0, size=(args.n_train, 1))
        self.x_test = self.rng.uniform(-1.0, 1.0, size=(args.n_test, 1))
        self.y_train = sine_targets(self.x_train, args.frequencies)
        self.y_test = sine_targets(self.x_test, args.frequencies)
        self.a, self.b = sample_bandlimited(self.rng, max(args.widths), 1, args.omega)
        self.c = None  # the readout of the current width: (width, len(frequencies))
        self.last: dict = {}

    def description(self) -> str:
        return f"bandlimited[omega={self.args.omega:g}]"

    @property
    def width(self) -> int:
        return int(self.args.widths[self.global_step - 1]) if self.global_step else 0

    def _fit(self, width: int) -> dict:
        args = self.args
        a, b = self.a[:width], self.b[:width]
        H = hidden_features(self.x_train, a, b, args.activation)
        self.c = ridge_readout(H, self.y_train, args.ridge)
        train = mse_per_column(H @ self.c, self.y_train)
        test = mse_per_column(hidden_features(self.x_test, a, b, args.activation) @ self.c, self.y_test)
        info = {"width": width, "omega": float(args.omega), "cond_gram": gram_condition(H, args.ridge)}
        for k, tr, te in zip(args.frequencies, train, test):
            info[f"train_mse_k{_k_name(k)}"] = float(tr)
            info[f"test_mse_k{_k_name(k)}"] = float(te)
        return info

    def training_step(self) -> dict:
        self.last = self._fit(int(self.args.widths[self.global_step]))
        return {}

    def predict(self, x: np.ndarray) -> np.ndarray:
        """f_N(x) for each target k at the current width: (n, len(frequencies))."""
        w = self.width
        return hidden_features(x, self.a[:w], self.b[:w], self.args.activation) @ self.c

    def evaluate(self) -> dict:
        return dict(self.last)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "last": dict(self.last), "c": None if self.c is None else self.c.copy()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.last = dict(state["last"])
        self.c = None if state["c"] is None else np.array(state["c"], dtype=float)
