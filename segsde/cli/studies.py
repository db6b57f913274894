"""``segsde study`` (the component study; `tune/run_ablation.py`) and ``segsde sweep`` (Optuna sweeps;
`tune/run_sweep.py`). Both print their tables and return an exit code: 1 when a trial failed."""

from __future__ import annotations

from pathlib import Path

from segsde.cli.flags import int_list, name_list, orchestration_flags, profile_flags

RESUMABLE = ("its MLflow runs are KILLED, and a rerun with --resume goes on from the cached stages and the trials' "
             "checkpoints")


def cmd_study(args) -> int:
    import contextlib
    import time

    from segsde.orchestration.console import StudyConsole
    from segsde.orchestration.study import run_study, study_config

    cfg = study_config(args.profile, sets=dict(args.set), rows=args.rows, budgets=args.budgets, seeds=args.seeds,
                       concurrency=args.concurrency, workers=args.workers, gpu=args.gpu, data_seed=args.data_seed,
                       min_effect=args.min_effect, sde_per_seed=args.sde_per_seed, compare=args.compare)
    if args.plan:
        from segsde.orchestration.planning import plan_study

        plan_study(cfg, args.out, storage=args.storage, data_root=args.data_root)
        return 0
    quiet = not (args.verbose or args.dry_run)
    console = StudyConsole(args.out.absolute() / "logs" / f"study-{time.strftime('%Y%m%d-%H%M%S')}.log", "study") if quiet else None
    with console or contextlib.nullcontext():
        result = run_study(cfg, args.out, data_root=args.data_root, storage=args.storage, force=tuple(args.force),
                           address=args.address, tracking_uri=args.tracking_uri, experiment=args.experiment, resume=args.resume,
                           dry_run=args.dry_run, console=console, keep_checkpoints=args.keep_checkpoints)
    return 1 if result.get("failed") else 0  # the table is printed either way, failed cells marked


def cmd_sweep(args) -> int:
    import contextlib
    import time

    from segsde.orchestration.console import StudyConsole
    from segsde.orchestration.sweep import run_sweep, sweep_config

    cfg = sweep_config(args.profile, sets=dict(args.set), row=args.row, budgets=args.budgets, samples=args.samples,
                       params=args.params, seed=args.seed, confirm_top=args.confirm_top, confirm_seeds=args.confirm_seeds,
                       sampler=args.sampler, asha=args.asha, grid_points=args.grid_points,
                       concurrency=args.concurrency, workers=args.workers, gpu=args.gpu)
    quiet = not args.verbose
    console = StudyConsole(args.out.absolute() / "logs" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}.log", "sweep") if quiet else None
    with console or contextlib.nullcontext():
        run_sweep(cfg, args.out, data_root=args.data_root, storage=args.storage, address=args.address, tracking_uri=args.tracking_uri,
                  experiment=args.experiment, resume=args.resume, keep_checkpoints=args.keep_checkpoints, console=console)
    return 0


def cmd_report(args) -> int:
    from segsde.orchestration.report import rebuild_report

    text, _ = rebuild_report(args.source, args.out)
    print(text)
    print(f"[report] rebuilt from {args.source / 'trials.parquet'} into {args.out or args.source}")
    return 0


def add_study_commands(sub) -> None:
    from segsde.orchestration.keys import STAGES

    study = sub.add_parser("study", help="the component study: rows x budgets x seeds over cached stages, on Ray Tune",
                           description="Run the component study as a DAG of cached stages: dataset -> SDE pre-training -> "
                                       "pseudo-depth export -> data selections -> trials (a Ray Tune grid of Ray Train jobs) -> "
                                       "the report (terminal, MLflow parent run, Markdown, Parquet and figures).")
    profile_flags(study, "epsilon=0.05", "a trainer setting of every trial")
    study.add_argument("--rows", type=name_list, default=None, help="comma-separated rows of ablations/component_study.yaml (default: the profile's)")
    study.add_argument("--seeds", type=int_list, default=None, help="trial seeds, e.g. 0,1,2 (default: the profile's)")
    study.add_argument("--data-seed", type=int, default=None, help="seed of the testbed dataset (default 0)")
    study.add_argument("--sde-per-seed", action="store_true", default=None,
                       help="train one SDE model per seed, paired with that seed's trials (default: the profile's)")
    orchestration_flags(study, "segsde-study-PROFILE", "continue an interrupted study (so does a plain rerun: finished stages "
                        "and trials are cached, interrupted ones go on from their checkpoints)")
    study.add_argument("--force", action="append", default=[], choices=STAGES, help="recompute a stage (repeatable)")
    study.add_argument("--dry-run", action="store_true", help="print the stages and trials with their cache hits, run nothing")
    study.add_argument("--plan", action="store_true",
                       help="print the seeds each row needs to find --min-effect at 80 %% power (from the finished trials' noise) "
                            "and their compute, run nothing")
    study.add_argument("--min-effect", type=float, default=None,
                       help="the smallest difference to Baseline worth finding, in mIoU points (default: the profile's, else 1)")
    study.add_argument("--compare", type=name_list, default=None, metavar="A:B,...",
                       help="also compare these rows with each other, A against B, paired over seeds and in the family "
                            "Holm corrects (default: the profile's)")
    study.add_argument("--verbose", action="store_true",
                       help="print Ray's and Tune's own output and every line of the study here (default: a live view, the "
                            "rest in OUT/logs/)")
    study.set_defaults(func=cmd_study, interrupted=RESUMABLE)

    report = sub.add_parser("report", help="a study's tables and figures again, from its report folder's trials.parquet",
                            description="Rebuild study.md, study.html, the Parquet tables and the figures of a study's report "
                                        "(the comparisons, the claims, the SDE models' check) from the trials.parquet it wrote, "
                                        "e.g. the published docs/evidence; needs neither the storage root nor Ray.")
    report.add_argument("--from", dest="source", type=Path, required=True, help="a report folder (OUT/study/<profile>-<key>)")
    report.add_argument("--out", type=Path, default=None, help="where to write (default: the --from folder)")
    report.set_defaults(func=cmd_report)

    sweep = sub.add_parser("sweep", help="Optuna sweeps of one row's settings on Ray Tune, one study per budget",
                           description="Per labeled budget: one Tuner, one Optuna study (TPE, persisted in OUT/optuna.db, the "
                                       "row's own values as the first trial), ASHA early stopping on validation mIoU (stopped "
                                       "trials are PRUNED in Optuna), and one MLflow parent run with a child run per trial.")
    profile_flags(sweep, "steps=300", "a trainer setting that is not swept")
    sweep.add_argument("--row", default=None, help="the component-study row to tune (default: the profile's)")
    sweep.add_argument("--samples", type=int, default=None, help="trials per budget")
    sweep.add_argument("--params", type=name_list, default=None,
                       help="comma-separated keys of ablations/sweep_space.yaml (default: what the row uses)")
    sweep.add_argument("--seed", type=int, default=None, help="trial and sampler seed")
    sweep.add_argument("--sampler", choices=("tpe", "gp", "random", "grid"), default=None,
                       help="Optuna's sampler (default: the profile's, else tpe; gp fits the trials' noise)")
    sweep.add_argument("--grid-points", type=int, default=None, help="values per parameter of --sampler grid (default 3)")
    sweep.add_argument("--no-asha", dest="asha", action="store_false", default=None,
                       help="run every trial's whole schedule (default: ASHA stops weak trials at its rungs)")
    sweep.add_argument("--confirm-top", type=int, default=None,
                       help="the best settings confirmed against the row's defaults on fresh seeds (default: the profile's, else 3)")
    sweep.add_argument("--confirm-seeds", type=int, default=None,
                       help="fresh seeds of the confirmation, SEED+1 on (default: the profile's, else 3; 0: no confirmation)")
    orchestration_flags(sweep, "segsde-sweep-PROFILE", "continue this sweep's Optuna studies: interrupted trials go on from "
                        "their last checkpoint")
    sweep.add_argument("--verbose", action="store_true",
                       help="print Ray's and Tune's own output and every line of the sweep here (default: a live view of the "
                            "trials, the rest in OUT/logs/)")
    sweep.set_defaults(func=cmd_sweep, interrupted=RESUMABLE)
