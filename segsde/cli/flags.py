"""Argument types and the flag blocks the ``segsde`` subcommands share, each written once."""

from __future__ import annotations

import argparse
from pathlib import Path

PROFILES_HELP = "smoke | quick | evidence | synthetic | cityscapes (ablations/profiles.yaml)"


def key_value(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as YAML (numbers, booleans, lists)."""
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"'{text}' is not of the form key=value, e.g. steps=300")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': not comma-separated integers, e.g. 16,32") from None


def name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_size(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size '{text}' is not of the form AxB, e.g. 128x256") from None
    if a <= 0 or b <= 0:
        raise argparse.ArgumentTypeError(f"size '{text}' must be positive")
    return a, b


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def profile_flags(p: argparse.ArgumentParser, example: str, what: str = "one config value") -> None:
    """--profile and --set."""
    p.add_argument("--profile", default="quick", help=PROFILES_HELP)
    p.add_argument("--set", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help=f"override {what}, e.g. --set {example} (repeatable)")


def ray_flags(p: argparse.ArgumentParser, experiment: str | None, experiment_note: str | None = None,
              workers_default: int | None = 1) -> None:
    """Where and how the Ray Train jobs run, and where MLflow records them."""
    p.add_argument("--workers", type=int, default=workers_default, help="Ray Train workers (DDP ranks) per job")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--address", default=None, help="Ray cluster address (`auto` on a `ray up` cluster; default: local Ray)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or OUT/mlflow.db)")
    p.add_argument("--experiment", default=experiment, help=f"MLflow experiment (default {experiment_note or experiment})")


def storage_flag(p: argparse.ArgumentParser, default_note: str = "else OUT") -> None:
    p.add_argument("--storage", "--cache", dest="storage", default=None,
                   help="storage root of the stage cache and every durable artifact: a path every node mounts, or "
                        "s3://bucket/prefix (?endpoint_override=URL for S3-compatible servers), gs://... "
                        f"(default: $SEGSDE_STORAGE, {default_note})")


def orchestration_flags(p: argparse.ArgumentParser, experiment_note: str, resume_help: str) -> None:
    """What a study and a sweep share: budgets, concurrency, data, output, storage, Ray, MLflow, --resume."""
    p.add_argument("--budgets", type=int_list, default=None, help="labeled budgets, e.g. 16,32 (default: the profile's)")
    p.add_argument("--concurrency", type=int, default=None, help="trials at once (default: the profile's)")
    p.add_argument("--data-root", default=None, help="an existing segsde dataset (a path or storage URI) instead of the testbed")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output directory (default ./outputs)")
    storage_flag(p)
    ray_flags(p, None, experiment_note, workers_default=None)
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the training state of finished trials and SDE stages under the storage root (default: "
                        "only their results and models; the state is for resuming, ~130 MB a trial)")
