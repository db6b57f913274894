"""Monocular depth metrics with per-image median scaling (the monodepth2 / Eigen protocol).

Per image: keep ground-truth pixels with min_depth < gt < max_depth, scale the prediction by
median(gt) / median(pred), clamp it to [min_depth, max_depth], compute the errors, then average the
per-image values over the dataset. Sums are returned so that ranks can all-reduce them.
"""

from __future__ import annotations

import torch

METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3")


def depth_error_sums(pred: torch.Tensor, gt: torch.Tensor, min_depth: float = 1e-3,
                     max_depth: float = 80.0) -> torch.Tensor:
    """pred, gt [B, H, W] depths (same size; gt 0 = invalid) -> float64 [len(METRICS) + 1]: the per-image
    metrics summed over the images that have valid pixels, and that image count last."""
    sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=gt.device)
    for p, g in zip(pred.double(), gt.double()):
        valid = (g > min_depth) & (g < max_depth)
        if not valid.any():
            continue
        p, g = p[valid], g[valid]
        p = (p * (g.quantile(0.5) / p.quantile(0.5))).clamp(min_depth, max_depth)  # numpy-style median, as monodepth2
        ratio = torch.maximum(g / p, p / g)
        sums += torch.stack([
            ((g - p).abs() / g).mean(), ((g - p) ** 2 / g).mean(), ((g - p) ** 2).mean().sqrt(),
            ((g.log() - p.log()) ** 2).mean().sqrt(),
            (ratio < 1.25).double().mean(), (ratio < 1.25**2).double().mean(), (ratio < 1.25**3).double().mean(),
            torch.ones((), dtype=torch.float64, device=gt.device)])
    return sums


def summarise(sums: torch.Tensor) -> dict[str, float]:
    """Sums from :func:`depth_error_sums` (added over batches and ranks) -> mean metrics."""
    n = float(sums[-1])
    if n == 0:
        return {k: float("nan") for k in METRICS}
    return {k: float(v) / n for k, v in zip(METRICS, sums[:-1])}
