"""Optuna sweeps of one row on Ray Tune (embedded default: the testbed, `quick` profile, local Ray): `segsde sweep`.
Every flag of `segsde sweep --help` works here too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from segsde.cli import main as segsde  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return segsde(["sweep", *(sys.argv[1:] if argv is None else argv)], prog="run_sweep")


if __name__ == "__main__":
    sys.exit(main())
