"""Cityscapes -> the segsde dataset format.

Reads the standard layout: ``leftImg8bit/{split}/{city}/{id}_leftImg8bit.png`` (frame t),
``leftImg8bit_sequence/{split}/{city}/{city}_{seq}_{frame±1}_leftImg8bit.png`` (frames t-1, t+1),
``gtFine/{split}/{city}/{id}_gtFine_labelIds.png`` (converted to trainIds with cityscapesscripts' table)
and ``camera/{split}/{city}/{id}_camera.json`` (per-image intrinsics, scaled to the stored size).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from segsde.data.build import build_dataset
from segsde.data.camera import resize_intrinsics
from segsde.data.labels import VALID_LABEL_IDS, label_id_to_train_id_lut
from segsde.data.store import encode_png
from segsde.errors import SegSDEError

SPLITS = ("train", "val")
PACKAGES = {
    "leftImg8bit": "leftImg8bit_trainvaltest.zip",
    "leftImg8bit_sequence": "leftImg8bit_sequence_trainvaltest.zip",
    "gtFine": "gtFine_trainvaltest.zip",
    "camera": "camera_trainvaltest.zip",
}
SHARD_SIZE = 16
_LUT = label_id_to_train_id_lut()


def _paths(root: Path, split: str, sample_id: str) -> dict[str, Path]:
    city, seq, frame = sample_id.split("_")
    seq_dir = root / "leftImg8bit_sequence" / split / city
    return {
        "prev": seq_dir / f"{city}_{seq}_{int(frame) - 1:06d}_leftImg8bit.png",
        "image": root / "leftImg8bit" / split / city / f"{sample_id}_leftImg8bit.png",
        "next": seq_dir / f"{city}_{seq}_{int(frame) + 1:06d}_leftImg8bit.png",
        "label": root / "gtFine" / split / city / f"{sample_id}_gtFine_labelIds.png",
        "camera": root / "camera" / split / city / f"{sample_id}_camera.json",
    }


def find_samples(root: Path) -> list[tuple[str, str]]:
    """(split, id) of every annotated image, after checking that every file a sample needs exists."""
    root = Path(root)
    if not root.is_dir():
        raise SegSDEError(f"Cityscapes root {root} does not exist: pass the folder that holds leftImg8bit/ and gtFine/")
    for folder, package in PACKAGES.items():
        if not (root / folder).is_dir():
            raise SegSDEError(f"{root / folder} is missing: extract {package} into {root}")
    samples = []
    for split in SPLITS:
        for image in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
            sample_id = image.name[: -len("_leftImg8bit.png")]
            for kind, path in _paths(root, split, sample_id).items():
                if not path.is_file():
                    package = {"prev": "leftImg8bit_sequence", "next": "leftImg8bit_sequence", "image": "leftImg8bit",
                               "label": "gtFine", "camera": "camera"}[kind]
                    raise SegSDEError(f"missing {kind} file {path} for sample {sample_id}: extract {PACKAGES[package]} into {root}")
            samples.append((split, sample_id))
    if not samples:
        raise SegSDEError(f"no images found under {root / 'leftImg8bit'}/{{train,val}}/<city>/: check --root")
    return samples


def _open(path: Path, size: tuple[int, int] | None, resample) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), resample)
            return np.asarray(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise SegSDEError(f"cannot read image {path} ({exc}): the file is corrupt, re-extract it from the Cityscapes archive") from exc


def load_train_ids(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """gtFine labelIds PNG -> trainIds (nearest resize), rejecting ids outside the Cityscapes table."""
    ids = _open(path, size, Image.NEAREST)
    if ids.ndim != 2:
        raise SegSDEError(f"label file {path} is not a single-channel labelIds image: use the *_gtFine_labelIds.png files")
    unknown = sorted(set(np.unique(ids).tolist()) - VALID_LABEL_IDS)
    if unknown:
        raise SegSDEError(f"label file {path} has ids {unknown[:8]} outside the Cityscapes label table: "
                          "use the *_gtFine_labelIds.png files of gtFine_trainvaltest.zip")
    return _LUT[ids]


def load_intrinsics(path: Path) -> np.ndarray:
    try:
        intr = json.loads(path.read_text())["intrinsic"]
        return np.array([[intr["fx"], 0, intr["u0"]], [0, intr["fy"], intr["v0"]], [0, 0, 1]], dtype=np.float64)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SegSDEError(f"camera file {path} has no valid 'intrinsic' block ({exc}): re-extract camera_trainvaltest.zip") from exc


def convert_sample(root: Path, size: tuple[int, int], split: str, sample_id: str) -> dict:
    """One dataset row at ``size`` (H, W); intrinsics rescaled from the native resolution."""
    p = _paths(root, split, sample_id)
    with Image.open(p["image"]) as im:
        native = (im.height, im.width)
    frames = [_open(p[k], size, Image.BILINEAR) for k in ("prev", "image", "next")]
    if any(f.ndim != 3 or f.shape[2] != 3 for f in frames):
        raise SegSDEError(f"frames of {sample_id} are not RGB images: re-extract leftImg8bit")
    K = resize_intrinsics(load_intrinsics(p["camera"]), native, size)
    return {"id": sample_id, "split": split, "frames": [encode_png(f) for f in frames],
            "label": encode_png(load_train_ids(p["label"], size)), "K": K.ravel().tolist()}


def _convert_shard(root: Path, size: tuple[int, int], task: list[tuple[str, str]]) -> list[dict]:
    return [convert_sample(root, size, split, sid) for split, sid in task]


def build(root: Path, out: Path, size: tuple[int, int] = (512, 1024), workers: int | None = None,
          overwrite: bool = False) -> dict:
    root = Path(root).absolute()
    samples = find_samples(root)
    tasks = [samples[i : i + SHARD_SIZE] for i in range(0, len(samples), SHARD_SIZE)]
    splits = {s: sum(1 for sp, _ in samples if sp == s) for s in SPLITS}
    return build_dataset(out, tasks, partial(_convert_shard, root, size), source="cityscapes", splits=splits,
                         samples_per_task=[len(t) for t in tasks], workers=workers, overwrite=overwrite,
                         size=list(size), root=str(root))


def native_label(root: Path, split: str, sample_id: str) -> np.ndarray:
    """The full-resolution (2048x1024) trainIds of a sample, for the official evaluation protocol."""
    path = _paths(Path(root), split, sample_id)["label"]
    if not path.is_file():
        raise SegSDEError(f"{path} is missing, which the full-resolution evaluation needs: keep the Cityscapes tree the "
                          "dataset was built from at its recorded root, or set eval_full_resolution: false")
    return load_train_ids(path, None)
