"""The study and a sweep on a real two-node Ray cluster on this machine, set up as a user's cluster is: the head
(no CPUs, the trial drivers' resource, an MLflow server) and a worker node started in its own mount namespace,
where the head's output directory is an empty tmpfs, since a real cluster's nodes have their own disks. A
shared directory (an NFS mount on a real cluster) is the storage root."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import kill_session
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROWS = "baseline,autoselect"  # every stage kind: dataset, SDE, pseudo-depth export, selection
NODES = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
         "print(json.dumps([(n['NodeID'], n['Resources'].get('CPU', 0)) for n in ray.nodes() if n['Alive']]))")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list, env: dict, sessions: list) -> None:
    """Run a command that starts daemons (``ray start``) in its own session, recorded for the teardown."""
    proc = subprocess.Popen([str(c) for c in cmd], env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sessions.append(proc.pid)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a worker node in its own mount namespace needs root and unshare (CI runs as root)")
    base = tmp_path_factory.mktemp("cluster")
    out, shared = base / "out", base / "shared"
    out.mkdir()
    shared.mkdir()
    temp = tempfile.mkdtemp(prefix="rtn", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, sessions = _free_port(), []
    try:
        _start([BIN / "ray", "start", "--head", "--port", port, "--num-cpus", 0, "--resources", json.dumps({"train_driver": 2}),
                "--temp-dir", temp, "--dashboard-port", _free_port(), "--ray-client-server-port", _free_port()], env, sessions)
        _start(["unshare", "-m", "--propagation", "private", "sh", "-c",
                f'mount -t tmpfs tmpfs "{out}" && exec "{BIN}/ray" start --address 127.0.0.1:{port} --num-cpus 2 --temp-dir {temp}'],
               env, sessions)
        tracking_port = _free_port()
        server = subprocess.Popen([BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{out}/mlflow.db", "--artifacts-destination",
                                   shared / "mlartifacts", "--host", "127.0.0.1", "--port", str(tracking_port), "--workers", "1"],
                                  env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sessions.append(server.pid)
        tracking = f"http://127.0.0.1:{tracking_port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(tracking + "/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the MLflow server did not come up"
                time.sleep(1)
        nodes = json.loads(subprocess.run([sys.executable, "-c", NODES, f"127.0.0.1:{port}"], env=env, capture_output=True,
                                          text=True, check=True).stdout.splitlines()[-1])
        assert len(nodes) == 2
        yield SimpleNamespace(address=f"127.0.0.1:{port}", out=out, shared=shared, tracking=tracking, env=env,
                              worker_node=next(n for n, cpus in nodes if cpus > 0))
    finally:
        for sid in sessions:
            kill_session(sid)
        shutil.rmtree(temp, ignore_errors=True)


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
    assert {r.data.tags["segsde.node_id"] for r in trained} == {cluster.worker_node}
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
    assert {r.data.tags["segsde.node_id"] for r in trials} == {cluster.worker_node}
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
