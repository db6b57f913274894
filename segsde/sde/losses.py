"""monodepth2-style self-supervised losses: SSIM + L1 photometric error, per-pixel minimum
reprojection with auto-masking, and edge-aware smoothness. Images are [B, 3, H, W] in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

C1, C2 = 0.01**2, 0.03**2


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM [B, C, H, W] with 3x3 average pooling and reflection padding (monodepth2's form;
    kornia's SSIM uses a Gaussian window, which changes the loss the paper's weights were tuned for)."""
    x, y = F.pad(x, (1, 1, 1, 1), mode="reflect"), F.pad(y, (1, 1, 1, 1), mode="reflect")
    mu_x, mu_y = F.avg_pool2d(x, 3, 1), F.avg_pool2d(y, 3, 1)
    sigma_x = F.avg_pool2d(x * x, 3, 1) - mu_x**2
    sigma_y = F.avg_pool2d(y * y, 3, 1) - mu_y**2
    sigma_xy = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    num = (2 * mu_x * mu_y + C1) * (2 * sigma_xy + C2)
    den = (mu_x**2 + mu_y**2 + C1) * (sigma_x + sigma_y + C2)
    return num / den


def photometric_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W]: 0.85 * clamp((1 - SSIM) / 2, 0, 1) + 0.15 * mean_c |pred - target|."""
    l1 = (pred - target).abs().mean(1, keepdim=True)
    dssim = ((1 - ssim(pred, target)) / 2).clamp(0, 1).mean(1, keepdim=True)
    return 0.85 * dssim + 0.15 * l1


def min_reprojection(target: torch.Tensor, warped: list[torch.Tensor], sources: list[torch.Tensor],
                     automask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel minimum over the warped errors (and, with auto-masking, the identity errors of the
    unwarped sources, plus tiny noise to break ties). Returns (loss map [B, 1, H, W], mask of pixels where
    a warped error won [B, 1, H, W]); where an identity error wins, the pixel carries no gradient."""
    errors = [photometric_error(w, target) for w in warped]
    if automask:
        identity = [photometric_error(s, target) + torch.randn_like(errors[0]) * 1e-5 for s in sources]
        errors = identity + errors
    stacked = torch.cat(errors, 1)
    best, idx = stacked.min(1, keepdim=True)
    warped_won = idx >= (len(sources) if automask else 0)
    return best, warped_won


def smoothness(disp: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Edge-aware smoothness of mean-normalised disparity [B, 1, H, W] given the image [B, 3, H, W]."""
    d = disp / (disp.mean((2, 3), keepdim=True) + 1e-7)
    dx, dy = (d[..., :, 1:] - d[..., :, :-1]).abs(), (d[..., 1:, :] - d[..., :-1, :]).abs()
    ix = (image[..., :, 1:] - image[..., :, :-1]).abs().mean(1, keepdim=True)
    iy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(1, keepdim=True)
    return (dx * torch.exp(-ix)).mean() + (dy * torch.exp(-iy)).mean()
