"""One truth: dvc.yaml and the Snakefile describe the same DAG.

Each side is reduced to {normalised command: stage} (DVC through `Repo.index.stages`,
with foreach and ${...} resolved; Snakemake through `snakemake -n -p --forceall` for
the jobs and its Python API for the rules' params) and the two must be equal: the same
commands, inputs, outputs and params. Comparing the resolved commands also proves that
each swept knob reaches the amoc command line.

Documented asymmetry: DVC's `persist: true` checkpoint folders are resume state, not
Snakemake outputs (Snakemake deletes outputs before a job and after a failure, which
would defeat --resume); they are checked separately.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
KNOBS = ("variant", "queue_size", "leverage", "seed")  # top-level: `dvc exp run -S queue_size=N`
TRAINING = ("pretrain", "probe", "finetune_aff", "finetune_scratch")  # stages that --resume
# Who reads each knob: the method knobs shape only pre-training; every stage that trains
# or attacks is seeded.
KNOB_STAGES = {
    "variant": {"pretrain"},
    "queue_size": {"pretrain"},
    "leverage": {"pretrain"},
    "seed": {
        "pretrain",
        "probe",
        "finetune_aff",
        "finetune_scratch",
        "evaluate",
        "corruptions",
        "evaluate_corruptions",
        "transfer",
    },
}
# How a stage runs, not what it computes: never a declared param (dvc.yaml's header).
HOW_NOT_WHAT = ("runtime.device", "runtime.threads", "runtime.progress", "runtime.compile", "runtime.channels_last")


@dataclass(frozen=True)
class Stage:
    name: str  # dvc.yaml stage (without @item) == Snakemake rule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[str, ...]  # dotted params.yaml keys


def normalise(cmd: str) -> str:
    """One line, single spaces, without Snakemake's `> logs/x.log 2>&1` redirection nor
    the `python3 .../gpu_slot.py N --` that gives a Snakemake GPU job its own cards
    (tests/pipeline/test_workflow_gpu.py; DVC runs one stage at a time)."""
    cmd = re.sub(r"\s*>\s*logs/\S+\.log\s+2>&1\s*$", "", cmd.strip())
    cmd = re.sub(r"^python3 \S*gpu_slot\.py (?:--ids \S+ )?\d+ -- ", "", cmd)
    return " ".join(cmd.split())


# ------------------------------------------------------------------------------ DVC side
def dvc_side(root: Path = REPO) -> tuple[dict[str, Stage], dict[str, tuple[str, ...]]]:
    """({command: Stage}, {command: persist outs}) from dvc.yaml, foreach and ${} resolved."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    stages, persist = {}, {}
    with Repo(str(root), uninitialized=True) as repo:
        for st in repo.index.stages:
            params = [key for d in st.deps if isinstance(d, ParamsDependency) for key in d.params]
            assert all(d.def_path == "params.yaml" for d in st.deps if isinstance(d, ParamsDependency)), st
            cmd = normalise(st.cmd)
            assert cmd not in stages, f"two stages run {cmd!r}"
            stages[cmd] = Stage(
                name=st.name.split("@")[0],
                inputs=tuple(sorted(d.def_path for d in st.deps if not isinstance(d, ParamsDependency))),
                outputs=tuple(sorted(o.def_path for o in st.outs if not o.persist)),
                params=tuple(sorted(params)),
            )
            persist[cmd] = tuple(sorted(o.def_path for o in st.outs if o.persist))
    return stages, persist


# ------------------------------------------------------------------------ Snakemake side
def snakemake(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def parse_dry_run(text: str) -> list[dict]:
    """The jobs of `snakemake -n -p` output: rule, input, output, log, shell command."""
    jobs, job = [], None
    for line in text.splitlines():
        head = re.match(r"^(?:local)?rule (\w+):$", line)
        if head:
            job = {"rule": head.group(1), "input": [], "output": [], "log": [], "cmd": None}
            jobs.append(job)
            continue
        if job is None:
            continue
        field = re.match(r"^\s+(input|output|log): (.*)$", line)
        if field:
            job[field.group(1)] = [p.strip() for p in field.group(2).split(",")]
        elif line.startswith("Shell command: "):
            job["cmd"] = line[len("Shell command: ") :]
    return jobs


_RULE_PARAMS = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ResourceSettings
root = Path(sys.argv[1])
with SnakemakeApi() as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=root / "Snakefile", workdir=root)._workflow
    rules = {r.name: {"params": list(r.params.keys()), "conda": str(r.conda_env) if r.conda_env else None,
                      "snakefile": r.snakefile} for r in wf.rules}
print("RULES=" + json.dumps(rules))
"""


def rule_info(root: Path = REPO) -> dict[str, dict]:
    """Each rule's params names (the dotted keys spread in with **cfg(...)) and conda env.

    Snakemake's CLI does not print params, so this asks its Python API, in a subprocess
    because the API changes the working directory."""
    proc = subprocess.run([sys.executable, "-c", _RULE_PARAMS, str(root)], capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RULES=")]
    assert proc.returncode == 0 and line, proc.stdout + proc.stderr
    return json.loads(line[-1][len("RULES=") :])


def snakemake_side(*extra: str, root: Path = REPO) -> dict[str, Stage]:
    out = snakemake("-n", "-p", "--forceall", *extra, cwd=root)
    rules = rule_info(root)
    stages = {}
    for job in parse_dry_run(out.stdout):
        if job["rule"] == "all":
            continue
        assert job["cmd"], f"rule {job['rule']}: no shell command in the dry run"
        assert len(job["log"]) == 1 and job["cmd"].rstrip().endswith(f"> {job['log'][0]} 2>&1"), (
            f"rule {job['rule']}: the command should send its output to its log: {job['cmd']}"
        )
        cmd = normalise(job["cmd"])
        assert cmd not in stages, f"two jobs run {cmd!r}"
        # `launcher` (amoc or torchrun) and `gpu_slot` (its cards) are how a job starts,
        # not params.yaml keys
        stages[cmd] = Stage(
            job["rule"],
            tuple(sorted(job["input"])),
            tuple(sorted(job["output"])),
            tuple(sorted(set(rules[job["rule"]]["params"]) - {"launcher", "gpu_slot"})),
        )
    return stages


@pytest.fixture(scope="module")
def dvc():
    return dvc_side()


@pytest.fixture(scope="module")
def smk():
    return snakemake_side()


# ---------------------------------------------------------------------------------- tests
def test_same_commands(dvc, smk):
    stages, _ = dvc
    only_dvc = sorted(set(stages) - set(smk))
    only_smk = sorted(set(smk) - set(stages))
    assert not only_dvc and not only_smk, f"only in dvc.yaml: {only_dvc}\nonly in the Snakefile: {only_smk}"
    # download, pretrain, 2 probes, 2 finetunes, 4 evaluates, corruptions, 4 corruption
    # evaluations, transfer, report
    assert len(stages) == 17


def same(dvc_stage: Stage, smk_stage: Stage, what: str) -> bool:
    if what == "inputs" and dvc_stage.name == "report":
        # dvc.yaml's report depends on the runs/ folder (one `dvc exp show` column instead of
        # 28); the Snakefile names the files it reads, all of them inside that folder.
        return dvc_stage.inputs == ("runs",) and all(i.startswith("runs/") for i in smk_stage.inputs)
    return getattr(dvc_stage, what) == getattr(smk_stage, what)


@pytest.mark.parametrize("what", ["name", "inputs", "outputs", "params"])
def test_same_stages(dvc, smk, what):
    stages, _ = dvc
    diff = {
        cmd: (getattr(stages[cmd], what), getattr(smk[cmd], what))
        for cmd in stages
        if cmd in smk and not same(stages[cmd], smk[cmd], what)
    }
    assert not diff, (
        "dvc.yaml vs Snakefile "
        + what
        + ":\n"
        + "\n".join(f"{c}\n  dvc: {d}\n  smk: {s}" for c, (d, s) in diff.items())
    )


def test_dag_shape(dvc, smk):
    """Every input is produced by another stage (except nothing: download has none; the
    report's runs/ folder holds what the others produce), and the file contract holds:
    the report reads every summary, log and curve file (not the headline metrics.json
    files, whose numbers the files beside them hold too, nor the severity.csv plot data,
    which it draws from corruptions.json)."""
    stages, _ = dvc
    produced = {o for st in stages.values() for o in st.outputs}
    for st in stages.values():
        missing = set(st.inputs) - produced - ({"runs"} if st.name == "report" else set())
        assert not missing, f"{st.name}: inputs nobody produces: {missing}"
    (report,) = [st for st in smk.values() if st.name == "report"]
    wanted = {
        o
        for st in stages.values()
        for o in st.outputs
        if o.endswith((".json", ".csv")) and not o.endswith(("/metrics.json", "/severity.csv"))
    }
    assert set(report.inputs) == wanted


def test_persist_outs_are_the_checkpoints_of_resuming_stages(dvc):
    stages, persist = dvc
    for cmd, st in stages.items():
        out = re.search(r"--out (\S+)", cmd).group(1)
        expected = (f"{out}/checkpoints",) if "--resume" in cmd.split() else ()
        assert persist[cmd] == expected, f"{st.name}: persist outs {persist[cmd]}, expected {expected}"
        assert (st.name in TRAINING) == bool(expected), st.name
        assert not any(o.startswith(f"{out}/checkpoints") for o in st.outputs), st.name


def test_every_knob_reaches_the_stages_that_need_it(dvc):
    """Declared as a param (so a change re-runs the stage) and passed with --set (so
    Snakemake's --config reaches amoc, and dvc.lock shows it) where it is read; absent
    where it is not (or a change would re-run stages for nothing)."""
    stages, _ = dvc
    values = yaml.safe_load((REPO / "params.yaml").read_text())
    for knob in KNOBS:
        for cmd, st in stages.items():
            needs = st.name in KNOB_STAGES[knob]
            assert (knob in st.params) == needs, f"{st.name}: param {knob} declared={knob in st.params}, needed={needs}"
            assert (f"--set {knob}={values[knob]}" in cmd) == needs, f"{st.name}: --set {knob} in {cmd!r}"
    for st in stages.values():
        assert not set(st.params) & set(HOW_NOT_WHAT), f"{st.name} declares a how-not-what param: {st.params}"


def test_a_changed_knob_reaches_both_engines(tmp_path, dvc):
    """`dvc exp run -S queue_size=N` rewrites params.yaml and DVC re-resolves ${queue_size};
    `snakemake --config queue_size=N` changes only the config, which the rule passes on."""
    for name in ("dvc.yaml", "Snakefile", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "workflow", tmp_path / "workflow")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.update(queue_size=4096, variant="AAA", leverage=0.25, seed=7)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    changed, _ = dvc_side(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    overridden = snakemake_side("--config", "queue_size=4096", "variant=AAA", "leverage=0.25", "seed=7", root=tmp_path)
    assert set(changed) == set(overridden)
    (pretrain,) = [c for c, st in changed.items() if st.name == "pretrain"]
    assert "--set variant=AAA --set queue_size=4096 --set leverage=0.25 --set seed=7" in pretrain
    assert set(changed) != set(dvc[0])


# ------------------------------------------------- declared params vs what the code reads
# A read of `cfg.runtime` (handed whole to amoc.runtime.setup) needs runtime.precision and
# runtime.attack_precision declared: the other runtime keys change how, not what
# (HOW_NOT_WHAT). Evaluation stages run setup(evaluation=True), which ignores the
# precision of training-time attacks.
RUNTIME_WHAT = {"runtime.precision", "runtime.attack_precision"}
EVALUATION_STAGES = {"evaluate", "evaluate_corruptions", "transfer"}
# finetune_aff shares `amoc finetune` with the scratch baseline, whose branch alone builds
# an encoder from model.arch / model.width; the pre-trained encoder file carries its own.
ONLY_OTHER_BRANCH = {"finetune_aff": {"model.arch", "model.width"}}


def _module_tree(module: str):
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return ast.parse(Path(spec.origin).read_text())


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def config_reads(target: str) -> set[str]:
    """Dotted Config keys read (as `cfg.x`, `cfg.x.y`, `self.cfg.x...`) by the functions
    and classes reachable by name from a stage's entry point, e.g. "amoc.downstream.probe:run".
    Static and name-based: it follows calls and references to amoc's own module-level
    functions and classes, which is how the stages are written."""
    import ast
    import dataclasses

    from amoc import config as config_mod

    fields = {f.name for f in dataclasses.fields(config_mod.Config)}
    props = {name: obj for name, obj in vars(config_mod.Config).items() if isinstance(obj, property)}

    def chain_reads(node, base_ok) -> set[str]:
        out = set()
        inner = {id(sub.value) for sub in ast.walk(node) if isinstance(sub, ast.Attribute)}  # cfg.x of cfg.x.y
        for sub in ast.walk(node):
            if not isinstance(sub, ast.Attribute):
                continue
            if base_ok(sub.value) and (sub.attr in props or (sub.attr in fields and id(sub) not in inner)):
                out.add(sub.attr)
            elif isinstance(sub.value, ast.Attribute) and base_ok(sub.value.value) and sub.value.attr in fields:
                out.add(f"{sub.value.attr}.{sub.attr}")
        return out

    def is_cfg(node) -> bool:
        return (isinstance(node, ast.Name) and node.id == "cfg") or (
            isinstance(node, ast.Attribute)
            and node.attr == "cfg"
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        )

    # Config properties read other fields (queue_size_adv = pretrain.queue_size_adv or queue_size).
    config_tree = _module_tree("amoc.config")
    prop_reads = {}
    for node in ast.walk(config_tree):
        if isinstance(node, ast.FunctionDef) and node.name in props:
            prop_reads[node.name] = chain_reads(node, lambda n: isinstance(n, ast.Name) and n.id == "self")

    reads, seen = set(), set()
    todo = [tuple(target.split(":"))]
    while todo:
        module, name = todo.pop()
        if (module, name) in seen or module in ("amoc.config", "amoc.cli"):
            continue
        seen.add((module, name))
        tree = _module_tree(module)
        if tree is None:
            continue
        defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        imports = {}
        for n in tree.body:
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("amoc"):
                for alias in n.names:
                    full = f"{n.module}.{alias.name}"
                    imports[alias.asname or alias.name] = (full, None) if _is_module(full) else (n.module, alias.name)
        node = defs.get(name)
        if node is None:
            continue
        reads |= chain_reads(node, is_cfg)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and sub.id != name:
                if sub.id in defs:
                    todo.append((module, sub.id))
                elif sub.id in imports and imports[sub.id][1] is not None:
                    todo.append(imports[sub.id])
            elif (
                isinstance(sub, ast.Attribute)
                and isinstance(sub.value, ast.Name)
                and sub.value.id in imports
                and imports[sub.value.id][1] is None
            ):
                todo.append((imports[sub.value.id][0], sub.attr))  # module.function
    for prop in [r for r in reads if r in prop_reads]:
        reads = (reads - {prop}) | prop_reads[prop]
    return reads


def _covers(declared: set[str], key: str) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def test_declared_params_match_what_the_code_reads(dvc):
    """Every param a stage's code reads is declared (or the stage would go stale without
    warning), and every declared param is read (or a change would re-run it for nothing)."""
    from amoc import cli

    stages, _ = dvc
    for cmd, st in stages.items():
        target = cli.STAGES[cmd.split()[1]][0]
        if cmd.split()[1] == "evaluate" and "--corruptions" in cmd.split():
            target = "amoc.evaluate.corruptions:run"  # cli.main routes it there
        reads = config_reads(target)
        reads = {r for r in reads if r not in HOW_NOT_WHAT and r != "runtime"} | (
            RUNTIME_WHAT if "runtime" in reads else set()
        )
        if st.name in EVALUATION_STAGES:
            reads.discard("runtime.attack_precision")
        reads -= ONLY_OTHER_BRANCH.get(st.name, set())
        declared = set(st.params)
        undeclared = sorted(r for r in reads if not _covers(declared, r))
        unread = sorted(
            d for d in declared if not any(r == d or r.startswith(d + ".") or d.startswith(r + ".") for r in reads)
        )
        assert not undeclared, f"{st.name} ({target}) reads {undeclared} but does not declare them"
        assert not unread, f"{st.name} ({target}) declares {unread} but never reads them"


def test_snakemake_lint_is_clean():
    """No lints at all, so a user's CI can run `snakemake --lint` (the launcher, `amoc` or
    torchrun under --config gpus=N, reaches the shell through `params:`)."""
    proc = snakemake("--lint", check=False)
    assert proc.returncode == 0 and "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_every_rule_has_a_log_and_the_conda_env():
    rules = rule_info()
    env = REPO / "workflow" / "envs" / "amoc.yaml"
    for name, info in rules.items():
        if name == "all":
            continue
        assert info["conda"], f"rule {name} has no conda: env"
        assert (Path(info["snakefile"]).parent / info["conda"]).resolve() == env, (name, info)


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower()


def test_conda_env_lists_every_runtime_dependency():
    from packaging.requirements import Requirement

    project = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "workflow" / "envs" / "amoc.yaml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {}
    for spec in conda + [p for p in pip if not p.startswith("-")]:
        name = _name(spec)
        listed[name] = spec
    conda_names = {"torch": "pytorch", "snakemake": "snakemake-minimal"}  # PyPI -> conda-forge
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = conda_names.get(req.name.lower(), req.name.lower())
        assert name in listed, f"workflow/envs/amoc.yaml lacks {dep!r} (as {name})"
        got = Requirement(listed[name].replace(name, req.name, 1) if name != req.name.lower() else listed[name])
        assert got.specifier == req.specifier, f"{dep!r} vs env {listed[name]!r}"
    py = next(d for d in conda if _name(d) == "python")
    assert py.startswith("python=3.1")
    # amoc itself, editable, from the repo root as seen from the env file's folder.
    (editable,) = [p for p in pip if p.startswith("-e ")]
    assert (env_dir := REPO / "workflow" / "envs").joinpath(editable[3:].strip(), "pyproject.toml").resolve() == (
        REPO / "pyproject.toml"
    ).resolve(), env_dir


def test_profiles_parse_and_the_default_profile_dry_runs():
    for name in ("default", "slurm"):
        cfg = yaml.safe_load((REPO / "workflow" / "profiles" / name / "config.yaml").read_text())
        assert isinstance(cfg, dict) and cfg.get("rerun-incomplete") is True, name
    slurm = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm"
    gpu_rules = {n for n in TRAINING + ("evaluate",)}
    assert gpu_rules <= set(slurm["set-resources"]), "every GPU rule needs its SLURM partition and time"
    out = snakemake("--workflow-profile", "workflow/profiles/default", "-n", "--forceall")
    assert "workflow specific profile workflow/profiles/default" in out.stderr + out.stdout


def test_slurm_profile_dry_runs():
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install snakemake-executor-plugin-slurm")
    out = snakemake("--workflow-profile", "workflow/profiles/slurm", "-n", "--forceall")
    assert "slurm_partition=gpu" in out.stdout and "gpu=1" in out.stdout
    assert "torchrun" not in out.stdout


def test_gpus_config_launches_the_training_jobs_through_torchrun_on_one_node():
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install snakemake-executor-plugin-slurm")
    out = snakemake("--workflow-profile", "workflow/profiles/slurm", "-n", "-p", "--forceall", "--config", "gpus=4")
    assert out.stdout.count("gpu=4") == 5 and "nodes=1" in out.stdout  # pretrain, slf, alf, aff, scratch
    jobs = parse_dry_run(out.stdout)
    launched = {
        job["rule"]
        for job in jobs
        if job["cmd"]
        and normalise(job["cmd"]).startswith("torchrun --standalone --nproc_per_node 4 --max-restarts 3 -m amoc ")
    }
    assert launched == set(TRAINING)
    # the same commands otherwise: the stages stay equal to dvc.yaml's, up to the launcher
    plain = {normalise(job["cmd"]) for job in jobs if job["cmd"]}
    torchrun = "torchrun --standalone --nproc_per_node 4 --max-restarts 3 -m amoc "
    assert {cmd.replace(torchrun, "amoc ") for cmd in plain} == {
        normalise(job["cmd"]) for job in parse_dry_run(snakemake("-n", "-p", "--forceall").stdout) if job["cmd"]
    }
