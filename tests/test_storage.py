"""The storage root on an object store: a real S3 API server on loopback (moto's ThreadedMotoServer, as Ray's own
tests use), pyarrow's S3 filesystem, real local Ray and a real MLflow store; and what any root promises: keys
that do not depend on where it is, entries that count only once their marker is there, node-local copies
fetched once and checked."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from segsde.errors import SegSDEError
from segsde.storage import Location, localize

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "segsde-tests"
# long enough to be killed mid-trial: a checkpoint every 4 of 24 steps
LONGER = ("--set", "steps=24", "--set", "checkpoint_interval=4", "--set", "eval_interval=12")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in credentials}
    os.environ.update(credentials)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=BUCKET)
    try:
        yield SimpleNamespace(root=lambda prefix: Location(f"s3://{BUCKET}/{prefix}?endpoint_override=http://{host}:{port}"),
                              env={**os.environ, "SEGSDE_NODE_CACHE": str(tmp_path_factory.mktemp("node-cache"))})
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def study(out: Path, env: dict, *args, background: bool = False):
    cmd = [sys.executable, str(ROOT / "tune" / "run_ablation.py"), "--profile", "smoke", "--out", str(out), "--verbose",
           *map(str, args)]  # verbose: the tests follow the workers' own lines
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    if background:  # its own session, so the driver and its local Ray can be killed at once; output to a file
        log = open(out.parent / f"{out.name}.log", "w")
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)


def test_a_node_local_copy_is_fetched_once_refreshed_when_the_entry_changes_and_checked(s3, tmp_path, monkeypatch, synth_root):
    monkeypatch.setenv("SEGSDE_NODE_CACHE", str(tmp_path / "node"))
    entry = s3.root("unit").child("cache", "data-0123456789ab")
    entry.upload_dir(synth_root, marker="manifest.json")
    from segsde.data.store import local_dataset, read_manifest

    local = local_dataset(entry)
    assert local.is_relative_to(tmp_path / "node") and read_manifest(local) == read_manifest(synth_root)
    stamp = {p: p.stat().st_mtime_ns for p in local.rglob("*.parquet")}
    assert local_dataset(entry) == local and {p: p.stat().st_mtime_ns for p in local.rglob("*.parquet")} == stamp  # no second fetch

    entry.child("side", "pseudo_depth.json").write_text('{"checkpoint": "sde-x/model.pt"}')  # the export stage adds a column
    assert json.loads((local_dataset(entry) / "side" / "pseudo_depth.json").read_text()) == {"checkpoint": "sde-x/model.pt"}

    shard = next(n for n in entry.listing() if n.endswith(".parquet"))
    time.sleep(1.5)  # a later modification time than the copy's, also where the store keeps whole seconds
    payload = entry.child(shard).read_bytes()
    middle = len(payload) // 2
    entry.child(shard).write_bytes(payload[:middle] + bytes(100) + payload[middle + 100:])  # same size and footer, wrong pixels
    with pytest.raises(SegSDEError, match="does not match its checksum"):
        local_dataset(entry)
    assert localize(Location(str(synth_root))) == synth_root  # a local root is read in place, nothing copied


def test_cityscapes_converts_from_and_onto_an_object_store(s3, tmp_path, monkeypatch):
    from test_cityscapes import make_tree

    from segsde.data.dataset import SegSDEDataset
    from segsde.data.store import local_dataset

    raw, out = s3.root("raw/cityscapes"), s3.root("datasets/cityscapes")
    raw.upload_dir(make_tree(tmp_path / "tree"))
    cmd = [str(Path(sys.executable).parent / "segsde"), "data", "cityscapes", "--root", raw.uri, "--out", out.uri, "--size", "128x64",
           "--workers", "2"]
    proc = subprocess.run(cmd, env=s3.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["splits"] == {"sequence": 54, "train": 2, "val": 1}
    assert sorted(out.listing()) == ["manifest.json", "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    monkeypatch.setenv("SEGSDE_NODE_CACHE", str(tmp_path / "node"))
    assert SegSDEDataset(local_dataset(out), ("train", "sequence")).split_counts() == {"train": 2, "sequence": 54}
    again = subprocess.run(cmd, env=s3.env, capture_output=True, text=True, timeout=600)  # complete: nothing to do
    assert again.returncode == 0 and json.loads(again.stdout)["converted"]["tasks"] == 0, again.stderr[-3000:]


def test_cache_keys_do_not_depend_on_the_storage_root(s3, tmp_path):
    names = []
    for storage in (tmp_path / "here", s3.root("elsewhere").uri):
        proc = study(tmp_path / "out", s3.env, "--storage", storage, "--dry-run")
        assert proc.returncode == 0, proc.stderr[-3000:]
        names.append(sorted(word.strip("();").partition("?")[0].rsplit("/", 1)[-1] for word in proc.stdout.split() if "/cache/" in word))
    assert names[0] == names[1] and len(names[0]) >= 9  # the dataset, the SDE model, selections and the nine trials


def test_a_study_on_s3_killed_mid_trial_resumes_without_rerunning_what_finished(s3, tmp_path):
    root = s3.root("study")
    out = tmp_path / "out"
    out.mkdir()
    proc = study(out, s3.env, "--rows", "baseline,transfer", "--storage", root.uri, *LONGER, background=True)
    log = out.parent / "out.log"
    deadline, before = time.monotonic() + 600, None
    while True:  # the transfer trial (after the SDE stage) has written a checkpoint to S3 that it did not have before
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        checkpoints = {f"{run}/{c}" for run in root.child("ray").children() if run.startswith("train-")
                       for c in root.child("ray", run).children() if root.child("ray", run, c, "checkpoint.complete").is_file()}
        if before is None and "[trial] transfer-b4-s0: MLflow run" in log.read_text():
            before = checkpoints
        if before is not None and checkpoints - before:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # a preempted head node: driver, Ray and the trial's loop gone at once
    proc.wait()
    assert [n for n in root.child("cache").children() if n.startswith("sde-")]  # the SDE stage had finished

    resumed = study(out, s3.env, "--rows", "baseline,transfer", "--storage", root.uri, *LONGER, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[data] cache hit" in resumed.stdout and "[sde] cache hit" in resumed.stdout and "[export] cache hit" in resumed.stdout
    assert "[sde] training" not in resumed.stdout and "rendering" not in resumed.stdout
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("segsde-study-smoke").experiment_id])
    trials = {r.data.tags["segsde.row"]: r for r in runs if r.data.tags.get("segsde.stage") == "train"}
    assert sorted(trials) == ["baseline", "transfer"] and {r.info.status for r in trials.values()} == {"FINISHED"}
    steps = [m.step for m in client.get_metric_history(trials["transfer"].info.run_id, "train/loss")]
    assert set(steps) == set(range(1, 25)) and steps.count(1) == 1, steps  # went on from its checkpoint in S3
    sde = next(n for n in root.child("cache").children() if n.startswith("sde-"))
    assert root.child("cache", sde, "model.pt").is_file() and not root.child("cache", sde, "ray").exists()
    assert not [r for r in root.child("ray").children() if r.startswith("train-")]  # results kept, training state gone

    metrics = next(n for n in root.child("cache").children() if n.startswith("sde-"))
    root.child("cache", metrics, "metrics.json").delete()  # an entry without its marker reads as absent
    dry = study(out, s3.env, "--rows", "transfer", "--storage", root.uri, *LONGER, "--dry-run")
    assert dry.returncode == 0 and "[sde] would train" in dry.stdout, dry.stderr[-3000:]
