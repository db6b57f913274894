"""Where a step's time goes: torch.profiler over the steady-state steps of trainer rows and of the SDE step.

Prints one JSON object. For each (configuration, intra-op threads): the step time under the profiler (it adds a
few microseconds per operator), the operators with the most self CPU time (their share of the profiled wall
time, their costliest input shapes, and the first segsde or torch.nn frame that called them), the share of the
top operators together, and the share outside every operator: Python, the dispatcher and autograd's
bookkeeping between operators. The configurations are `bench_train`'s rows and `bench_sde`'s step, on the same
small testbed, so the figures read beside theirs.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from bench_sde import images_per_s
from bench_train import measure, testbed
from torch.profiler import ProfilerActivity, profile

from segsde.sde.run import sde_config


def caller(stack: list[str]) -> str:
    """The innermost frame of ours in a profiler stack, else the innermost module."""
    ours = [f.split("/work/")[-1] for f in stack if "segsde/" in f]
    modules = [f for f in stack if f.startswith("nn.Module:")]
    return (ours or modules or stack or [""])[0]


def tracer():
    """A CPU profiler that records input shapes and Python stacks (the verbose config: without it the stacks are empty)."""
    return profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True,
                   experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True))


def breakdown(prof, wall_ms: float, top: int) -> dict:
    """The top operators by self CPU time as shares of ``wall_ms`` (the profiled steps' wall time)."""
    by_name = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    by_shape = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    by_stack = sorted(prof.key_averages(group_by_stack_n=24), key=lambda e: -e.self_cpu_time_total)
    wall_us = wall_ms * 1000
    in_ops = sum(e.self_cpu_time_total for e in by_name)
    ops = []
    for e in by_name[:top]:
        shape = next((s for s in by_shape if s.key == e.key), None)
        stack = next((s for s in by_stack if s.key == e.key), None)
        ops.append({"op": e.key, "share_pct": round(100 * e.self_cpu_time_total / wall_us, 1), "calls": e.count,
                    "costliest_shapes": str(shape.input_shapes)[:160] if shape else "",
                    "called_from": caller(stack.stack) if stack else ""})
    return {"top_ops": ops, "top_share_pct": round(sum(o["share_pct"] for o in ops), 1),
            "outside_ops_pct": round(100 * (1 - in_ops / wall_us), 1), "operators": len(by_name)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", default="baseline,mtl,combination", help="bench_train rows to profile")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    results = {"benchmark": "step_profile", "profile": args.profile, "steps": args.steps, "host": platform.node(), "configs": []}
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data, sde_model = testbed(Path(tmp), args.profile)
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for row in args.rows.split(","):
                prof = tracer()  # entered around the timed steps
                step_ms = measure(data, sde_model, args.profile, row, args.steps, device, trace=prof)["step_ms"]
                entry = {"config": row, "threads": threads, "step_ms": step_ms, **breakdown(prof, step_ms * args.steps, args.top)}
                entry["op_calls_per_step"] = round(sum(e.count for e in prof.key_averages()) / args.steps)
                results["configs"].append(entry)
            prof = tracer()
            rate = images_per_s(str(data), args.profile, {}, args.steps, device, trace=prof)
            step_ms = 1000 * sde_config(args.profile).batch_size / rate
            entry = {"config": "sde", "threads": threads, "step_ms": round(step_ms, 1), **breakdown(prof, step_ms * args.steps, args.top)}
            entry["op_calls_per_step"] = round(sum(e.count for e in prof.key_averages()) / args.steps)
            results["configs"].append(entry)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
