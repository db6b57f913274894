"""Optuna sweeps of the trainer on Ray Tune (embedded default: the testbed, `quick` profile, local Ray).

Per labeled budget: one Tuner, one Optuna study (TPE, persisted in OUT/optuna.db, the row's own values as
the first trial), ASHA early stopping on validation mIoU (stopped trials are PRUNED in Optuna), and one
MLflow parent run with a child run per trial, the best settings, parameter importances and the
optimisation history.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from segsde.errors import SegSDEError  # noqa: E402
from tune.run_ablation import _ints, _key_value, _names, train_overrides  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", help="smoke | quick | synthetic | cityscapes (ablations/profiles.yaml)")
    parser.add_argument("--row", default=None, help="the component-study row to tune (default: the profile's, depthmix)")
    parser.add_argument("--budgets", type=_ints, default=None, help="labeled budgets, one study each, e.g. 16,32")
    parser.add_argument("--samples", type=int, default=None, help="trials per budget")
    parser.add_argument("--params", type=_names, default=None, help="comma-separated keys of ablations/sweep_space.yaml (default: what the row uses)")
    parser.add_argument("--seed", type=int, default=None, help="trial and sampler seed")
    parser.add_argument("--concurrency", type=int, default=None, help="trials at once")
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers per trial")
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per Train worker")
    parser.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="override a trainer setting that is not swept, e.g. --set steps=300 (repeatable)")
    parser.add_argument("--data-root", default=None, help="an existing segsde dataset (a path or storage URI) instead of the testbed")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output directory (default ./outputs)")
    parser.add_argument("--storage", default=None,
                        help="storage root of every durable artifact: a path every node mounts, or s3://bucket/prefix "
                             "(?endpoint_override=URL for S3-compatible servers), gs://... (default: $SEGSDE_STORAGE, else OUT)")
    parser.add_argument("--address", default=None, help="Ray cluster address (`auto` on a `ray up` cluster)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or OUT/mlflow.db)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment and Optuna study prefix (default segsde-sweep-PROFILE)")
    parser.add_argument("--resume", action="store_true",
                        help="continue this sweep's Optuna studies: interrupted trials go on from their last checkpoint")
    args = parser.parse_args(argv)
    try:
        from segsde.orchestration.sweep import run_sweep, sweep_config

        cfg = sweep_config(args.profile, row=args.row, budgets=args.budgets, samples=args.samples, params=args.params,
                           seed=args.seed, concurrency=args.concurrency, workers=args.workers, gpu=args.gpu,
                           train=train_overrides(args.profile, "sweep", args.set))
        run_sweep(cfg, args.out, data_root=args.data_root, storage=args.storage, address=args.address, tracking_uri=args.tracking_uri,
                  experiment=args.experiment, resume=args.resume)
    except SegSDEError as exc:
        print(f"run_sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run_sweep: interrupted; its MLflow runs are KILLED, and a rerun with --resume goes on from the "
              "cached stages and the trials' checkpoints", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
