"""Private-GSD: differentially private synthetic data by a genetic algorithm on statistical queries (numpy).

Paper: T. Liu, J. Tang, G. Vietri, Z. S. Wu, "Generating Private Synthetic Data with Genetic Algorithms", ICML 2023,
arXiv 2306.03257. Official code: giusevtr/private_gsd (JAX; ``models/gsd.py``: ``SimpleGAforSyncData``, ``GSD.fit``;
``stats/chained_statistics.py``: the measurements). No licence was seen there, so this is written from the paper's
description and the facts below, not copied; numpy instead of JAX so that it runs in CI.

The problem: release N' synthetic rows S whose answers to statistical queries q_1..q_m (k-way marginals on
categorical attributes, prefix queries 1[x_c <= t] on numeric attributes in [0, 1]) match those of the private
data D (n rows) under rho-zCDP.

Measurement (privacy is spent only here; see ``posttrain.data.privacy_accounting``):

* one-shot: every workload w (one marginal, or one numeric column's prefix queries) is answered with the Gaussian
  mechanism at rho/m_w each (m_w workloads), sigma_w = Delta_w / sqrt(2 rho_w), then clipped to [0, 1]
  (post-processing), as ``ChainedStatistics.private_measure_all_statistics`` does. Sensitivity (replace-one
  neighbours, n public): a k-way marginal of normalised counts moves by 1/n in at most two cells,
  Delta = sqrt(2)/n; a prefix workload of t thresholds moves by 1/n in at most t queries, Delta = sqrt(t)/n.
* adaptive (RAP++-style, ``private_select_measure_statistic``): T rounds of rho/T each; half selects the worst
  approximated workload (max absolute error of S against D) by report-noisy-max with Gumbel noise, an
  exponential mechanism with eps0 = sqrt(8 rho_sel) and score sensitivity 1/n, the other half measures it with
  the Gaussian mechanism; GSD is refit on everything measured so far.

Optimisation (post-processing, free): minimise L(S) = ||a_hat - q(S)||_2^2 by a zeroth-order genetic algorithm
(``SimpleGAforSyncData``):

* mutation candidates (50): the current best S with one cell (random row, random column) set to that column's value
  in a fresh uniformly random record;
* crossover candidates (50): the best S with one attribute of one row replaced by that attribute of a random row of a
  random elite data set; numeric values get N(0, 1) noise and are clipped to [0, 1] first (as the official code);
* incremental fitness: q(S') = q(S) + (q(added row) - q(removed row)) / N', so a candidate costs O(#queries);
* selection: an archive of the 5 best data sets seen (elite), and the best is replaced when a candidate improves
  on it; the elite starts as 5 uniformly random data sets;
* early stop when the best fitness has not improved for ``early_stop_window`` generations (official default: N').

Reconstruction choices: the mutated row is drawn uniformly (the official code draws it from a window of a fixed
permutation; with one row per candidate the two agree in law); the built-in data (``latent_categorical``) is a
toy of ours (attributes correlated through a latent class), not one of the paper's ACS tasks.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from posttrain.atomic import write_text_atomic
from posttrain.trainers.classic.base import AuxConfig, AuxTrainer

from .privacy_accounting import (
    ZCDPAccountant,
    exponential_mechanism_epsilon,
    gaussian_sigma,
    rho_for_eps_delta,
)

MEASUREMENTS = ("one_shot", "adaptive")


# --------------------------------------------------------------------------------------------------------- config


@dataclass
class PrivateGSDConfig(AuxConfig, max_steps=4000, eval_every=250):
    """A step is one generation."""

    rho: float = field(default=0.5, metadata={"help": "Total zCDP budget rho (ignored when epsilon is set)."})
    epsilon: float = field(
        default=0.0, metadata={"help": "If > 0: the budget as (epsilon, delta)-DP, turned into the largest rho."}
    )
    delta: float = field(default=1e-5, metadata={"help": "delta of the reported (epsilon, delta) guarantee."})
    measurement: str = field(
        default="one_shot", metadata={"help": "one_shot: all workloads at once; adaptive: select-and-measure rounds."}
    )
    adaptive_rounds: int = field(
        default=10, metadata={"help": "Adaptive: rounds (one workload selected and measured per round)."}
    )
    num_rows: int = field(default=3000, metadata={"help": "Rows of the built-in private data set D."})
    num_categorical: int = field(default=6, metadata={"help": "Categorical attributes of the built-in data."})
    num_values: int = field(default=3, metadata={"help": "Values per categorical attribute of the built-in data."})
    num_numeric: int = field(
        default=0, metadata={"help": "Numeric attributes in [0, 1] of the built-in data (queried by prefixes)."}
    )
    marginal_k: int = field(default=2, metadata={"help": "Way of the marginal queries on categorical attributes."})
    prefix_thresholds: int = field(
        default=20, metadata={"help": "Prefix queries 1[x <= t] per numeric attribute, t = 1/T .. 1."}
    )
    synthetic_rows: int = field(default=300, metadata={"help": "N': rows of the synthetic data set."})
    mutations: int = field(default=50, metadata={"help": "Mutation candidates per generation (paper: 50)."})
    crossovers: int = field(default=50, metadata={"help": "Crossover candidates per generation (paper: 50)."})
    elite_size: int = field(default=5, metadata={"help": "Data sets in the elite archive (paper: 5)."})
    early_stop_window: int = field(
        default=0, metadata={"help": "Stop after this many generations without improvement (0: N', the paper's)."}
    )

    def __post_init__(self):
        if self.measurement not in MEASUREMENTS:
            raise ValueError(f"measurement must be one of {', '.join(MEASUREMENTS)}, got {self.measurement!r}")
        if self.epsilon < 0 or (self.epsilon == 0 and not self.rho > 0):
            raise ValueError(f"rho must be > 0 (or set epsilon > 0), got rho={self.rho}, epsilon={self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        self.require_at_least(2, "num_rows", "num_values", "synthetic_rows")
        self.require_at_least(
            1, "mutations", "crossovers", "elite_size", "adaptive_rounds", "prefix_thresholds", "marginal_k"
        )
        if self.num_categorical + self.num_numeric < 1:
            raise ValueError("num_categorical + num_numeric must be >= 1")
        if self.num_categorical and not 1 <= self.marginal_k <= self.num_categorical:
            raise ValueError(
                f"marginal_k must be in [1, num_categorical={self.num_categorical}], got {self.marginal_k}"
            )
        if self.early_stop_window < 0:
            raise ValueError(f"early_stop_window must be >= 0, got {self.early_stop_window}")
        super().__post_init__()

    @property
    def rho_budget(self) -> float:
        return rho_for_eps_delta(self.epsilon, self.delta) if self.epsilon > 0 else self.rho


# ------------------------------------------------------------------------------------------------------ pure math


def latent_categorical(
    num_rows: int, num_categorical: int, num_values: int, num_numeric: int, seed: int
) -> tuple[np.ndarray, list]:
    """The built-in private data: a latent class z uniform on num_values; each categorical attribute equals z with
    probability 0.6, else a uniform value; each numeric attribute is Beta(2 + 3z, 2 + 3(K - 1 - z)). Returns the
    (n, d) float matrix (categorical columns hold integer codes) and the domain: an int (values) or "numeric"."""
    rng = np.random.default_rng(seed)
    z = rng.integers(num_values, size=num_rows)
    cols = []
    for _ in range(num_categorical):
        keep = rng.random(num_rows) < 0.6
        cols.append(np.where(keep, z, rng.integers(num_values, size=num_rows)))
    for _ in range(num_numeric):
        cols.append(rng.beta(2 + 3 * z, 2 + 3 * (num_values - 1 - z)))
    domain = [num_values] * num_categorical + ["numeric"] * num_numeric
    return np.stack(cols, axis=1).astype(float), domain


@dataclass
class QuerySet:
    """Workloads of linear statistics: each is ("marginal", columns, sizes) or ("prefix", column, thresholds).
    ``row_statistics`` gives every row's indicator vector, so q(S) is its mean over rows."""

    domain: list
    workloads: list
    slices: list  # (start, stop) of each workload in the statistics vector

    @classmethod
    def build(cls, domain: list, marginal_k: int, prefix_thresholds: int) -> "QuerySet":
        cat = [i for i, s in enumerate(domain) if s != "numeric"]
        num = [i for i, s in enumerate(domain) if s == "numeric"]
        workloads = [("marginal", c, tuple(domain[i] for i in c)) for c in itertools.combinations(cat, marginal_k)]
        workloads += [("prefix", (i,), np.arange(1, prefix_thresholds + 1) / prefix_thresholds) for i in num]
        slices, start = [], 0
        for kind, _, p in workloads:
            size = int(np.prod(p)) if kind == "marginal" else len(p)
            slices.append((start, start + size))
            start += size
        return cls(domain, workloads, slices)

    @property
    def size(self) -> int:
        return self.slices[-1][1] if self.slices else 0

    def sensitivity(self, w: int, n: int) -> float:
        """L2 sensitivity of workload w on n rows (replace-one neighbours)."""
        kind, _, p = self.workloads[w]
        return (math.sqrt(2.0) if kind == "marginal" else math.sqrt(len(p))) / n

    def row_statistics(self, X: np.ndarray) -> np.ndarray:
        out = np.zeros((len(X), self.size))
        marg = [w for w, (kind, _, _) in enumerate(self.workloads) if kind == "marginal"]
        if marg:  # all k-way marginals at once: mixed-radix cell index of each row in each workload
            if not hasattr(self, "_cols"):
                self._cols = np.array([self.workloads[w][1] for w in marg])  # (W, k)
                sizes = np.array([self.workloads[w][2] for w in marg])
                self._radix = np.concatenate([np.cumprod(sizes[:, :0:-1], axis=1)[:, ::-1], np.ones((len(marg), 1))], 1)
                self._offsets = np.array([self.slices[w][0] for w in marg])
            codes = X[:, self._cols].astype(np.int64)  # (n, W, k)
            cells = (codes * self._radix.astype(np.int64)).sum(-1) + self._offsets  # (n, W)
            out[np.arange(len(X))[:, None], cells] = 1.0
        for (kind, cols, p), (a, b) in zip(self.workloads, self.slices):
            if kind == "prefix":
                out[:, a:b] = X[:, cols[0], None] <= p[None, :] + 1e-12
        return out

    def answers(self, X: np.ndarray) -> np.ndarray:
        return self.row_statistics(X).mean(axis=0)

    def workload_max_errors(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.array([np.abs(x[a:b] - y[a:b]).max() for a, b in self.slices])


def random_rows(domain: list, count: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random records over the domain (categorical codes uniform, numeric uniform on [0, 1])."""
    cols = [rng.integers(s, size=count) if s != "numeric" else rng.random(count) for s in domain]
    return np.stack(cols, axis=1).astype(float)


def gaussian_measure(
    answers: np.ndarray, queries: QuerySet, workloads: list, rho_each: float, n: int, rng: np.random.Generator
) -> dict:
    """The Gaussian mechanism on each listed workload at ``rho_each`` zCDP: {w: noisy answers clipped to [0, 1]}."""
    out = {}
    for w in workloads:
        a, b = queries.slices[w]
        sigma = gaussian_sigma(rho_each, queries.sensitivity(w, n))
        out[w] = np.clip(answers[a:b] + rng.normal(0.0, sigma, size=b - a), 0.0, 1.0)
    return out


def report_noisy_max(scores: np.ndarray, epsilon: float, sensitivity: float, rng: np.random.Generator) -> int:
    """The exponential mechanism P(i) ~ exp(eps s_i / (2 Delta)) sampled as argmax of s_i eps / (2 Delta) + Gumbel."""
    return int(np.argmax(scores * epsilon / (2.0 * sensitivity) + rng.gumbel(size=len(scores))))


def l2_fitness(target: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """L(S) = ||a_hat - q(S)||^2 over the measured statistics (stats: (..., m))."""
    return ((target - stats) ** 2).sum(axis=-1)


class GeneticSD:
    """The genetic search state: best data set and its statistics, elite archive with fitness (numpy)."""

    def __init__(self, queries: QuerySet, n_rows: int, elite_size: int, rng: np.random.Generator):
        self.q, self.n = queries, n_rows
        self.archive = np.stack([random_rows(queries.domain, n_rows, rng) for _ in range(elite_size)])
        self.numeric = np.array([s == "numeric" for s in queries.domain])
        self.mask = None  # the statistics measured so far (bool over all queries)

    def set_target(self, target: np.ndarray, mask: np.ndarray) -> None:
        """New measurements: fitness is recomputed for the archive; the best becomes the archive's best."""
        self.target, self.mask = target, mask
        self.archive_stats = np.stack([self.q.answers(X) for X in self.archive])
        self.archive_fitness = l2_fitness(target[mask], self.archive_stats[:, mask])
        i = int(np.argmin(self.archive_fitness))
        self.best, self.best_stats, self.best_fitness = self.archive[i].copy(), self.archive_stats[i].copy(), None
        self.best_fitness = float(self.archive_fitness[i])

    def candidates(self, mutations: int, crossovers: int, rng: np.random.Generator):
        """Rows to replace in the best (index) and the rows that replace them, mutations first."""
        n, d = self.best.shape
        rows = rng.integers(n, size=mutations + crossovers)
        added = self.best[rows].copy()
        mcol = rng.integers(d, size=mutations)
        fresh = random_rows(self.q.domain, mutations, rng)
        added[np.arange(mutations), mcol] = fresh[np.arange(mutations), mcol]
        elite = self.archive[rng.integers(len(self.archive), size=crossovers), rng.integers(n, size=crossovers)]
        noise = rng.normal(size=elite.shape) * self.numeric
        elite = np.where(self.numeric, np.clip(elite + noise, 0.0, 1.0), elite)
        ccol = rng.integers(d, size=crossovers)
        added[mutations + np.arange(crossovers), ccol] = elite[np.arange(crossovers), ccol]
        return rows, added

    def generation(self, mutations: int, crossovers: int, rng: np.random.Generator) -> dict:
        rows, added = self.candidates(mutations, crossovers, rng)
        m = self.mask
        delta = (self.q.row_statistics(added) - self.q.row_statistics(self.best[rows])) / self.n
        stats = self.best_stats[None, :] + delta
        fitness = l2_fitness(self.target[m], stats[:, m])
        # elite archive: the elite_size best of (archive, candidates)
        pool = np.concatenate([self.archive_fitness, fitness])
        keep = np.argsort(pool, kind="stable")[: len(self.archive)]
        new_archive, new_stats = [], []
        for k in keep:
            if k < len(self.archive):
                new_archive.append(self.archive[k])
                new_stats.append(self.archive_stats[k])
            else:
                c = k - len(self.archive)
                X = self.best.copy()
                X[rows[c]] = added[c]
                new_archive.append(X)
                new_stats.append(stats[c])
        self.archive, self.archive_stats, self.archive_fitness = np.stack(new_archive), np.stack(new_stats), pool[keep]
        c = int(np.argmin(fitness))
        improved = bool(fitness[c] < self.best_fitness)
        if improved:
            self.best[rows[c]] = added[c]
            self.best_stats, self.best_fitness = stats[c].copy(), float(fitness[c])
        return {"fitness": self.best_fitness, "improved": improved}

    def state_dict(self) -> dict:
        keys = ("archive", "archive_stats", "archive_fitness", "best", "best_stats", "best_fitness", "target", "mask")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def independent_marginals_baseline(
    X: np.ndarray, domain: list, rho: float, n_rows: int, rng: np.random.Generator
) -> np.ndarray:
    """The baseline: every categorical attribute's 1-way marginal measured with the Gaussian mechanism (rho split
    evenly, clipped, renormalised), then n_rows sampled independently per attribute. Numeric attributes: their
    prefix CDF measured the same way (20 thresholds), sampled by inverse CDF within its bins."""
    queries = QuerySet.build(domain, 1, 20)
    noisy = gaussian_measure(queries.answers(X), queries, range(len(queries.workloads)), rho / len(queries.workloads),
                             len(X), rng)  # fmt: skip
    cols = []
    for w, (kind, _, p) in enumerate(queries.workloads):
        if kind == "marginal":
            prob = noisy[w] + 1e-12
            cols.append(rng.choice(p[0], size=n_rows, p=prob / prob.sum()))
        else:
            cdf = np.maximum.accumulate(noisy[w])
            mass = np.diff(np.concatenate([[0.0], cdf / max(cdf[-1], 1e-12)])) + 1e-12
            b = rng.choice(len(p), size=n_rows, p=mass / mass.sum())
            cols.append((b + rng.random(n_rows)) / len(p))
    order = np.argsort([c for _, (c,), _ in queries.workloads])
    return np.stack([cols[i] for i in order], axis=1).astype(float)


def max_marginal_error(queries: QuerySet, X: np.ndarray, S: np.ndarray) -> float:
    """The max absolute error over all queries of ``queries`` between data sets X and S."""
    return float(np.abs(queries.answers(X) - queries.answers(S)).max())


# --------------------------------------------------------------------------------------------------------- trainer


class PrivateGSDTrainer(AuxTrainer):
    """A step is one generation. Measurement happens in ``setup`` (one-shot) or at the start of each round (adaptive);
    the accountant refuses any spend over the budget. Writes ``synthetic.jsonl`` (the released rows) beside
    ``results.json``, whose ``final`` holds the privacy report. The guarantee covers ``synthetic.jsonl``, the loss
    and ``max_error_vs_measured``; ``max_error`` and ``noise_floor`` compare against the private data itself (the
    experiment's evaluation) and are not private: do not release them."""

    method = "private_gsd"

    def setup(self) -> None:
        a = self.args
        self.X, self.domain = latent_categorical(a.num_rows, a.num_categorical, a.num_values, a.num_numeric, a.seed)
        self.queries = QuerySet.build(self.domain, a.marginal_k, a.prefix_thresholds)
        self.true = self.queries.answers(self.X)
        self.accountant = ZCDPAccountant(a.rho_budget)
        self.noisy = np.zeros(self.queries.size)
        self.mask = np.zeros(self.queries.size, dtype=bool)
        self.window = a.early_stop_window or a.synthetic_rows
        self.stall, self.round = 0, 0
        self.gsd = GeneticSD(self.queries, a.synthetic_rows, a.elite_size, self.rng)
        n_w = len(self.queries.workloads)
        if a.measurement == "one_shot":
            rho_each = a.rho_budget / n_w
            self._record(
                gaussian_measure(self.true, self.queries, range(n_w), rho_each, a.num_rows, self.rng), rho_each
            )
        else:
            self.rounds_at = set(np.linspace(0, a.max_steps, a.adaptive_rounds, endpoint=False).astype(int).tolist())
            self._adaptive_round()

    def _record(self, measured: dict, rho_each: float) -> None:
        for w, values in measured.items():
            a, b = self.queries.slices[w]
            self.accountant.spend(rho_each, f"gaussian:workload {w}")
            self.noisy[a:b], self.mask[a:b] = values, True
        self.gsd.set_target(self.noisy, self.mask)
        self.stall = 0

    def _adaptive_round(self) -> None:
        a = self.args
        rho_half = a.rho_budget / (2 * a.adaptive_rounds)
        errors = self.queries.workload_max_errors(self.true, self.gsd.best_stats if self.mask.any() else
                                                  self.queries.answers(self.gsd.archive[0]))  # fmt: skip
        measured = [w for w in range(len(self.queries.workloads)) if self.mask[self.queries.slices[w][0]]]
        errors[measured] = -np.inf  # as the official code: a measured workload is not selected again
        if len(measured) == len(self.queries.workloads):
            errors[:] = 0.0  # everything measured: the selection still runs (and is paid for), uniformly
        self.accountant.spend(rho_half, f"exponential:round {self.round}")
        w = report_noisy_max(errors, exponential_mechanism_epsilon(rho_half), 1.0 / a.num_rows, self.rng)
        self._record(gaussian_measure(self.true, self.queries, [w], rho_half, a.num_rows, self.rng), rho_half)
        self.round += 1

    def training_step(self) -> dict:
        a = self.args
        if a.measurement == "adaptive" and self.global_step in self.rounds_at and self.global_step > 0:
            self._adaptive_round()
        info = self.gsd.generation(a.mutations, a.crossovers, self.rng)
        self.stall = 0 if info["improved"] else self.stall + 1
        return {"loss": info["fitness"]}

    def done(self) -> bool:
        if self.args.measurement == "adaptive" and self.round < self.args.adaptive_rounds:
            return False
        return self.stall >= self.window

    def evaluate(self) -> dict:
        best = self.gsd.best_stats
        m = self.mask
        return {
            "loss": float(self.gsd.best_fitness),
            "max_error_vs_measured": float(np.abs(best[m] - self.noisy[m]).max()),
            "max_error": float(np.abs(best - self.true).max()),
            "noise_floor": float(np.abs(self.noisy[m] - self.true[m]).max()),
            "rho_spent": self.accountant.spent,
        }

    def privacy_report(self) -> dict:
        return self.accountant.report(self.args.delta)

    def synthetic_rows(self) -> list[dict]:
        return [
            {f"a{j}": (int(v) if s != "numeric" else float(v)) for j, (v, s) in enumerate(zip(row, self.domain))}
            for row in self.gsd.best
        ]

    def write_results(self, final: dict) -> None:
        final.update(privacy=self.privacy_report())
        super().write_results(final)
        text = "".join(json.dumps(r) + "\n" for r in self.synthetic_rows())
        write_text_atomic(Path(self.args.output_dir) / "synthetic.jsonl", text)

    def description(self) -> str:
        return f"private_gsd ({self.args.measurement}, rho={self.args.rho_budget:.4g})"

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "gsd": self.gsd.state_dict(),
            "noisy": self.noisy,
            "mask": self.mask,
            "accountant": self.accountant.state_dict(),
            "stall": self.stall,
            "round": self.round,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.gsd.load_state_dict(state["gsd"])
        self.noisy, self.mask = state["noisy"], state["mask"]
        self.accountant = ZCDPAccountant.from_state(state["accountant"])
        self.stall, self.round = int(state["stall"]), int(state["round"])


def synthesize(
    rows: np.ndarray, domain: list, cfg: PrivateGSDConfig, seed: Optional[int] = None
) -> tuple[np.ndarray, dict]:
    """The data-stage entry point on an encoded matrix (categorical codes 0..size-1, numeric in [0, 1]) with a
    *public* domain: one-shot Private-GSD for ``cfg.max_steps`` generations (or the early stop). Returns the
    synthetic rows and the report (privacy spent, errors)."""
    rows = np.asarray(rows, dtype=float)
    for j, s in enumerate(domain):
        bad = (rows[:, j] < 0) | (rows[:, j] > (1 if s == "numeric" else s - 1))
        if s != "numeric":
            bad |= rows[:, j] != np.round(rows[:, j])
        if bad.any():
            raise ValueError(f"column {j}: row {int(np.argmax(bad))} is outside its domain {s!r}")
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    queries = QuerySet.build(domain, cfg.marginal_k, cfg.prefix_thresholds)
    true = queries.answers(rows)
    accountant = ZCDPAccountant(cfg.rho_budget)
    n_w = len(queries.workloads)
    noisy = np.zeros(queries.size)
    for w, values in gaussian_measure(true, queries, range(n_w), cfg.rho_budget / n_w, len(rows), rng).items():
        accountant.spend(cfg.rho_budget / n_w, f"gaussian:workload {w}")
        a, b = queries.slices[w]
        noisy[a:b] = values
    gsd = GeneticSD(queries, cfg.synthetic_rows, cfg.elite_size, rng)
    gsd.set_target(noisy, np.ones(queries.size, dtype=bool))
    stall, window = 0, cfg.early_stop_window or cfg.synthetic_rows
    for _ in range(cfg.max_steps):
        stall = 0 if gsd.generation(cfg.mutations, cfg.crossovers, rng)["improved"] else stall + 1
        if stall >= window:
            break
    return gsd.best.copy(), {
        "privacy": accountant.report(cfg.delta),
        "max_error_vs_measured": float(np.abs(gsd.best_stats - noisy).max()),  # post-processing: private
        # these two read the private data: for the owner's evaluation, NOT covered by the guarantee; never release
        "non_private_diagnostics": {
            "max_error": float(np.abs(gsd.best_stats - true).max()),
            "noise_floor": float(np.abs(noisy - true).max()),
        },
    }


def synthesize_dataset(dataset, domain: dict, cfg: PrivateGSDConfig, seed: Optional[int] = None):
    """The data stage on a ``datasets.Dataset``: ``domain`` maps each released column to its public list of values
    (categorical) or to ``"numeric"`` (values in [0, 1]); other columns are dropped. Returns (a Dataset of
    ``cfg.synthetic_rows`` synthetic rows with those columns, the report)."""
    from datasets import Dataset

    missing = [c for c in domain if c not in dataset.column_names]
    if missing:
        raise ValueError(f"domain names columns {missing} that are not in the dataset ({dataset.column_names})")
    cols, sizes = [], []
    for name, values in domain.items():
        data = dataset[name]
        if values == "numeric":
            cols.append(np.asarray(data, dtype=float))
            sizes.append("numeric")
            continue
        index = {v: i for i, v in enumerate(values)}
        unknown = next((r for r, v in enumerate(data) if v not in index), None)
        if unknown is not None:
            raise ValueError(
                f"column '{name}' row {unknown}: value {data[unknown]!r} is not in its public domain {list(values)}"
            )
        cols.append(np.array([index[v] for v in data], dtype=float))
        sizes.append(len(values))
    S, report = synthesize(np.stack(cols, axis=1), sizes, cfg, seed)
    out = {}
    for j, (name, values) in enumerate(domain.items()):
        out[name] = S[:, j].tolist() if values == "numeric" else [values[int(v)] for v in S[:, j]]
    return Dataset.from_dict(out), report
