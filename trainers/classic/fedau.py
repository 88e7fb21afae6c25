"""FedAU: federated averaging under unknown, heterogeneous client participation.

Paper: S. Wang, M. Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated
Learning", ICLR 2024, arXiv 2306.03401. Official code: IBM/fedau (MIT). Written here from the math.

Client n takes part in a round with an unknown probability p_n. FedAvg divides by the number of
participants, so it converges to the p-weighted optimum instead of the true one. FedAU estimates 1/p_n
online from the gaps between participations and weights each update with it:

- Interval rule (per client, cutoff K). Participates: record the interval miss_n + 1, set miss_n = 0.
  Absent: miss_n += 1; once miss_n reaches K, record K and set miss_n = 0 (bounds error and memory).
- Weight: omega_n = mean of the recorded intervals (an estimate of 1/p_n); 1 before the first one.
  As in the official code, the interval seen in round t only affects the weights from round t+1 on.
- Aggregation: x <- x + eta_g * (1/N) * sum_{n participating} omega_n * Delta_n, divided by ALL N
  clients, not by the participants. Delta_n = (client model after I local SGD steps) - x.

The simulation is this project's quadratic benchmark (not the paper's experiment): F_n(x) = 1/2 ||x - c_n||^2, F =
mean_n F_n, so
F(x) - F(x*) = 1/2 ||x - x*||^2 with x* = mean_n c_n. A latent client type z_n ~ N(0, 1) drives both
the data (c_n = z_n a + noise) and the participation (p_n = 0.02 + 0.48 sigmoid(3 z_n)), so the
clients that show up often are systematically different from the rest.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer

AGGREGATORS = ("fedau", "fedavg", "average_all", "known_prob")
PARTICIPATION = ("bernoulli",)


@dataclass
class FedAUConfig(AuxConfig, max_steps=3000, eval_every=500, output_dir="runs/fedau"):
    """A step is one communication round."""

    num_clients: int = field(default=100, metadata={"help": "Number of clients N."})
    dim: int = field(default=10, metadata={"help": "Model dimension d."})
    local_steps: int = field(default=5, metadata={"help": "Local SGD steps I per participating client."})
    local_lr: float = field(default=0.05, metadata={"help": "Local SGD learning rate."})
    lr_decay_at: float = field(default=0.5, metadata={"help": "Fraction of max_steps after which local_lr is x0.1."})
    global_lr: float = field(default=1.0, metadata={"help": "Server learning rate eta_g."})
    grad_noise: float = field(default=1.0, metadata={"help": "Std of the Gaussian noise added to each local gradient."})
    cutoff: int = field(default=50, metadata={"help": "FedAU cutoff K on the interval length."})
    aggregator: str = field(default="fedau", metadata={"help": f"One of {', '.join(AGGREGATORS)}."})
    participation: str = field(default="bernoulli", metadata={"help": f"One of {', '.join(PARTICIPATION)}."})

    def __post_init__(self):
        self.require_choice(aggregator=AGGREGATORS, participation=PARTICIPATION)
        self.require_at_least(1, "num_clients", "dim", "local_steps", "cutoff")
        self.require_positive("local_lr", "global_lr")
        if not 0.0 <= self.lr_decay_at <= 1.0:
            raise ValueError(f"lr_decay_at must be in [0, 1], got {self.lr_decay_at!r}")
        self.require_non_negative("grad_noise")
        super().__post_init__()


class ParticipationTracker:
    """FedAU's online estimate of 1/p_n. Keeps only the interval sum and count: same mean as the list."""

    def __init__(self, num_clients: int, cutoff: int):
        self.cutoff = int(cutoff)
        self.miss = np.zeros(num_clients, dtype=np.int64)
        self.interval_sum = np.zeros(num_clients, dtype=np.int64)
        self.interval_count = np.zeros(num_clients, dtype=np.int64)

    def update(self, participating: np.ndarray) -> None:
        part = np.asarray(participating, dtype=bool)
        self.miss[~part] += 1
        # A participation closes an interval of miss+1 rounds; reaching the cutoff closes one of K.
        closed = part | (self.miss >= self.cutoff)
        self.interval_sum[closed] += np.where(part, self.miss + 1, self.miss)[closed]
        self.interval_count[closed] += 1
        self.miss[closed] = 0

    def weights(self) -> np.ndarray:
        seen = self.interval_count > 0
        return np.where(seen, self.interval_sum / np.maximum(self.interval_count, 1), 1.0)

    def state_dict(self) -> dict:
        return {
            "cutoff": self.cutoff,
            "miss": self.miss.copy(),
            "interval_sum": self.interval_sum.copy(),
            "interval_count": self.interval_count.copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.cutoff = int(state["cutoff"])
        for k in ("miss", "interval_sum", "interval_count"):
            setattr(self, k, np.array(state[k], dtype=np.int64))


def aggregate(deltas: np.ndarray, participating: np.ndarray, weights: np.ndarray, num_clients: float) -> np.ndarray:
    """(1/num_clients) * sum over participating n of weights[n] * Delta_n.

    ``deltas`` holds one row per participating client, in client order; ``weights`` has one entry per
    client. FedAU, average_all and known_prob pass num_clients = N; FedAvg passes the participant count.
    """
    idx = np.flatnonzero(participating)
    if idx.size == 0:
        return np.zeros(deltas.shape[1:], dtype=float)
    return (weights[idx, None] * deltas).sum(axis=0) / num_clients


class FedAUTrainer(AuxTrainer):
    """Simulated federated training on quadratic clients; one step() is one communication round."""

    method = "fedau"

    def setup(self) -> None:
        args = self.args
        n, d = args.num_clients, args.dim
        # The problem is drawn first, so a seed gives the same clients whatever the aggregator.
        z = self.rng.standard_normal(n)
        direction = self.rng.standard_normal(d)
        self.c = z[:, None] * direction + self.rng.standard_normal((n, d))
        self.p = 0.02 + 0.48 / (1.0 + np.exp(-3.0 * z))
        self.x_star = self.c.mean(axis=0)
        self.x = np.zeros(d)
        self.tracker = ParticipationTracker(n, args.cutoff)

    @property
    def round(self) -> int:
        return self.global_step

    def description(self) -> str:
        return f"fedau[{self.args.aggregator}]"

    def _weights_and_denominator(self, num_participants: int) -> tuple[np.ndarray, float]:
        a, n = self.args.aggregator, self.args.num_clients
        if a == "fedau":
            return self.tracker.weights(), n
        if a == "known_prob":
            return 1.0 / self.p, n
        if a == "average_all":
            return np.ones(n), n
        return np.ones(n), max(num_participants, 1)  # fedavg

    def training_step(self) -> dict:
        a = self.args
        lr = a.local_lr * (0.1 if self.round >= a.lr_decay_at * a.max_steps else 1.0)
        participating = self.rng.random(a.num_clients) < self.p
        idx = np.flatnonzero(participating)
        # All participants' local SGD at once: rows are clients. grad F_n(y) = y - c_n, plus noise.
        local = np.repeat(self.x[None, :], idx.size, axis=0)
        for _ in range(a.local_steps):
            noise = a.grad_noise * self.rng.standard_normal(local.shape)
            local -= lr * (local - self.c[idx] + noise)
        weights, denom = self._weights_and_denominator(idx.size)
        # Weights first, then the tracker: this round's interval is used from the next round on.
        self.tracker.update(participating)
        update = aggregate(local - self.x, participating, weights, denom)
        self.x = self.x + a.global_lr * update
        return {
            "round": self.round + 1,
            "participants": int(idx.size),
            "local_lr": lr,
            "update_norm": float(np.linalg.norm(update)),
        }

    def evaluate(self) -> dict:
        omega, inv_p = self.tracker.weights(), 1.0 / self.p
        return {
            "round": self.round,
            "global_loss": float(0.5 * ((self.x - self.c) ** 2).sum(axis=1).mean()),
            "excess_loss": float(0.5 * ((self.x - self.x_star) ** 2).sum()),
            "omega_mean": float(omega.mean()),
            "omega_abs_err": float(np.abs(omega - inv_p).mean()),  # |omega_n - 1/p_n|, mean over n
            "omega_rel_err": float(np.abs(omega * self.p - 1.0).mean()),
        }

    def state_dict(self) -> dict:
        return {**super().state_dict(), "x": self.x.copy(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.x = np.array(state["x"], dtype=float)
        self.tracker.load_state_dict(copy.deepcopy(state["tracker"]))


def compare_aggregators(
    aggregators: Iterable[str] = ("fedau", "fedavg", "known_prob"), seeds: Iterable[int] = (0, 1, 2), **config_overrides
) -> dict:
    """Run every aggregator on every seed (same clients per seed) -> {aggregator: [excess per seed]}.

    Each run writes to ``<output_dir>/<aggregator>-seed<seed>/results.json``.
    """
    base = config_overrides.pop("output_dir", FedAUConfig.output_dir)
    out: dict[str, list[float]] = {}
    for agg in aggregators:
        for seed in seeds:
            cfg = FedAUConfig(
                aggregator=agg, seed=seed, output_dir=os.path.join(base, f"{agg}-seed{seed}"), **config_overrides
            )
            final = FedAUTrainer(cfg).train(verbose=False)
            if final["stopped_by"] != "max_steps":  # a truncated run is not comparable with the others
                raise RuntimeError(f"{agg} seed {seed} hit max_seconds after {final['round']} rounds")
            out.setdefault(agg, []).append(final["excess_loss"])
    return out
