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
