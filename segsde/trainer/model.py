"""Segmentation networks of the component study and their initialisation from an SDE checkpoint.

``SegmentationNet``: ResNet encoder + ASPP/U-Net decoder (no disparity heads) + 1x1 projection (no bias)
+ 1x1 classifier on stage 0, logits [B, 19, H, W] at input resolution.

``MultiTaskNet`` (the paper's multi-task decoder): a depth and a segmentation decoder over one encoder,
both run stages 4-2 (1/4 resolution, ``channels[2]`` wide), exchange features there through gated
convolutions (seg' = seg + G_d(depth), depth' = depth + G_s(seg); nothing detached), then finish stages
1-0 from the exchanged maps. Outputs: logits (one 1x1 classifier on stage 0, no projection), a side output
(1x1 classifier on the pre-exchange segmentation map, upsampled) and sigmoid disparities at 4 scales; the
pose net serves the SDE loss.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segsde.data.labels import NUM_CLASSES
from segsde.errors import SegSDEError
from segsde.models.decoder import UNetDecoder
from segsde.models.encoder import ResNetEncoder
from segsde.models.pose import PoseNet
from segsde.sde.config import SDEConfig
from segsde.trainer.config import TrainConfig

ALL_STAGES, UP_TO_QUARTER, FROM_QUARTER = range(4, -1, -1), range(4, 1, -1), range(1, -1, -1)


class ClassifierHead(nn.Module):
    """[B, C, H, W] -> [B, classes, H, W]: 1x1 projection without bias, then a 1x1 classifier."""

    def __init__(self, channels: int, classes: int = NUM_CLASSES):
        super().__init__()
        self.project = nn.Conv2d(channels, channels, 1, bias=False)
        self.classify = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.project(x))


class Gate(nn.Module):
    """G(x) = conv3x3(x) * sigmoid(conv3x3_att(x)), both bias-free; the attention conv starts at zero, so
    every gate starts half open."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.attention = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        nn.init.zeros_(self.attention.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.sigmoid(self.attention(x))


def _encoder(cfg: TrainConfig) -> ResNetEncoder:
    # with transfer the encoder's weights come from the SDE checkpoint, so nothing is loaded here
    return ResNetEncoder(cfg.encoder, None if cfg.transfer else cfg.weights, cfg.output_stride)


class SegmentationNet(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.encoder = _encoder(cfg)
        self.decoder = UNetDecoder(self.encoder.channels, tuple(cfg.decoder_channels), disparity_scales=0)
        self.head = ClassifierHead(cfg.decoder_channels[0])

    def forward(self, image: torch.Tensor, depth: bool = False) -> dict[str, torch.Tensor]:
        """[B, 3, H, W] in [0, 1] -> {"logits": [B, 19, H, W]} (``depth``: accepted as by MultiTaskNet; no depth here)."""
        features = self.decoder.run_stages(self.encoder(image), ALL_STAGES, size=image.shape[-2:])
        return {"logits": self.head(features[0])}


class MultiTaskNet(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        ch = tuple(cfg.decoder_channels)
        self.encoder = _encoder(cfg)
        self.depth = UNetDecoder(self.encoder.channels, ch, disparity_scales=4)
        self.seg = UNetDecoder(self.encoder.channels, ch, disparity_scales=0)
        self.gate_to_seg, self.gate_to_depth = Gate(ch[2]), Gate(ch[2])  # G_d and G_s
        self.head = nn.Conv2d(ch[0], NUM_CLASSES, 1)  # the original's multi-task head: one 1x1 classifier, no projection
        self.side = nn.Conv2d(ch[2], NUM_CLASSES, 1)
        self.pose = PoseNet(None)

    def forward(self, image: torch.Tensor, depth: bool = True) -> dict:
        """[B, 3, H, W] -> {"logits", "side": [B, 19, H, W], "disparities": 4 x [B, 1, H/2^s, W/2^s]}.
        ``depth=False`` leaves out the disparities and the depth decoder's stages after the exchange, which
        the logits do not depend on (the teacher's and the mixed batch's passes: a third of their cost)."""
        size = image.shape[-2:]
        maps = self.encoder(image)
        d = self.depth.run_stages(maps, UP_TO_QUARTER)
        s = self.seg.run_stages(maps, UP_TO_QUARTER)
        exchanged = self.gate_to_seg(d[2])
        seg_x = s[2] + exchanged
        s_final = self.seg.run_stages(maps, FROM_QUARTER, x=seg_x, size=size)[0]
        side = F.interpolate(self.side(s[2]), size=size, mode="bilinear", align_corners=False)
        # how much the depth decoder adds to the segmentation features (0: the exchange passes nothing)
        exchange = (exchanged.detach().float().norm() / s[2].detach().float().norm().clamp(min=1e-12))
        out = {"logits": self.head(s_final), "side": side, "exchange": exchange}
        if depth:
            depth_x = d[2] + self.gate_to_depth(s[2])
            d.update({2: depth_x, **self.depth.run_stages(maps, FROM_QUARTER, x=depth_x, size=size)})
            out["disparities"] = self.depth.disparities(d)
        return out


def build_network(cfg: TrainConfig) -> nn.Module:
    return MultiTaskNet(cfg) if cfg.multitask else SegmentationNet(cfg)


def transfer_source(sde_model: Path, cfg: TrainConfig):
    """The SDE model a transfer trial starts from, or a one-line error when it is not one or its
    architecture differs from the trial's (checked on the driver, before any worker starts)."""
    from segsde.sde.export import load_sde_model

    sde = load_sde_model(sde_model)
    mine = (cfg.encoder, cfg.output_stride, tuple(cfg.decoder_channels))
    theirs = (sde.cfg.encoder, sde.cfg.output_stride, tuple(sde.cfg.decoder_channels))
    if mine != theirs:
        raise SegSDEError(f"the SDE model {sde_model} has (encoder, output_stride, decoder_channels) = {theirs} but the "
                          f"trial uses {mine}: use the same architecture in the profile's train and sde sections")
    return sde


def load_transfer(net: nn.Module, sde_model: Path, cfg: TrainConfig) -> SDEConfig:
    """Initialise ``net`` from the SDE stage's ``model.pt``: encoder and decoder (ASPP included) for the
    segmentation decoder, and for :class:`MultiTaskNet` also the depth decoder with its heads and the pose
    net. Returns the SDE config (the multi-task SDE loss uses its settings)."""
    return transfer_into(net, sde_model, cfg)[0]


def transfer_into(net: nn.Module, sde_model: Path, cfg: TrainConfig) -> tuple[SDEConfig, dict[str, torch.Tensor]]:
    """``load_transfer``, also returning the SDE encoder's weights (what ``share_from`` compares with once training starts)."""
    sde = transfer_source(sde_model, cfg)
    _load(net, sde)
    return sde.cfg, {k: v.detach().clone() for k, v in sde.encoder.state_dict().items()}


def share_from(encoder: nn.Module, weights: dict[str, torch.Tensor]) -> float:
    """The share of ``encoder``'s tensors equal to ``weights``: 1 when a transfer trial starts from the SDE encoder."""
    mine = encoder.state_dict()
    return sum(torch.equal(mine[k].cpu(), v) for k, v in weights.items() if k in mine) / max(len(weights), 1)


def _load(net: nn.Module, sde) -> None:
    net.encoder.load_state_dict(sde.encoder.state_dict())
    decoder = {k: v for k, v in sde.decoder.state_dict().items() if not k.startswith("heads.")}
    seg_decoder = net.seg if isinstance(net, MultiTaskNet) else net.decoder
    seg_decoder.load_state_dict(decoder)
    if isinstance(net, MultiTaskNet):
        net.depth.load_state_dict(sde.decoder.state_dict())
        net.pose.load_state_dict(sde.pose.state_dict())


def parameter_groups(net: nn.Module, cfg: TrainConfig) -> list[dict]:
    """SGD groups: encoder at ``lr_encoder``, pose net at ``lr_pose``, everything else at ``lr_decoder``."""
    groups: dict[str, list] = {"encoder": [], "pose": [], "decoder": []}
    for name, p in net.named_parameters():
        groups[name.split(".")[0] if name.split(".")[0] in ("encoder", "pose") else "decoder"].append(p)
    lrs = {"encoder": cfg.lr_encoder, "pose": cfg.lr_pose, "decoder": cfg.lr_decoder}
    return [{"params": ps, "lr": lrs[k], "base_lr": lrs[k], "name": k} for k, ps in groups.items() if ps]
