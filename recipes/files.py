"""Files the engine writes and later trusts: atomic writes, content digests, storage errors.

Every file cope writes goes through :func:`write_atomic`: a hidden temporary file in the same
folder (``.<name>.tmp-<pid>``), fsync, rename over the target, fsync of the folder. A reader
never sees half a file, and a failed write leaves no temporary file and the old file untouched.

Files that are read back and trusted (checkpoints, feature and clip caches) are dicts saved
with :func:`save_verified`: the SHA-256 of their contents is stored inside the file under
:data:`DIGEST_KEY`, so file and digest are renamed into place together by one atomic rename
(a digest in a second file could be torn from its data by a crash between two renames).
:func:`load_verified` recomputes it; PyTorch's zip reader itself does not check its records, so
without this a flipped bit in a tensor would load silently.

A write that fails for a reason the user can fix (disk full, quota, read-only file system,
folder deleted) raises :class:`StorageError`, a :class:`~recipes.base.UserError` whose message
names the file and the free space, so the CLI prints one line instead of a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from recipes.base import UserError

DIGEST_KEY = "sha256"

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}


class StorageError(UserError):
    """Writing a file failed: disk full, over quota, read-only, or its folder vanished."""


class DamagedFile(UserError):
    """A file cope wrote earlier no longer matches its digest, or cannot be read at all."""


def free_space(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing folder), if known."""
    for folder in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def human_size(size: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def storage_error(path: Path, error: OSError) -> StorageError:
    """One sentence for a failed write of ``path``: the file, the reason, the free space."""
    path = Path(path)
    if error.errno == errno.ENOENT or not path.parent.is_dir():
        reason = f"its folder {path.parent} no longer exists"
    else:
        reason = _REASONS.get(error.errno or 0, error.strerror or str(error))
    free = free_space(path.parent) if error.errno in (errno.ENOSPC, errno.EDQUOT) else None
    if free is not None and error.errno == errno.ENOSPC:
        reason += f", {human_size(free)} free there"
    elif free is not None:  # a quota is per user: the disk may have room to spare
        reason += f"; the file system itself has {human_size(free)} free"
    return StorageError(
        f"cannot write {path} ({reason}); what was written before is intact: fix that and run "
        "the same command again (with --resume, a training run continues from its last "
        "checkpoint)"
    )


def is_storage_error(error: BaseException) -> bool:
    """Whether ``error`` is an OSError a user fixes by freeing space or fixing the folder."""
    return isinstance(error, OSError) and (
        error.errno in _REASONS or isinstance(error, FileNotFoundError)
    )


class _KeepingWriteErrors:
    """A binary stream wrapper that remembers the OSError of a failed write.

    ``torch.save`` turns a failed write into ``RuntimeError: ... unexpected pos``; the
    remembered error says what really happened (for example ENOSPC).
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.error = stream, None

    def write(self, data: bytes) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as error:
            self.error = error
            raise


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (not every file system allows fsync on a folder)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def temporary_name(path: Path) -> Path:
    """The hidden sibling a write of ``path`` goes through."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(
    path: Path,
    write: Callable[[IO[bytes]], None],
    check: Callable[[Path], Any] | None = None,
    previous: Path | None = None,
) -> None:
    """Write ``path`` through a temporary sibling, fsync and a rename; never half a file.

    ``write`` fills the binary stream; ``check`` (optional) reads the finished temporary file
    back before it replaces ``path`` (raising keeps the old file). With ``previous``, the file
    being replaced is kept under that name (only once the new one is written and checked).
    On any failure the temporary file is removed; an OSError a user can fix becomes a
    :class:`StorageError`.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with tmp.open("wb") as stream:
            keeper = _KeepingWriteErrors(stream)
            try:
                write(keeper)  # type: ignore[arg-type]
            except RuntimeError:
                if keeper.error is not None:
                    raise keeper.error from None
                raise
            stream.flush()
            os.fsync(stream.fileno())
        if check is not None:
            check(tmp)
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if is_storage_error(error):
            raise storage_error(path, error) from None  # type: ignore[arg-type]
        raise
    _sync_folder(path.parent)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files in ``folder`` left by writers that were killed; return them.

    A temporary file names its writer's process id; one whose process is still alive is kept.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp-*"):
        pid = path.name.rpartition(".tmp-")[2]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` for UTF-8 text."""
    write_atomic(path, lambda stream: stream.write(text.encode()))


def append_text(path: Path, text: str) -> None:
    """Append ``text`` (a log line); a failed write is a :class:`StorageError` naming ``path``.

    A line cut short by a full disk is tolerated by the readers (they skip unreadable lines).
    """
    try:
        with Path(path).open("a") as stream:
            stream.write(text)
    except OSError as error:
        if is_storage_error(error):
            raise storage_error(Path(path), error) from None
        raise


# ----------------------------------------------------------------------------- digests


def content_digest(value: Any) -> str:
    """SHA-256 of a nest of dicts, lists, tensors and plain values, independent of dict order.

    Tensors contribute dtype, shape and raw bytes; floats their exact hex form. Lists and
    tuples hash alike (a round trip through ``torch.save`` may turn one into the other).
    """
    hasher = hashlib.sha256()
    _feed(hasher, value)
    return hasher.hexdigest()


def _feed(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"T{value.dtype}{tuple(value.shape)}:".encode())
        hasher.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=lambda key: (type(key).__name__, repr(key))):
            _feed(hasher, key)
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, (bool, int, str, bytes)) or value is None:
        hasher.update(f"{type(value).__name__}{len(repr(value))}:{value!r}".encode())
    elif isinstance(value, float):
        hasher.update(f"f{value.hex()};".encode())
    else:
        raise TypeError(f"cannot digest a {type(value).__name__}")


def save_verified(path: Path, value: dict[str, Any], previous: Path | None = None) -> None:
    """Save a dict with its content digest inside, atomically, read back and checked first.

    ``previous``: keep the file being replaced under that name (see :func:`write_atomic`).
    """
    stored = {**value, DIGEST_KEY: content_digest(value)}
    write_atomic(
        path, lambda stream: torch.save(stored, stream), check=load_verified, previous=previous
    )


def load_verified(
    path: Path, *, predates_digests: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    """Load a dict saved by :func:`save_verified`; damage of any kind is a :class:`DamagedFile`.

    The returned dict no longer holds the digest. A file without one is damaged, unless
    ``predates_digests(value)`` says it was written before digests existed (then it is
    returned as is: there is nothing to check it against).
    """
    path = Path(path)
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, KeyError, IndexError, TypeError, AttributeError) as error:  # fmt: skip
        text = str(error).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
        raise DamagedFile(f"{path} is damaged or unreadable ({reason})") from None
    if not isinstance(value, dict):
        raise DamagedFile(f"{path} is damaged or unreadable (not a dict)")
    recorded = value.pop(DIGEST_KEY, None)
    if recorded is None:
        if predates_digests is None or not predates_digests(value):
            raise DamagedFile(f"{path} is damaged or unreadable (it holds no digest)")
        return value
    try:
        actual = content_digest(value)
    except TypeError as error:
        raise DamagedFile(f"{path} is damaged or unreadable ({error})") from None
    if actual != recorded:
        raise DamagedFile(
            f"{path} is damaged or unreadable (its contents do not match the sha256 digest "
            "recorded in it)"
        )
    return value


def note(text: str) -> None:
    """A one-line note on stderr for a recovery the user should know about (cache rebuilt)."""
    print(f"note: {text}", file=sys.stderr, flush=True)
