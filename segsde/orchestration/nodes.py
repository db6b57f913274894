"""Worker nodes lost while a study or sweep runs on a cluster: one line each, and a record on the runs they held.

Ray does the recovery: Train's ``FailureConfig`` restarts a lost worker group on the remaining nodes from the run's
last checkpoint on the storage root (trials, the SDE stage, selections), and Tune's a lost trial process. The
driver only watches: it polls Ray's node table, and for each node that died finds the MLflow runs still RUNNING
there (each loop tags its run with ``segsde.node_id`` when it starts), reads the step of the checkpoint they will
continue from, and once a run's loop has started again elsewhere says so, in the terminal and on the run
(``segsde.node_lost``, ``segsde.continued_on``, ``segsde.continued_from_step``)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from segsde.storage import Location

POLL_S = 2.0


def short(node_id: str) -> str:
    return node_id[:8]


@dataclass
class LostRun:
    run_id: str
    name: str
    node: str
    step: int | None


class NodeWatch:
    """Runs beside a study's or sweep's driver (a context manager; a no-op off a cluster). ``log`` gets one
    line per run that continued elsewhere ("node X lost; trial T continues on node Y from step S")."""

    def __init__(self, tracking_uri: str, experiment: str, storage: Location, log=print, on_cluster: bool = True):
        self.uri, self.experiment, self.storage, self.log, self.on_cluster = tracking_uri, experiment, storage, log, on_cluster
        self.known: set[str] | None = None
        self.pending: list[LostRun] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segsde-node-watch", daemon=True)

    def __enter__(self) -> NodeWatch:
        if self.on_cluster:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll()
            except Exception as exc:  # a watcher must never end the study it watches
                self.log(f"[cluster] node watch paused: {str(exc)[:200]}")

    def poll(self) -> None:
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        if self.known is not None:
            for node in sorted(self.known - alive):
                self._lost(node)
        self.known = alive
        self._continued()

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def _lost(self, node: str) -> None:
        client = self._client()
        experiment = client.get_experiment_by_name(self.experiment)
        runs = client.search_runs([experiment.experiment_id], f"attributes.status = 'RUNNING' and tags.`segsde.node_id` = '{node}'") \
            if experiment else []
        if not runs:
            self.log(f"[cluster] node {short(node)} lost; no trial or SDE stage of this study was running on it")
        for run in runs:
            tags = run.data.tags
            name = tags.get("mlflow.runName", run.info.run_id)
            kind = "trial" if tags.get("segsde.stage") == "train" else "stage"
            step = self._checkpoint_step(tags)
            client.set_tag(run.info.run_id, "segsde.node_lost", f"{node} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            self.pending.append(LostRun(run.info.run_id, f"{kind} {name}", node, step))

    def _checkpoint_step(self, tags: dict) -> int | None:
        """The step of the checkpoint a lost trial continues from (its newest complete one on the storage root)."""
        from segsde.orchestration.stages import train_checkpoints
        from segsde.tracking import KEY_TAG

        if tags.get("segsde.stage") != "train" or KEY_TAG not in tags:
            return None
        import io

        import torch

        from segsde.runtime import CHECKPOINT_FILE

        run_dir = train_checkpoints(self.storage, tags[KEY_TAG])
        found = [n for n in run_dir.children() if n.startswith("checkpoint_") and run_dir.child(n, CHECKPOINT_FILE).is_file()]
        if not found:
            return None
        state = torch.load(io.BytesIO(run_dir.child(max(found), CHECKPOINT_FILE).read_bytes()), map_location="cpu", weights_only=True)
        return int(state["step"])

    def _continued(self) -> None:
        if not self.pending:
            return
        client = self._client()
        for lost in list(self.pending):
            run = client.get_run(lost.run_id)
            now = run.data.tags.get("segsde.node_id")
            if now != lost.node or run.info.status != "RUNNING":
                self.pending.remove(lost)
                if run.info.status not in ("RUNNING", "FINISHED"):
                    self.log(f"[cluster] node {short(lost.node)} lost; {lost.name} ended {run.info.status}")
                    continue
                where = f"from step {lost.step}" if lost.step is not None else "from its last checkpoint"
                self.log(f"[cluster] node {short(lost.node)} lost; {lost.name} continues on node {short(now)} {where}")
                client.set_tag(lost.run_id, "segsde.continued_on", now)
                if lost.step is not None:
                    client.set_tag(lost.run_id, "segsde.continued_from_step", str(lost.step))
