"""The per-step hot paths of the training stages: what `runtime.compile` compiles.

Dynamo keeps its graphs per Python code object, each guarded on what it was
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
