"""Soft targets, pseudo-labels and their confidence weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segsde.data.labels import IGNORE_INDEX


def one_hot_targets(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels [B, H, W] -> soft targets [B, K, H, W]: one-hot of probability 1, all zeros at ignore pixels
    (so that, once mixed, they turn back into ignore)."""
    valid = labels != ignore_index
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2).float()
    return onehot * valid[:, None]


def pseudo_labels(targets: torch.Tensor, threshold: float, mode: str,
                  ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixed soft targets [B, K, H, W] -> (labels [B, H, W], weight [B, H, W], confident fraction).

    Labels are the argmax; pixels whose targets are all zero become ``ignore_index``. ``mode``
    ``per_pixel`` weighs each pixel by [max p >= threshold] (FixMatch-style); ``batch_fraction`` weighs
    every pixel by the fraction of confident valid pixels in the batch (the original SegSDE/ClassMix).
    """
    confidence, labels = targets.max(1)
    valid = confidence > 0
    labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    confident = (confidence >= threshold) & valid
    fraction = confident.sum() / valid.sum().clamp(min=1)
    if mode == "per_pixel":
        weight = confident.float()
    elif mode == "batch_fraction":
        weight = valid.float() * fraction
    else:
        raise ValueError(f"unknown confidence mode {mode!r}")
    return labels, weight, fraction


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean of weight * CE over the valid (non-ignore) pixels: unlike the original, ignore pixels do not
    dilute the mean."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    valid = labels != ignore_index
    return (ce * weight).sum() / valid.sum().clamp(min=1)
