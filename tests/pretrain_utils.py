"""Helpers shared by tests/test_pretrain_*.py: tiny configs, models and prepared data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amoc import config as config_mod
from amoc.config import Config
from amoc.nets import DualBatchNorm2d
from amoc.pretrain.moco import MoCo, build_moco

ALL_VARIANTS = ("CCC", "CAC", "CAA", "ACC", "ACA", "ACA+", "AAC", "AAA")


def tiny_config(*overrides: str, **top: Any) -> Config:
    """A validated Config small enough for a CPU step in milliseconds; `overrides` are
    --set style 'key.sub=value' strings, `top` sets top-level keys."""
    raw: dict[str, Any] = {
        "variant": "ACA+",
        "queue_size": 40,
        "seed": 0,
        "model": {"width": 0.0625, "hidden_dim": 16, "feature_dim": 8},
        "pretrain": {
            "epochs": 2,
            "batch_size": 8,
            "warmup_epochs": 1,
            "checkpoint_every": 1,
            "knn_k": 5,
            "attack": {"steps": 2},
        },
        "runtime": {"device": "cpu", "progress": False, "threads": 1},
    }
    raw.update(top)
    return config_mod.from_dict(config_mod.apply_overrides(raw, list(overrides)))


def tiny_model(cfg: Config | None = None, seed: int = 0, distinct_bn: bool = False) -> MoCo:
    """A fresh model in train mode. `distinct_bn`: give the adv BN branch other affine
    parameters than the clean one (in both nets), so that outputs reveal the branch."""
    torch.manual_seed(seed)
    model = build_moco(cfg or tiny_config(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).train()
    if distinct_bn:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in model.query.modules():
                if isinstance(m, DualBatchNorm2d):
                    m.adv.weight.copy_(0.5 + torch.rand(m.adv.weight.shape, generator=g))
                    m.adv.bias.copy_(0.2 * torch.randn(m.adv.bias.shape, generator=g))
        model.key.load_state_dict(model.query.state_dict())
    return model


def views(batch: int = 8, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two smooth random 'views' in [0, 1] (B x 3 x size x size)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(2, batch, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low.flatten(0, 1), size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).view(2, batch, 3, size, size)
    return x[0].contiguous(), x[1].contiguous()


def write_prepared(
    folder: Path, n_train: int = 40, n_test: int = 20, size: int = 16, classes: int = 4, seed: int = 0
) -> Path:
    """A prepared folder in the data stage's format (train.npz, test.npz, stats.json)
    holding class-dependent coloured blobs, small enough for seconds-long runs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.uniform(40, 215, size=(classes, 3))
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % classes
        x = colours[y][:, :, None, None] + rng.normal(0, 25, size=(n, 3, size, size))
        np.savez(folder / f"{split}.npz", x=np.clip(x, 0, 255).astype(np.uint8), y=y.astype(np.int64))
    stats = {
        "name": "synthetic",
        "classes": [str(c) for c in range(classes)],
        "num_classes": classes,
        "image_shape": [3, size, size],
        "counts": {"train": n_train, "test": n_test},
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    (folder / "stats.json").write_text(json.dumps(stats))
    return folder


class BNRecorder:
    """Forward hooks on every dual BN's `clean` and `adv` layer of the query and key
    nets. `forwards()` folds the per-layer calls into one (net, branch, training)
    entry per network forward and checks that all layers of a forward agree."""

    def __init__(self, model: MoCo) -> None:
        self.events: list[tuple[str, str, bool]] = []
        self.handles = []
        self.layers = {}
        for net_name in ("query", "key"):
            net = getattr(model, net_name)
            duals = [m for m in net.modules() if isinstance(m, DualBatchNorm2d)]
            self.layers[net_name] = len(duals)
            for dual in duals:
                for branch in ("clean", "adv"):
                    bn = getattr(dual, branch)
                    self.handles.append(bn.register_forward_hook(self._hook(net_name, branch)))

    def _hook(self, net: str, branch: str):
        def hook(module, inputs, output):
            self.events.append((net, branch, module.training))

        return hook

    def forwards(self) -> list[tuple[str, str, bool]]:
        out, i = [], 0
        while i < len(self.events):
            net = self.events[i][0]
            chunk = self.events[i : i + self.layers[net]]
            assert len(set(chunk)) == 1, f"one forward mixed BN branches or networks: {sorted(set(chunk))}"
            out.append(chunk[0])
            i += len(chunk)
        self.events.clear()
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
