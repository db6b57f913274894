"""Ray-casting renderer for :mod:`segsde.data.synth.scene`.

One ray per pixel; boxes are intersected with a slab test restricted to each box's projected screen
rectangle, and a z-buffer resolves occlusion. Textures live in world (or object) coordinates and shading
depends only on surface orientation, so a static point looks the same in every frame: the property that
self-supervised photometric losses need, and that the tests check by re-projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from segsde.data.labels import IGNORE_INDEX, TRAIN_ID
from segsde.data.synth.scene import FOLIAGE, NOISE, STRIPES, TILES, VEHICLE, WINDOWS, Scene

SKY, GROUND, HOOD = -1, -2, -3
_NEAR = 0.05


def _make_noise_table(size: int = 256, seed: int = 1234) -> np.ndarray:
    """A smooth, tileable value-noise table in [0, 1] (fixed: part of the testbed's definition)."""
    white = np.random.default_rng(seed).standard_normal((size, size))
    f = np.fft.fftfreq(size)
    radius2 = f[:, None] ** 2 + f[None, :] ** 2
    smooth = np.real(np.fft.ifft2(np.fft.fft2(white) * np.exp(-radius2 * (size / 6.0) ** 2)))
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return smooth.astype(np.float32).ravel()


_NOISE = _make_noise_table()
_NOISE_MEAN = float(_NOISE.mean())


def noise(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup of the noise table at texel coordinates (u, v), wrapping around."""
    x0, y0 = np.floor(u), np.floor(v)
    fx, fy = (u - x0).astype(np.float32), (v - y0).astype(np.float32)
    x0, y0 = x0.astype(np.int64) & 255, y0.astype(np.int64) & 255
    x1, y1 = (x0 + 1) & 255, (y0 + 1) & 255
    r0, r1 = y0 << 8, y1 << 8
    top = _NOISE[r0 + x0] * (1 - fx) + _NOISE[r0 + x1] * fx
    bottom = _NOISE[r1 + x0] * (1 - fx) + _NOISE[r1 + x1] * fx
    return top * (1 - fy) + bottom * fy


def fractal(u, v, scale: float) -> np.ndarray:
    """Two octaves of noise; ``scale`` is texels per metre."""
    return 0.65 * noise(u * scale, v * scale) + 0.35 * noise(u * scale * 2.7 + 31.0, v * scale * 2.7 + 17.0)


# Fine grain (asphalt, plaster, paint): two octaves of the noise table with wavelengths of about 0.54 and
# 0.23 m. Photometric self-supervision learns depth from texture; with the smooth noise above alone
# (wavelengths of metres) roads and walls are nearly flat-shaded, which real street images are not.
_DETAIL_OCTAVES = ((80.0, 7.0, 43.0 / 80.0), (190.0, 91.0, 43.0 / 190.0))  # texels per metre, offset, wavelength (m)


def detail(u: np.ndarray, v: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Zero-mean fine grain in about [-0.25, 0.25] at surface coordinates (u, v) in metres. Each octave fades
    out as the pixel's footprint on the surface (metres) nears half its wavelength: a cheap mip-map, so
    that distant texture does not alias into a pattern that shimmers from frame to frame."""
    out = np.zeros(len(u), np.float32)
    for scale, offset, wavelength in _DETAIL_OCTAVES:
        weight = np.clip(2.0 - 4.0 * footprint / wavelength, 0.0, 1.0).astype(np.float32)
        out += 0.5 * weight * (noise(u * scale + offset, v * scale + offset * 0.6) - _NOISE_MEAN)
    return out


def pixel_footprint(zbuf: np.ndarray, dirs: np.ndarray, normal_axis: np.ndarray | int, focal: float) -> np.ndarray:
    """Metres of surface one pixel covers: distance / focal, stretched by the viewing obliqueness.
    ``dirs`` [3, n] are ray directions with camera-space z = 1 (so distance = zbuf * |dir|)."""
    norm = np.sqrt((dirs * dirs).sum(0))
    cos = np.abs(dirs[normal_axis, np.arange(dirs.shape[1])]) / norm  # the direction's component along the normal
    return zbuf * norm / focal / np.maximum(cos, 0.05)


@dataclass
class Frame:
    image: np.ndarray  # [H, W, 3] float32 in [0, 1]
    depth: np.ndarray  # [H, W] float32 z-depth in metres, 0 where invalid (sky, bonnet, too far)
    label: np.ndarray  # [H, W] uint8 trainIds, 255 = ignore
    dynamic: np.ndarray  # [H, W] bool: pixels that move on their own (moving objects, ego bonnet)


def _ray_directions(scene: Scene, frame: int) -> np.ndarray:
    """World-space ray directions [3, H, W] whose camera-space z component is 1 (so ray t = z-depth)."""
    cfg = scene.config
    v, u = np.mgrid[0 : cfg.height, 0 : cfg.width].astype(np.float64)
    pix = np.stack([u, v, np.ones_like(u)]).reshape(3, -1)
    return (scene.cam_R[frame] @ np.linalg.inv(scene.K) @ pix).reshape(3, cfg.height, cfg.width)


def _screen_rects(scene: Scene, frame: int, bmin: np.ndarray, bmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, 4] pixel rectangles (v0, v1, u0, u1) that contain each box's projection (empty when behind),
    and [N] the nearest camera z of each box (a lower bound on its depth)."""
    cfg = scene.config
    idx = np.array([[(i >> a) & 1 for a in range(3)] for i in range(8)])  # corner selectors
    corners = np.where(idx[None], bmax[:, None], bmin[:, None])  # [N, 8, 3]
    cam = (corners - scene.cam_c[frame]) @ scene.cam_R[frame]  # world -> camera (R^T p)
    z = cam[..., 2]
    pix = cam @ scene.K.T
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = pix[..., 0] / z, pix[..., 1] / z
    rects = np.stack([np.floor(v.min(1)) - 1, np.ceil(v.max(1)) + 2, np.floor(u.min(1)) - 1, np.ceil(u.max(1)) + 2], 1)
    straddles = (z < _NEAR).any(1)
    rects[straddles] = [0, cfg.height, 0, cfg.width]
    rects[(z < _NEAR).all(1)] = 0
    rects[:, :2] = np.clip(rects[:, :2], 0, cfg.height)
    rects[:, 2:] = np.clip(rects[:, 2:], 0, cfg.width)
    return rects.astype(np.int64), np.maximum(z.min(1), 0.0)


def cast_boxes_numpy(inv, lo, hi, rects, nearest, order, zbuf, hit) -> None:
    """Reference slab test, vectorised per box: updates ``zbuf`` [H, W] and ``hit`` [H, W] in place.

    inv [3, H, W]: 1 / world ray direction; lo, hi [N, 3]: box corners minus the camera centre;
    rects [N, 4]: (v0, v1, u0, u1) screen rectangles; nearest [N]: lower bound of each box's depth.
    """
    for i in order:
        v0, v1, u0, u1 = rects[i]
        if v1 <= v0 or u1 <= u0:
            continue
        zb = zbuf[v0:v1, u0:u1]
        if zb.max() < nearest[i]:  # everything in its rectangle is already closer
            continue
        iv = inv[:, v0:v1, u0:u1]
        t1, t2 = lo[i][:, None, None] * iv, hi[i][:, None, None] * iv
        tnear = np.minimum(t1, t2).max(0)
        tfar = np.maximum(t1, t2).min(0)
        m = (tnear <= tfar) & (tnear > _NEAR) & (tnear < zb)
        zb[m] = tnear[m]
        hit[v0:v1, u0:u1][m] = i


@numba.njit(cache=True, nogil=True)
def cast_boxes_compiled(inv, lo, hi, rects, nearest, order, zbuf, hit):  # pragma: no cover - compiled
    """The same computation as :func:`cast_boxes_numpy`, pixel by pixel (benchmarks/bench_synth.py compares them)."""
    for k in range(order.shape[0]):
        i = order[k]
        v0, v1, u0, u1 = rects[i, 0], rects[i, 1], rects[i, 2], rects[i, 3]
        for v in range(v0, v1):
            for u in range(u0, u1):
                zb = zbuf[v, u]
                if zb < nearest[i]:
                    continue
                tnear, tfar = np.float32(-np.inf), np.float32(np.inf)
                for a in range(3):
                    t1, t2 = lo[i, a] * inv[a, v, u], hi[i, a] * inv[a, v, u]
                    tnear = max(tnear, min(t1, t2))
                    tfar = min(tfar, max(t1, t2))
                if tnear <= tfar and tnear > _NEAR and tnear < zb:
                    zbuf[v, u] = tnear
                    hit[v, u] = i


CAST_BOXES = cast_boxes_compiled


def render_frame(scene: Scene, frame: int) -> Frame:
    """Render frame 0 (t-1), 1 (t) or 2 (t+1) of the scene."""
    cfg = scene.config
    H, W = cfg.height, cfg.width
    c = scene.cam_c[frame]
    dirs = _ray_directions(scene, frame)
    inv = (1.0 / np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)).astype(np.float32)
    shift = scene.velocity * (frame - 1)
    bmin, bmax = scene.bmin + shift, scene.bmax + shift

    zbuf = np.full((H, W), np.inf, np.float32)
    hit = np.full((H, W), SKY, dtype=np.int64)
    down = dirs[1] > 1e-9
    zbuf[down] = -c[1] / dirs[1][down]
    hit[down] = GROUND

    rects, nearest = _screen_rects(scene, frame, bmin, bmax)
    order = np.argsort(nearest, kind="stable")  # front to back, so hidden boxes can be skipped
    CAST_BOXES(inv, (bmin - c).astype(np.float32), (bmax - c).astype(np.float32), rects, nearest.astype(np.float32),
               order, zbuf, hit)

    if cfg.ego_hood > 0:
        u = np.arange(W)
        edge = H * (1 - cfg.ego_hood) + H * 0.03 * ((u - W / 2) / (W / 2)) ** 2
        hood = np.arange(H)[:, None] >= edge[None, :]
        hit[hood] = HOOD

    image, label = _shade(scene, frame, dirs, zbuf, hit, bmin, bmax)
    depth = np.where((hit >= GROUND) & (zbuf <= cfg.max_depth), zbuf, 0.0).astype(np.float32)
    moving = np.append(scene.moving, False)
    dynamic = (hit == HOOD) | moving[np.where(hit >= 0, hit, len(moving) - 1)]
    return Frame(image=image, depth=depth, label=label, dynamic=dynamic)


def _shade(scene, frame, dirs, zbuf, hit, bmin, bmax):
    """Albedo x pattern x Lambert shading for every pixel, on flat float32 arrays (speed)."""
    H, W = hit.shape
    hit, zbuf, dirs = hit.ravel(), zbuf.ravel().astype(np.float32), dirs.reshape(3, -1).astype(np.float32)
    color = np.zeros((H * W, 3), np.float32)
    label = np.full(H * W, IGNORE_INDEX, np.uint8)
    c = scene.cam_c[frame].astype(np.float32)

    # sky: a gradient by elevation, with clouds fixed to the view direction (it is at infinity)
    sky = np.flatnonzero(hit == SKY)
    if len(sky):
        d = dirs[:, sky]
        elev = np.clip(-d[1] / np.sqrt((d * d).sum(0)) * 2.5, 0, 1)[:, None]
        base = scene.sky_horizon * (1 - elev) + scene.sky_zenith * elev
        clouds = fractal(d[0] / (d[2] + 2.0) * 40, d[1] / (d[2] + 2.0) * 40, 1.0)[:, None]
        color[sky] = base * (0.85 + 0.3 * clouds)
        label[sky] = TRAIN_ID["sky"]

    # the ground: road with dashed lane markings, terrain beyond the kerbs
    ground = np.flatnonzero(hit == GROUND)
    if len(ground):
        t = zbuf[ground]
        x, z = c[0] + t * dirs[0, ground], c[2] + t * dirs[2, ground]
        road = np.abs(x) < scene.road_half
        fine = detail(x, z, pixel_footprint(t, dirs[:, ground], 1, scene.K[0, 0]))
        grain = (fractal(x, z, 3.0) + 2.0 * scene.config.texture_detail * fine)[:, None]
        col = np.where(road[:, None], scene.road_color * (0.75 + 0.5 * grain), scene.terrain_color * (0.55 + 0.9 * grain))
        if len(scene.lane_lines):
            near_line = np.abs(x[:, None] - scene.lane_lines[None].astype(np.float32)).min(1) < 0.08
            col[near_line & (np.mod(z, 6.0) < 3.0) & road] = 0.85
        up_shade = scene.ambient + (1 - scene.ambient) * max(0.0, -scene.light_dir[1])
        color[ground] = col * up_shade
        label[ground] = np.where(road, TRAIN_ID["road"], TRAIN_ID["terrain"])

    boxes = np.flatnonzero(hit >= 0)
    if len(boxes):
        ids = hit[boxes]
        p = c[:, None] + zbuf[boxes] * dirs[:, boxes]  # [3, n] hit points
        lo, hi = bmin[ids].T.astype(np.float32), bmax[ids].T.astype(np.float32)
        dist_lo, dist_hi = np.abs(p - lo), np.abs(p - hi)
        axis = np.minimum(dist_lo, dist_hi).argmin(0)
        cols = np.arange(len(ids))
        sign = np.where(dist_hi[axis, cols] < dist_lo[axis, cols], 1.0, -1.0)
        local = p - lo  # object coordinates: textures move with the object
        off = scene.tex_offset[ids].T
        uu = np.where(axis == 0, local[2], local[0]) + off[0]
        vv = np.where(axis == 1, local[2], local[1]) + off[1]
        lambert = np.clip(scene.light_dir[axis] * sign, 0, None)
        shade = (scene.ambient + (1 - scene.ambient) * lambert).astype(np.float32)
        fine = 1.0 + scene.config.texture_detail * detail(uu, vv, pixel_footprint(zbuf[boxes], dirs[:, boxes], axis, scene.K[0, 0]))
        color[boxes] = scene.color[ids] * (_pattern(scene.pattern[ids], uu, vv) * fine * shade)[:, None]
        label[boxes] = scene.class_id[ids]

    hood = np.flatnonzero(hit == HOOD)
    if len(hood):
        rows = (hood // W) / H
        color[hood] = np.array([0.12, 0.12, 0.14]) * (0.6 + 2.0 * (rows[:, None] - 0.9))

    image = color * scene.exposure.astype(np.float32)
    return image.reshape(H, W, 3), label.reshape(H, W)


def _pattern(kind: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Brightness multiplier of each surface pattern at surface coordinates (u, v) in metres."""
    out = np.empty(len(kind), np.float32)
    for code, fn in _PATTERNS.items():
        m = kind == code
        if m.any():
            out[m] = fn(u[m], v[m])
    return out


def _windows(u, v):
    frac_u, frac_v = np.mod(u, 3.0), np.mod(v, 3.2)
    window = (frac_u > 0.8) & (frac_u < 2.2) & (frac_v > 1.0) & (frac_v < 2.4)
    return np.where(window, 0.35 + 0.25 * noise(u * 0.3, v * 0.3), 0.8 + 0.35 * fractal(u, v, 1.5))


def _tiles(u, v):
    grout = (np.mod(u, 0.6) < 0.05) | (np.mod(v, 0.6) < 0.05)
    return np.where(grout, 0.6, 0.8 + 0.35 * fractal(u, v, 2.0))


_PATTERNS = {
    NOISE: lambda u, v: 0.7 + 0.6 * fractal(u, v, 2.5),
    WINDOWS: _windows,
    STRIPES: lambda u, v: np.where(np.mod(u, 0.25) < 0.12, 0.55, 1.1) * (0.85 + 0.3 * noise(u * 3, v * 3)),
    TILES: _tiles,
    FOLIAGE: lambda u, v: 0.4 + 1.2 * fractal(u, v, 4.0),
    VEHICLE: lambda u, v: 0.85 + 0.3 * fractal(u, v, 1.5),
}


def render_sequence(scene: Scene, rng: np.random.Generator) -> list[Frame]:
    """Frames t-1, t, t+1, with independent sensor noise per frame."""
    frames = [render_frame(scene, f) for f in range(3)]
    for fr in frames:
        if scene.config.noise_std > 0:
            fr.image += rng.standard_normal(fr.image.shape, dtype=np.float32) * np.float32(scene.config.noise_std)
        np.clip(fr.image, 0, 1, out=fr.image)
    return frames


def relative_pose(scene: Scene, target: int, source: int) -> np.ndarray:
    """T [4, 4] mapping camera-``target`` coordinates to camera-``source`` coordinates (monodepth2's T_{t->s})."""
    Rt, Rs = scene.cam_R[target], scene.cam_R[source]
    T = np.eye(4)
    T[:3, :3] = Rs.T @ Rt
    T[:3, 3] = Rs.T @ (scene.cam_c[target] - scene.cam_c[source])
    return T
