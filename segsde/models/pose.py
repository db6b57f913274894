"""Pose network: ResNet-18 on a frame pair -> axis-angle rotation and translation (monodepth2's design)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from segsde.models.encoder import ResNetEncoder

POSE_OUTPUT_SCALE = 0.01  # monodepth2's: keeps the initial motion near zero


class PoseNet(nn.Module):
    """[B, 6, H, W] (two frames stacked in temporal order) -> ([B, 3] axis-angle, [B, 3] translation).

    Decoder: 1x1 squeeze 512 -> 256, two 3x3 convs (256) with ReLU, a 1x1 conv to 6, spatial mean x
    ``output_scale`` (a buffer, so a network loaded from a state dict keeps the scale it was trained with).
    """

    def __init__(self, weights: str | Path | None = None, output_scale: float = POSE_OUTPUT_SCALE):
        super().__init__()
        self.register_buffer("output_scale", torch.tensor(float(output_scale)))
        self.encoder = ResNetEncoder(18, weights, output_stride=32, in_frames=2)
        self.decoder = nn.Sequential(
            nn.Conv2d(512, 256, 1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 6, 1))

    def forward(self, pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.decoder(self.encoder(pair)[4]).mean((2, 3)) * self.output_scale
        return out[:, :3], out[:, 3:]


def mirror_pose_params(axis_angle: torch.Tensor, translation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose parameters of the left-right mirrored scene: F T F with F = diag(-1, 1, 1) flips the
    x-translation and the rotation about y and z."""
    sign = axis_angle.new_tensor([1.0, -1.0, -1.0])
    return axis_angle * sign, translation * -sign
