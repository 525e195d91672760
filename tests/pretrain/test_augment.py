"""Batched SimCLR augmentation (amoc.pretrain.augment) against torchvision's semantics."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F

from amoc.config import AugmentConfig
from amoc.pretrain.augment import SimCLRAugment, adjust_hue

DEFAULT = AugmentConfig()
NONE = dataclasses.replace(  # identity: every probability 0, full-image crops
    DEFAULT, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 16, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=gen(seed))


def smooth_images(n: int = 16, seed: int = 0) -> torch.Tensor:
    """Float images with structure (not only noise) so that crops and colours matter."""
    g = gen(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True) / a.numel()
    fb = torch.searchsorted(b, grid, right=True) / b.numel()
    return float((fa - fb).abs().max())


def pil_blur_reference(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Pillow's GaussianBlur(radius=sigma) algorithm written out plainly, in float64 and
    without Pillow's rounding to uint8 after each pass, for one C x H x W image: three
    passes of the "extended box" along W, then three along H; each pass repeats the edge
    pixel beyond the border (what Pillow's BoxBlur does, checked against Pillow below)."""
    s2 = sigma * sigma / 3
    l = math.floor((math.sqrt(12 * s2 + 1) - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
    y = img.double()
    for dim in (2, 1):
        n = y.shape[dim]
        for _ in range(3):

            def tap(d: int, y=y, dim=dim, n=n) -> torch.Tensor:
                return y.index_select(dim, torch.arange(n).add(d).clamp(0, n - 1))

            acc = sum(tap(d) for d in range(-l, l + 1)) + a * (tap(-l - 1) + tap(l + 1))
            y = acc / (2 * (l + a) + 1)
    return y.float()


def pil_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Pillow itself: ImageFilter.GaussianBlur(radius=sigma) of a 3 x H x W uint8 image."""
    from PIL import Image, ImageFilter

    im = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())
    return torch.from_numpy(np.asarray(im.filter(ImageFilter.GaussianBlur(radius=sigma))).copy()).permute(2, 0, 1)


def torchvision_reference(img: torch.Tensor, p: dict, i: int, size: int, kernel: int) -> torch.Tensor:
    """One sample through torchvision.transforms.v2.functional with our parameters; the
    blur is torchvision's k-tap one, or for ``kernel`` 0 ``pil_blur_reference``."""
    out = F.resized_crop(
        img, int(p["top"][i]), int(p["left"][i]), int(p["height"][i]), int(p["width"][i]), [size, size], antialias=True
    )
    if p["flip"][i]:
        out = F.horizontal_flip(out)
    if p["jitter"][i]:
        for op in p["order"][i].tolist():
            if op == 0:
                out = F.adjust_brightness(out, float(p["brightness"][i]))
            elif op == 1:
                out = F.adjust_contrast(out, float(p["contrast"][i]))
            elif op == 2:
                out = F.adjust_saturation(out, float(p["saturation"][i]))
            elif float(p["hue"][i]) != 0.0:
                out = F.adjust_hue(out, float(p["hue"][i]))
    if p["gray"][i]:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    if p["blur"][i]:
        s = float(p["sigma"][i])
        out = pil_blur_reference(out, s) if kernel == 0 else F.gaussian_blur(out, [kernel, kernel], [s, s])
    return out


# --------------------------------------------------------------------------- basics
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_shape_dtype_range(dtype):
    x = images(16)
    if dtype != torch.uint8:
        x = x.to(dtype) / 255
    out = SimCLRAugment(DEFAULT)(x, gen(1))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_other_sizes():
    x = images(8, 40, 56)
    out = SimCLRAugment(DEFAULT, size=24)(x, gen(1))
    assert out.shape == (8, 3, 24, 24) and 0 <= out.min() <= out.max() <= 1


def test_bad_input():
    aug = SimCLRAugment(DEFAULT)
    with pytest.raises(ValueError):
        aug(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError):
        aug(torch.zeros(2, 3, 32, 32, dtype=torch.int32))


def test_deterministic_with_seeded_generator():
    x = images(32)
    aug = SimCLRAugment(DEFAULT)
    a, b = aug(x, gen(7)), aug(x, gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, gen(8)))


def test_forward_is_sample_then_apply():
    x = images(32)
    aug = SimCLRAugment(DEFAULT)
    p = aug.sample_params(32, gen(3))
    assert torch.equal(aug(x, gen(3)), aug.apply_params(x, p))


def test_views_differ():
    aug = SimCLRAugment(DEFAULT)
    x = images(1).expand(64, 3, 32, 32).contiguous()  # one image, 64 times
    g = gen(0)
    v1, v2 = aug(x, g), aug(x, g)
    assert not torch.equal(v1, v2)  # two calls (two views) differ
    flat = v1.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(64) * 1e9).min() > 0  # every sample differs
    p = aug.sample_params(64, gen(1))
    boxes = torch.stack([p["top"], p["left"], p["height"], p["width"]], 1)
    assert len({tuple(b.tolist()) for b in boxes}) > 48  # crops drawn per sample


def test_identity_config_returns_input():
    aug = SimCLRAugment(NONE)
    x = images(16)
    torch.testing.assert_close(aug(x, gen(0)), x.float() / 255, rtol=0, atol=1e-6)
    xf = x.float() / 255
    assert torch.equal(aug(xf, gen(0)), xf)


# --------------------------------------------------------------------------- distributions
N = 20_000


@pytest.fixture(scope="module")
def params():
    return SimCLRAugment(DEFAULT).sample_params(N, gen(123))


def test_probabilities(params):
    for key, p in (
        ("flip", DEFAULT.flip_p),
        ("jitter", DEFAULT.jitter_p),
        ("gray", DEFAULT.gray_p),
        ("blur", DEFAULT.blur_p),
    ):
        rate = params[key].float().mean().item()
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / N), (key, rate, p)


def test_independent_draws(params):
    # The ops' coins are independent of each other (a shared coin would show here).
    f, g = params["flip"].float(), params["gray"].float()
    assert abs((f * g).mean() - f.mean() * g.mean()) < 0.01


def test_jitter_factor_ranges(params):
    b, c, s, h = DEFAULT.jitter
    for key, lo, hi in (
        ("brightness", 1 - b, 1 + b),
        ("contrast", 1 - c, 1 + c),
        ("saturation", 1 - s, 1 + s),
        ("hue", -h, h),
    ):
        v = params[key]
        assert v.min() >= lo and v.max() <= hi
        assert ks(v, lo + (hi - lo) * torch.rand(N, generator=gen(9))) < 0.03, key
    order = params["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(N, 4))
    counts = torch.tensor(
        [(order == torch.tensor(perm)).all(1).sum().item() for perm in itertools.permutations(range(4))]
    )
    assert counts.sum() == N and (counts - N / 24).abs().max() < 150  # all 24 orders, uniformly


def test_blur_sigma(params):
    lo, hi = DEFAULT.blur_sigma
    s = params["sigma"]
    assert s.min() >= lo and s.max() <= hi
    assert ks(s, lo + (hi - lo) * torch.rand(N, generator=gen(10))) < 0.03


def test_crop_box_distribution_matches_torchvision(params):
    top, left, h, w = params["top"], params["left"], params["height"], params["width"]
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).float() / 1024
    log_ratio = torch.log(w.float() / h.float())
    # Rounding w and h to integers moves the area a little outside [0.2, 1] at most.
    assert area.min() > 0.18 and area.max() <= 1.0
    assert log_ratio.abs().max() < math.log(4 / 3) + 0.1
    # torchvision's own sampler (10 tries, rejection, fallback), 5000 draws.
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    ref = torch.tensor(
        [T.RandomResizedCrop.get_params(img, DEFAULT.crop_scale, DEFAULT.crop_ratio) for _ in range(5000)],
        dtype=torch.float64,
    )
    ref_area = ref[:, 2] * ref[:, 3] / 1024
    ref_log_ratio = torch.log(ref[:, 3] / ref[:, 2])
    assert ks(area, ref_area) < 0.035
    assert ks(log_ratio, ref_log_ratio) < 0.035
    # top-left offsets uniform over the valid positions: relative position ~ U(0, 1)
    rel = (top.float() + 0.5) / (33 - h).float()
    assert abs(rel.mean().item() - 0.5) < 0.01
    # The area is roughly uniform on [0.2, 1] except for fewer large crops (a large
    # area with an aspect ratio far from 1 does not fit and is redrawn), as torchvision.
    hist = torch.histc(area, bins=4, min=0.2, max=1.0) / N
    ref_hist = torch.histc(ref_area.float(), bins=4, min=0.2, max=1.0) / 5000
    assert (hist[:3] - 0.28).abs().max() < 0.03 and 0.1 < hist[3] < 0.18
    assert (hist - ref_hist).abs().max() < 0.02


def test_crop_fallback_matches_torchvision():
    # No candidate can fit: torchvision falls back to a central crop.
    cfg = dataclasses.replace(DEFAULT, crop_scale=[1.0, 1.0], crop_ratio=[2.0, 3.0])
    p = SimCLRAugment(cfg).sample_params(8, gen(0))
    i, j, h, w = T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), cfg.crop_scale, cfg.crop_ratio)
    assert (p["top"] == i).all() and (p["left"] == j).all() and (p["height"] == h).all() and (p["width"] == w).all()


# --------------------------------------------------------------------------- ops vs torchvision
def only(**kw) -> AugmentConfig:
    """The identity config with some fields changed."""
    return dataclasses.replace(NONE, **kw)


@pytest.mark.parametrize("shape,size", [((32, 32), 32), ((40, 56), 32), ((64, 64), 32), ((32, 32), 48)])
def test_crop_resize_matches_torchvision(shape, size):
    x = torch.rand(24, 3, *shape, generator=gen(0))
    aug = SimCLRAugment(DEFAULT, size=size)
    p = aug.sample_params(24, gen(1), height=shape[0], width=shape[1])
    for key in ("flip", "jitter", "gray", "blur"):
        p[key] = torch.zeros(24, dtype=torch.bool)
    out = aug.apply_params(x, p)
    ref = torch.stack([torchvision_reference(x[i], p, i, size, 3) for i in range(24)])
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    # uint8 input gives the same as its float version
    xu = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(aug.apply_params(xu, p), aug.apply_params(xu.float() / 255, p), rtol=0, atol=2e-6)


def test_flip_mirrors():
    x = images(16)
    out = SimCLRAugment(only(flip_p=1.0))(x, gen(0))
    torch.testing.assert_close(out, torch.flip(x.float() / 255, dims=[-1]), rtol=0, atol=1e-6)
    xf = x.float() / 255
    assert torch.equal(SimCLRAugment(only(flip_p=1.0))(xf, gen(0)), torch.flip(xf, dims=[-1]))


@pytest.mark.parametrize(
    "op,jitter",
    [
        ("brightness", [0.4, 0, 0, 0]),
        ("contrast", [0, 0.4, 0, 0]),
        ("saturation", [0, 0, 0.4, 0]),
        ("hue", [0, 0, 0, 0.5]),
    ],
)
def test_each_colour_op_matches_torchvision(op, jitter):
    x = smooth_images(64)
    aug = SimCLRAugment(only(jitter=jitter, jitter_p=1.0))
    p = aug.sample_params(64, gen(2))
    out = aug.apply_params(x, p)
    fn = {
        "brightness": F.adjust_brightness,
        "contrast": F.adjust_contrast,
        "saturation": F.adjust_saturation,
        "hue": F.adjust_hue,
    }[op]
    ref = torch.stack([fn(x[i], float(p[op][i])) for i in range(64)])
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert (out - x).abs().max() > 0.05  # it did something


def test_hue_function_on_edge_cases():
    # grey pixels, saturated primaries, ties between channels, black and white
    vals = torch.tensor([0.0, 0.25, 0.5, 1.0])
    grid = torch.cartesian_prod(vals, vals, vals).T.reshape(1, 3, 8, 8)
    x = torch.cat([grid, torch.rand(3, 3, 8, 8, generator=gen(0))])
    for shift in (-0.5, -0.1, 0.0, 0.05, 0.25, 0.5):
        out = adjust_hue(x, torch.full((4,), shift))
        ref = torch.stack([F.adjust_hue(xi, shift) for xi in x])
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_colour_jitter_random_order_per_sample():
    x = smooth_images(96)
    aug = SimCLRAugment(only(jitter=[0.4, 0.4, 0.4, 0.1], jitter_p=0.8))
    p = aug.sample_params(96, gen(4))
    assert len({tuple(o) for o in p["order"].tolist()}) > 12  # many different orders in one batch
    out = aug.apply_params(x, p)
    ref = torch.stack([torchvision_reference(x[i], p, i, 32, 3) for i in range(96)])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # samples without jitter are untouched
    off = ~p["jitter"]
    assert off.any() and torch.equal(out[off], x[off])


def test_grayscale():
    x = smooth_images(32)
    out = SimCLRAugment(only(gray_p=1.0))(x, gen(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    torch.testing.assert_close(out, F.rgb_to_grayscale(x, num_output_channels=3), rtol=0, atol=1e-6)
    # and within the full pipeline (blur acts on each channel alike)
    aug = SimCLRAugment(DEFAULT)
    p = aug.sample_params(64, gen(5))
    out = aug.apply_params(images(64), p)
    g = out[p["gray"]]
    assert p["gray"].sum() > 3
    assert (g[:, 0] - g[:, 1]).abs().max() < 1e-6 and (g[:, 1] - g[:, 2]).abs().max() < 1e-6
    assert (out[~p["gray"], 0] - out[~p["gray"], 1]).abs().amax(dim=(1, 2)).min() > 0


@pytest.mark.parametrize("kernel", [3, 5, 9])
def test_blur_matches_torchvision(kernel):
    x = torch.rand(32, 3, 32, 32, generator=gen(0))
    aug = SimCLRAugment(only(blur_p=1.0, blur_kernel=kernel))
    p = aug.sample_params(32, gen(6))
    out = aug.apply_params(x, p)
    ref = torch.stack([F.gaussian_blur(x[i], [kernel, kernel], [float(p["sigma"][i])] * 2) for i in range(32)])
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape,kernel", [((5, 7), 5), ((9, 4), 7), ((2, 2), 3)])
def test_blur_function_small_images(shape, kernel):
    from amoc.pretrain.augment import gaussian_blur, gaussian_kernels

    x = torch.rand(6, 3, *shape, generator=gen(0))
    sigma = torch.rand(6, generator=gen(1)) * 2 + 0.1
    apply = torch.tensor([True, False, True, True, False, True])
    out = gaussian_blur(x, gaussian_kernels(sigma, kernel, apply))
    for i in range(6):
        ref = F.gaussian_blur(x[i], [kernel, kernel], [float(sigma[i])] * 2) if apply[i] else x[i]
        torch.testing.assert_close(out[i], ref, rtol=0, atol=2e-6)


def test_default_blur_is_pils():
    assert DEFAULT.blur_kernel == 0  # the authors' PIL GaussianBlur(radius=sigma), full support


@pytest.mark.parametrize(
    "shape,max_sigma", [((32, 32), 2.0), ((5, 7), 2.0), ((9, 4), 5.0), ((2, 2), 3.0), ((1, 6), 2.0), ((24, 40), 12.0)]
)
def test_pil_blur_matches_pils_algorithm(shape, max_sigma):
    """Against the plain per-pass reference, at every sigma of the configured range,
    on images smaller than the kernel too (the edge rule then covers most taps)."""
    from amoc.pretrain.augment import pil_gaussian_blur

    x = torch.rand(12, 3, *shape, generator=gen(0))
    sigma = torch.cat(
        [torch.tensor([0.1, 0.5, 1.0, max_sigma]), 0.1 + (max_sigma - 0.1) * torch.rand(8, generator=gen(1))]
    )
    apply = torch.tensor([True] * 4 + [True, False] * 4)
    out = pil_gaussian_blur(x, sigma, max_sigma, apply)
    for i in range(12):
        ref = pil_blur_reference(x[i], float(sigma[i])) if apply[i] else x[i]
        torch.testing.assert_close(out[i], ref, rtol=0, atol=2e-6)
    assert torch.equal(out[~apply], x[~apply])  # the identity, exactly, where not blurred
    # float64 matmuls (the CUDA default) give the same
    out64 = pil_gaussian_blur(x, sigma, max_sigma, apply, compute_dtype=torch.float64)
    assert out64.dtype == torch.float32
    torch.testing.assert_close(out64, out, rtol=0, atol=1e-6)


def test_pil_blur_kernel_is_full_support_with_variance_sigma_squared():
    """The impulse response in the middle of a long line: Pillow's three extended boxes
    have variance exactly sigma^2 and span 2 * 3(l+1) + 1 taps (13 at sigma 2)."""
    from amoc.pretrain.augment import pil_blur_matrices, pil_box_radius

    sigma = torch.tensor([0.1, 0.3, 1.0, 1.1, 1.5, 2.0, 3.7])
    m = pil_blur_matrices(sigma, 61, max_sigma=4.0, dtype=torch.float64)
    row = m[:, 30]  # B x 61: the kernel around pixel 30, far from both edges
    offsets = torch.arange(61, dtype=torch.float64) - 30
    torch.testing.assert_close(row.sum(1), torch.ones(7, dtype=torch.float64))
    torch.testing.assert_close((row * offsets.square()).sum(1), sigma.double().square(), rtol=1e-6, atol=1e-9)
    l, a = pil_box_radius(sigma)
    assert ((a >= 0) & (a < 1)).all()
    half = (row > 0).to(torch.float64).mul(offsets.abs()).amax(1)
    assert torch.equal(half, 3 * (l + 1))
    assert half[sigma == 2.0].item() == 6  # 13 taps
    assert torch.equal(m.sum(-1).sub(1).abs().lt(1e-12), torch.ones(7, 61, dtype=torch.bool))  # every row sums to 1
    # sigmas above the configured maximum are clamped to it
    big = pil_blur_matrices(torch.tensor([2.0, 2.5, 9.0]), 32, max_sigma=2.0)
    assert torch.equal(big[1], big[0]) and torch.equal(big[2], big[0])


@pytest.fixture(scope="module")
def cifar_images(shared_data):
    """The first 256 test images of the real CIFAR-10 subset, 256 x 3 x 32 x 32 uint8."""
    import pickle
    import tarfile

    with tarfile.open(shared_data / "cifar-10-python-subset.tar.gz") as tar:
        batch = pickle.loads(tar.extractfile("cifar-10-batches-py/test_batch").read())
    return torch.from_numpy(batch["data"][:256].reshape(256, 3, 32, 32).copy())


def blur_vs_pil(images: torch.Tensor, sigma: float, kernel: int) -> tuple[float, float]:
    """(mean, max) absolute difference, in [0, 1] units, between the module's blur and
    Pillow's GaussianBlur(radius=sigma) of the same uint8 images."""
    aug = SimCLRAugment(only(blur_p=1.0, blur_sigma=[sigma, sigma], blur_kernel=kernel))
    out = aug(images, gen(0))
    ref = torch.stack([pil_blur(im, sigma) for im in images]).float() / 255
    diff = (out - ref).abs()
    return diff.mean().item(), diff.max().item()


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.5, 2.0])
def test_blur_matches_pil_on_cifar(cifar_images, sigma):
    """The authors' blur, on real images: Pillow rounds to uint8 after each of its six box
    passes, so the float result differs by that rounding only (measured: MAD 0.15-0.6 of
    1/255, max < 3/255); a wrong edge rule shows up as a max of 10-35/255 at sigma >= 1."""
    mad, worst = blur_vs_pil(cifar_images, sigma, kernel=0)
    assert mad < 1 / 255, (sigma, mad * 255)
    assert worst < 4 / 255, (sigma, worst * 255)


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_pil_check_rejects_the_3_tap_kernel(cifar_images, sigma):
    """The check above is not loose: torchvision's truncated 3-tap kernel (the previous
    default) fails it at every sigma >= 1 (measured MAD 2.6, 6.7, 10.1 of 1/255)."""
    mad, _ = blur_vs_pil(cifar_images, sigma, kernel=3)
    assert mad > 2 / 255, (sigma, mad * 255)


@pytest.mark.parametrize("kernel", [0, 3])
def test_full_pipeline_matches_torchvision_per_sample(kernel):
    """Every op, in torchvision's order, with the parameters we drew (blur: PIL's
    algorithm, the default, or torchvision's 3-tap kernel)."""
    x = smooth_images(128, seed=3)
    aug = SimCLRAugment(dataclasses.replace(DEFAULT, blur_kernel=kernel))
    p = aug.sample_params(128, gen(11))
    out = aug.apply_params(x, p)
    ref = torch.stack([torchvision_reference(x[i], p, i, 32, kernel) for i in range(128)])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_bad_config():
    with pytest.raises(ValueError):
        SimCLRAugment(dataclasses.replace(DEFAULT, jitter=[0.4, 0.4]))
    for kernel in (4, -1, -3):
        with pytest.raises(ValueError):
            SimCLRAugment(dataclasses.replace(DEFAULT, blur_kernel=kernel))


# --------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_without_syncs():
    aug = SimCLRAugment(DEFAULT)
    x = images(64)
    p = aug.sample_params(64, gen(0))
    ref = aug.apply_params(x, p)
    xc = x.cuda()
    pc = {k: v.cuda() for k, v in p.items()}
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls must not degrade the resize
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = aug.apply_params(xc, pc)
            g = torch.Generator(device="cuda").manual_seed(0)
            v = aug(xc, g)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        torch.set_float32_matmul_precision(prev)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-5)
    assert v.shape == (64, 3, 32, 32) and v.is_cuda
    # a CPU generator also drives a CUDA batch
    assert aug(xc, gen(1)).is_cuda


@pytest.mark.parametrize("shape", [(32, 32), (48, 40)])
def test_resized_crop_float64_path_matches(shape):
    # The float64 matmuls (the CUDA default) give the same as float32 ones, on both
    # the row-gather path (H <= size) and the dense-matrix path (H > size).
    from amoc.pretrain.augment import resized_crop

    aug = SimCLRAugment(DEFAULT)
    p = aug.sample_params(16, gen(0), height=shape[0], width=shape[1])
    x = images(16, *shape)
    args = (x, p["top"], p["left"], p["height"], p["width"], 32)
    a = resized_crop(*args, flip=p["flip"])
    b = resized_crop(*args, flip=p["flip"], compute_dtype=torch.float64)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_workspace_reuse_is_safe():
    """Work buffers are reused between calls: outputs stay intact, batch sizes may vary,
    and results equal those of a fresh module; copies do not share the buffers."""
    import copy
    import pickle

    aug = SimCLRAugment(DEFAULT)
    x = images(32)
    v1 = aug(x, gen(1))
    keep = v1.clone()
    small = aug(x[:5], gen(2))
    v2 = aug(x, gen(3))
    assert torch.equal(v1, keep)  # a later call does not write into an earlier output
    assert torch.equal(small, SimCLRAugment(DEFAULT)(x[:5], gen(2)))
    assert torch.equal(v2, SimCLRAugment(DEFAULT)(x, gen(3)))
    for clone in (copy.deepcopy(aug), pickle.loads(pickle.dumps(aug))):
        assert torch.equal(clone(x, gen(3)), v2)
        assert not clone._ws.bufs or all(
            b.data_ptr() != a.data_ptr() for b in clone._ws.bufs.values() for a in aug._ws.bufs.values()
        )


def test_module_moves_like_any_module():
    # `.to()` / `.float()` go through nn.Module._apply, which the class must not shadow.
    from amoc.config import AugmentConfig
    from amoc.pretrain.augment import SimCLRAugment

    aug = SimCLRAugment(AugmentConfig()).to("cpu").float()
    out = aug(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32)
