"""Per-image selection scores and the student's loss, as small pure functions (METHOD.md section 4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bottom_rows_mask(shape: tuple[int, ...], fraction: float, device=None) -> torch.Tensor:
    """Bool [.., H, W] of ``shape``: False on the bottom ``fraction`` of rows (the ego car), True above."""
    H = shape[-2]
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    cut = H - int(round(fraction * H))
    keep[..., cut:, :] = False
    return keep


def berhu_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """Reverse Huber over the ``valid`` pixels: |r| up to c, (r^2 + c^2) / 2c beyond, with c = ``threshold``
    x the largest |r| of the batch (detached). pred, target [B, 1, H, W]; valid bool of the same shape."""
    r = (pred - target).abs()[valid]
    if r.numel() == 0:
        return pred.sum() * 0
    c = (threshold * r.max()).detach().clamp_min(1e-6)
    return torch.where(r <= c, r, (r * r + c * c) / (2 * c)).mean()


def difficulty(student: torch.Tensor, teacher: torch.Tensor, far_disparity: float = 0.07, dilation: int = 7,
               ego_fraction: float = 0.13) -> torch.Tensor:
    """E [B]: the mean over all pixels of |log(1 + d_student) - log(1 + d_teacher)|, zeroed where the
    teacher's disparity is below ``far_disparity`` (grown by a ``dilation`` x ``dilation`` window:
    implausibly far pixels, typically cars driving at the camera's speed) and on the bottom
    ``ego_fraction`` of rows. student, teacher [B, 1, H, W] normalised disparities."""
    error = (torch.log1p(student) - torch.log1p(teacher)).abs()
    far = F.max_pool2d((teacher < far_disparity).float(), dilation, stride=1, padding=dilation // 2) > 0
    keep = ~far & bottom_rows_mask(error.shape, ego_fraction, error.device)
    return (error * keep).flatten(1).mean(1)


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B]: mean over pixels of the normalised entropy -sum_c p log2 p / log2 C, in [0, 1]."""
    logp = F.log_softmax(logits.float(), 1)
    entropy = -(logp.exp() * logp).sum(1) / math.log(logits.shape[1])
    return entropy.flatten(1).mean(1)
