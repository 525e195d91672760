"""Benchmark: batched SimCLR augmentation (amoc.pretrain.augment) vs torchvision's
per-image PIL pipeline, two views of a batch of 32x32 images.

    .venv/bin/python benchmarks/augment.py [--data PATH/train.npz] [--device cpu|cuda]

Prints ``name: value unit`` lines. "images/s" counts source images per second, each
given two independent views (so views/s is twice that). The PIL side is the usual
MoCo/SimCLR CIFAR loader transform with the authors' blur (PIL's
``ImageFilter.GaussianBlur(radius=sigma)``, sigma uniform in [0.1, 2], p=0.5, which
is also what the batched side's default ``blur_kernel: 0`` computes), applied image by
image to PIL images built beforehand (building them, as a torchvision CIFAR dataset
does per item, is not timed: this favours PIL), outputs stacked into a batch. Both
sides run in this process, interleaved repeat by repeat, so they share the allocator
setting, thread count and machine load; the median of the repeats is reported (wall
clock, and for the CPU side also CPU seconds consumed, which other jobs on a shared
machine disturb less).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cpu_name, pil_pipeline

from amoc.config import AugmentConfig
from amoc.pretrain.augment import SimCLRAugment


def load_batch(path: str | None, batch: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if path is None:
        return torch.from_numpy(rng.integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8))
    with np.load(path, allow_pickle=False) as blob:
        x = blob["x"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise SystemExit(f"{path}: expected x uint8 N x 3 x H x W, got {x.dtype} {x.shape}")
    idx = rng.choice(x.shape[0], size=batch, replace=x.shape[0] < batch)
    return torch.from_numpy(np.ascontiguousarray(x[idx]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="prepared train.npz (array x: N x 3 x 32 x 32 uint8); default random images")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the batched side (PIL is always CPU)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--no-pil", action="store_true", help="skip the PIL baseline")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device available; run with --device cpu", file=sys.stderr)
        return 2
    cpu_x = load_batch(args.data, args.batch, args.seed)
    x = cpu_x.to(device)
    aug = SimCLRAugment(AugmentConfig(), size=32)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batched() -> tuple[float, float]:
        sync()
        t, c = time.perf_counter(), time.process_time()
        views = [aug(x, gen) for _ in range(args.views)]
        sync()
        assert views[0].shape == (args.batch, 3, 32, 32)
        return time.perf_counter() - t, time.process_time() - c

    pil_images = None
    if not args.no_pil:
        from PIL import Image

        tf = pil_pipeline()
        random.seed(args.seed)  # the PIL side's draws (Python's random and torch's global generator)
        torch.manual_seed(args.seed)
        pil_images = [Image.fromarray(a) for a in cpu_x.permute(0, 2, 3, 1).numpy()]

        def pil() -> tuple[float, float]:
            t, c = time.perf_counter(), time.process_time()
            views = [torch.stack([tf(im) for im in pil_images]) for _ in range(args.views)]
            assert views[0].shape == (args.batch, 3, 32, 32)
            return time.perf_counter() - t, time.process_time() - c

    load0 = os.getloadavg()[0]
    for _ in range(args.warmup):
        batched()
        if pil_images is not None:
            pil()
    t_ours, t_pil = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        t_ours.append(batched())
        if pil_images is not None:
            t_pil.append(pil())
    load1 = os.getloadavg()[0]

    kind = "cuda" if device.type == "cuda" else "cpu"
    med = statistics.median(t for t, _ in t_ours)
    print(f"device: {torch.cuda.get_device_name(device) if kind == 'cuda' else 'cpu'}")
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores")
    print(f"torch_threads: {torch.get_num_threads()}")
    print(f"glibc_tunables: {os.environ.get('GLIBC_TUNABLES', 'unset')}")
    print(f"data: {args.data or 'random uint8'} batch {args.batch} x {args.views} views")
    print(f"load_average_1min: {load0:.2f} before, {load1:.2f} after")
    print(f"augment_batched_{kind}: {args.batch / med:.0f} images/s")
    print(f"augment_batched_{kind}_batch_time: {med * 1e3:.2f} ms")
    if pil_images is not None:
        med_pil = statistics.median(t for t, _ in t_pil)
        print(f"augment_pil_cpu: {args.batch / med_pil:.0f} images/s")
        print(f"augment_pil_cpu_batch_time: {med_pil * 1e3:.2f} ms")
        print(f"augment_speedup_vs_pil: {med_pil / med:.1f} x")
        if kind == "cpu":
            # CPU seconds consumed (all threads): less sensitive to other jobs on the machine
            cpu_ours = statistics.median(c for _, c in t_ours)
            cpu_pil = statistics.median(c for _, c in t_pil)
            print(f"augment_batched_cpu_cpu_seconds: {cpu_ours * 1e3:.2f} ms per batch")
            print(f"augment_pil_cpu_cpu_seconds: {cpu_pil * 1e3:.2f} ms per batch")
            print(f"augment_speedup_vs_pil_cpu_seconds: {cpu_pil / cpu_ours:.1f} x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
