"""Render the synthetic street-scene testbed into the dataset format (:mod:`segsde.data.store`)."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import numpy as np

from segsde.data.build import build_dataset
from segsde.data.store import TUNE_SPLIT, encode_depth, encode_png, image_to_uint8
from segsde.data.synth.render import relative_pose, render_sequence
from segsde.data.synth.scene import SynthConfig, make_scene

SPLIT_CODES = {"train": 0, "val": 1, "tune": 2}
SHARD_SIZE = 32


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each sample has its own stream, so results do not depend on sharding or worker count."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], index]))


def render_sample(cfg: SynthConfig, seed: int, split: str, index: int) -> dict:
    """One dataset row (see :mod:`segsde.data.store`) for sample ``index`` of ``split``."""
    rng = sample_rng(seed, split, index)
    scene = make_scene(rng, cfg)
    frames = render_sequence(scene, rng)
    centre = frames[1]
    poses = np.stack([relative_pose(scene, 1, 0), relative_pose(scene, 1, 2)])
    return {
        "id": f"{split}_{index:06d}",
        "split": split,
        "frames": [encode_png(image_to_uint8(f.image)) for f in frames],
        "label": encode_png(centre.label),
        "depth": encode_depth(centre.depth),
        "dynamic": encode_png(centre.dynamic.astype(np.uint8) * 255),
        "K": scene.K.ravel().tolist(),
        "poses": poses.ravel().tolist(),
    }


def _render_shard(cfg: SynthConfig, seed: int, task: tuple[str, int, int]) -> list[dict]:
    split, start, stop = task
    return [render_sample(cfg, seed, split, i) for i in range(start, stop)]


def generate(out: Path, n_train: int, n_val: int, cfg: SynthConfig, seed: int, workers: int | None = None,
             overwrite: bool = False, n_tune: int = 0) -> dict:
    """``n_tune`` > 0 adds the ``tune`` split: labeled scenes from their own streams, scored by a sweep's search
    so that the study's ``val`` numbers are not the ones the settings were chosen on."""
    splits = {"train": n_train, "val": n_val} | ({TUNE_SPLIT: n_tune} if n_tune else {})
    tasks = [(split, s, min(s + SHARD_SIZE, n)) for split, n in splits.items() for s in range(0, n, SHARD_SIZE)]
    return build_dataset(
        out, tasks, partial(_render_shard, cfg, seed), source="synthetic",
        splits=splits, samples_per_task=[t[2] - t[1] for t in tasks],
        workers=workers, overwrite=overwrite, size=[cfg.height, cfg.width], seed=seed,
        generator=dataclasses.asdict(cfg),
    )
