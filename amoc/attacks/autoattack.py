"""Standard AutoAttack (L-inf): the original code (`evaluate.autoattack_impl: original`,
amoc.attacks.autoattack_original) or torchattacks' port, configured as the original.

torchattacks' "standard" ensemble (APGD-CE, APGD-T, FAB-T, Square 5000 queries) with two
settings of the original AutoAttack that torchattacks 3.3.0 does not use, which
`build_autoattack` restores: 100 iterations for APGD-CE, APGD-T and FAB-T (torchattacks
builds them with 10; Harry24k/adversarial-attacks-pytorch#196), 9 target classes for
APGD-T and FAB-T on every data set (torchattacks targets all n_classes - 1), and Square's fixed
schedule of the patch size (the original runs it with `resc_schedule=False`; torchattacks'
default True rescales the schedule to the query budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amoc.attacks.accuracy import correct
from amoc.runtime import Runtime

AUTOATTACK_STEPS = 100  # APGD-CE, APGD-T and FAB-T iterations of standard AutoAttack
AUTOATTACK_QUERIES = 5000  # Square
AUTOATTACK_TARGETS = 9  # target classes of APGD-T and FAB-T on every data set (CIFAR-100 and ImageNet too)
SQUARE_RESCALE_SCHEDULE = False  # as the original standard AutoAttack


def build_autoattack(model: nn.Module, eps: float, num_classes: int, seed: int, steps: int | None = None):
    """torchattacks' standard AutoAttack with `steps` (default AUTOATTACK_STEPS) iterations
    for APGD-CE, APGD-T and FAB-T, and AUTOATTACK_QUERIES for Square with the original's
    fixed schedule (SQUARE_RESCALE_SCHEDULE)."""
    import torchattacks

    steps = AUTOATTACK_STEPS if steps is None else steps

    aa = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=num_classes, seed=seed)
    for sub in aa._autoattack.attacks:  # APGD, APGDT, FAB (multi-targeted), Square
        if hasattr(sub, "n_target_classes"):  # torchattacks takes n_classes - 1: 99 on CIFAR-100
            sub.n_target_classes = n_target_classes(num_classes)
        if hasattr(sub, "steps"):
            sub.steps = steps
        if hasattr(sub, "n_queries"):
            sub.n_queries = AUTOATTACK_QUERIES
            sub.rescale_schedule = SQUARE_RESCALE_SCHEDULE
    return aa


def n_target_classes(num_classes: int) -> int:
    """Target classes of APGD-T and FAB-T: the original's 9, fewer only where the data set has fewer."""
    return min(AUTOATTACK_TARGETS, num_classes - 1)


def torchattacks_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rt: Runtime,
    batch_size: int,
    eps: float,
    num_classes: int,
    seed: int,
    steps: int | None = None,
) -> tuple[torch.Tensor, float, list[float]]:
    """torchattacks' port: (correct after AutoAttack, largest L-inf perturbation it returned,
    images still correct after each attack, summed over the batches: torchattacks'
    MultiAttack records them per batch)."""
    aa = build_autoattack(model, eps, num_classes, seed, steps)
    multi = aa._autoattack
    multi._accumulate_multi_atk_records = True  # counts after each attack, added over the batches
    multi._multi_atk_records = [0.0] * (1 + len(multi.attacks))
    worst = [0.0]

    def attack(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        xb = xb.contiguous()  # torchattacks' FAB uses .view(): no channels_last inputs
        adv = aa(xb, yb).detach()
        # device-ok: once per batch; torchattacks' AutoAttack reads the host many times per batch itself
        worst[0] = max(worst[0], float((adv - xb).abs().amax()) if len(xb) else 0.0)
        return adv

    rng = torch.get_rng_state()  # torchattacks reseeds the global generator; leave it as found
    try:
        mask = correct(model, x, y, rt, batch_size, attack, desc="AutoAttack")
        return mask, worst[0], list(multi._multi_atk_records[1:])
    finally:
        torch.set_rng_state(rng)


@dataclass
class AutoAttackResult:
    correct: torch.Tensor  # bool N on the run's device: classified correctly after AutoAttack
    worst: float  # the largest L-inf perturbation the attacks returned
    per_attack: list[dict[str, Any]]  # after each attack: robust accuracy (%) of all N images
    implementation: dict[str, Any]  # name, package and version, code it is
    seconds: dict[str, float] | None = None  # per attack (the original only; torchattacks runs them per batch)
    resumed: dict[str, Any] | None = None  # what a resumed run did not recompute


def implementation(name: str) -> dict[str, Any]:
    """What `evaluate.autoattack_impl` names, for eval.json."""
    if name == "original":
        from amoc.attacks.autoattack_original import pyautoattack_version

        return {
            "name": "original",
            "package": "pyautoattack",
            "version": pyautoattack_version(),
            "code": "Croce & Hein's AutoAttack (fra31/auto-attack a39220048b3c, as RobustBench pins it)",
        }
    return {
        "name": "torchattacks",
        "package": "torchattacks",
        "version": torchattacks_version(),
        "code": "torchattacks' port, with the original's iterations, targets and Square schedule restored",
    }


def run_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rt: Runtime,
    batch_size: int,
    eps: float,
    num_classes: int,
    seed: int,
    *,
    impl: str = "original",
    steps: int | None = None,
    state_path: Path | None = None,
) -> AutoAttackResult:
    """Standard AutoAttack by `impl` (original: Croce & Hein's code, resumable from
    `state_path`; torchattacks: its port) on uint8 or [0, 1] images x and labels y."""
    steps = AUTOATTACK_STEPS if steps is None else steps
    n = len(x)
    rng = torch.get_rng_state()  # both reseed the global generator; leave it as found
    try:
        if impl == "original":
            from amoc.attacks import autoattack_original

            out = autoattack_original.run(
                model,
                x,
                y,
                device=rt.device,
                batch_size=batch_size,
                eps=eps,
                seed=seed,
                steps=steps,
                queries=AUTOATTACK_QUERIES,
                targets=n_target_classes(num_classes),
                state_path=state_path,
            )
            per_attack = [{"attack": d["attack"], "robust_acc": _pct(d["robust"], n)} for d in out["per_attack"]]
            seconds = {d["attack"]: d["seconds"] for d in out["per_attack"]}
            mask = out["robust"].to(rt.device)
            return AutoAttackResult(mask, out["worst"], per_attack, implementation(impl), seconds, out["resumed"])
        mask, worst, counts = torchattacks_correct(model, x, y, rt, batch_size, eps, num_classes, seed, steps)
        names = ("apgd-ce", "apgd-t", "fab-t", "square")
        per_attack = [{"attack": a, "robust_acc": _pct(c, n)} for a, c in zip(names, counts)]
        return AutoAttackResult(mask, worst, per_attack, implementation(impl))
    finally:
        torch.set_rng_state(rng)


def _pct(count: float, n: int) -> float | None:
    return round(100.0 * count / n, 2) if n else None


def torchattacks_version() -> str:
    try:
        from importlib.metadata import version

        return version("torchattacks")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "unknown"
