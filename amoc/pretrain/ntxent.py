"""In-batch NT-Xent, the contrastive loss of ACL and RoCL (docs/methods.md), as a pure function.

Rows of ``z`` are ``views`` groups of the same B images, view-major: rows v*B .. v*B+B-1
are view v. The logits of an anchor are its cosine similarities to every other row,
divided by the temperature; the anchor's own row is left out of the denominator. Every
other view of the same image is a positive with its own -log term, and the loss is the
sum of those terms over the anchors divided by the number of anchors (views * B):

- views = 2: SimCLR's NT-Xent (ACL: one positive per anchor, the mean over 2B anchors);
- views = 3: RoCL's form over (t1, t2, adversarial t1): two positives per anchor, each its
  own term, divided by 3B.

Computed in fp32 even under autocast (cos / 0.5 spans [-2, 2]; bf16 would round it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(
    z: torch.Tensor,
    views: int,
    temperature: float,
    *,
    detach_keys: bool = False,
    keys: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """The loss of the anchors ``z`` ((views * b) x D, view-major) against ``keys``.

    ``keys`` (default ``z``): the rows every anchor is compared with, view-major over
    ``B >= b`` images ((views * B) x D). In a data-parallel run they are every rank's rows
    (gathered, each view's block in rank order) and ``offset`` is where this rank's images
    start inside each view's block, so anchor i of view v sits at row v*B + offset + i.
    ``detach_keys``: no gradient through the key side of the similarities (RoCL's code).
    """
    keys = z if keys is None else keys
    with torch.autocast(z.device.type, enabled=False):
        anchors = F.normalize(z.float(), dim=1)
        others = F.normalize(keys.float(), dim=1)
        if detach_keys:
            others = others.detach()
        rows, total = anchors.shape[0], others.shape[0]
        b, big_b = rows // views, total // views
        if rows != views * b or total != views * big_b:
            raise ValueError(f"nt_xent: {rows} anchors and {total} keys do not split into {views} views")
        logits = anchors @ others.t() / temperature  # (views*b) x (views*B)
        row = torch.arange(rows, device=z.device)
        view, image = row // b, offset + row % b  # each anchor's view, and its image in a view's block
        self_col = view * big_b + image
        logits = logits.scatter(1, self_col[:, None], float("-inf"))  # the anchor itself is no candidate
        log_prob = F.log_softmax(logits, dim=1)
        positives = [((view + k) % views) * big_b + image for k in range(1, views)]
        terms = torch.stack([log_prob.gather(1, col[:, None])[:, 0] for col in positives], dim=1)
        return -terms.sum() / rows
