"""Archives with unsafe members are refused as a whole, and nothing is written anywhere."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from conftest import sha256_of

from amoc.data import safe_tar
from amoc.errors import DataError


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, None


def bad_members(tmp_path: Path) -> dict:
    return {
        "traversal": (_file("data/../../evil"), "'..'"),
        "traversal-top": (_file("../evil"), "'..'"),
        "traversal-backslash": (_file("data\\..\\..\\evil"), "'..'"),
        "absolute": (_file(str(tmp_path / "abs_evil")), "absolute path"),
        "symlink": (_special("data/train/cat/link.png", tarfile.SYMTYPE, "/etc/passwd"), "symlink"),
        "hardlink": (_special("data/train/cat/hard.png", tarfile.LNKTYPE, "data/train/cat/0.png"), "hardlink"),
        "char-device": (_special("data/dev", tarfile.CHRTYPE), "character device"),
        "block-device": (_special("data/blk", tarfile.BLKTYPE), "block device"),
        "fifo": (_special("data/fifo", tarfile.FIFOTYPE), "fifo"),
        "oversized": (_file("data/big.bin", bytes(int(1.5 * 2**20))), "data.max_member_mb=1"),
    }


def build(tmp_path: Path, make_image_tree, bad: tuple, first: bool) -> Path:
    """A valid image-folder archive (data/{train,test}/...) plus one bad member."""
    tree = make_image_tree(tmp_path / "tree", {"cat": (2, 1), "dog": (2, 1)})
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        if first:
            tar.addfile(bad[0], None if bad[1] is None else io.BytesIO(bad[1]))
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=f"data/{path.relative_to(tree).as_posix()}", recursive=False)
        if not first:
            tar.addfile(bad[0], None if bad[1] is None else io.BytesIO(bad[1]))
    return archive


@pytest.mark.parametrize("first", [True, False], ids=["bad-first", "bad-last"])
@pytest.mark.parametrize(
    "case",
    [
        "traversal",
        "traversal-top",
        "traversal-backslash",
        "absolute",
        "symlink",
        "hardlink",
        "char-device",
        "block-device",
        "fifo",
        "oversized",
    ],
)
def test_unsafe_member_refused(tmp_path, make_image_tree, run_download, case, first):
    member, needle = bad_members(tmp_path)[case]
    archive = build(tmp_path, make_image_tree, member, first)
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    code, out, err = run_download(
        "data.name=folder", f"data.source={archive}", f"data.sha256={sha256_of(archive)}", "data.max_member_mb=1"
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amoc download: error:"), err
    assert repr(member[0].name) in lines[0] and needle in lines[0]
    # nothing written: no output folder, no extracted file anywhere near
    assert not (tmp_path / "prepared").exists()
    assert not list(tmp_path.rglob("*evil*")) and not (tmp_path.parent / "evil").exists()
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before


def test_check_member_accepts_plain_files_and_folders(tmp_path):
    for info in (tarfile.TarInfo("a/b.png"), tarfile.TarInfo("./a/c.png")):
        safe_tar.check_member(info, tmp_path / "x.tar", 1 << 20)
    folder = tarfile.TarInfo("a/")
    folder.type = tarfile.DIRTYPE
    safe_tar.check_member(folder, tmp_path / "x.tar", 1 << 20)


def test_windows_drive_is_absolute(tmp_path):
    with pytest.raises(DataError, match="absolute path"):
        safe_tar.check_member(tarfile.TarInfo("C:/evil"), tmp_path / "x.tar", 1 << 20)


def test_not_a_tar(tmp_path, run_download):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip" * 10)
    code, _, err = run_download("data.name=folder", f"data.source={junk}", f"data.sha256={sha256_of(junk)}")
    assert code == 2 and "not a readable tar archive" in err


def test_truncated_archive(tmp_path, make_image_tree, run_download):
    from conftest import tar_folder

    archive = tar_folder(make_image_tree(tmp_path / "tree", {"cat": (50, 5)}), tmp_path / "a.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    code, _, err = run_download("data.name=folder", f"data.source={cut}", f"data.sha256={sha256_of(cut)}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "corrupt or truncated" in err or "truncated" in err
    assert not (tmp_path / "prepared").exists()
