"""Semi-supervised trainer step time per component-study row, and the share of it spent mixing/augmenting.

Prints one JSON object. Each row runs the trainer's step (`train_step`: supervised loss + backward, the
teacher's pseudo-label loss + backward, clipping, SGD, EMA) on TrialBatches of the given profile's testbed, set
up as the trainer sets it up, CPU always and CUDA too when present. Two baselines in the same run: the
`baseline` row (supervised only: every row's step is also given relative to it), and each row's step set up
as the trainer did before the speed goal (`reference_setup`), measured alternately with it (``speedup``). The
mixing share re-runs, on each step's pool batch, exactly the calls that build the mixed batch (mask,
partners, mixing of images and soft targets, strong augmentation, pseudo-labels) and divides their time by
the step time (goal: < 5 %).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from segsde.runtime import autocast, place
from segsde.ssl.augment import StrongAugment
from segsde.ssl.mixing import mix, partners
from segsde.ssl.pseudo import pseudo_labels
from segsde.ssl.teacher import make_teacher
from segsde.trainer.data import TrialBatches, labeled_ids, mix_pool
from segsde.trainer.model import build_network, load_transfer, parameter_groups
from segsde.trainer.run import train_config
from segsde.trainer.step import make_optimiser, mixing_mask, train_step

ROWS = {"baseline": {}, "pseudolabel": {}, "classmix": {}, "depthmix": {"depth_source": "ground_truth"},
        "depthmix_sde": {"depth_source": "sde"}, "mtl": {}, "combination": {"labeled": "random"}}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def mixing_seconds(cfg, pool, net, teacher, augment) -> float:
    """The calls of pseudo_label_loss that build the mixed batch, timed alone (the networks' forwards excluded)."""
    with torch.no_grad():
        student_disparity = net(pool["frames"][:, 1])["disparities"][0][:, 0].float() if cfg.depth_source == "student" else None
        teacher_out = teacher(pool["image"])
        targets = torch.softmax(teacher_out["logits"].float(), 1)
        _sync(pool["image"].device)
        start = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        p = partners(targets.shape[0], g, device=targets.device)
        mask = mixing_mask(cfg, pool, targets, p, teacher_out, student_disparity, g)
        augment(mix(mask, pool["image"], p))
        pseudo_labels(mix(mask, targets, p), cfg.confidence_threshold, cfg.confidence)
        _sync(pool["image"].device)
        return time.perf_counter() - start


def reference_setup(net: torch.nn.Module, groups: list[dict], cfg) -> torch.optim.SGD:
    """The trainer's set-up before this benchmark's goal (segsde 8abd573): channels-last weights on every device and
    PyTorch's default SGD (a for-loop over the tensors on a CPU). The step itself is the same function."""
    net.to(memory_format=torch.channels_last)
    return torch.optim.SGD(groups, lr=cfg.lr_decoder, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def measure(data: Path, sde_model: Path, profile: str, row: str, steps: int, device: torch.device, trace=None,
            reference: bool = False) -> dict:
    """Mean time of the trainer's step (``train_step``, set up as the trainer sets it up) of ``row`` over ``steps``
    steps after two warm-ups, and the mixing's share. ``reference``: set up as ``reference_setup``. ``trace``: a
    context manager (a torch profiler) entered around the timed steps alone; the mixing is then not re-timed."""
    name = row.removesuffix("_sde")
    cfg = train_config(profile, name, {"steps": steps + 2, **ROWS[row]})
    torch.manual_seed(0)
    net = build_network(cfg)
    sde_cfg = load_transfer(net, sde_model, cfg) if cfg.transfer else None
    place(net, device, cfg.precision, cfg.images_per_pass)
    groups = parameter_groups(net, cfg)
    opt = reference_setup(net, groups, cfg) if reference else make_optimiser(groups, cfg)
    teacher = make_teacher(net, drop=("pose",) if cfg.multitask else ()) if cfg.teacher else None
    labeled = labeled_ids(data, cfg)
    batches = TrialBatches(data, cfg, labeled, mix_pool(data, cfg, labeled) if cfg.uses_unlabeled else None, 0, 0, 1)
    augment = StrongAugment(cfg.crop or cfg.resize or batches.labeled[0]["image"].shape[-2:], cfg.jitter_p, cfg.jitter_strength,
                            cfg.blur_p, cfg.blur_sigma)
    step_time = mixing = 0.0
    tracing = contextlib.ExitStack()
    for step in range(steps + 2):
        if step == 2 and trace is not None:
            tracing.enter_context(trace)
        b = batches[step]
        lab = {k: v.to(device) for k, v in b["labeled"].items()}
        pool = {k: v.to(device) for k, v in b["pool"].items()} if "pool" in b else None
        _sync(device)
        start = time.perf_counter()
        _, logs, _ = train_step(net, net, teacher, opt, lab, pool, cfg, sde_cfg, augment, step)
        _sync(device)
        if step >= 2:  # two warm-up steps
            step_time += time.perf_counter() - start
            if teacher is not None and trace is None:
                with autocast(device, cfg.precision):
                    mixing += mixing_seconds(cfg, pool, net, teacher, augment)
    tracing.close()
    out = {"step_ms": round(1000 * step_time / steps, 1)}
    if teacher is not None and trace is None:
        out["mixing_ms"] = round(1000 * mixing / steps, 2)
        out["mixing_share_pct"] = round(100 * mixing / step_time, 2)
    return out


def testbed(tmp: Path, profile: str) -> tuple[Path, Path]:
    """A small testbed of the profile's size (48 training images, 4 validation) with the pseudo-depth of an untrained
    SDE model: what every row reads. Returns (the dataset, the SDE model file)."""
    from segsde.data.synth.generate import generate
    from segsde.data.synth.scene import SynthConfig
    from segsde.profiles import data_profile
    from segsde.sde.export import export_pseudo_depth
    from segsde.sde.model import SDEModel
    from segsde.sde.run import save_model, sde_config

    h, w = data_profile(profile).size
    generate(tmp / "data", 48, 4, SynthConfig(height=h, width=w), seed=0, workers=1)
    sde_cfg = sde_config(profile)
    save_model(tmp / "sde.pt", {"model": SDEModel(sde_cfg).state_dict(), "config": asdict(sde_cfg), "step": 0})
    with open(os.devnull, "w") as quiet:
        export_pseudo_depth(tmp / "sde.pt", tmp / "data", log=quiet)
    return tmp / "data", tmp / "sde.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternate measurements of each set-up per row (medians)")
    parser.add_argument("--rows", default=",".join(ROWS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, sde_model = testbed(Path(tmp), args.profile)
        results = {"benchmark": "trainer_step", "profile": args.profile, "steps": args.steps, "host": platform.node(),
                   "cpu_threads": torch.get_num_threads(), "mixing_share_goal_pct": 5}
        for device in [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else []):
            rows = {}
            for row in args.rows.split(","):
                runs = [(measure(data, sde_model, args.profile, row, args.steps, device, reference=True),
                         measure(data, sde_model, args.profile, row, args.steps, device)) for _ in range(args.rounds)]
                before, now = (statistics.median(r[k]["step_ms"] for r in runs) for k in (0, 1))
                rows[row] = {**runs[-1][1], "step_ms": round(now, 1), "reference_step_ms": round(before, 1), "speedup": round(before / now, 2)}
            base = rows.get("baseline", {}).get("step_ms")
            for r in rows.values():
                r["vs_baseline"] = round(r["step_ms"] / base, 2) if base else None
            results[device.type] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": rows,
                                    "max_mixing_share_pct": max(r.get("mixing_share_pct", 0) for r in rows.values())}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
