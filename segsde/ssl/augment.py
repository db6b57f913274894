"""Strong augmentation of mixed images (kornia), drawn as the original (ClassMix's, on kornia 0.3) draws it."""

from __future__ import annotations

import math

import torch
from torch import nn


def hue_turns(radians: float) -> float:
    """The original's hue strength (radians: the kornia of 2020 shifted hue by the factor itself) in the unit of
    today's kornia, turns (it multiplies the factor by 2 pi): 0.25 rad, +-14 degrees, is 0.0398."""
    return radians / (2 * math.pi)


class StrongAugment(nn.Module):
    """Colour jitter (brightness, contrast and saturation of ``strength``, hue of ``strength`` radians) with
    probability ``jitter_p`` decided once per batch and its factors drawn per image (kornia 0.3's ColorJitter, whose
    formulas are today's ColorJiggle), then Gaussian blur (sigma ~ U(sigma), probability ``blur_p``, odd kernel of
    ~10 % of the shorter side) drawn once per batch. Only images pass through it: mixed soft targets are never
    changed photometrically."""

    def __init__(self, size: tuple[int, int], jitter_p: float = 0.8, strength: float = 0.25, blur_p: float = 0.5,
                 sigma: tuple[float, float] = (0.15, 1.15)):
        super().__init__()
        from kornia.augmentation import ColorJiggle, RandomGaussianBlur

        kernel = max(3, int(0.1 * min(size)) // 2 * 2 + 1)
        self.jitter_p = jitter_p
        self.jitter = ColorJiggle(strength, strength, strength, hue_turns(strength), p=1.0, same_on_batch=False)
        self.blur = RandomGaussianBlur((kernel, kernel), sigma, p=blur_p, same_on_batch=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the same shape, augmented."""
        if float(torch.rand(())) < self.jitter_p:
            images = self.jitter(images)
        return self.blur(images).clamp(0, 1)
