"""Iterative farthest point (IFP) selection over feature vectors, as small pure functions.

The incremental form keeps, for every candidate, its distance to the nearest selected sample and updates
it with each new pick: O(N x D) per pick and O(N) extra memory, instead of the original's full distance
matrix per round. ``naive_farthest_points`` is that original form, kept as the reference the tests and the
benchmark compare against.
"""

from __future__ import annotations

import torch


def standardise(features: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, C*h*w]: each channel standardised over all images and positions."""
    mean = features.mean((0, 2, 3), keepdim=True)
    std = features.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return ((features - mean) / std).flatten(1)


def random_projection(features: torch.Tensor, dim: int, seed: int, chunk: int = 8192) -> torch.Tensor:
    """[N, D] -> [N, dim] by a seeded Gaussian matrix / sqrt(dim), which keeps pairwise Euclidean
    distances up to a small relative error (Johnson-Lindenstrauss); computed ``chunk`` rows at a time."""
    g = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=g, dtype=features.dtype) / dim**0.5
    return torch.cat([features[i: i + chunk] @ matrix for i in range(0, len(features), chunk)])


def distances_to(features: torch.Tensor, sq_norms: torch.Tensor, index: int) -> torch.Tensor:
    """Euclidean distances [N] from sample ``index`` to every row of ``features`` [N, D] with
    precomputed squared norms [N] (one matrix-vector product)."""
    point = features[index]
    d2 = sq_norms - 2 * (features @ point) + sq_norms[index]
    return d2.clamp_min_(0).sqrt_()


def nearest_selected_distance(features: torch.Tensor, selected: list[int], sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """[N]: each row's distance to its nearest row in ``selected`` (non-empty)."""
    sq_norms = (features * features).sum(1) if sq_norms is None else sq_norms
    nearest = torch.full((len(features),), float("inf"), dtype=features.dtype)
    for i in selected:
        torch.minimum(nearest, distances_to(features, sq_norms, i), out=nearest)
    return nearest


def farthest_points(features: torch.Tensor, selected: list[int], count: int, bonus: torch.Tensor | None = None,
                    weight: float = 0.0, nearest: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Add ``count`` rows to ``selected`` greedily, each maximising
    ``score(j) = min_{i in S} ||f_i - f_j|| + weight * bonus[j]`` over rows not yet selected.

    features [N, D]; selected: non-empty list of row indices; bonus [N] (e.g. the depth-difficulty E,
    fixed while these picks are made); nearest [N]: the running distance to the nearest selected row
    when continuing an earlier call (computed from ``selected`` otherwise).
    Returns (picks, their distance to the set at the time of picking [count], the updated ``nearest``).
    """
    if not selected:
        raise ValueError("farthest-point selection starts from at least one selected sample")
    if count > len(features) - len(selected):
        raise ValueError(f"cannot pick {count} more of {len(features)} samples with {len(selected)} already selected")
    sq_norms = (features * features).sum(1)
    nearest = nearest_selected_distance(features, selected, sq_norms) if nearest is None else nearest.clone()
    taken = torch.zeros(len(features), dtype=torch.bool)
    taken[selected] = True
    extra = weight * bonus.to(features.dtype) if bonus is not None and weight else None
    picks, gaps = [], []
    for _ in range(count):
        score = nearest + extra if extra is not None else nearest.clone()
        score[taken] = -float("inf")
        j = int(score.argmax())
        picks.append(j)
        gaps.append(float(nearest[j]))
        taken[j] = True
        torch.minimum(nearest, distances_to(features, sq_norms, j), out=nearest)
    return picks, torch.tensor(gaps, dtype=features.dtype), nearest


def naive_farthest_points(features: torch.Tensor, selected: list[int], count: int, bonus: torch.Tensor | None = None,
                          weight: float = 0.0) -> list[int]:
    """The same selection computed the original way: the full distance matrix between the selected set
    and every candidate, recomputed for every pick (O(N x |S| x D) per pick). Reference only."""
    chosen = list(selected)
    for _ in range(count):
        d = torch.cdist(features[chosen], features).min(0).values
        score = d + weight * bonus.to(features.dtype) if bonus is not None and weight else d
        score[chosen] = -float("inf")
        chosen.append(int(score.argmax()))
    return chosen[len(selected):]
