"""Fast in-memory image data: decode once, cache as one tensor file, augment in batched torch.

On a small CPU machine per-epoch JPEG decoding (a ``torchvision`` ``ImageFolder`` with a
``DataLoader``) dominates training time. This module decodes an image folder once (in parallel,
with a progress bar), caches the uint8 tensors in a single safetensors file, and serves
normalised, optionally augmented batches straight from memory with :class:`TensorLoader`.

Example:
    >>> train, test = open_data("/data/cifar10-jpeg.tar.gz")  # doctest: +SKIP
    >>> loader = TensorLoader(train, 128, shuffle=True, augment="cifar", seed=0)  # doctest: +SKIP
    >>> for epoch in range(3):  # doctest: +SKIP
    ...     loader.set_epoch(epoch)
    ...     for x, y in loader:
    ...         ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ._files import give_umask_mode, unique_name

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "AUGMENTATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "TensorImageDataset",
    "TensorLoader",
    "default_cache_dir",
    "extract_archive",
    "load_image_folder",
    "open_data",
    "resolve_split_dirs",
    "subset",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean (RGB, in [0, 1]) the pretrained CIFAR ResNets were trained with."""

IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation (RGB, in [0, 1]) the pretrained CIFAR ResNets were trained with."""

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_OTHER_IMAGE_SUFFIXES = (".gif", ".jfif", ".jpe", ".avif", ".heic", ".heif", ".jp2", ".ico", ".tga", ".dib", ".pcx")
"""Image files ImageFolder does not read either: skipped as they are, but named in a warning."""
"""File extensions (lower case) treated as images, as in ``torchvision.datasets.ImageFolder``."""

AUGMENTATIONS: tuple[str, ...] = ("cifar",)
"""Names accepted by ``TensorLoader(augment=...)`` besides ``None``."""

_CACHE_VERSION = "2"  # 2: keyed by every file's size, mtime and inode (1: the newest mtime only)
_CHUNK = 512
_SPEC_FORMS = (
    "a directory with train/ and val/ or test/ ImageFolder subfolders",
    "a .tar.gz/.tgz/.tar (or .tar.bz2/.tar.xz) archive of such a directory",
    "cifar10:DIR or cifar100:DIR (torchvision CIFAR in DIR; add --download to fetch it)",
)
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
"""Archive names open_data extracts (tarfile detects the compression itself)."""


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor, with integer labels and class names.

    Args:
        images: ``uint8`` tensor of shape ``(N, C, H, W)`` (``C`` is 3 for RGB).
        targets: Integer labels of shape ``(N,)``, stored as ``int64``, each in
            ``[0, len(classes))``.
        classes: Class names; label ``i`` means ``classes[i]``.

    Attributes:
        images: The ``(N, C, H, W)`` uint8 tensor.
        targets: The ``(N,)`` int64 tensor.
        classes: The list of class names.
        source_size: ``(H, W)`` of the images as stored (the first file of an image folder) before any
            resize at decode time; None when unknown.

    Raises:
        ValueError: If shapes, dtypes or label ranges are inconsistent.
    """

    def __init__(self, images: Tensor, targets: Tensor | Sequence[int], classes: Sequence[str],
                 source_size: tuple[int, int] | None = None) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            got = (
                f"{images.dtype} tensor of shape {tuple(images.shape)}"
                if isinstance(images, Tensor)
                else type(images).__name__
            )
            raise ValueError(f"TensorImageDataset images must be a uint8 tensor (N, C, H, W); got {got}.")
        targets = torch.as_tensor(targets)
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"TensorImageDataset targets must be integers, got {targets.dtype}.")
        targets = targets.to(torch.int64).reshape(-1)
        if targets.numel() != images.shape[0]:
            raise ValueError(
                f"TensorImageDataset has {images.shape[0]} images but {targets.numel()} targets."
            )
        classes = [str(c) for c in classes]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= len(classes)):
            raise ValueError(
                f"TensorImageDataset targets must lie in [0, {len(classes)}) for {len(classes)} classes; "
                f"got range [{int(targets.min())}, {int(targets.max())}]."
            )
        self.images = images
        self.targets = targets
        self.classes = classes
        self.source_size = source_size

    def __len__(self) -> int:
        """Number of images."""
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Return ``(uint8 image (C, H, W), int label)``."""
        return self.images[index], int(self.targets[index])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def class_counts(self) -> list[int]:
        """Number of images of each class, in ``classes`` order.

        Returns:
            A list of ``len(classes)`` counts.
        """
        return torch.bincount(self.targets, minlength=len(self.classes)).tolist()

    def __repr__(self) -> str:
        """Summarise size, image shape and classes."""
        c, h, w = self.image_shape
        return f"TensorImageDataset(n={len(self)}, image=({c}, {h}, {w}), classes={len(self.classes)})"


# --------------------------------------------------------------------------------------------
# Image folders: scan, decode (parallel), cache
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Directory for decoded-image caches and extracted archives.

    Returns:
        ``$DPRP_CACHE`` if set, else ``~/.cache/dprp_surgery``.
    """
    env = os.environ.get("DPRP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dprp_surgery"


def _scan_image_folder(root: Path) -> tuple[list[str], list[str], list[int], str]:
    """List (classes, files, targets, stamp) of an ImageFolder, in ImageFolder order.

    The stamp hashes every image's relative path, size, mtime and inode, so renaming class folders or
    replacing an image by an older copy changes it. Hidden folders are skipped; a folder reached twice
    (a symbolic-link loop) is an error rather than images read twice.
    """
    if not root.exists():
        raise ValueError(
            f"Image folder {str(root)!r} does not exist; pass a directory with one subfolder per "
            "class (root/<class>/<image>.jpg)."
        )
    if not root.is_dir():
        raise ValueError(
            f"Image folder {str(root)!r} is a file, not a directory; pass a directory with one "
            "subfolder per class (root/<class>/<image>.jpg), or an archive to open_data()."
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(
            f"Image folder {str(root)!r} has no class subfolders; expected root/<class>/<image>.jpg "
            "(one subfolder per class, as for torchvision ImageFolder). Is this the folder above "
            "train/ instead of train/ itself?"
        )
    files: list[str] = []
    targets: list[int] = []
    stamp = hashlib.sha256()
    prefix = len(str(root)) + 1
    seen: dict[tuple[int, int], str] = {}
    empty: list[str] = []
    skipped: dict[str, int] = {}  # suffix -> images of another format, left out
    for label, name in enumerate(classes):
        count = 0
        walked = []
        for dirpath, dirnames, fnames in os.walk(root / name, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                first = seen[st.st_dev, st.st_ino]
                raise ValueError(f"Image folder {str(root)!r}: {dirpath!r} is the folder {first!r} again (a "
                                 "symbolic-link loop, or two links to one folder), so its images would be read "
                                 "twice; remove the link.")
            seen[st.st_dev, st.st_ino] = dirpath
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .ipynb_checkpoints and the like
            walked.append((dirpath, fnames))
        for dirpath, fnames in sorted(walked):
            for fname in sorted(fnames):
                if fname.startswith(".") or not fname.lower().endswith(IMG_EXTENSIONS):
                    suffix = os.path.splitext(fname)[1].lower()
                    if suffix in _OTHER_IMAGE_SUFFIXES and not fname.startswith("."):
                        skipped[suffix] = skipped.get(suffix, 0) + 1
                    continue
                path = os.path.join(dirpath, fname)
                try:
                    st = os.stat(path)
                except OSError as exc:
                    raise ValueError(f"Image {path!r} cannot be read ({exc.strerror or exc}; a broken symbolic link?); "
                                     "remove it or point it at an image.") from None
                stamp.update(f"{path[prefix:]}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}\0".encode(
                    "utf-8", "surrogateescape"))
                files.append(path)
                targets.append(label)
                count += 1
        if count == 0:
            empty.append(name)
    if skipped:
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(skipped.items()))
        warnings.warn(f"Image folder {str(root)!r}: skipped {sum(skipped.values())} image(s) of formats it does not "
                      f"read ({kinds}; read: {', '.join(IMG_EXTENSIONS)}); convert them (e.g. to .png) to use them.",
                      UserWarning, stacklevel=3)
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise ValueError(
            f"Image folder {str(root)!r}: class folder(s) {shown} contain no images "
            f"(extensions {', '.join(IMG_EXTENSIONS)}); remove those folders or add images."
        )
    return classes, files, targets, stamp.hexdigest()


def _to_8bit(im: PILImage) -> PILImage:
    """Scale a 16/32-bit integer ("I;16*", "I") or float ("F") image to mode "L"; others unchanged.

    "I;16*" images are 16-bit; a 32-bit "I" image is taken as 8-bit data when no pixel exceeds 255 (e.g. a
    TIFF that stores bytes in 32-bit ints), as 16-bit when none exceeds 65535, else scaled by its maximum.
    """
    from PIL import Image

    if im.mode.startswith("I;16"):
        a = np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8  # 16-bit range: 65535 -> 255
    elif im.mode == "I":
        a = np.clip(np.asarray(im).astype(np.int64), 0, None)
        top = int(a.max()) if a.size else 0
        a = a if top <= 255 else (a >> 8 if top <= 65535 else a * 255 // top)
    elif im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0  # [0, 1] floats, else already [0, 255]
        a = np.clip(np.rint(a * scale), 0, 255)
    else:
        return im
    return Image.fromarray(a.astype(np.uint8), mode="L")


def _decode_one(path: str, size: int | None) -> np.ndarray:
    """Decode one image file to an RGB ``(H, W, 3)`` uint8 array, resized if ``size`` is set."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = _to_8bit(im).convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except MemoryError:
        raise  # not the file's fault
    except Exception as exc:  # noqa: BLE001 - PIL raises many types; all mean "unreadable"
        raise ValueError(
            f"Cannot read image {path!r}: {type(exc).__name__}: {exc}. Delete or replace the file."
        ) from None


def _stored_size(path: str) -> tuple[int, int] | None:
    """(H, W) of an image file as stored, from its header (no decode); None if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(im.size[1]), int(im.size[0])
    except Exception:  # noqa: BLE001 - only for a note; unreadable files are reported by the decoder
        return None


def _decode_chunk(
    paths: list[str], size: int | None, hw: tuple[int, int], out: np.ndarray | None = None
) -> tuple[np.ndarray, list[str]]:
    """Decode images into ``out`` (a new ``(n, 3, H, W)`` array if None); also the messages of the unusable ones."""
    if out is None:
        out = np.empty((len(paths), 3, hw[0], hw[1]), dtype=np.uint8)
    problems = []
    for i, path in enumerate(paths):
        try:
            arr = _decode_one(path, size)
        except ValueError as exc:  # go on: every bad file of the folder is reported at once
            problems.append(str(exc))
            continue
        if arr.shape[:2] != hw:
            problems.append(
                f"Image {path!r} is {arr.shape[1]}x{arr.shape[0]} but the first image is "
                f"{hw[1]}x{hw[0]}; images of different sizes need image_size=... to resize them "
                "to one square size."
            )
            continue
        out[i] = arr.transpose(2, 0, 1)
    return out, problems


def _raise_problems(problems: list[str], label: str, total: int, shown: int = 5) -> None:
    """Raise one ValueError for every unusable image found (the first few in full), if there is any."""
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        raise ValueError(f"{len(problems)} of the {total} images of {label} cannot be used; delete or replace them "
                         "(or resize them with image_size=... where the sizes differ):\n  "
                         + "\n  ".join(problems[:shown]) + more)


def _make_executor(workers: int, n_chunks: int) -> Executor | None:
    """A process pool (Linux fork) or thread pool for decoding, or None to decode serially."""
    if workers <= 1 or n_chunks <= 1:
        return None
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        # PIL decoding of small images holds the GIL; forked workers import nothing new and
        # touch no torch state, so fork is both fast to start and safe here.
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(workers)


def progress_bar(enabled: bool, transient: bool = False):  # noqa: ANN202 - rich type is optional
    """A rich progress bar on stderr: description, bar, done/total, elapsed, remaining.

    Args:
        enabled: False gives a disabled bar (nothing is drawn), so callers need no branch.
        transient: Remove the bar from the terminal when it finishes.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=transient,
    )


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_memory(n: int, hw: tuple[int, int], label: str) -> None:
    """Raise a ValueError before decoding when n images of hw pixels cannot fit in the available memory."""
    need = n * 3 * hw[0] * hw[1]
    free = _available_memory()
    if free is not None and need > free:
        raise ValueError(f"Decoding {label} ({n} images at {hw[1]}x{hw[0]}) needs {need / 2**30:.1f} GiB of memory "
                         f"but {free / 2**30:.1f} GiB are available; pass a smaller image size (--image-size, "
                         "image_size=) or a smaller dataset.")


def _decode_files(
    files: list[str], size: int | None, workers: int, progress: bool, label: str
) -> np.ndarray:
    """Decode all files into one ``(N, 3, H, W)`` array (the final layout) in parallel with a progress bar."""
    first, unreadable = None, []
    for path in files:  # the first readable image sets the size (unreadable ones before it are found again below)
        try:
            first = _decode_one(path, size)
            break
        except ValueError as exc:
            unreadable.append(str(exc))
    if first is None:
        _raise_problems(unreadable, label, len(files))
    hw = (int(first.shape[0]), int(first.shape[1]))
    _check_memory(len(files), hw, label)
    out = np.empty((len(files), 3, hw[0], hw[1]), dtype=np.uint8)
    starts = list(range(0, len(files), _CHUNK))
    executor = _make_executor(workers, len(starts))
    problems: list[str] = []
    if executor is None:
        with progress_bar(progress) as bar:
            task = bar.add_task(f"decoding {label}", total=len(files))
            for s in starts:
                chunk = files[s : s + _CHUNK]
                problems += _decode_chunk(chunk, size, hw, out[s : s + len(chunk)])[1]
                bar.advance(task, len(chunk))
        _raise_problems(problems, label, len(files))
        return out
    threads = isinstance(executor, ThreadPoolExecutor)  # threads decode straight into `out`
    found_at: dict[int, list[str]] = {}  # chunk start -> its unusable images, reported in file order
    try:
        # Submit (and so fork the workers) before the progress bar starts its refresh thread.
        futures: dict[Future[np.ndarray], int] = {
            executor.submit(_decode_chunk, files[s : s + _CHUNK], size, hw, out[s : s + _CHUNK] if threads else None): s
            for s in starts
        }
        with progress_bar(progress) as bar:
            task = bar.add_task(f"decoding {label}", total=len(files))
            for fut in as_completed(futures):
                s = futures.pop(fut)  # drop the future (and its chunk) once copied: one chunk alive at a time
                arr, found = fut.result()
                found_at[s] = found
                if not threads:
                    out[s : s + arr.shape[0]] = arr
                bar.advance(task, arr.shape[0])
                del arr
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    _raise_problems([msg for s in sorted(found_at) for msg in found_at[s]], label, len(files))
    return out


def _cache_path(cache_dir: Path, root: Path, files: list[str], stamp: str, size: int | None) -> Path:
    """Cache file of an image folder, keyed by path, file list and count, the files' stamp and size."""
    h = hashlib.sha256()
    h.update(f"v{_CACHE_VERSION}|{root}|{len(files)}|{stamp}|{size}|".encode())
    prefix = len(str(root)) + 1
    for f in files:
        h.update(f[prefix:].encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{root.parent.name}-{root.name}")[-60:]
    return cache_dir / f"imagefolder-{safe}-{h.hexdigest()[:24]}.safetensors"


def _load_cache(path: Path) -> TensorImageDataset | None:
    """Load a cached dataset, or None (with a warning) if it is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            images = f.get_tensor("images")
            targets = f.get_tensor("targets")
        if meta.get("sha256") != _content_hash(images, targets):
            raise ValueError("its content hash does not match (the file was damaged or changed)")
        return TensorImageDataset(images, targets, json.loads(meta["classes"]))
    except Exception as exc:  # noqa: BLE001 - a bad cache is rebuilt, never fatal
        logger.warning(
            "Ignoring unreadable cache %s (%s: %s); decoding again.", path, type(exc).__name__, exc
        )
        return None


def _content_hash(images: torch.Tensor, targets: torch.Tensor) -> str:
    """sha256 of a cached dataset's images and targets (about 1 s per GB)."""
    h = hashlib.sha256()
    for t in (images, targets):
        h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return h.hexdigest()


def _remove_stale_caches(path: Path, root: Path, selection: str) -> None:
    """Delete the other cache files of the same folder, image size and subset: earlier states of the folder."""
    from safetensors import safe_open

    for other in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.safetensors"):
        if other == path:
            continue
        try:
            with safe_open(str(other), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
            if meta.get("root") == str(root) and meta.get("selection") == selection:
                other.unlink()
                logger.info("Removed the cache %s of an earlier state of %s", other, root)
        except Exception as exc:  # noqa: BLE001 - clean-up is best effort; another process may hold or remove it
            logger.debug("Kept cache %s (%s)", other, exc)


def _save_cache(path: Path, ds: TensorImageDataset, root: Path, selection: str) -> None:
    """Write a dataset to ``path`` atomically (temp file + os.replace), then drop stale ones; failures only warn."""
    from safetensors.torch import save_file

    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(unique_name(path))
        meta = {"classes": json.dumps(ds.classes), "root": str(root), "version": _CACHE_VERSION,
                "sha256": _content_hash(ds.images, ds.targets), "selection": selection}
        save_file({"images": ds.images.contiguous(), "targets": ds.targets.contiguous()}, tmp, metadata=meta)
        give_umask_mode(tmp)
        os.replace(tmp, path)
        tmp = None
        _remove_stale_caches(path, root, selection)
    except OSError as exc:
        logger.warning("Could not write image cache %s (%s); continuing without it.", path, exc)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    cache: bool = True,
    workers: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> TensorImageDataset:
    """Decode an ImageFolder directory (``root/<class>/<image>``) into memory, with caching.

    Classes are the sorted subfolder names and files are ordered as in
    ``torchvision.datasets.ImageFolder`` (so labels and indices match it). Images are decoded
    with PIL to RGB, in parallel over ``workers`` processes (forked, on Linux) or threads, with a
    rich progress bar on stderr. 16-bit grayscale images (PIL modes "I;16" and "I", e.g. 16-bit
    PNGs) are scaled from [0, 65535] to [0, 255] (the top 8 bits); float images (mode "F") are
    taken as [0, 1] when no pixel exceeds 1, else as [0, 255]. The result is cached in one safetensors file under
    ``cache_dir``, keyed by the absolute path, the file list and count, every file's size, mtime and
    inode, and ``image_size``; the cache is written atomically, so a second call loads it in a fraction
    of a second and any change to the folder triggers a fresh decode.

    Args:
        root: The directory holding one subfolder per class.
        image_size: Resize every image to ``image_size x image_size`` (bilinear, aspect ratio not
            kept). ``None`` keeps the size, which must then be the same for all images.
        cache_dir: Where the cache lives; ``None`` means :func:`default_cache_dir`.
        progress: Show a progress bar while decoding.
        cache: Read and write the cache (``False`` always decodes and writes nothing). Writing the
            cache of a changed folder deletes the file of its earlier state at the same size and subset.
        workers: Decoding processes/threads; ``None`` uses all CPU cores.
        limit: Decode only the class-balanced subset of this many images that ``subset(full, limit,
            seed)`` would pick (the same images, without decoding the rest); ``None`` or a limit of at
            least the folder's size takes every image.
        seed: Selects the subset's images (see :func:`subset`).

    Returns:
        A :class:`TensorImageDataset` with uint8 images ``(N, 3, H, W)``.

    Raises:
        ValueError: If ``root`` is missing or not a directory, has no class subfolders, has
            class folders without images, holds an unreadable image (named in the message), or
            holds images of different sizes while ``image_size`` is None.
    """
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}.")
    root_path = Path(root).expanduser().resolve()
    classes, files, targets, stamp = _scan_image_folder(root_path)
    subset_size = limit if limit is not None and limit < len(files) else None
    # what a cache file holds besides the folder's state: a newer state replaces it, other sizes/subsets stay
    selection = f"size={image_size}|limit={subset_size}|seed={seed if subset_size is not None else None}"
    if subset_size is not None:
        pick = _subset_indices(np.asarray(targets, dtype=np.int64), subset_size, seed)
        files, targets = [files[i] for i in pick], [targets[i] for i in pick]
    cache_file = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                             root_path, files, stamp, image_size)
    if cache and cache_file.is_file():
        t0 = time.perf_counter()
        ds = _load_cache(cache_file)
        if ds is not None and len(ds) == len(files) and ds.classes == classes:
            logger.info("Loaded %d images of %s from cache %s in %.2fs",
                        len(ds), root_path, cache_file, time.perf_counter() - t0)
            ds.source_size = _stored_size(files[0])
            return ds
    t0 = time.perf_counter()
    n_workers = workers if workers is not None else (os.cpu_count() or 1)
    arr = _decode_files(files, image_size, max(1, int(n_workers)), progress, root_path.name)
    # decoded straight into (N, 3, H, W): the tensor shares that buffer, no second full-size copy
    ds = TensorImageDataset(torch.from_numpy(arr), torch.tensor(targets, dtype=torch.int64), classes,
                            source_size=_stored_size(files[0]))
    logger.info("Decoded %d images of %s in %.2fs", len(ds), root_path, time.perf_counter() - t0)
    if cache:
        _save_cache(cache_file, ds, root_path, selection)
    return ds


# --------------------------------------------------------------------------------------------
# Archives, splits and dataset specs
# --------------------------------------------------------------------------------------------


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse archive members that could write outside the destination."""
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    bad = None
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        bad = "an absolute path"
    elif ".." in parts:
        bad = "a '..' path component"
    elif member.issym() or member.islnk():
        link = member.linkname.replace("\\", "/")
        if link.startswith("/") or re.match(r"^[A-Za-z]:", link) or ".." in PurePosixPath(link).parts:
            bad = f"a link pointing outside the archive ({member.linkname!r})"
    elif not (member.isfile() or member.isdir()):
        bad = "a device, fifo or other special file"
    if bad:
        raise ValueError(
            f"Refusing to extract archive {str(archive)!r}: member {name!r} has {bad}. Only extract "
            "archives you trust; unpack this one by hand after checking it."
        )


def _check_complete(tar: tarfile.TarFile, members: list[tarfile.TarInfo], archive: Path) -> None:
    """Raise a ValueError unless the archive ends with its end-of-archive block after the last member.

    tarfile stops quietly at a missing or garbled header after the first member, so a truncated download
    would otherwise extract as a smaller dataset. Reading on to the end also lets gzip/bz2/xz check their CRC.
    """
    f = tar.fileobj
    f.seek(tar.offset)
    end = f.read(1024)
    if len(end) < 512 or end[:512] != b"\0" * 512:
        last = repr(members[-1].name) if members else "the start"
        raise ValueError(f"Archive {str(archive)!r} is truncated or corrupt after member {last} (no end-of-archive "
                         "block where the next member or the end should be); re-download or re-create it.")
    while f.read(1 << 20):
        pass


def _extract_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path) -> None:
    """Write checked members: plain files and folders directly (fast), links via tarfile."""
    made: set[str] = set()
    links = []
    for m in members:
        target = os.path.join(dest, m.name)
        if m.isdir():
            if target not in made:
                os.makedirs(target, exist_ok=True)
                made.add(target)
        elif m.isfile():
            parent = os.path.dirname(target)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            src = tar.extractfile(m)
            if src is None:  # pragma: no cover - isfile() members always have data
                continue
            with src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            links.append(m)
    if links:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=links, filter="data")
        else:  # pragma: no cover - Python < 3.11.4; links were checked by _check_member
            tar.extractall(dest, members=links)


def _split_root(dest: Path, archive: Path, eval_only: bool = False) -> Path:
    """The folder under ``dest`` (itself or a single level down) that holds ``train/`` (``val/`` or ``test/``)."""
    names = ("val", "test") if eval_only else ("train",)
    want = "val/ or test/" if eval_only else "train/"
    layout = "val/<class>/*.jpg or test/<class>/*.jpg" if eval_only else "train/<class>/*.jpg and val/ or test/"

    def holds(folder: Path) -> bool:
        return any((folder / n).is_dir() for n in names)

    if holds(dest):
        return dest
    candidates = sorted(p for p in dest.iterdir() if p.is_dir() and holds(p))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise ValueError(
            f"Archive {str(archive)!r} extracted into {str(dest)!r} holds several datasets ({want} one level down "
            f"in {', '.join(repr(p.name) for p in candidates)}); expected one: {layout}."
        )
    raise ValueError(
        f"Archive {str(archive)!r} extracted into {str(dest)!r} has no {want} folder at its top "
        f"level or one level down; expected {layout}."
    )


def _stamped(stamp: Path, stamp_data: dict[str, Any]) -> bool:
    """Whether `stamp` records an extraction of exactly this archive (path, size, mtime)."""
    try:
        return stamp.is_file() and json.loads(stamp.read_text()) == stamp_data
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _extraction_lock(archive: Path) -> Iterator[None]:
    """An exclusive advisory lock on the archive itself (fcntl, where available; no lock file is left behind)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        yield
        return
    with open(archive, "rb") as held:  # flock needs no write access: read-only archives lock too
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: extract unlocked
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def _extract_into(archive_path: Path, dest_path: Path, stamp: Path, stamp_data: dict[str, Any]) -> list:
    """Extract `archive_path` beside `dest_path`, stamp it and move it into place; the members extracted."""
    if dest_path.exists() and not stamp.is_file() and (not dest_path.is_dir() or any(dest_path.iterdir())):
        raise ValueError(f"Refusing to extract archive {str(archive_path)!r} into {str(dest_path)!r}: it already "
                         "holds files that are not an extraction by dprp_surgery; choose another destination or "
                         "delete it.")
    # A fresh folder beside dest, moved into place when complete: a changed archive never leaves files of its
    # earlier version behind, and an interrupted extraction never looks finished.
    partial = dest_path.parent / f".{dest_path.name}.partial-{os.getpid()}"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(archive_path, "r:*") as tar:
            members = tar.getmembers()
            _check_complete(tar, members, archive_path)
            for m in members:
                _check_member(m, archive_path)
            partial.mkdir(parents=True)
            _extract_members(tar, members, partial)
        (partial / stamp.name).write_text(json.dumps(stamp_data))
        if dest_path.exists():  # an earlier extraction (stamped) or an empty folder
            stale = dest_path.parent / f".{dest_path.name}.stale-{os.getpid()}"
            os.replace(dest_path, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(partial, dest_path)
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(
            f"Cannot extract archive {str(archive_path)!r} into {str(dest_path)!r}: "
            f"{type(exc).__name__}: {exc}. Is it a valid .tar.gz and is there disk space?"
        ) from exc
    return members


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, eval_only: bool = False
                    ) -> Path:
    """Safely extract a ``.tar.gz``/``.tgz``/``.tar`` archive and return the folder holding ``train/``.

    Members with absolute paths, ``..`` components, links pointing outside, or special files are
    refused before anything is written (links are then extracted with ``tarfile``'s ``"data"``
    filter as well). File modes and times are not restored: extracted files are plain, readable
    data files stamped with the extraction time.
    A stamp file records the archive's path, size and mtime: calling again with the same archive
    and destination skips extraction; a changed archive replaces the earlier extraction as a whole
    (extracted beside it, then moved into place).

    Args:
        archive: Path of the archive.
        dest: Directory to extract into (created if needed).
        eval_only: Look for the folder holding ``val/`` or ``test/`` instead (an archive for evaluation
            needs no ``train/``).

    Returns:
        ``dest`` if it holds ``train/`` (with `eval_only`: ``val/`` or ``test/``) after extraction, else its
        single subfolder that does.

    Raises:
        ValueError: If the archive is missing or unreadable, holds an unsafe member, or has no
            ``train/`` folder (``val/`` or ``test/`` with `eval_only`).
    """
    archive_path = Path(archive).expanduser().resolve()
    dest_path = Path(dest).expanduser().resolve()
    if not archive_path.is_file():
        raise ValueError(f"Archive {str(archive_path)!r} does not exist; check the path.")
    st = archive_path.stat()
    stamp_data = {"archive": str(archive_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stamp = dest_path / ".dprp_extracted.json"
    if _stamped(stamp, stamp_data):
        logger.info("Archive %s already extracted in %s", archive_path, dest_path)
        return _split_root(dest_path, archive_path, eval_only)
    with _extraction_lock(archive_path):  # another process extracting the same archive: wait for it, then reuse
        if _stamped(stamp, stamp_data):
            return _split_root(dest_path, archive_path, eval_only)
        t0 = time.perf_counter()
        members = _extract_into(archive_path, dest_path, stamp, stamp_data)
    logger.info("Extracted %d members of %s in %.1fs", len(members), archive_path, time.perf_counter() - t0)
    return _split_root(dest_path, archive_path, eval_only)


def resolve_split_dirs(root: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Find the training and evaluation folders of a dataset directory.

    Args:
        root: A directory holding ``train/`` and ``val/`` or ``test/`` (``val/`` wins if both).

    Returns:
        ``(train_dir, eval_dir)``.

    Raises:
        ValueError: If ``root`` is not a directory or lacks ``train/`` or both ``val/`` and ``test/``.
    """
    root_path = _dataset_dir(root)
    train = root_path / "train"
    if not train.is_dir():
        found = sorted(p.name for p in root_path.iterdir() if p.is_dir())
        raise ValueError(
            f"Dataset directory {str(root_path)!r} has no train/ split (subfolders: "
            f"{', '.join(found[:10]) or 'none'}); expected train/ and val/ or test/, each with one "
            f"subfolder per class.{_split_hint(root_path, found)}"
        )
    return train, _eval_dir(root_path, "train/ but ")


def _dataset_dir(root: str | os.PathLike[str]) -> Path:
    """`root` as a Path, or a ValueError when it is not a directory."""
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise ValueError(
            f"Dataset directory {str(root_path)!r} does not exist or is not a directory; expected a "
            "folder holding train/ and val/ or test/."
        )
    return root_path


def _eval_dir(root: str | os.PathLike[str], has: str = "") -> Path:
    """The val/ (else test/) folder of a dataset directory, or a ValueError naming what is there."""
    root_path = _dataset_dir(root)
    for name in ("val", "test"):
        if (root_path / name).is_dir():
            return root_path / name
    found = sorted(p.name for p in root_path.iterdir() if p.is_dir())
    raise ValueError(f"Dataset directory {str(root_path)!r} has {has}no val/ or test/ split (subfolders: "
                     f"{', '.join(found[:10]) or 'none'}); add one (the same class subfolders as train/)."
                     f"{_split_hint(root_path, found)}")


def _split_hint(root: Path, subfolders: list[str]) -> str:
    """' Pass its parent ...' when `root`'s subfolders hold images, i.e. `root` is itself a split."""
    for name in subfolders[:20]:
        with contextlib.suppress(OSError):
            if any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(root / name)):
                return (f" Its subfolders hold images, so {str(root)!r} looks like one split itself: pass the folder "
                        f"above it (holding {root.name}/ and its sibling split).")
    return ""


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    """Resize a uint8 ``(N, C, H, W)`` tensor to ``size x size`` (bilinear, antialiased)."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, images.shape[0], 4096):
        x = images[s : s + 4096].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[s : s + 4096] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _open_torchvision_cifar(kind: str, root: str, download: bool, image_size: int | None
                            ) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Load torchvision CIFAR-10/100 from ``root`` as in-memory datasets."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    label = "CIFAR-10" if kind == "cifar10" else "CIFAR-100"
    root_path = Path(root or ".").expanduser()
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root_path), train=train, download=download)
        except RuntimeError as exc:
            raise ValueError(
                f"{label} not found in {str(root_path)!r} ({exc}). Pass --download "
                f"(open_data(..., download=True)) to fetch it, or point {kind}:DIR at the folder "
                f"that holds {cls.base_folder}/."
            ) from exc
        except OSError as exc:
            raise ValueError(
                f"Could not download {label} into {str(root_path)!r}: {type(exc).__name__}: {exc}. "
                f"Check the network, or download it elsewhere and copy {cls.base_folder}/ there."
            ) from exc
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        source = (int(images.shape[2]), int(images.shape[3]))
        if image_size is not None:
            images = _resize_uint8(images, image_size)
        out.append(TensorImageDataset(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes),
                                      source_size=source))
    return out[0], out[1]


def open_data(
    spec: str | os.PathLike[str],
    *,
    download: bool = False,
    image_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    seed: int = 0,
) -> tuple[TensorImageDataset | None, TensorImageDataset]:
    """Open a dataset given as a directory, an archive or a torchvision CIFAR spec.

    Accepted forms of ``spec``:

    * a directory holding ``train/`` and ``val/`` or ``test/`` ImageFolder trees;
    * a ``.tar.gz``/``.tgz``/``.tar`` archive of such a directory (extracted safely into
      ``<cache_dir>/extracted/``, once);
    * ``cifar10:DIR`` or ``cifar100:DIR``: ``torchvision.datasets.CIFAR10``/``CIFAR100`` stored
      in ``DIR`` (fetched there only with ``download=True``).

    Args:
        spec: The dataset, in one of the forms above.
        download: Let torchvision download CIFAR into ``DIR`` if it is missing.
        image_size: Resize images to this square size (``None`` keeps them).
        cache_dir: Cache for decoded images and extracted archives (``None``:
            :func:`default_cache_dir`).
        progress: Show progress bars while decoding.
        train_limit: Take only the class-balanced subset of this many training images (`subset` with
            `seed`; image folders decode only those images); ``None`` takes all; ``0`` skips the training
            split (returned as None; a directory then needs only ``val/`` or ``test/``), for evaluation.
        eval_limit: The same for the evaluation split.
        seed: Selects the subsets' images.

    Returns:
        ``(train, eval)`` datasets with the same classes (train None for ``train_limit=0``).

    Raises:
        ValueError: For an unknown prefix or missing path (the message lists the accepted
            forms), missing CIFAR data without ``download``, a directory without the expected
            splits, or train and eval splits with different classes.
    """
    text = os.fspath(spec)
    forms = "; ".join(_SPEC_FORMS)
    m = re.match(r"^([A-Za-z][A-Za-z0-9_-]+):(.*)$", text)
    if m and not Path(text).exists():
        prefix = m.group(1).lower()
        if prefix in ("cifar10", "cifar100"):
            train, evals = _open_torchvision_cifar(prefix, m.group(2), download, image_size)
            return (None if train_limit == 0 else train if train_limit is None
                    else subset(train, min(train_limit, len(train)), seed),
                    evals if eval_limit is None else subset(evals, min(eval_limit, len(evals)), seed))
        raise ValueError(f"Unknown dataset prefix {m.group(1)!r} in {text!r}; accepted forms: {forms}.")
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"Dataset {text!r} does not exist; accepted forms: {forms}.")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if path.is_file():
        if not path.name.lower().endswith(_ARCHIVE_SUFFIXES):
            raise ValueError(
                f"Dataset {text!r} is a file but not a .tar.gz/.tgz/.tar/.tar.bz2/.tar.xz archive; accepted "
                f"forms: {forms}."
            )
        resolved = path.resolve()
        digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
        stem = re.sub(r"(\.tar\.gz|\.tgz|\.tar\.bz2|\.tbz2|\.tar\.xz|\.txz|\.tar)$", "", resolved.name,
                      flags=re.IGNORECASE)
        blocker = next((p for p in (cache_root, *cache_root.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise ValueError(f"Cannot extract {text!r}: the cache directory {str(cache_root)!r} (DPRP_CACHE or "
                             f"cache_dir) lies under the file {str(blocker)!r}; point DPRP_CACHE at a directory.")
        path = extract_archive(resolved, cache_root / "extracted" / f"{stem}-{digest}", eval_only=train_limit == 0)
    if train_limit == 0:  # evaluation only: train/ is neither needed nor decoded
        evals = load_image_folder(_eval_dir(path), image_size=image_size, cache_dir=cache_root, progress=progress,
                                  limit=eval_limit, seed=seed)
        return None, evals
    train_dir, eval_dir = resolve_split_dirs(path)
    train = load_image_folder(train_dir, image_size=image_size, cache_dir=cache_root, progress=progress,
                              limit=train_limit, seed=seed)
    evals = load_image_folder(eval_dir, image_size=image_size, cache_dir=cache_root, progress=progress,
                              limit=eval_limit, seed=seed)
    if train.classes != evals.classes:
        only_t = sorted(set(train.classes) - set(evals.classes))[:5]
        only_e = sorted(set(evals.classes) - set(train.classes))[:5]
        raise ValueError(
            f"Dataset {text!r}: {train_dir.name}/ and {eval_dir.name}/ have different classes "
            f"(only in {train_dir.name}/: {only_t or '-'}; only in {eval_dir.name}/: {only_e or '-'}); "
            "both splits need the same class subfolders."
        )
    if train.image_shape != evals.image_shape:
        raise ValueError(
            f"Dataset {text!r}: {train_dir.name}/ images are {tuple(train.image_shape)} but {eval_dir.name}/ images "
            f"are {tuple(evals.image_shape)}; pass an image size (--image-size, image_size=) to resize both."
        )
    return train, evals


# --------------------------------------------------------------------------------------------
# Subsets and batched loading
# --------------------------------------------------------------------------------------------


def _stable_keys(seed: int, n: int) -> np.ndarray:
    """Pseudo-random uint64 keys (splitmix64 of seed and index), identical on every platform."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def subset(dataset: TensorImageDataset, n: int, seed: int = 0) -> TensorImageDataset:
    """A deterministic, class-balanced subset of ``n`` images.

    Images of each class are put in a pseudo-random order fixed by ``seed`` (a platform- and
    version-independent hash, not torch's RNG), then classes are taken round-robin (the first
    image of every class, then the second, ...) until ``n`` images are chosen; a class that
    runs out is skipped. So every class gets ``n // C`` or ``n // C + 1`` images while it has
    enough. The chosen images keep their original order.

    Args:
        dataset: The dataset to draw from.
        n: Number of images, ``1 <= n <= len(dataset)``.
        seed: Selects which images of each class are taken.

    Returns:
        A new :class:`TensorImageDataset` with the same classes.

    Raises:
        ValueError: If ``n`` is out of range.
    """
    idx = torch.from_numpy(_subset_indices(dataset.targets.numpy(), n, seed))
    return TensorImageDataset(dataset.images.index_select(0, idx), dataset.targets.index_select(0, idx),
                              list(dataset.classes), source_size=dataset.source_size)


def _subset_indices(targets: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of the class-balanced subset of `subset` (it depends only on the labels and seed)."""
    total = len(targets)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
        raise ValueError(f"subset size must be an int in [1, {total}] for this dataset, got {n!r}.")
    keys = _stable_keys(int(seed), total)
    order = np.lexsort((keys, targets))  # by class, then by key
    sorted_t = targets[order]
    class_start = np.searchsorted(sorted_t, sorted_t, side="left")
    rank = np.empty(total, dtype=np.int64)
    rank[order] = np.arange(total) - class_start
    pick = np.lexsort((targets, rank))[:n]  # by rank within class, then by class
    return np.sort(pick)


def _mix_seed(seed: int, epoch: int) -> int:
    """One 63-bit generator seed from (seed, epoch)."""
    h = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def _crop_flip(x: Tensor, oy: Tensor, ox: Tensor, flip: Tensor, pad: int) -> Tensor:
    """Batched random crop of a zero-padded batch plus horizontal flip, as one gather."""
    b, c, h, w = x.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = oy[:, None] + ar_h  # (B, H)
    cols = ox[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (B, W)
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return xp.reshape(b, c, hp * wp).gather(2, index).reshape(b, c, h, w)


class TensorLoader:
    """Iterable of normalised (optionally augmented) batches over a :class:`TensorImageDataset`.

    Each batch is ``(x, y)``: ``x`` float32 ``(B, C, H, W)`` equal to ``(image / 255 - mean) /
    std``, ``y`` int64 ``(B,)``. Gathering, cropping and flipping run batched in torch on the
    uint8 images (no per-image Python work), so an epoch over CIFAR-10 takes seconds.

    Randomness (shuffle order, crop offsets, flips) comes from a generator seeded with
    ``(seed, epoch)``: the same seed and epoch always give the same batches. Each ``iter()``
    uses the current epoch and then advances it by one, so successive passes differ even
    without :meth:`set_epoch`; call ``set_epoch(e)`` before a pass to pin it to epoch ``e``.

    Args:
        dataset: The images and labels.
        batch_size: Images per batch.
        shuffle: Visit the images in a new random order every epoch.
        augment: ``None`` (no augmentation) or ``"cifar"``: random ``H x W`` crop of the image
            zero-padded by ``crop_padding`` pixels (padding is black, i.e. pixel value 0, before
            normalisation), then a horizontal flip with probability 1/2.
        mean: Per-channel mean in [0, 1] units.
        std: Per-channel standard deviation in [0, 1] units.
        drop_last: Drop the final incomplete batch.
        seed: Base seed of all randomness.
        device: Device the batches are moved to (augmentation and normalisation run there).
        pin_memory: Pin host batches before a non-blocking copy to a CUDA device.
        crop_padding: Zero padding (pixels) of the ``"cifar"`` random crop.

    Attributes:
        dataset: The dataset given.
        batch_size, shuffle, augment, drop_last, seed, device: As given.
        epoch: The epoch the next pass will use.

    Raises:
        ValueError: For a non-positive batch size, an unknown augmentation, or mean/std of the
            wrong length or with non-positive std.
    """

    def __init__(
        self,
        dataset: TensorImageDataset,
        batch_size: int = 128,
        *,
        shuffle: bool = False,
        augment: str | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
        crop_padding: int = 4,
    ) -> None:
        if not isinstance(dataset, TensorImageDataset):
            raise ValueError(
                f"TensorLoader needs a TensorImageDataset (see load_image_folder/open_data), got "
                f"{type(dataset).__name__}."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TensorLoader batch_size must be a positive int, got {batch_size!r}.")
        if augment is not None and augment not in AUGMENTATIONS:
            raise ValueError(
                f"TensorLoader augment={augment!r} is unknown; use None or one of {', '.join(AUGMENTATIONS)}."
            )
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"TensorLoader crop_padding must be an int >= 0, got {crop_padding!r}.")
        channels = dataset.images.shape[1]
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() != channels or std_t.numel() != channels:
            raise ValueError(
                f"TensorLoader mean and std need {channels} values (one per channel), got "
                f"{mean_t.numel()} and {std_t.numel()}."
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"TensorLoader std must be positive, got {std_t.tolist()}.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.pin_memory = bool(pin_memory) and self.device.type == "cuda"
        self.crop_padding = crop_padding
        self.epoch = 0
        self.mean = tuple(mean_t.tolist())
        self.std = tuple(std_t.tolist())
        # x_norm = x_uint8 * scale + shift, with scale = 1 / (255 std), shift = -mean / std.
        self._scale = (1.0 / (255.0 * std_t)).reshape(1, -1, 1, 1).to(self.device)
        self._shift = (-mean_t / std_t).reshape(1, -1, 1, 1).to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use ``epoch`` (shuffle and augmentation depend on seed and epoch).

        Args:
            epoch: The epoch number (any int).
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Number of batches in one pass."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over the data, using the current epoch (which then advances by one)."""
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the batches of one epoch."""
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
        images, targets = self.dataset.images, self.dataset.targets
        n = len(self.dataset)
        order = torch.randperm(n, generator=gen) if self.shuffle else None
        span = 2 * self.crop_padding + 1
        non_blocking = self.device.type == "cuda"
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if order is None:
                x, y = images[lo:hi], targets[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = images.index_select(0, idx), targets.index_select(0, idx)
            if self.augment == "cifar":
                size = (hi - lo,)
                oy = torch.randint(0, span, size, generator=gen)
                ox = torch.randint(0, span, size, generator=gen)
                flip = torch.randint(0, 2, size, generator=gen).bool()
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            if self.augment == "cifar":
                dev = self.device
                x = _crop_flip(x, oy.to(dev), ox.to(dev), flip.to(dev), self.crop_padding)
            x = x.to(torch.float32).mul_(self._scale).add_(self._shift)
            yield x, y

    def __repr__(self) -> str:
        """Summarise the loader's settings."""
        return (
            f"TensorLoader(n={len(self.dataset)}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, augment={self.augment!r}, seed={self.seed}, device={self.device})"
        )
