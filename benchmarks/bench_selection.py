"""Farthest-point selection at scale: 100k candidates with 8192-d features, greedy to 1000 picks.

Prints one JSON object. Three measurements, each against its baseline in the same run:
1. scale: the path `segsde select` takes for a pool this large (N x D above ``max_exact_values``: a
   seeded random projection to ``projection_dim``, then incremental IFP), seconds and peak memory against
   the 60 s goal; beside it, the exact incremental IFP on all 8192 dimensions, timed over a few picks;
2. speed-up: incremental IFP against the original's form (the full distance matrix between the
   selected set and every candidate, recomputed per pick) on a size the naive form can handle; both must
   return the same picks;
3. fidelity of the projection: exact vs projected IFP on a mid-size pool, compared by covering radius
   (the largest distance of any candidate to its nearest pick, in the original space) and overlap.
Features are low-rank + noise (like pooled CNN features, whose channels are strongly correlated).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from segsde.selection.config import SelectionConfig
from segsde.selection.ifp import farthest_points, naive_farthest_points, nearest_selected_distance, random_projection


def synthetic_features(n: int, d: int, seed: int, rank: int = 64, chunk: int = 10_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g) / rank**0.5
    out = torch.empty(n, d)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        out[i: i + m] = torch.randn(m, rank, generator=g) @ basis + 0.3 * torch.randn(m, d, generator=g)
    return out


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def scale(args, cfg: SelectionConfig) -> dict:
    x = synthetic_features(args.candidates, args.dim, seed=0)
    rss_features = peak_rss_gib()
    exact = x.numel() <= cfg.max_exact_values
    start = time.perf_counter()
    reduced = x if exact else random_projection(x, cfg.projection_dim, seed=0)
    projection_s = time.perf_counter() - start
    _, ifp_s = timed(lambda: farthest_points(reduced, [0], args.picks))
    total = projection_s + ifp_s
    out = {"path": "exact" if exact else f"random projection to {cfg.projection_dim} + incremental IFP",
           "projection_seconds": round(projection_s, 2), "ifp_seconds": round(ifp_s, 2), "seconds": round(total, 2),
           "meets_goal": total <= 60.0, "features_gib": round(x.numel() * 4 / 2**30, 2),
           "peak_rss_gib": round(peak_rss_gib(), 2), "peak_rss_gib_after_features": round(rss_features, 2)}
    _, exact_s = timed(lambda: farthest_points(x, [0], args.exact_picks))
    out["exact_all_dims_seconds_per_pick"] = round(exact_s / args.exact_picks, 3)
    out["exact_all_dims_seconds_for_all_picks_at_that_rate"] = round(exact_s / args.exact_picks * args.picks, 1)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--picks", type=int, default=1000)
    parser.add_argument("--exact-picks", type=int, default=10, help="picks timed for exact IFP on all dimensions")
    parser.add_argument("--naive-candidates", type=int, default=4000)
    parser.add_argument("--naive-picks", type=int, default=100)
    parser.add_argument("--fidelity-candidates", type=int, default=10_000)
    parser.add_argument("--fidelity-picks", type=int, default=200)
    args = parser.parse_args(argv)
    cfg = SelectionConfig()
    report = {"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "candidates": args.candidates, "dim": args.dim, "picks": args.picks, "goal_seconds": 60.0}

    report["scale"] = scale(args, cfg)

    small = synthetic_features(args.naive_candidates, args.dim, seed=1)
    fast, fast_s = timed(lambda: farthest_points(small, [0], args.naive_picks)[0])
    slow, slow_s = timed(lambda: naive_farthest_points(small, [0], args.naive_picks))
    report["speedup"] = {"candidates": args.naive_candidates, "dim": args.dim, "picks": args.naive_picks,
                         "incremental_seconds": round(fast_s, 3), "naive_seconds": round(slow_s, 2),
                         "ratio": round(slow_s / fast_s, 1), "same_picks": fast == slow}

    mid = synthetic_features(args.fidelity_candidates, args.dim, seed=2)
    exact_picks = farthest_points(mid, [0], args.fidelity_picks)[0]
    projected = farthest_points(random_projection(mid, cfg.projection_dim, seed=0), [0], args.fidelity_picks)[0]
    radius = {name: float(nearest_selected_distance(mid, [0, *p]).max()) for name, p in (("exact", exact_picks), ("projected", projected))}
    report["projection_fidelity"] = {"candidates": args.fidelity_candidates, "picks": args.fidelity_picks,
                                     "covering_radius_exact": round(radius["exact"], 3),
                                     "covering_radius_projected": round(radius["projected"], 3),
                                     "radius_ratio": round(radius["projected"] / radius["exact"], 4),
                                     "overlap": round(len(set(exact_picks) & set(projected)) / args.fidelity_picks, 3)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
