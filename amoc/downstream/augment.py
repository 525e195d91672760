"""Standard downstream augmentation (docs/downstream.md): random crop with reflect padding
(the authors' `Pad(4, padding_mode="reflect")`) and a horizontal flip, drawn per sample,
done for the whole batch at once on its device."""

from __future__ import annotations

import torch

from amoc.distributed import Shard


def crop_flip(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    pad: int = 4,
    flip_p: float = 0.5,
    shard: Shard = Shard(),
) -> torch.Tensor:
    """uint8 B x C x H x W -> float B x C x H x W in [0, 1].

    Each image is padded by `pad` pixels with reflect padding (mirrored without repeating
    the edge, as torchvision's `Pad(pad, padding_mode="reflect")`), cropped back to H x W at
    an offset drawn uniformly from {0..2*pad}^2 and mirrored with probability `flip_p`: one
    gather straight from the unpadded image (the padding is an index map), no per-image
    loop. All randomness comes from `generator` (on x's device); with a data-parallel
    `shard` it is drawn for the global batch and cut to x's rows.
    """
    b, _, h, w = x.shape
    dev = x.device
    offset = lambda shape: torch.randint(0, 2 * pad + 1, shape, generator=generator, device=dev)  # noqa: E731
    oy = shard.sample(offset, (b,))
    ox = shard.sample(offset, (b,))
    flip = shard.sample(lambda shape: torch.rand(shape, generator=generator, device=dev), (b,)) < flip_p
    rows = _reflect(oy[:, None] + torch.arange(h, device=dev) - pad, h)  # B x H, rows of x
    cols = _reflect(ox[:, None] + torch.arange(w, device=dev) - pad, w)  # B x W
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reverses the columns
    batch = torch.arange(b, device=dev)[:, None, None]
    out = x[batch, :, rows[:, :, None], cols[:, None, :]]  # B x H x W x C
    return out.permute(0, 3, 1, 2).contiguous().float().div_(255)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices into an axis of n pixels, reflected at the borders without repeating the edge
    (-1 -> 1, n -> n - 2): reflect padding as an index map (pad < n)."""
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)
