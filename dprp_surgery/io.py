"""Model and data specs: turn the strings users type into models, weights and input recipes.

A *model spec* names an architecture and, optionally, local weights:

* ``timm:NAME`` or ``timm:NAME@weights.{safetensors,pth,pt,bin,th,ckpt}``: ``timm.create_model(NAME)``;
* ``torchvision:NAME[@FILE]``: ``torchvision.models.get_model(NAME, weights=None)``;
* ``cifar:resnet20[@FILE]``: the CIFAR ResNets of :mod:`dprp_surgery.models`
  (e.g. ``cifar:resnet20@cifar10_resnet20.th``);
* a directory written by :func:`dprp_surgery.export.save` (a *dprp artifact*, with
  ``manifest.json`` and ``model.safetensors``);
* a run directory written by ``dprp compress`` (``run.json`` and ``checkpoint.pt``);
* a ``.pt2`` file written by ``torch.export.save`` (one with entries that ``torch.export.load``
  would unpickle with ``weights_only=False``, or with compiled AOTInductor code, only with
  ``trust_pickle=True``);
* a ``.onnx`` file (e.g. from ``dprp export --format onnx``), run by onnxruntime: for inference only
  (:class:`dprp_surgery.export.OnnxRuntimeModel`), so ``dprp eval`` takes it and the commands that
  factorize a model do not;
* a whole pickled module (``torch.save(model)``), only with ``trust_pickle=True``; with ``arch=``
  (``--arch``) it must match that architecture and is recorded as it.

Weights are always read without running code: ``.safetensors`` with safetensors, everything else
with ``torch.load(..., weights_only=True)``; a file that needs arbitrary unpickling raises
:class:`UntrustedPickleError` unless the caller explicitly trusts it.

Example:
    >>> model, arch = load_model("cifar:resnet20")
    >>> arch
    'cifar:resnet20'
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._format import first_line as _first_line

__all__ = [
    "ARCH_KINDS",
    "RANKS_FORMATS",
    "DataRecipe",
    "ModelSpec",
    "ModelSpecError",
    "UntrustedPickleError",
    "WEIGHT_SUFFIXES",
    "build_arch",
    "check_ranks_match",
    "check_writable",
    "data_recipe",
    "infer_arch",
    "infer_num_classes",
    "load_model",
    "load_run",
    "parse_model_spec",
    "read_ranks",
    "read_run_info",
    "read_state_dict",
    "set_num_classes",
]

ARCH_KINDS: tuple[str, ...] = ("timm", "torchvision", "cifar")
"""Spec prefixes that name a rebuildable architecture."""

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin", ".th", ".ckpt")
"""Suffixes accepted for local weight files after ``@``."""

SPEC_FORMS: tuple[str, ...] = (
    "timm:NAME[@WEIGHTS] (e.g. timm:resnet18@resnet18.safetensors)",
    "torchvision:NAME[@WEIGHTS] (e.g. torchvision:resnet18)",
    "cifar:NAME[@WEIGHTS] (e.g. cifar:resnet20@cifar10_resnet20.th)",
    "a dprp artifact directory (manifest.json + model.safetensors)",
    "a dprp run directory (run.json + checkpoint.pt)",
    "a .pt2 file from torch.export.save",
    "a .onnx file (dprp eval only: it runs in onnxruntime)",
    "a whole pickled module from torch.save(model) (needs --trust-pickle)",
)

_ARCH_ATTR = "_dprp_arch"
_RECIPE_ATTR = "_dprp_normalisation"  # a .pt2 or ONNX graph's recorded mean/std (to_pt2's/to_onnx's metadata)
CLASSES_ATTR = "_dprp_classes"
"""Set by `load_model` on a .pt2 or ONNX graph that records the class names it was trained on (`dprp export`)."""
NEW_HEAD_ATTR = "_dprp_new_head"
"""Set by `load_model` on a model whose weights' classifier it replaced (num_classes=N): the weights' class count."""
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.")


class ModelSpecError(ValueError):
    """A model spec that cannot be understood or resolved (unknown prefix, name or path)."""


class UntrustedPickleError(ValueError):
    """A file that can only be loaded by unpickling arbitrary Python objects (running code)."""


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Attributes:
        kind: "timm", "torchvision", "cifar", "artifact", "run", "pt2", "onnx" or "file".
        name: Architecture name for timm/torchvision/cifar specs, else None.
        weights: Local weights file (after ``@``), or the path for artifact/run/pt2/onnx/file specs.
        text: The spec as given.
    """

    kind: str
    name: str | None
    weights: Path | None
    text: str

    @property
    def arch(self) -> str | None:
        """``kind:name`` for architecture specs (no weights), else None."""
        return f"{self.kind}:{self.name}" if self.kind in ARCH_KINDS else None


def _forms() -> str:
    return "; ".join(SPEC_FORMS)


def parse_model_spec(spec: str | os.PathLike[str]) -> ModelSpec:
    """Parse a model spec string (see the module docstring for the accepted forms).

    Only syntax and existence of paths are checked; whether a timm/torchvision name exists is
    checked when the model is built.

    Raises:
        ModelSpecError: An unknown prefix, an empty name, a missing file or directory, or a
            directory that is neither a dprp artifact nor a run directory.
    """
    text = os.fspath(spec).strip()
    if not text:
        raise ModelSpecError(f"empty model spec; accepted forms: {_forms()}.")
    m = re.match(r"^([A-Za-z][A-Za-z0-9_-]+):(.*)$", text)
    if m and not Path(text).exists():
        prefix, rest = m.group(1).lower(), m.group(2)
        if prefix not in ARCH_KINDS:
            raise ModelSpecError(f"unknown model spec prefix {m.group(1)!r} in {text!r}; accepted forms: {_forms()}.")
        name, at, weights = rest.partition("@")
        name = name.strip()
        if not name:
            example = {"timm": "timm:resnet18", "torchvision": "torchvision:resnet18", "cifar": "cifar:resnet20"}
            raise ModelSpecError(f"model spec {text!r} names no architecture; write {prefix}:NAME, e.g. "
                                 f"{example[prefix]}.")
        wpath = None
        if at:
            if not weights.strip():
                raise ModelSpecError(f"model spec {text!r} has '@' but no weights file after it.")
            wpath = Path(weights.strip()).expanduser()
            if not wpath.exists():
                raise ModelSpecError(f"weights file {str(wpath)!r} (from model spec {text!r}) does not exist; "
                                     "check the path.")
            if wpath.is_dir():
                raise ModelSpecError(f"weights {str(wpath)!r} (from model spec {text!r}) is a directory; "
                                     f"give a weights file ({', '.join(WEIGHT_SUFFIXES)}).")
        return ModelSpec(prefix, name, wpath, text)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return ModelSpec("artifact", None, path, text)
        if (path / "run.json").is_file() or (path / "checkpoint.pt").is_file():
            return ModelSpec("run", None, path, text)
        if (path / "model" / "manifest.json").is_file():
            return ModelSpec("artifact", None, path / "model", text)
        raise ModelSpecError(
            f"directory {text!r} is neither a dprp artifact (no manifest.json) nor a run directory (no run.json "
            f"or checkpoint.pt); accepted forms: {_forms()}."
        )
    if path.is_file():
        kind = {".pt2": "pt2", ".onnx": "onnx"}.get(path.suffix.lower(), "file")
        return ModelSpec(kind, None, path, text)
    hint = ""
    bare = text.split("@")[0]
    if "/" not in bare and "." not in bare:
        from .models import CIFAR_MODELS

        options = [f"timm:{bare}", f"torchvision:{bare}"] + ([f"cifar:{bare}"] if bare in CIFAR_MODELS else [])
        hint = f" Did you mean {', '.join(options[:-1])} or {options[-1]}?"
    raise ModelSpecError(f"model {text!r} is not a file, a directory or a known spec.{hint} "
                         f"Accepted forms: {_forms()}.")


# ----------------------------------------------------------------------------- architectures
def _check_name(kind: str, name: str) -> None:
    """Raise a ModelSpecError with suggestions when `name` is not a model of `kind`."""
    if kind == "timm":
        import timm

        if timm.is_model(name):
            return
        options = timm.list_models()
    elif kind == "torchvision":
        import torchvision

        options = torchvision.models.list_models()
        if name in options:
            return
    else:
        from .models import CIFAR_MODELS

        options = list(CIFAR_MODELS)
        if name in options:
            return
    close = difflib.get_close_matches(name, options, n=3)
    hint = f" Did you mean {', '.join(f'{kind}:{c}' for c in close)}?" if close else ""
    extra = f" Known: {', '.join(options)}." if kind == "cifar" else ""
    raise ModelSpecError(f"unknown {kind} model {name!r}.{hint}{extra}")


def build_arch(arch: str, num_classes: int | None = None) -> nn.Module:
    """A freshly initialised model of architecture ``kind:NAME`` (no weights loaded).

    Args:
        arch: "timm:NAME", "torchvision:NAME" or "cifar:NAME".
        num_classes: Classifier outputs (None: the architecture's default).

    Raises:
        ModelSpecError: Unknown kind or name.
    """
    kind, _, name = str(arch).partition(":")
    kind = kind.lower()
    if kind not in ARCH_KINDS or not name:
        raise ModelSpecError(f"{arch!r} is not a rebuildable architecture; use timm:NAME, torchvision:NAME or "
                             "cifar:NAME.")
    if "@" in name:
        raise ModelSpecError(f"architecture {arch!r} must not name weights ('@'); give only {kind}:NAME.")
    _check_name(kind, name)
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    if kind == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
    elif kind == "torchvision":
        import torchvision

        builder = torchvision.models.get_model_builder(name)
        if "weights_backbone" in inspect.signature(builder).parameters:  # detection/segmentation: no backbone download
            kwargs["weights_backbone"] = None
        model = builder(weights=None, **kwargs)
    else:
        from .models import CIFAR_MODELS

        model = CIFAR_MODELS[name](**kwargs)
    _tag(model, f"{kind}:{name}")
    return model


def _tag(model: nn.Module, arch: str) -> None:
    """Remember the architecture spec on the module (copied by deepcopy, read by infer_arch)."""
    try:
        object.__setattr__(model, _ARCH_ATTR, arch)
    except (AttributeError, TypeError):  # pragma: no cover - exotic modules
        pass


def infer_arch(model: nn.Module, *, verify: bool = True) -> str | None:
    """The architecture spec of a model, when it can be told: ``timm:NAME``, ``cifar:NAME``, ...

    Uses the tag left by :func:`build_arch`/:func:`load_model`, timm's ``pretrained_cfg`` and
    the CIFAR ResNets' ``name``; returns None for anything else (e.g. a bare torchvision model).

    Args:
        model: The model.
        verify: Also check that the architecture, rebuilt from its name with default arguments
            (and the model's class count) on the meta device, has the model's module tree (module
            types and ``extra_repr`` per qualified name; layers replaced by surgery or export are
            skipped). This is what :func:`dprp_surgery.export.save` relies on to rebuild the model.

    Raises:
        ValueError: With `verify`, when the rebuilt architecture differs from the model (e.g. a
            timm model built with ``global_pool="max"``), naming the first differing module.
    """
    arch = _name_arch(model)
    if arch is not None and verify:
        num_classes = infer_num_classes(model)
        detail = _rebuild_mismatch(model, arch, num_classes)
        if detail is not None:
            classes = f" (num_classes={num_classes})" if num_classes is not None else ""
            raise ValueError(
                f"{type(model).__name__} looks like {arch}, but {arch} rebuilt from its name with default arguments"
                f"{classes} differs from it: {detail}. A dprp artifact could not rebuild this model from the "
                "architecture name (it would load as a different model). Build the model with default arguments "
                "(only num_classes may differ), or export it as a graph instead (dprp_surgery.export.to_pt2, "
                "`dprp export --format pt2`)."
            )
    return arch


def _name_arch(model: nn.Module) -> str | None:
    """The architecture spec named by the model's tag, timm pretrained_cfg or CIFAR name (unchecked)."""
    tag = getattr(model, _ARCH_ATTR, None)
    if isinstance(tag, str) and tag.split(":", 1)[0] in ARCH_KINDS:
        return tag
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return f"timm:{cfg['architecture']}"
    from .models import CIFAR_MODELS, CifarResNet

    if isinstance(model, CifarResNet) and model.name in CIFAR_MODELS:
        return f"cifar:{model.name}"
    return None


def _describe_module(module: nn.Module) -> str:
    """``Type(extra_repr)`` of one module (without its children)."""
    return f"{type(module).__name__}({module.extra_repr()})"


_SIMPLE = (bool, int, float, str, type(None))
_FREE_ATTRS = frozenset({"training", "grad_checkpointing"})  # state a user may set on any instance


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    """The module's own public attributes of plain value types (ints, strings, tuples of them ...)."""
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key in _FREE_ATTRS:
            continue
        if isinstance(value, _SIMPLE) or (isinstance(value, tuple | list)
                                          and all(isinstance(v, _SIMPLE) for v in value)):
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...] | None]:
    """Shapes of the module's own parameters and buffers (None for an unset one)."""
    return {name: None if t is None else tuple(t.shape)
            for table in (module._parameters, module._buffers) for name, t in table.items()}


def _module_difference(m: nn.Module, other: nn.Module) -> str | None:
    """How `m` differs from the rebuilt `other` beyond its type and extra_repr, or None."""
    mine, ref = _tensor_shapes(m), _tensor_shapes(other)
    for name in sorted(mine.keys() | ref.keys()):
        if mine.get(name, "absent") != ref.get(name, "absent"):
            return f"its tensor {name!r} is {mine.get(name, 'absent')} in the model but {ref.get(name, 'absent')}"
    mine, ref = _plain_attrs(m), _plain_attrs(other)
    for name in sorted(mine.keys() & ref.keys()):
        if mine[name] != ref[name]:
            return f"its attribute {name!r} is {mine[name]!r} in the model but {ref[name]!r}"
    return None


def _rebuild_mismatch(model: nn.Module, arch: str, num_classes: int | None) -> str | None:
    """The first difference between `model`'s module tree and `arch` rebuilt on the meta device, or None."""
    from .layers import SVDLayer

    recorded = getattr(model, "_dprp_layers", None) or {}
    named = list(model.named_modules(remove_duplicate=False))
    replaced = {id(m) for name, m in named if isinstance(m, SVDLayer) or (name and name in recorded)}
    skipped = [name for name, m in named if id(m) in replaced]

    def kept(name: str) -> bool:
        return not any(name == s or name.startswith(f"{s}.") for s in skipped)

    try:
        with torch.device("meta"):
            ref = build_arch(arch, num_classes)
    except ModelSpecError:
        raise
    except Exception:  # noqa: BLE001 - an architecture that cannot be built on the meta device
        ref = build_arch(arch, num_classes)
    ref_modules = dict(ref.named_modules(remove_duplicate=False))
    for name, m in named:
        if not kept(name):
            continue
        label = repr(name) if name else "(the root)"
        other = ref_modules.get(name)
        if other is None:
            return f"module {label} ({_describe_module(m)}) is not in the rebuilt {arch}"
        same_type = (type(m).__module__, type(m).__qualname__) == (type(other).__module__, type(other).__qualname__)
        if not same_type or m.extra_repr() != other.extra_repr():
            return (f"module {label} is {_describe_module(m)} in the model but {_describe_module(other)} in the "
                    f"rebuilt {arch}")
    own = {name for name, _ in named}
    for name, other in ref_modules.items():
        if name not in own and kept(name):
            return f"the rebuilt {arch} has module {name!r} ({_describe_module(other)}), which the model lacks"
    for name, m in named:  # the same tree: what no repr shows, e.g. timm's img_size (pos_embed) or global_pool
        detail = _module_difference(m, ref_modules[name]) if kept(name) else None
        if detail is not None:
            return f"module {repr(name) if name else '(the root)'} ({type(m).__name__}): {detail} in the rebuilt {arch}"
    return None


def _head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the classifier: timm's get_classifier, else the last Linear-like layer."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 - a model without a usable head
            head = None
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            for name, m in model.named_modules():
                if m is head:
                    if _linear_like(m) or isinstance(m, nn.Conv2d):
                        return name, m
                    inner = _linear_layers(m, name)
                    if inner:
                        return inner[-1]
    inner = _linear_layers(model, "")
    if inner:
        return inner[-1]
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and m.kernel_size == (1, 1)
             and m.groups == 1]  # no Linear at all: a 1x1 conv classifier (torchvision SqueezeNet)
    return convs[-1] if convs else None


def _linear_like(m: nn.Module) -> bool:
    """A Linear, its SVD twin, or its factorized export (one FactorizedSequential, not its two parts)."""
    from .layers import FactorizedSequential, SVDLinear

    return isinstance(m, (nn.Linear, SVDLinear)) or (isinstance(m, FactorizedSequential)
                                                      and m.dense_type is nn.Linear)


def _linear_layers(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of the Linear-like layers in `module`, a factorized export's parts not listed."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules(prefix=prefix):
        if _linear_like(m) and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, m))
    return found


def infer_num_classes(model: nn.Module) -> int | None:
    """Number of classifier outputs (``model.num_classes`` or the last Linear's out_features).

    0 for a model built without a classifier (timm's ``num_classes=0``); None when unknown.
    """
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
        return n  # 0: a model built without a classifier (timm num_classes=0)
    head = _head(model)
    if head is None:
        return None
    m = head[1]
    return getattr(m, "out_features", None) or getattr(m, "out_channels", None)


def set_num_classes(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier by a fresh one with `num_classes` outputs (in place; returns model).

    Supports timm models (``reset_classifier``), the CIFAR ResNets and models whose last Linear
    is the classifier (torchvision), or, in a model without Linear layers, its last 1x1 conv
    (torchvision SqueezeNet).

    Raises:
        ValueError: When no classifier can be found.
    """
    num_classes = int(num_classes)
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        reset(num_classes)
        return model
    from .layers import FactorizedSequential

    head = _head(model)
    if head is None or not isinstance(head[1], (nn.Linear, FactorizedSequential, nn.Conv2d)):
        raise ValueError(f"cannot find the classifier of {type(model).__name__} to give it {num_classes} outputs; "
                         "build the model with the right number of classes (--num-classes).")
    name, old = head  # a factorized export's head becomes one fresh (dense) Linear
    ref = next(old.parameters())
    kw = {"bias": old.bias is not None, "device": ref.device, "dtype": ref.dtype}
    new = (nn.Conv2d(old.in_channels, num_classes, 1, **kw) if isinstance(old, nn.Conv2d)
           else nn.Linear(old.in_features, num_classes, **kw))
    model.set_submodule(name, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return model


# ----------------------------------------------------------------------------- weights
def _is_pickle_error(exc: BaseException, path: Path) -> bool:
    """True when torch's safe unpickler refused the file because it holds arbitrary objects."""
    text = str(exc)
    if "Unsupported global" in text or "not an allowed global" in text:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    # A plain pickle (protocol 2-5) that the weights-only unpickler cannot read.
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _untrusted(path: Path, detail: str = "") -> UntrustedPickleError:
    return UntrustedPickleError(
        f"{str(path)!r} holds pickled Python objects, not only tensors{detail}. Loading it would run "
        "arbitrary code from the file. Pass --trust-pickle (trust_pickle=True) only for files you trust, or "
        "re-save the weights with torch.save(model.state_dict(), path) and load them as "
        "timm:NAME@FILE / cifar:NAME@FILE or with --arch."
    )


def _weights_only_load(path: Path) -> Any:
    """torch.load(weights_only=True) without its pickle-protocol warning (we report failures ourselves)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        return torch.load(path, map_location="cpu", weights_only=True)


def _torch_load_safe(path: Path) -> Any:
    """torch.load with weights_only=True; pickles needing arbitrary globals raise UntrustedPickleError."""
    try:
        return _weights_only_load(path)
    except Exception as exc:  # noqa: BLE001 - classify every failure
        if _is_pickle_error(exc, path):
            raise _untrusted(path) from None
        raise ValueError(f"cannot read {str(path)!r}: it is not a readable PyTorch file "
                         f"({type(exc).__name__}: {_first_line(exc)}). Is it corrupt or truncated? "
                         "Re-download or re-save it.") from None


def check_writable(path: str | os.PathLike[str], what: str = "output") -> None:
    """Check before any work that `path` can be created or replaced.

    The nearest existing directory among `path` and its parents must be a directory in which a file can
    actually be created (probed with a temporary file, so read-only mounts and pseudo file systems such as
    /proc or /sys are caught, also for root).

    Args:
        path: The file or directory about to be written.
        what: How the message names the path (the CLI passes "--out").

    Raises:
        ValueError: Naming `what`, the path, the directory that refuses writes and the reason.
    """
    target = Path(path).expanduser()
    for parent in (target, *target.parents):
        if not (parent.exists() or parent.is_symlink()):
            continue
        if not parent.is_dir():
            if parent == target:
                continue  # an existing file is replaced through its directory; whether it may be is the writer's call
            raise ValueError(f"{what} {str(path)!r} cannot be written: {str(parent)!r} is a file, not a directory; "
                             f"choose another {what} path.")
        try:
            fd, probe = tempfile.mkstemp(prefix=".dprp-write-test-", dir=parent)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ValueError(f"{what} {str(path)!r} cannot be written: no file can be created in directory "
                             f"{str(parent)!r} ({reason}); choose another {what} path in a writable directory."
                             ) from None
        os.close(fd)
        os.unlink(probe)
        return


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint dict, without DataParallel/compile prefixes."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        keys = f" with keys {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, Mapping) else ""
        raise ValueError(f"{str(path)!r} holds a {kind}{keys}, not a state dict of tensors; expected "
                         "{name: tensor} or a checkpoint dict with a 'state_dict' or 'model' entry.")
    out = {}
    for k, v in obj.items():
        k = str(k)
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a weights file safely: safetensors, or torch.load(weights_only=True), unwrapped.

    ``{"state_dict": ...}``/``{"model": ...}`` wrappers and ``module.``/``_orig_mod.`` prefixes are
    removed.

    Raises:
        ValueError: Missing, unreadable or non-tensor files (naming the file).
        UntrustedPickleError: Files that need arbitrary unpickling.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"weights file {str(p)!r} does not exist; check the path.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot read safetensors file {str(p)!r} ({type(exc).__name__}: {_first_line(exc)}); "
                             "is it corrupt or truncated? Re-download or re-save it.") from None
    else:
        obj = _torch_load_safe(p)
    return _unwrap(obj, p)


def _fit_report(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches) of loading `state` into `model`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    bad = [f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})" for k, v in own.items()
           if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, bad


def _describe_misfit(missing: list[str], unexpected: list[str], bad: list[str]) -> str:
    """One line for a `_fit_report`: counts and the first keys of each kind."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
    if bad:
        parts.append(f"{len(bad)} tensors of the wrong shape (first: {'; '.join(bad[:3])})")
    return "; ".join(parts)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """load_state_dict(strict=True) with a ValueError naming the file, arch and first bad keys."""
    missing, unexpected, bad = _fit_report(model, state)
    if missing or unexpected or bad:
        hint = " Is this the right architecture?"
        if any(k.endswith((".U", ".V", ".s")) for k in unexpected):
            hint = (" The file holds factorized (SVD) layers (keys ending in .U/.s/.V): pass the dprp run directory "
                    "or an exported dprp artifact instead.")
        misfit = _describe_misfit(missing, unexpected, bad)
        raise ValueError(f"weights {str(path)!r} do not fit {arch}: {misfit}.{hint}")
    own = model.state_dict()
    full = dict(state)
    for k, v in own.items():
        if k not in full:  # only num_batches_tracked can be missing here
            full[k] = v
    model.load_state_dict(full, strict=True)


def _classes_in_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count a state dict's classifier has, when it differs from the model's."""
    head = _head(model)
    if head is None:
        return None
    key = f"{head[0]}.weight" if head[0] else "weight"
    own = model.state_dict().get(key)
    got = state.get(key)
    if own is None or got is None or got.ndim != own.ndim or got.shape[1:] != own.shape[1:]:
        return None
    return int(got.shape[0]) if got.shape[0] != own.shape[0] else None


# ----------------------------------------------------------------------------- loading
def load_model(spec: str | os.PathLike[str], *, num_classes: int | None = None, trust_pickle: bool = False,
               arch: str | None = None) -> tuple[nn.Module, str]:
    """Load a model from a spec (see the module docstring) and return ``(model, arch)``.

    Args:
        spec: The model spec.
        num_classes: Classifier outputs of a newly built architecture. None keeps the default, or
            the class count of the weights file when it has a different classifier; with a weights file
            whose classifier has another class count, every other weight is loaded and the classifier is
            replaced by a new (random) one with `num_classes` outputs, as timm does for pretrained models.
        trust_pickle: Allow unpickling a whole-module file, or a ``.pt2`` file holding pickled
            entries (runs code from the file).
        arch: Architecture (``timm:NAME``, ...) of a bare state-dict file given as `spec`; with
            `trust_pickle`, also of a whole pickled module, which must match it (the module is
            then recorded as `arch`, so it can be saved as a pickle-free artifact).

    Returns:
        The model (eval mode for artifacts and exported programs) and its architecture string:
        ``timm:NAME``/``torchvision:NAME``/``cifar:NAME`` when the model can be rebuilt from it,
        otherwise ``pt2:PATH``, ``onnx:PATH`` (an inference-only
        :class:`dprp_surgery.export.OnnxRuntimeModel`) or ``pickle:PATH``.

    Raises:
        ModelSpecError: Unknown forms, names or paths.
        UntrustedPickleError: A whole-module pickle, or a ``.pt2`` file that ``torch.export.load``
            would unpickle with ``weights_only=False``, without `trust_pickle`.
        ValueError: Unreadable files, weights that do not fit the architecture, and a pickled
            module that is not `arch`.
    """
    ms = parse_model_spec(spec)
    if ms.kind == "file" and arch is not None:
        a = parse_model_spec(arch)
        if a.kind not in ARCH_KINDS or a.weights is not None:
            raise ModelSpecError(f"--arch {arch!r} must be timm:NAME, torchvision:NAME or cifar:NAME (no '@').")
        ms = ModelSpec(a.kind, a.name, ms.weights, f"{arch}@{ms.text}")
        if trust_pickle and ms.weights.suffix != ".safetensors":
            return _load_trusted_with_arch(ms, num_classes), ms.arch  # type: ignore[return-value]
    if ms.kind in ARCH_KINDS:
        return _load_arch(ms, num_classes), ms.arch  # type: ignore[return-value]
    if ms.kind == "artifact":
        from .export import load as load_artifact

        model = load_artifact(ms.weights)
        return model, str(getattr(model, _ARCH_ATTR))
    if ms.kind == "run":
        return load_run(ms.weights)
    if ms.kind == "pt2":
        return _load_pt2(ms.weights, trust_pickle), f"pt2:{ms.weights}"
    if ms.kind == "onnx":
        from .export import load_onnx

        module = load_onnx(ms.weights)
        _apply_recorded(module, module.metadata, "the ONNX file", fallback_size=module.input_shape[1:])
        return module, f"onnx:{ms.weights}"
    return _load_file(ms.weights, trust_pickle)


def _load_arch(ms: ModelSpec, num_classes: int | None, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Build an architecture and load its optional weights file (or `state`, already read from it)."""
    arch = ms.arch
    if ms.weights is None:
        return build_arch(arch, num_classes)
    _check_name(ms.kind, ms.name)  # before reading a possibly large file
    if state is None:
        state = read_state_dict(ms.weights)
    model = build_arch(arch, num_classes)
    if (n := _classes_in_state(model, state)) is not None:  # load the file's classifier, then replace it
        model = build_arch(arch, n)
    if ms.kind == "cifar":
        from .models import load_cifar_checkpoint

        missing, unexpected, bad = _fit_report(model, state)
        if missing or unexpected or bad:
            load_cifar_checkpoint(model, ms.weights)  # raises with depth hints
        _load_strict(model, state, ms.weights, arch)
    else:
        _load_strict(model, state, ms.weights, arch)
    if num_classes is not None and n is not None:  # timm's pretrained=True, num_classes=N: a new classifier
        set_num_classes(model, num_classes)
        object.__setattr__(model, NEW_HEAD_ATTR, n)
    return model


def _load_trusted_with_arch(ms: ModelSpec, num_classes: int | None) -> nn.Module:
    """A file with an explicit arch and trust_pickle: a state dict, a pickled checkpoint or a whole module."""
    path, arch = ms.weights, str(ms.arch)
    _check_name(ms.kind, ms.name)
    try:
        return _load_arch(ms, num_classes)
    except UntrustedPickleError:
        pass  # needs full unpickling, which the caller trusts
    obj = torch.load(path, map_location="cpu", weights_only=False)  # the caller trusts this file
    if isinstance(obj, Mapping):  # a checkpoint with pickled extras (e.g. its training args)
        return _load_arch(ms, num_classes, _unwrap(obj, path))
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{str(path)!r} was unpickled (trusted) but holds a {type(obj).__name__}, not an nn.Module "
                         "or a state dict.")
    detail = _rebuild_mismatch(obj, arch, infer_num_classes(obj))
    if detail is not None:
        raise ValueError(f"the model pickled in {str(path)!r} is not --arch {arch} (arch={arch!r}): {detail}. Pass the "
                         "architecture the model was built with, or leave out --arch to load it as it is.")
    _tag(obj, arch)
    return obj


_PT2_LEGACY_FILES = ("serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt")


def _pt2_unsafe_entries(names: list[str], read: Any) -> list[str]:
    """Entries of a .pt2 archive listing that torch.export.load would unpickle unsafely or run as code."""
    import io as _io

    from torch.export.pt2_archive import constants as pc

    unsafe: list[str] = []
    custom = (pc.CUSTOM_OBJ_FILENAME_PREFIX, pc.OPAQUE_OBJ_FILENAME_PREFIX)
    for name in names:
        rel, base = f"/{name}", name.rsplit("/", 1)[-1]

        def under(folder: str, rel: str = rel) -> bool:
            return f"/{folder.strip('/')}/" in rel

        if under(pc.AOTINDUCTOR_DIR):
            unsafe.append(f"{name} (compiled AOTInductor code)")
        elif (under(pc.WEIGHTS_DIR) or under(pc.CONSTANTS_DIR)) and base.endswith("_config.json"):
            try:
                config = json.loads(read(name)).get("config")
            except Exception:  # noqa: BLE001 - an unreadable config cannot be checked
                config = None
            if not isinstance(config, Mapping):
                unsafe.append(f"{name} (unreadable payload config)")
                continue
            for fqn, meta in config.items():
                if not isinstance(meta, Mapping):
                    unsafe.append(f"{fqn} (unreadable entry in {name})")
                elif meta.get("use_pickle"):
                    unsafe.append(f"{fqn} (use_pickle in {name})")
                elif str(meta.get("path_name", "")).startswith(custom):
                    unsafe.append(f"{fqn} (a pickled Python object in {name})")
        elif under(pc.CONSTANTS_DIR) and base.startswith(custom):
            unsafe.append(f"{name} (a pickled Python object)")
        elif base.endswith(".pt") and (under(pc.WEIGHTS_DIR) or under(pc.CONSTANTS_DIR) or
                                       under(pc.SAMPLE_INPUTS_DIR) or name in _PT2_LEGACY_FILES):
            # torch tries weights_only=True first and falls back to weights_only=False on failure
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.load(_io.BytesIO(read(name)), map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - anything the safe unpickler refuses
                unsafe.append(f"{name} (needs full unpickling)")
    return unsafe


def _check_pt2(path: Path) -> None:
    """Raise UntrustedPickleError when loading the .pt2 file would unpickle arbitrary objects or run code."""
    import zipfile

    from torch.export.pt2_archive._package import PT2ArchiveReader

    unsafe: list[str] = []
    zip_unsafe: list[str] = []
    readable = False
    try:  # the listing torch.export.load reads first ...
        with PT2ArchiveReader(str(path)) as reader:
            unsafe = _pt2_unsafe_entries(reader.get_file_names(), reader.read_bytes)
        readable = True
    except Exception:  # noqa: BLE001 - not a PT2 archive: torch falls back to the legacy zip layout
        pass
    try:  # ... and every zip member, as its legacy fallback reads them
        with zipfile.ZipFile(path) as zf:
            zip_unsafe = _pt2_unsafe_entries([i.filename for i in zf.infolist() if not i.is_dir()], zf.read)
        readable = True
    except (zipfile.BadZipFile, OSError):
        pass
    if not readable:
        raise ValueError(f"cannot read {str(path)!r} as a torch.export program (not a .pt2 zip archive); "
                         "re-export it with `dprp export --format pt2`.")
    unsafe = unsafe or zip_unsafe
    if unsafe:
        entries = ", ".join(dict.fromkeys(unsafe))
        raise UntrustedPickleError(
            f"{str(path)!r} holds entries that torch.export.load unpickles with weights_only=False or runs as code "
            f"({entries}), so loading it would run arbitrary code from the file. Pass --trust-pickle "
            "(trust_pickle=True) only for files you trust, or re-export the model with `dprp export --format pt2` "
            "(torch.export.save of a model whose weights and inputs are plain tensors)."
        )


def _load_pt2(path: Path, trust_pickle: bool = False) -> nn.Module:
    """The module of a torch.export program; files that would unpickle arbitrary objects need trust_pickle."""
    from .export import PT2_METADATA

    if not trust_pickle:
        _check_pt2(path)
    extra = {PT2_METADATA: ""}
    try:
        module = torch.export.load(str(path), extra_files=extra).module()
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read {str(path)!r} as a torch.export program ({type(exc).__name__}: "
                         f"{_first_line(exc)}); re-export it with `dprp export --format pt2`.") from None
    try:
        meta = json.loads(extra[PT2_METADATA]) if extra[PT2_METADATA] else {}
    except ValueError:
        meta = {}
    _apply_recorded(module, meta, "the .pt2")
    return module


def _apply_recorded(module: nn.Module, meta: Any, where: str, fallback_size: list[int | None] | None = None) -> None:
    """Set the input size and normalisation a graph export recorded (`_export_metadata`) on its module, if valid."""
    meta = meta if isinstance(meta, Mapping) else {}
    size = meta.get("input_size")
    if not (isinstance(size, list) and size and all(type(v) is int and v > 0 for v in size)):  # no bools
        chw = fallback_size and len(fallback_size) == 3 and all(isinstance(v, int) for v in fallback_size)
        size = list(fallback_size) if chw and fallback_size[1] == fallback_size[2] else None  # square CHW only
    if size:
        object.__setattr__(module, "_dprp_input_size", list(size))
    mean, std = meta.get("mean"), meta.get("std")
    if (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) > 0
            and (size is None or len(mean) == size[0])
            and all(type(v) in (int, float) and math.isfinite(v) for v in (*mean, *std)) and all(v > 0 for v in std)):
        object.__setattr__(module, _RECIPE_ATTR, {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
                                                  "arch": meta.get("arch"), "where": where})
    classes = meta.get("classes")
    if isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes):
        object.__setattr__(module, CLASSES_ATTR, list(classes))


def _load_file(path: Path, trust_pickle: bool) -> tuple[nn.Module, str]:
    """A bare file: a whole pickled module (trusted only) or a state dict needing an arch."""
    if path.suffix == ".safetensors":
        read_state_dict(path)  # readable?
        raise ValueError(f"{str(path)!r} holds only weights (a state dict) and no architecture; load it as "
                         "timm:NAME@FILE, torchvision:NAME@FILE or cifar:NAME@FILE, or pass --arch timm:NAME.")
    try:
        obj = _weights_only_load(path)
    except Exception as exc:  # noqa: BLE001
        if not _is_pickle_error(exc, path):
            raise ValueError(f"cannot read model file {str(path)!r}: it is not a readable PyTorch file "
                             f"({type(exc).__name__}: {_first_line(exc)}). Is it corrupt or truncated?") from None
        if not trust_pickle:
            raise _untrusted(path, " (a whole model saved with torch.save(model)?)") from None
        obj = torch.load(path, map_location="cpu", weights_only=False)  # the caller trusts this file
        if not isinstance(obj, nn.Module):
            raise ValueError(f"{str(path)!r} was unpickled (trusted) but holds a {type(obj).__name__}, not an "
                             "nn.Module.") from None
        try:
            arch = infer_arch(obj) or f"pickle:{path}"
        except ValueError:  # not rebuildable from its name (e.g. non-default arguments): keep it as a pickle
            arch = f"pickle:{path}"
        return obj, arch
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and "ranks" in obj:
        raise ValueError(f"{str(path)!r} is a dprp training checkpoint; pass its run directory "
                         f"({str(path.parent)!r}) instead.")
    raise ValueError(f"{str(path)!r} holds only weights (a state dict) and no architecture; load it as "
                     "timm:NAME@FILE, torchvision:NAME@FILE or cifar:NAME@FILE, or pass --arch timm:NAME.")


def load_run(run_dir: str | os.PathLike[str]) -> tuple[nn.Module, str]:
    """The factorized model of a ``dprp compress`` run directory, at its latest checkpoint.

    Rebuilds the architecture recorded in ``run.json``, factorizes it with the run's config,
    truncates every SVD layer to the rank stored in ``checkpoint.pt`` and loads the weights
    (strict). A checkpoint of a dense model (no SVD factors, e.g. a dense fine-tune baseline) loads
    into the architecture as it is. Falls back to the exported artifact ``RUN_DIR/model`` when there
    is no checkpoint.

    Raises:
        ValueError: Missing/corrupt run.json or checkpoint, or weights that do not fit.
    """
    from .config import DPRPConfig, recorded_configs
    from .layers import SVDLayer
    from .pruning import match_ranks
    from .surgery import factorize, keep_dense

    root = Path(run_dir).expanduser()
    info = read_run_info(root)
    ckpt_path = root / "checkpoint.pt"
    if not ckpt_path.is_file():
        if (root / "model" / "manifest.json").is_file():
            from .export import load as load_artifact

            model = load_artifact(root / "model")
            return model, str(getattr(model, _ARCH_ATTR))
        raise ValueError(f"run directory {str(root)!r} has no checkpoint.pt (and no exported model/); "
                         "has training started? Run `dprp compress ... --out RUN_DIR` first.")
    ckpt = _torch_load_safe(ckpt_path)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ValueError(f"{str(ckpt_path)!r} is not a dprp checkpoint (no 'model' state dict); it may be corrupt. "
                         "Resume or re-run training to rewrite it.")
    state = _unwrap(ckpt["model"], ckpt_path)
    arch = info.get("arch")
    if not isinstance(arch, str) or arch.split(":", 1)[0] not in ARCH_KINDS:
        raise ValueError(f"{str(root / 'run.json')!r} records no rebuildable architecture (arch={arch!r}); "
                         "export the model from the run with the Python API instead.")
    config_dict = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else info.get("config")
    with recorded_configs():  # the run's own settings, warned about when it was configured
        config = DPRPConfig.from_dict(dict(config_dict)) if isinstance(config_dict, Mapping) else DPRPConfig()
    if not any(k.endswith(".s") and f"{k[:-2]}.U" in state for k in state):
        # a dense run (a fine-tune baseline trained without factorization): the weights fit the architecture as is
        model = build_arch(arch, info.get("num_classes"))
        _load_strict(model, state, ckpt_path, arch)
        _tag(model, arch)
        return model, arch
    model = factorize(build_arch(arch, info.get("num_classes")), config)
    kept = [n for n, m in model.named_modules() if isinstance(m, SVDLayer) and f"{n}.U" not in state
            and f"{n}.weight" in state]  # dense in the checkpoint: factorize took more layers when it was written
    keep_dense(model, kept, "dense in the run's checkpoint")
    try:
        match_ranks(model, state)
    except ValueError as exc:
        raise ValueError(f"weights {str(ckpt_path)!r} do not fit {arch}: {exc}") from None
    _load_strict(model, state, ckpt_path, arch)
    _tag(model, arch)
    object.__setattr__(model, "_dprp_config", config.to_dict())
    return model, arch


def read_run_info(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``run.json`` of a run directory.

    Raises:
        ValueError: When it is missing or corrupt (naming the file).
    """
    path = Path(run_dir).expanduser() / "run.json"
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist: {str(path.parent)!r} is not a dprp run directory "
                         "(written by `dprp compress --out RUN_DIR`).")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is corrupt ({exc}); re-run `dprp compress` or fix the JSON.") from None
    if not isinstance(info, dict):
        raise ValueError(f"{str(path)!r} is corrupt: expected a JSON object.")
    return info


# ----------------------------------------------------------------------------- data recipes
@dataclass(frozen=True)
class DataRecipe:
    """How images must be prepared for a model.

    Attributes:
        mean: Per-channel normalisation mean in [0, 1] units.
        std: Per-channel normalisation standard deviation.
        image_size: Square size images are resized to at decode time (None keeps them).
        augment: Training augmentation for :class:`~dprp_surgery.data.TensorLoader` ("cifar": random
            crop with 4-pixel zero padding plus horizontal flip; None: none).
        source: Where the figures come from (for messages).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None
    augment: str | None
    source: str

    def input_size(self, default: int = 224) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        size = self.image_size or default
        return (len(self.mean), size, size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def data_recipe(arch: str | None, model: nn.Module | None = None) -> DataRecipe:
    """Default normalisation, image size and augmentation for a model.

    * CIFAR ResNets: ImageNet mean/std (what the published weights were trained with), 32 px,
      "cifar" augmentation.
    * timm models: mean, std and input size from ``timm.data.resolve_data_config({}, model=model)``
      (images are resized to that size at decode time), "cifar" augmentation (crop + flip).
    * torchvision models: ImageNet mean/std, 224 px, "cifar" augmentation.
    * a .pt2 program or ONNX file written by the CLI: the mean, std and input size recorded in it.
    * anything else: ImageNet mean/std, images kept at their size.
    """
    from .data import IMAGENET_MEAN, IMAGENET_STD

    recorded = getattr(model, _RECIPE_ATTR, None) if model is not None else None
    if recorded is not None:
        size = getattr(model, "_dprp_input_size", None)
        where = recorded.get("where", "the .pt2")
        source = f"recorded in {where} ({recorded['arch']})" if recorded.get("arch") else f"recorded in {where}"
        return DataRecipe(tuple(recorded["mean"]), tuple(recorded["std"]), int(size[-1]) if size else None, "cifar",
                          source)
    kind, _, name = (arch or "").partition(":")
    cfg = getattr(model, "pretrained_cfg", None) if model is not None else None
    if kind == "cifar" or (kind not in ARCH_KINDS and model is not None and
                           str(infer_arch(model, verify=False)).startswith("cifar:")):
        return DataRecipe(tuple(IMAGENET_MEAN), tuple(IMAGENET_STD), 32, "cifar", "CIFAR ResNet weights")
    if kind == "timm" or isinstance(cfg, Mapping):
        try:
            from timm.data import resolve_data_config

            if model is None:
                model = build_arch(arch)
            dc = resolve_data_config({}, model=model)
            size = int(max(dc["input_size"][1:]))
            return DataRecipe(tuple(float(v) for v in dc["mean"]), tuple(float(v) for v in dc["std"]), size, "cifar",
                              "timm pretrained_cfg")
        except Exception:  # noqa: BLE001 - fall back to ImageNet defaults
            pass
    if kind == "torchvision":
        return DataRecipe(tuple(IMAGENET_MEAN), tuple(IMAGENET_STD), 224, "cifar", "torchvision ImageNet defaults")
    return DataRecipe(tuple(IMAGENET_MEAN), tuple(IMAGENET_STD), None, "cifar", "ImageNet defaults")


# ----------------------------------------------------------------------------- ranks files
RANKS_FORMATS = ('{layer: rank}, a JSON object with a "ranks" entry {layer: rank} (a run.json) or a run\'s '
                 'history.jsonl (the ranks of its last epoch)')


def read_ranks(path: str | os.PathLike[str]) -> dict[str, int]:
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
        ranks: {layer: rank} as returned by `read_ranks`.
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
