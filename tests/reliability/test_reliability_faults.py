"""Issue #8, in-process faults: writers that fail half way or hit a full disk, damaged and
hostile checkpoints handed to the CLI, missing data, CUDA out-of-memory.

(The real-process kill/stop/lock tests are in tests/reliability/test_reliability_kill.py.)
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_utils import write_prepared

from amoc import cli, io
from amoc.checkpoint import CheckpointManager
from amoc.errors import AmocError
from amoc.nets import build_encoder
from amoc.nets.classifier import Classifier, save_classifier
from amoc.nets.store import save_encoder
from amoc.runtime import oom_hint

PRETRAIN_SETS = [
    "runtime.device=cpu",
    "runtime.threads=1",
    "runtime.progress=false",
    "pretrain.batch_size=8",
    "pretrain.epochs=2",
    "pretrain.checkpoint_every=1",
    "pretrain.knn_k=5",
    "queue_size=16",
]
FAST = [
    "runtime.device=cpu",
    "runtime.threads=1",
    "runtime.progress=false",
    "probe.batch_size=8",
    "probe.epochs=1",
    "probe.milestones=[]",
    "finetune.batch_size=8",
    "finetune.epochs=1",
    "evaluate.n_images=8",
    "evaluate.batch_size=8",
    "evaluate.autoattack=false",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared", n_train=16, n_test=8)


def amoc(stage: str, params: Path, *args: str, sets=FAST) -> int:
    argv = [stage, "--params", str(params), *args]
    for item in sets:
        argv += ["--set", item]
    return cli.main(argv)


def one_line_error(capsys, stage: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"amoc {stage}: error: "), err
    return err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


class Payload:
    """Pickled code: unpickling it creates `marker` (under plain pickle it really does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------- atomic outputs
def test_torch_save_failing_half_way_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "encoder.pt"
    io.torch_save(path, {"w": torch.ones(3)})
    before = path.read_bytes()
    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half a file on disk, as if killed while writing
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        io.torch_save(path, {"w": torch.zeros(1000)})
    assert path.read_bytes() == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_full_disk_is_a_clear_error_and_the_previous_file_is_untouched(tmp_path, monkeypatch, where):
    """ENOSPC where a write can still meet it after write() returned: fsync (NFS and other
    delayed-allocation file systems) or the rename. (write() itself: the /dev/full and
    real tmpfs tests.)"""
    path = tmp_path / "metrics.json"
    io.write_json(path, {"v": 1})
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, where, lambda *a: (_ for _ in ()).throw(full))
    with pytest.raises(AmocError) as info:
        io.write_json(path, {"v": 2})
    monkeypatch.undo()
    assert re.fullmatch(
        rf"{re.escape(str(path))}: no space left on device while writing it \(needs 13 bytes, [\d.]+ [kMG]?B free\); "
        r"free disk space and rerun \(the previous file, if any, is untouched\)",
        str(info.value),
    ), str(info.value)
    assert json.loads(path.read_text()) == {"v": 1} and leftovers(tmp_path) == []


def test_real_full_disk_device_gives_enospc_through_torch_save(tmp_path, monkeypatch):
    """/dev/full fails every write with ENOSPC, as a full disk does. torch.save reports
    that as OSError(ENOSPC) only when it writes through a Python file object (amoc's
    torch_save does); given a path, its C++ writer raises RuntimeError('unexpected pos')."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OSError) as info, open("/dev/full", "wb") as fh:
        torch.save({"w": torch.zeros(10_000)}, fh)
    assert info.value.errno == errno.ENOSPC
    # end to end: the temp file's writes all go to /dev/full
    real_open = open

    def open_full(file, mode="r", *args, **kwargs):
        return (
            real_open("/dev/full", mode, *args, **kwargs)
            if str(file).endswith(".tmp") and "w" in mode
            else real_open(file, mode, *args, **kwargs)
        )

    monkeypatch.setattr("builtins.open", open_full)
    with pytest.raises(AmocError, match="no space left on device"):
        io.torch_save(tmp_path / "x.pt", {"w": torch.zeros(10_000)})
    monkeypatch.undo()
    assert not (tmp_path / "x.pt").exists() and leftovers(tmp_path) == []


def test_a_full_disk_anywhere_in_a_stage_is_one_line(params, tmp_path, monkeypatch, capsys):
    """ENOSPC outside amoc.io's writers (a folder, a temp folder, a library's own file) is
    still one line naming the file, exit 2; another OSError is not disguised as one."""

    def raising(exc):
        def run(cfg, args):
            raise exc

        return run

    argv = ["download", "--params", str(params), "--out", str(tmp_path / "o")]
    work = tmp_path / "work"
    monkeypatch.setattr("amoc.data.stage.run", raising(OSError(errno.ENOSPC, "No space left on device", str(work))))
    assert cli.main(argv) == 2
    assert re.fullmatch(
        rf"amoc download: error: {re.escape(str(work))}: no space left on device while writing it \([\d.]+ [kMG]?B "
        r"free\); free disk space and rerun \(the previous file, if any, is untouched\)",
        one_line_error(capsys, "download"),
    )
    monkeypatch.setattr("amoc.data.stage.run", raising(PermissionError(13, "Permission denied", str(work))))
    with pytest.raises(PermissionError):
        cli.main(argv)


def test_torch_save_writes_the_same_bytes_every_time(tmp_path):
    """Identical objects give identical files (DVC hashes outputs): the zip's inner folder
    name must not come from the random temp file name."""
    obj = {"w": torch.arange(10.0), "meta": {"a": 1}}
    io.torch_save(tmp_path / "a.pt", obj)
    io.torch_save(tmp_path / "b.pt", obj)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def full_disk_for(monkeypatch, name_part: str) -> None:
    """The temp files whose name holds `name_part` are written to /dev/full (ENOSPC on
    every write, as a full disk); everything else is written as usual."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    real_open = open

    def open_full(file, mode="r", *args, **kwargs):
        name = os.path.basename(str(file))
        full = name.endswith(".tmp") and name_part in name and "w" in mode
        return real_open("/dev/full" if full else file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_full)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path / "checkpoints", "f" * 16)
    first = manager.save(1, {"w": torch.ones(3)})
    full_disk_for(monkeypatch, "epoch-0002")
    with pytest.raises(AmocError, match=r"epoch-0002-step-000000-f+\.pt: no space left on device .*\(needs \d"):
        manager.save(2, {"w": torch.full((3,), 2.0)})
    monkeypatch.undo()
    assert manager.paths() == [first]
    assert torch.equal(manager.load_latest()["w"], torch.ones(3)) and leftovers(tmp_path) == []


def test_pretrain_on_a_full_disk_exits_2_and_resumes_later(params, data, tmp_path, monkeypatch, capsys):
    """ENOSPC when epoch 2's checkpoint is written: exit 2, one line, epoch 1's checkpoint
    intact, no encoder.pt; once there is space, --resume finishes from epoch 1. (On a real
    full tmpfs: test_reliability_disk_full.py.)"""
    out = tmp_path / "run"
    full_disk_for(monkeypatch, "epoch-0002")
    assert amoc("pretrain", params, "--data", str(data), "--out", str(out), sets=PRETRAIN_SETS) == 2
    err = one_line_error(capsys, "pretrain")
    assert "epoch-0002-step-000000" in err and "no space left on device" in err
    monkeypatch.undo()
    assert [p.name[:22] for p in sorted((out / "checkpoints").iterdir())] == ["epoch-0001-step-000000"]
    assert not (out / "encoder.pt").exists() and leftovers(out) == [] and not (out / ".amoc.lock").exists()
    assert amoc("pretrain", params, "--data", str(data), "--out", str(out), "--resume", sets=PRETRAIN_SETS) == 0
    assert "resuming at epoch 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- damaged / hostile inputs
@pytest.fixture
def encoder_file(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "encoder.pt"
    save_encoder(path, build_encoder(width=0.0625, mean=(0.5,) * 3, std=(0.25,) * 3), extra={"bn_branch": "adv"})
    return path


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def flip_bytes(path: Path) -> Path:
    """16 bytes inverted in the middle of the largest record of a zip file (a checkpoint's
    biggest tensor): bit rot or a bad copy, which leaves the file's length as it was."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    with open(path, "rb") as fh:  # the data starts after the record's local header
        fh.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
    middle = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    path.write_bytes(raw)
    return path


@pytest.fixture(scope="module")
def pipeline_files(params, data, tmp_path_factory) -> Path:
    """runs/pretrain/encoder.pt and runs/slf/classifier.pt (+ classifier_best.pt) where the
    pipeline keeps them, made once; tests copy them before damaging them."""
    runs = tmp_path_factory.mktemp("pipeline") / "runs"
    torch.manual_seed(0)
    encoder = build_encoder(width=0.0625, mean=(0.5,) * 3, std=(0.25,) * 3)
    save_encoder(runs / "pretrain" / "encoder.pt", encoder, extra={"bn_branch": "adv"})
    argv = ["--mode", "slf", "--encoder", str(runs / "pretrain" / "encoder.pt"), "--data", str(data)]
    assert amoc("probe", params, *argv, "--out", str(runs / "slf")) == 0
    return runs


@pytest.fixture
def runs(pipeline_files, tmp_path) -> Path:
    """A fresh copy of pipeline_files for one test to damage."""
    shutil.copytree(pipeline_files, tmp_path / "runs", ignore=shutil.ignore_patterns("checkpoints", ".*"))
    return tmp_path / "runs"


PRETRAIN_HINT = "re-make it with `dvc repro -f -s pretrain` (or `amoc pretrain`)"
SLF_HINT = "re-make it with `dvc repro -f -s probe@slf` (or `amoc probe --mode slf`)"


def test_the_remake_hints_name_the_dvc_stages_that_write_the_files(repo_root):
    """Each hint's `dvc repro -f -s STAGE` names a stage of dvc.yaml that has the file
    among its outputs (so that renaming a stage there fails here)."""
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]

    def outs(name: str) -> list[str]:
        base, _, item = name.partition("@")
        stage = stages[base]
        if item:  # foreach: the item's resolved body
            stage = yaml.safe_load(yaml.safe_dump(stage["do"]).replace("${item}", item))
        return [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]

    files = ["data/prepared/train.npz", "data/prepared/stats.json", "runs/pretrain/encoder.pt"]
    files += [
        f"runs/{m}/{f}" for m in ("slf", "alf", "aff", "scratch") for f in ("classifier.pt", "classifier_best.pt")
    ]
    for path in files:
        stage = re.search(r"`dvc repro -f -s (\S+)`", io.remake_hint(path))[1]
        assert any(path == o or path.startswith(o + "/") for o in outs(stage)), (path, stage)


@pytest.mark.parametrize("stage", ["probe", "finetune"])
def test_truncated_encoder_is_one_line_exit_2(params, data, runs, tmp_path, capsys, stage):
    encoder = _truncate(runs / "pretrain" / "encoder.pt")
    flag = ["--mode", "slf", "--encoder"] if stage == "probe" else ["--init"]
    capsys.readouterr()
    assert amoc(stage, params, *flag, str(encoder), "--data", str(data), "--out", str(tmp_path / "o")) == 2
    assert one_line_error(capsys, stage) == (
        f"amoc {stage}: error: {encoder}: truncated or corrupt file (RuntimeError); {PRETRAIN_HINT}"
    )
    assert not (tmp_path / "o").exists()  # nothing written, not even the output folder


def test_truncated_classifier_is_one_line_exit_2(params, data, runs, tmp_path, capsys):
    model = _truncate(runs / "slf" / "classifier.pt")
    capsys.readouterr()
    assert amoc("evaluate", params, "--model", str(model), "--data", str(data), "--out", str(tmp_path / "e")) == 2
    assert one_line_error(capsys, "evaluate") == (
        f"amoc evaluate: error: {model}: truncated or corrupt file (RuntimeError); {SLF_HINT}"
    )
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("stage, split", [("pretrain", "train"), ("probe", "train"), ("evaluate", "test")])
def test_truncated_prepared_data_is_one_line_exit_2(params, data, runs, tmp_path, capsys, stage, split):
    prepared = tmp_path / "prepared"
    shutil.copytree(data, prepared)
    _truncate(prepared / f"{split}.npz")
    args = {
        "pretrain": [],
        "probe": ["--mode", "slf", "--encoder", str(runs / "pretrain" / "encoder.pt")],
        "evaluate": ["--model", str(runs / "slf" / "classifier.pt")],
    }[stage]
    sets = PRETRAIN_SETS if stage == "pretrain" else FAST
    capsys.readouterr()
    assert amoc(stage, params, *args, "--data", str(prepared), "--out", str(tmp_path / "o"), sets=sets) == 2
    assert one_line_error(capsys, stage) == (
        f"amoc {stage}: error: {prepared / f'{split}.npz'}: unreadable prepared data (BadZipFile); re-make it with "
        f"`dvc repro -f -s download` (or `amoc download --out {prepared}`)"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["encoder", "classifier"])
def test_flipped_bytes_in_a_model_file_are_one_line_exit_2(params, data, runs, tmp_path, capsys, kind):
    """Bytes flipped inside a tensor: torch.load reads such a file without complaint (other
    weights, silently); the zip's CRC-32 catches it."""
    if kind == "encoder":
        path, stage, args, hint = (
            runs / "pretrain" / "encoder.pt",
            "probe",
            ["--mode", "slf", "--encoder"],
            PRETRAIN_HINT,
        )
    else:
        path, stage, args, hint = runs / "slf" / "classifier.pt", "evaluate", ["--model"], SLF_HINT
    flip_bytes(path)
    capsys.readouterr()
    assert amoc(stage, params, *args, str(path), "--data", str(data), "--out", str(tmp_path / "o")) == 2
    assert re.fullmatch(
        rf"amoc {stage}: error: {re.escape(str(path))}: corrupt file \(CRC-32 mismatch in its record "
        rf"archive/data/\d+: bytes changed on disk or in transfer\); {re.escape(hint)}",
        one_line_error(capsys, stage),
    )
    assert not (tmp_path / "o").exists()


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(params, data, tmp_path, capsys):
    """Epoch 2's checkpoint with flipped bytes: --resume warns, naming it, resumes from
    epoch 1's and ends with the weights and log of the uninterrupted run."""
    out = tmp_path / "run"
    assert amoc("pretrain", params, "--data", str(data), "--out", str(out), sets=PRETRAIN_SETS) == 0
    first = {k: v.clone() for k, v in io.torch_load(out / "encoder.pt")["state_dict"].items()}
    log = (out / "log.csv").read_text()
    newest = flip_bytes(sorted((out / "checkpoints").glob("epoch-0002-*"))[0])
    capsys.readouterr()
    assert amoc("pretrain", params, "--data", str(data), "--out", str(out), "--resume", sets=PRETRAIN_SETS) == 0
    err = capsys.readouterr().err
    assert re.search(
        rf"^warning: {re.escape(str(newest))}: corrupt file \(CRC-32 mismatch in its record archive/data/\d+: "
        r"bytes changed on disk or in transfer\); delete it; falling back to an older checkpoint$",
        err,
        re.M,
    ), err
    assert "pretrain: resuming at epoch 2, step 0" in err
    second = io.torch_load(out / "encoder.pt")["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    strip = lambda text: [row.split(",")[:5] for row in text.splitlines()]  # noqa: E731 (timing columns aside)
    assert strip((out / "log.csv").read_text()) == strip(log)
    assert io.torch_load(newest)["epoch"] == 2  # written again, whole


@pytest.mark.parametrize("what", ["width", "classes"])
def test_a_classifier_made_with_other_params_is_refused(params, data, runs, tmp_path, capsys, what):
    """A classifier.pt of another encoder width than model.width, or of another number of
    classes than the data set: stale (another experiment's, or from before a params
    change); one line naming it and the stage that makes it again; nothing written."""
    model = runs / "slf" / "classifier.pt"
    if what == "width":
        sets, expected = FAST + ["model.width=0.125"], "a classifier of width 0.0625, but params say model.width 0.125"
        folder = data
    else:
        sets, folder = FAST, write_prepared(tmp_path / "three", n_train=16, n_test=8, classes=3)
        expected = f"a classifier of 4 classes, but the data set {folder} has 3"
    capsys.readouterr()
    assert (
        amoc("evaluate", params, "--model", str(model), "--data", str(folder), "--out", str(tmp_path / "e"), sets=sets)
        == 2
    )
    err = one_line_error(capsys, "evaluate")
    assert err.startswith(f"amoc evaluate: error: {model}: {expected}; it was made ") and err.endswith(SLF_HINT), err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("reader", ["evaluate: classifier_best.pt", "evaluate --corruptions", "transfer"])
def test_every_reader_of_a_classifier_refuses_one_made_with_other_params(params, data, runs, tmp_path, capsys, reader):
    """The check above guards every stage that reads a classifier the DAG made: the best
    epoch's classifier_best.pt beside classifier.pt, the corruption evaluation and each
    model of the transfer matrix. One line naming the file and its stage; nothing written."""
    model, out = runs / "slf" / "classifier.pt", tmp_path / "o"
    stale, width, stage = model, 0.125, reader.split(":")[0].split()[0]
    if reader == "evaluate: classifier_best.pt":  # classifier.pt is right, the best epoch's file is not
        stale, width = model.with_name("classifier_best.pt"), 0.0625
        save_classifier(stale, Classifier(build_encoder(width=0.125, mean=(0.5,) * 3, std=(0.25,) * 3), 4))
        args = ["--model", str(model), "--data", str(data)]
    elif reader == "evaluate --corruptions":
        assert amoc("corruptions", params, "--data", str(data), "--out", str(tmp_path / "c")) == 0
        args = ["--corruptions", str(tmp_path / "c"), "--model", str(model), "--data", str(data)]
    else:
        args = ["--runs", str(runs), "--models", "slf", "--data", str(data)]
    sets = FAST + [f"model.width={width}", "transfer.sources=[slf]", "transfer.n_images=8"]
    capsys.readouterr()
    assert amoc(stage, params, *args, "--out", str(out), sets=sets) == 2
    err = one_line_error(capsys, stage)
    found = 0.125 if width == 0.0625 else 0.0625
    expected = f"{stale}: a classifier of width {found:g}, but params say model.width {width:g}; it was made "
    assert err.startswith(f"amoc {stage}: error: {expected}") and err.endswith(SLF_HINT), err
    assert not out.exists()


def test_payload_runs_under_plain_pickle(tmp_path):
    """Control: the payload is real (so its absence below means it was refused)."""
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"x": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("stage", ["probe", "finetune", "evaluate"])
def test_pickled_code_given_to_a_stage_is_refused(params, data, encoder_file, tmp_path, capsys, stage):
    marker, evil = tmp_path / "marker", tmp_path / "evil.pt"
    blob = torch.load(encoder_file, weights_only=True)
    blob["extra"] = Payload(marker)
    torch.save(blob, evil)
    flag = {"probe": ["--mode", "slf", "--encoder"], "finetune": ["--init"], "evaluate": ["--model"]}[stage]
    assert amoc(stage, params, *flag, str(evil), "--data", str(data), "--out", str(tmp_path / "o")) == 2
    err = one_line_error(capsys, stage)
    assert (
        f"{evil}: refused to load: it holds more than tensors and plain data (Unsupported global: GLOBAL io.open)"
        in err
    )
    assert "only checkpoints written by amoc are accepted" in err
    assert not marker.exists()


def test_pickled_code_as_resume_checkpoint_is_skipped_never_run(params, data, tmp_path, capsys):
    """The newest checkpoint is replaced by one carrying code (same name): --resume warns,
    falls back to the older one and finishes; the payload never runs."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    assert amoc("pretrain", params, "--data", str(data), "--out", str(out), sets=PRETRAIN_SETS) == 0
    newest = sorted((out / "checkpoints").glob("epoch-*.pt"))[-1]
    blob = torch.load(newest, weights_only=True)
    blob["log"] = Payload(marker)
    torch.save(blob, newest)
    capsys.readouterr()
    assert amoc("pretrain", params, "--data", str(data), "--out", str(out), "--resume", sets=PRETRAIN_SETS) == 0
    err = capsys.readouterr().err
    assert f"warning: {newest}: refused to load" in err and "falling back to an older checkpoint" in err
    assert "resuming at epoch 2" in err
    assert not marker.exists()


# ----------------------------------------------------------------------------- missing inputs
@pytest.mark.parametrize("stage", ["pretrain", "probe", "finetune", "evaluate"])
def test_missing_dataset_is_a_clear_error(params, encoder_file, tmp_path, capsys, stage):
    missing = tmp_path / "nowhere"
    args = {
        "pretrain": [],
        "probe": ["--mode", "slf", "--encoder", str(encoder_file)],
        "finetune": ["--init", "scratch"],
        "evaluate": ["--model", str(encoder_file)],
    }[stage]
    code = amoc(
        stage,
        params,
        *args,
        "--data",
        str(missing),
        "--out",
        str(tmp_path / "o"),
        sets=PRETRAIN_SETS if stage == "pretrain" else FAST,
    )
    assert code == 2
    err = one_line_error(capsys, stage)
    if stage == "evaluate":  # reads the model first: an encoder is not a classifier
        assert "not an amoc classifier" in err
    else:
        assert f"{missing}/" in err and "not found; run `amoc download --out" in err


def test_missing_encoder_is_a_clear_error(params, data, tmp_path, capsys):
    missing = tmp_path / "runs" / "encoder.pt"
    assert (
        amoc(
            "probe",
            params,
            "--mode",
            "slf",
            "--encoder",
            str(missing),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
        )
        == 2
    )
    assert one_line_error(capsys, "probe") == (
        f"amoc probe: error: {missing}: checkpoint not found; run the stage that writes it first"
    )


# ----------------------------------------------------------------------------- resources
def test_oom_hint_names_the_batch_size_and_the_override():
    with pytest.raises(AmocError) as info:
        with oom_hint("pretrain", "pretrain.batch_size", 512):
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)\nmore text"
            )
    message = str(info.value)
    assert message == (
        "pretrain: out of GPU memory at batch size 512 (CUDA out of memory. Tried to allocate 2.00 GiB "
        "(GPU 0; 79.1 GiB total)); lower it with --set pretrain.batch_size=256, or free the GPU"
    )
    assert info.value.exit_code == 2 and info.value.__cause__ is None


def test_oom_hint_lets_everything_else_through():
    with oom_hint("probe", "probe.batch_size", 8):
        pass
    with pytest.raises(RuntimeError, match="not an OOM"):
        with oom_hint("probe", "probe.batch_size", 8):
            raise RuntimeError("not an OOM")
    with pytest.raises(AmocError, match=r"batch size 1 .*probe.batch_size=1,"):
        with oom_hint("probe", "probe.batch_size", 1):
            raise torch.OutOfMemoryError("CUDA out of memory")
