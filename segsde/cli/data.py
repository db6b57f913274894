"""``segsde data``: build, inspect and split datasets."""

from __future__ import annotations

import sys
from pathlib import Path

from segsde.cli.flags import non_negative, parse_size, positive


def cmd_synth(args) -> dict:
    from segsde.data.synth.generate import generate
    from segsde.data.synth.scene import SynthConfig

    h, w = args.size
    cfg = SynthConfig(height=h, width=w, difficulty=args.difficulty, moving_prob=args.moving_prob)
    m = generate(args.out, args.train, args.val, cfg, args.seed, workers=args.workers, overwrite=args.overwrite, n_tune=args.tune)
    return {"out": str(Path(args.out).absolute()), "splits": m["splits"], "shards": len(m["shards"])}


def cmd_cityscapes(args) -> dict:
    from functools import partial

    from segsde.data import cityscapes
    from segsde.orchestration.preflight import preflight
    from segsde.runtime.shards import build_on_ray
    from segsde.storage import as_location

    w, h = args.size
    root, out = as_location(args.root), as_location(args.out)
    stride = 0 if args.no_sequences else args.sequence_stride
    strict = args.tune_cities is not None  # named cities must exist; the default's are taken where present
    tune_cities = tuple(c for c in args.tune_cities.split(",") if c and c != "none") if strict else cityscapes.TUNE_CITIES
    tasks, description, skipped = cityscapes.plan(root, (h, w), stride, tune_cities, strict)
    print(f"[cityscapes] {sum(t.rows for t in tasks)} samples in {len(tasks)} shards from {root}"
          + (f"; {len(skipped)} snippet(s) with missing frames skipped" if skipped else ""), file=sys.stderr, flush=True)
    m = build_on_ray(out, tasks, partial(cityscapes.convert_task, root.uri, (h, w)), description, source="cityscapes",
                     address=args.address, workers=args.workers, overwrite=args.overwrite, skipped=skipped,
                     check_nodes=lambda where: preflight(where, tracking_uri="", fix=(
                         f"a cluster's nodes do not share the driver's disk, so write to a path every node mounts or "
                         f"under s3:// (--out {where} is not one)")),
                     size=[h, w], root=root.uri, sequence_stride=stride, tune_cities=list(tune_cities))
    done = m["converted"]
    return {"out": str(out), "splits": m["splits"], "shards": len(m["shards"]), "skipped_snippets": len(m["skipped"]),
            "skipped_first": m["skipped"][:3], "converted": done | {"frames_per_s": done["frames"] / max(done["seconds"], 1e-9)}}


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
    from segsde.data.store import TUNE_SPLIT, split_ids
    from segsde.errors import SegSDEError

    ids = import_split_file(args.file)
    tuning = set(ids) & set(split_ids(args.data, TUNE_SPLIT))
    if tuning and args.split != TUNE_SPLIT:
        raise SegSDEError(f"{args.file} lists {len(tuning)} frames of the tuning split (e.g. {sorted(tuning)[0]}), which no budget may "
                          "train on: rebuild the dataset with --tune-cities none (or other cities) to use this split file")
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


def add_data_commands(sub) -> None:
    from segsde.data.cityscapes import TUNE_CITIES

    data = sub.add_parser("data", help="build, inspect and split datasets").add_subparsers(dest="data_command", required=True)

    p = data.add_parser("synth", help="render the synthetic street-scene testbed (Parquet shards + manifest)")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    p.add_argument("--train", type=non_negative, default=256, help="training samples (default 256)")
    p.add_argument("--val", type=non_negative, default=64, help="validation samples (default 64)")
    p.add_argument("--tune", type=non_negative, default=64, help="tuning-split samples, scored by a sweep's search (default 64)")
    p.add_argument("--size", type=parse_size, default=(128, 256), help="HEIGHTxWIDTH, e.g. 128x256 (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=float, default=0.5, help="appearance variation and clutter in [0, 1]")
    p.add_argument("--moving-prob", type=float, default=0.3, help="probability that a road user moves on its own")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("cityscapes", help="convert a Cityscapes tree (annotated frames and the unlabeled video around them) "
                                           "as Ray tasks on every core; rerun the same command to resume")
    p.add_argument("--root", required=True, help="folder or storage URI holding leftImg8bit/, leftImg8bit_sequence/, gtFine/, "
                                                 "camera/ (readable on every node)")
    p.add_argument("--out", required=True, help="dataset directory: a path every node mounts, or under s3://bucket/prefix")
    p.add_argument("--size", type=parse_size, default=(1024, 512), help="WIDTHxHEIGHT as Cityscapes writes it (default 1024x512)")
    p.add_argument("--sequence-stride", type=positive, default=1,
                   help="every K-th frame of each training snippet that has both neighbours becomes an unlabeled triplet "
                        "of the 'sequence' split (default 1: all, 27 a snippet)")
    p.add_argument("--no-sequences", action="store_true", help="convert only the annotated frames")
    p.add_argument("--tune-cities", default=None,
                   help="comma-separated training cities whose annotated frames form the 'tune' split, out of every labeled "
                        f"budget, pool and SDE sequence: what a sweep's search scores on (default: {','.join(TUNE_CITIES)} "
                        "where present; 'none': keep every city for training)")
    p.add_argument("--workers", type=int, default=None, help="CPUs of the local Ray instance (default: all; ignored with --address)")
    p.add_argument("--address", default=None, help="Ray cluster address (`auto` on a `ray up` cluster; default: local Ray)")
    p.add_argument("--overwrite", action="store_true", help="delete what --out holds first")
    p.set_defaults(func=cmd_cityscapes, interrupted="the finished shards are kept: rerun the same command to convert the rest")

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
