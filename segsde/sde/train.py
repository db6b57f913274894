"""SDE pre-training as a Ray Train worker function: the same code on 1 CPU or N GPUs with DDP.

Phase 1 trains the decoder and the pose net with a frozen encoder (the paper's ImageNet encoder); phase 2
fine-tunes everything, with the ImageNet feature distance when ImageNet weights are used. Every
``checkpoint_interval`` steps rank 0 writes model + optimiser + step; every ``val_interval`` steps all ranks
evaluate their share of the validation split and all-reduce the error sums. Random draws are seeded per
step, so a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from segsde.data.dataset import Augment, SegSDEDataset, validation_split
from segsde.data.store import local_dataset, video_splits
from segsde.metrics.depth import METRICS, depth_error_sums, summarise
from segsde.progress import post
from segsde.runtime import autocast, batch_indices, evaluation_mode, place, progress, report, resume_state, start_worker, stream_seed, worker_tags
from segsde.sde.config import SDEConfig
from segsde.sde.export import disparity_map
from segsde.sde.geometry import disp_to_depth
from segsde.sde.model import SDEModel


class StepBatches(torch.utils.data.Dataset):
    """Item k = the whole batch of step ``start + k`` for one rank: frames, K and the step's colour-jitter
    draw (applied by ``network_frames`` where the batch trains: on a GPU, colour jitter in a CPU loader
    cost 6x the network step). Computing a batch from its step alone keeps the data identical whatever the
    loader worker count. With ``cfg.oracle`` the item also holds ``truth``: the samples' ground-truth poses or
    depth."""

    def __init__(self, data: str, cfg: SDEConfig, start: int, rank: int, world: int):
        self.dataset = SegSDEDataset(data, video_splits(Path(data), cfg.sequences), augment=Augment(cfg.resize, cfg.crop, random=True),
                                     sequence=True)
        self.cfg, self.start, self.rank, self.world = cfg, start, rank, world
        self.jitter = colour_jitter(cfg)

    def __len__(self) -> int:
        return self.cfg.total_steps - self.start

    def split_counts(self) -> dict[str, int]:
        return self.dataset.split_counts()

    def __getitem__(self, k: int) -> dict:
        step, cfg = self.start + k, self.cfg
        torch.manual_seed(stream_seed("sde/augment", cfg.seed, self.rank, step))
        order = stream_seed("sde/order", cfg.seed)
        items = [self.dataset[i] for i in batch_indices(len(self.dataset), step, cfg.batch_size, self.rank, self.world, order)]
        frames, K = torch.stack([it["frames"] for it in items]), torch.stack([it["K"] for it in items])
        batch = {"step": step, "frames": frames, "K": K, "jitter": self.jitter.forward_parameters(frames[:, 1].shape)}
        if cfg.oracle != "none":
            batch["truth"] = {cfg.oracle: torch.stack([it[cfg.oracle] for it in items])}
        return batch


def colour_jitter(cfg: SDEConfig):
    from kornia.augmentation import ColorJitter

    return ColorJitter(0.2, 0.2, 0.2, 0.1, p=cfg.color_jitter)


def network_frames(jitter, frames: torch.Tensor, params: dict) -> torch.Tensor:
    """frames [B, 3, 3, H, W] in [0, 1] -> the depth and pose nets' input [B, 3, 3, H, W]: each sample's
    three frames with one colour-jitter draw (``params``, from ``jitter.forward_parameters``), on
    frames' device; the photometric loss keeps the unjittered frames."""
    params = {k: v.to(frames.device) if torch.is_tensor(v) else v for k, v in params.items()}
    return torch.stack([jitter(frames[:, f], params=params) for f in range(3)], 1)


def validation_set(data: str, cfg: SDEConfig) -> SegSDEDataset:
    """The validation split at its stored resolution: predictions are resized to the ground truth's size,
    not the ground truth to the network's (monodepth2's protocol)."""
    return validation_split(data, None, cfg.val_images)


@torch.no_grad()
def predict_depth(model: SDEModel, images: torch.Tensor, cfg: SDEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, H, W] -> (sigmoid disparity [B, H, W], depth [B, H, W]) at scale 0, predicted at the
    network's training size and resized to (H, W)."""
    sigmoid = disparity_map(model, images)
    return sigmoid, disp_to_depth(sigmoid, cfg.min_depth, cfg.max_depth)[1]


@torch.no_grad()
def validate(model: SDEModel, val_set: SegSDEDataset, cfg: SDEConfig, worker, batch: int = 8) -> tuple[dict, list]:
    """Median-scaled depth metrics over the whole validation set (each rank takes every world-th image,
    no padding, sums all-reduced); also rank 0's first three (image, disparity, gt) for a figure."""
    sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=worker.device)
    mine = list(range(worker.rank, len(val_set), worker.world))
    examples = []
    with evaluation_mode(model, worker):
        for i in range(0, len(mine), batch):
            items = [val_set[j] for j in mine[i : i + batch]]
            images = torch.stack([it["image"] for it in items]).to(worker.device)
            # sources without ground-truth depth (Cityscapes) count no valid pixel: the metrics stay NaN
            gt = torch.stack([it.get("depth", torch.zeros(it["image"].shape[-2:])) for it in items]).to(worker.device)
            with autocast(worker.device, cfg.precision):
                sigmoid, depth = predict_depth(model, images, cfg)
            sums += depth_error_sums(depth, gt, 1e-3, cfg.eval_max_depth)
            if len(examples) < 3:
                examples += [(images[k].cpu(), sigmoid[k].cpu(), gt[k].cpu()) for k in range(min(3 - len(examples), len(items)))]
    if worker.world > 1:
        torch.distributed.all_reduce(sums)
    return summarise(sums.cpu()), examples


def disparity_figure(examples: list, step: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 1.6 * len(examples) + 0.4), squeeze=False)
    for row, (image, sigmoid, gt) in zip(axes, examples):
        inv = torch.where(gt > 0, 1 / gt.clamp(min=1e-3), torch.zeros_like(gt))
        for ax, (title, img, kw) in zip(row, [("image", image.permute(1, 2, 0), {}), ("predicted disparity", sigmoid, {"cmap": "magma"}),
                                              ("ground-truth inverse depth", inv, {"cmap": "magma"})]):
            ax.imshow(img.numpy(), **kw)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"SDE validation, step {step}", fontsize=9)
    fig.tight_layout()
    return fig


def _optimiser(model: SDEModel, cfg: SDEConfig, phase: int, worker):
    """Freeze/unfreeze the encoder for ``phase``; return (module to call, Adam over what trains)."""
    frozen = phase == 1
    for p in model.encoder.parameters():
        p.requires_grad_(not frozen)
    params = model.depth_parameters() + ([] if frozen else list(model.encoder.parameters()))
    optimiser = torch.optim.Adam(params, lr=cfg.lr_phase1 if frozen else cfg.lr_phase2, fused=True)  # fused: 7x faster steps on CPU
    net = model
    if worker.world > 1:  # re-wrapped per phase: DDP fixes the set of trained parameters at construction
        ids = [worker.device.index] if worker.device.type == "cuda" else None
        # an oracle leaves the pose net without a gradient
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=cfg.oracle != "none")
    return net, optimiser


def _set_mode(model: SDEModel, phase: int) -> None:
    model.train()
    if phase == 1:
        model.encoder.eval()  # a frozen encoder keeps its batch-norm statistics


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: ``sde`` (SDEConfig fields), ``data`` (dataset directory),
    optional ``tracking_uri`` + ``mlflow_run_id`` (rank 0 logs there), ``resume_from`` (a checkpoint
    directory, used when Ray Train has none of its own) and ``stop_after`` (end early at that step)."""
    cfg = SDEConfig.from_dict(config["sde"])
    worker = start_worker(cfg.threads, stream_seed("sde/init", cfg.seed), cfg.precision)
    config = {**config, "data": str(local_dataset(config["data"]))}  # read from this node's copy
    gpu = worker.device.type == "cuda"
    model = place(SDEModel(cfg), worker.device, cfg.precision, cfg.batch_size)
    start, saved_optimiser, saved_phase = 0, None, None
    state = resume_state(config.get("resume_from"), worker.device)
    if state is not None:
        model.load_state_dict(state["model"])
        start, saved_optimiser, saved_phase = state["step"], state["optimizer"], state["phase"]
    logger = None
    if worker.is_main and config.get("mlflow_run_id"):
        from segsde.tracking import RunLogger

        logger = RunLogger(config["tracking_uri"], config["mlflow_run_id"], keep_through_outages=True)
        logger.tags(worker_tags(worker))
    val_set = validation_set(config["data"], cfg)
    batches = torch.utils.data.DataLoader(StepBatches(config["data"], cfg, start, worker.rank, worker.world), batch_size=None,
                                          num_workers=cfg.loader_workers, pin_memory=gpu, persistent_workers=False)
    triplets = batches.dataset.split_counts()
    if worker.is_main:
        progress(f"[sde] training on {sum(triplets.values())} triplets ({', '.join(f'{k} {v}' for k, v in triplets.items())})")
        if logger:
            logger.tags({f"data.triplets.{k}": str(v) for k, v in triplets.items()})
    jitter = colour_jitter(cfg)
    stop = min(config.get("stop_after") or cfg.total_steps, cfg.total_steps)
    net, optimiser, phase = None, None, None
    running, logged, t0, seen = {}, 0, time.perf_counter(), 0
    for batch in batches:
        step = batch["step"]
        if step >= stop:
            break
        if cfg.phase(step) != phase:
            phase = cfg.phase(step)
            net, optimiser = _optimiser(model, cfg, phase, worker)
            if saved_optimiser is not None and saved_phase == phase:
                optimiser.load_state_dict(saved_optimiser)
            saved_optimiser = None
            _set_mode(model, phase)
        for group in optimiser.param_groups:
            group["lr"] = cfg.lr(step)
        torch.manual_seed(stream_seed("sde/step", cfg.seed, worker.rank, step))  # the automask tie-break noise
        frames, K = (batch[k].to(worker.device, non_blocking=True) for k in ("frames", "K"))
        net_frames = network_frames(jitter, frames, batch["jitter"])
        truth = {k: v.to(worker.device, non_blocking=True) for k, v in batch["truth"].items()} if "truth" in batch else None
        with autocast(worker.device, cfg.precision):
            out = net(frames, K, net_frames, cfg.feature_distance if phase == 2 else 0.0, truth)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SDE loss is {loss.item()} at step {step}: lower the learning rate or check the data")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        seen += frames.shape[0] * worker.world
        for k, v in out.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        logged += 1
        done = step + 1
        if done % cfg.log_interval == 0 or done == stop:
            rate = seen / (time.perf_counter() - t0)
            means = {f"train/{k}": v / logged for k, v in running.items()}
            running, logged = {}, 0
            if logger:
                logger.metrics({**means, "train/images_per_s": rate, "train/lr": cfg.lr(step), "train/phase": phase}, step=done)
            if worker.is_main:
                progress(f"[sde] step {done}/{stop} phase {phase} loss {means['train/loss']:.4f} {rate:.1f} img/s")
                post(config.get("progress"), step=done, total=stop)
        if done % cfg.val_interval == 0 or done % cfg.checkpoint_interval == 0 or done == stop:
            metrics = {"step": done, "phase": phase, "loss": float(loss.detach()), "images_per_s": seen / (time.perf_counter() - t0)}
            if done % cfg.val_interval == 0 or done == stop:
                depth_metrics, examples = validate(model, val_set, cfg, worker)
                metrics.update({f"val_{k}": v for k, v in depth_metrics.items()})
                if logger:
                    # the threshold accuracies in percent, as every score of the trials; the errors as they are
                    logger.metrics({f"val/{k}": 100 * v if k in ("a1", "a2", "a3") else v for k, v in depth_metrics.items()}, step=done)
                    import matplotlib.pyplot as plt

                    fig = disparity_figure(examples, done)
                    logger.figure(fig, f"figures/disparity_step{done:07d}.png")
                    plt.close(fig)
                if worker.is_main and not math.isnan(depth_metrics["abs_rel"]):
                    progress(f"[sde] validation at step {done}: AbsRel {depth_metrics['abs_rel']:.3f} "
                              f"RMSE {depth_metrics['rmse']:.2f} d1 {depth_metrics['a1']:.3f}")
            if logger and done == stop:  # a restart after this checkpoint would not log again
                logger.flush()
            # model is the bare module; net is its DDP wrapper
            report(worker, metrics, state={"model": model.state_dict(), "optimizer": optimiser.state_dict(), "step": done,
                                           "phase": phase, "config": asdict(cfg)})
