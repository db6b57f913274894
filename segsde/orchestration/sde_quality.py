"""Did each SDE model learn depth? Its median-scaled validation errors beside those of a constant depth.

A model that does not beat a constant (median-scaled, so the constant is each image's ground-truth median) has
learned no depth, whatever its loss did: the rows that read it (transfer, multi-task, DepthMix, the SDE-based
selections) then used a depth carrying no information for that seed. The study reports it per seed; the seed
stays in the row's interval, which with one SDE model per seed covers the SDE stage's failures too.
"""

from __future__ import annotations

import json

import torch

from segsde.metrics.depth import depth_error_sums, summarise
from segsde.storage import Location, as_location


def constant_depth_reference(data: Location, val_images: int | None, max_depth: float) -> dict | None:
    """The median-scaled errors (abs_rel, a1, ...) of a constant depth on the validation split that SDE models are
    scored on; None where it has no ground-truth depth (Cityscapes)."""
    from segsde.data.dataset import validation_split
    from segsde.data.store import local_dataset

    val = validation_split(str(local_dataset(as_location(data))), None, val_images)
    sums = None
    for i in range(len(val)):
        gt = val[i].get("depth")
        if gt is None:
            return None
        part = depth_error_sums(torch.ones_like(gt)[None], gt[None], 1e-3, max_depth)
        sums = part if sums is None else sums + part
    if sums is None or sums[-1] == 0:
        return None
    return summarise(sums)


def model_quality(model_file: str | None) -> dict:
    """The record fields of the SDE model a trial read: its entry and its validation AbsRel and d1 (empty without one)."""
    from segsde.sde.run import METRICS_FILE

    if not model_file:
        return {}
    entry = as_location(model_file).parent
    metrics = entry.child(METRICS_FILE)
    found = json.loads(metrics.read_text()) if metrics.is_file() else {}
    return {"sde/model": entry.name, "sde/abs_rel": found.get("abs_rel"), "sde/a1": found.get("a1")}


def learned_depth(record: dict, reference: dict | None) -> bool | None:
    """Whether the trial's SDE model beat the constant depth on both AbsRel and d1; None where it cannot be told."""
    abs_rel, a1 = record.get("sde/abs_rel"), record.get("sde/a1")
    if reference is None or abs_rel is None or a1 is None or abs_rel != abs_rel:
        return None
    return abs_rel < reference["abs_rel"] and a1 > reference["a1"]


def sde_models_markdown(records: list[dict], reference: dict | None) -> str:
    """A table of the SDE models the trials read (one line per model), each against the constant depth."""
    models = {}
    for r in records:
        if r.get("sde/model"):
            model = models.setdefault(r["sde/model"], {**r, "seeds": set(), "rows": set()})
            model["seeds"].add(int(r["seed"]))
            model["rows"].add(r["row"])
    if not models:
        return ""
    lines = ["SDE models the trials read (validation split, median-scaled): "
             + (f"a constant depth scores AbsRel {reference['abs_rel']:.3f}, d1 {reference['a1']:.3f}; a model must beat both "
                "to have learned depth" if reference else "no ground-truth depth here, so their quality is not checked"),
             "", "| SDE model | read by | trial seeds | AbsRel | d1 | learned depth |", "|---|---|---|---|---|---|"]
    for name, r in sorted(models.items(), key=lambda kv: (sorted(kv[1]["rows"]), min(kv[1]["seeds"]))):
        learned = learned_depth(r, reference)
        verdict = "–" if learned is None else "yes" if learned else "**no**: worse than a constant depth"
        lines.append(f"| {name} | {', '.join(sorted(r['rows']))} | {', '.join(map(str, sorted(r['seeds'])))} | "
                     f"{_number(r.get('sde/abs_rel'))} | {_number(r.get('sde/a1'))} | {verdict} |")
    return "\n".join(lines)


def _number(value) -> str:
    return "–" if value is None or value != value else f"{value:.3f}"
