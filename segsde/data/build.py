"""Build a dataset directory from shard tasks in parallel, with progress and an atomic final rename."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from segsde.data.store import atomic_directory, write_manifest, write_shard


def _run_task(make_rows: Callable[[object], list[dict]], directory: Path, numbered_task) -> dict:
    number, task = numbered_task
    rows = make_rows(task)
    return write_shard(directory / f"shard-{number:05d}.parquet", rows)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_dataset(out: Path, tasks: Sequence, make_rows: Callable[[object], list[dict]], *, source: str,
                  splits: dict[str, int], samples_per_task: Sequence[int], workers: int | None = None,
                  overwrite: bool = False, progress=sys.stderr, **meta) -> dict:
    """Run ``make_rows`` on every task (one shard each) across ``workers`` processes; write the manifest last."""
    workers = max(1, min(workers or default_workers(), len(tasks)))
    total, done, start = sum(samples_per_task), 0, time.perf_counter()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        run = partial(_run_task, make_rows, tmp)
        numbered = list(enumerate(tasks))
        shards = []
        if workers == 1:
            results = map(run, numbered)
            pool = None
        else:
            pool = mp.get_context("fork").Pool(workers)
            results = pool.imap_unordered(run, numbered)
        try:
            for entry in results:
                shards.append(entry)
                done += entry["rows"]
                rate = done / max(time.perf_counter() - start, 1e-9)
                print(f"[{source}] {done}/{total} samples ({rate:.1f} samples/s)", file=progress, flush=True)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        manifest = write_manifest(tmp, source, shards, splits, **meta)
    return manifest
