"""A host-sync detector for CPU tests: the stand-in for torch.cuda.set_sync_debug_mode("error").

On CUDA the host queues kernels and runs ahead of the device; any op whose result the
host needs (a Python number or bool, a shape that depends on the data, a host copy) makes
it wait until the device has caught up. On the CPU nothing waits, so such a sync in a
per-step path goes unnoticed until a GPU run is slow. `NoHostSync` is a TorchFunctionMode
that raises `HostSync` on those ops while it is active:

- reads of a value: ``Tensor.item``, ``tolist``, ``numpy``, ``cpu``, ``__bool__`` (``if t``,
  ``and``/``or``/``not``), ``__int__``, ``__float__``, ``__complex__``, ``__index__`` (a
  tensor used as a Python index or size), ``__format__``/``__repr__`` (printing),
  ``__contains__`` (``x in t``), ``torch.equal``, ``allclose``, ``is_nonzero``;
- data-dependent output shapes: ``nonzero``, ``argwhere``, ``masked_select``, ``unique``,
  ``unique_consecutive``, ``bincount``, single-argument ``torch.where``, indexing or
  index assignment with a boolean mask, ``repeat_interleave`` with tensor repeats and no
  ``output_size``, ``one_hot`` without ``num_classes``;
- host data made into a tensor: ``torch.tensor``, ``as_tensor`` of non-tensor data,
  ``Tensor.new_tensor`` (on CUDA a blocking host-to-device copy).

What it cannot see on the CPU: a ``.to(device)`` or ``copy_`` between devices (every tensor
here is on the CPU) and syncs inside C++ kernels; tools/device_lint.py covers ``.to("cpu")``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor

# Tensor methods that hand a value to the host or size an output by the data
METHODS = {
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__int__",
    "__float__",
    "__complex__",
    "__index__",
    "__format__",
    "__repr__",
    "__contains__",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
    "bincount",
    "equal",
    "allclose",
    "is_nonzero",
    "new_tensor",
}
FUNCTIONS = {
    torch.nonzero,
    torch.argwhere,
    torch.masked_select,
    torch.unique,
    torch.unique_consecutive,
    torch.bincount,
    torch.equal,
    torch.allclose,
    torch.is_nonzero,
    torch.tensor,
}
INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_", "index"}


class HostSync(AssertionError):
    """An op that would make the host wait for a CUDA device."""


def _is_mask(index: Any) -> bool:
    if isinstance(index, Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, (tuple, list)):
        return any(_is_mask(i) for i in index)
    return False


def _name(func: Any) -> str:
    return getattr(func, "__name__", "") or ""


def sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why `func(*args, **kwargs)` syncs with the host on CUDA, or None."""
    name = _name(func)
    if func in FUNCTIONS or (name in METHODS and _is_tensor_method(func)):
        return f"{name}() reads the device from the host"
    if name in INDEXING and _is_tensor_method(func) or func is torch.Tensor.index_put_:
        index = args[1] if len(args) > 1 else kwargs.get("indices")
        if _is_mask(index):
            return f"{name} with a boolean mask sizes its output by the data"
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "torch.where(condition) sizes its output by the data"
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None:
            return "repeat_interleave with tensor repeats and no output_size sizes its output by the data"
    if name == "one_hot":
        classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
        if classes == -1:
            return "one_hot without num_classes reads the largest label"
    if func is torch.as_tensor and args and not isinstance(args[0], Tensor):
        return "as_tensor of host data copies it to the device"
    return None


def _is_tensor_method(func: Any) -> bool:
    qualname = getattr(func, "__qualname__", "") or ""
    return qualname.startswith(("TensorBase.", "Tensor.", "_TensorBase."))


class NoHostSync(TorchFunctionMode):
    """Within the block, raise `HostSync` on any op that syncs the host with a CUDA
    device (see the module docstring); `seen` counts the torch calls it checked. With
    `count_only` it lets them run and lists them in `syncs` instead."""

    def __init__(self, count_only: bool = False) -> None:
        super().__init__()
        self.count_only = count_only
        self.seen = 0
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen += 1
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            message = f"host sync: {reason} ({getattr(func, '__qualname__', func)})"
            if not self.count_only:
                raise HostSync(message)
            self.syncs.append(message)
        return func(*args, **kwargs)
