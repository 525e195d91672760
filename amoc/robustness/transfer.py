"""`amoc transfer`: black-box transfer attacks, a check for gradient masking.

For every model in sources + targets (`transfer.sources`, `--models`; folders under
--runs holding classifier.pt), PGD (transfer.attack: L-inf, cross-entropy, our
`pgd_linf`, random start from a generator seeded with `seed`, batches of
evaluate.batch_size) crafts examples on the first transfer.n_images test images. Those
are the model's white-box examples; a source's examples are also scored on every
target. So the matrix diagonal (source == target) is the white-box PGD accuracy with the
same settings and seed, by construction.

Robust accuracy counts an image only if the target classifies it correctly both clean and
attacked, as `amoc evaluate` and AutoAttack do, so the two stages' PGD numbers agree. A target whose white-box
accuracy is above its best transfer accuracy (the lowest, over the other models'
examples) by more than MASKING_MARGIN_PP points is flagged `suspect_gradient_masking`:
an attack that never sees the target's gradients should not do better than one that
does, unless those gradients are uninformative (Athalye et al., 2018).

Outputs: metrics.json (per source, the mean accuracy of the other models on its
examples), transfer.json (the matrix, flags, settings) and transfer.csv.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amoc.attacks.accuracy import correct, percent
from amoc.attacks.ce import ce_pgd
from amoc.config import AttackConfig, Config
from amoc.data.prepared import load_split
from amoc.errors import DataError
from amoc.io import RunLock, write_json, write_text
from amoc.nets.classifier import read_checked
from amoc.runtime import Runtime, setup

MASKING_MARGIN_PP = 1.0
CSV_COLUMNS = ("source", "target", "accuracy")


def craft(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig, rt: Runtime, batch_size: int, seed: int
) -> torch.Tensor:
    """PGD examples (float N x 3 x H x W in [0, 1], on the CPU) against `model` for uint8
    images x; a fresh generator per call, so they depend only on model, seed and batch size."""
    generator = rt.generator(seed)
    out = []
    for xb, yb in zip(torch.split(x, batch_size), torch.split(y, batch_size)):
        xb = rt.images(xb.to(rt.device).float().div_(255))
        out.append(ce_pgd(model, xb, yb.to(rt.device), attack, generator).cpu())
    return torch.cat(out)


def masking_flags(
    matrix: dict[str, dict[str, float]], whitebox: dict[str, float], margin_pp: float = MASKING_MARGIN_PP
) -> dict[str, dict[str, Any]]:
    """Per target: white-box accuracy, the best transfer attack on it (lowest accuracy over
    the other sources), and the flag; None when no other model's examples were scored."""
    flags = {}
    for target, wb in whitebox.items():
        transfer = {s: row[target] for s, row in matrix.items() if s != target and target in row}
        best = min(transfer, key=transfer.__getitem__) if transfer else None
        gap = wb - transfer[best] if best is not None else None
        flags[target] = {
            "whitebox_acc": wb,
            "best_transfer_source": best,
            "best_transfer_acc": transfer[best] if best is not None else None,
            "gap_pp": gap,
            "suspect_gradient_masking": None if gap is None else gap > margin_pp,
        }
    return flags


def _models(runs: Path, names: list[str], cfg: Config, data: str) -> dict[str, nn.Module]:
    missing = [n for n in names if not (runs / n / "classifier.pt").is_file()]
    if missing:
        raise DataError(
            f"{runs}: no classifier.pt for {', '.join(missing)}; train them first or change --models / transfer.sources"
        )
    return {n: read_checked(runs / n / "classifier.pt", cfg, data)[0] for n in names}


def _mean(values: list[float]) -> float | None:
    return _r(sum(values) / len(values)) if values else None


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def run(cfg: Config, args: Any) -> int:
    start = time.perf_counter()
    t, bs = cfg.transfer, cfg.evaluate.batch_size
    sources, targets = list(dict.fromkeys(t.sources)), list(dict.fromkeys(args.models))
    if not sources or not targets:
        raise DataError("transfer: needs at least one source (transfer.sources) and one target (--models)")
    everyone = targets + [s for s in sources if s not in targets]
    out, runs = Path(args.out), Path(args.runs)
    with RunLock(out):
        rt = setup(cfg.runtime, cfg.seed, stage="transfer", evaluation=True)
        found = _models(runs, everyone, cfg, args.data)
        models = {n: rt.prepare(m).eval().requires_grad_(False) for n, m in found.items()}
        x, y = load_split(args.data, "test")
        n = min(t.n_images or len(x), len(x))
        if n == 0:
            raise DataError(f"{args.data}: the test split is empty; nothing to attack")
        x, y = x[:n], y[:n]
        clean_ok = {m: correct(models[m], x.float() / 255, y, rt, bs) for m in everyone}
        clean = {m: percent(ok) for m, ok in clean_ok.items()}

        def robust(target: str, source: str) -> float:
            return percent(clean_ok[target] & correct(models[target], adv[source], y, rt, bs))

        adv = {}
        for m in everyone:  # white-box examples of every model; a source's are also its transfer examples
            t0 = time.perf_counter()
            adv[m] = craft(models[m], x, y, t.attack, rt, bs, cfg.seed)
            print(
                f"amoc transfer: PGD-{t.attack.steps} on {m}: {n} images in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
        whitebox = {m: robust(m, m) for m in everyone}
        matrix = {s: {m: (whitebox[m] if m == s else robust(m, s)) for m in everyone} for s in sources}
        flags = masking_flags(matrix, whitebox)
        report = {
            "attack": {
                "norm": "Linf",
                "eps": t.attack.eps,
                "eps_255": round(t.attack.eps * 255, 4),
                "step_size": t.attack.step_size,
                "step_255": round(t.attack.step_size * 255, 4),
                "steps": t.attack.steps,
                "random_start": t.attack.random_start,
                "restarts": 1,
                "objective": "cross-entropy",
                "implementation": "amoc.attacks.pgd_linf",
                "seed": cfg.seed,
                "batch_size": bs,
                "precision": "fp32, TF32 off",
            },
            "n_images": n,
            "sources": sources,
            "targets": everyone,
            "matrix": {s: {m: _r(v) for m, v in row.items()} for s, row in matrix.items()},
            "models": {
                m: {
                    "clean_acc": _r(clean[m]),
                    "whitebox_acc": _r(whitebox[m]),
                    **{k: (_r(v) if isinstance(v, float) else v) for k, v in flags[m].items() if k != "whitebox_acc"},
                }
                for m in everyone
            },
            "margin_pp": MASKING_MARGIN_PP,
            # per source: mean accuracy of the other models on its examples (the headline, metrics.json)
            "sources_summary": {s: _mean([v for m, v in matrix[s].items() if m != s]) for s in sources},
            "units": "robust accuracy in % (correct clean and attacked); matrix[source][target]",
            "seconds": round(time.perf_counter() - start, 1),
        }
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for s, row in matrix.items():
            for m, acc in row.items():
                writer.writerow([s, m, f"{acc:.2f}"])
        write_text(out / "transfer.csv", buf.getvalue())
        write_json(out / "transfer.json", report)
        write_json(out / "metrics.json", {"transfer_acc": {s: report["sources_summary"][s] for s in sources}})
    suspects = [m for m, f in flags.items() if f["suspect_gradient_masking"]]
    print(
        f"amoc transfer: {len(sources)} source(s) x {len(everyone)} models, {n} images -> {out}"
        + (f"; suspect gradient masking: {', '.join(suspects)}" if suspects else "")
    )
    return 0
