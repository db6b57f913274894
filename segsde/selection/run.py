"""The data-selection driver: run the selection as one Ray Train job (segsde/selection/rounds.py: features,
rounds, picks), write the ordered list and log it to MLflow.

Every method returns one ordered id list whose prefixes are the smaller budgets. The job takes resolved
inputs (the dataset and, for the SDE-based methods, the SDE model and its pseudo-depth: see
``orchestration.stages.select_inputs``). Its checkpoints live in ``<out>.work/`` under the same storage root
(after the features, after each round and every ``checkpoint_interval`` steps), so an interrupted selection
continues where it stopped; the Parquet file appears only when the whole list is done, and the work
directory is removed then.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from segsde.data.dataset import class_pixels
from segsde.data.splits import random_order
from segsde.data.store import local_dataset, read_manifest, read_side_meta, split_ids
from segsde.errors import SegSDEError
from segsde.profiles import load_profile
from segsde.selection.config import METHODS, NEEDS_FEATURES, NEEDS_STUDENT, SelectionConfig
from segsde.storage import Location, as_location, cache_key, localize

SELECTION_RUN = "selection"  # the Ray Train run's name: its checkpoints are in work_dir(out)/ray/selection
COLUMNS = ("id", "rank", "round", "score", "distance", "difficulty", "entropy")


def selection_config(profile: str, overrides: dict | None = None) -> SelectionConfig:
    section = load_profile(profile).get("select")
    if not isinstance(section, dict):
        raise SegSDEError(f"profile '{profile}' has no 'select' section in ablations/profiles.yaml: add one")
    return SelectionConfig.from_dict({**section, **(overrides or {})}, where=f"profile '{profile}' select section")


def check_method(method: str) -> None:
    if method not in METHODS:
        import difflib

        close = difflib.get_close_matches(method, METHODS, n=1)
        raise SegSDEError(f"unknown selection method '{method}': " + (f"did you mean '{close[0]}'?" if close else f"choose one of {list(METHODS)}"))


def class_coverage(counts: np.ndarray, chosen: np.ndarray) -> float:
    """Share of the classes present in the pool that occur in the chosen images."""
    present = counts.sum(0) > 0
    return float((counts[chosen].sum(0) > 0)[present].mean())


def class_balance(counts: np.ndarray, chosen: np.ndarray) -> float:
    """Normalised entropy of the chosen images' class pixel distribution over the pool's classes: 1 when
    every class has the same number of pixels, lower the more a few classes dominate."""
    present = counts.sum(0) > 0
    p = counts[chosen].sum(0)[present].astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum() / np.log(present.sum())) if present.sum() > 1 else 1.0


def write_selection(path: Location | Path, records: list[dict], meta: dict) -> None:
    table = pa.table({c: [r.get(c) for r in records] for c in COLUMNS},
                     schema=pa.schema([("id", pa.string()), ("rank", pa.int64()), ("round", pa.int64())] +
                                      [(c, pa.float64()) for c in COLUMNS[3:]]))
    table = table.replace_schema_metadata({"segsde.selection": json.dumps(meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    as_location(path).write_bytes(sink.getvalue().to_pybytes())


def read_selection_meta(path: Location | Path) -> dict | None:
    path = as_location(path)
    try:
        meta = pq.read_schema(path.path, filesystem=path.filesystem).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    raw = meta.get(b"segsde.selection")
    return json.loads(raw) if raw else None


def work_dir(out: Location) -> Location:
    """Where a selection into ``out`` keeps its key and its Ray Train run until it is written whole."""
    return out.with_name(out.name + ".work")


def run_select(data: Location | Path, method: str, out: Location | Path, sde_checkpoint: Location | Path | None = None,
               profile: str = "quick", overrides: dict | None = None, workers: int = 1, gpu: bool = False,
               address: str | None = None, tracking_uri: str | None = None, experiment: str = "segsde-select",
               fresh: bool = False, parent_run_id: str | None = None, run_key: str | None = None, log=None) -> dict:
    """Select ``cfg.budgets[-1]`` images of ``data``'s training split with ``method``; write ``out``."""
    from segsde.runtime.ray_job import check_resources
    from segsde.tracking import RunLogger, resolve_tracking_uri, study_tags, tracked_run

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    check_method(method)
    cfg = selection_config(profile, overrides)
    data, out = as_location(data), as_location(out)
    if not out.name.endswith(".parquet"):
        raise SegSDEError(f"--out {out} must end in .parquet (the selection is written as id, rank, round, score parts)")
    local = local_dataset(data)
    manifest = read_manifest(local)
    if "train" not in manifest["splits"]:
        raise SegSDEError(f"{data} has no 'train' split to select from (it has {sorted(manifest['splits'])}): rebuild it")
    pool = sorted(split_ids(local, "train"))
    if cfg.budgets[-1] > len(pool):
        raise SegSDEError(f"the largest budget {cfg.budgets[-1]} exceeds the pool of {len(pool)} images: lower --budgets")
    check_resources(workers, gpu, address)
    counts = class_pixels(local, pool)
    if method == "entropy" and counts is None:
        raise SegSDEError(f"the entropy baseline trains on the labels it selects, and {data} has unlabeled training images: "
                          "use a labeled pool or another method")
    sde_model = as_location(sde_checkpoint) if sde_checkpoint is not None and method in NEEDS_FEATURES + NEEDS_STUDENT else None
    if method in NEEDS_FEATURES + NEEDS_STUDENT and sde_model is None:
        raise SegSDEError(f"method '{method}' needs the SDE model: pass --sde-checkpoint MODEL.pt (written by `segsde sde`)")
    if method in NEEDS_STUDENT and read_side_meta(local, cfg.pseudo_depth) is None:
        raise SegSDEError(f"method '{method}' trains its student on the SDE pseudo-depth, which {data} lacks: run "
                          "`segsde sde export --checkpoint MODEL.pt --data DIR` first")
    meta = {"method": method, "config": asdict(cfg), "data": str(data), "sde_model": str(sde_model) if sde_model else None}
    work = work_dir(out)
    key = cache_key(meta)
    if fresh or not work.child("key").is_file() or work.child("key").read_text() != key:
        work.delete()
        work.child("key").write_text(key)
    else:
        log(f"[select] continuing the interrupted selection in {work}")
    uri = resolve_tracking_uri(out.parent, tracking_uri)
    job = {"workers": workers, "gpu": gpu, "threads": cfg.threads or 1, "address": address}
    tags = {**study_tags("select", parent_run_id, run_key), "segsde.method": method}
    start = time.perf_counter()
    with tracked_run(uri, experiment, f"select-{method}-s{cfg.seed}", {**meta, "profile": profile, "workers": workers}, tags) as run_id:
        logger = RunLogger(uri, run_id)
        records = _select(method, cfg, data, pool, sde_model, work, job, logger, {"tracking_uri": uri, "mlflow_run_id": run_id})
        coverage = _log_selection(logger, records, cfg, method, pool, counts)
        write_selection(out, records, {**meta, "seed": cfg.seed, "budgets": list(cfg.budgets)})
        logger.artifact(localize(out), "selection")
    work.delete()
    seconds = round(time.perf_counter() - start, 1)
    log(f"[select] '{method}' chose {len(records)} of {len(pool)} images in {seconds:.0f} s -> {out}")
    return {"out": str(out), "method": method, "seed": cfg.seed, "budgets": list(cfg.budgets), "ids": len(records),
            "first": [r["id"] for r in records[:3]], "class_coverage": coverage, "seconds": seconds, "mlflow_run_id": run_id}


def _select(method: str, cfg: SelectionConfig, data: Location, pool: list[str], sde_model: Location | None, work: Location,
            job: dict, logger, run: dict) -> list[dict]:
    """The ordered records: a seeded permutation for `random`, else one Ray Train job (segsde/selection/rounds.py)
    whose checkpoints under ``work`` let a rerun continue an interrupted selection; ``run`` (tracking_uri,
    mlflow_run_id) is the run its worker tags with its node."""
    from segsde.runtime.ray_job import fit
    from segsde.selection.rounds import RESULT_FILE, new_record, ranked

    if method == "random":
        return ranked([new_record(sid) for sid in random_order(pool, cfg.seed)[: cfg.budgets[-1]]], cfg.budgets)
    config = {"select": asdict(cfg), "method": method, "data": data.uri, "pool": pool,
              "sde_model": sde_model.uri if sde_model else None, **run}
    result = fit(_selection_job, config, SELECTION_RUN, work.child("ray"), fresh=False, **job)
    if result.checkpoint is None:
        raise SegSDEError(f"the selection job in {work} reported no result: rerun with --fresh")
    with result.checkpoint.as_directory() as d:
        payload = torch.load(Path(d) / RESULT_FILE, map_location="cpu", weights_only=True)
    score = "difficulty" if method in NEEDS_STUDENT else "entropy"
    for stat in payload["rounds"]:
        logger.metrics({"select/round_seconds": stat["seconds"], f"select/mean_{score}": stat["mean_score"]}, step=stat["round"])
    return payload["records"]


def _log_selection(logger, records: list[dict], cfg: SelectionConfig, method: str, pool: list[str], counts) -> dict:
    import matplotlib.pyplot as plt

    from segsde.selection.figures import class_histogram, score_parts

    coverage = {}
    index = {sid: k for k, sid in enumerate(pool)}
    if counts is not None:
        chosen = np.array([index[r["id"]] for r in records])
        for b in cfg.budgets:
            coverage[b] = class_coverage(counts, chosen[:b])
            logger.metrics({"select/class_coverage": 100 * coverage[b], "select/class_balance": 100 * class_balance(counts, chosen[:b])},
                           step=b)  # in percent, as every share the trials log
        fig = class_histogram(counts.sum(0), np.stack([counts[chosen[:b]].sum(0) for b in cfg.budgets]), list(cfg.budgets), method)
        logger.figure(fig, "figures/class_histogram.png")
        plt.close(fig)
    fig = score_parts(records, list(cfg.budgets), cfg.weight, method)
    logger.figure(fig, "figures/score_parts.png")
    plt.close(fig)
    return coverage


def _selection_job(config: dict) -> None:
    from segsde.selection.rounds import selection_loop

    selection_loop(config)
