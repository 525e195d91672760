"""Read tar archives without trusting them.

Nothing is ever extracted to disk: the data stage streams members into memory and
parses them there. Every member is still checked, because an archive that carries a
path-traversal name, a link or a device node was built by someone who meant harm (or
is not the archive the user thinks it is), and we would rather refuse it than guess.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import Iterator

from amoc.errors import DataError

_DRIVE = re.compile(r"^[A-Za-z]:")


def member_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name, '.' removed; backslashes count as separators
    too, because the same archive may be unpacked on Windows."""
    return tuple(p for p in re.split(r"[\\/]", name) if p not in ("", "."))


def check_member(member: tarfile.TarInfo, archive: Path, max_bytes: int) -> None:
    """Raise DataError unless `member` is a plain file or folder with a safe relative name."""
    name = member.name
    where = f"{archive}: member {name!r}"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise DataError(f"{where} has an absolute path; refusing the archive (use a trusted copy of the data set)")
    if ".." in member_parts(name):
        raise DataError(
            f"{where} contains '..' and would escape the target folder; refusing the archive (use a trusted "
            "copy of the data set)"
        )
    if member.issym() or member.islnk():
        kind = "symlink" if member.issym() else "hardlink"
        raise DataError(
            f"{where} is a {kind} (to {member.linkname!r}); links are not allowed in data archives, repack it "
            "without links"
        )
    if member.ischr() or member.isblk() or member.isfifo():
        kind = "character device" if member.ischr() else "block device" if member.isblk() else "fifo"
        raise DataError(f"{where} is a {kind}; only plain files and folders are allowed in data archives")
    if member.isfile() and not member_parts(name):
        raise DataError(f"{where} is a file without a name; refusing the archive (use a trusted copy of the data set)")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{where} has unsupported tar type {member.type!r}; only plain files and folders are allowed")
    if member.size > max_bytes:
        raise DataError(
            f"{where} is {member.size / 2**20:.1f} MiB, above data.max_member_mb={max_bytes // 2**20}; "
            "raise data.max_member_mb if the archive is trusted"
        )


def open_archive(path: Path) -> tarfile.TarFile:
    """Open a (possibly gz/bz2/xz compressed) tar for reading, or raise a DataError."""
    try:
        return tarfile.open(path, mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(
            f"{path}: not a readable tar archive ({type(exc).__name__}); "
            "check data.source points at a .tar.gz/.tgz/.tar file"
        ) from None


def iter_files(path: Path, max_bytes: int) -> Iterator[tuple[tuple[str, ...], "ReadMember"]]:
    """Yield (name parts, reader) for each plain file, in archive order, after checking
    every member (folders too). `reader()` returns the member's bytes and must be called
    before the iteration moves on, since compressed tars are read as one stream."""
    with open_archive(path) as tar:
        try:
            for member in tar:
                check_member(member, path, max_bytes)
                if member.isfile():
                    yield member_parts(member.name), ReadMember(tar, member, path)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:  # e.g. a truncated .gz
            raise DataError(
                f"{path}: corrupt or truncated archive ({type(exc).__name__}: {exc}); download it again"
            ) from None


class ReadMember:
    """Reads one member's bytes, converting tar/gzip failures into DataError."""

    def __init__(self, tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path) -> None:
        self.tar, self.member, self.archive = tar, member, archive

    def __call__(self) -> bytes:
        try:
            handle = self.tar.extractfile(self.member)
            data = handle.read() if handle is not None else b""
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise DataError(
                f"{self.archive}: member {self.member.name!r} is unreadable ({type(exc).__name__}); "
                "the archive is corrupt, download it again"
            ) from None
        if len(data) != self.member.size:
            raise DataError(f"{self.archive}: member {self.member.name!r} is truncated; download the archive again")
        return data
