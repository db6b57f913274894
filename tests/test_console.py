"""The study's live view: what it shows for a board snapshot (the loops' posts), without a terminal."""

from pathlib import Path

from rich.console import Console

from segsde.orchestration.console import StudyConsole


def test_the_view_shows_stages_and_trials_with_steps_miou_and_eta(tmp_path: Path):
    view = StudyConsole(tmp_path / "study.log", "study")
    view.t0 = 1000.0
    view.watch({"k1": "baseline-b32-s0", "k2": "mtl-b32-s0", "k3": "depthmix-b32-s0"})
    view.items = {
        "sde-0123456789ab": {"first": {"step": 0, "time": 1000.0}, "step": 140, "total": 280, "time": 1140.0},
        "k1": {"first": {"step": 0, "time": 1000.0}, "step": 150, "total": 150, "miou": 0.2069, "final": True, "time": 1060.0},
        "k2": {"first": {"step": 0, "time": 1100.0}, "step": 50, "total": 150, "time": 1200.0},
    }
    rows = view.rows()
    assert rows[0] == ("sde-0123456789ab", "running", "140/280", "", "2m20s")  # 1 step/s, 140 to go
    assert rows[1] == ("baseline-b32-s0", "done", "150/150", "20.69", "")
    assert rows[2] == ("mtl-b32-s0", "running", "50/150", "", "3m20s")
    assert rows[3] == ("depthmix-b32-s0", "waiting", "", "", "")
    console = Console(record=True, width=120)
    console.print(view._view())
    text = console.export_text()
    assert "[study] " in text and "1/3 trials done, running:" in text and "mtl-b32-s0 50/150" in text
    assert "│ mtl-b32-s0 " in text and "3m20s" in text
