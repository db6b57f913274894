"""Screenshot the MLflow UI of a study (the pictures in the README): the parent run's page, whose description is
the study table, and the compare view of its trial runs.

    python docs/screenshot_compare.py --out-dir outputs --experiment segsde-study-quick

Starts `mlflow server` on the study's store (127.0.0.1, a free port), opens the newest study parent run and the
compare view of its trial children in headless Chromium through Playwright, and writes docs/mlflow_study.png and
docs/mlflow_compare.png. Needs `pip install -e ".[docs]"` and a Chromium binary (Debian: `apt-get install
chromium`; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def trial_runs(uri: str, experiment: str) -> tuple[str, str, list[str]]:
    """(experiment id, the newest study parent run, its trial run ids ordered by row)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"screenshot_compare: error: no experiment '{experiment}' in {uri}: run tune/run_ablation.py first")
    parents = client.search_runs([exp.experiment_id], "tags.`segsde.stage` = 'study'", order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        sys.exit(f"screenshot_compare: error: experiment '{experiment}' has no study parent run")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}' and tags.`segsde.stage` = 'train'")
    return exp.experiment_id, parents[0].info.run_id, [r.info.run_id for r in sorted(children, key=lambda r: r.data.tags.get("segsde.row", ""))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"screenshot_compare: error: the MLflow server did not answer at {url} within {seconds:.0f} s")


def ui_step(action) -> None:
    try:
        action()
    except Exception as exc:  # a UI version without that control: keep the page as it is
        print(f"screenshot_compare: skipped a UI step ({type(exc).__name__})", file=sys.stderr)


def tidy(page) -> None:
    """Close the assistant side panel, plot row -> final mIoU, show only the parameters that differ."""
    def pick(index: int, text: str) -> None:
        box = page.get_by_role("combobox").nth(index)
        box.click(timeout=5000)
        box.fill(text)
        page.keyboard.press("Enter")
        page.keyboard.press("Escape")

    for action in (lambda: page.get_by_role("button", name="Close").first.click(timeout=5000),
                   lambda: page.get_by_text("Clear All").first.click(timeout=5000),
                   lambda: pick(0, "row"), lambda: pick(1, "final/miou"),
                   lambda: page.get_by_text("Show diff only").first.click(timeout=5000)):
        ui_step(action)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("outputs"), help="the study's --out (mlflow.db and mlartifacts/)")
    parser.add_argument("--experiment", default="segsde-study-quick")
    parser.add_argument("--png-dir", type=Path, default=Path("docs"), help="where mlflow_study.png and mlflow_compare.png go")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1400)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    out = args.out_dir.absolute()
    experiment_id, parent, runs = trial_runs(f"sqlite:///{out / 'mlflow.db'}", args.experiment)
    args.png_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{out / 'mlflow.db'}",
                               "--artifacts-destination", str(out / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/health")
        query = urllib.parse.urlencode({"runs": json.dumps(runs), "experiments": json.dumps([experiment_id])})
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            run_page = f"{base}/#/experiments/{experiment_id}/runs/{parent}"
            page.goto(run_page, wait_until="load")
            page.get_by_text("Component study").first.wait_for(timeout=60_000)  # the description: the study table
            ui_step(lambda: page.get_by_text("Model training", exact=True).first.click(timeout=5000))  # MLflow's mode switch
            page.goto(run_page, wait_until="load")
            page.get_by_text("Component study").first.wait_for(timeout=60_000)
            ui_step(lambda: page.get_by_text("Show more").first.click(timeout=5000))
            ui_step(lambda: page.get_by_role("button", name=re.compile("close", re.I)).last.click(timeout=5000))  # the assistant
            page.wait_for_timeout(3000)
            page.screenshot(path=str(args.png_dir / "mlflow_study.png"), full_page=True)
            page.goto(f"{base}/#/compare-runs?{query}", wait_until="load")
            page.get_by_text("Parameters").first.wait_for(timeout=60_000)
            tidy(page)
            page.wait_for_timeout(5000)  # the plots render after the tables
            page.screenshot(path=str(args.png_dir / "mlflow_compare.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps({"pngs": [str(args.png_dir / n) for n in ("mlflow_study.png", "mlflow_compare.png")], "runs": len(runs),
                      "experiment_id": experiment_id}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
