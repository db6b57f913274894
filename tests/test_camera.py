import numpy as np
import pytest

from segsde.data.camera import crop_intrinsics, flip_intrinsics, flip_pose, project, resize_intrinsics, scale_intrinsics

K0 = np.array([[2262.52, 0, 1096.98], [0, 2265.30, 513.14], [0, 0, 1.0]])  # Cityscapes' average camera, 2048x1024
POINTS = np.array([[1.0, -0.5, 10.0], [-3.0, 1.2, 25.0], [0.2, 0.1, 4.0], [-0.05, 0.3, 60.0]])


def test_resize_maps_pixel_centres():
    K = resize_intrinsics(K0, (1024, 2048), (512, 1024))
    # half resolution: focal halves, principal point moves with the pixel-centre convention
    assert np.allclose(K[[0, 1], [0, 1]], K0[[0, 1], [0, 1]] / 2)
    assert np.isclose(K[0, 2], (1096.98 + 0.5) / 2 - 0.5) and np.isclose(K[1, 2], (513.14 + 0.5) / 2 - 0.5)
    uv0, uv1 = project(K0, POINTS), project(K, POINTS)
    assert np.allclose((uv0 + 0.5) / 2 - 0.5, uv1)


def test_crop_then_flip_moves_points_with_the_pixels():
    K = resize_intrinsics(K0, (1024, 2048), (512, 1024))
    top, left, cw = 40, 300, 512
    Kc = flip_intrinsics(crop_intrinsics(K, top, left), cw)
    uv = project(K, POINTS)
    expected_u = (cw - 1) - (uv[:, 0] - left)  # pixel column after crop, then mirrored
    mirrored = POINTS * [-1, 1, 1]  # a flipped image shows the mirrored scene
    assert np.allclose(project(Kc, mirrored), np.stack([expected_u, uv[:, 1] - top], 1))
    assert Kc[1, 2] == K[1, 2] - top  # v0 is never mirrored (the original's bug)


def test_flip_pose_is_consistent_with_mirrored_points():
    rng = np.random.default_rng(0)
    a = rng.normal(size=3) * 0.1
    Kx = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    R = np.eye(3) + Kx + Kx @ Kx / 2  # near-rotation is enough: check the algebra, not orthogonality
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, [0.3, -0.1, 1.2]
    P = np.c_[POINTS, np.ones(len(POINTS))].T
    F = np.diag([-1.0, 1, 1, 1])
    assert np.allclose(flip_pose(T) @ (F @ P), F @ (T @ P))
    assert np.allclose(flip_pose(flip_pose(T)), T)


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_pyramid_scale_equals_resize(scale):
    K = resize_intrinsics(K0, (1024, 2048), (512, 1024))
    expected = resize_intrinsics(K, (512, 1024), (512 >> scale, 1024 >> scale))
    assert np.allclose(scale_intrinsics(K, scale), expected)


def test_resize_intrinsics_takes_a_batch_of_torch_matrices():
    import torch

    Ks = torch.tensor(np.stack([K0, resize_intrinsics(K0, (1024, 2048), (512, 1024))]))
    batched = resize_intrinsics(Ks, (64, 128), (16, 32))
    for K, one in zip(Ks, batched):
        assert torch.allclose(one, torch.tensor(resize_intrinsics(K.numpy(), (64, 128), (16, 32))))
