"""The pieces of data selection that run inside its Ray Train job (1 CPU or N GPUs with DDP).

``compute_features``: the SDE teacher's layer-6 features of every candidate, pooled to a small grid.
``train_round`` and ``score_candidates``: one round's model, trained from scratch on the selected images,
then the score of every remaining candidate: a depth student regressing the teacher's disparity (score:
difficulty E) or, for the entropy baseline, a supervised segmentation net (score: mean pixel entropy).

Each rank handles every world-th candidate and rank 0 gathers the results. Training draws are seeded by
(seed, rank, step), so a round resumed from a checkpoint trains exactly as an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segsde.data.dataset import PSEUDO_DEPTH, Augment, SegSDEDataset
from segsde.data.labels import IGNORE_INDEX
from segsde.models.decoder import UNetDecoder
from segsde.models.encoder import ResNetEncoder
from segsde.runtime import autocast, batch_indices, evaluation_mode, place, progress, stream_seed
from segsde.selection.config import SelectionConfig
from segsde.selection.scores import berhu_loss, bottom_rows_mask, difficulty, mean_entropy


class DepthStudent(nn.Module):
    """ResNet encoder + batch-normalised U-Net decoder with one sigmoid disparity head at full resolution:
    [B, 3, H, W] -> [B, 1, H, W]."""

    def __init__(self, cfg: SelectionConfig):
        super().__init__()
        self.encoder = ResNetEncoder(cfg.student_encoder, cfg.student_weights, cfg.student_output_stride)
        self.decoder = UNetDecoder(self.encoder.channels, tuple(cfg.student_decoder_channels), disparity_scales=1, norm=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(image), size=image.shape[-2:])[0]


def round_network(kind: str, cfg: SelectionConfig) -> nn.Module:
    if kind == "student":
        return DepthStudent(cfg)
    from segsde.trainer.config import TrainConfig
    from segsde.trainer.model import SegmentationNet

    return SegmentationNet(TrainConfig(encoder=cfg.student_encoder, output_stride=cfg.student_output_stride,
                                       weights=cfg.student_weights, decoder_channels=cfg.student_decoder_channels))


@torch.no_grad()
def layer6_features(model, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, 3, H, W] -> [B, C, *grid]: the SDE decoder's stage-3 output (1/8 of the network's input
    resolution) average-pooled; the images are resized to the size the SDE network trained at."""
    from segsde.sde.export import network_input, pad_to_multiple

    images = network_input(model, images)
    H, W = images.shape[-2:]
    maps = model.encoder(pad_to_multiple(images))
    layer6 = model.decoder.run_stages(maps, range(4, 2, -1))[3]
    layer6 = layer6[..., : -(-H // 8), : -(-W // 8)]
    return F.adaptive_avg_pool2d(layer6.float(), grid)


def _gather(worker, values: dict) -> dict:
    """Rank 0 gets the union of every rank's {id: value}; the others get {}."""
    if worker.world == 1:
        return values
    parts = [None] * worker.world
    torch.distributed.all_gather_object(parts, values)
    return {k: v for part in parts for k, v in part.items()} if worker.is_main else {}


def broadcast(worker, value):
    """Rank 0's ``value`` on every rank."""
    if worker.world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, 0)
    return box[0]


def compute_features(cfg: SelectionConfig, data: str, ids: list[str], sde_model: str, worker) -> torch.Tensor | None:
    """[N, C * grid] raw layer-6 features of ``ids`` in that order on rank 0 (None on the other ranks)."""
    from segsde.sde.export import load_sde_model

    model = load_sde_model(Path(sde_model), worker.device)
    dataset = SegSDEDataset(data, "train", ids=ids, cache_mb=0)
    mine = list(range(worker.rank, len(dataset), worker.world))
    values, t0 = {}, time.perf_counter()
    for i in range(0, len(mine), cfg.feature_batch):
        items = [dataset[j] for j in mine[i: i + cfg.feature_batch]]
        images = torch.stack([it["image"] for it in items]).to(worker.device)
        with autocast(worker.device, cfg.precision):
            feats = layer6_features(model, images, tuple(cfg.grid)).cpu()
        values.update({it["id"]: f for it, f in zip(items, feats)})
        if worker.is_main and (i // cfg.feature_batch) % 10 == 0:
            rate = len(values) / (time.perf_counter() - t0)
            progress(f"[select] features {len(values) * worker.world}/{len(dataset)} ({rate:.1f} img/s per rank)")
    values = _gather(worker, values)
    return torch.stack([values[i] for i in ids]) if worker.is_main else None


def _batch(dataset: SegSDEDataset, cfg: SelectionConfig, step: int, worker) -> dict:
    torch.manual_seed(stream_seed("select/augment", cfg.seed, worker.rank, step))
    idx = batch_indices(len(dataset), step, cfg.student_batch, worker.rank, worker.world, stream_seed("select/order", cfg.seed))
    items = [dataset[i] for i in idx]
    keys = ("image", "label") + ((PSEUDO_DEPTH,) if PSEUDO_DEPTH in items[0] else ())
    return {k: torch.stack([it[k] for it in items]).to(worker.device) for k in keys}


def _loss(kind: str, net, batch: dict, cfg: SelectionConfig) -> torch.Tensor:
    if kind == "student":
        pred, target = net(batch["image"]).float(), batch[PSEUDO_DEPTH][:, None]
        return berhu_loss(pred, target, bottom_rows_mask(pred.shape, cfg.train_bottom_mask, pred.device), cfg.berhu_threshold)
    return F.cross_entropy(net(batch["image"])["logits"].float(), batch["label"], ignore_index=IGNORE_INDEX)


@torch.no_grad()
def _score(kind: str, model, dataset: SegSDEDataset, cfg: SelectionConfig, worker) -> dict[str, float]:
    mine = list(range(worker.rank, len(dataset), worker.world))
    values = {}
    with evaluation_mode(model, worker):
        for i in range(0, len(mine), cfg.score_batch):
            items = [dataset[j] for j in mine[i: i + cfg.score_batch]]
            images = torch.stack([it["image"] for it in items]).to(worker.device)
            if kind == "student":
                teacher = torch.stack([it[PSEUDO_DEPTH] for it in items])[:, None].to(worker.device)
                s = difficulty(model(images).float(), teacher, cfg.far_disparity, cfg.far_dilation, cfg.ego_bottom_mask)
            else:
                s = mean_entropy(model(images)["logits"])
            values.update({it["id"]: float(v) for it, v in zip(items, s)})
    return values


def train_round(kind: str, cfg: SelectionConfig, data: str, selected: list[str], steps: int, worker,
                resume: dict | None = None, checkpoint=None) -> nn.Module:
    """A round's model (student | segmentation) built from ``cfg.seed`` and trained ``steps`` steps on
    ``selected``; ``resume`` (model, optimizer, step) continues a round stopped mid-way, and
    ``checkpoint(state)`` receives that state every ``checkpoint_interval`` steps."""
    torch.manual_seed(stream_seed(f"select/{kind}", cfg.seed))
    model = place(round_network(kind, cfg), worker.device, cfg.precision, cfg.student_batch)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.student_lr, fused=True)  # one kernel, not several per tensor
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimiser.load_state_dict(resume["optimizer"])
        start = resume["step"]
    net = model
    if worker.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[worker.device.index] if worker.device.type == "cuda" else None)
    train_set = SegSDEDataset(data, "train", ids=selected, augment=Augment(cfg.resize, cfg.crop, random=True), pseudo_depth=cfg.pseudo_depth)
    model.train()
    t0, running = time.perf_counter(), 0.0
    for step in range(start, steps):
        for group in optimiser.param_groups:
            group["lr"] = cfg.student_lr * (1 - step / steps) ** 0.9
        batch = _batch(train_set, cfg, step, worker)
        with autocast(worker.device, cfg.precision):
            loss = _loss(kind, net, batch, cfg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the selection {kind}'s loss is {loss.item()} at step {step}: lower student_lr")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        running += float(loss.detach())
        done = step + 1
        if worker.is_main and (done % cfg.log_interval == 0 or done == steps):
            progress(f"[select] {kind} step {done}/{steps} loss {running / (done - start):.4f} "
                     f"{(done - start) / (time.perf_counter() - t0):.2f} steps/s")
        if checkpoint is not None and done % cfg.checkpoint_interval == 0 and done < steps:
            checkpoint({"model": model.state_dict(), "optimizer": optimiser.state_dict(), "step": done})
    return model


def score_candidates(kind: str, model: nn.Module, cfg: SelectionConfig, data: str, candidates: list[str], worker) -> dict[str, float]:
    """{id: score} of every candidate on rank 0 ({} on the other ranks)."""
    dataset = SegSDEDataset(data, "train", ids=candidates, augment=Augment(cfg.resize, None, random=False), cache_mb=0,
                            pseudo_depth=cfg.pseudo_depth)
    return _gather(worker, _score(kind, model, dataset, cfg, worker))
