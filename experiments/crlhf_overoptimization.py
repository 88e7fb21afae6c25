"""Constrained-RLHF toy on overoptimisation (Moskovitz et al., arXiv 2310.04373, in miniature), CPU, about a minute.

Question: with two proxy rewards whose hidden "true" evaluation peaks at interior proxy points, does a fixed-weight
objective overshoot them (overoptimisation), does xi-PPO's equality constraint hold the components at the proxy
points, and can Nelder-Mead find the proxy points from a random simplex when only the hidden score is observed?

Setting. A tabular per-position categorical policy over a 4-symbol vocabulary {A, B, C, D}, sequences of length
10 (one logit vector per position, positions independent). Components: r1 = fraction of A, r2 = fraction of B in
a sampled sequence. Hidden evaluation of a policy: -(E r1 - 0.3)^2 - (E r2 - 0.2)^2, computed exactly from the
policy's expected fractions (it peaks at the proxy points theta* = (0.3, 0.2)). The reference (and initial)
policy is "uniform-ish": (0.1, 0.1, 0.4, 0.4) at every position, so both components start below their proxy
points and the evaluation has room to rise first (with the exactly uniform policy r2 = 0.25 would start past
its proxy point). Every step samples K = 8 sequences (one prompt, RLOO with 8 samples), builds the KL stream
r_KL = -kl_coef * sum_t (log pi - log pi_ref) and forms the sequence advantages with the package's own
``formulation_advantages`` (which calls ``mix_advantages`` / ``rloo_advantages``), loss -mean_k A_k sum_t log pi,
plain SGD lr 1.0, on-policy; the multipliers are the package's ``LagrangeMultipliers`` with the config defaults
(lr 0.1, momentum 0.1, clip 0.5, init N(0, 0.01^2)), stepped once per batch on the batch mean of each component.
500 updates per run.

Runs (same seeds, same sampling streams per seed):
  fixed   the baseline: one reward stream r1 + r2 + r_KL (weights (1, 1), i.e. RLOO with beta = kl_coef),
          kl_coef = 0.02 for the claim, plus a sweep kl_coef in {0.2, 0.05} to show where fixed weights land.
  xi      xi-PPO with theta = (0.3, 0.2): streams normalised and mixed by tanh(lambda) (kl_coef cancels).
  mu, all, sat   the other formulations, same theta, reported for information only (no claim).
  nm      NM-PPO: Nelder-Mead over theta from a random simplex in [0.05, 0.5]^2, during ONE continuing xi run;
          each function evaluation trains up to 400 steps with the candidate theta, evaluates every 5 steps and
          returns early once both expected components are within +-5% of theta (``evaluate_with_early_stop``);
          NM maximises the hidden evaluation; it stops when the simplex values' std < 1e-4 or after 8000
          training steps. (The official tol 0.01 is for scores in [0, 1]; this score spans ~0.1.)

Claims checked (``check_claims``; the test runs seed 0, the full run reports how many seeds pass):
  (1) fixed (1, 1), kl_coef 0.02: both components end > 0.05 past their proxy points, and the evaluation rises
      (max > initial + 0.01) then falls (final <= max - 0.02).
  (2) xi with theta = (0.3, 0.2): final |E r - theta| <= 0.05 per component and the evaluation plateaus near its
      maximum 0 (mean over the last 100 steps >= -0.005).
  (3) nm: the best thresholds found are within 0.07 of (0.3, 0.2) in every coordinate.

    .venv/bin/python experiments/crlhf_overoptimization.py            # full: 8 seeds, table, JSON + PNG (~1.5 min)
    .venv/bin/python experiments/crlhf_overoptimization.py --quick    # seed 0 only, writes nothing
    .venv/bin/python experiments/crlhf_overoptimization.py --cadence --seeds 4   # multiplier-step cadence table

Cadence (``run_cadence``): xi with a generation batch of S groups of K samples feeding S updates, multipliers
stepped per update (``optimizer_step``, the official cadence and the trainer's default) or once per generation batch
(``generation``); reports the first update at which both components are within +-5% of theta.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.advantages import rloo_advantages
from posttrain.trainers.constrained_rlhf import (
    ConstrainedRLHFConfig,
    LagrangeMultipliers,
    formulation_advantages,
    normalise_stream,
    weigh_streams,
)
from posttrain.trainers.nelder_mead import EarlyStopEvaluation, NelderMead


def kl_stream_rewards(logps, ref_logps, completion_mask, kl_coef):
    """The toy's KL stream's per-completion reward (B,): -kl_coef * sum_t mask * (log pi_old - log pi_ref)."""
    mask = completion_mask.to(logps.dtype)
    return -kl_coef * ((logps - ref_logps) * mask).sum(-1)


VOCAB, LENGTH, K = 4, 10, 8
SYM_A, SYM_B = 0, 1
REF_PROBS = (0.1, 0.1, 0.4, 0.4)
THETA = (0.3, 0.2)
STEPS = 500
POLICY_LR = 1.0
KL_COEF = 0.02
KL_SWEEP = (0.2, 0.05)
WINDOW = 100  # "plateau" window at the end of a run
NM = dict(low=(0.05, 0.05), high=(0.5, 0.5), tol=1e-4, budget=8000, steps_per_eval=400, eval_every=5, rel_tol=0.05)
RESULTS = Path(__file__).resolve().parent / "results"

# the multiplier settings are the package's config defaults (read from the dataclass, no TrainingArguments built)
_F = ConstrainedRLHFConfig.__dataclass_fields__
MULTIPLIER = dict(
    lr=_F["multiplier_lr"].default,
    momentum=_F["multiplier_momentum"].default,
    grad_clip=_F["multiplier_grad_clip"].default,
    init_std=_F["multiplier_init_std"].default,
)


def hidden_evaluation(r1, r2):
    return -((r1 - THETA[0]) ** 2) - (r2 - THETA[1]) ** 2


class Toy:
    """The tabular policy (plain SGD), the multipliers and the sampling stream of one run."""

    def __init__(self, formulation, seed, kl_coef=KL_COEF):
        self.formulation, self.kl_coef = formulation, kl_coef
        self.generator = torch.Generator().manual_seed(seed)
        self.ref_logp = torch.tensor(REF_PROBS, dtype=torch.float64).log()
        self.logits = self.ref_logp.repeat(LENGTH, 1).clone().requires_grad_(True)  # (LENGTH, VOCAB)
        if formulation in ("fixed", "sat"):
            self.multipliers = None
        else:
            self.multipliers = LagrangeMultipliers(
                2,
                equality=formulation in ("xi", "nm"),
                squash=True,
                upper_bound=formulation == "all",
                generator=self.generator,
                **MULTIPLIER,
            )

    def expected_components(self):
        with torch.no_grad():
            p = torch.softmax(self.logits, -1).mean(0)
        return float(p[SYM_A]), float(p[SYM_B])

    def evaluate(self):
        r1, r2 = self.expected_components()
        return hidden_evaluation(r1, r2), (r1, r2)

    def step(self, thresholds):
        logp = torch.log_softmax(self.logits, -1)  # (LENGTH, VOCAB)
        seqs = torch.multinomial(logp.detach().exp(), K, replacement=True, generator=self.generator).T  # (K, LENGTH)
        positions = torch.arange(LENGTH).expand(K, LENGTH)
        token_logp = logp[positions, seqs]  # (K, LENGTH)
        components = torch.stack([(seqs == SYM_A).double().mean(1), (seqs == SYM_B).double().mean(1)], 1)
        r_kl = kl_stream_rewards(token_logp.detach(), self.ref_logp[seqs], torch.ones_like(token_logp), self.kl_coef)
        lam = None if self.multipliers is None else self.multipliers.lam
        if self.formulation == "fixed":
            lam = torch.ones(2, dtype=torch.float64)
        adv = formulation_advantages(self.formulation, components, r_kl, K, lam, thresholds)
        loss = -(adv.detach() * token_logp.sum(1)).mean()
        (grad,) = torch.autograd.grad(loss, self.logits)
        with torch.no_grad():
            self.logits -= POLICY_LR * grad  # plain SGD
        if self.multipliers is not None:
            self.multipliers.step(components.mean(0), thresholds)


def run_formulation(formulation, seed, steps=STEPS, kl_coef=KL_COEF, thresholds=THETA):
    """One run; curves are recorded before every update and after the last one (steps + 1 points)."""
    toy = Toy(formulation, seed, kl_coef)
    curves = {"r1": [], "r2": [], "eval": [], "w1": [], "w2": []}

    def record():
        score, (r1, r2) = toy.evaluate()
        curves["r1"].append(r1)
        curves["r2"].append(r2)
        curves["eval"].append(score)
        w = toy.multipliers.weights().tolist() if toy.multipliers is not None else [math.nan, math.nan]
        curves["w1"].append(w[0])
        curves["w2"].append(w[1])

    for _ in range(steps):
        record()
        toy.step(thresholds)
    record()
    return summarise(curves, thresholds) | {"curves": curves}


def summarise(curves, thresholds=THETA):
    ev = curves["eval"]
    i_max = int(np.argmax(ev))
    tail = slice(-WINDOW, None)
    return {
        "final_r": [curves["r1"][-1], curves["r2"][-1]],
        "tail_mean_r": [statistics.fmean(curves["r1"][tail]), statistics.fmean(curves["r2"][tail])],
        "final_dev": max(abs(curves["r1"][-1] - thresholds[0]), abs(curves["r2"][-1] - thresholds[1])),
        "eval_initial": ev[0],
        "eval_max": ev[i_max],
        "eval_argmax": i_max,
        "eval_final": ev[-1],
        "eval_tail_mean": statistics.fmean(ev[tail]),
    }


def run_nm(seed, **overrides):
    """NM-PPO in one continuing xi run; returns the search's path and result."""
    cfg = NM | overrides
    toy = Toy("nm", seed)
    search = NelderMead(cfg["low"], cfg["high"], tol=cfg["tol"], max_iterations=cfg["budget"], seed=seed)
    thresholds = [None]
    evaluations = []
    while not search.done:
        theta = search.ask()
        thresholds[0] = tuple(float(t) for t in theta)
        run = EarlyStopEvaluation(thresholds[0], cfg["steps_per_eval"], cfg["eval_every"], cfg["rel_tol"])
        result = None
        while result is None:  # one NM function evaluation, as the trainer runs it: train, then maybe evaluate
            toy.step(thresholds[0])
            result = run.tick(toy.evaluate)
        search.tell(result.score, cost=result.iterations)
        evaluations.append(
            {
                "theta": list(thresholds[0]),
                "score": result.score,
                "steps": result.iterations,
                "early": result.early,
                "true_score": hidden_evaluation(*thresholds[0]),
            }
        )
    best = search.best_point.tolist()
    return {
        "best_theta": best,
        "best_score": search.best_score,
        "best_dev": max(abs(best[0] - THETA[0]), abs(best[1] - THETA[1])),
        "stop_reason": search.stop_reason,
        "training_steps": search.iterations,
        "evaluations": len(evaluations),
        "early_fraction": statistics.fmean(e["early"] for e in evaluations),
        "cache_hits": search.cache_hits,
        "path": [t["best"] for t in search.trace],
        "path_steps": [t["iterations"] for t in search.trace],
        "history": evaluations,
    }


def reached_at(curves, thresholds=THETA, rel_tol=0.05):
    """First update after which both expected components are within +-rel_tol * theta (the official NM-PPO "reached"
    rule), or None."""
    for t, (r1, r2) in enumerate(zip(curves["r1"], curves["r2"])):
        if abs(r1 - thresholds[0]) <= rel_tol * thresholds[0] and abs(r2 - thresholds[1]) <= rel_tol * thresholds[1]:
            return t
    return None


def run_cadence(multiplier_step, seed, steps_per_generation=8, steps=STEPS, thresholds=THETA):
    """xi with a generation batch of steps_per_generation groups of K samples that feeds steps_per_generation policy
    updates (one group each, as TRL's steps_per_generation): streams are RLOO'd per group and normalised over the
    generation batch; ``optimizer_step`` mixes each update's group with the current multipliers and steps them on
    that group's means (the official cadence, the trainer's default), ``generation`` mixes once and steps them once
    per generation batch on its means. Same policy lr, multiplier settings and seed; ``steps`` updates."""
    toy = Toy("xi", seed)
    curves = {"r1": [], "r2": [], "eval": [], "w1": [], "w2": []}

    def record():
        score, (r1, r2) = toy.evaluate()
        w = toy.multipliers.weights().tolist()
        for k, v in zip(curves, (r1, r2, score, w[0], w[1])):
            curves[k].append(v)

    S = steps_per_generation
    for _ in range(steps // S):
        with torch.no_grad():
            probs = torch.softmax(toy.logits, -1)
            seqs = torch.multinomial(probs, S * K, replacement=True, generator=toy.generator).T  # (S*K, LENGTH)
            positions = torch.arange(LENGTH).expand(S * K, LENGTH)
            old_logp = torch.log_softmax(toy.logits, -1)[positions, seqs]
        components = torch.stack([(seqs == SYM_A).double().mean(1), (seqs == SYM_B).double().mean(1)], 1)
        r_kl = kl_stream_rewards(old_logp, toy.ref_logp[seqs], torch.ones_like(old_logp), toy.kl_coef)
        A_c = normalise_stream(rloo_advantages(components, K))
        A_kl = normalise_stream(rloo_advantages(r_kl, K))
        if multiplier_step == "generation":
            adv_all = weigh_streams("xi", A_c, A_kl, toy.multipliers.lam)
            toy.multipliers.step(components.mean(0), thresholds)
        for i in range(S):
            record()
            g = slice(i * K, (i + 1) * K)
            adv = (
                adv_all[g]
                if multiplier_step == "generation"
                else weigh_streams("xi", A_c[g], A_kl[g], toy.multipliers.lam)
            )
            logp = torch.log_softmax(toy.logits, -1)[positions[g], seqs[g]]
            loss = -(adv.detach() * logp.sum(1)).mean()
            (grad,) = torch.autograd.grad(loss, toy.logits)
            with torch.no_grad():
                toy.logits -= POLICY_LR * grad
            if multiplier_step == "optimizer_step":
                toy.multipliers.step(components[g].mean(0), thresholds)
    record()
    return summarise(curves, thresholds) | {"reached_at": reached_at(curves, thresholds), "curves": curves}


def check_claims(fixed, xi, nm):
    """The three claims for one seed (each argument: that seed's run summary)."""
    return {
        "fixed_overoptimises": (
            fixed["final_r"][0] > THETA[0] + 0.05
            and fixed["final_r"][1] > THETA[1] + 0.05
            and fixed["eval_max"] > fixed["eval_initial"] + 0.01
            and fixed["eval_final"] <= fixed["eval_max"] - 0.02
        ),
        "xi_holds_theta": xi["final_dev"] <= 0.05 and xi["eval_tail_mean"] >= -0.005,
        "nm_finds_theta": nm["best_dev"] <= 0.07,
    }


def run(seeds=range(8), nm_seeds=range(8), steps=STEPS, log=print):
    t0 = time.time()
    out = {"runs": {}, "nm": {}, "claims": {}}
    names = [("fixed", KL_COEF), ("xi", KL_COEF), ("mu", KL_COEF), ("all", KL_COEF), ("sat", KL_COEF)]
    names += [("fixed", kc) for kc in KL_SWEEP]
    for form, kc in names:
        key = form if kc == KL_COEF else f"{form}@kl{kc}"
        out["runs"][key] = {s: run_formulation(form, s, steps, kc) for s in seeds}
        log(f"  {key:<14} done ({time.time() - t0:5.1f} s)")
    for s in nm_seeds:
        out["nm"][s] = run_nm(s)
    log(f"  nm             done ({time.time() - t0:5.1f} s)")
    common = [s for s in seeds if s in out["nm"]]
    for s in common:
        out["claims"][s] = check_claims(out["runs"]["fixed"][s], out["runs"]["xi"][s], out["nm"][s])
    out["seconds"] = time.time() - t0
    return out


def _ms(values, fmt="{:.3f}"):
    values = list(values)
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(out):
    lines = [
        "| run | final E r1 | final E r2 | last-100 mean (r1, r2) | eval initial | eval max (step) | eval final | "
        "last-100 eval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, per_seed in out["runs"].items():
        rs = list(per_seed.values())
        lines.append(
            f"| {key} | {_ms(r['final_r'][0] for r in rs)} | {_ms(r['final_r'][1] for r in rs)} | "
            f"({_ms(r['tail_mean_r'][0] for r in rs)}, {_ms(r['tail_mean_r'][1] for r in rs)}) | "
            f"{_ms((r['eval_initial'] for r in rs), '{:.4f}')} | {_ms((r['eval_max'] for r in rs), '{:.4f}')} "
            f"({_ms((r['eval_argmax'] for r in rs), '{:.0f}')}) | {_ms((r['eval_final'] for r in rs), '{:.4f}')} | "
            f"{_ms((r['eval_tail_mean'] for r in rs), '{:.4f}')} |"
        )
    lines += [
        "",
        "| NM seed | best theta | max dev from (0.3, 0.2) | stop | training steps | evaluations (early) | cache hits |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, r in out["nm"].items():
        lines.append(
            f"| {s} | ({r['best_theta'][0]:.3f}, {r['best_theta'][1]:.3f}) | {r['best_dev']:.3f} | "
            f"{r['stop_reason']} | {r['training_steps']:.0f} | {r['evaluations']} "
            f"({r['early_fraction']:.0%}) | {r['cache_hits']} |"
        )
    if out["claims"]:
        lines += ["", "| claim | seeds passing |", "|---|---|"]
        for claim in next(iter(out["claims"].values())):
            ok = [s for s, c in out["claims"].items() if c[claim]]
            lines.append(f"| {claim} | {len(ok)}/{len(out['claims'])} |")
        nm_ok = sum(r["best_dev"] <= 0.07 for r in out["nm"].values())
        lines.append(f"| nm_finds_theta (all NM seeds) | {nm_ok}/{len(out['nm'])} |")
    return "\n".join(lines)


def plot(out, path):
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    seed = min(out["runs"]["fixed"])
    fixed, xi = out["runs"]["fixed"][seed]["curves"], out["runs"]["xi"][seed]["curves"]
    steps = np.arange(len(fixed["r1"]))
    ax = axes[0]
    ax.plot(steps, fixed["r1"], color="C3", label="fixed (1,1): E r1")
    ax.plot(steps, fixed["r2"], color="C3", ls="--", label="fixed (1,1): E r2")
    ax.plot(steps, xi["r1"], color="C0", label="xi: E r1")
    ax.plot(steps, xi["r2"], color="C0", ls="--", label="xi: E r2")
    for t in THETA:
        ax.axhline(t, color="k", lw=0.8, ls=":")
    ax.set(title=f"components (seed {seed}; dotted: proxy points)", xlabel="update", ylabel="expected fraction")
    ax.legend(fontsize=8)
    ax = axes[1]
    for key, color in (("fixed", "C3"), ("xi", "C0")):
        curves = np.array([r["curves"]["eval"] for r in out["runs"][key].values()])
        ax.plot(steps, curves.mean(0), color=color, label=f"{key} (mean of {len(curves)} seeds)")
        ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.15)
    ax.set(
        title="hidden evaluation -(E r1-0.3)^2-(E r2-0.2)^2 (band: min-max)",
        xlabel="update",
        ylabel="evaluation",
        ylim=(-0.16, 0.005),
    )
    ax.legend(fontsize=8)
    ax = axes[2]
    g1, g2 = np.meshgrid(np.linspace(0, 0.6, 121), np.linspace(0, 0.6, 121))
    ax.contour(
        g1,
        g2,
        hidden_evaluation(g1, g2),
        levels=[-0.1, -0.05, -0.02, -0.01, -0.005, -0.001],
        colors="0.7",
        linewidths=0.7,
    )
    lo, hi = NM["low"], NM["high"]
    ax.add_patch(plt.Rectangle(lo, hi[0] - lo[0], hi[1] - lo[1], fill=False, ls="--", color="0.5"))
    for r in out["nm"].values():
        p = np.array(r["path"])
        ax.plot(p[:, 0], p[:, 1], "-", lw=0.9, alpha=0.8)
        ax.plot(p[-1, 0], p[-1, 1], "o", ms=4, color=ax.lines[-1].get_color())
    ax.plot(*THETA, "k*", ms=14, label="proxy points (0.3, 0.2)")
    ax.set(
        title="NM-PPO: best thresholds per NM iteration (box: initial simplex)",
        xlabel="theta_1",
        ylabel="theta_2",
        xlim=(0, 0.6),
        ylim=(0, 0.6),
    )
    ax.legend(fontsize=8, loc="upper right")
    save_figure(fig, path, dpi=80)


def _rounded(obj, digits=5):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def to_json(out, every=5):
    """Small JSON: settings, per-seed summaries, the first seed's curves and the seed-mean evaluation (every 5)."""
    first = min(out["runs"]["fixed"])
    runs = {}
    for key, per_seed in out["runs"].items():
        evals = np.array([r["curves"]["eval"] for r in per_seed.values()])
        runs[key] = {
            "per_seed": {str(s): {k: v for k, v in r.items() if k != "curves"} for s, r in per_seed.items()},
            f"seed{first}_curves_every_{every}": {
                k: [round(x, 5) for x in v[::every]]
                for k, v in per_seed[first]["curves"].items()
                if not all(math.isnan(x) for x in v)
            },
            f"mean_eval_every_{every}": [round(float(x), 5) for x in evals.mean(0)[::every]],
        }
    return {
        "settings": {
            "vocab": VOCAB,
            "length": LENGTH,
            "samples_per_step": K,
            "ref_probs": REF_PROBS,
            "theta": THETA,
            "steps": STEPS,
            "policy_lr": POLICY_LR,
            "kl_coef": KL_COEF,
            "kl_sweep": KL_SWEEP,
            "multiplier": MULTIPLIER,
            "nm": NM,
            "tail_window": WINDOW,
        },
        "runs": runs,
        "nm": {str(s): r for s, r in out["nm"].items()},
        "claims": {str(s): c for s, c in out["claims"].items()},
        "seconds": round(out["seconds"], 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 only; writes nothing")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--nm-seeds", type=int, default=8)
    parser.add_argument("--name", default="crlhf_overoptimization")
    parser.add_argument(
        "--cadence",
        action="store_true",
        help="only the multiplier-step cadence comparison (run_cadence), printed; writes nothing",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.cadence:
        print("| multiplier_step | steps_per_generation | updates to reach theta (+-5%), per seed | final max dev |")
        print("|---|---|---|---|")
        for S in (1, 8):
            for mode in ("optimizer_step", "generation"):
                rs = [run_cadence(mode, s, S) for s in range(args.seeds if not args.quick else 1)]
                print(f"| {mode} | {S} | {[r['reached_at'] for r in rs]} | {_ms(r['final_dev'] for r in rs)} |")
        return None
    seeds, nm_seeds = (range(1), range(1)) if args.quick else (range(args.seeds), range(args.nm_seeds))
    out = run(seeds, nm_seeds)
    print(table(out))
    print(f"\n{out['seconds']:.1f} s")
    if not args.quick:
        write_json_atomic(RESULTS / f"{args.name}.json", _rounded(to_json(out)), indent=1)
        plot(out, RESULTS / f"{args.name}.png")
        print(f"wrote {RESULTS / args.name}.json and .png")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
