"""Figures a person would rather look at than read: example predictions and one mixing example."""

from __future__ import annotations

import torch

from segsde.data.labels import CLASS_COLORS, CLASS_NAMES, NUM_CLASSES, colorize


def _figure(rows: list[list[tuple[str, object, dict]]], title: str, classes: set[int] = frozenset()):
    """Panels in rows (an empty row slot stays blank), and below them a legend of ``classes``' colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    columns = max(len(r) for r in rows)
    legend_rows = -(-len(classes) // 6)
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns, 2.0 * len(rows) + 0.5 + 0.3 * legend_rows), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for k, ax in enumerate(ax_row):
            ax.axis("off")
            if k < len(row):
                name, img, kw = row[k]
                ax.imshow(img, **kw)
                ax.set_title(name, fontsize=10)
    if classes:
        handles = [Patch(color=[c / 255 for c in CLASS_COLORS[k]], label=CLASS_NAMES[k]) for k in sorted(classes)]
        fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.3 * legend_rows / (2.0 * len(rows) + 0.5 + 0.3 * legend_rows), 1, 1))
    return fig


def _rgb(image: torch.Tensor):
    return image.float().permute(1, 2, 0).clamp(0, 1).numpy()


def _labels(labels: torch.Tensor):
    return colorize(labels.to(torch.uint8).numpy())


def _present(*maps: torch.Tensor) -> set[int]:
    return {int(k) for m in maps for k in m.unique() if 0 <= int(k) < NUM_CLASSES}


def prediction_figure(examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], step: int):
    """examples: (image [3, H, W], ground truth [H, W], prediction [H, W]); the legend names the classes shown."""
    rows = [[("image", _rgb(img), {}), ("ground truth", _labels(gt), {}), ("prediction", _labels(pred), {})]
            for img, gt, pred in examples]
    classes = _present(*(m for _, gt, pred in examples for m in (gt, pred)))
    return _figure(rows, f"validation predictions (student), step {step}", classes)


def mixing_figure(example: dict, step: int, mode: str):
    """The images mixed, the mask, the mixed image and its pseudo-label, in two rows of three."""
    rows = [[("image i", _rgb(example["image_i"]), {}), ("image j (partner)", _rgb(example["image_j"]), {}),
             ("mask (white: keep i)", example["mask"].float().numpy(), {"cmap": "gray", "vmin": 0, "vmax": 1})],
            [("mixed, strong augmentation", _rgb(example["mixed"]), {}), ("mixed pseudo-label", _labels(example["label"]), {})]]
    return _figure(rows, f"{mode} mixing example, step {step}", _present(example["label"]))
