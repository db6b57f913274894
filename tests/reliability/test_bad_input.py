"""Bad input to the orchestration entry points: one line on stderr naming the problem and the fix, exit
code 2, and nothing written (no MLflow store, no cache, no Optuna store, no Ray started)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tune import run_ablation, run_sweep  # noqa: E402


def _assert_refused(code: int, out: str, err: str, message: str, where: Path) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and out == "", (code, out, err)
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert not where.exists() or not any(where.iterdir()), sorted(where.iterdir())  # nothing half-written


@pytest.mark.parametrize("args,message", [
    (["--rows", "baseline,depthmx"], r"unknown row 'depthmx'.*did you mean 'depthmix'\?"),
    (["--profile", "quik"], r"unknown profile 'quik'.*did you mean 'quick'\?"),
    (["--budgets", "999"], r"budget 999 is larger than the 16 training images.*lower --budgets"),
    (["--rows", "depthmix", "--set", "epsilon=2"], r"epsilon must be in \[0, 1\)"),
    (["--rows", "pseudolabel", "--set", "unsup_weight=-1"], r"loss weights must be finite and >= 0"),
    (["--rows", "depthmix", "--set", "epsilom=0.1"], r"unknown key 'epsilom'.*did you mean 'epsilon'\?"),
    (["--rows", "baseline,classmix", "--compare", "classmix:depthmix"],
     r"--compare classmix:depthmix: give two different rows of the study as A:B, neither of them baseline "
     r"\(every row is compared with it already; its rows: baseline, classmix\)"),
    (["--data-root", "{tmp}/nowhere"], r"nowhere does not exist: build it with `segsde data synth`"),
    (["--data-root", "{tmp}"], r"has no manifest.json.*rebuild it"),
    (["--address", "127.0.0.1:9"], r"cannot reach the Ray cluster at 127.0.0.1:9.*drop --address"),
    (["--tracking-uri", "http://127.0.0.1:9"], r"tracking server at http://127.0.0.1:9 is unreachable.*drop --tracking-uri"),
    (["--tracking-uri", "sqlite:///{tmp}/no/such/dir/mlflow.db"], r"directory that does not exist"),
    (["--storage", "ftp://host/segsde"], r"storage ftp://host/segsde cannot be opened .*use a local path, s3://bucket/prefix"),
    # credentials in a URI are never printed
    (["--storage", "s3://AKIAEXAMPLE:s3cr3t@bucket/x?endpoint_override=http://127.0.0.1:9"],
     r"^run_ablation: error: cannot reach the storage root s3://\*\*\*@bucket/x\?endpoint_override=http://127.0.0.1:9 (?!.*s3cr3t).*check --storage"),
])
def test_study_refuses_bad_input_before_anything_runs(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_ablation.main(["--profile", "smoke", "--rows", "baseline", "--out", str(out), *[a.format(tmp=tmp_path) for a in args]])
    captured = capsys.readouterr()
    _assert_refused(code, captured.out, captured.err, message, out)


@pytest.mark.parametrize("args,message", [
    (["--params", "epsilo"], r"parameter 'epsilo' is not in .*did you mean 'epsilon'\?"),
    (["--row", "depthmx"], r"did you mean 'depthmix'\?"),
    (["--samples", "0"], r"samples, concurrency and workers must be >= 1"),
    (["--tracking-uri", "http://127.0.0.1:9"], r"is unreachable"),
])
def test_sweep_refuses_bad_input_before_anything_runs(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_sweep.main(["--profile", "smoke", "--out", str(out), *args])
    captured = capsys.readouterr()
    _assert_refused(code, captured.out, captured.err, message, out)


@pytest.mark.parametrize("file,edit,message", [
    ("profiles.yaml", lambda text: text.replace("smoke:\n", "smoke:\n  data: {source: synthetic\n", 1),
     r"profiles.yaml is not valid YAML at line \d+: fix the syntax"),
    ("component_study.yaml", lambda text: text + "\n  broken: [unclosed\n", r"component_study.yaml is not valid YAML at line \d+"),
    ("profiles.yaml", lambda text: text.replace("concurrency: 2}", "concurency: 2}", 1),
     r"unknown key 'concurency' in the study section.*did you mean 'concurrency'"),
])
def test_malformed_ablation_files_are_refused(file, edit, message, tmp_path):
    """A copy of ablations/ named by $SEGSDE_ABLATIONS (how users bring their own rows and profiles)."""
    ablations = tmp_path / "ablations"
    shutil.copytree(ROOT / "ablations", ablations)
    (ablations / file).write_text(edit((ablations / file).read_text()))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "tune" / "run_ablation.py"), "--profile", "smoke", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "SEGSDE_ABLATIONS": str(ablations)})
    _assert_refused(proc.returncode, proc.stdout, proc.stderr, message, out)


def test_a_sweep_refuses_a_dataset_without_a_tuning_split(tmp_path):
    """The search scores on the tuning split (the study reports on val): a profile or dataset without one is refused."""
    ablations = tmp_path / "ablations"
    shutil.copytree(ROOT / "ablations", ablations)
    profiles = ablations / "profiles.yaml"
    profiles.write_text(profiles.read_text().replace("val: 8, tune: 8,", "val: 8,", 1))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "tune" / "run_sweep.py"), "--profile", "smoke", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "SEGSDE_ABLATIONS": str(ablations)})
    _assert_refused(proc.returncode, proc.stdout, proc.stderr,
                    r"profile 'smoke' has no 'tune' split for the search to score on.*give its data section a tune size", out)
