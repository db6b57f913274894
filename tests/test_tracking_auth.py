"""mlflow/serve.sh on a shared network: MLflow's basic-auth app with credentials from the environment, nobody but
its account let in, and the study's preflight telling a user without the login what to set, in one line."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import kill_session
from mlflow.tracking import MlflowClient

from segsde.errors import SegSDEError
from segsde.tracking import check_tracking_uri

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "mlflow" / "serve.sh"
PASSWORD = "test-only-" + os.urandom(8).hex()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    drop = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH", "MLFLOW_AUTH_ADMIN_PASSWORD", "HOST")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PATH": path, **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out, port = tmp_path_factory.mktemp("auth"), _free_port()
    proc = subprocess.Popen(["bash", str(SERVE), str(port), str(out)], env=_env(MLFLOW_AUTH="1", MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the MLflow server did not come up"
                time.sleep(1)
        yield uri, out
    finally:
        kill_session(proc.pid)


def test_only_the_servers_account_gets_in(server, monkeypatch):
    uri, out = server
    assert oct((out / "basic_auth.ini").stat().st_mode & 0o777) == "0o600" and PASSWORD not in (out / "basic_auth.ini").read_text()
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Exception, match="401|Unauthorized|credentials"):
        MlflowClient(uri).search_experiments()
    with pytest.raises(SegSDEError, match=r"requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        check_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "guess")
    with pytest.raises(SegSDEError, match="refused the login of .admin."):
        check_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    check_tracking_uri(uri)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("auth-test"))
    client.log_metric(run.info.run_id, "x", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"x": 1.0}


def test_a_study_without_the_login_is_refused_in_one_line(server, tmp_path):
    uri, _ = server
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "tune" / "run_ablation.py"), "--profile", "smoke", "--rows", "baseline",
                           "--out", str(out), "--tracking-uri", uri], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"run_ablation: error: the MLflow tracking server at {uri} requires a login: set "
                                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of the server "
                                                "(the launch files read them from ~/.segsde/cluster.env)"]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("env,message", [
    ({"HOST": "0.0.0.0"}, "without MLFLOW_AUTH=1 lets anyone who reaches this machine read and write"),
    ({"MLFLOW_AUTH": "1"}, "MLFLOW_AUTH=1 needs MLFLOW_AUTH_ADMIN_PASSWORD"),
])
def test_an_open_or_passwordless_server_is_refused(env, message, tmp_path):
    proc = subprocess.run(["bash", str(SERVE), str(_free_port()), str(tmp_path / "o")], env=_env(**env), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
