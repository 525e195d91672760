"""Resumable, checksum-verified HTTP download into a cache folder (for the ~2.9 GB *-C archives).

An extension of amoc.data.fetch (same chunking, timeout and hashing), kept apart so the
data stage stays unchanged. The file grows as `<cache>/<name>.part`, next to a small
`<name>.part.json` that records the URL and the expected digests. If the download
stops (network error, Ctrl-C), the part file stays; the next call asks the server for
the rest with an HTTP Range request and appends it. A server that ignores Range (200
instead of 206) restarts the file. Only a file whose digest matches is renamed to
`<cache>/<name>`; one that does not match is deleted, since more bytes cannot repair it.

The cache lives outside the stage's output folder because DVC and Snakemake delete a
failed stage's outputs: $AMOC_CACHE_DIR, else $XDG_CACHE_HOME/amoc, else ~/.cache/amoc.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from amoc.data.fetch import CHUNK, TIMEOUT_S, content_length, hash_file
from amoc.errors import DataError
from amoc.io import RunLock

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def cache_dir() -> Path:
    root = os.environ.get("AMOC_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "amoc"
    return Path(root).expanduser() / "downloads"


def download(
    url: str,
    expected: dict[str, str],
    *,
    key: str,
    progress: bool,
    folder: Path | None = None,
    also: tuple[str, ...] = (),
) -> tuple[Path, dict[str, str]]:
    """(local path of the verified file at `url`, its digests), downloading what is missing.

    expected: algorithm ("md5" | "sha256") -> lower-case hex digest; `key` names the
    params entry that holds it, for error messages; `also`: more digests to report
    (computed in the same pass over the file).
    """
    assert expected, "a download must be verified"
    folder = folder or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlsplit(url).path).name) or "download"
    final, part = folder / name, folder / f"{name}.part"
    record = folder / f"{name}.part.json"
    algorithms = tuple(sorted(set(expected) | set(also)))
    with RunLock(folder):
        if final.is_file():
            digests = hash_file(final, algorithms)
            if _matches(digests, expected):
                return final, digests
            final.unlink()  # another file of the same name, or a damaged one
        wanted = {"url": url, "expected": expected}
        if part.exists() and _read_json(record) != wanted:
            part.unlink()  # a leftover of another URL or digest: not ours to continue
        record.write_text(json.dumps(wanted))
        _fetch_into(url, part, progress)
        digests = hash_file(part, algorithms)
        if not _matches(digests, expected):
            part.unlink(missing_ok=True)
            record.unlink(missing_ok=True)
            raise DataError(
                f"{url}: checksum mismatch after download (expected {_fmt(expected)}); the partial "
                f"file was deleted - rerun to download again, or correct {key}"
            )
        part.replace(final)
        record.unlink(missing_ok=True)
        return final, digests


def _fetch_into(url: str, part: Path, progress: bool) -> None:
    """Append the missing bytes of `url` to `part` (restart it if the server cannot resume)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    received, total = 0, None
    try:
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # nothing left to send: the part is already whole
                return
            raise
        with response:
            if offset and response.status == 206:
                start, total = _content_range(response.headers.get("Content-Range", ""))
                if start != offset:
                    raise DataError(f"{url}: the server resumed at byte {start}, not {offset}; delete {part} and rerun")
            else:
                offset = 0  # a full response (200): start the file again
                total = content_length(response)
            with (
                open(part, "ab" if offset else "wb") as fh,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=part.name[:-5],
                    disable=not progress,
                    file=sys.stderr,
                    leave=False,
                ) as bar,
            ):
                while chunk := response.read(CHUNK):
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DataError(f"{url}: download failed with HTTP {exc.code} {exc.reason}; check corruptions.source") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise DataError(
            f"{url}: download interrupted at byte {offset + received} ({reason}); rerun to resume from {part}"
        ) from None
    if total is not None and offset + received != total:
        raise DataError(
            f"{url}: download interrupted at byte {offset + received} of {total}; rerun to resume from {part}"
        )


def _matches(actual: dict[str, str], expected: dict[str, str]) -> bool:
    return all(actual[a] == d for a, d in expected.items())


def _content_range(value: str) -> tuple[int, int | None]:
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if not m:
        raise DataError(f"unexpected Content-Range {value!r} in a 206 response; delete the .part file and rerun")
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(expected: dict[str, str]) -> str:
    return ", ".join(f"{a} {d}" for a, d in sorted(expected.items()))
