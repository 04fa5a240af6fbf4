"""Shared pytest fixtures: the read-only shared data folder and the extracted CIFAR-10 JPEGs."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ``shared/`` folder beside the repository (pretrained models, datasets)."""
    path = Path(__file__).resolve().parents[1].parent / "shared"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (it holds models/ and datasets/ beside the repo)")
    return path


@pytest.fixture(scope="session")
def cifar10_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 as JPEGs (train/ and test/ ImageFolders), extracted once per session."""
    from dprp_surgery.data import extract_archive

    archive = shared_dir / "datasets" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"CIFAR-10 JPEG archive {archive} not found")
    return extract_archive(archive, tmp_path_factory.mktemp("cifar10"))
