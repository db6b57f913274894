"""Helpers for the fault tests: watching a study's or sweep's trial checkpoints and its training loops."""

import subprocess
import time
from pathlib import Path


def checkpoints(out: Path, runs: str = "train-*") -> set[Path]:
    """Ray Train checkpoints of a study's or sweep's trials (``train-<key>``), or of one ``segsde train`` (``train``)."""
    return set((out / "ray").glob(f"{runs}/checkpoint_*"))


def wait_for_new_checkpoint(out: Path, proc, seen: set, seconds: float = 300, runs: str = "train-*") -> set:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = checkpoints(out, runs)
        if now - seen:
            time.sleep(1.0)  # let Ray Train register it
            return now
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError("no new trial checkpoint appeared")


def training_loops(session: int) -> list[int]:
    """The processes of ``session`` that run a training loop: Ray Train workers, or the Tune trial processes
    of a study on local Ray, which run a one-worker loop themselves (Train's local mode)."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout.splitlines()
    return [int(line.split()[0]) for line in ps
            if int(line.split()[1]) == session and ("RayTrainWorker" in line or "ray::ImplicitFunc" in line)]
