import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "tune" / "run_ablation.py"), *map(str, args)], capture_output=True, text=True)


def test_run_ablation_caches_data_sde_export_selection_and_baseline(tmp_path):
    first = _run("--profile", "smoke", "--out", tmp_path)
    assert first.returncode == 0, first.stderr
    assert "[sde] done in" in first.stdout and "[export] wrote the pseudo-depth of 24 images" in first.stdout
    sde_dirs = list((tmp_path / "cache").glob("sde-*"))
    assert len(sde_dirs) == 1 and (sde_dirs[0] / "model.pt").is_file()
    assert (tmp_path / "mlflow.db").is_file()  # one tracking store for the whole study
    assert "[select] 'sde' chose 4 of 16 images" in first.stdout
    assert len(list((tmp_path / "cache").glob("select-sde-s0-*.parquet"))) == 1

    again = _run("--profile", "smoke", "--out", tmp_path)
    assert again.returncode == 0, again.stderr
    assert "[train] done in" in first.stdout and "baseline mIoU" in first.stdout
    for stage in ("[data] cache hit", "[sde] cache hit", "[export] cache hit", "[select] cache hit", "[train] cache hit"):
        assert stage in again.stdout
    assert "[sde] training" not in again.stdout

    dry = _run("--profile", "smoke", "--out", tmp_path, "--force", "sde", "--dry-run")
    assert dry.returncode == 0 and "[sde] would train 5 steps" in dry.stdout
