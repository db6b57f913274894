"""Paired statistics of a component study: a row against a reference row on the same seeds and validation images.

The design is crossed: every seed of both rows is scored on the same validation images. A row's difference to
its reference on seed s, d_s = δ + a_s + b̄ + c̄_s, carries training noise (a_s), the noise of the finite
validation set that all seeds share (b̄: the images' own effect on the difference) and a seed-by-image part (c̄_s).
The mean over n seeds has variance (σ²_a + σ²_c/N)/n + σ²_b/N. The sample variance of the d_s estimates the
first term; a jackknife over image groups (leave one group out of the confusion sums) estimates the image terms,
once for the mean over seeds (σ²_b + σ²_c/n)/N and once per seed (σ²_b + σ²_c)/N, which separates σ²_b/N.
The interval is then Student's t with Welch-Satterthwaite degrees of freedom: with n = 3 or 5 seeds the t
quantile is what gives the stated coverage (a percentile bootstrap over 3 seeds covers 70-76 %;
tests/test_statistics_calibration.py simulates it). With one seed there is no interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

POWER, ALPHA, LEVEL = 0.8, 0.05, 0.95


def miou_of(conf: np.ndarray) -> np.ndarray:
    """conf [..., K, K] (C[g, p]) -> mIoU [...] in %: classes absent from both ground truth and prediction are
    skipped, those predicted but absent score 0 (metrics.segmentation.scores, vectorised)."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1).astype(float)
    union = conf.sum(-1) + conf.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        return 100 * np.nanmean(iou, axis=-1)


@dataclass(frozen=True)
class Paired:
    """A row's difference to its reference over ``n`` shared seeds, in mIoU points."""
    n: int
    delta: float            # mean over seeds of (row - reference)
    sd: float               # sd of the per-seed differences (nan for n = 1)
    image_var: float        # variance of delta from the shared validation images (0 without per-image confusions)
    se: float               # standard error of delta: sqrt(sd² / n + image_var)
    df: float               # Welch-Satterthwaite degrees of freedom of se
    low: float              # the LEVEL interval (nan for n = 1)
    high: float
    p: float                # two-sided p-value of delta = 0 (nan for n = 1)
    groups: int             # validation image groups the jackknife left out one at a time (0: none)

    @property
    def method(self) -> str:
        return f"paired t, n={self.n} seeds" + (f", image jackknife over {self.groups} groups" if self.groups else "")


def crossed_interval(per_seed: np.ndarray, leave_out: np.ndarray | None = None, level: float = LEVEL) -> Paired:
    """``per_seed`` [n]: the row's difference to its reference on each seed; ``leave_out`` [n, G]: the same with
    image group g left out of both rows' confusions (the same images for every seed and both rows), or None."""
    from scipy import stats

    d = np.asarray(per_seed, dtype=float)
    n = len(d)
    delta = float(d.mean())
    groups = 0 if leave_out is None else int(np.shape(leave_out)[1])
    if n < 2:
        return Paired(n, delta, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, groups)
    seed_var = float(d.var(ddof=1)) / n
    image_var, image_df = 0.0, math.inf
    if groups >= 2:
        jack = np.asarray(leave_out, dtype=float)
        scale = (groups - 1) / groups
        v_mean = scale * float(((jack.mean(0) - jack.mean()) ** 2).sum())                     # (σ²_b + σ²_c / n) / N
        v_seed = scale * float(((jack - jack.mean(1, keepdims=True)) ** 2).sum(1).mean())      # (σ²_b + σ²_c) / N
        # σ²_b / N, a difference of two estimates: its own Satterthwaite df (far fewer than the G - 1 of either)
        image_var = max(0.0, (n * v_mean - v_seed) / (n - 1))
        image_df = welch_satterthwaite([(n * v_mean / (n - 1), groups - 1), (v_seed / (n - 1), n * (groups - 1))], total=image_var)
    se = math.sqrt(seed_var + image_var)
    df = welch_satterthwaite([(seed_var, n - 1), (image_var, image_df)])
    if se == 0:
        low = high = delta
        p = 1.0 if delta == 0 else 0.0
    else:
        half = float(stats.t.ppf(0.5 + level / 2, df)) * se
        low, high, p = delta - half, delta + half, float(2 * stats.t.sf(abs(delta) / se, df))
    return Paired(n, delta, float(d.std(ddof=1)), image_var, se, df, low, high, p, groups)


def welch_satterthwaite(parts: list[tuple[float, float]], total: float | None = None) -> float:
    """Degrees of freedom of a sum of variance estimates (estimate, its df), or of ``total``, a combination of
    them with coefficients +-1 (their covariance left out, which errs towards fewer df)."""
    total = sum(v for v, _ in parts) if total is None else total
    denominator = sum(v * v / df for v, df in parts if v > 0 and df != math.inf)
    return total * total / denominator if denominator > 0 else math.inf


def paired_difference(row: dict[int, float], base: dict[int, float], row_conf: dict[int, np.ndarray] | None = None,
                      base_conf: dict[int, np.ndarray] | None = None, groups: np.ndarray | None = None,
                      level: float = LEVEL) -> Paired | None:
    """``row``/``base``: {seed: mIoU %}; ``*_conf``: {seed: per-image confusions [N, K, K]} (optional, the same
    images in the same order for every seed); ``groups`` [N]: the resampling unit of each image (a Cityscapes
    city or sequence; default every image its own). None when the two share no seed."""
    seeds = sorted(set(row) & set(base))
    if not seeds:
        return None
    per_seed = np.array([row[s] - base[s] for s in seeds])
    shapes = {c[s].shape for c in (row_conf or {}, base_conf or {}) for s in seeds if s in c}
    crossed = bool(row_conf and base_conf) and len(shapes) == 1 and all(s in row_conf and s in base_conf for s in seeds)
    return crossed_interval(per_seed, leave_group_out(np.stack([row_conf[s] for s in seeds]), np.stack([base_conf[s] for s in seeds]), groups)
                            if crossed else None, level)


def leave_group_out(row: np.ndarray, base: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray | None:
    """row, base [n, N, K, K] per-image confusions -> [n, G]: each seed's mIoU difference with group g's images
    left out of both rows. None with fewer than two groups."""
    labels = np.arange(row.shape[1]) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    count = int(labels.max()) + 1
    if count < 2:
        return None
    one_hot = np.eye(count, dtype=row.dtype)[labels]                       # [N, G]
    by_group = (np.einsum("snkl,ng->sgkl", row, one_hot), np.einsum("snkl,ng->sgkl", base, one_hot))
    rest = [g.sum(1, keepdims=True) - g for g in by_group]                 # [n, G, K, K]: everything but group g
    return miou_of(rest[0]) - miou_of(rest[1])


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values (family-wise error over the family's rows)."""
    order = np.argsort(pvalues)
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def power_of(n: int, effect: float, sd: float, image_var: float = 0.0, image_df: float = math.inf,
             alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test above at ``n`` seeds for a true difference ``effect`` (noncentral t
    with the Welch-Satterthwaite df of its standard error)."""
    from scipy import stats

    seed_var = sd * sd / n
    se = math.sqrt(seed_var + image_var)
    df = welch_satterthwaite([(seed_var, n - 1), (image_var, image_df)])
    critical = stats.t.ppf(1 - alpha / 2, df)
    shift = abs(effect) / se
    return float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))


def seeds_for(effect: float, sd: float, image_var: float = 0.0, image_df: float = math.inf, alpha: float = ALPHA,
              power: float = POWER, most: int = 200) -> int | None:
    """The fewest seeds (>= 2) at which the paired test finds a true difference ``effect`` with ``power``; ``alpha``
    is the level of the first Holm step (alpha / family size) when the row is one of a family. None when the sd is
    unknown, or when no number of seeds reaches it (the shared validation images' noise alone is too large)."""
    if not (sd == sd and sd >= 0) or not effect or effect != effect or (sd == 0 and image_var == 0):
        return None
    if power_of(most, effect, sd, image_var, image_df, alpha) < power:
        return None
    low, high = 2, most  # power grows with n: the first n that reaches it
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if power_of(mid, effect, sd, image_var, image_df, alpha) < power else (low, mid)
    return low
