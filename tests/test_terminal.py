"""A study as a researcher sees it in a terminal: run under a pseudo-terminal (so the live view is on, as in a shell),
its output replayed through a terminal emulator (pyte) of 160x45 with scrollback. What stays on the screen is the
study's own lines and its table; Ray's forwarded worker lines and Python warnings are in the log file it names."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyte

ROOT = Path(__file__).resolve().parent.parent
COLUMNS, LINES = 160, 45


def run_in_terminal(args: list[str], timeout: float = 600) -> tuple[int, bytes]:
    """Run ``args`` with a pseudo-terminal of COLUMNS x LINES as stdin, stdout and stderr; its exit code and every byte it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(LINES)}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    written, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not chunk:
                break
            written += chunk
        return proc.wait(timeout=max(deadline - time.monotonic(), 1)), bytes(written)
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


def screen_lines(written: bytes) -> list[str]:
    """What the terminal shows after the run, scrollback included, without blank lines."""
    screen = pyte.HistoryScreen(COLUMNS, LINES, history=100_000)
    screen.set_mode(pyte.modes.LNM)  # a pty's onlcr: "\n" starts a new line
    pyte.ByteStream(screen).feed(written)
    scrolled = ["".join(line[x].data for x in range(COLUMNS)) for line in screen.history.top]
    return [line.rstrip() for line in scrolled + screen.display if line.strip()]


def test_a_study_on_a_tty_shows_its_own_lines_and_keeps_the_workers_output_in_its_log(tmp_path):
    code, written = run_in_terminal([sys.executable, str(ROOT / "tune" / "run_ablation.py"), "--profile", "smoke",
                                     "--rows", "baseline", "--seeds", "0,1", "--out", str(tmp_path)])
    lines = screen_lines(written)
    shown = "\n".join(lines)
    assert code == 0, shown[-3000:]
    assert any(line.startswith("| baseline | ") for line in lines) and "[trial] baseline-b4-s1 done: mIoU " in shown
    for noise in ("pid=", "Checkpoint successfully", "Reporting training result", "Warning", "[train] step", "[sde] done",
                  "Traceback"):
        assert noise not in shown, f"{noise!r} reached the terminal:\n{shown[-3000:]}"
    assert len(lines) < 40, shown
    log = next((tmp_path / "logs").glob("study-*.log")).read_text()
    assert f"output: {tmp_path / 'logs'}" in shown
    assert "pid=" in log and "[train] step" in log  # the workers' lines are kept, in the log file
    assert "interpreted in multiple ways" not in log  # the trials name their dataset's source unambiguously
