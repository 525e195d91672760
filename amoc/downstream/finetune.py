"""`amoc finetune`: adversarial full fine-tuning (AFF, docs/downstream.md) and the
from-scratch baseline.

The whole classifier (encoder + zero-initialised head) trains in train mode on the
adversarial BN branch with `finetune.loss` (TRADES by default; PGD-AT selectable).
`--init scratch` starts from a randomly initialised encoder built from `model:`
(arch, width) with the data set's mean/std: the supervised adversarial-training
baseline of the paper's table, trained by exactly the same loop.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from amoc.config import Config
from amoc.distributed import session
from amoc.downstream.probe import encoder_branch
from amoc.downstream.trainer import TrainSpec, load_train_data, train_classifier
from amoc.io import RunLock, file_digest
from amoc.nets.classifier import Classifier
from amoc.nets.resnet import build_encoder
from amoc.nets.store import load_encoder_file
from amoc.runtime import setup


def run(cfg: Config, args: argparse.Namespace) -> int:
    out = Path(args.out)
    with session(cfg.runtime.device) as dist, RunLock(out) if dist.main else contextlib.nullcontext():
        rt = setup(
            cfg.runtime, cfg.seed, dist, stage="finetune"
        )  # seeds the random init of --init scratch (same on every rank)
        x, y, stats = load_train_data(args.data)
        if args.init == "scratch":
            encoder = build_encoder(cfg.model.arch, cfg.model.width, stats["mean"], stats["std"])
            branch = "adv"
            provenance = {
                "stage": "finetune",
                "mode": "scratch",
                "init": "scratch",
                "init_sha256": None,
                "arch": cfg.model.arch,
                "width": cfg.model.width,
            }
        else:
            encoder, extra = load_encoder_file(args.init)
            branch = encoder_branch(extra)
            provenance = {
                "stage": "finetune",
                "mode": "aff",
                "init": str(args.init),
                "init_sha256": file_digest(args.init),
            }
        model = rt.prepare(Classifier(encoder, int(stats["num_classes"]), branch))
        f = cfg.finetune
        spec = TrainSpec.from_section(f, name="finetune", loss=f.loss, weight_decay=f.weight_decay, cfg=cfg)
        train_classifier(
            model,
            model,
            spec,
            cfg=cfg,
            rt=rt,
            data=args.data,
            train=(x, y),
            out=out,
            resume=args.resume,
            train_mode=True,
            desc=f"finetune {provenance['mode']}",
            provenance=provenance,
            dist=dist,
        )
    return 0
