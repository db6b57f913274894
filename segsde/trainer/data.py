"""The labeled set of a trial, its unlabeled/mix pool, and per-step batches.

The labeled set is a prefix of an ordered id list: a seeded permutation of the training split (``random``)
or a selection list (``selection``), so every budget is a prefix of every larger one. Batches are computed
from (seed, replicate, rank, step) alone, so a resumed trial sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from segsde.data.dataset import PSEUDO_DEPTH, Augment, SegSDEDataset, class_pixels
from segsde.data.labels import IGNORE_INDEX
from segsde.data.splits import check_ids, random_order, read_order, take_budget
from segsde.data.store import SEQUENCE_SPLIT, split_ids, video_splits
from segsde.errors import SegSDEError
from segsde.runtime import batch_indices, stream_seed
from segsde.trainer.config import TrainConfig


def train_ids(data: Path) -> list[str]:
    return split_ids(data, "train")


def labeled_ids(data: Path, cfg: TrainConfig, selection_file: Path | None = None) -> list[str]:
    """The first ``cfg.budget`` ids of the trial's ordered list (``labeled: all``: every training id)."""
    pool = train_ids(data)
    if cfg.labeled == "all":  # the fully supervised upper bound, whatever the budget
        return random_order(pool, cfg.seed)
    if cfg.labeled == "random":
        order = random_order(pool, cfg.seed)
    else:
        if selection_file is None:
            raise SegSDEError(f"this row labels a prefix of the '{cfg.selection}' selection list: pass it with --selection FILE "
                              "(written by `segsde select`, or any ordered id list)")
        order = read_order(selection_file)
        check_ids(order, pool, f"selection list {selection_file}")
    return take_budget(order, cfg.budget)


def selection_activity(data: Path, cfg: TrainConfig, labeled: list[str]) -> dict[str, float]:
    """What a selection row's labels did differently from random's at the same budget and seed: the share of its
    labeled images that random labels too (1: the selection acted as random), and the share of the 19 classes that
    each set's labels contain."""
    random = take_budget(random_order(train_ids(data), cfg.seed), cfg.budget)
    activity = {"random_overlap": len(set(labeled) & set(random)) / max(len(labeled), 1)}
    union = sorted(set(labeled) | set(random))
    counts = class_pixels(data, union)
    if counts is not None:
        row = {sid: k for k, sid in enumerate(union)}
        def coverage(ids):
            return float((counts[[row[i] for i in ids]].sum(0) > 0).mean())

        activity.update(class_coverage=coverage(labeled), random_class_coverage=coverage(random))
    return activity


def pool_splits(data: Path, cfg: TrainConfig) -> tuple[str, ...]:
    """Where the pool comes from: the training split, and for a multi-task trial the unlabeled video split
    (the original's multi-task runs read the sequences as their unlabeled data)."""
    return video_splits(data, cfg.multitask and cfg.pool_sequences)


def mix_pool(data: Path, cfg: TrainConfig, labeled: list[str]) -> list[str]:
    """Images the teacher pseudo-labels (and the multi-task SDE loss sees): the unlabeled rest of the
    training split, or all of it (``all_with_gt``: labeled members bring their ground truth), then for a
    multi-task trial the video split's triplets."""
    chosen = set(labeled)
    rest = [i for i in train_ids(data) if i not in chosen]
    pool = rest if cfg.mix_pool == "unlabeled" else sorted(set(rest) | chosen)
    if SEQUENCE_SPLIT in pool_splits(data, cfg):
        pool += split_ids(data, SEQUENCE_SPLIT)
    if not pool:
        raise SegSDEError(f"budget {cfg.budget} labels the whole training split, so no unlabeled image is left: "
                          "lower the budget or set mix_pool: all_with_gt")
    return pool


class TrialBatches(torch.utils.data.Dataset):
    """Item k = the batches of step ``start + k`` for one rank: ``labeled`` (image, label, and frames + K
    for the multi-task SDE loss) and, with a teacher or the multi-task loss, ``pool`` (the same, plus
    ``is_labeled``, the depth map DepthMix needs, and labels only for labeled members)."""

    def __init__(self, data: Path, cfg: TrainConfig, labeled: list[str], pool: list[str] | None,
                 start: int, rank: int, world: int, pseudo_depth: str = PSEUDO_DEPTH):
        augment = Augment(cfg.resize, cfg.crop, random=True)
        self.labeled = SegSDEDataset(data, "train", ids=labeled, augment=augment, sequence=cfg.multitask)
        self.pool = SegSDEDataset(data, pool_splits(data, cfg), ids=pool, augment=augment, sequence=cfg.multitask,
                                  pseudo_depth=pseudo_depth) if pool else None
        self.labeled_set = set(labeled)
        self.cfg, self.start, self.rank, self.world = cfg, start, rank, world
        self.depth_key = {"sde": PSEUDO_DEPTH, "ground_truth": "depth"}.get(cfg.depth_source) if cfg.mix == "depth" else None
        if self.pool is not None and self.depth_key == PSEUDO_DEPTH and self.pool.pseudo_depth is None:
            raise SegSDEError(f"depth_source 'sde' needs the SDE pseudo-depth in {data}: run `segsde sde export --checkpoint "
                              "MODEL --data DIR` first (or choose another depth_source)")

    def __len__(self) -> int:
        return self.cfg.steps - self.start

    def _stack(self, items: list[dict], keys: tuple[str, ...]) -> dict:
        return {k: torch.stack([it[k] for it in items]) for k in keys}

    def __getitem__(self, k: int) -> dict:
        step, cfg = self.start + k, self.cfg
        torch.manual_seed(stream_seed("trainer/augment", cfg.seed, cfg.replicate, self.rank, step))  # crops and flips
        keys = ("image", "label") + (("frames", "K") if cfg.multitask else ())
        order = stream_seed("trainer/labeled", cfg.seed, cfg.replicate)
        idx = batch_indices(len(self.labeled), step, cfg.batch_labeled, self.rank, self.world, order)
        out = {"step": step, "labeled": self._stack([self.labeled[i] for i in idx], keys)}
        if self.pool is not None:
            order = stream_seed("trainer/pool", cfg.seed, cfg.replicate)
            idx = batch_indices(len(self.pool), step, cfg.batch_unlabeled, self.rank, self.world, order)
            items = [self.pool[i] for i in idx]
            if self.depth_key is not None:
                if any(self.depth_key not in it for it in items):
                    raise SegSDEError(f"depth_source '{cfg.depth_source}' needs '{self.depth_key}' for every pool image, "
                                      f"and {items[0]['id']} or another has none: choose another depth_source")
                keys = keys + (self.depth_key,)
            pool = self._stack(items, keys)
            pool["is_labeled"] = torch.tensor([it["id"] in self.labeled_set for it in items])
            # an unlabeled member's label never reaches the step: the testbed has them, real pools do not
            pool["label"][~pool["is_labeled"]] = IGNORE_INDEX
            if self.depth_key is not None:
                pool["depth_map"] = pool.pop(self.depth_key)
            out["pool"] = pool
        return out
