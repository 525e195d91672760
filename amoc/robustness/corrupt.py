"""The 15 common corruptions of CIFAR-10-C, severities 1-5, for 32 x 32 images.

Definitions and parameter tables are those of Hendrycks & Dietterich (2019),
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
in the CIFAR version of their generator (the ImageNet-C parameters differ). The
code is ours: batched numpy/scipy/Pillow, no OpenCV, scikit-image or ImageMagick.

Contract: `corrupt(images, name, severity, rng)` takes uint8 H x W x 3 or
N x H x W x 3 and returns uint8 of the same shape. As in the published generator,
float results are clipped to [0, 255] and truncated (not rounded) to uint8.

Faithfulness, corruption by corruption:
- exact re-implementations of the published definition (same maths; only the random
  draws differ): gaussian_noise, shot_noise, impulse_noise, defocus_blur, zoom_blur,
  fog, brightness, contrast, pixelate, jpeg_compression (Pillow, as published).
- glass_blur: exact. The published pixel "swap" `x[h, w], x[h', w'] = x[h', w'], x[h, w]`
  acts on numpy views and therefore copies x[h', w'] into x[h, w]; with offsets in
  {-1, 0} (randint(-1, 1)) and the bottom-right-to-top-left scan, every copy reads a
  pixel the scan has not written yet, so one iteration is exactly one gather. That is
  what CIFAR-10-C contains, and it is vectorised here.
- motion_blur, snow: ImageMagick's motion blur re-implemented from its source
  definition (filters.motion_blur); differences are limited to 16-bit quantum rounding.
- elastic_transform: cv2.warpAffine and scipy map_coordinates re-implemented as
  bilinear sampling (filters.bilinear equals map_coordinates(order=1) with the same
  border rule); the affine warp does not round coordinates to 1/32 pixel as OpenCV does.
- frost: APPROXIMATION. The original blends crops of six photographs of frost that are
  not redistributed with the data; `frost_texture` draws a procedural stand-in
  (patchy fractal ice plus needle-like streaks, bluish white, tuned by eye) and blends
  it with the published weights.

Severity: the published CIFAR tables do not all grow. Measured on 200 real CIFAR-10
test images (mean absolute pixel change, tests/robustness/test_corruptions.py): motion_blur 3 -> 4
is a plateau (radius 6 -> 8 at sigma 2 only adds taps of weight < 1e-9); glass_blur is
flat over 1-3 (one shuffle; more blur smooths it back) and steps up at 4-5 (two
shuffles); frost lowers the image weight (1 -> 0.75) while raising the frost weight
(0.2 -> 0.45), so it grows in frost share, not in pixel change; elastic_transform's
affine jitter shrinks (0.08 -> 0.03 of the size) while its elastic part grows, so its
pixel change falls with severity (22 -> 14 of 255). Everything else grows strictly.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image

from amoc.config import CORRUPTIONS
from amoc.robustness import filters

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

# Severity 1..5 parameters of the CIFAR generator.
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # noise std
SHOT_NOISE = (500, 250, 100, 75, 50)  # photons per unit intensity
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # salt-and-pepper fraction
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))  # disk radius, alias blur
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, delta, iterations
MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # ImageMagick radius, sigma
ZOOM_BLUR = (1.06, 1.11, 1.16, 1.21, 1.26)  # zooms np.arange(1, stop, 0.01)
SNOW = (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),  # mean, std, zoom, threshold,
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),  # blur radius, blur sigma,
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),  # weight of the image
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image weight, frost weight
FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))  # fog strength, fractal decay
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to HSV value
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # scale about the channel mean
ELASTIC = (
    (0, 0, 0.08),
    (0.05, 0.2, 0.07),
    (0.08, 0.06, 0.06),  # alpha, sigma, affine jitter,
    (0.1, 0.04, 0.05),
    (0.1, 0.03, 0.03),
)  # as fractions of the image size
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # downscale factor
JPEG_QUALITY = (80, 65, 58, 50, 40)

GRAY = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as cv2.COLOR_RGB2GRAY

APPROXIMATIONS = {
    "frost": "procedural frost texture (fractal ice + needle-crystal streaks, tuned by eye) "
    "instead of crops of the six frost photographs",
}


# --------------------------------------------------------------------------- noise
def gaussian_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    x = x / 255.0
    return np.clip(x + rng.normal(scale=GAUSSIAN_NOISE[s - 1], size=x.shape), 0, 1) * 255


def shot_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = SHOT_NOISE[s - 1]
    return np.clip(rng.poisson(x / 255.0 * c) / c, 0, 1) * 255


def impulse_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper per array element (each channel independently), half each."""
    x = x / 255.0
    flipped = rng.random(x.shape) < IMPULSE_NOISE[s - 1]
    salt = rng.random(x.shape) < 0.5
    return np.where(flipped, salt.astype(np.float64), x) * 255


# --------------------------------------------------------------------------- blur
def defocus_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias_blur = DEFOCUS_BLUR[s - 1]
    return np.clip(filters.filter2d(x / 255.0, filters.disk_kernel(radius, alias_blur)), 0, 1) * 255


def glass_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    sigma, delta, iterations = GLASS_BLUR[s - 1]
    n, h, w = x.shape[:3]
    x = (filters.gaussian(x / 255.0, sigma) * 255).astype(np.uint8)
    rows, cols = np.arange(delta + 1, h - delta + 1), np.arange(delta + 1, w - delta + 1)
    img = np.arange(n)[:, None, None]
    for _ in range(iterations):
        # offsets in [-delta, delta): randint(-1, 1) is -1 or 0 (see module docstring)
        dy = rng.integers(-delta, delta, size=(n, len(rows), len(cols)))
        dx = rng.integers(-delta, delta, size=(n, len(rows), len(cols)))
        src = x[img, rows[None, :, None] + dy, cols[None, None, :] + dx]
        x = x.copy()
        x[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = src
    return np.clip(filters.gaussian(x / 255.0, sigma), 0, 1) * 255


def motion_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = MOTION_BLUR[s - 1]
    angles = rng.uniform(-45, 45, size=len(x))
    return np.rint(np.clip(filters.motion_blur(x.astype(np.float64), radius, sigma, angles), 0, 255))


def zoom_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    x = (x / 255.0).astype(np.float32)
    zooms = np.arange(1, ZOOM_BLUR[s - 1], 0.01)
    out = x.copy()
    for z in zooms:
        out += filters.clipped_zoom(x, float(z))
    return np.clip(out / (len(zooms) + 1), 0, 1) * 255


# --------------------------------------------------------------------------- weather
def snow(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    mean, std, zoom, threshold, radius, sigma, keep = SNOW[s - 1]
    n, h, w = x.shape[:3]
    x = (x / 255.0).astype(np.float32)
    flakes = rng.normal(loc=mean, scale=std, size=(n, h, w, 1))
    flakes = filters.clipped_zoom(flakes, zoom)
    flakes[flakes < threshold] = 0
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8).astype(np.float64)  # 8-bit PNG
    angles = rng.uniform(-135, -45, size=n)
    flakes = np.rint(np.clip(filters.motion_blur(flakes, radius, sigma, angles), 0, 255)) / 255.0
    gray = (x @ GRAY.astype(np.float32))[..., None]
    x = keep * x + (1 - keep) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + flakes + flakes[:, ::-1, ::-1], 0, 1) * 255


def frost_texture(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """N x H x W x 3 procedural frost in [0, 255], mean about 120 (a stand-in for the
    frost photographs): dark glass with patchy ice from a rough fractal, plus bright
    needle crystals (sparse seeds smeared both ways along a random direction, three
    layers), tinted bluish white. Its look was tuned by eye, not fitted to the photos."""
    size = 1 << (max(h, w, 2) - 1).bit_length()  # the power of two that holds the image
    ice = filters.plasma_fractal(n, size, decay=1.6, rng=rng)[:, :h, :w, None]
    needles = np.zeros((n, h, w, 1))
    for _ in range(3):
        seeds = (rng.random((n, h, w, 1)) < 0.01) * rng.uniform(0.5, 1.0, size=(n, h, w, 1))
        angles = rng.uniform(0, 360, size=n)
        streak = filters.motion_blur(seeds, 5, 3, angles) + filters.motion_blur(seeds, 5, 3, angles + 180)
        needles = np.maximum(needles, streak)
    texture = np.clip(0.2 + 0.5 * ice**1.5 + 2.5 * needles, 0, 1)
    return texture * np.array([0.86, 0.93, 1.0]) * 255


def frost(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    keep, amount = FROST[s - 1]
    return np.clip(keep * x.astype(np.float64) + amount * frost_texture(*x.shape[:3], rng), 0, 255)


def fog(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = FOG[s - 1]
    n, h, w = x.shape[:3]
    x = x / 255.0
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    size = 1 << (max(h, w, 2) - 1).bit_length()
    x = x + strength * filters.plasma_fractal(n, size, decay, rng)[:, :h, :w, None]
    return np.clip(x * peak / (peak + strength), 0, 1) * 255


# --------------------------------------------------------------------------- digital
def brightness(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """HSV value + c. Hue and saturation are unchanged, so RGB scales by V'/V (and a
    black pixel, whose saturation is 0, becomes grey V')."""
    x = x / 255.0
    value = x.max(axis=-1, keepdims=True)
    new_value = np.clip(value + BRIGHTNESS[s - 1], 0, 1)
    scaled = x * (new_value / np.maximum(value, 1e-12))
    return np.clip(np.where(value > 0, scaled, new_value), 0, 1) * 255


def contrast(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    x = x / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - means) * CONTRAST[s - 1] + means, 0, 1) * 255


def elastic_transform(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    n, h, w = x.shape[:3]
    alpha, sigma, jitter = (v * min(h, w) for v in ELASTIC[s - 1])
    x = (x / 255.0).astype(np.float32)
    # Random affine: three points around the centre move by up to +-jitter pixels (x, y order).
    centre, side = np.array([h // 2, w // 2], dtype=np.float64), min(h, w) // 3
    src_pts = np.array([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    dst_pts = src_pts + rng.uniform(-jitter, jitter, size=(n, 3, 2))
    ones = np.ones((3, 1))
    forward = np.linalg.solve(np.hstack([src_pts, ones])[None], dst_pts)  # N x 3 x 2: [x y 1] @ M^T
    full = np.concatenate([np.swapaxes(forward, 1, 2), np.tile([[[0, 0, 1.0]]], (n, 1, 1))], axis=1)
    inverse = np.linalg.inv(full)  # dst -> src, N x 3 x 3
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src_x = inverse[:, 0, 0, None, None] * xx + inverse[:, 0, 1, None, None] * yy + inverse[:, 0, 2, None, None]
    src_y = inverse[:, 1, 0, None, None] * xx + inverse[:, 1, 1, None, None] * yy + inverse[:, 1, 2, None, None]
    x = filters.bilinear(x, src_y, src_x, border="mirror")
    # Elastic part: smoothed uniform noise scaled by alpha (zero at severity 1).
    dx = filters.gaussian(rng.uniform(-1, 1, size=(n, h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = filters.gaussian(rng.uniform(-1, 1, size=(n, h, w)), sigma, mode="reflect", truncate=3) * alpha
    x = filters.bilinear(x, yy + dy, xx + dx, border="reflect")
    return np.clip(x, 0, 1) * 255


def pixelate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[1:3]
    small = (int(w * PIXELATE[s - 1]), int(h * PIXELATE[s - 1]))
    return np.stack([np.asarray(Image.fromarray(im).resize(small, Image.BOX).resize((w, h), Image.BOX)) for im in x])


def jpeg_compression(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(x)
    for i, im in enumerate(x):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=JPEG_QUALITY[s - 1])
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out


REGISTRY: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
assert tuple(REGISTRY) == CORRUPTIONS


def corrupt(images: np.ndarray, name: str, severity: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Apply corruption `name` at `severity` (1-5) to uint8 H x W x 3 or N x H x W x 3."""
    if name not in REGISTRY:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    if not (isinstance(severity, (int, np.integer)) and 1 <= severity <= 5):
        raise ValueError(f"severity must be an integer 1..5, got {severity!r}")
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 H x W x 3 or N x H x W x 3 images, got {x.dtype} {x.shape}")
    single = x.ndim == 3
    batch = x[None] if single else x
    if len(batch) == 0:
        return x.copy()
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    out = REGISTRY[name](batch, int(severity), rng)
    out = np.clip(out, 0, 255).astype(np.uint8)  # truncates, as np.uint8() in the published generator
    return out[0] if single else out


def severity_rng(seed: int, name: str, severity: int, chunk: int = 0) -> np.random.Generator:
    """An independent stream per (seed, corruption, severity, chunk): any subset or order
    of corruptions gives the same images."""
    return np.random.default_rng([seed, CORRUPTIONS.index(name), severity, chunk])


__all__ = ["corrupt", "severity_rng", "frost_texture", "REGISTRY", "APPROXIMATIONS", "CORRUPTIONS"]
