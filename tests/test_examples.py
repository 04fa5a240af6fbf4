"""The examples run to completion."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dprp_surgery import DPRPConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, args: list[str], monkeypatch) -> dict:
    """Run examples/NAME as a script (raises on a non-zero exit) and return its globals."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared 2-core machine
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
    try:
        return runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        torch.set_num_threads(threads)


def ranks_line(out: str) -> tuple[int, int]:
    match = re.search(r"ranks: (\d+) -> (\d+) \(sum over \d+ layers\)", out)
    assert match, out
    return int(match.group(1)), int(match.group(2))


def test_custom_loop(monkeypatch, capsys):
    from dprp_surgery.models import CifarResNet

    run_example("custom_loop.py", [], monkeypatch)
    out = capsys.readouterr().out
    before, after = ranks_line(out)
    assert after < before
    dense, now = map(int, re.search(r"params: (\d+) -> (\d+);", out).groups())
    # from the dense ResNet-8 (as timm_model.py does), not from its full-rank factorization (76,030)
    assert dense == sum(p.numel() for p in CifarResNet(8).parameters()) == 75290 and now < dense


@pytest.mark.parametrize(("flags", "words"), [(["--depth", "9"], "--depth 9: a CIFAR ResNet has depth 6n+2"),
                                               (["--epochs", "0"], "--epochs 0: give at least 1")])
def test_custom_loop_bad_input_exits_2(flags, words, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        run_example("custom_loop.py", flags, monkeypatch)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and words in err and "Traceback" not in err, err


@pytest.mark.parametrize("preset", ["tuned", "tuned-target50"])
def test_cifar_resnet20_smoke(shared_dir, tmp_path, monkeypatch, capsys, caplog, preset):
    run = tmp_path / "run"
    run_example("cifar_resnet20.py", ["--smoke", "--quiet", "--out", str(run), "--preset", preset], monkeypatch)
    out = capsys.readouterr().out
    assert "256 train / 128 test images" in out and "1 epochs" in out, out
    before, after = ranks_line(out)
    assert 0 < after < before, out  # the smoke run prunes (no cool-down epoch, pruning every step)
    assert "smoke: pruning every step and no cool-down epoch" in out
    assert "cool-down" not in caplog.text, caplog.text  # no contradictory "nothing is compressed" warning
    dense, now = map(int, re.search(r"params: (\d+) -> (\d+)", out).groups())
    assert dense == 269722 and now > 0  # the CIFAR ResNet-20's 0.27M parameters
    top1 = [float(v) for v in re.search(r"top-1: ([\d.]+)% -> ([\d.]+)%", out).groups()]
    assert all(0 <= v <= 100 for v in top1)
    assert top1[0] > 50, out  # the pretrained weights were loaded (random init gives ~10%)
    exported = int(re.search(r"exported \(auto\): (\d+) params", out).group(1))
    assert exported <= dense  # auto keeps the cheaper form of every layer
    assert re.search(r"load-back check: max \|output difference\| \S+ on 16 test images: OK", out), out
    assert (run / "model" / "manifest.json").is_file() and (run / "model" / "model.safetensors").is_file()
    assert (run / "checkpoint.pt").is_file() and (run / "history.jsonl").is_file()
    config = torch.load(run / "checkpoint.pt", weights_only=True)["config"]
    assert config["comp_weighting"] == DPRPConfig.preset(preset).comp_weighting


def test_cifar_resnet20_missing_files(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="pretrained weights .*nope.th not found"):
        run_example("cifar_resnet20.py", ["--weights", str(tmp_path / "nope.th")], monkeypatch)
    weights = tmp_path / "w.th"
    weights.write_bytes(b"")  # only its existence is checked before the data
    with pytest.raises(SystemExit, match="dataset .*none.tar.gz not found"):
        run_example("cifar_resnet20.py", ["--weights", str(weights), "--data", str(tmp_path / "none.tar.gz")],
                    monkeypatch)


def test_timm_model_smoke(monkeypatch, capsys):
    run_example("timm_model.py", ["--smoke"], monkeypatch)
    out = capsys.readouterr().out
    assert "random-init model (temporary file)" in out and "10 classes, 64 px" in out, out
    assert len(re.findall(r"^epoch \d+: loss", out, flags=re.M)) == 2
    before, after = ranks_line(out)
    assert after < before  # aggressive demo settings: ranks fall within two epochs
    assert re.search(r"params: \d+ -> \d+; MACs: \d+ -> \d+", out), out
    assert "dense export: loads strict=True into timm.create_model('resnet18', num_classes=10)" in out
    assert out.rstrip().endswith(": OK")


def test_timm_model_smoke_keeps_a_fixed_input_size(monkeypatch, capsys):
    """A ViT built for 160 px (timm's test_vit3) runs the smoke at its own size; --image-size 64 is refused."""
    run_example("timm_model.py", ["--smoke", "--model", "test_vit3"], monkeypatch)
    out = capsys.readouterr().out
    assert "10 classes, 160 px" in out and out.rstrip().endswith(": OK"), out
    with pytest.raises(SystemExit, match="--image-size 64: test_vit3 does not take 64 px inputs .* use 160"):
        run_example("timm_model.py", ["--smoke", "--model", "test_vit3", "--image-size", "64"], monkeypatch)


def test_timm_model_image_folder_and_weights(tmp_path, monkeypatch, capsys):
    """A local .pth with an ImageNet-sized head, a 3-class ImageFolder, and the dense export written back."""
    import timm
    from PIL import Image

    from dprp_surgery.io import load_model

    monkeypatch.setenv("DPRP_CACHE", str(tmp_path / "cache"))  # decoded-image cache away from ~/.cache
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / c / f"{i}.png")
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)  # 1000 classes
    out_file = tmp_path / "export" / "resnet18-dprp.safetensors"
    run_example("timm_model.py", ["--weights", str(weights), "--data", str(tmp_path / "images"), "--image-size",
                                  "32", "--epochs", "1", "--batch-size", "4", "--batches", "2", "--out",
                                  str(out_file)], monkeypatch)
    out = capsys.readouterr().out
    assert f"with weights {weights}" in out and "12 images of" in out and "3 classes, 32 px" in out, out
    assert "mean (0.485, 0.456, 0.406)" in out  # timm's data config of resnet18
    assert "1 epochs of 2 batches of 4" in out
    ranks_line(out)
    assert "timm.create_model('resnet18', num_classes=3)" in out and out_file.is_file()
    model, arch = load_model(f"timm:resnet18@{out_file}")  # the class count comes from the file
    assert arch == "timm:resnet18" and model.num_classes == 3


def test_timm_model_num_classes_fewer_than_the_data(tmp_path, monkeypatch):
    """--num-classes below the folder's classes is refused by name (a 2-way head cannot learn 3 labels)."""
    from PIL import Image

    monkeypatch.setenv("DPRP_CACHE", str(tmp_path / "cache"))
    for c in ("ant", "bee", "cat"):
        (tmp_path / "images" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / c / "0.png")
    args = ["--smoke", "--data", str(tmp_path / "images")]
    with pytest.raises(SystemExit, match=r"--num-classes 2 is fewer than the 3 classes of --data .* leave --num"):
        run_example("timm_model.py", [*args, "--num-classes", "2"], monkeypatch)
    with pytest.raises(SystemExit, match="--num-classes 0: give at least 1"):
        run_example("timm_model.py", [*args, "--num-classes", "0"], monkeypatch)
