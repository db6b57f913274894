import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent


def run_cli(*args, check=True, **kw):
    """Run the installed ``segsde`` console script; return the CompletedProcess."""
    proc = subprocess.run([str(BIN / "segsde"), *map(str, args)], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"segsde {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def kill_session(session: int) -> None:
    """SIGKILL every process of ``session`` (a lost machine): Ray's workers have process groups of their own,
    so killing the leader's group is not enough."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split()
    for pid, sid in zip(ps[::2], ps[1::2]):
        if int(sid) == session:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """The testbed exactly as the issue's acceptance command builds it."""
    out = tmp_path_factory.mktemp("synth") / "x"
    run_cli("data", "synth", "--out", out, "--train", 64, "--val", 16, "--size", "128x256", "--seed", 0)
    return out


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """A smoke dataset (16 train, 8 val, 64x128) with SDE pseudo-depth, the (untrained) smoke SDE model it
    came from, and an ordered selection list."""
    from dataclasses import asdict

    import torch

    from segsde.data.splits import random_order, write_order
    from segsde.data.store import split_ids
    from segsde.sde.export import export_pseudo_depth
    from segsde.sde.model import SDEModel
    from segsde.sde.run import save_model, sde_config

    root = tmp_path_factory.mktemp("study")
    data = root / "data"
    run_cli("data", "synth", "--out", data, "--train", 16, "--val", 8, "--tune", 4, "--size", "64x128", "--seed", 1)
    torch.manual_seed(0)
    cfg = sde_config("smoke")
    save_model(root / "sde.pt", {"model": SDEModel(cfg).state_dict(), "config": asdict(cfg), "step": 0})
    export_pseudo_depth(root / "sde.pt", data)
    write_order(root / "selection.txt", list(reversed(random_order(split_ids(data, "train"), seed=5))))
    return {"data": data, "sde": root / "sde.pt", "selection": root / "selection.txt"}


def bilinear(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample img [H, W, C] at float pixel coordinates (inside the image)."""
    H, W = img.shape[:2]
    x0 = np.clip(np.floor(u).astype(int), 0, W - 2)
    y0 = np.clip(np.floor(v).astype(int), 0, H - 2)
    fx, fy = (u - x0)[:, None], (v - y0)[:, None]
    return (img[y0, x0] * (1 - fx) * (1 - fy) + img[y0, x0 + 1] * fx * (1 - fy)
            + img[y0 + 1, x0] * (1 - fx) * fy + img[y0 + 1, x0 + 1] * fx * fy)


def reproject(depth, K, T):
    """Pixels with depth > 0 of the target view -> (pixel mask, source u, v, source z)."""
    H, W = depth.shape
    v, u = np.mgrid[0:H, 0:W]
    ok = depth > 0
    pts = np.linalg.inv(K) @ np.stack([u[ok], v[ok], np.ones(ok.sum())]) * depth[ok]
    src = T[:3, :3] @ pts + T[:3, 3:]
    proj = K @ src
    return ok, proj[0] / proj[2], proj[1] / proj[2], src[2]


def warp_error(item: dict, source: int) -> tuple[float, float]:
    """Mean |frame t - frame ``source`` (0 or 2) warped with the item's depth, K and pose| over static
    in-image pixels, and the same error without warping. Occluded pixels are included (no source depth)."""
    frames = item["frames"].permute(0, 2, 3, 1).numpy()
    depth = item["depth"].numpy()
    ok, u, v, _ = reproject(depth, item["K"].double().numpy(), item["poses"][source // 2].double().numpy())
    H, W = depth.shape
    keep = (~item["dynamic"].numpy())[ok] & (u >= 0) & (u <= W - 1) & (v >= 0) & (v <= H - 1)
    target = frames[1][ok][keep]
    warped = np.abs(bilinear(frames[source], u[keep], v[keep]) - target).mean()
    return warped, np.abs(frames[source][ok][keep] - target).mean()


os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# the files that take minutes go first, so that the two test processes (pytest-xdist, whole files each)
# finish together instead of one waiting on a long file that came last
SLOW_FIRST = ("test_cluster.py", "test_storage.py", "test_sweep_faults.py", "test_faults.py", "test_selection.py", "test_trainer.py",
              "test_sde_train.py", "test_run_ablation.py",
              "test_tracking_outage.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: a file's own order is kept
