"""ClassMix and DepthMix for any batch size: masks, partners, and mixing of images and targets.

Image i of a batch is mixed with its partner j = partner[i]: ``x_i' = M_i * x_i + (1 - M_i) * x_j``, and
its (soft) target with the same mask. Partners come from a random cyclic order over the batch, so every
image has another image as partner (for B >= 2) and every image is some image's partner.
"""

from __future__ import annotations

import torch

from segsde.data.labels import IGNORE_INDEX


def partners(batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """[B] index of each image's mixing partner: p[order[k]] = order[k+1 mod B] for a random order.
    A derangement for B >= 2 (no image is paired with itself); for B = 1 the image is its own partner."""
    order = torch.randperm(batch, generator=generator)
    out = torch.empty(batch, dtype=torch.long)
    out[order] = order.roll(-1)
    return out.to(device)


def class_mask(labels: torch.Tensor, generator: torch.Generator | None = None,
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """ClassMix mask. labels [B, H, W] (teacher argmax or ground truth) -> bool [B, H, W]: for each image,
    floor(n/2) of its n classes (ignore excluded), chosen at random, and the pixels of those classes."""
    masks = torch.zeros_like(labels, dtype=torch.bool)
    for b in range(labels.shape[0]):
        classes = labels[b].unique()
        classes = classes[classes != ignore_index]
        chosen = classes[torch.randperm(len(classes), generator=generator)[: len(classes) // 2].to(classes.device)]
        masks[b] = torch.isin(labels[b], chosen)
    return masks


def normalised_disparity(disparity: torch.Tensor) -> torch.Tensor:
    """[B, H, W] disparity (larger = closer) -> per-image min-max normalised to [0, 1] (the original's
    unit for epsilon; a constant map becomes 0)."""
    flat = disparity.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return (disparity - lo) / (hi - lo).clamp(min=1e-12)


def depth_to_disparity(depth: torch.Tensor) -> torch.Tensor:
    """Ground-truth depth [B, H, W] in metres (0 = invalid, e.g. sky) -> normalised disparity; invalid
    pixels count as infinitely far (disparity 0)."""
    disparity = torch.where(depth > 0, 1.0 / depth.clamp(min=1e-6), torch.zeros_like(depth))
    return normalised_disparity(disparity)


def depth_mask(disparity: torch.Tensor, partner: torch.Tensor, epsilon: float) -> torch.Tensor:
    """DepthMix mask. disparity [B, H, W] normalised (larger = closer), partner [B] -> bool [B, H, W]:
    a pixel of image i is kept where it is no farther than image j's pixel by more than epsilon,
    ``d_i >= d_j - epsilon``, so pasted foreground never covers something in front of it."""
    return disparity >= disparity[partner] - epsilon


def mix(mask: torch.Tensor, values: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """mask [B, H, W] bool, values [B, ...] with trailing (H, W) (images [B, C, H, W], soft targets
    [B, K, H, W] or maps [B, H, W]) -> the mixed batch: image i's values where M_i, else its partner's."""
    m = mask if values.dim() == mask.dim() else mask[:, None]
    return torch.where(m, values, values[partner])
