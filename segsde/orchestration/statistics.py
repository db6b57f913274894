"""Paired statistics of a component study: a row against Baseline on the same seeds and validation images.

The difference of a row to Baseline is measured seed by seed (same seed: same labeled subset, same initial
weights), and its uncertainty by a two-level bootstrap: seeds are resampled, and within each the validation
images (their confusion matrices, the same images for both rows), so the interval covers both the training
noise and the finite validation set. The test over the rows of a budget is Holm-corrected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 4000
POWER, ALPHA = 0.8, 0.05


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
    """A row's difference to Baseline over ``n`` shared seeds, in mIoU points."""
    n: int
    delta: float            # mean over seeds of (row - baseline)
    sd: float               # sd of the per-seed differences (nan for n = 1)
    low: float              # 95 % bootstrap interval (seeds, and images where the confusions are there)
    high: float
    p: float                # two-sided bootstrap p-value of delta = 0
    images: bool            # whether the bootstrap resampled validation images too


def paired_difference(row: dict[int, float], base: dict[int, float], row_conf: dict[int, np.ndarray] | None = None,
                      base_conf: dict[int, np.ndarray] | None = None, seed: int = 0) -> Paired | None:
    """``row``/``base``: {seed: mIoU %}; ``*_conf``: {seed: per-image confusions [N, K, K]} (optional). None
    when the two share no seed."""
    seeds = sorted(set(row) & set(base))
    if not seeds:
        return None
    diffs = np.array([row[s] - base[s] for s in seeds])
    images = bool(row_conf and base_conf and all(s in row_conf and s in base_conf and row_conf[s].shape == base_conf[s].shape
                                                  for s in seeds))
    rng = np.random.default_rng(seed)
    B = BOOTSTRAP_SAMPLES
    picks = rng.integers(0, len(seeds), size=(B, len(seeds))) if len(seeds) > 1 else np.zeros((B, 1), dtype=int)
    if images:
        per_seed = np.empty((B, len(seeds)))
        for k, s in enumerate(seeds):
            a, b = row_conf[s], base_conf[s]
            weights = rng.multinomial(len(a), np.full(len(a), 1 / len(a)), size=B)  # the same images for both rows
            per_seed[:, k] = (miou_of(np.einsum("bi,ijk->bjk", weights, a)) - miou_of(np.einsum("bi,ijk->bjk", weights, b)))
        replicates = np.take_along_axis(per_seed, picks, axis=1).mean(1)
    else:
        replicates = diffs[picks].mean(1)
    low, high = np.percentile(replicates, [2.5, 97.5])
    p = min(1.0, 2 * min((replicates <= 0).mean(), (replicates >= 0).mean()))
    return Paired(len(seeds), float(diffs.mean()), float(diffs.std(ddof=1)) if len(seeds) > 1 else float("nan"),
                  float(low), float(high), max(p, 1 / B), images)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values (family-wise error over the rows of one budget)."""
    order = np.argsort(pvalues)
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def seeds_needed(delta: float, sd: float, power: float = POWER, alpha: float = ALPHA) -> int | None:
    """Seeds a paired comparison needs to detect ``delta`` with paired-difference sd ``sd`` (normal
    approximation, two-sided): n = ((z_{1-alpha/2} + z_power) * sd / delta)^2."""
    from scipy.stats import norm

    if not (sd == sd and sd > 0) or delta == 0 or delta != delta:
        return None
    return max(2, math.ceil(((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * sd / abs(delta)) ** 2))
