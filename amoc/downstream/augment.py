"""Standard downstream augmentation (docs/downstream.md): random crop with zero padding and a
horizontal flip, drawn per sample, done for the whole batch at once on its device."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from amoc.distributed import Shard


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, *, pad: int = 4,
              flip_p: float = 0.5, shard: Shard = Shard()) -> torch.Tensor:
    """uint8 B x C x H x W -> float B x C x H x W in [0, 1].

    Each image is zero-padded by `pad` pixels, cropped back to H x W at an offset drawn
    uniformly from {0..2*pad}^2 and mirrored with probability `flip_p`: one gather, no
    per-image loop. All randomness comes from `generator` (on x's device); with a
    data-parallel `shard` it is drawn for the global batch and cut to x's rows.
    """
    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))                                          # B x C x H+2p x W+2p
    offset = lambda shape: torch.randint(0, 2 * pad + 1, shape, generator=generator, device=dev)  # noqa: E731
    oy = shard.sample(offset, (b,))
    ox = shard.sample(offset, (b,))
    flip = shard.sample(lambda shape: torch.rand(shape, generator=generator, device=dev), (b,)) < flip_p
    rows = oy[:, None] + torch.arange(h, device=dev)                                 # B x H
    cols = ox[:, None] + torch.arange(w, device=dev)                                 # B x W
    cols = torch.where(flip[:, None], cols.flip(1), cols)                            # a flip reverses the columns
    batch = torch.arange(b, device=dev)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]                       # B x H x W x C
    return out.permute(0, 3, 1, 2).contiguous().float().div_(255)
