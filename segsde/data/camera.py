"""Pinhole intrinsics under image transforms, and poses under horizontal flips.

Convention: pixel centres sit at integer coordinates 0 .. W-1, so a back-projection grid built with
``arange(W)`` is exact. Every function takes and returns a 3x3 ``K`` (numpy or torch, not modified in place).
"""

from __future__ import annotations

import numpy as np


def _copy(K):
    return K.clone() if hasattr(K, "clone") else np.array(K, dtype=np.float64, copy=True)


def _scale(K, sx: float, sy: float):
    """Scale the image plane about the pixel-centre grid: u' + 0.5 = (u + 0.5) * s."""
    K = _copy(K)
    K[..., 0, 0] *= sx
    K[..., 1, 1] *= sy
    K[..., 0, 2] = (K[..., 0, 2] + 0.5) * sx - 0.5
    K[..., 1, 2] = (K[..., 1, 2] + 0.5) * sy - 0.5
    return K


def resize_intrinsics(K, old_size: tuple[int, int], new_size: tuple[int, int]):
    """K for an image resized from ``old_size`` (H, W) to ``new_size`` (H, W)."""
    return _scale(K, new_size[1] / old_size[1], new_size[0] / old_size[0])


def crop_intrinsics(K, top: int, left: int):
    """K for the crop whose top-left corner is pixel (left, top) of the original image."""
    K = _copy(K)
    K[0, 2] -= left
    K[1, 2] -= top
    return K


def flip_intrinsics(K, width: int):
    """K for an image mirrored left-right (width in pixels of the image being flipped). v0 stays."""
    K = _copy(K)
    K[0, 2] = (width - 1) - K[0, 2]
    return K


def flip_pose(T):
    """Relative pose [4, 4] (or [..., 4, 4]) of a mirrored scene: ``F T F`` with F = diag(-1, 1, 1, 1).

    Mirroring the image mirrors the world about the camera's y-z plane, so x-translation and the
    rotation about y and z change sign.
    """
    F = np.diag([-1.0, 1.0, 1.0, 1.0])
    if hasattr(T, "clone"):
        import torch

        F = torch.as_tensor(F, dtype=T.dtype, device=T.device)
    return F @ T @ F


def scale_intrinsics(K, scale: int):
    """K at pyramid level ``scale`` (image downsampled by 2**scale), same pixel-centre convention."""
    return _scale(K, 2.0**-scale, 2.0**-scale)


def project(K, points_cam):
    """Camera points [N, 3] -> pixel coordinates [N, 2] (u, v)."""
    p = points_cam @ K.T
    return p[:, :2] / p[:, 2:3]
