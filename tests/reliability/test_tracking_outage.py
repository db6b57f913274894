"""The MLflow tracking server lost in the middle of a trial, with real processes: a real `mlflow server`
(started by mlflow/serve.sh), a real `segsde train` on local Ray and the smoke profile. Training goes on
while the server is down, the queued logs reach the server when it is back, and nothing is missing."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient
from processes import wait_for_new_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port: int, store: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(["bash", str(ROOT / "mlflow" / "serve.sh"), str(port), str(store)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise AssertionError("mlflow server did not come up")


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, as a lost machine would
    server.wait()


def test_training_goes_on_through_a_tracking_server_outage(smoke_study, tmp_path):
    port, store, out = free_port(), tmp_path / "store", tmp_path / "trial"
    uri = f"http://127.0.0.1:{port}"
    server = serve(port, store)
    try:
        cmd = [str(BIN / "segsde"), "train", "--data", str(smoke_study["data"]), "--row", "baseline", "--budget", "4",
               "--profile", "smoke", "--out", str(out), "--tracking-uri", uri, "--experiment", "outage",
               "--set", f"steps={STEPS}", "--set", "log_interval=1", "--set", "checkpoint_interval=4", "--set", "eval_interval=20"]
        trial = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        seen = wait_for_new_checkpoint(out, trial, set(), runs="train")
        stop(server)
        seen = wait_for_new_checkpoint(out, trial, seen, runs="train")  # training goes on without the server
        wait_for_new_checkpoint(out, trial, seen, runs="train")
        server = serve(port, store)
        output, _ = trial.communicate(timeout=600)
        assert trial.returncode == 0, output[-3000:]
        assert "[mlflow] tracking server unreachable" in output and "queued logging call(s) sent" in output, output[-4000:]

        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run_id = runs[0].info.run_id
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, STEPS + 1))  # no gap
        assert "final/miou" in runs[0].data.metrics
        figures = {a.path for a in client.list_artifacts(run_id, "figures")}
        assert {"figures/predictions_step0000020.png", "figures/predictions_step0000040.png"} <= figures
    finally:
        stop(server)


def test_the_logger_queues_through_an_outage_but_not_through_a_refused_request(tmp_path):
    import pytest
    from mlflow.exceptions import MlflowException

    from segsde.errors import SegSDEError
    from segsde.tracking import RunLogger

    down = RunLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, keep_through_outages=True)
    down.metrics({"train/loss": 1.0}, step=1)
    down.metrics({"train/loss": 0.9}, step=2)
    assert len(down.queued) == 2  # training went on; both calls wait, in order
    with pytest.raises(SegSDEError, match="stayed unreachable .* rerun with --resume"):
        down.flush(grace_s=0)
    refused = RunLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", "0" * 32, keep_through_outages=True)
    with pytest.raises(MlflowException):  # a run that does not exist is an error, not an outage
        refused.metrics({"train/loss": 1.0}, step=1)
