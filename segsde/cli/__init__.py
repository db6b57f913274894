"""The ``segsde`` command: datasets, SDE pre-training, one trial, data selection, the study and sweeps.

Every problem with the user's input ends as one line on stderr and exit code 2; Ctrl-C as one line and exit 130."""

from __future__ import annotations

import argparse
import json
import sys

from segsde.cli.data import add_data_commands
from segsde.cli.jobs import add_job_commands
from segsde.cli.studies import add_study_commands
from segsde.errors import SegSDEError


def build_parser(prog: str = "segsde") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_commands(sub)
    add_job_commands(sub)
    add_study_commands(sub)
    return parser


def main(argv: list[str] | None = None, prog: str = "segsde") -> int:
    """Run one subcommand. A job's result is printed as one JSON line; a study or sweep prints its own tables and
    gives its exit code. ``prog`` names the command in error lines (`tune/*.py` pass their own name)."""
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except SegSDEError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {getattr(args, 'interrupted', 'nothing was left half-written')}", file=sys.stderr)
        return 130
    if isinstance(result, int):
        return result
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
