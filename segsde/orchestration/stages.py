"""Cached stages: a stage's output lives under ``<out>/cache/<stage>-<key>``, where the key hashes the
stage's configuration, so an unchanged stage is reused and never recomputed."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from segsde.data.store import read_manifest, read_side_meta
from segsde.data.synth.scene import SynthConfig
from segsde.errors import SegSDEError
from segsde.profiles import DataProfile

DATA_FORMAT_VERSION = 1  # bump when the renderer changes what a seed produces


@dataclass(frozen=True)
class StageTracking:
    """Where a study records its stages: each stage gets a child run of the study's parent run, keyed
    by the stage's cache entry, so a rerun finds it again instead of adding one."""
    uri: str
    experiment: str
    parent_run_id: str

    def run_kwargs(self, stage: str, path: Path) -> dict:
        """What run_sde / run_select need to make their own run that child run."""
        return {"tracking_uri": self.uri, "experiment": self.experiment, "parent_run_id": self.parent_run_id,
                "run_key": stage_key(stage, path)}


def stage_key(stage: str, path: Path) -> str:
    return f"{stage}:{Path(path).name}"


def record_stage(tracking: StageTracking | None, stage: str, path: Path, hit: bool, info: dict | None = None) -> None:
    """Close the stage's child run (the one its job made, else a new one) with where its output is and
    whether it was reused."""
    if tracking is None:
        return
    from segsde.tracking import RunLogger, end_run, get_or_create_run

    tags = {"segsde.stage": stage, "mlflow.parentRunId": tracking.parent_run_id, "segsde.cache_hit": str(hit).lower()}
    name = Path(path).name
    run_id, _ = get_or_create_run(tracking.uri, tracking.experiment, stage_key(stage, path), name if name.startswith(stage) else f"{stage}-{name}",
                                  {"stage": stage, "path": str(path)}, tags)
    numbers = {k: float(v) for k, v in (info or {}).items() if isinstance(v, (int, float))}
    if numbers:
        RunLogger(tracking.uri, run_id).metrics({f"stage/{k}": v for k, v in numbers.items()}, step=0)
    end_run(tracking.uri, run_id)


def cache_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def dataset_stage(profile: DataProfile, out: Path, seed: int, data_root: Path | None = None,
                  force: bool = False, dry_run: bool = False, log=print, tracking: StageTracking | None = None) -> Path:
    """The study's dataset: the synthetic testbed rendered once per configuration, or a built Cityscapes dataset."""
    if data_root is not None:
        source = read_manifest(data_root)["source"]
        log(f"[data] using the {source} dataset at {data_root}")
        record_stage(tracking, "data", Path(data_root).absolute(), True, {"source": source})
        return Path(data_root).absolute()
    if profile.source == "cityscapes":
        raise SegSDEError("the cityscapes profile needs --data-root: build one with `segsde data cityscapes --root ... --out DIR`")
    h, w = profile.size
    synth = SynthConfig(height=h, width=w)
    config = {"stage": "data", "version": DATA_FORMAT_VERSION, "train": profile.train, "val": profile.val,
              "seed": seed, "generator": asdict(synth)}
    path = Path(out).absolute() / "cache" / f"data-{cache_key(config)}"
    if (path / "manifest.json").is_file() and not force:
        read_manifest(path)
        log(f"[data] cache hit: reusing {path}")
        record_stage(tracking, "data", path, True)
        return path
    if dry_run:
        log(f"[data] would render {profile.train}+{profile.val} samples at {h}x{w} into {path}")
        return path
    from segsde.data.synth.generate import generate

    log(f"[data] rendering {profile.train} train + {profile.val} val samples at {h}x{w} into {path}")
    start = time.perf_counter()
    generate(path, profile.train, profile.val, synth, seed, overwrite=force)
    record_stage(tracking, "data", path, False, {"seconds": time.perf_counter() - start, "train": profile.train, "val": profile.val})
    return path


def sde_stage(profile: str, data: Path, out: Path, tracking_uri: str | None = None, force: bool = False,
              dry_run: bool = False, log=print, tracking: StageTracking | None = None,
              overrides: dict | None = None) -> Path:
    """SDE pre-training on ``data`` (the profile's sde section with ``overrides``), cached by its config and
    dataset; returns the directory with model.pt. An interrupted run of the same configuration continues
    from its last Ray Train checkpoint."""
    from segsde.sde.run import METRICS_FILE, MODEL_FILE, run_sde, sde_config

    cfg = sde_config(profile, overrides)
    config = {"stage": "sde", "config": asdict(cfg), "data": str(Path(data).absolute())}
    path = Path(out).absolute() / "cache" / f"sde-{cache_key(config)}"
    if (path / MODEL_FILE).is_file() and (path / METRICS_FILE).is_file() and not force:
        metrics = json.loads((path / METRICS_FILE).read_text())
        log(f"[sde] cache hit: reusing {path} (AbsRel {metrics.get('abs_rel', float('nan')):.3f})")
        record_stage(tracking, "sde", path, True)
        return path
    if dry_run:
        log(f"[sde] would train {cfg.total_steps} steps (profile '{profile}') into {path}")
        return path
    log(f"[sde] training {cfg.total_steps} steps (profile '{profile}') into {path}")
    job = tracking.run_kwargs("sde", path) if tracking else {"tracking_uri": tracking_uri}
    metrics = run_sde(data, path, profile=profile, overrides=overrides, fresh=force, **job)
    quality = (f"AbsRel {metrics['abs_rel']:.3f}, RMSE {metrics['rmse']:.2f}, d1 {metrics['a1']:.3f} (median-scaled, validation split)"
               if "abs_rel" in metrics else "no ground-truth depth to validate against")
    log(f"[sde] done in {metrics['seconds']:.0f} s: {quality}")
    record_stage(tracking, "sde", path, False)
    return path


def export_stage(sde: Path, data: Path, force: bool = False, dry_run: bool = False, log=print,
                 tracking: StageTracking | None = None) -> None:
    """Pseudo-depth of every sample from the SDE model (``sde``: its model.pt or the directory holding it),
    written into the dataset unless that model's is there."""
    from segsde.data.dataset import PSEUDO_DEPTH
    from segsde.sde.export import export_pseudo_depth
    from segsde.sde.run import MODEL_FILE

    model = Path(sde).absolute()
    model = model / MODEL_FILE if model.is_dir() else model
    meta = read_side_meta(data, PSEUDO_DEPTH)
    if meta is not None and meta.get("checkpoint") == str(model) and not force:
        log(f"[export] cache hit: {data}/side/{PSEUDO_DEPTH}.parquet comes from {model}")
        record_stage(tracking, "export", model.parent, True)
        return
    if dry_run:
        log(f"[export] would write the pseudo-depth of {model} into {data}")
        return
    start = time.perf_counter()
    result = export_pseudo_depth(model, data)
    log(f"[export] wrote the pseudo-depth of {result['images']} images to {result['out']}")
    record_stage(tracking, "export", model.parent, False, {"seconds": time.perf_counter() - start, "images": result["images"]})


def selection_stage(method: str, profile: str, data: Path, out: Path, seed: int = 0, budget: int | None = None,
                    sde_model: Path | None = None, tracking_uri: str | None = None, force: bool = False,
                    dry_run: bool = False, log=print, tracking: StageTracking | None = None,
                    overrides: dict | None = None) -> Path:
    """The ordered selection list of ``method`` with the profile's schedule up to ``budget`` (see
    ``SelectionConfig.with_budget``) and the select section's ``overrides``, cached by configuration;
    returns the Parquet file. Without ``sde_model`` the profile's cached SDE stage provides the depth teacher."""
    from segsde.selection.config import NEEDS_FEATURES, NEEDS_STUDENT
    from segsde.selection.run import check_method, read_selection_meta, run_select, selection_config

    check_method(method)
    cfg = selection_config(profile, {**(overrides or {}), "seed": seed})
    cfg = cfg.with_budget(budget) if budget is not None else cfg
    needs_sde = method in NEEDS_FEATURES + NEEDS_STUDENT
    config = {"stage": "select", "method": method, "config": asdict(cfg), "data": str(Path(data).absolute()),
              "sde_model": str(Path(sde_model).absolute()) if sde_model and needs_sde else None}
    path = Path(out).absolute() / "cache" / f"select-{method}-s{seed}-{cache_key(config)}.parquet"
    if path.is_file() and read_selection_meta(path) is not None and not force:
        log(f"[select] cache hit: reusing {path}")
        record_stage(tracking, "select", path, True)
        return path
    if dry_run:
        log(f"[select] would select {cfg.budgets[-1]} images with '{method}' (seed {seed}) into {path}")
        return path
    job = tracking.run_kwargs("select", path) if tracking else {"tracking_uri": tracking_uri}
    result = run_select(data, method, path, sde_checkpoint=sde_model if needs_sde else None, profile=profile,
                        overrides={**(overrides or {}), "seed": seed, "budgets": list(cfg.budgets)}, cache_root=out, fresh=force, log=log, **job)
    record_stage(tracking, "select", path, False, {"seconds": result["seconds"]})
    return path
