"""Faults during a study, driven with real processes: real local Ray, a real MLflow sqlite store and the
smoke profile. Each test checks what a user relies on: nothing lost, nothing silently wrong, no duplicate
MLflow runs, and the same table as a run without the fault."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from processes import training_loops, wait_for_new_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# a row that diverges at its first step (SGD at lr 1e30): the trainer raises on the non-finite loss
DIVERGING_ROW = "\ndiverging: {lr_decoder: 1.0e+30, lr_encoder: 1.0e+30}\n"
# long enough to be killed twice mid-trial (near steps 4 and 8): a checkpoint every 4 of 24 steps
LONGER = ("--set", "steps=24", "--set", "checkpoint_interval=4", "--set", "eval_interval=12")


@pytest.fixture(scope="module")
def ablations(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ablations")
    shutil.copytree(ROOT / "ablations", folder, dirs_exist_ok=True)
    with open(folder / "component_study.yaml", "a") as f:
        f.write(DIVERGING_ROW)
    return folder


def study(out: Path, ablations: Path, *args, background: bool = False):
    cmd = [sys.executable, str(ROOT / "tune" / "run_ablation.py"), "--profile", "smoke", "--out", str(out), "--verbose",
           *map(str, args)]  # verbose: the tests follow the workers' own lines
    env = {**os.environ, "SEGSDE_ABLATIONS": str(ablations)}
    if background:  # its own session, so the whole process tree (driver, local Ray, workers) can be killed
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def trial_runs(out: Path) -> dict:
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("segsde-study-smoke").experiment_id])
    assert sum(r.data.tags.get("segsde.stage") == "study" for r in runs) == 1
    trials = [r for r in runs if r.data.tags.get("segsde.stage") == "train"]
    assert len({r.data.tags["segsde.row"] for r in trials}) == len(trials), "a trial has two MLflow runs"
    return {r.data.tags["segsde.row"]: r for r in trials}


def table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(next((out / "study").iterdir()) / "trials.parquet").sort_values("row").reset_index(drop=True)


@pytest.fixture(scope="module")
def uninterrupted(ablations, tmp_path_factory):
    """baseline beside a diverging row, without any other fault, keeping its checkpoints."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, study(out, ablations, "--rows", "baseline,diverging", *LONGER, "--keep-checkpoints")


def test_a_failing_trial_is_failed_everywhere_and_the_study_goes_on(uninterrupted):
    out, proc = uninterrupted
    assert proc.returncode == 1, proc.stderr[-3000:]  # the study finished, but not every trial did
    assert "[trial] diverging-b4-s0: FAILED (" in proc.stdout and "1 failed" in proc.stdout
    assert "| diverging | failed/missing |" in proc.stdout and "| baseline | " in proc.stdout
    runs = trial_runs(out)
    assert runs["baseline"].info.status == "FINISHED" and "final/miou" in runs["baseline"].data.metrics
    assert runs["diverging"].info.status == "FAILED" and "loss" in runs["diverging"].data.tags["segsde.failure"]
    assert not list(out.glob("cache/train-diverging-*/metrics.json"))  # nothing cached for it: --resume retries it
    assert table(out).set_index("row")["miou"].isna().to_dict() == {"baseline": False, "diverging": True}
    assert len(list(out.glob("ray/train-*/checkpoint_*"))) == 1  # baseline's, asked for (diverging failed before its first)


def test_a_killed_training_process_and_a_killed_study_lose_nothing_and_duplicate_nothing(ablations, uninterrupted, tmp_path):
    proc = study(tmp_path, ablations, "--rows", "baseline", *LONGER, background=True)
    seen = wait_for_new_checkpoint(tmp_path, proc, set())
    loops = training_loops(proc.pid)
    assert len(loops) == 1
    os.kill(loops[0], signal.SIGKILL)  # the trial's process (its loop runs there): Tune restarts the trial
    wait_for_new_checkpoint(tmp_path, proc, seen)  # and the new trial process trains on from the checkpoint
    os.killpg(proc.pid, signal.SIGKILL)  # then a preempted machine: driver, Ray and workers gone at once
    proc.wait()
    assert trial_runs(tmp_path)["baseline"].info.status == "RUNNING"
    resumed = study(tmp_path, ablations, "--rows", "baseline", *LONGER, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = trial_runs(tmp_path)["baseline"]
    assert run.info.status == "FINISHED"  # the same run, closed
    steps = [m.step for m in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run.info.run_id, "train/loss")]
    assert set(steps) == set(range(1, 25)) and steps.count(1) == 1, steps  # both restarts went on from a checkpoint
    reference = table(uninterrupted[0]).set_index("row")["miou"].loc[["baseline"]]
    pd.testing.assert_series_equal(table(tmp_path).set_index("row")["miou"], reference)  # as if nothing happened
    assert not list(tmp_path.glob("ray/train-*"))  # once its result is in, a trial's training state goes


def test_ctrl_c_while_the_stage_jobs_run_beside_a_trial_closes_their_runs(ablations, tmp_path):
    """Ctrl-C reaches the Tune grid in the main thread; the SDE job in the stage thread cannot close its own
    run before the process ends, so the study does."""
    import time

    import yaml

    slow = tmp_path / "ablations"
    shutil.copytree(ablations, slow)
    profiles = yaml.safe_load((slow / "profiles.yaml").read_text())
    profiles["smoke"]["sde"].update(phase2_steps=3000, val_interval=1000, checkpoint_interval=1000)  # minutes, not seconds
    (slow / "profiles.yaml").write_text(yaml.safe_dump(profiles))
    out = tmp_path / "out"
    proc = study(out, slow, "--rows", "baseline,transfer", *LONGER, background=True)
    deadline, seen = time.monotonic() + 300, []
    trial_run = "[trial] baseline-b4-s0: MLflow run"
    while not (any("[sde] step" in line for line in seen[-3:]) and any(trial_run in line for line in seen)):  # the SDE
        # job trains beside the baseline trial, which has its run
        assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)[-3000:]
        seen.append(proc.stdout.readline())
    assert any("one fewer while the stage jobs run" in line for line in seen)
    # to the driver alone (kill -INT): the SDE job itself goes on until the process ends; a Ctrl-C in a terminal
    # also interrupts the Train workers, and the job then ends its run FAILED on its own
    os.kill(proc.pid, signal.SIGINT)
    rest = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130 and "run_ablation: interrupted; its MLflow runs are KILLED" in rest, rest[-3000:]
    runs = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").search_runs(
        [MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_experiment_by_name("segsde-study-smoke").experiment_id])
    status = {r.data.tags["segsde.stage"] + ":" + r.info.run_name: r.info.status for r in runs if r.data.tags.get("segsde.stage") != "data"}
    # the study, the SDE job in the stage thread and the trial beside it (no Tune callback hears of it)
    assert status == {"study:study-smoke": "KILLED", "stages:stages": "KILLED", "sde:sde-smoke": "KILLED",
                      "train:baseline-b4-s0": "KILLED"}, status
    assert not list(out.glob("cache/sde-*/model.pt"))  # nothing half-written in the cache
