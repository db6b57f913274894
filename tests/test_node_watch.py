"""The node watch's record of a lost node, against a real MLflow store and storage root, with the moment Train
restarts a run elsewhere before Ray's node table marks its node dead (the order a loaded cluster shows)."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from segsde.orchestration.nodes import NodeWatch
from segsde.orchestration.stages import running_checkpoints
from segsde.runtime import CHECKPOINT_FILE
from segsde.storage import as_location
from segsde.tracking import KEY_TAG

A, B, C = "a" * 56, "b" * 56, "c" * 56


def checkpoint(storage, tags: dict, name: str, step: int, **state) -> None:
    where = Path(running_checkpoints(storage, tags).child(name, CHECKPOINT_FILE).path)
    where.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "model": torch.zeros(4), **state}, where)


class Watch(NodeWatch):
    """The watch with Ray's node table given by the test: which nodes are alive is the only thing it reads from Ray."""

    alive: set[str] = set()

    def alive_nodes(self) -> set[str]:
        return set(self.alive)


def watched_run(tmp_path, name: str, tags: dict, alive: set[str]):
    """A RUNNING trial or stage run (``tags``) on node A in a real MLflow store, and a watch over its experiment
    that has seen ``alive`` with the run's first checkpoint (step 4): (client, storage, run id, watch, its lines)."""
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", as_location(tmp_path / "storage")
    client = MlflowClient(uri)
    experiment = client.create_experiment("lost")
    run_id = client.create_run(experiment, run_name=name, tags={**tags, "segsde.node_id": A}).info.run_id
    lines = []
    watch = Watch(uri, "lost", storage, lines.append)
    watch.alive = alive
    checkpoint(storage, tags, "checkpoint_2026-12-07_10-00-00.000000", 4)
    watch.poll()
    return client, storage, run_id, watch, lines


def test_a_run_restarted_before_its_node_is_marked_dead_is_reported_from_the_checkpoint_it_continued_from(tmp_path):
    trial = {"segsde.stage": "train", KEY_TAG: "k1"}
    client, storage, run_id, watch, lines = watched_run(tmp_path, "mtl-b4-s0", trial, {A, B, C})
    checkpoint(storage, trial, "checkpoint_2026-12-07_10-00-01.000000", 8)
    watch.poll()
    assert lines == [] and watch.held[run_id].point == "step 8"

    # node A dies; Train restarts the run on B from step 8, and the loop there tags it and checkpoints step 12,
    # all before the node table says A (and C, which held nothing of this study) are dead
    client.set_tag(run_id, "segsde.node_id", B)
    checkpoint(storage, trial, "checkpoint_2026-12-07_10-00-09.000000", 12)
    watch.alive = {B}
    watch.poll()
    assert lines == [f"[cluster] node {C[:8]} lost; no trial or stage of this study was running on it",
                     f"[cluster] node {A[:8]} lost; trial mtl-b4-s0 continues on node {B[:8]} from step 8"]
    tags = client.get_run(run_id).data.tags
    assert tags["segsde.node_lost"].startswith(A) and tags["segsde.continued_on"] == B and tags["segsde.continued_from"] == "step 8"


@pytest.mark.parametrize("tags, name, state, point", [
    ({"segsde.stage": "sde", KEY_TAG: "sde:sde-0123456789ab"}, "stage sde-quick", {}, "step 8"),
    ({"segsde.stage": "select", KEY_TAG: "select:select-sde-s0-0123456789ab.parquet"}, "stage select-sde-s0",
     {"round": 1, "records": ["x", "y"]}, "round 1, step 8"),
], ids=["sde", "selection"])
def test_a_stage_whose_node_is_marked_dead_before_it_restarts_is_reported_from_its_last_checkpoint(tmp_path, tags, name, state, point):
    client, storage, run_id, watch, lines = watched_run(tmp_path, name.split()[1], tags, {A, B})
    checkpoint(storage, tags, "checkpoint_2026-12-07_10-00-01.000000", 8, **state)  # A's last, written after that poll
    watch.alive = {B}
    watch.poll()
    assert lines == []  # not restarted yet: nothing to say until it is
    assert [(lost.node, lost.point) for lost in watch.pending] == [(A, point)]
    client.set_tag(run_id, "segsde.node_id", B)
    watch.poll()
    assert lines == [f"[cluster] node {A[:8]} lost; {name} continues on node {B[:8]} from {point}"]
    assert client.get_run(run_id).data.tags["segsde.continued_from"] == point


def test_a_checkpoint_still_being_copied_or_torn_by_its_nodes_death_is_passed_over_for_the_newest_whole_one(tmp_path):
    trial = {"segsde.stage": "train", KEY_TAG: "k1"}
    client, storage, run_id, watch, lines = watched_run(tmp_path, "mtl-b4-s0", trial, {A, B})
    checkpoint(storage, trial, "checkpoint_2026-12-07_10-00-01.000000", 8)
    being_copied = Path(running_checkpoints(storage, trial).child("checkpoint_2026-12-07_10-00-02.000000", CHECKPOINT_FILE).path)
    checkpoint(storage, trial, being_copied.parent.name, 12)
    whole = being_copied.read_bytes()
    being_copied.write_bytes(whole[: len(whole) // 2])
    watch.poll()
    assert lines == [] and watch.held[run_id].point == "step 8"  # the torn one is neither read nor an error
    being_copied.write_bytes(whole)
    watch.poll()
    assert watch.held[run_id].point == "step 12"

    # A dies while copying step 16: Train continues from step 12, its newest whole checkpoint
    torn = being_copied.parent.with_name("checkpoint_2026-12-07_10-00-03.000000") / CHECKPOINT_FILE
    torn.parent.mkdir()
    torn.write_bytes(whole[:100])
    watch.alive = {B}
    watch.poll()
    client.set_tag(run_id, "segsde.node_id", B)
    watch.poll()
    assert lines == [f"[cluster] node {A[:8]} lost; trial mtl-b4-s0 continues on node {B[:8]} from step 12"]
