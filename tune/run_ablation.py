"""The component study on the embedded default (the synthetic testbed, `quick` profile, local Ray): `segsde study`.
Every flag of `segsde study --help` works here too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from segsde.cli import main as segsde  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return segsde(["study", *(sys.argv[1:] if argv is None else argv)], prog="run_ablation")


if __name__ == "__main__":
    sys.exit(main())
