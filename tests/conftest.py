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


@pytest.fixture
def stop_in_epoch(monkeypatch: pytest.MonkeyPatch):
    """Call ``stop_in_epoch(N)`` to make every DPRPTrainer raise KeyboardInterrupt (a stopped process) when
    epoch N starts; ``stop_in_epoch(None)`` lets training run again."""
    from dprp_surgery.trainer import DPRPTrainer

    run_epoch = DPRPTrainer._run_epoch

    def arm(epoch: int | None) -> None:
        def stopped(self, e):
            if e == epoch:
                raise KeyboardInterrupt
            return run_epoch(self, e)

        monkeypatch.setattr(DPRPTrainer, "_run_epoch", run_epoch if epoch is None else stopped)

    return arm
