"""Where a study's jobs say how far they are: a named Ray actor (the board) that the training loops post to and
the driver's live view reads. Outside a study (no board) posting does nothing, so the loops need not know.

Nothing here can change a number (``orchestration.keys.NOT_RESULTS``)."""

from __future__ import annotations

import time

BOARD = "segsde-progress"
_handle = None  # this process's handle on the board: None not looked up yet, False none exists


def start_board():
    """Create the board for this Ray job (a 0-CPU actor); returns its handle."""
    import ray

    @ray.remote(num_cpus=0)
    class Board:
        def __init__(self):
            self.items: dict[str, dict] = {}

        def post(self, key: str, values: dict) -> None:
            item = self.items.setdefault(key, {"first": values})
            item.update(values)

        def snapshot(self) -> dict:
            return self.items

    # on the driver's node: a board on a worker node would be lost with it, and the live view with it
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Board.options(name=BOARD, get_if_exists=True, scheduling_strategy=here).remote()


def post(key: str | None, **values) -> None:
    """Tell the board that job ``key`` reached ``values`` (e.g. step, total, miou); never blocks, never fails."""
    global _handle
    if not key:
        return
    try:
        import ray

        if _handle is None:
            _handle = ray.get_actor(BOARD) if ray.is_initialized() else False
        if _handle:
            _handle.post.remote(key, {**values, "time": time.time()})
    except Exception:  # no board (a standalone job) or Ray shutting down: progress is not worth a failure
        _handle = False
