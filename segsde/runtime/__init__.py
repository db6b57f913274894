"""What every Ray Train worker loop needs: its rank and device, seeded batch order, RNG state, checkpoints."""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FILE = "state.pt"


@dataclass(frozen=True)
class Worker:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ray_node_id() -> str:
    """The Ray node this process runs on ("local" outside Ray): what a run records to show where it trained."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # no runtime context in this process
        return "local"


def worker_tags(worker: Worker) -> dict[str, str]:
    """What a stage's or trial's run records of where and with what it ran: the Ray node, the world size, the
    library versions, the processor and torch's kernels and threads. One commit can give other digits on
    another processor (bf16 and AMX kernels, thread counts), so a run must say which it had."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {"segsde.node_id": ray_node_id(), "segsde.world_size": str(worker.world)}
    for package in ("torch", "torchvision", "kornia", "ray", "numpy", "mlflow", "optuna", "pyarrow"):
        try:
            tags[f"segsde.env.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"segsde.env.{package}"] = "absent"
    cpuinfo = _cpuinfo()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "unknown")
    tags.update({"segsde.env.cpu": model, "segsde.env.bf16_native": str(cpu_bf16_native(cpuinfo)).lower(),
                 "segsde.env.amx": str("amx_bf16" in cpuinfo.split()).lower(),
                 "segsde.env.cpu_kernels": torch.backends.cpu.get_cpu_capability(), "segsde.env.threads": str(torch.get_num_threads()),
                 "segsde.env.device": torch.cuda.get_device_name(worker.device) if worker.device.type == "cuda" else "cpu"})
    return tags


def train_utils():
    """Ray Train's utilities of the loop running in this process, or None outside a Train loop. Used in place of
    ``ray.train.get_context``/``report``/``get_checkpoint``, which refuse to run inside a Tune trial: that is
    where a study runs a one-worker loop, in Train's local mode (``ScalingConfig(num_workers=0)``)."""
    from ray.train.v2._internal.execution.train_fn_utils import get_train_fn_utils

    try:
        return get_train_fn_utils()
    except RuntimeError:  # not inside a Train loop
        return None


def current_worker() -> Worker:
    """Rank, world size and device inside a Ray Train loop (rank 0 of 1 on CPU outside one)."""
    utils = train_utils()
    if utils is None:
        return Worker(0, 1, torch.device("cpu"))
    import ray.train.torch

    ctx = utils.get_context()
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), device)


def report(worker: Worker, metrics: dict, state: dict | None = None, files: dict | None = None) -> None:
    """Report ``metrics`` (NaNs left out) to Ray Train with a checkpoint that rank 0 writes: ``state`` as
    CHECKPOINT_FILE and ``files`` ({name: object}) beside it."""
    import math
    import tempfile

    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if worker.is_main:
            if state is not None:
                save_state(d, state)
            for name, payload in (files or {}).items():
                torch.save(payload, Path(d) / name)
            ckpt = Checkpoint.from_directory(d)
        train_utils().report({k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}, checkpoint=ckpt)


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast region of a network pass. ``auto``: bf16 on a GPU and on a CPU that computes it natively,
    float32 on other CPUs; ``bf16``: bf16 on either (about 1.5x faster on a CPU with AVX512-BF16 or AMX, emulated
    and several times slower on one without); ``fp32``: no autocast."""
    enabled = effective_precision(device.type, precision) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def effective_precision(device_type: str, precision: str = "auto") -> str:
    """What ``precision`` means on a device of ``device_type`` ("cpu" or "cuda") of this machine: "bf16" or "fp32"
    (``auto`` on a CPU: bf16 where it is native, since emulated bf16 is 7x slower than float32 on an AVX2 CPU)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" or cpu_bf16_native() else "fp32"
    return precision


def place(model: torch.nn.Module, device: torch.device, precision: str = "auto", batch: int = 8) -> torch.nn.Module:
    """``model`` on ``device`` in place, its 4-D weights in the layout its convolutions run fastest in at ``batch``
    images a pass: channels-last (cuDNN's and oneDNN's preferred layout) on a GPU, in bf16, and in float32 on a CPU
    from 8 images a pass; NCHW for float32 on a CPU below that (oneDNN's AVX2 float32 kernels ran the trainer's
    Baseline step at 4 images 1.2-1.3x faster in NCHW, while at 8 images and more channels-last was level or ahead).
    The inputs may stay NCHW: a convolution follows its weight's layout."""
    model.to(device)
    if device.type == "cuda" or effective_precision(device.type, precision) == "bf16" or batch >= 8:
        model.to(memory_format=torch.channels_last)
    return model


def batch_indices(n: int, step: int, batch: int, rank: int, world: int, seed: int) -> list[int]:
    """The sample indices of ``rank``'s batch at ``step``: epochs are seeded permutations of range(n),
    consumed ``batch * world`` at a time, so the order depends only on (seed, step) and a resumed run
    sees exactly the batches an uninterrupted one would."""
    per_step = batch * world
    start = step * per_step + rank * batch
    out = []
    for pos in range(start, start + batch):
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed("epoch", seed, epoch)))
        out.append(int(perm[offset]))
    return out


def progress(line: str) -> None:
    """A progress line on stderr, from any worker (not print(): Ray Train patches print to emit every
    line twice)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def stream_seed(purpose: str, *key: int) -> int:
    """A seed of its own for each purpose (``"trainer/augment"``) and key (seed, replicate, rank, step...), from
    numpy's SeedSequence: two purposes never share a stream (an arithmetic seed such as seed + step + 1 equals the
    next step's), and a seed derived from the step lets a resumed run draw exactly what an uninterrupted one would,
    on every rank, without RNG state."""
    state = np.random.SeedSequence([zlib.crc32(purpose.encode()), *(int(k) for k in key)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


def save_state(directory: Path, state: dict) -> Path:
    """Write ``state`` to ``directory/state.pt`` via a temporary file and a rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{CHECKPOINT_FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)
    return directory / CHECKPOINT_FILE


def load_state(directory: Path, map_location="cpu") -> dict:
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location=map_location, weights_only=True)


def start_worker(threads: int | None, seed: int, precision: str = "auto") -> Worker:
    """This worker's context, with torch's CPU threads set and the seed that makes every rank build
    identical initial weights; says so once when bf16 on this CPU would be emulated."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    worker = current_worker()
    if precision == "bf16" and worker.device.type == "cpu" and worker.is_main and cpu_bf16_native() is False:
        progress("segsde: this CPU has neither AVX512-BF16 nor AMX, so bf16 runs emulated and slower than "
                 "float32: set precision: fp32 in the profile (or --set precision=fp32)")
    return worker


def cpu_bf16_native(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX flags); None where /proc/cpuinfo is absent."""
    flags = (_cpuinfo() if cpuinfo is None else cpuinfo).split()
    return None if not flags else "avx512_bf16" in flags or "amx_bf16" in flags


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def resume_state(resume_from: str | None, map_location) -> dict | None:
    """The state to continue from: Ray Train's latest checkpoint of this run (after a restart), else the
    checkpoint directory given by the user, else None."""
    from ray.train import Checkpoint

    utils = train_utils()
    checkpoint = (utils.get_checkpoint() if utils else None) or (Checkpoint.from_directory(resume_from) if resume_from else None)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_state(d, map_location=map_location)


def sync_buffers(model: torch.nn.Module, worker: Worker) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics). DDP broadcasts them at the start
    of each forward, but each rank's own training forward then moves them again, so without this the
    ranks would evaluate with slightly different statistics than the checkpoint rank 0 saves."""
    if worker.world > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module, worker: Worker):
    """Rank 0's buffers and eval mode for the block; afterwards each module gets its own mode back (not
    ``model.train()``: a frozen encoder must stay in eval mode)."""
    sync_buffers(model, worker)
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode


class Background:
    """``fn(*args, **kwargs)`` in a daemon thread. ``result()`` waits for it in short joins, so Ctrl-C still reaches
    the main thread, and returns its value or raises what it raised."""

    def __init__(self, fn, *args, name: str = "background", **kwargs):
        import threading

        self._outcome: dict = {}

        def run():
            try:
                self._outcome["result"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the thread that asks for the result
                self._outcome["error"] = exc

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def result(self):
        while self._thread.is_alive():
            self._thread.join(0.2)
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["result"]
