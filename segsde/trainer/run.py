"""The driver of one trial: resolve row + profile + overrides into a TrainConfig, pick the labeled set, run
the worker loop on Ray Train, and keep its MLflow run in step with the outcome."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from segsde.data.store import atomic_write_bytes, read_manifest
from segsde.errors import SegSDEError
from segsde.profiles import ABLATIONS_DIR, load_profile, load_yaml
from segsde.runtime import CHECKPOINT_FILE
from segsde.trainer.config import TrainConfig

STUDY_FILE = ABLATIONS_DIR / "component_study.yaml"
METRICS_FILE = "metrics.json"
SCORE_KEYS = ("miou", "best_miou", "pixel_accuracy", "full_miou", "full_pixel_accuracy")


def final_scores(metrics: dict) -> dict:
    """The scores of a trial's report that make its result: SCORE_KEYS and the class IoUs."""
    return {k: v for k, v in metrics.items() if k in SCORE_KEYS or k.startswith("iou/")}


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


def selection_overrides(selection: Path | str | None) -> tuple[dict, Path | None]:
    """``--selection`` as config overrides: an existing file or a selection method labels that list's prefix."""
    from segsde.selection.config import METHODS

    if selection is None:
        return {}, None
    if Path(selection).is_file():
        return {"labeled": "selection"}, Path(selection).absolute()
    if str(selection) in METHODS:
        return {"labeled": "selection", "selection": str(selection)}, None
    raise SegSDEError(f"--selection {selection} is neither an existing file nor a selection method: "
                      f"pass an ordered id list (.txt/.parquet) or one of {list(METHODS)}")


@dataclass
class PreparedTrial:
    """A trial resolved on the driver: its config, labeled set and the worker loop's config (less the run id)."""
    cfg: TrainConfig
    row: str
    labeled: list[str]
    params: dict          # what MLflow records as the run's params / config.json
    loop_config: dict     # train_loop_per_worker's config, without ``mlflow_run_id``

    @property
    def run_name(self) -> str:
        return f"{self.row}-b{self.cfg.budget}-s{self.cfg.seed}"

    @property
    def tags(self) -> dict:
        return {"segsde.stage": "train", "segsde.row": self.row, "segsde.budget": str(self.cfg.budget),
                "segsde.seed": str(self.cfg.seed)}


def prepare_trial(data: Path, row: str = "baseline", profile: str = "quick", overrides: dict | None = None,
                  sde_model: Path | None = None, selection: Path | str | None = None, workers: int = 1, gpu: bool = False,
                  address: str | None = None, tracking_uri: str | None = None, resume_from: Path | None = None,
                  stop_after: int | None = None, cache_root: Path = Path("outputs"), log=sys.stderr) -> PreparedTrial:
    """Check everything a trial needs before anything runs (one-line errors) and resolve its labeled set."""
    from segsde.orchestration.ray_job import check_resources
    from segsde.orchestration.stages import selection_stage
    from segsde.trainer.data import labeled_ids, mix_pool

    chosen, selection = selection_overrides(selection)
    cfg = train_config(profile, row, {**(overrides or {}), **chosen})
    data = Path(data).absolute()
    manifest = read_manifest(data)
    if "train" not in manifest["splits"] or "val" not in manifest["splits"]:
        raise SegSDEError(f"{data} needs 'train' and 'val' splits (it has {sorted(manifest['splits'])}): rebuild it")
    if cfg.transfer:
        from segsde.trainer.model import transfer_source

        if sde_model is None or not Path(sde_model).is_file():
            raise SegSDEError(f"row '{row}' starts from the SDE model: pass --sde-model MODEL.pt (written by `segsde sde`), "
                              f"{'which does not exist at ' + str(sde_model) if sde_model else 'none was given'}")
        transfer_source(Path(sde_model), cfg)  # the architecture matches, before any worker starts
    if resume_from is not None and not (Path(resume_from) / CHECKPOINT_FILE).is_file():
        raise SegSDEError(f"--resume-from {resume_from} is not a checkpoint directory (no {CHECKPOINT_FILE}): pass one from a run's ray/ folder")
    if cfg.teacher and cfg.mix == "depth":
        _check_depth_source(cfg, data, manifest)
    check_resources(workers, gpu, address)
    if cfg.labeled == "selection" and selection is None and cfg.selection is not None:
        selection = selection_stage(cfg.selection, profile, data, cache_root, seed=cfg.seed, budget=cfg.budget,
                                    sde_model=sde_model, tracking_uri=tracking_uri, log=lambda line: print(line, file=log, flush=True))
    labeled = labeled_ids(data, cfg, selection)
    pool = mix_pool(data, cfg, labeled) if cfg.uses_unlabeled else None
    full_root = manifest.get("root") if cfg.eval_full_resolution and manifest["source"] == "cityscapes" else None
    params = {"train": asdict(cfg), "row": row, "profile": profile, "data": str(data), "workers": workers, "gpu": gpu,
              "sde_model": str(sde_model) if sde_model else None, "selection_file": str(selection) if selection else None}
    loop_config = {"train": asdict(cfg), "data": str(data), "labeled": labeled, "pool": pool,
                   "sde_model": str(Path(sde_model).absolute()) if sde_model else None, "tracking_uri": tracking_uri,
                   "full_resolution_root": full_root, "resume_from": str(resume_from) if resume_from else None,
                   "stop_after": stop_after}
    return PreparedTrial(cfg, row, labeled, params, loop_config)


def summarise(trial: PreparedTrial, result, seconds: float, run_id: str) -> dict:
    """The trial's final scores (class IoUs included) from Ray Train's result (the loop itself logged them
    to MLflow as final/* metrics)."""
    final = result.metrics or {}
    scores = final_scores(final)
    summary = {"row": trial.row, "budget": trial.cfg.budget, "seed": trial.cfg.seed, "step": final.get("step"), **scores,
               "train_seconds": final.get("train_seconds"),
               "seconds": round(seconds, 1), "checkpoint": result.checkpoint.path if result.checkpoint else None,
               "mlflow_run_id": run_id}
    return summary


def run_train(data: Path, out: Path, row: str = "baseline", profile: str = "quick", overrides: dict | None = None,
              sde_model: Path | None = None, selection: Path | str | None = None, workers: int = 1, gpu: bool = False,
              address: str | None = None, tracking_uri: str | None = None, experiment: str = "segsde-train",
              parent_run_id: str | None = None, fresh: bool = False, resume_from: Path | None = None,
              stop_after: int | None = None, cache_root: Path = Path("outputs"), log=sys.stderr) -> dict:
    """Run one trial on ``data``; return its final (and best) validation scores. ``selection``: an ordered
    id list file or a selection method (computed, or reused from ``cache_root``'s stage cache)."""
    from segsde.orchestration.ray_job import fit
    from segsde.tracking import RunLogger, resolve_tracking_uri, tracked_run

    out = Path(out).absolute()
    uri = resolve_tracking_uri(out, tracking_uri)
    trial = prepare_trial(data, row, profile, overrides, sde_model, selection, workers, gpu, address, uri, resume_from,
                          stop_after, cache_root, log)
    out.mkdir(parents=True, exist_ok=True)
    tags = {**trial.tags, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    start = time.perf_counter()
    with tracked_run(uri, experiment, trial.run_name, trial.params, tags) as run_id:
        RunLogger(uri, run_id).client.log_text(run_id, "\n".join(trial.labeled) + "\n", "labeled_ids.txt")
        print(f"[train] row '{row}', {len(trial.labeled)} labeled images, MLflow run {run_id} in {uri}", file=log, flush=True)
        result = fit(_loop, {**trial.loop_config, "mlflow_run_id": run_id}, "train", out / "ray", workers, gpu,
                     trial.cfg.threads or 1, fresh, address)
        summary = summarise(trial, result, time.perf_counter() - start, run_id)
        atomic_write_bytes(out / METRICS_FILE, json.dumps(summary, indent=1).encode())
        return summary


def _check_depth_source(cfg: TrainConfig, data: Path, manifest: dict) -> None:
    from segsde.data.dataset import PSEUDO_DEPTH
    from segsde.data.store import read_side_meta

    if cfg.depth_source == "sde" and read_side_meta(data, PSEUDO_DEPTH) is None:
        raise SegSDEError(f"DepthMix with depth_source 'sde' needs the SDE pseudo-depth in {data}: run "
                          "`segsde sde export --checkpoint MODEL.pt --data DIR` first, or choose another depth_source")
    if cfg.depth_source == "ground_truth" and manifest["source"] != "synthetic":
        raise SegSDEError(f"depth_source 'ground_truth' is an oracle of the synthetic testbed, and {data} is "
                          f"{manifest['source']}: use 'sde' or 'student'")


def _loop(config: dict) -> None:
    from segsde.trainer.loop import train_loop_per_worker

    train_loop_per_worker(config)
