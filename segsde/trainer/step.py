"""One training step of the component study, as two losses that are back-propagated in turn.

1. ``supervised_loss``: cross-entropy on the labeled batch (multi-task: mean of final and side output,
   plus the SDE losses of the labeled and of the pool triplets, whose scale-0 disparity DepthMix may use).
2. ``pseudo_label_loss`` (with a teacher): the eval-mode EMA teacher labels the pool batch, images and
   soft targets are mixed with one mask (all ones, ClassMix or DepthMix), the mixed images get strong
   augmentation, and the student is trained on the confident pseudo-labels.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from segsde.data.labels import IGNORE_INDEX, NUM_CLASSES
from segsde.runtime import autocast
from segsde.sde.config import SDEConfig
from segsde.sde.model import frame_poses, view_synthesis_loss
from segsde.ssl.mixing import class_mask, depth_mask, depth_to_disparity, mix, normalised_disparity, partners
from segsde.ssl.pseudo import one_hot_targets, pseudo_labels, weighted_cross_entropy
from segsde.ssl.teacher import ema_alpha, ema_update
from segsde.trainer.config import TrainConfig


def make_optimiser(groups: list[dict], cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum over ``groups``, fused: one kernel per parameter group instead of several operators per
    tensor (the update of ResNet-18's 11 M encoder weights was about a tenth of a 64x128 Baseline step)."""
    return torch.optim.SGD(groups, lr=cfg.lr_decoder, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)


def train_step(net, model, teacher, optimiser, labeled: dict, pool: dict | None, cfg: TrainConfig, sde_cfg: SDEConfig | None,
               augment, step: int, keep_example: bool = False) -> tuple[torch.Tensor, dict, dict | None]:
    """One optimisation step of the student ``model`` (``net``: it, or its DDP wrapper) on batches already on its
    device: the supervised loss and, with a ``teacher``, the pseudo-label loss back-propagated in turn, clipping, SGD
    and the teacher's EMA. -> (the detached loss, the logged terms, the mixing example when ``keep_example``)."""
    device = labeled["image"].device
    optimiser.zero_grad(set_to_none=True)
    # with a second backward to come, DDP syncs gradients once, after it (gradient accumulation)
    first = net.no_sync() if net is not model and teacher is not None else contextlib.nullcontext()
    with first:
        with autocast(device, cfg.precision):
            loss, logs, student_disparity = supervised_loss(net, labeled, pool, cfg, sde_cfg)
        check_finite(loss, step)
        loss.backward()
    example = None
    if teacher is not None:
        with autocast(device, cfg.precision):
            unsup, more, example = pseudo_label_loss(net, teacher, pool, cfg, augment, student_disparity, keep_example)
        check_finite(unsup, step)
        unsup.backward()
        # the pseudo-label term beside the supervised segmentation term, as the gradient sees them (weighted)
        ratio = cfg.unsup_weight * float(more["unsupervised"]) / max(cfg.seg_weight * float(logs["supervised"]), 1e-12)
        loss, logs = loss + unsup.detach(), {**logs, **more, "unsup_ratio": ratio, "ema_alpha": ema_alpha(step, cfg.ema_alpha)}
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimiser.step()
    if teacher is not None:
        ema_update(teacher, model, step, cfg.ema_alpha)
    return loss.detach(), logs, example


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()} at step {step}: lower the learning rates or check the data")


def supervised_loss(net, labeled: dict, pool: dict | None, cfg: TrainConfig, sde_cfg: SDEConfig | None
                    ) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """-> (loss, logged terms, the student's detached scale-0 disparity of the pool batch or None)."""
    if not cfg.multitask:
        ce = F.cross_entropy(net(labeled["image"])["logits"].float(), labeled["label"], ignore_index=IGNORE_INDEX)
        return cfg.seg_weight * ce, {"supervised": ce.detach()}, None
    parts = [labeled] + ([pool] if pool is not None else [])
    frames, K = torch.cat([p["frames"] for p in parts]), torch.cat([p["K"] for p in parts])
    n = labeled["image"].shape[0]
    out = net(frames[:, 1])
    ce = (F.cross_entropy(out["logits"][:n].float(), labeled["label"], ignore_index=IGNORE_INDEX)
          + F.cross_entropy(out["side"][:n].float(), labeled["label"], ignore_index=IGNORE_INDEX)) / 2
    module = net.module if hasattr(net, "module") else net
    sde = batchwise_sde_loss(frames, K, out["disparities"], frame_poses(module.pose, frames, sde_cfg), sde_cfg, n)
    loss = cfg.seg_weight * ce + cfg.sde_weight * sde
    disparity = out["disparities"][0][n:, 0].detach().float() if pool is not None else None
    depth_share = (cfg.sde_weight * sde / loss.clamp(min=1e-12)).detach()  # of what the gradient sees
    return loss, {"supervised": ce.detach(), "sde": sde.detach(), "depth_share": depth_share, "exchange": out["exchange"]}, disparity


def batchwise_sde_loss(frames: torch.Tensor, K: torch.Tensor, disparities: list[torch.Tensor], poses: list[torch.Tensor],
                       cfg: SDEConfig, n: int) -> torch.Tensor:
    """The SDE loss of the labeled batch (the first ``n`` of frames [B, 3, 3, H, W]) plus that of the pool batch
    (the rest), each its own mean with weight 1, as the original back-propagates them: one mean over both
    batches would give each half the weight."""
    parts = [slice(0, n)] + ([slice(n, None)] if frames.shape[0] > n else [])
    return sum(view_synthesis_loss(frames[p], K[p], [d[p] for d in disparities], [t[p] for t in poses], cfg)["loss"]
               for p in parts)


def mixing_mask(cfg: TrainConfig, pool: dict, targets: torch.Tensor, partner: torch.Tensor, teacher_out: dict,
                student_disparity: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """bool [B, H, W]: where each mixed image keeps its own pixels (the rest comes from its partner)."""
    B, _, H, W = targets.shape
    if cfg.mix == "none":
        return torch.ones(B, H, W, dtype=torch.bool, device=targets.device)
    if cfg.mix == "class":
        confidence, labels = targets.max(1)
        return class_mask(torch.where(confidence > 0, labels, IGNORE_INDEX), generator)
    disparity = {"sde": lambda: normalised_disparity(pool.get("depth_map", torch.empty(0)).float()),
                 "ground_truth": lambda: depth_to_disparity(pool.get("depth_map", torch.empty(0)).float()),
                 "student": lambda: normalised_disparity(student_disparity),
                 "teacher": lambda: normalised_disparity(teacher_out["disparities"][0][:, 0].float())}[cfg.depth_source]()
    return depth_mask(disparity, partner, cfg.epsilon)


def confident_unlabeled_fraction(targets: torch.Tensor, unlabeled: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mixed soft targets [B, K, H, W] and where each pixel came from an unlabeled image [B, H, W] -> the share of
    those pixels whose pseudo-label is confident: what says whether the teacher acted (a labeled pool member's
    one-hot ground truth is always confident, and would count for a teacher that labels nothing)."""
    confidence = targets.max(1).values
    counted = unlabeled & (confidence > 0)
    return ((confidence >= threshold) & counted).sum() / counted.sum().clamp(min=1)


def pseudo_label_loss(net, teacher, pool: dict, cfg: TrainConfig, augment, student_disparity: torch.Tensor | None,
                      keep_example: bool = False) -> tuple[torch.Tensor, dict, dict | None]:
    """-> (loss, logged terms, an example of the mixing for the figure when ``keep_example``)."""
    x = pool["image"]
    with torch.no_grad():
        teacher_out = teacher(x, depth=cfg.depth_source == "teacher")
        targets = torch.softmax(teacher_out["logits"].float(), 1)
        if pool["is_labeled"].any():  # labeled pool members (mix_pool all_with_gt) bring their ground truth
            truth = one_hot_targets(pool["label"], NUM_CLASSES)
            targets = torch.where(pool["is_labeled"][:, None, None, None], truth, targets)
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        partner = partners(x.shape[0], generator, device=x.device)
        mask = mixing_mask(cfg, pool, targets, partner, teacher_out, student_disparity, generator)
        mixed = augment(mix(mask, x, partner))
        mixed_targets = mix(mask, targets, partner)
        labels, weight, _ = pseudo_labels(mixed_targets, cfg.confidence_threshold, cfg.confidence)
        fraction = confident_unlabeled_fraction(mixed_targets, mix(mask, ~pool["is_labeled"][:, None, None].expand_as(mask), partner),
                                                cfg.confidence_threshold)
    loss = weighted_cross_entropy(net(mixed, depth=False)["logits"], labels, weight)
    example = None
    if keep_example:
        example = {"image_i": x[0], "image_j": x[partner[0]], "mask": mask[0], "mixed": mixed[0], "label": labels[0]}
        example = {k: v.detach().cpu() for k, v in example.items()}
    return cfg.unsup_weight * loss, {"unsupervised": loss.detach(), "confident_fraction": fraction.detach(),
                                     "mask_ratio": mask.float().mean()}, example
