"""Benchmark: a slice of AMOC pre-training through a straightforward reference pipeline
(per-image PIL augmentation in a torch DataLoader, fp32, eager) vs the path `amoc
pretrain` runs (uint8 dataset resident on the device, batched SimCLRAugment, bf16
autocast and channels_last where runtime.setup turns them on: on CUDA and on a CPU with
AMX or AVX512-BF16).

    .venv/bin/python benchmarks/naive_baseline.py [--data DIR|DIR/train.npz] [--variant ACA]
        [--batch 256] [--width 1] [--device cpu|cuda] [--precision auto|fp32|bf16]
        [--channels-last auto|on|off] [--steps 3] [--pgd-steps 5] [--workers 0]
        [--repeats 3] [--warmup 1] [--threads N] [--naive-attack] [--no-naive] [--no-fp32]

Prints ``name: value unit`` lines; "images/s" counts source images (each gives a query
and a key view) per second of wall clock, over `steps` training iterations including
loading and augmentation, median of `repeats` slices after `warmup` iterations.

What is compared (the reading chosen so that the comparison is honest):

- Both sides run the *same* AMOC iteration: amoc.pretrain.step.TrainStep with
  amoc.pretrain.attack.ContrastiveAttack (PGD with autograd.grad to the input), on two
  MoCo models built identically from the same seed. Only the input pipeline and the
  precision / memory format differ, so the speedup is what our data path and runtime
  settings buy, not an artefact of a deliberately slow step.
- Reference side: a Dataset that, like torchvision's CIFAR10, builds a PIL image per
  item from the uint8 array and applies the MoCo/SimCLR CIFAR transform twice
  (RandomResizedCrop(32, scale=(0.2, 1)), RandomHorizontalFlip, RandomApply(
  ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8), RandomGrayscale(0.2), RandomApply(PIL's
  ImageFilter.GaussianBlur(radius=sigma), sigma uniform in [0.1, 2], p=0.5), ToTensor;
  benchmarks/common.py), a torch DataLoader (shuffle,
  drop_last, `--workers` worker processes; pin_memory on CUDA) and a host-to-device copy
  per batch; fp32, contiguous (NCHW) layout, no autocast, no compile.
- Our side: exactly the `Pretraining.train_epoch` loop body: index the device-resident
  uint8 tensor with an epoch permutation, SimCLRAugment twice with the run's device
  generator, rt.images, TrainStep under rt.autocast, with the runtime `--precision` and
  `--channels-last` resolve to (both `auto` by default, as `amoc pretrain`).
- Our path in fp32, eager, contiguous (unless ``--no-fp32``): the same loop on a third
  model, so that ``runtime_speedup`` (ours / ours in fp32 contiguous, measured in this
  run) is what the runtime's precision and memory format buy, apart from the input
  pipeline. Where the runtime resolves to fp32 contiguous itself (a CPU without AMX or
  AVX512-BF16) it is about 1 and tells the noise of the measurement.
- ``--naive-attack`` additionally makes the reference side's PGD call loss.backward()
  (accumulating weight gradients of the query net and reading x_adv.grad) instead of
  autograd.grad to the input, as code adapted from a supervised-training loop often
  does. It is off by default, because our attack is not what this benchmark is about;
  turn it on to see the cost of that habit on top.

On a CPU without AMX or AVX512-BF16 runtime.setup chooses fp32 without channels_last,
so there ours and the reference differ only in the input pipeline, and at ResNet-18 sizes the step dominates (see
benchmarks/README.md: data loading is negligible on the CPU); the interesting figure is
on CUDA, where the step is fast enough that a PIL loader becomes the bottleneck.
On CUDA every slice is bracketed by torch.cuda.synchronize().
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cpu_name, pil_pipeline

from amoc import config as config_mod
from amoc.data.prepared import CIFAR10_MEAN, CIFAR10_STD
from amoc.pretrain.amoc import make_optimizer
from amoc.pretrain.attack import ContrastiveAttack
from amoc.pretrain.augment import SimCLRAugment
from amoc.pretrain.losses import info_nce
from amoc.pretrain.moco import build_moco
from amoc.pretrain.stage import epoch_order
from amoc.pretrain.step import TrainStep
from amoc.pretrain.variants import Variant
from amoc.runtime import eval_mode, setup


class TwoViewPIL(torch.utils.data.Dataset):
    """uint8 N x 3 x 32 x 32 -> (query view, key view), one PIL image per item, as
    torchvision's CIFAR10 dataset plus MoCo's TwoCropsTransform do it."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # N x H x W x 3, as CIFAR10.data
        self.transform = pil_pipeline()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        img = Image.fromarray(self.x[i])
        return self.transform(img), self.transform(img)


def load_images(path: str | None, n: int, seed: int) -> np.ndarray:
    if path is None:
        return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    p = Path(path)
    if p.is_dir():
        p = p / "train.npz"
    with np.load(p, allow_pickle=False) as blob:
        x = blob["x"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, 32, 32):
        raise SystemExit(f"{p}: expected x uint8 N x 3 x 32 x 32, got {x.dtype} {x.shape}")
    return x


class NaiveContrastiveAttack(ContrastiveAttack):
    """The same PGD on L_adv, but each step calls loss.backward() (weight gradients of
    the query net are computed and then zeroed) and reads x_adv.grad."""

    def __call__(self, x_query, x_key, generator=None):
        v, model, c = self.variant, self.model, self.cfg
        if not v.has_adv_loss:
            return None, None
        batch = x_query.shape[0]
        with eval_mode(model):
            negatives = model.negatives(v.negatives)
            with torch.no_grad():
                query = None if v.adv_query else model.queries(x_query, "clean")
                key = None if v.adv_key else model.keys(x_key, "clean")
            views = [x for x, adv in ((x_query, v.adv_query), (x_key, v.adv_key)) if adv]
            x = torch.cat(views) if len(views) == 2 else views[0]
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_adv = (x + (2 * noise - 1) * c.eps).clamp(0, 1) if c.random_start else x.clone()
            for _ in range(c.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                parts = iter(x_adv.split(batch))
                q = model.queries(next(parts), "adv") if v.adv_query else query
                k = model.embed(model.key, next(parts), "adv") if v.adv_key else key
                loss = info_nce(q, k, negatives, reduction="sum")
                model.zero_grad()
                loss.backward()
                with torch.no_grad():
                    x_adv = x_adv + c.step_size * x_adv.grad.sign()
                    x_adv = torch.min(torch.max(x_adv, x - c.eps), x + c.eps).clamp(0, 1)
            model.zero_grad()
        parts = iter(x_adv.detach().split(batch))
        return (next(parts) if v.adv_query else None), (next(parts) if v.adv_key else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", help="prepared data folder or its train.npz (x: N x 3 x 32 x 32 uint8); default random images"
    )
    ap.add_argument("--variant", default="ACA")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=float, default=1.0, help="ResNet-18 channel multiplier (1 = paper)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="runtime.precision of ours")
    ap.add_argument(
        "--channels-last", default="auto", choices=("auto", "on", "off"), help="runtime.channels_last of ours"
    )
    ap.add_argument("--queue", type=int, default=32768, help="queue_size (K1 = K2)")
    ap.add_argument("--steps", type=int, default=3, help="training iterations per timed slice")
    ap.add_argument("--pgd-steps", type=int, default=5, help="PGD steps of the contrastive attack")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes of the reference side")
    ap.add_argument("--repeats", type=int, default=3, help="timed slices per side (interleaved)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations per side first")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--naive-attack", action="store_true", help="reference PGD uses loss.backward() (see docstring)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive reference")
    ap.add_argument("--no-fp32", action="store_true", help="skip our path in fp32 eager contiguous")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, run N iterations of each side under torch.profiler and print where the time goes",
    )
    ap.add_argument("--top", type=int, default=8, help="ops listed per side with --profile")
    args = ap.parse_args(argv)

    def make_cfg(precision: str, channels_last: str):
        return config_mod.from_dict(
            {
                "variant": args.variant,
                "queue_size": max(args.queue, args.batch),
                "seed": args.seed,
                "model": {"width": args.width},
                "pretrain": {"batch_size": args.batch, "lr": 0.01, "attack": {"steps": args.pgd_steps}},
                "runtime": {
                    "device": args.device,
                    "precision": precision,
                    "channels_last": channels_last,
                    "threads": args.threads,
                    "progress": False,
                },
            }
        )

    # Images needed: the whole slice schedule of both sides, drawn without repeats where possible.
    need = args.batch * (args.warmup + args.steps * args.repeats)
    x_np = load_images(args.data, max(need, args.batch), args.seed)
    v = Variant.parse(args.variant)

    def build(cfg, rt, naive_attack: bool):
        torch.manual_seed(cfg.seed)  # identical initial weights on both sides
        model = rt.prepare(build_moco(cfg, CIFAR10_MEAN, CIFAR10_STD)).train()
        optimizer = make_optimizer(model, cfg, rt.device)
        attack_cls = NaiveContrastiveAttack if naive_attack else ContrastiveAttack
        attack = attack_cls(model, v, cfg.pretrain.attack, autocast=rt.autocast)
        return TrainStep(
            model,
            v,
            optimizer,
            attack,
            leverage=cfg.leverage,
            enqueue_order=cfg.pretrain.enqueue_order,
            autocast=rt.autocast,
        )

    def our_path(cfg, rt):
        """(iteration, step) of `amoc pretrain`'s loop body under the runtime `rt`."""
        step = build(cfg, rt, False)
        train_x = torch.from_numpy(x_np).to(rt.device)  # resident uint8
        augment = SimCLRAugment(cfg.pretrain.augment, size=train_x.shape[-1])
        generator = rt.generator(cfg.seed)
        n_batches = len(train_x) // args.batch
        state = {"epoch": 0, "pos": 0, "order": epoch_order(cfg.seed, 0, len(train_x)).to(rt.device)}

        def iteration() -> None:
            s = state
            if s["pos"] == n_batches:
                s["epoch"] += 1
                s["pos"] = 0
                s["order"] = epoch_order(cfg.seed, s["epoch"], len(train_x)).to(rt.device)
            with record_function("phase:data+augment"):
                images = train_x[s["order"][s["pos"] * args.batch : (s["pos"] + 1) * args.batch]]
                x_query = rt.images(augment(images, generator=generator))
                x_key = rt.images(augment(images, generator=generator))
            step(x_query, x_key, generator)
            s["pos"] += 1

        return iteration, step

    # ------------------------------------------------------------------ ours in fp32, eager, contiguous
    fp32_iter: Callable[[], None] | None = None
    if not args.no_fp32:
        fcfg = make_cfg("fp32", "off")
        fp32_iter, _ = our_path(fcfg, setup(fcfg.runtime, fcfg.seed))

    # ------------------------------------------------------------------ ours: as `amoc pretrain`
    cfg = make_cfg(args.precision, args.channels_last)
    rt = setup(cfg.runtime, cfg.seed)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    ours_iter, step_ours = our_path(cfg, rt)

    # ------------------------------------------------------------------ reference: PIL DataLoader, fp32
    naive_iter: Callable[[], None] | None = None
    if not args.no_naive:
        ncfg = make_cfg("fp32", "off")
        nrt = setup(ncfg.runtime, ncfg.seed)
        step_naive = build(ncfg, nrt, args.naive_attack)
        ngen = nrt.generator(ncfg.seed + 1)
        loader = torch.utils.data.DataLoader(
            TwoViewPIL(x_np),
            batch_size=args.batch,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            pin_memory=nrt.device.type == "cuda",
            persistent_workers=args.workers > 0,
            generator=torch.Generator().manual_seed(args.seed),
        )

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            while True:
                yield from loader

        it = batches()

        def naive_iter() -> None:
            with record_function("phase:data+augment"):
                x_query, x_key = next(it)
                x_query = x_query.to(nrt.device, non_blocking=True)
                x_key = x_key.to(nrt.device, non_blocking=True)
            step_naive(x_query, x_key, ngen)

    def slice_time(fn: Callable[[], None]) -> tuple[float, float]:
        sync()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            fn()
        sync()
        return time.perf_counter() - t, time.process_time() - c

    load0 = os.getloadavg()[0]
    for _ in range(args.warmup):
        ours_iter()
        if fp32_iter is not None:
            fp32_iter()
        if naive_iter is not None:
            naive_iter()
    sync()
    t_ours, t_fp32, t_naive = [], [], []
    for _ in range(args.repeats):  # interleaved: every side sees the same machine state
        t_ours.append(slice_time(ours_iter))
        if fp32_iter is not None:
            t_fp32.append(slice_time(fp32_iter))
        if naive_iter is not None:
            t_naive.append(slice_time(naive_iter))
    load1 = os.getloadavg()[0]

    images = args.steps * args.batch
    med = statistics.median(t for t, _ in t_ours)
    print(f"machine: {cpu_name() if rt.device.type == 'cpu' else torch.cuda.get_device_name(rt.device)}")
    print(
        f"config: variant={v.name} batch={args.batch} width={args.width} queue={max(args.queue, args.batch)} "
        f"pgd_steps={args.pgd_steps} steps={args.steps} device={rt.device} threads={torch.get_num_threads()} "
        f"workers={args.workers} naive_attack={args.naive_attack} torch={torch.__version__} "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')} repeats={args.repeats} warmup={args.warmup}"
    )
    print(f"data: {args.data or 'random uint8'} ({len(x_np)} images)")
    print(f"load_average_1min: {load0:.2f} before, {load1:.2f} after")
    print(f"ours_precision: {rt.amp_dtype or 'fp32'} channels_last={rt.channels_last}")
    print(f"ours_slice_time: {med:.3f} s")
    print(f"ours_images_per_s: {images / med:.1f} images/s")
    if t_fp32:
        med_f = statistics.median(t for t, _ in t_fp32)
        print("ours_fp32_precision: fp32 channels_last=False (eager)")
        print(f"ours_fp32_slice_time: {med_f:.3f} s")
        print(f"ours_fp32_images_per_s: {images / med_f:.1f} images/s")
        print(f"runtime_speedup: {med_f / med:.2f} x")
        if rt.device.type == "cpu":
            print(
                f"runtime_speedup_cpu_seconds: "
                f"{statistics.median(c for _, c in t_fp32) / statistics.median(c for _, c in t_ours):.2f} x"
            )
    if t_naive:
        med_n = statistics.median(t for t, _ in t_naive)
        print("naive_precision: fp32 channels_last=False")
        print(f"naive_slice_time: {med_n:.3f} s")
        print(f"naive_images_per_s: {images / med_n:.1f} images/s")
        print(f"naive_speedup: {med_n / med:.2f} x")
        if rt.device.type == "cpu":  # CPU seconds of this process (workers excluded): steadier under load
            cpu_o = statistics.median(c for _, c in t_ours)
            cpu_n = statistics.median(c for _, c in t_naive)
            note = "" if args.workers == 0 else " (DataLoader workers' CPU time not counted)"
            print(f"ours_cpu_seconds: {cpu_o:.3f} s per slice")
            print(f"naive_cpu_seconds: {cpu_n:.3f} s per slice{note}")
            print(f"naive_speedup_cpu_seconds: {cpu_n / cpu_o:.2f} x")
    if args.profile:
        sides = [("ours", ours_iter, step_ours)] + ([("naive", naive_iter, step_naive)] if naive_iter else [])
        for name, fn, step in sides:
            label_phases(step)
            profile(name, fn, args.profile, args.top, rt.device, sync)
    return 0


PHASES = ("data+augment", "attack", "keys", "queries", "optimizer", "ema", "enqueue")


def label_phases(step: TrainStep) -> None:
    """Name the parts of a TrainStep for the profiler (instance attributes shadow the
    methods, so the step runs unchanged): attack, key forwards, query forwards, SGD step,
    EMA and enqueue. The rest of the step is the loss and its backward."""

    def labelled(label, fn):
        def call(*a, **k):
            with record_function(f"phase:{label}"):
                return fn(*a, **k)

        return call

    step.attack = labelled("attack", step.attack)
    step.keys = labelled("keys", step.keys)
    step.query_pass = labelled("queries", step.query_pass)
    step.optimizer.step = labelled("optimizer", step.optimizer.step)
    step.model.update_key = labelled("ema", step.model.update_key)
    step.model.enqueue = labelled("enqueue", step.model.enqueue)


def profile(
    name: str, fn: Callable[[], None], iters: int, top: int, device: torch.device, sync: Callable[[], None]
) -> None:
    """`iters` iterations under torch.profiler: per phase, its share of the wall clock
    (phases never overlap), and the `top` ops by self time (CUDA time on a GPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync()
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / iters
    events = prof.key_averages()
    cuda = device.type == "cuda"
    print(f"profile.{name}.iteration: {wall_ms:.1f} ms (under the profiler)")
    for phase in PHASES:
        ev = [e for e in events if e.key == f"phase:{phase}"]
        if ev:
            ms = ev[0].cpu_time_total / 1e3 / iters
            print(f"profile.{name}.phase.{phase}: {ms:.1f} ms ({100 * ms / wall_ms:.1f}% of the iteration, host time)")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = sorted((e for e in events if not e.key.startswith("phase:")), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in ops) or 1.0
    for rank, e in enumerate(ops[:top], 1):
        print(
            f"profile.{name}.top{rank}: {e.key} {getattr(e, key) / 1e3 / iters:.1f} ms "
            f"({100 * getattr(e, key) / total:.1f}% of self {'CUDA' if cuda else 'CPU'} time)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
