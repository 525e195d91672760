"""`amoc report` on fake metrics: full runs, partial runs, nothing at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from downstream_helpers import params_file

from amoc import cli
from amoc.report.stage import collect_pretrain, pretrain_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_eval(
    folder: Path,
    clean: float,
    pgd: float,
    aa: float | None,
    n: int = 1000,
    n_aa: int = 500,
    curve: bool = True,
    best: dict | None = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "pgd": {"steps": 20, "eps_255": 8.0, "step_255": 2.0, "random_start": True, "n_images": n},
        "autoattack": {
            "enabled": aa is not None,
            "version": "standard",
            "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"],
            "iterations": 100,
            "library": "torchattacks 3.3.0",
            "eps_255": 8.0,
            "n_images": n_aa if aa is not None else 0,
        },
        "curve": {"steps": 20},
    }
    (folder / "eval.json").write_text(
        json.dumps(
            {
                "clean_acc": clean,
                "pgd_acc": pgd,
                "autoattack_acc": aa,
                "n_images": n,
                "epoch": 40,
                "best": best,
                "settings": settings,
            }
        )
    )
    if curve:
        rows = ["eps_255,eps,accuracy,n_images"] + [
            f"{e},{e / 255},{max(clean - 4 * e, 0):.2f},{n}" for e in (0, 2, 4, 8, 16)
        ]
        (folder / "curve.csv").write_text("\n".join(rows) + "\n")


def fake_pretrain(folder: Path, variant: str, queue: int, knn: list[float | None]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["epoch,loss,loss_clean,loss_adv,lr,images_per_s,seconds,knn_acc"]
    for i, k in enumerate(knn, 1):
        rows.append(f"{i},{9 - i},{8.5 - i},{9.5 - i},0.1,100,10,{'' if k is None else k}")
    (folder / "log.csv").write_text("\n".join(rows) + "\n")
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "variant": variant,
                "queue_size": queue,
                "epochs": len(knn),
                "knn_acc": knn[-1],
                "knn_random_acc": 0.25,
                "knn_random_bn_acc": 0.2,
                "loss": 9 - len(knn),
                "log_k_plus_1": 10.4,
            }
        )
    )


def report(tmp_path: Path, runs: Path) -> Path:
    out = tmp_path / "report"
    assert cli.main(["report", "--params", str(params_file(tmp_path)), "--runs", str(runs), "--out", str(out)]) == 0
    return out


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:8] == PNG_MAGIC


def test_report_on_a_full_set_of_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_pretrain(runs / "pretrain", "ACA+", 32768, [None, 0.41, 0.52])
    fake_pretrain(runs / "pretrain-q4096", "ACA+", 4096, [0.35, 0.47])
    fake_eval(runs / "slf", 81.5, 40.2, 38.9)  # eval.json beside the classifier
    fake_eval(runs / "alf" / "eval", 79.0, 45.1, 41.5)  # the pipeline's runs/<model>/eval/
    fake_eval(runs / "aff" / "eval", 83.2, 52.0, 47.7)
    fake_eval(runs / "scratch" / "eval", 80.7, 51.1, 47.3)
    fake_eval(runs / "transfer-probe", 70.0, 30.0, None)  # any other folder with an eval.json
    out = report(tmp_path, runs)
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    for row in (
        "| SLF | 81.50 | 40.20 | 38.90 | 1000 | 500 |",
        "| ALF | 79.00 |",
        "| AFF | 83.20 |",
        "| scratch (TRADES from scratch) | 80.70 | 51.10 | 47.30 |",
        "| transfer-probe | 70.00 | 30.00 | n/a | 1000 | - |",
    ):
        assert row in md and row in printed
    assert "PGD-20 (%)" in md and "N = 1000" in md and "N = 500" in md and "8.0/255" in md
    assert "| pretrain | AMOC | ACA+ | 32768 | 3 | 52.00 | 25.00 | 20.00 | 6.0000 | 10.4000 (log(K+1)) |" in md
    assert "| pretrain-q4096 | AMOC | ACA+ | 4096 | 2 | 47.00 | 25.00 | 20.00 |" in md and "random-init encoder" in md
    names = ("pretrain_loss.png", "pretrain_knn.png", "robust_curve.png", "accuracy_bars.png", "pretrain_compare.png")
    for name in names:
        assert is_png(out / name), name
        assert f"({name})" in md and str(out / name) in printed
    assert "## Notes" not in md
    assert not list(out.glob(".*.tmp"))


def test_report_on_a_partial_run_notes_what_is_missing(tmp_path):
    runs = tmp_path / "runs"
    fake_eval(runs / "alf", 79.0, 45.1, None, curve=False)
    (runs / "slf").mkdir()
    (runs / "slf" / "eval.json").write_text("{ truncated")
    (runs / "pretrain").mkdir()
    (runs / "pretrain" / "log.csv").write_text(
        "epoch,loss,loss_clean,lr,images_per_s,seconds,knn_acc\n1,5.0,5.0,0.1,10,1,\n"
    )
    out = report(tmp_path, runs)
    md = (out / "report.md").read_text()
    assert "| ALF | 79.00 | 45.10 | n/a |" in md and "| SLF |" not in md
    assert "unreadable" in md and "AFF: no eval.json" in md and "robustness-curve figure skipped" in md
    assert "k-NN figure skipped" in md
    assert is_png(out / "accuracy_bars.png") and is_png(out / "pretrain_loss.png")
    assert not (out / "robust_curve.png").exists() and not (out / "pretrain_compare.png").exists()


def test_report_puts_the_best_epoch_beside_the_last(tmp_path):
    runs = tmp_path / "runs"
    best = {
        "epoch": 23,
        "selected_by": "val_pgd_acc",
        "same_as_last": False,
        "clean_acc": 82.0,
        "pgd_acc": 54.0,
        "autoattack_acc": 49.5,
    }
    fake_eval(runs / "aff" / "eval", 83.2, 52.0, 47.7, best=best)
    fake_eval(runs / "alf" / "eval", 79.0, 45.1, 41.5, best={**best, "same_as_last": True, "epoch": 40})
    md = (report(tmp_path, runs) / "report.md").read_text()
    assert "| AFF (last epoch 40) | 83.20 | 52.00 | 47.70 |" in md
    assert "| AFF (best on validation, epoch 23, val_pgd_acc) | 82.00 | 54.00 | 49.50 |" in md
    assert "| ALF (last epoch 40 = best on validation) | 79.00 |" in md and "ALF (best" not in md


@pytest.mark.parametrize("make_dir", [False, True])
def test_report_with_no_runs_at_all(tmp_path, make_dir):
    runs = tmp_path / "runs"
    if make_dir:
        runs.mkdir()
    md = (report(tmp_path, runs) / "report.md").read_text()
    assert "No evaluated downstream model yet" in md and "No pre-training run found" in md


def test_the_pretrain_table_names_the_method_and_its_chance_level(tmp_path):
    """An ACL encoder has no variant or queue: the table says ACL and its own chance level."""
    runs = tmp_path / "runs"
    fake_pretrain(runs / "pretrain", "ACA+", 256, [0.5])
    folder = runs / "pretrain_acl"
    fake_pretrain(folder, "ACA+", 256, [0.4])
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(method="acl", variant=None, queue_size=None, log_k_plus_1=None)
    summary.update(chance_loss=6.23, chance_label="log(2B-1)")
    del summary["knn_random_bn_acc"]  # a summary from before that baseline: n/a
    (folder / "summary.json").write_text(json.dumps(summary))
    table = pretrain_table(collect_pretrain(runs, []))
    assert "| pretrain | AMOC | ACA+ | 256 |" in table and "10.4000 (log(K+1)) |" in table
    assert "| pretrain_acl | ACL | - | n/a | 1 | 40.00 | 25.00 | n/a | 8.0000 | 6.2300 (log(2B-1)) |" in table
