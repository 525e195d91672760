"""The README's demo block, written from a finished `make demo` workspace.

    python workflow/demo_block.py demo/ --seconds N > demo/readme-block.md   # workflow/demo.sh
    python workflow/demo_block.py demo/ --learning                           # workflow/demo.sh: one line
    python workflow/demo_block.py --install demo/readme-block.md README.md   # make demo-readme

The block holds the report's downstream and pre-training tables, the wall-clock time, the
CPU and the sha256 of the demo preset the run used; --install puts it into the README
between its `<!-- demo:begin` and `<!-- demo:end -->` markers. tests/test_demo_block.py checks that the
README's block names the current preset, so changing the preset without re-running the
demo fails the tests.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import re
import sys
from pathlib import Path

from amoc.runtime import cpu_name

BEGIN, END = "<!-- demo:begin", "<!-- demo:end -->"


def preset_sha256(params_text: str) -> str:
    return hashlib.sha256(params_text.encode()).hexdigest()[:16]


def block(workspace: Path, seconds: int | None) -> str:
    report = (workspace / "report" / "report.md").read_text()
    found = re.findall(r"((?:^\|.*\|\n)+)", report, flags=re.M)  # the markdown tables, in order
    if len(found) < 2:
        sys.exit(f"{workspace}/report/report.md: expected the downstream and pre-training tables")
    sha = preset_sha256((workspace / "params.yaml").read_text())
    timing = f"{seconds // 60} min {seconds % 60:02d} s" if seconds is not None else "(time not recorded)"
    return (
        f"{BEGIN} preset-sha256={sha} -->\n"
        f"Written by `make demo` (`workflow/demo_block.py`): the whole DAG took {timing} on {cpu_name()}, "
        f"{platform.python_implementation()} {platform.python_version()}.\n\n"
        f"{found[0].rstrip()}\n\n{found[1].rstrip()}\n{END}"
    )


def learning(workspace: Path) -> str:
    """One line on what the demo's pre-training learnt, the three measures side by side:
    the final clean loss against chance, the k-NN against both random-init baselines
    (docs/pretrain.md, "k-NN monitor") and the k-NN curve's first and last epochs."""
    run = workspace / "runs" / "pretrain"
    s = json.loads((run / "summary.json").read_text())
    with open(run / "log.csv", newline="") as fh:
        curve = [(int(r["epoch"]), float(r["knn_acc"])) for r in csv.DictReader(fh) if r.get("knn_acc")]
    (first, start), (last, end) = curve[0], curve[-1]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    return (
        f"demo pre-training: final clean loss {s['loss_clean']:.3f}, {s['chance_loss'] - s['loss_clean']:.2f} below "
        f"{s['chance_label']}; k-NN {pct(s['knn_acc'])} against the random-init encoder's {pct(s['knn_random_acc'])} "
        f"(initial BN statistics) and {pct(s.get('knn_random_bn_acc'))} (training BN statistics); k-NN curve "
        f"{pct(start)} after epoch {first}, {pct(end)} after epoch {last} (docs/results.md, the demo)"
    )


BLOCK = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), flags=re.S)


def install(block_file: Path, readme: Path) -> None:
    text, target = block_file.read_text().strip(), readme.read_text()
    if not BLOCK.fullmatch(text):
        sys.exit(f"{block_file}: not a demo block; run `make demo` first")
    if not BLOCK.search(target):
        sys.exit(f"{readme}: no '{BEGIN} ... {END}' block to replace")
    readme.write_text(BLOCK.sub(lambda _: text, target, count=1))
    print(f"updated the demo block of {readme} from {block_file}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path, nargs="?", help="a finished demo workspace: print its block")
    ap.add_argument("--seconds", type=int, default=None, help="wall-clock seconds of the DAG")
    ap.add_argument("--learning", action="store_true", help="print one line on what the pre-training learnt")
    ap.add_argument("--install", nargs=2, type=Path, metavar=("BLOCK", "README"), help="put BLOCK into README")
    args = ap.parse_args()
    if args.install:
        install(*args.install)
    elif args.workspace and args.learning:
        print(learning(args.workspace))
    elif args.workspace:
        print(block(args.workspace, args.seconds))
    else:
        ap.error("give a workspace or --install BLOCK README")
    return 0


if __name__ == "__main__":
    sys.exit(main())
