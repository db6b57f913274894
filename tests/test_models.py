import math

import pytest
import torch
import torchvision

from segsde.errors import SegSDEError
from segsde.models.decoder import UNetDecoder
from segsde.models.encoder import FrozenFeatures, ResNetEncoder, feature_distance
from segsde.models.pose import PoseNet, mirror_pose_params
from segsde.sde.config import SDEConfig
from segsde.sde.geometry import pose_from_params
from segsde.sde.model import SDEModel


@pytest.mark.parametrize("depth,stride,channels", [(18, 32, [64, 64, 128, 256, 512]), (50, 16, [64, 256, 512, 1024, 2048])])
def test_encoder_maps_and_decoder_scales(depth, stride, channels):
    enc = ResNetEncoder(depth, None, stride)
    maps = enc(torch.rand(2, 3, 64, 128))
    assert [m.shape[1] for m in maps] == channels == enc.channels
    assert [m.shape[-1] for m in maps] == [64, 32, 16, 8, 128 // stride]
    dec = UNetDecoder(enc.channels)
    feats = dec.run_stages(maps, range(4, -1, -1), size=(64, 128))
    assert {i: tuple(f.shape[1:]) for i, f in feats.items()} == {
        4: (256, 4, 8), 3: (256, 8, 16), 2: (128, 16, 32), 1: (128, 32, 64), 0: (64, 64, 128)}
    disps = dec.disparities(feats)
    assert [tuple(d.shape[-2:]) for d in disps] == [(64, 128), (32, 64), (16, 32), (8, 16)]
    assert all(((d > 0) & (d < 1)).all() for d in disps)


def test_basic_block_resnet_cannot_be_dilated():
    with pytest.raises(SegSDEError, match="cannot be dilated to output stride 16"):
        ResNetEncoder(18, None, output_stride=16)
    with pytest.raises(SegSDEError, match="not supported"):
        ResNetEncoder(152)


def test_weights_load_from_a_local_state_dict_file(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    enc = ResNetEncoder(18, tmp_path / "r18.pth")
    assert torch.equal(enc.net.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    # the pose net's 6-channel conv1: ImageNet filters repeated per frame and halved
    pose = PoseNet(tmp_path / "r18.pth")
    w = pose.encoder.net.conv1.weight
    assert torch.allclose(w[:, :3], reference.conv1.weight / 2) and torch.allclose(w[:, 3:], reference.conv1.weight / 2)
    x = torch.rand(1, 3, 64, 64)
    same = pose.encoder.net.conv1(torch.cat([x, x], 1))
    assert torch.allclose(same, reference.conv1(x), atol=1e-5)


def test_bad_weight_files_give_one_line_errors(tmp_path):
    with pytest.raises(SegSDEError, match="does not exist"):
        ResNetEncoder(18, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SegSDEError, match="not a readable torch state dict"):
        ResNetEncoder(18, tmp_path / "junk.pth")
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(SegSDEError, match="does not fit this network"):
        ResNetEncoder(50, tmp_path / "r34.pth", output_stride=16)


def test_mirrored_pose_parameters_equal_F_T_F():
    axis, trans = torch.randn(4, 3) * 0.1, torch.randn(4, 3)
    F = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    expected = F @ pose_from_params(axis, trans) @ F
    assert torch.allclose(pose_from_params(*mirror_pose_params(axis, trans)), expected, atol=1e-6)


def test_flip_averaged_pose_is_mirror_equivariant():
    torch.manual_seed(0)
    model = SDEModel(SDEConfig(pose_flip_average=True, decoder_channels=(8, 8, 16, 16, 32))).eval()
    frames = torch.rand(2, 3, 3, 64, 128)
    with torch.no_grad():
        poses, mirrored = model.poses(frames), model.poses(frames.flip(-1))
    F = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    for T, Tm in zip(poses, mirrored):
        assert torch.allclose(F @ T @ F, Tm, atol=1e-6)


def test_feature_distance_does_not_depend_on_batch_or_crop_size():
    torch.manual_seed(0)
    a, b = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    dist, frob = feature_distance(a, b)
    dist4, frob4 = feature_distance(a.repeat(4, 1, 2, 2), b.repeat(4, 1, 2, 2))
    assert torch.isclose(dist, dist4) and torch.isclose(frob4, frob * 4)  # sqrt(4 * 4) more elements
    assert torch.isclose(dist, (a - b).pow(2).sum(1).sqrt().mean())


def test_frozen_features_stay_frozen_in_train_mode():
    enc = ResNetEncoder(18)
    frozen = FrozenFeatures(enc)
    frozen.train()
    assert not frozen.encoder.training and not any(p.requires_grad for p in frozen.parameters())
    before = frozen.encoder.net.bn1.running_mean.clone()
    out = frozen(torch.rand(2, 3, 64, 64))
    assert not out.requires_grad and torch.equal(before, frozen.encoder.net.bn1.running_mean)


def test_sde_objective_terms_and_gradients():
    torch.manual_seed(0)
    cfg = SDEConfig(decoder_channels=(8, 8, 16, 16, 32), pose_input_scale=0.5)
    model = SDEModel(cfg)
    K = torch.tensor([[60.0, 0, 63.5], [0, 60.0, 31.5], [0, 0, 1]]).expand(2, 3, 3)
    out = model(torch.rand(2, 3, 3, 64, 128), K)
    assert set(out) >= {"loss", "photometric", "smoothness", "automask_ratio"}
    assert math.isclose(out["loss"].item(), (out["photometric"] + 1e-3 * out["smoothness"]).item(), rel_tol=1e-6)
    out["loss"].backward()
    assert model.pose.decoder[-1].weight.grad.abs().sum() > 0 and model.decoder.heads[0][1].weight.grad.abs().sum() > 0


def test_pose_output_scale_travels_with_the_state_dict():
    torch.manual_seed(0)
    trained = PoseNet(None, output_scale=0.05).eval()
    loaded = PoseNet(None).eval()  # monodepth2's 0.01 until the state dict says otherwise
    loaded.load_state_dict(trained.state_dict())
    pair = torch.rand(2, 6, 64, 128)
    with torch.no_grad():
        assert loaded.output_scale.item() == pytest.approx(0.05)
        for a, b in zip(trained(pair), loaded(pair)):
            assert torch.equal(a, b)
    with torch.no_grad():
        trained.output_scale.fill_(0.1)
        assert torch.allclose(trained(pair)[1], 2 * loaded(pair)[1])


def test_depth_is_predicted_at_the_training_size_and_returned_at_the_input_size():
    from segsde.sde.export import disparity_map

    torch.manual_seed(0)
    model = SDEModel(SDEConfig(decoder_channels=(8, 8, 16, 16, 32), resize=(64, 128))).eval()
    images = torch.rand(2, 3, 128, 256)
    disp = disparity_map(model, images)
    assert disp.shape == (2, 128, 256)
    with torch.no_grad():
        small = model.disparity(torch.nn.functional.interpolate(images, size=(64, 128), mode="bilinear", antialias=True))[0]
    expected = torch.nn.functional.interpolate(small, size=(128, 256), mode="bilinear")[:, 0]
    assert torch.allclose(disp, expected, atol=1e-6)
    # without a resize the network sees the images as they come
    plain = SDEModel(SDEConfig(decoder_channels=(8, 8, 16, 16, 32))).eval()
    with torch.no_grad():
        assert torch.allclose(disparity_map(plain, images), plain.disparity(images)[0][:, 0], atol=1e-6)
