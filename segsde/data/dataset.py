"""One torch ``Dataset`` over every source in the segsde format, with geometry-aware augmentation.

Resize, crop and flip are applied identically to all frames, labels and depth maps, and the intrinsics
(and, for flips, the relative poses) are transformed with them, so self-supervised warping stays exact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from segsde.data.camera import crop_intrinsics, flip_intrinsics, flip_pose, resize_intrinsics
from segsde.data.labels import IGNORE_INDEX
from segsde.data.splits import check_ids
from segsde.data.store import decode_depth, decode_png, decode_unit_png, read_index, read_manifest, read_side_column
from segsde.errors import SegSDEError

PSEUDO_DEPTH = "pseudo_depth"


def pseudo_depth_column(model_id: str | None) -> str:
    """The side column holding the pseudo-depth of the SDE model ``model_id`` (a stable name for it, e.g. its cache
    entry): each model its own, so that a study with one SDE model per seed keeps every seed's export. None: the
    column `segsde sde export` writes by default."""
    import hashlib

    return PSEUDO_DEPTH if model_id is None else f"{PSEUDO_DEPTH}-{hashlib.sha256(model_id.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class Augment:
    """``resize`` and ``crop`` are (H, W). With ``random`` the crop position and a horizontal flip (p=0.5)
    are drawn from torch's RNG; without it the crop is centred and nothing is flipped (evaluation)."""

    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    random: bool = False


def _resize(a: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    if a.shape[:2] == tuple(size):
        return a
    return np.asarray(Image.fromarray(a).resize((size[1], size[0]), resample))


class SegSDEDataset(torch.utils.data.Dataset):
    """Samples of one split, several or all (``split`` None), or an explicit id list of those, of a dataset directory.

    Each item is a dict: ``id``; ``image`` [3, H, W] float in [0, 1] (frame t); ``frames`` [3, 3, H, W]
    (t-1, t, t+1, only with ``sequence=True``); ``K`` [3, 3]; ``label`` [H, W] int64 (255 = ignore);
    and where the source has them ``depth`` [H, W] (metres, 0 = invalid), ``dynamic`` [H, W] bool,
    ``poses`` [2, 4, 4] (T_{t->t-1}, T_{t->t+1}) and ``pseudo_depth`` [H, W] (normalised disparity).
    """

    def __init__(self, root: str | Path, split: str | Sequence[str] | None = "train", ids: Sequence[str] | None = None,
                 augment: Augment = Augment(), sequence: bool = False, cache_mb: float = 256.0, pseudo_depth: str = PSEUDO_DEPTH):
        self.root, self.split = Path(root), split
        self.manifest = read_manifest(self.root)
        index = read_index(self.root, self.manifest)
        splits = None if split is None else {split} if isinstance(split, str) else set(split)
        by_id = {sid: (s, r, sp) for sid, sp, s, r in index if splits is None or sp in splits}
        if ids is None:
            ids = [sid for sid, sp, _, _ in index if splits is None or sp in splits]
        else:
            check_ids(list(ids), by_id, f"the id list for split '{split}'")
        if not ids:
            raise SegSDEError(f"{self.root} has no samples in split '{split}': use one of {sorted(self.manifest['splits'])}")
        self.ids = list(ids)
        self._where = [by_id[i][:2] for i in self.ids]
        self._splits = [by_id[i][2] for i in self.ids]
        self.augment, self.sequence = augment, sequence
        self.pseudo_depth = read_side_column(self.root, pseudo_depth)  # the side column served as the items' ``pseudo_depth``
        self._files: dict[int, pq.ParquetFile] = {}
        self._groups: dict[tuple[int, int], list[dict]] = {}
        # decoded and resized samples, up to cache_mb: training revisits every sample each epoch, and
        # decoding the PNGs was about 5 % of a 64x128 trainer step and 10 % of an SDE step on the CPU
        self.cache_bytes = int(cache_mb * 2**20)
        self._decoded: dict[int, tuple] = {}
        self._decoded_bytes = 0

    def __getstate__(self) -> dict:
        # open Parquet files, row groups and decoded samples stay with the process that made them
        return {**self.__dict__, "_files": {}, "_groups": {}, "_decoded": {}, "_decoded_bytes": 0}

    def __len__(self) -> int:
        return len(self.ids)

    def split_counts(self) -> dict[str, int]:
        """How many of its samples each split holds."""
        return dict(Counter(self._splits))

    def _row(self, i: int) -> dict:
        shard, row = self._where[i]
        if shard not in self._files:
            self._files[shard] = pq.ParquetFile(self.root / self.manifest["shards"][shard]["file"])
        pf = self._files[shard]
        group_size = pf.metadata.row_group(0).num_rows
        key = (shard, row // group_size)
        if key not in self._groups:
            if len(self._groups) >= 4:
                self._groups.pop(next(iter(self._groups)))
            self._groups[key] = pf.read_row_group(key[1]).to_pylist()
        return self._groups[key][row % group_size]

    def label_array(self, i: int) -> np.ndarray | None:
        """Sample i's stored label map (trainIds, 255 = ignore) at the stored size, or None if unlabeled."""
        r = self._row(i)
        return decode_png(r["label"], f"label of {r['id']}") if r["label"] is not None else None

    def _decode(self, i: int) -> tuple:
        """Sample i decoded and resized: (id, frames, K, label, {key: (array, resample)}, poses or None)."""
        if i in self._decoded:
            return self._decoded[i]
        r = self._row(i)
        sid = r["id"]
        frames = [decode_png(b, f"frame of {sid}") for b in (r["frames"] if self.sequence else r["frames"][1:2])]
        h0, w0 = frames[0].shape[:2]
        K = np.array(r["K"], dtype=np.float64).reshape(3, 3)
        label = decode_png(r["label"], f"label of {sid}") if r["label"] is not None else np.full((h0, w0), IGNORE_INDEX, np.uint8)
        extra = {}
        if r["depth"] is not None:
            extra["depth"] = (decode_depth(r["depth"]), Image.NEAREST)
        if r["dynamic"] is not None:
            extra["dynamic"] = (decode_png(r["dynamic"], f"dynamic mask of {sid}"), Image.NEAREST)
        if self.pseudo_depth is not None and sid in self.pseudo_depth:
            extra[PSEUDO_DEPTH] = (decode_unit_png(self.pseudo_depth[sid], f"pseudo-depth of {sid}"), Image.BILINEAR)
        if self.augment.resize is not None:
            size = self.augment.resize
            frames = [_resize(f, size, Image.BILINEAR) for f in frames]
            label = _resize(label, size, Image.NEAREST)
            extra = {k: (_resize(v, size, m), m) for k, (v, m) in extra.items()}
            K = resize_intrinsics(K, (h0, w0), size)
        poses = np.array(r["poses"], dtype=np.float64).reshape(2, 4, 4) if r["poses"] is not None else None
        sample = (sid, frames, K, label, extra, poses)
        nbytes = sum(a.nbytes for a in frames) + label.nbytes + sum(v.nbytes for v, _ in extra.values())
        if self._decoded_bytes + nbytes <= self.cache_bytes:
            self._decoded[i] = sample
            self._decoded_bytes += nbytes
        return sample

    def __getitem__(self, i: int) -> dict:
        sid, frames, K, label, extra, poses = self._decode(i)
        aug = self.augment
        h, w = frames[0].shape[:2]
        top, left, (ch, cw), flip = 0, 0, (h, w), False
        if aug.crop is not None:
            ch, cw = aug.crop
            if ch > h or cw > w:
                raise SegSDEError(f"crop {ch}x{cw} is larger than the image {h}x{w}: use a smaller crop or a larger resize")
            if aug.random:
                top, left = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
            else:
                top, left = (h - ch) // 2, (w - cw) // 2
            K = crop_intrinsics(K, top, left)
        if aug.random:
            flip = bool(torch.rand(()) < 0.5)
            if flip:
                K = flip_intrinsics(K, cw)

        def view(a: np.ndarray) -> np.ndarray:
            a = a[top : top + ch, left : left + cw]
            return np.array(a[:, ::-1] if flip else a)  # a writable copy: decoded PNGs are read-only

        frames_t = torch.stack([torch.from_numpy(view(f)).permute(2, 0, 1) for f in frames]).float() / 255.0
        item = {"id": sid, "image": frames_t[1 if self.sequence else 0], "K": torch.from_numpy(K).float(),
                "label": torch.from_numpy(view(label).astype(np.int64))}
        if self.sequence:
            item["frames"] = frames_t
        for key, (value, _) in extra.items():
            item[key] = torch.from_numpy(view(value) > 0) if key == "dynamic" else torch.from_numpy(view(value).astype(np.float32))
        if poses is not None:
            item["poses"] = torch.from_numpy(flip_pose(poses) if flip else poses).float()
        return item


def validation_split(root: str | Path, resize: tuple[int, int] | None, limit: int | None = None,
                     split: str = "val") -> SegSDEDataset:
    """``split`` (``val``, or ``tune`` for a sweep's search) resized for evaluation (no crop, no flip), its first
    ``limit`` samples if given."""
    ds = SegSDEDataset(root, split, augment=Augment(resize, None, random=False))
    return SegSDEDataset(root, split, ids=ds.ids[:limit], augment=ds.augment) if limit is not None else ds


def class_pixels(data: Path, ids: list[str]) -> np.ndarray | None:
    """[N, 19] labeled pixels per class of each image, or None when some image has no label."""
    from segsde.data.labels import NUM_CLASSES

    dataset = SegSDEDataset(data, "train", ids=ids)
    counts = np.zeros((len(ids), NUM_CLASSES), np.int64)
    for k in range(len(ids)):
        label = dataset.label_array(k)
        if label is None:
            return None
        counts[k] = np.bincount(label[label < NUM_CLASSES].ravel(), minlength=NUM_CLASSES)
    return counts
