"""Orchestration overhead of the component study: study wall time / sum of in-trainer time, and per-trial
start-up seconds (trial wall time measured by its driver minus its in-loop time). Prints one JSON line.

    python benchmarks/bench_study.py [--profile quick] [--rows ...] [--concurrency 1] [--out DIR]

Stages (dataset, SDE, export, selections) are computed or reused first and are not part of the ratio: the
goal (<= 1.15) is about running trials on Ray Tune + Ray Train, compared in the same run against the sum
of the trials' own training loops. Trials run one at a time by default (each with all the cores), so
the ratio is wall / sum; with --concurrency N it is wall / (sum / N).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from segsde.orchestration.stages import input_stages
    from segsde.orchestration.study import run_study, study_config
    from segsde.storage import Location
    from segsde.trainer.run import train_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--rows", default=None, help="comma-separated rows (default: all)")
    parser.add_argument("--concurrency", type=int, default=1, help="trials at once (each gets cores / N threads)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="where the stage cache lives (trials are rerun)")
    args = parser.parse_args()
    import os

    cfg = study_config(args.profile, sets={"threads": max(1, (os.cpu_count() or 1) // args.concurrency)},
                       rows=args.rows.split(",") if args.rows else None, concurrency=args.concurrency)
    configs = [train_config(cfg.profile, r, {**cfg.train, "budget": max(cfg.budgets), "seed": cfg.seeds[0]}) for r in cfg.rows]
    # computed or reused, untimed: with the study's own stage overrides, or the timed study would find other stages to compute
    input_stages(cfg.profile, configs, cfg.seeds, Location(str(Path(args.out).absolute())), None, cfg.data_seed,
                 sde_overrides=cfg.sde, select_overrides=cfg.select)
    start = time.perf_counter()
    result = run_study(cfg, args.out, force=("train",))  # every trial runs again
    wall = time.perf_counter() - start
    records = [r for r in result["records"] if r.get("train_seconds")]
    in_trainer = sum(r["train_seconds"] for r in records)
    ideal = in_trainer / cfg.concurrency  # the trials' own loops, perfectly packed
    startup = [r["seconds"] - r["train_seconds"] for r in records]
    print(json.dumps({"profile": args.profile, "trials": len(records), "concurrency": cfg.concurrency, "study_wall_s": round(wall, 1),
                      "sum_in_trainer_s": round(in_trainer, 1), "overhead_ratio": round(wall / ideal, 3) if in_trainer else None,
                      "goal_ratio": 1.15, "startup_s_mean": round(sum(startup) / len(startup), 1) if startup else None,
                      "startup_s_max": round(max(startup), 1) if startup else None}))


if __name__ == "__main__":
    main()
