"""Mutual-information variable screening: a data stage that keeps the d features most informative about the target.

Source: K. Yang, PhD thesis "Contributions to Robust and Efficient Methods for Analysis of High Dimensional Data"
(McGill, 2025), manuscript 1, arXiv 2410.10082; the author's package is fastHDMI (AGPL-3.0-or-later: nothing of it
is copied or read into this file; written here from the math).

Sure independence screening (Fan & Lv 2008) ranks every feature X_j by a marginal utility and keeps the top d, by
default d = floor(n / log n). The utility here is the mutual information I(X_j; Y), which sees the nonlinear
dependence (y = x^2) that Pearson's |corr(X_j, Y)| misses:

- continuous Y: a 2-D binned kernel density estimate on a G x G grid (G = 128 by default). X_j and Y are standardised;
  the per-axis bandwidths come from a rule of thumb (``scott``: the normal-reference h = sd n^(-1/6) of a 2-D density;
  ``silverman``: 0.9 min(sd, IQR/1.34) n^(-1/5), the 1-D rule per axis) or a number (in standard deviations). The
  grid spans each variable's range plus the kernel's support on both sides, the points are binned to their nearest
  grid node, and the counts are convolved with the product kernel by FFT (scipy.fft; the kernel is truncated at its
  support, which the padding leaves inside the grid, so the circular convolution equals the linear one). Then
      I = sum_grid p(x, y) log[p(x, y) / (p(x) p(y))]
  with p the smoothed cell masses and p(x), p(y) their marginals (the cell areas cancel). Kernels: gaussian (cut at 3
  bandwidths) and epa (Epanechnikov, scaled to unit variance, support sqrt(5) bandwidths).
- discrete Y (binary or a few classes): X_j is cut into ``bins`` equal-frequency bins and the plug-in MI
  sum_{b, c} p(b, c) log[p(b, c) / (p(b) p(c))] of the counts is used.

What is a reconstruction: fastHDMI's own grid, binning (it may use linear binning) and the ISJ bandwidth rule are not
reproduced (ISJ is not implemented); the equal-frequency binning of the discrete case is a choice of this file.
scikit-learn's ``mutual_info_regression`` (a k-nearest-neighbour estimator) is not the thesis's estimator and costs
about 100 times more per feature here, so the KDE estimator is written out.

The stage: ``screen_features(X, y, cfg) -> ScreenResult`` (indices kept, every score), ``screen_dataset(dataset,
target, cfg)`` (Dataset -> Dataset with the kept columns and the target, plus a report). The SCAD / MCP trainer
(``posttrain.trainers.classic.scad_mcp``) runs it on its training split with the recipe keys ``screen``,
``screen_top`` and ``screen_*``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCREEN_METHODS = ("mi", "pearson")
KERNELS = ("gaussian", "epa")
BANDWIDTH_RULES = ("scott", "silverman")
TARGETS = ("auto", "continuous", "discrete")
KERNEL_SUPPORT = {"gaussian": 3.0, "epa": math.sqrt(5.0)}  # in bandwidths (epa scaled to unit variance)


@dataclass
class MIScreenConfig:
    """How features are screened; the defaults are the thesis's (G = 2^7, d = n / log n)."""

    method: str = field(default="mi", metadata={"help": "mi (mutual information) or pearson (|correlation|)."})
    top: int = field(
        default=0, metadata={"help": "Features kept, d; 0: floor(n / log n) (sure independence screening)."}
    )
    grid: int = field(default=128, metadata={"help": "KDE grid points per axis (continuous target)."})
    bandwidth: str = field(
        default="scott", metadata={"help": "scott, silverman, or a number (bandwidth in standard deviations)."}
    )
    kernel: str = field(default="gaussian", metadata={"help": "KDE kernel: gaussian or epa (Epanechnikov)."})
    bins: int = field(default=10, metadata={"help": "Equal-frequency bins of X_j for a discrete target."})
    target: str = field(
        default="auto", metadata={"help": "continuous, discrete, or auto (discrete when y has at most 10 values)."}
    )

    def __post_init__(self):
        if self.method not in SCREEN_METHODS:
            raise ValueError(f"screen method must be one of {', '.join(SCREEN_METHODS)}, got {self.method!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"screen kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.target not in TARGETS:
            raise ValueError(f"screen target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        self.bandwidth = str(self.bandwidth)
        if self.bandwidth not in BANDWIDTH_RULES:
            try:
                ok = float(self.bandwidth) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(
                    f"screen bandwidth must be {' or '.join(BANDWIDTH_RULES)} or a number > 0, got {self.bandwidth!r}"
                )
        if int(self.top) < 0:
            raise ValueError(f"screen top must be >= 0 (0: n / log n), got {self.top!r}")
        if int(self.grid) < 8:
            raise ValueError(f"screen grid must be >= 8, got {self.grid!r}")
        if int(self.bins) < 2:
            raise ValueError(f"screen bins must be >= 2, got {self.bins!r}")


# --- pure math ------------------------------------------------------------------------------------------------


def sis_size(n: int) -> int:
    """d = floor(n / log n), the sure-independence-screening default."""
    return max(1, int(n / math.log(n))) if n > 1 else 1


def standardize(X: np.ndarray) -> np.ndarray:
    """Columns to mean 0 and standard deviation 1 (a constant column becomes 0)."""
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(axis=0)
    return (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def bandwidths(Z: np.ndarray, rule: str) -> np.ndarray:
    """Per-column bandwidth of standardised data Z (n, k): a rule of thumb or a fixed number of standard deviations."""
    n = Z.shape[0]
    if rule == "scott":  # the normal-reference rule of a 2-D density: sd * n^(-1/(d+4)), d = 2
        return np.full(Z.shape[1], n ** (-1.0 / 6.0))
    if rule == "silverman":  # 0.9 min(sd, IQR / 1.34) n^(-1/5), per axis
        iqr = np.subtract(*np.percentile(Z, [75, 25], axis=0))
        spread = np.minimum(1.0, iqr / 1.34)
        return 0.9 * np.where(spread > 0, spread, 1.0) * n ** (-0.2)
    return np.full(Z.shape[1], float(rule))


def kernel_weights(offsets: np.ndarray, kernel: str) -> np.ndarray:
    """Kernel values at ``offsets`` (in bandwidths), zero outside the kernel's support (unnormalised)."""
    u = np.abs(offsets)
    if kernel == "gaussian":
        return np.where(u <= KERNEL_SUPPORT["gaussian"], np.exp(-0.5 * u * u), 0.0)
    u5 = u / math.sqrt(5.0)  # Epanechnikov 3/4 (1 - t^2) on |t| <= 1, with t = u / sqrt(5): unit variance
    return np.where(u5 <= 1.0, 1.0 - u5 * u5, 0.0)


def _grid_and_kernel_fft(z: np.ndarray, h: np.ndarray, grid: int, kernel: str, rfft: bool):
    """For each column of z (n, k): nearest-node bin indices (n, k) and the FFT of its sampled 1-D kernel (k, .)."""
    from scipy import fft

    pad = KERNEL_SUPPORT[kernel] * h
    lo, hi = z.min(axis=0) - pad, z.max(axis=0) + pad
    delta = (hi - lo) / (grid - 1)
    idx = np.clip(np.rint((z - lo) / delta), 0, grid - 1).astype(np.int64)
    offsets = np.fft.fftfreq(grid, d=1.0 / grid)  # 0, 1, ..., G/2 - 1, -G/2, ..., -1: circular offsets in cells
    w = kernel_weights(offsets[None, :] * (delta / h)[:, None], kernel)
    w /= w.sum(axis=1, keepdims=True)
    # the kernel is symmetric, so its transform is real
    return idx, (fft.rfft(w, axis=1) if rfft else fft.fft(w, axis=1)).real


def mutual_information_from_joint(P: np.ndarray) -> np.ndarray:
    """sum p(a, b) log[p(a, b) / (p(a) p(b))] of joint masses P (..., A, B) (normalised here), in nats.

    Computed as H(a) + H(b) - H(a, b) (the same sum, one logarithm per cell), accumulated in float64.
    """
    from scipy.special import entr  # -x log x, 0 at 0

    P = np.clip(P, 0.0, None)
    P = P / P.sum(axis=(-2, -1), keepdims=True, dtype=np.float64).astype(P.dtype)
    h_ab = entr(P).sum(axis=(-2, -1), dtype=np.float64)
    h_a = entr(P.sum(axis=-1, dtype=np.float64)).sum(axis=-1)
    h_b = entr(P.sum(axis=-2, dtype=np.float64)).sum(axis=-1)
    return h_a + h_b - h_ab


def kde_mutual_information(
    X: np.ndarray, y: np.ndarray, grid: int = 128, bandwidth: str = "scott", kernel: str = "gaussian", chunk: int = 256
) -> np.ndarray:
    """I(X_j; y) for every column of X (n, p) by the FFT-binned 2-D KDE described in the module docstring; (p,)."""
    from scipy import fft

    Zx, zy = standardize(X), standardize(np.asarray(y, dtype=np.float64)[:, None])
    n, p = Zx.shape
    hy = bandwidths(zy, bandwidth)
    iy, ky_hat = _grid_and_kernel_fft(zy, hy, grid, kernel, rfft=True)
    iy = iy[:, 0]
    out = np.empty(p)
    for start in range(0, p, chunk):
        cols = slice(start, min(start + chunk, p))
        zx = Zx[:, cols]
        k = zx.shape[1]
        ix, kx_hat = _grid_and_kernel_fft(zx, bandwidths(zx, bandwidth), grid, kernel, rfft=False)
        flat = (np.arange(k)[None, :] * grid + ix) * grid + iy[:, None]  # (n, k) cell of each point, per feature
        # float32 FFTs: counts up to n are exact, and the smoothing error (~1e-7 relative) is far below the MI
        # differences that screening ranks
        counts = np.bincount(flat.ravel(), minlength=k * grid * grid).reshape(k, grid, grid).astype(np.float32)
        spectrum = fft.rfft2(counts, axes=(1, 2), workers=1)
        spectrum *= (kx_hat[:, :, None] * ky_hat[0][None, None, :]).astype(np.float32)
        smooth = fft.irfft2(spectrum, s=(grid, grid), axes=(1, 2), workers=1)
        out[cols] = mutual_information_from_joint(smooth)
    constant = np.asarray(X).std(axis=0) == 0
    out[constant] = 0.0
    return out


def binned_mutual_information(X: np.ndarray, y: np.ndarray, bins: int = 10) -> np.ndarray:
    """Plug-in I(X_j; y) for a discrete y: X_j in ``bins`` equal-frequency bins (by rank); (p,) in nats."""
    X = np.asarray(X, dtype=np.float64)
    n, p = X.shape
    _, classes = np.unique(np.asarray(y), return_inverse=True)
    c = int(classes.max()) + 1
    ranks = np.argsort(np.argsort(X, axis=0, kind="stable"), axis=0, kind="stable")
    codes = ranks * bins // n  # (n, p) in 0..bins-1
    flat = (np.arange(p)[None, :] * bins + codes) * c + classes[:, None]
    counts = np.bincount(flat.ravel(), minlength=p * bins * c).reshape(p, bins, c).astype(np.float64)
    return mutual_information_from_joint(counts)


def pearson_scores(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|corr(X_j, y)| for every column (0 for a constant column)."""
    Zx, zy = standardize(X), standardize(np.asarray(y, dtype=np.float64)[:, None])[:, 0]
    return np.abs(Zx.T @ zy) / Zx.shape[0]


def is_discrete(y: np.ndarray, max_classes: int = 10) -> bool:
    y = np.asarray(y)
    return y.dtype.kind in "biuO" or len(np.unique(y)) <= max_classes


@dataclass
class ScreenResult:
    kept: np.ndarray  # indices of the kept features, best first
    scores: np.ndarray  # every feature's score (MI in nats or |corr|)
    method: str
    target: str  # continuous or discrete (what the MI estimator assumed)


def feature_scores(X: np.ndarray, y: np.ndarray, cfg: MIScreenConfig) -> tuple[np.ndarray, str]:
    """Every feature's screening score and the target kind used."""
    kind = cfg.target if cfg.target != "auto" else ("discrete" if is_discrete(y) else "continuous")
    if cfg.method == "pearson":
        return pearson_scores(X, y), kind
    if kind == "discrete":
        return binned_mutual_information(X, y, cfg.bins), kind
    return kde_mutual_information(X, y, cfg.grid, cfg.bandwidth, cfg.kernel), kind


def screen_features(X: np.ndarray, y: np.ndarray, cfg: MIScreenConfig) -> ScreenResult:
    """Score every column of X (n, p) against y and keep the top d (``cfg.top``, 0: n / log n), best first."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) != len(y) or len(X) < 3:
        raise ValueError(f"screening needs X (n, p) and y (n,) with n >= 3, got X {X.shape} and y of length {len(y)}")
    scores, kind = feature_scores(X, y, cfg)
    d = min(X.shape[1], int(cfg.top) or sis_size(X.shape[0]))
    order = np.lexsort((np.arange(len(scores)), -scores))  # descending score, ties by index
    return ScreenResult(order[:d], scores, cfg.method, kind)


def screen_dataset(dataset, target: str, cfg: MIScreenConfig) -> tuple[Any, dict]:
    """Dataset -> Dataset with the kept numeric feature columns and ``target``, plus a report (kept, scores)."""
    if target not in dataset.column_names:
        raise ValueError(f"screening target column {target!r} is not in the dataset (columns: {dataset.column_names})")
    features = [c for c in dataset.column_names if c != target]
    frame = dataset.with_format("numpy")
    try:
        X = np.stack([np.asarray(frame[c], dtype=np.float64) for c in features], axis=1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"screening needs numeric feature columns: {err}") from None
    result = screen_features(X, np.asarray(frame[target]), cfg)
    kept = [features[i] for i in result.kept]
    report = {
        "method": cfg.method,
        "target": result.target,
        "kept": kept,
        "scores": {features[i]: float(result.scores[i]) for i in result.kept},
        "features_in": len(features),
        "features_out": len(kept),
    }
    return dataset.select_columns([*kept, target]), report
