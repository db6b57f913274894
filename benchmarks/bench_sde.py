"""SDE pre-training throughput (images/s) on this machine: CPU always, CUDA too when present.

Prints one JSON object. Each configuration runs the real training step (StepBatches data + SDE model
forward/backward + Adam) on the testbed. The baseline, measured in the same run, is the paper-faithful
configuration of the same profile: decoder widths (64, 128, 128, 256, 256), the pose net at full input
resolution, every scale's loss at full resolution (monodepth2) and the non-fused Adam; the profile's own
settings are what `segsde sde --profile P` trains with (its `precision` too; the same settings in float32
are measured as well).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from segsde.runtime import Worker, autocast
from segsde.sde.model import SDEModel
from segsde.sde.run import sde_config
from segsde.sde.train import StepBatches, _optimiser, _set_mode

# precision auto: bf16 on a GPU, float32 on a CPU, what the original trainer had there
PAPER = {"decoder_channels": (64, 128, 128, 256, 256), "pose_input_scale": 1.0, "photometric_resolution": "full", "precision": "auto"}


def images_per_s(data: str, profile: str, overrides: dict, steps: int, device: torch.device, fused: bool = True) -> float:
    cfg = sde_config(profile, {"phase1_steps": 0, "phase2_steps": steps + 2, **overrides})
    torch.manual_seed(0)
    model = SDEModel(cfg).to(device)
    net, opt = _optimiser(model, cfg, 2, Worker(0, 1, device))
    if not fused:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr_phase2)
    _set_mode(model, 2)
    batches = StepBatches(data, cfg, 0, 0, 1)
    gpu = device.type == "cuda"
    start = None
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batches[step].items()}
        with autocast(device, cfg.precision):
            out = net(b["frames"], b["K"], b["net_frames"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    if gpu:
        torch.cuda.synchronize()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--data", default=None, help="a testbed dataset (default: render a small one)")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all", help="where to measure (default: the CPU, and CUDA when present)")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from segsde.data.synth.generate import generate
            from segsde.data.synth.scene import SynthConfig
            from segsde.profiles import data_profile

            h, w = data_profile(args.profile).size
            data = str(Path(tmp) / "data")
            generate(data, 16, 4, SynthConfig(height=h, width=w), seed=0, workers=1)
        results = {"benchmark": "sde_training", "profile": args.profile, "steps": args.steps, "host": platform.node(),
                   "cpu_threads": threads}
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        devices = [d for d in devices if args.device in ("all", d.type)]
        if not devices:
            parser.error("--device cuda: no CUDA device here; use --device cpu")
        for device in devices:
            name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            ours = images_per_s(data, args.profile, {}, args.steps, device)
            fp32 = images_per_s(data, args.profile, {"precision": "fp32"}, args.steps, device)
            paper = images_per_s(data, args.profile, PAPER, args.steps, device, fused=False)
            results[device.type] = {"device": name, "precision": sde_config(args.profile).precision, "images_per_s": round(ours, 2),
                                    "fp32_images_per_s": round(fp32, 2), "baseline_paper_widths_images_per_s": round(paper, 2),
                                    "speedup": round(ours / paper, 2)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
