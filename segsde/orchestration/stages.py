"""Cached stages: a stage's output lives under ``<storage>/cache/<stage>-<key>``, where the key hashes the
stage's configuration, its code (``keys.code_version``) and the keys of its input stages (never where the
storage is), so an unchanged stage is reused and never recomputed, also from another --out or storage root.
An entry counts only once its marker is there (a dataset's manifest, an SDE model's metrics file, a
selection's Parquet metadata)."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from segsde.data.store import MANIFEST, local_dataset, read_manifest
from segsde.data.synth.scene import SynthConfig
from segsde.errors import SegSDEError
from segsde.orchestration.keys import code_version, describe, entry_key, remember, why_missed
from segsde.profiles import DataProfile, data_profile
from segsde.storage import Location, as_location, localize

__all__ = ["dataset_stage", "sde_stage", "train_checkpoints", "export_stage", "selection_stage", "select_inputs", "input_id",
           "input_stages", "model_stages", "trial_inputs"]


@dataclass(frozen=True)
class StageTracking:
    """Where a study records its stages: each stage gets a child run of ``stages_run_id`` (a run of its own
    under the study's, so that the study's children are its trials alone; else the study's parent run), keyed by
    the stage's cache entry, so a rerun finds it again instead of adding one."""
    uri: str
    experiment: str
    parent_run_id: str
    stages_run_id: str | None = None

    @property
    def stage_parent(self) -> str:
        return self.stages_run_id or self.parent_run_id

    def run_kwargs(self, stage: str, path: Location) -> dict:
        """What run_sde / run_select need to make their own run that child run."""
        return {"tracking_uri": self.uri, "experiment": self.experiment, "parent_run_id": self.stage_parent,
                "run_key": stage_key(stage, path)}


def stage_key(stage: str, path: Location) -> str:
    return f"{stage}:{as_location(path).name}"


def record_stage(tracking: StageTracking | None, stage: str, path: Location, hit: bool, info: dict | None = None) -> None:
    """Close the stage's child run (the one its job made, else a new one) with where its output is and
    whether it was reused."""
    if tracking is None:
        return
    from segsde.tracking import RunLogger, end_run, get_or_create_run

    tags = {"segsde.stage": stage, "mlflow.parentRunId": tracking.stage_parent, "segsde.cache_hit": str(hit).lower()}
    name = as_location(path).name
    run_id, _ = get_or_create_run(tracking.uri, tracking.experiment, stage_key(stage, path), name if name.startswith(stage) else f"{stage}-{name}",
                                  {"stage": stage, "path": str(path)}, tags)
    numbers = {k: float(v) for k, v in (info or {}).items() if isinstance(v, (int, float))}
    if numbers:
        RunLogger(tracking.uri, run_id).metrics({f"stage/{k}": v for k, v in numbers.items()}, step=0)
    end_run(tracking.uri, run_id)


def missed(storage: Location, path: Location, prefix: str, stage: str, config: dict, force: bool, dry_run: bool) -> str:
    """Why the entry at ``path`` is computed, for the log; outside a dry run its key's description is kept,
    so that the next miss of its kind can say what changed."""
    storage, description = as_location(storage), describe(stage, config)
    reason = "forced" if force else f"not cached: {why_missed(storage, path.name, prefix, description)}"
    if not dry_run:
        remember(storage, path.name, description)
    return reason


def input_id(where: Location | str | None) -> str | None:
    """What a cache key records of an input: a stage entry by its own name (``cache/sde-KEY/model.pt`` ->
    ``sde-KEY/model.pt``, which hashes that stage's inputs in turn), any other file by its content's hash
    and any other dataset by its manifest's (which holds every shard's checksum); never where it lies."""
    if where is None:
        return None
    where = as_location(where)
    parts = where.uri.partition("?")[0].rstrip("/").split("/")
    if "cache" in parts[:-1]:
        return "/".join(parts[parts.index("cache") + 1:])
    if where.is_file():
        return f"file-{hashlib.sha256(where.read_bytes()).hexdigest()[:12]}"
    return "dataset-" + hashlib.sha256(where.child(MANIFEST).read_bytes()).hexdigest()[:12]


def dataset_stage(profile: DataProfile, storage: Location, seed: int, data_root: Location | None = None,
                  force: bool = False, dry_run: bool = False, log=print, tracking: StageTracking | None = None) -> Location:
    """The study's dataset: the synthetic testbed rendered once per configuration, or a built Cityscapes dataset."""
    if data_root is not None:
        data_root = as_location(data_root)
        source = read_manifest(local_dataset(data_root))["source"]
        log(f"[data] using the {source} dataset at {data_root}")
        record_stage(tracking, "data", data_root, True, {"source": source})
        return data_root
    if profile.source == "cityscapes":
        raise SegSDEError("the cityscapes profile needs --data-root: build one with `segsde data cityscapes --root ... --out DIR`")
    h, w = profile.size
    synth = SynthConfig(height=h, width=w)
    config = {"stage": "data", "train": profile.train, "val": profile.val, "tune": profile.tune, "seed": seed, "generator": asdict(synth)}
    path = as_location(storage).child("cache", f"data-{entry_key('data', config)}")
    if path.child(MANIFEST).is_file() and not force:
        if not dry_run:
            local_dataset(path)
        log(f"[data] cache hit: reusing {path}")
        record_stage(tracking, "data", path, True)
        return path
    reason = missed(storage, path, "data-", "data", config, force, dry_run)
    if dry_run:
        log(f"[data] would render {profile.train}+{profile.val}+{profile.tune} samples at {h}x{w} into {path} ({reason})")
        return path
    from segsde.data.synth.generate import generate

    log(f"[data] rendering {profile.train} train + {profile.val} val + {profile.tune} tune samples at {h}x{w} into {path} ({reason})")
    start = time.perf_counter()
    if path.is_local:
        generate(Path(path.path), profile.train, profile.val, synth, seed, overwrite=force, n_tune=profile.tune)
    else:  # rendered here, then published with its manifest last
        with tempfile.TemporaryDirectory(prefix="segsde-render-") as tmp:
            generate(Path(tmp) / "data", profile.train, profile.val, synth, seed, n_tune=profile.tune)
            path.delete()
            path.upload_dir(Path(tmp) / "data", marker=MANIFEST)
    record_stage(tracking, "data", path, False,
                 {"seconds": time.perf_counter() - start, "train": profile.train, "val": profile.val, "tune": profile.tune})
    return path


def train_checkpoints(storage: str | Location, key: str) -> Location:
    """Where the Train run of the trial with key ``key`` keeps its checkpoints under the storage root."""
    return as_location(storage).child("ray", f"train-{key}")


def running_checkpoints(storage: str | Location, tags: dict) -> Location | None:
    """Where the Ray Train run behind a trial's, SDE stage's or selection's MLflow run (its ``tags``) keeps its
    checkpoints."""
    from segsde.sde.run import SDE_RUN, TRAINING_STATE
    from segsde.selection.run import SELECTION_RUN, work_dir
    from segsde.tracking import KEY_TAG

    stage, key = tags.get("segsde.stage"), tags.get(KEY_TAG, "")
    if stage == "train" and key:
        return train_checkpoints(storage, key)
    entry = as_location(storage).child("cache", key.partition(":")[2])  # stage_key's form
    if stage == "sde" and key.startswith("sde:"):
        return entry.child(TRAINING_STATE, SDE_RUN)
    if stage == "select" and key.startswith("select:"):
        return work_dir(entry).child("ray", SELECTION_RUN)
    return None


def sde_stage(profile: str, data: Location, storage: Location, tracking_uri: str | None = None, force: bool = False,
              dry_run: bool = False, log=print, tracking: StageTracking | None = None,
              overrides: dict | None = None, keep_checkpoints: bool = False) -> Location:
    """SDE pre-training on ``data`` (the profile's sde section with ``overrides``), cached by its config and
    dataset; returns the entry holding model.pt. An interrupted run of the same configuration continues
    from its last Ray Train checkpoint; a finished one keeps its model and metrics, and its training state
    (networks, optimiser: ~3x the model) only with ``keep_checkpoints``."""
    from segsde.sde.run import METRICS_FILE, MODEL_FILE, TRAINING_STATE, run_sde, sde_config

    cfg = sde_config(profile, overrides)
    config = {"stage": "sde", "config": asdict(cfg), "data": input_id(data)}
    path = as_location(storage).child("cache", f"sde-{entry_key('sde', config)}")
    if path.child(MODEL_FILE).is_file() and path.child(METRICS_FILE).is_file() and not force:
        metrics = json.loads(path.child(METRICS_FILE).read_text())
        log(f"[sde] cache hit: reusing {path} (AbsRel {metrics.get('abs_rel', float('nan')):.3f})")
        if not (keep_checkpoints or dry_run):  # a kill between the metrics and the clean-up left them
            path.child(TRAINING_STATE).delete()
        record_stage(tracking, "sde", path, True)
        return path
    reason = missed(storage, path, "sde-", "sde", config, force, dry_run)
    if dry_run:
        log(f"[sde] would train {cfg.total_steps} steps (profile '{profile}') into {path} ({reason})")
        return path
    log(f"[sde] training {cfg.total_steps} steps (profile '{profile}') into {path} ({reason})")
    job = tracking.run_kwargs("sde", path) if tracking else {"tracking_uri": tracking_uri}
    metrics = run_sde(data, path, profile=profile, overrides=overrides, fresh=force, **job)
    quality = (f"AbsRel {metrics['abs_rel']:.3f}, RMSE {metrics['rmse']:.2f}, d1 {metrics['a1']:.3f} (median-scaled, validation split)"
               if "abs_rel" in metrics else "no ground-truth depth to validate against")
    log(f"[sde] done in {metrics['seconds']:.0f} s: {quality}")
    if not keep_checkpoints:
        path.child(TRAINING_STATE).delete()
    record_stage(tracking, "sde", path, False)
    return path


def export_stage(model: Location, data: Location, force: bool = False, dry_run: bool = False, log=print,
                 tracking: StageTracking | None = None) -> str:
    """Pseudo-depth of every sample from the SDE model file ``model``, written into the dataset as that model's own
    side column unless it is there (its side files published with the metadata last). Returns the column's name."""
    from segsde.data.dataset import pseudo_depth_column
    from segsde.data.store import SIDE_DIR
    from segsde.sde.export import export_pseudo_depth

    model, data = as_location(model), as_location(data)
    column = pseudo_depth_column(input_id(model))
    source = f"{input_id(model)}@{code_version('export')}"  # a new export code writes the column again
    side = data.child(SIDE_DIR, f"{column}.json")
    meta = json.loads(side.read_text()) if side.is_file() else None
    if meta is not None and meta.get("checkpoint") == source and not force:
        log(f"[export] cache hit: {data.child(SIDE_DIR, column + '.parquet')} comes from {source}")
        record_stage(tracking, "export", model.parent, True)
        return column
    if dry_run:
        log(f"[export] would write the pseudo-depth of {source} into {data}")
        return column
    start = time.perf_counter()
    local = local_dataset(data)
    result = export_pseudo_depth(localize(model), local, source=source, column=column)
    if not data.is_local:  # the column first, its metadata (what readers check) last
        for name in (f"{column}.parquet", f"{column}.json"):
            data.child(SIDE_DIR, name).upload_file(local / SIDE_DIR / name)
    log(f"[export] wrote the pseudo-depth of {result['images']} images to {data.child(SIDE_DIR, column + '.parquet')}")
    record_stage(tracking, "export", model.parent, False, {"seconds": time.perf_counter() - start, "images": result["images"]})
    return column


def selection_stage(method: str, profile: str, data: Location, storage: Location, seed: int = 0, budget: int | None = None,
                    sde_model: Location | None = None, tracking_uri: str | None = None, force: bool = False,
                    dry_run: bool = False, log=print, tracking: StageTracking | None = None,
                    overrides: dict | None = None, pseudo_depth: str | None = None) -> Location:
    """The ordered selection list of ``method`` with the profile's schedule up to ``budget`` (see
    ``SelectionConfig.with_budget``) and the select section's ``overrides``, cached by configuration;
    returns the Parquet file. Methods that need the SDE model are given ``sde_model`` and its pseudo-depth column
    (see ``select_inputs``)."""
    from segsde.selection.config import NEEDS_FEATURES, NEEDS_STUDENT
    from segsde.selection.run import check_method, read_selection_meta, run_select, selection_config

    check_method(method)
    if method in NEEDS_STUDENT and pseudo_depth is not None:
        overrides = {**(overrides or {}), "pseudo_depth": pseudo_depth}
    cfg = selection_config(profile, {**(overrides or {}), "seed": seed})
    cfg = cfg.with_budget(budget) if budget is not None else cfg
    needs_sde = method in NEEDS_FEATURES + NEEDS_STUDENT
    config = {"stage": "select", "method": method, "config": asdict(cfg), "data": input_id(data),
              "sde_model": input_id(sde_model) if needs_sde else None,
              "pseudo_depth": code_version("export") if method in NEEDS_STUDENT else None}  # its student learns the export
    path = as_location(storage).child("cache", f"select-{method}-s{seed}-{entry_key('select', config)}.parquet")
    if path.is_file() and read_selection_meta(path) is not None and not force:
        log(f"[select] cache hit: reusing {path}")
        record_stage(tracking, "select", path, True)
        return path
    reason = missed(storage, path, f"select-{method}-s{seed}-", "select", config, force, dry_run)
    if dry_run:
        log(f"[select] would select {cfg.budgets[-1]} images with '{method}' (seed {seed}) into {path} ({reason})")
        return path
    log(f"[select] selecting {cfg.budgets[-1]} images with '{method}' (seed {seed}) into {path} ({reason})")
    job = tracking.run_kwargs("select", path) if tracking else {"tracking_uri": tracking_uri}
    result = run_select(data, method, path, sde_checkpoint=sde_model if needs_sde else None, profile=profile,
                        overrides={**(overrides or {}), "seed": seed, "budgets": list(cfg.budgets)}, fresh=force, log=log, **job)
    record_stage(tracking, "select", path, False, {"seconds": result["seconds"]})
    return path


def select_inputs(method: str, profile: str, data: Location, storage: Location, sde_checkpoint: Location | None = None,
                  tracking_uri: str | None = None, log=print) -> tuple[Location | None, str | None]:
    """What a selection by ``method`` reads besides the dataset, computed or reused: the SDE model (the given
    one, else the profile's SDE stage) and, for the methods that train a student on it, its pseudo-depth.
    Returns (the SDE model, its pseudo-depth column), None where the method reads none."""
    from segsde.sde.run import MODEL_FILE
    from segsde.selection.config import NEEDS_FEATURES, NEEDS_STUDENT

    if method not in NEEDS_FEATURES + NEEDS_STUDENT:
        return None, None
    if sde_checkpoint is not None:
        model = as_location(sde_checkpoint)
        if not model.is_file():
            raise SegSDEError(f"--sde-checkpoint {model} does not exist: pass the model.pt written by `segsde sde`, or leave it out")
    else:
        model = sde_stage(profile, data, storage, tracking_uri=tracking_uri, log=log).child(MODEL_FILE)
    return model, export_stage(model, data, log=log) if method in NEEDS_STUDENT else None


def trial_selection(selection: str | None, profile: str, row: str, overrides: dict, data, storage, sde_model=None,
                    tracking_uri: str | None = None, log=print) -> tuple[dict, Location | None]:
    """`segsde train --selection`: a selection method becomes its cached list (computed if missing, with the
    SDE model it reads); a file stays itself. Returns the overrides (the row labels that list's prefix) and the list."""
    from segsde.selection.config import METHODS
    from segsde.trainer.run import train_config

    if selection is None or str(selection) not in METHODS:
        return overrides, as_location(selection) if selection is not None else None
    overrides = {**overrides, "labeled": "selection", "selection": str(selection)}
    cfg = train_config(profile, row, overrides)
    model, pseudo_depth = select_inputs(cfg.selection, profile, data, storage, sde_model, tracking_uri, log)
    return overrides, selection_stage(cfg.selection, profile, data, storage, seed=cfg.seed, budget=cfg.budget,
                                      sde_model=model, tracking_uri=tracking_uri, log=log, pseudo_depth=pseudo_depth)


def input_stages(profile: str, train_configs: list, seeds, storage: Location, data_root: Location | None, data_seed: int,
                 force=(), dry_run: bool = False, log=print, tracking: StageTracking | None = None,
                 sde_overrides: dict | None = None, select_overrides: dict | None = None,
                 keep_checkpoints: bool = False) -> tuple[Location, dict, dict]:
    """The stages every trial of ``train_configs`` needs, computed or reused: the dataset, then
    ``model_stages``. Returns (data, {kind: sde model}, {(method, seed): list file})."""
    data = dataset_stage(data_profile(profile), storage, data_seed, data_root, "data" in force, dry_run, log, tracking)
    return (data, *model_stages(profile, train_configs, seeds, storage, data, force, dry_run=dry_run, log=log, tracking=tracking,
                                sde_overrides=sde_overrides, select_overrides=select_overrides, keep_checkpoints=keep_checkpoints))


def model_stages(profile: str, train_configs: list, seeds, storage: Location, data: Location, force=(), per_seed: bool = False,
                 dry_run: bool = False, log=print, tracking: StageTracking | None = None, sde_overrides: dict | None = None,
                 select_overrides: dict | None = None, ready=lambda name: None, keep_checkpoints: bool = False) -> tuple[dict, dict]:
    """The stages after the dataset, computed or reused: the SDE model (the profile's sde section with
    ``sde_overrides``; with ``per_seed`` one per seed, of that seed) and its pseudo-depth (when a row uses them), the
    depth-oracle SDE model (when a row transfers from it), and each seed's selection list of every selection method
    (long enough for the largest budget, from that seed's SDE model), the one most rows use first. ``ready`` is
    called with each output's ``trial_inputs`` name once it exists. Returns ({(kind, seed): sde model} with kind
    "self_supervised" / "depth_oracle", {(method, seed): list file}). ``keep_checkpoints``: see ``sde_stage``."""
    largest = max(tc.budget for tc in train_configs)
    manifest = data.child(MANIFEST)
    available = json.loads(manifest.read_text())["splits"].get("train", 0) if manifest.is_file() else largest
    if largest > available:
        raise SegSDEError(f"budget {largest} is larger than the {available} training images of {data}: lower --budgets")
    from segsde.sde.run import MODEL_FILE

    sde_models, columns = {}, {}
    def sde_models_of(kind: str, overrides: dict, export: bool) -> None:
        made = {}
        for seed in seeds:
            run_seed = seed if per_seed else None
            if run_seed not in made:
                made[run_seed] = sde_stage(profile, data, storage, None, "sde" in force, dry_run, log, tracking,
                                           {**overrides, **({"seed": seed} if per_seed else {})}, keep_checkpoints).child(MODEL_FILE)
                if export:
                    columns[run_seed] = export_stage(made[run_seed], data, bool({"export", "sde"} & set(force)), dry_run, log, tracking)
            sde_models[(kind, seed)] = made[run_seed]
            ready(sde_input(kind, seed))

    uses_sde = [tc for tc in train_configs if tc.needs_sde]
    if any(tc.sde_model == "self_supervised" for tc in uses_sde) or any(tc.labeled == "selection" and tc.selection not in ("random", "entropy")
                                                                        for tc in train_configs):
        sde_models_of("self_supervised", sde_overrides or {}, export=True)
    if any(tc.sde_model == "depth_oracle" for tc in uses_sde):  # the positive control's
        sde_models_of("depth_oracle", {**(sde_overrides or {}), "oracle": "depth"}, export=False)
    selections = {}
    methods = [tc.selection for tc in train_configs if tc.labeled == "selection" and tc.selection]
    for method in sorted(set(methods), key=lambda m: (-methods.count(m), m)):
        for seed in seeds:
            selections[(method, seed)] = selection_stage(
                method, profile, data, storage, seed=seed, budget=largest, sde_model=sde_models.get(("self_supervised", seed)),
                force=bool({"select", "sde"} & set(force)), dry_run=dry_run, log=log, tracking=tracking,
                overrides=select_overrides, pseudo_depth=columns.get(seed if per_seed else None))
            ready(selection_input(method, seed))
    return sde_models, selections


def sde_input(kind: str, seed: int) -> str:
    return f"sde-{kind}-s{seed}"


def trial_inputs(tc, seed: int) -> frozenset[str]:
    """The stage outputs a trial of train config ``tc`` and ``seed`` reads: its SDE model with its pseudo-depth
    (``sde_input``) and its selection list (``selection_input``)."""
    return frozenset(([sde_input(tc.sde_model, seed)] if tc.needs_sde else [])
                     + ([selection_input(tc.selection, seed)] if tc.labeled == "selection" and tc.selection else []))


def selection_input(method: str, seed: int) -> str:
    """The name ``model_stages`` gives a selection list once it exists, and trials wait for."""
    return f"select-{method}-s{seed}"
