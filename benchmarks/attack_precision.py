"""What bf16 autocast does inside the training-time attacks (runtime.attack_precision).

    .venv/bin/python benchmarks/attack_precision.py --data DIR --encoder runs/pretrain/encoder.pt \
        --classifier runs/aff/classifier.pt [--images 512] [--batch 128] [--threads 1]

The same attacks as training runs them, crafted once under fp32 and once under bf16
autocast from the same random start, each scored in fp32:

- a contrastive PGD-5 like pre-training's (ACA's L_adv: the query view attacked through
  the encoder on its adversarial BN branch, positive = its clean features, negatives = the
  other images' features; encoder.pt holds no projector, so the encoder's pooled features
  stand in for the projector's): the InfoNCE reached;
- TRADES' inner maximisation (the authors' uniform start) on the classifier: the KL reached;
- PGD-10 on the cross-entropy (PGD-AT): the cross-entropy reached and the accuracy left.

Prints ``name: value`` lines: each objective under both precisions, their ratio
(bf16 / fp32; 1 = as strong), and the share of pixels whose first-step gradient sign
agrees. bf16 runs on any CPU (slowly without AMX / AVX512-BF16) and on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amoc.attacks.pgd import pgd_linf
from amoc.config import AttackConfig
from amoc.data.prepared import load_split
from amoc.downstream.losses import trades_attack
from amoc.nets.classifier import load_classifier
from amoc.nets.store import load_encoder_file
from amoc.pretrain.losses import info_nce
from amoc.runtime import eval_mode


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def first_sign(objective, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    with autocast(bf16):
        loss = objective(x)
    return torch.autograd.grad(loss, x)[0].sign()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="prepared folder (amoc download)")
    ap.add_argument("--encoder", required=True, help="encoder.pt (amoc pretrain)")
    ap.add_argument("--classifier", required=True, help="classifier.pt (amoc probe / finetune)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x_all, y_all = load_split(args.data, "test")
    x_all, y_all = x_all[: args.images].float() / 255, y_all[: args.images]
    encoder, extra = load_encoder_file(args.encoder)
    classifier = load_classifier(args.classifier).requires_grad_(False)
    encoder.eval().requires_grad_(False)
    branch = "clean" if extra.get("bn_branch") == "clean" else "adv"
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {len(x_all)} test images, batch {args.batch}"
    )

    pretrain_attack = AttackConfig(steps=5)
    train_attack = AttackConfig(steps=10)
    sums = {k: [0.0, 0.0] for k in ("contrastive", "trades_kl", "pgd_ce", "pgd_correct")}
    agree = {k: [] for k in ("contrastive", "trades_kl", "pgd_ce")}
    for xb, yb in zip(x_all.split(args.batch), y_all.split(args.batch)):
        with torch.no_grad(), eval_mode(encoder):
            for m in encoder.modules():
                if hasattr(m, "branch"):
                    m.branch = branch
            keys = F.normalize(encoder(xb), dim=1) / 0.2**0.5  # B x D: positives (clean)
        queue = keys.flip(0).t()  # every other image's clean features as negatives

        def contrastive(z: torch.Tensor, keys=keys, queue=queue) -> torch.Tensor:
            q = F.normalize(encoder(z).float(), dim=1) / 0.2**0.5
            return info_nce(q, keys, queue, reduction="sum")

        with torch.no_grad():
            p_nat = F.softmax(classifier(xb).float(), dim=1)

        def kl(z: torch.Tensor, p_nat=p_nat) -> torch.Tensor:
            return F.kl_div(F.log_softmax(classifier(z).float(), dim=1), p_nat, reduction="sum")

        def ce(z: torch.Tensor, yb=yb) -> torch.Tensor:
            return F.cross_entropy(classifier(z).float(), yb, reduction="sum")

        crafted = {}
        for bf16 in (False, True):
            g = torch.Generator().manual_seed(args.seed)
            with autocast(bf16):
                crafted["contrastive", bf16] = pgd_linf(
                    xb, contrastive, eps=pretrain_attack.eps, step_size=pretrain_attack.step_size, steps=5, generator=g
                )
                g.manual_seed(args.seed)
                crafted["trades_kl", bf16] = trades_attack(classifier, xb, train_attack, g)
                g.manual_seed(args.seed)
                crafted["pgd_ce", bf16] = pgd_linf(
                    xb, ce, eps=train_attack.eps, step_size=train_attack.step_size, steps=10, generator=g
                )
        with torch.no_grad():  # every score in fp32
            for name, objective in (("contrastive", contrastive), ("trades_kl", kl), ("pgd_ce", ce)):
                for i, bf16 in enumerate((False, True)):
                    sums[name][i] += float(objective(crafted[name, bf16]))
            for i, bf16 in enumerate((False, True)):
                sums["pgd_correct"][i] += int((classifier(crafted["pgd_ce", bf16]).argmax(1) == yb).sum())
        start = xb + (2 * torch.rand(xb.shape, generator=torch.Generator().manual_seed(args.seed)) - 1) * 8 / 255
        start = start.clamp(0, 1)
        for name, objective in (("contrastive", contrastive), ("trades_kl", kl), ("pgd_ce", ce)):
            agree[name].append(
                (first_sign(objective, start, False) == first_sign(objective, start, True)).float().mean()
            )
    n = len(x_all)
    for name in ("contrastive", "trades_kl", "pgd_ce"):
        fp32, bf16 = sums[name][0] / n, sums[name][1] / n
        print(f"{name}_fp32: {fp32:.5f} per image")
        print(f"{name}_bf16: {bf16:.5f} per image")
        print(f"{name}_ratio_bf16_over_fp32: {bf16 / fp32:.4f}")
        print(f"{name}_first_step_sign_agreement: {100 * float(torch.stack(agree[name]).mean()):.2f} %")
    print(f"pgd10_accuracy_fp32: {100 * sums['pgd_correct'][0] / n:.2f} %")
    print(f"pgd10_accuracy_bf16: {100 * sums['pgd_correct'][1] / n:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
