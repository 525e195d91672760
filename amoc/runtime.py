"""Device, precision, threads and seeding: resolved once per stage from `runtime:`."""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from amoc.config import RuntimeConfig
from amoc.distributed import Dist
from amoc.errors import AmocError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = full fp32
    channels_last: bool
    progress: bool
    compile: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move a module to the device (and memory format) this run uses."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def generator(self, seed: int) -> torch.Generator:
        """A generator on the run's device, for augmentation and attack noise."""
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AmocError(f"runtime.device: {name!r} requested but no CUDA device is available; use --set runtime.device=cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise AmocError(f"runtime.device: {name!r} does not exist ({torch.cuda.device_count()} CUDA devices); pick another index")
    return device


def setup(cfg: RuntimeConfig, seed: int, dist: Dist = Dist()) -> Runtime:
    """Seed every RNG, set threads, pick device and precision. In a multi-process CUDA
    run each rank takes the GPU of its local rank (`runtime.device: auto` or `cuda`)."""
    device = resolve_device(cfg.device)
    if dist.active and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.precision == "bf16":
        amp = torch.bfloat16
    elif cfg.precision == "fp32":
        amp = None
    else:
        amp = torch.bfloat16 if device.type == "cuda" else None
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
    return Runtime(device=device, amp_dtype=amp, channels_last=channels_last, progress=cfg.progress,
                   compile=cfg.compile)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode for a block (attacks use running BN stats), then restore."""
    before = [[m.training for m in mod.modules()] for mod in modules]
    for mod in modules:
        mod.eval()
    try:
        yield
    finally:
        for mod, flags in zip(modules, before):
            for m, flag in zip(mod.modules(), flags):
                m.training = flag


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Stop parameter gradients for a block (an attack needs the input gradient only)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def oom_hint(stage: str, batch_key: str, batch_size: int) -> Iterator[None]:
    """Turn a CUDA out-of-memory error inside the block into a one-line AmocError (exit 2)
    naming the batch size and the override that lowers it, e.g.

        with oom_hint("pretrain", "pretrain.batch_size", p.batch_size):
            ...training steps...

    The cached blocks are released first (outside the except block, once the OOM's frames
    and the tensors they hold are gone), so the message is not followed by a second OOM."""
    message = None
    try:
        yield
    except torch.OutOfMemoryError as exc:
        message = (str(exc).strip().splitlines() or ["CUDA out of memory"])[0]
    if message is not None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise AmocError(f"{stage}: out of GPU memory at batch size {batch_size} ({message[:160]}); lower it with "
                        f"--set {batch_key}={max(1, batch_size // 2)}, or free the GPU")
