"""The component study end to end on real local Ray, a real MLflow sqlite store and the smoke profile."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "tune" / "run_ablation.py"), *map(str, args)], capture_output=True, text=True)


def _runs(out: Path):
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("segsde-study-smoke")
    return client.search_runs([exp.experiment_id])


def test_study_runs_a_tune_grid_caches_every_stage_and_never_duplicates_runs(tmp_path):
    dry = _run("--profile", "smoke", "--out", tmp_path, "--rows", "baseline,pseudolabel", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "[trial] baseline-b4-s0: would run" in dry.stdout and "2 trials, 0 cached; nothing was run" in dry.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()  # a dry run writes nothing

    first = _run("--profile", "smoke", "--out", tmp_path, "--rows", "baseline,pseudolabel")
    assert first.returncode == 0, first.stderr
    assert "2 trials (2 run, 0 cached, 0 failed)" in first.stdout
    assert len(list(tmp_path.glob("cache/train-*/metrics.json"))) == 2 and not list(tmp_path.glob("ray/train-*"))  # no training state
    _quiet_terminal(first, tmp_path)
    assert "| baseline | " in first.stdout and "| pseudolabel | " in first.stdout  # the study table is printed
    report = next((tmp_path / "study").iterdir())
    for name in ("study.md", "study.parquet", "trials.parquet", "class_iou.parquet", "study_bars.png", "class_iou_delta_b4.png"):
        assert (report / name).is_file(), name

    runs = _runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("segsde.stage") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["segsde.stage"] for r in children) == ["stages", "train", "train"]  # the trials, and the stages' run
    stages = next(r for r in children if r.data.tags["segsde.stage"] == "stages")
    assert [r.data.tags["segsde.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == stages.info.run_id] == ["data"]
    for trial in (r for r in children if r.data.tags["segsde.stage"] == "train"):
        assert trial.info.status == "FINISHED" and trial.data.tags["ray_trial_id"]
        assert "final/miou" in trial.data.metrics and any(k.startswith("final/iou/") for k in trial.data.metrics)
    parent_artifacts = {a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(parents[0].info.run_id, "study")}
    assert "study/study.md" in parent_artifacts and "study/class_iou_delta_b4.png" in parent_artifacts
    _mlflow_pages_answer_the_question(tmp_path, parents[0], children)

    rebuilt = subprocess.run([sys.executable, str(ROOT / "mlflow" / "report.py"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                              "--experiment", "segsde-study-smoke", "--out", str(tmp_path / "rebuilt")], capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    for name in ("study.parquet", "class_iou.parquet"):  # MLflow alone gives the same tables as the study
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "rebuilt" / name), pd.read_parquet(report / name), check_exact=False)

    plan = _run("--profile", "smoke", "--out", tmp_path, "--rows", "baseline,pseudolabel", "--plan", "--min-effect", "2")
    assert plan.returncode == 0, plan.stderr
    assert "Seeds for 80% power to find 2 mIoU points" in plan.stdout and "no pilot: run two seeds first" in plan.stdout
    assert "| baseline | 4 |" in plan.stdout and len(_runs(tmp_path)) == len(runs)  # planning runs and logs nothing

    again = _run("--profile", "smoke", "--out", tmp_path, "--rows", "baseline,pseudolabel", "--verbose")  # every line
    assert again.returncode == 0, again.stderr
    assert "[data] cache hit" in again.stdout and "[trial] baseline-b4-s0: cache hit" in again.stdout
    assert "2 trials (0 run, 2 cached, 0 failed)" in again.stdout
    assert len(_runs(tmp_path)) == len(runs)  # the parent and every child were found again, none added
    _changed_code_reruns_its_stage_and_what_reads_it(tmp_path)


def _mlflow_pages_answer_the_question(out: Path, parent, children) -> None:
    """The experiment opens as model training; the parent run's description is the study table and its report is one
    self-contained HTML page; trials log percent, as the report does, and name their dataset."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("# Component study") and "| baseline | " in note and "study/study.html" in note
    html = Path(client.download_artifacts(parent.info.run_id, "study/study.html", str(out / "dl")))
    assert "<table>" in html.read_text() and "data:image/png;base64," in html.read_text()
    report = pd.read_parquet(next((out / "study").iterdir()) / "trials.parquet").set_index("row")
    for trial in (r for r in children if r.data.tags["segsde.stage"] == "train"):
        row = trial.data.tags["segsde.row"]
        assert abs(trial.data.metrics["final/miou"] - report.loc[row, "miou"]) <= 1e-5 * report.loc[row, "miou"]  # percent in both, 6 digits
        datasets = client.get_run(trial.info.run_id).inputs.dataset_inputs
        assert [d.dataset.name for d in datasets] == [next((out / "cache").glob("data-*")).name]


def _quiet_terminal(proc: subprocess.CompletedProcess, out: Path) -> None:
    """Without --verbose a study prints its own lines, a line per finished trial and its table, nothing that looks
    like an error; Ray's and Tune's output is in the log file it names."""
    said = proc.stdout + proc.stderr
    assert len(said.splitlines()) < 60, said
    for noise in ("Traceback", "SIGTERM", "PC: @", "trial_driver_", "Checkpoint successfully", "TensorBoard", "Error", "WARNING"):
        assert noise not in said, noise
    assert "[trial] baseline-b4-s0 done: mIoU " in proc.stdout and "| baseline | " in proc.stdout
    log = next((out / "logs").glob("study-*.log"))
    assert f"output: {log}" in proc.stdout and "trial_driver_" in log.read_text()  # Tune's trial table went there


def _changed_code_reruns_its_stage_and_what_reads_it(out: Path):
    """After a real study, a copy of the package with one file edited: a dry run plans exactly the stages whose
    code changed and those downstream of them, and says why; logging code reruns nothing."""
    import shutil

    code = out / "code"  # a checkout: the entry script puts its own package first on the path
    for folder in ("segsde", "tune", "ablations"):
        shutil.copytree(ROOT / folder, code / folder, ignore=shutil.ignore_patterns("__pycache__"))

    def plan_after(edited: str | None, edit=lambda source: source + "\nEDITED = True\n") -> str:
        if edited:
            (code / "segsde" / edited).write_text(edit((ROOT / "segsde" / edited).read_text()))
        proc = subprocess.run([sys.executable, str(code / "tune" / "run_ablation.py"), "--profile", "smoke", "--out", str(out),
                               "--rows", "baseline,pseudolabel", "--dry-run"], capture_output=True, text=True)
        if edited:
            (code / "segsde" / edited).write_text((ROOT / "segsde" / edited).read_text())
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "2 trials, 2 cached" in plan_after(None)  # the copy is the same code
    assert "2 trials, 2 cached" in plan_after("tracking.py")  # MLflow logging cannot change a number
    reworded = plan_after("trainer/step.py", lambda source: source.replace('"""', '"""Reworded. ', 1) + "\n# a comment\n")
    assert "2 trials, 2 cached" in reworded  # docstrings and comments are not code
    trainer = plan_after("trainer/step.py")
    assert "[data] cache hit" in trainer and "2 trials, 0 cached" in trainer
    assert "[trial] baseline-b4-s0: would run" in trainer and "new code in segsde.trainer.step than train-baseline-b4-s0-" in trainer
    data = plan_after("data/synth/render.py")
    assert "[data] would render" in data and "new code in segsde.data.synth.render" in data and "2 trials, 0 cached" in data


def test_the_evidence_study_plans_the_upper_bound_and_the_depth_oracle_control(tmp_path, synth_root):
    """The all-labels row labels every training image whatever the budget; the control transfers from an SDE
    stage of its own (the quick sde section with oracle=depth), and the other transfer rows from the usual one; each
    seed from its own SDE model, whose pseudo-depth has a column of its own."""
    from segsde.data.store import split_ids
    from segsde.errors import SegSDEError
    from segsde.orchestration.stages import dataset_stage
    from segsde.orchestration.study import _planned_model_stages, plan_trials, study_config
    from segsde.profiles import data_profile
    from segsde.storage import Location
    from segsde.trainer.data import labeled_ids
    from segsde.trainer.run import train_config

    dry = _run("--profile", "evidence", "--out", tmp_path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    sde = [ln for ln in dry.stdout.splitlines() if ln.startswith("[sde] would train")]
    assert len(sde) == 10 and "60 trials, 0 cached" in dry.stdout  # 2 kinds x 5 seeds; 12 rows x 5 seeds
    cfg = study_config("evidence")
    root = Location(str(tmp_path))
    data = dataset_stage(data_profile("evidence"), root, 0, dry_run=True, log=lambda _: None)
    configs = [train_config("evidence", r, {**cfg.train, "budget": 4}) for r in cfg.rows]
    _, models, selections = _planned_model_stages(("evidence", configs, cfg.seeds, root, data, (), cfg.sde_per_seed), cfg)
    transfer = {t.plan.train.seed: t.plan for t in plan_trials(cfg, data, root, models, selections) if t.plan.row == "transfer"}
    assert len({p.sde_model for p in transfer.values()}) == len({p.pseudo_depth for p in transfer.values()}) == 5
    assert transfer[3].sde_model == models[("self_supervised", 3)].uri != models[("depth_oracle", 3)].uri
    cfg = train_config("evidence", "all_labels", {"budget": 4})
    assert sorted(labeled_ids(synth_root, cfg)) == sorted(split_ids(synth_root, "train")) and not cfg.uses_unlabeled
    assert train_config("evidence", "transfer_oracle").sde_model == "depth_oracle"
    with pytest.raises(SegSDEError, match="no unlabeled image"):
        train_config("evidence", "all_labels", {"teacher": True})


def test_the_quick_study_plans_its_longest_trials_first(tmp_path):
    from segsde.orchestration.study import plan_trials, study_config
    from segsde.storage import Location

    cfg = study_config("quick")
    cache = Location(str(tmp_path)).child("cache")
    selections = {("entropy", 0): cache.child("select-entropy.parquet"), ("sde", 0): cache.child("select-sde.parquet")}
    sde_models = {("self_supervised", 0): cache.child("sde-x", "model.pt")}
    trials = plan_trials(cfg, cache.child("data-0123456789ab"), Location(str(tmp_path)), sde_models, selections)
    cost = {t.plan.row: t.cost for t in trials}
    assert cost["combination"] > cost["mtl"] > cost["depthmix"] == cost["classmix"] == cost["pseudolabel"] > cost["baseline"]
    assert cost["baseline"] == cost["transfer"] == cost["al_entropy"] == cost["autoselect"]


def test_the_study_and_sweep_sections_override_the_sde_stage_and_share_it(tmp_path):
    """The quick study trains its SDE stage at batch 8 (to fit its time budget) while `segsde sde --profile
    quick` uses batch 16; the sweep uses the study's settings, so both find the same cached stage."""
    from segsde.errors import SegSDEError
    from segsde.orchestration.stages import sde_stage
    from segsde.orchestration.study import study_config
    from segsde.orchestration.sweep import sweep_config
    from segsde.sde.run import sde_config

    study, sweep = study_config("quick"), sweep_config("quick")
    assert sde_config("quick").batch_size == 16 and sde_config("quick", study.sde).batch_size == 8
    said = []
    data = tmp_path / "cache" / "data-0123456789ab"  # a dataset entry of the stage cache: keyed by its name
    paths = [sde_stage("quick", data, tmp_path, dry_run=True, log=said.append, overrides=o)
             for o in (study.sde, sweep.sde, None)]
    assert paths[0] == paths[1] != paths[2] and all("would train 280 steps" in s for s in said)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(SegSDEError, match="unknown key 'bach_size'.*did you mean 'batch_size'"):
        study_config("smoke", sde={"bach_size": 4})


def test_the_stage_jobs_run_beside_the_trials_and_each_trial_starts_once_its_inputs_exist(tmp_path):
    rows = ("--profile", "smoke", "--out", tmp_path, "--rows", "baseline,transfer,autoselect")
    first = _run(*rows)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    assert "[study] running 3 trials, 2 at a time, one fewer while the stage jobs run, each once its inputs exist" in out
    assert "3 trials (3 run, 0 cached, 0 failed)" in out
    runs = _runs(tmp_path)
    started = {r.data.tags["segsde.row"]: r.info.start_time for r in runs if r.data.tags["segsde.stage"] == "train"}
    ended = {r.data.tags["segsde.stage"]: r.info.end_time for r in runs}
    assert started["baseline"] < ended["sde"]  # it needs no stage: it ran beside the SDE job
    assert started["transfer"] > ended["export"] and started["autoselect"] > ended["select"]  # each once its inputs existed
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    stages = sorted(r.data.tags["segsde.stage"] for r in runs)
    assert stages == ["data", "export", "sde", "select", "stages", "study", "train", "train", "train"], stages
    again = _run(*rows)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 trials (0 run, 3 cached, 0 failed)" in again.stdout and "stage jobs run" not in again.stdout
    assert len(_runs(tmp_path)) == len(runs)  # every stage and trial found again, none added


def test_ready_first_hands_out_each_trial_once_its_inputs_exist_longest_first_within_its_capacity():
    from ray.tune.search import Searcher

    from segsde.orchestration.trials import ReadyFirst

    ready, stages = set(), {"running": True}
    trials = [({"trial": "baseline"}, 1.0, frozenset()), ({"trial": "classmix"}, 2.0, frozenset()),
              ({"trial": "mtl"}, 3.0, frozenset({"sde"})), ({"trial": "autoselect"}, 1.5, frozenset({"sde", "select-sde-s0"}))]
    searcher = ReadyFirst(trials, ready, lambda: 2 - stages["running"], lambda: stages["running"])
    assert searcher.suggest("t1") == {"trial": "classmix"}  # the longest of those that need no stage
    assert searcher.suggest("t2") is None  # one core is the stage job's
    searcher.on_trial_complete("t1")
    assert searcher.suggest("t2") == {"trial": "baseline"}  # mtl (longer) still waits for the SDE
    searcher.on_trial_complete("t2")
    assert searcher.suggest("t3") is None  # nothing ready: wait
    ready.add("sde")
    assert searcher.suggest("t3") == {"trial": "mtl"}
    ready.add("select-sde-s0")
    stages["running"] = False  # the stage job's core is free: two at a time
    assert searcher.suggest("t4") == {"trial": "autoselect"}
    assert searcher.suggest("t5") == Searcher.FINISHED


def test_ready_first_ends_when_the_stage_jobs_ended_without_what_the_rest_need():
    from ray.tune.search import Searcher

    from segsde.orchestration.trials import ReadyFirst

    alive = {"running": True}
    searcher = ReadyFirst([({"trial": "transfer"}, 1.0, frozenset({"sde"}))], set(), lambda: 1, lambda: alive["running"])
    assert searcher.suggest("t1") is None
    alive["running"] = False  # the SDE job failed: its error is the study's, the trial never runs
    assert searcher.suggest("t1") == Searcher.FINISHED


def _counting_loop(config: dict) -> None:
    """A loop that reports each step with its state, going on from the checkpoint it is given."""
    from segsde.runtime import current_worker, report, resume_state

    worker = current_worker()
    state = resume_state(None, "cpu")
    start = state["step"] if state else 0
    for step in range(start, config["stop"]):
        report(worker, {"step": step + 1, "started_at": start, "unscored": float("nan")}, state={"step": step + 1})


def test_an_in_process_trainer_keeps_its_newest_checkpoint_where_a_rerun_goes_on_from_it(tmp_path):
    from segsde.runtime import current_worker, load_state, train_utils
    from segsde.runtime.ray_job import make_trainer

    first = make_trainer(_counting_loop, {"stop": 3}, "train-key", tmp_path, in_process=True).fit()
    assert first.metrics == {"step": 3, "started_at": 0}  # NaN scores are not reported
    assert [p.name for p in (tmp_path / "train-key").iterdir()] == [Path(first.checkpoint.path).name]  # the newest only
    assert load_state(first.checkpoint.path)["step"] == 3
    assert train_utils() is None and current_worker().world == 1  # outside the loop again
    second = make_trainer(_counting_loop, {"stop": 5}, "train-key", tmp_path, in_process=True).fit()
    assert second.metrics == {"step": 5, "started_at": 3} and load_state(second.checkpoint.path)["step"] == 5
    assert len(list((tmp_path / "train-key").iterdir())) == 1
