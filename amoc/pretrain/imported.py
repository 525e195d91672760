"""Released encoders as the pipeline's pre-trained encoder (docs/import.md).

`amoc import-encoder --from {authors,acl,dynacl} FILE --out ENCODER` converts one file
(amoc.nets.import_encoder). `amoc pretrain` with `pretrain.from_encoder.path` set does
the same conversion instead of training and writes every output of the stage, so the
DAG runs SLF, ALF, AFF and the evaluation on the imported encoder:

    dvc exp run -S pretrain.from_encoder.path=imports/paras.pt \\
        -S pretrain.from_encoder.layout=authors -S pretrain.from_encoder.sha256=<digest>

The sha256 is a param of the stage: DVC re-runs it (and everything after) when the
digest changes, and the stage refuses a file whose digest differs from the param.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from amoc.config import Config
from amoc.data.prepared import load_split, load_stats
from amoc.errors import ConfigError
from amoc.io import RunLock, file_digest, write_json, write_text
from amoc.nets.import_encoder import LAYOUTS, import_encoder
from amoc.nets.resnet import build_encoder
from amoc.nets.store import save_encoder
from amoc.pretrain.knn import knn_accuracy
from amoc.pretrain.log import COLUMNS
from amoc.runtime import setup

OUTPUTS = ("encoder.pt", "metrics.json", "summary.json", "log.csv")


def run(cfg: Config, args: argparse.Namespace) -> int:
    """`amoc import-encoder`: one file converted into amoc's encoder format."""
    imp = import_encoder(args.file, args.layout, bn_branch=args.bn_branch, dataset=args.dataset, sha256=args.sha256)
    save_encoder(args.out, imp.encoder, extra=imp.extra)
    digest = imp.extra["source"]["sha256"]
    print(f"amoc import-encoder: {imp.report}")
    sets = [f"path={args.file}", f"layout={args.layout}", f"sha256={digest}"]
    if args.bn_branch != "adv":
        sets.append(f"bn_branch={args.bn_branch}")
    print(
        f"amoc import-encoder: wrote {args.out}. In the pipeline (docs/import.md): dvc exp run "
        + " ".join(f"-S pretrain.from_encoder.{s}" for s in sets)
    )
    return 0


def pretrain_from_file(cfg: Config, data: Path, out: Path) -> dict[str, Any]:
    """`amoc pretrain` with pretrain.from_encoder.path: import instead of training, then
    the stage's k-NN monitor (the imported and a random-init encoder of the same width)
    and its outputs (an empty log.csv: no epoch ran)."""
    fe = cfg.pretrain.from_encoder
    start = time.perf_counter()
    path = Path(fe.path)
    if not fe.sha256:  # config validation requires it; a direct caller may not have validated
        raise ConfigError("pretrain.from_encoder.sha256: required with pretrain.from_encoder.path")
    stats = load_stats(data)
    dataset = stats.get("name") if stats.get("name") in ("cifar10", "cifar100") else "cifar10"
    digest = file_digest(path) if path.is_file() else None
    if digest is not None and digest != fe.sha256.lower():
        raise ConfigError(
            f"pretrain.from_encoder.sha256: {fe.sha256} does not match {path} (sha256 {digest}); "
            "set the file's digest if it was replaced on purpose"
        )
    imp = import_encoder(path, fe.layout, bn_branch=fe.bn_branch, dataset=dataset, sha256=fe.sha256)
    print(
        "amoc pretrain: importing instead of training (pretrain.from_encoder.path is set): "
        "pretrain.method and the training settings are not used",
        flush=True,
    )
    print(f"amoc pretrain: {imp.report}", flush=True)
    rt = setup(cfg.runtime, cfg.seed, stage="pretrain", evaluation=True)
    train_x, train_y = load_split(data, "train")
    test_x, test_y = load_split(data, "test")
    train, test = (train_x.to(rt.device), train_y.to(rt.device)), (test_x.to(rt.device), test_y.to(rt.device))
    num_classes = stats.get("num_classes")
    encoder = rt.prepare(imp.encoder)
    knn = knn_accuracy(encoder, train, test, k=cfg.pretrain.knn_k, branch=fe.bn_branch, rt=rt, num_classes=num_classes)
    norm = imp.extra["source"]["normalization"]
    torch.manual_seed(cfg.seed)
    random = rt.prepare(build_encoder("resnet18", imp.extra["source"]["width"], norm["mean"], norm["std"]))
    knn_random = knn_accuracy(
        random, train, test, k=cfg.pretrain.knn_k, branch=fe.bn_branch, rt=rt, num_classes=num_classes
    )
    layout = LAYOUTS[fe.layout]
    metrics = {"knn_acc": knn, "knn_random_acc": knn_random, "loss": None}
    seconds = time.perf_counter() - start
    summary = {
        "method": layout.method,
        "variant": None,
        "queue_size": None,
        "queue_size_adv": None,
        "epochs": 0,
        **metrics,
        "knn_bn_branch": fe.bn_branch,
        "loss_clean": None,
        "loss_adv": None,
        "chance_loss": None,
        "chance_label": "n/a (imported)",
        "log_k_plus_1": None,
        "seconds": seconds,
        "images_per_s": None,
        "imported": imp.extra["source"],
    }
    extra = {**imp.extra, "epochs": 0, "seed": cfg.seed, "knn_acc": knn}
    with RunLock(out):
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)  # the stage's persist out; nothing to resume
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        write_text(out / "log.csv", ",".join(COLUMNS) + "\n")
        save_encoder(out / "encoder.pt", imp.encoder, extra=extra)
        write_json(out / "summary.json", summary)
        write_json(out / "metrics.json", metrics)  # last: the headline marks a complete run
    print(
        f"amoc pretrain: imported {layout.method} encoder ({fe.layout} layout), k-NN accuracy {knn:.4f} "
        f"(random-init encoder {knn_random:.4f}; {fe.bn_branch} BN) -> {out} ({seconds:.1f} s)"
    )
    return summary
