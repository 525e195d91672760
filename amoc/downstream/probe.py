"""`amoc probe`: linear probing of a frozen pre-trained encoder (docs/downstream.md).

SLF: cross-entropy on clean images (weight decay `probe.weight_decay_slf`).
ALF: `probe.loss` (TRADES or PGD-AT, weight decay `probe.weight_decay`); the attacks
go through the whole frozen network. In both, the encoder stays in eval mode on its
adversarial BN branch (features from running statistics that never change) and only
the zero-initialised linear head trains.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from amoc.config import Config
from amoc.distributed import session
from amoc.downstream.trainer import TrainSpec, load_train_data, train_classifier
from amoc.io import RunLock, file_digest
from amoc.nets.classifier import Classifier
from amoc.nets.store import load_encoder_file
from amoc.runtime import setup


def encoder_branch(extra: dict) -> str:
    """The BN branch downstream models use: adv, unless the encoder file says clean."""
    return "clean" if extra.get("bn_branch") == "clean" else "adv"


def run(cfg: Config, args: argparse.Namespace) -> int:
    out = Path(args.out)
    with session(cfg.runtime.device) as dist, RunLock(out) if dist.main else contextlib.nullcontext():
        rt = setup(cfg.runtime, cfg.seed, dist, stage="probe")
        x, y, stats = load_train_data(args.data)  # fail on bad data before loading weights
        encoder, extra = load_encoder_file(args.encoder)
        model = rt.prepare(Classifier(encoder, int(stats["num_classes"]), encoder_branch(extra)))
        model.encoder.requires_grad_(False)
        model.eval()
        p = cfg.probe
        if args.mode == "slf":
            spec = TrainSpec.from_section(p, name="probe", loss="ce", weight_decay=p.weight_decay_slf, cfg=cfg)
        else:
            spec = TrainSpec.from_section(p, name="probe", loss=p.loss, weight_decay=p.weight_decay, cfg=cfg)
        provenance = {
            "stage": "probe",
            "mode": args.mode,
            "init": str(args.encoder),
            "init_sha256": file_digest(args.encoder),
        }
        train_classifier(
            model,
            model.head,
            spec,
            cfg=cfg,
            rt=rt,
            data=args.data,
            train=(x, y),
            out=out,
            resume=args.resume,
            train_mode=False,
            desc=f"probe {args.mode}",
            provenance=provenance,
            dist=dist,
        )
    return 0
