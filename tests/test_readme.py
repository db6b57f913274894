import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_second():
    main, tests = _readme_commands()[:2]
    assert "tune/run_ablation.py" in main and "pytest" in tests
    ci = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [tests]


def test_layout_keeps_entry_folders_free_of_packages():
    # an mlflow/__init__.py would shadow the real mlflow package; tune/ holds plain scripts
    assert not (ROOT / "mlflow" / "__init__.py").exists() and not (ROOT / "tune" / "__init__.py").exists()
