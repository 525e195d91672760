"""The download stage's output folder: all or nothing, locking, leftovers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from amoc.data import stage
from amoc.data.prepared import load_split, load_stats
from amoc.data.splits import channel_mean_std

OUTPUTS = ["stats.json", "test.npz", "train.npz"]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_outputs_readable_by_prepared(run_download, tmp_path):
    assert run_download("data.name=digits", "data.test_limit=7")[0] == 0
    x, y = load_split(tmp_path / "prepared", "test")
    assert tuple(x.shape) == (7, 3, 32, 32) and len(y) == 7
    assert load_stats(tmp_path / "prepared")["counts"]["test"] == 7
    assert names(tmp_path / "prepared") == OUTPUTS


def test_failure_while_writing_leaves_nothing(run_download, tmp_path, monkeypatch):
    def interrupted(path, obj):  # train.npz and test.npz are written by now
        assert (Path(path).parent / "train.npz").exists() and (Path(path).parent / "test.npz").exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "write_json", interrupted)
    code, _, err = run_download("data.name=digits")
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "prepared").exists()


def test_failure_removes_previous_outputs(run_download, tmp_path):
    assert run_download("data.name=digits")[0] == 0
    (tmp_path / "prepared" / "notes.txt").write_text("the user's own file")
    code, _, err = run_download("data.name=folder", "data.source=missing-folder")
    assert code == 2 and "does not exist" in err
    # no outputs that could be mistaken for this run's; other files are left alone
    assert names(tmp_path / "prepared") == ["notes.txt"]


def test_leftovers_of_killed_runs_are_cleaned(run_download, tmp_path):
    out = tmp_path / "prepared"
    (out / ".amoc-download-x1y2").mkdir(parents=True)
    (out / ".amoc-download-x1y2" / "cifar-10-python.tar.gz.part").write_bytes(b"half")
    (out / ".train.npz.abc123.tmp").write_bytes(b"half")
    (out / ".amoc.lock").write_text("999999999")  # its process is gone
    assert run_download("data.name=digits")[0] == 0
    assert names(out) == OUTPUTS


def test_live_lock_refused(run_download, tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / ".amoc.lock").write_text(str(os.getppid()))  # a live process that is not us
    code, _, err = run_download("data.name=digits")
    assert code == 2 and "another amoc run" in err
    assert names(out) == [".amoc.lock"]


def test_out_is_a_file(run_download, tmp_path):
    (tmp_path / "prepared").write_text("x")
    code, _, err = run_download("data.name=digits")
    assert code == 2 and "not a folder" in err


def test_channel_mean_std_exact():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5000, 3, 8, 8), dtype=np.uint8)
    mean, std = channel_mean_std(x, chunk=333)
    flat = x.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64) / 255
    assert np.allclose(mean, flat.mean(axis=1), rtol=0, atol=1e-12)
    assert np.allclose(std, flat.std(axis=1), rtol=0, atol=1e-12)
    assert channel_mean_std(np.full((2, 3, 4, 4), 255, np.uint8)) == ([1.0] * 3, [0.0] * 3)


def test_validation_split_is_balanced_disjoint_and_fixed_by_the_seed():
    from amoc.data.splits import validation_split

    labels = np.repeat(np.arange(10), [60, 50, 55, 52, 51, 58, 59, 50, 53, 62])
    np.random.default_rng(0).shuffle(labels)
    train, val = validation_split(labels, 103, seed=1)
    assert len(val) == 103 and len(train) + len(val) == len(labels)
    assert not set(train) & set(val) and list(val) == sorted(val)
    assert np.bincount(labels[val]).tolist() == [11, 11, 11] + [10] * 7
    again, other = validation_split(labels, 103, seed=1)[1], validation_split(labels, 103, seed=2)[1]
    assert np.array_equal(val, again) and not np.array_equal(val, other)
    assert len(validation_split(labels, 0, seed=1)[1]) == 0
    with pytest.raises(ValueError, match="class"):
        validation_split(labels, 500, seed=1)  # 50 of every class: class 1 has only 50
