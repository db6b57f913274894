"""Pseudo-depth export: the trained SDE network's disparity for every sample, stored as a side column of
the dataset (``side/pseudo_depth.parquet``), which DepthMix and data selection read."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segsde.data.dataset import PSEUDO_DEPTH, SegSDEDataset
from segsde.data.store import SEQUENCE_SPLIT, encode_unit_png, read_manifest, write_side_column
from segsde.errors import SegSDEError
from segsde.sde.config import SDEConfig
from segsde.sde.model import SDEModel
from segsde.ssl.mixing import normalised_disparity


def load_sde_model(path: Path, device: str | torch.device = "cpu") -> SDEModel:
    """An :class:`SDEModel` in eval mode from a ``model.pt`` written by the SDE stage."""
    path = Path(path)
    if not path.is_file():
        raise SegSDEError(f"SDE model {path} does not exist: train one with `segsde sde --data DIR --out DIR` (it writes DIR/model.pt)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        cfg = SDEConfig.from_dict({**saved["config"], "weights": None}, where=f"the config stored in {path}")
    except SegSDEError:
        raise
    except Exception as exc:
        raise SegSDEError(f"{path} is not an SDE model file ({type(exc).__name__}): pass the model.pt the SDE stage wrote") from exc
    model = SDEModel(cfg)
    try:
        model.load_state_dict(saved["model"], strict=False)
    except RuntimeError as exc:
        raise SegSDEError(f"{path} does not fit the network its config describes ({str(exc).splitlines()[0]}): retrain it with this segsde") from exc
    return model.eval().to(device)


def pad_to_multiple(images: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """[B, 3, H, W] reflection-padded at the bottom and right to sides divisible by ``multiple``."""
    H, W = images.shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    return F.pad(images, (0, pw, 0, ph), mode="reflect") if ph or pw else images


def network_input(model: SDEModel, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> the images at the size the network trained at (its config's ``resize``, if any):
    a depth network run at another image scale sees every object at another size and misjudges depth."""
    size = model.cfg.resize
    if size is None or tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def disparity_map(model: SDEModel, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] of any size -> sigmoid disparity [B, H, W], predicted at the network's training size
    (reflection-padded to a multiple of 32) and resized back to (H, W)."""
    H, W = images.shape[-2:]
    x = network_input(model, images)
    h, w = x.shape[-2:]
    disp = model.disparity(pad_to_multiple(x))[0][:, :, :h, :w].float()
    return (disp if (h, w) == (H, W) else F.interpolate(disp, size=(H, W), mode="bilinear", align_corners=False))[:, 0]


def export_pseudo_depth(checkpoint: Path, data: Path, batch: int = 8, device: str | None = None, log=sys.stderr,
                        source: str | None = None, column: str = PSEUDO_DEPTH) -> dict:
    """Write the pseudo-depth side ``column`` into the local dataset ``data``; ``source`` names the model in its
    metadata (default: the checkpoint's absolute path), which the export stage compares with its input."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_sde_model(checkpoint, device)
    # what DepthMix and the selection read: the annotated splits, not the video split (a multi-task trial's
    # DepthMix takes its depth from its own student)
    dataset = SegSDEDataset(data, [s for s in read_manifest(data)["splits"] if s != SEQUENCE_SPLIT])
    values, start = {}, time.perf_counter()
    for i in range(0, len(dataset), batch):
        items = [dataset[j] for j in range(i, min(i + batch, len(dataset)))]
        disp = normalised_disparity(disparity_map(model, torch.stack([it["image"] for it in items]).to(device))).cpu().numpy()
        for it, d in zip(items, disp):
            values[it["id"]] = encode_unit_png(d.astype(np.float64))
        print(f"[export] {len(values)}/{len(dataset)} images ({len(values) / (time.perf_counter() - start):.1f}/s)", file=log, flush=True)
    path = write_side_column(data, column, values, checkpoint=source or str(Path(checkpoint).absolute()),
                             encoding="16-bit PNG of per-image min-max normalised sigmoid disparity (1 = nearest)")
    return {"out": str(path), "images": len(values)}
