"""Label budgets as ordered id lists: a budget of k is the first k ids, so every budget is a prefix of
every larger one. Lists are stored as plain text (one id per line) or Parquet (columns id, rank)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segsde.data.store import atomic_write_bytes
from segsde.errors import SegSDEError


def random_order(ids: Iterable[str], seed: int) -> list[str]:
    """A seeded permutation of ``ids`` that does not depend on their input order."""
    ids = sorted(ids)
    return [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]


def take_budget(order: Sequence[str], budget: int) -> list[str]:
    if budget < 1:
        raise SegSDEError(f"budget {budget} must be at least 1")
    if budget > len(order):
        raise SegSDEError(f"budget {budget} is larger than the labeled pool of {len(order)} samples: "
                          f"choose a budget <= {len(order)}")
    return list(order[:budget])


def check_ids(ids: Sequence[str], available: Iterable[str], source: str) -> None:
    """Error naming the ids of ``source`` that the dataset lacks (and duplicates, which break prefixes)."""
    available = set(available)
    missing = [i for i in ids if i not in available]
    if missing:
        raise SegSDEError(f"{source} has {len(missing)} ids not in the dataset (e.g. {missing[:3]}): "
                          "use a list made for this dataset")
    if len(set(ids)) != len(ids):
        raise SegSDEError(f"{source} lists some ids twice: remove the duplicates")


def write_order(path: Path, ids: Sequence[str]) -> None:
    path = Path(path)
    if path.suffix == ".parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": list(ids), "rank": list(range(len(ids)))}), sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
    else:
        atomic_write_bytes(path, ("\n".join(ids) + "\n").encode())


def read_order(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise SegSDEError(f"id list {path} does not exist: check the path")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        if "id" not in table.column_names:
            raise SegSDEError(f"{path} has no 'id' column: write it with `segsde data split`")
        if "rank" in table.column_names:
            table = table.sort_by("rank")
        return table["id"].to_pylist()
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def import_split_file(path: Path) -> list[str]:
    """Ids from a UniMatch/CPS split file (``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png gtFine/...`` per line)."""
    path = Path(path)
    if not path.is_file():
        raise SegSDEError(f"split file {path} does not exist: check the path")
    ids = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        image = line.split()[0]
        name = Path(image).name
        if not name.endswith("_leftImg8bit.png"):
            raise SegSDEError(f"{path}:{n} does not start with a leftImg8bit/... image path: "
                              "expected the UniMatch/CPS format 'leftImg8bit/... gtFine/...'")
        ids.append(name[: -len("_leftImg8bit.png")])
    return ids
