"""Device, precision, threads and seeding: resolved once per stage from `runtime:`.

`runtime.precision: auto` runs bf16 autocast where the hardware does bf16 matrix math
natively: on CUDA cards with native bf16 (Ampere and later; not T4, V100, P100, where
torch emulates it), and on a CPU with AMX or AVX512-BF16 (oneDNN runs the convolutions
there; measured about 2x faster than fp32 on such a Xeon, 3x with channels_last); fp32
everywhere else, since emulated bf16 is slower than fp32. fp32 is IEEE fp32 on CUDA
too: TF32 is never enabled (`ieee_fp32_on_cuda`). `channels_last: auto` follows the
precision: on for bf16 (CUDA, or such a CPU), off for fp32. fp32
channels_last measured 1.08-1.28x faster on an AVX2 EPYC at widths 0.25-1, but oneDNN's
fp32 1x1 stride-2 convolution backward-weights kernel for NHWC inputs is broken when the
input has fewer channels than its SIMD block (uxlfoundation/oneDNN#6035, open): it
crashes here (the downsample of a width-0.0625 ResNet-18) and gives wrong weight
gradients on AVX-512 CPUs under width 0.25, so it stays opt-in (benchmarks/README.md).
Evaluation stages always run fp32 (reduced precision can hide gradients from an attack).
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from amoc.config import RuntimeConfig
from amoc.distributed import Dist
from amoc.errors import AmocError, ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = full fp32
    channels_last: bool
    progress: bool
    compile: bool
    why_precision: str = ""  # e.g. "auto: CPU has AMX"
    why_channels_last: str = ""
    attack_amp_dtype: torch.dtype | None = None  # training-time attacks (runtime.attack_precision)

    def describe(self) -> str:
        """One line: device, precision (and why), channels_last (and why), threads."""
        names = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}
        precision = names.get(self.amp_dtype, f"{self.amp_dtype} autocast")
        threads = torch.get_num_threads()
        if self.attack_amp_dtype != self.amp_dtype:
            precision += f", attacks {names.get(self.attack_amp_dtype, self.attack_amp_dtype)}"
        return (
            f"{self.device}, {precision} ({self.why_precision}), channels_last "
            f"{'on' if self.channels_last else 'off'} ({self.why_channels_last}), "
            f"{threads} CPU thread{'s' if threads != 1 else ''}"
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def attack_autocast(self) -> contextlib.AbstractContextManager:
        """The precision of training-time attacks (runtime.attack_precision)."""
        if self.attack_amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.attack_amp_dtype)

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move a module to the device (and memory format) this run uses."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def compile_modules(self, *modules: nn.Module) -> None:
        """runtime.compile: torch.compile each module in place (inductor). Inductor turns
        convolutions channels_last on its own ("layout optimisation"); on a CPU that
        runs contiguous that would reach the oneDNN bug above (it aborted the process
        at width 0.0625), so there it keeps the layout the run chose."""
        if self.device.type == "cpu" and not self.channels_last:
            import torch._inductor.config as inductor

            inductor.layout_optimization = False
        for module in modules:
            module.compile()

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
        raise AmocError(
            f"runtime.device: {name!r} requested but no CUDA device is available; use --set runtime.device=cpu"
        )
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise AmocError(
            f"runtime.device: {name!r} does not exist ({torch.cuda.device_count()} CUDA devices); pick another index"
        )
    return device


FAKE_CPU_BF16 = "AMOC_FAKE_CPU_BF16"  # tests: 1 = pretend the CPU has AMX, 0 = pretend it has neither


def cpu_bf16_support() -> str | None:
    """What gives this CPU native bf16 matrix math ("AMX" or "AVX512-BF16"), or None.
    Asks torch (torch.cpu._is_amx_tile_supported / _is_avx512_bf16_supported; a torch
    without these queries means no). AMOC_FAKE_CPU_BF16=1 or 0 overrides the answer, so
    that the bf16 path of `auto` can be tested on any CPU (bf16 autocast runs everywhere,
    only slowly without these units); it is meant for tests, nothing else reads it."""
    fake = os.environ.get(FAKE_CPU_BF16, "").strip()
    if fake:
        return f"AMX, faked by {FAKE_CPU_BF16}" if fake not in ("0", "false", "no") else None
    for query, name in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        fn = getattr(getattr(torch, "cpu", None), query, None)
        try:
            if fn is not None and fn():
                return name
        except Exception:
            pass
    return None


def cuda_bf16(device: torch.device) -> tuple[torch.dtype | None, str]:
    """`auto` on a CUDA device: bf16 where its tensor cores do bf16 (Ampere and later);
    fp32 on older cards (T4, V100, P100), where torch emulates bf16 more slowly than fp32."""
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16, "auto: CUDA with native bf16"
    return None, "auto: this CUDA device has no native bf16 (pre-Ampere), so fp32"


def ieee_fp32_on_cuda() -> None:
    """Full IEEE fp32 for every fp32 matmul and convolution on CUDA: no TF32 (10-bit
    mantissa), which cuDNN convolutions otherwise use by default. So `precision: fp32`
    is the authors' fp32, and the InfoNCE logits and k-NN similarities, which run in fp32
    outside autocast on purpose, keep their precision under any setting. bf16 autocast
    is where the speed comes from. The current `fp32_precision` API where torch has it
    (mixing it with the legacy allow_tf32 flags is an error)."""
    cudnn = torch.backends.cudnn
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        for backend in (torch.backends.cuda.matmul, cudnn.conv, cudnn.rnn):
            backend.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        cudnn.allow_tf32 = False


def choose(
    cfg: RuntimeConfig, device: torch.device, *, evaluation: bool = False
) -> tuple[torch.dtype | None, str, bool, str]:
    """(autocast dtype or None for fp32, why, channels_last, why) for `device`: explicit
    settings win; `auto` as the module docstring says. Evaluation is always fp32."""
    native = device.type == "cpu" and cfg.precision in ("auto", "bf16") and not evaluation and cpu_bf16_support()
    if evaluation:
        amp, why = None, "evaluation always runs fp32"
    elif cfg.precision == "bf16":
        amp, why = torch.bfloat16, "runtime.precision=bf16"
    elif cfg.precision == "fp32":
        amp, why = None, "runtime.precision=fp32"
    elif device.type == "cuda":
        amp, why = cuda_bf16(device)
    elif native:
        amp, why = torch.bfloat16, f"auto: CPU has {native}"
    elif device.type == "cpu":
        amp, why = None, "auto: CPU has no AMX or AVX512-BF16"
    else:
        amp, why = None, f"auto: fp32 on {device.type}"
    if cfg.channels_last != "auto":
        return amp, why, cfg.channels_last == "on", f"runtime.channels_last={cfg.channels_last}"
    if device.type == "cuda":
        return amp, why, amp is not None, f"auto: {'bf16' if amp is not None else 'fp32'} on CUDA"
    if amp is not None and native:
        return amp, why, True, f"auto: bf16 on a CPU with {native}"
    if amp is not None:
        return amp, why, False, "auto: bf16 on a CPU without AMX or AVX512-BF16"
    return amp, why, False, f"auto: fp32 on {device.type}"


def setup(
    cfg: RuntimeConfig, seed: int, dist: Dist = Dist(), *, stage: str | None = None, evaluation: bool = False
) -> Runtime:
    """Seed every RNG, set threads, pick device and precision. In a multi-process CUDA
    run each rank takes the GPU of its local rank (`runtime.device: auto` or `cuda`).
    An explicit index (`cuda:N`) is refused there. `evaluation`: always fp32; on CUDA,
    fp32 is IEEE fp32 (no TF32) in every stage. `stage`: print what was chosen, one line,
    on the main rank (`amoc <stage> runtime: ...`)."""
    if dist.active and cfg.device.startswith("cuda:"):
        raise ConfigError(
            f"runtime.device: {cfg.device!r} would put all {dist.world} torchrun processes on one GPU; use "
            "--set runtime.device=cuda (or auto): each process takes the GPU of its LOCAL_RANK, and "
            "CUDA_VISIBLE_DEVICES chooses the cards"
        )
    device = resolve_device(cfg.device)
    if dist.active and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        ieee_fp32_on_cuda()
    amp, why_amp, channels_last, why_cl = choose(cfg, device, evaluation=evaluation)
    attack_amp = {"same": amp, "fp32": None, "bf16": torch.bfloat16}[cfg.attack_precision] if not evaluation else None
    rt = Runtime(
        device=device,
        amp_dtype=amp,
        channels_last=channels_last,
        progress=cfg.progress,
        compile=cfg.compile,
        why_precision=why_amp,
        why_channels_last=why_cl,
        attack_amp_dtype=attack_amp,
    )
    if stage is not None and dist.main:
        print(f"amoc {stage} runtime: {rt.describe()}", flush=True)
    return rt


def cpu_name() -> str:
    """The CPU model, for the figures benchmarks and the demo print."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
        raise AmocError(
            f"{stage}: out of GPU memory at batch size {batch_size} ({message[:160]}); lower it with "
            f"--set {batch_key}={max(1, batch_size // 2)}, or free the GPU"
        )
