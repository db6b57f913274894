"""Synthetic testbed generator throughput, in frames per second per core.

Prints one JSON object. The baseline, measured in the same run, is the same renderer with the numpy
reference ray-box kernel instead of the compiled one (identical output, tested).
Goal (issue #2): >= 100 frames/s per core at 128x256, end to end (render + PNG encode).
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

from segsde.data.synth import render
from segsde.data.synth.generate import render_sample, sample_rng
from segsde.data.synth.scene import SynthConfig, make_scene

GOAL = 100.0


def _frames_per_s(fn, samples: int) -> float:
    fn(0)  # warm-up
    start = time.perf_counter()
    for i in range(1, samples + 1):
        fn(i)
    return 3 * samples / (time.perf_counter() - start)


def _render_only(cfg):
    def fn(i):
        rng = sample_rng(0, "train", i)
        render.render_sequence(make_scene(rng, cfg), rng)
    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="128x256")
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()
    h, w = (int(x) for x in args.size.split("x"))
    cfg = SynthConfig(height=h, width=w)
    end_to_end = _frames_per_s(lambda i: render_sample(cfg, 0, "train", i), args.samples)
    render_only = _frames_per_s(_render_only(cfg), args.samples)
    with mock.patch.object(render, "CAST_BOXES", render.cast_boxes_numpy):
        baseline = _frames_per_s(_render_only(cfg), max(4, args.samples // 4))
    print(json.dumps({
        "benchmark": "synth_generator", "size": args.size, "samples": args.samples, "processes": 1,
        "frames_per_s_per_core_end_to_end": round(end_to_end, 1),
        "frames_per_s_per_core_render_only": round(render_only, 1),
        "baseline_numpy_kernel_render_only": round(baseline, 1),
        "speedup_vs_baseline": round(render_only / baseline, 2),
        "goal_frames_per_s_per_core": GOAL, "goal_met": end_to_end >= GOAL,
    }))


if __name__ == "__main__":
    main()
