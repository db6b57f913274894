"""Worker nodes lost while a study or sweep runs on a cluster: one line each, and a record on the runs they held.

Ray does the recovery: Train's ``FailureConfig`` restarts a lost worker group on the remaining nodes from the run's
last checkpoint on the storage root (trials, the SDE stage, selections), and Tune's a lost trial process. The
driver only watches: it polls Ray's node table and the RUNNING runs of its experiment (each loop tags its run with
``segsde.node_id`` when it starts), and for each node that died takes the runs it held at the poll before, with
the newest checkpoint each had then. Train may restart a run elsewhere (and the loop re-tag it) before Ray's node
table marks the node dead, so what a node held is read from that earlier poll, never from the tags of the moment.
Once a run's loop has started again elsewhere the watch says so, in the terminal and on the run
(``segsde.node_lost``, ``segsde.continued_on``, ``segsde.continued_from``: "step 24", "round 1, step 3")."""

from __future__ import annotations

import pickle
import threading
import time
from dataclasses import dataclass

from segsde.storage import Location

POLL_S = 2.0
# what torch.load raises on a state file still being copied, torn for good, absent or already replaced
TORN_OR_GONE = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError)


def short(node_id: str) -> str:
    return node_id[:8]


@dataclass
class HeldRun:
    node: str
    tags: dict
    checkpoint: str | None = None  # the newest checkpoint when last seen, and where in the run it was written
    point: str | None = None


def resume_point(checkpoint: Location) -> str:
    """Where in its run a checkpoint's state file was written ("step 24"; a selection's "round 1, step 3" or "4
    images picked"), mapped rather than read where the storage root is local: the driver looks at every new
    checkpoint of every running trial and stage."""
    import io

    import torch

    source = checkpoint.path if checkpoint.is_local else io.BytesIO(checkpoint.read_bytes())
    state = torch.load(source, map_location="cpu", weights_only=True, mmap=checkpoint.is_local)
    if "round" in state:
        return f"round {state['round']}, step {state['step']}"
    return f"step {state['step']}" if "step" in state else f"{len(state.get('records', []))} images picked"


@dataclass
class LostRun:
    run_id: str
    name: str
    node: str
    point: str | None


class NodeWatch:
    """Runs beside a study's or sweep's driver (a context manager; a no-op off a cluster). ``log`` gets one
    line per run that continued elsewhere ("node X lost; trial T continues on node Y from step S")."""

    def __init__(self, tracking_uri: str, experiment: str, storage: Location, log=print, on_cluster: bool = True):
        self.uri, self.experiment, self.storage, self.log, self.on_cluster = tracking_uri, experiment, storage, log, on_cluster
        self.known: set[str] | None = None
        self.pending: list[LostRun] = []
        self.held: dict[str, HeldRun] = {}
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
        alive = self.alive_nodes()
        if self.known is not None:
            for node in sorted(self.known - alive):
                self._lost(node)
        self.known = alive
        self.held = self._running()
        self._continued()

    @staticmethod
    def alive_nodes() -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def _running(self) -> dict[str, HeldRun]:
        """The experiment's RUNNING runs that a loop has tagged with its node, by run id."""
        client = self._client()
        experiment = client.get_experiment_by_name(self.experiment)
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
        held = {}
        for run in runs:
            if "segsde.node_id" in run.data.tags:
                now = HeldRun(run.data.tags["segsde.node_id"], run.data.tags)
                if before := self.held.get(run.info.run_id):  # the checkpoint already read, unless a newer one is there
                    now.checkpoint, now.point = before.checkpoint, before.point
                self._checkpointed(now)
                held[run.info.run_id] = now
        return held

    def _checkpointed(self, held: HeldRun) -> None:
        """Bring ``held`` to the newest checkpoint of its trial, SDE stage or selection on the storage root that can
        be read, with where in the run it was written."""
        from segsde.orchestration.stages import running_checkpoints
        from segsde.runtime import CHECKPOINT_FILE

        run_dir = running_checkpoints(self.storage, held.tags)
        if run_dir is None:
            return
        # Train copies each checkpoint onto the storage root itself, so a listed state file may still be torn (or
        # torn for good, where its node died during the copy, and then never registered): a restart continues
        # from the newest whole one, and so does this record
        newer = sorted((n for n in run_dir.children() if n.startswith("checkpoint_") and n > (held.checkpoint or "")),
                       reverse=True)
        for name in newer:
            try:
                held.point = resume_point(run_dir.child(name, CHECKPOINT_FILE))
            except TORN_OR_GONE:
                continue
            held.checkpoint = name
            return

    def _lost(self, node: str) -> None:
        client = self._client()
        runs = {run_id: held for run_id, held in self.held.items() if held.node == node}
        if not runs:
            self.log(f"[cluster] node {short(node)} lost; no trial or stage of this study was running on it")
        for run_id, held in runs.items():
            if client.get_run(run_id).data.tags.get("segsde.node_id") == node:
                self._checkpointed(held)  # not restarted yet: a checkpoint since the last poll is its own
            name = held.tags.get("mlflow.runName", run_id)
            kind = "trial" if held.tags.get("segsde.stage") == "train" else "stage"
            client.set_tag(run_id, "segsde.node_lost", f"{node} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            self.pending.append(LostRun(run_id, f"{kind} {name}", node, held.point))

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
                where = f"from {lost.point}" if lost.point is not None else "from its last checkpoint"
                self.log(f"[cluster] node {short(lost.node)} lost; {lost.name} continues on node {short(now)} {where}")
                client.set_tag(lost.run_id, "segsde.continued_on", now)
                if lost.point is not None:
                    client.set_tag(lost.run_id, "segsde.continued_from", lost.point)
