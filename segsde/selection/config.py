"""Typed configuration of automatic data selection; values come from the ``select`` section of a profile."""

from __future__ import annotations

from dataclasses import dataclass

from segsde.configs import PRECISIONS, check, config_from_dict

# sde: the paper's ds_us (diversity + depth difficulty); diversity: ds; difficulty: us; entropy: active
# learning with labels in the loop; random: a seeded permutation
METHODS = ("sde", "diversity", "difficulty", "entropy", "random")
NEEDS_FEATURES = ("sde", "diversity")
NEEDS_STUDENT = ("sde", "difficulty")


@dataclass(frozen=True)
class SelectionConfig:
    budgets: tuple[int, ...] = (25, 50, 100, 200, 372, 744)   # rounds; each list is a prefix of the next
    seed: int = 0
    pseudo_depth: str = "pseudo_depth"  # the dataset's side column of SDE pseudo-depth its student learns (per SDE model)
    weight: float = 1000.0               # beta: score = distance to the selected set + weight * difficulty
    # diversity features: SDE decoder layer 6 (1/8 resolution) average-pooled to this grid
    grid: tuple[int, int] = (4, 8)
    feature_batch: int = 4
    # beyond this many N x D feature values, IFP runs on a random projection to projection_dim
    # (exact IFP costs one N x D pass per pick; see benchmarks/bench_selection.py)
    max_exact_values: int = 2**28
    projection_dim: int = 1024
    # the per-round model: a depth student (sde, difficulty) or a segmentation net (entropy), from scratch
    student_encoder: int = 50
    student_output_stride: int = 16
    student_weights: str | None = "imagenet"
    student_decoder_channels: tuple[int, ...] = (64, 64, 128, 128, 256)   # "dec9", with batch norm
    student_steps: int = 4000            # round r (1, 2, ...) trains r x student_steps iterations
    student_lr: float = 1e-4             # Adam, poly(0.9) decay
    student_batch: int = 2
    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = (512, 512)
    berhu_threshold: float = 0.2         # x the largest residual of the batch
    train_bottom_mask: float = 0.1       # rows left out of the student's loss
    # difficulty map
    far_disparity: float = 0.07
    far_dilation: int = 7
    ego_bottom_mask: float = 0.13        # the ego car in Cityscapes; 0 on the synthetic testbed
    score_batch: int = 4
    log_interval: int = 50
    checkpoint_interval: int = 1000
    threads: int | None = None
    precision: str = "auto"        # auto: bf16 on GPU and native-bf16 CPUs, else fp32 | bf16 | fp32

    def round_steps(self, round_index: int) -> int:
        return round_index * self.student_steps

    def with_budget(self, budget: int) -> SelectionConfig:
        """This schedule up to ``budget``: its smaller budgets, then ``budget`` as the last round. Rounds
        never depend on later ones, so the list is the prefix of any longer schedule's, without paying
        for the rounds beyond ``budget``."""
        from dataclasses import replace

        return replace(self, budgets=(*(b for b in self.budgets if b < budget), budget))

    @classmethod
    def from_dict(cls, values: dict, where: str = "the select config") -> SelectionConfig:
        return config_from_dict(cls, values, where)

    def validate(self, where: str = "the select config") -> None:
        b = self.budgets
        check([
            (len(b) >= 1 and b[0] >= 1 and all(x < y for x, y in zip(b, b[1:])),
             f"budgets must be positive and strictly increasing (got {list(b)}), e.g. 25,50,100"),
            (self.weight >= 0, "weight must be >= 0"),
            (len(self.grid) == 2 and min(self.grid) >= 1, "grid must be two positive sizes, e.g. [4, 8]"),
            (self.student_steps >= 1 and self.student_batch >= 2,
             "student_steps must be >= 1 and student_batch >= 2 (the ASPP's batch norm needs two samples)"),
            (len(self.student_decoder_channels) == 5, "student_decoder_channels needs 5 widths"),
            (self.student_lr > 0, "student_lr must be > 0"),
            (0 <= self.train_bottom_mask < 1 and 0 <= self.ego_bottom_mask < 1, "bottom-row masks are fractions in [0, 1)"),
            (self.far_dilation % 2 == 1, "far_dilation must be odd"),
            (self.crop is None or (self.crop[0] % 32 == 0 and self.crop[1] % 32 == 0), "crop sides must be multiples of 32"),
            (self.projection_dim >= 1 and self.max_exact_values >= 1, "projection_dim and max_exact_values must be >= 1"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
        ], where)
