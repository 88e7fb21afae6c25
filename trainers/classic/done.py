"""DONE: doubly robust instance-reweighted adversarial training (KL-DRO weights over the adversarial losses).

Paper: D. Sow, S. Lin, Z. Wang, Y. Liang, "Doubly Robust Instance-Reweighted Adversarial Training", ICLR 2024,
arXiv 2308.00311. The paper says its code "will be available soon"; none was found, so this is written from the
math. The objective (their eq. for the KL-regularised DRO problem) over n points and an l_inf budget eps:

    min_theta  max_{w in simplex}  sum_i w_i l(theta; x_i + delta_i*, y_i) - r KL(w || uniform),
    delta_i* = argmax_{||delta||_inf <= eps} l(theta; x_i + delta, y_i)

The inner max over w has the closed form w_i* = softmax(l / r)_i, which turns the objective into the compositional
r log((1/n) sum_i exp(l_i / r)) = f(g(theta)) with g = mean exp(l / r). Minibatch gradients of f(g) are biased, so g
is tracked by a moving average u (stop-gradient) and the minibatch loss is

    u <- (1 - beta) u + beta mean_{i in B} exp(l_i / r),     loss = mean_{i in B} [exp(l_i / r) / u] l_i

whose gradient is the gradient of r log g with g replaced by u (weights proportional to softmax(l / r)). This is the
paper's first-order variant: the attack is PGD (Madry et al.) and, Danskin-style, delta is held fixed for the theta
gradient. The paper's full CID algorithm (a log-barrier-penalised attack differentiated implicitly) is NOT
implemented. The defaults r = 1, beta = 0.5 are this project's choice: the paper's values are UNVERIFIED (no code).
u is kept in log space (``log_u``) so that exp(l / r) of a large loss never overflows.

Two uses:

- ``DONETrainer`` (``posttrain train done/blobs_done``, ``done/blobs_at`` for the uniform-weight PGD-AT arm): this
  project's minority-class experiment. 3-class Gaussian blobs in 10-D; class 2 is a 10 % minority set close to
  class 1, so it is the class an attack breaks first. MLP 10-64-3, PGD-5 (alpha = eps / 4) at eps = 0.15, Adam 1e-3,
  30 epochs of minibatches of 64. A step is one minibatch: attack, then the (re)weighted update. Evaluated with
  PGD-10: per-class and average robust accuracy, and the effective sample size 1 / sum w^2 of the KL-DRO weights
  over the whole training set (the weights have not collapsed while it stays well above 0).
- ``KLDROReweight`` on any per-example loss, and in LLM recipes the ``kl_dro_r`` / ``kl_dro_beta`` keys on ``sft``:
  each sequence's tokens are weighted by exp(l_i / r) / u with l_i the sequence's mean token loss (no attack: the
  distributionally robust reweighting alone). u goes in each checkpoint's method state; ``kl_dro_r`` -> infinity is
  TRL's SFT loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from posttrain.key_groups import pop_prefixed_keys
from posttrain.trainers.classic.base import AuxConfig, AuxTrainer, run_arms


@dataclass
class DONEConfig(AuxConfig, max_steps=300, eval_every=50, output_dir="runs/done"):
    """A step is one minibatch (the default 300 = 30 epochs of 640 points by 64)."""

    reweight: bool = field(
        default=True,
        metadata={"help": "DONE's KL-DRO instance weights; false: PGD adversarial training with uniform weights."},
    )
    r: float = field(default=1.0, metadata={"help": "KL-regularisation strength r: weights = softmax(loss / r)."})
    beta: float = field(default=0.5, metadata={"help": "Moving-average rate of u, the running mean of exp(loss / r)."})
    epsilon: float = field(default=0.15, metadata={"help": "l_inf attack budget eps (training and evaluation)."})
    pgd_steps: int = field(default=5, metadata={"help": "PGD steps of the training attack (step size eps / 4)."})
    eval_pgd_steps: int = field(
        default=10, metadata={"help": "PGD steps of the evaluation attack (step size eps / 4)."}
    )
    dim: int = field(default=10, metadata={"help": "Input dimension of the Gaussian blobs."})
    n_train: int = field(default=640, metadata={"help": "Training points (10 % of them in the minority class 2)."})
    n_test: int = field(default=3000, metadata={"help": "Test points, same class proportions."})
    minority_frac: float = field(default=0.1, metadata={"help": "Share of class 2, the minority next to class 1."})
    separation: float = field(default=3.0, metadata={"help": "Distance of classes 0 and 1 (unit-variance blobs)."})
    minority_gap: float = field(default=2.0, metadata={"help": "Distance of the class-2 mean from class 1's."})
    hidden: int = field(default=64, metadata={"help": "Hidden width of the MLP dim-hidden-3."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate."})
    batch_size: int = field(default=64, metadata={"help": "Minibatch size."})

    def __post_init__(self):
        self.require_at_least(1, "pgd_steps", "eval_pgd_steps", "dim", "hidden", "batch_size")
        for name in ("n_train", "n_test"):
            if int(getattr(self, name)) < 30:
                raise ValueError(f"{name} must be >= 30 (three classes, one a minority), got {getattr(self, name)!r}")
        check_kl_dro(self.r, self.beta)
        self.require_positive("epsilon", "separation", "minority_gap", "learning_rate")
        if not 0 < self.minority_frac < 0.5:
            raise ValueError(f"minority_frac must be in (0, 0.5), got {self.minority_frac!r}")
        super().__post_init__()


def check_kl_dro(r: float, beta: float) -> None:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (r > 0 and math.isfinite(r)):
        raise ValueError(f"r must be a number > 0 (the KL strength; large r: uniform weights), got {r!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1] (the moving-average rate of u), got {beta!r}")


# --- pure math ------------------------------------------------------------------------------------------------


def kl_dro_weights(losses: torch.Tensor, r: float) -> torch.Tensor:
    """The closed-form inner maximiser argmax_{w in simplex} w.l - r KL(w || uniform) = softmax(l / r)."""
    return torch.softmax(losses.detach().double() / r, dim=0).to(losses.dtype)


def kl_dro_objective(losses: torch.Tensor, r: float) -> torch.Tensor:
    """max_w w.l - r KL(w || uniform) = r log((1/n) sum_i exp(l_i / r)) (the compositional objective f(g))."""
    return r * (torch.logsumexp(losses / r, dim=0) - math.log(losses.numel()))


def effective_sample_size(weights: torch.Tensor) -> float:
    """(sum w)^2 / sum w^2: n for uniform weights, 1 when one weight carries everything."""
    w = weights.detach().double()
    return float(w.sum() ** 2 / (w**2).sum())


def update_log_u(log_u: float | None, losses: torch.Tensor, r: float, beta: float) -> float:
    """log of u <- (1 - beta) u + beta mean exp(l / r), in log space; the first batch sets u = mean exp(l / r)."""
    log_batch = float(torch.logsumexp(losses.detach().double() / r, dim=0) - math.log(losses.numel()))
    if log_u is None:
        return log_batch
    if beta >= 1.0:
        return log_batch
    return float(np.logaddexp(math.log1p(-beta) + log_u, math.log(beta) + log_batch))


def reweighted_loss(losses: torch.Tensor, log_u: float, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mean_i [exp(l_i / r) / u] l_i with the weights detached; returns (loss, weights)."""
    weights = torch.exp(losses.detach().double() / r - log_u).to(losses.dtype)
    return (weights * losses).mean(), weights


class KLDROReweight:
    """The reweighting as a loss wrapper for any per-example loss: ``loss, info = reweight(losses)``.

    Keeps log u (the running mean of exp(l / r), stop-gradient) between calls; ``state_dict()`` /
    ``load_state_dict()`` carry it through a checkpoint. ``info``: weight ESS fraction, max weight (both of the
    batch's weights normalised to sum 1) and u.
    """

    def __init__(self, r: float = 1.0, beta: float = 0.5):
        check_kl_dro(r, beta)
        self.r, self.beta, self.log_u = float(r), float(beta), None

    def update(self, losses: torch.Tensor) -> None:
        self.log_u = update_log_u(self.log_u, losses, self.r, self.beta)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.exp(losses.detach().double() / self.r - self.log_u).to(losses.dtype)

    def __call__(self, losses: torch.Tensor) -> tuple[torch.Tensor, dict]:
        self.update(losses)
        loss, weights = reweighted_loss(losses, self.log_u, self.r)
        return loss, self.info(weights)

    def info(self, weights: torch.Tensor) -> dict:
        normalised = weights.detach().double() / weights.detach().double().sum()
        return {
            "ess_frac": effective_sample_size(weights) / weights.numel(),
            "max_weight": float(normalised.max()),
            "u": math.exp(self.log_u) if self.log_u < 700 else math.inf,
        }

    def state_dict(self) -> dict:
        return {"log_u": self.log_u, "r": self.r, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.log_u = state["log_u"]


def kl_dro_sequence_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reweight: KLDROReweight,
    update: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict]:
    """The KL-DRO reweighting of a causal-LM loss: sum_t w_seq(t) ce_t / N, w_i = exp(l_i / r) / u.

    logits (B, T, V), labels (B, T) unshifted as the model receives them (position t predicts labels[t + 1]). l_i is
    sequence i's mean token cross-entropy (a sequence without labelled tokens gets no weight and no say in u). N is
    ``num_items_in_batch`` when given (as transformers' causal-LM loss under gradient accumulation), else the
    labelled-token count, so weights of 1 give exactly the causal-LM loss. ``update``: advance u with this batch's
    l (False in evaluation); ``gather`` (e.g. ``accelerator.gather``) collects every rank's l first, so all ranks
    hold the same u.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != ignore_index
    ce = torch.where(mask, -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    counts = mask.sum(-1)
    has = counts > 0
    seq = ce.sum(-1) / counts.clamp_min(1)
    if update:
        everyone = gather(seq.detach()[has]) if gather is not None else seq.detach()[has]
        if everyone.numel():
            reweight.update(everyone)
    if reweight.log_u is None and has.any():  # an evaluation before any training step: u from this batch
        reweight.update(seq.detach()[has])
    if reweight.log_u is None:  # no labelled token at all
        return ce.sum() * 0.0, {}
    weights = torch.where(has, reweight.weights(seq), 0.0)
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    denom = torch.as_tensor(denom, device=logits.device, dtype=torch.float32).clamp_min(1)
    loss = (weights.detach().unsqueeze(-1) * ce).sum() / denom
    info = reweight.info(weights[has]) if has.any() else {}
    return loss, info


def pgd_attack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, alpha: float | None = None
) -> torch.Tensor:
    """l_inf PGD from x (no random start): ``steps`` signed-gradient ascent steps of size alpha (default eps / 4)
    on the cross-entropy, each projected back onto the eps-ball. Returns the perturbation delta (detached)."""
    alpha = eps / 4 if alpha is None else alpha
    delta = torch.zeros_like(x)
    was_training = model.training
    model.eval()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    model.train(was_training)
    return delta.detach()


# --- the minority-class experiment ----------------------------------------------------------------------------


def minority_blobs(
    n: int, dim: int, minority_frac: float, separation: float, gap: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-variance Gaussian blobs: class 0 at 0, class 1 at ``separation`` along e_1, class 2 (``minority_frac``
    of the points) ``gap`` beyond class 1 along e_2, so its only near neighbour is class 1."""
    means = np.zeros((3, dim))
    means[1, 0] = separation
    means[2, 0], means[2, 1] = separation, gap
    n2 = max(3, int(round(minority_frac * n)))
    n0 = (n - n2) // 2
    y = np.concatenate([np.zeros(n0), np.ones(n - n2 - n0), np.full(n2, 2)]).astype(np.int64)
    x = means[y] + rng.standard_normal((n, dim))
    order = rng.permutation(n)
    return torch.tensor(x[order], dtype=torch.float32), torch.tensor(y[order])


class DONETrainer(AuxTrainer):
    """PGD adversarial training on minority blobs, uniform (AT) or KL-DRO (DONE) weights; a step is one minibatch."""

    method = "done"

    def setup(self) -> None:
        a = self.args
        data_rng = np.random.default_rng(a.seed)
        self.x, self.y = minority_blobs(a.n_train, a.dim, a.minority_frac, a.separation, a.minority_gap, data_rng)
        self.x_test, self.y_test = minority_blobs(
            a.n_test, a.dim, a.minority_frac, a.separation, a.minority_gap, data_rng
        )
        self.model = nn.Sequential(nn.Linear(a.dim, a.hidden), nn.ReLU(), nn.Linear(a.hidden, 3))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=a.learning_rate)
        self.reweight = KLDROReweight(a.r, a.beta)
        self.generator = torch.Generator().manual_seed(a.seed)
        self.order = torch.empty(0, dtype=torch.long)

    def description(self) -> str:
        return f"done[{'kl-dro' if self.args.reweight else 'uniform-at'}]"

    def _batch(self):
        if len(self.order) == 0:
            self.order = torch.randperm(len(self.x), generator=self.generator)
        idx, self.order = self.order[: self.args.batch_size], self.order[self.args.batch_size :]
        return self.x[idx], self.y[idx]

    def training_step(self) -> dict:
        a = self.args
        x, y = self._batch()
        delta = pgd_attack(self.model, x, y, a.epsilon, a.pgd_steps)
        self.model.train()
        losses = F.cross_entropy(self.model(x + delta), y, reduction="none")
        if a.reweight:
            loss, info = self.reweight(losses)
        else:
            loss, info = losses.mean(), {}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(losses.detach().mean()), **{f"batch_{k}": v for k, v in info.items()}}

    def robust_eval(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(adversarial losses, correct under attack) per point, PGD with ``steps`` steps."""
        delta = pgd_attack(self.model, x, y, self.args.epsilon, steps)
        self.model.eval()
        with torch.no_grad():
            logits = self.model(x + delta)
        return F.cross_entropy(logits, y, reduction="none"), logits.argmax(-1) == y

    def evaluate(self) -> dict:
        a = self.args
        self.model.eval()
        with torch.no_grad():
            clean = (self.model(self.x_test).argmax(-1) == self.y_test).float().mean()
        losses, correct = self.robust_eval(self.x_test, self.y_test, a.eval_pgd_steps)
        out = {"clean_acc": float(clean), "robust_acc": float(correct.float().mean())}
        per_class = []
        for c in range(3):
            mask = self.y_test == c
            per_class.append(float(correct[mask].float().mean()))
            out[f"robust_acc/class{c}"] = per_class[-1]
            out[f"robust_loss/class{c}"] = float(losses[mask].mean())
        out["worst_class_robust_acc"] = min(per_class)
        # the KL-DRO weights softmax(l / r) over the whole training set, under the training attack
        train_losses, _ = self.robust_eval(self.x, self.y, a.pgd_steps)
        w = kl_dro_weights(train_losses, a.r)
        out["ess_frac"] = effective_sample_size(w) / len(w)
        out["max_weight"] = float(w.max())
        return out

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            **self.minibatch_sgd_state(),
            "reweight": self.reweight.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.load_minibatch_sgd_state(state)
        self.reweight.load_state_dict(state["reweight"])


def compare_arms(seeds: Iterable[int] = (0, 1, 2, 3, 4), **overrides) -> dict:
    """Uniform PGD-AT and DONE on the same data and initial weights per seed -> {arm: [final evaluate() per seed]}."""

    def min_ess(arm, trainer, final):
        final["min_ess_frac"] = min([h["ess_frac"] for h in trainer.history] + [final["ess_frac"]])

    base = overrides.pop("output_dir", DONEConfig.output_dir)
    arms = {"at": {"reweight": False}, "done": {"reweight": True}}
    return run_arms(DONEConfig, DONETrainer, arms, seeds, base, extra=min_ess, **overrides)


# --- the LLM recipe keys and the SFT trainer ------------------------------------------------------------------

KL_DRO_KEYS = ("kl_dro_r", "kl_dro_beta")


@dataclass
class KLDROArgs:
    r: float = 1.0
    beta: float = 0.5


def parse_kl_dro_keys(values: dict, sources: dict, source: str, method: str, task: str) -> KLDROArgs | None:
    """Pop ``kl_dro_r`` / ``kl_dro_beta`` from a recipe's values and check them (nothing loads). Raises ValueError
    naming the key and where it was set."""
    given = pop_prefixed_keys(values, sources, source, prefix="kl_dro", names=KL_DRO_KEYS, group="KL-DRO reweighting")
    if given is None:
        return None
    where = " and ".join(sorted({sources.get(k, source) for k in given}))
    if task != "sft":
        raise ValueError(
            f"{where}: kl_dro_* keys reweight each sequence of an SFT loss and apply to 'sft' recipes only, not to "
            f"method '{method}'" + ("; the done method has its own 'r' and 'beta' keys" if task == "aux" else "")
        )
    if "kl_dro_r" not in given:
        raise ValueError(f"{where}: kl_dro_beta needs kl_dro_r (the KL strength r > 0; e.g. 1.0)")
    args = KLDROArgs()
    for key, value in given.items():
        name = key.removeprefix("kl_dro_")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        try:
            check_kl_dro(**{"r": args.r, "beta": args.beta, name: value})
        except ValueError as err:
            raise ValueError(f"{sources.get(key, source)}: kl_dro_{err}") from None
        setattr(args, name, float(value))
    return args


def kl_dro_sft_trainer(sft_cls: type) -> type:
    """``sft_cls`` (TRL's SFTTrainer, as ``runtime.guarded`` wraps it) with KL-DRO sequence weights; u is method
    state (``method_state.pt`` in each checkpoint)."""

    class KLDROSFTTrainer(sft_cls):
        """SFT whose sequences weigh exp(l_i / r) / u in the token-averaged loss; r -> infinity: stock SFT."""

        def __init__(self, *args, kl_dro: KLDROArgs, **kwargs):
            super().__init__(*args, **kwargs)
            self.kl_dro = KLDROReweight(kl_dro.r, kl_dro.beta)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            logits_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            logits_inputs["use_cache"] = False
            outputs = model(**logits_inputs)
            loss, info = kl_dro_sequence_loss(
                outputs.logits,
                inputs["labels"],
                self.kl_dro,
                update=mode == "train",
                num_items_in_batch=num_items_in_batch,
                gather=self.accelerator.gather,
            )
            # as TRL's SFT loss: num_items_in_batch counts every rank's tokens and DDP averages the gradients
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            for name, value in info.items():
                self._metrics[mode][f"kl_dro/{name}"].append(value)
            return (loss, outputs) if return_outputs else loss

        def method_state(self) -> dict:
            return self.kl_dro.state_dict()

        def load_method_state(self, state: dict) -> None:
            self.kl_dro.load_state_dict(state)

    KLDROSFTTrainer.__name__ = KLDROSFTTrainer.__qualname__ = "KLDROSFTTrainer"
    return KLDROSFTTrainer
