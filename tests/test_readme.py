import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, re.DOTALL)


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_second():
    main, tests = _readme_commands()[:2]
    assert "tune/run_ablation.py" in main and "pytest" in tests
    ci = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [tests]


def test_layout_keeps_entry_folders_free_of_packages():
    # an mlflow/__init__.py would shadow the real mlflow package; tune/ holds plain scripts
    assert not (ROOT / "mlflow" / "__init__.py").exists() and not (ROOT / "tune" / "__init__.py").exists()


def _command_lines() -> list[str]:
    """Every command of the README's bash blocks after the two set-up ones, continuation lines joined."""
    lines = []
    for block in _readme_commands()[2:]:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_every_readme_command_names_real_flags_and_the_study_commands_plan_as_written(tmp_path):
    """segsde and tune/*.py commands parse with the real parser; the study commands run as dry runs; scripts exist
    and know their flags (the launch commands are checked by test_launch_files.py)."""
    import shlex
    import subprocess
    import sys

    from segsde.cli import build_parser

    checked = 0
    for line in _command_lines():
        words = shlex.split(line.replace("$PWD", str(tmp_path)))
        if words[0] == "segsde" or words[:2] in (["python", "tune/run_ablation.py"], ["python", "tune/run_sweep.py"]):
            command = words[1:] if words[0] == "segsde" else [{"tune/run_ablation.py": "study", "tune/run_sweep.py": "sweep"}[words[1]],
                                                              *words[2:]]
            build_parser().parse_args(command)  # exits (SystemExit) on a flag that does not exist
            checked += 1
            if command[0] == "study":
                dry = [a for a in command[1:] if a != "--dry-run"] + ["--dry-run", "--out", str(tmp_path / "out")]
                proc = subprocess.run([sys.executable, str(ROOT / "tune" / "run_ablation.py"), *dry], capture_output=True,
                                      text=True, cwd=ROOT)
                assert proc.returncode == 0 and "nothing was run" in proc.stdout, (line, proc.stderr[-2000:])
        elif words[0] == "python":
            script = ROOT / words[1]
            helptext = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT).stdout
            assert all(w.split("=")[0] in helptext for w in words[2:] if w.startswith("--")), line
            checked += 1
    assert checked >= 8, checked


def test_the_readme_is_a_guide_not_a_diary():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for diary in ("session", "Before that", "Earlier measurements", "was 0.", "2026-"):
        assert diary not in text, diary


def test_the_published_evidence_rebuilds_and_the_readme_shows_its_numbers(tmp_path):
    """docs/evidence is what `segsde report --from` needs: the report it rebuilds is the published one, and every row
    of the README's results table carries that report's mean, sd, Δ, interval and Holm p."""
    import subprocess
    import sys

    import pandas as pd

    published = ROOT / "docs" / "evidence"
    proc = subprocess.run([sys.executable, "-m", "segsde.cli", "report", "--from", str(published), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "study.md").read_text() == (published / "study.md").read_text()
    assert (tmp_path / "forest.png").stat().st_size > 10_000

    readme = (ROOT / "README.md").read_text()
    comparison = pd.read_parquet(published / "comparison.parquet")
    lines = comparison[comparison.reference.isin(["baseline", ""]) | comparison.reference.isna()]
    assert len(lines) == 12
    for c in lines.itertuples():
        shown = f"| {c.row}" + (" (" if c.control else " |")
        row = next(ln for ln in readme.splitlines() if ln.startswith(shown))
        assert f"{c.mean:.2f} ± {c.sd:.2f}" in row, row
        if c.reference == "baseline":
            p = "< 0.001" if c.p_holm < 0.001 else f"{c.p_holm:.3f}"
            assert f"| {c.delta:+.2f} | [{c.ci_low:+.2f}, {c.ci_high:+.2f}] | {p} | {c.verdict} |" in row, row
