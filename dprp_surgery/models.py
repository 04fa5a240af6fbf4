"""CIFAR ResNets (He et al., 2016) of depth 6n+2 and loading of their pretrained checkpoints.

The architecture follows Yerlan Idelbayev's ``akamaster/pytorch_resnet_cifar10`` exactly (same
module names, so its published ``.th`` checkpoints load with ``strict=True``): a 3x3 stem of 16
channels, three stages of ``n`` basic blocks with 16/32/64 channels (stride 2 in the first block
of stages 2 and 3), parameter-free "option A" shortcuts that subsample ``x[:, :, ::2, ::2]`` and
zero-pad the channels, global average pooling and a ``linear`` classifier. Unlike the original,
the shortcut is a small module instead of a lambda, so every model is ``torch.fx``-traceable.

Example:
    >>> model = resnet20()
    >>> load_cifar_checkpoint(model, "cifar10_resnet20.th")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import numbers
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CIFAR_MODELS",
    "BasicBlock",
    "CifarResNet",
    "ShortcutA",
    "load_cifar_checkpoint",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

logger = logging.getLogger(__name__)

_STAGE_PLANES = (16, 32, 64)
_BLOCK_KEY = re.compile(r"^layer1\.(\d+)\.")


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: spatial subsampling plus zero channel padding.

    Computes ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))``, i.e. keeps every second row
    and column and appends ``pad`` zero channels on each side, so ``C`` input channels become
    ``C + 2 * pad`` output channels.

    Args:
        pad: Number of zero channels added before and after the input channels (``planes // 4``
            in the CIFAR ResNets).
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        if pad < 0:
            raise ValueError(f"ShortcutA pad must be >= 0, got {pad}.")
        self.pad = int(pad)

    def forward(self, x: Tensor) -> Tensor:
        """Subsample by 2 in height and width and zero-pad the channel dimension."""
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        """Show the channel padding in the module's repr."""
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (option-A shortcut when shapes change).

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution (1 or 2).

    Attributes:
        conv1, bn1, conv2, bn2: The residual branch, named as in the pretrained checkpoints.
        shortcut: ``nn.Identity`` or a :class:`ShortcutA` when stride or width changes.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            if stride != 2 or in_planes + 2 * (planes // 4) != planes:
                raise ValueError(
                    f"Option-A shortcut needs stride 2 and planes == 2 * in_planes, got "
                    f"in_planes={in_planes}, planes={planes}, stride={stride}."
                )
            self.shortcut = ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


def _kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal init of conv and linear weights, as in the akamaster code."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` (resnet20: n=3, resnet32: n=5, resnet56: n=9, ...).

    Args:
        depth: Total number of weighted layers, ``6n + 2`` with ``n >= 1`` (8, 14, 20, 32, ...).
        num_classes: Number of outputs of the final ``linear`` layer.

    Attributes:
        depth: The depth given.
        num_blocks: Basic blocks per stage, ``(depth - 2) // 6``.
        name: ``f"resnet{depth}"``, used in messages.
        conv1, bn1: The 3x3 stem (16 channels).
        layer1, layer2, layer3: ``nn.Sequential`` of :class:`BasicBlock` (16/32/64 channels).
        linear: The classifier (64 -> num_classes).

    Raises:
        ValueError: If ``depth`` is not of the form ``6n + 2`` or ``num_classes < 1``.
    """

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CifarResNet depth must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {depth!r}."
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"CifarResNet num_classes must be a positive int, got {num_classes!r}.")
        num_classes = int(num_classes)  # np.int64 from a label array
        self.depth = depth
        self.num_blocks = (depth - 2) // 6
        self.num_classes = num_classes
        self.name = f"resnet{depth}"
        self.in_planes = _STAGE_PLANES[0]
        self.conv1 = nn.Conv2d(3, _STAGE_PLANES[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STAGE_PLANES[0])
        self.layer1 = self._make_layer(_STAGE_PLANES[0], stride=1)
        self.layer2 = self._make_layer(_STAGE_PLANES[1], stride=2)
        self.layer3 = self._make_layer(_STAGE_PLANES[2], stride=2)
        self.linear = nn.Linear(_STAGE_PLANES[2], num_classes)
        self.apply(_kaiming_init)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        """Build one stage of ``num_blocks`` basic blocks."""
        blocks = []
        for s in [stride] + [1] * (self.num_blocks - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(N, 3, H, W)`` to logits ``(N, num_classes)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)

    def extra_repr(self) -> str:
        """Show depth and class count in the module's repr."""
        return f"depth={self.depth}, num_classes={self.num_classes}"


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, 0.27M parameters with 10 classes).

    Args:
        num_classes: Number of outputs.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage, 0.46M parameters with 10 classes).

    Args:
        num_classes: Number of outputs.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 for CIFAR (7 blocks per stage, 0.66M parameters with 10 classes).

    Args:
        num_classes: Number of outputs.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage, 0.85M parameters with 10 classes).

    Args:
        num_classes: Number of outputs.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 for CIFAR (18 blocks per stage, 1.7M parameters with 10 classes).

    Args:
        num_classes: Number of outputs.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(110, num_classes)


CIFAR_MODELS: dict[str, Callable[..., CifarResNet]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
}
"""Registry of the CIFAR ResNet constructors by name (each takes ``num_classes=10``)."""


def _model_name(model: nn.Module) -> str:
    """Name of a model for messages: ``resnet20`` for a CifarResNet, else its class name."""
    name = getattr(model, "name", None)
    return name if isinstance(name, str) else type(model).__name__


def _read_state_dict(path: Path, model_name: str) -> dict[str, Tensor]:
    """Load a checkpoint file safely and return its (possibly nested) state dict."""
    where = f"checkpoint {str(path)!r} for {model_name}"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure becomes a clear ValueError
        raise ValueError(
            f"Cannot read {where}: {type(exc).__name__}: {exc}. Only plain tensor checkpoints are "
            "loaded (torch.load with weights_only=True, or .safetensors); re-save the weights as "
            "torch.save(model.state_dict(), path)."
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{where[0].upper()}{where[1:]} holds a {type(obj).__name__}, not a state dict of tensors "
            "(expected {'state_dict': {...}} or a bare {name: tensor} mapping)."
        )
    out: dict[str, Tensor] = {}
    for k, v in obj.items():
        key = str(k).removeprefix("module.")
        if key in out:
            raise ValueError(f"{where[0].upper()}{where[1:]} holds both {key!r} and 'module.{key}', which are the "
                             "same entry once the DataParallel prefix is stripped; keep one of them and re-save.")
        out[key] = v
    return out


def _depth_hint(model: nn.Module, state: Mapping[str, Tensor]) -> str:
    """Suggest the right CIFAR ResNet when a checkpoint's block count differs from the model's."""
    if not isinstance(model, CifarResNet):
        return ""
    idx = [int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))]
    if not idx:
        return " The checkpoint has no layer1.* keys: is it a CIFAR ResNet at all?"
    n = max(idx) + 1
    if n == model.num_blocks:
        return ""
    depth = 6 * n + 2
    ctor = f"resnet{depth}()" if f"resnet{depth}" in CIFAR_MODELS else f"CifarResNet({depth})"
    last = model.num_blocks - 1
    return (
        f" Is this the right depth? {model.name} expects layer1.0-layer1.{last}.* "
        f"({model.num_blocks} blocks per stage), but the checkpoint has {n} blocks per stage "
        f"(layer1.{n - 1}.*), i.e. it looks like resnet{depth}: build {ctor} instead."
    )


def load_cifar_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load pretrained weights (e.g. ``cifar10_resnet20.th``) into ``model`` with strict=True.

    The file is read with ``torch.load(..., map_location="cpu", weights_only=True)`` (never
    unpickling arbitrary objects; ``.safetensors`` files are read with safetensors). Both
    ``{"state_dict": {...}, ...}`` and a bare state dict are accepted, and a leading
    ``module.`` (DataParallel) prefix is stripped. BatchNorm ``num_batches_tracked`` counters
    absent from the file (the published akamaster checkpoints have none) keep the model's values;
    any other missing, unexpected or mis-shaped entry is an error.

    Args:
        model: The module to fill, e.g. ``resnet20()``.
        path: Path of the ``.th``/``.pth``/``.pt``/``.safetensors`` file.

    Returns:
        ``model`` itself, with the weights loaded (for chaining).

    Raises:
        ValueError: If the file does not exist, cannot be read safely, or does not fit the model;
            the message names the file, the model, the first offending keys and the likely fix.
    """
    path = Path(path).expanduser()
    wrapper = model
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):  # its keys lack 'module.'
        model = model.module
    name = _model_name(model)
    if not path.is_file():
        raise ValueError(
            f"Checkpoint file {str(path)!r} for {name} does not exist"
            f"{' (it is a directory)' if path.is_dir() else ''}; check the path "
            "(the pretrained CIFAR-10 ResNets are cifar10_resnet{20,32,56}.th)."
        )
    state = _read_state_dict(path, name)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
        raise ValueError(
            f"Checkpoint {str(path)!r} does not fit {name}: {'; '.join(parts)}."
            f"{_depth_hint(model, state)}"
        )
    bad = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if bad:
        hint = ""
        if any(b.startswith("linear.") for b in bad):
            hint = " Is num_classes right? The linear layer's shape follows the dataset's class count."
        raise ValueError(
            f"Checkpoint {str(path)!r} does not fit {name}: {len(bad)} tensors have the wrong shape "
            f"(first: {'; '.join(bad[:3])}).{hint}"
        )
    for k, v in own.items():
        if k not in state:  # only num_batches_tracked can be missing here
            state[k] = v
    model.load_state_dict(state, strict=True)
    logger.info("Loaded %d tensors from %s into %s", len(state), path, name)
    return wrapper
