"""Helpers shared by the benchmark scripts (not a benchmark itself).

The scripts import it from their own folder (``sys.path`` gets ``benchmarks/`` first), so they keep working
when run as ``python benchmarks/NAME.py`` and through ``runpy`` in the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace `path` by `text` through a temporary file in the same folder and ``os.replace``.

    A reader (or a crash halfway through the write) never sees half a file: the old content stays until the
    new one is complete. The temporary file is created with ``open`` (the umask's mode, like a plain write).

    Args:
        path: The file to write; its folder must exist.
        text: The new content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


RANKS_FORMATS = ('{layer: rank}, a JSON object with a "ranks" entry {layer: rank} (a run.json) or a run\'s '
                 'history.jsonl (the ranks of its last epoch)')


def load_ranks(path: str | os.PathLike[str]) -> dict[str, int]:
    """{layer: rank} from a ranks file.

    Accepted: a JSON object {layer: rank}; a JSON object whose ``"ranks"`` entry is one (a run.json); a
    history.jsonl of a training run (one JSON record per line: the last record's ``"ranks"``).

    Args:
        path: The file.

    Returns:
        The ranks, every one a positive integer.

    Raises:
        ValueError: An unreadable file, invalid JSON, or content that is none of the accepted forms (the
            message names the file and the forms).
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read ranks file {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"ranks file {str(path)!r} is empty; give {RANKS_FORMATS}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if len(lines) < 2:
            raise ValueError(f"ranks file {str(path)!r} is not valid JSON ({exc}); give {RANKS_FORMATS}") from None
        try:  # JSON lines (history.jsonl): the last record holds the final ranks
            data = json.loads(lines[-1])
        except json.JSONDecodeError as exc2:
            raise ValueError(f"ranks file {str(path)!r} is neither JSON nor JSON lines (last line: {exc2}); give "
                             f"{RANKS_FORMATS}") from None
    if isinstance(data, dict) and isinstance(data.get("ranks"), dict):
        data = data["ranks"]
    if not isinstance(data, dict) or not data:
        raise ValueError(f"ranks file {str(path)!r} holds no ranks; give {RANKS_FORMATS}")
    bad = {k: v for k, v in data.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        name, value = next(iter(bad.items()))
        raise ValueError(f"ranks file {str(path)!r}: the rank of {name!r} is {json.dumps(value)}, not a positive "
                         f"integer ({len(bad)} such entr{'y' if len(bad) == 1 else 'ies'}); give {RANKS_FORMATS}")
    return {str(k): int(v) for k, v in data.items()}


def check_ranks_match(ranks: dict[str, int], layers: list[str], path: str | os.PathLike[str]) -> None:
    """Refuse ranks of which no name is a layer of the model (the file belongs to another model).

    Args:
        ranks: {layer: rank} as returned by `load_ranks`.
        layers: The SVD layer names of the model the ranks are for.
        path: The ranks file (for the message).

    Raises:
        ValueError: When no name of `ranks` is in `layers`.
    """
    if not set(ranks) & set(layers):
        example = repr(layers[0]) if layers else "none: it has no SVD layers"
        raise ValueError(f"ranks file {str(path)!r}: none of its {len(ranks)} layer names (e.g. "
                         f"{next(iter(ranks))!r}) is a layer of the model (e.g. {example}); is it the ranks "
                         "file of another model?")
