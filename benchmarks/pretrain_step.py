"""Benchmark: one full AMOC training step (amoc.pretrain.step.TrainStep) and its
efficiency against the bare network passes it contains.

    .venv/bin/python benchmarks/pretrain_step.py [--variant ACA] [--batch 256] [--width 1]
        [--device cpu|cuda] [--precision auto|fp32|bf16] [--channels-last auto|on|off]
        [--steps 5] [--repeats 5] [--warmup 2] [--threads N] [--no-baseline] [--compile]

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

`--compile` sets runtime.compile: the step's forwards are compiled as `amoc pretrain`
compiles them (amoc.training.hot: the attack's, the key net's and the query pass, each a
compiled callable of its own; inductor on the CPU), and an eager twin of the same
runtime (same seed, same weights) is built beside it. Before anything else, the first
`--compile-steps` compiled steps, which trigger the compilation, are timed one by one,
then the eager twin's first step. `compile_time` is the wall time those first compiled
steps took beyond as many steady compiled steps; the steady compiled and eager steps are
then timed alternately (with the fp32 baseline, unless `--no-baseline`), and
`compiled_vs_eager` is their ratio; `compile_break_even_steps` is compile_time / (seconds
saved per step), the run length from which compiling pays off. On the CPU each is also
given in CPU seconds (`_cpu_time`; the compile's include the C++ compiler's children).
The bare passes run the eager nets.
"""

from __future__ import annotations

import argparse
import os
import resource
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
from amoc.pretrain.amoc import make_optimizer
from amoc.pretrain.attack import ContrastiveAttack
from amoc.pretrain.moco import QueryPass, build_moco
from amoc.pretrain.step import TrainStep
from amoc.pretrain.variants import Variant
from amoc.runtime import eval_mode, frozen, setup
from amoc.training.hot import hot


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
    ap.add_argument("--compile", action="store_true", help="runtime.compile: torch.compile the query and key nets")
    ap.add_argument("--compile-steps", type=int, default=3, help="first compiled steps timed one by one (--compile)")
    args = ap.parse_args(argv)

    def make_cfg(precision: str, channels_last: str, compile: bool = False):
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
                    "compile": compile,
                    "threads": args.threads,
                    "progress": False,
                },
            }
        )

    def build(cfg):
        rt = setup(cfg.runtime, cfg.seed)  # seeds torch: both sides start from the same weights
        model = rt.prepare(build_moco(cfg, CIFAR10_MEAN, CIFAR10_STD)).train()
        optimizer = make_optimizer(model, cfg, rt.device)
        # runtime.compile: as amoc.pretrain.stage compiles the step (a no-op otherwise)
        embed = hot(model.embed, rt, "attack")
        attack = ContrastiveAttack(model, v, cfg.pretrain.attack, autocast=rt.autocast, embed=embed)
        keys = hot(model.keys, rt, "keys")
        step = TrainStep(
            model,
            v,
            optimizer,
            attack,
            leverage=cfg.leverage,
            enqueue_order=cfg.pretrain.enqueue_order,
            autocast=rt.autocast,
            query_pass=hot(QueryPass(model), rt, "query_pass"),
            keys=lambda x, branch, generator=None: keys(x, branch),
        )
        x_query = rt.images(torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        x_key = rt.images(torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
        gen = rt.generator(0)
        return rt, model, optimizer, (lambda: step(x_query, x_key, gen)), x_query, x_key

    v = Variant.parse(args.variant)
    base_cfg = None if args.no_baseline else make_cfg("fp32", "off")
    base_full = build(base_cfg)[3] if base_cfg else None
    eager_full = build(make_cfg(args.precision, args.channels_last))[3] if args.compile else None
    cfg = make_cfg(args.precision, args.channels_last, args.compile)
    rt, model, optimizer, full_step, x_query, x_key = build(cfg)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)

    def cpu_seconds() -> float:  # this process and its children (inductor runs the C++ compiler)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    def once(fn: Callable[[], object]) -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), cpu_seconds()
        fn()
        sync()
        return time.perf_counter() - start, cpu_seconds() - start_cpu

    if args.compile:  # first, before any other call of the compiled nets: the steps that compile them
        first_compiled = [once(full_step) for _ in range(args.compile_steps)]
        first_eager = once(eager_full)[0]

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
    # alternately, repeat by repeat: the ratios are not skewed by a change of machine load
    fns = [f for f in (full_step, eager_full, base_full) if f is not None]
    times = interleaved_times(fns, args.warmup, args.repeats, sync) if len(fns) > 1 else [time_it(full_step)]
    full = times[0]
    eager = times[1] if eager_full is not None else None
    base = times[-1] if base_full is not None else None
    bare_sum = [sum(t[i] * n for t, n in bare.values()) for i in (0, 1)]

    print(f"machine: {cpu_name() if rt.device.type == 'cpu' else torch.cuda.get_device_name(rt.device)}")
    print(
        f"config: variant={v.name} batch={args.batch} width={args.width} queue={cfg.queue_size} pgd_steps={args.steps} "
        f"device={rt.device} threads={torch.get_num_threads()} amp={rt.amp_dtype} channels_last={rt.channels_last} "
        f"torch={torch.__version__} GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')} "
        f"loadavg={os.getloadavg()[0]:.2f} repeats={args.repeats} warmup={args.warmup} compile={rt.compile}"
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
    if eager is not None:
        compile_time = sum(t for t, _ in first_compiled) - len(first_compiled) * full[0]
        compile_cpu = sum(c for _, c in first_compiled) - len(first_compiled) * full[1]
        saved = eager[0] - full[0]
        print(f"compiled_first_steps: {' '.join(f'{t:.2f}' for t, _ in first_compiled)} s (one by one, compiling)")
        print(f"eager_first_step: {first_eager:.2f} s")
        print(f"compile_time: {compile_time:.1f} s (first {len(first_compiled)} steps minus as many steady ones)")
        if rt.device.type == "cpu":
            print(f"compile_cpu_time: {compile_cpu:.1f} s (same, CPU seconds, C++ compiler included)")
        print(f"eager_step_time: {eager[0]:.4f} s (same runtime, not compiled)")
        print(f"compiled_vs_eager: {eager[0] / full[0]:.2f} x")
        if rt.device.type == "cpu":
            print(f"compiled_vs_eager_cpu_time: {eager[1] / full[1]:.2f} x")
        if saved > 0:
            print(f"compile_break_even_steps: {compile_time / saved:.0f} steps")
        else:
            print("compile_break_even_steps: never (the compiled step is not faster)")
        if rt.device.type == "cpu" and eager[1] > full[1]:
            print(f"compile_break_even_steps_cpu_time: {compile_cpu / (eager[1] - full[1]):.0f} steps")
    if base_full is not None:
        print(f"fp32_step_time: {base[0]:.4f} s (fp32, eager, contiguous)")
        print(f"fp32_step_images_per_s: {args.batch / base[0]:.1f} images/s")
        print(f"speedup_vs_fp32: {base[0] / full[0]:.2f} x")
        if rt.device.type == "cpu":
            print(f"speedup_vs_fp32_cpu_time: {base[1] / full[1]:.2f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
