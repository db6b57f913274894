"""SDE pre-training throughput (images/s) on this machine: CPU always, CUDA too when present.

Prints one JSON object. Each configuration runs the real training step (StepBatches data + SDE model
forward/backward + Adam) on the testbed. The baseline, measured in the same run, is the paper-faithful
configuration of the same profile: decoder widths (64, 128, 128, 256, 256), the pose net at full input
resolution, every scale's loss at full resolution (monodepth2), the non-fused Adam and NCHW weights; a second,
the profile's settings with every weight channels-last (how the loop placed them before the speed goal:
``speedup_vs_reference``); the profile's own
settings are what `segsde sde --profile P` trains with (its `precision` too; the same settings in float32
are measured as well), and the same settings with only the network step timed (batches loaded beforehand),
whose gap to the first says how much the data loading costs. ``--set key=value`` changes the profile's
settings for all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from segsde.cli.flags import key_value
from segsde.runtime import Worker, autocast, place
from segsde.sde.model import SDEModel
from segsde.sde.run import sde_config
from segsde.sde.train import StepBatches, _optimiser, _set_mode, colour_jitter, network_frames

# precision auto: bf16 on a GPU, float32 on a CPU, what the original trainer had there
PAPER = {"decoder_channels": (64, 128, 128, 256, 256), "pose_input_scale": 1.0, "photometric_resolution": "full", "precision": "auto"}


def images_per_s(data: str, profile: str, overrides: dict, steps: int, device: torch.device, fused: bool = True,
                 prefetched: bool = False, layout: str = "placed", trace=None) -> float:
    """Training images/s over ``steps`` steps after two warm-ups. ``prefetched``: cycle four batches loaded
    onto the device beforehand, so only the network step is timed (the data loading's share is the rest).
    ``layout``: "placed" (the training loop's, runtime.place), "nchw" (the paper's baseline) or "channels_last" (the
    loop's before the speed goal, segsde 8abd573).
    ``trace``: a context manager (a torch profiler) entered around the timed steps alone."""
    cfg = sde_config(profile, {"phase1_steps": 0, "phase2_steps": steps + 2, **overrides})
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    model = place(SDEModel(cfg), device, cfg.precision, cfg.batch_size) if layout == "placed" else SDEModel(cfg).to(device)
    if layout == "channels_last":
        model.to(memory_format=torch.channels_last)
    net, opt = _optimiser(model, cfg, 2, Worker(0, 1, device))
    if not fused:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr_phase2)
    _set_mode(model, 2)
    batches, jitter = StepBatches(data, cfg, 0, 0, 1), colour_jitter(cfg)
    if prefetched:
        batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in batches[k].items()} for k in range(4)]
    start, tracing = None, contextlib.ExitStack()
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            if gpu:
                torch.cuda.synchronize()
            if trace is not None:
                tracing.enter_context(trace)
            start = time.perf_counter()
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batches[step % len(batches)].items()}
        net_frames = network_frames(jitter, b["frames"], b["jitter"])
        with autocast(device, cfg.precision):
            out = net(b["frames"], b["K"], net_frames)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tracing.close()
    return steps * cfg.batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--data", default=None, help="a testbed dataset (default: render a small one)")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all", help="where to measure (default: the CPU, and CUDA when present)")
    parser.add_argument("--set", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="override an sde setting of the profile (repeatable)")
    args = parser.parse_args()
    overrides = dict(args.set)
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
            ours = images_per_s(data, args.profile, overrides, args.steps, device)
            fp32 = images_per_s(data, args.profile, {**overrides, "precision": "fp32"}, args.steps, device)
            paper = images_per_s(data, args.profile, {**overrides, **PAPER}, args.steps, device, fused=False, layout="nchw")
            before = images_per_s(data, args.profile, overrides, args.steps, device, layout="channels_last")
            step_only = images_per_s(data, args.profile, overrides, args.steps, device, prefetched=True)
            results[device.type] = {"device": name, "precision": sde_config(args.profile, overrides).precision, "overrides": overrides,
                                    "images_per_s": round(ours, 2),
                                    "fp32_images_per_s": round(fp32, 2), "baseline_paper_widths_images_per_s": round(paper, 2),
                                    "speedup": round(ours / paper, 2), "reference_channels_last_images_per_s": round(before, 2),
                                    "speedup_vs_reference": round(ours / before, 2),
                                    "network_step_only_images_per_s": round(step_only, 2)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
