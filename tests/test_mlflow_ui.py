"""A study as a researcher sees it: in a terminal, and in the MLflow UI.

The smoke study runs once under a pseudo-terminal (so the live view is on, as in a shell), its output replayed
through a terminal emulator (pyte) of 160x45 with scrollback: what stays on the screen is the study's own lines and
its table; Ray's forwarded worker lines and Python warnings are in the log file it names. Then a real MLflow server
on its store and headless Chromium (Debian's, through Playwright) follow the README's route: the experiment's runs
page in the model-training view, one click on the study run, whose description shows every trial's mIoU."""

import contextlib
import fcntl
import os
import pty
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pyte
import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
COLUMNS, LINES = 160, 45
CHROMIUM = "/usr/bin/chromium"


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


@pytest.fixture(scope="module")
def study_in_terminal(tmp_path_factory):
    """The smoke study (Baseline, seeds 0 and 1) run in a terminal: (out, exit code, the screen's lines)."""
    out = tmp_path_factory.mktemp("terminal")
    code, written = run_in_terminal([sys.executable, str(ROOT / "tune" / "run_ablation.py"), "--profile", "smoke",
                                     "--rows", "baseline", "--seeds", "0,1", "--out", str(out)])
    return out, code, screen_lines(written)


def test_a_study_on_a_tty_shows_its_own_lines_and_keeps_the_workers_output_in_its_log(study_in_terminal):
    out, code, lines = study_in_terminal
    shown = "\n".join(lines)
    assert code == 0, shown[-3000:]
    assert any(line.startswith("| baseline | ") for line in lines) and "[trial] baseline-b4-s1 done: mIoU " in shown
    for noise in ("pid=", "Checkpoint successfully", "Reporting training result", "Warning", "[train] step", "[sde] done",
                  "Traceback"):
        assert noise not in shown, f"{noise!r} reached the terminal:\n{shown[-3000:]}"
    assert len(lines) < 45, shown
    log = next((out / "logs").glob("study-*.log")).read_text()
    assert f"output: {out / 'logs'}" in shown
    assert "pid=" in log and "[train] step" in log  # the workers' lines are kept, in the log file
    assert "interpreted in multiple ways" not in log  # the trials name their dataset's source unambiguously
    assert "#/experiments/" in shown and "workflowType=machine_learning" in shown  # where to look in MLflow


def test_a_sweep_on_a_tty_shows_its_trials_and_its_confirmation_not_the_workers_output(tmp_path):
    code, written = run_in_terminal([sys.executable, str(ROOT / "tune" / "run_sweep.py"), "--profile", "smoke", "--samples", "2",
                                     "--out", str(tmp_path)])
    lines = screen_lines(written)
    shown = "\n".join(lines)
    assert code == 0, shown[-3000:]
    assert "[sweep] confirming defaults, t1 on seeds [1, 2]" in shown and "Confirmation at 4 labels on fresh seeds 1, 2" in shown
    assert any(line.startswith("| defaults | ") for line in lines) and "[sweep] the settings for a study: " in shown
    assert f"output: {tmp_path / 'logs'}" in shown
    for noise in ("pid=", "Checkpoint successfully", "Warning", "[train] step", "Traceback"):
        assert noise not in shown, f"{noise!r} reached the terminal:\n{shown[-3000:]}"
    assert "[train] step" in next((tmp_path / "logs").glob("sweep-*.log")).read_text()


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="Debian's chromium is not installed: apt-get install chromium "
                                                           "(the README's test command does where it may)")
def test_the_mlflow_ui_shows_every_trials_miou_one_click_from_the_experiments_runs(study_in_terminal, tmp_path):
    from playwright.sync_api import sync_playwright

    out, code, _ = study_in_terminal
    assert code == 0
    uri = f"sqlite:///{out / 'mlflow.db'}"
    experiment = MlflowClient(uri).get_experiment_by_name("segsde-study-smoke")
    trials = pd.read_parquet(next((out / "study").iterdir()) / "trials.parquet")
    with mlflow_server(out) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # the README's route: the experiment's runs (the model-training view), then the study run
        page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning", wait_until="load")
        page.get_by_role("link", name="study-smoke", exact=True).first.click(timeout=60_000)
        page.get_by_text("Every trial's mIoU (%) at 4 labels, by seed").first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "study_run.png"), full_page=True)
        text = page.inner_text("body")
        # the report page as MLflow's artifact viewer shows it, about 900 pixels wide: the page itself never scrolls sideways
        page.set_viewport_size({"width": 900, "height": 1000})
        page.goto((next((out / "study").iterdir()) / "study.html").as_uri(), wait_until="load")
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
        browser.close()
    assert widths[0] <= widths[1], widths
    assert headings and not any(h.endswith(".png") for h in headings), headings  # titles, not file names
    assert "Component study" in text and "Against Baseline at 4 labels" in text  # the description: the report's tables
    for trial in trials.itertuples():
        assert f"{trial.miou:.2f}" in text, (trial.row, trial.seed, trial.miou)


@contextlib.contextmanager
def mlflow_server(out: Path):
    """``mlflow server`` on the study's store and artifacts, on a free local port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{out / 'mlflow.db'}",
                               "--artifacts-destination", str(out / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the MLflow server did not start"
                time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
