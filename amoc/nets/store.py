"""On-disk format of a pre-trained encoder (what `amoc pretrain` writes and the
downstream stages read): plain data and tensors only, loadable with weights_only."""

from __future__ import annotations

import os
from typing import Any

from amoc.errors import CheckpointError
from amoc.io import remake_hint, torch_load, torch_save
from amoc.nets.resnet import Encoder, build_encoder

ENCODER_FORMAT = "amoc-encoder/1"


def encoder_meta(encoder: Encoder, arch: str = "resnet18") -> dict[str, Any]:
    return {
        "arch": arch,
        "width": float(encoder.width),
        "mean": encoder.normalize.mean.flatten().tolist(),
        "std": encoder.normalize.std.flatten().tolist(),
    }


def save_encoder(path: str | os.PathLike, encoder: Encoder, extra: dict[str, Any] | None = None) -> None:
    """Both BN branches are saved; downstream stages pick the adversarial one."""
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    torch_save(
        path, {"format": ENCODER_FORMAT, "meta": encoder_meta(encoder), "state_dict": state, "extra": extra or {}}
    )


def load_encoder(path: str | os.PathLike) -> Encoder:
    return load_encoder_file(path)[0]


def load_encoder_file(path: str | os.PathLike) -> tuple[Encoder, dict[str, Any]]:
    """The encoder and the file's `extra` dict (e.g. {"bn_branch": "adv"})."""
    blob = torch_load(path)
    if not isinstance(blob, dict) or blob.get("format") != ENCODER_FORMAT:
        raise CheckpointError(
            f"{path}: not an amoc encoder file (format "
            f"{blob.get('format') if isinstance(blob, dict) else type(blob).__name__!r}, expected {ENCODER_FORMAT}); "
            f"{remake_hint(path)}"
        )
    meta = blob["meta"]
    encoder = build_encoder(meta["arch"], meta["width"], meta["mean"], meta["std"])
    try:
        encoder.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: encoder weights do not match its recorded shape ({str(exc).splitlines()[0]}); {remake_hint(path)}"
        ) from None
    extra = blob.get("extra") or {}
    return encoder, dict(extra) if isinstance(extra, dict) else {}
