"""Run the SegSDE component study (embedded default: the synthetic testbed, `quick` profile, local Ray).

The study is a DAG of cached stages: dataset -> SDE pre-training -> pseudo-depth export -> data
selection(s) -> component trials (rows x budgets x seeds as a Ray Tune grid of Ray Train jobs) -> the
study table, class-wise IoU table and figures (terminal, MLflow parent run, Markdown + Parquet files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from segsde.cli import _key_value  # noqa: E402
from segsde.errors import SegSDEError  # noqa: E402


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers, e.g. 16,32") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def train_overrides(profile: str, section: str, sets: list[tuple[str, object]]) -> dict | None:
    """The profile section's trainer overrides with ``--set`` pairs on top (None: keep the section's)."""
    from segsde.profiles import load_profile

    return {**(load_profile(profile).get(section) or {}).get("train", {}), **dict(sets)} if sets else None


def main(argv=None) -> int:
    from segsde.orchestration.study import STAGES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", help="smoke | quick | synthetic | cityscapes (ablations/profiles.yaml)")
    parser.add_argument("--rows", type=_names, default=None, help="comma-separated rows of ablations/component_study.yaml (default: all)")
    parser.add_argument("--budgets", type=_ints, default=None, help="labeled budgets, e.g. 16,32 (default: the profile's)")
    parser.add_argument("--seeds", type=_ints, default=None, help="trial seeds, e.g. 0,1,2 (default: the profile's)")
    parser.add_argument("--concurrency", type=int, default=None, help="trials at once (default: the profile's)")
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers per trial (DDP; default: the profile's)")
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per Train worker")
    parser.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="override a trainer setting of every trial, e.g. --set epsilon=0.05 (repeatable)")
    parser.add_argument("--data-root", default=None, help="an existing segsde dataset (a path or storage URI) instead of the testbed")
    parser.add_argument("--data-seed", type=int, default=None, help="seed of the testbed dataset (default 0)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output directory (default ./outputs)")
    parser.add_argument("--storage", default=None,
                        help="storage root of every durable artifact: a path every node mounts, or s3://bucket/prefix "
                             "(?endpoint_override=URL for S3-compatible servers), gs://... (default: $SEGSDE_STORAGE, else OUT)")
    parser.add_argument("--address", default=None, help="Ray cluster address (`auto` on a `ray up` cluster; default: local Ray)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or OUT/mlflow.db)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default segsde-study-PROFILE)")
    parser.add_argument("--force", action="append", default=[], choices=STAGES, help="recompute a stage (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted study (so does a plain rerun: finished stages and trials are cached, "
                             "interrupted ones go on from their checkpoints)")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and trials with their cache hits, run nothing")
    args = parser.parse_args(argv)
    try:
        from segsde.orchestration.study import run_study, study_config

        cfg = study_config(args.profile, rows=args.rows, budgets=args.budgets, seeds=args.seeds, concurrency=args.concurrency,
                           workers=args.workers, gpu=args.gpu, data_seed=args.data_seed, train=train_overrides(args.profile, "study", args.set))
        result = run_study(cfg, args.out, data_root=args.data_root, storage=args.storage, force=tuple(args.force), address=args.address,
                           tracking_uri=args.tracking_uri, experiment=args.experiment, resume=args.resume, dry_run=args.dry_run)
    except SegSDEError as exc:
        print(f"run_ablation: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run_ablation: interrupted; its MLflow runs are KILLED, and a rerun with --resume goes on from the "
              "cached stages and the trials' checkpoints", file=sys.stderr)
        return 130
    return 1 if result.get("failed") else 0  # the table is printed either way, failed cells marked


if __name__ == "__main__":
    sys.exit(main())
