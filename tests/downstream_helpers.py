"""Helpers shared by tests/test_downstream_*.py: a small prepared data set written by
hand (no download stage), random encoders, params files, and one briefly
adversarially trained classifier that several tests reuse (built once per session)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amoc import cli
from amoc.nets import build_encoder
from amoc.nets.store import save_encoder

NUM_CLASSES = 4  # >= 4: AutoAttack's targeted DLR loss needs the 4th-largest logit
SIZE = 16  # 16 x 16 images: 4x cheaper than CIFAR's 32 x 32, same network
WIDTH = 0.0625


def make_prepared(
    folder: Path,
    n_train: int = 256,
    n_test: int = 128,
    seed: int = 0,
    size: int = SIZE,
    signal: float = 0.12,
    noise: float = 0.3,
) -> Path:
    """A learnable `amoc download`-style folder. Class c in 0..2 brightens channel c, class 3
    darkens all three, by `signal` (a fraction of 255) under per-pixel Gaussian `noise`:
    invariant to crop and flip, and a signal a few eps large, so PGD accuracy lies
    between 0 and the clean accuracy."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shift = np.full((NUM_CLASSES, 3), 0.0)
    for c in range(3):
        shift[c, c] = signal
    shift[3] = -signal
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
        x = rng.normal(0.5, noise, (n, 3, size, size)) + shift[y][:, :, None, None]
        np.savez(folder / f"{split}.npz", x=np.clip(np.rint(x * 255), 0, 255).astype(np.uint8), y=y)
    xs = np.load(folder / "train.npz")["x"].astype(np.float64) / 255
    stats = {
        "classes": [f"c{i}" for i in range(NUM_CLASSES)],
        "num_classes": NUM_CLASSES,
        "mean": xs.mean(axis=(0, 2, 3)).tolist(),
        "std": xs.std(axis=(0, 2, 3)).tolist(),
    }
    (folder / "stats.json").write_text(json.dumps(stats))
    return folder


def random_encoder(path: Path, seed: int = 0, width: float = WIDTH, extra: dict[str, Any] | None = None) -> Path:
    torch.manual_seed(seed)
    save_encoder(
        path,
        build_encoder(width=width, mean=(0.5, 0.5, 0.5), std=(0.35, 0.35, 0.35)),
        extra={"bn_branch": "adv"} if extra is None else extra,
    )
    return path


TINY = {
    "seed": 0,
    "model.width": WIDTH,
    "runtime.device": "cpu",
    "runtime.progress": False,
    "runtime.threads": 1,
    "probe.epochs": 2,
    "probe.milestones": [1],
    "probe.batch_size": 64,
    "probe.attack.steps": 2,
    "finetune.epochs": 1,
    "finetune.milestones": [],
    "finetune.batch_size": 64,
    "finetune.attack.steps": 2,
    "evaluate.n_images": 64,
    "evaluate.batch_size": 64,
    "evaluate.autoattack": False,
    "evaluate.pgd.steps": 3,
    "evaluate.curve_eps": [0, 4, 8],
}


REPO = Path(__file__).resolve().parents[1]


def params_file(folder: Path) -> Path:
    """The repo's params.yaml with the tiny preset applied, as a full params file."""
    path = folder / "params.yaml"
    if not path.exists():
        assert cli.main(["params", "--params", str(REPO / "params.yaml"), "--preset", "tiny", "--out", str(path)]) == 0
    return path


def run_stage(stage: str, params: Path, *args: str, **overrides: Any) -> int:
    """Run `amoc STAGE` in-process with TINY overrides (plus `overrides`, dots as '__')."""
    sets = {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
    argv = [stage, "--params", str(params)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return cli.main(argv + list(args))


_CACHE: dict[str, Any] = {}


def robust_classifier(tmp_path_factory) -> tuple[Path, Path]:
    """(classifier.pt, data folder): a tiny network trained from scratch with PGD-AT for a
    few epochs on the synthetic data, so that PGD accuracy lies strictly between 0 and clean.
    Built once per test session."""
    if "robust" not in _CACHE:
        root = tmp_path_factory.mktemp("robust")
        data = make_prepared(root / "data", n_train=1024, n_test=512, seed=1)
        params = params_file(root)
        out = root / "scratch"
        assert (
            run_stage(
                "finetune",
                params,
                "--init",
                "scratch",
                "--data",
                str(data),
                "--out",
                str(out),
                **{
                    "finetune.epochs": 6,
                    "finetune.milestones": [4],
                    "finetune.loss": "pgd_at",
                    "finetune.lr": 0.1,  # at 0.05 the authors' init left PGD within 3 points of clean
                    "finetune.attack.steps": 3,
                },
            )
            == 0
        )
        _CACHE["robust"] = (out / "classifier.pt", data)
    return _CACHE["robust"]
