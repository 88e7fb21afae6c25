"""Nelder-Mead search, ask/tell style, so a training loop can drive it one function evaluation at a time.

Generic machinery (no torch, no trainer): NM-PPO (``constrained_rlhf``) searches the constraint thresholds with it,
the CPU overoptimisation toy (``experiments/crlhf_overoptimization.py``) too. ``EarlyStopEvaluation`` is one NM-PPO
function evaluation fed one training iteration at a time, with the official early-stopping rule.

Two variants (``variant``):

    official   the loop of ``NelderMeadTrainer.train_and_eval`` in the official code of Constrained RLHF
               (arXiv 2310.04373; tedmoskovitz/ConstrainedRL4LMs, rl4lms/envs/text_generation/training_utils.py),
               the default. Per iteration: stop if the budget is spent; sort; reflect, accept if
               best <= f_r < f_second_worst; if f_r < best expand, and accept the expanded point if f_e < f_best
               (else the reflected one); otherwise contract INSIDE (towards the worst point) and accept if
               f_c < f_worst; otherwise shrink towards the best point. The spread test (std of the simplex values
               < tol) runs only after a shrink. There is no outside contraction.
    textbook   the usual textbook rules: the spread test before every iteration (so it can stop on the initial
               simplex), expansion accepted against the reflected point (f_e < f_r), an outside contraction when
               f_second_worst <= f_r < f_worst (accepted if f_c <= f_r), inside otherwise, and an extra stop once the
               whole simplex lies within the cache radius of its best point ("collapsed").

Both evaluate the initial simplex (n + 1 points drawn uniformly in the box [low, high], seeded) in order, and after a
shrink the n moved points in order, as the official loop does (its sort and spread test call the cached function in
that order). Evaluations are cached as the official ``NelderMeadFunc``: a point equal to an evaluated one, else
within ``cache_radius`` (strictly) in every coordinate of one (the first such in evaluation order), reuses its value
without being asked and costs nothing. Points are not clipped to the box.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

VARIANTS = ("official", "textbook")


class NelderMead:
    """Nelder-Mead minimisation of f = -score, ask/tell style.

        nm = NelderMead(low, high, tol=0.01, max_iterations=100, seed=0)
        while not nm.done:
            x = nm.ask()                            # next point that needs an evaluation
            score, used = ...                       # evaluate (higher is better)
            nm.tell(score, cost=used)               # NM minimises -score

    Coefficients: reflection alpha = 1, expansion gamma = 2, contraction rho = 0.5, shrink sigma = 0.5 (the official
    ``gpt2_nm_ppo.yml``). Budget: before every iteration the search stops once the evaluations told so far cost
    ``max_iterations`` in total (``cost`` = e.g. the training iterations the evaluation used; 1 by default, i.e. the
    budget counts function evaluations); an iteration already begun finishes. The spread stop (population std of
    the simplex values < ``tol``) and the rest of the rules depend on ``variant`` (module docstring). Safety stops
    that the official loop lacks (it would spin forever): ``MAX_STEPS`` iterations in all, or ``MAX_IDLE_STEPS``
    iterations in a row that evaluated nothing new (every point a cache hit: "stalled").

    ``state_dict`` stores the told evaluations; ``load_state_dict`` replays them (the algorithm is deterministic
    given the seed and the values), so a resumed search continues exactly.
    """

    MAX_STEPS = 10_000
    MAX_IDLE_STEPS = 1_000

    def __init__(
        self,
        low,
        high,
        tol=0.01,
        max_iterations=100,
        seed=0,
        alpha=1.0,
        gamma=2.0,
        rho=0.5,
        sigma=0.5,
        cache_radius=5e-3,
        variant="official",
    ):
        self.low = np.asarray(low, dtype=np.float64).reshape(-1)
        self.high = np.asarray(high, dtype=np.float64).reshape(-1)
        if self.low.shape != self.high.shape or self.low.size == 0:
            raise ValueError(f"low and high must be non-empty and the same length (got {self.low}, {self.high})")
        if not np.all(self.low <= self.high):
            raise ValueError(f"low must be <= high in every coordinate (got {self.low}, {self.high})")
        if not tol >= 0 or max_iterations <= 0:
            raise ValueError(f"need tol >= 0 and max_iterations > 0 (got {tol}, {max_iterations})")
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}; valid: {', '.join(VARIANTS)}")
        self.n = self.low.size
        self.tol, self.max_iterations, self.seed = float(tol), float(max_iterations), int(seed)
        self.alpha, self.gamma, self.rho, self.sigma = float(alpha), float(gamma), float(rho), float(sigma)
        self.cache_radius, self.variant = float(cache_radius), variant
        self._reset()

    # ------------------------------------------------------------------------------------------- driving

    def _reset(self):
        self.history: list[tuple[list[float], float, float]] = []  # told evaluations: (x, score, cost)
        self.cache: list[tuple[np.ndarray, float]] = []  # (x, f = -score)
        self.iterations = 0.0  # total cost told
        self.cache_hits = 0
        self.nm_steps = 0
        self.simplex: np.ndarray | None = None
        self.values: np.ndarray | None = None  # f = -score at the simplex points
        self.trace: list[dict] = []  # best point at the start of every iteration (and at the end)
        self.done, self.stop_reason = False, None
        self._pending: np.ndarray | None = None
        self._gen = self._search()
        self._advance(None)

    def _advance(self, value):
        try:
            self._pending = self._gen.send(value)
        except StopIteration:
            self._pending = None
            self.done = True

    def ask(self) -> np.ndarray | None:
        """The next point to evaluate (a copy), or None when the search is done."""
        return None if self._pending is None else self._pending.copy()

    def tell(self, score: float, cost: float = 1.0) -> None:
        """Report the score (higher is better) of the point ``ask`` returned; ``cost`` counts against the budget."""
        if self._pending is None:
            raise RuntimeError("tell() without a pending point: the search is done")
        score, cost = float(score), float(cost)
        if not math.isfinite(score):
            raise ValueError(f"score must be finite (got {score})")
        x = self._pending
        self.history.append((x.tolist(), score, cost))
        self.cache.append((x.copy(), -score))
        self.iterations += cost
        self._advance(-score)

    def lookup(self, x) -> float | None:
        """Cached score for x (exact, or strictly within cache_radius in every coordinate), else None."""
        x = np.asarray(x, dtype=np.float64)
        for cx, f in self.cache:
            if np.array_equal(cx, x):
                return -f
        for cx, f in self.cache:
            if np.all(np.abs(cx - x) < self.cache_radius):
                return -f
        return None

    @property
    def best_point(self) -> np.ndarray | None:
        if self.values is None:
            return None
        return self.simplex[int(np.argmin(self.values))].copy()

    @property
    def best_score(self) -> float | None:
        return None if self.values is None else float(-np.min(self.values))

    # ------------------------------------------------------------------------------------------ algorithm

    def _f(self, x):
        """Sub-generator: the value f = -score at x, from the cache or by asking."""
        cached = self.lookup(x)
        if cached is not None:
            self.cache_hits += 1
            return -cached
        return (yield np.asarray(x, dtype=np.float64))

    def _record(self):
        i = int(np.argmin(self.values))
        self.trace.append(
            {
                "iterations": self.iterations,
                "nm_step": self.nm_steps,
                "best": self.simplex[i].tolist(),
                "best_score": float(-self.values[i]),
            }
        )

    def _initial_simplex(self):
        rng = np.random.default_rng(self.seed)
        points = self.low + rng.random((self.n + 1, self.n)) * (self.high - self.low)
        values = np.empty(self.n + 1)
        for i in range(self.n + 1):
            values[i] = yield from self._f(points[i])
        self.simplex, self.values = points, values

    def _sort(self):
        order = np.argsort(self.values, kind="stable")  # = Python's stable sorted(simplex, key=func)
        self.simplex, self.values = self.simplex[order], self.values[order]
        self._record()

    def _safety_stop(self, told_before: int, idle: int) -> tuple[bool, int]:
        idle = idle + 1 if len(self.history) == told_before else 0
        if self.nm_steps >= self.MAX_STEPS:
            self.stop_reason = "max_steps"
            return True, idle
        if idle >= self.MAX_IDLE_STEPS:
            self.stop_reason = "stalled"  # every point of the last iterations came from the cache
            return True, idle
        return False, idle

    def _shrink(self, S, F):
        for i in range(1, self.n + 1):  # shrink towards the best point
            S[i] = S[0] + self.sigma * (S[i] - S[0])
            F[i] = yield from self._f(S[i])

    def _search(self):
        """One loop for both variants; each ``official`` test marks where they differ (module docstring)."""
        official = self.variant == "official"
        yield from self._initial_simplex()
        told, idle = -1, -1
        while True:
            self._sort()
            if not official and np.std(self.values) < self.tol:  # textbook: the spread test before every iteration
                self.stop_reason = "tol"
                return
            if self.iterations >= self.max_iterations:
                self.stop_reason = "budget"
                return
            if (
                not official
                and self.cache_radius > 0
                and np.all(np.abs(self.simplex - self.simplex[0]) < self.cache_radius)
            ):
                self.stop_reason = "collapsed"  # every further point would come from the cache
                return
            stop, idle = self._safety_stop(told, idle)
            if stop:
                return
            told = len(self.history)
            self.nm_steps += 1
            S, F = self.simplex, self.values
            best, second_worst, worst = F[0], F[-2], F[-1]
            centroid = S[:-1].mean(0)
            xr = centroid + self.alpha * (centroid - S[-1])
            fr = yield from self._f(xr)
            if best <= fr < second_worst:
                S[-1], F[-1] = xr, fr
                continue
            if fr < best:
                xe = centroid + self.gamma * (xr - centroid)
                fe = yield from self._f(xe)
                # official: expansion accepted against the best point; textbook: against the reflected one
                S[-1], F[-1] = (xe, fe) if fe < (best if official else fr) else (xr, fr)
                continue
            if not official and fr < worst:  # outside contraction (textbook only)
                xc = centroid + self.rho * (xr - centroid)
                fc = yield from self._f(xc)
                if fc <= fr:
                    S[-1], F[-1] = xc, fc
                    continue
            else:  # inside contraction
                xc = centroid + self.rho * (S[-1] - centroid)
                fc = yield from self._f(xc)
                if fc < worst:
                    S[-1], F[-1] = xc, fc
                    continue
            yield from self._shrink(S, F)
            if official and np.std(F) < self.tol:  # official: the spread test, only after a shrink
                self.stop_reason = "tol"
                self._sort()
                return

    # -------------------------------------------------------------------------------------------- state

    def _settings(self):
        return {
            "low": self.low.tolist(),
            "high": self.high.tolist(),
            "tol": self.tol,
            "max_iterations": self.max_iterations,
            "seed": self.seed,
            "alpha": self.alpha,
            "gamma": self.gamma,
            "rho": self.rho,
            "sigma": self.sigma,
            "cache_radius": self.cache_radius,
            "variant": self.variant,
        }

    def state_dict(self) -> dict:
        return {"settings": self._settings(), "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        saved = {"variant": "textbook", **state["settings"]}  # states saved before the variants existed: textbook
        if saved != self._settings():
            raise ValueError(f"Nelder-Mead state {saved} does not match this search {self._settings()}")
        self._reset()
        for x, score, cost in state["history"]:
            if self._pending is None or not np.allclose(self._pending, x, rtol=0, atol=1e-12):
                raise ValueError("Nelder-Mead replay diverged from the saved history")
            self.tell(score, cost)


class EarlyStopResult(NamedTuple):
    score: float  # the evaluation score returned (higher is better; NM minimises -score)
    iterations: int  # training iterations used
    component_values: list[float]  # the constrained metrics at that evaluation
    early: bool  # True if every constraint was within the tolerance


class EarlyStopEvaluation:
    """One NM-PPO function evaluation, fed one training iteration at a time (the official rule).

    ``tick(evaluate)`` is called after every training iteration run with the candidate ``thresholds``; after every
    ``eval_every``-th iteration and after the ``n_iterations``-th it calls ``evaluate() -> (score,
    component_values)`` and returns an ``EarlyStopResult`` once every component value is within
    +-rel_tol * |theta_i| of its threshold (early) or the iterations are spent (the last evaluation); else None.
    """

    def __init__(self, thresholds, n_iterations: int, eval_every: int, rel_tol: float = 0.05, iterations: int = 0):
        if n_iterations < 1 or eval_every < 1:
            raise ValueError(f"need n_iterations >= 1 and eval_every >= 1 (got {n_iterations}, {eval_every})")
        self.thresholds = [float(t) for t in thresholds]
        self.n_iterations, self.eval_every, self.rel_tol = int(n_iterations), int(eval_every), float(rel_tol)
        self.iterations = int(iterations)  # done so far (restored on resume)

    @property
    def due(self) -> bool:
        """True when the next ``tick`` evaluates."""
        nxt = self.iterations + 1
        return nxt % self.eval_every == 0 or nxt >= self.n_iterations

    def tick(self, evaluate: Callable[[], tuple[float, Sequence[float]]]) -> EarlyStopResult | None:
        due = self.due
        self.iterations += 1
        if not due:
            return None
        score, values = evaluate()
        values = [float(v) for v in values]
        if len(values) != len(self.thresholds):
            raise ValueError(
                f"evaluate() returned {len(values)} component values for {len(self.thresholds)} thresholds"
            )
        early = all(abs(v - t) <= self.rel_tol * abs(t) for v, t in zip(values, self.thresholds))
        if early or self.iterations >= self.n_iterations:
            return EarlyStopResult(float(score), self.iterations, values, early)
        return None
