"""Cityscapes' unlabeled video: every training frame with both neighbours as a label-less triplet of the
``sequence`` split, converted as Ray tasks that resume after a kill, and the stages that read it."""

import json
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import BIN, kill_session, run_cli
from mlflow.tracking import MlflowClient
from PIL import Image
from test_cityscapes import SAMPLES, make_tree

from segsde.data import cityscapes
from segsde.data.camera import resize_intrinsics
from segsde.data.dataset import SegSDEDataset
from segsde.data.store import decode_png
from segsde.trainer.config import TrainConfig
from segsde.trainer.data import TrialBatches, mix_pool

SIZE = (64, 128)  # H, W stored; the tree's frames are 128x256
TRAIN = [(city, seq, frame) for split, city, seq, frame in SAMPLES if split == "train"]


def convert(tree, out, *flags, check=True):
    return run_cli("data", "cityscapes", "--root", tree, "--out", out, "--size", f"{SIZE[1]}x{SIZE[0]}", "--workers", 2, *flags, check=check)


def rows(out) -> dict[str, dict]:
    found = {}
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        for r in pq.read_table(out / shard["file"]).to_pylist():
            found[r["id"]] = r
    return found


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("cityscapes")
    tree, out = make_tree(base / "tree"), base / "cs"
    proc = convert(tree, out)
    assert "[cityscapes] 57/57 samples" in proc.stderr and "ETA" in proc.stderr  # progress without a terminal: lines
    return tree, out, json.loads(proc.stdout)


def test_every_training_frame_with_both_neighbours_is_an_unlabeled_triplet(converted):
    tree, out, summary = converted
    assert summary["splits"] == {"sequence": 2 * 27, "train": 2, "val": 1} and summary["skipped_snippets"] == 0
    found = rows(out)
    expected = {f"{city}_{seq:06d}_{f:06d}" for city, seq, frame in TRAIN for f in range(frame - 18, frame + 10) if f != frame}
    sequence = {sid: r for sid, r in found.items() if r["split"] == "sequence"}
    assert set(sequence) == expected  # the annotated frame is a train sample, not repeated
    assert all(r["label"] is None and r["depth"] is None and r["poses"] is None for r in sequence.values())

    cam = json.loads((tree / "camera/train/aachen/aachen_000000_000019_camera.json").read_text())["intrinsic"]
    K = np.array([[cam["fx"], 0, cam["u0"]], [0, cam["fy"], cam["v0"]], [0, 0, 1]])
    scaled = resize_intrinsics(K, (128, 256), SIZE)
    for sid in ("aachen_000000_000001", "aachen_000000_000007", "aachen_000000_000028"):
        r = sequence[sid]
        assert np.allclose(np.array(r["K"]).reshape(3, 3), scaled) and np.isclose(scaled[0, 0], 2262.52 / 16)
        frame = int(sid.split("_")[2])
        for stored, f in zip(r["frames"], (frame - 1, frame, frame + 1)):  # the neighbours, in order
            with Image.open(tree / f"leftImg8bit_sequence/train/aachen/aachen_000000_{f:06d}_leftImg8bit.png") as im:
                assert np.array_equal(decode_png(stored), np.asarray(im.resize((SIZE[1], SIZE[0]), Image.BILINEAR)))

    item = SegSDEDataset(out, "sequence", sequence=True)[0]
    assert item["frames"].shape == (3, 3, *SIZE) and (item["label"] == 255).all()
    assert SegSDEDataset(out, ("train", "sequence")).split_counts() == {"train": 2, "sequence": 54}


def test_every_kth_frame_or_none(converted):
    tree, _, _ = converted  # the plan decides the rows; the fixture's conversion shows that tasks write what it says
    tasks, description, skipped = cityscapes.plan(str(tree), SIZE, sequence_stride=4)
    snippets = [t.snippet for t in tasks if t.snippet is not None]
    assert [s.centres for s in snippets] == [(1, 5, 9, 13, 17, 21, 25)] * 2  # t-18, t-14, ..., t+6 of each snippet
    assert snippets[0].frames == [f for f in range(27) if f % 4 != 3]  # each centre's neighbours, read once
    assert description["sequence_stride"] == 4 and not skipped
    assert sum(t.rows for t in tasks) == 3 + 2 * 7
    assert all(t.snippet is None for t in cityscapes.plan(str(tree), SIZE, sequence_stride=0)[0])
    assert cityscapes.plan(str(tree), SIZE)[1]["task_list"] != description["task_list"]  # a resume checks its plan


def test_an_unlabeled_snippet_with_a_missing_or_corrupt_frame_is_skipped_and_counted(tmp_path):
    tree = make_tree(tmp_path / "tree")
    missing = tree / "leftImg8bit_sequence/train/aachen/aachen_000000_000009_leftImg8bit.png"
    missing.unlink()
    corrupt = tree / "leftImg8bit_sequence/train/bochum/bochum_000003_000025_leftImg8bit.png"
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    proc = convert(tree, tmp_path / "cs")
    summary = json.loads(proc.stdout)
    assert summary["skipped_snippets"] == 2 and summary["splits"] == {"train": 2, "val": 1}
    assert "1 snippet(s) with missing frames skipped" in proc.stderr  # the other is found while converting
    skipped = json.loads((tmp_path / "cs/manifest.json").read_text())["skipped"]
    assert [s["snippet"] for s in skipped] == ["aachen_000000_000019", "bochum_000003_000019"]
    assert "aachen_000000_000009 is missing" in skipped[0]["reason"] and str(corrupt) in skipped[1]["reason"]


def test_the_sde_stage_and_the_multitask_pool_read_the_sequence_split(converted, tmp_path):
    _, out, _ = converted
    result = json.loads(run_cli("sde", "--data", out, "--out", tmp_path / "sde", "--profile", "smoke").stdout)
    run = MlflowClient(f"sqlite:///{tmp_path / 'sde' / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and result["step"] == 5
    assert run.data.tags["data.triplets.sequence"] == "54" and run.data.tags["data.triplets.train"] == "2"

    cfg = TrainConfig(multitask=True, transfer=True, pool_sequences=True, weights=None, budget=1, steps=2, batch_labeled=1,
                      batch_unlabeled=4, crop=None)
    labeled = ["aachen_000000_000019"]
    pool = mix_pool(out, cfg, labeled)
    assert len(pool) == 1 + 54 and "bochum_000003_000019" in pool
    assert len(mix_pool(out, TrainConfig(teacher=True, budget=1, crop=None), labeled)) == 1  # single-task rows: annotated only
    assert len(mix_pool(out, TrainConfig(multitask=True, transfer=True, budget=1, crop=None), labeled)) == 1  # the original's default
    batch = TrialBatches(out, cfg, labeled, pool, 0, 0, 1)[0]["pool"]
    assert batch["frames"].shape == (4, 3, 3, *SIZE) and not batch["is_labeled"].any() and (batch["label"] == 255).all()


def test_a_killed_conversion_resumed_writes_the_same_bytes(tmp_path):
    samples = [("train", city, seq, 19) for city, seq in (("aachen", 0), ("bochum", 3), ("bremen", 12), ("cologne", 5),
                                                          ("darmstadt", 7), ("erfurt", 2))] + [("val", "lindau", 0, 19)]
    tree = make_tree(tmp_path / "tree", samples, native=(256, 512))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    flags = ("--size", "128x64", "--workers", 1)
    run_cli("data", "cityscapes", "--root", tree, "--out", whole, *flags)

    proc = subprocess.Popen([str(BIN / "segsde"), "data", "cityscapes", "--root", str(tree), "--out", str(resumed), *map(str, flags)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    entries = lambda: [p for p in (resumed / ".conversion").glob("0*.json")]  # noqa: E731
    deadline = time.monotonic() + 300
    while not entries():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    kill_session(proc.pid)  # a lost machine: the driver, Ray and its task workers at once
    proc.wait()
    finished = len(entries())
    assert not (resumed / "manifest.json").exists() and 0 < finished < 7

    summary = json.loads(run_cli("data", "cityscapes", "--root", tree, "--out", resumed, *flags).stdout)
    assert summary["converted"]["tasks"] == 7 - finished  # only what had no entry
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (whole, resumed))
    assert a["shards"] == b["shards"] and a["splits"] == b["splits"] == {"sequence": 6 * 27, "train": 6, "val": 1}
    for shard in a["shards"]:
        assert (whole / shard["file"]).read_bytes() == (resumed / shard["file"]).read_bytes()
    assert not [p for p in resumed.iterdir() if ".tmp-" in p.name]
    run_cli("data", "info", "--data", resumed)  # every checksum holds


def test_the_progress_bar_on_a_terminal_shows_the_rate_and_eta():
    import io

    from segsde.runtime.shards import Meter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    meter = Meter("cityscapes", total=100, done=40, stream=screen)
    time.sleep(0.2)
    meter.advance(30)
    meter.close()
    assert "[cityscapes]" in screen.getvalue() and "70/100" in screen.getvalue() and "ETA" in screen.getvalue()
    assert 0 < meter.rate < 30 / 0.2 + 1  # this run's pace: the 40 done before it do not count
