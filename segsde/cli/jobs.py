"""``segsde sde``, ``segsde train`` and ``segsde select``: one Ray Train job each, printing one JSON line."""

from __future__ import annotations

from pathlib import Path

from segsde.cli.flags import int_list, profile_flags, ray_flags, storage_flag
from segsde.errors import SegSDEError


def _require(args, command: str, example: str, *flags: str) -> None:
    missing = [f"--{flag.replace('_', '-')}" for flag in flags if getattr(args, flag) is None]
    if missing:
        raise SegSDEError(f"segsde {command} needs {' and '.join(missing)}: e.g. {example}")


def cmd_sde(args) -> dict:
    from segsde.sde.run import run_sde

    _require(args, "sde", "segsde sde --data data/synth --profile quick --out runs/sde", "data", "out")
    return run_sde(args.data, args.out, profile=args.profile, workers=args.workers, gpu=bool(args.gpu), overrides=dict(args.set),
                   resume_from=args.resume_from, fresh=args.fresh, address=args.address, tracking_uri=args.tracking_uri,
                   experiment=args.experiment)


def cmd_sde_export(args) -> dict:
    from segsde.sde.export import export_pseudo_depth

    return export_pseudo_depth(args.checkpoint, args.data, batch=args.batch, device=args.device)


def cmd_train(args) -> dict:
    from segsde.orchestration.stages import trial_selection
    from segsde.storage import storage_uri
    from segsde.trainer.run import run_train

    _require(args, "train", "segsde train --data data/synth --row baseline --out runs/t", "data", "out")
    overrides = dict(args.set)
    overrides.update({k: v for k, v in (("budget", args.budget), ("seed", args.seed)) if v is not None})
    overrides, selection = trial_selection(args.selection, args.profile, args.row, overrides, args.data,
                                           storage_uri(args.storage, "outputs"), args.sde_model, args.tracking_uri)
    return run_train(args.data, args.out, row=args.row, profile=args.profile, overrides=overrides, sde_model=args.sde_model,
                     selection=selection, workers=args.workers, gpu=bool(args.gpu), address=args.address,
                     tracking_uri=args.tracking_uri, experiment=args.experiment, fresh=args.fresh, resume_from=args.resume_from)


def cmd_select(args) -> dict:
    from segsde.orchestration.stages import select_inputs
    from segsde.selection.run import check_method, run_select, selection_config
    from segsde.storage import storage_uri

    _require(args, "select", "segsde select --data data/synth --method sde --out sel.parquet", "data", "method", "out")
    check_method(args.method)
    overrides = dict(args.set)
    overrides.update({k: v for k, v in (("budgets", args.budgets), ("seed", args.seed)) if v is not None})
    selection_config(args.profile, overrides)  # a bad setting is a one-line error before the SDE stage could run
    sde_model, pseudo_depth = select_inputs(args.method, args.profile, args.data, storage_uri(args.storage, "outputs"),
                                            args.sde_checkpoint, args.tracking_uri)
    if pseudo_depth is not None:
        overrides["pseudo_depth"] = pseudo_depth
    return run_select(args.data, args.method, args.out, sde_checkpoint=sde_model, profile=args.profile,
                      overrides=overrides, workers=args.workers, gpu=bool(args.gpu), address=args.address,
                      tracking_uri=args.tracking_uri, experiment=args.experiment, fresh=args.fresh)


def _job_flags(p, experiment: str, example: str, resume: bool = True) -> None:
    profile_flags(p, example)
    ray_flags(p, experiment)
    if resume:
        p.add_argument("--resume-from", type=Path, default=None, help="a checkpoint directory to continue from")
    p.add_argument("--fresh", action="store_true", help="discard this OUT's earlier progress instead of resuming from it")


def add_job_commands(sub) -> None:
    sde = sub.add_parser("sde", help="self-supervised depth pre-training on Ray Train (`segsde sde export` for pseudo-depth)",
                         description="Train the SDE model (phase 1: frozen encoder; phase 2: everything) and print its validation "
                                     "depth metrics as one JSON line. Writes OUT/model.pt, OUT/metrics.json, Ray checkpoints under "
                                     "OUT/ray and, without MLFLOW_TRACKING_URI or --tracking-uri, MLflow runs in OUT/mlflow.db.")
    sde.add_argument("--data", help="dataset directory or storage URI (segsde format) with train and val splits")
    sde.add_argument("--out", help="output directory or storage URI (s3://bucket/prefix)")
    _job_flags(sde, "segsde-sde", "phase2_steps=500")
    sde.set_defaults(func=cmd_sde)
    export = sde.add_subparsers(dest="sde_command").add_parser(
        "export", help="write the SDE disparity of every sample into the dataset (side/pseudo_depth.parquet)")
    export.add_argument("--checkpoint", type=Path, required=True, help="model.pt written by `segsde sde`")
    export.add_argument("--data", type=Path, required=True, help="dataset directory to add the pseudo-depth to")
    export.add_argument("--batch", type=int, default=8)
    export.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    export.set_defaults(func=cmd_sde_export)

    train = sub.add_parser("train", help="one semi-supervised segmentation trial (a component-study row) on Ray Train",
                           description="Train one row of ablations/component_study.yaml and print its final validation scores "
                                       "(mIoU over the classes present, pixel accuracy, best mIoU) as one JSON line.")
    train.add_argument("--data", help="dataset directory or storage URI (segsde format) with train and val splits")
    train.add_argument("--out", help="output directory or storage URI (s3://bucket/prefix)")
    train.add_argument("--row", default="baseline", help="row id in ablations/component_study.yaml")
    train.add_argument("--budget", type=int, default=None, help="labeled images (default: the profile's)")
    train.add_argument("--seed", type=int, default=None, help="seed of the labeled subset, weights and batches (default 0)")
    train.add_argument("--sde-model", default=None, help="model.pt of `segsde sde` (transfer, mtl, combination)")
    train.add_argument("--selection", default=None,
                       help="label a prefix of this ordered id list (.txt/.parquet) or of this method's selection "
                            "(sde | diversity | difficulty | entropy | random, from the stage cache)")
    storage_flag(train, "else ./outputs")
    _job_flags(train, "segsde-train", "steps=300")
    train.set_defaults(func=cmd_train)

    select = sub.add_parser("select", help="automatic data selection for annotation (and its baselines) on Ray Train",
                            description="Order the training split for labeling: sde (diversity of SDE features + depth "
                                        "difficulty, the paper's ds_us), diversity, difficulty, entropy (active learning, "
                                        "labels in the loop) or random. Every budget is a prefix of the list. Writes OUT "
                                        "(Parquet: id, rank, round, score parts) and prints a JSON summary line.")
    select.add_argument("--data", help="dataset directory or storage URI (segsde format) with a train split")
    select.add_argument("--method", help="sde | diversity | difficulty | entropy | random")
    select.add_argument("--out", help="the selection file to write (.parquet; a path or storage URI)")
    select.add_argument("--sde-checkpoint", default=None,
                        help="model.pt of `segsde sde` (default: train or reuse the profile's SDE stage from the stage cache)")
    select.add_argument("--budgets", type=int_list, default=None, help="rounds as comma-separated budgets, e.g. 25,50,100 (default: the profile's)")
    select.add_argument("--seed", type=int, default=None, help="selection seed (default 0)")
    storage_flag(select, "else ./outputs, as segsde study")
    _job_flags(select, "segsde-select", "student_steps=200", resume=False)
    select.set_defaults(func=cmd_select)
