"""LARS (You, Gitman & Ginsburg 2017), the optimiser of ACL and RoCL (docs/methods.md).

Each parameter tensor ("layer") w with gradient g takes the step of momentum SGD on
g + wd * w scaled by its trust ratio

    local = trust * ||w|| / (||g|| + wd * ||w||)     (1 where ||w|| or ||g|| is 0)
    buf   = momentum * buf + lr * local * (g + wd * w)
    w     = w - buf

as ACL's LARS does, for every parameter (BN and biases included). The norms stay on
the device: no host sync.
"""

from __future__ import annotations

from typing import Iterable

import torch


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust: float = 1e-3,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust <= 0:
            raise ValueError(f"LARS: bad settings lr={lr}, momentum={momentum}, wd={weight_decay}, trust={trust}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, momentum, wd, trust = group["lr"], group["momentum"], group["weight_decay"], group["trust"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                local = trust * w_norm / (g_norm + wd * w_norm)
                local = torch.where((w_norm > 0) & (g_norm > 0), local, torch.ones_like(local))
                update = p.grad.add(p, alpha=wd).mul_(local * lr)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update
                else:
                    state["momentum_buffer"].mul_(momentum).add_(update)
                p.sub_(state["momentum_buffer"])
        return loss
