"""Trials on Ray Tune: one Tune trial = one driver function that fits the trainer as a Ray Train job
(Train V2 is not a Tune trainable), with a child MLflow run found again by a stable key, and a Tune
callback that closes those runs whatever the trial's fate (finished, stopped early by ASHA, failed)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import ray.tune
from ray.tune.search import Searcher

from segsde.storage import Location, as_location

DRIVER_RESOURCE = "train_driver"  # custom resource: caps concurrent trial drivers without taking CPUs from workers
TRIAL_ID_TAG = "ray_trial_id"


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of one Tuner shares (each trial's own config and inputs are its ``TrialPlan``)."""
    storage: str                    # the storage root: Train checkpoints go under its ray/
    tracking_uri: str
    experiment: str
    parent_run_id: str
    workers: int = 1
    gpu: bool = False
    address: str | None = None
    max_failures: int = 1           # restarts of a failed trial: Train's of its worker group, or Tune's of the trial
    # every evaluation to Tune as it happens (a scheduler such as ASHA acts on them; from Train workers through a
    # queue actor per trial); otherwise the driver reports the final scores once, at the end (a study's grid needs no more)
    stream_evaluations: bool = True
    # the loop runs in the Tune trial's own process (Train's local mode), which then holds its CPUs (and GPU):
    # on one machine and one worker, 10 s less start-up per trial; Tune, not Train, restarts a failed trial
    in_process: bool = False
    threads: int = 1                # the CPUs an in-process trial holds
    # a finished trial's Train checkpoints (student, teacher, optimiser, the SDE network: ~130 MB) are for resuming
    # it, and go once it is complete (MlflowStatusCallback); kept with --keep-checkpoints
    keep_checkpoints: bool = False

    @property
    def tune_max_failures(self) -> int:
        """Tune's restarts of a failed trial: none where Train restarts the worker group instead."""
        return self.max_failures if self.in_process else 0


def runs_in_process(workers: int, address: str | None) -> bool:
    """Whether trials run their loop in their own Tune trial process: on local Ray with one worker a trial
    then starts no Train controller and worker group (about 10 s per quick trial); with DDP, or on a
    cluster (where Train places the workers on GPU nodes), Train workers run it."""
    return workers == 1 and not address


def trial_driver(config: dict, settings: TrialSettings) -> None:
    """The Tune trainable: ``config["plan"]`` is the trial's TrialPlan as a dict; in a sweep,
    ``config["params"]`` holds the values the searcher proposed and ``config["trial_key"]`` its name for the trial."""
    from segsde.orchestration.stages import train_checkpoints
    from segsde.runtime import progress
    from segsde.runtime.ray_job import make_trainer
    from segsde.storage import Location
    from segsde.tracking import RunLogger, get_or_create_run
    from segsde.trainer.run import METRICS_FILE, TrialPlan, _loop, prepare_trial, summarise

    plan = TrialPlan.from_dict(config["plan"])
    if "params" in config:
        plan = plan.with_params(config["params"], config["trial_key"])
    trial_id = ray.tune.get_context().get_trial_id()
    trial = prepare_trial(plan, settings.workers, settings.gpu, settings.address, settings.tracking_uri)
    tags = {**trial.tags, "mlflow.parentRunId": settings.parent_run_id, TRIAL_ID_TAG: trial_id}
    run_id, created = get_or_create_run(settings.tracking_uri, settings.experiment, plan.key, trial.run_name,
                                        {**trial.params, "params": config.get("params", {})}, tags)
    if created:
        RunLogger(settings.tracking_uri, run_id).client.log_text(run_id, "\n".join(trial.labeled) + "\n", "labeled_ids.txt")
    progress(f"[trial] {trial.run_name}: MLflow run {run_id}{'' if created else ' (found again)'}")
    start = time.perf_counter()
    run_dir = train_checkpoints(settings.storage, plan.key)
    trainer = make_trainer(_loop, {**trial.loop_config, "mlflow_run_id": run_id}, run_dir.name, run_dir.parent,
                           settings.workers, settings.gpu, plan.train.threads or 1, settings.max_failures, in_process=settings.in_process,
                           callbacks=[evaluations_to_tune()] if settings.stream_evaluations and not settings.in_process else None,
                           on_report=evaluation_to_tune if settings.stream_evaluations and settings.in_process else None)
    result = trainer.fit()
    summary = summarise(trial, result, time.perf_counter() - start, run_id)
    if not settings.keep_checkpoints:  # MlflowStatusCallback removes them once the trial is complete
        summary["checkpoint"] = None
    if plan.result:
        Location(plan.result).child(METRICS_FILE).write_text(json.dumps(summary, indent=1))
    if not settings.stream_evaluations:
        ray.tune.report({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v == v})


def evaluations_to_tune():
    """A Train callback that passes to Tune only the reports that carry a validation score: a checkpoint
    between two evaluations has none, and a scheduler (ASHA) rejects a result without its metric."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvaluationsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if "miou" in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return EvaluationsToTune()


def evaluation_to_tune(metrics: dict) -> None:
    """``evaluations_to_tune`` for a loop in the trial's own process: a report with a validation score goes to
    Tune, whose scheduler may stop the trial right here (Tune then ends this thread)."""
    if "miou" in metrics:
        ray.tune.report(metrics)


def tune_trainable(settings: TrialSettings):
    """``trial_driver`` bound to ``settings``, scheduled on the driver resource: with 0 CPU when its loop
    runs on Train workers (which hold their own), else with the loop's CPUs (and GPU)."""
    from segsde.runtime.ray_job import loop_resources

    loop = loop_resources(settings.threads, settings.gpu) if settings.in_process else {"CPU": 0}
    return ray.tune.with_resources(ray.tune.with_parameters(trial_driver, settings=settings), {**loop, DRIVER_RESOURCE: 1})


def fresh_run_config(storage: Location, name: str, callback: ray.tune.Callback, max_failures: int = 0) -> ray.tune.RunConfig:
    """The RunConfig of a new Tune experiment ``storage/name``, its earlier files removed. Studies and sweeps
    never ``Tuner.restore``: Tune copies its experiment files to storage behind the trials, so after a kill
    they can be out of step with each other (a sweep resumed that way left Optuna trials RUNNING). A rerun
    finds what it needs elsewhere: the stage cache, the Optuna study, Train checkpoints by trial key.
    ``max_failures``: Tune's restarts of a failed trial; none where Train restarts its workers (TrialSettings)."""
    from segsde.runtime.ray_job import ray_storage

    storage = as_location(storage)
    storage.child(name).delete()
    return ray.tune.RunConfig(name=name, **ray_storage(storage), verbose=1,
                              failure_config=ray.tune.FailureConfig(max_failures=max_failures), callbacks=[callback])


class MlflowStatusCallback(ray.tune.Callback):
    """Closes each trial's child run from the Tune driver: FINISHED, KILLED (tagged ``stopped_early``) when
    a scheduler stopped it before ``full_steps``, or FAILED with the reason. Needed because ASHA kills a
    trial before its own code could close the run; with ``discard_checkpoints`` (the storage root) it also removes
    the Train checkpoints of every complete trial (a failed one keeps them for --resume). Stateless: runs are found by the Ray trial id tag,
    so it works unchanged after ``Tuner.restore``."""

    def __init__(self, uri: str, experiment: str, full_steps: int | None = None, discard_checkpoints: str | None = None):
        self.uri, self.experiment, self.full_steps = uri, experiment, full_steps
        self.discard_checkpoints = discard_checkpoints  # the storage root, where the complete trials' checkpoints go from

    def _run_id(self, trial) -> str | None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(self.experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.{TRIAL_ID_TAG} = '{trial.trial_id}'", max_results=1) if exp else []
        return runs[0].info.run_id if runs else None

    def on_trial_complete(self, iteration, trials, trial, **info):
        from mlflow.tracking import MlflowClient

        from segsde.orchestration.stages import train_checkpoints

        if self.discard_checkpoints:  # finished, or stopped by a scheduler (at max_t too): it never resumes
            train_checkpoints(self.discard_checkpoints, trial.config.get("trial_key") or trial.config["plan"]["key"]).delete()
        run_id = self._run_id(trial)
        if run_id is None:
            return
        client = MlflowClient(self.uri)
        step = (trial.last_result or {}).get("step")
        stopped = self.full_steps is not None and step is not None and step < self.full_steps
        client.set_tag(run_id, "stopped_early", str(stopped).lower())
        client.set_terminated(run_id, "KILLED" if stopped else "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        from mlflow.tracking import MlflowClient

        run_id = self._run_id(trial)
        if run_id is None:
            return
        client = MlflowClient(self.uri)
        reason = Path(trial.error_file).read_text().strip().splitlines()[-1] if trial.error_file and Path(trial.error_file).is_file() else "unknown"
        client.set_tag(run_id, "segsde.failure", reason[:5000])
        client.set_terminated(run_id, "FAILED")


class ReadyFirst(Searcher):
    """Hands out a fixed list of trial configs, each once its inputs are ready, longest first.

    ``trials``: (config, cost, needs) with ``needs`` the names of the stage outputs it reads; ``ready``
    the set of those that exist (the stage jobs add to it as they finish); ``capacity()`` how many trials
    may run now (fewer while a stage job holds a core); ``stages_running()`` whether more inputs may still
    come. Ends (FINISHED) once every trial is out, or when the rest wait for inputs that can no longer come
    (a stage job failed: the caller raises its error)."""

    def __init__(self, trials: list[tuple[dict, float, frozenset]], ready: set, capacity, stages_running):
        super().__init__()
        self.waiting = sorted(trials, key=lambda t: -t[1])
        self.ready, self.capacity, self.stages_running = ready, capacity, stages_running
        self.running: set[str] = set()

    def suggest(self, trial_id: str):
        if not self.waiting:
            return Searcher.FINISHED
        if len(self.running) >= self.capacity():
            return None
        more_to_come = self.stages_running()  # read before ``ready``: a job that has ended has added its output
        for i, (config, _, needs) in enumerate(self.waiting):
            if needs <= self.ready:
                del self.waiting[i]
                self.running.add(trial_id)
                return config
        return None if more_to_come else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.running.discard(trial_id)

    def __getstate__(self) -> dict:
        # Tune pickles its searcher for Tuner.restore, which studies never use (see fresh_run_config): the
        # callables that watch the live stage jobs stay out
        return {**self.__dict__, "capacity": None, "stages_running": None}
