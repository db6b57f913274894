import json

import pytest
import torch
from conftest import run_cli

from segsde.data.dataset import SegSDEDataset
from segsde.metrics.depth import depth_error_sums, summarise
from segsde.runtime import Worker, batch_indices, load_state
from segsde.sde.model import SDEModel
from segsde.sde.run import sde_config
from segsde.sde.train import StepBatches, _optimiser, _set_mode, network_frames


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "data"
    run_cli("data", "synth", "--out", out, "--train", 16, "--val", 8, "--tune", 0, "--size", "64x128", "--seed", 0)
    return out


def test_depth_metrics_hand_computed():
    gt = torch.tensor([[[1.0, 2.0, 0.0]]])  # the 0 is invalid and ignored
    sums = depth_error_sums(torch.tensor([[[1.0, 1.0, 7.0]]]), gt)
    m = summarise(sums)
    # median scaling by 1.5 gives [1.5, 1.5]: AbsRel (0.5/1 + 0.5/2) / 2, ratios 1.5 and 1.33
    assert m["abs_rel"] == pytest.approx(0.375) and m["a1"] == 0 and m["a2"] == 1
    assert summarise(depth_error_sums(2 * gt + 0.0, gt))["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    empty = depth_error_sums(torch.ones(1, 1, 3), torch.zeros(1, 1, 3))
    assert empty[-1] == 0  # an image without valid pixels does not count


def test_an_exponent_without_a_dot_is_a_number_not_a_string():
    import yaml

    value = yaml.safe_load("1e-3")  # YAML 1.1 (PyYAML) reads this as the string '1e-3'
    assert value == "1e-3"
    cfg = sde_config("smoke", {"lr_phase2": value, "lr_phase1": 1})
    assert cfg.lr_phase2 == 1e-3 and isinstance(cfg.lr_phase1, float) and cfg.lr(cfg.phase1_steps) == 1e-3


def test_batch_order_is_seeded_disjoint_across_ranks_and_covers_epochs():
    n, batch, world = 10, 2, 2
    steps = [[batch_indices(n, s, batch, r, world, seed=3) for r in range(world)] for s in range(5)]
    first_epoch = [i for s in steps for r in s for i in r][:n]
    assert sorted(first_epoch) == list(range(n))  # every sample once per epoch, split between ranks
    assert steps == [[batch_indices(n, s, batch, r, world, seed=3) for r in range(world)] for s in range(5)]
    assert steps != [[batch_indices(n, s, batch, r, world, seed=4) for r in range(world)] for s in range(5)]


def _fit_one_batch(smoke_data, overrides: dict, jitter: bool = True, after_backward=lambda model: None) -> list[float]:
    """Phase-2 steps of the smoke profile (with ``overrides``) on step 0's batch; the loss of each step.
    ``after_backward(model)`` runs between each step's backward and its optimiser step."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = sde_config("smoke", {"phase1_steps": 0, **overrides})
    model = SDEModel(cfg)
    net, opt = _optimiser(model, cfg, 2, Worker(0, 1, torch.device("cpu")))
    _set_mode(model, 2)
    batches = StepBatches(str(smoke_data), cfg, 0, 0, 1)
    fixed = batches[0]
    net_frames = network_frames(batches.jitter, fixed["frames"], fixed["jitter"]) if jitter else None
    losses = []
    for _ in range(cfg.total_steps):
        out = net(fixed["frames"], fixed["K"], net_frames, 0.0, fixed.get("truth"))
        opt.zero_grad()
        out["loss"].backward()
        after_backward(model)
        opt.step()
        losses.append(out["loss"].item())
    return losses


def test_loss_decreases_when_training_on_the_testbed(smoke_data):
    losses = _fit_one_batch(smoke_data, {"phase2_steps": 30, "lr_phase2": 3e-4})
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_depth_oracle_learns_the_ground_truth_and_leaves_the_pose_net_alone(smoke_data):
    overrides = {"phase2_steps": 20, "lr_phase2": 1e-3, "oracle": "depth"}
    batch = StepBatches(str(smoke_data), sde_config("smoke", {"phase1_steps": 0, **overrides}), 0, 0, 1)[0]
    assert batch["truth"]["depth"].shape == batch["frames"][:, 1, 0].shape and (batch["truth"]["depth"] > 0).any()

    def pose_net_untouched(model):
        assert all(p.grad is None for p in model.pose.parameters())

    losses = _fit_one_batch(smoke_data, overrides, jitter=False, after_backward=pose_net_untouched)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_pose_oracle_warps_with_the_testbed_s_poses(smoke_data):
    from segsde.sde.model import view_synthesis_loss

    cfg = sde_config("smoke", {"oracle": "poses"})
    model = SDEModel(cfg).eval()
    batch = StepBatches(str(smoke_data), cfg, 0, 0, 1)[0]
    poses = batch["truth"]["poses"]
    assert poses.shape == (cfg.batch_size, 2, 4, 4)
    torch.manual_seed(1)  # the automask's tie-break noise
    out = model(batch["frames"], batch["K"], None, 0.0, batch["truth"])
    torch.manual_seed(1)
    disps = model.disparity(batch["frames"][:, 1])
    assert torch.allclose(out["loss"], view_synthesis_loss(batch["frames"], batch["K"], disps, [poses[:, 0], poses[:, 1]], cfg)["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in model.pose.parameters()) and any(p.grad is not None for p in model.decoder.parameters())


def test_validation_leaves_a_frozen_encoder_in_eval_mode(smoke_data):
    from segsde.sde.train import validate, validation_set

    cfg = sde_config("smoke")
    model = SDEModel(cfg)
    _set_mode(model, 1)
    metrics, examples = validate(model, validation_set(str(smoke_data), cfg), cfg, Worker(0, 1, torch.device("cpu")))
    assert not model.encoder.training and model.decoder.training and model.pose.training
    assert len(examples) == 3 and 0 < metrics["abs_rel"] < 5


def test_step_batches_do_not_depend_on_the_start_step(smoke_data):
    cfg = sde_config("smoke", {"color_jitter": 1.0})
    a, b = StepBatches(str(smoke_data), cfg, 0, 0, 1), StepBatches(str(smoke_data), cfg, 2, 0, 1)
    x, y = a[3], b[1]
    assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["K"], y["K"])
    assert torch.equal(network_frames(a.jitter, x["frames"], x["jitter"]), network_frames(b.jitter, y["frames"], y["jitter"]))


def test_network_frames_jitter_each_sample_s_three_frames_alike(smoke_data):
    cfg = sde_config("smoke", {"color_jitter": 1.0, "batch_size": 4})
    batches = StepBatches(str(smoke_data), cfg, 0, 0, 1)
    batch = batches[0]
    jittered = network_frames(batches.jitter, batch["frames"], batch["jitter"])
    assert jittered.shape == batch["frames"].shape and not torch.allclose(jittered, batch["frames"])
    # one draw per sample, shared by its frames: a frame jittered alone with that sample's draw matches
    for f in range(3):
        one = {k: v[1:2] if k.endswith("_factor") or k == "batch_prob" else v for k, v in batch["jitter"].items()}
        one["forward_input_shape"] = torch.tensor(batch["frames"][1:2, f].shape)
        assert torch.allclose(batches.jitter(batch["frames"][1:2, f], params=one), jittered[1:2, f], atol=1e-6)


@pytest.fixture(scope="module")
def ddp_run(smoke_data, tmp_path_factory):
    """`segsde sde` on two DDP workers: the command's own checks below, and the reference an interrupted
    and resumed run must match exactly."""
    out = tmp_path_factory.mktemp("sde_ddp") / "sde"
    proc = run_cli("sde", "--data", smoke_data, "--profile", "smoke", "--out", out, "--workers", 2)
    return out, proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_trains_on_two_ddp_workers_logs_to_mlflow_and_exports_pseudo_depth(ddp_run, smoke_data):
    from mlflow.tracking import MlflowClient

    out, proc, result = ddp_run
    # 8 validation images, 4 scored by each rank, the error sums all-reduced
    assert result["step"] == 5 and 0 < result["abs_rel"] < 5 and 0 <= result["a1"] <= 1
    assert (out / "model.pt").is_file() and json.loads((out / "metrics.json").read_text())["abs_rel"] == result["abs_rel"]
    assert "[sde] step 5/5" in proc.stderr  # progress goes to stderr
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["sde.encoder"] == "18" and run.data.params["workers"] == "2"
    assert run.data.tags["segsde.git_commit"] and "val/abs_rel" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 5  # log_interval 1, rank 0 only
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"config.json", "figures/disparity_step0000005.png"} <= artifacts and "model" not in artifacts  # no second copy
    assert run.data.tags["segsde.model"] == str(out / "model.pt")

    proc = run_cli("sde", "export", "--checkpoint", out / "model.pt", "--data", smoke_data)
    assert json.loads(proc.stdout)["images"] == 24
    ds = SegSDEDataset(smoke_data, "val")
    pseudo = ds[0]["pseudo_depth"]
    assert pseudo.shape == (64, 128) and pseudo.min() == 0 and pseudo.max() == 1


def test_a_resumed_ddp_run_continues_exactly(ddp_run, smoke_data, tmp_path):
    """Stopped at step 3 (inside phase 2) and resumed from that checkpoint, two DDP workers end with the
    weights and optimiser state of the uninterrupted command above."""
    import ray

    from segsde.sde.run import run_sde

    ray.shutdown()  # a local Ray another module left running may have too few CPUs for two workers
    try:
        first = run_sde(smoke_data, tmp_path / "a", profile="smoke", workers=2, stop_after=3)
        assert first["step"] == 3
        resumed = run_sde(smoke_data, tmp_path / "b", profile="smoke", workers=2, resume_from=first["checkpoint"])
    finally:
        ray.shutdown()
    a, b = load_state(resumed["checkpoint"]), load_state(ddp_run[2]["checkpoint"])
    assert a["step"] == b["step"] == 5 and a["phase"] == b["phase"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sb for k in sb[i])
    assert load_state(first["checkpoint"])["step"] == 3


@pytest.mark.parametrize("args,message", [
    (["--profile", "smoke"], "needs --data and --out"),
    (["--data", "{tmp}/nowhere", "--out", "{tmp}/o"], "does not exist"),
    (["--data", "{data}", "--out", "{tmp}/o", "--set", "phase2_step=3"], "unknown key 'phase2_step'.*did you mean 'phase2_steps'"),
    (["--data", "{data}", "--out", "{tmp}/o", "--set", "batch_size=1"], "batch_size must be >= 2"),
    (["--data", "{data}", "--out", "{tmp}/o", "--profile", "quik"], "did you mean 'quick'"),
    (["--data", "{data}", "--out", "{tmp}/o", "--set", "lr_phase2=fast"], "lr_phase2 must be a number"),
    (["--data", "{data}", "--out", "{tmp}/o", "--set", "oracle=pose"], "oracle must be one of"),
    (["--data", "{data}", "--out", "{tmp}/o", "--set", "oracle=poses", "--set", "normalise_disparity=true"],
     "set normalise_disparity=false"),
])
def test_bad_sde_input_is_one_line_and_starts_nothing(args, message, smoke_data, tmp_path):
    import re

    proc = run_cli("sde", *[a.format(tmp=tmp_path, data=smoke_data) for a in args], check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr
    assert not (tmp_path / "o" / "mlflow.db").exists()


def test_export_refuses_a_file_that_is_not_an_sde_model(smoke_data, tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    proc = run_cli("sde", "export", "--checkpoint", tmp_path / "other.pt", "--data", smoke_data, check=False)
    assert proc.returncode == 2 and "not an SDE model file" in proc.stderr
