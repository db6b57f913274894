"""Cityscapes conversion throughput at the real 2048x1024, in source frames per second per core.

Generates a tree in Cityscapes' layout (training snippets of 30 frames, their annotated frame, labels and
camera files; frames are testbed scenes rendered at 256x512, upscaled, with sensor noise, about the size
of a Cityscapes PNG), converts it with `segsde data cityscapes`'s code (Ray tasks, one shard per snippet) on
one core and on every core, and prints one JSON object. The baseline, measured in the same run on one
core, converts each triplet on its own (three decodes and encodes a triplet, as the annotated samples
are), which is what the sequence split would cost without decoding a snippet's frames once.
From the per-core rate it projects the full dataset: 2975 training snippets x 30 frames, plus 3475
annotated samples (3 frames and a label each), on one 16-core node and on a cluster of four.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from segsde.data import cityscapes
from segsde.data.store import encode_png
from segsde.data.synth.render import render_sequence
from segsde.data.synth.scene import SynthConfig, make_scene
from segsde.runtime.ray_job import init_ray
from segsde.runtime.shards import build_on_ray

NATIVE = (1024, 2048)
SNIPPET_FRAMES, SNIPPETS, ANNOTATED = 30, 2975, 2975 + 500
LABEL_IDS = np.array([7, 8, 11, 17, 21, 23, 24, 26], np.uint8)  # road, sidewalk, building, pole, vegetation, sky, person, car


def street_frame(rng: np.random.Generator) -> np.ndarray:
    frame = render_sequence(make_scene(rng, SynthConfig(height=256, width=512)), rng)[1].image
    image = Image.fromarray((np.clip(frame, 0, 1) * 255).astype(np.uint8)).resize(NATIVE[::-1], Image.BICUBIC)
    noisy = np.asarray(image, np.int16) + rng.normal(0, 2.0, (*NATIVE, 3)).astype(np.int16)  # sensor noise
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _write(path: Path, image: np.ndarray | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image) if isinstance(image, bytes) else Image.fromarray(image).save(path)
    return path


def make_tree(root: Path, snippets: int, seed: int = 0) -> float:
    """Write ``snippets`` training snippets and one validation sample; return a frame's mean PNG size in MB."""
    rng, sizes, city = np.random.default_rng(seed), [], "benchcity"
    camera = json.dumps({"intrinsic": {"fx": 2262.52, "fy": 2265.30, "u0": 1096.98, "v0": 513.14}})
    for s in range(snippets):
        seq, annotated = f"{s:06d}", 19
        sample = cityscapes.frame_id(city, seq, annotated)
        for f in range(annotated - 19, annotated + 11):
            name = f"{cityscapes.frame_id(city, seq, f)}_leftImg8bit.png"
            sizes.append(_write(root / "leftImg8bit_sequence/train" / city / name, street_frame(rng)).stat().st_size)
        label = Image.fromarray(LABEL_IDS[rng.integers(0, len(LABEL_IDS), (16, 32))]).resize(NATIVE[::-1], Image.NEAREST)
        splits = ("train", "val") if s == 0 else ("train",)  # the first annotated sample is also the validation split
        for split in splits:
            for f in (annotated - 1, annotated, annotated + 1):
                name = f"{cityscapes.frame_id(city, seq, f)}_leftImg8bit.png"
                frame = (root / "leftImg8bit_sequence/train" / city / name).read_bytes()
                _write(root / "leftImg8bit_sequence" / split / city / name, frame)
                if f == annotated:
                    _write(root / "leftImg8bit" / split / city / name, frame)
            _write(root / "gtFine" / split / city / f"{sample}_gtFine_labelIds.png", np.asarray(label))
            _write(root / "camera" / split / city / f"{sample}_camera.json", camera.encode())
    return float(np.mean(sizes)) / 2**20


def per_triplet_baseline(tree: Path, size: tuple[int, int], snippet: cityscapes.Snippet) -> float:
    """Seconds to convert a snippet's triplets one by one on this core (each frame decoded where it is used)."""
    start = time.perf_counter()
    t = cityscapes.Tree(tree)
    for f in snippet.centres:
        for g in (f - 1, f, f + 1):
            encode_png(cityscapes.load_frame(t.file("leftImg8bit_sequence", "train", cityscapes.frame_id(snippet.city, snippet.seq, g)), size)[0])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snippets", type=int, default=None,
                        help="training snippets to generate, 30 frames each (default: two per core, so every core has work to the end)")
    parser.add_argument("--size", default="1024x512", help="stored WIDTHxHEIGHT (the paper's 1024x512)")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    args.snippets = args.snippets or 2 * args.cores
    w, h = map(int, args.size.split("x"))
    size = (h, w)
    with tempfile.TemporaryDirectory(prefix="bench-cityscapes-") as tmp:
        tree = Path(tmp) / "tree"
        png_mb = make_tree(tree, args.snippets)
        tasks, description, _ = cityscapes.plan(str(tree), size)
        snippets = [t for t in tasks if t.snippet is not None]
        baseline = len(snippets[0].snippet.frames) / per_triplet_baseline(tree, size, snippets[0].snippet)
        rates, mb_per_triplet = {}, 0.0
        for cores in sorted({1, args.cores}):
            out = Path(tmp) / f"out-{cores}"
            init_ray(None, num_cpus=cores)  # started before the clock: its seconds of start-up are not conversion
            m = build_on_ray(out, snippets, partial(cityscapes.convert_task, str(tree), size), description, source="bench", workers=cores)
            rates[cores] = m["converted"]["frames"] / m["converted"]["seconds"]
            mb_per_triplet = sum((out / s["file"]).stat().st_size for s in m["shards"]) / sum(s["rows"] for s in m["shards"]) / 2**20
            ray.shutdown()  # the next measurement starts its own local Ray with its own CPU count
    per_core = rates[1]
    efficiency = rates[args.cores] / (per_core * args.cores)
    frames = SNIPPETS * SNIPPET_FRAMES + ANNOTATED * 4

    def hours(cores: int) -> float:  # at the parallel efficiency measured here
        return round(frames / (per_core * cores * min(1.0, efficiency)) / 3600, 2)

    print(json.dumps({
        "benchmark": "cityscapes_conversion", "cpu": platform.processor() or platform.machine(), "cores": args.cores,
        "native": list(NATIVE), "stored": list(size), "snippets": args.snippets, "png_mb_per_frame": round(png_mb, 2),
        "frames_per_s_per_core": round(per_core, 2), f"frames_per_s_{args.cores}_cores": round(rates[args.cores], 2),
        "parallel_efficiency": round(efficiency, 2), "baseline_per_triplet_frames_per_s_per_core": round(baseline, 2),
        "speedup_over_baseline": round(per_core / baseline, 2), "stored_mb_per_triplet": round(mb_per_triplet, 2),
        "full_dataset": {"source_frames": frames, "sde_triplets": SNIPPETS * 28,
                         "stored_gb": round(mb_per_triplet * (SNIPPETS * 27 + ANNOTATED) / 1024, 1),
                         "hours_one_16_core_node": hours(16), "hours_four_16_core_nodes": hours(64)},
    }))


if __name__ == "__main__":
    main()
