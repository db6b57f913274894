import numpy as np
import pytest
import torch
from conftest import warp_error

from segsde.data.dataset import PSEUDO_DEPTH, Augment, SegSDEDataset
from segsde.data.store import encode_unit_png, write_side_column
from segsde.errors import SegSDEError


def test_augmented_K_and_poses_keep_reprojection_exact(synth_root):
    """Resize + random crop + random flip: warping with the transformed K and poses stays consistent."""
    aug = Augment(resize=(96, 192), crop=(64, 128), random=True)
    ds = SegSDEDataset(synth_root, split="val", augment=aug, sequence=True)
    torch.manual_seed(0)
    plain = SegSDEDataset(synth_root, split="val", sequence=True)
    errors, flips = [], 0
    for i in range(12):
        item = ds[i]
        assert item["frames"].shape == (3, 3, 64, 128) and item["label"].shape == (64, 128)
        flips += bool(item["poses"][1][0, 3] * plain[i]["poses"][1][0, 3] < 0)
        errors.append(warp_error(item, 2)[0])
    assert 0 < flips < 12  # both flipped and unflipped samples were checked
    assert np.mean(errors) < 0.03, errors
    # a wrong K (the original's unscaled intrinsics) is clearly worse: the test can tell
    item = ds[0]
    item["K"] = item["K"] * torch.tensor([[2.0, 1, 2], [1, 2, 2], [1, 1, 1]])
    assert warp_error(item, 2)[0] > 1.5 * np.mean(errors)


def test_flip_reverses_image_and_mirrors_pose(synth_root):
    plain = SegSDEDataset(synth_root, split="val", sequence=True)[0]
    ds = SegSDEDataset(synth_root, split="val", augment=Augment(random=True), sequence=True)
    for seed in range(20):
        torch.manual_seed(seed)
        item = ds[0]
        if not torch.equal(item["image"], plain["image"]):
            break
    assert torch.equal(item["image"], plain["image"].flip(-1)) and torch.equal(item["label"], plain["label"].flip(-1))
    W = plain["image"].shape[-1]
    assert torch.isclose(item["K"][0, 2], (W - 1) - plain["K"][0, 2])
    assert torch.isclose(item["poses"][1][0, 3], -plain["poses"][1][0, 3])


def test_eval_transform_is_deterministic_and_centred(synth_root):
    ds = SegSDEDataset(synth_root, split="val", augment=Augment(crop=(64, 64)))
    a, b = ds[3], ds[3]
    assert torch.equal(a["image"], b["image"]) and a["image"].shape == (3, 64, 64)
    full = SegSDEDataset(synth_root, split="val")[3]
    assert torch.equal(a["label"], full["label"][32:96, 96:160])
    assert torch.isclose(a["K"][0, 2], full["K"][0, 2] - 96)


def test_pseudo_depth_side_column_is_read_with_the_samples(synth_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    ds = SegSDEDataset(root, split="val")
    values = {sid: encode_unit_png(np.full((128, 256), (n + 1) / 20.0)) for n, sid in enumerate(ds.ids)}
    write_side_column(root, PSEUDO_DEPTH, values, checkpoint="test")
    item = SegSDEDataset(root, split="val", augment=Augment(crop=(32, 32)))[2]
    assert item[PSEUDO_DEPTH].shape == (32, 32) and torch.allclose(item[PSEUDO_DEPTH], torch.tensor(3 / 20.0), atol=1e-4)


def test_id_lists_and_missing_splits(synth_root):
    ds = SegSDEDataset(synth_root, split="train", ids=["train_000005", "train_000001"])
    assert [ds[i]["id"] for i in range(2)] == ["train_000005", "train_000001"]
    with pytest.raises(SegSDEError, match="not in the dataset"):
        SegSDEDataset(synth_root, split="train", ids=["val_000001"])
    with pytest.raises(SegSDEError, match="no samples in split"):
        SegSDEDataset(synth_root, split="test")
    with pytest.raises(SegSDEError, match="larger than the image"):
        SegSDEDataset(synth_root, split="val", augment=Augment(crop=(512, 512)))[0]


def test_dataloader_batches(synth_root):
    ds = SegSDEDataset(synth_root, split="train", augment=Augment(crop=(64, 64), random=True), sequence=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)))
    assert batch["frames"].shape == (4, 3, 3, 64, 64) and batch["K"].shape == (4, 3, 3) and batch["poses"].shape == (4, 2, 4, 4)
    assert batch["label"].dtype == torch.int64 and float(batch["image"].max()) <= 1.0


def test_dataset_pickles_for_worker_processes(synth_root):
    import pickle

    ds = SegSDEDataset(synth_root, split="val")
    first = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone._files and torch.equal(clone[0]["image"], first["image"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="spawn")
    assert next(iter(loader))["image"].shape == (2, 3, 128, 256)


def test_decoded_cache_gives_the_same_samples_and_keeps_to_its_size(synth_root):
    """A second epoch from the cache equals fresh decoding under the same random crops and flips; a cap
    below one sample caches nothing, and the cache does not travel to worker processes."""
    import pickle

    aug = Augment(resize=(48, 96), crop=(32, 64), random=True)
    cached = SegSDEDataset(synth_root, "train", augment=aug, sequence=True)
    uncached = SegSDEDataset(synth_root, "train", augment=aug, sequence=True, cache_mb=0)
    for i in range(len(cached)):
        cached[i]
    assert len(cached._decoded) == len(cached) and not uncached._decoded
    for i in range(len(cached)):
        torch.manual_seed(i)
        a = cached[i]
        torch.manual_seed(i)
        b = uncached[i]
        for key in ("frames", "K", "label", "depth", "dynamic", "poses"):
            assert torch.equal(a[key], b[key]), key
    assert not uncached._decoded and not pickle.loads(pickle.dumps(cached))._decoded
    one = cached._decoded_bytes / len(cached) / 2**20
    capped = SegSDEDataset(synth_root, "train", augment=aug, sequence=True, cache_mb=2.5 * one)
    for i in range(len(capped)):
        capped[i]
    assert len(capped._decoded) == 2


def test_the_manifest_and_index_are_read_once_per_manifest_version(synth_root, tmp_path, monkeypatch):
    import shutil

    import pyarrow.parquet as pq

    from segsde.data.store import MANIFEST, read_manifest, split_ids
    from segsde.storage import atomic_write_bytes

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    opened = []
    monkeypatch.setattr(pq, "ParquetFile", lambda *a, _real=pq.ParquetFile, **k: opened.append(a[0]) or _real(*a, **k))
    monkeypatch.setattr(pq, "read_table", lambda *a, _real=pq.read_table, **k: opened.append(a[0]) or _real(*a, **k))
    shards = len(read_manifest(data)["shards"])
    assert split_ids(data, "val") == split_ids(data, "val") and read_manifest(data) == read_manifest(data)
    assert len(opened) == 2 * shards  # every footer checked once, every index column read once
    manifest = (data / MANIFEST).read_bytes()
    atomic_write_bytes(data / MANIFEST, manifest)  # a new version of the manifest (a rebuild renames one into place)
    read_manifest(data)
    assert len(opened) == 3 * shards
    first = data / read_manifest(data)["shards"][0]["file"]
    first.unlink()
    atomic_write_bytes(data / MANIFEST, manifest)
    with pytest.raises(SegSDEError, match="listed in the manifest is missing"):
        read_manifest(data)
