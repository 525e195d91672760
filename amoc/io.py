"""Crash-safe file output and safe checkpoint loading.

Every file a stage writes goes to a temp file in the same folder, is fsynced and then
renamed, so a killed or failing stage never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from amoc.errors import AmocError, CheckpointError, LockedError


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (an encoder a run starts from or imports, the data it trains on)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT behind `exc`, also where a library re-raised it as something
    else (torch's zip writer turns it into RuntimeError('... unexpected pos ...'))."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on failure it is removed.

    A full disk (or quota) is one AmocError naming `path`, the space it needs (`size`, when
    the caller knows it; else more than what was written) and the space free."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        error = disk_full_error(exc, path, size if size is not None else -written)
        if error is None:
            raise
        raise error from None


def disk_full_error(exc: BaseException, path: str | os.PathLike | None = None, size: int = 0) -> AmocError | None:
    """The one-line AmocError for a full disk (or quota) behind `exc`, else None.

    `path`: the file being written (default: the error's own file name); `size`: the
    bytes it needs, or minus the bytes written when it failed (a lower bound)."""
    full = _disk_full(exc)
    if full is None:
        return None
    path = Path(path if path is not None else full.filename or ".")
    need = f"needs {_human(size)}, " if size > 0 else f"needs more than the {_human(-size)} written, " if size else ""
    where = path if path.is_dir() else path.parent
    while not where.exists() and where != where.parent:  # a folder removed on the way out
        where = where.parent
    try:
        free = f"{_human(shutil.disk_usage(where).free)} free"
    except OSError:
        free = "free space unknown"
    return AmocError(
        f"{path}: {_DISK_FULL[full.errno]} while writing it ({need}{free}); free disk space and rerun (the previous "
        "file, if any, is untouched)"
    )


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    with atomic_path(path, size=len(data)) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomic write through a function that writes to a given path (np.savez, savefig...)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    # Serialised in memory, then written: the size is known for a full disk's message, and
    # torch never names the zip's inner folder after a path's stem (the random temp name,
    # so identical runs wrote different bytes). Streamed to a file, a full disk surfaced
    # as torch's RuntimeError("... unexpected pos ..."), raised over the OSError(ENOSPC).
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


# The folder of a downstream model (runs/<folder>/classifier.pt) -> its stage in dvc.yaml
# (the Snakefile's rule has the name before "@") and the command that makes it by hand.
_MODEL_STAGES = {
    "slf": ("probe@slf", "amoc probe --mode slf"),
    "alf": ("probe@alf", "amoc probe --mode alf"),
    "aff": ("finetune_aff", "amoc finetune"),
    "scratch": ("finetune_scratch", "amoc finetune --init scratch"),
    "pretrain": ("pretrain", "amoc pretrain"),
}


def remake_hint(path: str | os.PathLike) -> str:
    """How to make `path` again, for an error about a damaged or stale input file: the
    pipeline stage that writes it (`dvc repro -f -s STAGE`: that stage only, forced) and
    the command by hand. A file of unknown origin gets the generic advice."""
    path = Path(path)
    stage = None
    if path.parent.name == "checkpoints":
        return "delete it"  # the stage resumes from an older checkpoint, or starts afresh
    if path.name in ("train.npz", "test.npz", "stats.json"):
        stage = ("download", f"amoc download --out {path.parent}")
    elif path.name == "encoder.pt":
        stage = ("pretrain", "amoc pretrain")
    elif path.name in ("classifier.pt", "classifier_best.pt"):
        stage = _MODEL_STAGES.get(path.parent.name)
    if stage is None:
        return "re-run the stage that writes it"
    return f"re-make it with `dvc repro -f -s {stage[0]}` (or `{stage[1]}`)"


def _check_crc(path: Path) -> None:
    """torch.load does not check the CRC-32s of a checkpoint's zip records: flipped bytes in
    a tensor load silently as other weights. Files without CRCs (all 0) are let through."""
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(info.CRC for info in zf.infolist() if info.file_size):
                return
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # not a zip (a legacy torch file) or cut short: torch.load reports it
    if bad is not None:
        raise CheckpointError(
            f"{path}: corrupt file (CRC-32 mismatch in its record {bad}: bytes changed on disk or in transfer); "
            f"{remake_hint(path)}"
        )


def refused_global(exc: pickle.UnpicklingError) -> str:
    """What torch.load(weights_only=True) refused, from its message: the line naming the
    global (torch's message starts with generic advice and ends advising to allow it)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if "Unsupported global" in ln or "WeightsUnpickler error" in ln]
    first = (named or lines or ["unsafe content"])[0].replace("WeightsUnpickler error: ", "")
    return first.split(" was not an allowed global")[0]


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with `weights_only=True`: tensors and plain data only, never code;
    its zip records' CRC-32s checked first."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run the stage that writes it first")
    _check_crc(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it holds more than tensors and plain data ({refused_global(exc)[:120]}); only "
            "checkpoints written by amoc are accepted"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt file ({type(exc).__name__}); {remake_hint(path)}"
        ) from None


@contextlib.contextmanager
def stage_outputs(out: str | os.PathLike, names: Sequence[str]) -> Iterator[Path]:
    """All-or-nothing output files `names` of a stage in folder `out`.

    Locks `out`, removes earlier versions of `names` and the temp files of killed runs, and
    on failure removes whatever this run wrote, and `out` itself if this run created it, so
    a later stage never reads a mix of runs or a half-written set."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AmocError(f"--out {out}: exists and is not a folder; choose another output folder")
    created = not out.exists()
    try:
        with RunLock(out):
            _remove_outputs(out, names)
            try:
                yield out
            except BaseException:
                _remove_outputs(out, names)
                raise
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only succeeds when nothing else was put there meanwhile
        raise


def _remove_outputs(out: Path, names: Sequence[str]) -> None:
    for name in names:
        (out / name).unlink(missing_ok=True)
        for leftover in out.glob(f".{name}.*.tmp"):  # atomic_path's temp names
            leftover.unlink(missing_ok=True)


class RunLock:
    """An exclusive lock file in an output folder, so two runs never write the same outputs.

    A lock left by a process that no longer exists (a SIGKILLed run) is taken over. A
    folder the lock created is removed again when the run leaves it empty (it failed
    before writing anything), so that a refused input leaves no trace.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / ".amoc.lock"
        self._held = False
        self._created = False

    def __enter__(self) -> "RunLock":
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _read_pid(self.path)
                if pid is not None and pid != os.getpid() and _alive(pid):
                    raise LockedError(
                        f"{self.path.parent}: another amoc run (pid {pid}) is writing here; wait for it or stop "
                        "it, or use another output folder"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(str(os.getpid()))
            except OSError as exc:
                self.path.unlink(missing_ok=True)
                if self._created:
                    with contextlib.suppress(OSError):
                        self.path.parent.rmdir()
                raise disk_full_error(exc, self.path, len(str(os.getpid()))) or exc from None
            self._held = True
            return self
        raise LockedError(f"{self.path}: could not take the lock; remove it if no amoc run is active")

    def __exit__(self, *exc: Any) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False
            if self._created:
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()  # only succeeds when nothing was put there


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
