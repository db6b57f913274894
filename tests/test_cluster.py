"""The study and a sweep on a real three-node Ray cluster on this machine (``clusters.LocalCluster``): a head that
runs no work, two worker nodes in mount namespaces of their own, one shared storage root, an MLflow server with a
login, Ray with token authentication. The node-loss tests share it (``test_node_loss.py``)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from clusters import BIN, LocalCluster
from mlflow.tracking import MlflowClient

from segsde.orchestration.nodes import TORN_OR_GONE
from segsde.runtime import load_state

ROOT = Path(__file__).resolve().parent.parent
ROWS = "baseline,autoselect"  # every stage kind: dataset, SDE, pseudo-depth export, selection


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a worker node in its own mount namespace needs root and unshare (CI runs as root)")
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    login = {k: cluster.env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(login)  # this process reads the runs too
    yield cluster
    for k in login:
        os.environ.pop(k, None)
    cluster.stop()


def script(cluster, name: str, *args, out: Path | None = None):
    cmd = [sys.executable, str(ROOT / "tune" / name), "--profile", "smoke", "--address", cluster.address,
           "--out", str(out or cluster.out), "--tracking-uri", cluster.tracking, *map(str, args)]
    return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=1200)


def runs(cluster, experiment: str) -> list:
    client = MlflowClient(cluster.tracking)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_a_storage_root_or_tracking_store_only_the_head_has_is_refused_before_anything_starts(cluster):
    head_only = cluster.out / "storage"
    refused = script(cluster, "run_ablation.py", "--rows", "baseline", "--storage", head_only, "--experiment", "refused")
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("run_ablation: error: node ") and "cannot read the storage root" in line and "s3://" in line, line
    assert not (head_only / "cache").exists() and not list(head_only.rglob("*.json"))  # nothing started, markers gone
    assert runs(cluster, "refused") == []  # no MLflow run made

    store = f"sqlite:///{cluster.out / 'head-only.db'}"
    refused = script(cluster, "run_ablation.py", "--rows", "baseline", "--storage", cluster.shared / "refused", "--tracking-uri", store)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert "cannot read the MLflow store" in line and "--tracking-uri http://" in line, line
    assert not (cluster.out / "head-only.db").exists() and not (cluster.shared / "refused" / "cache").exists()


def test_the_study_trains_on_the_worker_node_and_gives_the_single_machine_table(cluster, tmp_path):
    proc = script(cluster, "run_ablation.py", "--rows", ROWS, "--storage", cluster.shared)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials (2 run, 0 cached, 0 failed)" in proc.stdout
    study_runs = runs(cluster, "segsde-study-smoke")
    assert {r.info.status for r in study_runs} == {"FINISHED"}
    trained = [r for r in study_runs if r.data.tags.get("segsde.stage") in ("train", "sde")]
    assert len(trained) == 3  # two trials and the SDE stage, each logged by the Train worker that ran it
    assert {r.data.tags["segsde.node_id"] for r in trained} <= set(cluster.workers.values())
    assert {p.name.split("-")[0] for p in (cluster.shared / "cache").iterdir()} == {"data", "sde", "select", "train", "keys"}

    single = subprocess.run([sys.executable, str(ROOT / "tune" / "run_ablation.py"), "--profile", "smoke", "--rows", ROWS,
                             "--out", str(tmp_path)], env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                            capture_output=True, text=True, timeout=1200)
    assert single.returncode == 0, single.stderr[-3000:]
    tables = [pd.read_parquet(next((where / "study").iterdir()) / "study.parquet") for where in (cluster.out, tmp_path)]
    pd.testing.assert_frame_equal(*tables, check_exact=False, rtol=1e-6)


def test_a_sweep_trains_on_the_worker_node(cluster):
    out = cluster.out / "sweep"
    proc = script(cluster, "run_sweep.py", "--samples", 2, "--confirm-seeds", 0, "--storage", cluster.shared, out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [r for r in runs(cluster, "segsde-sweep-smoke") if r.data.tags.get("segsde.stage") == "train"]
    assert len(trials) == 2 and {r.info.status for r in trials} <= {"FINISHED", "KILLED"}  # ASHA may stop one
    assert {r.data.tags["segsde.node_id"] for r in trials} <= set(cluster.workers.values())
    assert (out / "optuna.db").is_file() and list((cluster.shared / "tune").glob("segsde-sweep-smoke-*"))


def test_cityscapes_converts_on_the_worker_node_and_refuses_what_only_the_head_has(cluster):
    from test_cityscapes import make_tree

    tree = make_tree(cluster.shared / "cityscapes-raw")

    def convert(root: Path, out: Path):
        cmd = [BIN / "segsde", "data", "cityscapes", "--root", root, "--out", out, "--size", "128x64", "--address", cluster.address]
        return subprocess.run(list(map(str, cmd)), env=cluster.env, capture_output=True, text=True, timeout=600)

    done = convert(tree, cluster.shared / "cityscapes")  # the head has no CPU: every task runs on the worker node
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["splits"] == {"sequence": 54, "train": 2, "val": 1}
    assert len(list((cluster.shared / "cityscapes").glob("shard-*.parquet"))) == 3

    refused = convert(tree, cluster.out / "cityscapes")  # an --out on the head's disk alone
    line = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and line.startswith("segsde: error: node ") and "--out" in line and "s3://" in line, line
    assert not list((cluster.out / "cityscapes").glob("shard-*"))

    shutil.copytree(tree, cluster.out / "cityscapes-raw")  # a --root on the head's disk alone
    refused = convert(cluster.out / "cityscapes-raw", cluster.shared / "cityscapes-refused")
    line = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "is not readable on node" in line and "every node mounts" in line, line
    assert not list((cluster.shared / "cityscapes-refused").glob("shard-*"))


# long enough that a node can be lost between two of a trial's checkpoints
SETTINGS = ["--set", "steps=48", "--set", "checkpoint_interval=4", "--set", "eval_interval=24", "--set", "log_interval=1"]


def study(cluster, storage: Path, experiment: str, log: Path, *args) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "tune" / "run_ablation.py"), "--profile", "smoke", "--address", cluster.address,
           "--out", str(log.parent / experiment), "--tracking-uri", cluster.tracking, "--storage", str(storage),
           "--experiment", experiment, *SETTINGS, *map(str, args)]
    return subprocess.Popen(cmd, env=cluster.env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_until(condition, proc: subprocess.Popen, log: Path, seconds: float = 600):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    return found


def assert_table_of_an_intact_run(cluster, tmp_path: Path, experiment: str, intact: str, *args) -> None:
    """``experiment``'s study table equals that of the same study on the cluster with nothing lost (``intact``: its
    storage root and experiment; a cache hit when an earlier test ran it)."""
    log = tmp_path / f"{intact}.log"
    proc = study(cluster, cluster.shared / intact, intact, log, *args)
    assert proc.wait(timeout=1200) == 0, log.read_text()[-3000:]
    tables = [pd.read_parquet(next((tmp_path / e / "study").iterdir()) / "study.parquet") for e in (experiment, intact)]
    pd.testing.assert_frame_equal(*tables, check_exact=False, rtol=1e-6)


def running_on(cluster, experiment: str, stage: str) -> dict[str, str]:
    """{run id: node id} of the RUNNING runs of ``stage`` that a loop has tagged with its node."""
    return {r.info.run_id: r.data.tags["segsde.node_id"] for r in runs(cluster, experiment)
            if r.info.status == "RUNNING" and r.data.tags.get("segsde.stage") == stage and "segsde.node_id" in r.data.tags}


def whole_checkpoints(storage: Path, pattern: str) -> list[Path]:
    """The state files under ``storage`` matching ``pattern`` that Train has finished copying there: one listed may
    still be torn, and a node lost during that copy leaves it for a restart to pass over."""
    def whole(path: Path) -> bool:
        try:
            load_state(path.parent)
        except TORN_OR_GONE:
            return False
        return True

    return [path for path in storage.glob(pattern) if whole(path)]


def test_a_lost_worker_nodes_trial_continues_on_the_other_node_from_its_checkpoint(cluster, tmp_path):
    """Every process of the node that runs a trial is killed (SIGKILL, no warning) after the trial's first
    checkpoint: Train restarts its worker on the other node from that checkpoint, the study finishes with the
    table of a run that lost nothing, the trial's MLflow run has each step once and records the node change, and
    the terminal says it in one line."""
    storage, log = cluster.shared / "lost-trial", tmp_path / "lost.log"
    proc = study(cluster, storage, "lost-trial", log, "--rows", "baseline")
    wait_until(lambda: whole_checkpoints(storage, "ray/train-*/checkpoint_*/state.pt"), proc, log)
    (run_id, node), = wait_until(lambda: running_on(cluster, "lost-trial", "train"), proc, log).items()
    name = cluster.lose(node)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    cluster.add_worker(name)  # two workers again for the next test

    text = log.read_text()
    moved = re.findall(rf"\[cluster\] node {node[:8]} lost; trial (\S+) continues on node (\w+) from step (\d+)", text)
    assert len(moved) == 1 and moved[0][1] != node[:8] and int(moved[0][2]) % 4 == 0 and 0 < int(moved[0][2]) < 48, text[-3000:]
    assert "Traceback" not in text
    client = MlflowClient(cluster.tracking)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["segsde.node_lost"].startswith(node)
    assert run.data.tags["segsde.continued_on"] == run.data.tags["segsde.node_id"] != node
    assert run.data.tags["segsde.continued_from"] == f"step {moved[0][2]}"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 49)), steps  # each step once: the replayed ones are not logged again
    assert_table_of_an_intact_run(cluster, tmp_path, "lost-trial", "intact", "--rows", "baseline")


def test_a_client_without_the_clusters_token_is_refused_in_one_line(cluster, tmp_path):
    no_token = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    for env in (no_token, {**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}):
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, str(ROOT / "tune" / "run_ablation.py"), "--profile", "smoke", "--rows", "baseline",
                               "--address", cluster.address, "--out", str(out), "--tracking-uri", cluster.tracking],
                              env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300)  # no ~/.ray/auth_token
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [
            f"run_ablation: error: the Ray cluster at {cluster.address} runs with token authentication and refused this client: set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to its nodes' token (~/.segsde/cluster.env, or the Slurm job's environment)"]
        assert not out.exists() or not any(out.iterdir())


def longer_stages(tmp_path: Path) -> Path:
    """A copy of ablations/ whose smoke SDE stage and selection rounds run long enough to lose a node inside them."""
    ablations = tmp_path / "ablations"
    shutil.copytree(ROOT / "ablations", ablations)
    profiles = ablations / "profiles.yaml"
    text = profiles.read_text().replace("phase1_steps: 2, phase2_steps: 3,", "phase1_steps: 4, phase2_steps: 12,", 1)
    profiles.write_text(text.replace("student_steps: 2,", "student_steps: 24, checkpoint_interval: 4,", 1))
    return ablations


def lose_during(cluster, storage: Path, experiment: str, stage: str, checkpoints: str, proc, log: Path) -> tuple[str, str]:
    """Once ``stage``'s run is RUNNING with a checkpoint (``checkpoints``, a glob under ``storage``), the node it
    runs on is lost and a new worker joins: (its run id, the lost node)."""
    (run_id, node), = wait_until(lambda: whole_checkpoints(storage, checkpoints) and running_on(cluster, experiment, stage), proc, log).items()
    cluster.add_worker(cluster.lose(node) + "-again")
    return run_id, node


def test_lost_worker_nodes_sde_stage_and_selection_continue_and_nothing_downstream_starts_early(cluster, tmp_path):
    """The node running the SDE stage is lost (SIGKILL) after the stage's first checkpoint, then the node running the
    selection job after its first: each continues on the other node from its checkpoint, nothing that reads its
    output starts before it is complete, and the table equals that of a run that lost nothing."""
    saved, cluster.env = cluster.env, {**cluster.env, "SEGSDE_ABLATIONS": str(longer_stages(tmp_path))}
    try:
        storage, log = cluster.shared / "lost-stages", tmp_path / "stages.log"
        proc = study(cluster, storage, "lost-stages", log, "--rows", "autoselect")
        sde_id, sde_node = lose_during(cluster, storage, "lost-stages", "sde", "cache/sde-*/ray/sde/checkpoint_*/state.pt", proc, log)
        select_id, select_node = lose_during(cluster, storage, "lost-stages", "select",
                                             "cache/select-*.work/ray/selection/checkpoint_*/state.pt", proc, log)
        assert proc.wait(timeout=1200) == 0, log.read_text()[-3000:]
        assert_table_of_an_intact_run(cluster, tmp_path, "lost-stages", "intact-stages", "--rows", "autoselect")
    finally:
        cluster.env = saved
    text = log.read_text()
    assert re.search(rf"\[cluster\] node {sde_node[:8]} lost; stage \S+ continues on node \w+ from step \d+", text), text[-3000:]
    assert re.search(rf"\[cluster\] node {select_node[:8]} lost; stage \S+ continues on node \w+ from (round 1, step \d+|\d images picked)",
                     text), text[-3000:]
    assert "Traceback" not in text
    client = MlflowClient(cluster.tracking)
    sde, select = client.get_run(sde_id), client.get_run(select_id)
    for run, node in ((sde, sde_node), (select, select_node)):
        assert run.info.status == "FINISHED" and run.data.tags["segsde.node_lost"].startswith(node)
        assert run.data.tags["segsde.node_id"] != node
    trials = [r for r in runs(cluster, "lost-stages") if r.data.tags.get("segsde.stage") == "train"]
    # each waited for the whole of what it reads: the selection for the SDE model, the trial for the selection
    assert select.info.start_time > sde.info.end_time and len(trials) == 1 and trials[0].info.start_time > select.info.end_time


def test_a_drained_node_hands_its_trial_on_without_spending_the_failure_budget(cluster, tmp_path):
    """A spot node's notice: Ray drains it with the preemption reason and a deadline, then the machine goes. The
    trial continues on the other node, and the loss counts against Train's preemption budget, not the failure
    budget (one failure a trial): losing the next node without notice is still absorbed."""
    storage, log = cluster.shared / "drained", tmp_path / "drained.log"
    proc = study(cluster, storage, "drained", log, "--rows", "baseline")
    wait_until(lambda: whole_checkpoints(storage, "ray/train-*/checkpoint_*/state.pt"), proc, log)
    (run_id, first), = wait_until(lambda: running_on(cluster, "drained", "train"), proc, log).items()
    subprocess.run([str(BIN / "ray"), "drain-node", "--address", cluster.address, "--node-id", first, "--reason",
                    "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed", "--deadline-remaining-seconds", "5"],
                   env=cluster.env, check=True, capture_output=True, timeout=60)
    time.sleep(5)
    cluster.add_worker(cluster.lose(first) + "-again")
    (_, second), = wait_until(lambda: {k: v for k, v in running_on(cluster, "drained", "train").items() if v != first},
                              proc, log).items()
    cluster.add_worker(cluster.lose(second) + "-again")  # no notice this time: the failure budget's one loss
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    text = log.read_text()
    moved = re.findall(r"\[cluster\] node (\w+) lost; trial \S+ continues on node (\w+)", text)
    assert [m[0] for m in moved] == [first[:8], second[:8]] and moved[0][1] == second[:8], text[-3000:]
    steps = [m.step for m in MlflowClient(cluster.tracking).get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 49)), steps
    assert_table_of_an_intact_run(cluster, tmp_path, "drained", "intact", "--rows", "baseline")


def test_a_lost_head_goes_on_from_a_new_head_with_the_same_command(cluster, tmp_path):
    """The head (driver and GCS) lost while seed 1's trial runs, seed 0's done: a new head on the same storage root,
    the same command with --resume, and the study goes on without rerunning the dataset or seed 0, seed 1 from its
    checkpoint in its own MLflow run. Last in this module: every node after it is new."""
    storage, log = cluster.shared / "lost-head", tmp_path / "head.log"
    args = ("--rows", "baseline", "--seeds", "0,1", "--concurrency", "1")
    proc = study(cluster, storage, "lost-head", log, *args)

    def second_trial_checkpointed():
        keys = [r.data.tags["segsde.key"] for r in runs(cluster, "lost-head")
                if r.info.status == "RUNNING" and r.data.tags.get("mlflow.runName", "").startswith("baseline-b4-s1")]
        return keys and whole_checkpoints(storage, f"ray/train-{keys[0]}/checkpoint_*/state.pt") and keys[0]

    key = wait_until(second_trial_checkpointed, proc, log)
    proc.kill()  # the driver ran on the head
    proc.wait()
    cluster.replace_head()
    again_log = tmp_path / "again.log"
    again = study(cluster, storage, "lost-head", again_log, *args, "--resume")
    assert again.wait(timeout=900) == 0, again_log.read_text()[-3000:]
    text = again_log.read_text()
    assert "[data] cache hit" in text and "2 trials (1 run, 1 cached, 0 failed)" in text, text[-3000:]
    trials = [r for r in runs(cluster, "lost-head") if r.data.tags.get("segsde.stage") == "train"]
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}  # found again, not duplicated
    resumed = next(r for r in trials if r.data.tags["segsde.key"] == key)
    steps = [m.step for m in MlflowClient(cluster.tracking).get_metric_history(resumed.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 49)), steps
