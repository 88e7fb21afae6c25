"""Self-distillation with ground-truth mixing: kernel ridge regression (KRR) theory and an LLM SFT loss.

Paper: K. Borup, L. N. Andersen, "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization
Imposed by Self-Distillation", NeurIPS 2021, arXiv 2102.13088. Official code: Kennethborup/self_distillation
(``toy_example.ipynb``, ``self_distiller.py``; no licence seen, nothing copied). Written here from the math.

KRR on training inputs X (n points), kernel matrix K = V D V^T, A = K (K + lambda I)^-1 = V diag(d/(d+lambda)) V^T:

- step 1, the teacher, is plain KRR:                y_1 = A y
- step tau >= 2, a student fit to a mixed target:   y_tau = A (alpha y + (1 - alpha) y_{tau-1})
  (argmin_f alpha ||y - f(X)||^2 + (1 - alpha) ||y_{tau-1} - f(X)||^2 + lambda ||f||_H^2: the weights sum to 1,
  so it is KRR on the mixed target); at a new point f_tau(x) = k(x)^T (K + lambda I)^-1 (the same mixed target).
- In the eigenbasis y_tau = V B_tau V^T y with B_1 = diag(d/(d+lambda)), B_tau = B_1 ((1 - alpha) B_{tau-1} + alpha I),
  and B_inf = alpha D (alpha D + lambda I)^-1: the original problem with the regularisation amplified to
  lambda/alpha. alpha = 0 collapses to 0 (Mobahi et al. 2020); alpha > 0 stops the collapse.
- y_tau(alpha) = A y_{tau-1} + alpha A (y - y_{tau-1}) is affine in alpha, so its squared error against a
  reference t is minimised in closed form by
      alpha*_tau = <A (y - y_{tau-1}), t - A y_{tau-1}> / ||A (y - y_{tau-1})||^2
  (derived here; the paper's "closed form optimal weighting at each step" up to notation). It can fall outside
  [0, 1]: ``alpha: auto`` clips it to [0, 1] as the paper's parameterisation needs and logs the raw value.

The toy (``KRRSelfDistillTrainer``, ``posttrain train self_distill/krr_toy``) is the repository's notebook: 11 points
x = 0, 0.1, ..., 1 with the fixed noisy sine targets of Mobahi et al. (``MOBAHI_Y``), RBF gamma = 80, lambda = 0.2,
the loss the mean squared error to sin(2 pi x) on 101 grid points. It reproduces the README's table to 1e-4.

The LLM piece (``gt_mixed_distill_loss``; recipe keys ``self_distill_alpha`` and ``self_distill_teacher`` on an
``sft`` recipe, wired by ``attach_self_distill``): the SFT target of every completion token becomes the mixture
alpha * one-hot(ground truth) + (1 - alpha) * softmax(teacher logits), and the loss is the cross-entropy of the
student against it, which is linear in the target:

    loss = alpha * CE(student, ground truth) + (1 - alpha) * CE(student, teacher distribution)

with both terms over the same tokens and with the same normalisation as TRL's SFT loss; alpha = 1 is stock SFT.
Reconstruction note: the repository's deep-net form (``self_distiller.py``) is
alpha MSE(softmax(z), one-hot) + (1 - alpha) MSE(softmax(z), softmax(z_teacher)) for classifiers; SFT's loss is
cross-entropy, so the mixing is applied to the cross-entropy target here. ``alpha: auto`` is refused for LLMs:
the closed form needs a student that is a linear smoother of its target (y_tau affine in alpha and a squared-error
reference); a network trained by SGD on cross-entropy is neither, and the paper's deep-learning estimate needs
a held-out reference and a re-trained student per candidate alpha, which one SFT run does not have.
The teacher is a frozen full copy on every process (plain, DDP); it is not sharded under DeepSpeed ZeRO-3 or FSDP,
and for alpha < 1 TRL's own SFT metrics (entropy, token accuracy) are replaced by the two loss terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer

# The targets of Mobahi, Farajtabar, Bartlett (2020) as the official notebook lists them, at x = 0, 0.1, ..., 1.
MOBAHI_Y = np.array(
    [
        0.38476636465198066,
        1.2333967683416893,
        1.33232242218057,
        0.69201594888895180,
        -0.29756145531871736,
        -0.24189291901377769,
        -0.7964485769175675,
        -0.9616480167034174,
        -0.49672509509916934,
        -0.3469066003991437,
        0.5589512650600734,
    ]
)
ALPHA_AUTO = "auto"


@dataclass
class SelfDistillConfig(AuxConfig, max_steps=6, eval_every=1, output_dir="runs/self_distill"):
    """A step is one distillation step; step 1 is the teacher (plain KRR)."""

    alpha: str = field(
        default="0.35",
        metadata={
            "help": "Weight of the ground truth in every student's target, "
            "a number in [0, 1], or 'auto' for the closed-form alpha* of each "
            "step against the noise-free function (clipped to [0, 1])."
        },
    )
    rbf_gamma: float = field(
        default=80.0, metadata={"help": "RBF kernel width gamma, k(x, x') = exp(-gamma |x - x'|^2)."}
    )
    lambd: float = field(default=0.2, metadata={"help": "Ridge regularisation lambda."})
    grid_points: int = field(default=101, metadata={"help": "Points of the evaluation grid on [0, 1]."})

    def __post_init__(self):
        self.alpha = str(self.alpha)
        if self.alpha != ALPHA_AUTO:
            try:
                value = float(self.alpha)
            except ValueError:
                raise ValueError(f"alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}") from None
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"alpha must be in [0, 1] (the ground-truth weight), got {value!r}")
        self.require_at_least(2, "grid_points")
        self.require_positive("rbf_gamma", "lambd")
        super().__post_init__()


# --- pure math: kernel ridge regression -----------------------------------------------------------------------


def rbf_kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """exp(-gamma ||a_i - b_j||^2) (scikit-learn's, which the official notebook uses too)."""
    from sklearn.metrics.pairwise import rbf_kernel as sk_rbf

    return sk_rbf(a, b, gamma=gamma)


def ridge_solve(K: np.ndarray, lambd: float, target: np.ndarray) -> np.ndarray:
    """(K + lambda I)^-1 target: the KRR coefficients of a target (a solve, not an inverse)."""
    return np.linalg.solve(K + lambd * np.eye(len(K)), target)


def distill_target(y: np.ndarray, y_prev: np.ndarray, alpha: float) -> np.ndarray:
    """The target of a student: alpha y + (1 - alpha) y_{tau-1}."""
    return alpha * y + (1.0 - alpha) * y_prev


def b_recursion(d: np.ndarray, lambd: float, alpha: float, steps: int) -> list[np.ndarray]:
    """Diagonals of B_1..B_steps: B_1 = d/(d+lambda), B_tau = B_1 ((1 - alpha) B_{tau-1} + alpha)."""
    b1 = d / (d + lambd)
    out = [b1]
    for _ in range(steps - 1):
        out.append(b1 * ((1.0 - alpha) * out[-1] + alpha))
    return out


def b_limit(d: np.ndarray, lambd: float, alpha: float) -> np.ndarray:
    """Diagonal of B_inf = alpha D (alpha D + lambda I)^-1 (0 for alpha = 0)."""
    return alpha * d / (alpha * d + lambd)


def optimal_alpha(A: np.ndarray, y: np.ndarray, y_prev: np.ndarray, t: np.ndarray) -> float:
    """Unconstrained argmin over alpha of ||A (alpha y + (1 - alpha) y_prev) - t||^2 (NaN if y_prev fits y exactly)."""
    direction = A @ (y - y_prev)
    denom = float(direction @ direction)
    return float(direction @ (t - A @ y_prev)) / denom if denom > 0 else math.nan


class KRRSelfDistillTrainer(AuxTrainer):
    """Self-distillation of kernel ridge regression on the official toy; one step is one distillation step."""

    method = "self_distill"

    def setup(self) -> None:
        args = self.args
        self.x = np.round(np.arange(11) * 0.1, 10)
        self.y = MOBAHI_Y.copy()
        self.truth = np.sin(2 * np.pi * self.x)  # the reference of alpha: auto (the paper's analysis)
        self.grid = np.linspace(0.0, 1.0, args.grid_points)
        self.K = rbf_kernel(self.x[:, None], self.x[:, None], args.rbf_gamma)
        self.K_grid = rbf_kernel(self.grid[:, None], self.x[:, None], args.rbf_gamma)
        self.A = self.K @ np.linalg.inv(self.K + args.lambd * np.eye(len(self.x)))
        self.eig, self.V = np.linalg.eigh(self.K)
        self.fit = None  # y_tau: the current model's predictions at the training points
        self.target = None  # the last student's target
        self.alphas: list[float] = []
        self.alphas_raw: list[float] = []

    def description(self) -> str:
        return f"self_distill[alpha={self.args.alpha}]"

    def _alpha(self) -> tuple[float, float]:
        if self.args.alpha != ALPHA_AUTO:
            a = float(self.args.alpha)
            return a, a
        raw = optimal_alpha(self.A, self.y, self.fit, self.truth)
        return float(np.clip(raw, 0.0, 1.0)) if math.isfinite(raw) else 1.0, raw

    def training_step(self) -> dict:
        if self.fit is None:  # step 1: the teacher is plain KRR on y
            alpha, raw = 1.0, math.nan
            self.target = self.y.copy()
        else:
            alpha, raw = self._alpha()
            self.target = distill_target(self.y, self.fit, alpha)
        self.fit = self.A @ self.target
        self.alphas.append(alpha)
        self.alphas_raw.append(raw)
        return {"alpha": alpha, "alpha_raw": raw}

    def predict_grid(self) -> np.ndarray:
        return self.K_grid @ ridge_solve(self.K, self.args.lambd, self.target)

    def limit_grid(self, alpha: float) -> np.ndarray:
        """f_inf(x) = alpha k(x)^T (alpha K + lambda I)^-1 y: KRR with lambda / alpha."""
        if alpha == 0:
            return np.zeros_like(self.grid)
        return alpha * self.K_grid @ ridge_solve(alpha * self.K, self.args.lambd, self.y)

    def evaluate(self) -> dict:
        if self.fit is None:
            return {}
        truth_grid = np.sin(2 * np.pi * self.grid)
        alpha_inf = self.alphas[-1] if self.args.alpha == ALPHA_AUTO else float(self.args.alpha)
        # B_tau from the recursion over the alphas used, in the eigenbasis of K (largest eigenvalue first)
        b = b_tau = self.eig / (self.eig + self.args.lambd)
        for a in self.alphas[1:]:
            b_tau = b * ((1 - a) * b_tau + a)
        return {
            "loss_to_truth": float(np.mean((self.predict_grid() - truth_grid) ** 2)),
            "loss_limit": float(np.mean((self.limit_grid(alpha_inf) - truth_grid) ** 2)),
            "mse_to_y": float(np.mean((self.fit - self.y) ** 2)),
            "b_min": float(b_tau.min()),
            "b_max": float(b_tau.max()),
            "b_spectrum": b_tau[::-1].tolist(),
        }

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "fit": None if self.fit is None else self.fit.copy(),
            "target": None if self.target is None else self.target.copy(),
            "alphas": list(self.alphas),
            "alphas_raw": list(self.alphas_raw),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.fit = None if state["fit"] is None else np.array(state["fit"], dtype=float)
        self.target = None if state["target"] is None else np.array(state["target"], dtype=float)
        self.alphas, self.alphas_raw = list(state["alphas"]), list(state["alphas_raw"])


# --- pure math: the LLM loss ----------------------------------------------------------------------------------


def gt_mixed_distill_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the student against alpha one-hot(label) + (1 - alpha) softmax(teacher), causal-LM style.

    logits, teacher_logits: (B, T, V); labels: (B, T), unshifted as the model receives them (position t predicts
    labels[t + 1]), ``ignore_index`` where no loss is taken. Summed over the labelled tokens and divided by
    ``num_items_in_batch`` when given (as transformers' causal-LM loss does under gradient accumulation), else by
    their count. Returns (loss, {"ce_ground_truth", "ce_teacher"}) with the two terms normalised the same way.
    """
    if logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ: the teacher must share the student's vocabulary"
        )
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != ignore_index
    ce_gt = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    teacher_p = F.softmax(teacher_logits[:, :-1].float(), dim=-1)
    ce_teacher = -(teacher_p * logp).sum(-1)
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    denom = torch.as_tensor(denom, device=logits.device, dtype=torch.float32).clamp_min(1)
    gt_term = torch.where(mask, ce_gt, 0.0).sum() / denom
    teacher_term = torch.where(mask, ce_teacher, 0.0).sum() / denom
    return alpha * gt_term + (1.0 - alpha) * teacher_term, {"ce_ground_truth": gt_term, "ce_teacher": teacher_term}


# --- the LLM recipe keys and the SFT trainer ------------------------------------------------------------------

SELF_DISTILL_KEYS = ("self_distill_alpha", "self_distill_teacher")


@dataclass
class SelfDistillArgs:
    alpha: float
    teacher: str


def parse_self_distill_keys(values: dict, sources: dict, source: str, method: str, task: str) -> SelfDistillArgs | None:
    """Pop ``self_distill_alpha`` / ``self_distill_teacher`` from a recipe's values and check them (nothing loads).

    Raises ValueError with the message; the recipe loader adds where the key was set.
    """
    given = {k: values.pop(k) for k in SELF_DISTILL_KEYS if k in values}
    if not given:
        return None
    where = " and ".join(sorted({sources.get(k, source) for k in given}))
    if task != "sft":
        raise ValueError(
            f"{where}: self_distill_* keys mix the SFT target with a teacher's distribution and apply to "
            f"'sft' recipes only, not to method '{method}'; remove them or use method: sft"
        )
    if "self_distill_alpha" not in given:
        raise ValueError(f"{where}: self_distill_teacher needs self_distill_alpha (the ground-truth weight in [0, 1])")
    alpha = given["self_distill_alpha"]
    if isinstance(alpha, str) and alpha.strip().lower() == ALPHA_AUTO:
        raise ValueError(
            f"{sources.get('self_distill_alpha', source)}: self_distill_alpha: auto has no sound meaning for an LLM: "
            "the closed-form alpha* (Borup & Andersen 2021) holds for kernel ridge regression, whose prediction is "
            "affine in alpha with a squared-error reference; SFT of a network on cross-entropy is neither. Give a "
            "number in [0, 1] (the paper's deep-net example uses 0.6), e.g. tuned on a held-out split"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, str)):
        raise ValueError(
            f"{sources.get('self_distill_alpha', source)}: self_distill_alpha expects a number in [0, 1], got {alpha!r}"
        )
    try:
        alpha = float(alpha)
    except ValueError:
        raise ValueError(
            f"{sources.get('self_distill_alpha', source)}: self_distill_alpha expects a number in [0, 1], got {alpha!r}"
        ) from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"{sources.get('self_distill_alpha', source)}: self_distill_alpha must be in [0, 1] (the "
            f"weight of the ground truth), got {alpha!r}"
        )
    teacher = given.get("self_distill_teacher")
    if alpha < 1.0 and not teacher:
        raise ValueError(
            f"{where}: self_distill_alpha {alpha} < 1 needs self_distill_teacher (a model folder, hub id "
            "or tiny:<arch> with the student's vocabulary, e.g. the checkpoint of a previous SFT run)"
        )
    if teacher is not None and not isinstance(teacher, str):
        raise ValueError(
            f"{sources.get('self_distill_teacher', source)}: self_distill_teacher expects a model path, got {teacher!r}"
        )
    return SelfDistillArgs(alpha, teacher or "")


def check_teacher(args: SelfDistillArgs, student_path: str) -> None:
    """Before any model loads: the teacher resolves to a model and has the student's vocabulary (config.json only)."""
    import json
    from pathlib import Path

    from posttrain import UserError
    from posttrain.recipes.models import resolve_model_path

    if args.alpha >= 1.0:
        return
    try:
        teacher_path = resolve_model_path(args.teacher)
    except UserError as err:
        raise UserError(f"self_distill_teacher: {err}") from None

    def vocab(path):
        config = Path(path) / "config.json"
        if not config.is_file():
            return None  # a hub id: checked on the loaded models
        data = json.loads(config.read_text())
        return data.get("vocab_size", data.get("text_config", {}).get("vocab_size"))

    s_vocab, t_vocab = vocab(student_path), vocab(teacher_path)
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise UserError(
            f"self_distill_teacher {args.teacher!r} has vocab_size {t_vocab}, the student "
            f"{s_vocab}: the teacher's distribution must be over the student's tokens; use a "
            "checkpoint of the same model family (e.g. an earlier SFT run of this model)"
        )


def self_distill_sft_trainer(sft_cls: type) -> type:
    """``sft_cls`` (TRL's SFTTrainer, as ``runtime.guarded`` wraps it) with the ground-truth-mixed target."""

    class SelfDistillSFTTrainer(sft_cls):
        """SFT whose per-token target is alpha one-hot(label) + (1 - alpha) softmax(teacher); alpha = 1: stock SFT."""

        def __init__(self, *args, self_distill: SelfDistillArgs, **kwargs):
            super().__init__(*args, **kwargs)
            self.self_distill = self_distill
            self.teacher = None
            if self_distill.alpha < 1.0:
                from transformers import AutoModelForCausalLM

                from posttrain.recipes.models import resolve_model_path

                dtype = next(self.model.parameters()).dtype
                self.teacher = AutoModelForCausalLM.from_pretrained(
                    resolve_model_path(self_distill.teacher), dtype=dtype
                )
                self.teacher.requires_grad_(False).eval().to(self.accelerator.device)
                s_vocab = self.model.get_output_embeddings().weight.shape[0]
                t_vocab = self.teacher.get_output_embeddings().weight.shape[0]
                if s_vocab != t_vocab:
                    raise ValueError(
                        f"self_distill_teacher {self_distill.teacher!r} has {t_vocab} output tokens, the "
                        f"student {s_vocab}: the teacher must share the student's vocabulary"
                    )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.teacher is None:  # alpha = 1: TRL's own loss, untouched
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            logits_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            logits_inputs["use_cache"] = False
            outputs = model(**logits_inputs)
            with torch.no_grad():
                teacher_logits = self.teacher(**logits_inputs).logits
            loss, terms = gt_mixed_distill_loss(
                outputs.logits, teacher_logits, inputs["labels"], self.self_distill.alpha, num_items_in_batch
            )
            # as TRL's SFT loss: num_items_in_batch counts every rank's tokens and DDP averages the gradients
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            for name, value in terms.items():
                self._metrics[mode][f"self_distill/{name}"].append(
                    self.accelerator.gather(value.detach()).mean().item()
                )
            return (loss, outputs) if return_outputs else loss

    SelfDistillSFTTrainer.__name__ = SelfDistillSFTTrainer.__qualname__ = "SelfDistillSFTTrainer"
    return SelfDistillSFTTrainer
