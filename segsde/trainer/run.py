"""The trial job: a ``TrialPlan`` (row + profile + overrides resolved into a TrainConfig once, with the
locations of its inputs) is checked, its labeled set picked, the worker loop run on Ray Train, and its MLflow
run kept in step with the outcome."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from segsde.data.dataset import PSEUDO_DEPTH
from segsde.data.store import local_dataset, read_manifest
from segsde.errors import SegSDEError
from segsde.profiles import ABLATIONS_DIR, load_profile, load_yaml
from segsde.runtime import CHECKPOINT_FILE
from segsde.storage import Location, as_location, localize
from segsde.trainer.config import TrainConfig, final_scores

STUDY_FILE = ABLATIONS_DIR / "component_study.yaml"
METRICS_FILE = "metrics.json"


def study_rows(path: Path = STUDY_FILE) -> dict[str, dict]:
    rows = load_yaml(path)
    for name, row in rows.items():
        if not isinstance(row, dict):
            raise SegSDEError(f"row '{name}' in {path} must be a mapping of settings (use {{}} for none)")
    return rows


def train_config(profile: str, row: str, overrides: dict | None = None) -> TrainConfig:
    """The profile's ``train`` section, then the row's switches, then ``overrides``."""
    section = load_profile(profile).get("train")
    if not isinstance(section, dict):
        raise SegSDEError(f"profile '{profile}' has no 'train' section in ablations/profiles.yaml: add one")
    rows = study_rows()
    if row not in rows:
        import difflib

        close = difflib.get_close_matches(row, rows, n=1)
        raise SegSDEError(f"unknown row '{row}' in {STUDY_FILE}: " + (f"did you mean '{close[0]}'?" if close else f"choose one of {sorted(rows)}"))
    return TrainConfig.from_dict({**section, **rows[row], **(overrides or {})}, where=f"row '{row}' with profile '{profile}'")


def selection_file(selection: Path | str | None) -> Location | None:
    """``--selection`` of `segsde train`: an existing ordered id list (a selection method is resolved by the
    orchestration's selection stage before the job)."""
    if selection is None:
        return None
    location = as_location(selection)
    if not location.is_file():
        raise SegSDEError(f"--selection {selection} is neither an existing file nor a selection method: "
                          "pass an ordered id list (.txt/.parquet) or one of sde | diversity | difficulty | entropy | random")
    return location


@dataclass(frozen=True)
class TrialPlan:
    """One trial, resolved once by its planner (the study, the sweep, `segsde train`) and passed unchanged
    to the Tune trial, the job and the worker loop: its config and the locations of its inputs and result."""
    row: str
    profile: str
    train: TrainConfig            # the profile's train section, the row's switches, then overrides
    data: str                     # the dataset (a storage location)
    sde_model: str | None = None  # model.pt of the SDE stage (transfer, multi-task, DepthMix rows)
    selection: str | None = None  # the ordered id list whose prefix is labeled (rows with labeled: selection)
    key: str | None = None        # stable: the MLflow run key and Ray Train run name
    result: str | None = None     # the entry its metrics.json goes to
    pseudo_depth: str = PSEUDO_DEPTH  # the dataset's side column with the SDE model's pseudo-depth (DepthMix rows)

    @classmethod
    def make(cls, profile: str, row: str, overrides: dict | None, data, sde_model=None, selection=None,
             key: str | None = None, result=None) -> TrialPlan:
        cfg = train_config(profile, row, overrides)
        def uri(where):
            return as_location(where).uri if where is not None else None

        return cls(row, profile, cfg, uri(data), uri(sde_model), uri(selection) if cfg.labeled == "selection" else None, key, uri(result))

    @classmethod
    def from_dict(cls, values: dict) -> TrialPlan:
        return cls(**{**values, "train": TrainConfig.from_dict(values["train"])})

    def to_dict(self) -> dict:
        return asdict(self)

    def with_params(self, params: dict, key: str) -> TrialPlan:
        """The plan with a searcher's values on top of its config, under the searcher's key for the trial."""
        train = TrainConfig.from_dict({**asdict(self.train), **params}, where=f"row '{self.row}' with the searched values")
        return replace(self, train=train, key=key)

    @property
    def name(self) -> str:
        return f"{self.row}-b{self.train.budget}-s{self.train.seed}"


@dataclass
class PreparedTrial:
    """A trial plan checked on the driver, with its labeled set and the worker loop's config (less the run id)."""
    plan: TrialPlan
    labeled: list[str]
    params: dict          # what MLflow records as the run's params / config.json
    loop_config: dict     # train_loop_per_worker's config, without ``mlflow_run_id``

    @property
    def cfg(self) -> TrainConfig:
        return self.plan.train

    @property
    def run_name(self) -> str:
        return self.plan.name

    @property
    def tags(self) -> dict:
        return {"segsde.stage": "train", "segsde.row": self.plan.row, "segsde.budget": str(self.cfg.budget),
                "segsde.seed": str(self.cfg.seed)}


def prepare_trial(plan: TrialPlan, workers: int = 1, gpu: bool = False, address: str | None = None,
                  tracking_uri: str | None = None, resume_from: Path | None = None, stop_after: int | None = None) -> PreparedTrial:
    """Check everything a trial needs before anything runs (one-line errors) and resolve its labeled set."""
    from segsde.runtime.ray_job import check_resources
    from segsde.trainer.data import labeled_ids, mix_pool, selection_activity

    cfg, row = plan.train, plan.row
    data = local_dataset(plan.data)
    manifest = read_manifest(data)
    if "train" not in manifest["splits"] or "val" not in manifest["splits"]:
        raise SegSDEError(f"{plan.data} needs 'train' and 'val' splits (it has {sorted(manifest['splits'])}): rebuild it")
    if not manifest["splits"].get(cfg.eval_split):
        raise SegSDEError(f"{plan.data} has no '{cfg.eval_split}' split to score on: rebuild it with one (`segsde data synth --tune N`, "
                          "the profile's data.tune, or `segsde data cityscapes --tune-cities`)")
    if cfg.transfer:
        from segsde.trainer.model import transfer_source

        if plan.sde_model is None or not as_location(plan.sde_model).is_file():
            raise SegSDEError(f"row '{row}' starts from the SDE model: pass --sde-model MODEL.pt (written by `segsde sde`), "
                              f"{'which does not exist at ' + plan.sde_model if plan.sde_model else 'none was given'}")
        transfer_source(localize(plan.sde_model), cfg)  # the architecture matches, before any worker starts
    if resume_from is not None and not (Path(resume_from) / CHECKPOINT_FILE).is_file():
        raise SegSDEError(f"--resume-from {resume_from} is not a checkpoint directory (no {CHECKPOINT_FILE}): pass one from a run's ray/ folder")
    if cfg.teacher and cfg.mix == "depth":
        _check_depth_source(cfg, data, manifest, plan.pseudo_depth)
    check_resources(workers, gpu, address)
    labeled = labeled_ids(data, cfg, localize(plan.selection) if plan.selection else None)
    pool = mix_pool(data, cfg, labeled) if cfg.uses_unlabeled else None
    activity = selection_activity(data, cfg, labeled) if cfg.labeled == "selection" else None
    full_root = manifest.get("root") if cfg.eval_full_resolution and manifest["source"] == "cityscapes" else None
    params = {"train": asdict(cfg), "row": row, "profile": plan.profile, "data": plan.data, "workers": workers, "gpu": gpu,
              "sde_model": plan.sde_model, "selection_file": plan.selection}
    loop_config = {"train": asdict(cfg), "data": plan.data, "labeled": labeled, "pool": pool, "sde_model": plan.sde_model,
                   "tracking_uri": tracking_uri, "full_resolution_root": full_root,
                   "resume_from": str(resume_from) if resume_from else None, "stop_after": stop_after, "result": plan.result,
                   "progress": plan.key, "activity": activity, "pseudo_depth": plan.pseudo_depth}
    return PreparedTrial(plan, labeled, params, loop_config)


def summarise(trial: PreparedTrial, result, seconds: float, run_id: str) -> dict:
    """The trial's final scores (class IoUs included) from Ray Train's result (the loop itself logged them
    to MLflow as final/* metrics)."""
    final = result.metrics or {}
    scores = final_scores(final)
    summary = {"row": trial.plan.row, "budget": trial.cfg.budget, "seed": trial.cfg.seed, "step": final.get("step"), **scores,
               "train_seconds": final.get("train_seconds"),
               "seconds": round(seconds, 1), "checkpoint": result.checkpoint.path if result.checkpoint else None,
               "mlflow_run_id": run_id}
    return summary


def run_train(data: Location | Path, out: Location | Path, row: str = "baseline", profile: str = "quick", overrides: dict | None = None,
              sde_model: Location | Path | None = None, selection: Location | Path | None = None, workers: int = 1, gpu: bool = False,
              address: str | None = None, tracking_uri: str | None = None, experiment: str = "segsde-train",
              parent_run_id: str | None = None, fresh: bool = False, resume_from: Path | None = None,
              stop_after: int | None = None, log=sys.stderr) -> dict:
    """Run one trial on ``data``; return its final (and best) validation scores. ``selection``: an ordered
    id list file (the rows that label a selection's prefix)."""
    from segsde.runtime.ray_job import fit
    from segsde.tracking import RunLogger, resolve_tracking_uri, tracked_run

    out = as_location(out)
    uri = resolve_tracking_uri(out, tracking_uri)
    selection = selection_file(selection)
    overrides = {**(overrides or {}), **({"labeled": "selection"} if selection else {})}  # the given list's prefix is labeled
    plan = TrialPlan.make(profile, row, overrides, as_location(data), sde_model, selection, result=out)
    trial = prepare_trial(plan, workers, gpu, address, uri, resume_from, stop_after)
    tags = {**trial.tags, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    start = time.perf_counter()
    with tracked_run(uri, experiment, trial.run_name, trial.params, tags) as run_id:
        RunLogger(uri, run_id).client.log_text(run_id, "\n".join(trial.labeled) + "\n", "labeled_ids.txt")
        print(f"[train] row '{row}', {len(trial.labeled)} labeled images, MLflow run {run_id} in {uri}", file=log, flush=True)
        result = fit(_loop, {**trial.loop_config, "mlflow_run_id": run_id}, "train", out.child("ray"), workers, gpu,
                     trial.cfg.threads or 1, fresh, address)
        summary = summarise(trial, result, time.perf_counter() - start, run_id)
        out.child(METRICS_FILE).write_text(json.dumps(summary, indent=1))
        return summary


def _check_depth_source(cfg: TrainConfig, data: Path, manifest: dict, column: str) -> None:
    from segsde.data.store import read_side_meta

    if cfg.depth_source == "sde" and read_side_meta(data, column) is None:
        raise SegSDEError(f"DepthMix with depth_source 'sde' needs the SDE pseudo-depth in {data}: run "
                          "`segsde sde export --checkpoint MODEL.pt --data DIR` first, or choose another depth_source")
    if cfg.depth_source == "ground_truth" and manifest["source"] != "synthetic":
        raise SegSDEError(f"depth_source 'ground_truth' is an oracle of the synthetic testbed, and {data} is "
                          f"{manifest['source']}: use 'sde' or 'student'")


def _loop(config: dict) -> None:
    from segsde.trainer.loop import train_loop_per_worker

    train_loop_per_worker(config)
