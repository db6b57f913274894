"""The MLflow tracking server lost mid-run, with a real `mlflow server` started by mlflow/serve.sh: the
training loops' logger queues what it cannot send, sends it when the server is back, and gives up with a
one-line, resumable error only when the server stays away."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


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


def test_logs_made_while_the_tracking_server_is_down_arrive_when_it_is_back(tmp_path):
    """The training loops' logger against a real server that dies and comes back on the same store: the
    calls made meanwhile are queued, then sent in order, so the metric history has no gap."""
    from segsde.tracking import RunLogger, start_run

    port, store = free_port(), tmp_path / "store"
    uri = f"http://127.0.0.1:{port}"
    server = serve(port, store)
    try:
        run_id = start_run(uri, "outage", "trial", {"steps": 6})
        logger = RunLogger(uri, run_id, keep_through_outages=True)
        logger.metrics({"train/loss": 1.0}, step=1)
        stop(server)
        for step in (2, 3, 4):  # training goes on: nothing raises
            logger.metrics({"train/loss": 1.0 / step}, step=step)
        assert len(logger.queued) == 3
        server = serve(port, store)
        logger.metrics({"train/loss": 0.2}, step=5)  # the queue goes first
        logger.metrics({"train/loss": 0.1}, step=6)
        logger.flush(grace_s=30)
        assert not logger.queued
        history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
        assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
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


def test_a_loop_restarted_from_its_checkpoint_logs_each_step_once(tmp_path):
    """A lost attempt logged steps 1-7 and checkpointed at 4; the restarted loop replays 5-7 and goes on: the run
    keeps each step once (the first attempt's value) and takes the new ones; a metric new to the run is kept whole."""
    from segsde.tracking import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("restart")).info.run_id
    lost = RunLogger(uri, run, keep_through_outages=True)
    for step in range(1, 8):
        lost.metrics({"train/loss": step}, step=step)
    restarted = RunLogger(uri, run, keep_through_outages=True)
    for step in range(5, 11):
        restarted.metrics({"train/loss": 100 + step, "val/miou": step}, step=step)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run, "train/loss"))
    assert loss == [(s, float(s)) for s in range(1, 8)] + [(s, 100.0 + s) for s in range(8, 11)]
    assert sorted(m.step for m in client.get_metric_history(run, "val/miou")) == list(range(5, 11))
