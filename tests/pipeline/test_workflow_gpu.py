"""GPU jobs of the Snakemake workflow, checked on the CPU (issue 25, items 1 and 8).

1. SLURM: every rule that asks for a GPU lands in the GPU partition, with its own time,
   memory and cores (the profile's default partition is the CPU one, where sbatch
   refuses or parks a job that asks for --gpus).
2. One card per job: every GPU rule's command runs through workflow/scripts/gpu_slot.py,
   which claims free cards from a lock folder and sets CUDA_VISIBLE_DEVICES, so
   `snakemake --resources gpu=4` on a 4-GPU machine runs four jobs on four cards instead
   of four jobs on cuda:0. Four cards are simulated (`--config gpu_ids=...`, the
   parent's CUDA_VISIBLE_DEVICES or a fake nvidia-smi); jobs record what they were given.

The dry-run helpers come from test_pipeline_parity.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_pipeline_parity as parity
import yaml

REPO = parity.REPO
SLOT = REPO / "workflow" / "scripts" / "gpu_slot.py"
SLURM = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
WRAPPER = re.compile(r"^python3 workflow/scripts/gpu_slot\.py (?:--ids \S+ )?(\d+) -- ")
pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------ helpers
def dry_run_jobs(*args: str, root: Path = REPO) -> list[dict]:
    """parity.parse_dry_run's jobs of `snakemake -n -p --forceall *args`, each with its
    resources as Snakemake resolved them ({name: value as printed})."""
    text = parity.snakemake("-n", "-p", "--forceall", *args, cwd=root).stdout
    jobs = parity.parse_dry_run(text)
    resources = []
    for line in text.splitlines():
        if re.match(r"^(?:local)?rule \w+:$", line):
            resources.append({})
        elif resources and (m := re.match(r"^\s+resources: (.*)$", line)):
            resources[-1].update(item.strip().split("=", 1) for item in m.group(1).split(", "))
    assert len(resources) == len(jobs)
    for job, res in zip(jobs, resources):
        job["resources"] = res
    return jobs


def gpus(job: dict) -> int:
    return int(job["resources"].get("gpu", 0))


def slurm_args() -> tuple[str, ...]:
    """The SLURM profile; without the SLURM plugin, the local executor resolves the same
    profile resources (default-resources, set-resources) for the dry run."""
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401

        return ("--workflow-profile", "workflow/profiles/slurm")
    except ImportError:
        return ("--workflow-profile", "workflow/profiles/slurm", "--executor", "local")


def no_gpu_env(tmp_path: Path, **env: str) -> dict[str, str]:
    """An environment without GPUs: no CUDA_VISIBLE_DEVICES and an nvidia-smi that fails
    (so a real one on the machine running the tests is not seen)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "AMOC_GPU_SLOTS_DIR")}
    base["PATH"] = f"{fake}{os.pathsep}{parity.BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**base, **env}


# (gives up after about 60 s, so that a failed test leaves no process behind for long)
RECORD = (
    'echo "${CUDA_VISIBLE_DEVICES-unset} ${CUDA_DEVICE_ORDER-unset}" > "$1.cvd"; i=0; '
    'while [ ! -e "$1.go" ] && [ $i -lt 3000 ]; do sleep 0.02; i=$((i + 1)); done'
)


def start(tmp_path: Path, name: str, n: int = 1, *opts: str, env: dict[str, str]) -> subprocess.Popen:
    """gpu_slot.py [opts] n -- a shell that records what it was given in <name>.cvd, then
    waits for <name>.go to exist."""
    job = str(tmp_path / name)
    cmd = [sys.executable, str(SLOT), "--dir", str(tmp_path / "slots"), *opts, str(n), "--", "sh", "-c", RECORD]
    return subprocess.Popen([*cmd, "job", job], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def given(tmp_path: Path, name: str, timeout: float = 20.0) -> str | None:
    """The CUDA_VISIBLE_DEVICES job <name> started with, or None if it has not started."""
    path = tmp_path / f"{name}.cvd"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text().split()[0]
        time.sleep(0.02)
    return None


def finish(tmp_path: Path, name: str, proc: subprocess.Popen) -> tuple[int, str]:
    (tmp_path / f"{name}.go").touch()
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


# ----------------------------------------------------------------- 1. SLURM partitions
@pytest.mark.parametrize("config", [(), ("--config", "gpus=4")], ids=["gpus=1", "gpus=4"])
def test_every_gpu_job_gets_the_gpu_partition_on_slurm(config):
    """The effective resources of the SLURM dry run (Snakemake's own resolution of the
    profile): a job that asks for gpu=N is in the GPU partition, never the default CPU
    one, and has the time, memory and cores set for it rather than the defaults."""
    profile = yaml.safe_load(SLURM.read_text())
    default = profile["default-resources"]
    gpu_partition = profile["set-resources"]["pretrain"]["slurm_partition"]
    assert gpu_partition != default["slurm_partition"]
    jobs = dry_run_jobs(*slurm_args(), *config)
    gpu_jobs = [job for job in jobs if gpus(job) > 0]
    # pretrain, 2 probes, 2 finetunes, 4 evaluate, 4 evaluate_corruptions, transfer
    assert len(gpu_jobs) == 14
    wrong = sorted({job["rule"] for job in gpu_jobs if job["resources"].get("slurm_partition") != gpu_partition})
    assert not wrong, (
        f"rules asking for a GPU but not in the SLURM partition {gpu_partition!r}: {wrong} "
        f"(the default partition is {default['slurm_partition']!r})"
    )
    for job in gpu_jobs:
        set_here = profile["set-resources"][job["rule"]]
        for key in ("runtime", "mem_mb", "cpus_per_task"):
            assert key in set_here, f"{job['rule']}: no {key} in the SLURM profile's set-resources"
            assert job["resources"][key] == str(set_here[key]), (job["rule"], key, job["resources"])
    cpu_jobs = {job["rule"] for job in jobs if gpus(job) == 0}
    assert cpu_jobs == {"download", "corruptions", "report", "all"}
    assert all(job["resources"]["slurm_partition"] == default["slurm_partition"] for job in jobs if gpus(job) == 0)


# -------------------------------------------------------- 2. one card per job: dry run
@pytest.mark.parametrize(
    "config", [(), ("--config", "gpus=4"), ("--config", "gpu_ids=0,1,2,3")], ids=["gpus=1", "gpus=4", "ids"]
)
def test_every_gpu_job_runs_through_the_slot_wrapper(config):
    """Each job that asks for gpu=N starts as `python3 workflow/scripts/gpu_slot.py N -- ...`
    (N as reserved from the scheduler), and only those jobs."""
    jobs = dry_run_jobs(*config)
    for job in jobs:
        if job["rule"] == "all":
            continue
        match = WRAPPER.match(job["cmd"])
        if gpus(job) == 0:
            assert match is None, f"{job['rule']} asks for no GPU but claims one: {job['cmd']}"
            continue
        assert match, f"{job['rule']} asks for gpu={gpus(job)} but does not claim its cards: {job['cmd']}"
        assert int(match.group(1)) == gpus(job), (job["rule"], job["cmd"], job["resources"])
        if "gpu_ids=0,1,2,3" in config:
            assert job["cmd"].startswith("python3 workflow/scripts/gpu_slot.py --ids 0,1,2,3 ")
    assert sum(gpus(job) > 0 for job in jobs) == 14


# ----------------------------------------- 2. one card per job: four real jobs at once
def fake_workspace(tmp_path: Path) -> Path:
    """A copy of the workflow whose `amoc` records the job's CUDA_VISIBLE_DEVICES and the
    time it ran, with the inputs of the four evaluate jobs in place."""
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("Snakefile", "params.yaml"):
        shutil.copy(REPO / name, ws / name)
    shutil.copytree(REPO / "workflow", ws / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    (ws / "data" / "prepared").mkdir(parents=True)
    for model in ("slf", "alf", "aff", "scratch"):
        (ws / "runs" / model).mkdir(parents=True)
        for name in ("classifier.pt", "classifier_best.pt"):
            (ws / "runs" / model / name).write_text("fake")
    amoc = tmp_path / "bin" / "amoc"
    amoc.parent.mkdir(exist_ok=True)
    amoc.write_text(
        "#!/bin/sh\n"
        "# fake `amoc evaluate ... --out DIR`: record the card, overlap with the other jobs\n"
        'out=""; while [ $# -gt 0 ]; do [ "$1" = --out ] && out="$2"; shift; done\n'
        'mkdir -p "$out"; start=$(date +%s.%N); sleep 3\n'
        'echo "{\\"cvd\\": \\"${CUDA_VISIBLE_DEVICES-unset}\\", \\"start\\": $start, \\"end\\": $(date +%s.%N)}"'
        ' > "$out/metrics.json"\n'
        'touch "$out/eval.json" "$out/curve.csv"\n'
    )
    amoc.chmod(0o755)
    return ws


@pytest.mark.parametrize("cards", ["config", "env"])
def test_four_gpu_jobs_at_once_get_four_cards(tmp_path, cards):
    """`snakemake --cores 16 --resources gpu=4` (an evaluate job has 4 threads) with four
    cards (`--config gpu_ids=0,1,2,3`, or CUDA_VISIBLE_DEVICES=4,5,6,7 from the parent as
    SLURM or a user sets it): the four evaluate jobs run at once, each on its own card."""
    import json

    ws = fake_workspace(tmp_path)
    config = ["--config", "gpu_ids=0,1,2,3"] if cards == "config" else []
    env = no_gpu_env(tmp_path, **({"CUDA_VISIBLE_DEVICES": "4,5,6,7"} if cards == "env" else {}))
    targets = [f"runs/{m}/eval/metrics.json" for m in ("slf", "alf", "aff", "scratch")]
    proc = subprocess.run(
        [parity.SNAKEMAKE, *targets, "--cores", "16", "--resources", "gpu=4", *config],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [json.loads((ws / t).read_text()) for t in targets]
    cvd = sorted(r["cvd"] for r in runs)
    expected = ["0", "1", "2", "3"] if cards == "config" else ["4", "5", "6", "7"]
    assert cvd == expected, f"the four jobs were given CUDA_VISIBLE_DEVICES {cvd}"
    assert max(r["start"] for r in runs) < min(r["end"] for r in runs), "the four jobs did not run at once"
    log = (ws / "logs" / "evaluate_slf.log").read_text()
    assert "gpu_slot: CUDA_VISIBLE_DEVICES=" in log  # the log says which card a job had
    # Other cards, or more GPUs per training job, re-run nothing (how, not what).
    again = subprocess.run(
        [parity.SNAKEMAKE, *targets, "-n", "--cores", "1", "--config", "gpu_ids=2,3", "gpus=2"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Nothing to be done" in again.stdout, again.stdout + again.stderr


# -------------------------------------------------------- 2. the slot wrapper by itself
@pytest.mark.parametrize("cards", ["ids", "env", "nvidia-smi"])
def test_four_cards_four_jobs_and_a_fifth_waits_for_a_free_card(tmp_path, cards):
    env = no_gpu_env(tmp_path)
    opts: tuple[str, ...] = ()
    if cards == "ids":
        opts = ("--ids", "0,1,2,3")
    elif cards == "env":
        env["CUDA_VISIBLE_DEVICES"] = "0,1,2,3"
    else:
        smi = "".join(f"echo 'GPU {i}: NVIDIA H200 (UUID: GPU-{i}aaa)'\n" for i in range(4))
        (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\n" + smi)
    jobs = {f"j{i}": start(tmp_path, f"j{i}", 1, *opts, env=env) for i in range(4)}
    ids = {name: given(tmp_path, name) for name in jobs}
    assert sorted(ids.values()) == ["0", "1", "2", "3"], ids
    if cards == "nvidia-smi":  # the indices are nvidia-smi's, in its (PCI bus) order
        assert (tmp_path / "j0.cvd").read_text().split()[1] == "PCI_BUS_ID"
    fifth = start(tmp_path, "j4", 1, "--poll", "0.05", *opts, env=env)
    assert given(tmp_path, "j4", timeout=1.0) is None, "a fifth job shared a card that another job holds"
    assert finish(tmp_path, "j2", jobs.pop("j2"))[0] == 0
    assert given(tmp_path, "j4") == ids["j2"], "the fifth job should get the card the third one freed"
    code, err = finish(tmp_path, "j4", fifth)
    assert code == 0 and "waiting for 1 free GPU" in err, err
    for name, proc in jobs.items():
        assert finish(tmp_path, name, proc)[0] == 0


def test_a_job_that_cannot_wait_is_refused_clearly(tmp_path):
    env = no_gpu_env(tmp_path, CUDA_VISIBLE_DEVICES="0,1")
    holders = [start(tmp_path, f"h{i}", 1, env=env) for i in range(2)]
    assert sorted(given(tmp_path, f"h{i}") for i in range(2)) == ["0", "1"]
    refused = subprocess.run(
        [sys.executable, str(SLOT), "--dir", str(tmp_path / "slots"), "--timeout", "0.3", "1", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 75, refused.stderr
    assert "no free GPU" in refused.stderr and f"pid {holders[0].pid}" in refused.stderr, refused.stderr
    too_many = subprocess.run(
        [sys.executable, str(SLOT), "--dir", str(tmp_path / "slots"), "3", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert too_many.returncode == 2 and "asks for 3 GPUs" in too_many.stderr, too_many.stderr
    for i, proc in enumerate(holders):
        assert finish(tmp_path, f"h{i}", proc)[0] == 0


def test_multi_gpu_jobs_get_disjoint_cards(tmp_path):
    env = no_gpu_env(tmp_path)
    a, b = (start(tmp_path, name, 2, "--ids", "0,1,2,3", env=env) for name in ("a", "b"))
    got_a, got_b = given(tmp_path, "a"), given(tmp_path, "b")
    assert len(got_a.split(",")) == len(got_b.split(",")) == 2
    assert sorted(got_a.split(",") + got_b.split(",")) == ["0", "1", "2", "3"]
    assert finish(tmp_path, "a", a)[0] == 0 and finish(tmp_path, "b", b)[0] == 0


def test_a_killed_job_frees_its_card(tmp_path):
    """The lock belongs to the job's command itself (the wrapper execs it): SIGKILL frees
    the card, and the lock file it leaves behind is reclaimed, not waited on."""
    env = no_gpu_env(tmp_path, CUDA_VISIBLE_DEVICES="7")
    first = start(tmp_path, "first", 1, env=env)
    assert given(tmp_path, "first") == "7"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert list((tmp_path / "slots").rglob("*.lock")), "expected the stale lock file to stay behind"
    second = start(tmp_path, "second", 1, "--timeout", "10", env=env)
    assert given(tmp_path, "second") == "7"
    assert finish(tmp_path, "second", second)[0] == 0


def test_without_gpus_the_wrapper_passes_through(tmp_path):
    """No CUDA_VISIBLE_DEVICES and no working nvidia-smi (the CPU tests, `make demo`):
    the command runs as it is, its exit status is the job's, and no lock folder is made."""
    env = no_gpu_env(tmp_path)
    proc = start(tmp_path, "cpu", 1, env=env)
    assert given(tmp_path, "cpu") == "unset"
    proc_code, err = finish(tmp_path, "cpu", proc)
    assert proc_code == 0 and err == ""
    failing = subprocess.run(
        [sys.executable, str(SLOT), "--dir", str(tmp_path / "slots"), "2", "--", "sh", "-c", "exit 3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert failing.returncode == 3
    assert not (tmp_path / "slots").exists()
    # an empty CUDA_VISIBLE_DEVICES hides every card: also no GPU, left as it is
    empty = subprocess.run(
        [sys.executable, str(SLOT), "1", "--", "sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"'],
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert empty.returncode == 0 and empty.stdout == "[]\n", empty.stdout + empty.stderr
