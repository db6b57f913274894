"""The study report's statistics: paired t-intervals over seeds with the validation images' variance, Holm, the
seeds planned for a minimal effect, component-acted flags and the verdicts, on records made from real confusion
matrices (their calibration by simulation: test_statistics_calibration.py)."""

import numpy as np
import pandas as pd
import pytest
import torch

from segsde.metrics.segmentation import confusion_matrix, decode_confusions, encode_confusions, scores
from segsde.orchestration.comparison import comparison_table
from segsde.orchestration.report import write_report
from segsde.orchestration.statistics import holm, miou_of, paired_difference, power_of, seeds_for


def test_holm_and_the_seed_planner_match_their_textbook_values():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5]
    # a paired t-test for d = 1 sd at alpha 0.05 and 80 % power needs 10 pairs (noncentral t; z quantiles said 8)
    assert seeds_for(1.5, 1.5) == 10 and 0.8 <= power_of(10, 1.5, 1.5) < power_of(11, 1.5, 1.5)
    assert power_of(9, 1.5, 1.5) < 0.8
    assert seeds_for(5.0, 0.5) == 3 and seeds_for(1.0, float("nan")) is None


def test_vectorised_miou_is_the_metric_and_confusions_survive_encoding():
    g = torch.Generator().manual_seed(0)
    per_image = torch.stack([confusion_matrix(torch.randint(0, 9, (16, 16), generator=g), torch.randint(0, 6, (16, 16), generator=g))
                             for _ in range(5)])
    assert np.array_equal(decode_confusions(encode_confusions(per_image)), per_image.numpy())
    assert miou_of(per_image.sum(0).numpy()) == pytest.approx(100 * scores(per_image.sum(0))["miou"])


def _trial(row, seed, accuracy, rng, **extra):
    """A trial's record whose per-image confusions come from predictions right with probability ``accuracy``."""
    gt = torch.from_numpy(rng.integers(0, 5, size=(20, 8, 8)))
    wrong = torch.from_numpy(rng.random((20, 8, 8)) > accuracy)
    pred = torch.where(wrong, (gt + 1) % 5, gt)
    per_image = torch.stack([confusion_matrix(p, t) for p, t in zip(pred, gt)])
    return {"row": row, "budget": 8, "seed": seed, "miou": scores(per_image.sum(0))["miou"],
            "per_image_confusion": encode_confusions(per_image), **extra}


def test_paired_intervals_flags_and_verdicts(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for seed in range(5):
        level = 0.5 + 0.05 * rng.standard_normal()  # seed noise shared by the rows of a seed (same labels, same init)
        records += [_trial("baseline", seed, level, rng),
                    _trial("helps", seed, level + 0.15, rng, **{"acted/confident_fraction": 0.4, "acted/unsup_ratio": 0.3}),
                    _trial("same", seed, level, rng),
                    _trial("silent", seed, level + 0.15, rng, **{"acted/confident_fraction": 0.01, "acted/unsup_ratio": 0.001})]
    table = comparison_table(records, ["baseline", "helps", "same", "silent"], [8]).set_index("row")
    helps, same, silent = table.loc["helps"], table.loc["same"], table.loc["silent"]
    assert helps.n == 5 and helps.method == "paired t, n=5 seeds, image jackknife over 20 groups"
    assert 0 < helps.ci_low < helps.delta < helps.ci_high
    assert helps.verdict == "better than Baseline" and helps.p_holm < 0.05
    assert same.ci_low < 0 < same.ci_high and same.verdict == "no difference shown"
    assert not silent.acted and silent.verdict.startswith("did not act: 1.0 % of the unlabeled pool pixels were confident")
    assert silent.p_holm != silent.p_holm  # not tested, so not in the Holm family
    text, summary = write_report(records, ["baseline", "helps", "same", "silent"], [8], tmp_path)
    assert "(component did not act)" in text and "better than Baseline" in text and "mean ± sd over seeds" in text
    assert "better than Baseline" in summary and "mean ± sd over seeds" not in summary  # the terminal's: no class tables
    assert (tmp_path / "forest.png").stat().st_size > 0
    assert pd.read_parquet(tmp_path / "comparison.parquet").set_index("row").loc["helps", "verdict"] == "better than Baseline"

    one_seed = [r for r in records if r["seed"] == 0]
    single = comparison_table(one_seed, ["baseline", "helps", "same", "silent"], [8]).set_index("row")
    assert single.loc["helps", "verdict"] == "one seed: no difference can be judged"
    assert single.loc["helps", "ci_low"] != single.loc["helps", "ci_low"]  # no interval, in the Parquet and MLflow alike
    assert "cannot be told from training noise" in write_report(one_seed, ["baseline", "helps", "same", "silent"], [8], tmp_path / "one")[0]


def test_two_rows_compare_with_each_other_in_the_same_family(tmp_path):
    """--compare A:B: the paper's orderings (DepthMix > ClassMix) are paired differences between two rows, with the same
    interval, Holm-corrected together with the rows against Baseline; a pair with a silent row is not judged."""
    rng = np.random.default_rng(1)
    records = []
    for seed in range(5):
        level = 0.5 + 0.05 * rng.standard_normal()
        acted = {"acted/confident_fraction": 0.4, "acted/unsup_ratio": 0.3}
        records += [_trial("baseline", seed, level, rng), _trial("low", seed, level + 0.05, rng, **acted),
                    _trial("high", seed, level + 0.2, rng, **acted),
                    _trial("silent", seed, level + 0.2, rng, **{"acted/confident_fraction": 0.01, "acted/unsup_ratio": 0.3})]
    rows = ["baseline", "low", "high", "silent"]
    alone = comparison_table(records, rows, [8])
    table = comparison_table(records, rows, [8], pairs=(("high", "low"), ("high", "silent")))
    pair = table[(table.row == "high") & (table.reference == "low")].iloc[0]
    high, low = (table[(table.row == r) & (table.reference == "baseline")].iloc[0] for r in ("high", "low"))
    assert pair.delta == pytest.approx(high.delta - low.delta) and pair.method.startswith("paired t, n=5 seeds")
    assert pair.ci_low > 0 and pair.verdict == "better than low"
    assert table.p_holm.notna().sum() == 3 and alone.p_holm.notna().sum() == 2  # the pair joined the family
    assert pair.p_holm >= pair.p and high.p_holm >= alone.set_index("row").loc["high", "p_holm"]
    silent_pair = table[(table.row == "high") & (table.reference == "silent")].iloc[0]
    assert not silent_pair.acted and silent_pair.verdict.startswith("silent did not act")
    text, _ = write_report(records, rows, [8], tmp_path, pairs=(("high", "low"),))
    assert '(a line "A vs B": A against B)' in text and "| high vs low | 5 |" in text and "better than low" in text


def test_claims_are_answered_from_their_lines_and_the_published_report_rebuilds_alone(tmp_path):
    """A claim holds when all its lines are better, does not hold when one is worse, is not tested when a component did
    not act, else is not resolved with the seeds it needs and their cost; `segsde report --from` rebuilds every table
    from trials.parquet alone."""
    from segsde.cli import main as segsde
    from segsde.errors import SegSDEError
    from segsde.orchestration.claims import check_claims

    rng = np.random.default_rng(2)
    acted = {"acted/confident_fraction": 0.4, "acted/unsup_ratio": 0.3}
    records = []
    for seed in range(5):
        level = 0.5 + 0.05 * rng.standard_normal()
        records += [_trial("baseline", seed, level, rng, seconds=100.0), _trial("low", seed, level + 0.05, rng, seconds=100.0, **acted),
                    _trial("high", seed, level + 0.2, rng, seconds=300.0, **acted), _trial("same", seed, level, rng, seconds=100.0),
                    _trial("silent", seed, level + 0.2, rng, seconds=100.0, **{"acted/confident_fraction": 0.01})]
    rows, pairs = ["baseline", "low", "high", "same", "silent"], (("high", "low"), ("low", "high"))
    claims = {"high wins": ["high", "high:low"], "low wins": ["low:high"], "same helps": ["same"], "silent helps": ["silent"]}
    text, summary = write_report(records, rows, [8], tmp_path / "a", min_effect=8.0, pairs=pairs, claims=claims, concurrency=2)
    verdicts = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[2] for line in text.splitlines()
                if line.startswith("| ") and (" wins |" in line or " helps |" in line)}
    assert verdicts["high wins"] == "holds" and verdicts["low wins"].startswith("does not hold: low vs high")
    assert verdicts["silent helps"].startswith("not tested: silent: did not act")
    table = comparison_table(records, rows, [8], 8.0, pairs=pairs)
    same = table[(table.row == "same") & (table.reference == "baseline")].iloc[0]
    hours = same.seeds_needed * 200.0 / 3600 / 2  # its seeds of Same and Baseline, two trials at once
    assert verdicts["same helps"] == f"not resolved at 5 seeds (needs {same.seeds_needed:.0f}, costing {hours:.1f} h)"
    assert "Claims (" in summary and text.index("Claims (") < text.index("Against Baseline")
    with pytest.raises(SegSDEError, match="does not compare 'low:same'"):
        check_claims({"x": ["low:same"]}, tuple(rows), pairs)

    assert segsde(["report", "--from", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "study.md").read_text() == (tmp_path / "a" / "study.md").read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "b" / "comparison.parquet"), pd.read_parquet(tmp_path / "a" / "comparison.parquet"))
    assert (tmp_path / "b" / "forest.png").stat().st_size > 0
    pd.DataFrame({"row": ["baseline"]}).to_parquet(tmp_path / "old.parquet")
    (tmp_path / "old").mkdir()
    (tmp_path / "old.parquet").rename(tmp_path / "old" / "trials.parquet")
    with pytest.raises(SegSDEError, match="written before reports kept their trials whole"):
        from segsde.orchestration.report import rebuild_report
        rebuild_report(tmp_path / "old")


def test_the_interval_without_image_confusions_goes_over_seeds():
    row, base = {s: 50.0 + s + 2 for s in range(4)}, {s: 50.0 + s for s in range(4)}
    paired = paired_difference(row, base)
    assert paired.groups == 0 and paired.delta == pytest.approx(2) and paired.low == paired.high == pytest.approx(2)
    spread = paired_difference({0: 3.0, 1: 1.0, 2: 2.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert spread.method == "paired t, n=3 seeds" and (spread.low, spread.high) == pytest.approx((2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5), abs=1e-3)
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_component_activity_averages_the_second_half_and_records_the_mix_only_where_there_is_one():
    from segsde.trainer.loop import ComponentActivity

    for mixes in (True, False):
        acted = ComponentActivity(10, mixes=mixes)
        for step in range(10):
            acted.add(step, {"confident_fraction": step / 10, "mask_ratio": 0.75, "unsup_ratio": 0.2})
        summary = acted.summary(0.3)
        assert summary["acted/confident_fraction"] == pytest.approx(0.7)  # steps 5-9
        assert ("acted/mixed_area" in summary) == mixes and summary.get("acted/mixed_area", 0.25) == pytest.approx(0.25)
        assert summary["acted/teacher_miou"] == 0.3
    assert ComponentActivity(10, mixes=True).summary(None) == {}


def test_the_seed_planner_takes_the_pilots_noise_holms_level_and_the_trials_cost():
    from segsde.orchestration.planning import plan_markdown, seed_plan

    rng = np.random.default_rng(1)
    records = []
    for seed in range(3):
        level = 0.5 + 0.05 * rng.standard_normal()
        records += [_trial("baseline", seed, level, rng), _trial("helps", seed, level + 0.05, rng),
                    _trial("noisy", seed, level + 0.08 * rng.standard_normal(), rng), _trial("baseline_aa", seed, level, rng)]
    records += [_trial("unpiloted", 0, 0.5, rng)]
    rows = ["baseline", "helps", "noisy", "baseline_aa", "unpiloted"]
    cost = {(r, 8): 60.0 for r in rows}
    plan = seed_plan(records, rows, [8], min_effect=2.0, cost=cost).set_index("row")
    table = comparison_table(records, rows, [8], min_effect=2.0).set_index("row")
    assert plan.attrs["family"] == 3 and plan.loc["helps", "alpha"] == pytest.approx(0.05 / 3) and plan.loc["baseline_aa", "alpha"] == 0.05
    for row in ("helps", "noisy"):
        assert plan.loc[row, "sd"] == pytest.approx(table.loc[row, "sd_delta"]) and plan.loc[row, "source"] == "pilot, 3 seeds"
        assert plan.loc[row, "seeds"] == seeds_for(2.0, plan.loc[row, "sd"], plan.loc[row, "image_var"], alpha=0.05 / 3)
        assert plan.loc[row, "seeds"] == table.loc[row, "seeds_needed"]  # the report plans the same way
    assert plan.loc["noisy", "seeds"] > plan.loc["helps", "seeds"]
    assert plan.loc["unpiloted", "source"] == "pooled over 3 lines"  # one seed: the other rows' noise stands in
    assert plan.loc["baseline", "seeds"] == plan.seeds.drop("baseline").max()
    assert plan.loc["helps", "compute_h"] == pytest.approx(plan.loc["helps", "seeds"] * 60 / 3600)
    text = plan_markdown(plan.reset_index(), concurrency=2)
    assert "Holm over the 3 comparisons of the family" in text and "| helps | 8 |" in text and "trial-hours" in text
    paired = seed_plan(records, rows, [8], 2.0, cost, pairs=(("noisy", "helps"),)).set_index("row")  # a pair joins the family
    pair = paired.loc["noisy vs helps"]
    assert paired.attrs["family"] == 4 and pair.alpha == pytest.approx(0.05 / 4) and pd.isna(pair.compute_h)
    assert pair.sd == pytest.approx(comparison_table(records, rows, [8], 2.0, pairs=(("noisy", "helps"),)).iloc[-1].sd_delta)
    for row in ("noisy", "helps"):  # each row of the pair runs the seeds the pair needs
        assert paired.loc[row, "seeds"] == max(pair.seeds, seeds_for(2.0, paired.loc[row, "sd"], paired.loc[row, "image_var"], alpha=0.05 / 4))
    assert "| noisy vs helps | 8 |" in plan_markdown(paired.reset_index(), concurrency=2)
    nothing = seed_plan([r for r in records if r["seed"] == 0], rows, [8], 2.0, cost).set_index("row")
    assert nothing.loc["helps", "source"].startswith("no pilot") and pd.isna(nothing.loc["helps", "seeds"])


def test_an_sde_model_that_does_not_beat_a_constant_depth_is_named_with_its_seed(tmp_path, synth_root):
    from segsde.data.dataset import validation_split
    from segsde.metrics.depth import depth_error_sums, summarise
    from segsde.orchestration.sde_quality import constant_depth_reference

    reference = constant_depth_reference(synth_root, None, 80.0)
    assert 0 < reference["a1"] < 1 and reference["abs_rel"] > 0
    val = validation_split(str(synth_root), None)
    gt = torch.stack([val[i]["depth"] for i in range(len(val))])
    assert summarise(depth_error_sums(gt, gt))["a1"] == 1.0  # the truth beats it: the reference is not a floor of the metric
    assert summarise(depth_error_sums(torch.full_like(gt, 7.0), gt, 1e-3, 80.0)) == pytest.approx(reference)  # any constant

    rng = np.random.default_rng(1)
    records = []
    for seed in range(3):
        level = 0.5 + 0.03 * rng.standard_normal()
        good = {"sde/model": f"sde-{seed}", "sde/abs_rel": 0.3, "sde/a1": 0.5, "acted/encoder_from_sde": 1.0}
        collapsed = {**good, "sde/abs_rel": 2.4, "sde/a1": 0.1}
        records += [_trial("baseline", seed, level, rng), _trial("transfer", seed, level + 0.05, rng, **(collapsed if seed == 2 else good))]
    text, summary = write_report(records, ["baseline", "transfer"], [8], tmp_path, depth_reference=reference)
    comparison = pd.read_parquet(tmp_path / "comparison.parquet").set_index("row")
    assert comparison.loc["transfer", "note"] == "the SDE model of seed 2 learned no depth" and comparison.loc["transfer", "acted"]
    assert "| sde-2 | transfer | 2 | 2.400 | 0.100 | **no**" in summary and "| sde-0 | transfer | 0 | 0.300 | 0.500 | yes |" in summary
    assert f"a constant depth scores AbsRel {reference['abs_rel']:.3f}" in text
    unchecked = write_report(records, ["baseline", "transfer"], [8], tmp_path / "cityscapes")[0]  # no ground-truth depth
    assert "their quality is not checked" in unchecked and "learned no depth" not in unchecked
