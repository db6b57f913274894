"""Rebuild a component study's tables and figures from MLflow alone (no Ray, no cache directory).

    python mlflow/report.py --tracking-uri sqlite:////abs/outputs/mlflow.db --experiment segsde-study-quick --out report/

Takes the newest study parent run of the experiment (or --parent RUN_ID), its child trial runs (tags
segsde.row / segsde.budget / segsde.seed, metrics final/miou, final/iou/<class> and final/acted/*, the per-image
confusions), and writes what the study writes: study.md, study.parquet, comparison.parquet, trials.parquet,
class_iou.parquet, the bar chart, the forest plot and the heatmaps.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout without installing (mlflow/ has no
# __init__.py, so the installed mlflow package still wins the import)

from segsde.errors import SegSDEError  # noqa: E402


def study_records(uri: str, experiment: str, parent: str | None = None) -> tuple[list[dict], list[str], list[int], str, dict]:
    """(trial records, rows, budgets, parent run id, the study's params) of a study, read from the tracking store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SegSDEError(f"experiment '{experiment}' is not in {uri}: pass the --experiment a study logged to")
    if parent is None:
        parents = client.search_runs([exp.experiment_id], "tags.`segsde.stage` = 'study'", order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise SegSDEError(f"experiment '{experiment}' holds no study parent run: run tune/run_ablation.py first")
        parent = parents[0].info.run_id
    params = client.get_run(parent).data.params
    rows = list(ast.literal_eval(params["study.rows"]))
    budgets = [int(b) for b in ast.literal_eval(params["study.budgets"])]
    records = []
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' and tags.`segsde.stage` = 'train'")
    for run in children:
        tags, metrics = run.data.tags, run.data.metrics
        finished = run.info.status == "FINISHED" and "final/miou" in metrics
        record = {"row": tags["segsde.row"], "budget": int(tags["segsde.budget"]), "seed": int(tags["segsde.seed"]),
                  "miou": metrics["final/miou"] / 100 if finished else None,  # MLflow holds percent, records fractions
                  **({"seconds": (run.info.end_time - run.info.start_time) / 1000} if finished and run.info.end_time else {})}
        record.update({k.removeprefix("final/"): v / 100 for k, v in metrics.items()
                       if k.startswith(("final/iou/", "final/acted/")) or k == "final/teacher_miou"})
        if record["miou"] is not None:
            record["per_image_confusion"] = _confusions(client, run.info.run_id)
        records.append(record)
    return records, rows, budgets, parent, params


def _confusions(client, run_id: str) -> dict | None:
    """The trial's per-image confusion matrices (the report's jackknife over validation images), if it logged them."""
    import json
    import tempfile

    from segsde.trainer.config import CONFUSIONS_FILE

    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, f"final/{CONFUSIONS_FILE}", tmp)).read_text())
        except Exception:  # an older trial, or one whose artifact store is gone: the interval goes over seeds only
            return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True, help="the study's tracking URI (sqlite:////abs/mlflow.db or http://...)")
    parser.add_argument("--experiment", required=True, help="the study's experiment, e.g. segsde-study-quick")
    parser.add_argument("--parent", default=None, help="a study parent run id (default: the newest)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the rebuilt report")
    args = parser.parse_args(argv)
    try:
        from segsde.orchestration.report import write_report

        records, rows, budgets, parent, params = study_records(args.tracking_uri, args.experiment, args.parent)
        per_seed = params.get("study.sde_per_seed")
        pairs = tuple(tuple(p.split(":")) for p in ast.literal_eval(params.get("study.compare", "()")))
        claims = {c["claim"]: list(c["lines"]) for c in ast.literal_eval(params.get("study.claims", "()"))}
        print(write_report(records, rows, budgets, args.out, min_effect=float(params.get("study.min_effect", 1.0)),
                           sde_per_seed=None if per_seed is None else per_seed == "True", pairs=pairs, claims=claims,
                           concurrency=int(params.get("study.concurrency", 1)))[0])
        print(f"report of parent run {parent} ({len(records)} trials) in {args.out}")
    except SegSDEError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
