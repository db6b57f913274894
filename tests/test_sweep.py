"""The sweep's Optuna side: ASHA-stopped trials are PRUNED, the space follows the row, defaults come first."""

import optuna
import pytest

from segsde.errors import SegSDEError
from segsde.orchestration.sweep import AshaAwareOptunaSearch, defaults, search_space, sweep_config


def test_a_trial_stopped_before_the_full_schedule_is_pruned_not_complete():
    space = {"params/lr_decoder": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}
    searcher = AshaAwareOptunaSearch(space=space, metric="miou", mode="max", full_steps=4, study_name="t",
                                     storage=optuna.storages.InMemoryStorage(), points_to_evaluate=[{"params/lr_decoder": 0.05}])
    first = searcher.suggest("a")
    assert first == {"params": {"lr_decoder": 0.05}}  # the enqueued defaults run first
    searcher.suggest("b")
    for trial_id, value in (("a", 0.2), ("b", 0.1)):
        searcher.on_trial_result(trial_id, {"miou": value, "training_iteration": 1, "step": 2})
    searcher.on_trial_complete("a", {"miou": 0.3, "step": 4})  # ran its whole schedule
    searcher.on_trial_complete("b", {"miou": 0.1, "step": 2})  # stopped by ASHA at the first rung
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert searcher._ot_study.best_value == 0.3


def test_space_follows_the_row_and_defaults_are_the_rows_values():
    depthmix = search_space(sweep_config("smoke", row="depthmix"))
    baseline = search_space(sweep_config("smoke", row="baseline"))
    assert "params/epsilon" in depthmix and "params/unsup_weight" in depthmix
    assert set(baseline) == {"params/lr_decoder", "params/lr_encoder"}
    assert defaults(sweep_config("smoke", row="depthmix"), depthmix)["params/epsilon"] == 0.03


def test_unknown_parameters_and_rows_are_one_line_errors():
    with pytest.raises(SegSDEError, match="did you mean 'epsilon'"):
        sweep_config("smoke", params=("epsilo",))
    with pytest.raises(SegSDEError, match="did you mean 'depthmix'"):
        sweep_config("smoke", row="depthmx")


def test_two_budget_sweep_with_asha_and_optuna_resumes_without_duplicates(tmp_path):
    """Real local Ray, Optuna sqlite storage and MLflow sqlite store: one study and one parent run per
    budget, ASHA stops are PRUNED in Optuna and KILLED in MLflow, and --resume adds nothing."""
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    script = Path(__file__).resolve().parent.parent / "tune" / "run_sweep.py"
    args = [sys.executable, str(script), "--profile", "smoke", "--budgets", "2,4", "--samples", "3", "--out", str(tmp_path)]
    first = subprocess.run(args, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    studies = {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage)
               for s in optuna.study.get_all_study_summaries(storage)}
    assert sorted(studies) == ["segsde-sweep-smoke-pseudolabel-b2", "segsde-sweep-smoke-pseudolabel-b4"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("segsde-sweep-smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("segsde.stage") == "sweep"}
    assert sorted(parents) == sorted(studies) and all(p.info.status == "FINISHED" for p in parents.values())
    for name, study in studies.items():
        states = [t.state for t in study.trials]
        assert len(states) == 3 and set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
        assert study.trials[0].params == defaults(sweep_config("smoke"), search_space(sweep_config("smoke")))  # the row's values first
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[name].info.run_id]
        assert len(children) == 3 and all(r.data.tags.get("ray_trial_id") for r in children)
        killed = [r for r in children if r.info.status == "KILLED"]
        assert all(r.data.tags["stopped_early"] == "true" for r in killed)
        assert len(killed) == states.count(optuna.trial.TrialState.PRUNED)
        assert all(r.info.status == "FINISHED" and "final/miou" in r.data.metrics for r in children if r not in killed)
        artifacts = {a.path for a in client.list_artifacts(parents[name].info.run_id, "sweep")}
        assert {"sweep/summary.json", "sweep/optimisation_history.png"} <= artifacts
        assert (tmp_path / "sweep" / name / "summary.json").is_file()

    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 2 and "pass --resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(client.search_runs([exp.experiment_id])) == len(runs)  # parents found again, no trial rerun
    assert all(len(optuna.load_study(study_name=n, storage=storage).trials) == 3 for n in studies)
