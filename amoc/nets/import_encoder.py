"""Released encoders of other code bases -> amoc's encoder (amoc/nets/store.py format).

Each layout was read from the official code at the commit recorded here (and in the
imported file's `extra.source`):

- ``authors``: MTandHJ/amoc (AMOC's authors). ``models/resnet.py``: the CIFAR ResNet-18
  with ``TriggerBN2d`` (``bn_clean`` / ``bn_adv``), shortcut ``downsample.0`` (conv) /
  ``downsample.1`` (BN), no ``fc``; ``src/base.py`` saves ``encoder_q.state_dict()`` as
  ``paras.pt``, ``src/utils.py`` the whole MoCo (``encoder_q.``, ``encoder_k.``,
  ``projector_q.``, ``projector_k.``, the queues) under ``model``. Inputs are normalised
  outside the network with ``src/config.py``'s CIFAR-10 (CIFAR-100) mean and std.
- ``acl``: VITA-Group/Adversarial-Contrastive-Learning. ``models/resnet_multi_bn.py``:
  ``batch_norm_multiple`` with ``bn_list.0`` (bn name ``normal``) and ``bn_list.1``
  (``pgd``), shortcut ``downsample.conv`` / ``downsample.bn``, the projector
  ``proj_head`` as ``fc``, ``normalize.mean`` / ``normalize.std`` (ImageNet's) inside the
  model; ``train_simCLR.py`` saves ``{'epoch', 'state_dict', 'optim'}``;
  ``train_trades.py --bnNameCnt 1`` fine-tunes the ``pgd`` (adversarial) branch.
- ``dynacl``: PKU-ML/DYNACL. ACL's ResNet (the same module, same keys) twice in
  ``resnet18_momentum`` (``encoder_q.``, ``encoder_k.``; the EMA key encoder is the one
  DynACL evaluates); ``train_DynACL.py`` saves ``encoder_k.state_dict()`` as
  ``model_encoder_k.pt`` and the whole model as ``model.pt``.

The conversion is strict: every tensor of amoc's encoder is filled from the file with
its shape checked, and a missing, unexpected or misshapen key is one error naming them.
Only the parts the layout names are dropped (projector, key encoder, queues).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from amoc.errors import CheckpointError
from amoc.io import file_digest, refused_global
from amoc.nets.dual_bn import Branch
from amoc.nets.resnet import Encoder, build_encoder

CIFAR_MEAN_STD = {  # the authors' src/config.py (normalisation outside their network)
    "cifar10": ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2617)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
BASE_CHANNELS = 64  # conv1's output channels at width 1.0


@dataclass(frozen=True)
class Layout:
    name: str
    method: str  # what `extra.method` / summary.json record
    repo: str
    commit: str
    branches: dict[str, str]  # amoc's branch -> the file's BN child name
    shortcut: tuple[str, str]  # the file's names of amoc's shortcut.0 (conv) and shortcut.1 (BN)
    parts: tuple[tuple[str, str], ...]  # (key prefix, what it is); the first present is imported ("" = flat)
    siblings: tuple[str, ...]  # other modules beside a prefixed part: dropped
    heads: tuple[str, ...]  # inside the part, dropped (the projector)
    normalize_in_file: bool  # mean/std stored as normalize.mean / normalize.std
    downstream: str  # which branch the layout's own fine-tuning uses, for the message

    @property
    def source(self) -> str:
        return f"{self.repo}@{self.commit}"


LAYOUTS: dict[str, Layout] = {
    "authors": Layout(
        name="authors",
        method="amoc",
        repo="MTandHJ/amoc",
        commit="cdeefda8bf64babb1aca66b6ab4886e5c7b414fe",
        branches={"clean": "bn_clean", "adv": "bn_adv"},
        shortcut=("downsample.0", "downsample.1"),
        parts=(
            ("encoder_q.", "the query encoder of the MoCo state dict"),
            ("", "encoder_q.state_dict() (paras.pt)"),
        ),
        siblings=(
            "encoder_k.",
            "projector_q.",
            "projector_k.",
            "queue_clean",
            "queue_clean_ptr",
            "queue_adv",
            "queue_adv_ptr",
        ),
        heads=(),
        normalize_in_file=False,
        downstream="bn_adv (their scripts' default; --bn_adv switches CCC/CAC/CAA models to bn_clean)",
    ),
    "acl": Layout(
        name="acl",
        method="acl",
        repo="VITA-Group/Adversarial-Contrastive-Learning",
        commit="399eabd36c7b5708752681774d755bf5242d5eda",
        branches={"clean": "bn_list.0", "adv": "bn_list.1"},
        shortcut=("downsample.conv", "downsample.bn"),
        parts=(("", "model.state_dict() (ResNet-18 + proj_head as fc)"),),
        siblings=(),
        heads=("fc.",),
        normalize_in_file=True,
        downstream="bn_list.1 (train_trades.py --bnNameCnt 1)",
    ),
    "dynacl": Layout(
        name="dynacl",
        method="dynacl",
        repo="PKU-ML/DYNACL",
        commit="7d143db7f63e699a533df8e262bcf6ed02abe805",
        branches={"clean": "bn_list.0", "adv": "bn_list.1"},
        shortcut=("downsample.conv", "downsample.bn"),
        parts=(
            ("encoder_k.", "the EMA key encoder of resnet18_momentum (model.pt)"),
            ("", "encoder_k.state_dict() (model_encoder_k.pt)"),
        ),
        siblings=("encoder_q.",),
        heads=("fc.",),
        normalize_in_file=True,
        downstream="bn_list.1 (test_LF.py --bnNameCnt 1)",
    ),
}


@dataclass
class Imported:
    encoder: Encoder
    extra: dict[str, Any]  # what encoder.pt records (bn_branch, method, source)
    report: str  # one paragraph for the terminal: what was read, mapped and dropped


def read_checkpoint(path: Path) -> Any:
    """The file's content, loaded with weights_only=True (tensors and plain data only)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; give the path of the downloaded checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a pickle at all
            html = path.read_bytes()[:512].lstrip().lower().startswith((b"<!doctype", b"<html"))
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ("
                + (
                    "an HTML page: Google Drive serves one for large files; download the file itself"
                    if html
                    else "not a pickle or zip archive; check the download (size, sha256)"
                )
                + ")"
            ) from None
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects beyond tensors and plain data "
            f"({refused_global(exc)[:100]}); "
            "load it in the code that wrote it and save model.state_dict() alone"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}); check the download "
            "(size, sha256) and that it is the .pt/.pth file itself"
        ) from None


def state_dict_of(blob: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(the state dict, where it was): a bare state dict, or the one under 'state_dict'
    (ACL, DynACL) or 'model' (the authors' training checkpoint); a 'module.' prefix of
    DataParallel is removed."""
    where = "the file"
    if isinstance(blob, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(blob.get(key), Mapping):
                blob, where = blob[key], f"the file's {key!r}"
                break
    if not isinstance(blob, Mapping) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        kind = type(blob).__name__ if not isinstance(blob, Mapping) else "a mapping that is not a state dict"
        raise CheckpointError(
            f"{path}: holds {kind}, not a state dict (names -> tensors) nor a checkpoint with one under "
            "'state_dict' or 'model'; give the released encoder file"
        )
    state = {str(k): v for k, v in blob.items()}
    if all(k.startswith("module.") for k in state):
        state, where = {k[len("module.") :]: v for k, v in state.items()}, f"{where} (DataParallel 'module.' removed)"
    return state, where


def source_key(key: str, layout: Layout) -> str:
    """amoc's key -> the layout's: shortcut.0/1 -> the layout's shortcut names, a dual BN's
    clean/adv child -> the layout's BN child."""
    parts = key.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        token = parts[i]
        if token == "shortcut" and i + 1 < len(parts) and parts[i + 1] in ("0", "1"):
            out.append(layout.shortcut[int(parts[i + 1])])
            i += 2
            continue
        out.append(layout.branches.get(token, token))
        i += 1
    return ".".join(out)


def _short(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _group(names: list[str]) -> dict[str, int]:
    """Dropped tensors counted by module."""
    groups: dict[str, int] = {}
    for name in names:
        groups[name] = groups.get(name, 0) + 1
    return groups


def looks_like(keys: list[str]) -> str | None:
    """Which layout a state dict's keys suggest (None: none of them)."""
    if any(".bn_clean." in k or ".bn_adv." in k for k in keys):
        return "authors"
    if any(".bn_list." in k for k in keys):
        return "dynacl" if any(k.startswith("encoder_k.") for k in keys) else "acl"
    if any(".clean." in k or ".adv." in k for k in keys):
        return "amoc"
    return None


def _hint(state: Mapping[str, torch.Tensor], layout: Layout) -> str:
    """What the file looks like when it is not the layout asked for."""
    keys = list(state)
    if any(k.startswith("arch.") for k in keys) and any(k.startswith("fc.fc.") for k in keys):
        return "; it looks like the authors' fine-tuned classifier (arch.*, fc.fc.*), not their pre-trained encoder"
    guess = looks_like(keys)
    if guess == "amoc":
        return "; its BN keys look like amoc's own encoder (amoc probe/finetune read it as it is)"
    if guess is not None and guess != layout.name and not (layout.name == "dynacl" and guess == "acl"):
        return f"; it looks like --from {guess}"
    return ""


def convert(
    state: Mapping[str, torch.Tensor],
    layout_name: str,
    *,
    path: Path,
    dataset: str = "cifar10",
) -> tuple[Encoder, dict[str, Any]]:
    """amoc's Encoder filled from a state dict of `layout_name`, and what was done
    (the part imported, the dropped key counts, the normalisation)."""
    layout = LAYOUTS[layout_name]
    state = dict(state)
    prefix, part = next(((p, d) for p, d in layout.parts if p and any(k.startswith(p) for k in state)), ("", ""))
    if not prefix:
        part = next(d for p, d in layout.parts if not p)
    dropped: list[str] = []
    body: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if prefix and not key.startswith(prefix):
            if any(key == s or key.startswith(s if s.endswith(".") else s + ".") for s in layout.siblings):
                dropped.append(key.split(".")[0])
            else:
                body[key] = value  # unexpected: reported below
            continue
        inner = key[len(prefix) :]
        head = next((h for h in layout.heads if inner.startswith(h)), None)
        if head is not None:
            dropped.append(prefix + head.rstrip("."))
        else:
            body[inner if prefix else key] = value

    conv1 = body.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4 or tuple(conv1.shape[1:]) != (3, 3, 3):
        shape = None if conv1 is None else tuple(conv1.shape)
        raise CheckpointError(
            f"{path}: no CIFAR ResNet-18 stem in {part or 'the file'} (conv1.weight "
            f"{'missing' if shape is None else f'has shape {shape}'}, expected C x 3 x 3 x 3; "
            f"{len(body)} keys such as {_short(sorted(body), 3)}){_hint(state, layout)}; "
            f"check --from (authors, acl, dynacl)"
        )
    width = conv1.shape[0] / BASE_CHANNELS
    if layout.normalize_in_file:
        mean_std = None
    else:
        mean_std = CIFAR_MEAN_STD[dataset]
    encoder = build_encoder("resnet18", width, *(mean_std or ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))))
    target = encoder.state_dict()

    filled: dict[str, torch.Tensor] = {}
    missing, wrong = [], []
    used: set[str] = set()
    for key, like in target.items():
        if key.startswith("normalize."):
            if not layout.normalize_in_file:
                filled[key] = like  # the layout normalises outside its network: build_encoder set it
                continue
            src = key
            value = body.get(src)
            if value is not None and value.numel() == 3:
                value = value.reshape(like.shape)
        else:
            src = source_key(key, layout)
            value = body.get(src)
        if value is None:
            missing.append(src)
            continue
        used.add(src)
        if tuple(value.shape) != tuple(like.shape):
            wrong.append(f"{src} {tuple(value.shape)} != {tuple(like.shape)}")
            continue
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            wrong.append(f"{src} holds NaN/inf")
            continue
        filled[key] = value.to(like.dtype)
    unexpected = sorted(k for k in body if k not in used)
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({_short(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({_short(unexpected)})")
        if wrong:
            problems.append(f"{len(wrong)} wrong ({_short(wrong, 3)})")
        raise CheckpointError(
            f"{path}: does not match the {layout.name} layout ({layout.repo}, {part}, width {width:g}): "
            f"{'; '.join(problems)} keys{_hint(state, layout)}; check --from (authors, acl, dynacl) and that the "
            "file is the released pre-trained encoder"
        )
    encoder.load_state_dict(filled, strict=True)
    mean = encoder.normalize.mean.flatten().tolist()
    std = encoder.normalize.std.flatten().tolist()
    info = {
        "part": part,
        "width": width,
        "tensors": len(filled),
        "dropped": _group(dropped),
        "normalization": {
            "mean": mean,
            "std": std,
            "from": "the file's normalize.mean / normalize.std"
            if layout.normalize_in_file
            else f"the authors' src/config.py {dataset} mean/std (they normalise outside the network)",
        },
        "bn_mapping": {f"{layout.branches['clean']}": "clean", f"{layout.branches['adv']}": "adv"},
    }
    return encoder, info


def import_encoder(
    path: str | os.PathLike,
    layout_name: str,
    *,
    bn_branch: Branch = "adv",
    dataset: str = "cifar10",
    sha256: str | None = None,
) -> Imported:
    """Read a released checkpoint of `layout_name` into amoc's encoder. `sha256`: the
    file's expected digest (checked before reading), or None."""
    if layout_name not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout_name!r}; choose one of {', '.join(LAYOUTS)}")
    if dataset not in CIFAR_MEAN_STD:
        raise CheckpointError(f"unknown dataset {dataset!r} for the authors' normalisation; choose cifar10 or cifar100")
    path = Path(path)
    layout = LAYOUTS[layout_name]
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; give the path of the downloaded {layout.name} checkpoint")
    digest = file_digest(path)
    if sha256 is not None and digest != sha256.lower():
        raise CheckpointError(
            f"{path}: sha256 {digest} does not match the expected {sha256}; set the new digest if the file "
            "was replaced on purpose"
        )
    state, where = state_dict_of(read_checkpoint(path), path)
    encoder, info = convert(state, layout_name, path=path, dataset=dataset)
    mapping = info["bn_mapping"]
    source = {
        "import": True,
        "file": str(path),
        "sha256": digest,
        "layout": layout.name,
        "code": layout.repo,
        "commit": layout.commit,
        "container": where,
        **info,
    }
    extra = {"bn_branch": bn_branch, "method": layout.method, "epochs": None, "source": source}
    dropped = ", ".join(f"{k} ({n})" for k, n in info["dropped"].items()) or "nothing"
    report = (
        f"{path} ({layout.name} layout, {layout.source}): {where}, {info['part']}; width {info['width']:g}, "
        f"{info['tensors']} tensors filled, shapes checked; dropped {dropped}. "
        f"BN: {', '.join(f'{k} -> {v}' for k, v in mapping.items())}; downstream stages use the {bn_branch} "
        f"branch ({layout.repo}'s own fine-tuning uses {layout.downstream}). "
        f"Normalisation inside the encoder: mean {[round(m, 4) for m in info['normalization']['mean']]}, "
        f"std {[round(s, 4) for s in info['normalization']['std']]} ({info['normalization']['from']}). "
        f"sha256 {digest}"
    )
    return Imported(encoder, extra, report)
