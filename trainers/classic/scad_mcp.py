"""SCAD / MCP penalised linear regression by accelerated gradient, after optional mutual-information screening.

Source: K. Yang, PhD thesis "Contributions to Robust and Efficient Methods for Analysis of High Dimensional Data"
(McGill, 2025), manuscript 2, arXiv 2009.10629 ("Accelerated gradient methods for sparse statistical learning with
nonconvex penalties"); the author's package is nonconvexAG (AGPL: nothing of it is copied; written here from the math).
The third manuscript (a Tsallis / q-Gaussian robust mixed-effects model fitted by proximal nonlinear conjugate
gradient) is not implemented: no text or code of it was available.

Problem: min_beta F(beta) = f(beta) + sum_j p_lambda(|beta_j|),  f(beta) = ||y - X beta||^2 / (2n), with the columns of
X standardised (mean 0, x_j^T x_j / n = 1) and y centred, so L = ||X||_2^2 / n is the Lipschitz constant of grad f.

- SCAD (Fan & Li 2001), a = 3.7:  p(t) = lambda t (t <= lambda); (2 a lambda t - t^2 - lambda^2) / (2(a - 1))
  (lambda < t <= a lambda); lambda^2 (a + 1) / 2 (t > a lambda);  p'(t) = lambda [1(t <= lambda) + (a lambda - t)_+ /
  ((a - 1) lambda) 1(t > lambda)].
- MCP (Zhang 2010), gamma = 3:  p(t) = lambda t - t^2 / (2 gamma) (t <= gamma lambda); gamma lambda^2 / 2 otherwise.
- Their proximal maps for a step eta (closed form while eta < a - 1, resp. eta < gamma):
      SCAD: S(z, eta lambda) for |z| <= (1 + eta) lambda; sign(z) ((a - 1)|z| - eta a lambda) / (a - 1 - eta) for
            |z| <= a lambda; z beyond;
      MCP:  S(z, eta lambda) / (1 - eta / gamma) for |z| <= gamma lambda (firm thresholding); z beyond.
  At eta = 1 these are the univariate solutions that coordinate descent uses (Breheny & Huang 2011).
- ISTA: beta <- prox_{eta}(beta - eta grad f(beta)), eta = 1/L.
- AG, the accelerated gradient method for nonconvex composite problems of Ghadimi & Lan (2016, Algorithm 2), which
  the thesis applies to SCAD / MCP:
      alpha_k = 2 / (k + 1)
      x_md = (1 - alpha_k) x_ag + alpha_k x
      x    = prox_{lambda_k}(x - lambda_k grad f(x_md))
      x_ag = prox_{beta_k}(x_md - beta_k grad f(x_md))
  with beta_k = ``ag_step`` / L and lambda_k = (1 + alpha_k / 4) beta_k (the upper end of the range Ghadimi & Lan
  allow, lambda_k in [beta_k, (1 + alpha_k / 4) beta_k]). Their bound uses beta_k = 1/(2L); the default here is
  1/L, because at 1/(2L) AG is about twice as slow as ISTA on this problem (measured; EXPERIMENTS.md). Restart
  (``ag_restart``, on by default): when F(x_ag) would increase, the step is dropped, x <- x_ag and k <- 1 (the next
  step is then a plain proximal-gradient step, so F never increases). Plain AG is not monotone and, on a nonconvex
  penalty, can settle in a worse stationary point (it does after MI screening in the tests). The thesis's package
  speaks of "restarting accelerated gradient"; its exact restart rule and step sizes are UNVERIFIED. The iterate
  reported is x_ag.
- The reference f* is a long coordinate-descent run (Breheny & Huang 2011) from the same start.

A run (``ScadMCPTrainer``): draw the synthetic problem (n = 200, p = 500, s = 10 coefficients of +-1 at random
positions, AR(1) design correlation rho^|i - j| with rho = 0.3 (the design is only given as "correlation 0.3";
AR(1) is this file's reading), noise sd ``noise``), optionally screen the features (``screen: mi | pearson``; the
data stage ``posttrain.data.mi_screening``), choose lambda on a validation split of the same size (a warm-started
coordinate-descent path over ``path_points`` values from lambda_max down), then one step is one iteration of the
chosen solver at that lambda from beta = 0. Logged: F - f*, support F1 against the true support, validation MSE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from posttrain.data.mi_screening import MIScreenConfig, screen_features
from posttrain.trainers.classic.base import AuxConfig, AuxTrainer

PENALTIES = ("scad", "mcp")
SOLVERS = ("ag", "ista")
SCREENS = ("none", "mi", "pearson")


@dataclass
class ScadMCPConfig(AuxConfig, max_steps=2000, eval_every=10, output_dir="runs/scad_mcp"):
    """A step is one solver iteration at the chosen lambda."""

    penalty: str = field(default="scad", metadata={"help": "scad or mcp."})
    solver: str = field(default="ag", metadata={"help": "ag (accelerated gradient, Ghadimi & Lan) or ista."})
    a: float = field(default=3.7, metadata={"help": "SCAD's a (> 2)."})
    gamma: float = field(default=3.0, metadata={"help": "MCP's gamma (> 1)."})
    lambd: float = field(default=0.0, metadata={"help": "Penalty level lambda; 0: chosen on the validation split."})
    path_points: int = field(default=30, metadata={"help": "Lambda values on the path (log-spaced, lambda_max down)."})
    path_min_ratio: float = field(default=0.05, metadata={"help": "Smallest lambda on the path / lambda_max."})
    n: int = field(default=200, metadata={"help": "Training samples (the validation split has as many)."})
    p: int = field(default=500, metadata={"help": "Features."})
    s: int = field(default=10, metadata={"help": "True nonzero coefficients (each +1 or -1)."})
    rho: float = field(default=0.3, metadata={"help": "AR(1) design correlation: corr(x_i, x_j) = rho^|i - j|."})
    noise: float = field(default=1.0, metadata={"help": "Noise standard deviation."})
    ag_step: float = field(
        default=1.0,
        metadata={
            "help": "AG's beta_k times L. Ghadimi & Lan's bound uses 1/2; at 1/2 AG needs about twice ISTA's "
            "iterations here, at 1 it needs fewer (see EXPERIMENTS.md)."
        },
    )
    ag_restart: bool = field(
        default=True,
        metadata={"help": "Restart AG's momentum (drop the step, k <- 1) whenever the objective would increase."},
    )
    reference_sweeps: int = field(default=20000, metadata={"help": "Coordinate-descent sweeps for f*, at most."})
    stop_gap: float = field(default=0.0, metadata={"help": "Stop once F - f* <= this (0: run max_steps)."})
    screen: str = field(
        default="none", metadata={"help": "Screen the features first: none, mi (mutual information) or pearson."}
    )
    screen_top: int = field(default=0, metadata={"help": "Features the screen keeps; 0: floor(n / log n)."})
    screen_grid: int = field(default=128, metadata={"help": "KDE grid points per axis of the MI estimate."})
    screen_bandwidth: str = field(default="scott", metadata={"help": "scott, silverman or a number (in sds)."})
    screen_kernel: str = field(default="gaussian", metadata={"help": "gaussian or epa."})

    def __post_init__(self):
        for name, valid in (("penalty", PENALTIES), ("solver", SOLVERS), ("screen", SCREENS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
        if not self.a > 2:
            raise ValueError(f"a must be > 2 (SCAD), got {self.a!r}")
        if not self.gamma > 1:
            raise ValueError(f"gamma must be > 1 (MCP), got {self.gamma!r}")
        self.require_at_least(1, "n", "p", "s", "path_points", "reference_sweeps")
        if self.s > self.p:
            raise ValueError(f"s ({self.s}) must be <= p ({self.p})")
        if not 0 <= self.rho < 1:
            raise ValueError(f"rho must be in [0, 1), got {self.rho!r}")
        if not 0 < self.path_min_ratio < 1:
            raise ValueError(f"path_min_ratio must be in (0, 1), got {self.path_min_ratio!r}")
        if not 0 < self.ag_step <= 1:
            raise ValueError(f"ag_step must be in (0, 1] (beta_k L), got {self.ag_step!r}")
        self.require_non_negative("lambd", "noise", "stop_gap")
        self.screen_config()  # checks the screen_* keys
        super().__post_init__()

    def screen_config(self) -> MIScreenConfig:
        method = "mi" if self.screen == "none" else self.screen
        return MIScreenConfig(
            method=method,
            top=self.screen_top,
            grid=self.screen_grid,
            bandwidth=self.screen_bandwidth,
            kernel=self.screen_kernel,
            target="continuous",
        )


# --- pure math: penalties and their proximal maps ---------------------------------------------------------------


def soft(z: np.ndarray, tau: float) -> np.ndarray:
    return np.sign(z) * np.maximum(np.abs(z) - tau, 0.0)


def scad_penalty(t: np.ndarray, lambd: float, a: float = 3.7) -> np.ndarray:
    t = np.abs(t)
    mid = (2 * a * lambd * t - t * t - lambd * lambd) / (2 * (a - 1))
    return np.where(t <= lambd, lambd * t, np.where(t <= a * lambd, mid, lambd * lambd * (a + 1) / 2))


def scad_derivative(t: np.ndarray, lambd: float, a: float = 3.7) -> np.ndarray:
    """p'(t) = lambda [1(t <= lambda) + (a lambda - t)_+ / ((a - 1) lambda) 1(t > lambda)], t >= 0."""
    return lambd * np.where(t <= lambd, 1.0, np.maximum(a * lambd - t, 0.0) / ((a - 1) * lambd))


def mcp_penalty(t: np.ndarray, lambd: float, gamma: float = 3.0) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= gamma * lambd, lambd * t - t * t / (2 * gamma), gamma * lambd * lambd / 2)


def mcp_derivative(t: np.ndarray, lambd: float, gamma: float = 3.0) -> np.ndarray:
    """p'(t) = (lambda - t / gamma)_+, t >= 0."""
    return np.maximum(lambd - t / gamma, 0.0)


def prox_scad(z: np.ndarray, lambd: float, a: float, eta: float) -> np.ndarray:
    """argmin_b (b - z)^2 / (2 eta) + p_scad(|b|); needs eta < a - 1."""
    if not eta < a - 1:
        raise ValueError(f"the SCAD prox needs eta < a - 1, got eta {eta} with a {a}")
    u = np.abs(z)
    mid = np.sign(z) * ((a - 1) * u - eta * a * lambd) / (a - 1 - eta)
    return np.where(u <= (1 + eta) * lambd, soft(z, eta * lambd), np.where(u <= a * lambd, mid, z))


def prox_mcp(z: np.ndarray, lambd: float, gamma: float, eta: float) -> np.ndarray:
    """argmin_b (b - z)^2 / (2 eta) + p_mcp(|b|) (firm thresholding); needs eta < gamma."""
    if not eta < gamma:
        raise ValueError(f"the MCP prox needs eta < gamma, got eta {eta} with gamma {gamma}")
    return np.where(np.abs(z) <= gamma * lambd, soft(z, eta * lambd) / (1 - eta / gamma), z)


@dataclass
class Penalty:
    kind: str
    lambd: float
    a: float = 3.7
    gamma: float = 3.0

    def value(self, beta: np.ndarray) -> float:
        if self.kind == "scad":
            return float(scad_penalty(beta, self.lambd, self.a).sum())
        return float(mcp_penalty(beta, self.lambd, self.gamma).sum())

    def prox(self, z: np.ndarray, eta: float) -> np.ndarray:
        if self.kind == "scad":
            return prox_scad(z, self.lambd, self.a, eta)
        return prox_mcp(z, self.lambd, self.gamma, eta)


# --- pure math: least squares and the three solvers -------------------------------------------------------------


def objective(X: np.ndarray, y: np.ndarray, beta: np.ndarray, pen: Penalty) -> float:
    """F(beta) = ||y - X beta||^2 / (2n) + sum_j p(|beta_j|)."""
    r = y - X @ beta
    return float(r @ r) / (2 * len(y)) + pen.value(beta)


def gradient(X: np.ndarray, y: np.ndarray, beta: np.ndarray) -> np.ndarray:
    return -(X.T @ (y - X @ beta)) / len(y)


def lipschitz(X: np.ndarray) -> float:
    return float(np.linalg.norm(X, 2) ** 2) / X.shape[0]


class ISTA:
    """Proximal gradient with the constant step 1/L."""

    def __init__(self, X: np.ndarray, y: np.ndarray, pen: Penalty, beta0: np.ndarray):
        self.X, self.y, self.pen, self.eta = X, y, pen, 1.0 / lipschitz(X)
        self.beta = beta0.copy()

    def step(self) -> np.ndarray:
        self.beta = self.pen.prox(self.beta - self.eta * gradient(self.X, self.y, self.beta), self.eta)
        return self.beta

    def state(self) -> dict:
        return {"beta": self.beta.copy()}

    def load(self, state: dict) -> None:
        self.beta = np.array(state["beta"])


class AcceleratedGradient:
    """Ghadimi & Lan (2016) Algorithm 2 for f + h with f smooth (possibly nonconvex) and h with a cheap prox."""

    def __init__(
        self, X: np.ndarray, y: np.ndarray, pen: Penalty, beta0: np.ndarray, step: float = 1.0, restart: bool = True
    ):
        self.X, self.y, self.pen, self.restart = X, y, pen, restart
        self.beta_k = step / lipschitz(X)
        self.x, self.beta, self.k = beta0.copy(), beta0.copy(), 1  # self.beta is x_ag
        self.f_last = objective(X, y, self.beta, pen)

    def step(self) -> np.ndarray:
        alpha = 2.0 / (self.k + 1)
        lam = (1 + alpha / 4) * self.beta_k
        x_md = (1 - alpha) * self.beta + alpha * self.x
        g = gradient(self.X, self.y, x_md)
        self.x = self.pen.prox(self.x - lam * g, lam)
        x_ag = self.pen.prox(x_md - self.beta_k * g, self.beta_k)
        self.k += 1
        if self.restart:
            f = objective(self.X, self.y, x_ag, self.pen)
            if f > self.f_last:  # the momentum overshot: drop the step, restart from x_ag (k = 1 is a plain prox step)
                self.x, self.k = self.beta.copy(), 1
                return self.beta
            self.f_last = f
        self.beta = x_ag
        return self.beta

    def state(self) -> dict:
        return {"x": self.x.copy(), "beta": self.beta.copy(), "k": self.k, "f_last": self.f_last}

    def load(self, state: dict) -> None:
        self.x, self.beta = np.array(state["x"]), np.array(state["beta"])
        self.k, self.f_last = int(state["k"]), float(state["f_last"])


def coordinate_descent(
    X: np.ndarray, y: np.ndarray, pen: Penalty, beta0: np.ndarray, tol: float = 1e-12, max_sweeps: int = 10000
) -> np.ndarray:
    """Cyclic coordinate descent (Breheny & Huang 2011), standardised columns: beta_j = prox_1(x_j^T r / n + beta_j)."""
    n = len(y)
    beta = beta0.copy()
    r = y - X @ beta
    active = np.arange(X.shape[1])
    for sweep in range(max_sweeps):
        full = sweep % 10 == 0  # every tenth sweep visits all coordinates, the others only the nonzero ones
        cols = active if full else np.flatnonzero(beta)
        moved = 0.0
        for j in cols:
            z = X[:, j] @ r / n + beta[j]
            b = float(pen.prox(np.array(z), 1.0))
            if b != beta[j]:
                r -= (b - beta[j]) * X[:, j]
                moved = max(moved, abs(b - beta[j]))
                beta[j] = b
        if full and moved <= tol:
            break
    return beta


def lambda_max(X: np.ndarray, y: np.ndarray) -> float:
    """The smallest lambda with beta = 0 a stationary point: max_j |x_j^T y| / n."""
    return float(np.abs(X.T @ y).max()) / len(y)


def support_f1(beta_hat: np.ndarray, beta_true: np.ndarray) -> float:
    found, truth = beta_hat != 0, beta_true != 0
    tp = int((found & truth).sum())
    return 0.0 if tp == 0 else 2 * tp / (int(found.sum()) + int(truth.sum()))


def ar1_design(n: int, p: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Rows N(0, Sigma) with Sigma_ij = rho^|i - j| (an AR(1) recursion across columns)."""
    Z = rng.standard_normal((n, p))
    X = np.empty_like(Z)
    X[:, 0] = Z[:, 0]
    for j in range(1, p):
        X[:, j] = rho * X[:, j - 1] + math.sqrt(1 - rho * rho) * Z[:, j]
    return X


# --- the trainer ------------------------------------------------------------------------------------------------


class ScadMCPTrainer(AuxTrainer):
    """SCAD / MCP regression on the synthetic problem; a step is one solver iteration at the chosen lambda."""

    method = "scad_mcp"

    def setup(self) -> None:
        a, rng = self.args, self.rng
        X = ar1_design(2 * a.n, a.p, a.rho, rng)
        beta = np.zeros(a.p)
        support = rng.choice(a.p, size=a.s, replace=False)
        beta[support] = rng.choice([-1.0, 1.0], size=a.s)
        y = X @ beta + a.noise * rng.standard_normal(2 * a.n)
        Xtr, ytr, Xva, yva = X[: a.n], y[: a.n], X[a.n :], y[a.n :]
        self.screen_report = None
        cols = np.arange(a.p)
        if a.screen != "none":
            result = screen_features(Xtr, ytr, a.screen_config())
            cols = np.sort(result.kept)
            self.screen_report = {
                "kept": len(cols),
                "true_kept": int(np.isin(support, cols).sum()),
                "true": a.s,
            }
        mean, sd = Xtr[:, cols].mean(0), Xtr[:, cols].std(0)
        self.X, self.y = (Xtr[:, cols] - mean) / sd, ytr - ytr.mean()
        self.X_val, self.y_val = (Xva[:, cols] - mean) / sd, yva - ytr.mean()
        self.cols, self.beta_true = cols, beta
        self.lambd, self.path = (a.lambd, []) if a.lambd > 0 else self.choose_lambda()
        self.pen = Penalty(a.penalty, self.lambd, a.a, a.gamma)
        start = np.zeros(len(cols))
        self.f_star = objective(self.X, self.y, coordinate_descent(self.X, self.y, self.pen, start, 1e-13), self.pen)
        if a.solver == "ag":
            self.solver = AcceleratedGradient(self.X, self.y, self.pen, start, a.ag_step, a.ag_restart)
        else:
            self.solver = ISTA(self.X, self.y, self.pen, start)

    def choose_lambda(self) -> tuple[float, list]:
        """A warm-started coordinate-descent path; the lambda with the lowest validation MSE."""
        a = self.args
        top = lambda_max(self.X, self.y)
        grid = top * np.geomspace(1.0, a.path_min_ratio, a.path_points)
        beta, path = np.zeros(self.X.shape[1]), []
        for lam in grid:
            beta = coordinate_descent(self.X, self.y, Penalty(a.penalty, float(lam), a.a, a.gamma), beta, 1e-8, 2000)
            path.append({"lambda": float(lam), "val_mse": self.val_mse(beta), "nonzero": int((beta != 0).sum())})
        best = min(path, key=lambda row: row["val_mse"])
        return best["lambda"], path

    def val_mse(self, beta: np.ndarray) -> float:
        return float(np.mean((self.y_val - self.X_val @ beta) ** 2))

    def full_beta(self, beta: np.ndarray) -> np.ndarray:
        out = np.zeros(self.args.p)
        out[self.cols] = beta
        return out

    def description(self) -> str:
        a = self.args
        screen = "" if a.screen == "none" else f"+{a.screen}-screen"
        return f"{a.penalty}-{a.solver}{screen}"

    def gap(self) -> float:
        return objective(self.X, self.y, self.solver.beta, self.pen) - self.f_star

    def training_step(self) -> dict:
        self.solver.step()
        return {}

    def done(self) -> bool:
        return self.args.stop_gap > 0 and self.gap() <= self.args.stop_gap

    def evaluate(self) -> dict:
        beta = self.solver.beta
        out = {
            "gap": self.gap(),
            "objective": objective(self.X, self.y, beta, self.pen),
            "support_f1": support_f1(self.full_beta(beta), self.beta_true),
            "nonzero": int((beta != 0).sum()),
            "val_mse": self.val_mse(beta),
            "lambda": self.lambd,
        }
        if self.screen_report:
            out.update({f"screen/{k}": v for k, v in self.screen_report.items()})
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "solver": self.solver.state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.solver.load(state["solver"])


def iterations_to_gap(
    solver: ISTA | AcceleratedGradient,
    X: np.ndarray,
    y: np.ndarray,
    pen: Penalty,
    f_star: float,
    tol: float,
    limit: int,
) -> int:
    """Iterations until F(beta) - f* <= tol (``limit`` + 1 if never)."""
    for k in range(1, limit + 1):
        if objective(X, y, solver.step(), pen) - f_star <= tol:
            return k
    return limit + 1
