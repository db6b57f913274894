"""Strong augmentation of mixed images (kornia, one independent draw per sample on the batch)."""

from __future__ import annotations

import torch
from torch import nn


class StrongAugment(nn.Module):
    """Colour jitter (brightness, contrast, saturation, hue of ``strength``, probability ``jitter_p``) then
    Gaussian blur (sigma ~ U(sigma), probability ``blur_p``, odd kernel of ~10 % of the shorter side).
    Only images pass through it: mixed soft targets are never changed photometrically."""

    def __init__(self, size: tuple[int, int], jitter_p: float = 0.8, strength: float = 0.25, blur_p: float = 0.5,
                 sigma: tuple[float, float] = (0.15, 1.15)):
        super().__init__()
        from kornia.augmentation import ColorJitter, RandomGaussianBlur

        kernel = max(3, int(0.1 * min(size)) // 2 * 2 + 1)
        self.jitter = ColorJitter(strength, strength, strength, strength, p=jitter_p)
        self.blur = RandomGaussianBlur((kernel, kernel), sigma, p=blur_p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the same shape, augmented."""
        return self.blur(self.jitter(images)).clamp(0, 1)
