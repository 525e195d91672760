"""Benchmark: PGD-20 and AutoAttack throughput of `amoc evaluate` (images/s).

    .venv/bin/python benchmarks/evaluate.py [--data DIR] [--width 1] [--images 256]
        [--aa-images N] [--batch 500] [--device cpu|cuda] [--channels-last auto|on|off]
        [--pgd-steps 20] [--aa-steps 100] [--repeats 3] [--warmup 1] [--aa-repeats 1]
        [--threads N] [--labels predicted|data] [--no-autoattack] [--no-baseline]

Prints ``name: value unit`` lines. Both attacks run through amoc.evaluate.attacks's
own entry points, with the settings `amoc evaluate` uses: pgd_correct (L-inf PGD on
the cross-entropy, eps 8/255, step eps/4, random start, `--pgd-steps` steps) and
torchattacks_correct (torchattacks' standard AutoAttack, APGD-CE / APGD-T / FAB-T with
`--aa-steps` iterations, default amoc.attacks.autoattack.AUTOATTACK_STEPS, Square 5000 queries), in
eval mode on the adversarial BN branch, fp32, batched by `--batch`, on a device set up
by runtime.setup as the stage does it (evaluation is always fp32; `--channels-last auto`
means on for CUDA, off for a CPU). Timings include the uint8 -> float conversion and the
final classification, as in the stage. Each figure is the median of its repeats after
`warmup` untimed PGD runs; on CUDA every run is bracketed by torch.cuda.synchronize().
Unless `--no-baseline`, PGD is also timed on a copy of the model in fp32 eager
contiguous (NCHW), alternately with the runtime's PGD run by run, and
`pgd<N>_speedup_vs_fp32` is their ratio from this one run (about 1 where the runtime is
fp32 contiguous itself, as on a CPU: the noise of the measurement). AutoAttack is timed
under the runtime only.

The classifier is a randomly initialised amoc Classifier (ResNet-18 of `--width`); its
linear head, which the Classifier zero-initialises, is re-drawn with nn.Linear's
default initialisation, since a zero head has zero input gradient and PGD would not
move at all. CAVEAT: such a model is not representative, and AutoAttack's cost depends on
robustness: torchattacks' MultiAttack runs each later attack (APGD-T over 9 target
classes, FAB-T, Square with 5000 queries) only on the images the earlier ones failed
on, so where nearly everything falls to APGD-CE, AutoAttack looks far faster than it is on
a robust AMOC classifier (there roughly half the images survive APGD-CE and go through
APGD-T's 9 targeted runs, FAB-T and Square too). A random network, on the other hand,
often has a nearly constant output that no small perturbation changes, so it can look
"robust" and make every sub-attack run in full. The robust accuracies printed tell how
much work the later attacks had; PGD's cost does not depend on the model.
Moreover torchattacks' APGD only attacks images the model classifies correctly, and a
random model gets about 1/classes of true labels right, so by default (``--labels
predicted``) the labels are the model's own clean predictions: every image is then
"correct" and goes through APGD-CE, the least work a robust model would also cost.
``--labels data`` keeps the data set's labels (AutoAttack then mostly only classifies).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cpu_name

from amoc.attacks import autoattack as aa_mod
from amoc.attacks.accuracy import correct
from amoc.config import AttackConfig, RuntimeConfig
from amoc.data.prepared import load_split
from amoc.evaluate import attacks as ev
from amoc.nets.classifier import Classifier
from amoc.nets.resnet import build_encoder
from amoc.runtime import setup


def load_test(folder: str | None, n: int, seed: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if folder is None:
        rng = np.random.default_rng(seed)
        x = torch.from_numpy(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
        return x, torch.from_numpy(rng.integers(0, num_classes, n)).long()
    x, y = load_split(folder, "test")
    if len(x) < n:
        raise SystemExit(f"{folder}: only {len(x)} test images, fewer than --images {n}")
    return x[:n], y[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="prepared data folder (test.npz); default random images and labels")
    ap.add_argument("--width", type=float, default=1.0, help="ResNet-18 channel multiplier (1 = paper)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--images", type=int, default=256, help="images for PGD")
    ap.add_argument("--aa-images", type=int, default=0, help="images for AutoAttack (0 = --images)")
    ap.add_argument("--batch", type=int, default=500, help="evaluate.batch_size")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"), help="runtime.channels_last")
    ap.add_argument("--no-baseline", action="store_true", help="skip PGD in fp32 eager contiguous")
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--aa-steps", type=int, default=aa_mod.AUTOATTACK_STEPS, help="APGD/FAB iterations")
    ap.add_argument("--repeats", type=int, default=3, help="timed PGD runs")
    ap.add_argument("--aa-repeats", type=int, default=1, help="timed AutoAttack runs")
    ap.add_argument("--warmup", type=int, default=1, help="untimed PGD runs first")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument(
        "--labels",
        choices=("predicted", "data"),
        default="predicted",
        help="predicted: the model's clean predictions (every image gets attacked; see docstring)",
    )
    ap.add_argument("--no-autoattack", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def runtime(channels_last: str):
        return setup(
            RuntimeConfig(
                device=args.device, precision="fp32", channels_last=channels_last, threads=args.threads, progress=False
            ),
            args.seed,
            evaluation=True,
        )

    rt = runtime(args.channels_last)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    model = Classifier(build_encoder("resnet18", args.width), args.classes)
    model.head.reset_parameters()  # a zero head has no input gradient: see the docstring
    base_model = None if args.no_baseline else copy.deepcopy(model)  # Module.to() works in place
    model = rt.prepare(model).eval().requires_grad_(False)  # as the stage does
    if base_model is not None:
        base_rt = runtime("off")
        base_model = base_rt.prepare(base_model).eval().requires_grad_(False)
    x, y = load_test(args.data, args.images, args.seed, args.classes)
    if args.labels == "predicted":
        with torch.no_grad():
            y = torch.cat(
                [
                    model(rt.images(xb.to(rt.device).float().div_(255))).argmax(1).cpu()
                    for xb in torch.split(x, args.batch)
                ]
            )
    aa_n = min(args.aa_images or args.images, args.images)
    pgd_cfg = AttackConfig(steps=args.pgd_steps)  # eps 8/255, step eps/4, random start: evaluate.pgd's defaults

    def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
        sync()
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        return out, time.perf_counter() - t, time.process_time() - c

    load0 = os.getloadavg()[0]
    clean = correct(model, x, y, rt, args.batch)
    run_pgd = lambda: ev.pgd_correct(model, x, y, rt, args.batch, pgd_cfg, args.seed) & clean  # noqa: E731
    run_base = lambda: ev.pgd_correct(base_model, x, y, base_rt, args.batch, pgd_cfg, args.seed) & clean  # noqa: E731
    for _ in range(args.warmup):
        run_pgd()
        if base_model is not None:
            run_base()
    pgd_runs, base_runs = [], []
    for _ in range(args.repeats):  # alternately: both see the same machine state
        pgd_runs.append(timed(run_pgd))
        if base_model is not None:
            base_runs.append(timed(run_base))
    pgd = pgd_runs[-1][0]
    pgd_s = statistics.median(r[1] for r in pgd_runs)
    pgd_cpu = statistics.median(r[2] for r in pgd_runs)

    aa_runs = []
    if not args.no_autoattack:

        def run_aa():
            return aa_mod.torchattacks_correct(
                model, x[:aa_n], y[:aa_n], rt, args.batch, pgd_cfg.eps, args.classes, args.seed, args.aa_steps
            )[:2]

        aa_runs = [timed(run_aa) for _ in range(args.aa_repeats)]
    load1 = os.getloadavg()[0]

    pct = lambda c: 100.0 * float(c.float().mean())  # noqa: E731
    print(f"machine: {cpu_name() if rt.device.type == 'cpu' else torch.cuda.get_device_name(rt.device)}")
    print(
        f"config: width={args.width} classes={args.classes} images={args.images} aa_images={aa_n} "
        f"batch={args.batch} pgd_steps={args.pgd_steps} aa_steps={args.aa_steps} "
        f"square_queries={aa_mod.AUTOATTACK_QUERIES} device={rt.device} threads={torch.get_num_threads()} "
        f"channels_last={rt.channels_last} precision=fp32 torch={torch.__version__} "
        f"torchattacks={aa_mod.torchattacks_version()} GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')} "
        f"repeats={args.repeats} aa_repeats={args.aa_repeats} warmup={args.warmup}"
    )
    print(f"data: {args.data or 'random uint8 images'}, labels: {args.labels}")
    print(f"load_average_1min: {load0:.2f} before, {load1:.2f} after")
    print(f"clean_acc: {pct(clean):.2f} %")
    print(f"pgd{args.pgd_steps}_acc: {pct(pgd):.2f} %")
    print(f"pgd{args.pgd_steps}_time: {pgd_s:.3f} s for {args.images} images")
    print(f"pgd{args.pgd_steps}_images_per_s: {args.images / pgd_s:.2f} images/s")
    if rt.device.type == "cpu":
        print(f"pgd{args.pgd_steps}_images_per_cpu_s: {args.images / pgd_cpu:.2f} images/s")
    if base_runs:
        base_s = statistics.median(r[1] for r in base_runs)
        print(f"pgd{args.pgd_steps}_fp32_contiguous_images_per_s: {args.images / base_s:.2f} images/s")
        print(f"pgd{args.pgd_steps}_speedup_vs_fp32: {base_s / pgd_s:.2f} x")
        if rt.device.type == "cpu":
            print(
                f"pgd{args.pgd_steps}_speedup_vs_fp32_cpu_time: "
                f"{statistics.median(r[2] for r in base_runs) / pgd_cpu:.2f} x"
            )
    if aa_runs:
        aa, worst = aa_runs[-1][0]
        aa_s = statistics.median(r[1] for r in aa_runs)
        aa_cpu = statistics.median(r[2] for r in aa_runs)
        print(f"autoattack_acc: {pct(aa & clean[:aa_n]):.2f} % (max perturbation {worst * 255:.3f}/255)")
        print(f"autoattack_time: {aa_s:.3f} s for {aa_n} images")
        print(f"autoattack_images_per_s: {aa_n / aa_s:.3f} images/s")
        if rt.device.type == "cpu":
            print(f"autoattack_images_per_cpu_s: {aa_n / aa_cpu:.3f} images/s")
        print(f"pgd_over_autoattack: {(args.images / pgd_s) / (aa_n / aa_s):.1f} x")
        survived = pct(aa & clean[:aa_n])
        print(
            "caveat: randomly initialised classifier, not representative of a trained AMOC model. AutoAttack's "
            "cost scales with how many images survive each sub-attack (APGD-T, FAB-T and Square with "
            f"{aa_mod.AUTOATTACK_QUERIES} queries run only on APGD-CE's survivors, and APGD skips images the model "
            f"already gets wrong); here {survived:.1f}% survived all four. "
            + (
                "Almost everything fell to APGD-CE, so this figure is far faster than AutoAttack on a robust model."
                if survived < 10
                else "A random network's near-constant output makes that 'robustness' degenerate; a trained robust "
                "model (about 50% survival) costs a similar order of time per image, a non-robust one much less."
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
