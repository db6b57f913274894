"""A semi-supervised segmentation trial as a Ray Train worker function (1 CPU or N GPUs with DDP).

Per step: the supervised loss is back-propagated (under DDP without a gradient sync when a second loss
follows), then the pseudo-label loss on the mixed pool batch; gradients are clipped, SGD steps, and the
EMA teacher follows the student. Every ``eval_interval`` steps all ranks score their share of the
validation split, the confusion matrix is all-reduced and mIoU is reported to Ray Train
(what Tune's schedulers act on); checkpoints hold student, teacher, optimiser and step, and every random
draw comes from a stream of its own purpose seeded by (seed, replicate, rank, step), so a resumed trial continues
exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from segsde.data.dataset import PSEUDO_DEPTH, SegSDEDataset, validation_split
from segsde.data.labels import CLASS_NAMES
from segsde.data.store import local_dataset
from segsde.metrics.segmentation import confusion_matrix, encode_confusions, iou_table, scores
from segsde.progress import post
from segsde.runtime import autocast, evaluation_mode, place, progress, report, resume_state, start_worker, stream_seed, worker_tags
from segsde.ssl.augment import StrongAugment
from segsde.ssl.teacher import make_teacher
from segsde.storage import Location, localize
from segsde.trainer.config import CONFUSIONS_FILE, TrainConfig, final_scores, in_percent
from segsde.trainer.data import TrialBatches
from segsde.trainer.model import build_network, parameter_groups, share_from, transfer_into
from segsde.trainer.step import make_optimiser, train_step


def validation_set(data: str, cfg: TrainConfig) -> SegSDEDataset:
    return validation_split(data, cfg.resize, cfg.val_images, cfg.eval_split)


@torch.no_grad()
def evaluate(model, val_set: SegSDEDataset, worker, full_resolution_root: str | None = None, batch: int = 8,
             precision: str = "auto") -> dict:
    """Dataset-level scores of the (bare, un-wrapped) student over the whole validation split: each rank
    takes every world-th image, confusion matrices are all-reduced. With ``full_resolution_root`` the
    logits are also upsampled to the native Cityscapes labels (the official protocol, ``full_*`` keys)."""
    from segsde.data.cityscapes import native_label

    conf = torch.zeros(2, 19, 19, dtype=torch.int64, device=worker.device)
    per_image = torch.zeros(len(val_set), 19, 19, dtype=torch.int64, device=worker.device)  # the report's jackknife
    mine = list(range(worker.rank, len(val_set), worker.world))
    examples = []
    with evaluation_mode(model, worker):
        for i in range(0, len(mine), batch):
            items = [val_set[j] for j in mine[i: i + batch]]
            images = torch.stack([it["image"] for it in items]).to(worker.device)
            with autocast(worker.device, precision):
                logits = model(images, depth=False)["logits"].float()
            pred, labels = logits.argmax(1), torch.stack([it["label"] for it in items]).to(worker.device)
            for k, j in enumerate(mine[i: i + batch]):
                per_image[j] = confusion_matrix(pred[k], labels[k])
            conf[0] += per_image[mine[i: i + batch]].sum(0)
            if full_resolution_root:
                for it, lg in zip(items, logits):
                    native = torch.from_numpy(native_label(full_resolution_root, val_set.split, it["id"]).astype("int64")).to(worker.device)
                    up = F.interpolate(lg[None], size=native.shape, mode="bilinear", align_corners=False)
                    conf[1] += confusion_matrix(up.argmax(1)[0], native)
            if len(examples) < 3:
                examples += [(images[k].cpu(), items[k]["label"], pred[k].cpu()) for k in range(min(3 - len(examples), len(items)))]
    if worker.world > 1:
        torch.distributed.all_reduce(conf)
        torch.distributed.all_reduce(per_image)
    out = {"legacy": scores(conf[0].cpu()), "per_image": per_image.cpu()}
    if full_resolution_root:
        out["full"] = scores(conf[1].cpu())
    out["examples"] = examples
    return out


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: ``train`` (TrainConfig fields), ``data``, ``labeled`` and
    ``pool`` (id lists), ``sde_model`` (model.pt, for transfer), optional ``tracking_uri`` +
    ``mlflow_run_id``, ``full_resolution_root``, ``resume_from`` and ``stop_after``."""
    cfg = TrainConfig.from_dict(config["train"])
    worker = start_worker(cfg.threads, stream_seed("trainer/init", cfg.seed, cfg.replicate), cfg.precision)
    source_data = config["data"]  # the storage location, for the run's dataset record
    config = {**config, "data": str(local_dataset(config["data"])),  # read from this node's copies
              "sde_model": str(localize(config["sde_model"])) if config.get("sde_model") else None}
    gpu = worker.device.type == "cuda"
    model = build_network(cfg)
    sde_cfg, sde_encoder = transfer_into(model, Path(config["sde_model"]), cfg) if cfg.transfer else (None, None)
    place(model, worker.device, cfg.precision, cfg.images_per_pass)
    teacher = make_teacher(model, drop=("pose",) if cfg.multitask else ()) if cfg.teacher else None
    optimiser = make_optimiser(parameter_groups(model, cfg), cfg)
    start, best = 0, float("nan")
    acted = ComponentActivity(cfg.steps, mixes=cfg.mix != "none", facts=config.get("activity"))
    state = resume_state(config.get("resume_from"), worker.device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        start, best = state["step"], state.get("best_miou", best)
        acted.restore(state.get("acted", {}))
    elif sde_encoder is not None:  # the encoder that trains starts from the SDE weights (a resumed one did)
        acted.facts["encoder_from_sde"] = share_from(model.encoder, sde_encoder)
    del sde_encoder
    net = model
    if worker.world > 1:
        # with the multi-task net, the pseudo-label pass leaves the depth heads, side output and pose net unused
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[worker.device.index] if gpu else None,
                                                        find_unused_parameters=cfg.multitask and teacher is not None)
    logger = None
    if worker.is_main and config.get("mlflow_run_id"):
        from segsde.tracking import RunLogger

        logger = RunLogger(config["tracking_uri"], config["mlflow_run_id"], keep_through_outages=True)
        logger.tags(worker_tags(worker))
        logger.dataset(*dataset_identity(source_data, config["data"]))
    augment = StrongAugment(cfg.crop or cfg.resize or val_shape(config["data"]), cfg.jitter_p, cfg.jitter_strength, cfg.blur_p, cfg.blur_sigma)
    val_set = validation_set(config["data"], cfg)
    batches = torch.utils.data.DataLoader(
        TrialBatches(Path(config["data"]), cfg, config["labeled"], config.get("pool"), start, worker.rank, worker.world,
                     config.get("pseudo_depth") or PSEUDO_DEPTH),
        batch_size=None, num_workers=cfg.loader_workers, pin_memory=gpu)
    stop = min(config.get("stop_after") or cfg.steps, cfg.steps)
    running, logged, t0, seen, example = {}, 0, time.perf_counter(), 0, None
    model.train()
    if worker.is_main:
        post(config.get("progress"), step=start, total=stop)
    for batch in batches:
        step = batch["step"]
        if step >= stop:
            break
        done = step + 1
        evaluating = done % cfg.eval_interval == 0 or done == stop
        for group in optimiser.param_groups:
            group["lr"] = group["base_lr"] * cfg.lr_factor(step)
        # strong augmentation, mix partners, class choice
        torch.manual_seed(stream_seed("trainer/step", cfg.seed, cfg.replicate, worker.rank, step))
        labeled = {k: v.to(worker.device, non_blocking=True) for k, v in batch["labeled"].items()}
        pool = {k: v.to(worker.device, non_blocking=True) for k, v in batch["pool"].items()} if "pool" in batch else None
        loss, logs, mixed = train_step(net, model, teacher, optimiser, labeled, pool, cfg, sde_cfg, augment, step, keep_example=evaluating)
        example = mixed or example
        acted.add(step, logs)
        seen += labeled["image"].shape[0] * worker.world
        for k, v in {"loss": loss, **logs}.items():
            running[k] = running.get(k, 0.0) + float(v)
        logged += 1
        if done % cfg.log_interval == 0 or done == stop:
            rate = seen / (time.perf_counter() - t0)
            means = {f"train/{k}": v / logged for k, v in running.items()}
            running, logged = {}, 0
            if logger:
                logger.metrics(in_percent({**means, "train/labeled_images_per_s": rate,
                                           "train/lr_decoder": cfg.lr_decoder * cfg.lr_factor(step)}), step=done)
            if worker.is_main:
                progress(f"[train] step {done}/{stop} loss {means['train/loss']:.4f} {rate:.1f} labeled img/s")
                post(config.get("progress"), step=done, total=stop)
        if evaluating or done % cfg.checkpoint_interval == 0:
            metrics = {"step": done, "loss": float(loss.detach()), "train_seconds": time.perf_counter() - t0}  # in-loop time
            if evaluating:
                result = evaluate(model, val_set, worker, config.get("full_resolution_root"), precision=cfg.precision)
                metrics.update(_flat_scores(result))
                if teacher is not None:  # does the teacher lead its student, as pseudo-labels need?
                    metrics["teacher_miou"] = evaluate(teacher, val_set, worker, precision=cfg.precision)["legacy"]["miou"]
                if done == cfg.steps:
                    metrics.update(acted.summary(metrics.get("teacher_miou")))
                    if worker.is_main:
                        _keep_confusions(result["per_image"], resampling_units(val_set), config.get("result"), logger)
                best = metrics["best_miou"] = max(best, metrics["miou"]) if best == best else metrics["miou"]
                if worker.is_main:
                    progress(f"[train] validation at step {done}: mIoU {100 * metrics['miou']:.2f} "
                              f"pixel accuracy {100 * metrics['pixel_accuracy']:.2f}")
                    post(config.get("progress"), step=done, total=stop, miou=metrics["miou"], final=done == cfg.steps)
                if logger:
                    _log_evaluation(logger, result, metrics, example, cfg, done)
                if logger and done == cfg.steps:  # before the report: a Tune scheduler may stop the trial at it
                    # at step 0, logged once: MLflow's chart view then draws one bar per run, not a dot at step N
                    logger.metrics(in_percent({f"final/{k}": v for k, v in final_scores(metrics).items() if v == v}), step=0)
            if logger and done == stop:  # a restart after this checkpoint would not log again
                logger.flush()
            report(worker, metrics, state={"model": model.state_dict(), "teacher": teacher.state_dict() if teacher is not None else None,
                                           "optimizer": optimiser.state_dict(), "step": done, "best_miou": best, "config": asdict(cfg),
                                           "acted": acted.state()})


class ComponentActivity:
    """What each component did, where a component that acts must show it. Means over the second half of
    training: confident pool pixels, the area pasted from the partner image and the pseudo-label / supervised
    loss ratio (teacher rows); the depth loss's share of the loss and what the feature exchange adds to the
    segmentation features (multi-task rows). Facts fixed at the start: whether the encoder started from the SDE
    weights (transfer rows), how the labeled set differs from random's (selection rows). And the teacher's mIoU."""

    AVERAGED = ("confident_fraction", "unsup_ratio", "depth_share", "exchange")

    def __init__(self, steps: int, mixes: bool, facts: dict | None = None):
        self.start, self.mixes, self.sums, self.facts = steps // 2, mixes, {}, dict(facts or {})

    def add(self, step: int, logs: dict) -> None:
        if step >= self.start:
            values = {k: float(logs[k]) for k in self.AVERAGED if k in logs}
            if self.mixes and "mask_ratio" in logs:  # pseudo-labels without a mix keep the whole image by design
                values["mixed_area"] = 1 - float(logs["mask_ratio"])
            for k, v in {**values, "steps": 1}.items():
                self.sums[k] = self.sums.get(k, 0.0) + v

    def summary(self, teacher_miou: float | None) -> dict:
        n = self.sums.get("steps", 0)
        out = {f"acted/{k}": v / n for k, v in self.sums.items() if k != "steps"} if n else {}
        out.update({f"acted/{k}": float(v) for k, v in self.facts.items()})
        return {**out, **({"acted/teacher_miou": teacher_miou} if teacher_miou is not None and out else {})}

    def state(self) -> dict:
        return {"sums": dict(self.sums), "facts": dict(self.facts)}

    def restore(self, state: dict) -> None:
        self.sums.update(state.get("sums", {}))
        self.facts.update(state.get("facts", {}))


def resampling_units(val_set: SegSDEDataset) -> list[str]:
    """Each validation image's resampling unit for the report's image jackknife: on Cityscapes its city (frames of
    one city share streets, weather and camera), on the testbed the image itself (each is rendered independently)."""
    if val_set.manifest["source"] == "cityscapes":
        return [sid.split("_")[0] for sid in val_set.ids]
    return list(val_set.ids)


def _keep_confusions(per_image: torch.Tensor, groups: list[str], result: str | None, logger) -> None:
    """The final evaluation's per-image confusion matrices with each image's resampling unit, beside the trial's
    result and in its MLflow run: what the study report's jackknife over validation images leaves out."""
    encoded = {**encode_confusions(per_image), "groups": groups}
    if result:
        Location(result).child(CONFUSIONS_FILE).write_text(json.dumps(encoded))
    if logger:
        logger.dict(encoded, f"final/{CONFUSIONS_FILE}")


def dataset_identity(location: str, local: str) -> tuple[str, str, str]:
    """(name, URI, digest) of a dataset: its folder name, where it lives, and its manifest's hash."""
    from segsde.data.store import MANIFEST, sha256_file

    where = Location(location)
    return where.name, where.uri, sha256_file(Path(local) / MANIFEST)[:12]


def val_shape(data: str) -> tuple[int, int]:
    return tuple(SegSDEDataset(data, "val")[0]["image"].shape[-2:])


def _flat_scores(result: dict) -> dict:
    out = {"miou": result["legacy"]["miou"], "pixel_accuracy": result["legacy"]["pixel_accuracy"],
           **{f"iou/{name}": float(v) for name, v in zip(CLASS_NAMES, result["legacy"]["iou"])}}  # NaN (absent) is dropped
    if "full" in result:
        out.update({"full_miou": result["full"]["miou"], "full_pixel_accuracy": result["full"]["pixel_accuracy"]})
    return out


def _log_evaluation(logger, result: dict, metrics: dict, example: dict | None, cfg: TrainConfig, step: int) -> None:
    import matplotlib.pyplot as plt

    from segsde.trainer.figures import mixing_figure, prediction_figure

    # the curves; what the components did is a result (final/acted/*), not a curve
    logger.metrics(in_percent({f"val/{k}": v for k, v in metrics.items()
                               if k not in ("step", "loss", "best_miou") and not k.startswith("acted/") and v == v}), step=step)
    for protocol in ("legacy", "full"):
        if protocol in result:
            logger.table(iou_table(result[protocol]), f"tables/class_iou_{protocol}_step{step:07d}.json")
    figures = [(prediction_figure(result["examples"], step), f"figures/predictions_step{step:07d}.png")]
    if example is not None:
        figures.append((mixing_figure(example, step, {"none": "pseudo-label (no mix)", "class": "ClassMix", "depth": "DepthMix"}[cfg.mix]),
                        f"figures/mixing_step{step:07d}.png"))
    for fig, path in figures:
        logger.figure(fig, path)
        plt.close(fig)
