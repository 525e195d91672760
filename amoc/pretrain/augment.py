"""Batched SimCLR augmentation (docs/pretrain.md) with per-sample random parameters.

``SimCLRAugment`` takes a whole batch of images on the training device (CPU or CUDA)
and returns one augmented view per image. Every sample draws its own parameters, as
torchvision's per-image PIL pipeline does; torchvision's v2 transforms applied to a
batched tensor would draw one set for the whole batch. There is no per-image Python
loop, no PIL, no ``.item()`` and no host synchronisation, and every random number
comes from the ``generator`` passed in (a seeded CPU run is bit-for-bit repeatable).

The pipeline, per sample, in this order (torchvision semantics, checked against
``torchvision.transforms.v2.functional`` in tests/pretrain/test_augment.py, except the blur,
which is PIL's as the authors use it):

1. ``RandomResizedCrop(size, scale=crop_scale, ratio=crop_ratio)``: area fraction
   uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``, ``w`` and ``h``
   rounded, the first of 10 candidates that fits wins, else torchvision's central
   fallback crop; top-left offset uniform over the valid positions. The crop is
   resized to ``size x size`` with bilinear interpolation exactly as torchvision's
   ``resized_crop(..., antialias=True)`` does it, separably: along H, when the image
   is at most ``size`` tall (every crop is then upsampled, 2 source rows per output
   row), by gathering and blending rows, else by a batched matmul with a dense weight
   matrix; along W by a batched matmul with a B x size x W weight matrix. The weights
   are torch's antialiased-bilinear ones (a triangle filter, widened when shrinking,
   renormalised at the crop's edges). Unlike ``roi_align`` / ``grid_sample`` on the
   full image this never reads pixels outside the crop box (torchvision clamps at the
   crop edge), handles downscaling with torchvision's antialiasing, and on a 2-core
   CPU it is 10-50x faster than either. The ``1/255`` of uint8 input is folded into
   the row weights.
2. Horizontal flip with ``p=flip_p``: folded into the W weights (rows reversed), free.
3. ``ColorJitter(brightness, contrast, saturation, hue)`` with ``p=jitter_p``: factors
   uniform in ``[max(0, 1-v), 1+v]``, hue shift uniform in ``[-h, h]``, the four ops in
   a random order drawn per sample (torchvision's ``randperm(4)``), each clamped to
   [0, 1] as torchvision does. brightness = multiply, contrast = blend with the mean
   of the grayscale image, saturation = blend with the grayscale image, hue = rotation
   of the HSV hue (computed with the closed-form HSV->RGB formula, the same function as
   torchvision's table lookup up to float rounding). To apply a per-sample order
   without computing the expensive hue op four times, each sample's sequence is split
   at its hue op: three "blend" passes (the ops before hue, padded with identities),
   one hue pass, three blend passes (the ops after hue). A blend pass applies, for
   every sample, ``clamp(a*x + b_sat*gray(x) + b_con*mean(gray(x)))`` with that
   sample's coefficients, which covers brightness, contrast, saturation and the
   identity exactly.
4. ``RandomGrayscale(p=gray_p)`` with torchvision's luma weights (0.2989, 0.587, 0.114).
5. Gaussian blur with ``p=blur_p``, sigma uniform in ``blur_sigma``. With
   ``blur_kernel: 0`` (the default) it is the authors' PIL
   ``ImageFilter.GaussianBlur(radius=sigma)``: Pillow's algorithm, three passes of an
   "extended box" per axis (Gwosdek et al. 2011; variance exactly sigma^2, full
   support: 13 taps at sigma 2), each pass repeating the edge pixel beyond the border.
   Each sample's passes and edge rule are folded into one matrix per axis
   (``pil_blur_matrices``; the identity for samples that are not blurred), applied
   with two batched matmuls. A positive odd ``blur_kernel`` k gives torchvision's
   ``GaussianBlur(k)`` instead: a kernel truncated to k taps (at k = 3 the effective
   std is about 0.8 px whatever sigma), reflect padding, applied as a sum of k
   shifted copies weighted per sample along each axis.

Two knobs serve the baselines (docs/methods.md): ``interpolation: bicubic`` resizes the
crop with torch's antialiased bicubic filter (Keys' cubic, a = -0.5: PIL's BICUBIC, which
ACL uses) instead of bilinear, and ``order: color_first`` runs steps 3-4 on the whole
image before the crop and flip (RoCL's order: ColorJitter, RandomGrayscale,
RandomHorizontalFlip, RandomResizedCrop). ``blur_p: 0`` turns the blur off (both).

Differences from torchvision (and PIL): float32 rounding only (about 1e-6 for
crop/resize, blur and the blends, a few 1e-6 for hue; PIL's blur also rounds to uint8
after each of its six box passes, which this float version does not: on real CIFAR-10
images the two differ by 0.15-0.6/255 on average, under 3/255 at most), plus:
parameters are drawn from a batched stream of uniforms rather than torchvision's
sequence of scalar draws, so the same seed gives different (equally distributed)
augmentations than torchvision would; the crop candidates are computed in float32
rather than Python doubles (this can only move a ``round()`` that lands exactly on
.5). On CUDA the resize and blur matmuls run in float64, so they stay exact even when
TF32 matmuls are enabled globally; autocast is disabled inside.

Speed on CPU: apart from the output, every large intermediate lives in a workspace that
the module keeps between calls (a few MB). Allocating fresh multi-MB tensors would make
glibc map and unmap them on every call, and the page faults cost more than the
arithmetic (see benchmarks/README.md, "CPU allocator"). A consequence: one module must
not be called from several threads at once on CPU (use one module per thread; on CUDA
nothing is cached). ``torch.where`` is avoided on large tensors (it is ~20x slower than
arithmetic on CPU); per-sample selections are exact 0/1 blends instead.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from amoc.config import AugmentConfig
from amoc.distributed import Shard

__all__ = [
    "SimCLRAugment",
    "interp_matrix",
    "gaussian_kernels",
    "gaussian_blur",
    "pil_box_radius",
    "pil_blur_matrices",
    "pil_gaussian_blur",
    "resized_crop",
    "rgb_to_gray",
    "adjust_hue",
]

# ws(name, shape, like) -> an uninitialised work tensor (dtype/device of ``like``)
Workspace = Callable[[str, tuple, Tensor], Tensor]

LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision
CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 candidates

# Column layout of the one (B, N) block of uniforms drawn per call.
_C_AREA = 0
_C_RATIO = _C_AREA + CROP_TRIES
_C_TOP = _C_RATIO + CROP_TRIES
_C_LEFT = _C_TOP + 1
_C_FLIP = _C_LEFT + 1
_C_JITTER = _C_FLIP + 1
_C_FACTORS = _C_JITTER + 1  # brightness, contrast, saturation, hue
_C_ORDER = _C_FACTORS + 4  # 4 keys, argsort -> a random permutation
_C_GRAY = _C_ORDER + 4
_C_BLUR = _C_GRAY + 1
_C_SIGMA = _C_BLUR + 1
_N_UNIFORMS = _C_SIGMA + 1

# ColorJitter op ids (torchvision's fn_idx order).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_IDENTITY = -1


# --------------------------------------------------------------------------- helpers
def _fresh(name: str, shape: tuple, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


class _CPUWorkspace:
    """Named work buffers reused across calls on CPU (one flat buffer per name, grown
    when needed); elsewhere (CUDA's caching allocator is fast) plain new tensors."""

    def __init__(self) -> None:
        self.bufs: dict[str, Tensor] = {}

    def __call__(self, name: str, shape: tuple, like: Tensor) -> Tensor:
        if like.device.type != "cpu":
            return _fresh(name, shape, like)
        n = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype:
            buf = self.bufs[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)

    def __getstate__(self) -> dict:  # do not pickle or deepcopy the buffers
        return {"bufs": {}}


def resized_crop(
    images: Tensor,
    top: Tensor,
    left: Tensor,
    height: Tensor,
    width: Tensor,
    size: int,
    flip: Tensor | None = None,
    out: Tensor | None = None,
    ws: Workspace = _fresh,
    compute_dtype: torch.dtype | None = None,
    kernel: str = "bilinear",
) -> Tensor:
    """Per-sample crop ``[top, top+height) x [left, left+width)`` of ``images``
    (B x C x H x W, uint8 -> scaled to [0,1], or float), resized to ``size x size`` as
    torchvision's ``resized_crop(..., antialias=True)`` and mirrored where ``flip``;
    returns float32 B x C x size x size (into ``out`` if given).

    Separable: rows first, then columns. When the image is at most ``size`` tall every
    crop is upsampled along H, and bilinear upsampling reads 2 rows per output row, so
    the rows are gathered (``index_select`` of whole rows) and blended; otherwise a dense
    B x size x H weight matrix is applied with a batched matmul. The columns always use
    a batched matmul with ``interp_matrix`` (flip folded in). ``kernel`` "bicubic" reads 4
    rows per output row, so it always takes the matrix path. By default the matmuls run
    in float64 on CUDA: fp32 matmuls there may silently use TF32
    (torch.backends.cuda.matmul settings, which this module must neither read nor
    change), and the cost is negligible at these sizes; float32 elsewhere."""
    b, c, h, w = images.shape
    dtype = compute_dtype or (torch.float64 if images.is_cuda else torch.float32)
    ref = images.new_empty((), dtype=dtype)
    unit = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    if out is None:
        out = images.new_empty((b, c, size, size), dtype=torch.float32)
    if images.dtype != dtype or not images.is_contiguous():
        # one conversion up front: CPU kernels given mixed dtypes make converted copies
        images = ws("crop_in", (b, c, h, w), ref).copy_(images)
    y = ws("crop_rows", (b, c, size, w), ref)  # the crop's rows resized to `size`
    if h <= size and kernel == "bilinear":
        length = height.to(dtype)[:, None]  # B x 1
        o = torch.arange(size, device=images.device, dtype=dtype)[None, :]
        src = ((o + 0.5) * (length / size) - 0.5).clamp_(min=0.0)  # B x S, in crop rows
        src = torch.minimum(src, length - 1.0)
        i0 = src.floor()
        frac = src - i0
        i0 = i0.long().add_(top.view(-1, 1))  # image row
        i1 = torch.minimum(i0 + 1, (top + height - 1).view(-1, 1))
        base = (torch.arange(b * c, device=images.device) * h).view(b, c, 1)
        flat = images.view(b * c * h, w)
        y0 = torch.index_select(
            flat, 0, (i0.unsqueeze(1) + base).view(-1), out=ws("crop_y0", (b * c * size, w), images)
        )
        y1 = torch.index_select(
            flat, 0, (i1.unsqueeze(1) + base).view(-1), out=ws("crop_y1", (b * c * size, w), images)
        )
        w1 = (frac * unit).view(b, 1, size, 1)
        w0 = ((1.0 - frac) * unit).view(b, 1, size, 1)
        torch.mul(y0.view(b, c, size, w), w0, out=y).addcmul_(y1.view(b, c, size, w), w1)
    else:
        ry = interp_matrix(top, height, h, size, scale=unit, kernel=kernel).to(dtype)
        rows = ws("crop_ry", (b, c, size, h), ref).copy_(ry.unsqueeze(1).expand(b, c, size, h))
        torch.bmm(rows.view(b * c, size, h), images.view(b * c, h, w), out=y.view(b * c, size, w))
    rx = interp_matrix(left, width, w, size, flip=flip, out=ws("crop_rx", (b, size, w), ref.float()), kernel=kernel)
    if dtype == torch.float32:
        torch.bmm(y.view(b, c * size, w), rx.transpose(1, 2), out=out.view(b, c * size, size))
    else:
        out.copy_(torch.bmm(y.view(b, c * size, w), rx.to(dtype).transpose(1, 2)).view(b, c, size, size))
    return out


def interp_matrix(
    start: Tensor,
    length: Tensor,
    in_size: int,
    out_size: int,
    scale: float = 1.0,
    flip: Tensor | None = None,
    out: Tensor | None = None,
    kernel: str = "bilinear",
) -> Tensor:
    """B x out_size x in_size weights that resize ``[start, start+length)`` of an axis
    of ``in_size`` pixels to ``out_size`` pixels: torch's antialiased bilinear filter
    (``interpolate(mode="bilinear", align_corners=False, antialias=True)``, which
    torchvision's resized_crop uses) applied to the crop only, or with ``kernel``
    "bicubic" its antialiased bicubic one (Keys' cubic with a = -0.5, support 2, as PIL's
    BICUBIC). ``scale`` multiplies every weight (used to fold in 1/255); where ``flip``
    (B, bool) is true the output is mirrored (rows in reverse order)."""
    start = start.to(torch.float32)[:, None, None]
    length = length.to(torch.float32)[:, None, None]
    dev = start.device
    step = length / out_size  # input pixels per output pixel
    support = step.clamp(min=1.0)
    o = torch.arange(out_size, device=dev, dtype=torch.float32)[None, :, None]
    if flip is not None:
        o = torch.where(flip[:, None, None], (out_size - 1) - o, o)  # B x S x 1, exact
    centre = (o + 0.5) * step
    rel = torch.arange(in_size, device=dev, dtype=torch.float32)[None, None, :] - start
    inside = ((rel >= 0) & (rel < length)).to(torch.float32)  # B x 1 x in_size
    w = torch.sub(rel + 0.5, centre, out=out)  # B x S x in_size
    if kernel == "bicubic":
        d = w.div_(support).abs_()
        near = ((1.5 * d - 2.5) * d) * d + 1.0  # |d| <= 1: (a + 2)|d|^3 - (a + 3)|d|^2 + 1
        far = ((-0.5 * d + 2.5) * d - 4.0) * d + 2.0  # 1 < |d| < 2: a|d|^3 - 5a|d|^2 + 8a|d| - 4a
        w = torch.where(d <= 1.0, near, torch.where(d < 2.0, far, 0.0)).mul_(inside)
    elif kernel == "bilinear":
        w.div_(support).abs_().neg_().add_(1.0).clamp_(min=0.0).mul_(inside)
    else:
        raise ValueError(f"kernel must be 'bilinear' or 'bicubic', got {kernel!r}")
    return w.mul_(scale / w.sum(-1, keepdim=True))


def gaussian_kernels(sigma: Tensor, kernel_size: int, apply: Tensor | None = None) -> Tensor:
    """B x kernel_size 1-d Gaussian kernels, torchvision's formula; the identity
    (a centred delta) for the samples where ``apply`` (B, bool) is false."""
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float32)
    kernel = torch.softmax(-(offsets[None, :] / sigma.to(torch.float32)[:, None]).square() * 0.5, dim=1)
    if apply is not None:
        kernel = torch.where(apply[:, None], kernel, (offsets == 0).to(torch.float32))
    return kernel


def gaussian_blur(x: Tensor, kernel: Tensor, out: Tensor | None = None, ws: Workspace = _fresh) -> Tensor:
    """Per-sample separable blur of x (B x C x H x W float) with the B x k kernels
    ``kernel`` (odd k) and reflect padding, as torchvision's gaussian_blur: a sum of k
    shifted, per-sample weighted copies along each axis (at k = 3 several times faster
    on CPU than a grouped conv2d or banded matrix products). ``out`` may be ``x``."""
    bsz, c, h, w = x.shape
    k = kernel.shape[1]
    half = k // 2
    if half >= min(h, w):
        raise ValueError(f"blur kernel {k} is too large for {h}x{w} images (reflect padding)")
    kern = kernel.to(x.dtype).view(bsz, 1, 1, 1, k)
    # along W: pad the columns (reflect: no edge repeat), then sum the shifted copies
    xp = ws("blur_pad_w", (bsz, c, h, w + 2 * half), x)
    xp[..., half : half + w].copy_(x)
    for i in range(1, half + 1):
        xp[..., half - i].copy_(x[..., i])
        xp[..., half + w - 1 + i].copy_(x[..., w - 1 - i])
    yp = ws("blur_pad_h", (bsz, c, h + 2 * half, w), x)  # the W-blurred image, padded along H
    y = yp[:, :, half : half + h]
    torch.mul(xp[..., 0:w], kern[..., 0], out=y)
    for j in range(1, k):
        y.addcmul_(xp[..., j : j + w], kern[..., j])
    for i in range(1, half + 1):
        yp[:, :, half - i].copy_(y[:, :, i])
        yp[:, :, half + h - 1 + i].copy_(y[:, :, h - 1 - i])
    if out is None:
        out = torch.empty_like(x)
    torch.mul(yp[:, :, 0:h], kern[..., 0], out=out)
    for j in range(1, k):
        out.addcmul_(yp[:, :, j : j + h], kern[..., j])
    return out


PIL_BOX_PASSES = 3  # Pillow's GaussianBlur: three box-blur passes per axis


def _box_int(sigma: float) -> int:
    """Integer part l of the box radius for ``sigma`` (see ``pil_box_radius``)."""
    return math.floor((math.sqrt(12.0 * sigma * sigma / PIL_BOX_PASSES + 1.0) - 1.0) / 2.0)


def pil_box_radius(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Pillow's box radius for ``GaussianBlur(radius=sigma)`` as (l, a): the integer
    and fractional parts of the "extended box" (Gwosdek et al., 2011) of half-width
    ``l + a`` whose ``PIL_BOX_PASSES`` passes have variance exactly ``sigma**2``:
    weight 1 on offsets -l..l, ``a`` on offsets +-(l+1), divided by ``2(l+a)+1``."""
    s2 = sigma.to(torch.float64).square() / PIL_BOX_PASSES
    l = torch.sqrt(12.0 * s2 + 1.0).sub_(1.0).div_(2.0).floor_()
    a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * s2) / (6.0 * (s2 - (l + 1.0).square()))
    return l, a


_BOX_TABLES: dict[tuple, Tensor] = {}  # (n, n_l, dtype, device) -> the tables (a few 10 kB each)


def _pil_box_tables(n: int, n_l: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(4 n_l) x (n*n): for l = 0 .. n_l-1, the four coefficient matrices of ``(A_l + a
    F_l)^3`` in powers of ``a`` (see ``pil_blur_matrices``), flattened. Small integers,
    exact in float32. Kept between calls per (n, n_l, dtype, device), read only: building
    them is ~20 small ops, on CUDA ~20 kernel launches per call."""
    key = (n, n_l, dtype, torch.device(device))
    if key in _BOX_TABLES:
        return _BOX_TABLES[key]
    idx = torch.arange(n, device=device, dtype=dtype)
    dist = (idx[None, :] - idx[:, None]).abs_()  # n x n, |j - i|
    edge = torch.ones(n, device=device, dtype=dtype)  # cap per column: 1 inside, unbounded at the edges
    edge[0] = edge[-1] = math.inf
    ls = torch.arange(n_l, device=device, dtype=dtype).view(-1, 1, 1)
    box = torch.minimum((ls + 1.0 - dist).clamp_(min=0.0), edge)  # A_l, edge-clamped: L x n x n
    far = torch.minimum((ls + 2.0 - dist).clamp_(min=0.0), edge).sub_(box)  # F_l
    aa, af, fa, ff = box @ box, box @ far, far @ box, far @ far
    table = torch.stack([aa @ box, aa @ far + af @ box + fa @ box, af @ far + fa @ far + ff @ box, ff @ far], dim=1)
    table = _BOX_TABLES[key] = table.view(n_l * 4, n * n)
    return table


def pil_blur_matrices(
    sigma: Tensor,
    n: int,
    max_sigma: float,
    apply: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,
) -> Tensor:
    """B x n x n: the linear map that Pillow's ``ImageFilter.GaussianBlur(radius=sigma)``
    applies along an axis of ``n`` pixels (``out @ line``), per sample; the exact
    identity where ``apply`` (B, bool) is false.

    Pillow blurs each axis with three passes of the extended box of ``pil_box_radius``,
    and every pass repeats the edge pixel beyond the border (clamp to edge, pass by
    pass: not the same as padding the combined kernel once). One pass is
    ``P = (A_l + a F_l) / (2(l+a)+1)``, with ``A_l`` the 0/1 box of offsets -l..l and
    ``F_l`` the two taps at +-(l+1), both with the out-of-image taps moved onto the
    edge pixel. So ``P^3`` is a cubic in ``a``: the four coefficient matrices of
    ``(A + aF)^3`` are built once per integer ``l`` up to that of ``max_sigma`` (they
    hold small integers, exact in float32) and each sample's matrix is one weighted sum
    (a single (B, 4L) x (4L, n*n) matmul) instead of two B x n x n matmuls. Sigmas above
    ``max_sigma`` are clamped to it. The combined kernel spans ``2 * 3(l+1) + 1`` taps
    (13 at sigma 2), always in full: nothing is truncated."""
    bsz, dev = sigma.shape[0], sigma.device
    if out is None:
        out = torch.empty((bsz, n, n), dtype=dtype, device=dev)
    if n == 1:  # one pixel: every pass returns it unchanged
        return out.fill_(1.0)
    sig = sigma.clamp(max=float(max_sigma))
    l, a = pil_box_radius(sig)
    if apply is not None:  # radius 0 = the identity, exactly
        l = l.mul_(apply)
        a = a.mul_(apply)
    # one spare integer radius: float rounding of sigma near a jump of l cannot fall off the table
    n_l = _box_int(float(max_sigma)) + 2
    l = l.clamp_(max=n_l - 1)
    table = _pil_box_tables(n, n_l, dtype, dev)
    one = torch.ones_like(a)
    coef = torch.stack([one, a, a * a, a * a * a], dim=1) / (2.0 * (l + a) + 1.0).pow(3).unsqueeze(1)  # B x 4
    pick = (l.unsqueeze(1) == torch.arange(n_l, device=dev, dtype=l.dtype)).to(coef.dtype)  # B x L one-hot
    coef = (pick.unsqueeze(2) * coef.unsqueeze(1)).view(bsz, n_l * 4).to(dtype)
    torch.mm(coef, table, out=out.view(bsz, n * n))
    return out


def pil_gaussian_blur(
    x: Tensor,
    sigma: Tensor,
    max_sigma: float,
    apply: Tensor | None = None,
    out: Tensor | None = None,
    ws: Workspace = _fresh,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-sample blur of x (B x C x H x W float) as Pillow's
    ``ImageFilter.GaussianBlur(radius=sigma[b])`` (in float, without Pillow's rounding
    to uint8 after each of its six box passes), the identity where ``apply`` is false.
    Two batched matmuls with the ``pil_blur_matrices`` (the border rule folded in):
    ``M_H x M_W^T`` per image. On the 2-core CPU (one thread, 256 images of 32 x 32,
    CPU time) this took 13 ms, against 8 ms for torchvision's 3-tap kernel as a sum of
    shifted copies (``gaussian_blur``) and 34 ms for a 13-tap one. As in ``resized_crop``
    the matmuls run in float64 on CUDA by default (TF32 must not round the weights).
    ``out`` may be ``x``."""
    bsz, c, h, w = x.shape
    dtype = compute_dtype or (torch.float64 if x.is_cuda else torch.float32)
    ref = x.new_empty((), dtype=dtype)
    mh = pil_blur_matrices(sigma, h, max_sigma, apply, dtype=dtype, out=ws("blur_mh", (bsz, h, h), ref))
    mw = (
        mh
        if w == h
        else pil_blur_matrices(sigma, w, max_sigma, apply, dtype=dtype, out=ws("blur_mw", (bsz, w, w), ref))
    )
    src = x if x.dtype == dtype and x.is_contiguous() else ws("blur_in", (bsz, c, h, w), ref).copy_(x)
    t = torch.bmm(src.view(bsz, c * h, w), mw.transpose(1, 2), out=ws("blur_t", (bsz, c * h, w), ref))
    rows = ws("blur_rows", (bsz, c, h, h), ref).copy_(mh.unsqueeze(1).expand(bsz, c, h, h))
    if out is None:
        out = torch.empty_like(x)
    if out.dtype == dtype and out.is_contiguous():
        torch.bmm(rows.view(bsz * c, h, h), t.view(bsz * c, h, w), out=out.view(bsz * c, h, w))
    else:
        out.copy_(torch.bmm(rows.view(bsz * c, h, h), t.view(bsz * c, h, w)).view(bsz, c, h, w))
    return out


def rgb_to_gray(x: Tensor, out: Tensor | None = None) -> Tensor:
    """B x 3 x H x W -> B x 1 x H x W luma, torchvision's formula."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.mul(r, LUMA[0], out=out).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2])


# Closed-form HSV->RGB: channel n is max - chroma * m_n with
# m_n = clamp(| |6h - c_n| - 3 | - 1, 0, 1), 6h in [0, 6), c = 3, 5, 1 for R, G, B
# (a trapezoid of the circular distance between 6h and c_n).
_HUE_CENTRES = (3.0, 5.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor, out: Tensor | None = None, ws: Workspace = _fresh) -> Tensor:
    """Rotate the HSV hue of each sample of ``x`` (B x 3 x H x W in [0,1]) by
    ``shift[b]`` turns: torchvision's adjust_hue (RGB->HSV, h = (h + shift) mod 1,
    HSV->RGB), in closed form; the same function up to float rounding."""
    bsz, _, hgt, wid = x.shape
    one = (bsz, 1, hgt, wid)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = torch.maximum(r, g, out=ws("hue_max", one, x))
    torch.maximum(maxc, b, out=maxc)
    chroma = torch.minimum(r, g, out=ws("hue_chroma", one, x))
    torch.minimum(chroma, b, out=chroma)
    torch.sub(maxc, chroma, out=chroma)
    # 6*hue = (g-b)/chroma if r is the max, else 2 + (b-r)/chroma if g is, else
    # 4 + (r-g)/chroma (torchvision's priority; ties give the same hue anyway),
    # selected with 0/1 masks. Grey pixels (chroma 0) have zero numerators, so any
    # finite divisor works, and they come out as maxc whatever the hue.
    is_r = torch.eq(maxc, r, out=ws("hue_is_r", one, x))
    is_g = torch.eq(maxc, g, out=ws("hue_is_g", one, x))
    is_g.addcmul_(is_g, is_r, value=-1.0)
    is_b = torch.add(is_r, is_g, out=ws("hue_is_b", one, x)).neg_().add_(1.0)
    h6 = torch.sub(g, b, out=ws("hue_h6", one, x)).mul_(is_r)
    tmp = ws("hue_tmp", one, x)
    h6.addcmul_(torch.sub(b, r, out=tmp), is_g)
    h6.addcmul_(torch.sub(r, g, out=tmp), is_b)
    h6.div_(torch.clamp(chroma, min=1e-20, out=tmp)).add_(is_g, alpha=2.0).add_(is_b, alpha=4.0)
    h6.add_(shift.to(x.dtype).view(-1, 1, 1, 1) * 6.0)
    h6.add_(torch.mul(h6, 1.0 / 6.0, out=tmp).floor_(), alpha=-6.0)  # mod 6 (m is continuous at the wrap)
    # _HUE_CENTRES = (3, 5, 1) = (3 + 2n) mod 6, made on the device (no host copy)
    centres = torch.arange(3, device=x.device, dtype=x.dtype).mul_(2.0).add_(3.0).remainder_(6.0).view(1, 3, 1, 1)
    m = torch.sub(h6, centres, out=out)  # B x 3 x H x W
    m.abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return torch.addcmul(maxc, chroma, m, value=-1.0, out=m)


def _blend_(x: Tensor, a: Tensor, b_con: Tensor, b_sat: Tensor, ws: Workspace = _fresh) -> Tensor:
    """In place, per sample: x <- clamp(a*x + b_sat*gray(x) + b_con*mean(gray(x)), 0, 1).
    (a, 0, 0) is brightness a, (f, 1-f, 0) contrast f, (f, 0, 1-f) saturation f and
    (1, 0, 0) the identity, exactly (a*x + 0 == x). Coefficients are B x 1 x 1 x 1."""
    bsz, _, hgt, wid = x.shape
    gray = rgb_to_gray(x, out=ws("gray", (bsz, 1, hgt, wid), x))
    mean = gray.mean(dim=(2, 3), keepdim=True)
    gray.mul_(b_sat).add_(mean.mul_(b_con))
    return torch.addcmul(gray, x, a, out=x).clamp_(0.0, 1.0)


def _put_(x: Tensor, mask: Tensor, y: Tensor) -> Tensor:
    """In place: ``x[b] = y[b]`` for the samples where ``mask`` (B,) is true; ``y`` (a
    temporary, broadcastable to x) is overwritten. Exact for finite values
    (x*0 + y*1 = y, x*1 + y*0 = x)."""
    m = mask.to(x.dtype).view(-1, 1, 1, 1)
    return x.mul_(1.0 - m).add_(y.mul_(m))


# --------------------------------------------------------------------------- module
class SimCLRAugment(nn.Module):
    """One SimCLR view per image, parameters drawn per sample; see the module doc."""

    def __init__(self, cfg: AugmentConfig | None = None, size: int = 32) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else AugmentConfig()
        if len(cfg.jitter) != 4:
            raise ValueError(f"jitter needs 4 values (brightness, contrast, saturation, hue), got {cfg.jitter!r}")
        if cfg.blur_kernel < 0 or (cfg.blur_kernel > 0 and cfg.blur_kernel % 2 != 1):
            raise ValueError(f"blur_kernel must be 0 (PIL's full-support blur) or odd, got {cfg.blur_kernel}")
        self.cfg = cfg
        self.size = int(size)
        self.scale = (float(cfg.crop_scale[0]), float(cfg.crop_scale[1]))
        self.ratio = (float(cfg.crop_ratio[0]), float(cfg.crop_ratio[1]))
        b, c, s, h = (float(v) for v in cfg.jitter)
        # torchvision's ColorJitter ranges; (1, 1) / (0, 0) means "op not used".
        self.factor_ranges = [(max(0.0, 1.0 - v), 1.0 + v) for v in (b, c, s)] + [(-h, h)]
        self.use_hue = h > 0
        self.use_jitter = cfg.jitter_p > 0 and any(v > 0 for v in (b, c, s, h))
        self.use_gray = cfg.gray_p > 0
        self.use_blur = cfg.blur_p > 0
        self.use_flip = cfg.flip_p > 0
        self._ws = _CPUWorkspace()

    def extra_repr(self) -> str:
        return f"size={self.size}, cfg={self.cfg}"

    # ------------------------------------------------------------------ parameters
    def sample_params(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample parameters for ``batch`` images of ``height x width`` (default
        ``size x size``), as tensors on ``device``:

        top, left, height, width (int64 crop box); flip, jitter, gray, blur (bool:
        whether the op is applied); brightness, contrast, saturation (multiplicative
        factors), hue (shift in turns), order (B x 4 int64 permutation of the op ids
        0=brightness 1=contrast 2=saturation 3=hue), sigma (blur sigma). The factors are
        drawn for every sample; they only act where ``jitter`` is true.
        """
        height = self.size if height is None else int(height)
        width = self.size if width is None else int(width)
        device = (
            torch.device(device)
            if device is not None
            else (generator.device if generator is not None else torch.device("cpu"))
        )
        draw_on = generator.device if generator is not None else device
        u = torch.rand(batch, _N_UNIFORMS, generator=generator, device=draw_on)
        if u.device != device:
            u = u.to(device, non_blocking=True)
        cfg = self.cfg
        out: dict[str, Tensor] = {}

        # RandomResizedCrop.get_params, 10 candidates at once, the first valid wins.
        area = float(height * width)
        lo, hi = self.scale
        target = area * (lo + (hi - lo) * u[:, _C_AREA : _C_AREA + CROP_TRIES])
        lr0, lr1 = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lr0 + (lr1 - lr0) * u[:, _C_RATIO : _C_RATIO + CROP_TRIES])
        cw = torch.sqrt(target * aspect).round_()
        ch = torch.sqrt(target / aspect).round_()
        valid = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
        rank = torch.arange(CROP_TRIES, 0, -1, device=device, dtype=torch.float32)
        first = (valid * rank).argmax(dim=1, keepdim=True)  # unique max = first valid
        found = valid.any(dim=1)
        fh, fw = self._fallback_box(height, width)
        h = torch.where(found, ch.gather(1, first)[:, 0], float(fh))
        w = torch.where(found, cw.gather(1, first)[:, 0], float(fw))
        top = torch.minimum((u[:, _C_TOP] * (height - h + 1)).floor_(), height - h)
        left = torch.minimum((u[:, _C_LEFT] * (width - w + 1)).floor_(), width - w)
        top = torch.where(found, top, float((height - fh) // 2))
        left = torch.where(found, left, float((width - fw) // 2))
        out["top"], out["left"] = top.long(), left.long()
        out["height"], out["width"] = h.long(), w.long()

        out["flip"] = u[:, _C_FLIP] < cfg.flip_p
        out["jitter"] = u[:, _C_JITTER] < cfg.jitter_p
        for i, name in enumerate(("brightness", "contrast", "saturation", "hue")):
            a, b = self.factor_ranges[i]
            out[name] = a + (b - a) * u[:, _C_FACTORS + i]
        out["order"] = torch.argsort(u[:, _C_ORDER : _C_ORDER + 4], dim=1)
        out["gray"] = u[:, _C_GRAY] < cfg.gray_p
        out["blur"] = u[:, _C_BLUR] < cfg.blur_p
        s0, s1 = float(cfg.blur_sigma[0]), float(cfg.blur_sigma[1])
        out["sigma"] = s0 + (s1 - s0) * u[:, _C_SIGMA]
        return out

    def _fallback_box(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's central-crop fallback size (h, w) after 10 failed tries."""
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:
            w, h = width, height
        return h, w

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, generator: torch.Generator | None = None, shard: Shard | None = None) -> Tensor:
        """images: B x 3 x H x W uint8 (or float in [0,1]) on any device -> float32
        B x 3 x size x size in [0,1]; every sample gets its own random parameters.
        With a data-parallel `shard`, `images` are this rank's rows of a global batch: the
        parameters are drawn for the global batch and cut to these rows."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W images, got shape {tuple(images.shape)}")
        b, _, hgt, wid = images.shape
        params = self.sample_params(
            b if shard is None else shard.total, generator=generator, device=images.device, height=hgt, width=wid
        )
        if shard is not None:
            params = {name: shard.rows(value) for name, value in params.items()}
        return self.apply_params(images, params)

    def apply_params(self, images: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Apply explicit per-sample parameters (as returned by ``sample_params``)."""
        with torch.autocast(images.device.type, enabled=False):
            return self._augment(images, p)

    def _augment(self, images: Tensor, p: dict[str, Tensor]) -> Tensor:
        b, size = images.shape[0], self.size
        dev = images.device
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")

        ws = self._ws
        like = images.new_empty((), dtype=torch.float32)
        out = torch.empty((b, 3, size, size), dtype=torch.float32, device=dev)  # the only new big tensor

        if self.cfg.order == "color_first":  # RoCL: colour on the whole image, then flip and crop
            full = ws("color_first", images.shape, like).copy_(images)
            if images.dtype == torch.uint8:
                full.div_(255.0)
            self._color_(full, p)
            x = self._crop(full, p, out)
        else:  # 1-2. crop + resize + flip, then 3-4. colour jitter and grayscale
            x = self._color_(self._crop(images, p, out), p)
        # 5. Gaussian blur (the identity where not blurred): PIL's, or torchvision's k-tap one.
        if self.use_blur and self.cfg.blur_kernel == 0:
            pil_gaussian_blur(x, p["sigma"], float(self.cfg.blur_sigma[1]), apply=p["blur"], out=x, ws=ws)
        elif self.use_blur:
            kernel = gaussian_kernels(p["sigma"], self.cfg.blur_kernel, apply=p["blur"])
            gaussian_blur(x, kernel, out=x, ws=ws)
        return x.clamp_(0.0, 1.0)

    def _crop(self, images: Tensor, p: dict[str, Tensor], out: Tensor) -> Tensor:
        """1-2. crop + resize (the configured filter) + flip, into ``out``."""
        return resized_crop(
            images,
            p["top"],
            p["left"],
            p["height"],
            p["width"],
            self.size,
            flip=p["flip"] if self.use_flip else None,
            out=out,
            ws=self._ws,
            kernel=self.cfg.interpolation,
        )

    def _color_(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """3. colour jitter (clamped to [0,1] after each op, as torchvision), 4. grayscale; in place."""
        if self.use_jitter:
            self._jitter_(x, p)
        if self.use_gray:
            b, _, h, w = x.shape
            _put_(x, p["gray"], rgb_to_gray(x, out=self._ws("gray", (b, 1, h, w), x)))
        return x

    def jitter_plan(self, p: dict[str, Tensor]) -> tuple[Tensor, int]:
        """The colour-jitter schedule: op ids of the blend passes (B x n; 0, 1, 2 =
        brightness, contrast, saturation, -1 = identity) and the number of passes that
        run before the (single) hue pass. Each sample's torchvision order
        ``p["order"]`` is split at its hue op: ops before hue go in passes 0-2, ops
        after it in passes 3-5, padded with identities."""
        order = p["order"]
        on = p["jitter"].view(-1, 1)
        if not self.use_hue:
            ops = torch.where(order == HUE, _IDENTITY, order)
            return torch.where(on, ops, _IDENTITY), ops.shape[1]
        hue_pos = (order == HUE).long().argmax(dim=1, keepdim=True)  # B x 1
        j = torch.arange(3, device=order.device).view(1, 3)
        pre = torch.where(j < hue_pos, order[:, :3], _IDENTITY)
        idx = hue_pos + 1 + j
        post = torch.where(idx <= 3, order.gather(1, idx.clamp(max=3)), _IDENTITY)
        return torch.where(on, torch.cat([pre, post], dim=1), _IDENTITY), 3

    def _jitter_(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        ops, n_pre = self.jitter_plan(p)  # B x n
        factors = torch.stack([p["brightness"], p["contrast"], p["saturation"]], dim=1).to(torch.float32)
        f = factors.gather(1, ops.clamp(min=0))
        a = torch.where(ops >= 0, f, 1.0)
        b_con = torch.where(ops == CONTRAST, 1.0 - f, 0.0)
        b_sat = torch.where(ops == SATURATION, 1.0 - f, 0.0)
        coef = torch.stack([a, b_con, b_sat], dim=0).unsqueeze(-1).unsqueeze(-1)  # 3 x B x n x 1 x 1
        for i in range(ops.shape[1]):
            if i == n_pre:
                _put_(x, p["jitter"], adjust_hue(x, p["hue"], out=self._ws("hue", x.shape, x), ws=self._ws))
            c = coef[:, :, i : i + 1]  # 3 x B x 1 x 1 x 1
            _blend_(x, c[0], c[1], c[2], ws=self._ws)
        return x
