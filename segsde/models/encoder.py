"""ResNet encoders from torchvision, returning the five feature maps the decoders use.

Maps 0-4 (H, W = input size):
    0  stem after ReLU          [B, 64, H/2, W/2]
    1  stage 1 (after max-pool) [B, c1, H/4, W/4]       c1 = 64 (ResNet-18/34) or 256 (50/101)
    2  stage 2                  [B, c2, H/8, W/8]       128 / 512
    3  stage 3                  [B, c3, H/16, W/16]     256 / 1024
    4  stage 4                  [B, c4, H/os, W/os]     512 / 2048, os = output stride 16 (dilated) or 32
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from segsde.errors import SegSDEError

ARCHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101"}
WEIGHT_ENUMS = {18: "ResNet18_Weights", 34: "ResNet34_Weights", 50: "ResNet50_Weights", 101: "ResNet101_Weights"}
#: monodepth2's input normalisation, which the original keeps for every network
INPUT_MEAN, INPUT_STD = 0.45, 0.225


def _arch(depth: int) -> int:
    if depth not in ARCHS:
        raise SegSDEError(f"ResNet-{depth} is not supported: use one of {sorted(ARCHS)}")
    return depth


def load_resnet_state(depth: int, weights: str | Path | None) -> dict | None:
    """State dict of an ImageNet ResNet: ``None`` (random init), ``"imagenet"`` (torchvision's weight enum:
    downloaded when online, read from the torch hub cache otherwise) or a path to a saved state dict."""
    if weights is None or weights == "none":
        return None
    if weights == "imagenet":
        enum = getattr(torchvision.models, WEIGHT_ENUMS[_arch(depth)]).IMAGENET1K_V1
        try:
            return enum.get_state_dict(progress=False)
        except Exception as exc:  # URLError, OSError, ...: no network and nothing in the cache
            raise SegSDEError(f"cannot load ImageNet weights for ResNet-{depth} ({type(exc).__name__}): put "
                              f"{enum.url.rsplit('/', 1)[-1]} in {torch.hub.get_dir()}/checkpoints or pass a state-dict file") from exc
    path = Path(weights)
    if not path.is_file():
        raise SegSDEError(f"weights file {path} does not exist: pass 'imagenet', 'none' or an existing state-dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SegSDEError(f"weights file {path} is not a readable torch state dict ({exc}): save it with torch.save(model.state_dict())") from exc
    if not isinstance(state, dict):
        raise SegSDEError(f"weights file {path} holds a {type(state).__name__}, not a state dict: save model.state_dict()")
    return state


def _check_and_load(net: nn.Module, state: dict, what: str) -> None:
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is not used
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or wrong:
        raise SegSDEError(f"{what} does not fit this network ({len(missing)} missing, {len(wrong)} mis-shaped keys, "
                          f"e.g. {(missing + wrong)[:2]}): use weights of the same ResNet depth")
    net.load_state_dict(state, strict=False)


class ResNetEncoder(nn.Module):
    """torchvision ResNet-``depth`` returning feature maps 0-4 (see the module docstring).

    ``in_frames`` > 1 stacks frames on the channel axis (the pose network's 6-channel input); ImageNet
    conv1 weights are then repeated per frame and divided by the frame count, so the response to identical
    frames equals the single-image one.
    """

    def __init__(self, depth: int = 18, weights: str | Path | None = None, output_stride: int = 32, in_frames: int = 1):
        super().__init__()
        _arch(depth)
        if output_stride not in (16, 32):
            raise SegSDEError(f"output stride {output_stride} is not supported: use 16 or 32")
        dilate = output_stride == 16
        if dilate and depth < 50:
            raise SegSDEError(f"ResNet-{depth} (BasicBlock) cannot be dilated to output stride 16: "
                              "use output_stride 32, or ResNet-50/101")
        net = getattr(torchvision.models, ARCHS[depth])(weights=None, replace_stride_with_dilation=[False, False, dilate])
        state = load_resnet_state(depth, weights)
        if state is not None:
            _check_and_load(net, state, f"weights '{weights}'")
        if in_frames > 1:
            conv = net.conv1
            net.conv1 = nn.Conv2d(3 * in_frames, 64, kernel_size=7, stride=2, padding=3, bias=False)
            with torch.no_grad():
                net.conv1.weight.copy_(conv.weight.repeat(1, in_frames, 1, 1) / in_frames)
        del net.fc
        self.net, self.depth, self.output_stride = net, depth, output_stride
        wide = depth >= 50
        self.channels = [64, 256, 512, 1024, 2048] if wide else [64, 64, 128, 256, 512]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B, 3*in_frames, H, W] in [0, 1] -> five maps (H and W divisible by 32)."""
        n = self.net
        x0 = n.relu(n.bn1(n.conv1((x - INPUT_MEAN) / INPUT_STD)))
        x1 = n.layer1(n.maxpool(x0))
        x2 = n.layer2(x1)
        x3 = n.layer3(x2)
        return [x0, x1, x2, x3, n.layer4(x3)]


class FrozenFeatures(nn.Module):
    """A frozen copy of the ImageNet encoder for the feature-distance loss (always eval, never trained)."""

    def __init__(self, encoder: ResNetEncoder):
        super().__init__()
        import copy

        self.encoder = copy.deepcopy(encoder).eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # keep BN statistics fixed whatever the parent does
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[4]


def feature_distance(features: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, h, w] x2 -> (mean over positions of the per-position L2 distance, the original's Frobenius norm).

    The first is independent of batch and crop size. The original used the second (a Frobenius norm over
    the whole batch), whose value grows with sqrt(B h w); it is returned for logging only.
    """
    diff = features.float() - reference.float()
    return diff.pow(2).sum(1).add(1e-12).sqrt().mean(), diff.norm()
