"""File-system helpers shared by the writers (export, data cache); no torch import."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


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
