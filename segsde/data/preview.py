"""A picture of a dataset: image, label and depth of a few samples side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from segsde.data.dataset import SegSDEDataset  # noqa: E402
from segsde.data.labels import colorize  # noqa: E402


def preview_figure(root: Path, n: int = 3, split: str = "train"):
    ds = SegSDEDataset(root, split=split)
    n = min(n, len(ds))
    has_depth = "depth" in ds[0]
    cols = 3 if has_depth else 2
    fig, axes = plt.subplots(n, cols, figsize=(3.2 * cols, 1.75 * n), squeeze=False)
    for row in range(n):
        item = ds[row]
        panels = [("image", item["image"].permute(1, 2, 0).numpy()), ("label", colorize(item["label"].numpy().astype(np.uint8)))]
        if has_depth:
            depth = item["depth"].numpy()
            inv = np.where(depth > 0, 1.0 / np.maximum(depth, 1e-3), 0)
            panels.append(("depth (inverse)", inv / max(np.percentile(inv[depth > 0], 99), 1e-6) if (depth > 0).any() else inv))
        for ax, (title, img) in zip(axes[row], panels):
            ax.imshow(img, cmap="magma" if img.ndim == 2 else None, vmin=0, vmax=1 if img.ndim == 2 else None)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout(pad=0.2)
    return fig


def save_preview(root: Path, out: Path, n: int = 3) -> Path:
    fig = preview_figure(root, n)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from segsde.data.store import atomic_savefig

    atomic_savefig(fig, out, dpi=100)
    plt.close(fig)
    return out
