import pytest
from conftest import run_cli

from segsde.data.splits import import_split_file, random_order, read_order, take_budget, write_order
from segsde.errors import SegSDEError


def test_random_order_is_seeded_and_independent_of_input_order():
    ids = [f"s{i:03d}" for i in range(50)]
    a = random_order(ids, 7)
    assert a == random_order(list(reversed(ids)), 7) and sorted(a) == ids
    assert a != random_order(ids, 8)
    assert take_budget(a, 10) == a[:10] and take_budget(a, 20)[:10] == take_budget(a, 10)


def test_budget_larger_than_pool():
    with pytest.raises(SegSDEError, match="larger than the labeled pool of 3"):
        take_budget(["a", "b", "c"], 4)


@pytest.mark.parametrize("suffix", [".txt", ".parquet"])
def test_round_trip(tmp_path, suffix):
    ids = ["c", "a", "b"]
    write_order(tmp_path / f"l{suffix}", ids)
    assert read_order(tmp_path / f"l{suffix}") == ids


def test_import_unimatch_format(tmp_path):
    f = tmp_path / "labeled.txt"
    f.write_text("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png\n"
                 "leftImg8bit/train/bochum/bochum_000003_000019_leftImg8bit.png gtFine/train/bochum/bochum_000003_000019_gtFine_labelTrainIds.png\n")
    assert import_split_file(f) == ["aachen_000000_000019", "bochum_000003_000019"]
    (tmp_path / "bad.txt").write_text("images/foo.jpg labels/foo.png\n")
    with pytest.raises(SegSDEError, match="bad.txt:1"):
        import_split_file(tmp_path / "bad.txt")


def test_cli_split_and_budget_errors(synth_root, tmp_path):
    run_cli("data", "split", "--data", synth_root, "--seed", 1, "--out", tmp_path / "order.parquet")
    order = read_order(tmp_path / "order.parquet")
    assert len(order) == 64 and all(i.startswith("train_") for i in order)
    run_cli("data", "split", "--data", synth_root, "--seed", 1, "--budget", 8, "--out", tmp_path / "b8.txt")
    assert read_order(tmp_path / "b8.txt") == order[:8]
    proc = run_cli("data", "split", "--data", synth_root, "--budget", 65, "--out", tmp_path / "x.txt", check=False)
    assert proc.returncode == 2 and "larger than the labeled pool of 64" in proc.stderr and not (tmp_path / "x.txt").exists()
    (tmp_path / "foreign.txt").write_text("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png gtFine/x.png\n")
    proc = run_cli("data", "import-split", "--data", synth_root, "--file", tmp_path / "foreign.txt", "--out", tmp_path / "y.txt", check=False)
    assert proc.returncode == 2 and "not in the dataset" in proc.stderr and not (tmp_path / "y.txt").exists()


def test_missing_data_root_is_one_line(tmp_path):
    proc = run_cli("data", "info", "--data", tmp_path / "nope", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "segsde data synth" in proc.stderr


def test_info_verifies_checksums(synth_root, tmp_path):
    import json
    import shutil

    assert json.loads(run_cli("data", "info", "--data", synth_root).stdout)["verified"] is True
    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    shard = sorted(root.glob("shard-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_cli("data", "info", "--data", root, check=False)
    assert proc.returncode == 2 and "checksum" in proc.stderr


HELP_COMMANDS = [[], ["data"], ["data", "synth"], ["data", "cityscapes"], ["data", "split"], ["data", "import-split"],
                 ["data", "preview"], ["data", "info"]]


@pytest.mark.parametrize("words", HELP_COMMANDS, ids=lambda w: " ".join(w) or "segsde")
def test_every_subcommand_has_help(words):
    proc = run_cli(*words, "--help")
    assert proc.returncode == 0 and "usage: segsde" in proc.stdout
