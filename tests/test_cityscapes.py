"""The Cityscapes builder on a tiny tree in the real layout (file naming, labelIds, camera JSON, 30-frame
training snippets around each annotated frame)."""

import json

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from segsde.data.dataset import SegSDEDataset
from segsde.data.labels import TRAIN_ID

NATIVE = (128, 256)  # H, W: Cityscapes' 1024x2048 scaled by 1/8 to keep the test small
SAMPLES = [("train", "aachen", 0, 19), ("train", "bochum", 3, 19), ("val", "frankfurt", 1, 294)]


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def make_tree(root, samples=SAMPLES, native=NATIVE, rng=None):
    """Cityscapes' layout at ``native`` (H, W): a training sample's snippet has all 30 frames (t-19 .. t+10),
    a validation sample only t-1 .. t+1 (all the converter reads of it)."""
    rng = rng or np.random.default_rng(0)
    H, W = native
    for split, city, seq, frame in samples:
        stem = f"{city}_{seq:06d}_{frame:06d}"
        for f in range(frame - 19, frame + 11) if split == "train" else (frame - 1, frame, frame + 1):
            img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            _png(root / "leftImg8bit_sequence" / split / city / f"{city}_{seq:06d}_{f:06d}_leftImg8bit.png", img)
            if f == frame:
                _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", img)
        label = np.full((H, W), 7, np.uint8)  # road
        label[: H // 3] = 23  # sky
        label[H // 2 :, : W // 4] = 26  # car
        label[-4:] = 1  # ego vehicle -> ignore
        _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
        cam = {"baseline": 0.209, "extrinsic": {"pitch": 0.038, "roll": 0, "yaw": 0.0195, "x": 1.7, "y": 0.1, "z": 1.2},
               "intrinsic": {"fx": 2262.52 / 8, "fy": 2265.3 / 8, "u0": 1096.98 / 8, "v0": 513.137 / 8}}
        path = root / "camera" / split / city / f"{stem}_camera.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cam))
    return root


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "cityscapes")


def test_builds_the_shared_format_with_scaled_intrinsics(tree, tmp_path):
    out = tmp_path / "cs"
    run_cli("data", "cityscapes", "--root", tree, "--out", out, "--size", "128x64")
    train = SegSDEDataset(out, split="train", sequence=True)
    assert train.ids == ["aachen_000000_000019", "bochum_000003_000019"]
    item = train[0]
    assert item["frames"].shape == (3, 3, 64, 128) and "depth" not in item and "poses" not in item
    label = item["label"].numpy()
    assert label[0, 0] == TRAIN_ID["sky"] and label[40, 100] == TRAIN_ID["road"] and label[-1, 100] == 255
    assert label[50, 10] == TRAIN_ID["car"]
    K = item["K"].double().numpy()
    assert np.isclose(K[0, 0], 2262.52 / 16, rtol=1e-6) and np.isclose(K[0, 2], (1096.98 / 8 + 0.5) / 2 - 0.5, rtol=1e-6)
    assert SegSDEDataset(out, split="val").ids == ["frankfurt_000001_000294"]


def _expect_error(tree, tmp_path, *fragments):
    out = tmp_path / "cs"
    proc = run_cli("data", "cityscapes", "--root", tree, "--out", out, "--size", "128x64", check=False)
    assert proc.returncode == 2, proc.stderr
    # one line says what is wrong, the last (before it: what was planned, Ray's start when it got that far)
    assert [line for line in proc.stderr.splitlines() if "error" in line] == proc.stderr.strip().splitlines()[-1:], proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr
    assert not (out / "manifest.json").exists() and not list(tmp_path.glob(".cs*"))  # no dataset, nothing half-written
    assert not out.exists() or not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_missing_root(tmp_path):
    _expect_error(tmp_path / "nowhere", tmp_path, "does not exist", "leftImg8bit")


def test_missing_sequence_frame(tree, tmp_path):
    victim = tree / "leftImg8bit_sequence/train/bochum/bochum_000003_000020_leftImg8bit.png"
    victim.unlink()
    _expect_error(tree, tmp_path, str(victim), "leftImg8bit_sequence_trainvaltest.zip")


def test_missing_sequence_package(tree, tmp_path):
    import shutil

    shutil.rmtree(tree / "leftImg8bit_sequence")
    _expect_error(tree, tmp_path, "leftImg8bit_sequence is missing", "extract")


def test_label_ids_outside_the_table(tree, tmp_path):
    path = tree / "gtFine/val/frankfurt/frankfurt_000001_000294_gtFine_labelIds.png"
    label = np.asarray(Image.open(path)).copy()
    label[5, 5] = 200
    _png(path, label)
    _expect_error(tree, tmp_path, str(path), "[200]", "labelIds")


def test_corrupt_png(tree, tmp_path):
    path = tree / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    path.write_bytes(path.read_bytes()[:300])
    _expect_error(tree, tmp_path, str(path), "corrupt")


def test_sde_oracles_refuse_a_dataset_without_ground_truth(tree, tmp_path):
    out = tmp_path / "cs"
    run_cli("data", "cityscapes", "--root", tree, "--out", out, "--size", "128x64")
    proc = run_cli("sde", "--data", out, "--out", tmp_path / "o", "--profile", "smoke", "--set", "oracle=depth", check=False)
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "needs the synthetic testbed's ground truth" in proc.stderr and not (tmp_path / "o").exists()


def test_the_tune_cities_form_a_split_that_nothing_trains_on(tmp_path):
    """The default tune cities (where present) leave the training split, its snippets and every labeled list: a
    sweep scores on them; named cities must exist; 'none' keeps them for training."""
    from segsde.data.store import read_manifest, split_ids

    tree = make_tree(tmp_path / "cityscapes", SAMPLES + [("train", "zurich", 2, 19)])
    out = tmp_path / "cs"
    run_cli("data", "cityscapes", "--root", tree, "--out", out, "--size", "128x64", "--sequence-stride", 9)
    assert split_ids(out, "tune") == ["zurich_000002_000019"]
    assert split_ids(out, "train") == ["aachen_000000_000019", "bochum_000003_000019"]
    assert not [i for i in split_ids(out, "sequence") if i.startswith("zurich")] and split_ids(out, "sequence")
    assert read_manifest(out)["splits"]["tune"] == 1
    tune = SegSDEDataset(out, split="tune")[0]
    assert tune["label"][0, 0] == TRAIN_ID["sky"] and tune["image"].shape == (3, 64, 128)

    listed = tmp_path / "unimatch.txt"
    listed.write_text("leftImg8bit/train/zurich/zurich_000002_000019_leftImg8bit.png gtFine/train/zurich/x.png\n")
    proc = run_cli("data", "import-split", "--data", out, "--file", listed, "--out", tmp_path / "l.txt", check=False)
    assert proc.returncode == 2 and "frames of the tuning split" in proc.stderr and "--tune-cities none" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "l.txt").exists()

    run_cli("data", "cityscapes", "--root", tree, "--out", tmp_path / "all", "--size", "128x64", "--no-sequences",
            "--tune-cities", "none")
    assert "zurich_000002_000019" in split_ids(tmp_path / "all", "train") and not split_ids(tmp_path / "all", "tune")
    proc = run_cli("data", "cityscapes", "--root", tree, "--out", tmp_path / "x", "--size", "128x64", "--tune-cities", "ulm",
                   check=False)
    assert proc.returncode == 2 and "--tune-cities ulm has no training frames" in proc.stderr
    assert not (tmp_path / "x" / "manifest.json").exists()
