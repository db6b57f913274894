"""Screenshot the MLflow UI of a study (the picture in the README): the study run's page, reached by the README's
route (the experiment's runs in the model-training view, one click on the study run), whose description is the report.

    python docs/screenshot_mlflow.py --out-dir outputs --experiment segsde-study-quick

Starts `mlflow server` on the study's store (127.0.0.1, a free port), follows that route in headless Chromium
through Playwright, and writes docs/mlflow_study.png. Needs `pip install -e ".[dev]"` and a Chromium binary (Debian: `apt-get install
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
        sys.exit(f"screenshot_mlflow: error: no experiment '{experiment}' in {uri}: run tune/run_ablation.py first")
    parents = client.search_runs([exp.experiment_id], "tags.`segsde.stage` = 'study'", order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        sys.exit(f"screenshot_mlflow: error: experiment '{experiment}' has no study parent run")
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
    sys.exit(f"screenshot_mlflow: error: the MLflow server did not answer at {url} within {seconds:.0f} s")


def ui_step(action) -> None:
    try:
        action()
    except Exception as exc:  # a UI version without that control: keep the page as it is
        print(f"screenshot_mlflow: skipped a UI step ({type(exc).__name__})", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("outputs"), help="the study's --out (mlflow.db and mlartifacts/)")
    parser.add_argument("--experiment", default="segsde-study-quick")
    parser.add_argument("--png-dir", type=Path, default=Path("docs"), help="where mlflow_study.png goes")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1400)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    out = args.out_dir.absolute()
    experiment_id, parent, runs = trial_runs(f"sqlite:///{out / 'mlflow.db'}", args.experiment)
    name = args.experiment.replace("segsde-study-", "study-")
    args.png_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{out / 'mlflow.db'}",
                               "--artifacts-destination", str(out / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/health")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            # the README's route, as tests/test_mlflow_ui.py follows it: the runs page, one click on the study run
            page.goto(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning", wait_until="load")
            page.get_by_role("link", name=name, exact=True).first.click(timeout=60_000)
            page.get_by_text("Component study").first.wait_for(timeout=60_000)  # the description: the report
            ui_step(lambda: page.get_by_role("button", name=re.compile("close", re.I)).last.click(timeout=5000))  # the assistant
            ui_step(lambda: page.get_by_text("Show more").first.click(timeout=5000))
            page.wait_for_timeout(3000)
            page.screenshot(path=str(args.png_dir / "mlflow_study.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps({"pngs": [str(args.png_dir / "mlflow_study.png")], "runs": len(runs), "experiment_id": experiment_id,
                      "study_run": parent}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
