"""The sweep's Optuna side: ASHA-stopped trials are PRUNED, the space follows the row, defaults come first.
The whole sweep on real Ray, Optuna and MLflow stores, killed and resumed: tests/reliability/test_sweep_faults.py."""

import math

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


def _records(label, seeds, accuracy, rng):
    """Trial records of ``label`` whose per-image confusions come from predictions right with probability ``accuracy``."""
    import torch

    from segsde.metrics.segmentation import confusion_matrix, encode_confusions, scores

    out = []
    for seed in seeds:
        gt = torch.from_numpy(rng.integers(0, 5, size=(20, 8, 8)))
        pred = torch.where(torch.from_numpy(rng.random((20, 8, 8)) > accuracy[seed]), (gt + 1) % 5, gt)
        per_image = torch.stack([confusion_matrix(p, t) for p, t in zip(pred, gt)])
        out.append({"row": "depthmix", "budget": 4, "seed": seed, "miou": scores(per_image.sum(0))["miou"],
                    "per_image_confusion": encode_confusions(per_image), "acted/confident_fraction": 0.5})
    return out


def test_the_confirmation_takes_the_best_distinct_settings_and_keeps_only_a_confirmed_winner():
    """The defaults and the k best distinct settings are confirmed; a setting that only won the search (its
    confirmed seeds no better than the defaults) shrinks and is not written; one that is better on every fresh seed
    is, with its interval."""
    import numpy as np

    from segsde.orchestration.confirmation import DEFAULTS, confirm_table, top_settings, verdict_sentence, winner_yaml

    study = optuna.create_study(direction="maximize")
    dist = {"params/epsilon": optuna.distributions.FloatDistribution(0.0, 0.5)}
    for eps, value in ((0.03, 0.40), (0.2, 0.47), (0.2, 0.46), (0.3, 0.44), (0.1, 0.30)):
        study.add_trial(optuna.trial.create_trial(params={"params/epsilon": eps}, distributions=dist, value=value))
    chosen = top_settings(study, 2, {"params/epsilon": 0.03})
    assert [(label, p["params/epsilon"]) for label, p, _ in chosen] == [(DEFAULTS, 0.03), ("t1", 0.2), ("t3", 0.3)]
    assert chosen[0][2] == pytest.approx(40.0) and chosen[1][2] == pytest.approx(47.0)

    rng = np.random.default_rng(0)
    seeds = [1, 2, 3, 4]
    level = {s: 0.5 + 0.05 * rng.standard_normal() for s in seeds}
    records = {DEFAULTS: _records(DEFAULTS, seeds, level, rng),
               "t1": _records("t1", seeds, level, rng),                                   # the search's luck
               "t3": _records("t3", seeds, {s: v + 0.2 for s, v in level.items()}, rng)}  # really better
    table = confirm_table(records, chosen).set_index("setting")
    assert table.loc[DEFAULTS, "verdict"] == "reference" and table.loc["t1", "verdict"] == "no difference shown"
    assert table.loc["t1", "shrinkage"] == pytest.approx(47.0 - table.loc["t1", "confirmed"])
    assert table.loc["t3", "verdict"] == "better than the defaults" and table.loc["t3", "ci_low"] > 0
    assert table.p_holm.notna().sum() == 2 and table.loc["t3", "p_holm"] >= table.loc["t3", "p"]
    assert table.loc["t3", "method"] == "paired t, n=4 seeds, image jackknife over 20 groups"
    assert verdict_sentence(table.reset_index()).startswith("epsilon 0.3 beats the defaults by +")
    snippet = winner_yaml("depthmix", table.reset_index())
    assert "--set epsilon=0.3" in snippet and "    epsilon: 0.3" in snippet and "t1" not in snippet

    records["t3"] = records["t1"]  # nothing better than the defaults: keep them
    kept = confirm_table(records, chosen)
    assert verdict_sentence(kept) == "no setting beat the defaults beyond seed noise; keep them"
    assert winner_yaml("depthmix", kept).startswith("# no setting")


def test_a_model_based_sampler_models_within_a_sweep_of_eight():
    """With Optuna's default 10 random start-up trials, TPE and GP in a sweep of 8 would suggest exactly what random
    search suggests (the same seed): each must leave random search's sequence after its start-up trials."""
    from segsde.orchestration.sweep import make_sampler, startup_trials

    space = {"epsilon": optuna.distributions.FloatDistribution(0.0, 0.3), "unsup_weight": optuna.distributions.FloatDistribution(0.1, 3.0, log=True)}

    def suggested(name: str) -> list[tuple[float, float]]:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(sweep_config("smoke", sampler=name, samples=8), space))
        for _ in range(8):
            trial = study.ask(space)
            study.tell(trial, -(trial.params["epsilon"] - 0.12) ** 2 - (math.log(trial.params["unsup_weight"]) / 4) ** 2)
        return [(t.params["epsilon"], t.params["unsup_weight"]) for t in study.trials]

    start = startup_trials(8)
    assert 2 <= start < 8 and startup_trials(100) == 10
    random = suggested("random")
    for name in ("tpe", "gp"):
        points = suggested(name)
        assert points[:start] == random[:start], name  # the start-up trials are random search's
        assert all(p != r for p, r in zip(points[start:], random[start:])), name


def test_samplers_grid_points_and_the_searchs_compute():
    """The grid spans each parameter as it is sampled (log or linear, ends included) and sets the trial count; every
    sampler is Optuna's own; a finished trial records the steps it ran (the sweep's compute)."""
    import math

    from segsde.orchestration.sweep import grid, make_sampler, trials_per_budget

    cfg = sweep_config("smoke", row="depthmix", params=("epsilon", "lr_decoder"), sampler="grid", grid_points=3)
    space = search_space(cfg)
    points = grid(cfg, space)
    low, high = space["params/lr_decoder"].low, space["params/lr_decoder"].high
    assert points["params/lr_decoder"] == pytest.approx([low, math.sqrt(low * high), high])  # log-spaced
    assert points["params/epsilon"][1] == pytest.approx((space["params/epsilon"].low + space["params/epsilon"].high) / 2)
    assert trials_per_budget(cfg, space) == 9 and isinstance(make_sampler(cfg, space), optuna.samplers.GridSampler)
    for name, kind in (("tpe", optuna.samplers.TPESampler), ("gp", optuna.samplers.GPSampler), ("random", optuna.samplers.RandomSampler)):
        assert isinstance(make_sampler(sweep_config("smoke", sampler=name), space), kind)
    with pytest.raises(SegSDEError, match="sampler must be one of tpe, gp, random, grid"):
        sweep_config("smoke", sampler="cmaes")

    dist = {"params/lr_decoder": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}
    searcher = AshaAwareOptunaSearch(space=dist, metric="miou", mode="max", full_steps=4, study_name="c",
                                     storage=optuna.storages.InMemoryStorage())
    searcher.suggest("a"), searcher.suggest("b")
    searcher.on_trial_complete("a", {"miou": 0.3, "step": 4})
    searcher.on_trial_complete("b", {"miou": 0.1, "step": 2})  # stopped at the first rung
    assert [t.user_attrs["steps"] for t in searcher._ot_study.trials] == [4, 2]
