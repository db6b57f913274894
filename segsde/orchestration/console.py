"""What a study or sweep shows in the terminal: its own lines, one live view of the jobs (stages and trials, from
``segsde.progress``'s board) and, at the end, its table. Everything Ray and Tune print, from this process and
from the processes Ray starts, goes to a log file instead. ``--verbose`` (no console) shows all of it.

Where the terminal is not a TTY (CI, ``nohup``) the live view becomes a status line a minute and a line per
finished trial."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

QUIET_PREFIXES = ("[trial] ",)  # planning lines, one per trial: the view shows the trials
STATUS_EVERY_S = 60.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StudyConsole:
    """Callable as a ``log``. Until ``start`` (input checks, dry runs) it prints as ``print`` does."""

    def __init__(self, log_file: Path, title: str):
        self.log_file, self.title = Path(log_file), title
        self.names: dict[str, str] = {}      # board key -> trial name, in plan order
        self.items: dict[str, dict] = {}     # the board's last snapshot
        self.finished: set[str] = set()
        self.started = self.t0 = None
        self._stop, self._lock = threading.Event(), threading.Lock()

    # -- lines -----------------------------------------------------------------------------------------------
    def __call__(self, text: str) -> None:
        print(text, flush=True)  # once started, the log file keeps every line
        if self.started is not None and (not text.startswith(QUIET_PREFIXES) or "FAILED" in text):
            self._say(text)

    def _say(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.terminal.write(text + "\n")
            self.terminal.flush()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """From here on fds 1 and 2 (and so the processes Ray starts after this) write to a temporary file, which
        ``keep`` makes the log file once the run is real: input refused before that leaves nothing behind."""
        import tempfile

        from rich.console import Console
        from rich.live import Live

        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self._log = tempfile.TemporaryFile("w+", buffering=1)
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        self.terminal = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        self.started = self.t0 = time.time()
        self.live, self.tty = None, self.terminal.isatty()
        if self.tty:
            # rich redirects sys.stdout/stderr above the view by default, which would bring Ray's forwarded worker lines
            # and Python warnings back to the terminal: they belong in the log file that fds 1 and 2 go to
            self.live = Live(console=Console(file=self.terminal), get_renderable=self._view, refresh_per_second=2, transient=True,
                             redirect_stdout=False, redirect_stderr=False)
            self.live.start()
        self._poller = threading.Thread(target=self._poll, name="segsde-console", daemon=True)
        self._poller.start()

    def keep(self) -> None:
        """Move what was written so far into the log file, and write there from now on."""
        if self.started is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        kept = open(self.log_file, "a", buffering=1)
        self._log.seek(0)
        kept.write(self._log.read())
        os.dup2(kept.fileno(), 1)
        os.dup2(kept.fileno(), 2)
        self._log.close()
        self._log = kept
        self._say(f"[{self.title}] Ray's and Tune's own output: {self.log_file} (--verbose shows it here)")

    def watch(self, names: dict[str, str]) -> None:
        """The trials to show besides those already shown: {board key: name}."""
        self.names.update(names)

    def finish(self) -> None:
        """Stop the live view and the status lines, so that the table printed next stays on the screen."""
        if self.started is not None and not self._stop.is_set():
            self._refresh()
        self._stop.set()
        if self.started is not None and self.live is not None:
            self.live.stop()
            self.live = None

    def close(self) -> None:
        if self.started is None:
            return
        self._stop.set()
        self.finish()
        import ray

        if ray.is_initialized():  # while its output still goes to the log file
            ray.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self.terminal.close()
        self._log.close()
        self.started = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the board -------------------------------------------------------------------------------------------
    def _poll(self) -> None:
        last_status = time.time()
        while not self._stop.wait(2.0):
            self._refresh()
            if not self.tty and time.time() - last_status >= STATUS_EVERY_S:
                last_status = time.time()
                self._say(self.status_line())

    def _refresh(self) -> None:
        """Read the board; say once for every trial that finished."""
        try:
            import ray

            from segsde.progress import BOARD

            if not ray.is_initialized():  # never start Ray from here: get_actor would, with the wrong settings
                return
            items = ray.get(ray.get_actor(BOARD).snapshot.remote(), timeout=5)
        except Exception:  # no board yet (Ray starting), or none any more (shutting down)
            return
        with self._lock:
            self.items = items
            for key, item in items.items():
                if item.get("final") and key in self.names and key not in self.finished:
                    self.finished.add(key)
                    self._say(f"[trial] {self.names[key]} done: mIoU {100 * item.get('miou', float('nan')):.2f} "
                              f"in {_duration(item['time'] - item['first']['time'])}")

    def rows(self, now: float | None = None) -> list[tuple[str, str, str, str, str]]:
        """(job, state, progress, mIoU, ETA) for every stage job that posted and every watched trial."""
        now = now or time.time()
        out = []
        keys = [k for k in self.items if k not in self.names] + list(self.names)
        for key in keys:
            item = self.items.get(key)
            name = self.names.get(key, key)
            if item is None:
                out.append((name, "waiting", "", "", ""))
                continue
            step, total = item.get("step", 0), item.get("total", 0)
            state = "done" if item.get("final") or (total and step >= total) else "running"
            first = item["first"]
            rate = (step - first.get("step", 0)) / max(item["time"] - first["time"], 1e-9)
            eta = _duration((total - step) / rate) if state == "running" and rate > 0 else ""
            miou = f"{100 * item['miou']:.2f}" if "miou" in item else ""
            out.append((name, state, f"{step}/{total}" if total else "", miou, eta))
        return out

    def status_line(self) -> str:
        rows = self.rows()
        trials = [r for r in rows if r[0] in self.names.values()]
        running = [f"{r[0]} {r[2]}" for r in rows if r[1] == "running"]
        done = sum(r[1] == "done" for r in trials)
        return (f"[{self.title}] {_duration(time.time() - self.t0)}: {done}/{len(trials)} trials done"
                + (f", running: {', '.join(running)}" if running else ""))

    def _view(self):
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(self.status_line()), title_justify="left", expand=False)  # Text: "[study]" is no markup
        for column in ("job", "state", "step", "mIoU", "ETA"):
            table.add_column(column, justify="left" if column in ("job", "state") else "right")
        for row in self.rows():
            table.add_row(*row, style={"running": "bold", "waiting": "dim"}.get(row[1], ""))
        return table
