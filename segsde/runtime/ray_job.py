"""Running a worker loop as a Ray Train job: start or join Ray, build the TorchTrainer, fit it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from segsde.errors import SegSDEError
from segsde.storage import Location, as_location

# Ray Train's controller polls its workers (start, reports, end) every 2 s by default; locally a poll is
# cheap, and a quick trial starts about 4 s sooner at 0.5 s. On one machine
# there is no node to lose to a preemption, and nobody scrapes Train's Prometheus metrics: the watcher is one
# more Python process per Train run (2 s of CPU each, 24 s in the default study) and both cost CPU the trials need
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                   "RAY_TRAIN_METRICS_ENABLED": "0"}


def init_ray(address: str | None, num_cpus: int, num_gpus: int | None = None, resources: dict | None = None) -> None:
    """Join the cluster at ``address`` (``auto``: the one this node belongs to), else start local Ray with
    ``resources`` (custom ones, e.g. ``train_driver``) advertised."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if address:
        check_ray_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as exc:
            if _refused_token(exc):
                raise SegSDEError(f"the Ray cluster at {address} runs with token authentication and refused this client: set "
                                  "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to its nodes' token (~/.segsde/cluster.env, or the "
                                  "Slurm job's environment)") from None
            raise SegSDEError(f"cannot reach the Ray cluster at {address} ({type(exc).__name__}): "
                              "start it with `ray up cluster.yaml` or drop --address to run locally") from exc
        return
    # Ray Train's placement-group cleaner finds its cluster through the State API, which gives up when two
    # local Ray instances run on one machine (two studies, or parallel tests) and the trial then never
    # gets its CPUs back. So this instance's GCS port is chosen here and handed to every worker.
    from ray._private.services import get_node_ip_address

    port = int(os.environ.get("RAY_GCS_SERVER_PORT") or _free_port())
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        # with the dashboard always: Ray Train's placement-group cleaner queries its State API once a second and,
        # without it, logs a warning each time (a line per second in `segsde sde/train/select`); it costs ~2.5 s
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, include_dashboard=True,
                 object_store_memory=300 * 2**20, log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_ADDRESS": f"{get_node_ip_address()}:{port}", **LOCAL_TRAIN_ENV}})
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _refused_token(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception behind it) is Ray's refusal of a client without the cluster's token."""
    cause = exc
    while cause is not None:
        if "InvalidAuthToken" in f"{type(cause).__name__}: {cause}" or type(cause).__name__ == "AuthenticationError":
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minutes of GCS retries, when nothing listens at ``address``
    (host:port, ray://host:port, or `auto` = the cluster this node belongs to)."""
    import socket

    hint = "start it with `ray up cluster.yaml` (or `ray start --head`) or drop --address to run locally"
    if address == "auto":
        from ray._private.services import find_bootstrap_address  # what ray.init(address="auto") reads

        found = os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None)
        if not found or found == "auto":
            raise SegSDEError(f"--address auto found no Ray cluster on this node: {hint}")
        address = found
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise SegSDEError(f"cannot reach the Ray cluster at {address} ({exc}): {hint}") from None


def check_resources(workers: int, gpu: bool, address: str | None) -> None:
    if workers < 1:
        raise SegSDEError("--workers must be >= 1")
    if gpu and not address and not torch.cuda.is_available():
        raise SegSDEError("--gpu was given but this machine has no CUDA device: drop --gpu or pass --address of a GPU cluster")


def loop_resources(threads: int, gpu: bool) -> dict:
    """What one training loop holds in Ray: its CPU threads and, with ``gpu``, one GPU (a Train worker's, or
    an in-process loop's Tune trial's)."""
    return {"CPU": threads, **({"GPU": 1} if gpu else {})}


def ray_storage(storage: Location) -> dict:
    """``storage`` as Ray's RunConfig takes it: a local path alone, else the path inside its filesystem."""
    storage = as_location(storage)
    return {"storage_path": storage.path} if storage.is_local else \
        {"storage_path": storage.path, "storage_filesystem": storage.filesystem}


def make_trainer(loop, loop_config: dict, name: str, storage: Location, workers: int = 1, gpu: bool = False,
                 threads: int = 1, max_failures: int = 2, callbacks: list | None = None, in_process: bool = False,
                 on_report=None):
    """A TorchTrainer for ``loop`` on ``workers`` Ray Train workers (one GPU each with ``gpu``) whose
    checkpoints go to ``storage/name``: a later trainer with the same name resumes from them. ``in_process``
    (one worker): the loop runs in the calling process, in Train's local mode, with its checkpoints kept
    in the same place (see ``_in_process_trainer``); the caller holds the loop's resources, and ``on_report``
    (in process; Train ``callbacks`` otherwise) gets each report's metrics once its checkpoint is kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    if in_process and workers != 1:
        raise SegSDEError(f"only a one-worker loop runs in process ({workers} workers asked for)")
    if in_process:  # not Train's line per run inviting bug reports about local mode: it is chosen here, deliberately
        logging.getLogger("ray.train.v2.api.config").setLevel(logging.WARNING)
    scaling = ScalingConfig(num_workers=0) if in_process else \
        ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=loop_resources(threads, gpu))
    storage = as_location(storage)
    trainer_class = _in_process_trainer(storage.child(name), on_report) if in_process else _trainer_class()
    return trainer_class(
        loop, train_loop_config=loop_config, scaling_config=scaling,
        run_config=RunConfig(name=name, **ray_storage(storage), failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=callbacks or None))


def _trainer_class():
    """TorchTrainer, without Ray Data's callback when no Ray Datasets are given (ours read Parquet shards
    themselves): that callback starts a DatasetManager actor per run all the same, one more Python process
    that imports Ray Train and Ray Data (2 s of CPU each, 25 s in the default study). Should a Ray release
    rename what this overrides, the plain TorchTrainer's callbacks apply."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:
        return TorchTrainer

    class TrainerWithoutUnusedDatasets(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return TrainerWithoutUnusedDatasets


def _in_process_trainer(run_dir: Location, on_report=None):
    """TorchTrainer in Train's local mode (``num_workers=0``: the loop runs in ``fit``'s process; no Train
    controller, worker group or placement group, which cost a quick trial 10 s of start-up), except that
    the loop's checkpoints are kept as Train keeps them: the newest in ``run_dir/checkpoint_*``, where
    a restarted run finds it. Local mode alone holds the last one in memory, pointing at a directory the
    loop has already deleted."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.local_mode.torch import LocalTorchController
    from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils, set_train_fn_utils

    class KeptCheckpoints(LocalTrainFnUtils):
        def report(self, metrics, checkpoint=None, **_):
            self._last_metrics = metrics
            if checkpoint is not None:
                self._last_checkpoint = keep_checkpoint(Path(checkpoint.path), run_dir)
            if on_report is not None:
                on_report(metrics)

    class Controller(LocalTorchController):
        def _set_train_fn_utils(self):
            utils = KeptCheckpoints(experiment_name=self.experiment_name, dataset_shards=self.datasets)
            utils._last_checkpoint = latest_checkpoint(run_dir)
            set_train_fn_utils(utils)

        def run(self, train_func):
            try:
                return super().run(train_func)
            finally:  # a Tune trial process runs the next trial's driver code outside any loop
                set_train_fn_utils(None)

    class InProcessTrainer(TorchTrainer):
        def _get_local_controller(self):
            return Controller(experiment_name=self.run_config.name, datasets=self.datasets)

    return InProcessTrainer


CHECKPOINT_DONE = "checkpoint.complete"  # written last: on an object store a checkpoint without it is partial


def keep_checkpoint(source: Path, run_dir: Location):
    """A copy of the checkpoint directory ``source`` as ``run_dir``'s only checkpoint (named as Ray Train
    names them), written whole before the older one goes."""
    from datetime import datetime

    from ray.train import Checkpoint

    name = f"checkpoint_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"
    run_dir.child(name).upload_dir(source)
    run_dir.child(name, CHECKPOINT_DONE).write_bytes(b"")
    for old in run_dir.children():
        if old != name and old.startswith(("checkpoint_", ".checkpoint_")):
            run_dir.child(old).delete()
    return Checkpoint(run_dir.child(name).path, filesystem=run_dir.filesystem)


def newest_checkpoint(run_dir: Location, holding: str = CHECKPOINT_DONE) -> str | None:
    """The name of the newest ``run_dir/checkpoint_*`` that holds the file ``holding`` (the completion marker, or
    the state file where a checkpoint is written whole), or None."""
    return max((n for n in run_dir.children() if n.startswith("checkpoint_") and run_dir.child(n, holding).is_file()),
               default=None)


def latest_checkpoint(run_dir: Location):
    """The newest complete ``run_dir/checkpoint_*`` as a Checkpoint, or None."""
    from ray.train import Checkpoint

    name = newest_checkpoint(run_dir)
    return Checkpoint(run_dir.child(name).path, filesystem=run_dir.filesystem) if name else None


def fit(loop, loop_config: dict, name: str, storage: Location, workers: int = 1, gpu: bool = False, threads: int = 1,
        fresh: bool = False, address: str | None = None, max_failures: int = 2):
    """Fit ``loop`` as a Ray Train job (see ``make_trainer``); ``fresh`` deletes earlier checkpoints first."""
    if fresh:
        as_location(storage).child(name).delete()
    init_ray(address, num_cpus=max(workers * threads, 1), num_gpus=workers if gpu else 0)
    return fit_interruptibly(make_trainer(loop, loop_config, name, storage, workers, gpu, threads, max_failures))


def fit_interruptibly(trainer):
    """``trainer.fit()`` with Ctrl-C raising KeyboardInterrupt here, so the caller's MLflow run ends KILLED and
    the command says it was interrupted. Called from the main thread, Ray Train V2 installs its own SIGINT
    handler, which aborts the run and ends the process with status 1 and no message (the run was left
    FAILED); it does not do so in other threads, as under Tune. Checkpoints written so far stay for a rerun."""
    import threading

    from segsde.runtime import Background

    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    return Background(trainer.fit, name="ray-train-fit").result()
