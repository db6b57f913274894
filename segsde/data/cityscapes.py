"""Cityscapes -> the segsde dataset format: the annotated frames and the unlabeled video around them.

Reads the standard layout, on a local path or a storage URI (``s3://``):
``leftImg8bit/{split}/{city}/{id}_leftImg8bit.png`` (frame t of an annotated sample),
``leftImg8bit_sequence/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png`` (its 30-frame snippet: the
annotated frame is the 20th, so frames t-19 .. t+10), ``gtFine/{split}/{city}/{id}_gtFine_labelIds.png``
(converted to trainIds with cityscapesscripts' table) and ``camera/{split}/{city}/{id}_camera.json`` (the
snippet's intrinsics, scaled to the stored size).

Splits: ``train`` and ``val`` (annotated samples with t-1 and t+1), ``tune`` (the annotated training frames of
the tune cities, ``TUNE_CITIES`` by default: a sweep's search scores on them, nothing trains on them) and
``sequence``: every other frame of a training snippet that has both neighbours, unlabeled (27 a snippet, 80,325
for the 2975 snippets with no tune city; with ``train``, the paper's 83,300 SDE triplets). A conversion is planned here as independent tasks, one
shard each; ``segsde.runtime.shards`` runs them.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from segsde.data.camera import resize_intrinsics
from segsde.data.labels import VALID_LABEL_IDS, label_id_to_train_id_lut
from segsde.data.store import SEQUENCE_SPLIT, TUNE_SPLIT, encode_png
from segsde.errors import SegSDEError
from segsde.storage import Location, as_location

SPLITS = ("train", "val")
# The tuning split's default: two training cities (of 18) with their whole snippets, so that a sweep's search scores
# on streets that neither the labeled budgets, the unlabeled pool, the SDE video nor the study's val images show
TUNE_CITIES = ("weimar", "zurich")
PACKAGES = {
    "leftImg8bit": "leftImg8bit_trainvaltest.zip",
    "leftImg8bit_sequence": "leftImg8bit_sequence_trainvaltest.zip",
    "gtFine": "gtFine_trainvaltest.zip",
    "camera": "camera_trainvaltest.zip",
}
SUFFIX = {"leftImg8bit": "_leftImg8bit.png", "leftImg8bit_sequence": "_leftImg8bit.png",
          "gtFine": "_gtFine_labelIds.png", "camera": "_camera.json"}
SNIPPET_BEFORE, SNIPPET_AFTER = 19, 10  # the annotated frame is the 20th of a 30-frame snippet
SHARD_SIZE = 16
_LUT = label_id_to_train_id_lut()


def frame_id(city: str, seq: str, frame: int) -> str:
    return f"{city}_{seq}_{frame:06d}"


class Tree:
    """A Cityscapes tree: its file listings, read once per package and split."""

    def __init__(self, root: Location | str):
        self.root = as_location(root)
        self._listed: dict[tuple[str, str], set[str]] = {}

    def file(self, package: str, split: str, sample_id: str) -> Location:
        folder = "train" if split == TUNE_SPLIT else split  # the tune split's frames are training-city frames
        return self.root.child(package, folder, sample_id.split("_")[0], sample_id + SUFFIX[package])

    def _listing(self, package: str, split: str) -> set[str]:
        if (package, split) not in self._listed:
            self._listed[package, split] = set(self.root.child(package, split).listing())
        return self._listed[package, split]

    def has(self, package: str, split: str, sample_id: str) -> bool:
        return f"{sample_id.split('_')[0]}/{sample_id}{SUFFIX[package]}" in self._listing(package, split)

    def ids(self, package: str, split: str) -> list[str]:
        return sorted(rel.split("/")[-1][: -len(SUFFIX[package])] for rel in self._listing(package, split)
                      if rel.endswith(SUFFIX[package]))


def _sample_files(sample_id: str) -> dict[str, tuple[str, str]]:
    """What an annotated sample reads: {role: (package, id)}."""
    city, seq, frame = sample_id.split("_")
    return {"prev": ("leftImg8bit_sequence", frame_id(city, seq, int(frame) - 1)), "image": ("leftImg8bit", sample_id),
            "next": ("leftImg8bit_sequence", frame_id(city, seq, int(frame) + 1)), "label": ("gtFine", sample_id),
            "camera": ("camera", sample_id)}


def find_samples(tree: Tree, tune_cities: tuple[str, ...] = (), strict: bool = False) -> list[tuple[str, str]]:
    """(split, id) of every annotated image, after checking that every file a sample needs exists; the training
    frames of ``tune_cities`` have the split ``tune`` (``strict``: each city must have some)."""
    if not tree.root.is_dir():
        raise SegSDEError(f"Cityscapes root {tree.root} does not exist: pass the folder that holds leftImg8bit/ and gtFine/")
    for folder, package in PACKAGES.items():
        if not tree.root.child(folder).is_dir():
            raise SegSDEError(f"{tree.root.child(folder)} is missing: extract {package} into {tree.root}")
    samples = []
    for split in SPLITS:
        for sample_id in tree.ids("leftImg8bit", split):
            for role, (package, name) in _sample_files(sample_id).items():
                if not tree.has(package, split, name):
                    raise SegSDEError(f"missing {role} file {tree.file(package, split, name)} for sample {sample_id}: "
                                      f"extract {PACKAGES[package]} into {tree.root}")
            samples.append((TUNE_SPLIT if split == "train" and sample_id.split("_")[0] in tune_cities else split, sample_id))
    if not samples:
        raise SegSDEError(f"no images found under {tree.root.child('leftImg8bit')}/{{train,val}}/<city>/: check --root")
    cities = {sid.split("_")[0] for split, sid in samples if split == TUNE_SPLIT}
    if strict and set(tune_cities) - cities:
        raise SegSDEError(f"--tune-cities {','.join(sorted(set(tune_cities) - cities))} has no training frames under {tree.root}: "
                          f"name training cities (e.g. {','.join(TUNE_CITIES)}), or 'none'")
    if tune_cities and not any(split == "train" for split, _ in samples):
        raise SegSDEError("--tune-cities leaves no training frame: name fewer cities")
    return samples


@dataclass(frozen=True)
class Snippet:
    """The unlabeled triplets of one training snippet: centre frames ``centres``, around annotated frame ``annotated``."""
    city: str
    seq: str
    annotated: int
    centres: tuple[int, ...]

    @property
    def name(self) -> str:
        return frame_id(self.city, self.seq, self.annotated)

    @property
    def frames(self) -> list[int]:
        """The frames its triplets read, each once."""
        return sorted({f + d for f in self.centres for d in (-1, 0, 1)})


def find_snippets(tree: Tree, samples: list[tuple[str, str]], stride: int) -> tuple[list[Snippet], list[dict]]:
    """The training snippets around each annotated frame, every ``stride``-th frame with both neighbours as
    a triplet centre (the annotated frame left out: it is a ``train`` sample), and the snippets skipped for
    a missing frame ({"snippet", "reason"})."""
    snippets, skipped = [], []
    for split, sample_id in samples:
        if split != "train":
            continue
        city, seq, frame = sample_id.split("_")
        first = int(frame) - SNIPPET_BEFORE
        centres = tuple(f for f in range(first + 1, int(frame) + SNIPPET_AFTER, stride) if f != int(frame))
        snippet = Snippet(city, seq, int(frame), centres)
        missing = [f for f in snippet.frames if not tree.has("leftImg8bit_sequence", "train", frame_id(city, seq, f))]
        if missing:
            skipped.append({"snippet": sample_id, "reason": f"frame {frame_id(city, seq, missing[0])} is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")})
        elif centres:
            snippets.append(snippet)
    return snippets, skipped


class CorruptImage(SegSDEError):
    """An image file that is there but does not decode."""


def _open(location: Location, size: tuple[int, int] | None, resample) -> tuple[np.ndarray, tuple[int, int]]:
    """The image at ``location`` resized to ``size`` (H, W), and its native size."""
    try:
        with Image.open(io.BytesIO(location.read_bytes())) as im:
            im.load()
            native = (im.height, im.width)
            if size is not None and native != tuple(size):
                im = im.resize((size[1], size[0]), resample)
            return np.asarray(im), native
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptImage(f"cannot read image {location} ({exc}): the file is corrupt, re-extract it from the Cityscapes archive") from exc


def load_frame(location: Location, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """An RGB frame resized to ``size`` (H, W), and its native size."""
    image, native = _open(location, size, Image.BILINEAR)
    if image.ndim != 3 or image.shape[2] != 3:
        raise CorruptImage(f"{location} is not an RGB image: re-extract leftImg8bit")
    return image, native


def load_train_ids(location: Location, size: tuple[int, int] | None) -> np.ndarray:
    """gtFine labelIds PNG -> trainIds (nearest resize), rejecting ids outside the Cityscapes table."""
    ids, _ = _open(location, size, Image.NEAREST)
    if ids.ndim != 2:
        raise SegSDEError(f"label file {location} is not a single-channel labelIds image: use the *_gtFine_labelIds.png files")
    unknown = sorted(set(np.unique(ids).tolist()) - VALID_LABEL_IDS)
    if unknown:
        raise SegSDEError(f"label file {location} has ids {unknown[:8]} outside the Cityscapes label table: "
                          "use the *_gtFine_labelIds.png files of gtFine_trainvaltest.zip")
    return _LUT[ids]


def load_intrinsics(location: Location) -> np.ndarray:
    try:
        intr = json.loads(location.read_text())["intrinsic"]
        return np.array([[intr["fx"], 0, intr["u0"]], [0, intr["fy"], intr["v0"]], [0, 0, 1]], dtype=np.float64)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SegSDEError(f"camera file {location} has no valid 'intrinsic' block ({exc}): re-extract camera_trainvaltest.zip") from exc


def convert_sample(tree: Tree, size: tuple[int, int], split: str, sample_id: str) -> dict:
    """One annotated dataset row at ``size`` (H, W); intrinsics rescaled from the native resolution."""
    files = {role: tree.file(package, split, name) for role, (package, name) in _sample_files(sample_id).items()}
    (prev, _), (image, native), (nxt, _) = (load_frame(files[role], size) for role in ("prev", "image", "next"))
    K = resize_intrinsics(load_intrinsics(files["camera"]), native, size)
    return {"id": sample_id, "split": split, "frames": [encode_png(f) for f in (prev, image, nxt)],
            "label": encode_png(load_train_ids(files["label"], size)), "K": K.ravel().tolist()}


def convert_snippet(tree: Tree, size: tuple[int, int], snippet: Snippet) -> list[dict]:
    """The snippet's unlabeled rows (split ``sequence``, no label), each frame decoded and encoded once."""
    city, seq = snippet.city, snippet.seq
    png, native = {}, None
    for f in snippet.frames:
        image, native = load_frame(tree.file("leftImg8bit_sequence", "train", frame_id(city, seq, f)), size)
        png[f] = encode_png(image)
    K = resize_intrinsics(load_intrinsics(tree.file("camera", "train", snippet.name)), native, size).ravel().tolist()
    return [{"id": frame_id(city, seq, f), "split": SEQUENCE_SPLIT, "frames": [png[f - 1], png[f], png[f + 1]], "K": K}
            for f in snippet.centres]


@dataclass(frozen=True)
class Task:
    """One shard's work: annotated samples [(split, id)] or one snippet."""
    samples: tuple[tuple[str, str], ...] = ()
    snippet: Snippet | None = None

    @property
    def rows(self) -> int:
        return len(self.snippet.centres) if self.snippet else len(self.samples)

    @property
    def frames(self) -> int:
        """Source images it decodes (labels included)."""
        return len(self.snippet.frames) if self.snippet else 4 * len(self.samples)


def convert_task(root: str, size: tuple[int, int], task: Task) -> tuple[list[dict], list[dict]]:
    """A task's rows and what it skipped: an annotated sample that cannot be read is an error, an unlabeled
    snippet with a frame that does not decode is skipped. A file that planning found and this node cannot is
    an error: the root is not where every node reads it."""
    tree = Tree(root)
    if not tree.root.is_dir():
        import socket

        raise SegSDEError(f"the Cityscapes root {tree.root} is not readable on node {socket.gethostname()}: put it on a path every "
                          "node mounts or under the storage root (s3://...), or convert on one machine")
    if task.snippet is None:
        return [convert_sample(tree, size, split, sid) for split, sid in task.samples], []
    try:
        return convert_snippet(tree, size, task.snippet), []
    except CorruptImage as exc:
        return [], [{"snippet": task.snippet.name, "reason": str(exc).split(": ")[0]}]


def plan(root: Location | str, size: tuple[int, int], sequence_stride: int = 1,
         tune_cities: tuple[str, ...] = TUNE_CITIES, strict: bool = False) -> tuple[list[Task], dict, list[dict]]:
    """The conversion of ``root`` at ``size`` (H, W): its tasks (annotated shards first, then one per snippet),
    the plan's description (what a resumed conversion must match) and the snippets skipped while planning.
    ``sequence_stride`` 0: no sequence split; ``tune_cities`` (): no tune split; ``strict``: each must be in the tree
    (the default's are used where present, so that a partial tree converts)."""
    tree = Tree(root)
    samples = find_samples(tree, tuple(tune_cities), strict)
    tasks = [Task(samples=tuple(samples[i: i + SHARD_SIZE])) for i in range(0, len(samples), SHARD_SIZE)]
    snippets, skipped = find_snippets(tree, samples, sequence_stride) if sequence_stride > 0 else ([], [])
    tasks += [Task(snippet=s) for s in snippets]
    listing = hashlib.sha256(repr([(t.samples, t.snippet) for t in tasks]).encode()).hexdigest()[:16]
    description = {"source": "cityscapes", "root": str(tree.root), "size": list(size), "sequence_stride": sequence_stride,
                   "tune_cities": sorted(tune_cities), "tasks": len(tasks), "task_list": listing}
    return tasks, description, skipped


def native_label(root: str, split: str, sample_id: str) -> np.ndarray:
    """The full-resolution (2048x1024) trainIds of a sample, for the official evaluation protocol."""
    location = Tree(root).file("gtFine", split, sample_id)
    if not location.is_file():
        raise SegSDEError(f"{location} is missing, which the full-resolution evaluation needs: keep the Cityscapes tree the "
                          "dataset was built from at its recorded root, or set eval_full_resolution: false")
    return load_train_ids(location, None)
