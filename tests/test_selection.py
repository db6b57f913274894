"""Data selection: incremental IFP against the brute-force original, the scores, every method end to end
on Ray Train with MLflow (budget distinct ids, prefixes, determinism), the trainer using a selection
method, and one-line errors for bad input."""

import math
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli

from segsde.data.splits import random_order, read_order
from segsde.data.store import split_ids
from segsde.selection.config import METHODS
from segsde.selection.ifp import farthest_points, naive_farthest_points, random_projection, standardise
from segsde.selection.scores import berhu_loss, difficulty, mean_entropy


def features(n=200, d=48, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("start", [[3], [0, 17, 50]])
def test_incremental_ifp_equals_brute_force(start):
    x = features()
    picks, gaps, _ = farthest_points(x, start, 40)
    assert picks == naive_farthest_points(x, start, 40)
    for k, j in enumerate(picks):  # each gap is the pick's distance to the set at picking time
        assert gaps[k] == pytest.approx(float(torch.cdist(x[[*start, *picks[:k]]], x[j: j + 1]).min()), rel=1e-9)
    bonus = torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert farthest_points(x, start, 40, bonus, 5.0)[0] == naive_farthest_points(x, start, 40, bonus, 5.0)


def test_ifp_continues_exactly_and_the_difficulty_weight_changes_the_ranking():
    x = features()
    first, _, nearest = farthest_points(x, [0], 10)
    more, _, _ = farthest_points(x, [0, *first], 10, nearest=nearest)
    assert first + more == farthest_points(x, [0], 20)[0]  # a longer run extends a shorter one
    bonus = torch.randperm(200, generator=torch.Generator().manual_seed(2)).double() / 200
    plain = farthest_points(x, [0], 20, bonus, 0.0)[0]
    weighted = farthest_points(x, [0], 20, bonus, 1e6)[0]
    assert plain != weighted
    by_bonus = [int(i) for i in torch.argsort(bonus, descending=True) if int(i) != 0]
    assert weighted == by_bonus[:20]  # a dominant difficulty term ranks by difficulty


def test_standardise_and_random_projection():
    raw = torch.rand(30, 8, 4, 8) * torch.arange(1, 9).view(1, 8, 1, 1) + 5
    z = standardise(raw).view(30, 8, 32)
    assert torch.allclose(z.mean((0, 2)), torch.zeros(8), atol=1e-5)
    assert torch.allclose(z.std((0, 2)), torch.ones(8), atol=1e-5)
    x = torch.randn(40, 4096, generator=torch.Generator().manual_seed(0))
    ratio = torch.pdist(random_projection(x, 1024, seed=0)) / torch.pdist(x)
    assert 0.85 < ratio.min() and ratio.max() < 1.15  # Johnson-Lindenstrauss: distances kept within ~10 %


def test_difficulty_masks_and_entropy():
    teacher = torch.full((1, 1, 16, 16), 0.5)
    teacher[..., :2, :2] = 0.01                   # implausibly far pixels
    student = teacher + 0.1
    # kept: not within the 3x3-dilated far block (rows/cols 0-2) and not in the bottom 4 rows
    kept = 16 * 12 - 9
    expected = (math.log(1.6) - math.log(1.5)) * kept / 256
    assert difficulty(student, teacher, 0.07, 3, 0.25).item() == pytest.approx(expected, rel=1e-5)
    assert difficulty(teacher, teacher, 0.07, 3, 0.25).item() == 0
    assert mean_entropy(torch.zeros(2, 19, 4, 4)).tolist() == pytest.approx([1.0, 1.0])
    peaked = torch.full((1, 19, 4, 4), -50.0)
    peaked[:, 3] = 50
    assert mean_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    pred, target, valid = torch.tensor([0.1, 1.0]).view(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2, dtype=torch.bool)
    # c = 0.2: |r| = 0.1 is L1, |r| = 1 is (1 + 0.04) / 0.4
    assert berhu_loss(pred, target, valid).item() == pytest.approx((0.1 + 1.04 / 0.4) / 2)


@pytest.fixture(scope="module")
def selections(smoke_study, tmp_path_factory):
    """Every method once on the smoke pool (16 images, budgets 2, 4: a first set and one round); `sde` runs
    on two DDP workers (each rank embeds and scores every second image, rank 0 gathers them)."""
    import ray

    from segsde.selection.run import run_select

    ray.shutdown()  # a local Ray started by another module may have too few CPUs for two workers
    root = tmp_path_factory.mktemp("selections")
    out = {m: run_select(smoke_study["data"], m, root / f"{m}.parquet", sde_checkpoint=smoke_study["sde"], profile="smoke",
                         workers=2 if m == "sde" else 1, log=lambda line: None) for m in METHODS}
    yield {"root": root, "results": out}
    ray.shutdown()


def test_every_method_returns_budget_distinct_ids_with_its_score_parts(selections, smoke_study):
    from mlflow.tracking import MlflowClient

    pool = split_ids(smoke_study["data"], "train")
    root = selections["root"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    for method, result in selections["results"].items():
        rows = pq.read_table(result["out"]).to_pylist()
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) == 4 and set(ids) <= set(pool), method
        assert [r["rank"] for r in rows] == list(range(4)) and [r["round"] for r in rows] == [0, 0, 1, 1]
        assert read_order(result["out"]) == ids  # the trainer reads it as an ordered list
        assert not (root / f"{method}.parquet.work").exists()
        later = rows[2:]
        if method == "random":
            assert ids == random_order(pool, 0)[:4]
        if method in ("sde", "diversity"):
            assert all(r["distance"] > 0 for r in rows[1:])
        if method in ("sde", "difficulty"):
            assert all(r["difficulty"] > 0 for r in later) and rows[1]["difficulty"] is None
        if method == "sde":
            assert all(r["score"] == pytest.approx(r["distance"] + 1000 * r["difficulty"]) for r in later)
        if method == "difficulty":
            assert ids[:2] == random_order(pool, 0)[:2]
            assert later[0]["difficulty"] >= later[1]["difficulty"]
        if method == "entropy":
            assert all(0 < r["entropy"] <= 1 for r in later)
        run = client.get_run(result["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["segsde.method"] == method
        artifacts = {a.path for d in ("figures", "selection") for a in client.list_artifacts(run.info.run_id, d)}
        assert {"figures/class_histogram.png", "figures/score_parts.png", f"selection/{method}.parquet"} <= artifacts
        coverage = client.get_metric_history(run.info.run_id, "select/class_coverage")
        assert [m.step for m in coverage] == [2, 4] and all(0 < m.value <= 100 for m in coverage)  # percent


def test_ddp_gathered_features_give_the_single_worker_picks(selections):
    """Round 0 of `sde` is IFP from the seeded image on the features two ranks gathered; `diversity` (one
    worker) starts with the same IFP, so their first picks must agree."""
    two_workers = read_order(selections["results"]["sde"]["out"])
    assert two_workers[:2] == read_order(selections["results"]["diversity"]["out"])[:2]


def test_an_interrupted_selection_continues_from_its_last_round(selections, smoke_study, tmp_path):
    """Ctrl-C in round 2 of a (2, 4, 6) schedule: the rerun continues from the checkpoint the single
    selection job wrote after round 1 (not training round 1 again) and ends with exactly the list an
    uninterrupted run gives, whose first set is the fixture's (the prefix property)."""
    import signal
    import subprocess
    import time

    from conftest import BIN
    from mlflow.tracking import MlflowClient

    from segsde.selection.run import run_select

    overrides = {"budgets": [2, 4, 6], "student_steps": 20}
    reference = run_select(smoke_study["data"], "difficulty", tmp_path / "reference" / "difficulty.parquet",
                           sde_checkpoint=smoke_study["sde"], profile="smoke", overrides=overrides, log=lambda line: None)
    out = tmp_path / "difficulty.parquet"
    cmd = [str(BIN / "segsde"), "select", "--data", str(smoke_study["data"]), "--method", "difficulty", "--out", str(out),
           "--sde-checkpoint", str(smoke_study["sde"]), "--profile", "smoke", "--cache", str(tmp_path), "--budgets", "2,4,6",
           "--set", "student_steps=20"]
    checkpoints = tmp_path / "difficulty.parquet.work" / "ray" / "selection"
    with open(tmp_path / "interrupted.log", "w") as log:
        # pytest-xdist workers ignore SIGINT and children inherit that, so Ctrl-C's default is restored
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        # the first checkpoint holds round 1's picks (difficulty has no features); the worker's log lines can
        # reach this process many seconds late on busy cores, the checkpoint directory does not
        while proc.poll() is None and not list(checkpoints.glob("checkpoint_*/state.pt")):
            time.sleep(0.1)
        time.sleep(1.0)  # for Ray Train's controller to register it; round 2 (40 steps) takes several seconds more
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    assert proc.returncode == 130, (tmp_path / "interrupted.log").read_text()[-2000:]
    assert not out.exists() and (tmp_path / "difficulty.parquet.work" / "ray").is_dir()

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing the interrupted selection" in resumed.stderr
    assert "[select] round 1" not in resumed.stderr and "[select] round 2" in resumed.stderr  # round 1 is not trained again
    order = read_order(out)
    assert len(order) == len(set(order)) == 6 and order == read_order(reference["out"])
    assert order[:2] == read_order(selections["results"]["difficulty"]["out"])[:2]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("segsde-select").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]


def test_trainer_labels_a_prefix_of_a_selection_method(selections, smoke_study, tmp_path):
    from mlflow.tracking import MlflowClient

    from segsde.orchestration.stages import trial_selection
    from segsde.trainer.run import run_train

    # `segsde train --selection diversity`: the orchestration resolves the method into its cached list, the job reads it
    overrides, selection = trial_selection("diversity", "smoke", "baseline", {}, smoke_study["data"], tmp_path / "cache",
                                           smoke_study["sde"])
    result = run_train(smoke_study["data"], tmp_path / "t", row="baseline", profile="smoke", overrides=overrides,
                       sde_model=smoke_study["sde"], selection=selection)
    cached = list((tmp_path / "cache" / "cache").glob("select-diversity-s0-*.parquet"))
    assert len(cached) == 1
    order = read_order(cached[0])
    assert len(order) == 8  # the smoke schedule (2, 4) extended to the trial's budget of 8
    # determinism and prefixes: recomputed for 8, the list starts with the fixture's 4
    assert order[:4] == read_order(selections["results"]["diversity"]["out"])
    client = MlflowClient(f"sqlite:///{tmp_path / 't' / 'mlflow.db'}")
    labeled = client.download_artifacts(result["mlflow_run_id"], "labeled_ids.txt", str(tmp_path))
    assert open(labeled).read().split() == order
    from segsde.orchestration.stages import selection_stage

    lines = []
    hit = selection_stage("diversity", "smoke", smoke_study["data"], tmp_path / "cache", seed=0, budget=8,
                          sde_model=smoke_study["sde"], log=lines.append)
    assert Path(hit.path) == cached[0] and lines == [f"[select] cache hit: reusing {hit}"]


@pytest.mark.parametrize("args,message", [
    (["--method", "sdee"], "unknown selection method 'sdee'.*did you mean 'sde'"),
    (["--method", "random", "--budgets", "4,2"], "strictly increasing"),
    (["--method", "random", "--budgets", "2,40"], "largest budget 40 exceeds the pool of 16"),
    (["--method", "random", "--out", "{tmp}/sel.txt"], "must end in .parquet"),
    (["--method", "sde", "--sde-checkpoint", "{tmp}/missing.pt"], "does not exist"),
    (["--method", "sde", "--set", "weigth=1"], "unknown key 'weigth'.*did you mean 'weight'"),
    (["--method", "random", "--budgets", "2,x"], "not comma-separated integers"),
])
def test_bad_select_input_is_one_line_and_writes_nothing(args, message, smoke_study, tmp_path):
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--out" in args else ["--out", tmp_path / "o" / "sel.parquet"]
    proc = run_cli("select", "--data", smoke_study["data"], "--profile", "smoke", "--cache", tmp_path, *out, *args, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert re.search(message, lines[-1]) and (len(lines) == 1 or proc.stderr.startswith("usage")), proc.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("*.db"))
