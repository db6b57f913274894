"""The SDE stage's driver: start (or join) Ray, run the worker loop in a TorchTrainer, keep MLflow's run
in step with the outcome, and leave ``<out>/model.pt`` + ``<out>/metrics.json`` behind on success."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from segsde.data.store import atomic_write_bytes, read_manifest
from segsde.errors import SegSDEError
from segsde.profiles import load_profile
from segsde.runtime import CHECKPOINT_FILE, load_state
from segsde.sde.config import SDEConfig

MODEL_FILE, METRICS_FILE = "model.pt", "metrics.json"


def sde_config(profile: str, overrides: dict | None = None) -> SDEConfig:
    section = load_profile(profile).get("sde")
    if not isinstance(section, dict):
        raise SegSDEError(f"profile '{profile}' has no 'sde' section in ablations/profiles.yaml: add one")
    return SDEConfig.from_dict({**section, **(overrides or {})}, where=f"profile '{profile}' sde section")


def init_ray(address: str | None, num_cpus: int, num_gpus: int | None = None) -> None:
    """Join the cluster at ``address`` (``auto``: the one this node belongs to), else start local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as exc:
            raise SegSDEError(f"cannot reach the Ray cluster at {address} ({type(exc).__name__}): "
                              "start it with `ray up cluster.yaml` or drop --address to run locally") from exc
        return
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, object_store_memory=300 * 2**20,
             log_to_driver=True)


def save_model(path: Path, state: dict) -> None:
    """Weights for later stages (no optimiser, no frozen reference copy) + the config that built them."""
    weights = {k: v for k, v in state["model"].items() if not k.startswith("reference.")}
    buf = io.BytesIO()
    torch.save({"model": weights, "config": state["config"], "step": state["step"]}, buf)
    atomic_write_bytes(path, buf.getvalue())


def run_sde(data: Path, out: Path, profile: str = "quick", workers: int = 1, gpu: bool = False,
            overrides: dict | None = None, resume_from: Path | None = None, fresh: bool = False,
            address: str | None = None, tracking_uri: str | None = None, experiment: str = "segsde-sde",
            stop_after: int | None = None, log=sys.stderr) -> dict:
    """Train the SDE model on ``data``; return the final validation metrics and where the model went."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from segsde.tracking import RunLogger, end_run, resolve_tracking_uri, start_run

    cfg = sde_config(profile, overrides)
    data, out = Path(data).absolute(), Path(out).absolute()
    manifest = read_manifest(data)
    if "train" not in manifest["splits"] or "val" not in manifest["splits"]:
        raise SegSDEError(f"{data} needs 'train' and 'val' splits for SDE training (it has {sorted(manifest['splits'])}): rebuild it")
    if resume_from is not None and not (Path(resume_from) / CHECKPOINT_FILE).is_file():
        raise SegSDEError(f"--resume-from {resume_from} is not a checkpoint directory (no {CHECKPOINT_FILE}): pass one under {out}/ray")
    if workers < 1:
        raise SegSDEError("--workers must be >= 1")
    if gpu and not address and not torch.cuda.is_available():
        raise SegSDEError("--gpu was given but this machine has no CUDA device: drop --gpu or pass --address of a GPU cluster")
    out.mkdir(parents=True, exist_ok=True)
    storage = out / "ray"
    if fresh:
        shutil.rmtree(storage / "sde", ignore_errors=True)
    threads = cfg.threads or 1
    init_ray(address, num_cpus=max(workers * threads, 1), num_gpus=workers if gpu else 0)
    uri = resolve_tracking_uri(out, tracking_uri)
    config = {"sde": asdict(cfg), "data": str(data), "profile": profile, "workers": workers, "gpu": gpu}
    run_id = start_run(uri, experiment, f"sde-{profile}", config, tags={"segsde.stage": "sde"})
    print(f"[sde] MLflow run {run_id} in {uri}", file=log, flush=True)
    loop_config = {"sde": asdict(cfg), "data": str(data), "tracking_uri": uri, "mlflow_run_id": run_id,
                   "resume_from": str(resume_from) if resume_from else None, "stop_after": stop_after}
    trainer = TorchTrainer(
        _loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": threads, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name="sde", storage_path=str(storage), failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    start = time.perf_counter()
    status = "FAILED"
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise SegSDEError(f"SDE training reported no checkpoint: rerun with --fresh to start over in {storage}")
        with result.checkpoint.as_directory() as d:
            state = load_state(d)
        save_model(out / MODEL_FILE, state)
        metrics = {k: v for k, v in result.metrics.items() if k.startswith("val_") or k in ("step", "images_per_s")}
        summary = {**{k.removeprefix("val_"): v for k, v in metrics.items()}, "seconds": round(time.perf_counter() - start, 1),
                   "model": str(out / MODEL_FILE), "checkpoint": result.checkpoint.path, "mlflow_run_id": run_id}
        atomic_write_bytes(out / METRICS_FILE, json.dumps(summary, indent=1).encode())
        RunLogger(uri, run_id).artifact(out / MODEL_FILE, "model")
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        end_run(uri, run_id, status)


def _loop(config: dict) -> None:
    from segsde.sde.train import train_loop_per_worker

    train_loop_per_worker(config)
