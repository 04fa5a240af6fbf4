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


@pytest.fixture
def without_manifest_hash():
    """Turn an artifact into one written before the manifest hash was recorded, so its manifest may be edited.

    The weights are rewritten without the hash key and the manifest's sha256 follows them; tests then edit the
    manifest to reach the checks behind the hash (which an artifact of an earlier version only has).
    """
    import hashlib
    import json

    def strip(artifact: Path) -> Path:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        weights = artifact / "model.safetensors"
        with safe_open(str(weights), framework="pt") as f:
            metadata = {k: v for k, v in (f.metadata() or {}).items() if k != "dprp_manifest_sha256"}
        save_file(load_file(str(weights)), str(weights), metadata=metadata)
        manifest = json.loads((artifact / "manifest.json").read_text())
        manifest["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        (artifact / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return artifact

    return strip


@pytest.fixture
def decode_counter(monkeypatch, tmp_path):
    """The number of images of every decode call (`data._decode_files`), with a fresh DPRP_CACHE."""
    from dprp_surgery import data

    monkeypatch.setenv("DPRP_CACHE", str(tmp_path / "cache"))
    counts: list[int] = []
    real = data._decode_files

    def counting(files, *args, **kwargs):
        counts.append(len(files))
        return real(files, *args, **kwargs)

    monkeypatch.setattr(data, "_decode_files", counting)
    return counts
