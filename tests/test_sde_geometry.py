import math

import pytest
import torch

from segsde.data.dataset import SegSDEDataset
from segsde.sde.geometry import backproject, disp_to_depth, pose_from_params, project, warp
from segsde.sde.losses import min_reprojection, photometric_error, scale_invariant_log, smoothness, ssim

K = torch.tensor([[[100.0, 0, 63.5], [0, 100.0, 31.5], [0, 0, 1]]])


def ground_truth_batch(root, n: int) -> dict:
    """The first ``n`` validation sequences of the testbed, stacked: frames [n, 3, 3, H, W], K [n, 3, 3],
    depth and dynamic [n, 1, H, W] (depth 0 = invalid), poses [n, 2, 4, 4] (t -> t-1, t -> t+1)."""
    dataset = SegSDEDataset(root, split="val", sequence=True)
    items = [dataset[i] for i in range(n)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("frames", "K", "depth", "dynamic", "poses")}
    return {**batch, "depth": batch["depth"][:, None], "dynamic": batch["dynamic"][:, None]}


def as_network_output(depth: torch.Tensor, cfg) -> torch.Tensor:
    """The sigmoid disparity that ``disp_to_depth`` turns into ``depth`` (ground truth posing as a prediction)."""
    return (1 / depth - 1 / cfg.max_depth) / (1 / cfg.min_depth - 1 / cfg.max_depth)


def test_disp_to_depth_range():
    _, depth = disp_to_depth(torch.tensor([0.0, 1.0, 0.5]), 0.1, 100.0)
    assert torch.allclose(depth[:2], torch.tensor([100.0, 0.1]))
    assert torch.isclose(depth[2], torch.tensor(1 / (0.01 + 0.5 * (10 - 0.01))))


def test_pose_from_params_hand_computed():
    T = pose_from_params(torch.tensor([[0.0, math.pi / 2, 0.0]]), torch.tensor([[1.0, 2.0, 3.0]]))
    p = T[0] @ torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(p, torch.tensor([1.0, 2.0, 2.0, 1.0]), atol=1e-6)  # R_y(90deg) x = -z, plus t
    Tinv = pose_from_params(torch.tensor([[0.0, math.pi / 2, 0.0]]), torch.tensor([[1.0, 2.0, 3.0]]), invert=True)
    assert torch.allclose(Tinv[0] @ T[0], torch.eye(4), atol=1e-6)


def test_backproject_and_project_hand_computed():
    depth = torch.zeros(1, 1, 64, 128)
    depth[0, 0, 31, 63] = 2.0  # near the principal point (63.5, 31.5)
    depth[0, 0, 31, 127] = 4.0
    pts = backproject(depth, torch.linalg.inv(K)).reshape(1, 3, 64, 128)
    assert torch.allclose(pts[0, :, 31, 63], torch.tensor([-0.01, -0.01, 2.0]), atol=1e-6)
    assert torch.allclose(pts[0, :, 31, 127], torch.tensor([2.54, -0.02, 4.0]), atol=1e-5)
    pix = project(torch.tensor([[[1.0], [0.5], [2.0]]]), K, torch.eye(4)[None])
    assert torch.allclose(pix[0, :, 0], torch.tensor([63.5 + 50, 31.5 + 25]))
    shifted = torch.eye(4)[None].clone()
    shifted[0, 0, 3] = -1.0  # camera one metre to the right: points move left by fx / z
    assert torch.allclose(project(torch.tensor([[[1.0], [0.5], [2.0]]]), K, shifted)[0, 0, 0], torch.tensor(63.5))


def test_warp_with_identity_pose_is_the_identity():
    src = torch.rand(2, 3, 64, 128)
    out = warp(src, torch.full((2, 1, 64, 128), 5.0), K.expand(2, 3, 3), torch.eye(4).expand(2, 4, 4))
    assert torch.allclose(out, src, atol=2e-3)  # float32 round trip moves samples by ~1e-3 px


def test_warp_with_ground_truth_matches_the_testbed(synth_root):
    """The torch warp agrees with the renderer: GT depth, K and pose synthesise frame t from t+1."""
    batch = ground_truth_batch(synth_root, 4)
    frames, depth = batch["frames"], batch["depth"]
    valid = (depth > 0) & ~batch["dynamic"]
    K4, T = batch["K"], batch["poses"][:, 1]
    pix = project(backproject(depth, torch.linalg.inv(K4)), K4, T).reshape(4, 2, 128, 256)
    valid &= ((pix[:, :1] >= 0) & (pix[:, :1] <= 255) & (pix[:, 1:] >= 0) & (pix[:, 1:] <= 127))
    warped = warp(frames[:, 2], depth.clamp(min=0.1), K4, T)
    l1 = (warped - frames[:, 1]).abs().mean(1, keepdim=True)[valid].mean()
    l1_identity = (frames[:, 2] - frames[:, 1]).abs().mean(1, keepdim=True)[valid].mean()
    assert l1 < 0.025 and l1 < 0.6 * l1_identity, (l1, l1_identity)
    # SSIM is dominated by sensor noise on flat texture, so its gain is smaller but still clear
    err = photometric_error(warped, frames[:, 1])[valid].mean()
    assert err < 0.8 * photometric_error(frames[:, 2], frames[:, 1])[valid].mean()


def test_ssim_and_photometric_error_basics():
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones_like(x), atol=1e-4)
    assert photometric_error(x, x).abs().max() < 1e-4
    assert photometric_error(x, 1 - x).mean() > 0.1


def test_automask_prefers_identity_on_static_pixels():
    target = torch.rand(1, 3, 16, 16)
    moved = torch.roll(target, 3, dims=-1)
    loss, warped_won = min_reprojection(target, warped=[moved, moved], sources=[target, target])
    assert not warped_won.any() and loss.max() < 1e-3  # a static scene: identity wins everywhere
    loss, warped_won = min_reprojection(target, warped=[target, moved], sources=[moved, moved])
    assert warped_won.all()


@pytest.mark.parametrize("automask", [True, False])
def test_view_synthesis_loss_honours_the_automask_switch(automask):
    """A static scene (all three frames equal) with a moving camera: with auto-masking every pixel takes
    the zero identity error; without it the loss is the (positive) error of the wrong warp."""
    from segsde.sde.config import SDEConfig
    from segsde.sde.model import view_synthesis_loss

    torch.manual_seed(0)
    frame = torch.rand(1, 3, 32, 48)
    frames = torch.stack([frame, frame, frame], 1)
    K = torch.tensor([[[40.0, 0, 23.5], [0, 40.0, 15.5], [0, 0, 1]]])
    T = [pose_from_params(torch.zeros(1, 3), torch.tensor([[0.0, 0, -s]])) for s in (0.5, -0.5)]
    disps = [torch.full((1, 1, 32 // 2**s, 48 // 2**s), 0.5) for s in range(2)]
    out = view_synthesis_loss(frames, K, disps, T, SDEConfig(automask=automask, scales=2))
    if automask:
        assert out["photometric"] < 1e-3 and out["automask_ratio"] == 0
    else:
        assert out["photometric"] > 0.01 and out["automask_ratio"] == 1


def test_scale_invariant_log_hand_computed_and_blind_to_one_global_scale():
    gt = torch.tensor([[[[1.0, 2.0], [4.0, 0.0]]]])  # the 0 is invalid
    pred = torch.tensor([[[[2.0, 2.0], [2.0, 99.0]]]])
    g = torch.tensor([2.0, 1.0, 0.5]).log()  # log pred - log gt on the three valid pixels
    expected = (g.pow(2).mean() - 0.85 * g.mean() ** 2).sqrt()
    assert torch.isclose(scale_invariant_log(pred, gt), expected)
    assert scale_invariant_log(3 * gt.clamp(min=1), gt, variance_focus=1.0) < 1e-6  # one factor off: no error
    assert scale_invariant_log(3 * gt.clamp(min=1), gt) > 0.1  # with 0.85 the log-mean offset still counts a little


@pytest.mark.parametrize("value", [0.2, 3.0])
def test_smoothness_is_zero_for_constant_disparity_and_scale_free(value):
    image = torch.rand(1, 3, 8, 8)
    assert smoothness(torch.full((1, 1, 8, 8), value), image) == 0
    disp = torch.rand(1, 1, 8, 8)
    assert torch.isclose(smoothness(disp * value, image), smoothness(disp, image), rtol=1e-5)


def test_view_synthesis_is_float32_inside_a_bf16_autocast_region(synth_root):
    """On GPU the networks run under bf16 autocast; the warp must not: in bf16 a pixel coordinate above 128
    is rounded to whole pixels (above 256 to 2 px), which erased the sub-pixel flow the depth is learned from."""
    from segsde.models.pose import PoseNet
    from segsde.sde.config import SDEConfig
    from segsde.sde.model import frame_poses, view_synthesis_loss

    batch = ground_truth_batch(synth_root, 2)
    frames, K4 = batch["frames"], batch["K"]
    cfg = SDEConfig(scales=1)
    sigmoid = as_network_output(batch["depth"].clamp(min=0.1, max=100.0), cfg)
    T = [batch["poses"][:, i] for i in (0, 1)]
    exact = view_synthesis_loss(frames, K4, [sigmoid], T, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = view_synthesis_loss(frames, K4, [sigmoid.bfloat16()], T, cfg)
        poses = frame_poses(PoseNet(), frames, cfg)
    assert mixed["loss"].dtype == torch.float32 and all(p.dtype == torch.float32 for p in poses)
    # the bf16 input disparity itself differs by up to 0.4 %: far below the effect of rounded coordinates
    assert mixed["photometric"].item() == pytest.approx(exact["photometric"].item(), rel=2e-3)
    assert mixed["automask_ratio"].item() == pytest.approx(exact["automask_ratio"].item(), abs=5e-3)


@pytest.mark.parametrize("resolution", ["full", "scale"])
def test_ground_truth_depth_and_pose_beat_a_flat_depth_at_every_scale(synth_root, resolution):
    """The testbed's depth and poses as network output at each of four scales: every scale's reprojection
    error is below a constant depth's. In "scale" mode this checks K at each scale's own resolution (a
    wrong K would warp the coarse images to the wrong places); there the error maps are coarse too."""
    from segsde.sde.config import SDEConfig
    from segsde.sde.model import scale_reprojection

    batch = ground_truth_batch(synth_root, 4)
    frames, K4, depth = batch["frames"], batch["K"], batch["depth"]
    depth = torch.where(depth > 0, depth, torch.full_like(depth, 100.0)).clamp(min=0.1, max=100.0)  # sky: far
    cfg, own = SDEConfig(automask=False), resolution == "scale"
    sigmoid = as_network_output(depth, cfg)
    T = [batch["poses"][:, i] for i in (0, 1)]
    target, sources = frames[:, 1], [frames[:, 0], frames[:, 2]]
    for s in range(4):
        size = (128 >> s, 256 >> s)
        truth = torch.nn.functional.interpolate(sigmoid, size=size, mode="area")
        truth_error, _ = scale_reprojection(target, sources, K4, truth, T, cfg, own_resolution=own)
        flat_error, _ = scale_reprojection(target, sources, K4, torch.full_like(truth, float(truth.median())), T, cfg, own_resolution=own)
        expected = size if own else (128, 256)
        assert truth_error.shape[-2:] == expected
        assert truth_error.mean() < 0.8 * flat_error.mean(), (s, float(truth_error.mean()), float(flat_error.mean()))
