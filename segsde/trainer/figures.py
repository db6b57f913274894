"""Figures a person would rather look at than read: example predictions and one mixing example."""

from __future__ import annotations

import torch

from segsde.data.labels import colorize


def _figure(rows: list[list[tuple[str, object, dict]]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(3 * len(rows[0]), 1.7 * len(rows) + 0.4), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax, (name, img, kw) in zip(ax_row, row):
            ax.imshow(img, **kw)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _rgb(image: torch.Tensor):
    return image.float().permute(1, 2, 0).clamp(0, 1).numpy()


def _labels(labels: torch.Tensor):
    return colorize(labels.to(torch.uint8).numpy())


def prediction_figure(examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], step: int):
    """examples: (image [3, H, W], ground truth [H, W], prediction [H, W])."""
    rows = [[("image", _rgb(img), {}), ("ground truth", _labels(gt), {}), ("prediction", _labels(pred), {})]
            for img, gt, pred in examples]
    return _figure(rows, f"validation predictions (student), step {step}")


def mixing_figure(example: dict, step: int, mode: str):
    row = [("image i", _rgb(example["image_i"]), {}), ("image j (partner)", _rgb(example["image_j"]), {}),
           ("mask (keep i)", example["mask"].float().numpy(), {"cmap": "gray", "vmin": 0, "vmax": 1}),
           ("mixed, strong aug", _rgb(example["mixed"]), {}), ("mixed pseudo-label", _labels(example["label"]), {})]
    return _figure([row], f"{mode} mixing example, step {step}")
