"""The component study as a DAG of cached stages: dataset -> SDE pre-training -> pseudo-depth export ->
data selection(s) -> component trials (rows x budgets x seeds, a Ray Tune grid of Ray Train jobs) -> the
report. Every stage's output lives under ``<storage>/cache`` keyed by a hash of its configuration and its
inputs' keys, so a finished stage or trial is reused, never recomputed; MLflow holds one parent run per
study with a child run for every stage and trial, all found again by stable keys."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from segsde.configs import check
from segsde.errors import SegSDEError
from segsde.orchestration.claims import check_claims
from segsde.orchestration.keys import code_version, entry_key
from segsde.orchestration.sde_quality import constant_depth_reference, model_quality
from segsde.orchestration.stages import StageTracking, dataset_stage, input_id, missed, model_stages, train_checkpoints, trial_inputs
from segsde.profiles import data_profile, section_config
from segsde.progress import start_board
from segsde.runtime import Background, effective_precision
from segsde.sde.run import sde_config
from segsde.selection.run import selection_config
from segsde.storage import Location, as_location, cache_key, open_root, storage_uri
from segsde.trainer.config import CONFUSIONS_FILE
from segsde.trainer.run import METRICS_FILE, TrialPlan, study_rows, train_config


@dataclass(frozen=True)
class StudyConfig:
    """A profile's ``study`` section (rows, budgets, seeds, how trials run, train overrides), then flags."""
    profile: str = "quick"
    rows: tuple[str, ...] = ()                # empty: every row of ablations/component_study.yaml
    budgets: tuple[int, ...] = (32,)
    seeds: tuple[int, ...] = (0,)
    concurrency: int = 1                      # trials at once (each: a 0-CPU driver + its Train workers)
    workers: int = 1                          # Ray Train workers per trial
    gpu: bool = False
    train: dict = field(default_factory=dict)  # overrides of the profile's train section for study trials
    sde: dict = field(default_factory=dict)    # overrides of the profile's sde section for the SDE stage
    select: dict = field(default_factory=dict)  # overrides of the profile's select section for the selections
    data_seed: int = 0
    min_effect: float = 1.0                   # mIoU points: the smallest difference the seeds are planned to find
    pilot_sd: float | None = None             # paired sd (mIoU points) for --plan where no two seeds of a row have run
    # one SDE pre-training (and export) per study seed, paired with that seed's trials: the intervals then cover the
    # SDE stage's own randomness; otherwise one SDE model serves every seed and the intervals are conditional on it
    sde_per_seed: bool = False
    # "A:B" pairs of rows compared with each other besides each against Baseline (the paper's orderings), in Holm's family
    compare: tuple[str, ...] = ()
    # claims the report answers: {claim: text, lines: [a row (against Baseline) or an "A:B" of compare, ...]}
    claims: tuple[dict, ...] = ()

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(tuple(p.split(":")) for p in self.compare)

    @property
    def claim_lines(self) -> dict[str, list[str]]:
        return {c["claim"]: list(c["lines"]) for c in self.claims}

    def validate(self, where: str) -> None:
        check([(len(self.budgets) > 0 and min(self.budgets) >= 1, "budgets must be positive"),
               (self.min_effect > 0, "min_effect must be > 0 (mIoU points)"),
               (self.pilot_sd is None or self.pilot_sd > 0, "pilot_sd must be > 0 (mIoU points)"),
               (len(self.seeds) > 0, "seeds must not be empty"),
               (self.concurrency >= 1 and self.workers >= 1, "concurrency and workers must be >= 1")], where)


def study_config(profile: str, sets: dict | None = None, **flags) -> StudyConfig:
    """The profile's ``study`` section, the flags that were given (None keeps the section's) and ``--set`` pairs
    for every trial; checked here, so that a bad row, budget or setting is one line before anything runs."""
    cfg = section_config(StudyConfig, profile, "study", sets, **flags)
    cfg = cfg if cfg.rows else replace(cfg, rows=tuple(study_rows()))
    testbed = data_profile(profile)
    if testbed.source == "synthetic" and max(cfg.budgets) > testbed.train:
        raise SegSDEError(f"budget {max(cfg.budgets)} is larger than the {testbed.train} training images of the "
                          f"'{profile}' testbed: lower --budgets")
    for pair in cfg.compare:
        names = pair.split(":")
        if len(names) != 2 or names[0] == names[1] or not set(names) <= set(cfg.rows) or "baseline" in names:
            raise SegSDEError(f"--compare {pair}: give two different rows of the study as A:B, neither of them baseline "
                              f"(every row is compared with it already; its rows: {', '.join(cfg.rows)})")
    if any(not isinstance(c, dict) or set(c) != {"claim", "lines"} for c in cfg.claims):
        raise SegSDEError(f"study.claims of profile '{profile}': give each claim as {{claim: TEXT, lines: [ROW or A:B, ...]}}")
    check_claims(cfg.claim_lines, cfg.rows, cfg.pairs)
    for row in cfg.rows:  # an unknown row or a bad override is a one-line error before anything runs
        train_config(profile, row, {**cfg.train, "budget": cfg.budgets[0], "seed": cfg.seeds[0]})
    sde_config(profile, cfg.sde)
    selection_config(profile, cfg.select)
    return cfg


@dataclass
class Trial:
    plan: TrialPlan
    cost: float = 0.0          # TrainConfig.relative_cost: the longest trials start first
    needs: frozenset = frozenset()  # trial_inputs: the stage outputs it waits for
    inputs: dict = field(default_factory=dict)  # what its key hashes besides the code

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def key(self) -> str:
        return self.plan.key

    @property
    def result(self) -> Location:
        return Location(self.plan.result)

    @property
    def done(self) -> bool:
        return self.result.child(METRICS_FILE).is_file()


def plan_trials(cfg: StudyConfig, data: Location, storage: Location, sde_models: dict, selections: dict) -> list[Trial]:
    """Every (row, budget, seed) planned once (``plan_trial``), with its inputs from ``sde_models`` and ``selections``
    by (kind, seed), as ``model_stages`` gives them."""
    trials = []
    for row in cfg.rows:
        for budget in cfg.budgets:
            for seed in cfg.seeds:
                tc = train_config(cfg.profile, row, {**cfg.train, "budget": budget, "seed": seed})
                selection = selections.get((tc.selection, seed)) if tc.labeled == "selection" else None
                model = sde_models.get((tc.sde_model, seed)) if tc.needs_sde else None
                trials.append(plan_trial(cfg.profile, row, tc, data, storage, model, selection, cfg.workers, cfg.gpu))
    return trials


def plan_trial(profile: str, row: str, tc, data: Location, storage: Location, model: Location | None,
               selection: Location | None, workers: int = 1, gpu: bool = False) -> Trial:
    """One trial of ``row`` with train config ``tc``: its config, its inputs and its cache key (the config and the
    inputs' own keys, never where the storage is; ``keys.entry_key`` adds the trainer's code). The same settings are
    the same trial wherever they are planned (a study, a sweep's confirmation)."""
    from segsde.data.dataset import PSEUDO_DEPTH, pseudo_depth_column

    # a trial with the SDE model may read its pseudo-depth: the export's code is an input too
    # the device kind and the precision it computes in: a CPU result is never a cache hit for a GPU trial
    device = "cuda" if gpu else "cpu"
    inputs = {"stage": "train", "row": row, "config": asdict(tc), "data": input_id(data), "workers": workers,
              "device": device, "precision": effective_precision(device, tc.precision),
              "sde_model": input_id(model), "pseudo_depth": code_version("export") if model else None,
              "selection": input_id(selection)}
    key = entry_key("train", inputs)
    plan = TrialPlan(row, profile, tc, data.uri, model.uri if model else None, selection.uri if selection else None,
                     key, storage.child("cache", f"{trial_prefix(row, tc.budget, tc.seed)}{key}").uri,
                     pseudo_depth_column(input_id(model)) if model else PSEUDO_DEPTH)
    return Trial(plan, tc.relative_cost, trial_inputs(tc, tc.seed), inputs)


def run_study(cfg: StudyConfig, out: Path, data_root: Location | str | None = None, force: tuple[str, ...] = (),
              address: str | None = None, tracking_uri: str | None = None, experiment: str | None = None,
              resume: bool = False, dry_run: bool = False, storage: str | None = None, log=print, console=None,
              keep_checkpoints: bool = False) -> dict:
    """Run (or, with ``dry_run``, print) the study; return the trial records and where the report went.
    ``out``: the driver's directory (report, default MLflow store); ``storage``: the root of every durable
    artifact (default: ``$SEGSDE_STORAGE``, else ``out``); ``console``: a ``console.StudyConsole`` that shows a
    live view and keeps Ray's output in a log file (else every line goes to ``log``); ``keep_checkpoints``: finished
    trials and SDE stages keep their training state (see ``sde_stage`` and ``TrialSettings``)."""
    from segsde.orchestration.nodes import NodeWatch
    from segsde.orchestration.preflight import preflight
    from segsde.tracking import RunLogger, end_run, get_or_create_run, kill_running_children, resolve_tracking_uri, run_page

    out = Path(out).absolute()
    root = open_root(storage_uri(storage, out))
    data_root = as_location(data_root) if data_root is not None else None
    start = time.perf_counter()
    experiment = experiment or f"segsde-study-{cfg.profile}"
    train_configs = [train_config(cfg.profile, r, {**cfg.train, "budget": max(cfg.budgets), "seed": cfg.seeds[0]}) for r in cfg.rows]
    tracking, log = None, console or log
    if not dry_run:
        uri = resolve_tracking_uri(out, tracking_uri)  # an unusable store fails here, before anything starts
        if console is not None:
            console.start()
        # before any run exists, so an unreachable cluster leaves nothing behind; and before the stage jobs,
        # so they share the study's Ray (with the driver resource and the State API Train needs)
        if address or _needs_ray(cfg, train_configs, root, data_root, force):
            start_ray(cfg.profile, cfg.rows[0], cfg.train, cfg.concurrency, cfg.workers, cfg.gpu, address)
            preflight(root, uri)  # every node reads the storage root and the tracking store, or nothing starts
            board = start_board() if console is not None else None  # noqa: F841 (held while the live view reads it)
        study = {"study": asdict(cfg), "data_root": input_id(data_root)}
        parent, created = get_or_create_run(uri, experiment, f"study:{cache_key(study)}", f"study-{cfg.profile}", study,
                                            {"segsde.stage": "study", "segsde.profile": cfg.profile})
        # the stage jobs' runs under one of their own: the study run's children are its trials
        stages_run, _ = get_or_create_run(uri, experiment, f"stages:{cache_key(study)}", "stages", study,
                                          {"segsde.stage": "stages", "segsde.profile": cfg.profile, "mlflow.parentRunId": parent})
        tracking = StageTracking(uri, experiment, parent, stages_run)
        if console is not None:
            console.keep()
        log(f"[study] MLflow parent run {parent}{'' if created else ' (found again)'} in experiment '{experiment}' of {uri}")
        if resume:  # what any rerun does; the flag says so for whoever expects to need it
            log("[study] resuming: finished stages and trials are cache hits, interrupted ones go on from their checkpoints")
    status, stages = "FAILED", None
    watch = NodeWatch(tracking.uri, experiment, root, log, on_cluster=bool(address)) if tracking else None
    try:
        if watch:
            watch.__enter__()
        data = dataset_stage(data_profile(cfg.profile), root, cfg.data_seed, data_root, "data" in force, dry_run, log, tracking)
        stage_args = (cfg.profile, train_configs, cfg.seeds, root, data, force, cfg.sde_per_seed)
        ready = set()
        planned = None if dry_run or cfg.concurrency == 1 else _planned_model_stages(stage_args, cfg)
        if planned and planned[0]:
            # the stage jobs (one core each, in this thread) run beside the trials, which start as soon as their
            # inputs exist: a second thread speeds a small-batch SDE step up far less than 2x
            _, sde_models, selections = planned
            stages = Background(model_stages, *stage_args, dry_run=False, log=log, tracking=tracking, sde_overrides=cfg.sde,
                                select_overrides=cfg.select, ready=ready.add, keep_checkpoints=keep_checkpoints, name="study-stages")
        else:
            sde_models, selections = model_stages(*stage_args, dry_run=dry_run, log=log, tracking=tracking, sde_overrides=cfg.sde,
                                                  select_overrides=cfg.select, ready=ready.add, keep_checkpoints=keep_checkpoints)
        trials = plan_trials(cfg, data, root, sde_models, selections)
        todo = [t for t in trials if "train" in force or not t.done]
        _log_trials(trials, todo, root, "train" in force, dry_run, log)
        if dry_run:
            log(f"[study] dry run: {len(trials)} trials, {len(trials) - len(todo)} cached; nothing was run")
            return {"trials": [t.name for t in trials], "todo": [t.name for t in todo]}
        _clear_forced(todo, force, root)
        if not keep_checkpoints:  # a kill between a trial's result and its clean-up left them
            for t in trials:
                if t not in todo:
                    train_checkpoints(root, t.key).delete()
        if console is not None:
            console.watch({t.key: t.name for t in todo})
        errors = run_trial_grid(cfg, todo, root, tracking, address, log, ready, stages, keep_checkpoints) if todo else {}
        if stages is not None and not stages.alive():
            stages.result()  # a stage job's error, if one failed
        if any(not t.done and t.key not in errors for t in todo):
            raise KeyboardInterrupt  # Tune took the Ctrl-C and ended the trials early
        if stages is not None and (made := stages.result()) != (sde_models, selections):
            raise SegSDEError(f"the stage jobs wrote {made}, not the planned {(sde_models, selections)}")
        for t in todo:
            if t.key in errors:
                log(f"[trial] {t.name}: FAILED ({errors[t.key]}); the study goes on, its cell is marked")
        records = [trial_record(t) for t in trials]
        if console is not None:
            console.finish()
        report = _report(cfg, records, out, root, tracking, log, data, brief=console is not None)
        failed = sum(r.get("miou") is None for r in records)
        RunLogger(tracking.uri, tracking.parent_run_id).client.set_tag(tracking.parent_run_id, "segsde.failed_trials", str(failed))
        status = "FINISHED"
        seconds = time.perf_counter() - start
        log(f"[study] {len(trials)} trials ({len(todo)} run, {len(trials) - len(todo)} cached, {failed} failed) in "
            f"{seconds:.0f} s; report in {report}" + (" (rerun with --resume to retry the failed trials)" if failed else ""))
        log(f"[study] in MLflow, the study run's description is this report with every trial's mIoU: "
            f"{run_page(tracking.uri, tracking.parent_run_id, out)}")
        return {"records": records, "report": str(report), "parent_run_id": tracking.parent_run_id, "seconds": seconds,
                "tracking_uri": tracking.uri, "experiment": experiment, "failed": failed}
    except KeyboardInterrupt:
        status = "KILLED"
        if tracking is not None:  # a stage job in the stage thread dies with this process before it could close its run
            kill_running_children(tracking.uri, tracking.experiment, tracking.parent_run_id)
        raise
    finally:
        if watch:
            watch.__exit__()
        if tracking is not None:
            end_run(tracking.uri, tracking.stages_run_id, status)
            end_run(tracking.uri, tracking.parent_run_id, status)


def trial_prefix(row: str, budget: int, seed: int) -> str:
    return f"train-{row}-b{budget}-s{seed}-"


def _log_trials(trials: list[Trial], todo: list[Trial], storage: Location, force: bool, dry_run: bool, log) -> None:
    for t in trials:
        if t in todo:
            prefix = trial_prefix(t.plan.row, t.plan.train.budget, t.plan.train.seed)
            reason = missed(storage, t.result, prefix, "train", t.inputs, force, dry_run)
            log(f"[trial] {t.name}: {'would run' if dry_run else 'to run'} ({t.result}; {reason})")
        else:
            log(f"[trial] {t.name}: cache hit, reusing {t.result}")


def _clear_forced(todo: list[Trial], force, storage: Location) -> None:
    if "train" in force:
        for t in todo:  # recompute, not resume from the finished Train run
            train_checkpoints(storage, t.key).delete()


def _planned_model_stages(stage_args: tuple, cfg: StudyConfig) -> tuple[bool, dict, dict]:
    """A quiet dry run of the stages after the dataset: whether one of them would run, and the SDE models
    and selection lists they give."""
    said = []
    sde_models, selections = model_stages(*stage_args, dry_run=True, log=said.append, sde_overrides=cfg.sde, select_overrides=cfg.select)
    return any(" would " in line for line in said), sde_models, selections


def _needs_ray(cfg: StudyConfig, train_configs: list, storage: Location, data_root: Location | None, force) -> bool:
    """Whether a stage job or a trial would run: a quiet dry run of the DAG (rendering needs no Ray)."""
    data = dataset_stage(data_profile(cfg.profile), storage, cfg.data_seed, data_root, "data" in force, True, lambda _: None)
    stage_work, sde_models, selections = _planned_model_stages((cfg.profile, train_configs, cfg.seeds, storage, data, force,
                                                                cfg.sde_per_seed), cfg)
    return stage_work or "train" in force or not all(t.done for t in plan_trials(cfg, data, storage, sde_models, selections))


def start_ray(profile: str, row: str, train: dict, concurrency: int, workers: int, gpu: bool, address: str | None) -> None:
    """One Ray for every stage and trial: locally, CPUs for ``concurrency`` trials (and at least the
    machine's cores, which the stage jobs use) plus the driver resource that caps concurrent trials."""
    import ray

    from segsde.orchestration.trials import DRIVER_RESOURCE
    from segsde.runtime.ray_job import init_ray

    if ray.is_initialized() and not address and DRIVER_RESOURCE not in ray.cluster_resources():
        ray.shutdown()  # a stage job started local Ray without the driver resource the trials need
    threads = train_config(profile, row, train).threads or 1
    init_ray(address, num_cpus=max(concurrency * workers * threads, os.cpu_count() or 1),
             num_gpus=concurrency * workers if gpu else None, resources={DRIVER_RESOURCE: concurrency})


def run_trial_grid(cfg: StudyConfig, todo: list[Trial], storage: Location, tracking: StageTracking, address: str | None,
                   log, ready: set, stages: Background | None, keep_checkpoints: bool = False, title: str = "study") -> dict[str, str]:
    """The trials that are not cached, on Ray Tune: each starts once its inputs are in ``ready``, longest
    first, one fewer at a time while the ``stages`` job holds a core. Returns the last line of each failed
    trial's error by trial key."""
    import ray.tune

    from segsde.orchestration.trials import MlflowStatusCallback, ReadyFirst, TrialSettings, fresh_run_config, runs_in_process, tune_trainable

    start_ray(cfg.profile, cfg.rows[0], cfg.train, cfg.concurrency, cfg.workers, cfg.gpu, address)
    settings = TrialSettings(storage.uri, tracking.uri, tracking.experiment, tracking.parent_run_id, cfg.workers, cfg.gpu, address,
                             stream_evaluations=False, in_process=runs_in_process(cfg.workers, address),
                             threads=train_config(cfg.profile, cfg.rows[0], cfg.train).threads or 1, keep_checkpoints=keep_checkpoints)
    stages_running = (lambda: stages.alive()) if stages is not None else (lambda: False)
    searcher = ReadyFirst([({"plan": t.plan.to_dict()}, t.cost, t.needs) for t in todo], ready,
                          lambda: cfg.concurrency - stages_running(), stages_running)
    name = f"study-{cache_key({'keys': sorted(t.key for t in todo)})}"
    beside = ", one fewer while the stage jobs run, each once its inputs exist" if stages is not None else ""
    log(f"[{title}] running {len(todo)} trials, {cfg.concurrency} at a time{beside} ({storage.child('tune', name)})")
    # a trial process is reused by the next trial, its imports done: 3 s less CPU per trial
    closing = MlflowStatusCallback(tracking.uri, tracking.experiment, discard_checkpoints=None if keep_checkpoints else storage.uri)
    tuner = ray.tune.Tuner(tune_trainable(settings), tune_config=ray.tune.TuneConfig(
                               search_alg=searcher, num_samples=len(todo), max_concurrent_trials=cfg.concurrency, reuse_actors=True),
                           run_config=fresh_run_config(storage.child("tune"), name, closing, max_failures=settings.tune_max_failures))
    errors = {}
    # trials waiting for a stage job's output are not trials short of resources: no Tune warning about those
    with _environ({f"TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S{s}": "86400" for s in ("", "_AUTOSCALER")} if stages is not None else {}):
        results = tuner.fit()
    for result in results:
        if result.error is not None:
            lines = str(result.error).strip().splitlines() or [type(result.error).__name__]
            errors[result.config["plan"]["key"]] = lines[-1][:300]
    return errors


@contextlib.contextmanager
def _environ(values: dict):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def trial_record(trial: Trial) -> dict:
    base = {"row": trial.plan.row, "budget": trial.plan.train.budget, "seed": trial.plan.train.seed}
    if not trial.done:
        return {**base, "miou": None}
    confusions = trial.result.child(CONFUSIONS_FILE)  # the report's jackknife over validation images
    extra = {"per_image_confusion": json.loads(confusions.read_text())} if confusions.is_file() else {}
    return {**json.loads(trial.result.child(METRICS_FILE).read_text()), **extra, **model_quality(trial.plan.sde_model), **base}


def _report(cfg: StudyConfig, records: list[dict], out: Path, storage: Location, tracking: StageTracking, log,
            data: Location, brief: bool = False) -> Path:
    from segsde.orchestration.report import write_report
    from segsde.tracking import RunLogger

    logger = RunLogger(tracking.uri, tracking.parent_run_id)
    where = out / "study" / f"{cfg.profile}-{cache_key({'study': asdict(cfg)})}"
    reference = None
    if any(r.get("sde/model") for r in records):  # what an SDE model must beat to have learned depth
        sde = sde_config(cfg.profile, cfg.sde)
        reference = constant_depth_reference(data, sde.val_images, sde.eval_max_depth)
    text, summary = write_report(records, list(cfg.rows), list(cfg.budgets), where, logger, cfg.min_effect, cfg.sde_per_seed,
                                 reference, cfg.pairs, cfg.claim_lines, cfg.concurrency)
    if not storage.is_local:  # the driver's copy is for reading; the storage root keeps the durable one
        storage.child("study", where.name).upload_dir(where)
    log(f"{summary}\nClass IoU, figures and Parquet tables: {where} (study.md)" if brief else text)
    done = [r for r in records if r.get("miou") is not None]
    logger.metrics({f"study/{r['row']}/b{r['budget']}/s{r['seed']}/miou": round(100 * r["miou"], 2) for r in done}, step=0)
    return where
