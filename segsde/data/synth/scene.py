"""Procedural street scenes: axis-aligned boxes on a ground plane, a camera driving down the road.

World frame (metres): X right, Y down, Z forward along the road; the ground is the plane Y = 0, so
heights above the ground are negative Y. Every box is axis-aligned in the world, which keeps ray casting
to a slab test; independently moving objects translate by ``velocity`` metres per frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from segsde.data.labels import TRAIN_ID
from segsde.errors import SegSDEError

# Surface patterns (evaluated in surface coordinates by the renderer).
NOISE, WINDOWS, STRIPES, TILES, FOLIAGE, VEHICLE = range(6)


@dataclass(frozen=True)
class SynthConfig:
    """Generator settings. ``difficulty`` in [0, 1] scales appearance variation and clutter."""

    height: int = 128
    width: int = 256
    difficulty: float = 0.5
    moving_prob: float = 0.3  # probability that a vehicle, person or rider moves on its own
    noise_std: float = 0.004  # per-frame sensor noise (image values in [0, 1])
    ego_hood: float = 0.07  # fraction of rows taken by the ego car's bonnet (label ignore); 0 disables
    focal: float = 0.62  # fx = fy = focal * width
    camera_height: float = 1.5
    max_depth: float = 150.0  # ground-truth depth beyond this is marked invalid (0)
    texture_detail: float = 1.0  # strength of the fine surface grain (0: the smooth surfaces of earlier versions)

    def __post_init__(self):
        problems = []
        if self.height < 16 or self.width < 16 or self.height % 2 or self.width % 2:
            problems.append(f"size {self.height}x{self.width} must be even and at least 16x16")
        if not 0.0 <= self.difficulty <= 1.0:
            problems.append(f"difficulty {self.difficulty} must lie in [0, 1]")
        if not 0.0 <= self.moving_prob <= 1.0:
            problems.append(f"moving_prob {self.moving_prob} must lie in [0, 1]")
        if not 0.0 <= self.texture_detail <= 2.0:
            problems.append(f"texture_detail {self.texture_detail} must lie in [0, 2]")
        if not 0.0 <= self.ego_hood < 0.5:
            problems.append(f"ego_hood {self.ego_hood} must lie in [0, 0.5)")
        if problems:
            raise SegSDEError("; ".join(problems) + ": fix the generator settings")


@dataclass
class Scene:
    """Everything the renderer needs for one three-frame sequence."""

    bmin: np.ndarray  # [N, 3] box minimum corner at frame t
    bmax: np.ndarray  # [N, 3]
    velocity: np.ndarray  # [N, 3] metres per frame
    class_id: np.ndarray  # [N] trainId
    color: np.ndarray  # [N, 3] base albedo
    pattern: np.ndarray  # [N] pattern code
    tex_offset: np.ndarray  # [N, 2] texture-space offset, so equal materials differ
    road_half: float
    lane_lines: np.ndarray  # x of dashed lane markings
    road_color: np.ndarray
    terrain_color: np.ndarray
    sky_horizon: np.ndarray
    sky_zenith: np.ndarray
    light_dir: np.ndarray  # unit vector towards the sun
    ambient: float
    exposure: np.ndarray  # per-channel tint x brightness
    K: np.ndarray  # [3, 3]
    cam_R: np.ndarray  # [3 frames, 3, 3] camera-to-world rotation
    cam_c: np.ndarray  # [3 frames, 3] camera centre
    config: SynthConfig = field(repr=False, default_factory=SynthConfig)

    @property
    def moving(self) -> np.ndarray:
        return np.abs(self.velocity).sum(1) > 0


def _rot_y(yaw: float, pitch: float = 0.0) -> np.ndarray:
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return ry @ rx


class _Builder:
    def __init__(self, rng: np.random.Generator, difficulty: float):
        self.rng, self.d = rng, difficulty
        self.rows: list[tuple] = []

    def color(self, base, spread=0.15) -> np.ndarray:
        """A colour near ``base``; the spread grows with difficulty so colour alone stops giving the class away."""
        c = np.asarray(base, float) + self.rng.normal(0, spread * (0.5 + self.d), 3)
        return np.clip(c, 0.03, 0.97)

    def any_color(self) -> np.ndarray:
        return np.clip(self.rng.uniform(0.05, 0.95, 3) ** 1.2, 0.03, 0.97)

    def box(self, x0, x1, h0, h1, z0, z1, cls, color, pattern=NOISE, velocity=(0.0, 0.0, 0.0)):
        self.rows.append(((min(x0, x1), -h1, min(z0, z1)), (max(x0, x1), -h0, max(z0, z1)),
                          velocity, TRAIN_ID[cls], color, pattern, self.rng.uniform(0, 256, 2)))

    # -- objects -------------------------------------------------------------------------------
    def car(self, x, z, facing_z=True, velocity=(0.0, 0.0, 0.0)):
        r = self.rng
        length, width = r.uniform(3.8, 4.8), r.uniform(1.6, 1.9)
        lx, lz = (width, length) if facing_z else (length, width)
        body = self.any_color()
        self.box(x - lx / 2, x + lx / 2, 0.3, r.uniform(0.9, 1.1), z - lz / 2, z + lz / 2, "car", body, VEHICLE, velocity)
        cx, cz = (lx * 0.45, lz * 0.28) if facing_z else (lx * 0.28, lz * 0.45)
        self.box(x - cx, x + cx, 0.9, r.uniform(1.35, 1.6), z - cz, z + cz, "car", body * 0.8, WINDOWS, velocity)
        tyre = self.color([0.08, 0.08, 0.08], 0.03)
        for off in (-0.32, 0.32):
            if facing_z:
                self.box(x - lx / 2 + 0.05, x + lx / 2 - 0.05, 0.0, 0.32, z + off * lz - 0.3, z + off * lz + 0.3, "car", tyre, NOISE, velocity)
            else:
                self.box(x + off * lx - 0.3, x + off * lx + 0.3, 0.0, 0.32, z - lz / 2 + 0.05, z + lz / 2 - 0.05, "car", tyre, NOISE, velocity)

    def big_vehicle(self, x, z, kind, velocity=(0.0, 0.0, 0.0)):
        r = self.rng
        width = r.uniform(2.3, 2.55)
        if kind == "bus":
            length, height = r.uniform(10, 13), r.uniform(2.9, 3.3)
            self.box(x - width / 2, x + width / 2, 0.35, height, z - length / 2, z + length / 2, "bus", self.any_color(), WINDOWS, velocity)
        else:
            length, height = r.uniform(6, 9), r.uniform(2.8, 3.6)
            self.box(x - width / 2, x + width / 2, 0.6, height, z - length / 2 + 2.0, z + length / 2, "truck", self.any_color(), NOISE, velocity)
            self.box(x - width / 2, x + width / 2, 0.6, 2.6, z - length / 2, z - length / 2 + 2.0, "truck", self.any_color(), WINDOWS, velocity)
        tyre = self.color([0.08, 0.08, 0.08], 0.03)
        self.box(x - width / 2 + 0.1, x + width / 2 - 0.1, 0, 0.6, z - length / 2 + 0.5, z + length / 2 - 0.5, kind, tyre, NOISE, velocity)

    def person(self, x, z, cls="person", base=0.0, velocity=(0.0, 0.0, 0.0)):
        r = self.rng
        s = r.uniform(0.85, 1.1)
        w = 0.22 * s
        if base == 0.0:
            self.box(x - w, x + w, 0, 0.85 * s, z - 0.12, z + 0.12, cls, self.any_color(), NOISE, velocity)
        torso0 = base if base else 0.85 * s
        self.box(x - w * 1.1, x + w * 1.1, torso0, torso0 + 0.6 * s, z - 0.14, z + 0.14, cls, self.any_color(), NOISE, velocity)
        skin = self.color([0.75, 0.58, 0.45], 0.12)
        self.box(x - 0.1 * s, x + 0.1 * s, torso0 + 0.6 * s, torso0 + 0.84 * s, z - 0.1, z + 0.1, cls, skin, NOISE, velocity)

    def rider(self, x, z, velocity):
        """A rider on a bicycle or motorcycle travelling along the road."""
        motor = self.rng.random() < 0.4
        width = 0.45 if motor else 0.12
        vehicle = "motorcycle" if motor else "bicycle"
        self.box(x - width / 2, x + width / 2, 0.0, 0.95 if motor else 0.75, z - 0.9, z + 0.9, vehicle, self.any_color(), NOISE, velocity)
        self.person(x, z, cls="rider", base=0.95 if motor else 0.85, velocity=velocity)

    def parked_bicycle(self, x, z):
        """Broadside to the road, so the thin frame is seen from the side."""
        self.box(x - 0.85, x + 0.85, 0.0, 0.95, z - 0.05, z + 0.05, "bicycle", self.any_color(), STRIPES)

    def pole(self, x, z, extra: str | None):
        r = self.rng
        h = r.uniform(3.5, 7.0)
        grey = self.color([0.45, 0.45, 0.47], 0.08)
        self.box(x - 0.07, x + 0.07, 0, h, z - 0.07, z + 0.07, "pole", grey, NOISE)
        if extra == "sign":
            hs = r.uniform(2.0, min(3.0, h - 0.4))
            self.box(x - 0.35, x + 0.35, hs, hs + r.uniform(0.5, 0.8), z - 0.12, z - 0.08, "traffic sign", self.any_color(), NOISE)
        elif extra == "light":
            self.box(x - 0.18, x + 0.18, h - 1.0, h, z - 0.3, z - 0.07, "traffic light", self.color([0.12, 0.12, 0.1], 0.05), STRIPES)

    def tree(self, x, z):
        r = self.rng
        trunk_h = r.uniform(1.5, 3.0)
        self.box(x - 0.15, x + 0.15, 0, trunk_h, z - 0.15, z + 0.15, "vegetation", self.color([0.3, 0.22, 0.15], 0.08), NOISE)
        crown = r.uniform(1.2, 2.5)
        self.box(x - crown, x + crown, trunk_h, trunk_h + r.uniform(2, 5), z - crown, z + crown, "vegetation",
                 self.color([0.25, 0.45, 0.15], 0.12), FOLIAGE)


def make_scene(rng: np.random.Generator, cfg: SynthConfig) -> Scene:
    """Lay out one street and a three-frame camera trajectory through it."""
    d = cfg.difficulty
    b = _Builder(rng, d)
    road_half = rng.uniform(4.0, 7.5)
    n_lanes = int(rng.choice([2, 4]))
    lane_w = 2 * road_half / n_lanes
    lane_lines = -road_half + lane_w * np.arange(1, n_lanes)
    end = rng.uniform(60, 130)
    side_w = rng.uniform(2.0, 4.5)
    curb = 0.15

    for s in (-1, 1):
        inner, outer = s * road_half, s * (road_half + side_w)
        b.box(inner, outer, 0, curb, -20, end, "sidewalk", b.color([0.55, 0.53, 0.5], 0.1), TILES)
        z = -15.0
        while z < end:
            kind = rng.choice(["building", "gap", "wall", "fence"], p=[0.55, 0.2, 0.1, 0.15])
            if kind == "building":
                length, setback = rng.uniform(8, 25), rng.uniform(0, 4) * rng.integers(0, 2)
                x0 = outer + s * setback
                b.box(x0, x0 + s * rng.uniform(8, 15), 0, rng.uniform(6, 25), z, z + length, "building",
                      b.color(rng.choice([[0.6, 0.55, 0.5], [0.5, 0.3, 0.25], [0.7, 0.7, 0.72], [0.4, 0.42, 0.5]]), 0.12), WINDOWS)
            else:
                length = rng.uniform(5, 15)
                if kind in ("wall", "fence"):
                    thick, cls, pat = (0.3, "wall", NOISE) if kind == "wall" else (0.08, "fence", STRIPES)
                    b.box(outer, outer + s * thick, 0, rng.uniform(1.0, 2.5), z, z + length, cls,
                          b.color([0.55, 0.5, 0.45], 0.15), pat)
                for _ in range(rng.integers(0, 3)):
                    b.tree(outer + s * rng.uniform(1.5, 6), z + rng.uniform(0, length))
                if rng.random() < 0.4:
                    b.box(outer + s * rng.uniform(8, 12), outer + s * 30, 0, rng.uniform(5, 20), z, z + length, "building",
                          b.color([0.55, 0.5, 0.5], 0.15), WINDOWS)
            z += length
        # street furniture along the curb
        z = rng.uniform(-5, 8)
        while z < end - 5:
            b.pole(inner + s * 0.4, z, rng.choice([None, "sign", "light"], p=[0.35, 0.4, 0.25]))
            z += rng.uniform(6, 18)
        # parked vehicles along the road edge
        z = rng.uniform(2, 10)
        while z < end - 10:
            if rng.random() < 0.55:
                roll = rng.random()
                if roll < 0.1:
                    b.big_vehicle(inner - s * 1.3, z + 4, "truck")
                    z += 6
                elif roll < 0.16:
                    b.big_vehicle(inner - s * 1.3, z + 5, "bus")
                    z += 8
                else:
                    b.car(inner - s * 1.1, z)
            z += rng.uniform(5.5, 9)
        for _ in range(rng.integers(1, 3 + int(5 * d))):
            moving = rng.random() < cfg.moving_prob
            b.person(s * (road_half + rng.uniform(0.6, side_w - 0.3)), rng.uniform(3, end - 5), base=0.0,
                     velocity=(0.0, 0.0, rng.choice([-1, 1]) * rng.uniform(0.05, 0.1) if moving else 0.0))
        for _ in range(rng.integers(0, 3)):
            b.parked_bicycle(s * (road_half + rng.uniform(1.0, side_w - 0.3)), rng.uniform(3, end - 5))

    # traffic in the lanes, some of it moving (the hard case for self-supervised depth)
    cam_lane = int(rng.integers(n_lanes // 2, n_lanes))
    cam_x = -road_half + lane_w * (cam_lane + 0.5)
    for lane in range(n_lanes):
        x = -road_half + lane_w * (lane + 0.5)
        z = rng.uniform(8, 25)
        while z < end - 8:
            moving = rng.random() < cfg.moving_prob
            vz = (1 if lane >= n_lanes // 2 else -1) * rng.uniform(0.2, 1.0) if moving else 0.0
            roll = rng.random()
            if roll < 0.1:
                b.big_vehicle(x, z + 4, "truck", velocity=(0.0, 0.0, vz))
            elif roll < 0.2:
                b.big_vehicle(x, z + 5, "bus", velocity=(0.0, 0.0, vz))
            elif roll < 0.7:
                b.car(x, z, velocity=(0.0, 0.0, vz))
            z += rng.uniform(12, 35)
    for _ in range(rng.integers(0, 3)):
        edge = rng.choice([-1, 1]) * (road_half - 0.6)
        moving = rng.random() < max(cfg.moving_prob, 0.5)
        b.rider(edge, rng.uniform(6, 50), velocity=(0.0, 0.0, rng.uniform(0.15, 0.4) if moving else 0.0))
    if rng.random() < 0.3:  # a pedestrian crossing
        b.person(rng.uniform(-road_half, road_half), rng.uniform(10, 30), base=0.0,
                 velocity=(rng.choice([-1, 1]) * 0.07 if rng.random() < cfg.moving_prob else 0.0, 0.0, 0.0))
    # the street ends in a row of buildings or trees, which bounds the depth range
    if rng.random() < 0.7:
        b.box(-80, 80, 0, rng.uniform(10, 35), end, end + 10, "building", b.color([0.6, 0.58, 0.55], 0.15), WINDOWS)
    else:
        b.box(-80, 80, 0, rng.uniform(6, 15), end, end + 10, "vegetation", b.color([0.2, 0.38, 0.15], 0.1), FOLIAGE)

    cols = list(zip(*b.rows))
    K = np.array([[cfg.focal * cfg.width, 0, cfg.width / 2 - 0.5 + rng.normal(0, 1)],
                  [0, cfg.focal * cfg.width, cfg.height / 2 - 0.5 + rng.normal(0, 1)],
                  [0, 0, 1]])
    speed = rng.uniform(0.4, 1.2)
    cam_R, cam_c = [], []
    yaw0 = rng.normal(0, 0.02)
    for f in (-1, 0, 1):
        cam_R.append(_rot_y(yaw0 + f * rng.normal(0, 0.01 + 0.01 * d), rng.normal(0, 0.004)))
        cam_c.append([cam_x + rng.normal(0, 0.03), -cfg.camera_height + rng.normal(0, 0.01), f * speed])
    light = np.array([rng.uniform(-1, 1), -rng.uniform(0.4, 1.5), rng.uniform(-1, 1)])
    return Scene(
        bmin=np.array(cols[0], float), bmax=np.array(cols[1], float), velocity=np.array(cols[2], float),
        class_id=np.array(cols[3], np.uint8), color=np.array(cols[4], float), pattern=np.array(cols[5], np.int8),
        tex_offset=np.array(cols[6], float), road_half=road_half, lane_lines=lane_lines,
        road_color=b.color([0.28, 0.28, 0.3], 0.05), terrain_color=b.color([0.38, 0.42, 0.22], 0.1),
        sky_horizon=b.color([0.8, 0.85, 0.9], 0.06), sky_zenith=b.color([0.35, 0.55, 0.85], 0.1),
        light_dir=light / np.linalg.norm(light), ambient=rng.uniform(0.35, 0.6),
        exposure=rng.uniform(0.8, 1.15) * (1 + rng.normal(0, 0.04 + 0.06 * d, 3)),
        K=K, cam_R=np.array(cam_R), cam_c=np.array(cam_c), config=cfg,
    )
