"""Benchmark: one full AMOC training step (amoc.pretrain.step.TrainStep) and its
efficiency against the bare network passes it contains.

    .venv/bin/python benchmarks/pretrain_step.py [--variant ACA] [--batch 256] [--width 1]
        [--device cpu|cuda] [--precision auto|fp32|bf16] [--channels-last auto|on|off]
        [--steps 5] [--repeats 5] [--warmup 2] [--threads N] [--no-baseline]

Prints ``name: value unit`` lines. The full step is everything `amoc pretrain` does per
iteration except the augmentation (benchmarks/augment.py): PGD on L_adv, the key
forwards, the query forwards, both losses, backward, SGD, EMA and enqueue. Its step
efficiency is

    (sum of the bare passes the step contains, each timed alone) / (full step time)

where the bare passes are: `steps` attack passes (forward + backward to the input
only, eval mode, adv BN) per adversarial view, the attack's one clean partner
forward (no grad), the training forwards of the query net plus one backward through
them, and the key net's forwards (no grad). Everything else (losses against the
queue, optimiser, EMA, enqueue, BN switching, Python) is the step's overhead, so the
efficiency is at most about 1. Every timing is the median of `repeats` runs after
`warmup` runs, in this process, under this allocator and thread setting; on CUDA each
run is bracketed by torch.cuda.synchronize(). On the CPU the same ratio is also
given in CPU seconds of this process, which other jobs on a shared machine disturb
less than wall-clock time (with one thread it is the honest figure).

The step runs under the runtime `amoc pretrain` would pick (`--precision` and
`--channels-last`, both `auto` by default, resolved by amoc.runtime.setup: bf16 autocast
and channels_last on CUDA and on a CPU with AMX or AVX512-BF16, fp32 contiguous on
other CPUs). Unless `--no-baseline`, the same full step is also timed in fp32, eager,
contiguous (NCHW) on a second model built from the same seed, the two timed
alternately repeat by repeat so that both see the same machine load, and
`speedup_vs_fp32` is their ratio from this one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cpu_name

from amoc import config as config_mod
from amoc.data.prepared import CIFAR10_MEAN, CIFAR10_STD
from amoc.pretrain.attack import ContrastiveAttack
from amoc.pretrain.moco import build_moco
from amoc.pretrain.stage import make_optimizer
from amoc.pretrain.step import TrainStep
from amoc.pretrain.variants import Variant
from amoc.runtime import eval_mode, frozen, setup


def median_time(fn: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None]) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds of this process) per call."""
    for _ in range(warmup):
        fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def interleaved_times(
    fns: list[Callable[[], object]], warmup: int, repeats: int, sync: Callable[[], None]
) -> list[tuple[float, float]]:
    """Median (wall seconds, CPU seconds of this process) per call of each fn, the fns
    run alternately repeat by repeat so that they see the same machine state."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="ACA")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=float, default=1.0, help="ResNet-18 channel multiplier (1 = paper)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="runtime.precision")
    ap.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"), help="runtime.channels_last")
    ap.add_argument("--no-baseline", action="store_true", help="skip the fp32 eager contiguous step")
    ap.add_argument("--queue", type=int, default=32768, help="queue_size (K1 = K2)")
    ap.add_argument("--steps", type=int, default=5, help="PGD steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args(argv)

    def make_cfg(precision: str, channels_last: str):
        return config_mod.from_dict(
            {
                "variant": args.variant,
                "queue_size": max(args.queue, args.batch),
                "seed": 0,
                "model": {"width": args.width},
                "pretrain": {"batch_size": args.batch, "lr": 0.01, "attack": {"steps": args.steps}},
                "runtime": {
                    "device": args.device,
                    "precision": precision,
                    "channels_last": channels_last,
                    "threads": args.threads,
                    "progress": False,
                },
            }
        )

    def build(cfg):
        rt = setup(cfg.runtime, cfg.seed)  # seeds torch: both sides start from the same weights
        model = rt.prepare(build_moco(cfg, CIFAR10_MEAN, CIFAR10_STD)).train()
        optimizer = make_optimizer(model, cfg, rt.device)
        attack = ContrastiveAttack(model, v, cfg.pretrain.attack, autocast=rt.autocast)
        step = TrainStep(
            model,
            v,
            optimizer,
            attack,
            leverage=cfg.leverage,
            enqueue_order=cfg.pretrain.enqueue_order,
            autocast=rt.autocast,
        )
        x_query = rt.images(torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        x_key = rt.images(torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
        gen = rt.generator(0)
        return rt, model, optimizer, (lambda: step(x_query, x_key, gen)), x_query, x_key

    v = Variant.parse(args.variant)
    base_cfg = None if args.no_baseline else make_cfg("fp32", "off")
    base_full = build(base_cfg)[3] if base_cfg else None
    cfg = make_cfg(args.precision, args.channels_last)
    rt, model, optimizer, full_step, x_query, x_key = build(cfg)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)

    def time_it(fn: Callable[[], object]) -> tuple[float, float]:
        return median_time(fn, args.warmup, args.repeats, sync)

    # ---------------------------------------------------------------- bare passes
    def attack_pass(net: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with eval_mode(model), frozen(model.query):
                x = x_query.detach().clone().requires_grad_(True)
                with rt.autocast():
                    out = model.embed(net, x, "adv")
                return torch.autograd.grad(out.sum(), x)

        return run

    def partner_forward() -> object:
        with eval_mode(model), torch.no_grad(), rt.autocast():
            return model.queries(x_query, "clean") if v.adv_key else model.keys(x_key, "clean")

    def train_passes() -> None:
        with rt.autocast():
            out = model.queries(x_query, "clean").sum()
            if v.adv_query:
                out = out + model.queries(x_query, "adv").sum()
        out.backward()
        optimizer.zero_grad(set_to_none=True)

    def key_forwards() -> None:
        with rt.autocast():
            model.keys(x_key, "clean")
            if v.adv_key:
                model.keys(x_key, "adv")
            if v.plus_enqueue:
                model.keys(x_query, "adv")

    bare: dict[str, tuple[tuple[float, float], int]] = {}  # name: ((wall, cpu) s per pass, passes per step)
    if v.adv_query:
        bare["attack_query_pass"] = (time_it(attack_pass(model.query)), args.steps)
    if v.adv_key:
        bare["attack_key_pass"] = (time_it(attack_pass(model.key)), args.steps)
    if v.has_adv_loss and not (v.adv_query and v.adv_key):
        bare["attack_partner_forward"] = (time_it(partner_forward), 1)
    bare["train_forwards_backward"] = (time_it(train_passes), 1)
    bare["key_forwards"] = (time_it(key_forwards), 1)

    # ---------------------------------------------------------------- the full step
    if base_full is None:
        full = time_it(full_step)
    else:  # alternately, repeat by repeat: the ratio is not skewed by a change of machine load
        full, base = interleaved_times([full_step, base_full], args.warmup, args.repeats, sync)
    bare_sum = [sum(t[i] * n for t, n in bare.values()) for i in (0, 1)]

    print(f"machine: {cpu_name() if rt.device.type == 'cpu' else torch.cuda.get_device_name(rt.device)}")
    print(
        f"config: variant={v.name} batch={args.batch} width={args.width} queue={cfg.queue_size} pgd_steps={args.steps} "
        f"device={rt.device} threads={torch.get_num_threads()} amp={rt.amp_dtype} channels_last={rt.channels_last} "
        f"torch={torch.__version__} GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')} "
        f"loadavg={os.getloadavg()[0]:.2f} repeats={args.repeats} warmup={args.warmup}"
    )
    print(f"step_time: {full[0]:.4f} s")
    print(f"step_images_per_s: {args.batch / full[0]:.1f} images/s")
    for name, (seconds, count) in bare.items():
        print(f"{name}: {seconds[0] * 1e3:.2f} ms (x{count} per step)")
    print(f"bare_passes_sum: {bare_sum[0]:.4f} s")
    print(f"step_efficiency: {bare_sum[0] / full[0]:.3f} ratio")
    if rt.device.type == "cpu":  # CPU seconds: less disturbed by other jobs on a shared machine
        print(f"step_cpu_time: {full[1]:.4f} s")
        print(f"step_efficiency_cpu_time: {bare_sum[1] / full[1]:.3f} ratio")
    if base_full is not None:
        print(f"fp32_step_time: {base[0]:.4f} s (fp32, eager, contiguous)")
        print(f"fp32_step_images_per_s: {args.batch / base[0]:.1f} images/s")
        print(f"speedup_vs_fp32: {base[0] / full[0]:.2f} x")
        if rt.device.type == "cpu":
            print(f"speedup_vs_fp32_cpu_time: {base[1] / full[1]:.2f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
