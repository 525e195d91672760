"""tools/device_lint.py (run by `make lint`): tensor factories without device= anywhere in
amoc/, host syncs in the per-step paths. The tree passes; planted mistakes are caught."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "device_lint.py"

spec = importlib.util.spec_from_file_location("device_lint", SCRIPT)
device_lint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_lint)


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of amoc/ to plant mistakes in."""
    root = tmp_path / "amoc"
    shutil.copytree(REPO / "amoc", root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def plant(path: Path, after: str, line: str) -> int:
    """Insert `line` (indented like the line after which it goes) after the first line
    containing `after`; returns its line number."""
    lines = path.read_text().splitlines()
    i = next(i for i, text in enumerate(lines) if after in text)
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines.insert(i + 1, indent + line)
    path.write_text("\n".join(lines) + "\n")
    return i + 2


def run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=120)


def test_the_tree_passes():
    assert device_lint.lint(REPO / "amoc") == []
    done = run(REPO / "amoc")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_factory_without_device_in_the_training_step_fails_with_its_line(tree):
    line = plant(tree / "pretrain" / "step.py", "v, model = self.variant, self.model", "scratch = torch.zeros(3)")
    done = run(tree)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"amoc/pretrain/step.py:{line}: factory: torch.zeros(...) without device= in TrainStep.__call__"
    ]
    assert "device-ok" in done.stderr


def test_an_item_in_the_attack_fails_with_its_line(tree):
    line = plant(tree / "pretrain" / "attack.py", "batch = x_query.shape[0]", "scale = x_query.amax().item()")
    done = run(tree)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"amoc/pretrain/attack.py:{line}: sync: .item() reads the device from the host (a per-step path) "
        "in ContrastiveAttack.__call__"
    ]


def test_casts_and_tests_over_tensors_in_hot_paths_are_found_and_device_ok_allows(tree):
    pgd = tree / "attacks" / "pgd.py"
    plant(pgd, "x_adv.requires_grad_(True)", "budget = float(x.abs().max())")
    plant(pgd, "(grad,) = torch.autograd.grad(loss, x_adv)", "if (loss > 0).any(): pass")
    plant(pgd, "x = x.detach()", "t = torch.ones(2)  # device-ok: a test's reason")
    lines = pgd.read_text().splitlines()
    found = {}
    for finding in device_lint.lint(tree):
        where, rule = finding.split(": ")[:2]
        found[lines[int(where.rsplit(":", 1)[1]) - 1].strip()] = rule
    assert found == {"budget = float(x.abs().max())": "sync", "if (loss > 0).any(): pass": "sync"}


def test_host_reads_outside_the_hot_paths_are_not_its_business(tree):
    """A sync point (the loop's `sync`) may read the device; a factory with device= is fine."""
    plant(
        tree / "pretrain" / "stage.py", "self.log.check_finite(epoch=epoch, step=step)", "_ = self.order.sum().item()"
    )
    plant(
        tree / "pretrain" / "step.py",
        "v, model = self.variant, self.model",
        "z = torch.zeros(3, device=x_query.device)",
    )
    assert device_lint.lint(tree) == []
