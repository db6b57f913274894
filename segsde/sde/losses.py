"""monodepth2-style self-supervised losses: SSIM + L1 photometric error, per-pixel minimum
reprojection with auto-masking, and edge-aware smoothness. Images are [B, 3, H, W] in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

C1, C2 = 0.01**2, 0.03**2


def box3(x: torch.Tensor) -> torch.Tensor:
    """3x3 mean over a reflection-padded tensor [..., H, W] -> [..., H, W]; the same as monodepth2's
    ``AvgPool2d(3, 1)`` after ``ReflectionPad2d(1)``, written as shifted sums (several times faster on
    CPU than avg_pool2d, whose stride-1 kernel dominated the SDE step there)."""
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    return (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]) / 9.0


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM [B, C, H, W] with a 3x3 box window and reflection padding (monodepth2's form;
    kornia's SSIM uses a Gaussian window, which changes the loss the paper's weights were tuned for)."""
    C = x.shape[1]
    stats = box3(torch.cat([x, y, x * x, y * y, x * y], 1))
    mu_x, mu_y, xx, yy, xy = stats.split(C, 1)
    sigma_x, sigma_y, sigma_xy = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + C1) * (2 * sigma_xy + C2)
    den = (mu_x**2 + mu_y**2 + C1) * (sigma_x + sigma_y + C2)
    return num / den


def photometric_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W]: 0.85 * clamp((1 - SSIM) / 2, 0, 1) + 0.15 * mean_c |pred - target|."""
    l1 = (pred - target).abs().mean(1, keepdim=True)
    dssim = ((1 - ssim(pred, target)) / 2).clamp(0, 1).mean(1, keepdim=True)
    return 0.85 * dssim + 0.15 * l1


def min_reprojection(target: torch.Tensor, warped: list[torch.Tensor], sources: list[torch.Tensor],
                     automask: bool = True, identity: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel minimum over the warped errors (and, with auto-masking, the identity errors of the
    unwarped sources, plus tiny noise to break ties). Returns (loss map [B, 1, H, W], mask of pixels where
    a warped error won [B, 1, H, W]); where an identity error wins, the pixel carries no gradient.
    ``identity`` passes precomputed identity errors (they are the same at every scale)."""
    errors = [photometric_error(w, target) for w in warped]
    if automask or identity is not None:
        identity = identity if identity is not None else [photometric_error(s, target) for s in sources]
        identity = [e + torch.randn_like(e) * 1e-5 for e in identity]
        errors = identity + errors
    stacked = torch.cat(errors, 1)
    best, idx = stacked.min(1, keepdim=True)
    warped_won = idx >= (len(errors) - len(warped))
    return best, warped_won


def smoothness(disp: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Edge-aware smoothness of mean-normalised disparity [B, 1, H, W] given the image [B, 3, H, W]."""
    d = disp / (disp.mean((2, 3), keepdim=True) + 1e-7)
    dx, dy = (d[..., :, 1:] - d[..., :, :-1]).abs(), (d[..., 1:, :] - d[..., :-1, :]).abs()
    ix = (image[..., :, 1:] - image[..., :, :-1]).abs().mean(1, keepdim=True)
    iy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(1, keepdim=True)
    return (dx * torch.exp(-ix)).mean() + (dy * torch.exp(-iy)).mean()


def scale_invariant_log(depth: torch.Tensor, gt: torch.Tensor, variance_focus: float = 0.85) -> torch.Tensor:
    """Eigen et al.'s scale-invariant log error (in the form of BTS / AdaBins) of depth [B, 1, H, W] against
    gt [B, 1, H, W] (metres, 0 = invalid): sqrt(mean(g^2) - variance_focus * mean(g)^2), g = log depth - log gt
    over the valid pixels. With variance_focus 1 a depth off by one global factor scores 0."""
    valid = gt > 0
    g = depth[valid].log() - gt[valid].log()
    return (g.pow(2).mean() - variance_focus * g.mean().pow(2)).clamp(min=0).sqrt()
