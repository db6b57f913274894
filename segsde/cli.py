"""The ``segsde`` command. Every problem with the user's input ends as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from segsde.errors import SegSDEError


def parse_size(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size '{text}' is not of the form AxB, e.g. 128x256") from None
    if a <= 0 or b <= 0:
        raise argparse.ArgumentTypeError(f"size '{text}' must be positive")
    return a, b


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def cmd_synth(args) -> dict:
    from segsde.data.synth.generate import generate
    from segsde.data.synth.scene import SynthConfig

    h, w = args.size
    cfg = SynthConfig(height=h, width=w, difficulty=args.difficulty, moving_prob=args.moving_prob)
    m = generate(args.out, args.train, args.val, cfg, args.seed, workers=args.workers, overwrite=args.overwrite)
    return {"out": str(Path(args.out).absolute()), "splits": m["splits"], "shards": len(m["shards"])}


def cmd_cityscapes(args) -> dict:
    from segsde.data import cityscapes

    w, h = args.size
    m = cityscapes.build(args.root, args.out, size=(h, w), workers=args.workers, overwrite=args.overwrite)
    return {"out": str(Path(args.out).absolute()), "splits": m["splits"], "shards": len(m["shards"])}


def cmd_split(args) -> dict:
    from segsde.data.splits import random_order, take_budget, write_order
    from segsde.data.store import split_ids

    order = random_order(split_ids(args.data, args.split), args.seed)
    if args.budget is not None:
        order = take_budget(order, args.budget)
    write_order(args.out, order)
    return {"out": str(args.out), "ids": len(order), "first": order[:3]}


def cmd_import_split(args) -> dict:
    from segsde.data.splits import check_ids, import_split_file, write_order
    from segsde.data.store import split_ids

    ids = import_split_file(args.file)
    check_ids(ids, split_ids(args.data, args.split), str(args.file))
    write_order(args.out, ids)
    return {"out": str(args.out), "ids": len(ids)}


def cmd_preview(args) -> dict:
    from segsde.data.preview import save_preview

    return {"out": str(save_preview(args.data, args.out, args.n))}


def cmd_info(args) -> dict:
    from segsde.data.store import read_manifest

    m = read_manifest(args.data, verify=True)
    return {k: m[k] for k in ("source", "splits", "size") if k in m} | {"shards": len(m["shards"]), "verified": True}


def _key_value(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"'{text}' is not of the form key=value, e.g. phase2_steps=500")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def cmd_sde(args) -> dict:
    from segsde.sde.run import run_sde

    missing = [flag for flag, value in (("--data", args.data), ("--out", args.out)) if value is None]
    if missing:
        raise SegSDEError(f"segsde sde needs {' and '.join(missing)}: e.g. segsde sde --data data/synth --profile quick --out runs/sde")
    return run_sde(args.data, args.out, profile=args.profile, workers=args.workers, gpu=args.gpu, overrides=dict(args.set),
                   resume_from=args.resume_from, fresh=args.fresh, address=args.address, tracking_uri=args.tracking_uri,
                   experiment=args.experiment)


def cmd_sde_export(args) -> dict:
    from segsde.sde.export import export_pseudo_depth

    return export_pseudo_depth(args.checkpoint, args.data, batch=args.batch, device=args.device)


def cmd_train(args) -> dict:
    from segsde.orchestration.stages import trial_selection
    from segsde.storage import storage_uri
    from segsde.trainer.run import run_train

    missing = [flag for flag, value in (("--data", args.data), ("--out", args.out)) if value is None]
    if missing:
        raise SegSDEError(f"segsde train needs {' and '.join(missing)}: e.g. segsde train --data data/synth --row baseline --out runs/t")
    overrides = dict(args.set)
    overrides.update({k: v for k, v in (("budget", args.budget), ("seed", args.seed)) if v is not None})
    overrides, selection = trial_selection(args.selection, args.profile, args.row, overrides, args.data,
                                           storage_uri(args.storage, "outputs"), args.sde_model, args.tracking_uri)
    return run_train(args.data, args.out, row=args.row, profile=args.profile, overrides=overrides, sde_model=args.sde_model,
                     selection=selection, workers=args.workers, gpu=args.gpu, address=args.address,
                     tracking_uri=args.tracking_uri, experiment=args.experiment, fresh=args.fresh, resume_from=args.resume_from)


def _budgets(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets '{text}' are not comma-separated integers, e.g. 25,50,100") from None


def cmd_select(args) -> dict:
    from segsde.orchestration.stages import select_inputs
    from segsde.selection.run import check_method, run_select, selection_config
    from segsde.storage import storage_uri

    missing = [flag for flag, value in (("--data", args.data), ("--method", args.method), ("--out", args.out)) if value is None]
    if missing:
        raise SegSDEError(f"segsde select needs {' and '.join(missing)}: e.g. segsde select --data data/synth --method sde --out sel.parquet")
    check_method(args.method)
    overrides = dict(args.set)
    overrides.update({k: v for k, v in (("budgets", args.budgets), ("seed", args.seed)) if v is not None})
    selection_config(args.profile, overrides)  # a bad setting is a one-line error before the SDE stage could run
    sde_model = select_inputs(args.method, args.profile, args.data, storage_uri(args.storage, "outputs"), args.sde_checkpoint,
                              args.tracking_uri)
    return run_select(args.data, args.method, args.out, sde_checkpoint=sde_model, profile=args.profile,
                      overrides=overrides, workers=args.workers, gpu=args.gpu, address=args.address,
                      tracking_uri=args.tracking_uri, experiment=args.experiment, fresh=args.fresh)


def _job_flags(p: argparse.ArgumentParser, experiment: str, example: str, resume: bool = True) -> None:
    """Flags every Ray Train job shares: profile, overrides, workers, resume, cluster, MLflow."""
    p.add_argument("--profile", default="quick", help="smoke | quick | synthetic | cityscapes (ablations/profiles.yaml)")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help=f"override one config value, e.g. --set {example} (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    if resume:
        p.add_argument("--resume-from", type=Path, default=None, help="a checkpoint directory to continue from")
    p.add_argument("--fresh", action="store_true", help="discard this OUT's earlier progress instead of resuming from it")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or OUT/mlflow.db)")
    p.add_argument("--experiment", default=experiment, help="MLflow experiment name")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segsde", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="build, inspect and split datasets").add_subparsers(dest="data_command", required=True)

    p = data.add_parser("synth", help="render the synthetic street-scene testbed (Parquet shards + manifest)")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    p.add_argument("--train", type=_positive, default=256, help="training samples (default 256)")
    p.add_argument("--val", type=_positive, default=64, help="validation samples (default 64)")
    p.add_argument("--size", type=parse_size, default=(128, 256), help="HEIGHTxWIDTH, e.g. 128x256 (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=float, default=0.5, help="appearance variation and clutter in [0, 1]")
    p.add_argument("--moving-prob", type=float, default=0.3, help="probability that a road user moves on its own")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("cityscapes", help="convert a Cityscapes tree (leftImg8bit, leftImg8bit_sequence, gtFine, camera)")
    p.add_argument("--root", type=Path, required=True, help="folder holding leftImg8bit/, gtFine/, camera/, leftImg8bit_sequence/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=parse_size, default=(1024, 512), help="WIDTHxHEIGHT as Cityscapes writes it (default 1024x512)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_cityscapes)

    p = data.add_parser("split", help="write a seeded random order of a split's ids (a budget k = its first k lines)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=None, help="keep only the first BUDGET ids")
    p.add_argument("--out", type=Path, required=True, help=".txt (one id per line) or .parquet (id, rank)")
    p.set_defaults(func=cmd_split)

    p = data.add_parser("import-split", help="import a UniMatch/CPS split file ('leftImg8bit/... gtFine/...' per line)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--file", type=Path, required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_import_split)

    p = data.add_parser("preview", help="save a PNG of image, label and depth for a few samples")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("-n", type=int, default=3)
    p.set_defaults(func=cmd_preview)

    p = data.add_parser("info", help="verify a dataset's shards against its manifest and print its summary")
    p.add_argument("--data", type=Path, required=True)
    p.set_defaults(func=cmd_info)

    sde = sub.add_parser("sde", help="self-supervised depth pre-training on a Ray Train worker group (`segsde sde export` for pseudo-depth)",
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
                            "(sde | diversity | difficulty | entropy | random, cached under CACHE)")
    train.add_argument("--storage", "--cache", dest="storage", default=None,
                       help="storage root whose stage cache holds a --selection METHOD's list (default: $SEGSDE_STORAGE, else ./outputs)")
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
                        help="model.pt of `segsde sde` (default: train or reuse the profile's SDE stage under CACHE)")
    select.add_argument("--budgets", type=_budgets, default=None, help="rounds as comma-separated budgets, e.g. 25,50,100 (default: the profile's)")
    select.add_argument("--seed", type=int, default=None, help="selection seed (default 0)")
    select.add_argument("--storage", "--cache", dest="storage", default=None,
                        help="storage root of the stage cache (default: $SEGSDE_STORAGE, else ./outputs, as tune/run_ablation.py)")
    _job_flags(select, "segsde-select", "student_steps=200", resume=False)
    select.set_defaults(func=cmd_select)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except SegSDEError as exc:
        print(f"segsde: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segsde: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
