"""Mean teacher: an exponential moving average of the student, run in eval mode without gradients."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module, drop: tuple[str, ...] = ()) -> nn.Module:
    """A frozen copy of ``student`` in eval mode; submodules named in ``drop`` (e.g. the pose net, which
    only serves the depth loss) are removed from it, and then also from the average."""
    teacher = copy.deepcopy(student)
    for name in drop:
        setattr(teacher, name, None)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def ema_alpha(step: int, alpha: float) -> float:
    """The warm-up weight min(1 - 1/(k+1), alpha) of 0-based step k: early teachers follow the student."""
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, alpha: float) -> None:
    """theta_T <- a * theta_T + (1 - a) * theta_S for every parameter and floating-point buffer the teacher
    has (the batch-norm running statistics included, so the eval-mode teacher normalises with averaged
    statistics, not stale ones); integer buffers (BN's step counters) are copied."""
    a = ema_alpha(step, alpha)
    source = dict(student.named_parameters()) | dict(student.named_buffers())
    for name, t in [*teacher.named_parameters(), *teacher.named_buffers()]:
        s = source[name]
        if t.dtype.is_floating_point:
            t.mul_(a).add_(s.detach(), alpha=1.0 - a)
        else:
            t.copy_(s)
