"""Issue 29, item 2: a disk that fills up mid-run, on a real device.

A 1.2 MB tmpfs is mounted for each test (root with mount rights; elsewhere the tests skip
and say why) and unmounted afterwards. What must hold: one line naming the file, the
space it needs and the space free; no truncated file under its final name; the previous
file intact (a checkpoint still loads); once space is freed the same command, with
--resume for training, carries on and ends with the result of an uninterrupted run.
"""

from __future__ import annotations

import csv
import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amoc import cli, io
from amoc.checkpoint import CheckpointManager
from amoc.errors import AmocError
from amoc.nets import build_encoder
from amoc.nets.store import load_encoder, save_encoder

SIZE = "1200k"  # the tiny preset's epoch checkpoint is 793 kB: room for one, not two
TIMING = {"seconds", "images_per_s"}
PRETRAIN_SETS = ["runtime.threads=1", "runtime.progress=false"]


def mount(folder: Path, *options: str) -> None:
    cmd = ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError((done.stderr.strip().splitlines() or [f"mount exited {done.returncode}"])[0])


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 1.2 MB tmpfs at tmp_path/disk, unmounted after the test."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux and mount(8) to make a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mount(disk, f"size={SIZE}")
    except OSError as exc:
        pytest.skip(f"cannot mount a {SIZE} tmpfs here ({exc}); the full-disk tests need root with mount rights")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def grow(disk: Path, size: str = "8m") -> None:
    """Free space: the tmpfs grows (files kept), as when the user deletes other files."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True, capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """A file that takes every free byte of `disk` but `leave`."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        fh.truncate(max(0, fh.tell() - leave))
    return filler


FULL = re.compile(
    r"(?P<path>\S+): no space left on device while writing it \(needs (?P<need>[\d.]+ (?:kB|MB|bytes)|more than .+ "
    r"written), (?P<free>[\d.]+ (?:kB|MB|bytes)) free\); free disk space and rerun \(the previous file, if any, is "
    r"untouched\)$"
)


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def test_each_writer_on_a_full_disk_keeps_the_previous_file_then_writes_once_space_is_freed(small_disk):
    """A checkpoint, the encoder, metrics.json: the write on a full disk fails with the
    line; the previous version loads unchanged; after `rm filler` the write succeeds."""
    torch.manual_seed(0)
    encoder = build_encoder(width=0.0625, mean=(0.5,) * 3, std=(0.25,) * 3)
    manager = CheckpointManager(small_disk / "checkpoints", "f" * 16)
    writers = {  # the file that version 2 goes to: writer
        manager.path(2): lambda v: manager.save(v, {"w": torch.full((1000,), float(v))}),
        small_disk / "encoder.pt": lambda v: save_encoder(small_disk / "encoder.pt", encoder, extra={"version": v}),
        small_disk / "metrics.json": lambda v: io.write_json(small_disk / "metrics.json", {"knn_acc": v}),
    }
    for write in writers.values():
        write(1)
    before = {p.name: p.read_bytes() for p in small_disk.rglob("*") if p.is_file()}
    filler = fill(small_disk)
    for path, write in writers.items():
        with pytest.raises(AmocError) as info:
            write(2)
        m = FULL.match(str(info.value))
        assert m and m["path"] == str(path), str(info.value)
    assert {p.name: p.read_bytes() for p in small_disk.rglob("*") if p.is_file() and p != filler} == before
    assert temps(small_disk) == []
    assert manager.load_latest()["epoch"] == 1 and json.loads((small_disk / "metrics.json").read_text()) == {
        "knn_acc": 1
    }
    load_encoder(small_disk / "encoder.pt")

    filler.unlink()  # space freed: the same writes succeed
    for write in writers.values():
        write(2)
    assert manager.load_latest()["epoch"] == 2 and [p.name[:10] for p in manager.paths()] == [
        "epoch-0002",
        "epoch-0001",
    ]
    assert json.loads((small_disk / "metrics.json").read_text()) == {"knn_acc": 2}


def test_download_on_a_full_disk_leaves_nothing_then_succeeds(small_disk, tmp_path, capsys):
    """The prepared data set: `amoc download` into a full disk writes nothing (all or
    nothing: no train.npz, no stats.json, no temp), exit 2; after freeing space it runs."""
    argv = ["download", "--params", str(tmp_path / "p.yaml"), "--out", str(small_disk / "prepared")]
    (tmp_path / "p.yaml").write_text("data:\n  name: digits\n  train_limit: 150\n  test_limit: 50\n")
    filler = fill(small_disk)  # not a byte left: the output folder or its lock fails
    capsys.readouterr()
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("amoc download: error: ") and FULL.match(line.removeprefix("amoc download: error: ")), line
    assert f"{small_disk}/prepared" in line, line
    assert sorted(p.name for p in small_disk.iterdir()) == [filler.name]
    filler.unlink()
    filler = fill(small_disk, leave=64 * 1024)  # room for the folder and its lock, not for the data
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("amoc download: error: ") and FULL.match(line.removeprefix("amoc download: error: ")), line
    assert "/prepared/train.npz: no space left on device while writing it (needs 462.5 kB," in line, line
    assert sorted(p.name for p in small_disk.iterdir()) == [filler.name]
    filler.unlink()
    assert cli.main(argv) == 0
    assert sorted(p.name for p in (small_disk / "prepared").iterdir()) == ["stats.json", "test.npz", "train.npz"]


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_pretrain_into_room_for_one_checkpoint_stops_clearly_and_resumes_identically(
    small_disk, params, digits_dir, tmp_path, capsys
):
    """The measured case: `amoc pretrain` (tiny preset, digits) into the 1.2 MB tmpfs.
    Epoch 2's checkpoint does not fit: exit 2 and one line (was a RuntimeError traceback
    from torch's zip writer); epoch 1's checkpoint loads; with space, --resume ends equal
    to an uninterrupted run."""

    def pretrain(out: Path, *extra: str) -> int:
        argv = ["pretrain", "--params", str(params), "--data", str(digits_dir), "--out", str(out), *extra]
        return cli.main(argv + [a for s in PRETRAIN_SETS for a in ("--set", s)])

    assert pretrain(tmp_path / "reference") == 0
    out = small_disk / "pretrain"
    capsys.readouterr()
    assert pretrain(out) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("amoc pretrain: error: "), err
    m = FULL.match(err[0].removeprefix("amoc pretrain: error: "))
    assert m and "/checkpoints/epoch-0002-step-000000-" in m["path"] and m["need"].endswith("kB"), err[0]
    (kept,) = sorted((out / "checkpoints").iterdir())
    assert kept.name.startswith("epoch-0001-step-000000-") and io.torch_load(kept)["epoch"] == 1
    assert not (out / "encoder.pt").exists() and not (out / ".amoc.lock").exists() and temps(out) == []

    grow(small_disk)
    assert pretrain(out, "--resume") == 0
    assert "resuming at epoch 2, step 0" in capsys.readouterr().err
    assert read_log(out / "log.csv") == read_log(tmp_path / "reference" / "log.csv")
    a = io.torch_load(tmp_path / "reference" / "encoder.pt")["state_dict"]
    b = io.torch_load(out / "encoder.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
