"""Typed configuration of one semi-supervised segmentation trial.

A trial = the ``train`` section of a profile (schedule, sizes, optimiser) + a component-study row from
``ablations/component_study.yaml`` (which components are on) + ``--set`` overrides. Every component is an
independent switch, so any row is a set of flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from segsde.configs import PRECISIONS, check, config_from_dict
from segsde.selection.config import METHODS as SELECTION_METHODS

MIX_MODES = ("none", "class", "depth")             # none: pseudo-labels on strongly augmented unlabeled images
MIX_POOLS = ("unlabeled", "all_with_gt")           # all_with_gt: labeled images join with one-hot targets
DEPTH_SOURCES = ("sde", "student", "teacher", "ground_truth")
CONFIDENCE_MODES = ("per_pixel", "batch_fraction")
LABELED_SETS = ("random", "selection", "all")     # all: every training image (the fully supervised upper bound)
SDE_MODELS = ("self_supervised", "depth_oracle")  # depth_oracle: the SDE net trained on the testbed's true depth
EVAL_SPLITS = ("val", "tune")  # tune: held out of training and of the study's report (segsde.data.store)


@dataclass(frozen=True)
class TrainConfig:
    # networks
    encoder: int = 101
    output_stride: int = 16
    decoder_channels: tuple[int, ...] = (64, 128, 128, 256, 256)
    weights: str | None = "imagenet"     # encoder init without transfer: None | "imagenet" | state-dict path
    transfer: bool = False               # encoder + decoder (ASPP included) from the SDE checkpoint
    sde_model: str = "self_supervised"   # which SDE stage a study gives it: depth_oracle is a positive control
    multitask: bool = False              # two decoders exchanging features at 1/4 + the SDE loss (needs transfer)
    # labeled set
    labeled: str = "random"              # random: seeded permutation prefix | selection: prefix of an ordered list | all
    selection: str | None = None         # the selection method of a `selection` row (sde, entropy, ...)
    budget: int = 372
    seed: int = 0                        # the labeled subset and, with ``replicate``, every stream of training noise
    replicate: int = 0                   # another training-noise stream (init, batch order, augmentation), same labels
    # mean teacher and mixing
    teacher: bool = False
    ema_alpha: float = 0.99
    mix: str = "none"
    mix_pool: str = "unlabeled"
    pool_sequences: bool = False         # multitask: the pool adds the dataset's unlabeled video split, where it has one
    depth_source: str = "sde"
    epsilon: float = 0.03                # DepthMix, in per-image min-max normalised disparity
    confidence: str = "per_pixel"
    confidence_threshold: float = 0.968
    # loss weights
    seg_weight: float = 1.0
    unsup_weight: float = 1.0
    sde_weight: float = 1.0              # multitask only
    # schedule and optimiser (SGD, the original's values)
    steps: int = 40_000
    batch_labeled: int = 2
    batch_unlabeled: int = 2
    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = (512, 512)
    lr_decoder: float = 1e-2
    lr_encoder: float = 1e-3
    lr_pose: float = 1e-6
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_step: int | None = 30_000   # x0.1 from this step on (None: never)
    grad_clip: float = 10.0
    # strong augmentation of mixed images
    jitter_p: float = 0.8
    jitter_strength: float = 0.25
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    # evaluation and bookkeeping
    eval_interval: int = 2500
    checkpoint_interval: int = 2500
    log_interval: int = 50
    val_images: int | None = None        # None: the whole validation split
    eval_split: str = "val"              # "tune": a sweep's search scores on images the study never reports on
    eval_full_resolution: bool = False   # Cityscapes: also score against the native 2048x1024 labels
    threads: int | None = None
    precision: str = "auto"             # auto: bf16 on GPU and native-bf16 CPUs, else fp32 | bf16 | fp32
    loader_workers: int = 0

    @property
    def uses_unlabeled(self) -> bool:
        return self.teacher or self.multitask

    @property
    def images_per_pass(self) -> int:
        """The most images one pass of the student takes: the multi-task pass runs labeled and pool frames together."""
        return self.batch_labeled + self.batch_unlabeled if self.multitask else max(self.batch_labeled, self.batch_unlabeled)

    @property
    def needs_sde(self) -> bool:
        return self.transfer or self.multitask or (self.teacher and self.mix == "depth" and self.depth_source == "sde")

    @property
    def relative_cost(self) -> float:
        """Compute per trial in images through a single-task network per step (forward + backward): the
        multi-task net runs two decoders and the pose net over labeled + pool triplets (about 1.9x per
        image), a teacher adds its forward pass and the student's pass over the mixed pool batch. Only
        the order matters (the study starts the longest trials first); `benchmarks/bench_train.py` measures the
        real step times."""
        per_image = 1.9 if self.multitask else 1.0
        images = self.batch_labeled + (self.batch_unlabeled if self.multitask else 0)
        return self.steps * (per_image * images + (4 / 3 * self.batch_unlabeled if self.teacher else 0))

    def lr_factor(self, step: int) -> float:
        return 0.1 if self.lr_decay_step is not None and step >= self.lr_decay_step else 1.0

    @classmethod
    def from_dict(cls, values: dict, where: str = "the train config") -> TrainConfig:
        return config_from_dict(cls, values, where)

    def validate(self, where: str = "the train config") -> None:
        check([
            (self.mix in MIX_MODES, f"mix must be one of {MIX_MODES}"),
            (self.eval_split in EVAL_SPLITS, f"eval_split must be one of {EVAL_SPLITS}"),
            (self.mix_pool in MIX_POOLS, f"mix_pool must be one of {MIX_POOLS}"),
            (self.depth_source in DEPTH_SOURCES, f"depth_source must be one of {DEPTH_SOURCES}"),
            (self.confidence in CONFIDENCE_MODES, f"confidence must be one of {CONFIDENCE_MODES}"),
            (self.labeled in LABELED_SETS, f"labeled must be one of {LABELED_SETS}"),
            (self.sde_model in SDE_MODELS, f"sde_model must be one of {SDE_MODELS}"),
            (self.labeled != "all" or not self.uses_unlabeled, "labeled 'all' leaves no unlabeled image: turn teacher and multitask off"),
            (self.selection is None or self.selection in SELECTION_METHODS, f"selection must be one of {SELECTION_METHODS}"),
            (self.mix == "none" or self.teacher, "mixing needs pseudo-labels: set teacher: true or mix: none"),
            (not (self.mix == "depth" and self.depth_source == "student") or self.multitask,
             "depth_source 'student' needs the multi-task decoder (multitask: true): use 'sde' otherwise"),
            (not (self.mix == "depth" and self.depth_source == "teacher") or self.multitask,
             "depth_source 'teacher' needs the multi-task decoder (multitask: true): use 'sde' otherwise"),
            (not self.multitask or self.transfer, "multitask initialises both decoders from SDE: set transfer: true too"),
            (self.budget >= 1 and self.steps >= 1, "budget and steps must be >= 1"),
            (self.seed >= 0 and self.replicate >= 0, "seed and replicate must be >= 0"),
            (self.batch_labeled >= 2 and self.batch_unlabeled >= 2,
             "batch_labeled and batch_unlabeled must be >= 2 (the ASPP's batch norm needs two samples)"),
            (0 <= self.ema_alpha < 1, "ema_alpha must be in [0, 1)"),
            (0 < self.confidence_threshold <= 1, "confidence_threshold must be in (0, 1]"),
            (0 <= self.epsilon < 1, "epsilon must be in [0, 1) (a tolerance on normalised disparity)"),
            (all(0 <= w < float("inf") for w in (self.seg_weight, self.unsup_weight, self.sde_weight)),
             "loss weights must be finite and >= 0"),
            (min(self.lr_decoder, self.lr_encoder, self.lr_pose) >= 0, "learning rates must be >= 0"),
            (len(self.decoder_channels) == 5 and min(self.decoder_channels) > 0, "decoder_channels needs 5 positive widths"),
            (self.crop is None or (self.crop[0] % 32 == 0 and self.crop[1] % 32 == 0), "crop sides must be multiples of 32"),
            (self.eval_interval >= 1 and self.checkpoint_interval >= 1 and self.log_interval >= 1, "intervals must be >= 1"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
        ], where)


CONFUSIONS_FILE = "per_image_confusion.json"
SCORE_KEYS = ("miou", "best_miou", "pixel_accuracy", "full_miou", "full_pixel_accuracy", "teacher_miou")


SHARES = SCORE_KEYS + ("confident_fraction", "mask_ratio", "unsup_ratio")


def in_percent(values: dict[str, float]) -> dict[str, float]:
    """``values`` with every score and share (mIoU, class IoU, pixel accuracy, what the components did) in percent,
    the unit of the report, for MLflow; Tune and the cached results keep fractions. Keys may carry a prefix
    (``val/``, ``final/``, ``train/``)."""
    def share(key: str) -> bool:
        name = key.split("/", 1)[1] if key.startswith(("val/", "final/", "train/")) else key
        return name in SHARES or name.startswith(("iou/", "acted/"))

    return {k: 100 * v if share(k) else v for k, v in values.items()}


def final_scores(metrics: dict) -> dict:
    """The scores of a trial's report that make its result: SCORE_KEYS, the class IoUs, what its components did
    (``acted/*``); the final evaluation's per-image confusions go to CONFUSIONS_FILE beside the result."""
    return {k: v for k, v in metrics.items() if k in SCORE_KEYS or k.startswith(("iou/", "acted/"))}
