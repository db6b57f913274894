"""MLflow bookkeeping shared by the stages: the tracking URI, runs created by the driver (so that a
failure can always close them), and a small logger that Train workers use on rank 0 only."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from segsde.errors import SegSDEError

REPO = Path(__file__).resolve().parent.parent


def resolve_tracking_uri(out, uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else an absolute sqlite file under the local directory ``out``
    (mlflow >= 3.13 refuses the file store, and a relative sqlite path would follow Ray's working-directory changes)."""
    from segsde.storage import as_location

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_tracking_uri(uri)
        return uri
    if not as_location(out).is_local:
        raise SegSDEError(f"{out} is not a local directory and cannot hold an MLflow store: pass --tracking-uri "
                          "(an MLflow server, mlflow/serve.sh) or set MLFLOW_TRACKING_URI")
    out = Path(as_location(out).path)
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail before any run or training starts when ``uri`` cannot be used: a server that does not answer
    its /health endpoint, or a sqlite file in a directory that does not exist."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        reason = None
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code not in (401, 403):  # a server with authentication in front of /health answered: it is up
                reason = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            reason = str(getattr(exc, "reason", exc))
        if reason is not None:
            raise SegSDEError(f"the MLflow tracking server at {uri} is unreachable ({reason}): start it (mlflow/serve.sh) "
                              "or drop --tracking-uri to track into OUT/mlflow.db")
        check_tracking_login(uri, max(timeout, 30.0))  # a login is a slow password hash on a busy server
        return
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise SegSDEError(f"the MLflow store {uri} is in a directory that does not exist: create {folder} or fix --tracking-uri")


def check_tracking_login(uri: str, timeout: float = 5.0) -> None:
    """A server with authentication (mlflow/serve.sh's basic-auth app) must accept this process's credentials, which
    MLflow's client takes from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)."""
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?"
                                     + urllib.parse.urlencode({"experiment_name": "Default"}))
    user, password, token = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD", "TOKEN"))
    if user and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            given = f"refused the login of '{user}'" if user else "requires a login"
            raise SegSDEError(f"the MLflow tracking server at {uri} {given}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                              "to an account of the server (the launch files read them from ~/.segsde/cluster.env)") from None
        if exc.code == 403:
            raise SegSDEError(f"the MLflow tracking server at {uri} gives the account {user or '(none)'} no access: "
                              "log in as the server's admin or grant it access") from None
    except (OSError, ValueError):
        pass  # answered /health a moment ago; a flaky network shows in the first run instead


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = str(v)[:6000]
    return flat


def artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside its file (MLflow's default would follow the working directory)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides


def start_run(uri: str, experiment: str, run_name: str, config: dict, tags: dict | None = None) -> str:
    """Create (or get) ``experiment``, start a run with the flattened ``config`` as params, ``config.json``
    and the git commit; return its id. An unreachable store is a one-line error before anything runs."""
    from mlflow.entities import Param, RunTag

    try:
        client = _client(uri)
        run = client.create_run(_experiment_id(client, experiment, uri), run_name=run_name, tags={"segsde.git_commit": git_commit(), **(tags or {})})
    except Exception as exc:
        raise SegSDEError(f"cannot reach the MLflow tracking store {uri} ({type(exc).__name__}: {str(exc)[:200]}): "
                          "start the server or pass a reachable --tracking-uri") from exc
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in _flatten(config).items()],
                     tags=[RunTag("mlflow.source.git.commit", git_commit())])
    client.log_dict(run_id, config, "config.json")
    return run_id


KEY_TAG = "segsde.key"


def run_page(uri: str, run_id: str, out=None) -> str:
    """Where a person sees the run in the MLflow UI: its page on the tracking server, or for a sqlite store the command
    that serves it (``mlflow/serve.sh``, port 5000) and the page there. In the model-training view: MLflow 3 opens an
    experiment in its GenAI view otherwise."""
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    path = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"`mlflow/serve.sh 5000 {out}`, then http://127.0.0.1:5000/{path}" if out else path


def _experiment_id(client, experiment: str, uri: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp:
        return exp.experiment_id
    # MLflow 3 opens an experiment of unknown kind in its GenAI view; these are model-training runs
    return client.create_experiment(experiment, artifact_location=artifact_root(uri),
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def study_tags(stage: str, parent_run_id: str | None = None, key: str | None = None) -> dict:
    """Tags of a stage's or trial's run: its stage, and inside a study its parent and stable key."""
    return {"segsde.stage": stage, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}), **({KEY_TAG: key} if key else {})}


def find_run(uri: str, experiment: str, key: str):
    """The run of ``experiment`` tagged with the stable ``key`` (a stage hash, a trial id), or None."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
    return runs[0] if runs else None


def get_or_create_run(uri: str, experiment: str, key: str, run_name: str, config: dict, tags: dict | None = None) -> tuple[str, bool]:
    """The run found again by ``key`` (set back to RUNNING), else a new one; so a retried or resumed
    stage, trial or study never duplicates its run. Returns (run id, created)."""
    try:
        found = find_run(uri, experiment, key)
    except Exception as exc:
        raise SegSDEError(f"cannot reach the MLflow tracking store {uri} ({type(exc).__name__}: {str(exc)[:200]}): "
                          "start the server or pass a reachable --tracking-uri") from exc
    if found is not None:
        client = _client(uri)
        client.update_run(found.info.run_id, status="RUNNING")
        for k, v in (tags or {}).items():
            client.set_tag(found.info.run_id, k, v)
        return found.info.run_id, False
    return start_run(uri, experiment, run_name, config, {**(tags or {}), KEY_TAG: key}), True


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


def kill_running_children(uri: str, experiment: str, parent_run_id: str) -> None:
    """Mark KILLED the runs under ``parent_run_id`` (children, and theirs) still RUNNING after a Ctrl-C: Tune tells no
    callback about the trials an interrupt ends (a rerun finds every run again by its key)."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    for run in client.search_runs([found.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        kill_running_children(uri, experiment, run.info.run_id)  # a study's stage runs sit under a run of their own
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")


@contextlib.contextmanager
def tracked_run(uri: str, experiment: str, run_name: str, config: dict, tags: dict | None = None):
    """Yields the id of a new run and always closes it: FINISHED, KILLED on Ctrl-C, else FAILED, unless
    whoever stopped it (an interrupted study, for a job in its stage thread) has already marked it KILLED."""
    run_id = start_run(uri, experiment, run_name, config, tags)
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status == "FINISHED" or not _already_killed(uri, run_id):
            end_run(uri, run_id, status)


def _already_killed(uri: str, run_id: str) -> bool:
    try:
        return _client(uri).get_run(run_id).info.status == "KILLED"
    except Exception:  # an unreachable store: close it as planned (which retries or fails on its own)
        return False


#: how long a worker waits for a lost tracking server at the end of its run before failing (resumably)
OUTAGE_GRACE_S = float(os.environ.get("SEGSDE_TRACKING_GRACE_S", "120"))


def _is_outage(exc: Exception) -> bool:
    """A tracking server that cannot be reached or answers 5xx, as opposed to a request it refused."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, MlflowException) and exc.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE") and "API request to" in str(exc)


class RunLogger:
    """Logs into an existing run from any process (Train workers log on rank 0 only).

    With ``keep_through_outages`` (the training loops), a call that finds the tracking server unreachable
    does not stop training: the call is queued and retried, in order, before the next one; ``flush``
    at the end of the run waits up to ``OUTAGE_GRACE_S`` and then raises, before the last checkpoint is
    reported, so that a restarted run repeats the unlogged part instead of skipping it. A loop restarted from
    its checkpoint (a lost node, a killed process) replays the steps its lost attempt logged after that
    checkpoint: the run keeps each step of a metric once, the first attempt's."""

    def __init__(self, uri: str, run_id: str, keep_through_outages: bool = False):
        if keep_through_outages:  # fail fast per call: the queue retries at every later call anyway
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self.client, self.run_id, self.keep_through_outages = _client(uri), run_id, keep_through_outages
        self.queued: list = []
        self._spool = None
        self._logged: dict[str, set[int] | None] | None = None  # the run's metric steps (None: not read yet)

    def _call(self, call) -> None:
        if self.queued:
            self._retry_queued()
        if self.queued:
            self.queued.append(call)
            return
        try:
            call()
        except Exception as exc:
            if not (self.keep_through_outages and _is_outage(exc)):
                raise
            from segsde.runtime import progress

            progress(f"[mlflow] tracking server unreachable, queueing this run's logs and training on ({str(exc)[:120]})")
            self.queued.append(call)

    def _retry_queued(self) -> None:
        sent = 0
        while self.queued:
            try:
                self.queued[0]()
            except Exception as exc:
                if not _is_outage(exc):
                    raise
                return
            self.queued.pop(0)
            sent += 1
        if sent:
            from segsde.runtime import progress

            progress(f"[mlflow] tracking server back: {sent} queued logging call(s) sent")

    def flush(self, grace_s: float = OUTAGE_GRACE_S) -> None:
        """Send what is queued, retrying for up to ``grace_s``; raise if the server stays unreachable."""
        import time

        deadline = time.monotonic() + grace_s
        self._retry_queued()
        while self.queued and time.monotonic() < deadline:
            time.sleep(2.0)
            self._retry_queued()
        if self.queued:
            raise SegSDEError(f"the MLflow tracking server stayed unreachable for {grace_s:.0f} s with {len(self.queued)} "
                              "logging call(s) queued: restart it, then rerun with --resume (training goes on from the last checkpoint)")

    def metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        # six significant digits: what a person reads in the UI (the noise is in the first three or four); the
        # study's own results keep full precision
        if self.keep_through_outages:
            values = {k: v for k, v in values.items() if step not in self._steps_logged(k)}
            if not values:
                return
            for k in values:
                self._logged[k].add(step)
        batch = [Metric(k, float(f"{float(v):.6g}"), int(time.time() * 1000), step) for k, v in values.items()]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def _steps_logged(self, key: str) -> set[int]:
        """The steps of ``key`` the run already has: read once per key, and only for keys the run has at all
        (one request for a fresh run). Unreadable during an outage: then nothing is skipped."""
        try:
            if self._logged is None:
                self._logged = dict.fromkeys(self.client.get_run(self.run_id).data.metrics)
            if self._logged.get(key, ()) is None:
                self._logged[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        except Exception as exc:
            if not _is_outage(exc):
                raise
            self._logged = self._logged or {}
            self._logged[key] = self._logged.get(key) or set()
        return self._logged.setdefault(key, set())

    def figure(self, fig, path: str) -> None:
        if not self.keep_through_outages:
            self.client.log_figure(self.run_id, fig, path)
            return
        # rendered now: the caller closes the figure, and a queued call must not need it
        import tempfile

        self._spool = self._spool or Path(tempfile.mkdtemp(prefix="segsde-mlflow-"))
        file = self._spool / Path(path).name
        fig.savefig(file)
        directory = str(Path(path).parent) if Path(path).parent != Path(".") else None
        self._call(lambda: self.client.log_artifact(self.run_id, str(file), directory))

    def tags(self, values: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in values.items()]
        self._call(lambda: self.client.log_batch(self.run_id, tags=batch))

    def artifact(self, path: Path, directory: str | None = None) -> None:
        self._call(lambda: self.client.log_artifact(self.run_id, str(path), directory))

    def table(self, data: dict[str, list], path: str) -> None:
        self._call(lambda: self.client.log_table(self.run_id, data=data, artifact_file=path))

    def dict(self, data: dict, path: str) -> None:
        self._call(lambda: self.client.log_dict(self.run_id, data, path))

    def dataset(self, name: str, uri: str, digest: str, context: str = "training") -> None:
        """Record the run's dataset as an MLflow input (its name, where it lives, its digest): the UI's Datasets
        column and filter. A location MLflow cannot describe is recorded by its URI alone."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        if "://" not in uri or uri.startswith("file://"):
            # named, not resolved: MLflow's registry holds the local source twice and warns that a path is ambiguous
            # with itself (mlflow/mlflow#9702), once per trial
            source = LocalArtifactDatasetSource(uri)
        else:
            try:
                source = resolve_dataset_source(uri)
            except Exception:  # e.g. an S3 URI with an endpoint override
                source = HTTPDatasetSource(url=uri)
        entity = MetaDataset(source, name=name, digest=digest)._to_mlflow_entity()
        inputs = [DatasetInput(dataset=entity, tags=[InputTag(key="mlflow.data.context", value=context)])]
        self._call(lambda: self.client.log_inputs(self.run_id, datasets=inputs))

