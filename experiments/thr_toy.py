"""THR sanity experiment on a tabular "unconstrained features" policy (the NTHR/THR papers' model), CPU, seconds.

Question: does THR's steering scalar p move GRPO towards exploitation (p > 0: greedy decoding becomes correct
sooner, entropy falls faster) or exploration (p < 0: the policy keeps more entropy)?

Setting (that of a prototype run before this implementation, not in the repository): sequences of 3 tokens from a
vocabulary of 6; the correct set is {(0, 1, 2), (3, 4, 5)} (reward 1, else 0). The policy is "unconstrained
features": one learnable hidden vector
(d = 8) per prefix (1 + 6 + 36 prefixes) and a shared unembedding W (6 x d), pi(. | prefix) = softmax(W h).
One prompt, G = 16 samples per step, on-policy (old policy = current one, so the clipped ratio is 1), Adam
lr 0.02, 200 steps, 8 seeds, loss -mean_{i,k}(A'_{i,k} log pi(y_{i,k})) where A' comes from the package's own
pure functions (``grpo_group_advantages``, ``slice_to_generated_vocab``, ``token_influence``,
``thr_advantages`` in ``reweight`` mode) with p in {+0.5, 0, -0.5}; p = 0 is GRPO.

Initialisation (not given in the prototype's description): h ~ N(0, 0.3^2 I) and W ~ N(0, 0.3^2 / d), chosen so
that the GRPO run sits in the regime reported for that prototype (first-60-step sequence entropy ~4.4 nats out of
log 216 = 5.38, P(correct) ~0.2). With scale 1 the policy starts far from uniform (entropy ~2.9) and, over 8
seeds, the three values of p differ by no more than noise.

Recorded at every step (exactly, from the 216-sequence distribution, before the update): greedy accuracy
(greedy decoding gives a correct sequence), P(correct), pass@4 = 1 - (1 - P(correct))^4, the sequence
entropy (nats), the minority share (mass of the less likely correct sequence / P(correct): do both correct
answers keep mass?) and the fraction of sampled tokens THR marks dominant. For a seed, the initial parameters
and the sampling stream are the same for every p. The table reports means over seeds of the per-seed means
over the first 60 steps, and paired differences to GRPO (mean +- standard error over seeds).

    .venv/bin/python experiments/thr_toy.py            # the full run: table, results/thr_toy.json, results/thr_toy.png
    .venv/bin/python experiments/thr_toy.py --quick    # 60 steps (what the test checks), writes nothing
    .venv/bin/python experiments/thr_toy.py --seeds 32 --name thr_toy.seeds32   # the robustness check (~1 min)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from posttrain.evals.report import finish_experiment
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.advantages import grpo_group_advantages
from posttrain.trainers.thr_grpo import (
    slice_to_generated_vocab,
    thr_advantages,
    token_influence,
)

VOCAB = 6
LENGTH = 3
CORRECT = ((0, 1, 2), (3, 4, 5))
P_VALUES = (0.5, 0.0, -0.5)
WINDOW = 60  # the table averages over the first WINDOW steps
METRICS = ("greedy_acc", "p_correct", "pass_at_4", "entropy", "minority_share", "dominant_frac")
INIT_SCALE = 0.3

# all 216 sequences, their prefix indices (empty: 0, (a): 1 + a, (a, b): 7 + 6a + b) and correctness
SEQS = torch.cartesian_prod(*[torch.arange(VOCAB)] * LENGTH)  # (216, 3), row-major: index = 36a + 6b + c
N_PREFIX = 1 + VOCAB + VOCAB**2


def prefix_index(seqs):
    a, b = seqs[:, 0], seqs[:, 1]
    return torch.stack([torch.zeros_like(a), 1 + a, 1 + VOCAB + VOCAB * a + b], dim=1)


def is_correct(seqs):
    return torch.stack([(seqs == torch.tensor(c)).all(-1) for c in CORRECT]).any(0)


SEQ_PREFIX = prefix_index(SEQS)
SEQ_CORRECT = is_correct(SEQS)
CORRECT_INDEX = [VOCAB * VOCAB * a + VOCAB * b + c for a, b, c in CORRECT]


class TabularPolicy(torch.nn.Module):
    """One hidden vector per prefix and a shared unembedding: logits(prefix) = W h(prefix)."""

    def __init__(self, d, generator, init_scale=INIT_SCALE):
        super().__init__()
        self.h = torch.nn.Parameter(init_scale * torch.randn(N_PREFIX, d, generator=generator))
        self.W = torch.nn.Parameter(init_scale * torch.randn(VOCAB, d, generator=generator) / d**0.5)

    def logits(self, prefixes):  # (...,) prefix indices -> (..., V)
        return self.h[prefixes] @ self.W.T

    @torch.no_grad()
    def sequence_logprobs(self):  # (216,) exact log-probabilities of every sequence
        logp = self.logits(SEQ_PREFIX).log_softmax(-1)  # (216, 3, V)
        return logp.gather(-1, SEQS[..., None])[..., 0].sum(-1)

    @torch.no_grad()
    def greedy(self):
        prefix, seq = 0, []
        for _ in range(LENGTH):
            tok = int(self.logits(torch.tensor(prefix)).argmax())
            seq.append(tok)
            prefix = 1 + tok if len(seq) == 1 else 1 + VOCAB + VOCAB * seq[0] + tok
        return tuple(seq)


def thr_step_advantages(policy, seqs, rewards, p):
    """A' (G, T) from the old (= current) policy's hidden states and V*-sliced probabilities, via the package."""
    with torch.no_grad():
        prefixes = prefix_index(seqs)
        hidden = policy.h[prefixes]  # (G, T, d): the vector fed to the unembedding
        probs_full = policy.logits(prefixes).softmax(-1)  # (G, T, V)
        mask = torch.ones(seqs.shape, dtype=torch.bool)
        probs, token_pos, _ = slice_to_generated_vocab(probs_full, seqs, mask)
        A = grpo_group_advantages(rewards)
        s, tau = token_influence(hidden, probs, token_pos, mask, rewards >= 1.0)
        adv = thr_advantages(A, s, tau, p, mask, mode="reweight")
        n_dom = ((s.abs() > tau) & mask).sum()
    return adv, float(n_dom) / mask.numel()


def run_one(p, seed, steps, d=8, G=16, lr=0.02, init_scale=INIT_SCALE):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    policy = TabularPolicy(d, gen, init_scale)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    sample_gen = torch.Generator().manual_seed(10_000 + seed)
    hist = {m: [] for m in METRICS}
    for _ in range(steps):
        logp_seq = policy.sequence_logprobs()
        prob = logp_seq.exp()
        p_corr = float(prob[SEQ_CORRECT].sum())
        hist["greedy_acc"].append(float(policy.greedy() in CORRECT))
        hist["p_correct"].append(p_corr)
        hist["pass_at_4"].append(1 - (1 - p_corr) ** 4)
        hist["entropy"].append(float(-(prob * logp_seq).sum()))
        mass = prob[CORRECT_INDEX]
        hist["minority_share"].append(float(mass.min() / mass.sum()))

        idx = torch.multinomial(prob / prob.sum(), G, replacement=True, generator=sample_gen)
        seqs = SEQS[idx]
        rewards = SEQ_CORRECT[idx].float()
        adv, dom = thr_step_advantages(policy, seqs, rewards, p)
        hist["dominant_frac"].append(dom)

        logp_tok = policy.logits(prefix_index(seqs)).log_softmax(-1).gather(-1, seqs[..., None])[..., 0]
        loss = -(adv * logp_tok).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return hist


def run(p_values=P_VALUES, seeds=range(8), steps=200, window=WINDOW, **kw):
    """Train every (p, seed). Returns the config, the table (per p: means over seeds of the per-seed means over
    the first ``window`` steps, and the last step), paired differences against p = 0 (mean and standard error
    over seeds of the per-seed differences, same seeds) and the per-step curves (means over seeds)."""
    torch.set_num_threads(1)
    seeds = list(seeds)
    w = min(window, steps)
    out = {
        "config": {
            "vocab": VOCAB,
            "length": LENGTH,
            "correct": CORRECT,
            "d": kw.get("d", 8),
            "G": kw.get("G", 16),
            "lr": kw.get("lr", 0.02),
            "init_scale": kw.get("init_scale", INIT_SCALE),
            "steps": steps,
            "seeds": seeds,
            "window": w,
            "p_values": list(p_values),
            "thr_mode": "reweight",
            "beta": 1.0,
        },
        "table": {},
        "diff_vs_grpo": {},
        "curves": {},
    }
    per_seed = {}
    for p in p_values:
        hists = [run_one(p, seed, steps, **kw) for seed in seeds]
        per_seed[p] = {m: torch.tensor([h[m][:w] for h in hists], dtype=torch.float64).mean(1) for m in METRICS}
        curves = {m: torch.tensor([h[m] for h in hists], dtype=torch.float64).mean(0) for m in METRICS}
        row = {m: float(per_seed[p][m].mean()) for m in METRICS}
        row.update({f"last_{m}": float(curves[m][-1]) for m in ("greedy_acc", "p_correct", "entropy")})
        out["table"][f"{p:+g}"] = row
        out["curves"][f"{p:+g}"] = {m: [round(float(v), 5) for v in c] for m, c in curves.items()}
    if 0.0 in per_seed and len(seeds) > 1:
        for p in p_values:
            if p != 0.0:
                out["diff_vs_grpo"][f"{p:+g}"] = {
                    m: {"mean": float(d.mean()), "se": float(d.std() / len(seeds) ** 0.5)}
                    for m in METRICS
                    for d in [per_seed[p][m] - per_seed[0.0][m]]
                }
    return out


def format_table(result):
    cfg = result["config"]
    lines = [
        f"means over {len(cfg['seeds'])} seeds and the first {cfg['window']} steps (last: step {cfg['steps']}):",
        "| p | greedy acc | P(correct) | pass@4 | sequence entropy | minority share | dominant tokens | last "
        "greedy | last entropy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p, r in result["table"].items():
        name = "0 (GRPO)" if float(p) == 0 else p
        lines.append(
            f"| {name} | {r['greedy_acc']:.3f} | {r['p_correct']:.3f} | {r['pass_at_4']:.3f} | {r['entropy']:.3f} | "
            f"{r['minority_share']:.3f} | {r['dominant_frac']:.3f} | {r['last_greedy_acc']:.3f} | "
            f"{r['last_entropy']:.3f} |"
        )
    if result["diff_vs_grpo"]:
        lines += [
            "",
            "paired difference to GRPO (same seeds), mean +- standard error over seeds:",
            "| p | greedy acc | P(correct) | pass@4 | sequence entropy |",
            "|---|---|---|---|---|",
        ]
        for p, d in result["diff_vs_grpo"].items():
            cells = [
                f"{d[m]['mean']:+.3f} ± {d[m]['se']:.3f}" for m in ("greedy_acc", "p_correct", "pass_at_4", "entropy")
            ]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result, path):
    plt = pyplot(optional=True)
    if plt is None:
        return None
    panels = [
        ("greedy_acc", "greedy accuracy"),
        ("pass_at_4", "pass@4 (exact)"),
        ("entropy", "sequence entropy (nats)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.6))
    for ax, (m, title) in zip(axes, panels):
        for p, c in result["curves"].items():
            label = "p=0 (GRPO)" if float(p) == 0 else f"p={p}"
            ax.plot(c[m], label=label)
        ax.axvline(result["config"]["window"], color="grey", lw=0.6, ls=":")
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.suptitle(f"THR toy: mean over {len(result['config']['seeds'])} seeds (dotted: end of the table's window)")
    return save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 steps (the test's version)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="thr_toy", help="file stem of the JSON and PNG written under --out")
    args = ap.parse_args(argv)
    steps = args.steps or (WINDOW if args.quick else 200)
    t0 = time.time()
    result = run(seeds=range(args.seeds), steps=steps)
    return finish_experiment(result, t0, format_table, plot, None if args.quick else args.out, args.name)


if __name__ == "__main__":
    main()
