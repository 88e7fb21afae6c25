"""ModHiFi: structured pruning and class unlearning by high-fidelity components, without gradients or labels.

Paper: D. Kashyap, C. Murti, P. K. Nayak, T. Narshana, C. Bhattacharyya, "ModHiFi: Identifying High Fidelity
predictive components for Model Modification", NeurIPS 2025, arXiv 2511.19566. The authors' code could not be
found; this is written from the paper's stated idea, and its scores and selection rules are a reconstruction
(UNVERIFIED: only the abstract-level description was available):

- For a Lipschitz network the output-reconstruction error is bounded by the sum of the layer-wise reconstruction
  errors, so a layer's components (hidden units, MLP channels) can be judged locally, on calibration activations.
- Subset fidelity of a set S of a layer's components, with Z (n, m) the layer's post-activations on calibration
  data and Y (n, p) = Z W_next^T what they feed the next layer (UNVERIFIED form):
      SF(S) = 1 - ||Y - Z_S B*||^2 / ||Y||^2,   B* = argmin_B ||Y - Z_S B||^2
  For a singleton {j} this is closed-form: SF(j) = ||Z_j^T Y||^2 / (||Z_j||^2 ||Y||^2) (``singleton_fidelity``).
  The paper finds singletons often suffice, so components are ranked by singleton fidelity.
- ModHiFi-P (pruning): per layer keep the top-k components by fidelity and re-fit the next layer on the kept ones
  by least squares against the original model's next pre-activation (``ls_compensate``, a ridge solve with an
  unpenalised intercept where the next layer has a bias). No fine-tuning, no labels, no loss.
- ModHiFi-U (class unlearning): score_j = SF_j(forget-class data) - SF_j(other-class data), computed on
  class-conditional synthetic data; remove the top-r components per layer (``unlearn_scores``) and re-fit the next
  layer by least squares. No gradient step. Reconstruction choice (measured, EXPERIMENTS.md): the re-fit's target
  is the original next-layer pre-activation on the retain-class rows, and on the forget-class rows what the layer
  gives with the removed units simply dropped. Re-fitting on retain rows alone restores the forget class too (the
  kept units still carry it: forget accuracy stayed at 96-100 % for budgets up to 50 %), and no re-fit at all
  forgets but breaks the other classes.

Layers are processed in order, and the features of a layer come from the already-modified model while the target
is the original model's output of the next layer, so each re-fit also absorbs the error of the layers before it.

Calibration data needs no labels: for the digits MLP it is drawn from per-class Gaussian fits of the training
pixels (``gaussian_class_samples``; the class id of a draw is known by construction, which is what the unlearning
arm conditions on). For an LLM it is text (``calib_dataset``), and the components are the channels of each decoder
layer's gated MLP (gate_proj/up_proj rows, down_proj columns): ``model_name_or_path`` switches to that use; every
layer keeps the same number of channels, so the result is a smaller model of the same architecture
(``intermediate_size`` = kept channels) that ``from_pretrained`` loads; it is written to ``output_dir/model``.

The arms of the pruning experiment: ``score`` fidelity (ModHiFi-P) against magnitude (the L1 norm of a unit's
incoming weight row) and random, each with or without ``compensate``. A step is one layer processed.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer
from posttrain.trainers.classic.channel_pruning import (
    calibration_texts,
    gated_mlps,
    mlp_io,
    mlp_outputs,
    prune_gated_mlp,
)
from posttrain.trainers.classic.weight_compander import digits_split

MODES = ("prune", "unlearn")
SCORES = ("fidelity", "magnitude", "random")
MODEL_DIR = "model"


@dataclass
class ModHiFiConfig(AuxConfig, eval_every=1, output_dir="runs/modhifi"):
    """A step processes one layer; max_steps is only a cap, the run stops after the last. For an LLM, model/ is
    written beside results.json."""

    mode: str = field(
        default="prune",
        metadata={"help": "prune (ModHiFi-P: keep the top fraction per layer) or unlearn (ModHiFi-U: forget a class)."},
    )
    score: str = field(
        default="fidelity",
        metadata={"help": "Component ranking for prune: fidelity (ModHiFi), magnitude (L1 of W_in rows) or random."},
    )
    compensate: bool = field(
        default=True, metadata={"help": "Re-fit the next layer on the kept components by least squares."}
    )
    sparsity: float = field(default=0.5, metadata={"help": "prune: fraction of each layer's components removed."})
    forget_class: int = field(default=3, metadata={"help": "unlearn (digits): the class to forget."})
    unlearn_budget: float = field(
        default=0.25, metadata={"help": "unlearn: fraction of each hidden layer's units removed (top by score)."}
    )
    unlearn_refit: str = field(
        default="split",
        metadata={
            "help": "unlearn: the re-fit target on forget-class rows: split (the layer without the removed units) "
            "or retain (re-fit on the other classes' rows only)."
        },
    )
    calib_samples: int = field(
        default=500,
        metadata={"help": "Calibration inputs: synthetic digits (per-class Gaussian draws) or text sequences."},
    )
    ridge: float = field(
        default=1e-3, metadata={"help": "Ridge of the least-squares re-fit, relative to the mean feature energy."}
    )
    hidden: int = field(default=256, metadata={"help": "Digits MLP 64-h-h-10: width of the two hidden layers."})
    train_size: int = field(default=1200, metadata={"help": "Digits images the MLP is trained on (rest: test)."})
    train_epochs: int = field(default=20, metadata={"help": "Adam epochs that train the digits MLP (batch 64)."})
    model_name_or_path: str = field(
        default="",
        metadata={
            "help": "Empty: the digits MLP. Else a causal LM (tiny:qwen3, a folder, a hub id) whose gated-MLP "
            "channels are pruned (mode prune only); the result is saved to output_dir/model."
        },
    )
    calib_dataset: str = field(
        default="builtin:arithmetic", metadata={"help": "LLM: the generator whose chat texts are the calibration."}
    )
    calib_seq_len: int = field(default=64, metadata={"help": "LLM: tokens per calibration sequence."})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (the fraction removed per layer), got {self.sparsity!r}")
        if self.unlearn_refit not in ("split", "retain"):
            raise ValueError(f"unlearn_refit must be split or retain, got {self.unlearn_refit!r}")
        if not 0.0 < self.unlearn_budget < 1.0:
            raise ValueError(f"unlearn_budget must be in (0, 1), got {self.unlearn_budget!r}")
        if not 0 <= int(self.forget_class) <= 9:
            raise ValueError(f"forget_class must be a digit class 0..9, got {self.forget_class!r}")
        self.require_at_least(1, "calib_samples", "hidden", "train_epochs", "calib_seq_len")
        if not 50 <= self.train_size <= 1500:
            raise ValueError(f"train_size must be in [50, 1500] (digits has 1797 images), got {self.train_size!r}")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise ValueError(f"ridge must be a finite number >= 0, got {self.ridge!r}")
        if self.model_name_or_path and self.calib_dataset.startswith("builtin:"):
            from posttrain.data.generators import GENERATORS

            if self.calib_dataset.removeprefix("builtin:") not in GENERATORS:
                raise ValueError(
                    f"calib_dataset {self.calib_dataset!r} is no builtin generator; valid: "
                    + ", ".join("builtin:" + n for n in GENERATORS)
                )
        if self.model_name_or_path and self.mode != "prune":
            raise ValueError(
                "model_name_or_path (an LLM) supports mode prune only: class unlearning needs a classifier's "
                "classes; use the digits MLP (no model_name_or_path) for mode unlearn"
            )
        super().__post_init__()


# --- pure math ------------------------------------------------------------------------------------------------


def singleton_fidelity(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SF({j}) = 1 - min_b ||Y - Z_j b^T||^2 / ||Y||^2 = ||Z_j^T Y||^2 / (||Z_j||^2 ||Y||^2) for every column j of Z.

    z: (n, m) component outputs, y: (n, p) the next layer's input contribution. A dead unit (Z_j = 0) scores 0.
    """
    z, y = z.double(), y.double()
    zy = z.T @ y  # (m, p)
    zz = (z * z).sum(0)
    yy = (y * y).sum()
    return torch.where(zz > 0, (zy * zy).sum(1) / (zz.clamp_min(1e-300) * yy.clamp_min(1e-300)), 0.0)


def subset_fidelity(z: torch.Tensor, y: torch.Tensor, subset: Iterable[int]) -> float:
    """SF(S) = 1 - ||Y - Z_S B*||^2 / ||Y||^2 with B* the least-squares fit (for checks and the report)."""
    z, y = z.double()[:, list(subset)], y.double()
    b = torch.linalg.lstsq(z, y, driver="gelsd").solution
    return float(1.0 - (y - z @ b).square().sum() / y.square().sum())


def magnitude_scores(w_in: torch.Tensor) -> torch.Tensor:
    """The magnitude baseline: ||W_in[j, :]||_1, the L1 norm of the weights into component j."""
    return w_in.detach().abs().sum(1).double()


def unlearn_scores(fid_forget: torch.Tensor, fid_retain: torch.Tensor) -> torch.Tensor:
    """ModHiFi-U (reconstruction): how much more a component reconstructs on the forget class than on the rest."""
    return fid_forget - fid_retain


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (ties: the lower index)."""
    order = torch.argsort(-scores, stable=True)[:k]
    return torch.sort(order).values


def ls_compensate(
    z: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3, intercept: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """argmin_{W, b} ||Y - Z W^T - b||^2 + lam ||W||^2 with lam = ridge * n * mean_j ||Z_j||^2 / n (unpenalised b).

    z: (n, k) kept components, y: (n, p) target. Returns (W (p, k), b (p,) or None), float64. A Cholesky-backed
    solve of the normal equations (``torch.linalg.solve``); lstsq has no ridge term.
    """
    z, y = z.double(), y.double()
    if intercept:
        mz, my = z.mean(0), y.mean(0)
        z, y = z - mz, y - my
    gram = z.T @ z
    lam = ridge * float(torch.diagonal(gram).mean()) if gram.numel() else 0.0
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), z.T @ y).T
    return w, ((my - mz @ w.T) if intercept else None)


def gaussian_class_samples(
    x: torch.Tensor, y: torch.Tensor, n: int, rng: np.random.Generator, shrink: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic inputs, n/C per class, from per-class Gaussian fits N(mu_c, Sigma_c + shrink * mean var I)
    of (x, y); returns (inputs, their generating class). The model never sees a real image or label at pruning."""
    classes = torch.unique(y).tolist()
    per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    xs, cs = [], []
    for c, count in zip(classes, per):
        xc = x[y == c].double().numpy()
        mu, cov = xc.mean(0), np.cov(xc, rowvar=False)
        cov = cov + shrink * float(np.trace(cov)) / len(cov) * np.eye(len(cov))
        xs.append(rng.multivariate_normal(mu, cov, size=count, method="cholesky"))
        cs.append(np.full(count, c))
    return torch.tensor(np.concatenate(xs), dtype=torch.float32), torch.tensor(np.concatenate(cs))


# --- the digits MLP ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def trained_digits_mlp(seed: int, hidden: int, train_size: int, epochs: int) -> dict:
    """The model to modify: a digits MLP 64-h-h-10 trained with Adam 1e-3, batch 64 (cached per setting, so the
    arms of one experiment start from the same weights). Returns its state_dict."""
    x, y, _, _ = digits_split(train_size, seed)
    torch.manual_seed(seed)
    model = digits_mlp(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def digits_mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _linears(model: nn.Sequential) -> list[nn.Linear]:
    return [m for m in model if isinstance(m, nn.Linear)]


@torch.no_grad()
def hidden_and_next(model: nn.Sequential, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z, Y): the post-ReLU output of hidden layer ``layer`` and the next Linear's pre-activation on x."""
    h = x
    linears = _linears(model)
    for i, lin in enumerate(linears):
        h = lin(h)
        if i == layer:
            z = torch.relu(h)
            return z, linears[i + 1](z)
        h = torch.relu(h)
    raise IndexError(layer)


@torch.no_grad()
def replace_hidden_layer(
    model: nn.Sequential, layer: int, keep: torch.Tensor, w_next: torch.Tensor, b_next: torch.Tensor | None
) -> nn.Sequential:
    """A copy of the MLP with only the ``keep`` units of hidden layer ``layer`` and the next Linear set to
    (w_next, b_next) (its old columns of the kept units when w_next is None)."""
    linears = _linears(model)
    lin, nxt = linears[layer], linears[layer + 1]
    new_lin = nn.Linear(lin.in_features, len(keep))
    new_lin.weight.copy_(lin.weight[keep])
    new_lin.bias.copy_(lin.bias[keep])
    new_next = nn.Linear(len(keep), nxt.out_features)
    new_next.weight.copy_(nxt.weight[:, keep] if w_next is None else w_next.float())
    new_next.bias.copy_(nxt.bias if b_next is None else b_next.float())
    swap = {id(lin): new_lin, id(nxt): new_next}
    return nn.Sequential(*[swap.get(id(m), m) for m in model])


# --- the trainer ------------------------------------------------------------------------------------------------


class ModHiFiTrainer(AuxTrainer):
    """ModHiFi-P / ModHiFi-U as a model tool: setup loads the model and the calibration data, one step modifies one
    layer, evaluate reports the model's accuracy (digits) or next-token NLL (LLM) against the original's."""

    method = "modhifi"

    def setup(self) -> None:
        a = self.args
        self.layer = 0
        self.log: list[dict] = []
        if a.model_name_or_path:
            self._setup_llm()
        else:
            self._setup_digits()

    def description(self) -> str:
        a = self.args
        arm = a.score + ("+ls" if a.compensate else "") if a.mode == "prune" else f"forget {a.forget_class}"
        return f"modhifi[{a.mode}, {arm}]"

    # digits
    def _setup_digits(self) -> None:
        a = self.args
        _, _, self.x_test, self.y_test = digits_split(a.train_size, a.seed)
        x_train, y_train, _, _ = digits_split(a.train_size, a.seed)
        self.model = digits_mlp(a.hidden)
        self.model.load_state_dict(trained_digits_mlp(a.seed, a.hidden, a.train_size, a.train_epochs))
        self.original = copy.deepcopy(self.model).requires_grad_(False)
        self.model.requires_grad_(False)
        # the labels shape the synthetic generator only; pruning sees inputs, unlearning their generating class
        self.calib, self.calib_class = gaussian_class_samples(x_train, y_train, a.calib_samples, self.rng)
        self.n_layers = len(_linears(self.model)) - 1
        self.before = self._digits_metrics(self.original)

    @torch.no_grad()
    def _digits_metrics(self, model) -> dict:
        pred = model(self.x_test).argmax(-1)
        forget = self.y_test == self.args.forget_class
        ok = (pred == self.y_test).float()
        return {
            "test_acc": float(ok.mean()),
            "forget_acc": float(ok[forget].mean()),
            "retain_acc": float(ok[~forget].mean()),
        }

    def _digits_step(self) -> dict:
        a, layer = self.args, self.layer
        lin = _linears(self.model)[layer]
        m = lin.out_features
        if a.mode == "prune":
            z, y = hidden_and_next(self.model, self.calib, layer)
            y = y - _linears(self.model)[layer + 1].bias  # the components' contribution, Z W_next^T
            if a.score == "fidelity":
                scores = singleton_fidelity(z, y)
            elif a.score == "magnitude":
                scores = magnitude_scores(lin.weight)
            else:
                scores = torch.tensor(self.rng.permutation(m), dtype=torch.float64)
            keep = top_k(scores, m - int(round(a.sparsity * m)))
            rows = slice(None)
        else:
            forget = self.calib_class == a.forget_class
            z, y = hidden_and_next(self.model, self.calib, layer)
            y = y - _linears(self.model)[layer + 1].bias
            scores = unlearn_scores(
                singleton_fidelity(z[forget], y[forget]), singleton_fidelity(z[~forget], y[~forget])
            )
            remove = top_k(scores, int(round(a.unlearn_budget * m)))
            keep = torch.tensor(sorted(set(range(m)) - set(remove.tolist())))
            rows = ~forget  # re-fit on the retain classes only
        w = b = None
        if a.compensate:
            target = _original_next(self.original, self.calib, layer)
            if (
                a.mode == "unlearn" and a.unlearn_refit == "split"
            ):  # forget rows: what the layer gives without the removed units (no restoring)
                nxt = _linears(self.model)[layer + 1]
                target = torch.where(rows[:, None], target, z[:, keep] @ nxt.weight[:, keep].T + nxt.bias)
                rows = slice(None)
            w, b = ls_compensate(z[rows][:, keep], target[rows], a.ridge)
        info = {
            "layer": layer,
            "kept": len(keep),
            "fidelity_kept": subset_fidelity(z, y, keep.tolist()) if len(keep) else 0.0,
            "score_min": float(scores.min()),
            "score_max": float(scores.max()),
        }
        self.model = replace_hidden_layer(self.model, layer, keep, w, b)
        return info

    # LLM
    def _setup_llm(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from posttrain.data.loading import load_source
        from posttrain.recipes.models import resolve_model_path

        a = self.args
        path = resolve_model_path(a.model_name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
        self.original = copy.deepcopy(self.model)
        self.mlps = gated_mlps(self.model)
        self.n_layers = len(self.mlps)

        def chunks(seed: int) -> list[torch.Tensor]:
            rows = load_source(a.calib_dataset, num_samples=max(4 * a.calib_samples, 64), seed=seed)
            ids = self.tokenizer("".join(calibration_texts(rows, self.tokenizer)), return_tensors="pt")["input_ids"][0]
            n = min(a.calib_samples, len(ids) // a.calib_seq_len)
            if n < 1:
                raise ValueError(f"calib_dataset {a.calib_dataset!r} gives fewer than calib_seq_len tokens")
            return list(ids[: n * a.calib_seq_len].view(n, a.calib_seq_len).split(16))

        self.calib, self.heldout = chunks(a.seed), chunks(a.seed + 1_000_003)
        # the original model's MLP outputs, every layer in one pass: the re-fit targets
        self.targets = mlp_outputs(self.original, self.calib) if a.compensate else None
        self.before = self._llm_metrics(self.original)

    @torch.no_grad()
    def _llm_metrics(self, model) -> dict:
        nll, n, err, ref = 0.0, 0, 0.0, 0.0
        for ids in self.heldout:
            logits = model(input_ids=ids).logits.float()  # float32: a batch of full-vocabulary logits is large
            orig = self.original(input_ids=ids).logits.float()
            nll += float(
                F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            )
            n += ids[:, 1:].numel()
            err += float((logits - orig).square().sum())
            ref += float(orig.square().sum())
        return {"heldout_nll": nll / n, "logit_rel_err": err / ref}

    def _llm_step(self) -> dict:
        a, layer = self.args, self.layer
        mlp = gated_mlps(self.model)[layer]
        z, y = mlp_io(self.model, mlp, self.calib)
        m = z.shape[1]
        if a.score == "fidelity":
            scores = singleton_fidelity(z, y)
        elif a.score == "magnitude":
            scores = magnitude_scores(mlp.up_proj.weight) * magnitude_scores(mlp.gate_proj.weight)
        else:
            scores = torch.tensor(self.rng.permutation(m), dtype=torch.float64)
        keep = top_k(scores, m - int(round(a.sparsity * m)))
        w = None
        if a.compensate:
            target = self.targets[layer]
            w, _ = ls_compensate(z[:, keep], target, a.ridge, intercept=False)
        info = {"layer": layer, "kept": len(keep), "fidelity_kept": subset_fidelity(z, y, keep.tolist())}
        prune_gated_mlp(mlp, keep, w)
        return info

    def training_step(self) -> dict:
        info = self._llm_step() if self.args.model_name_or_path else self._digits_step()
        self.layer += 1
        self.log.append(info)
        return info

    def done(self) -> bool:
        return self.layer >= self.n_layers

    def evaluate(self) -> dict:
        if self.args.model_name_or_path:
            after = self._llm_metrics(self.model)
        else:
            after = self._digits_metrics(self.model)
        out = {**after, **{f"{k}_before": v for k, v in self.before.items()}, "layers_done": self.layer}
        if self.args.model_name_or_path:
            out["params"] = sum(p.numel() for p in self.model.parameters())
            out["params_before"] = sum(p.numel() for p in self.original.parameters())
        return out

    def write_results(self, final: dict) -> None:
        super().write_results(final)
        # the modified LLM, loadable with from_pretrained: only once every layer has the same (pruned) width
        if self.args.model_name_or_path and self.done():
            out = Path(self.args.output_dir) / MODEL_DIR
            self.model.config.intermediate_size = gated_mlps(self.model)[0].down_proj.in_features
            self.model.save_pretrained(out)
            self.tokenizer.save_pretrained(out)

    def state_dict(self) -> dict:
        # the modified model is stored whole: its layer shapes differ from a freshly built one
        return {**super().state_dict(), "model": self.model, "layer": self.layer, "log": list(self.log)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.model, self.layer, self.log = copy.deepcopy(state["model"]), int(state["layer"]), list(state["log"])


@torch.no_grad()
def _original_next(original: nn.Sequential, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The original model's pre-activation of Linear ``layer + 1``: the target every re-fit reconstructs."""
    return hidden_and_next(original, x, layer)[1]


def run_arms(arms: dict[str, dict], seed: int = 0, output_dir: str = "runs/modhifi", **common) -> dict[str, dict]:
    """Each arm ({name: config overrides}) from the same trained model and calibration draw -> {name: final}."""
    import os

    out = {}
    for name, over in arms.items():
        cfg = ModHiFiConfig(seed=seed, output_dir=os.path.join(output_dir, name), **{**common, **over})
        final = ModHiFiTrainer(cfg).train(verbose=False)
        if final["stopped_by"] != "criterion":
            raise RuntimeError(f"{name} stopped by {final['stopped_by']} after {final['step']} layers")
        out[name] = final
    return out
