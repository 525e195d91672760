"""Image operations the corruptions are built from, batched over N x H x W x C arrays.

Each one re-implements the library call that the published CIFAR-10-C generator used,
from that library's documented definition, so no OpenCV, scikit-image or ImageMagick
is needed:

- `gaussian`: skimage.filters.gaussian (edge-replicating border, truncate 4 sigma).
- `motion_blur`: ImageMagick's MotionBlurImage: a one-sided Gaussian line kernel of
  2 * ceil(radius) + 1 taps, weights exp(-i^2 / 2 sigma^2), tap i sampled at the pixel
  round(i * (cos a, sin a)) away, edge pixels repeated outside the image.
- `clipped_zoom`: centre crop of size ceil(H / z), scipy.ndimage.zoom (order 1), centre trim.
- `plasma_fractal`: diamond-square height map on a periodic grid.
- `disk_kernel`: a normalised aliased disk smoothed by a 3-tap Gaussian (cv2.GaussianBlur).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """Blur the two spatial axes of N x H x W x C (or N x H x W) floats."""
    if sigma <= 0:
        return x
    sigmas = (0, sigma, sigma) + (0,) * (x.ndim - 3)
    return ndimage.gaussian_filter(x, sigma=sigmas, mode=mode, truncate=truncate)


def motion_blur(x: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick-style motion blur of N x H x W x C floats, one angle per image.

    The kernel is one-sided: the streak trails from each pixel towards `angle`, as in
    ImageMagick (not a centred box). Returns float; the caller rounds and clips.
    """
    n, h, w = x.shape[:3]
    width = 2 * math.ceil(radius) + 1  # GetOptimalKernelWidth1D for radius > 0
    taps = np.arange(width, dtype=np.float64)
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))[:, None]  # N x 1
    off_x = np.ceil(taps * np.cos(theta) - 0.5).astype(np.int64)  # N x width
    off_y = np.ceil(taps * np.sin(theta) - 0.5).astype(np.int64)
    img = np.arange(n)[:, None, None]
    rows = np.arange(h)[None, :, None]
    cols = np.arange(w)[None, None, :]
    out = np.zeros(x.shape, dtype=np.float64)
    for k in range(width):
        if weights[k] < 1e-12:  # exp(-i^2/2s^2) underflows long before the last taps
            break
        r = np.clip(rows + off_y[:, k, None, None], 0, h - 1)  # N x H x 1
        c = np.clip(cols + off_x[:, k, None, None], 0, w - 1)  # N x 1 x W
        out += weights[k] * x[img, r, c]
    return out


def clipped_zoom(x: np.ndarray, zoom: float) -> np.ndarray:
    """Zoom N x H x W x C into its centre by `zoom` >= 1 and keep H x W.

    Same result as scipy.ndimage.zoom(order=1) of the ceil(H / zoom) centre crop followed
    by a centre trim, computed separably and only for the pixels that are kept.
    """
    if zoom == 1:
        return x
    for axis in (1, 2):
        size = x.shape[axis]
        crop = math.ceil(size / zoom)
        start = (size - crop) // 2
        big = round(crop * zoom)  # scipy's output size
        trim = (big - size) // 2
        # scipy maps output pixel o to input coordinate o * (crop - 1) / (big - 1)
        coords = start + np.arange(trim, trim + size) * ((crop - 1) / (big - 1))
        lo = np.minimum(np.floor(coords).astype(np.int64), start + crop - 2)
        frac = (coords - lo).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - axis - 1))
        x = np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, lo + 1, axis=axis) * frac
    return x


def plasma_fractal(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """N height maps of size x size (a power of two) in [0, 1], by diamond-square.

    The grid wraps around (periodic). The noise added at each level is
    amplitude^2 * U(-1, 1) with amplitude 100, divided by `decay` per level: the
    published generator draws `wibble * U(-wibble, wibble)`, hence the square, which
    makes the map smoother than a textbook diamond-square with the same decay.
    """
    assert size >= 2 and size & (size - 1) == 0, size
    grid = np.zeros((n, size, size), dtype=np.float64)
    step, amplitude = size, 100.0
    while step >= 2:
        half = step // 2
        noise = lambda shape, amplitude=amplitude: amplitude**2 * rng.uniform(-1.0, 1.0, shape)  # noqa: E731
        # Square step: each square's centre is the mean of its four corners.
        corners = grid[:, ::step, ::step]
        right = np.roll(corners, -1, axis=2)
        total = corners + right + np.roll(corners, -1, axis=1) + np.roll(right, -1, axis=1)
        grid[:, half::step, half::step] = total / 4 + noise(total.shape)
        centres = grid[:, half::step, half::step]
        # Diamond step: edge midpoints from the two corners and two centres around them.
        top_mid = corners + right + centres + np.roll(centres, 1, axis=1)
        grid[:, ::step, half::step] = top_mid / 4 + noise(top_mid.shape)
        left_mid = corners + np.roll(corners, -1, axis=1) + centres + np.roll(centres, 1, axis=2)
        grid[:, half::step, ::step] = left_mid / 4 + noise(left_mid.shape)
        step, amplitude = half, amplitude / decay
    grid -= grid.min(axis=(1, 2), keepdims=True)
    return grid / grid.max(axis=(1, 2), keepdims=True)


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """Normalised disk {x^2 + y^2 <= r^2} convolved with a 3-tap Gaussian (sigma
    `alias_blur`), on a window just large enough to hold it."""
    half = math.ceil(radius) + 1
    coords = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(coords, coords)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.exp(-(np.array([-1.0, 0.0, 1.0]) ** 2) / (2.0 * alias_blur**2))
    taps /= taps.sum()
    smooth = ndimage.correlate1d(disk, taps, axis=0, mode="constant")
    return ndimage.correlate1d(smooth, taps, axis=1, mode="constant")


def filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel of N x H x W x C with `kernel`, mirrored border
    (cv2.filter2D's default BORDER_REFLECT_101)."""
    return ndimage.correlate(x, kernel[None, :, :, None], mode="mirror")


def _border_index(i: np.ndarray, n: int, border: str) -> np.ndarray:
    """Map integer pixel indices outside [0, n) back inside: "mirror" is reflect-101
    (2 1 | 0 1 2, cv2's BORDER_REFLECT_101), "reflect" repeats the edge (1 0 | 0 1 2)."""
    if n == 1:
        return np.zeros_like(i)
    if border == "mirror":
        period = 2 * (n - 1)
        i = np.abs(i) % period
        return np.where(i >= n, period - i, i)
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i >= n, period - 1 - i, i)


def bilinear(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, border: str) -> np.ndarray:
    """Sample N x H x W x C images at float positions (rows, cols: N x H' x W')."""
    n, h, w = x.shape[:3]
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    img = np.arange(n)[:, None, None]
    ra, rb = _border_index(r0, h, border), _border_index(r0 + 1, h, border)
    ca, cb = _border_index(c0, w, border), _border_index(c0 + 1, w, border)
    top = x[img, ra, ca] * (1 - fc) + x[img, ra, cb] * fc
    bottom = x[img, rb, ca] * (1 - fc) + x[img, rb, cb] * fc
    return top * (1 - fr) + bottom * fr
