"""Reproducibility with the real engines: DVC and Snakemake run the tiny preset in
temporary git repos (the `amoc` stages for real, on the CPU).

Two full DAG runs are shared by every test through a module-scoped fixture: one by
`dvc repro`, one by Snakemake, side by side in separate clean workspaces. As the commands are the
same, their metrics agreeing proves both that two clean runs with the same seed give
identical metrics and that the two engines compute the same thing. A third, partial run
is the `dvc exp run -S queue_size=...` experiment (last, as it changes the workspace).

Wall-clock fields (seconds, images/s, throughput) are left out of every comparison: they
are the only parts of the metrics files that differ between identical runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HEADLINE = {
    "clean",
    "pgd",
    "autoattack",
    "knn_acc",
    "knn_random_acc",
    "mean_acc",
    "relative_drop",
    "transfer_acc.scratch",
}
MODELS = ("slf", "alf", "aff", "scratch")
TIMING = re.compile(r"seconds|per_s|throughput")
EVALUATE = {f"evaluate@{m}" for m in ("slf", "alf", "aff", "scratch")}
# What a new pre-training re-runs: the pre-trained models, their evaluations, and the
# transfer matrix (it reads every classifier); the scratch baseline does not depend on it.
AFTER_PRETRAIN = {"pretrain", "probe@slf", "probe@alf", "finetune_aff", "transfer", "report"} | {
    f"{e}@{m}" for e in ("evaluate", "evaluate_corruptions") for m in ("slf", "alf", "aff")
}
QUEUE_SIZE = 128  # tiny has 256; a queue must hold at least one batch (pretrain.batch_size 64)


def _env() -> dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # Faster CPU training, same results (benchmarks/README.md, "CPU allocator").
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736")
    env.setdefault("GIT_AUTHOR_NAME", "amoc tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@localhost")
    env.setdefault("GIT_COMMITTER_NAME", "amoc tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@localhost")
    return env


def run(*cmd: str, cwd: Path, check: bool = True, timeout: int = 1500) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` in {cwd} exited {proc.returncode}:\n"
            f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def say(request, text: str) -> None:
    """A line on the terminal even under output capture (the DAG timings for the lead)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            if hasattr(request.config, "workerinput"):  # a pytest-xdist worker: its reporter writes
                print(text, file=sys.stderr, flush=True)  # nowhere, its stderr is the terminal's
            else:
                reporter.write_line(text)


# On top of the tiny preset: one torch thread. It changes how the stages run, not what
# they compute (runtime.threads is not a declared param), but on 2 shared cores torch's
# default 2 threads made the tiny DAG 10x slower (19 min against 2 min, mostly in
# AutoAttack), and the two engines' runs below go side by side, one core each.
OVERRIDES = {"runtime": {"threads": 1}}


def make_workspace(path: Path, *, dvc: bool) -> Path:
    """A git repo with the tiny params and this repo's pipeline files, committed."""
    path.mkdir(parents=True)
    run(str(BIN / "amoc"), "params", "--preset", "tiny", "--out", str(path / "params.yaml"), cwd=REPO)
    edit_params(path, **OVERRIDES)
    for name in ("dvc.yaml", "Snakefile", ".gitignore"):
        shutil.copy(REPO / name, path / name)
    shutil.copytree(REPO / "workflow", path / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    run("git", "init", "-q", cwd=path)
    if dvc:
        run("dvc", "init", "-q", cwd=path)
        run("dvc", "config", "core.analytics", "false", cwd=path)
    run("git", "add", "-A", cwd=path)
    run("git", "commit", "-q", "-m", "tiny workspace", cwd=path)
    return path


def metrics(ws: Path) -> dict[str, dict]:
    """{file: flattened numbers} of every metrics file and the JSON beside it (settings,
    provenance), without wall-clock fields."""

    def flat(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from flat(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node

    files = (
        sorted(ws.glob("runs/**/metrics.json"))
        + sorted(ws.glob("runs/*/summary.json"))
        + sorted(ws.glob("runs/*/eval/eval.json"))
        + sorted(ws.glob("runs/*/corruptions/corruptions.json"))
        + sorted(ws.glob("runs/transfer/transfer.json"))
    )
    return {
        str(f.relative_to(ws)): {k: v for k, v in flat(json.loads(f.read_text())) if not TIMING.search(k)}
        for f in files
    }


def dry_run_jobs(ws: Path, *extra: str) -> list[str]:
    """Job names of `snakemake -n` (probe/evaluate with their wildcard), `all` left out."""
    out = run(str(BIN / "snakemake"), "-n", "--cores", "1", *extra, cwd=ws).stdout
    jobs = []
    for block in re.split(r"\n(?=\[|(?:local)?rule )", out):
        head = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if head and head.group(1) != "all":
            wildcard = re.search(r"^\s+wildcards: \w+=(\w+)", block, re.M)
            jobs.append(head.group(1) + (f"@{wildcard.group(1)}" if wildcard else ""))
    return sorted(jobs)


def edit_params(ws: Path, **sections: dict) -> str:
    """Merge `sections` into ws/params.yaml; returns the original text (to restore)."""
    text = (ws / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    for name, values in sections.items():
        raw[name].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return text


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workspaces(tmp_path_factory, request) -> dict[str, Path]:
    """Both full DAG runs, side by side: `dvc repro` and `snakemake --cores 1`."""
    base = tmp_path_factory.mktemp("repro")
    ws = {"dvc": make_workspace(base / "dvc", dvc=True), "smk": make_workspace(base / "smk", dvc=False)}
    commands = {"dvc": ["dvc", "repro"], "smk": [str(BIN / "snakemake"), "--cores", "1"]}
    start = time.perf_counter()
    procs = {
        k: subprocess.Popen(
            commands[k], cwd=ws[k], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for k in ws
    }
    outputs = {}
    for k, proc in procs.items():
        outputs[k] = proc.communicate(timeout=1500)[0]
        say(
            request,
            f"\n[pipeline timing] {'dvc repro' if k == 'dvc' else 'snakemake --cores 1'} (tiny preset, full DAG, "
            f"the two engines side by side): {time.perf_counter() - start:.0f} s",
        )
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(commands[k])} exited {proc.returncode}:\n{outputs[k][-8000:]}")
    assert outputs["dvc"].count("Running stage") == 17, outputs["dvc"]
    run("git", "add", "-A", cwd=ws["dvc"])
    run("git", "commit", "-q", "-m", "baseline: dvc repro", cwd=ws["dvc"])
    return ws


@pytest.fixture(scope="module")
def dvc_ws(workspaces) -> Path:
    return workspaces["dvc"]


@pytest.fixture(scope="module")
def smk_ws(workspaces) -> Path:
    return workspaces["smk"]


# ------------------------------------------------------------------------------- DVC
def test_dvc_repro_again_is_up_to_date(dvc_ws):
    out = run("dvc", "repro", cwd=dvc_ws)
    assert "Data and pipelines are up to date" in out.stdout + out.stderr
    assert run("dvc", "status", "-q", cwd=dvc_ws, check=False).returncode == 0


def test_dvc_metrics_hold_the_headline_numbers(dvc_ws):
    shown = json.loads(run("dvc", "metrics", "show", "--json", cwd=dvc_ws).stdout)
    keys = set()

    def walk(node, parent=None):
        if isinstance(node, dict):
            for key, value in node.items():
                keys.update({key, f"{parent}.{key}"})  # a nested metric as dvc names it: transfer_acc.scratch
                walk(value, key)

    walk(shown)
    assert HEADLINE <= keys, f"missing from dvc metrics show: {HEADLINE - keys}"
    files = {key for key in keys if key.startswith("runs/") and key.endswith(".json")}
    assert files == {"runs/pretrain/metrics.json", "runs/transfer/metrics.json"} | {
        f"runs/{m}/{kind}/metrics.json" for m in MODELS for kind in ("eval", "corruptions")
    }, files


def test_an_evaluate_param_stales_only_the_evaluate_stages(dvc_ws):
    """`dvc status` names the stages whose own params changed: the four evaluations.
    The report follows once they re-run (it depends on their files); nothing upstream."""
    n = yaml.safe_load((dvc_ws / "params.yaml").read_text())["evaluate"]["n_images"]
    original = edit_params(dvc_ws, evaluate={"n_images": n // 2})
    try:
        stale = json.loads(run("dvc", "status", "--json", cwd=dvc_ws).stdout)
    finally:
        (dvc_ws / "params.yaml").write_text(original)
    assert set(stale) == EVALUATE, stale
    assert run("dvc", "status", "-q", cwd=dvc_ws, check=False).returncode == 0


@pytest.mark.parametrize("method", ["acl", "rocl", "dynacl"])
def test_another_pretraining_method_stales_pretraining_and_nothing_before_it(dvc_ws, smk_ws, method):
    """`dvc exp run -S pretrain.method=acl` (or editing params.yaml for Snakemake) re-runs
    pre-training and, as its encoder changes, everything after it (the runs themselves:
    tests/pretrain/test_pretrain_methods_stage.py); the data stage stays."""
    original = edit_params(dvc_ws, pretrain={"method": method})
    try:
        stale = json.loads(run("dvc", "status", "--json", cwd=dvc_ws).stdout)
    finally:
        (dvc_ws / "params.yaml").write_text(original)
    assert set(stale) == {"pretrain"}, stale  # DVC names the stage whose params changed
    original = edit_params(smk_ws, pretrain={"method": method})
    try:
        assert dry_run_jobs(smk_ws) == sorted(AFTER_PRETRAIN)
    finally:
        (smk_ws / "params.yaml").write_text(original)


# ------------------------------------------------------------------------- Snakemake
def test_snakemake_has_nothing_left_to_do(smk_ws):
    out = run(str(BIN / "snakemake"), "-n", "--cores", "1", cwd=smk_ws)
    assert "Nothing to be done" in out.stdout + out.stderr, out.stdout
    # the launcher (torchrun under gpus=N) is a param that re-runs nothing
    out = run(str(BIN / "snakemake"), "-n", "--cores", "1", "--config", "gpus=2", cwd=smk_ws)
    assert "Nothing to be done" in out.stdout + out.stderr, out.stdout


def test_snakemake_reruns_only_what_a_param_change_touches(smk_ws):
    original = edit_params(smk_ws, evaluate={"n_images": 32})
    try:
        assert dry_run_jobs(smk_ws) == sorted(EVALUATE | {"report"})
    finally:
        (smk_ws / "params.yaml").write_text(original)
    # A top-level knob through --config reaches the rules that read it, and only them.
    assert dry_run_jobs(smk_ws, "--config", f"queue_size={QUEUE_SIZE}") == sorted(AFTER_PRETRAIN)
    assert "Nothing to be done" in run(str(BIN / "snakemake"), "-n", "--cores", "1", cwd=smk_ws).stdout


# --------------------------------------------------------------------- both engines
def test_same_seed_same_metrics_in_both_engines(dvc_ws, smk_ws):
    """Two clean runs (one per engine) of the same config: identical metrics, on the CPU.
    (Digests of input files are compared, byte for byte, by the next test.)"""

    def numbers(ws):
        return {f: {k: v for k, v in m.items() if not k.endswith("sha256")} for f, m in metrics(ws).items()}

    dvc_metrics, smk_metrics = numbers(dvc_ws), numbers(smk_ws)
    assert dvc_metrics.keys() == smk_metrics.keys()
    for name in dvc_metrics:
        assert dvc_metrics[name] == smk_metrics[name], name


def _leaf_diff(a, b, path=""):
    """Paths of the leaves that differ between two loaded checkpoints."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                yield f"{path}/{key} (only in one)"
            else:
                yield from _leaf_diff(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _leaf_diff(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or not torch.equal(a, b):
            yield f"{path} (tensor)"
    elif a != b:
        yield f"{path} ({a!r} vs {b!r})"


def test_same_seed_same_model_files_in_both_engines(dvc_ws, smk_ws):
    """The .pt files of the two clean runs are byte-identical. Otherwise DVC sees a new
    file after every re-run of a training stage and re-runs everything downstream even
    when nothing changed, and the init_sha256 provenance differs between runs."""
    import hashlib

    import torch

    different = []
    for path in sorted(p.relative_to(dvc_ws) for p in dvc_ws.glob("runs/*/*.pt")):
        a, b = (dvc_ws / path).read_bytes(), (smk_ws / path).read_bytes()
        if hashlib.sha256(a).digest() != hashlib.sha256(b).digest():
            loaded = [torch.load(ws / path, map_location="cpu", weights_only=True) for ws in (dvc_ws, smk_ws)]
            where = list(_leaf_diff(*loaded))[:6] or ["same contents, different bytes (the zip container)"]
            different.append(f"{path}: " + "; ".join(where))
    assert not different, "model files differ between two identical runs:\n" + "\n".join(different)


# ------------------------------------------------ experiments (last: changes the workspace)
def _experiments(shown: list) -> list[dict]:
    """Every revision in `dvc exp show --json`: {name, params, metrics} (flattened)."""
    found = []

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "params" in data:
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                flat = {}
                for file in (data.get("metrics") or {}).values():
                    for key, value in (file.get("data") or {}).items():
                        flat.setdefault(key, value)
                found.append({"name": node.get("name") or data.get("rev"), "params": params, "metrics": flat})
            for value in node.values():
                walk(value)

    walk(shown)
    return found


def test_a_second_clone_reuses_the_stages_through_a_dvc_remote(dvc_ws, tmp_path):
    """docs/distributed.md's shared-cache how-to: push outputs and the run cache from one
    workspace, pull them into a fresh clone, and `dvc repro` there runs nothing."""
    store = tmp_path / "store"
    run("dvc", "remote", "add", "--local", "-d", "shared", str(store), cwd=dvc_ws)  # .dvc/config.local: not committed
    run("dvc", "push", "--run-cache", cwd=dvc_ws)
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(dvc_ws), str(clone), cwd=tmp_path)
    run("dvc", "remote", "add", "--local", "-d", "shared", str(store), cwd=clone)
    run("dvc", "pull", "--run-cache", cwd=clone)
    assert (clone / "runs/pretrain/encoder.pt").read_bytes() == (dvc_ws / "runs/pretrain/encoder.pt").read_bytes()
    out = run("dvc", "repro", cwd=clone)
    assert "Running stage" not in out.stdout, out.stdout
    assert run("dvc", "status", "-q", cwd=clone, check=False).returncode == 0


def exp_metric_columns(shown) -> int:
    """The number of distinct metric columns `dvc exp show` has: flattened keys over every
    metrics file of every experiment."""
    columns = set()

    def leaves(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                leaves(value, f"{prefix}.{key}")
        else:
            columns.add(prefix)

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "metrics" and isinstance(value, dict):
                    for file, content in value.items():
                        leaves((content or {}).get("data", {}), file)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    return len(columns)


def test_exp_run_with_another_queue_size(dvc_ws, request):
    baseline = metrics(dvc_ws)
    start = time.perf_counter()
    out = run("dvc", "exp", "run", "-S", f"queue_size={QUEUE_SIZE}", cwd=dvc_ws)
    say(
        request,
        f"\n[pipeline timing] dvc exp run -S queue_size={QUEUE_SIZE} (partial DAG): "
        f"{time.perf_counter() - start:.0f} s",
    )
    try:
        ran = set(re.findall(r"Running stage '([^']+)'", out.stdout))
        assert ran == AFTER_PRETRAIN, out.stdout
        exps = _experiments(json.loads(run("dvc", "exp", "show", "--json", cwd=dvc_ws).stdout))
        (exp,) = [e for e in exps if e["params"].get("queue_size") == QUEUE_SIZE and e["name"] != "workspace"]
        assert exp["metrics"].get("knn_acc") is not None, exp
        assert metrics(dvc_ws)["runs/pretrain/metrics.json"] != baseline["runs/pretrain/metrics.json"]
        # The baseline's scratch model did not re-run: same numbers.
        assert metrics(dvc_ws)["runs/scratch/eval/eval.json"] == baseline["runs/scratch/eval/eval.json"]
        diff = json.loads(run("dvc", "metrics", "diff", "--all", "--json", cwd=dvc_ws).stdout)
        listed = {key for file in diff.values() for key in file}
        assert HEADLINE <= listed, f"dvc metrics diff lacks {HEADLINE - listed}"
        # Readable (issue 19): the swept param and the moved headline numbers fit a wide terminal.
        changed = run("dvc", "exp", "show", "--only-changed", "--md", cwd=dvc_ws).stdout
        header = next(line for line in changed.splitlines() if line.startswith("|"))
        # Every column counts, the dependency-hash ones too (one per path a stage reads).
        columns = [c.strip() for c in header.strip("|").split("|")]
        say(request, f"\n[dvc exp show --only-changed --md] {len(columns)} columns")
        assert len(columns) <= 40, changed
        assert "queue_size" in header and "loss" in header, header
        assert exp_metric_columns(json.loads(run("dvc", "exp", "show", "--json", cwd=dvc_ws).stdout)) <= 32
        table = run("dvc", "metrics", "diff", cwd=dvc_ws).stdout.strip().splitlines()
        say(request, f"[dvc metrics diff] {len(table)} lines")
        assert 3 <= len(table) <= 32, "\n".join(table)
    finally:  # back to the committed baseline for any test that runs after this one
        run("git", "checkout", "-q", "--", ".", cwd=dvc_ws)
        run("dvc", "checkout", "-q", "--force", cwd=dvc_ws, check=False)
