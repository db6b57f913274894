"""Cached stages: a stage's output lives under ``<out>/cache/<stage>-<key>``, where the key hashes the
stage's configuration, so an unchanged stage is reused and never recomputed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from segsde.data.store import read_manifest
from segsde.data.synth.scene import SynthConfig
from segsde.errors import SegSDEError
from segsde.profiles import DataProfile

DATA_FORMAT_VERSION = 1  # bump when the renderer changes what a seed produces


def cache_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def dataset_stage(profile: DataProfile, out: Path, seed: int, data_root: Path | None = None,
                  force: bool = False, dry_run: bool = False, log=print) -> Path:
    """The study's dataset: the synthetic testbed rendered once per configuration, or a built Cityscapes dataset."""
    if data_root is not None:
        source = read_manifest(data_root)["source"]
        log(f"[data] using the {source} dataset at {data_root}")
        return Path(data_root)
    if profile.source == "cityscapes":
        raise SegSDEError("the cityscapes profile needs --data-root: build one with `segsde data cityscapes --root ... --out DIR`")
    h, w = profile.size
    synth = SynthConfig(height=h, width=w)
    config = {"stage": "data", "version": DATA_FORMAT_VERSION, "train": profile.train, "val": profile.val,
              "seed": seed, "generator": asdict(synth)}
    path = Path(out).absolute() / "cache" / f"data-{cache_key(config)}"
    if (path / "manifest.json").is_file() and not force:
        read_manifest(path)
        log(f"[data] cache hit: reusing {path}")
        return path
    if dry_run:
        log(f"[data] would render {profile.train}+{profile.val} samples at {h}x{w} into {path}")
        return path
    from segsde.data.synth.generate import generate

    log(f"[data] rendering {profile.train} train + {profile.val} val samples at {h}x{w} into {path}")
    generate(path, profile.train, profile.val, synth, seed, overwrite=force)
    return path
