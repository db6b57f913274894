"""Strong augmentation of mixed images (kornia), one draw per batch as in the original."""

from __future__ import annotations

import math

import torch
from torch import nn


def hue_turns(radians: float) -> float:
    """The original's hue strength (radians: the kornia of 2020 shifted hue by the factor itself) in the unit of
    today's kornia, turns (it multiplies the factor by 2 pi): 0.25 rad, +-14 degrees, is 0.0398."""
    return radians / (2 * math.pi)


class StrongAugment(nn.Module):
    """Colour jitter (brightness, contrast and saturation of ``strength``, hue of ``strength`` radians,
    probability ``jitter_p``) then Gaussian blur (sigma ~ U(sigma), probability ``blur_p``, odd kernel of
    ~10 % of the shorter side). Each is drawn once per batch, as the original (ClassMix's) augmentation is,
    and only images pass through it: mixed soft targets are never changed photometrically."""

    def __init__(self, size: tuple[int, int], jitter_p: float = 0.8, strength: float = 0.25, blur_p: float = 0.5,
                 sigma: tuple[float, float] = (0.15, 1.15)):
        super().__init__()
        from kornia.augmentation import ColorJitter, RandomGaussianBlur

        kernel = max(3, int(0.1 * min(size)) // 2 * 2 + 1)
        self.jitter = ColorJitter(strength, strength, strength, hue_turns(strength), p=jitter_p, same_on_batch=True)
        self.blur = RandomGaussianBlur((kernel, kernel), sigma, p=blur_p, same_on_batch=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the same shape, augmented."""
        return self.blur(self.jitter(images)).clamp(0, 1)
