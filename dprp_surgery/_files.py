"""File-system helpers shared by the writers (export, data cache); no torch import."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def umask() -> int:
    """The process's current umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_dir(parent: Path, prefix: str) -> Path:
    """Create a new uniquely named directory in `parent` with the umask's mode (tempfile.mkdtemp's is 0700)."""
    for _ in range(100):
        candidate = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary directory in {str(parent)!r}")


def unique_name(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden, not yet existing name beside `path` for a temporary file."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def give_umask_mode(path: str | os.PathLike[str]) -> None:
    """Give a file the mode a plain open() would have (safetensors writes 0600 files)."""
    os.chmod(path, 0o666 & ~umask())


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temporary file beside it: write(f), fsync, then os.replace over `path`.

    A reader, or a crash half-way, never sees half a file: the old content stays until the new one is complete.
    The temporary file is created by open(), so the result has the umask's mode like any new file.
    """
    path = Path(path)
    tmp = unique_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace `path` by `text` (UTF-8) atomically (`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` by `data` atomically (`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))
