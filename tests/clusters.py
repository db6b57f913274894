"""A real Ray cluster on this machine, set up as a user's cluster is: a head that runs no work (no CPUs; the trial
drivers' resource), worker nodes in mount namespaces of their own, where the head's output directory is an empty
tmpfs since a real cluster's nodes have their own disks, a shared directory as the storage root (an NFS mount on a
real cluster), and an MLflow server with a login (mlflow/serve.sh). Ray runs with token authentication. Each node
is a session of its own, so that a test can lose one as a machine is lost: every process at once, by SIGKILL."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from conftest import kill_session

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NODES = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
         "print(json.dumps({n['NodeID']: n['Alive'] for n in ray.nodes() if n['Resources'].get('CPU', 0) > 0}))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, base: Path, workers: int = 2):
        self.out, self.shared = base / "out", base / "shared"
        self.out.mkdir()
        self.shared.mkdir()
        self.temp = tempfile.mkdtemp(prefix="rtn", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
        password = secrets.token_hex(12)
        self.env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_raylet_start_wait_time_s": "300",  # `ray start` on a loaded 2-core machine (CI's two test processes)
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password,
                    "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.sessions: dict[str, int] = {}  # node name -> session id
        self.workers: dict[str, str] = {}   # node name -> Ray node id
        self.port = free_port()
        try:
            self.start_head()
            self.start_mlflow(password)
            for n in range(workers):
                self.add_worker(f"worker{n}")
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, cmd: list) -> None:
        """Run a command that starts daemons (``ray start``) in a session of its own, recorded as node ``name``."""
        proc = subprocess.Popen([str(c) for c in cmd], env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.sessions[name] = proc.pid
        output = proc.communicate(timeout=180)[0]
        assert proc.returncode == 0, output[-3000:]

    def start_head(self) -> None:
        self._start("head", [BIN / "ray", "start", "--head", "--port", self.port, "--num-cpus", 0,
                             "--resources", json.dumps({"train_driver": 2}), "--temp-dir", self.temp,
                             "--dashboard-port", free_port(), "--ray-client-server-port", free_port()])

    def start_mlflow(self, password: str) -> None:
        port = free_port()
        server = subprocess.Popen(["bash", ROOT / "mlflow" / "serve.sh", str(port), self.shared / "mlflow"],
                                  env={**self.env, "MLFLOW_AUTH": "1", "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                                       "ARTIFACTS": str(self.shared / "mlartifacts")},
                                  start_new_session=True, stdout=(self.shared / "mlflow.log").open("w"), stderr=subprocess.STDOUT)
        self.sessions["mlflow"] = server.pid
        self.tracking = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(self.tracking + "/health", timeout=2).close()
                return
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, (self.shared / "mlflow.log").read_text()[-3000:]
                time.sleep(1)

    def alive(self) -> dict[str, bool]:
        """{node id: alive} of the worker nodes the head knows."""
        proc = subprocess.run([sys.executable, "-c", NODES, self.address], env=self.env, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.splitlines()[-1])

    def add_worker(self, name: str) -> str:
        """A worker node with 2 CPUs in its own mount namespace; returns its Ray node id."""
        before = set(self.alive())
        self._start(name, ["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f'mount -t tmpfs tmpfs "{self.out}" && exec "{BIN}/ray" start --address {self.address} '
                           f'--num-cpus 2 --temp-dir {self.temp}'])
        deadline = time.monotonic() + 300  # a loaded 2-core machine (CI runs two test processes) starts a node slowly
        while not (new := [n for n, up in self.alive().items() if up and n not in before]):
            assert time.monotonic() < deadline, "the worker node did not join"
            time.sleep(1)
        self.workers[name] = new[0]
        return new[0]

    def lose(self, node_id: str) -> str:
        """Every process of the worker node ``node_id`` killed at once, as a machine is lost; returns its name."""
        name = next(n for n, i in self.workers.items() if i == node_id)
        kill_session(self.sessions.pop(name))
        del self.workers[name]
        return name

    def replace_head(self, workers: int = 2) -> None:
        """The head machine lost (Ray's GCS and the driver on it), and the cluster made anew: a new head on another
        port, new worker nodes. The MLflow server goes on: its stores are on the shared root, where a new head
        serves them again (cluster-slurm.sbatch)."""
        for name in [n for n in self.sessions if n != "mlflow"]:
            kill_session(self.sessions.pop(name))
        self.workers.clear()
        self.port = free_port()
        self.start_head()
        for n in range(workers):
            self.add_worker(f"worker{n}-new-head")

    def stop(self) -> None:
        for sid in self.sessions.values():
            kill_session(sid)
        self.sessions.clear()
        shutil.rmtree(self.temp, ignore_errors=True)
