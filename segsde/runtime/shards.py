"""A dataset's shards built as Ray tasks on every core of every node, straight onto the storage root.

One task, one shard: it converts its part of the source, writes the shard whole (a rename on a disk, one
upload on an object store), then its entry in ``.conversion/`` beside the plan. The manifest is written last,
once every task has an entry, so the directory reads as a dataset only when it is complete. A rerun of the
same plan after a kill converts only the tasks without an entry; the tasks being deterministic, it ends with
the bytes an uninterrupted run writes.

A task is any picklable object with ``rows`` and ``frames`` (what it will write and read, for the progress
bar); ``convert(task) -> (rows, skipped)`` turns it into dataset rows and the parts of it left out.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

from segsde.data.store import MANIFEST, shard_bytes, shard_entry, write_manifest
from segsde.errors import SegSDEError
from segsde.storage import Location, as_location

CONVERSION = ".conversion"
PLAN = "plan.json"


def convert_and_write(out: Location, number: int, convert: Callable, task) -> dict:
    """Task ``number``: its shard (when it has rows), then its entry."""
    rows, skipped = convert(task)
    entry = {"number": number, "rows": len(rows), "frames": task.frames, "skipped": skipped,
             "split_rows": dict(Counter(r["split"] for r in rows))}
    if rows:
        name = f"shard-{number:05d}.parquet"
        data = shard_bytes(rows)
        out.child(name).write_bytes(data)
        entry["shard"] = shard_entry(name, data, rows)
    out.child(CONVERSION, f"{number:05d}.json").write_text(json.dumps(entry))
    return entry


def _differences(had: dict, now: dict) -> str:
    return ", ".join(f"{k} {had.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(had) | set(now)) if had.get(k) != now.get(k))


def resume_point(out: Location, description: dict, overwrite: bool) -> dict[int, dict]:
    """The entries of the tasks already finished at ``out`` by a conversion with the same plan; records the
    plan first when there is none. Another plan there is an error, unless ``overwrite`` (then it is deleted)."""
    plan_file = out.child(CONVERSION, PLAN)
    if overwrite:
        out.delete()
    elif plan_file.is_file():
        had = json.loads(plan_file.read_text())
        if had != description:
            raise SegSDEError(f"{out} holds a conversion with other settings ({_differences(had, description)}): "
                              "pass --overwrite to replace it, or choose another --out")
    elif out.exists() and out.children():
        raise SegSDEError(f"{out} already exists and is not a conversion with these settings: choose another --out or pass --overwrite")
    if not plan_file.is_file():
        plan_file.write_text(json.dumps(description, indent=1))
    done = {}
    for name in out.child(CONVERSION).children():
        if name != PLAN and name.endswith(".json") and not name.startswith("."):
            entry = json.loads(out.child(CONVERSION, name).read_text())
            done[entry["number"]] = entry
    if out.is_local:  # what a killed task left half-written: hidden temporary files, never listed anywhere
        for name in out.children():
            if name.startswith(".") and ".tmp-" in name:
                out.child(name).delete()
    return done


class Meter:
    """A progress bar with rate and ETA on a terminal; elsewhere a line every ``every`` seconds and at the end."""

    def __init__(self, label: str, total: int, done: int = 0, unit: str = "samples", stream=sys.stderr, every: float = 10.0):
        self.label, self.total, self.done, self.unit, self.stream, self.every = label, total, done, unit, stream, every
        self.start, self.first, self.last_line = time.perf_counter(), done, 0.0
        self.bar = None
        if getattr(stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.markup import escape
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(TextColumn(escape(f"[{label}]")), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                                TextColumn("{task.fields[pace]}"), console=Console(file=stream), transient=False)
            self.task = self.bar.add_task(label, total=total, completed=done, pace="")
            self.bar.start()

    @property
    def rate(self) -> float:
        return (self.done - self.first) / max(time.perf_counter() - self.start, 1e-9)

    def pace(self) -> str:
        """This run's rate (what an earlier, killed run did does not count) and the time left at it."""
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total - self.done) / self.rate)) if self.rate > 0 else "?"
        return f"{self.rate:.1f}/s, ETA {eta}"

    def line(self) -> str:
        return f"[{self.label}] {self.done}/{self.total} {self.unit}, {self.pace()}"

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, pace=self.pace())
        elif time.perf_counter() - self.last_line >= self.every or self.done >= self.total:
            self.last_line = time.perf_counter()
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def build_on_ray(out: Location | str, tasks: Sequence, convert: Callable, description: dict, *, source: str,
                 address: str | None = None, workers: int | None = None, overwrite: bool = False, skipped: Sequence[dict] = (),
                 check_nodes: Callable[[Location], object] | None = None, **meta) -> dict:
    """Run every task of ``tasks`` not yet finished at ``out`` as a Ray task (one CPU each), then write the
    manifest (``skipped``: what planning left out, before what the tasks did). ``check_nodes(out)`` runs once
    Ray is up, before any task (that every node reaches ``out``). Returns the manifest, with ``converted``
    (what this run did: tasks, rows, frames, seconds) added."""
    out = as_location(out)
    done = resume_point(out, description, overwrite)
    pending = [n for n in range(len(tasks)) if n not in done]
    start = time.perf_counter()
    if pending:
        meter = Meter(source, total=sum(t.rows for t in tasks), done=sum(tasks[n].rows for n in done))
        try:
            for entry in _run(out, [(n, tasks[n]) for n in pending], convert, address, workers, check_nodes):
                done[entry["number"]] = entry
                meter.advance(tasks[entry["number"]].rows)
        finally:
            meter.close()
    elif out.child(MANIFEST).is_file():
        return json.loads(out.child(MANIFEST).read_text()) | {"converted": {"tasks": 0, "rows": 0, "frames": 0, "seconds": 0.0}}
    entries = [done[n] for n in sorted(done)]
    splits = Counter()
    for e in entries:
        splits.update(e["split_rows"])
    manifest = write_manifest(out, source, [e["shard"] for e in entries if "shard" in e], dict(sorted(splits.items())),
                              skipped=[*skipped, *(s for e in entries for s in e["skipped"])], **meta)
    this_run = [done[n] for n in pending]
    return manifest | {"converted": {"tasks": len(pending), "rows": sum(e["rows"] for e in this_run),
                                     "frames": sum(e["frames"] for e in this_run), "seconds": time.perf_counter() - start}}


def _run(out: Location, numbered: list[tuple[int, object]], convert: Callable, address: str | None, workers: int | None,
         check_nodes: Callable[[Location], object] | None):
    """Yield each task's entry as it finishes; cancel the rest on an error or Ctrl-C."""
    import ray

    from segsde.runtime.ray_job import init_ray

    init_ray(address, num_cpus=workers or len(os.sched_getaffinity(0)))
    if check_nodes is not None:
        check_nodes(out)
    remote = ray.remote(num_cpus=1)(convert_and_write)
    refs = {remote.remote(out, n, convert, task): n for n, task in numbered}
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                refs.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, SegSDEError):  # the shards finished so far stay: a rerun resumes
                        raise SegSDEError(f"{exc.cause}; the shards written so far are kept, rerun the same command") from None
                    raise
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
