"""`amoc evaluate`: clean, PGD-20 and AutoAttack accuracy and a robustness curve.

Outputs: metrics.json (the headline numbers), eval.json (those of the best-on-validation
classifier too, every setting, timings) and curve.csv (accuracy against eps, a DVC plot).

The classifier runs in eval mode on its adversarial BN branch, in fp32 (robust numbers
from reduced precision can hide gradients), batched, on the first `evaluate.n_images`
test images. An image counts as robust only if it is classified correctly both clean and
after the attack, as AutoAttack counts it, so robust accuracy never exceeds clean.

AutoAttack is the standard L-inf ensemble: the original code by default (a killed run
resumes from the state file it keeps in the output folder), or torchattacks' port
configured as the original (`evaluate.autoattack_impl`, amoc.attacks.autoattack).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch

from amoc.attacks import autoattack
from amoc.attacks.accuracy import correct
from amoc.attacks.ce import ce_pgd
from amoc.config import AttackConfig, Config
from amoc.data.prepared import load_split
from amoc.errors import DataError
from amoc.io import RunLock, write_json, write_text
from amoc.nets.classifier import Classifier, read_checked
from amoc.runtime import Runtime, oom_hint, setup

CURVE_COLUMNS = ("eps_255", "eps", "accuracy", "n_images")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pgd_correct(
    model: Classifier, x: torch.Tensor, y: torch.Tensor, rt: Runtime, batch_size: int, attack: AttackConfig, seed: int
) -> torch.Tensor:
    """Correct after our L-inf PGD on the cross-entropy (a fresh generator per call:
    the result depends on the seed and the batch size, not on what ran before)."""
    generator = rt.generator(seed)
    return correct(
        model,
        x,
        y,
        rt,
        batch_size,
        lambda xb, yb: ce_pgd(model, xb, yb, attack, generator),
        desc=f"PGD-{attack.steps} eps {attack.eps * 255:g}/255",
    )


def _pct(mask: torch.Tensor) -> float | None:
    return round(100.0 * float(mask.float().mean()), 2) if len(mask) else None


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - t0


def _attack_settings(a: AttackConfig, n: int) -> dict[str, Any]:
    return {
        "norm": "Linf",
        "eps": a.eps,
        "eps_255": round(a.eps * 255, 4),
        "step_size": a.step_size,
        "step_255": round(a.step_size * 255, 4),
        "steps": a.steps,
        "random_start": a.random_start,
        "restarts": 1,
        "objective": "cross-entropy",
        "implementation": "amoc.attacks.pgd_linf",
        "n_images": n,
    }


def _load(path: str | Path, rt: Runtime, cfg: Config, data: str) -> tuple[Classifier, dict[str, Any]]:
    model, provenance = read_checked(path, cfg, data)
    return rt.prepare(model).eval().requires_grad_(False), provenance  # FAB calls .backward(): no weight grads


def _same_weights(a: Classifier, b: Classifier) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def attack_accuracy(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    rt: Runtime,
    cfg: Config,
    num_classes: int,
    aa_n: int,
    label: str,
    state_path: Path | None = None,
) -> dict[str, Any]:
    """Clean, PGD and AutoAttack (on the first aa_n images) correctness of one classifier,
    with timings; robust = correct clean and attacked. `state_path`: where the original
    AutoAttack keeps its position, so that a killed evaluation resumes."""
    e, bs, n = cfg.evaluate, cfg.evaluate.batch_size, len(x)
    clean = correct(model, x, y, rt, bs)
    pgd, pgd_s = _timed(rt.device, lambda: pgd_correct(model, x, y, rt, bs, e.pgd, cfg.seed) & clean)
    print(
        f"{label}: PGD-{e.pgd.steps} (eps {e.pgd.eps * 255:g}/255): {n} images in {pgd_s:.1f} s = "
        f"{n / pgd_s:.1f} images/s"
    )
    aa, aa_s, aa_worst, per_attack, resumed, per_attack_s = None, None, None, None, None, None
    if e.autoattack:
        result, aa_s = _timed(
            rt.device,
            lambda: autoattack.run_autoattack(
                model,
                x[:aa_n],
                y[:aa_n],
                rt,
                bs,
                e.pgd.eps,
                num_classes,
                cfg.seed,
                impl=e.autoattack_impl,
                state_path=state_path,
            ),
        )
        aa, aa_worst, per_attack, resumed = (
            result.correct & clean[:aa_n],
            result.worst,
            result.per_attack,
            result.resumed,
        )
        per_attack_s = result.seconds
        impl = result.implementation
        if resumed:
            done = ", ".join(resumed["attacks_done"]) or "no attack"
            print(f"{label}: AutoAttack resumed from {state_path}: {done} done, not recomputed")
        steps = ", ".join(f"{a['attack'].upper()} {a['robust_acc']}%" for a in per_attack)
        print(
            f"{label}: AutoAttack (standard, Linf eps {e.pgd.eps * 255:g}/255, {impl['name']}: {impl['package']} "
            f"{impl['version']}): {aa_n} images in {aa_s:.1f} s = {aa_n / aa_s:.2f} images/s; robust after {steps}"
        )
        if aa_worst > e.pgd.eps + 1e-5:
            print(f"warning: AutoAttack returned a perturbation of {aa_worst * 255:.3f}/255 > eps", flush=True)
    return {
        "clean": clean,
        "pgd": pgd,
        "aa": aa,
        "pgd_s": pgd_s,
        "aa_s": aa_s,
        "aa_worst": aa_worst,
        "aa_per_attack": per_attack,
        "aa_per_attack_s": per_attack_s,
        "aa_resumed": resumed,
    }


def _summary(r: dict[str, Any], aa_n: int) -> dict[str, Any]:
    aa = None if r["aa"] is None else _pct(r["aa"])
    return {
        "clean_acc": _pct(r["clean"]),
        "pgd_acc": _pct(r["pgd"]),
        "autoattack_acc": aa,
        # robust accuracy (% of the AutoAttack images) after each attack of the ensemble, in order
        "autoattack_per_attack": r.get("aa_per_attack"),
        "autoattack_resumed": r.get("aa_resumed"),
        # the three numbers on the AutoAttack images, for a like-for-like comparison
        "subset": {
            "n_images": aa_n,
            "clean_acc": _pct(r["clean"][:aa_n]),
            "pgd_acc": _pct(r["pgd"][:aa_n]),
            "autoattack_acc": aa,
        },
    }


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers `dvc metrics diff` and `dvc exp show` compare: the last epoch's clean,
    PGD and AutoAttack accuracy (%) and the images behind them; eval.json has the rest
    (the best epoch, every setting, timings)."""
    aa = result["settings"]["autoattack"]
    return {
        "clean": result["clean_acc"],
        "pgd": result["pgd_acc"],
        "autoattack": result["autoattack_acc"],
        "n": result["n_images"],
        "n_autoattack": aa["n_images"],
    }


def run(cfg: Config, args: argparse.Namespace) -> int:
    e = cfg.evaluate
    out = Path(args.out)
    with RunLock(out), oom_hint("evaluate", "evaluate.batch_size", e.batch_size):
        rt = setup(cfg.runtime, cfg.seed, stage="evaluate", evaluation=True)
        model, provenance = _load(args.model, rt, cfg, args.data)
        best_path = Path(args.model).with_name("classifier_best.pt")
        x, y = load_split(args.data, "test")
        num_classes = model.num_classes  # checked against the data set by _load
        n = min(e.n_images or len(x), len(x))
        if n == 0:
            raise DataError(f"{args.data}: the test split is empty; nothing to evaluate")
        x, y = x[:n], y[:n]
        bs = e.batch_size
        aa_n = min(e.autoattack_images or n, n)

        states = {k: out / f".autoattack-state-{k}.pt" for k in ("last", "best")}  # resume after a kill
        last = attack_accuracy(model, x, y, rt, cfg, num_classes, aa_n, "last epoch", states["last"])
        best = None
        if best_path.is_file() and Path(args.model).name != best_path.name:
            best_model, best_prov = _load(best_path, rt, cfg, args.data)
            same = _same_weights(model, best_model)
            scores = (
                last
                if same
                else attack_accuracy(best_model, x, y, rt, cfg, num_classes, aa_n, "best epoch", states["best"])
            )
            best = {
                "model": str(best_path),
                "epoch": best_prov.get("epoch"),
                "selected_by": best_prov.get("selected_by"),
                "same_as_last": same,
                **_summary(scores, aa_n),
            }

        clean, pgd = last["clean"], last["pgd"]
        curve_rows = []
        for eps_255 in e.curve_eps:
            attack = AttackConfig(
                eps=eps_255 / 255, step_ratio=e.pgd.step_ratio, steps=e.pgd.steps, random_start=e.pgd.random_start
            )
            if eps_255 == 0:
                ok = clean
            elif abs(attack.eps - e.pgd.eps) < 1e-12:
                ok = pgd
            else:
                ok = pgd_correct(model, x, y, rt, bs, attack, cfg.seed) & clean
            curve_rows.append({"eps_255": eps_255, "eps": attack.eps, "accuracy": _pct(ok), "n_images": n})

        aa_s, aa_worst = last["aa_s"], last["aa_worst"]
        result = {
            **_summary(last, aa_n),
            "n_images": n,
            "epoch": provenance.get("epoch"),
            "best": best,
            "settings": {
                "model": str(args.model),
                "data": str(args.data),
                "seed": cfg.seed,
                "trained_by": {k: provenance.get(k) for k in ("stage", "mode", "init")},
                "bn_branch": model.bn_branch,
                "device": str(rt.device),
                "precision": "fp32, TF32 off",
                "batch_size": bs,
                "robust_counts_clean_errors": True,
                "clean": {"n_images": n},
                "pgd": _attack_settings(e.pgd, n),
                "autoattack": {
                    "enabled": e.autoattack,
                    "version": "standard",
                    "norm": "Linf",
                    "eps": e.pgd.eps,
                    "eps_255": round(e.pgd.eps * 255, 4),
                    "n_images": aa_n if e.autoattack else 0,
                    "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"],
                    "iterations": autoattack.AUTOATTACK_STEPS,
                    "square_queries": autoattack.AUTOATTACK_QUERIES,
                    "square_rescale_schedule": autoattack.SQUARE_RESCALE_SCHEDULE,
                    "n_target_classes": autoattack.n_target_classes(num_classes),
                    "implementation": autoattack.implementation(e.autoattack_impl),
                    "library": "{package} {version}".format(**autoattack.implementation(e.autoattack_impl)),
                    "resumable": e.autoattack_impl == "original",
                    "seed": cfg.seed,
                    "max_perturbation_255": None if aa_worst is None else round(aa_worst * 255, 4),
                },
                "curve": {
                    "eps_255": list(e.curve_eps),
                    "step_ratio": e.pgd.step_ratio,
                    "steps": e.pgd.steps,
                    "random_start": e.pgd.random_start,
                    "n_images": n,
                },
            },
            "throughput": {
                "pgd_seconds": round(last["pgd_s"], 3),
                "pgd_images_per_s": round(n / last["pgd_s"], 2),
                "autoattack_seconds": None if aa_s is None else round(aa_s, 3),
                "autoattack_images_per_s": None if aa_s is None else round(aa_n / aa_s, 3),
                # per attack (the original implementation; a resumed run adds the time before the kill)
                "autoattack_seconds_per_attack": last["aa_per_attack_s"],
            },
        }
        lines = [",".join(CURVE_COLUMNS)] + [",".join(str(r[c]) for c in CURVE_COLUMNS) for r in curve_rows]
        write_text(out / "curve.csv", "\n".join(lines) + "\n")
        write_json(out / "eval.json", result)
        write_json(out / "metrics.json", headline(result))
        for state in states.values():  # finished: nothing to resume
            state.unlink(missing_ok=True)
        aa_txt = "off" if result["autoattack_acc"] is None else f"{result['autoattack_acc']:.2f}% ({aa_n} images)"
        print(
            f"{args.model}: clean {result['clean_acc']:.2f}%, PGD-{e.pgd.steps} {result['pgd_acc']:.2f}% "
            f"({n} images), AutoAttack {aa_txt} -> {out / 'eval.json'}"
        )
        if best is not None:
            print(
                f"{best_path} (epoch {best['epoch']}, {best['selected_by']}): clean {best['clean_acc']:.2f}%, "
                f"PGD-{e.pgd.steps} {best['pgd_acc']:.2f}%, AutoAttack "
                + ("off" if best["autoattack_acc"] is None else f"{best['autoattack_acc']:.2f}%")
                + (" (the same weights as the last epoch)" if best["same_as_last"] else "")
            )
    return 0
