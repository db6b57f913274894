"""Camera geometry for view synthesis, as small pure functions (shapes in the docstrings).

Pixel centres sit at integer coordinates 0 .. W-1 (as in :mod:`segsde.data.camera`), so sampling uses
``grid_sample(align_corners=True)``. Rotations come from kornia's axis-angle conversion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.geometry.conversions import axis_angle_to_rotation_matrix


def disp_to_depth(sigmoid: torch.Tensor, min_depth: float, max_depth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Network output in (0, 1) -> (scaled disparity, depth): depth = 1 / (1/max + (1/min - 1/max) * sigmoid)."""
    min_disp, max_disp = 1.0 / max_depth, 1.0 / min_depth
    disp = min_disp + (max_disp - min_disp) * sigmoid
    return disp, 1.0 / disp


def pose_from_params(axis_angle: torch.Tensor, translation: torch.Tensor, invert: bool = False) -> torch.Tensor:
    """[B, 3] axis-angle and [B, 3] translation -> [B, 4, 4] rigid transform ``[R | t]``.

    ``invert`` returns ``[R^T | -R^T t]``, the pose of the reverse direction (for the pair (t-1, t)).
    """
    R = axis_angle_to_rotation_matrix(axis_angle)
    T = torch.zeros(axis_angle.shape[0], 4, 4, dtype=axis_angle.dtype, device=axis_angle.device)
    T[:, 3, 3] = 1
    if invert:
        Rt = R.transpose(1, 2)
        T[:, :3, :3] = Rt
        T[:, :3, 3] = -(Rt @ translation.unsqueeze(-1)).squeeze(-1)
    else:
        T[:, :3, :3] = R
        T[:, :3, 3] = translation
    return T


def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[3, H*W] homogeneous pixel coordinates (u, v, 1), row-major."""
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=dtype), torch.arange(width, device=device, dtype=dtype),
                          indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1), torch.ones_like(u).reshape(-1)])


def backproject(depth: torch.Tensor, inv_K: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] depth and [B, 3, 3] K^-1 -> [B, 3, H*W] camera points ``D * K^-1 p``."""
    B, _, H, W = depth.shape
    rays = inv_K @ pixel_grid(H, W, depth.device, depth.dtype)
    return rays * depth.reshape(B, 1, H * W)


def project(points: torch.Tensor, K: torch.Tensor, T: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """[B, 3, N] points, [B, 3, 3] K, [B, 4, 4] T -> [B, 2, N] pixel coordinates of ``K (R p + t)``."""
    cam = T[:, :3, :3] @ points + T[:, :3, 3:]
    pix = K @ cam
    return pix[:, :2] / (pix[:, 2:3] + eps)


def warp(source: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Synthesise the target view from ``source`` [B, C, H, W] given the target's depth [B, 1, H, W],
    intrinsics K [B, 3, 3] and T [B, 4, 4] (target camera -> source camera). Border padding."""
    B, _, H, W = depth.shape
    pix = project(backproject(depth, torch.linalg.inv(K)), K, T).reshape(B, 2, H, W)
    grid = torch.stack([pix[:, 0] / (W - 1), pix[:, 1] / (H - 1)], dim=-1) * 2 - 1
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=True)
