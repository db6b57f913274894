"""The sweep's Optuna side: ASHA-stopped trials are PRUNED, the space follows the row, defaults come first.
The whole sweep on real Ray, Optuna and MLflow stores, killed and resumed: tests/reliability/test_sweep_faults.py."""

import optuna
import pytest

from segsde.errors import SegSDEError
from segsde.orchestration.sweep import AshaAwareOptunaSearch, defaults, search_space, sweep_config


def test_a_trial_stopped_before_the_full_schedule_is_pruned_not_complete():
    space = {"params/lr_decoder": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}
    searcher = AshaAwareOptunaSearch(space=space, metric="miou", mode="max", full_steps=4, study_name="t",
                                     storage=optuna.storages.InMemoryStorage(), points_to_evaluate=[{"params/lr_decoder": 0.05}])
    first = searcher.suggest("a")
    assert first == {"params": {"lr_decoder": 0.05}, "trial_key": "t-t0"}  # the enqueued defaults run first
    searcher.suggest("b")
    for trial_id, value in (("a", 0.2), ("b", 0.1)):
        searcher.on_trial_result(trial_id, {"miou": value, "training_iteration": 1, "step": 2})
    searcher.on_trial_complete("a", {"miou": 0.3, "step": 4})  # ran its whole schedule
    searcher.on_trial_complete("b", {"miou": 0.1, "step": 2})  # stopped by ASHA at the first rung
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert searcher._ot_study.best_value == 0.3


def test_a_resumed_searcher_hands_out_the_interrupted_trials_again_before_asking_new_ones(tmp_path):
    space = {"params/lr_decoder": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    first = AshaAwareOptunaSearch(space=space, metric="miou", mode="max", full_steps=4, study_name="s", storage=storage,
                                  points_to_evaluate=[{"params/lr_decoder": 0.05}])
    keys = [first.suggest(t)["trial_key"] for t in ("a", "b", "c")]
    assert keys == ["s-t0", "s-t1", "s-t2"]
    first.on_trial_complete("a", {"miou": 0.3, "step": 4})
    interrupted = optuna.load_study(study_name="s", storage=storage).trials[1:]  # then the sweep was killed
    assert [t.state for t in interrupted] == [optuna.trial.TrialState.RUNNING] * 2

    again = AshaAwareOptunaSearch(space=space, metric="miou", mode="max", full_steps=4, study_name="s", storage=storage,
                                  interrupted=(1, 2))
    handed = [again.suggest(t) for t in ("x", "y", "z")]
    assert [h["trial_key"] for h in handed] == ["s-t1", "s-t2", "s-t3"]  # the same trials, then one new
    assert [h["params"]["lr_decoder"] for h in handed[:2]] == [t.params["params/lr_decoder"] for t in interrupted]
    again.on_trial_complete("x", {"miou": 0.2, "step": 4})
    again.on_trial_complete("y", {"miou": 0.1, "step": 2})
    again.on_trial_complete("z", {"miou": 0.4, "step": 4})
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert study.best_value == 0.4


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
