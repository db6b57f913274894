"""The SDE job: start (or join) Ray, run the worker loop in a TorchTrainer, keep MLflow's run in step with the
outcome, and publish ``<out>/model.pt``, then ``<out>/metrics.json`` (the entry's marker), on success. ``data``
and ``out`` are storage locations (local paths or URIs)."""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from segsde.data.store import read_manifest
from segsde.errors import SegSDEError
from segsde.profiles import load_profile
from segsde.runtime import CHECKPOINT_FILE, load_state
from segsde.sde.config import SDEConfig
from segsde.storage import Location, as_location, localize

MODEL_FILE, METRICS_FILE = "model.pt", "metrics.json"
TRAINING_STATE = "ray"  # the Ray Train run beside them: its checkpoints, for resuming
SDE_RUN = "sde"  # that run's name: its checkpoints are in TRAINING_STATE/SDE_RUN


def sde_config(profile: str, overrides: dict | None = None) -> SDEConfig:
    section = load_profile(profile).get("sde")
    if not isinstance(section, dict):
        raise SegSDEError(f"profile '{profile}' has no 'sde' section in ablations/profiles.yaml: add one")
    return SDEConfig.from_dict({**section, **(overrides or {})}, where=f"profile '{profile}' sde section")


def save_model(path: Location | Path, state: dict) -> None:
    """Weights for later stages (no optimiser, no frozen reference copy) + the config that built them."""
    weights = {k: v for k, v in state["model"].items() if not k.startswith("reference.")}
    buf = io.BytesIO()
    torch.save({"model": weights, "config": state["config"], "step": state["step"]}, buf)
    as_location(path).write_bytes(buf.getvalue())


def run_sde(data: Location | Path, out: Location | Path, profile: str = "quick", workers: int = 1, gpu: bool = False,
            overrides: dict | None = None, resume_from: Path | None = None, fresh: bool = False,
            address: str | None = None, tracking_uri: str | None = None, experiment: str = "segsde-sde",
            stop_after: int | None = None, parent_run_id: str | None = None, run_key: str | None = None,
            log=sys.stderr) -> dict:
    """Train the SDE model on ``data``; return the final validation metrics and where the model went."""
    from segsde.runtime.ray_job import check_resources, fit
    from segsde.tracking import RunLogger, resolve_tracking_uri, study_tags, tracked_run

    cfg = sde_config(profile, overrides)
    data, out = as_location(data), as_location(out)
    manifest = read_manifest(localize(data))
    if "train" not in manifest["splits"] or "val" not in manifest["splits"]:
        raise SegSDEError(f"{data} needs 'train' and 'val' splits for SDE training (it has {sorted(manifest['splits'])}): rebuild it")
    if cfg.oracle != "none" and manifest["source"] != "synthetic":
        raise SegSDEError(f"oracle '{cfg.oracle}' needs the synthetic testbed's ground truth, and {data} is "
                          f"{manifest['source']}: drop --set oracle or use a `segsde data synth` dataset")
    if resume_from is not None and not (Path(resume_from) / CHECKPOINT_FILE).is_file():
        raise SegSDEError(f"--resume-from {resume_from} is not a checkpoint directory (no {CHECKPOINT_FILE}): "
                          f"pass one under {out.child(TRAINING_STATE)}")
    check_resources(workers, gpu, address)
    uri = resolve_tracking_uri(out, tracking_uri)
    config = {"sde": asdict(cfg), "data": str(data), "profile": profile, "workers": workers, "gpu": gpu}
    start = time.perf_counter()
    with tracked_run(uri, experiment, f"sde-{profile}", config, study_tags("sde", parent_run_id, run_key)) as run_id:
        print(f"[sde] MLflow run {run_id} in {uri}", file=log, flush=True)
        loop_config = {"sde": asdict(cfg), "data": data.uri, "tracking_uri": uri, "mlflow_run_id": run_id,
                       "resume_from": str(resume_from) if resume_from else None, "stop_after": stop_after, "progress": out.name}
        result = fit(_loop, loop_config, SDE_RUN, out.child(TRAINING_STATE), workers, gpu, cfg.threads or 1, fresh, address)
        if result.checkpoint is None:
            raise SegSDEError(f"SDE training reported no checkpoint: rerun with --fresh to start over in {out.child(TRAINING_STATE)}")
        with result.checkpoint.as_directory() as d:
            state = load_state(d)
        save_model(out.child(MODEL_FILE), state)
        metrics = {k: v for k, v in result.metrics.items() if k.startswith("val_") or k in ("step", "images_per_s")}
        summary = {**{k.removeprefix("val_"): v for k, v in metrics.items()}, "seconds": round(time.perf_counter() - start, 1),
                   "model": str(out.child(MODEL_FILE)), "checkpoint": result.checkpoint.path, "mlflow_run_id": run_id}
        # where the model is, not a second copy of it (119 MB at ResNet-18) in MLflow's artifact store
        RunLogger(uri, run_id).tags({"segsde.model": out.child(MODEL_FILE).uri})
        out.child(METRICS_FILE).write_text(json.dumps(summary, indent=1))
        return summary


def _loop(config: dict) -> None:
    from segsde.sde.train import train_loop_per_worker

    train_loop_per_worker(config)
