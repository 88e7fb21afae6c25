"""ParetoDA: Pareto domain adaptation, DANN's objectives weighted by a target-guided Pareto direction.

Paper: F. Lv, J. Liang, K. Gong, S. Li, C. H. Liu, H. Li, D. Liu, G. Wang, "Pareto Domain Adaptation", NeurIPS 2021.
Official code: BIT-DA/ParetoDA (a VisDA demo adapted from EPOSearch; no licence file, so nothing is copied: written
from the paper's math). Three objectives on a shared backbone F:

- L_cls: source cross-entropy;
- L_trans: DANN's domain-adversarial loss, a domain discriminator behind a gradient-reversal layer (Ganin et al.
  2016; the reversal coefficient warms up as 2 / (1 + exp(-10 p)) - 1, p = step / grl_warmup_steps, capped at 1);
- L_TCM = -[H(mean_i rho_i) - mean_i H(rho_i)]: target-classification mimicking, an information-maximisation term
  on rho_i proportional to softmax(y_i) * P_cd(source | class, f_i), renormalised over the classes
  (reconstruction: the paper writes the product; the official code feeds it to a softmax as logits).

P_cd comes from a class-wise domain discriminator (one small MLP per class, on detached features), trained with a
per-class cross-entropy (source = 0, target = 1) weighted by the one-hot labels on the source and by the detached
rho on the target: its loss L_cd.

Each step: the gradients G (3 x P) of the three objectives w.r.t. the backbone, the gradient g_val of L_TCM on a
batch of the held-out 10 % of the target, and alpha from the LP of ``multi_objective.target_guided_alpha`` (the
guided LP while L_val > eps, else the dominance LP; the fixed preference 1/3 if HiGHS fails). The backbone steps on
3 sum_j alpha_j L_j; the classifier head and the discriminators on L_cls + L_trans + L_cd. Note: L_TCM <= 0 always
(H of a mean >= the mean of H), so with the paper's L_val = L_TCM on the held-out batch and eps = 1e-3 the guided
LP never fires and every step takes the dominance LP, whose restriction alpha^T G g_val >= min(max_j (G g_val)_j, 0)
carries the target guidance. That is what the official code does too; the ``move`` counts in the log show it.

The experiment (``ParetoDATrainer``, ``posttrain train pareto_da/digits_paretoda``; ``digits_dann`` and
``digits_source_only`` are the baselines): source = scikit-learn's digits (8 x 8), target = other digits rotated by
30 degrees (``scipy.ndimage.rotate``) with inverted intensity, its unlabelled images split 90/10 into train and
held-out; accuracy on all target images. Backbone MLP 64-128-64, classifier head 64-10, DANN discriminator 64-64-1,
class-wise discriminators 64-32-2; SGD with Nesterov momentum and the official decay lr (1 + 0.001 t)^-0.75;
1500 iterations of batches of 64. On that target every arm ends below chance: 1 - x is the sign-flipped centred
image, which a classifier trained on the source scores lowest in its own class, and no arm recovers (the controls:
no shift, target accuracy = source accuracy; inversion alone, 0-0.1 %). ``invert: false`` (rotation only) is the
target on which the three arms separate; EXPERIMENTS.md has both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer, run_arms
from posttrain.trainers.classic.multi_objective import EPOWeighting

ARMS = ("source_only", "dann", "paretoda")


@dataclass
class ParetoDAConfig(AuxConfig, max_steps=1500, eval_every=250, max_seconds=600.0, output_dir="runs/pareto_da"):
    """A step is one source and one target batch."""

    arm: str = field(
        default="paretoda",
        metadata={"help": f"One of {', '.join(ARMS)}: L_cls only; L_cls + L_trans; the Pareto-weighted three."},
    )
    rotate: float = field(default=30.0, metadata={"help": "Rotation of the target digits, degrees."})
    invert: bool = field(default=True, metadata={"help": "Invert the target digits' intensity (1 - x)."})
    val_frac: float = field(default=0.1, metadata={"help": "Held-out share of the unlabelled target (guides the LP)."})
    hidden: int = field(default=128, metadata={"help": "First hidden width of the backbone 64-hidden-64."})
    batch_size: int = field(default=64, metadata={"help": "Source and target minibatch size."})
    learning_rate: float = field(default=0.01, metadata={"help": "SGD initial learning rate."})
    momentum: float = field(default=0.9, metadata={"help": "SGD (Nesterov) momentum."})
    weight_decay: float = field(default=1e-3, metadata={"help": "SGD weight decay."})
    lr_gamma: float = field(default=0.001, metadata={"help": "lr_t = lr (1 + lr_gamma t)^-lr_decay (official)."})
    lr_decay: float = field(default=0.75, metadata={"help": "Exponent of the lr decay."})
    grl_warmup_steps: int = field(default=1000, metadata={"help": "Steps of DANN's reversal-coefficient warm-up."})
    lp_eps: float = field(default=1e-3, metadata={"help": "Guided LP while the held-out L_TCM exceeds this."})

    def __post_init__(self):
        self.require_choice(arm=ARMS)
        self.require_at_least(1, "hidden", "batch_size", "grl_warmup_steps")
        if not 0 < self.val_frac < 0.5:
            raise ValueError(f"val_frac must be in (0, 0.5), got {self.val_frac!r}")
        self.require_positive("learning_rate")
        self.require_non_negative("momentum", "weight_decay", "lr_gamma", "lr_decay", "lp_eps")
        super().__post_init__()


# --- pure math ------------------------------------------------------------------------------------------------


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of p (rows sum to 1); 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def tcm_loss(rho: torch.Tensor) -> torch.Tensor:
    """L_TCM = -[H(mean_i rho_i) - mean_i H(rho_i)] for rho (N x K) with rows on the simplex; in [-log K, 0]."""
    return -(entropy(rho.mean(0)) - entropy(rho).mean())


def tcm_rho(logits: torch.Tensor, p_source: torch.Tensor) -> torch.Tensor:
    """rho proportional to softmax(logits) * P_cd(source | class, f), renormalised over classes (N x K each)."""
    rho = torch.softmax(logits, -1) * p_source
    return rho / rho.sum(-1, keepdim=True).clamp_min(1e-12)


def classwise_domain_loss(
    cd_source: torch.Tensor, cd_target: torch.Tensor, labels: torch.Tensor, rho_target: torch.Tensor
) -> torch.Tensor:
    """L_cd of the class-wise discriminators. cd_*: (N, K, 2) logits over (source, target) per class. Source
    points train their own class's discriminator (one-hot weights) towards 'source', target points train every
    class's discriminator towards 'target' with weight rho (detached); each side averaged, then the two halved."""
    k = cd_source.shape[1]
    ce_s = F.cross_entropy(
        cd_source.reshape(-1, 2), torch.zeros(cd_source.shape[0] * k, dtype=torch.long), reduction="none"
    )
    ce_t = F.cross_entropy(
        cd_target.reshape(-1, 2), torch.ones(cd_target.shape[0] * k, dtype=torch.long), reduction="none"
    )
    w_s = F.one_hot(labels, k).to(ce_s.dtype).reshape(-1)
    w_t = rho_target.detach().reshape(-1)
    return 0.5 * ((w_s * ce_s).sum() / cd_source.shape[0] + (w_t * ce_t).sum() / cd_target.shape[0])


def grl_coefficient(step: int, warmup: int) -> float:
    """DANN's reversal coefficient 2 / (1 + exp(-10 p)) - 1, p = min(step / warmup, 1) (Ganin et al. 2016)."""
    p = min(step / warmup, 1.0)
    return float(2.0 / (1.0 + np.exp(-10.0 * p)) - 1.0)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Identity forward; the gradient times -coeff backward."""
    return _GradReverse.apply(x, coeff)


# --- the digits experiment ------------------------------------------------------------------------------------


def digits_domains(
    seed: int, rotate: float, invert: bool, val_frac: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Source: half of scikit-learn's digits (pixels in [0, 1]); target: the other half rotated and inverted,
    its order split into (train, held-out). Returns xs, ys, xt, yt (yt only for evaluation), the held-out index."""
    from scipy.ndimage import rotate as nd_rotate
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    order = np.random.default_rng(seed).permutation(len(x))
    src, tgt = order[: len(x) // 2], order[len(x) // 2 :]
    images = x[tgt].reshape(-1, 8, 8)
    if rotate:
        images = np.stack([nd_rotate(im, rotate, reshape=False, order=1, mode="constant") for im in images])
    images = np.clip(images, 0.0, 1.0)
    if invert:
        images = 1.0 - images
    n_val = int(round(val_frac * len(tgt)))
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (
        as_t(x[src]),
        torch.tensor(y[src]),
        as_t(images.reshape(len(tgt), 64)),
        torch.tensor(y[tgt]),
        n_val,
    )


class ParetoDATrainer(AuxTrainer):
    """Source-only, DANN or DANN + ParetoDA on rotated, inverted digits; one step = one iteration."""

    method = "pareto_da"
    stateful = ("optimizer", "scheduler", "weighting", "generator")

    def setup(self) -> None:
        a = self.args
        self.xs, self.ys, self.xt, self.yt, n_val = digits_domains(a.seed, a.rotate, a.invert, a.val_frac)
        self.val_idx, self.train_idx = torch.arange(n_val), torch.arange(n_val, len(self.xt))
        self.backbone = nn.Sequential(nn.Linear(64, a.hidden), nn.ReLU(), nn.Linear(a.hidden, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)
        self.domain_disc = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        self.class_discs = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2)) for _ in range(10)
        )
        self.modules_ = nn.ModuleDict(
            {"backbone": self.backbone, "head": self.head, "domain": self.domain_disc, "classwise": self.class_discs}
        )
        self.optimizer = torch.optim.SGD(
            self.modules_.parameters(),
            lr=a.learning_rate,
            momentum=a.momentum,
            nesterov=a.momentum > 0,
            weight_decay=a.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: (1.0 + a.lr_gamma * t) ** (-a.lr_decay)
        )
        self.weighting = EPOWeighting(3, eps=a.lp_eps)
        self.moves = {"guided": 0, "dominance": 0}
        self.alpha_min, self.alpha_sum_err = float("inf"), 0.0  # over every step: alpha stays on the simplex
        self.generator = torch.Generator().manual_seed(a.seed)

    def description(self) -> str:
        return f"pareto_da[{self.args.arm}]"

    def _sample(self, pool: torch.Tensor | None, n: int) -> torch.Tensor:
        size = len(self.xs) if pool is None else len(pool)
        idx = torch.randint(size, (self.args.batch_size,), generator=self.generator)
        return idx if pool is None else pool[idx]

    def _class_disc(self, f: torch.Tensor) -> torch.Tensor:
        return torch.stack([d(f.detach()) for d in self.class_discs], dim=1)  # (N, K, 2)

    def _objectives(self, xs, ys, xt):
        fs, ft = self.backbone(xs), self.backbone(xt)
        ys_logits, yt_logits = self.head(fs), self.head(ft)
        l_cls = F.cross_entropy(ys_logits, ys)
        coeff = grl_coefficient(self.global_step, self.args.grl_warmup_steps)
        d_logits = self.domain_disc(grad_reverse(torch.cat([fs, ft]), coeff)).squeeze(-1)
        d_labels = torch.cat([torch.ones(len(fs)), torch.zeros(len(ft))])
        l_trans = F.binary_cross_entropy_with_logits(d_logits, d_labels)
        cd_s, cd_t = self._class_disc(fs), self._class_disc(ft)
        rho = tcm_rho(yt_logits, torch.softmax(cd_t, -1)[..., 0].detach())
        l_tcm = tcm_loss(rho)
        l_cd = classwise_domain_loss(cd_s, cd_t, ys, rho)
        return l_cls, l_trans, l_tcm, l_cd

    def training_step(self) -> dict:
        a = self.args
        s_idx = self._sample(None, a.batch_size)
        t_idx = self._sample(self.train_idx, a.batch_size)
        xs, ys, xt = self.xs[s_idx], self.ys[s_idx], self.xt[t_idx]
        for m in self.modules_.values():
            m.train()
        l_cls, l_trans, l_tcm, l_cd = self._objectives(xs, ys, xt)
        info = {
            k: float(v.detach())
            for k, v in zip(("loss_cls", "loss_trans", "loss_tcm", "loss_cd"), (l_cls, l_trans, l_tcm, l_cd))
        }
        self.optimizer.zero_grad(set_to_none=True)
        if a.arm == "source_only":
            l_cls.backward()
        elif a.arm == "dann":
            (l_cls + l_trans).backward()
        else:
            backbone = list(self.backbone.parameters())
            others = [p for n, m in self.modules_.items() if n != "backbone" for p in m.parameters()]
            v_idx = self._sample(self.val_idx, a.batch_size)
            fv = self.backbone(self.xt[v_idx])
            rho_v = tcm_rho(self.head(fv), torch.softmax(self._class_disc(fv), -1)[..., 0].detach())
            l_val = tcm_loss(rho_v)
            weighted, result = self.weighting([l_cls, l_trans, l_tcm], backbone, l_val)
            # the backbone on 3 sum alpha_j L_j, the heads and discriminators on L_cls + L_trans + L_cd
            g_backbone = torch.autograd.grad(weighted, backbone, retain_graph=True)
            (l_cls + l_trans + l_cd).backward(inputs=others)
            for p, g in zip(backbone, g_backbone):
                p.grad = g
            self.moves[result.move] += 1
            self.alpha_min = min(self.alpha_min, float(result.alpha.min()))
            self.alpha_sum_err = max(self.alpha_sum_err, abs(float(result.alpha.sum()) - 1.0))
            info.update({f"alpha_{k}": float(v) for k, v in zip(("cls", "trans", "tcm"), result.alpha)})
            info.update(
                {
                    "loss_val_tcm": float(l_val.detach()),
                    "lp_failures": self.weighting.failures,
                    "guided_moves": self.moves["guided"],
                }
            )
        if a.arm != "paretoda":  # the class-wise discriminators train in every arm (they only read features)
            l_cd.backward(inputs=list(self.class_discs.parameters()))
        self.optimizer.step()
        self.scheduler.step()
        return info

    @torch.no_grad()
    def evaluate(self) -> dict:
        for m in self.modules_.values():
            m.eval()
        acc = lambda x, y: float((self.head(self.backbone(x)).argmax(-1) == y).float().mean())  # noqa: E731
        return {"source_acc": acc(self.xs, self.ys), "target_acc": acc(self.xt, self.yt)}

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "modules": {k: v.clone() for k, v in self.modules_.state_dict().items()},
            "moves": dict(self.moves),
            "alpha_stats": (self.alpha_min, self.alpha_sum_err),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.modules_.load_state_dict(state["modules"])
        self.moves = dict(state["moves"])
        self.alpha_min, self.alpha_sum_err = state["alpha_stats"]


def compare_arms(seeds: Iterable[int] = (0, 1, 2), arms: Iterable[str] = ARMS, **overrides) -> dict:
    """Every arm on the same data split and seed -> {arm: [final evaluate() per seed]} (ParetoDA's with the LP
    failure and guided-move fractions)."""

    def lp_stats(arm, trainer, final):
        if arm == "paretoda":
            final["lp_failure_frac"] = trainer.weighting.failures / max(trainer.weighting.steps, 1)
            final["guided_frac"] = trainer.moves["guided"] / max(trainer.weighting.steps, 1)
            final["ascent_frac"] = trainer.weighting.ascents / max(trainer.weighting.steps, 1)
            final["alpha_min"], final["alpha_sum_err"] = trainer.alpha_min, trainer.alpha_sum_err

    base = overrides.pop("output_dir", ParetoDAConfig.output_dir)
    arm_values = {arm: {"arm": arm} for arm in arms}
    return run_arms(ParetoDAConfig, ParetoDATrainer, arm_values, seeds, base, extra=lp_stats, **overrides)
