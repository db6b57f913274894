"""ASPP + U-Net decoder (the paper's "DeepLabV3+-like" depth decoder), reused by the segmentation heads.

Stages run i = 4 ... 0 with output channels ``DECODER_CHANNELS[i]``. Stage i: 3x3 reflection-padded conv +
ELU (in stage 4 the ASPP takes its place) -> x2 nearest upsampling when the next skip map is larger
(always in stage 0) -> concatenation of encoder map i-1 (i > 0) -> 3x3 conv + ELU. With encoder maps of
an input [B, 3, H, W] the stage outputs are:

    stage 4  [B, 256, H/16, W/16]   (layer 5)       stage 1  [B, 128, H/2, W/2]  (layer 8)
    stage 3  [B, 256, H/8,  W/8]    (layer 6)       stage 0  [B,  64, H,   W]    (layer 9)
    stage 2  [B, 128, H/4,  W/4]    (layer 7)

Disparity heads (3x3 conv -> sigmoid) sit on stages 0-3, so scale s has resolution H/2^s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

DECODER_CHANNELS = (64, 128, 128, 256, 256)  # stage 0 ... 4
ASPP_RATES = (6, 12, 18)


def conv3x3(cin: int, cout: int, norm: bool = False) -> nn.Sequential:
    """Reflection-padded 3x3 conv + (BN) + ELU."""
    layers = [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers, nn.ELU(inplace=True))


class UNetDecoder(nn.Module):
    """Decoder over :class:`segsde.models.encoder.ResNetEncoder` maps.

    ``disparity_scales`` heads are built (0 for a segmentation decoder); ``norm`` adds BN after each conv
    (the data-selection student's variant). Stages can be run piecewise (:meth:`run_stages`) so that a
    multi-task decoder can exchange features between stages 2 and 1.
    """

    def __init__(self, encoder_channels: list[int], channels: tuple[int, ...] = DECODER_CHANNELS,
                 disparity_scales: int = 4, norm: bool = False, aspp_dropout: float = 0.5):
        super().__init__()
        self.channels = channels
        self.aspp = ASPP(encoder_channels[4], list(ASPP_RATES), out_channels=channels[4])
        self.aspp.project[-1].p = aspp_dropout
        self.first = nn.ModuleDict()
        self.second = nn.ModuleDict()
        for i in range(4, -1, -1):
            cin = channels[min(i + 1, 4)]
            if i < 4:
                self.first[str(i)] = conv3x3(cin, channels[i], norm)
            skip = encoder_channels[i - 1] if i > 0 else 0
            self.second[str(i)] = conv3x3(channels[i] + skip, channels[i], norm)
        self.heads = nn.ModuleList(nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels[s], 1, 3)) for s in range(disparity_scales))

    def stage(self, i: int, x: torch.Tensor, maps: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Run stage i on the previous stage's output (or, for i = 4, encoder map 4). ``size`` is the
        input's (H, W), needed only by stage 0."""
        x = self.aspp(x) if i == 4 else self.first[str(i)](x)
        if i > 0:
            skip = maps[i - 1]
            if skip.shape[-2:] != x.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = torch.cat([x, skip], 1)
        else:
            x = F.interpolate(x, size=size or tuple(2 * s for s in x.shape[-2:]), mode="nearest")
        return self.second[str(i)](x)

    def run_stages(self, maps: list[torch.Tensor], stages: range, x: torch.Tensor | None = None,
                   size: tuple[int, int] | None = None) -> dict[int, torch.Tensor]:
        """Run ``stages`` (descending, e.g. ``range(4, 1, -1)``) from ``x`` (default: encoder map 4);
        return {stage: output}."""
        out = {}
        x = maps[4] if x is None else x
        for i in stages:
            x = out[i] = self.stage(i, x, maps, size)
        return out

    def disparities(self, features: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Sigmoid disparities [B, 1, H/2^s, W/2^s] for s = 0 .. scales-1."""
        return [torch.sigmoid(head(features[s])) for s, head in enumerate(self.heads)]

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        return self.disparities(self.run_stages(maps, range(4, -1, -1), size=size))
