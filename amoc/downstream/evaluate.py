"""`amoc evaluate`: clean, PGD-20 and AutoAttack accuracy and a robustness curve (spec 7).

The classifier runs in eval mode on its adversarial BN branch, in fp32 (robust numbers
from reduced precision can hide gradients), batched, on the first `evaluate.n_images`
test images. An image counts as robust only if it is classified correctly both clean and
after the attack, as AutoAttack counts it, so robust accuracy never exceeds clean.

AutoAttack is the "standard" L-inf ensemble of torchattacks (APGD-CE, APGD-T, FAB-T,
Square 5000 queries) with the iteration counts of the original AutoAttack: torchattacks
3.3.0 builds its sub-attacks with 10 iterations instead of the paper's 100
(Harry24k/adversarial-attacks-pytorch#196), which we restore here (AUTOATTACK_STEPS).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from amoc import io
from amoc.config import AttackConfig, Config
from amoc.data.prepared import load_split, load_stats
from amoc.downstream.classifier import Classifier, read_classifier
from amoc.downstream.losses import ce_attack
from amoc.errors import DataError
from amoc.io import RunLock
from amoc.runtime import Runtime, oom_hint, setup

AUTOATTACK_STEPS = 100        # APGD-CE, APGD-T and FAB-T iterations of standard AutoAttack
AUTOATTACK_QUERIES = 5000     # Square
CURVE_COLUMNS = ("eps_255", "eps", "accuracy", "n_images")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batched(model: Classifier, x: torch.Tensor, y: torch.Tensor, rt: Runtime, batch_size: int,
             attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, desc: str = "clean") -> torch.Tensor:
    """Per-image correctness (bool, on the device) of model(attack(x)) for uint8 images x."""
    out = []
    batches = list(zip(torch.split(x, batch_size), torch.split(y, batch_size)))
    for xb, yb in tqdm(batches, desc=desc, unit="batch", disable=not rt.progress or attack is None, leave=False):
        xb = rt.images(xb.to(rt.device).float().div_(255))
        yb = yb.to(rt.device)
        if attack is not None:
            xb = attack(xb, yb)
        with torch.no_grad():
            out.append(model(xb).argmax(1) == yb)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=rt.device)


def clean_correct(model: Classifier, x: torch.Tensor, y: torch.Tensor, rt: Runtime, batch_size: int) -> torch.Tensor:
    return _batched(model, x, y, rt, batch_size, None)


def pgd_correct(model: Classifier, x: torch.Tensor, y: torch.Tensor, rt: Runtime, batch_size: int,
                attack: AttackConfig, seed: int) -> torch.Tensor:
    """Correct after our L-inf PGD on the cross-entropy (a fresh generator per call:
    the result depends on the seed and the batch size, not on what ran before)."""
    generator = rt.generator(seed)
    return _batched(model, x, y, rt, batch_size, lambda xb, yb: ce_attack(model, xb, yb, attack, generator),
                    desc=f"PGD-{attack.steps} eps {attack.eps * 255:g}/255")


def build_autoattack(model: Classifier, eps: float, num_classes: int, seed: int, steps: int | None = None):
    """torchattacks' standard AutoAttack with `steps` (default AUTOATTACK_STEPS) iterations
    for APGD-CE, APGD-T and FAB-T and AUTOATTACK_QUERIES for Square."""
    import torchattacks

    steps = AUTOATTACK_STEPS if steps is None else steps

    aa = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=num_classes, seed=seed)
    for sub in aa._autoattack.attacks:  # APGD, APGDT, FAB (multi-targeted), Square
        if hasattr(sub, "steps"):
            sub.steps = steps
        if hasattr(sub, "n_queries"):
            sub.n_queries = AUTOATTACK_QUERIES
    return aa


def autoattack_correct(model: Classifier, x: torch.Tensor, y: torch.Tensor, rt: Runtime, batch_size: int,
                       eps: float, num_classes: int, seed: int, steps: int | None = None) -> tuple[torch.Tensor, float]:
    """(correct after AutoAttack, largest L-inf perturbation it returned)."""
    aa = build_autoattack(model, eps, num_classes, seed, steps)
    worst = [0.0]

    def attack(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        xb = xb.contiguous()  # torchattacks' FAB uses .view(): no channels_last inputs
        adv = aa(xb, yb).detach()
        worst[0] = max(worst[0], float((adv - xb).abs().amax()) if len(xb) else 0.0)
        return adv

    rng = torch.get_rng_state()  # torchattacks reseeds the global generator; leave it as found
    try:
        return _batched(model, x, y, rt, batch_size, attack, desc="AutoAttack"), worst[0]
    finally:
        torch.set_rng_state(rng)


def _pct(correct: torch.Tensor) -> float | None:
    return round(100.0 * float(correct.float().mean()), 2) if len(correct) else None


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - t0


def _attack_settings(a: AttackConfig, n: int) -> dict[str, Any]:
    return {"norm": "Linf", "eps": a.eps, "eps_255": round(a.eps * 255, 4), "step_size": a.step_size,
            "step_255": round(a.step_size * 255, 4), "steps": a.steps, "random_start": a.random_start,
            "restarts": 1, "objective": "cross-entropy", "implementation": "amoc.attacks.pgd_linf", "n_images": n}


def run(cfg: Config, args: argparse.Namespace) -> int:
    e = cfg.evaluate
    out = Path(args.out)
    with RunLock(out), oom_hint("evaluate", "evaluate.batch_size", e.batch_size):
        rt = setup(cfg.runtime, cfg.seed, stage="evaluate", evaluation=True)
        model, provenance = read_classifier(args.model)
        model = rt.prepare(model).eval().requires_grad_(False)  # FAB calls .backward(): no weight grads
        x, y = load_split(args.data, "test")
        num_classes = int(load_stats(args.data).get("num_classes", model.num_classes))
        if num_classes != model.num_classes:
            raise DataError(f"{args.data}: {num_classes} classes, but {args.model} predicts {model.num_classes}; "
                            "evaluate on the data set the classifier was trained on")
        n = min(e.n_images or len(x), len(x))
        if n == 0:
            raise DataError(f"{args.data}: the test split is empty; nothing to evaluate")
        x, y = x[:n], y[:n]
        bs = e.batch_size

        clean = clean_correct(model, x, y, rt, bs)
        pgd, pgd_s = _timed(rt.device, lambda: pgd_correct(model, x, y, rt, bs, e.pgd, cfg.seed) & clean)
        print(f"PGD-{e.pgd.steps} (eps {e.pgd.eps * 255:g}/255): {n} images in {pgd_s:.1f} s = {n / pgd_s:.1f} images/s")

        aa_n = min(e.autoattack_images or n, n)
        aa, aa_s, aa_worst = None, None, None
        if e.autoattack:
            (aa, aa_worst), aa_s = _timed(rt.device, lambda: autoattack_correct(
                model, x[:aa_n], y[:aa_n], rt, bs, e.pgd.eps, num_classes, cfg.seed))
            aa = aa & clean[:aa_n]
            print(f"AutoAttack (standard, Linf eps {e.pgd.eps * 255:g}/255): {aa_n} images in {aa_s:.1f} s "
                  f"= {aa_n / aa_s:.2f} images/s")
            if aa_worst > e.pgd.eps + 1e-5:
                print(f"warning: AutoAttack returned a perturbation of {aa_worst * 255:.3f}/255 > eps", flush=True)

        curve_rows = []
        for eps_255 in e.curve_eps:
            attack = AttackConfig(eps=eps_255 / 255, step_ratio=e.pgd.step_ratio, steps=e.pgd.steps,
                                  random_start=e.pgd.random_start)
            if eps_255 == 0:
                correct = clean
            elif abs(attack.eps - e.pgd.eps) < 1e-12:
                correct = pgd
            else:
                correct = pgd_correct(model, x, y, rt, bs, attack, cfg.seed) & clean
            curve_rows.append({"eps_255": eps_255, "eps": attack.eps, "accuracy": _pct(correct), "n_images": n})

        result = {
            "clean_acc": _pct(clean), "pgd_acc": _pct(pgd), "autoattack_acc": None if aa is None else _pct(aa),
            "n_images": n,
            # the three numbers on the AutoAttack images, for a like-for-like comparison
            "subset": {"n_images": aa_n, "clean_acc": _pct(clean[:aa_n]), "pgd_acc": _pct(pgd[:aa_n]),
                       "autoattack_acc": None if aa is None else _pct(aa)},
            "settings": {
                "model": str(args.model), "data": str(args.data), "seed": cfg.seed,
                "trained_by": {k: provenance.get(k) for k in ("stage", "mode", "init")},
                "bn_branch": model.bn_branch, "device": str(rt.device), "precision": "fp32", "batch_size": bs,
                "robust_counts_clean_errors": True,
                "clean": {"n_images": n},
                "pgd": _attack_settings(e.pgd, n),
                "autoattack": {"enabled": e.autoattack, "version": "standard", "norm": "Linf", "eps": e.pgd.eps,
                               "eps_255": round(e.pgd.eps * 255, 4), "n_images": aa_n if e.autoattack else 0,
                               "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "iterations": AUTOATTACK_STEPS,
                               "square_queries": AUTOATTACK_QUERIES, "n_target_classes": num_classes - 1,
                               "library": f"torchattacks {_torchattacks_version()}", "seed": cfg.seed,
                               "max_perturbation_255": None if aa_worst is None else round(aa_worst * 255, 4)},
                "curve": {"eps_255": list(e.curve_eps), "step_ratio": e.pgd.step_ratio, "steps": e.pgd.steps,
                          "random_start": e.pgd.random_start, "n_images": n},
            },
            "throughput": {"pgd_seconds": round(pgd_s, 3), "pgd_images_per_s": round(n / pgd_s, 2),
                           "autoattack_seconds": None if aa_s is None else round(aa_s, 3),
                           "autoattack_images_per_s": None if aa_s is None else round(aa_n / aa_s, 3)},
        }
        lines = [",".join(CURVE_COLUMNS)] + [",".join(str(r[c]) for c in CURVE_COLUMNS) for r in curve_rows]
        io.write_text(out / "curve.csv", "\n".join(lines) + "\n")
        io.write_json(out / "eval.json", result)
        aa_txt = "off" if aa is None else f"{result['autoattack_acc']:.2f}% ({aa_n} images)"
        print(f"{args.model}: clean {result['clean_acc']:.2f}%, PGD-{e.pgd.steps} {result['pgd_acc']:.2f}% "
              f"({n} images), AutoAttack {aa_txt} -> {out / 'eval.json'}")
    return 0


def _torchattacks_version() -> str:
    try:
        from importlib.metadata import version
        return version("torchattacks")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "unknown"
