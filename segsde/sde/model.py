"""The SDE model: depth encoder + ASPP/U-Net decoder + pose net, and its view-synthesis objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segsde.data.camera import resize_intrinsics
from segsde.models.decoder import UNetDecoder
from segsde.models.encoder import FrozenFeatures, ResNetEncoder, feature_distance
from segsde.models.pose import PoseNet, mirror_pose_params
from segsde.sde.config import SDEConfig
from segsde.sde.geometry import disp_to_depth, pose_from_params, warp
from segsde.sde.losses import min_reprojection, photometric_error, scale_invariant_log, smoothness


class SDEModel(nn.Module):
    """``forward(frames, K, net_frames)`` returns the SDE loss terms of one batch.

    frames [B, 3, 3, H, W] (t-1, t, t+1) in [0, 1] for the loss; net_frames the same frames after colour
    augmentation, which only the networks see (monodepth2's convention); K [B, 3, 3] for (H, W).
    With ``cfg.oracle`` (a diagnosis on the testbed), ``truth`` holds the batch's ground truth: ``poses``
    [B, 2, 4, 4] (T(t->t-1), T(t->t+1)) replace the pose net's, or ``depth`` [B, H, W] in metres supervises
    the disparities instead of view synthesis.
    """

    def __init__(self, cfg: SDEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ResNetEncoder(cfg.encoder, cfg.weights, cfg.output_stride)
        self.decoder = UNetDecoder(self.encoder.channels, tuple(cfg.decoder_channels), disparity_scales=cfg.scales)
        self.pose = PoseNet(cfg.weights, cfg.pose_output_scale)
        # only with real ImageNet features is the distance meaningful; a random copy would anchor noise
        self.reference = FrozenFeatures(self.encoder) if cfg.weights is not None and cfg.feature_distance > 0 else None

    def depth_parameters(self) -> list[nn.Parameter]:
        return [*self.decoder.parameters(), *self.pose.parameters()]

    def disparity(self, image: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> sigmoid disparities at scales 0 .. scales-1."""
        return self.decoder(self.encoder(image), size=image.shape[-2:])

    def poses(self, net_frames: torch.Tensor) -> list[torch.Tensor]:
        return frame_poses(self.pose, net_frames, self.cfg)

    def forward(self, frames: torch.Tensor, K: torch.Tensor, net_frames: torch.Tensor | None = None,
                feature_weight: float = 0.0, truth: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        net_frames = frames if net_frames is None else net_frames
        maps = self.encoder(net_frames[:, 1])
        disps = self.decoder(maps, size=frames.shape[-2:])
        if self.cfg.oracle == "depth":
            out = supervised_depth_loss(disps, truth["depth"], self.cfg)
        else:
            poses = list(truth["poses"].unbind(1)) if self.cfg.oracle == "poses" else self.poses(net_frames)
            out = view_synthesis_loss(frames, K, disps, poses, self.cfg)
        if feature_weight > 0 and self.reference is not None:
            dist, frobenius = feature_distance(maps[4], self.reference(net_frames[:, 1]))
            out["feature_distance"], out["feature_distance_frobenius"] = dist, frobenius.detach()
            out["loss"] = out["loss"] + feature_weight * dist
        return out


def view_synthesis_loss(frames: torch.Tensor, K: torch.Tensor, disps: list[torch.Tensor], T: list[torch.Tensor],
                        cfg: SDEConfig) -> dict[str, torch.Tensor]:
    """The monodepth2 objective of one batch: frames [B, 3, 3, H, W] (t-1, t, t+1) in [0, 1], K [B, 3, 3]
    for (H, W), sigmoid disparities [B, 1, H/2^s, W/2^s] of frame t, T = [T(t->t-1), T(t->t+1)] [B, 4, 4].
    Returns ``loss`` (photometric + weighted smoothness), its parts and the auto-mask ratio.

    Always computed in float32 (it casts its inputs), also inside a bf16 autocast region: in bf16, pixel
    coordinates above 128 are rounded to whole pixels and above 256 to 2 px, which destroys the sub-pixel
    flow the depth is learned from (on GPU, the depth collapsed to a constant)."""
    with torch.autocast(frames.device.type, enabled=False):
        return _view_synthesis_loss(frames.float(), K.float(), [d.float() for d in disps], [t.float() for t in T], cfg)


def _view_synthesis_loss(frames, K, disps, T, cfg: SDEConfig) -> dict[str, torch.Tensor]:
    target, sources = frames[:, 1], [frames[:, 0], frames[:, 2]]
    identity = [photometric_error(s, target) for s in sources] if cfg.automask else None
    photometric = smooth = 0.0
    for s, disp in enumerate(disps):
        own_resolution = cfg.photometric_resolution == "scale" and s > 0
        loss_map, warped_won = scale_reprojection(target, sources, K, disp, T, cfg, identity, own_resolution)
        photometric = photometric + loss_map.mean()
        image_s = F.interpolate(target, size=disp.shape[-2:], mode="area") if disp.shape[-2:] != target.shape[-2:] else target
        smooth = smooth + smoothness(disp, image_s) / 2**s
        if s == 0:
            automask_ratio = warped_won.float().mean().detach()
    out = {"photometric": photometric / len(disps), "smoothness": smooth / len(disps), "automask_ratio": automask_ratio}
    out["loss"] = out["photometric"] + cfg.smoothness * out["smoothness"]
    return out


def supervised_depth_loss(disps: list[torch.Tensor], gt: torch.Tensor, cfg: SDEConfig) -> dict[str, torch.Tensor]:
    """The depth oracle's objective: each scale's sigmoid disparity [B, 1, h, w], upsampled to gt [B, H, W]
    (metres, 0 = invalid; the testbed's sky and bonnet), against the ground truth, scale-invariant log error
    averaged over scales. float32, as the view synthesis."""
    with torch.autocast(gt.device.type, enabled=False):
        gt, loss = gt.float()[:, None], 0.0
        gt = torch.where(gt < cfg.eval_max_depth, gt, torch.zeros_like(gt))  # the range the metrics judge
        for disp in disps:
            disp = F.interpolate(disp.float(), size=gt.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + scale_invariant_log(disp_to_depth(disp, cfg.min_depth, cfg.max_depth)[1], gt)
        loss = loss / len(disps)
        return {"loss": loss, "depth_silog": loss.detach()}


def scale_reprojection(target: torch.Tensor, sources: list[torch.Tensor], K: torch.Tensor, disp: torch.Tensor,
                       T: list[torch.Tensor], cfg: SDEConfig, identity: list[torch.Tensor] | None = None,
                       own_resolution: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum-reprojection error of one scale's sigmoid disparity [B, 1, h, w] for the target [B, 3, H, W]
    and its sources, K [B, 3, 3] for (H, W) -> (error map, warped-won mask). By default (monodepth2) the
    disparity is upsampled to (H, W); ``own_resolution`` (monodepth1) compares at (h, w) instead, with
    area-downsampled images and K resized to match: a flow of n pixels is n h / H there, so the coarse
    scales find the large flows near the camera that a local image gradient misses.
    ``identity`` passes the identity errors at (H, W), the same at every upsampled scale."""
    size, full_size = disp.shape[-2:], target.shape[-2:]
    if own_resolution and size != full_size:
        K = resize_intrinsics(K, full_size, size)
        target, sources = F.interpolate(target, size=size, mode="area"), [F.interpolate(x, size=size, mode="area") for x in sources]
        identity = None  # min_reprojection recomputes it at this resolution
    elif size != full_size:
        disp = F.interpolate(disp, size=full_size, mode="bilinear", align_corners=False)
    scaled, depth = disp_to_depth(disp, cfg.min_depth, cfg.max_depth)
    if cfg.normalise_disparity:  # removes the depth/translation scale drift (Wang et al., CVPR 2018)
        depth = scaled.mean((2, 3), keepdim=True) * depth
    warped = [warp(src, depth, K, Ts) for src, Ts in zip(sources, T)]
    return min_reprojection(target, warped, sources, automask=cfg.automask, identity=identity)


def frame_poses(pose_net: PoseNet, net_frames: torch.Tensor, cfg: SDEConfig) -> list[torch.Tensor]:
    """[B, 3, 3, H, W] -> [T(t->t-1), T(t->t+1)], each [B, 4, 4]; pairs go in temporal order."""
    B = net_frames.shape[0]
    pairs = torch.cat([net_frames[:, 0:2].flatten(1, 2), net_frames[:, 1:3].flatten(1, 2)])  # [2B, 6, H, W]
    if cfg.pose_input_scale < 1:
        pairs = F.interpolate(pairs, scale_factor=cfg.pose_input_scale, mode="bilinear", align_corners=False, antialias=True)
    if cfg.pose_flip_average:
        axis, trans = pose_net(torch.cat([pairs, pairs.flip(-1)]))
        m_axis, m_trans = mirror_pose_params(axis[2 * B:], trans[2 * B:])
        axis, trans = (axis[:2 * B] + m_axis) / 2, (trans[:2 * B] + m_trans) / 2
    else:
        axis, trans = pose_net(pairs)
    with torch.autocast(pairs.device.type, enabled=False):  # float32 rotations: cos(0.01) is 1.0 in bf16
        axis, trans = axis.float(), trans.float()
        return [pose_from_params(axis[:B], trans[:B], invert=True), pose_from_params(axis[B:], trans[B:])]
