"""Optuna sweeps on Ray Tune: per labeled budget (an outer loop: the optimiser must never pick the budget)
one Tuner, one persisted Optuna study and one MLflow parent run. TPE proposes trainer settings from
``ablations/sweep_space.yaml``; ASHA stops weak trials on validation mIoU, and those are told to Optuna as
PRUNED, not COMPLETE. The row's own values are the first trial. Then the best settings and the defaults are
confirmed on fresh seeds (``confirmation.py``): only a setting that beats the defaults there is written for a study."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import optuna
from ray.tune.search.optuna import OptunaSearch

from segsde.configs import check
from segsde.data.dataset import PSEUDO_DEPTH, pseudo_depth_column
from segsde.data.store import TUNE_SPLIT, local_dataset, read_manifest
from segsde.errors import SegSDEError
from segsde.orchestration.confirmation import confirm_budget
from segsde.orchestration.stages import StageTracking, input_id
from segsde.profiles import ABLATIONS_DIR, data_profile, load_yaml, section_config
from segsde.progress import start_board
from segsde.sde.run import sde_config
from segsde.storage import Location, as_location, cache_key, open_root, storage_uri
from segsde.trainer.run import study_rows, train_config

SPACE_FILE = ABLATIONS_DIR / "sweep_space.yaml"
WHEN = {"always": lambda c: True, "teacher": lambda c: c.teacher, "multitask": lambda c: c.multitask,
        "depthmix": lambda c: c.teacher and c.mix == "depth"}
METRIC = "miou"
SAMPLERS = ("tpe", "gp", "random", "grid")


@dataclass(frozen=True)
class SweepConfig:
    """A profile's ``sweep`` section, then flags."""
    profile: str = "quick"
    row: str = "depthmix"
    budgets: tuple[int, ...] = (32,)
    samples: int = 8                  # trials per budget
    seed: int = 0                     # trial seed and TPE sampler seed
    params: tuple[str, ...] = ()      # a subset of the space; empty: every entry that matters for the row
    concurrency: int = 1
    workers: int = 1
    gpu: bool = False
    reduction_factor: int = 2         # ASHA keeps the top 1/reduction_factor at each rung
    sampler: str = "tpe"              # Optuna's: tpe, gp (a Gaussian process that fits the noise), random, or grid
    asha: bool = True                 # stop weak trials early (False: every trial runs its whole schedule)
    grid_points: int = 3              # values per parameter of the grid sampler (samples: all their combinations)
    confirm_top: int = 3              # the best settings confirmed against the defaults on fresh seeds
    confirm_seeds: int = 3            # fresh seeds of the confirmation (seed + 1, ...); 0: no confirmation
    train: dict = field(default_factory=dict)
    sde: dict = field(default_factory=dict)  # overrides of the profile's sde section for the SDE stage
    data_seed: int = 0

    def validate(self, where: str) -> None:
        check([(self.samples >= 1 and self.concurrency >= 1 and self.workers >= 1, "samples, concurrency and workers must be >= 1"),
               (len(self.budgets) > 0 and min(self.budgets) >= 1, "budgets must be positive"),
               (self.reduction_factor >= 2, "reduction_factor must be >= 2"),
               (self.confirm_top >= 1 and self.confirm_seeds >= 0, "confirm_top must be >= 1 and confirm_seeds >= 0"),
               (self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}"),
               (self.grid_points >= 2, "grid_points must be >= 2")], where)

    @property
    def fresh_seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + 1 + i for i in range(self.confirm_seeds))


def sweep_config(profile: str, sets: dict | None = None, **flags) -> SweepConfig:
    """The profile's ``sweep`` section, the flags that were given and ``--set`` pairs for every trial, checked."""
    cfg = section_config(SweepConfig, profile, "sweep", sets, **flags)
    if cfg.row not in study_rows():
        train_config(profile, cfg.row)  # the one-line unknown-row error with the closest name
    search_space(cfg)  # unknown parameters fail here
    sde_config(profile, cfg.sde)
    return cfg


def search_space(cfg: SweepConfig, path: Path = SPACE_FILE) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions of the swept TrainConfig keys, named ``params/<key>`` (Tune un-flattens them)."""
    space = load_yaml(path)
    row = train_config(cfg.profile, cfg.row, cfg.train)
    names = list(cfg.params) or [k for k, v in space.items() if WHEN[v.get("when", "always")](row)]
    out = {}
    for name in names:
        if name not in space:
            import difflib

            close = difflib.get_close_matches(name, space, n=1)
            raise SegSDEError(f"parameter '{name}' is not in {path}: " + (f"did you mean '{close[0]}'?" if close else f"choose from {sorted(space)}"))
        entry = space[name]
        if not hasattr(row, name) or not entry["low"] < entry["high"]:
            raise SegSDEError(f"{path}: '{name}' must be a trainer setting with low < high: fix the entry")
        out[f"params/{name}"] = optuna.distributions.FloatDistribution(float(entry["low"]), float(entry["high"]), log=bool(entry.get("log")))
    if not out:
        raise SegSDEError(f"no parameter of {path} matters for row '{cfg.row}': pass --params")
    return out


def grid(cfg: SweepConfig, space: dict) -> dict[str, list[float]]:
    """``grid_points`` values per parameter, spaced as the parameter is sampled (log or linear), ends included."""
    def points(d):
        ends = (np.log(d.low), np.log(d.high)) if d.log else (d.low, d.high)
        values = np.linspace(*ends, cfg.grid_points)
        return [float(v) for v in (np.exp(values) if d.log else values)]

    return {name: points(d) for name, d in space.items()}


def startup_trials(samples: int) -> int:
    """The random trials before a model-based sampler models: Optuna's default is 10, so in a sweep of 8 neither TPE
    nor GP would ever act (both would be random search with ASHA); a third of the samples, at least 2, at most 10."""
    return min(10, max(2, samples // 3))


def make_sampler(cfg: SweepConfig, space: dict) -> optuna.samplers.BaseSampler:
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid(cfg, space), seed=cfg.seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    startup = startup_trials(cfg.samples)
    if cfg.sampler == "gp":  # GP models COMPLETE trials only: ASHA's stopped ones do not count towards its startup
        return optuna.samplers.GPSampler(seed=cfg.seed, deterministic_objective=False, n_startup_trials=startup)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup)


def trials_per_budget(cfg: SweepConfig, space: dict) -> int:
    """``samples``, or every point of the grid."""
    return int(np.prod([len(v) for v in grid(cfg, space).values()])) if cfg.sampler == "grid" else cfg.samples


def defaults(cfg: SweepConfig, space: dict) -> dict:
    """The row's own values of the swept keys (clipped into the space): the first trial."""
    row = train_config(cfg.profile, cfg.row, cfg.train)
    return {k: min(max(float(getattr(row, k.removeprefix("params/"))), d.low), d.high) for k, d in space.items()}


class AshaAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED, not COMPLETE, for a trial a scheduler stopped before
    ``full_steps`` (Ray's searcher reports an ASHA stop as a finished trial, so TPE would take a
    2-evaluation mIoU for a final one). Every suggestion carries ``trial_key`` (study name and Optuna
    trial number): the trial's MLflow run key and Train run name, so a trial is the same trial in any
    Tuner. The Optuna trials a killed sweep left RUNNING (``interrupted`` numbers) are handed out again
    before any new one, so they go on from their Train checkpoints instead of being duplicated. Relies on
    OptunaSearch's private state: Ray is pinned to 2.60."""

    def __init__(self, *args, full_steps: int, step_key: str = "step", interrupted: tuple[int, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self._full_steps, self._step_key = full_steps, step_key
        self._interrupted = list(interrupted)

    def suggest(self, trial_id: str):
        if self._interrupted and trial_id not in self._ot_trials:
            again = self._ot_study.trials[self._interrupted.pop(0)]
            self._ot_trials[trial_id] = optuna.Trial(self._ot_study, again._trial_id)
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            config["trial_key"] = f"{self._study_name}-t{self._ot_trials[trial_id].number}"
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and self._step_key in result and trial_id in self._ot_trials:  # the sweep's compute, in trainer steps
            self._ot_trials[trial_id].set_user_attr("steps", int(result[self._step_key]))
        stopped = result and not error and result.get(self._step_key, self._full_steps) < self._full_steps
        if stopped and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


def optuna_storage(out: Path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{Path(out).absolute() / 'optuna.db'}")


def run_sweep(cfg: SweepConfig, out: Path, data_root: Location | str | None = None, address: str | None = None,
              tracking_uri: str | None = None, experiment: str | None = None, resume: bool = False,
              storage: str | None = None, log=print, keep_checkpoints: bool = False, console=None) -> dict:
    """One sweep per budget; returns, per budget, the best settings and where the study lives. The Optuna
    study (the sweep's own state) is a sqlite file in the driver's ``out``; every other artifact goes to the
    storage root (``storage``, else ``$SEGSDE_STORAGE``, else ``out``). Finished and pruned trials, and the SDE stage,
    keep their training state only with ``keep_checkpoints``. ``console``: the study's live view (``StudyConsole``),
    else every line goes to ``log``."""
    from segsde.orchestration.nodes import NodeWatch
    from segsde.orchestration.preflight import preflight
    from segsde.orchestration.stages import input_stages
    from segsde.orchestration.study import start_ray
    from segsde.tracking import end_run, get_or_create_run, kill_running_children, resolve_tracking_uri

    out = Path(out).absolute()
    root = open_root(storage_uri(storage, out))
    experiment = experiment or f"segsde-sweep-{cfg.profile}"
    space = search_space(cfg)
    check_tuning_split(cfg.profile, data_root)
    uri = resolve_tracking_uri(out, tracking_uri)  # an unusable store fails here, before the Optuna store exists
    log = console or log
    out.mkdir(parents=True, exist_ok=True)
    storage = optuna_storage(out)
    names = {b: f"{experiment}-{cfg.row}-b{b}" for b in cfg.budgets}
    existing = {s.study_name for s in optuna.study.get_all_study_summaries(storage)}
    if not resume and existing & set(names.values()):
        raise SegSDEError(f"the Optuna study {sorted(existing & set(names.values()))[0]} already exists in {out / 'optuna.db'}: "
                          "pass --resume to continue it, or --experiment NAME for a new sweep")
    # the search scores on the tuning split; the confirmation (cfg.train as it is) on the study's val split
    configs = [train_config(cfg.profile, cfg.row, {**cfg.train, "budget": b, "seed": cfg.seed, "eval_split": TUNE_SPLIT})
               for b in cfg.budgets]
    if console is not None:
        console.start()
    start_ray(cfg.profile, cfg.row, cfg.train, cfg.concurrency, cfg.workers, cfg.gpu, address)  # stage jobs share it
    preflight(root, uri)
    board = start_board() if console is not None else None  # noqa: F841 (held while the live view reads it)
    if console is not None:
        console.keep()
    data, sde_models, selections = input_stages(cfg.profile, configs, (cfg.seed, *cfg.fresh_seeds), root,
                                                as_location(data_root) if data_root else None, cfg.data_seed, log=log,
                                                sde_overrides=cfg.sde, keep_checkpoints=keep_checkpoints)
    results = {}
    with NodeWatch(uri, experiment, root, log, on_cluster=bool(address)):  # lost nodes: one line each
        for budget, tc in zip(cfg.budgets, configs):
            name = names[budget]
            parent, created = get_or_create_run(uri, experiment, f"sweep:{name}:{cache_key(asdict(cfg))}", name,
                                                {"sweep": asdict(cfg), "budget": budget, "space": {k: repr(v) for k, v in space.items()}},
                                                {"segsde.stage": "sweep", "segsde.budget": str(budget), "segsde.row": cfg.row})
            log(f"[sweep] budget {budget}: Optuna study '{name}', MLflow parent run {parent}{'' if created else ' (found again)'}")
            status = "FAILED"
            try:
                selection = selections.get((tc.selection, cfg.seed)) if tc.labeled == "selection" else None
                tracking = StageTracking(uri, experiment, parent)
                if console is not None:
                    console.watch({f"{name}-t{n}": f"{cfg.row} b{budget} t{n}" for n in range(trials_per_budget(cfg, space))})
                _tune_budget(cfg, name, space, tc, data, root, sde_models.get((tc.sde_model, cfg.seed)), selection, tracking, storage, address,
                             resume, log, keep_checkpoints)
                results[budget] = _summarise_budget(cfg, name, storage, tracking, out, log)
                if cfg.confirm_seeds:
                    results[budget]["confirmation"] = confirm_budget(cfg, name, budget, defaults(cfg, space), (data, sde_models, selections),
                                                                     root, tracking, storage, address, out, log, keep_checkpoints, console)
                status = "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                kill_running_children(uri, experiment, parent)
                raise
            finally:
                end_run(uri, parent, status)
    if console is not None:
        console.finish()
    return {"budgets": results, "tracking_uri": uri, "experiment": experiment, "optuna_storage": str(out / "optuna.db")}


def check_tuning_split(profile: str, data_root: Location | str | None) -> None:
    """The search scores on the tuning split, so the sweep's dataset must have one: checked before anything starts."""
    if data_root is not None:
        tune = read_manifest(local_dataset(as_location(data_root)))["splits"].get(TUNE_SPLIT)
        where, fix = f"the dataset {data_root}", "rebuild it with `segsde data synth --tune N` or `segsde data cityscapes --tune-cities CITIES`"
    else:
        tune = data_profile(profile).tune
        where, fix = f"profile '{profile}'", "give its data section a tune size (e.g. tune: 64)"
    if not tune:
        raise SegSDEError(f"{where} has no '{TUNE_SPLIT}' split for the search to score on (the study reports on 'val'): {fix}")


def _tune_budget(cfg, name, space, tc, data, root, sde_model, selection, tracking, storage, address, resume, log,
                 keep_checkpoints: bool = False) -> None:
    """One Tuner over the trials the Optuna study still lacks. The study is the sweep's only state (see
    ``fresh_run_config``): a resumed sweep starts a new Tuner that hands the interrupted Optuna trials out again."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from segsde.orchestration.trials import MlflowStatusCallback, TrialSettings, fresh_run_config, runs_in_process, tune_trainable
    from segsde.trainer.run import TrialPlan

    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    finished = sum(t.state.is_finished() for t in study.trials)
    interrupted = tuple(t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING)
    samples = trials_per_budget(cfg, space) - finished
    if resume and study.trials:
        log(f"[sweep] resuming '{name}': {finished} of {trials_per_budget(cfg, space)} trials finished, "
            f"{len(interrupted)} interrupted (they go on from their last checkpoint)")
    if samples <= 0:
        return
    settings = TrialSettings(root.uri, tracking.uri, tracking.experiment, tracking.parent_run_id, cfg.workers, cfg.gpu, address,
                             in_process=runs_in_process(cfg.workers, address), threads=tc.threads or 1,
                             keep_checkpoints=keep_checkpoints)
    first = None if study.trials or cfg.sampler == "grid" else [defaults(cfg, space)]  # a grid has its own points
    searcher = AshaAwareOptunaSearch(space=space, metric=METRIC, mode="max", sampler=make_sampler(cfg, space), points_to_evaluate=first,
                                     study_name=name, storage=storage, full_steps=tc.steps, interrupted=interrupted[:samples])
    scheduler = ASHAScheduler(time_attr="step", metric=METRIC, mode="max", max_t=tc.steps, grace_period=tc.eval_interval,
                              reduction_factor=cfg.reduction_factor) if cfg.asha else None
    sde_model = sde_model if sde_model and tc.needs_sde else None
    plan = TrialPlan(cfg.row, cfg.profile, tc, data.uri, sde_model.uri if sde_model else None, selection.uri if selection else None,
                     pseudo_depth=pseudo_depth_column(input_id(sde_model)) if sde_model else PSEUDO_DEPTH)
    log(f"[sweep] {samples} trials of row '{cfg.row}' over {sorted(k.removeprefix('params/') for k in space)} ({cfg.sampler}), "
        + (f"ASHA on {METRIC} every {tc.eval_interval} of {tc.steps} steps" if cfg.asha else f"{tc.steps} steps each")
        + f", {cfg.concurrency} at a time")
    ray.tune.Tuner(tune_trainable(settings), param_space={"plan": plan.to_dict()},
                   tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=samples,
                                                   max_concurrent_trials=cfg.concurrency),
                   run_config=fresh_run_config(root.child("tune"), name,
                                               MlflowStatusCallback(tracking.uri, tracking.experiment, tc.steps,
                                                                    None if keep_checkpoints else root.uri),
                                               max_failures=settings.tune_max_failures)).fit()
    if any(t.state == optuna.trial.TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        raise KeyboardInterrupt  # Tune took a Ctrl-C and ended the trials early (an ended trial is told to Optuna)


def _summarise_budget(cfg: SweepConfig, name: str, storage, tracking: StageTracking, out: Path, log) -> dict:
    """Best settings, parameter importances and the optimisation-history figure, from the Optuna study."""
    import matplotlib.pyplot as plt

    from segsde.data.store import atomic_write_bytes
    from segsde.tracking import RunLogger

    study = optuna.load_study(study_name=name, storage=storage)
    states = {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    summary = {"study": name, "trials": len(study.trials), "states": {k: v for k, v in states.items() if v},
               "steps": sum(t.user_attrs.get("steps", 0) for t in study.trials)}  # the search's compute
    if complete:
        best = max(complete, key=lambda t: t.value)
        summary.update(best_miou=best.value, best_params={k.removeprefix("params/"): v for k, v in best.params.items()},
                       best_trial=best.number)
    try:
        summary["importances"] = {k.removeprefix("params/"): v for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as exc:  # too few complete trials
        summary["importances"] = None
        summary["importances_note"] = str(exc)[:200]
    logger = RunLogger(tracking.uri, tracking.parent_run_id)
    logger.client.log_dict(tracking.parent_run_id, summary, "sweep/summary.json")
    if complete:
        logger.metrics({"sweep/best_miou": 100 * summary["best_miou"]}, step=0)
        figures = [(optuna.visualization.matplotlib.plot_optimization_history(study).figure, "optimisation_history.png")]
        if summary["importances"]:
            figures.append((optuna.visualization.matplotlib.plot_param_importances(study).figure, "param_importances.png"))
        for fig, file in figures:
            fig.tight_layout()
            logger.figure(fig, f"sweep/{file}")
            plt.close(fig)
    where = out / "sweep" / name
    where.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(where / "summary.json", json.dumps(summary, indent=1).encode())
    log(f"[sweep] {name}: {summary['states']}; best mIoU "
        + (f"{100 * summary['best_miou']:.2f} with {summary['best_params']}" if complete else "none (no complete trial)"))
    return summary
