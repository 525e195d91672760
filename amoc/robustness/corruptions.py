"""`amoc corruptions`: the corrupted test set, in the CIFAR-10-C layout (amoc/data/corrupted.py).

- corruptions.source=generate: the first corruptions.n_images images of the prepared
  test split (--data), corrupted by amoc.robustness.corrupt with every name and
  severity, deterministic in `seed`. It is labelled "generated-approximation" and must
  never be reported as the official CIFAR-10-C (frost is procedural, random draws differ).
- official (CIFAR-10-C or CIFAR-100-C by data.name), or a URL / path of a *-C .tar with
  its md5/sha256: downloaded with resume, verified, read safely, and the first
  n_images of each severity kept.

All or nothing: our previous outputs are removed first, each file is written
atomically, source.json last; if anything fails, none of them remains.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from amoc.config import Config
from amoc.data import corrupted as layout
from amoc.data.prepared import load_split, load_stats
from amoc.errors import ConfigError, DataError
from amoc.io import stage_outputs
from amoc.robustness import official
from amoc.robustness.corrupt import APPROXIMATIONS, corrupt, severity_rng
from amoc.version import __version__

CHUNK = 1000  # images per random stream; fixed, so the output depends only on the seed
GENERATED_NOTE = (
    "Generated offline by amoc from the prepared test split with the published CIFAR-10-C corruption "
    "definitions and parameters. frost uses a procedural texture instead of the original photographs, "
    "and every random draw differs from the official files: an approximation - never report it as "
    "official CIFAR-10-C / CIFAR-100-C."
)


def generate(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt N x H x W x 3 uint8 images, one random stream per chunk of CHUNK images."""
    parts = [
        corrupt(images[i : i + CHUNK], name, severity, severity_rng(seed, name, severity, i // CHUNK))
        for i in range(0, len(images), CHUNK)
    ]
    return np.concatenate(parts) if parts else images[:0].copy()


def run(cfg: Config, args: Any) -> int:
    start = time.perf_counter()
    c = cfg.corruptions
    names, severities = _unique("names", c.names), _unique("severities", c.severities)
    out = Path(args.out)
    archive = None if c.source.strip() == "generate" else official.resolve(cfg)  # before any I/O
    if archive is None:
        x, y = load_split(args.data, "test")
        stats = load_stats(args.data)
    with stage_outputs(out, layout.OUTPUTS):
        if archive is None:
            info = _generate_set(
                out, x.numpy(), y.numpy(), stats, names, severities, c.n_images, cfg.seed, cfg.runtime.progress
            )
        else:
            info = _official_set(
                out, archive, names, severities, c.n_images, cfg.data.max_member_mb * 2**20, cfg.runtime.progress
            )
        info.update(
            seed=cfg.seed,
            names=names,
            severities=severities,
            amoc_version=__version__,
            layout="<name>.npy: uint8 (S*N) x H x W x 3, severity blocks in `severities` order; "
            "labels.npy: the S*N labels",
        )
        layout.write_source(out, info)
    print(
        f"amoc corruptions: {info['kind']}: {len(names)} corruptions x {len(severities)} severities x "
        f"{info['n_images']:,} images -> {out} ({time.perf_counter() - start:.1f} s)"
    )
    return 0


def _generate_set(
    out: Path,
    x: np.ndarray,
    y: np.ndarray,
    stats: dict[str, Any],
    names: list[str],
    severities: list[int],
    n_images: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    n = min(n_images or len(x), len(x))
    if n == 0:
        raise DataError("the prepared test split is empty; nothing to corrupt")
    x, y = x[:n], y[:n]  # N x 3 x H x W, as in test.npz
    clean_sha256 = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
    images = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    with tqdm(total=len(names) * len(severities), desc="corruptions", disable=not progress, leave=False) as bar:
        for name in names:
            blocks = []
            for severity in severities:
                blocks.append(generate(images, name, severity, seed))
                bar.update(1)
            layout.write_array(out, name, np.concatenate(blocks))
    layout.write_labels(out, np.tile(y, len(severities)))
    return {
        "kind": "generated-approximation",
        "dataset": f"{stats.get('name', '?')} test split, corrupted by amoc (CIFAR-10-C definitions)",
        "note": GENERATED_NOTE,
        "approximations": dict(APPROXIMATIONS),
        "n_images": n,
        "image_shape": list(images.shape[1:]),
        "data": {k: stats.get(k) for k in ("name", "source", "checksum")},
        "clean_sha256": clean_sha256,
        "generator": "amoc.robustness.corrupt",
    }


def _official_set(
    out: Path,
    archive: official.Archive,
    names: list[str],
    severities: list[int],
    n_images: int,
    max_bytes: int,
    progress: bool,
) -> dict[str, Any]:
    path, digests = official.fetch(archive, progress)
    kind = "official" if archive.official_md5 and digests["md5"] == archive.official_md5 else "custom-archive"
    shapes: list[tuple[int, ...]] = []

    def keep(name: str, array: np.ndarray) -> None:
        shapes.append(array.shape[1:])
        layout.write_array(out, name, array)

    labels, n = official.read(path, names, severities, n_images, max_bytes, keep)
    layout.write_labels(out, labels)
    dataset = archive.dataset if kind == "official" else "user-supplied *-C archive"
    note = (
        f"The official {archive.dataset} (Hendrycks & Dietterich 2019): the first {n} test images of each severity."
        if kind == "official"
        else "A user-supplied *-C archive whose md5 is not the official one: report it under its own name."
    )
    return {
        "kind": kind,
        "dataset": dataset,
        "note": note,
        "n_images": n,
        "image_shape": list(shapes[0]),
        "source": archive.text,
        "checksum": {a: d for a, d in digests.items()},
    }


def _unique(key: str, values: list[Any]) -> list[Any]:
    if not values:
        raise ConfigError(f"corruptions.{key}: empty; list at least one")
    dupes = sorted({v for v in values if values.count(v) > 1}, key=str)
    if dupes:
        raise ConfigError(f"corruptions.{key}: {', '.join(map(str, dupes))} listed twice; list each once")
    return list(values)
