"""Property test (issue #8): any tar archive - random member names with '..', absolute
paths, backslashes and drive letters, symlinks, hardlinks, devices, fifos, unknown types,
oversized members, headers that lie about the size, truncated or gzip-compressed
streams - given to the data stage's safe reader (amoc.data.safe_tar.iter_files, used by
the cifar and folder readers) either loads or raises one clean DataError line, never
another exception; an archive with any unsafe member is refused, one without is read in
full; and nothing is written outside (or inside) the temp folder.

(Params fuzzing: tests/test_fuzz_params.py. Fixed unsafe members: tests/data/test_data_safe_tar.py.)
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amoc.data import cifar, folder, safe_tar
from amoc.errors import DataError

MAX_BYTES = 64  # members above this are "huge" for the reader

segments = st.one_of(
    st.sampled_from(
        [
            "..",
            ".",
            "",
            "data",
            "train",
            "cat",
            "0.png",
            "C:",
            "c:",
            "~",
            "..\\..",
            "a\\..\\..",
            "..evil",
            "...",
            "con",
            " ",
        ]
    ),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), min_size=1, max_size=8),
)
names = st.builds(
    lambda lead, parts: lead + "/".join(parts),
    st.sampled_from(["", "", "", "/", "\\", "./", "C:\\", "//"]),
    st.lists(segments, min_size=1, max_size=4),
)
KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "contiguous": tarfile.CONTTYPE,
    "unknown": b"Z",
}
members = st.tuples(
    names,
    st.sampled_from(list(KINDS)),
    st.integers(0, 3 * MAX_BYTES),  # size; > MAX_BYTES is "huge"
    st.sampled_from(["", "../../etc/passwd", "/etc/passwd", "data/0.png"]),  # linkname
)
archives = st.fixed_dictionaries(
    {
        "members": st.lists(members, max_size=6),
        "compress": st.booleans(),
        "lie": st.none()
        | st.integers(1, MAX_BYTES)
        | st.integers(1, 10**12),  # declared size of the last file > its data
        "cut": st.none() | st.floats(0.0, 1.0),  # keep this fraction of the archive's bytes
    }
)


def build(spec: dict) -> bytes | None:
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, kind, size, linkname in spec["members"]:
                info = tarfile.TarInfo(name)
                info.type = KINDS[kind]
                info.linkname = linkname if kind in ("symlink", "hardlink") else ""
                info.size = size if kind in ("file", "contiguous", "unknown") else 0
                if kind in ("chr", "blk"):
                    info.devmajor, info.devminor = 1, 3
                tar.addfile(info, io.BytesIO(b"\x89" * info.size) if info.size else None)
            if spec["lie"] is not None:  # a header claiming more bytes than follow
                info = tarfile.TarInfo("data/liar.bin")
                info.size = spec["lie"]
                tar.fileobj.write(info.tobuf(tarfile.PAX_FORMAT, tar.encoding, tar.errors))
                tar.fileobj.write(b"x" * min(spec["lie"] // 2, 256))  # fewer bytes than declared, no end marker
    except (ValueError, UnicodeError, tarfile.TarError):
        return None  # tarfile cannot even write it: nothing to test
    raw = buf.getvalue()
    if spec["compress"]:
        raw = gzip.compress(raw, mtime=0)
    if spec["cut"] is not None:
        raw = raw[: int(len(raw) * spec["cut"])]
    return raw


def is_safe(name: str, kind: str, size: int) -> bool:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    absolute = name.startswith(("/", "\\")) or (len(name) >= 2 and name[1] == ":" and name[0].isalpha())
    regular = kind in ("file", "contiguous", "dir")  # tarfile counts CONTTYPE as a regular file
    nameless_file = kind in ("file", "contiguous") and not parts  # '', '.', './': no path to read
    return not absolute and ".." not in parts and regular and not nameless_file and size <= MAX_BYTES


def snapshot(outer: Path) -> list[str]:
    return sorted(str(p.relative_to(outer)) for p in outer.rglob("*"))


class Sandbox:
    """<fresh temp>/a/work/<archive>, the working directory in work/ while the reader
    runs: a member extracted by name ('x', '../x', '../../x') would show up in the fresh
    folder's listing, which must not change."""

    def __init__(self, raw: bytes, name: str) -> None:
        self.raw, self.name = raw, name

    def __enter__(self) -> Path:
        self._tmp = tempfile.TemporaryDirectory()
        self.outer = Path(self._tmp.name)
        work = self.outer / "a" / "work"
        work.mkdir(parents=True)
        self.archive = work / self.name
        self.archive.write_bytes(self.raw)
        self.before = snapshot(self.outer)
        self._cwd = os.getcwd()
        os.chdir(work)
        return self.archive

    def __exit__(self, *exc) -> None:
        os.chdir(self._cwd)
        try:
            if exc[0] is None:
                assert snapshot(self.outer) == self.before, "the reader wrote files"
        finally:
            self._tmp.cleanup()


def read_all(path: Path) -> list[tuple[str, ...]]:
    got = []
    for parts, reader in safe_tar.iter_files(path, MAX_BYTES):
        assert isinstance(reader(), bytes)
        got.append(parts)
    return got


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives)
def test_any_archive_loads_or_fails_with_one_data_error_line(spec):
    raw = build(spec)
    if raw is None:
        return
    with Sandbox(raw, "archive.tar") as archive:
        try:
            got = read_all(archive)
        except DataError as exc:
            message = str(exc)
            assert message and "\n" not in message and "\r" not in message
            assert message.startswith(str(archive))  # names the archive
            got = None
        intact = spec["cut"] is None and spec["lie"] is None
        all_safe = all(
            is_safe(n, k, s if k in ("file", "contiguous", "unknown") else 0) for n, k, s, _ in spec["members"]
        )
        if intact and not all_safe:
            assert got is None, f"an unsafe archive was read: {spec['members']}"
        if intact and all_safe:
            expected = [safe_tar.member_parts(n) for n, k, *_ in spec["members"] if k in ("file", "contiguous")]
            assert got == expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives)
def test_the_image_folder_reader_on_any_archive(spec):
    """One level up: data.name=folder reads the same archives into splits (the images
    are not valid PNGs, so what is not refused as unsafe fails to decode or lay out)."""
    raw = build(spec)
    if raw is None:
        return
    with Sandbox(raw, "archive.tar.gz") as archive:
        try:
            folder.read(archive, MAX_BYTES)
        except DataError as exc:
            assert str(exc) and "\n" not in str(exc)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives, st.sampled_from(["cifar10", "cifar100"]))
def test_the_cifar_reader_on_any_archive(spec, name):
    raw = build(spec)
    if raw is None:
        return
    with Sandbox(raw, "archive.tar.gz") as archive:
        try:
            cifar.read_archive(archive, name, MAX_BYTES)
        except DataError as exc:
            assert str(exc) and "\n" not in str(exc)


# A regular file named '', '.' or './' has no path parts; it once crashed the CIFAR reader.
@pytest.mark.parametrize("member", ["", ".", "./"])
def test_cifar_reader_file_member_named_dot(tmp_path, member):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    archive = tmp_path / "archive.tar.gz"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="file without a name"):
        cifar.read_archive(archive, "cifar10", MAX_BYTES)
