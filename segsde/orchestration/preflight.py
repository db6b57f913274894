"""Preflight: before any stage starts, every alive Ray node must read the storage root and reach the tracking
store. A real cluster's nodes have their own disks, so a path that only the driver's node has (its --out,
a sqlite file beside it) would otherwise fail at a Train worker's first read or checkpoint, minutes in."""

from __future__ import annotations

import uuid

from segsde.errors import SegSDEError
from segsde.storage import Location

MARKER_DIR = ".segsde-preflight"


def probe(markers: dict[str, str], token: str, tracking_uri: str) -> str | None:
    """On one node: None when it reads ``token`` back from every marker ({location: what it stands for}: one
    under the storage root, one beside a sqlite store) and reaches a tracking server, else what failed."""
    import socket
    from urllib.parse import urlsplit

    for uri, what in markers.items():
        try:
            if Location(uri).read_text() != token:
                return f"reads another marker at {Location(uri)}"
        except Exception as exc:  # any failure to read is the answer here
            return f"cannot read {what} ({type(exc).__name__}: {str(exc)[:200]})"
    if tracking_uri.startswith(("http://", "https://")):
        url = urlsplit(tracking_uri)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
        except OSError as exc:
            return f"cannot reach the MLflow server {tracking_uri} ({exc})"
    return None


def preflight(storage: Location, tracking_uri: str, timeout_s: float = 120.0, fix: str | None = None) -> int:
    """Check every alive node of the Ray cluster this process is connected to (see ``probe``); a node that
    fails is a one-line error naming it and the fix (``fix``: another command's words for it). Returns the
    number of nodes checked. A single-node cluster is checked by the driver alone: its own reads are what
    every later step uses."""
    import os

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    markers = {storage.child(MARKER_DIR, token): "the storage root"}
    if tracking_uri.startswith("sqlite:///"):  # workers log to it too: they must see its directory
        folder = Location(os.path.dirname(tracking_uri.removeprefix("sqlite:///")))
        markers[folder.child(f"{MARKER_DIR}-{token}")] = f"the MLflow store {tracking_uri}"
    try:
        for marker in markers:
            marker.write_text(token)
    except Exception as exc:
        for marker in markers:
            marker.delete()
        raise SegSDEError(f"cannot write the storage root {storage} ({type(exc).__name__}: {str(exc)[:200]}): "
                          "check the path or bucket and its credentials (--storage, SEGSDE_STORAGE)") from None
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        if len(nodes) <= 1:
            return len(nodes)
        task = ray.remote(num_cpus=0, max_retries=0)(probe)
        refs = {n["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote({m.uri: what for m, what in markers.items()}, token, tracking_uri) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for node in nodes:
            ref = refs[node["NodeID"]]
            problem = ray.get(ref) if ref in ready else f"did not answer within {timeout_s:.0f} s"
            if problem:
                where = f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]})"
                raise SegSDEError(f"{where} {problem}: " + (fix or (
                    f"a cluster's nodes do not share the driver's disk, so mount {storage} at the same path on every node "
                    "or use an s3:// storage root (--storage), and track to an MLflow server every node reaches "
                    "(--tracking-uri http://HEAD:5000)")))
        return len(nodes)
    finally:
        for marker in markers:
            marker.delete()
