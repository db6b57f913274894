"""The semi-supervised trainer: networks, transfer, every study row end to end on Ray Train with MLflow,
exact resume with the teacher, DDP evaluation, and one-line errors for bad input."""

import json
import re

import pytest
import torch
from conftest import run_cli

from segsde.data.dataset import SegSDEDataset
from segsde.data.splits import random_order
from segsde.profiles import PROFILES_FILE, load_yaml
from segsde.runtime import Worker, load_state
from segsde.sde.run import sde_config
from segsde.trainer.data import train_ids
from segsde.trainer.model import MultiTaskNet, SegmentationNet, build_network, load_transfer
from segsde.trainer.run import study_rows, train_config

# al_entropy shares autoselect's path (only their selection lists differ: test_selection.py), transfer is mtl's
# without the depth decoder (its weight loading is tested below), baseline + pseudolabel run end to end as Tune
# trials in test_run_ablation.py and combination on two DDP workers below (CI time)
# transfer_oracle is transfer from another model file, all_labels baseline on another labeled set (test_run_ablation.py)
ROWS = sorted(r for r in study_rows() if r not in ("al_entropy", "transfer", "baseline", "pseudolabel", "combination", "transfer_oracle",
                                                   "all_labels"))


@pytest.fixture(scope="module")
def study(smoke_study):
    return smoke_study


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def row_runs(study, ray_session, tmp_path_factory):
    """``run(row)``: the row's smoke trial (in-process, one worker), each run once per module."""
    from segsde.trainer.run import run_train

    done = {}

    def run(row):
        if row not in done:
            out = tmp_path_factory.mktemp(row)
            selection = study["selection"] if train_config("smoke", row).labeled == "selection" else None  # selection stage: test_selection.py
            done[row] = out, run_train(study["data"], out, row=row, profile="smoke", sde_model=study["sde"], selection=selection)
        return done[row]

    return run


def test_networks_shapes_and_gates():
    cfg = train_config("smoke", "mtl")
    net = build_network(cfg)
    assert isinstance(net, MultiTaskNet)
    out = net(torch.rand(2, 3, 64, 128))
    assert out["logits"].shape == out["side"].shape == (2, 19, 64, 128)
    assert [d.shape[-2:] for d in out["disparities"]] == [(64, 128), (32, 64), (16, 32), (8, 16)]
    x = torch.randn(1, cfg.decoder_channels[2], 4, 4)
    assert torch.allclose(net.gate_to_seg(x), net.gate_to_seg.conv(x) * 0.5)  # every gate starts half open
    torch.nn.init.normal_(net.gate_to_seg.attention.weight, std=0.1)  # the exchange open and trained-looking
    image = torch.rand(2, 3, 64, 128, requires_grad=True)
    full, seg_only = net.eval()(image), net(image, depth=False)
    assert "disparities" not in seg_only and torch.equal(full["logits"], seg_only["logits"])
    grads = [torch.autograd.grad(o["logits"].square().sum(), image)[0] for o in (full, seg_only)]
    assert torch.equal(*grads)  # the skipped depth tail plays no part in the logits or their gradient
    single = build_network(train_config("smoke", "baseline"))
    assert isinstance(single, SegmentationNet) and single(torch.rand(2, 3, 64, 128))["logits"].shape == (2, 19, 64, 128)
    assert not hasattr(single.decoder, "heads") or len(single.decoder.heads) == 0


def test_multitask_head_is_one_classifier_and_its_depth_loss_two_means(study):
    """The original's multi-task net: one 1x1 classifier on stage 0 (no projection), and the SDE loss of the
    labeled and of the pool triplets back-propagated as two means of weight 1 each."""
    from segsde.sde.model import frame_poses, view_synthesis_loss
    from segsde.trainer.step import supervised_loss

    cfg = train_config("smoke", "mtl")
    net = build_network(cfg)
    assert isinstance(net.head, torch.nn.Conv2d) and net.head.kernel_size == (1, 1) and net.head.out_channels == 19
    sde_cfg = load_transfer(net, study["sde"], cfg)
    ds = SegSDEDataset(study["data"], "train", sequence=True)
    items = [ds[i] for i in range(4)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "label", "frames", "K")}
    labeled, pool = {k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}
    net.train()
    torch.manual_seed(0)
    _, logs, _ = supervised_loss(net, labeled, pool, cfg, sde_cfg)
    torch.manual_seed(0)
    out = net(batch["frames"][:, 1])  # the same forward: both batches through the net at once
    poses = frame_poses(net.pose, batch["frames"], sde_cfg)
    halves = [view_synthesis_loss(batch["frames"][p], batch["K"][p], [d[p] for d in out["disparities"]], [t[p] for t in poses], sde_cfg)["loss"]
              for p in (slice(0, 2), slice(2, 4))]
    assert float(logs["sde"]) == pytest.approx(float(halves[0] + halves[1]), rel=1e-5)
    one_mean = view_synthesis_loss(batch["frames"], batch["K"], out["disparities"], poses, sde_cfg)["loss"]
    assert float(logs["sde"]) == pytest.approx(2 * float(one_mean), rel=0.05)  # twice the weight of one mean over both


def test_rows_with_a_teacher_mix_from_one_pool():
    """ClassMix, DepthMix and the pseudo-label rows differ by their mask alone, not by what they mix."""
    pools = {row: train_config("smoke", row).mix_pool for row in study_rows() if train_config("smoke", row).teacher}
    assert {"pseudolabel", "classmix", "depthmix", "combination"} <= set(pools) and set(pools.values()) == {"unlabeled"}


@pytest.mark.parametrize("profile", sorted(load_yaml(PROFILES_FILE)))
def test_every_profile_trains_transfer_on_its_sde_network(profile):
    """`transfer` starts from the SDE model, so each profile's sde and train sections must agree."""
    sde, train = sde_config(profile), train_config(profile, "transfer")
    assert (sde.encoder, sde.output_stride, sde.decoder_channels) == (train.encoder, train.output_stride, train.decoder_channels)


def test_transfer_copies_encoder_decoder_and_pose(study):
    saved = torch.load(study["sde"], weights_only=True)["model"]
    for row, net_cls in (("transfer", SegmentationNet), ("mtl", MultiTaskNet)):
        cfg = train_config("smoke", row)
        net = build_network(cfg)
        sde_cfg = load_transfer(net, study["sde"], cfg)
        assert isinstance(net, net_cls) and sde_cfg.smoothness == sde_config("smoke").smoothness
        state = net.state_dict()
        seg = "seg" if row == "mtl" else "decoder"
        for key, value in saved.items():
            if key.startswith("encoder."):
                assert torch.equal(state[key], value), key
            elif key.startswith("decoder.") and not key.startswith("decoder.heads."):
                assert torch.equal(state[key.replace("decoder.", f"{seg}.", 1)], value), key
        if row == "mtl":
            assert all(torch.equal(state[k.replace("decoder.", "depth.", 1)], v) for k, v in saved.items() if k.startswith("decoder."))
            assert all(torch.equal(state[k], v) for k, v in saved.items() if k.startswith("pose."))
    with pytest.raises(Exception, match="use the same architecture"):
        load_transfer(build_network(train_config("smoke", "transfer", {"encoder": 34})), study["sde"],
                      train_config("smoke", "transfer", {"encoder": 34}))


def check_row_run(row: str, result: dict, out, study) -> None:
    """What every study row's trial leaves: scores, metrics.json and its MLflow run with the row's logs."""
    from mlflow.tracking import MlflowClient

    cfg = train_config("smoke", row)
    assert result["step"] == 4 and 0 < result["miou"] <= 1 and 0 < result["pixel_accuracy"] <= 1
    assert result["best_miou"] >= result["miou"]
    assert json.loads((out / "metrics.json").read_text())["miou"] == result["miou"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["segsde.row"] == row
    assert run.data.params["train.budget"] == "8"
    history = client.get_metric_history(run.info.run_id, "train/supervised")
    assert [m.step for m in history] == [1, 2, 3, 4]
    artifacts = {a.path for d in ("", "figures", "tables") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"labeled_ids.txt", "config.json", "figures/predictions_step0000004.png", "tables/class_iou_legacy_step0000004.json"} <= artifacts
    assert ("figures/mixing_step0000004.png" in artifacts) == cfg.teacher
    if cfg.teacher:
        assert client.get_metric_history(run.info.run_id, "train/confident_fraction")
    if cfg.multitask:
        assert client.get_metric_history(run.info.run_id, "train/sde")
    labeled = client.download_artifacts(run.info.run_id, "labeled_ids.txt", str(out))
    ids = open(labeled).read().split()
    order = open(study["selection"]).read().split() if cfg.labeled == "selection" else random_order(train_ids(study["data"]), 0)
    assert ids == order[:8]  # baseline_aa too: Baseline's labels, its own training noise
    # each component's own proof that it acted, in the result and in MLflow
    if cfg.transfer:
        assert result["acted/encoder_from_sde"] == 1.0
    if cfg.multitask:
        assert 0 < result["acted/depth_share"] < 1 and result["acted/exchange"] > 0
    if cfg.labeled == "selection":
        assert result["acted/random_overlap"] == len(set(ids) & set(random_order(train_ids(study["data"]), 0)[:8])) / 8
        assert 0 < result["acted/random_class_coverage"] <= 1 and 0 < result["acted/class_coverage"] <= 1
    if not (cfg.teacher or cfg.transfer or cfg.labeled == "selection"):
        assert not any(k.startswith("acted/") for k in result)
    assert {k for k in run.data.metrics if k.startswith("final/acted/")} == {f"final/{k}" for k in result if k.startswith("acted/")}
    # the result once, at step 0 (one bar per run in MLflow's charts), in six digits; curves only under val/
    assert [m.step for m in client.get_metric_history(run.info.run_id, "final/miou")] == [0]
    assert run.data.metrics["final/miou"] == float(f"{100 * result['miou']:.6g}")
    assert not any(k.startswith("val/acted/") or k == "val/best_miou" for k in run.data.metrics)


@pytest.mark.parametrize("row", ROWS)
def test_every_row_runs_end_to_end(row, study, row_runs):
    out, result = row_runs(row)
    check_row_run(row, result, out, study)


def test_resume_with_teacher_continues_exactly(study, row_runs, tmp_path):
    from segsde.trainer.run import run_train

    kw = dict(row="depthmix", profile="smoke", sde_model=study["sde"])
    first = run_train(study["data"], tmp_path / "a", stop_after=2, **kw)
    resumed = run_train(study["data"], tmp_path / "b", resume_from=first["checkpoint"], **kw)
    straight = row_runs("depthmix")[1]  # the uninterrupted run
    a, b = load_state(resumed["checkpoint"]), load_state(straight["checkpoint"])
    assert load_state(first["checkpoint"])["step"] == 2 and a["step"] == b["step"] == 4
    for part in ("model", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part
    assert not all(torch.equal(a["model"][k], a["teacher"][k]) for k in a["model"] if k in a["teacher"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sb for k in sb[i])
    assert resumed["miou"] == straight["miou"]


def test_bf16_precision_runs_the_networks_in_bf16_on_a_cpu(study, row_runs, tmp_path):
    """``precision: bf16`` autocasts the trainer's passes on a CPU too (about 1.4x faster where the CPU has
    AVX512-BF16 or AMX), while ``auto`` does so only on such a CPU (emulated bf16 is several times slower than
    float32); the run is logged with its precision."""
    from mlflow.tracking import MlflowClient

    from segsde.runtime import autocast, cpu_bf16_native, effective_precision
    from segsde.trainer.run import run_train

    conv, x = torch.nn.Conv2d(3, 4, 3), torch.rand(1, 3, 8, 8)

    def output_dtype(precision):
        with autocast(torch.device("cpu"), precision):
            return conv(x).dtype

    native = torch.bfloat16 if cpu_bf16_native() else torch.float32
    assert [output_dtype(p) for p in ("bf16", "auto", "fp32")] == [torch.bfloat16, native, torch.float32]
    assert effective_precision("cuda") == "bf16" and effective_precision("cpu", "fp32") == "fp32"
    result = run_train(study["data"], tmp_path, row="depthmix", profile="smoke", overrides={"precision": "bf16"},
                       sde_model=study["sde"])
    fp32 = row_runs("depthmix")[1]
    assert result["step"] == fp32["step"] == 4 and 0 < result["miou"] <= 1
    a, b = load_state(result["checkpoint"])["model"], load_state(fp32["checkpoint"])["model"]
    assert not all(torch.equal(a[k], b[k]) for k in b)  # same seed and batches: only the precision differs
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert run.data.params["train.precision"] == "bf16"


def test_the_combination_row_on_two_ddp_workers_all_reduces_the_confusion_matrix(study, tmp_path):
    """The combination row exercises every DDP path: multi-task SDE loss, teacher, two backwards; run by
    `segsde train`, it also leaves everything a study row's trial must."""
    from segsde.trainer.loop import evaluate, validation_set

    row = "combination"
    proc = run_cli("train", "--data", study["data"], "--out", tmp_path, "--profile", "smoke", "--row", row,
                   "--workers", 2, "--sde-model", study["sde"], "--selection", study["selection"])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    check_row_run(row, result, tmp_path, study)
    cfg = train_config("smoke", row)
    net = build_network(cfg)
    net.load_state_dict(load_state(result["checkpoint"])["model"])
    alone = evaluate(net, validation_set(str(study["data"]), cfg), Worker(0, 1, torch.device("cpu")), precision=cfg.precision)
    # 8 validation images, 4 scored by each rank: the all-reduced score equals one process scoring all 8
    assert result["miou"] == pytest.approx(alone["legacy"]["miou"], abs=1e-9)
    assert len(SegSDEDataset(study["data"], "val")) == 8


@pytest.mark.parametrize("args,message", [
    (["--row", "basline"], "unknown row 'basline'.*did you mean 'baseline'"),
    (["--row", "transfer"], "pass --sde-model"),
    (["--set", "labeled=selection"], "pass it with --selection FILE"),
    (["--selection", "nonsense"], "neither an existing file nor a selection method"),
    (["--set", "epsilom=0.1"], "unknown key 'epsilom'.*did you mean 'epsilon'"),
    (["--set", "mix=class"], "mixing needs pseudo-labels"),
    (["--set", "precision=fp16"], r"precision must be one of \('auto', 'bf16', 'fp32'\)"),
    (["--budget", "999"], "budget 999 is larger than the labeled pool of 16"),
    (["--row", "classmix", "--budget", "16"], "no unlabeled image is left"),
    (["--row", "depthmix", "--set", "depth_source=student"], "needs the multi-task decoder"),
    (["--row", "autoselect", "--selection", "{tmp}/missing.txt"], "missing.txt is neither an existing file"),
    (["--row", "autoselect", "--selection", "{tmp}/foreign.txt"], "2 ids not in the dataset"),
    (["--row", "transfer", "--sde-model", "{tmp}/sde34.pt"], r"has \(encoder, output_stride, decoder_channels\) = \(34, .*use the same architecture"),
])
def test_bad_train_input_is_one_line_and_starts_nothing(args, message, study, tmp_path):
    from dataclasses import asdict

    from segsde.sde.model import SDEModel
    from segsde.sde.run import save_model, sde_config

    (tmp_path / "foreign.txt").write_text("not_an_id_1\nnot_an_id_2\n")  # a selection list from another dataset
    if "{tmp}/sde34.pt" in args:  # an SDE model of another architecture
        cfg = sde_config("smoke", {"encoder": 34})
        save_model(tmp_path / "sde34.pt", {"model": SDEModel(cfg).state_dict(), "config": asdict(cfg), "step": 0})
    proc = run_cli("train", "--data", study["data"], "--out", tmp_path / "o", "--profile", "smoke",
                   *[a.format(tmp=tmp_path) for a in args], check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr
    assert not (tmp_path / "o" / "mlflow.db").exists()


def test_cityscapes_full_resolution_protocol(tmp_path):
    """The official protocol scores logits upsampled to the native gtFine labels, beside the legacy one."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image
    from test_cityscapes import make_tree

    from segsde.data.labels import label_id_to_train_id_lut
    from segsde.metrics.segmentation import confusion_matrix, scores
    from segsde.trainer.loop import evaluate, validation_set

    tree = make_tree(tmp_path / "cityscapes")
    run_cli("data", "cityscapes", "--root", tree, "--out", tmp_path / "cs", "--size", "128x64")
    cfg = train_config("smoke", "baseline")
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    val = validation_set(str(tmp_path / "cs"), cfg)
    result = evaluate(net, val, Worker(0, 1, torch.device("cpu")), full_resolution_root=str(tree), precision=cfg.precision)
    conf = torch.zeros(19, 19, dtype=torch.int64)
    lut = label_id_to_train_id_lut()
    for item in val:
        city = item["id"].split("_")[0]
        native = lut[np.asarray(Image.open(tree / "gtFine" / "val" / city / f"{item['id']}_gtFine_labelIds.png"))]
        with torch.no_grad():
            logits = net(item["image"][None])["logits"]
        up = F.interpolate(logits, size=native.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        conf += confusion_matrix(up, torch.from_numpy(native.astype(np.int64)))
    assert native.shape != tuple(item["image"].shape[-2:])  # the labels really are at another resolution
    assert result["full"]["miou"] == pytest.approx(scores(conf)["miou"])
    assert "legacy" in result and result["legacy"]["present"] == scores(conf)["present"]
