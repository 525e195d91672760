"""`amoc transfer` (issue #10): the matrix diagonal is white-box PGD with the same settings
and seed, and a target whose gradients are masked is flagged. Real images: the embedded
digits (never skipped); ridge-regression pixel classifiers give real, non-trivial accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch import nn

from amoc import cli
from amoc.attacks.pgd import pgd_linf
from amoc.data.prepared import load_split
from amoc.report import robustness as plots
from amoc.robustness import transfer
from amoc.robustness.transfer import masking_flags

QUIET = ["--params", str(REPO / "params.yaml"), "--set", "runtime.progress=false", "--set", "runtime.device=cpu"]
QUIET += ["--set", "model.width=0.125"]  # the classifiers' width below; stages refuse one of another width


class Ridge(nn.Module):
    """Least-squares linear classifier on raw pixels (images in [0, 1] -> logits)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, lam: float) -> None:
        super().__init__()
        feats = x.flatten(1).double() / 255
        mu = feats.mean(0)
        targets = F.one_hot(y, 10).double()
        centred = feats - mu  # dual form: N x N instead of 3072 x 3072
        gram = centred @ centred.T + lam * torch.eye(len(feats), dtype=torch.double)
        w = centred.T @ torch.linalg.solve(gram, targets - targets.mean(0))
        self.w = nn.Parameter(w.float())
        self.b = nn.Parameter((targets.mean(0) - mu @ w).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w + self.b


class Masked(nn.Module):
    """The same function read through an 8-bit quantiser: torch.round has zero gradient,
    so white-box PGD gets no signal (classic gradient masking), transfer still works."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(torch.round(x * 255) / 255)


@pytest.fixture(scope="module")
def runs(digits_dir, tmp_path_factory) -> tuple[Path, dict[str, nn.Module]]:
    x, y = load_split(digits_dir, "train")
    ridge_a, ridge_b = Ridge(x, y, 10.0), Ridge(x[1::2], y[1::2], 10.0)
    models = {"ridge_a": ridge_a, "ridge_b": ridge_b, "masked": Masked(ridge_a)}
    root = tmp_path_factory.mktemp("runs")
    for name in models:
        (root / name).mkdir()
        (root / name / "classifier.pt").write_bytes(b"stand-in: transfer.read_checked is patched")
    return root, {k: m.eval() for k, m in models.items()}


def _run_transfer(
    runs_root: Path,
    models: dict[str, nn.Module],
    digits_dir: Path,
    out: Path,
    monkeypatch,
    sources: str,
    targets: list[str],
    *extra: str,
) -> dict:
    monkeypatch.setattr(transfer, "read_checked", lambda path, cfg, data: (models[Path(path).parent.name], {}))
    assert (
        cli.main(
            [
                "transfer",
                *QUIET,
                "--set",
                f"transfer.sources={sources}",
                "--set",
                "transfer.n_images=60",
                "--set",
                "transfer.attack.steps=10",
                "--set",
                "transfer.attack.eps=32/255",
                "--set",
                "evaluate.batch_size=25",
                *extra,
                "--runs",
                str(runs_root),
                "--models",
                *targets,
                "--data",
                str(digits_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return json.loads((out / "transfer.json").read_text())


def _whitebox(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, seed: int, bs: int) -> float:
    """White-box PGD written out directly: same settings, seed and batches as the stage;
    an image counts when it is correct both clean and attacked (as in `amoc evaluate`)."""
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for xb, yb in zip(torch.split(x.float() / 255, bs), torch.split(y, bs)):
        adv = pgd_linf(
            xb,
            lambda z, yb=yb: F.cross_entropy(model(z), yb, reduction="sum"),
            eps=eps,
            step_size=eps / 4,
            steps=steps,
            random_start=True,
            generator=generator,
        )
        with torch.no_grad():
            correct += int(((model(adv).argmax(1) == yb) & (model(xb).argmax(1) == yb)).sum())
    return round(100.0 * correct / len(x), 2)


def test_diagonal_is_whitebox_pgd(runs, digits_dir, tmp_path, monkeypatch):
    root, models = runs
    report = _run_transfer(root, models, digits_dir, tmp_path / "t", monkeypatch, "[ridge_a]", ["ridge_a", "ridge_b"])
    x, y = load_split(digits_dir, "test")
    x, y = x[:60], y[:60]
    assert report["n_images"] == 60 and report["attack"]["steps"] == 10 and report["attack"]["seed"] == 1
    for name in ("ridge_a", "ridge_b"):
        expected = _whitebox(models[name], x, y, 32 / 255, 10, seed=1, bs=25)
        assert report["models"][name]["whitebox_acc"] == expected
    assert report["matrix"]["ridge_a"]["ridge_a"] == report["models"]["ridge_a"]["whitebox_acc"]
    clean = report["models"]["ridge_a"]["clean_acc"]
    assert clean > 70 and report["models"]["ridge_a"]["whitebox_acc"] < clean - 20, "the attack should bite"
    rows = (tmp_path / "t" / "transfer.csv").read_text().splitlines()
    assert rows[0] == "source,target,accuracy" and len(rows) == 1 + 2
    # the headline per source: the other models' accuracy on its examples (here one: ridge_b)
    headline = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert headline == {"transfer_acc": {"ridge_a": report["matrix"]["ridge_a"]["ridge_b"]}}


def test_masked_gradients_are_flagged(runs, digits_dir, tmp_path, monkeypatch):
    root, models = runs
    report = _run_transfer(
        root, models, digits_dir, tmp_path / "t", monkeypatch, "[ridge_a, masked]", ["ridge_a", "masked", "ridge_b"]
    )
    masked, base = report["models"]["masked"], report["models"]["ridge_a"]
    assert masked["suspect_gradient_masking"] is True and masked["best_transfer_source"] == "ridge_a"
    assert masked["whitebox_acc"] > masked["best_transfer_acc"] + 10
    assert base["suspect_gradient_masking"] is False
    assert report["models"]["ridge_b"]["suspect_gradient_masking"] is False
    # The report shows it.
    root_report = tmp_path / "runs"
    (root_report / "transfer").mkdir(parents=True)
    (root_report / "transfer" / "transfer.json").write_text(json.dumps(report))
    assert plots.transfer_heatmap(root_report, tmp_path / "fig").is_file()
    text = plots.markdown_sections(root_report)
    assert "| masked |" in text and "**yes**" in text


def test_masking_flag_logic():
    matrix = {"a": {"a": 10.0, "b": 30.0, "c": 50.0}, "b": {"a": 40.0, "b": 35.0, "c": 48.5}}
    whitebox = {"a": 10.0, "b": 35.0, "c": 49.0}
    flags = masking_flags(matrix, whitebox, margin_pp=1.0)
    assert flags["a"]["suspect_gradient_masking"] is False and flags["a"]["best_transfer_source"] == "b"
    assert flags["b"]["suspect_gradient_masking"] is True and flags["b"]["gap_pp"] == pytest.approx(5.0)
    assert flags["c"]["best_transfer_source"] == "b" and flags["c"]["gap_pp"] == pytest.approx(0.5)
    assert flags["c"]["suspect_gradient_masking"] is False  # within the margin
    alone = masking_flags({"a": {"a": 10.0}}, {"a": 10.0})
    assert alone["a"]["suspect_gradient_masking"] is None and alone["a"]["best_transfer_acc"] is None


def test_amoc_classifier_files_and_missing_models(digits_dir, tmp_path, capsys):
    from amoc.nets.classifier import Classifier, save_classifier
    from amoc.nets.resnet import build_encoder

    root = tmp_path / "runs"
    for seed, name in enumerate(("slf", "scratch")):
        torch.manual_seed(seed)
        model = Classifier(build_encoder("resnet18", 0.125), 10)
        torch.nn.init.normal_(model.head.weight, std=2.0)
        save_classifier(root / name / "classifier.pt", model)
    args = [
        "transfer",
        *QUIET,
        "--set",
        "transfer.n_images=8",
        "--set",
        "transfer.attack.steps=2",
        "--runs",
        str(root),
        "--data",
        str(digits_dir),
        "--out",
        str(tmp_path / "t"),
    ]
    assert cli.main([*args, "--models", "slf", "scratch"]) == 0
    report = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert report["sources"] == ["scratch"] and report["targets"] == ["slf", "scratch"]
    assert report["matrix"]["scratch"]["scratch"] == report["models"]["scratch"]["whitebox_acc"]
    assert cli.main([*args, "--models", "slf", "alf"]) == 2
    assert "no classifier.pt for alf" in capsys.readouterr().err
