"""The 19 Cityscapes training classes, taken from cityscapesscripts (never retyped here)."""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE_INDEX = 255
NUM_CLASSES = 19

_TRAIN_LABELS = sorted((lb for lb in _CS_LABELS if 0 <= lb.trainId < NUM_CLASSES), key=lambda lb: lb.trainId)
CLASS_NAMES: tuple[str, ...] = tuple(lb.name for lb in _TRAIN_LABELS)
TRAIN_ID = {name: i for i, name in enumerate(CLASS_NAMES)}
#: RGB colour of each trainId, uint8 [19, 3]
CLASS_COLORS = np.array([lb.color for lb in _TRAIN_LABELS], dtype=np.uint8)
#: every labelId the Cityscapes table defines (``-1`` is "license plate", unused in label PNGs)
VALID_LABEL_IDS = frozenset(lb.id for lb in _CS_LABELS if lb.id >= 0)


def label_id_to_train_id_lut() -> np.ndarray:
    """uint8 [256] lookup: Cityscapes labelId -> trainId (255 for ignored and undefined ids)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for lb in _CS_LABELS:
        if lb.id >= 0 and 0 <= lb.trainId < NUM_CLASSES:
            lut[lb.id] = lb.trainId
    return lut


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """[H, W] trainIds -> [H, W, 3] uint8 Cityscapes colours (ignore is black)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:NUM_CLASSES] = CLASS_COLORS
    return palette[train_ids]
