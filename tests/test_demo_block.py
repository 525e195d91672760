"""The README's demo numbers come from a `make demo` run of the current demo preset.

workflow/demo_block.py writes the block (with the sha256 of the params the run used) and
installs it between the README's markers; changing the preset without re-running the demo
makes the README's hash stale, and the first test fails.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from conftest import REPO

from amoc import cli


def load_demo_block():
    spec = importlib.util.spec_from_file_location("demo_block", REPO / "workflow" / "demo_block.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_block = load_demo_block()


def test_the_readme_block_was_written_by_the_current_demo_preset(tmp_path):
    out = tmp_path / "params.yaml"
    assert cli.main(["params", "--preset", "demo", "--out", str(out)]) == 0
    found = re.findall(r"<!-- demo:begin preset-sha256=([0-9a-f]{16}) -->", (REPO / "README.md").read_text())
    assert len(found) == 1, "README.md needs exactly one demo block"
    assert found[0] == demo_block.preset_sha256(out.read_text()), (
        "the demo preset changed since the README's demo numbers were made: run `make demo && make demo-readme`"
    )


REPORT = """# AMOC report

| model | clean (%) | PGD-20 (%) |
|---|---:|---:|
| SLF | 38.50 | 1.00 |

Some prose between the tables.

| epoch | loss | k-NN (%) |
|---|---:|---:|
| 1 | 5.40 | 70.0 |
"""


def test_the_block_holds_both_report_tables_and_installs_between_the_markers(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text(REPORT)
    params = "variant: ACA+\n"
    (tmp_path / "params.yaml").write_text(params)
    text = demo_block.block(tmp_path, 125)
    assert text.startswith(f"<!-- demo:begin preset-sha256={demo_block.preset_sha256(params)} -->")
    assert "2 min 05 s" in text and "| SLF | 38.50 | 1.00 |" in text and "| 1 | 5.40 | 70.0 |" in text
    assert "Some prose" not in text

    block_file, readme = tmp_path / "block.md", tmp_path / "README.md"
    block_file.write_text(text + "\n")
    readme.write_text(
        "intro\n<!-- demo:begin preset-sha256=0000000000000000 -->\nold numbers\n<!-- demo:end -->\nafter\n"
    )
    demo_block.install(block_file, readme)
    updated = readme.read_text()
    assert updated == f"intro\n{text}\nafter\n"


def test_install_refuses_a_readme_without_markers_and_a_file_that_is_no_block(tmp_path):
    block_file, readme = tmp_path / "block.md", tmp_path / "README.md"
    readme.write_text("no markers here\n")
    block_file.write_text("<!-- demo:begin preset-sha256=0123456789abcdef -->\nx\n<!-- demo:end -->\n")
    with pytest.raises(SystemExit, match="no '<!-- demo:begin"):
        demo_block.install(block_file, readme)
    block_file.write_text("a report, not a block\n")
    with pytest.raises(SystemExit, match="not a demo block"):
        demo_block.install(block_file, readme)
    assert readme.read_text() == "no markers here\n"


def test_the_learning_line_puts_the_three_measures_side_by_side(tmp_path):
    run = tmp_path / "runs" / "pretrain"
    run.mkdir(parents=True)
    summary = {"loss_clean": 5.25, "chance_loss": 5.5491, "chance_label": "log(K+1)", "knn_acc": 0.772}
    summary.update(knn_random_acc=0.8873, knn_random_bn_acc=0.6761)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "log.csv").write_text("epoch,loss,knn_acc\n1,5.4,\n2,5.3,0.82\n3,5.25,0.772\n")  # no k-NN after epoch 1
    line = demo_block.learning(tmp_path)
    assert line.startswith("demo pre-training: final clean loss 5.250, 0.30 below log(K+1); k-NN 77.2 %")
    assert "random-init encoder's 88.7 % (initial BN statistics) and 67.6 % (training BN statistics)" in line
    assert "k-NN curve 82.0 % after epoch 2, 77.2 % after epoch 3" in line
    del summary["knn_random_bn_acc"]  # a run from before that baseline
    (run / "summary.json").write_text(json.dumps(summary))
    assert "and n/a (training BN statistics)" in demo_block.learning(tmp_path)
