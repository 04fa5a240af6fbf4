"""Tests of dprp_surgery.data: image-folder decoding and caching, archives, specs, loaders."""

from __future__ import annotations

import io
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dprp_surgery import data
from dprp_surgery.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TensorImageDataset,
    TensorLoader,
    default_cache_dir,
    extract_archive,
    load_image_folder,
    open_data,
    resolve_split_dirs,
    subset,
)

CLASSES = ["bird", "cat", "dog"]


def _make_folder(
    root: Path, classes=CLASSES, per_class: int = 4, size=(8, 8), seed: int = 0
) -> dict[str, np.ndarray]:
    """Write PNG images root/<class>/<k>.png; return {relative path: HxWx3 array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            arr = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{k:03d}.png")
            written[f"{c}/{k:03d}.png"] = arr
    return written


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A 3-class x 4-image ImageFolder of 8x8 PNGs."""
    root = tmp_path / "tiny"
    return root, _make_folder(root)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """An empty cache directory."""
    return tmp_path / "cache"


# ---------------------------------------------------------------------------- load_image_folder


def test_load_image_folder(tiny, cache: Path) -> None:
    root, written = tiny
    ds = load_image_folder(root, cache_dir=cache, progress=False)
    assert isinstance(ds, TensorImageDataset)
    assert ds.classes == CLASSES and ds.num_classes == 3
    assert ds.images.shape == (12, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.targets.dtype == torch.int64 and ds.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i, (rel, arr) in enumerate(sorted(written.items())):
        assert torch.equal(ds.images[i], torch.from_numpy(arr).permute(2, 0, 1)), rel
    img, label = ds[5]
    assert img.shape == (3, 8, 8) and img.dtype == torch.uint8 and label == 1 and type(label) is int
    assert len(ds) == 12 and ds.class_counts() == [4, 4, 4]


def test_cache_hit_and_invalidation(tiny, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = tiny
    first = load_image_folder(root, cache_dir=cache, progress=False)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(data, "_decode_files", no_decode)
        second = load_image_folder(root, cache_dir=cache, progress=False)
    assert torch.equal(first.images, second.images) and torch.equal(first.targets, second.targets)
    assert second.classes == first.classes
    # a different image_size is a different cache entry
    small = load_image_folder(root, image_size=4, cache_dir=cache, progress=False)
    assert small.images.shape == (12, 3, 4, 4) and len(list(cache.glob("*.safetensors"))) == 2
    # adding an image changes the key: the folder is decoded again
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(root / "cat" / "zzz.png")
    third = load_image_folder(root, cache_dir=cache, progress=False)
    assert len(third) == 13 and third.class_counts() == [4, 5, 4]
    assert torch.equal(third.images[8], torch.full((3, 8, 8), 7, dtype=torch.uint8))


def test_cache_disabled_and_corrupt_cache(tiny, cache: Path) -> None:
    root, _ = tiny
    load_image_folder(root, cache_dir=cache, progress=False, cache=False)
    assert not cache.exists() or not any(cache.iterdir())
    ref = load_image_folder(root, cache_dir=cache, progress=False)
    (cache_file,) = cache.glob("*.safetensors")
    cache_file.write_bytes(b"garbage")
    again = load_image_folder(root, cache_dir=cache, progress=False)
    assert torch.equal(again.images, ref.images)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DPRP_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DPRP_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "dprp_surgery"


def test_parallel_decode_matches_serial(tiny, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = tiny
    serial = load_image_folder(root, progress=False, cache=False, workers=1)
    monkeypatch.setattr(data, "_CHUNK", 2)
    parallel = load_image_folder(root, progress=True, cache=False, workers=2)
    assert torch.equal(serial.images, parallel.images) and torch.equal(serial.targets, parallel.targets)


@pytest.mark.parametrize(("workers", "pool"), [(1, None), (2, "processes"), (2, "threads")])
def test_decode_fills_the_dataset_buffer_without_a_copy(
    tiny, workers: int, pool: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images are decoded straight into the (N, 3, H, W) array the dataset keeps: no full-size copy after."""
    root, written = tiny
    monkeypatch.setattr(data, "_CHUNK", 5)  # 12 images: chunks of 5, 5 and 2
    if pool == "threads":
        monkeypatch.setattr(data, "_make_executor", lambda w, n: ThreadPoolExecutor(w))
    decoded: list[np.ndarray] = []
    decode_files = data._decode_files

    def spy(*args, **kwargs):
        decoded.append(decode_files(*args, **kwargs))
        return decoded[-1]

    monkeypatch.setattr(data, "_decode_files", spy)
    ds = load_image_folder(root, progress=False, cache=False, workers=workers)
    expected = torch.stack([torch.from_numpy(arr).permute(2, 0, 1) for _, arr in sorted(written.items())])
    assert ds.images.is_contiguous() and torch.equal(ds.images, expected)
    assert np.shares_memory(ds.images.numpy(), decoded[0])


@pytest.mark.parametrize(
    ("pixels", "suffix", "mode", "expected"),
    [
        (np.array([[0, 257], [32768, 65535]], np.uint16), ".png", "I;16", [[0, 1], [128, 255]]),  # 16-bit PNG
        (np.array([[0, 257], [32768, 65535]], np.int32), ".tif", "I", [[0, 1], [128, 255]]),
        (np.array([[0, 7], [100, 200]], np.int32), ".tif", "I", [[0, 7], [100, 200]]),  # bytes in 32-bit ints
        (np.array([[0, 2**20], [2**24, 2**28]], np.int32), ".tif", "I", [[0, 0], [15, 255]]),  # wider than 16 bits
        (np.array([[0.0, 0.25], [0.5, 1.0]], np.float32), ".tif", "F", [[0, 64], [128, 255]]),  # floats in [0, 1]
        (np.array([[0.0, 7.0], [100.0, 255.0]], np.float32), ".tif", "F", [[0, 7], [100, 255]]),  # in [0, 255]
    ],
    ids=["I;16-png", "I-tif", "I-8bit-tif", "I-32bit-tif", "F-unit", "F-255"],
)
def test_high_bit_depth_grayscale_is_scaled_to_8_bits(
    tmp_path: Path, pixels: np.ndarray, suffix: str, mode: str, expected: list
) -> None:
    path = tmp_path / "deep" / "a" / f"img{suffix}"
    path.parent.mkdir(parents=True)
    Image.fromarray(pixels).save(path)
    with Image.open(path) as im:
        assert im.mode == mode  # the file really holds the deep mode under test
    ds = load_image_folder(tmp_path / "deep", progress=False, cache=False)
    want = torch.tensor(expected, dtype=torch.uint8).expand(3, 2, 2)
    assert torch.equal(ds.images[0], want)


def test_resize_and_mixed_sizes(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    _make_folder(root, classes=["a"], per_class=2, size=(8, 8))
    _make_folder(root, classes=["b"], per_class=2, size=(6, 10), seed=1)
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(root, progress=False, cache=False)
    ds = load_image_folder(root, image_size=5, progress=False, cache=False)
    assert ds.images.shape == (4, 3, 5, 5)
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(root, image_size=0, progress=False, cache=False)


def test_grayscale_and_jpeg_become_rgb(tmp_path: Path) -> None:
    root = tmp_path / "gray"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 100, np.uint8), mode="L").save(root / "a" / "g.png")
    Image.fromarray(np.full((4, 4, 3), 50, np.uint8)).save(root / "a" / "c.JPG", quality=95)
    ds = load_image_folder(root, progress=False, cache=False)
    assert ds.images.shape == (2, 3, 4, 4)
    assert (ds.images[1] == 100).all()  # sorted: c.JPG, g.png
    assert (ds.images[0].int() - 50).abs().max() <= 2


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_image_named(tiny, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = tiny
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    monkeypatch.setattr(data, "_CHUNK", 2)
    with pytest.raises(ValueError, match=r"broken\.png"):
        load_image_folder(root, progress=False, cache=False, workers=workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_unusable_image_is_named_at_once(tiny, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = tiny
    bad = [root / "cat" / "0_first.png", root / "dog" / "broken.png", root / "dog" / "zz.jpg"]
    for path in bad:  # the very first file of the folder among them: the size comes from the first readable one
        path.write_bytes(b"not an image")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root / "dog" / "small.png")
    monkeypatch.setattr(data, "_CHUNK", 2)
    with pytest.raises(ValueError) as exc:
        load_image_folder(root, progress=False, cache=False, workers=workers)
    text = str(exc.value)
    assert text.startswith("4 of the 16 images of tiny cannot be used")
    lines = text.splitlines()[1:]
    assert [next(p.name for p in (*bad, root / "dog" / "small.png") if p.name in line) for line in lines] == [
        "0_first.png", "broken.png", "small.png", "zz.jpg"]  # in file order, whichever worker found them
    assert "is 5x5 but the first image is 8x8" in lines[2]
    for name in ("a", "b", "c", "d", "e", "f"):  # more than five: the first five and a count
        (root / "dog" / f"{name}_bad.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?s)10 of the 22 images.*\.\.\. and 5 more$"):
        load_image_folder(root, progress=False, cache=False, workers=workers)


def test_a_folder_of_only_unreadable_images_is_named(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        (tmp_path / "only" / "x").mkdir(parents=True, exist_ok=True)
        (tmp_path / "only" / "x" / name).write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"(?s)2 of the 2 images of only cannot be used.*a\.png.*b\.png"):
        load_image_folder(tmp_path / "only", progress=False, cache=False)


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nowhere.*does not exist"):
        load_image_folder(tmp_path / "nowhere", progress=False)


def test_no_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "x.png")
    with pytest.raises(ValueError, match=r"flat.*no class subfolders"):
        load_image_folder(root, progress=False)


def test_class_folder_without_images(tiny) -> None:
    root, _ = tiny
    (root / "empty_class").mkdir()
    (root / "empty_class" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty_class.*no images"):
        load_image_folder(root, progress=False, cache=False)


def test_file_instead_of_dir(tmp_path: Path) -> None:
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        load_image_folder(path, progress=False)


# -------------------------------------------------------------------------- TensorImageDataset


def test_tensor_image_dataset_validation() -> None:
    img = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(img.float(), [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="targets"):
        TensorImageDataset(img, [0], ["a", "b"])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        TensorImageDataset(img, [0, 2], ["a", "b"])
    with pytest.raises(ValueError, match="integers"):
        TensorImageDataset(img, torch.tensor([0.0, 1.0]), ["a", "b"])
    ds = TensorImageDataset(img, torch.tensor([1, 0], dtype=torch.int32), ["a", "b"])
    assert ds.targets.dtype == torch.int64 and "n=2" in repr(ds)


# ------------------------------------------------------------------------------------- subset


def _labelled(n_per_class: list[int], size: int = 2) -> TensorImageDataset:
    """Dataset whose image i is filled with value i % 256 and whose classes have given sizes."""
    targets = torch.cat([torch.full((k,), c) for c, k in enumerate(n_per_class)])
    n = len(targets)
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return TensorImageDataset(images, targets, [f"c{c}" for c in range(len(n_per_class))])


def test_subset_class_balanced_and_deterministic() -> None:
    ds = _labelled([50, 30, 20])
    a, b = subset(ds, 30), subset(ds, 30)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert a.class_counts() == [10, 10, 10] and a.classes == ds.classes
    assert subset(ds, 31).class_counts() == [11, 10, 10]
    assert subset(ds, 80).class_counts() == [30, 30, 20]  # the small class runs out
    assert subset(ds, 100).class_counts() == [50, 30, 20]
    c = subset(ds, 30, seed=1)
    assert not torch.equal(a.images, c.images)
    first = a.images[:, 0, 0, 0].long()
    assert torch.all(first[1:] > first[:-1])  # original order kept
    for bad in (0, 101, 2.0):
        with pytest.raises(ValueError, match="subset size"):
            subset(ds, bad)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- TensorLoader


@pytest.mark.parametrize(
    ("n", "bs", "drop_last", "expected"),
    [(10, 4, False, 3), (10, 4, True, 2), (8, 4, True, 2), (3, 4, True, 0), (3, 4, False, 1)],
)
def test_loader_len(n: int, bs: int, drop_last: bool, expected: int) -> None:
    loader = TensorLoader(_labelled([n]), bs, drop_last=drop_last)
    assert len(loader) == expected
    batches = list(loader)
    assert len(batches) == expected
    assert sum(x.shape[0] for x, _ in batches) == (expected * bs if drop_last else n)


def test_loader_shapes_and_normalisation(tiny, cache: Path) -> None:
    root, _ = tiny
    ds = load_image_folder(root, cache_dir=cache, progress=False)
    loader = TensorLoader(ds, 5)
    assert loader.dataset is ds
    xs, ys = zip(*loader)
    assert [x.shape for x in xs] == [(5, 3, 8, 8), (5, 3, 8, 8), (2, 3, 8, 8)]
    assert all(x.dtype == torch.float32 for x in xs) and all(y.dtype == torch.int64 for y in ys)
    x = torch.cat(xs)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (ds.images.float() / 255 - mean) / std)
    assert torch.equal(torch.cat(ys), ds.targets)
    plain = torch.cat([x for x, _ in TensorLoader(ds, 12, mean=(0, 0, 0), std=(1, 1, 1))])
    torch.testing.assert_close(plain, ds.images.float() / 255)


def test_loader_validation() -> None:
    ds = _labelled([4])
    for kwargs, word in [({"batch_size": 0}, "batch_size"), ({"augment": "imagenet"}, "augment"),
                         ({"mean": (0.5,)}, "mean and std"), ({"std": (1, 0, 1)}, "std"),
                         ({"crop_padding": -1}, "crop_padding")]:
        with pytest.raises(ValueError, match=word):
            TensorLoader(ds, **kwargs)
    with pytest.raises(ValueError, match="TensorImageDataset"):
        TensorLoader([1, 2, 3])  # type: ignore[arg-type]


def _values(loader: TensorLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)
    )


def test_loader_determinism_seed_epoch() -> None:
    ds = _labelled([40, 40], size=6)
    make = lambda seed: TensorLoader(ds, 16, shuffle=True, augment="cifar", seed=seed)  # noqa: E731
    a, b = make(0), make(0)
    a.set_epoch(3)
    b.set_epoch(3)
    first = _values(a)
    assert _same(first, _values(b))
    assert a.epoch == 4  # each pass advances the epoch
    assert not _same(first, _values(a))  # epoch 4 differs
    a.set_epoch(3)
    assert _same(first, _values(a))  # pinned again
    c = make(1)
    c.set_epoch(3)
    assert not _same(first, _values(c))


def test_loader_shuffle_is_a_permutation_with_aligned_labels() -> None:
    ds = _labelled([30, 20])  # image value == index, label 0 for index < 30
    loader = TensorLoader(ds, 7, shuffle=True, mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    xs, ys = zip(*loader)
    idx = torch.cat(xs)[:, 0, 0, 0].round().long()
    assert sorted(idx.tolist()) == list(range(50)) and idx.tolist() != list(range(50))
    assert torch.equal(torch.cat(ys), (idx >= 30).long())


def test_augmentation_crops_and_flips_a_zero_padded_image() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(1, 256, (3, 6, 6), generator=g, dtype=torch.uint8)  # no zeros
    n = 64
    ds = TensorImageDataset(base.expand(n, 3, 6, 6).contiguous(), torch.zeros(n, dtype=torch.long), ["x"])
    unit = dict(mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))  # x == raw pixel values
    (x, _), = list(TensorLoader(ds, n, augment="cifar", seed=0, **unit))
    x = x.round().to(torch.uint8)
    padded = torch.nn.functional.pad(base, (4, 4, 4, 4))
    candidates = {}
    for oy in range(9):
        for ox in range(9):
            crop = padded[:, oy : oy + 6, ox : ox + 6]
            candidates[(oy, ox, False)] = crop
            candidates[(oy, ox, True)] = crop.flip(-1)
    used = []
    for item in x:
        match = [k for k, c in candidates.items() if torch.equal(c, item)]
        assert match, "augmented image is not a (flipped) crop of the zero-padded image"
        used.append(match[0])
        nonzero = item[item != 0]
        assert set(nonzero.tolist()) <= set(base.flatten().tolist())  # crops keep pixel values
    assert any(not torch.equal(item, base) for item in x)
    assert any(k[2] for k in used) and any(not k[2] for k in used)  # both flipped and not
    assert len({k[:2] for k in used}) > 10  # many offsets
    # no augmentation: every item is the centred image
    (x0, _), = list(TensorLoader(ds, n, augment=None, **unit))
    assert torch.equal(x0.round().to(torch.uint8), base.expand(n, 3, 6, 6))


# -------------------------------------------------------------------- splits, archives, specs


def _make_split_tree(root: Path, eval_name: str = "test") -> None:
    _make_folder(root / "train", per_class=2)
    _make_folder(root / eval_name, per_class=1, seed=1)


def test_resolve_split_dirs(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _make_split_tree(root)
    assert resolve_split_dirs(root) == (root / "train", root / "test")
    _make_folder(root / "val", per_class=1)
    assert resolve_split_dirs(root) == (root / "train", root / "val")


def test_resolve_split_dirs_errors(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _make_folder(root / "test", per_class=1)
    with pytest.raises(ValueError, match=r"ds.*no train/"):
        resolve_split_dirs(root)
    _make_folder(root / "train", per_class=1)
    (root / "test").rename(root / "other")
    with pytest.raises(ValueError, match=r"no val/ or test/"):
        resolve_split_dirs(root)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_split_dirs(tmp_path / "missing")


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("top", ["", "cifar/"])
def test_extract_archive(tmp_path: Path, top: str, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _tar(tmp_path / "ds.tar.gz", {f"{top}train/a/0.png": _png(), f"{top}test/a/0.png": _png()})
    dest = tmp_path / "out"
    root = extract_archive(archive, dest)
    assert root == (dest / top).resolve() and (root / "train" / "a" / "0.png").is_file()

    def no_open(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(tarfile, "open", no_open)
    assert extract_archive(archive, dest) == root  # skipped the second time


@pytest.mark.parametrize("bad", ["../evil.txt", "train/../../evil.txt", "/tmp/dprp_evil_abs.txt"])
def test_extract_archive_refuses_unsafe_members(tmp_path: Path, bad: str) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", {"train/a/0.png": _png(), bad: b"pwned"})
    dest = tmp_path / "sub" / "out"
    with pytest.raises(ValueError, match="Refusing"):
        extract_archive(archive, dest)
    assert not (tmp_path / "sub" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/dprp_evil_abs.txt").exists()
    assert not dest.exists()  # nothing written at all


def _tar_with_link(path: Path, linkname: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in ("train/a/0.png", "test/a/0.png"):
            payload = _png()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("train/a/link.png")
        link.type = tarfile.SYMTYPE
        link.linkname = linkname
        tar.addfile(link)
    return path


def test_extract_archive_links(tmp_path: Path) -> None:
    root = extract_archive(_tar_with_link(tmp_path / "ok.tar.gz", "0.png"), tmp_path / "ok")
    assert (root / "train" / "a" / "link.png").read_bytes() == _png()
    with pytest.raises(ValueError, match="Refusing.*link pointing outside"):
        extract_archive(_tar_with_link(tmp_path / "bad.tar.gz", "../../../etc/passwd"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_extract_archive_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        extract_archive(tmp_path / "none.tar.gz", tmp_path / "out")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="Cannot extract"):
        extract_archive(junk, tmp_path / "out")
    notrain = _tar(tmp_path / "notrain.tar.gz", {"data/a/0.png": _png()})
    with pytest.raises(ValueError, match="no train/"):
        extract_archive(notrain, tmp_path / "out2")


def test_open_data_directory_and_archive(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "ds"
    _make_split_tree(root)
    train, evals = open_data(root, cache_dir=cache)
    assert len(train) == 6 and len(evals) == 3 and train.classes == evals.classes == CLASSES
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="ds")
    train2, evals2 = open_data(str(archive), cache_dir=cache)
    assert torch.equal(train2.images, train.images) and torch.equal(evals2.targets, evals.targets)
    assert len(list((cache / "extracted").iterdir())) == 1


def test_open_data_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Unknown dataset prefix 'imagenet'.*cifar10:DIR"):
        open_data("imagenet:/data")
    with pytest.raises(ValueError, match=r"does not exist.*cifar10:DIR"):
        open_data(tmp_path / "missing")
    with pytest.raises(ValueError, match="--download"):
        open_data(f"cifar10:{tmp_path}")
    with pytest.raises(ValueError, match="--download"):
        open_data(f"cifar100:{tmp_path}")
    (tmp_path / "x.zip").write_bytes(b"")
    with pytest.raises(ValueError, match="archive"):
        open_data(tmp_path / "x.zip")
    root = tmp_path / "ds"
    _make_folder(root / "train", classes=["a", "b"], per_class=1)
    _make_folder(root / "val", classes=["a", "c"], per_class=1)
    with pytest.raises(ValueError, match="different classes"):
        open_data(root, cache_dir=tmp_path / "cache")


def test_open_data_torchvision_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import datasets

    class FakeCIFAR10:
        base_folder = "cifar-10-batches-py"

        def __init__(self, root: str, train: bool, download: bool) -> None:
            n = 6 if train else 4
            self.data = np.arange(n * 32 * 32 * 3, dtype=np.int64).astype(np.uint8).reshape(n, 32, 32, 3)
            self.targets = [i % 2 for i in range(n)]
            self.classes = ["airplane", "automobile"]

    monkeypatch.setattr(datasets, "CIFAR10", FakeCIFAR10)
    train, evals = open_data(f"cifar10:{tmp_path}")
    assert train.images.shape == (6, 3, 32, 32) and evals.images.shape == (4, 3, 32, 32)
    assert torch.equal(train.images[1, :, 2, 3], torch.from_numpy(FakeCIFAR10("", True, False).data[1, 2, 3]))
    assert train.classes == ["airplane", "automobile"] and evals.targets.tolist() == [0, 1, 0, 1]
    small, _ = open_data(f"cifar10:{tmp_path}", image_size=16)
    assert small.images.shape == (6, 3, 16, 16)


# ------------------------------------------------------------------------ the real CIFAR-10 copy


def test_cifar10_jpeg_layout(cifar10_dir: Path) -> None:
    train_dir, eval_dir = resolve_split_dirs(cifar10_dir)
    assert train_dir.name == "train" and eval_dir.name == "test"
    classes = sorted(p.name for p in train_dir.iterdir())
    assert classes == "airplane automobile bird cat deer dog frog horse ship truck".split()
    assert len(list((train_dir / "cat").iterdir())) == 5000


def test_changed_archive_replaces_the_earlier_extraction(tmp_path: Path) -> None:
    archive = tmp_path / "ds.tar.gz"
    dest = tmp_path / "out"
    _tar(archive, {f"{s}/{c}/0.png": _png() for s in ("train", "test") for c in ("bird", "cat", "dog")})
    root = extract_archive(archive, dest)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["bird", "cat", "dog"]
    _tar(archive, {f"{s}/{c}/0.png": _png() for s in ("train", "test") for c in ("cat", "dog")})
    os.utime(archive, ns=(1, 1))  # a different mtime, as a rebuilt archive has
    root = extract_archive(archive, dest)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["cat", "dog"]  # no stale class left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.tar.gz", "out"]  # no partial or stale folders


def test_extract_archive_refuses_a_foreign_destination(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "ds.tar.gz", {"train/a/0.png": _png(), "test/a/0.png": _png()})
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="Refusing to extract .* not an extraction by dprp_surgery"):
        extract_archive(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"]


def test_archive_with_two_datasets_names_them(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "two.tar.gz", {f"{d}/{s}/a/0.png": _png() for d in ("ds1", "ds2")
                                             for s in ("train", "test")})
    with pytest.raises(ValueError, match=r"several datasets \(train/ one level down in 'ds1', 'ds2'\)"):
        extract_archive(archive, tmp_path / "out")


# ---------------------------------------------------------------------------- silent wrong data
def test_swapping_class_folders_invalidates_the_cache(tiny, cache: Path) -> None:
    root, written = tiny
    load_image_folder(root, cache_dir=cache, progress=False)
    os.rename(root / "bird", root / "tmp")
    os.rename(root / "cat", root / "bird")
    os.rename(root / "tmp", root / "cat")  # same names, sizes and mtimes: only the inodes moved
    swapped = load_image_folder(root, cache_dir=cache, progress=False)
    assert torch.equal(swapped.images[0], torch.from_numpy(written["cat/000.png"]).permute(2, 0, 1))
    assert swapped.targets[0] == 0  # now labelled 'bird', as its folder says


def test_a_new_state_of_a_folder_replaces_its_stale_cache_only(tiny, cache: Path, tmp_path: Path) -> None:
    root, _ = tiny

    def files() -> list[str]:
        return sorted(p.name for p in cache.glob("*.safetensors"))

    load_image_folder(root, cache_dir=cache, progress=False)
    load_image_folder(root, cache_dir=cache, progress=False, image_size=4)  # another size: kept beside it
    load_image_folder(root, cache_dir=cache, progress=False, limit=6, seed=1)  # a subset: kept too
    twin = tmp_path / "other" / "tiny"  # another folder of the same name (the same file-name prefix)
    _make_folder(twin)
    load_image_folder(twin, cache_dir=cache, progress=False)
    before = files()
    assert len(before) == 4
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "dog" / "new.png")
    load_image_folder(root, cache_dir=cache, progress=False)  # the folder changed: its full-size cache is stale
    after = files()
    assert len(after) == 4 and len(set(before) - set(after)) == 1
    load_image_folder(root, cache_dir=cache, progress=False, limit=6, seed=1)
    load_image_folder(root, cache_dir=cache, progress=False, limit=6, seed=2)  # another seed is another subset
    assert len(files()) == 5 and len(set(files()) - set(after)) == 2 and len(set(after) - set(files())) == 1


def test_an_image_replaced_by_an_older_copy_invalidates_the_cache(tiny, cache: Path) -> None:
    root, _ = tiny
    load_image_folder(root, cache_dir=cache, progress=False)
    target = root / "dog" / "000.png"
    old = os.stat(target).st_mtime_ns
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(target)
    os.utime(target, ns=(old - 10**9, old - 10**9))  # as cp -p or a restore from backup leaves it
    again = load_image_folder(root, cache_dir=cache, progress=False)
    assert int(again.images[8].sum()) == 0


def test_a_symlink_loop_is_refused_not_read_twice(tiny, cache: Path) -> None:
    root, _ = tiny
    os.symlink(".", root / "cat" / "loop")
    with pytest.raises(ValueError, match=r"loop.*is the folder .*cat.* again \(a symbolic-link loop"):
        load_image_folder(root, cache_dir=cache, progress=False)


def test_hidden_subfolders_of_a_class_are_skipped(tiny, cache: Path) -> None:
    root, _ = tiny
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / ".ipynb_checkpoints" / "000-checkpoint.png")
    assert load_image_folder(root, cache_dir=cache, progress=False).class_counts() == [4, 4, 4]


def test_a_broken_symlinked_image_is_named(tiny, cache: Path) -> None:
    root, _ = tiny
    os.symlink(root / "nowhere.png", root / "dog" / "broken.png")
    with pytest.raises(ValueError, match=r"broken.png' cannot be read .*broken symbolic link.*remove it"):
        load_image_folder(root, cache_dir=cache, progress=False)


@pytest.mark.parametrize("damage", ["cut-at-member", "cut-at-member-gz", "bad-header"])
def test_a_truncated_or_corrupt_archive_is_refused_and_not_marked_extracted(tmp_path: Path, damage: str) -> None:
    plain = tmp_path / "full.tar"
    with tarfile.open(plain, "w") as tar:
        for i in range(4):
            for split in ("train", "test"):
                info = tarfile.TarInfo(f"{split}/a/{i}.png")
                payload = _png()
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(plain) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    raw = plain.read_bytes()
    archive = tmp_path / ("ds.tar.gz" if damage.endswith("gz") else "ds.tar")
    if damage == "bad-header":
        raw = raw[:offsets[5]] + b"x" * 100 + raw[offsets[5] + 100:]
    else:
        raw = raw[:offsets[5]]  # an interrupted download that stops between two members
    if damage.endswith("gz"):
        import gzip

        raw = gzip.compress(raw)
    archive.write_bytes(raw)
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match=r"is truncated or corrupt after member 'train/a/2.png'.*re-download"):
        extract_archive(archive, dest)
    assert not dest.exists() and not list(tmp_path.glob(".out.partial-*"))
    extract_archive(plain, dest)  # the intact archive extracts
    assert len(list((dest / "train" / "a").iterdir())) == 4


def test_a_damaged_cache_file_is_decoded_again(tiny, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, _ = tiny
    ref = load_image_folder(root, cache_dir=cache, progress=False)
    (cache_file,) = cache.glob("*.safetensors")
    raw = bytearray(cache_file.read_bytes())
    raw[-200:] = bytes(200)  # pixels zeroed, header intact: safetensors itself does not notice
    cache_file.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        again = load_image_folder(root, cache_dir=cache, progress=False)
    assert torch.equal(again.images, ref.images) and "content hash does not match" in caplog.text


def test_a_dataset_that_cannot_fit_in_memory_is_refused_before_decoding(tiny, cache: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = tiny
    monkeypatch.setattr(data, "_available_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"needs 0\.0 GiB of memory but 0\.0 GiB are available; pass a smaller image"):
        load_image_folder(root, cache_dir=cache, progress=False, image_size=64)


def test_splits_of_different_image_sizes_need_an_image_size(tmp_path: Path) -> None:
    _make_folder(tmp_path / "d" / "train", size=(8, 8))
    _make_folder(tmp_path / "d" / "val", size=(16, 16))
    with pytest.raises(ValueError, match=r"train/ images are \(3, 8, 8\) but val/ images are \(3, 16, 16\)"):
        open_data(tmp_path / "d", cache_dir=tmp_path / "cache", progress=False)
    train, val = open_data(tmp_path / "d", image_size=8, cache_dir=tmp_path / "cache", progress=False)
    assert train.image_shape == val.image_shape == (3, 8, 8)


def test_a_cache_dir_under_a_file_is_named_for_archives(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "ds.tar.gz", {"train/a/0.png": _png(), "test/a/0.png": _png()})
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"cache directory .* lies under the file .*not-a-dir.*point DPRP_CACHE"):
        open_data(archive, cache_dir=blocker / "cache", progress=False)


def _extract_and_read(archive: str, dest: str, barrier, results, extractions) -> None:
    real = data._extract_into

    def counted(*args, **kwargs):
        with extractions.get_lock():
            extractions.value += 1
        return real(*args, **kwargs)

    data._extract_into = counted  # this forked child only
    barrier.wait()
    try:
        root = extract_archive(archive, dest)
        time.sleep(0.2)  # the other process may finish its extraction now: our files must stay
        results.put(sum(len(p.read_bytes()) > 0 for p in sorted((root / "train").rglob("*.png"))))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(repr(exc))


def test_two_processes_extracting_one_archive_do_not_pull_it_from_under_each_other(tmp_path: Path) -> None:
    import multiprocessing

    members = {f"{split}/{c}/{i}.png": _png() for split in ("train", "test") for c in "ab" for i in range(150)}
    archive = _tar(tmp_path / "ds.tar.gz", members)
    ctx = multiprocessing.get_context("fork")
    barrier, results, extractions = ctx.Barrier(2), ctx.Queue(), ctx.Value("i", 0)
    procs = [ctx.Process(target=_extract_and_read,
                         args=(str(archive), str(tmp_path / "out"), barrier, results, extractions))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert got == [300, 300]
    assert extractions.value == 1  # the second process waited for the first and reused its extraction
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.tar.gz", "out"]  # no partial or stale folder left


@pytest.mark.parametrize(("limit", "seed"), [(5, 0), (7, 3), (12, 1), (50, 0)])
def test_a_limit_decodes_only_the_subset_it_keeps(tiny, cache: Path, limit: int, seed: int,
                                                  decode_counter: list[int]) -> None:
    root, _ = tiny
    full = load_image_folder(root, cache_dir=cache, progress=False, cache=False)
    decoded = decode_counter
    decoded.clear()  # count from here: the limited loads only
    limited = load_image_folder(root, cache_dir=cache, progress=False, limit=limit, seed=seed)
    expected = subset(full, min(limit, len(full)), seed=seed)
    assert torch.equal(limited.images, expected.images) and torch.equal(limited.targets, expected.targets)
    assert decoded == [min(limit, len(full))]  # the other images were never decoded
    again = load_image_folder(root, cache_dir=cache, progress=False, limit=limit, seed=seed)
    assert decoded == [min(limit, len(full))] and torch.equal(again.images, expected.images)  # from the cache


def test_open_data_limits_both_splits(tmp_path: Path) -> None:
    _make_folder(tmp_path / "d" / "train", per_class=6)
    _make_folder(tmp_path / "d" / "val", per_class=3)
    train, val = open_data(tmp_path / "d", cache_dir=tmp_path / "cache", progress=False, train_limit=6,
                           eval_limit=4, seed=2)
    assert (len(train), len(val)) == (6, 4) and train.class_counts() == [2, 2, 2]
    assert train.classes == val.classes == CLASSES


@pytest.mark.parametrize(("name", "mode"), [("ds.tar.bz2", "w:bz2"), ("ds.tar.xz", "w:xz"), ("ds.txz", "w:xz")])
def test_bz2_and_xz_archives_open(tmp_path: Path, name: str, mode: str) -> None:
    archive = tmp_path / name
    with tarfile.open(archive, mode) as tar:
        for split in ("train", "test"):
            for c in "ab":
                payload = _png()
                info = tarfile.TarInfo(f"{split}/{c}/0.png")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    train, val = open_data(archive, cache_dir=tmp_path / "cache", progress=False)
    assert train.classes == val.classes == ["a", "b"] and len(train) == len(val) == 2


def test_images_of_unread_formats_are_named_not_dropped_silently(tiny) -> None:
    root, _ = tiny
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / "anim.gif")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "dog" / "photo.jfif", format="JPEG")
    (root / "dog" / "notes.txt").write_text("not an image: no warning for it")
    with pytest.warns(UserWarning, match=r"skipped 2 image\(s\).*1 \.gif, 1 \.jfif.*convert them"):
        ds = load_image_folder(root, progress=False, cache=False)
    assert len(ds) == 12  # the same images as before: nothing else changes


def test_evaluation_needs_only_a_val_or_test_split(tmp_path: Path, cache: Path) -> None:
    _make_folder(tmp_path / "d" / "test")
    train, evals = open_data(tmp_path / "d", cache_dir=cache, progress=False, train_limit=0)
    assert train is None and len(evals) == 12
    with pytest.raises(ValueError, match="has no train/ split"):  # training still needs train/
        open_data(tmp_path / "d", cache_dir=cache, progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"has no val/ or test/ split \(subfolders: none\)"):
        open_data(tmp_path / "empty_dir", cache_dir=cache, progress=False, train_limit=0)


@pytest.mark.parametrize("top", ["", "ds/"])
@pytest.mark.parametrize("split", ["val", "test"])
def test_an_archive_for_evaluation_needs_only_a_val_or_test_split(tmp_path: Path, cache: Path, top: str,
                                                                  split: str) -> None:
    # the archive path asked for train/ even with train_limit=0 (dprp eval --data x.tar.gz)
    archive = _tar(tmp_path / "eval.tar.gz", {f"{top}{split}/a/0.png": _png(), f"{top}{split}/b/0.png": _png()})
    train, evals = open_data(archive, cache_dir=cache, progress=False, train_limit=0)
    assert train is None and evals.classes == ["a", "b"] and len(evals) == 2
    with pytest.raises(ValueError, match=r"has no train/ folder at its top level or one level down"):
        open_data(archive, cache_dir=cache, progress=False)  # training still needs train/
    other = _tar(tmp_path / "other.tar.gz", {"train/a/0.png": _png()})
    with pytest.raises(ValueError, match=r"has no val/ or test/ folder .*expected val/<class>/\*.jpg or test/"):
        open_data(other, cache_dir=cache, progress=False, train_limit=0)


def test_a_split_given_for_the_dataset_is_named_as_one(tmp_path: Path, cache: Path) -> None:
    _make_folder(tmp_path / "d" / "train")
    _make_folder(tmp_path / "d" / "val")
    for limit in (None, 0):  # training, and evaluation only
        with pytest.raises(ValueError, match=r"looks like one split itself: pass the folder above it"):
            open_data(tmp_path / "d" / "train", cache_dir=cache, progress=False, train_limit=limit)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_image_cache_file_gets_the_umask_mode(tiny, cache: Path, umask: int) -> None:
    import stat

    root, _ = tiny
    old = os.umask(umask)
    try:
        load_image_folder(root, cache_dir=cache, progress=False)
    finally:
        os.umask(old)
    files = [f for f in cache.rglob("*") if f.is_file()]
    assert files and {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o666 & ~umask}  # mkstemp gave 0600


def test_datasets_remember_the_size_their_images_were_stored_at(tmp_path: Path, cache: Path) -> None:
    # a timm model's recipe resized 32-px images to 224 px (49x the compute) with nothing to say so: the size as
    # stored is kept beside the decoded images (for the CLI's note), from a fresh decode and from the cache
    root = tmp_path / "wide"
    _make_folder(root, size=(6, 10))
    for fresh in (True, False):
        ds = load_image_folder(root, image_size=16, cache_dir=cache, progress=False)
        assert ds.image_shape == (3, 16, 16) and ds.source_size == (6, 10), fresh
    assert subset(ds, 3).source_size == (6, 10)
    assert TensorImageDataset(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), [0], ["a"]).source_size is None
