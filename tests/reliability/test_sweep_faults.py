"""A 2-budget Optuna + ASHA sweep on real local Ray, a real Optuna sqlite study and a real MLflow sqlite store, killed
mid-trial (driver, Ray and workers at once) and resumed: the Optuna studies continue with no trial left RUNNING,
MLflow holds one parent per budget and one child per trial (the killed trial's run found again, not duplicated),
the killed trials go on from their own Train checkpoints, and no finished or pruned trial keeps its training state.
The resume reads only the Optuna study: Tune writes its experiment files behind the trials, so a kill can leave
them out of step (a CI run once resumed into two trials left RUNNING and a third FAILED); the test deletes them."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from processes import checkpoints, wait_for_new_checkpoint

from segsde.orchestration.sweep import defaults, search_space, sweep_config
from segsde.tracking import KEY_TAG

ROOT = Path(__file__).resolve().parents[2]
# 12 steps with a checkpoint every 3, so that the kill lands inside a trial; ASHA rungs at steps 6 and 12
SHORT = ["--set", "steps=12", "--set", "checkpoint_interval=3", "--set", "eval_interval=6"]


def test_a_killed_sweep_resumes_its_optuna_studies_without_duplicates(tmp_path):
    args = [sys.executable, str(ROOT / "tune" / "run_sweep.py"), "--profile", "smoke", "--budgets", "2,4", "--samples", "2",
            "--out", str(tmp_path), "--confirm-seeds", "0", *SHORT]  # the confirmation's own kill: the next test
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    checkpointed = {p.parent.name.removeprefix("train-") for p in wait_for_new_checkpoint(tmp_path, first, set())}
    os.killpg(first.pid, signal.SIGKILL)  # a preempted head node: nothing gets to clean up
    first.wait()
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    interrupted = optuna.load_study(study_name="segsde-sweep-smoke-pseudolabel-b2", storage=storage)
    assert optuna.trial.TrialState.RUNNING in [t.state for t in interrupted.trials]  # the kill did land mid-trial
    shutil.rmtree(tmp_path / "tune")

    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 2 and "pass --resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[sweep] resuming" in resumed.stdout + resumed.stderr

    studies = {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage)
               for s in optuna.study.get_all_study_summaries(storage)}
    assert sorted(studies) == ["segsde-sweep-smoke-pseudolabel-b2", "segsde-sweep-smoke-pseudolabel-b4"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("segsde-sweep-smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("segsde.stage") == "sweep"}
    assert sorted(parents) == sorted(studies) and all(p.info.status == "FINISHED" for p in parents.values())
    space = search_space(sweep_config("smoke"))
    for name, study in studies.items():
        states = [t.state for t in study.trials]
        assert len(states) == 2 and set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}, states
        assert study.trials[0].params == defaults(sweep_config("smoke"), space)  # the row's values first
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[name].info.run_id]
        assert len(children) == 2 and len({r.data.tags["ray_trial_id"] for r in children}) == 2  # one run per trial
        killed = [r for r in children if r.info.status == "KILLED"]  # ASHA stops, not the kill
        assert all(r.data.tags["stopped_early"] == "true" for r in killed)
        assert len(killed) == states.count(optuna.trial.TrialState.PRUNED)
        assert all(r.info.status == "FINISHED" and "final/miou" in r.data.metrics for r in children if r not in killed)
        artifacts = {a.path for a in client.list_artifacts(parents[name].info.run_id, "sweep")}
        assert {"sweep/summary.json", "sweep/optimisation_history.png"} <= artifacts
        assert (tmp_path / "sweep" / name / "summary.json").is_file()
    went_on = [r for r in runs if r.data.tags.get(KEY_TAG) in checkpointed]
    assert went_on and len(went_on) == len(checkpointed)
    for run in went_on:  # a trial killed after its checkpoint logged its first steps once: it went on from there
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps.count(1) == 1 and max(steps) > 3, steps
    assert not list((tmp_path / "ray").glob("train-*/checkpoint_*"))  # finished or pruned: no training state kept


def test_a_sweep_confirms_its_best_setting_on_fresh_seeds_and_a_killed_confirmation_resumes(tmp_path):
    """Search (scored on the tuning split), then the defaults and the best setting on two fresh seeds, scored on
    the study's val split (the smoke profile's confirm_top 1, confirm_seeds 2), killed (SIGKILL) inside a
    confirmation trial after its checkpoint and resumed: the confirmation goes on from there, its trials are not
    duplicated in MLflow, and the report, the settings file and the parent run's description exist."""
    import pandas as pd

    args = [sys.executable, str(ROOT / "tune" / "run_sweep.py"), "--profile", "smoke", "--budgets", "4", "--samples", "3",
            "--out", str(tmp_path), *SHORT]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, deadline = [], time.monotonic() + 600
    while not any("[sweep] confirming" in line for line in seen):
        assert time.monotonic() < deadline and first.poll() is None, "".join(seen)[-3000:]
        seen.append(first.stdout.readline())
    assert "trials to run, 0 cached" in seen[-1]
    before = checkpoints(tmp_path)
    checkpointed = {p.parent.name.removeprefix("train-") for p in wait_for_new_checkpoint(tmp_path, first, before) - before}
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout
    assert "[sweep] confirming defaults, t" in out and "Confirmation at 4 labels on fresh seeds 1, 2" in out
    name = "segsde-sweep-smoke-pseudolabel-b4"
    table = pd.read_parquet(tmp_path / "sweep" / name / "confirmation.parquet")
    assert list(table.setting)[0] == "defaults" and len(table) == 2 and list(table.n) == [2, 2]
    verdict = table.verdict.iloc[1]  # 12 smoke steps leave a teacher little to be confident about: it may not act
    assert table.shrinkage.notna().all() and (verdict.startswith("did not act") or verdict in (
        "no difference shown", "better than the defaults", "worse than the defaults")), verdict
    assert (tmp_path / "sweep" / name / "settings.yaml").read_text().startswith("#")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("segsde-sweep-smoke").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("segsde.stage") == "sweep")
    assert parent.info.status == "FINISHED" and "Confirmation at 4 labels" in parent.data.tags["mlflow.note.content"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    keys = [r.data.tags[KEY_TAG] for r in trials]
    assert len(keys) == len(set(keys)) == 3 + 4  # three search trials, two settings on two seeds: each once
    splits = sorted(r.data.params["train.eval_split"] for r in trials)  # search on the tuning split, confirm on val
    assert splits == ["tune"] * 3 + ["val"] * 4, splits
    for run in (r for r in trials if r.data.tags[KEY_TAG] in checkpointed):  # went on from its checkpoint
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps.count(1) == 1 and max(steps) == 12, steps


def test_ctrl_c_ends_the_sweep_with_its_runs_killed_and_no_later_budget_started(tmp_path):
    """Tune takes the Ctrl-C and returns as if the budget were done; the sweep must not summarise it as
    finished nor go on to the next budget, and no MLflow run may stay RUNNING."""
    args = [sys.executable, str(ROOT / "tune" / "run_sweep.py"), "--profile", "smoke", "--budgets", "2,4", "--samples", "2",
            "--out", str(tmp_path), "--set", "steps=3000", "--set", "eval_interval=1000", "--set", "checkpoint_interval=1000",
            "--verbose"]  # the workers' "[train] step" lines, which the live view keeps in its log file
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen, deadline = [], time.monotonic() + 300
        while sum("[train] step" in line for line in seen) < 4:  # the budget's trials are training (both handed out)
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)[-3000:]
            seen.append(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGINT)  # to the driver alone, as `kill -INT`
        rest = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:  # a sweep that went on: not left running beside the other tests
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "run_sweep: interrupted" in rest, rest[-3000:]
    assert "segsde-sweep-smoke-pseudolabel-b4" not in rest  # the second budget never started
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("segsde-sweep-smoke").experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == 3, [(r.info.run_name, r.info.status) for r in runs]
    study = optuna.load_study(study_name="segsde-sweep-smoke-pseudolabel-b2", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING] * 2  # what --resume hands out again
