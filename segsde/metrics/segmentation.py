"""Dataset-level segmentation metrics from one confusion matrix (never averaged per image or batch)."""

from __future__ import annotations

import torch

from segsde.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_classes: int = NUM_CLASSES,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """pred, gt [...] class ids -> C [num_classes, num_classes] int64, C[g, p] = #pixels of class g
    predicted as p; pixels whose ground truth is ``ignore_index`` (or outside the classes) are skipped."""
    gt, pred = gt.reshape(-1).long(), pred.reshape(-1).long()
    valid = (gt >= 0) & (gt < num_classes) & (gt != ignore_index)
    flat = gt[valid] * num_classes + pred[valid]
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(conf: torch.Tensor) -> dict:
    """Per-class IoU, mIoU and pixel accuracy of a confusion matrix.

    IoU_c = C_cc / (row_c + col_c - C_cc). A class absent from both the ground truth and the predictions
    gets NaN and stays out of the mean; one that is predicted but absent from the ground truth scores 0
    (METHOD.md 5.2), so predicting a class that is not there costs mIoU. ``present``: in the ground truth.
    """
    conf = conf.double()
    tp = conf.diag()
    gt_count, pred_count = conf.sum(1), conf.sum(0)
    union = gt_count + pred_count - tp
    scored = union > 0
    iou = torch.where(scored, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = conf.sum()
    return {"miou": float(iou[scored].mean()) if scored.any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
            "iou": iou.tolist(), "present": (gt_count > 0).tolist()}


def iou_table(result: dict, names: tuple[str, ...] = CLASS_NAMES) -> dict[str, list]:
    """Column-wise class table (for ``mlflow.log_table``): class, IoU in %, present in the ground truth."""
    return {"class": list(names), "iou": [round(100 * v, 2) if v == v else None for v in result["iou"]],
            "present": list(result["present"])}


def encode_confusions(conf: torch.Tensor) -> dict:
    """Per-image confusion matrices [N, K, K] -> a compact JSON-able form (the non-zero cells only), from which
    the report's jackknife over validation images leaves images out."""
    flat = conf.reshape(-1)
    index = flat.nonzero().flatten()
    return {"shape": list(conf.shape), "index": index.tolist(), "count": flat[index].tolist()}


def decode_confusions(encoded: dict):
    """The inverse of ``encode_confusions``, as an int64 numpy array [N, K, K]."""
    import numpy as np

    flat = np.zeros(int(np.prod(encoded["shape"])), dtype=np.int64)
    flat[np.asarray(encoded["index"], dtype=np.int64)] = encoded["count"]
    return flat.reshape(encoded["shape"])
