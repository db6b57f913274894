"""Typed configuration of SDE pre-training; values come from the ``sde`` section of a profile."""

from __future__ import annotations

from dataclasses import dataclass

from segsde.configs import PRECISIONS, check, config_from_dict

ORACLES = ("none", "poses", "depth")


@dataclass(frozen=True)
class SDEConfig:
    # networks
    encoder: int = 18                        # ResNet depth of the depth encoder (the paper: 101)
    output_stride: int = 32                  # 16 dilates the last stage (ResNet-50/101 only)
    decoder_channels: tuple[int, ...] = (64, 128, 128, 256, 256)  # stage 0..4; monodepth2 uses (16, 32, 64, 128, 256)
    weights: str | None = None               # None | "imagenet" | path to a state dict (encoder and pose net)
    pose_input_scale: float = 1.0            # the pose net sees the pair resized by this factor
    pose_flip_average: bool = False          # average each pose with the mirrored pair's, mirrored back
    pose_output_scale: float = 0.01          # monodepth2's; larger starts from larger motions (faster from scratch)
    # view synthesis (the paper's values)
    min_depth: float = 0.1
    max_depth: float = 100.0
    scales: int = 4
    smoothness: float = 1e-3
    automask: bool = True
    normalise_disparity: bool = False        # [ours] divide each image's disparity by its mean before warping
    photometric_resolution: str = "full"     # "full": monodepth2 (every scale upsampled); "scale": monodepth1 (each at its own)
    # a diagnosis on the synthetic testbed, not a method: "poses" warps with its ground-truth relative poses
    # instead of the pose net's, "depth" trains on its ground-truth depth (scale-invariant log loss) instead of
    # view synthesis; what the same network, data and steps reach with that ground truth bounds the method
    oracle: str = "none"
    # schedule: phase 1 trains decoder + pose with a frozen encoder, phase 2 everything
    phase1_steps: int = 300_000
    phase2_steps: int = 50_000
    lr_phase1: float = 1e-4
    lr_phase2: float = 1e-5
    lr_decay_step: int | None = 160_000      # x0.1 at this global step (None: never)
    feature_distance: float = 0.64           # phase-2 weight of the per-position ImageNet feature distance
    batch_size: int = 4
    resize: tuple[int, int] | None = None    # (H, W) before cropping
    crop: tuple[int, int] | None = (512, 512)
    color_jitter: float = 0.5                # probability; the same draw for all three frames
    sequences: bool = True                   # train on the dataset's unlabeled video split too, where it has one
    # bookkeeping
    seed: int = 0
    log_interval: int = 50
    val_interval: int = 5000
    checkpoint_interval: int = 5000
    val_images: int | None = None            # None: the whole validation split
    eval_max_depth: float = 80.0             # monodepth2's evaluation cap
    threads: int | None = None               # torch CPU threads per worker (None: leave torch's default)
    precision: str = "auto"                  # auto: bf16 on GPU and native-bf16 CPUs, else fp32 | bf16 | fp32
    loader_workers: int = 0

    @property
    def total_steps(self) -> int:
        return self.phase1_steps + self.phase2_steps

    def phase(self, step: int) -> int:
        return 1 if step < self.phase1_steps else 2

    def lr(self, step: int) -> float:
        base = self.lr_phase1 if self.phase(step) == 1 else self.lr_phase2
        return base * (0.1 if self.lr_decay_step is not None and step >= self.lr_decay_step else 1.0)

    @classmethod
    def from_dict(cls, values: dict, where: str = "the sde config") -> SDEConfig:
        return config_from_dict(cls, values, where)

    def validate(self, where: str = "the sde config") -> None:
        checks = [
            (self.phase1_steps >= 0 and self.phase2_steps >= 0 and self.total_steps > 0, "phase1_steps + phase2_steps must be > 0"),
            (self.batch_size >= 2, "batch_size must be >= 2 (the ASPP's batch norm needs two samples)"),
            (0 < self.min_depth < self.max_depth, "need 0 < min_depth < max_depth"),
            (1 <= self.scales <= 4, "scales must be 1-4"),
            (len(self.decoder_channels) == 5 and min(self.decoder_channels) > 0, "decoder_channels needs 5 positive widths (stage 0..4)"),
            (0 < self.pose_input_scale <= 1, "pose_input_scale must be in (0, 1]"),
            (self.pose_output_scale > 0, "pose_output_scale must be > 0"),
            (self.photometric_resolution in ("full", "scale"), "photometric_resolution must be 'full' or 'scale'"),
            (self.oracle in ORACLES, f"oracle must be one of {ORACLES}"),
            (not (self.oracle == "poses" and self.normalise_disparity),
             "oracle 'poses' gives metric translations, which a mean-normalised disparity cannot match: set normalise_disparity=false"),
            (self.feature_distance >= 0 and self.smoothness >= 0, "loss weights must be >= 0"),
            (0 <= self.color_jitter <= 1, "color_jitter is a probability in [0, 1]"),
            (self.crop is None or (self.crop[0] % 32 == 0 and self.crop[1] % 32 == 0), "crop sides must be multiples of 32"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
        ]
        check(checks, where)
