"""The per-step hot paths of the training stages: what `runtime.compile` compiles, and the
dual-BN branch that a module under DistributedDataParallel must not leave unused.

Compiling. Dynamo keeps its graphs per Python code object, each guarded on what it was
specialised for: input shapes, train/eval mode, grad mode, autocast, every dual BN's
branch. One compiled module that serves the training forward, the attacks (eval mode),
a no-grad target, validation and a smaller last batch collects a graph for each; past
`torch._dynamo.config.recompile_limit` (8) it silently runs eager, and on CUDA a
validation that compiles on rank 0 alone stalls the other ranks at the next collective.
So `hot` gives each per-step call site its own compiled callable (its own code object,
hence its own cache and its own limit) with static shapes (`dynamic=False`), and
everything else (validation, the k-NN monitor, a partial last batch) calls the eager
module. With `runtime.compile` off `hot` returns its argument: nothing changes.
"""

from __future__ import annotations

import types
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from amoc.nets.dual_bn import DualBatchNorm, other_branch
from amoc.runtime import Runtime

F = TypeVar("F", bound=Callable[..., Any])


def hot(fn: F, rt: Runtime, name: str) -> F:
    """`fn` (a module or a function) compiled for one per-step call site, when
    `rt.compile`; `fn` itself otherwise. `name` labels the compiled code
    (`amoc_hot_<name>` in Dynamo's logs). A DistributedDataParallel module is compiled
    as a whole, as torch documents it (DDP's bucket-aware graph splitting needs that);
    anything else through a trampoline with a code object of its own."""
    if not rt.compile:
        return fn
    rt.compile_modules()  # no modules: only the run's inductor settings (runtime.compile_modules)
    if isinstance(fn, nn.parallel.DistributedDataParallel):
        return torch.compile(fn, dynamic=False)  # type: ignore[return-value]

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    label = f"amoc_hot_{name}"
    code = call.__code__.replace(co_name=label)
    if hasattr(code, "co_qualname"):  # Python 3.11+
        code = code.replace(co_qualname=label)
    own = types.FunctionType(code, call.__globals__, label, None, call.__closure__)
    return torch.compile(own, dynamic=False)  # type: ignore[return-value]


def freeze_unused_bn(module: nn.Module, used: str) -> list[nn.Parameter]:
    """Stop gradients for the affine parameters of every dual BN's other branch (the one
    that is not `used`) and return them. A module that never runs that branch then has
    no trainable parameter without a gradient, so DistributedDataParallel needs no
    `find_unused_parameters` search (a traversal of the autograd graph every step).
    Their values do not change: an optimiser skips parameters without a gradient."""
    other = other_branch(used)
    frozen = []
    for m in module.modules():
        if isinstance(m, DualBatchNorm):  # the encoder's 2d ones and a projector's 1d ones
            for p in getattr(m, other).parameters():
                p.requires_grad_(False)
                frozen.append(p)
    return frozen
