"""Semi-supervised parts: DepthMix/ClassMix masks and mixing, partners, EMA math, pseudo-labels, mIoU."""

import itertools

import pytest
import torch

from segsde.data.dataset import SegSDEDataset
from segsde.data.labels import IGNORE_INDEX
from segsde.metrics.segmentation import confusion_matrix, iou_table, scores
from segsde.ssl.augment import StrongAugment
from segsde.ssl.mixing import class_mask, depth_mask, depth_to_disparity, mix, partners
from segsde.ssl.pseudo import one_hot_targets, pseudo_labels, weighted_cross_entropy
from segsde.ssl.teacher import ema_alpha, ema_update, make_teacher


@pytest.mark.parametrize("batch", range(1, 9))
def test_partners_are_a_random_derangement(batch):
    g = torch.Generator().manual_seed(batch)
    p = partners(batch, g)
    assert sorted(p.tolist()) == list(range(batch))  # every image is somebody's partner
    if batch > 1:
        assert (p != torch.arange(batch)).all()
    draws = {tuple(partners(batch, g).tolist()) for _ in range(20)}
    assert len(draws) > 1 or batch <= 2


@pytest.mark.parametrize("batch", range(1, 9))
def test_mixing_any_batch_size(batch):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 8, 12, generator=g)
    soft = torch.softmax(torch.randn(batch, 19, 8, 12, generator=g), 1)
    mask = torch.rand(batch, 8, 12, generator=g) > 0.5
    p = partners(batch, g)
    mixed, mixed_soft = mix(mask, images, p), mix(mask, soft, p)
    for i in range(batch):
        m = mask[i]
        assert torch.equal(mixed[i][:, m], images[i][:, m])
        assert torch.equal(mixed[i][:, ~m], images[p[i]][:, ~m])
        assert torch.equal(mixed_soft[i][:, ~m], soft[p[i]][:, ~m])
    assert StrongAugment((8, 12))(mixed).shape == mixed.shape


def test_strong_augmentation_draws_as_the_original_with_its_hue():
    """Colour jitter is decided once per batch (p 0.8) with its factors drawn per image, as kornia 0.3's ColorJitter
    did in the original, and blur once per batch; the hue strength 0.25 is in the original's radians (today's kornia
    takes turns, where 0.25 would be +-90 degrees)."""
    from kornia.augmentation import ColorJiggle
    from kornia.color import rgb_to_hsv

    from segsde.ssl.augment import hue_turns

    torch.manual_seed(0)
    images = torch.rand(1, 3, 16, 16).repeat(6, 1, 1, 1)
    jitter_only = StrongAugment((16, 16), blur_p=0.0)
    outputs = [jitter_only(images) for _ in range(60)]
    jittered = [y for y in outputs if not torch.allclose(y, images)]
    assert 38 <= len(jittered) <= 57  # p 0.8 a batch
    assert all(not torch.allclose(y[0], images[0]) for y in jittered)  # the whole batch or none of it ...
    assert all(not torch.allclose(y[0], y[k]) for y in jittered for k in range(1, 6))  # ... each image its own factors
    blur_only = StrongAugment((16, 16), jitter_p=0.0)
    assert all(torch.allclose(y[0], y[k]) for y in (blur_only(images) for _ in range(20)) for k in range(6))  # one blur a batch
    augment = StrongAugment((16, 16))
    assert augment.jitter.hue == pytest.approx(hue_turns(0.25)) and hue_turns(0.25) * 360 == pytest.approx(14.32, abs=0.01)
    colour = torch.tensor([0.9, 0.3, 0.1])[None, :, None, None].expand(64, 3, 1, 1).contiguous()
    hue_only = ColorJiggle(0, 0, 0, hue_turns(0.25), p=1.0)
    shift = (rgb_to_hsv(hue_only(colour))[:, 0] - rgb_to_hsv(colour)[:, 0]).flatten()
    shift = torch.remainder(shift + torch.pi, 2 * torch.pi) - torch.pi  # hue is an angle in radians
    assert shift.abs().max() <= 0.25 + 1e-3 and shift.abs().max() > 0.15


def test_depthmix_mask_on_testbed_ground_truth(synth_root):
    ds = SegSDEDataset(synth_root, "train")
    items = [ds[i] for i in range(6)]
    depth = torch.stack([it["depth"] for it in items])
    labels = torch.stack([it["label"] for it in items])
    images = torch.stack([it["image"] for it in items])
    disparity = depth_to_disparity(depth)
    p = partners(len(items), torch.Generator().manual_seed(3))
    for eps in (0.0, 0.03, 0.2):
        mask = depth_mask(disparity, p, eps)
        # a kept pixel of image i is never farther than image j's pixel by more than epsilon
        assert (disparity[mask] >= disparity[p][mask] - eps).all()
        # and every pixel that is closer (or within epsilon) is kept: the rule, not a subset of it
        assert torch.equal(mask, disparity >= disparity[p] - eps)
        mixed_labels = mix(mask, labels, p)
        mixed_images = mix(mask, images, p)
        assert torch.equal(mixed_labels[mask], labels[mask]) and torch.equal(mixed_labels[~mask], labels[p][~mask])
        assert torch.equal(mixed_images.permute(1, 0, 2, 3)[:, ~mask], images[p].permute(1, 0, 2, 3)[:, ~mask])
    mask = depth_mask(disparity, p, 0.03)
    # sky (no depth) of image i never covers image j's scene, and the ground truth is consistent with it
    sky = depth == 0
    assert not (mask & sky & ~sky[p]).any()
    assert 0.05 < mask.float().mean() < 0.95


def test_class_mask_picks_half_of_each_images_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (4, 16, 16), generator=g)
    labels[0] = torch.where(labels[0] == 5, IGNORE_INDEX, labels[0])
    labels[1] = 2  # a single class: floor(1/2) = 0 classes, an empty mask
    masks = class_mask(labels, g)
    for b in range(4):
        classes = set(labels[b].unique().tolist()) - {IGNORE_INDEX}
        chosen = set(labels[b][masks[b]].unique().tolist())
        assert len(chosen) == len(classes) // 2 and chosen <= classes
        assert torch.equal(masks[b], torch.isin(labels[b], torch.tensor(sorted(chosen), dtype=labels.dtype)))
    assert not masks[1].any()
    picks = {tuple(sorted(set(labels[2][class_mask(labels, g)[2]].tolist()))) for _ in range(10)}
    assert len(picks) > 1  # a random choice, not always the same classes


def test_ema_update_math_and_buffers():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    teacher = make_teacher(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert ema_alpha(0, 0.99) == 0.0 and ema_alpha(1, 0.99) == 0.5 and ema_alpha(1000, 0.99) == 0.99
    old = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student(torch.randn(2, 3, 5, 5))  # moves BN running statistics and the step counter
    ema_update(teacher, student, step=5, alpha=0.99)
    a = 1 - 1 / 6
    for k, v in teacher.state_dict().items():
        s = student.state_dict()[k]
        expected = s if not v.dtype.is_floating_point else a * old[k] + (1 - a) * s
        assert torch.allclose(v, expected), k


def test_pseudo_labels_per_pixel_and_batch_fraction():
    targets = torch.zeros(1, 3, 1, 4)
    targets[0, :, 0, 0] = torch.tensor([0.98, 0.01, 0.01])  # confident class 0
    targets[0, :, 0, 1] = torch.tensor([0.2, 0.7, 0.1])     # unconfident class 1
    targets[0, 2, 0, 2] = 1.0                                # one-hot ground truth: confident
    # pixel 3: all zeros (an ignore pixel of a labeled partner)
    labels, weight, fraction = pseudo_labels(targets, 0.968, "per_pixel")
    assert labels.tolist() == [[[0, 1, 2, IGNORE_INDEX]]]
    assert weight.tolist() == [[[1.0, 0.0, 1.0, 0.0]]]
    assert fraction.item() == pytest.approx(2 / 3)
    _, weight, _ = pseudo_labels(targets, 0.968, "batch_fraction")
    assert weight[0, 0, :3].tolist() == pytest.approx([2 / 3] * 3) and weight[0, 0, 3] == 0
    logits = torch.randn(1, 3, 1, 4)
    ce = torch.nn.functional.cross_entropy(logits, labels.clamp(max=2), reduction="none")[0, 0]
    assert weighted_cross_entropy(logits, labels, torch.ones(1, 1, 4)).item() == pytest.approx(ce[:3].mean().item(), rel=1e-5)
    onehot = one_hot_targets(torch.tensor([[[1, IGNORE_INDEX]]]), 3)
    assert onehot[0, :, 0, 0].tolist() == [0, 1, 0] and onehot[0, :, 0, 1].tolist() == [0, 0, 0]


def test_miou_matches_brute_force():
    """METHOD.md 5.2: a class absent from the ground truth but predicted scores 0 and counts in the mean;
    only a class absent from both is skipped."""
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 6, (3, 20, 30), generator=g)
    gt[gt == 5] = IGNORE_INDEX                      # ignore pixels (class 5 is then only predicted)
    pred = torch.randint(0, 8, (3, 20, 30), generator=g)  # predicts classes 6, 7 that are absent from gt
    conf = confusion_matrix(pred[:2], gt[:2]) + confusion_matrix(pred[2:], gt[2:])  # accumulated over batches
    result = scores(conf)
    valid = gt != IGNORE_INDEX
    ious = []
    for c in range(19):
        g_c, p_c = (gt == c) & valid, (pred == c) & valid
        if g_c.any() or p_c.any():
            ious.append(((g_c & p_c).sum() / (g_c | p_c).sum()).item())
        else:
            assert result["iou"][c] != result["iou"][c]  # NaN: neither in the ground truth nor predicted
    assert len(ious) == 8 and result["iou"][5] == result["iou"][6] == result["iou"][7] == 0.0
    assert result["miou"] == pytest.approx(sum(ious) / len(ious))
    assert result["miou"] < sum(ious[:5]) / 5  # the false classes cost mIoU
    assert result["pixel_accuracy"] == pytest.approx(((pred == gt) & valid).sum().item() / valid.sum().item())
    assert [c for c, p in enumerate(result["present"]) if p] == [0, 1, 2, 3, 4]
    table = iou_table(result)
    assert table["class"][0] == "road" and table["iou"][0] == pytest.approx(round(100 * ious[0], 2))
    assert table["iou"][6] == 0.0 and table["iou"][8] is None


def test_confusion_counts_every_valid_pixel_once():
    for gt_class, pred_class in itertools.product(range(3), repeat=2):
        conf = confusion_matrix(torch.full((4, 4), pred_class), torch.full((4, 4), gt_class))
        assert conf[gt_class, pred_class] == 16 and conf.sum() == 16
