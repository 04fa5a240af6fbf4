"""Tests of dprp_surgery.models: architecture, fx tracing and pretrained checkpoint loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from dprp_surgery.models import (
    CIFAR_MODELS,
    BasicBlock,
    CifarResNet,
    ShortcutA,
    load_cifar_checkpoint,
    resnet20,
    resnet32,
)

# Parameter counts with 10 classes (resnet20 is the "0.27M" of the models README).
PARAM_COUNTS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
}

# Correct predictions of each pretrained model on subset(test, 1000, seed=0) of the JPEG copy
# (100 images per class), measured once on CPU. On the full 10,000-image test/ the same code gives
# 8103 / 8256 / 8320 correct, exactly the 81.03% / 82.56% / 83.20% of the datasets README.
SLICE_CORRECT = {20: 800, 32: 821, 56: 830}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def models_dir(shared_dir: Path) -> Path:
    """Folder of the pretrained cifar10_resnet*.th files."""
    path = shared_dir / "models"
    if not path.is_dir():
        pytest.skip(f"pretrained model folder {path} not found")
    return path


def _checkpoint(models_dir: Path, depth: int) -> Path:
    path = models_dir / f"cifar10_resnet{depth}.th"
    if not path.is_file():
        pytest.skip(f"pretrained checkpoint {path} not found")
    return path


@pytest.mark.parametrize("name", list(CIFAR_MODELS))
def test_param_count_and_output_shape(name: str) -> None:
    model = CIFAR_MODELS[name]()
    assert _n_params(model) == PARAM_COUNTS[name]
    depth = int(name.removeprefix("resnet"))
    assert model.depth == depth and model.num_blocks == (depth - 2) // 6 and model.name == name
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == model.num_blocks
    # depth = 1 stem conv + 2 convs per block + 1 linear
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_registry_and_num_classes() -> None:
    assert list(CIFAR_MODELS) == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    model = CIFAR_MODELS["resnet20"](num_classes=100)
    assert model.linear.out_features == 100
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    assert _n_params(model) == PARAM_COUNTS["resnet20"] + 90 * 65
    # other input sizes work thanks to global average pooling
    assert resnet20()(torch.randn(1, 3, 40, 24)).shape == (1, 10)


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 27, -4, 20.0, "20", True])
def test_invalid_depth(depth: object) -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_classes", [0, -1, 2.5])
def test_invalid_num_classes(num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        CifarResNet(20, num_classes)  # type: ignore[arg-type]


def test_shortcut_a_subsamples_and_zero_pads() -> None:
    sc = ShortcutA(8)
    assert list(sc.parameters()) == [] and list(sc.buffers()) == []
    x = torch.randn(2, 16, 32, 32)
    y = sc(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    with pytest.raises(ValueError):
        ShortcutA(-1)


def test_block_structure() -> None:
    model = resnet20()
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    for stage in (model.layer2, model.layer3):
        assert isinstance(stage[0].shortcut, ShortcutA)
        assert stage[0].conv1.stride == (2, 2)
        assert all(isinstance(b.shortcut, nn.Identity) for b in stage[1:])
    assert not any(isinstance(m, nn.Conv2d) and m.bias is not None for m in model.modules())
    with pytest.raises(ValueError, match="Option-A"):
        BasicBlock(16, 48, stride=2)


def test_kaiming_init() -> None:
    torch.manual_seed(0)
    conv = resnet20().layer3[1].conv1  # 64 x 64 x 3 x 3, fan_in 576
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.05)
    assert abs(conv.weight.mean().item()) < 0.005


@pytest.mark.parametrize("name", list(CIFAR_MODELS))
def test_fx_traceable(name: str) -> None:
    model = CIFAR_MODELS[name]().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert "layer2.0.conv1" in targets and "linear" in targets


@pytest.mark.parametrize("depth", [20, 32, 56])
def test_load_pretrained_strict(models_dir: Path, depth: int) -> None:
    path = _checkpoint(models_dir, depth)
    model = CIFAR_MODELS[f"resnet{depth}"]()
    assert load_cifar_checkpoint(model, path) is model
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in raw.items():
        torch.testing.assert_close(model.state_dict()[key.removeprefix("module.")], value, rtol=0, atol=0)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "data-parallel"])
def test_load_bare_state_dict_with_and_without_prefix(tmp_path: Path, wrap: bool) -> None:
    # into a DataParallel model the prefix was stripped from the file but not looked for in the model:
    # "97 missing keys (module.conv1.weight"
    torch.manual_seed(1)
    src = resnet20()
    for prefix in ("", "module."):
        path = tmp_path / f"bare{prefix or '-'}.pth"
        torch.save({prefix + k: v for k, v in src.state_dict().items()}, path)
        target = nn.DataParallel(resnet20()) if wrap else resnet20()
        assert load_cifar_checkpoint(target, path) is target
        dst = target.module if wrap else target
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k


def test_keys_that_collide_once_the_prefix_is_stripped_are_refused(tmp_path: Path) -> None:
    # {k: good, "module." + k: zeros} loaded whichever came last, silently
    good = resnet20().state_dict()
    path = tmp_path / "both.pth"
    torch.save({**good, **{"module." + k: torch.zeros_like(v) for k, v in good.items()}}, path)
    with pytest.raises(ValueError, match=r"holds both 'conv1.weight' and 'module.conv1.weight', which are the same "
                       r"entry once the DataParallel prefix is stripped"):
        load_cifar_checkpoint(resnet20(), path)


def test_num_classes_may_be_a_numpy_integer() -> None:
    import numpy as np

    model = resnet20(num_classes=np.int64(100))  # was "must be a positive int, got np.int64(100)"
    assert model.num_classes == 100 and type(model.num_classes) is int and model.linear.out_features == 100


def test_load_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = resnet20()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = load_cifar_checkpoint(resnet20(), path)
    assert torch.equal(dst.linear.weight, src.linear.weight)


@pytest.mark.parametrize(("depth", "expected"), [(20, "layer1.4"), (56, "layer1.4")])
def test_wrong_depth_message(models_dir: Path, depth: int, expected: str) -> None:
    path = _checkpoint(models_dir, depth)
    with pytest.raises(ValueError) as info:
        load_cifar_checkpoint(resnet32(), path)
    msg = str(info.value)
    assert path.name in msg and "resnet32" in msg and expected in msg
    assert "right depth" in msg and f"resnet{depth}()" in msg
    assert ("missing keys" if depth < 32 else "unexpected keys") in msg


def test_wrong_num_classes_message(models_dir: Path) -> None:
    path = _checkpoint(models_dir, 20)
    with pytest.raises(ValueError, match=r"wrong shape.*linear\.weight.*num_classes"):
        load_cifar_checkpoint(resnet20(num_classes=100), path)


def test_missing_file_message(tmp_path: Path) -> None:
    path = tmp_path / "nope.th"
    with pytest.raises(ValueError, match=r"nope\.th.*resnet20.*does not exist"):
        load_cifar_checkpoint(resnet20(), path)


class _Evil:
    """Arbitrary object that weights_only loading must refuse."""


def test_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.th"
    torch.save({"state_dict": resnet20().state_dict(), "extra": _Evil()}, path)
    with pytest.raises(ValueError, match=r"evil\.th.*Cannot read|Cannot read.*evil\.th"):
        load_cifar_checkpoint(resnet20(), path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.th"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_cifar_checkpoint(resnet20(), path)


@pytest.fixture(scope="module")
def test_slice(cifar10_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A fixed 1,000-image, class-balanced slice of the JPEG CIFAR-10 test split."""
    from dprp_surgery.data import load_image_folder, subset

    test = load_image_folder(cifar10_dir / "test", cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    assert len(test) == 10_000 and test.image_shape == (3, 32, 32)
    part = subset(test, 1000, seed=0)
    assert part.class_counts() == [100] * 10
    return part


@pytest.mark.parametrize("depth", sorted(SLICE_CORRECT))
def test_pretrained_accuracy_on_fixed_slice(models_dir: Path, test_slice, depth: int) -> None:
    from dprp_surgery.data import IMAGENET_MEAN, IMAGENET_STD, TensorLoader

    model = load_cifar_checkpoint(CIFAR_MODELS[f"resnet{depth}"](), _checkpoint(models_dir, depth)).eval()
    correct = 0
    with torch.no_grad():
        for x, y in TensorLoader(test_slice, 500, mean=IMAGENET_MEAN, std=IMAGENET_STD):
            correct += int((model(x).argmax(1) == y).sum())
    assert correct == SLICE_CORRECT[depth]
