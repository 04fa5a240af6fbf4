"""Deployment of compressed models: standard-layer exports, pickle-free artifacts, ONNX and .pt2.

After training, every SVD layer can be deployed in one of two standard-layer forms:

* ``"dense"``: ``layer.to_dense()``, the original nn layer. The state dict then loads with
  ``strict=True`` into a fresh instance of the original architecture.
* ``"factorized"``: ``layer.to_factorized()``, a
  :class:`~dprp_surgery.layers.FactorizedSequential` (an ``nn.Sequential``) of two standard layers,
  which also answers the dense layer's hyper-parameters and a read-only ``weight`` and ``bias``.

``export(model, "auto")`` picks, per layer, whichever of the two is cheaper for an objective
(parameters, MACs or measured latency), so the result is never worse than the dense model for
that objective.

Artifacts (:func:`save` / :func:`load`) are directories holding ``model.safetensors`` and a
``manifest.json`` that records the architecture spec (``timm:resnet50``, ``cifar:resnet20``, ...)
and, per replaced layer, its form and constructor spec; loading rebuilds the architecture,
swaps the listed layers and loads the weights strictly. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._files import give_umask_mode, new_dir
from ._format import first_line as _first_line
from .accounting import example_tuple, layer_input, run_example
from .config import require_module
from .layers import MATRICIZATIONS, TWINS, SVDLayer, _realised_factors, layer_from_spec
from .surgery import EXPORT_RECORDS_ATTR, copy_model

log = logging.getLogger(__name__)

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "FORMATS",
    "FORMS",
    "MODES",
    "OBJECTIVES",
    "PT2_METADATA",
    "check_output",
    "export",
    "layer_forms",
    "OnnxRuntimeModel",
    "load",
    "load_onnx",
    "save",
    "to_onnx",
    "to_pt2",
]

MODES: tuple[str, ...] = ("dense", "factorized", "auto")
OBJECTIVES: tuple[str, ...] = ("params", "macs", "latency")
FORMS: tuple[str, ...] = ("svd", "factorized", "dense")
FORMATS: dict[str, str] = {"safetensors": "", "onnx": ".onnx", "pt2": ".pt2"}
"""Output formats and the suffix of their file (a safetensors artifact is a directory)."""
ARTIFACT_FORMAT = "dprp-artifact"
ARTIFACT_VERSION = 2
"""2: paper-scheme convs are realised with their r basis filters stored once (1 stored them per channel)."""
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"

_LAYERS_ATTR = EXPORT_RECORDS_ATTR
_ARCH_ATTR = "_dprp_arch"
_CONFIG_ATTR = "_dprp_config"
_REALISED = (nn.Linear, nn.Conv1d, nn.Conv2d)


# ----------------------------------------------------------------------------- forms
def layer_forms(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every layer that surgery replaced, in module order: ``name -> {"form", "spec"}``.

    ``form`` is "svd" for an :class:`~dprp_surgery.layers.SVDLayer`, or "dense"/"factorized" for
    a layer realised by :func:`export` (or loaded from an artifact); ``spec`` is the SVD layer's
    ``spec()`` (type, hyper-parameters, scheme, rank). Shared modules are listed once.
    """
    recorded = getattr(model, _LAYERS_ATTR, None) or {}
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, SVDLayer):
            out[name] = {"form": "svd", "spec": m.spec()}
        elif name in recorded:
            entry = recorded[name]
            form = entry.get("form")
            realised = isinstance(m, nn.Sequential) if form == "factorized" else isinstance(m, _REALISED)
            if form in ("factorized", "dense") and realised:
                out[name] = {"form": form, "spec": dict(entry["spec"])}
    return out


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every qualified name it is reachable under."""
    out: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(name)
    return out


def _svd_type(spec: dict) -> type[SVDLayer]:
    by_name = {t.__name__: t for t in TWINS.values()}
    if spec.get("type") not in by_name:
        raise ValueError(f"unknown layer type {spec.get('type')!r} in a layer spec; expected one of "
                         f"{', '.join(by_name)}")
    return by_name[spec["type"]]


def _warn_if_truncated(dense: nn.Module, layer: SVDLayer, name: str) -> None:
    """Warn when the recorded rank loses part of a dense-form layer's weight (it was trained after export)."""
    with torch.no_grad():
        weight = dense.weight.detach().to(torch.float64)
        lost = float(torch.linalg.vector_norm(layer.dense_weight().to(torch.float64) - weight)
                     / torch.linalg.vector_norm(weight).clamp_min(1e-30))
    tol = 1e-3 if torch.finfo(dense.weight.dtype).bits >= 32 else 2e-2
    if lost > tol:
        warnings.warn(f"export: layer {name!r} (dense form, recorded rank {layer.rank}) has a weight of higher rank, "
                      f"so the conversion to rank {layer.rank} is not exact: it changes the weight by {lost:.1%} "
                      "(relative Frobenius norm). Were its dense weights trained after the export? Export from the "
                      "trained SVD model, or factorize() the dense model again to choose new ranks.",
                      UserWarning, stacklevel=4)


def _as_svd(module: nn.Module, entry: dict[str, Any], name: str = "") -> SVDLayer:
    """The SVD layer behind a replaced layer in any form (exact up to float rounding; a warning where not)."""
    if isinstance(module, SVDLayer):
        return module
    spec = entry["spec"]
    ref = next(iter(module.parameters()))
    if entry["form"] == "dense":
        cls = _svd_type(spec)
        layer = cls.from_dense(module, scheme=spec.get("scheme", "channel"), rank=spec["rank"])  # carries the flags
        _warn_if_truncated(module, layer, name)
        return layer
    layer = layer_from_spec(spec, device="meta", dtype=ref.dtype).to_empty(device=ref.device)
    u, v, bias = _factors_of(module, layer)
    with torch.no_grad():
        dtype = torch.promote_types(ref.dtype, torch.float32)  # half -> float32, float64 stays float64
        matrix = u.to(dtype) @ v.to(dtype).T
        weight = MATRICIZATIONS[layer.scheme].to_weight(matrix, layer.weight_shape)
        layer._set_from_weight(weight)  # the SVD of a rank-r matrix at rank r is exact
        if layer.bias is not None:
            layer.bias.copy_(bias)
    layer.train(module.training)
    _apply_grad_flags(layer, _grad_flags(module))
    return layer


def _factors_of(seq: nn.Module, layer: SVDLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(U', V', bias) with U' V'^T = M from a ``to_factorized`` realisation (inverse of its weight maps), detached."""
    u, v, bias = _realised_factors(seq, layer.spec())
    return u.detach(), v.detach(), None if bias is None else bias.detach()


# ----------------------------------------------------------------------------- costs
def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _macs(module: nn.Module, shape: Sequence[int], dtype: torch.dtype) -> int:
    """MACs of one forward of `module` on a meta input of `shape` (torch's flop counter / 2)."""
    meta = copy.deepcopy(module).to("meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(torch.empty(tuple(shape), device="meta", dtype=dtype))
    return counter.get_total_flops() // 2


def _latencies(modules: Sequence[nn.Module], shape: Sequence[int] | None, runs: int = 9, warmup_s: float = 0.02,
               inputs: tuple | None = None) -> list[float]:
    """Median seconds of one forward of each module on the same random input of `shape` (or on `inputs`).

    The modules are warmed up (at least two calls each and `warmup_s` seconds) and then timed in interleaved
    rounds, so that slow drifts of a shared machine's load hit every candidate alike.
    """
    ref = next(iter(modules[0].parameters()))
    args = inputs if inputs is not None else (torch.randn(tuple(shape), device=ref.device, dtype=ref.dtype),)
    cuda = ref.device.type == "cuda"
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    times: list[list[float]] = [[] for _ in modules]
    try:
        with torch.inference_mode():
            for m in modules:
                start, calls = time.perf_counter(), 0
                while calls < 2 or time.perf_counter() - start < warmup_s:
                    m(*args)
                    calls += 1
            for _ in range(runs):
                for i, m in enumerate(modules):
                    if cuda:
                        torch.cuda.synchronize(ref.device)
                    t0 = time.perf_counter()
                    m(*args)
                    if cuda:
                        torch.cuda.synchronize(ref.device)
                    times[i].append(time.perf_counter() - t0)
    finally:
        for m, was in zip(modules, modes):
            m.train(was)
    return [statistics.median(t) for t in times]


def _record_shapes(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, tuple[int, ...]]:
    """Input shape of each named module in one eval-mode forward of `example_inputs`."""
    inputs = example_tuple(example_inputs, "export(mode='auto')")
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:
        def hook(mod, args, kwargs, name=name):
            x = layer_input(args, kwargs)
            if name not in shapes and x is not None:
                shapes[name] = tuple(x.shape)
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_example(model, inputs, "export(mode='auto')")
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return shapes


# ----------------------------------------------------------------------------- export
def export(model: nn.Module, mode: str = "dense", *, objective: str = "params",
           example_inputs: Any = None) -> nn.Module:
    """A copy of `model` with every SVD layer realised by standard torch.nn layers.

    Args:
        model: A factorized (and trained/pruned) model; also accepts models already exported or
            loaded from an artifact (their realised layers are converted between forms exactly).
        mode: "dense" (every layer ``to_dense()``: the state dict loads strictly into the
            original architecture), "factorized" (every layer ``to_factorized()``) or "auto"
            (per layer the cheaper of the two by `objective`).
        objective: For "auto": "params" (parameter count), "macs" (multiply-accumulates for
            `example_inputs`) or "latency" (median forward time of both forms of each layer on
            its device, with the layer's input shape for `example_inputs`; the assembled model is then
            timed against its all-dense and all-factorized twins and the fastest of the three is kept).
        example_inputs: A tensor or tuple of inputs; needed for "macs" and "latency".

    Returns:
        The exported copy (the input model is untouched). ``layer_forms(result)`` lists each
        layer's chosen form; :func:`save` writes it as an artifact.

    Raises:
        ValueError: Unknown mode/objective, or a missing `example_inputs`.
    """
    require_module(model, "export()")
    if mode not in MODES:
        raise ValueError(f"export mode={mode!r} is unknown; use one of {', '.join(MODES)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"export objective={objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
    if mode == "auto" and objective in ("macs", "latency") and example_inputs is None:
        raise ValueError(f"export(mode='auto', objective={objective!r}) needs example_inputs to know each layer's "
                         "input shape")
    new = copy_model(model)
    entries = layer_forms(new)
    aliases = _aliases(new)
    shapes: dict[str, tuple[int, ...]] = {}
    if mode == "auto" and objective in ("macs", "latency") and entries:
        shapes = _record_shapes(new, list(entries), example_inputs)
    decisions: dict[str, dict[str, Any]] = {}
    alternatives: dict[str, dict[str, nn.Module]] = {}  # both forms of each auto layer (for the whole-model check)
    names_of: dict[str, list[str]] = {}
    for name, entry in entries.items():
        current = new.get_submodule(name)
        if mode != "auto" and entry["form"] == mode:
            decisions[name] = {"form": mode, "spec": entry["spec"]}
            continue
        _warn_dropped_hooks(current, name)
        svd = _as_svd(current, entry, name)
        if mode == "auto":
            dense, fact = svd.to_dense(), svd.to_factorized()
            target = _cheaper(dense, fact, objective, shapes.get(name), svd.U.dtype)
            replacement = dense if target == "dense" else fact
            alternatives[name] = {"dense": dense, "factorized": fact}
            names_of[name] = aliases[id(current)]
        else:
            target = mode
            replacement = svd.to_dense() if mode == "dense" else svd.to_factorized()
        _swap(new, aliases[id(current)], replacement, current.training, _grad_flags(current))
        decisions[name] = {"form": target, "spec": entry["spec"]}
    if mode == "auto" and objective == "latency" and alternatives:
        _fastest_whole_model(new, alternatives, names_of, decisions, example_inputs)
    object.__setattr__(new, _LAYERS_ATTR, decisions)
    return new


_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
                "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _warn_dropped_hooks(module: nn.Module, name: str) -> None:
    """Warn that the hooks registered on a layer do not move to the module that replaces it."""
    kinds = [table.strip("_").replace("_", " ") for table in _HOOK_TABLES if getattr(module, table, None)]
    if kinds:
        warnings.warn(f"export: layer {name!r} has {', '.join(kinds)}, which are not carried to the module that "
                      "replaces it (another type, with other parameters); register them on the exported model "
                      f"(exported.get_submodule({name!r}))", UserWarning, stacklevel=3)


def _grad_flags(module: nn.Module) -> tuple[bool, bool]:
    """(weights, bias) requires_grad of a layer in any form: its weights train if any weight-side tensor does."""
    weights, bias = [], []
    for name, p in module.named_parameters():
        (bias if name.rsplit(".", 1)[-1] == "bias" else weights).append(p.requires_grad)
    return any(weights), any(bias)


def _apply_grad_flags(module: nn.Module, flags: tuple[bool, bool]) -> None:
    """Give every weight-side parameter of `module` flags[0] and its bias flags[1] (see `_grad_flags`)."""
    for name, p in module.named_parameters():
        p.requires_grad_(flags[1] if name.rsplit(".", 1)[-1] == "bias" else flags[0])


def _swap(model: nn.Module, names: Sequence[str], replacement: nn.Module, training: bool,
          flags: tuple[bool, bool]) -> None:
    """Put `replacement` at every alias of a layer, in the layer's train/eval mode and requires_grad flags."""
    replacement.train(training)
    _apply_grad_flags(replacement, flags)
    for alias in names:
        model.set_submodule(alias, replacement)


LATENCY_MARGIN = 0.95
"""auto(latency) leaves the all-dense model only for a whole model at least 5% faster (timing noise)."""


def _fastest_whole_model(model: nn.Module, alternatives: dict[str, dict[str, nn.Module]],
                         names_of: dict[str, list[str]], decisions: dict[str, dict[str, Any]],
                         example_inputs: Any) -> None:
    """Whole-model check of auto(latency): keep the per-layer mix, or go all dense or all factorized if faster.

    Layer timings taken one by one miss what happens between layers (memory layout changes, cache traffic), so
    the assembled model is timed against its all-dense and all-factorized twins on `example_inputs` and the
    fastest of the three is kept, all dense unless another is `LATENCY_MARGIN` times faster: auto is then never
    slower than dense (nor than factorized) as a whole, up to the timing noise of the machine.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    candidates: dict[str, nn.Module] = {}
    for form in ("dense", "factorized"):
        if all(decisions[name]["form"] == form for name in alternatives):
            continue  # the mix is already this form everywhere
        twin = copy_model(model)
        for name, forms in alternatives.items():
            if decisions[name]["form"] != form:
                _swap(twin, names_of[name], copy.deepcopy(forms[form]), *_flags(twin.get_submodule(name)))
        candidates[form] = twin
    candidates["mixed"] = model
    times = dict(zip(candidates, _latencies(list(candidates.values()), None, inputs=inputs)))
    all_dense = "dense" if "dense" in candidates else "mixed"  # the mix itself when every layer chose dense
    scores = {**times, all_dense: times[all_dense] * LATENCY_MARGIN}  # leaving dense must beat the noise
    best = min(scores, key=scores.get)
    if best == "mixed":
        return
    log.info("export(auto, latency): the per-layer choice ran %.3g ms, all %s %.3g ms; making every layer %s",
             1e3 * times["mixed"], best, 1e3 * times[best], best)
    for name, forms in alternatives.items():
        if decisions[name]["form"] != best:
            _swap(model, names_of[name], forms[best], *_flags(model.get_submodule(name)))
            decisions[name]["form"] = best


def _flags(module: nn.Module) -> tuple[bool, tuple[bool, bool]]:
    """(training, requires_grad flags) of a layer, for the module that replaces it."""
    return module.training, _grad_flags(module)


def _cheaper(dense: nn.Module, fact: nn.Module, objective: str, shape: tuple[int, ...] | None,
             dtype: torch.dtype) -> str:
    """"factorized" when it is strictly cheaper than "dense" by the objective, else "dense"."""
    if objective == "params" or shape is None:
        return "factorized" if _count(fact) < _count(dense) else "dense"
    if objective == "macs":
        return "factorized" if _macs(fact, shape, dtype) < _macs(dense, shape, dtype) else "dense"
    t_dense, t_fact = _latencies([dense, fact], shape)
    return "factorized" if t_fact < t_dense else "dense"


# ----------------------------------------------------------------------------- artifacts
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version() -> str:
    from . import __version__

    return __version__


def save(model: nn.Module, path: str | os.PathLike[str], *, arch: str | None = None, config: Any = None,
         input_size: Sequence[int] | None = None) -> Path:
    """Write `model` as a pickle-free artifact directory `path/` (atomically).

    The directory holds ``model.safetensors`` (the state dict) and ``manifest.json`` (format
    version, dprp_surgery version, `arch`, num_classes, every replaced layer's form and spec, the
    DPRP config, the input size when known, the weights' sha256, and the modules' state-dict versions
    (``state_dict()._metadata``, which e.g. torchvision's MNASNet checks on load)).

    Args:
        model: A factorized or exported model.
        path: Directory to create; an existing artifact there is replaced (if the replacement fails,
            the previous artifact is put back).
        arch: Architecture spec, e.g. "timm:resnet50", "torchvision:resnet18", "cifar:resnet20".
            Inferred for timm models, CIFAR ResNets and models loaded by dprp_surgery.
        config: The DPRPConfig (or its dict) the model was compressed with.
        input_size: (C, H, W) of one input, recorded for later exports.

    Returns:
        The artifact directory.

    Raises:
        ValueError: When the architecture cannot be inferred (pass `arch=`), `arch` would rebuild another
            model (other constructor arguments, module attributes or parameter shapes; export it as ONNX or
            pt2 instead), or `path` exists and is neither an empty directory nor a dprp artifact holding only
            its manifest and weights (nothing is deleted then).
    """
    from .io import ARCH_KINDS, _rebuild_mismatch, infer_arch, infer_num_classes

    given = arch is not None
    arch = arch or infer_arch(model)
    if not arch:
        raise ValueError(f"cannot tell the architecture of {type(model).__name__}; pass arch= (on the command line "
                         "--arch; e.g. 'torchvision:resnet18', 'timm:resnet50' or 'cifar:resnet20') so the artifact "
                         "can be rebuilt without pickle.")
    kind = arch.split(":", 1)[0]
    if kind not in ARCH_KINDS or "@" in arch:
        raise ValueError(f"arch={arch!r} cannot be rebuilt; use timm:NAME, torchvision:NAME or cifar:NAME.")
    if given:  # an inferred arch was checked by infer_arch already
        mismatch = _rebuild_mismatch(model, arch, infer_num_classes(model))
        if mismatch:
            raise ValueError(f"arch={arch!r} does not rebuild this model: {mismatch}; the artifact would load as "
                             "another network. Pass the architecture the model was built as (with default "
                             "arguments), or export it to pt2/onnx instead.")
    path = Path(path).expanduser()
    check_output(path, "safetensors")
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    if config is None:
        config = getattr(model, _CONFIG_ATTR, None)
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    manifest = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "dprp_surgery_version": _version(),
        "torch_version": torch.__version__,
        "arch_library_version": _arch_library_version(arch),
        "arch": arch,
        "num_classes": infer_num_classes(model),
        "dtype": str(floats[0]).removeprefix("torch.") if floats else "float32",
        "input_size": list(input_size) if input_size is not None else getattr(model, "_dprp_input_size", None),
        "layers": layer_forms(model),
        "config": config,
        "weights": WEIGHTS_FILE,
    }
    state_dict = model.state_dict()
    manifest["module_versions"] = _module_versions(state_dict)
    from safetensors.torch import save_file

    _make_parent(path)
    tmp = new_dir(path.parent, f".{path.name}.tmp-")
    try:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
        save_file(state, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt", "arch": arch, _MANIFEST_HASH_KEY: _manifest_hash(manifest)})
        give_umask_mode(tmp / WEIGHTS_FILE)
        manifest["sha256"] = _sha256(tmp / WEIGHTS_FILE)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if path.exists():
            _check_replaceable(path)  # again: it may have changed while the weights were written
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if old.is_dir() and not old.is_symlink():  # left by an earlier save that died (pids are reused)
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)  # put the previous artifact back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


_MANIFEST_HASH_KEY = "dprp_manifest_sha256"
"""safetensors metadata key: the hash of the manifest (less its 'sha256'), so the weights' hash covers it."""


def _manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its 'sha256' entry (which is the weights' hash)."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_manifest_hash(manifest: dict[str, Any], wpath: Path, mpath: Path) -> None:
    """Raise when the weights record a manifest hash that the manifest no longer has (it was edited)."""
    from safetensors import safe_open

    try:
        with safe_open(str(wpath), framework="pt") as f:
            recorded = (f.metadata() or {}).get(_MANIFEST_HASH_KEY)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{str(wpath)!r} is corrupt or not a safetensors file ({type(exc).__name__}: {exc}); "
                         "re-export the model.") from None
    if recorded is None:
        return  # written before the hash was recorded
    if not manifest.get("sha256"):
        raise ValueError(f"{str(mpath)!r} is corrupt: its 'sha256' entry (the hash of {wpath.name}) is missing; "
                         "re-export the model.")
    if _manifest_hash(manifest) != recorded:
        raise ValueError(f"{str(mpath)!r} was changed after the model was saved: it no longer matches the manifest "
                         f"hash recorded in {wpath.name}, so its layers, ranks or architecture may describe another "
                         "model; re-export the model instead of editing the manifest.")


def _module_versions(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """Module prefix -> ``_version`` from a state dict's ``_metadata`` (what ``_load_from_state_dict`` gets)."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    return {prefix: meta["version"] for prefix, meta in metadata.items()
            if isinstance(meta, dict) and isinstance(meta.get("version"), int)}


def _with_versions(state: dict[str, torch.Tensor], versions: Any, mpath: Path) -> dict[str, torch.Tensor]:
    """`state` with the ``_metadata`` of the saved module versions (unchanged for manifests without them)."""
    if versions is None:  # written before dprp_surgery recorded them
        return state
    if not isinstance(versions, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in versions.items()):
        raise ValueError(f"{str(mpath)!r} is corrupt: 'module_versions' must map module names to integer versions, "
                         f"got {str(versions)[:80]}; re-export the model.")
    out = OrderedDict(state)
    out._metadata = OrderedDict((prefix, {"version": v}) for prefix, v in versions.items())  # type: ignore[attr-defined]
    return out


def _make_parent(path: Path) -> None:
    """Create `path`'s parent directories; a ValueError naming the file in the way if one is a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise ValueError(f"cannot write {str(path)!r}: {str(blocker)!r} is a file, not a directory; choose another "
                         "output path.") from None


def _check_replaceable(path: Path) -> None:
    """Raise unless `path` is absent, an empty directory, or a dprp artifact holding only artifact files."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise ValueError(f"refusing to overwrite {str(path)!r}: it exists and is not a directory; choose another "
                         "--out path (a new or empty directory, or an existing dprp artifact).")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    try:
        _read_manifest(path)
    except ValueError as exc:
        reason = str(exc).rsplit("; ", 1)[0]  # the reader's advice (re-export ...) does not apply here
        raise ValueError(f"refusing to overwrite {str(path)!r}: it exists and is not a dprp artifact directory "
                         f"({reason}); choose another --out path (a new or empty directory).") from None
    foreign = [name for name in entries if name not in (MANIFEST_FILE, WEIGHTS_FILE)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ValueError(f"refusing to overwrite {str(path)!r}: besides the dprp artifact it holds {shown}, which "
                         "saving would delete; move them away or choose another --out path.")


def check_output(path: str | os.PathLike[str], fmt: str, *, what: str = "output") -> None:
    """Check, before any work, that an export in format `fmt` may be written at `path`.

    The place must be writable (see :func:`dprp_surgery.io.check_writable`), and nothing but an earlier
    export of the same format is ever replaced: a safetensors artifact replaces only an empty directory or
    a dprp artifact; an ONNX or pt2 file replaces only an ONNX model or a torch.export archive.

    Args:
        path: The artifact directory (safetensors) or file (onnx, pt2) about to be written.
        fmt: One of `FORMATS`.
        what: How the message names the path (the CLI passes "--out").

    Raises:
        ValueError: When `path` cannot be written or holds something else, naming it and what to do.
    """
    from .io import check_writable

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    check_writable(path, what)
    target = Path(path).expanduser()
    if fmt == "safetensors":
        _check_replaceable(target)
        return
    if target.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; give a file path ending in {FORMATS[fmt]}.")
    if (target.exists() or target.is_symlink()) and not _is_export_file(target, fmt):
        raise ValueError(f"refusing to overwrite {str(path)!r}: it exists and is not {_FORMAT_NAMES[fmt]}; "
                         f"choose another {what} path, or move that file away first.")


_FORMAT_NAMES = {"onnx": "an ONNX model", "pt2": "a torch.export (.pt2) archive"}


def _is_export_file(path: Path, fmt: str) -> bool:
    """Whether the file at `path` is an earlier export in format `fmt` (which may then be replaced)."""
    if path.is_symlink() or not path.is_file():
        return False
    if fmt == "pt2":
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return False
        return any(n == "archive_format" or n.endswith("/archive_format") for n in names)
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - anything onnx cannot parse is not an ONNX model
        return False
    return proto.ir_version > 0 and len(proto.graph.node) > 0


def _read_manifest(root: Path) -> dict[str, Any]:
    """The checked manifest of an artifact directory."""
    if not root.exists():
        raise ValueError(f"artifact {str(root)!r} does not exist; write one with dprp_surgery.export.save or "
                         "`dprp export ... --format safetensors --out DIR`.")
    if not root.is_dir():
        raise ValueError(f"artifact {str(root)!r} is a file; a dprp artifact is a directory holding {MANIFEST_FILE} "
                         f"and {WEIGHTS_FILE} (written by `dprp export --format safetensors`).")
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        raise ValueError(f"{str(mpath)!r} is missing: {str(root)!r} is not a dprp artifact; re-export it with "
                         "`dprp export RUN_DIR --format safetensors --out DIR`.")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(mpath)!r} is corrupt ({exc}); re-export the model.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{str(mpath)!r} is not a dprp artifact manifest (format is not {ARTIFACT_FORMAT!r}); "
                         "re-export the model.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{str(mpath)!r} is corrupt: 'format_version' must be a positive integer, got {version!r}; "
                         "re-export the model.")
    if version > ARTIFACT_VERSION:
        raise ValueError(f"{str(mpath)!r} has format_version {version!r}, newer than this dprp_surgery reads "
                         f"({ARTIFACT_VERSION}); upgrade dprp_surgery.")
    for key in ("arch", "layers"):
        if key not in manifest:
            raise ValueError(f"{str(mpath)!r} is corrupt: the {key!r} entry is missing; re-export the model.")
    return manifest


def load(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model saved by :func:`save` (no pickle), in eval mode.

    The architecture is rebuilt from the manifest's ``arch`` spec, each listed layer is replaced
    by its SVD layer or factorized realisation (built on the meta device, then materialised),
    and the safetensors weights are loaded with ``strict=True``, with the module versions the
    manifest recorded (artifacts written before they were recorded load without them).

    Raises:
        ValueError: Missing or corrupt manifest/weights (naming the file and what to do), or
            weights that do not fit the rebuilt model.
    """
    from .io import build_arch

    root = Path(path).expanduser()
    manifest = _read_manifest(root)
    mpath = root / MANIFEST_FILE
    wname = manifest.get("weights", WEIGHTS_FILE)
    if not isinstance(wname, str) or Path(wname).name != wname or wname in ("", ".", ".."):
        raise ValueError(f"{str(mpath)!r}: 'weights' must name a file inside the artifact, got {wname!r}; "
                         "re-export the model.")
    wpath = root / wname
    if not wpath.is_file():
        raise ValueError(f"{str(wpath)!r} is missing from the artifact {str(root)!r}; re-export the model.")
    expected = manifest.get("sha256")
    if expected and _sha256(wpath) != expected:
        raise ValueError(f"{str(wpath)!r} is corrupt: its sha256 differs from the one in {MANIFEST_FILE}; "
                         "re-export the model.")
    _check_manifest_hash(manifest, wpath, mpath)
    input_size = manifest.get("input_size")
    if input_size is not None and not (isinstance(input_size, list) and input_size and all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in input_size)):
        raise ValueError(f"{str(mpath)!r} is corrupt: 'input_size' must be a list of positive integers such as "
                         f"[3, 224, 224], got {input_size!r}; re-export the model.")
    try:
        from safetensors.torch import load_file

        state = load_file(str(wpath), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{str(wpath)!r} is corrupt or not a safetensors file ({type(exc).__name__}: {exc}); "
                         "re-export the model.") from None
    arch = manifest["arch"]
    try:
        model = build_arch(arch, manifest.get("num_classes"))
    except ValueError as exc:
        raise ValueError(f"{str(mpath)!r}: cannot rebuild arch {arch!r}: {exc}{_version_hint(manifest)}") from None
    dtype = getattr(torch, str(manifest.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{str(mpath)!r} is corrupt: dtype {manifest.get('dtype')!r} is not a torch floating-point "
                         "dtype (e.g. 'float32'); re-export the model.")
    layers = manifest["layers"]
    if not isinstance(layers, dict):
        raise ValueError(f"{str(mpath)!r} is corrupt: 'layers' must be a mapping; re-export the model.")
    aliases = _aliases(model)
    recorded: dict[str, dict[str, Any]] = {}
    for name, entry in layers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{str(mpath)!r} lists layer {name!r}, which {arch} does not have; the manifest does "
                             f"not match its architecture.{_version_hint(manifest)}") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{str(mpath)!r}: layer {name!r} has an invalid entry ({entry!r}; expected a mapping "
                             "with 'form' and 'spec'); re-export the model.")
        form, spec = entry.get("form"), entry.get("spec")
        if form not in FORMS or not isinstance(spec, dict):
            raise ValueError(f"{str(mpath)!r}: layer {name!r} has an invalid entry (form {form!r}); re-export.")
        if (form == "factorized" and manifest["format_version"] < 2 and spec.get("scheme") == "paper"
                and str(spec.get("type", "")).startswith("SVDConv")):
            raise ValueError(f"{str(mpath)!r}: layer {name!r} is a paper-scheme conv in the format_version 1 "
                             "layout (basis filters repeated per channel), which this dprp_surgery no longer "
                             "builds; re-export it from its run directory (`dprp export RUN_DIR --out DIR`).")
        try:
            layer = layer_from_spec(spec, device="meta", dtype=dtype)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{str(mpath)!r}: layer {name!r} has an invalid spec ({type(exc).__name__}: {exc}); "
                             "re-export.") from None
        # a dense-form layer too is built from its spec: the rebuilt architecture's own layer may differ in
        # hyper-parameters the weights do not show (e.g. a stem conv with another stride)
        new = layer.to_factorized() if form == "factorized" else layer.to_dense() if form == "dense" else layer
        new = new.to_empty(device="cpu")
        for alias in aliases[id(current)]:
            model.set_submodule(alias, new)
        if form in ("factorized", "dense"):
            recorded[name] = {"form": form, "spec": spec}
    if dtype != torch.float32:
        model.to(dtype)
    _match_dtypes(model, state)
    from .io import _describe_misfit, _fit_report

    missing, unexpected, bad = _fit_report(model, state)
    missing = missing + [k for k in model.state_dict() if k.endswith("num_batches_tracked") and k not in state]
    if missing or unexpected or bad:
        hint = _version_hint(manifest) or " The artifact is inconsistent; re-export it."
        raise ValueError(f"{str(wpath)!r} does not fit the model described by {MANIFEST_FILE} ({arch}): "
                         f"{_describe_misfit(missing, unexpected, bad)}.{hint}")
    model.load_state_dict(_with_versions(state, manifest.get("module_versions"), mpath), strict=True)
    object.__setattr__(model, _LAYERS_ATTR, recorded)
    object.__setattr__(model, _ARCH_ATTR, arch)
    object.__setattr__(model, _CONFIG_ATTR, manifest.get("config"))
    if manifest.get("input_size"):
        object.__setattr__(model, "_dprp_input_size", list(manifest["input_size"]))
    return model.eval()


def _arch_library_version(arch: str) -> str | None:
    """The installed version of the library that builds `arch` (timm, torchvision or dprp_surgery)."""
    kind = arch.split(":", 1)[0]
    if kind == "cifar":
        return _version()
    try:
        from importlib.metadata import version

        return version(kind)
    except Exception:  # noqa: BLE001 - not installed: the rebuild itself will say so
        return None


def _version_hint(manifest: dict[str, Any]) -> str:
    """A sentence naming a changed library version of the architecture, or ''."""
    arch, saved = str(manifest.get("arch", "")), manifest.get("arch_library_version")
    now = _arch_library_version(arch)
    if saved is None or now is None or saved == now:
        return ""
    kind = arch.split(":", 1)[0]
    kind = "dprp_surgery" if kind == "cifar" else kind
    return (f" It was saved with {kind} {saved} and this is {kind} {now}, whose {arch} may be built differently: "
            f"load it with {kind} {saved}, or re-export it with this version.")


def _match_dtypes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each floating parameter/buffer the dtype of its saved tensor (mixed-precision models load as saved)."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                saved = state.get(f"{prefix}.{name}" if prefix else name)
                if (tensor is not None and saved is not None and tensor.is_floating_point()
                        and saved.is_floating_point() and tensor.dtype != saved.dtype):
                    tensor.data = tensor.data.to(saved.dtype)


# ----------------------------------------------------------------------------- graph formats
def _batch_shapes(inputs: tuple) -> tuple[tuple, tuple]:
    """Inputs with a batch of at least 2 (so the batch stays symbolic) and their dynamic shapes.

    The batch is the first tensor input's leading dimension; another input shares it only where its leading
    dimension has the same size (a mask or table of another size stays static).
    """
    batch = torch.export.Dim("batch")
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.ndim]
    size = int(tensors[0].shape[0]) if tensors else None

    def batched(x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.ndim > 0 and int(x.shape[0]) == size

    grown = tuple(torch.cat([x, x]) if batched(x) and size == 1 else x for x in inputs)
    dyn = tuple({0: batch} if batched(x) else None for x in inputs)
    return grown, dyn


@contextlib.contextmanager
def _exporting(model: nn.Module, path: str | os.PathLike[str], suffix: str) -> Iterator[Path]:
    """Yield `path`'s name in a temp folder beside it, with `model` in eval mode.

    On success every file written there moves beside `path` (companions such as ONNX external data
    first, the named file last, each by an atomic rename); on failure nothing is left behind.
    """
    final = Path(path).expanduser()
    check_output(final, suffix.lstrip("."))
    _make_parent(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    was = model.training
    model.eval()
    try:
        yield staging / final.name
        for f in sorted(staging.iterdir(), key=lambda f: f.name == final.name):
            os.replace(f, final.parent / f.name)
    finally:
        model.train(was)
        shutil.rmtree(staging, ignore_errors=True)


# Weights above this many bytes go to an external data file beside the .onnx (protobuf's limit is 2 GiB).
ONNX_INLINE_LIMIT = 1 << 30


def to_onnx(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *, dynamic_batch: bool = True,
            opset: int | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Export `model` to ONNX with the torch.export-based exporter (``torch.onnx.export(dynamo=True)``).

    Args:
        model: Any model (exported or factorized; SVD layers trace to plain matmuls/convs).
        path: The .onnx file to write.
        example_inputs: A tensor or tuple of inputs.
        dynamic_batch: Keep the batch dimension symbolic (the model then runs at any batch size): the
            leading dimension of the first tensor input, and of every other input of that size.
        opset: ONNX opset (None: the exporter's default).
        metadata: More JSON-serialisable entries for the model's metadata (see Returns), e.g. the
            normalisation ``{"mean": [...], "std": [...]}`` the model expects (the CLI records it).

    Returns:
        The written path. Inputs are named ``input`` (``input_1``, ... for more), the output ``output``
        (several outputs, e.g. a dict or a list: ``output``, ``output_1``, ... in the order they are returned).
        Weights are stored in the file itself, or, above ``ONNX_INLINE_LIMIT`` bytes, in ``PATH.data``
        beside it (keep the two together). The model's ``metadata_props`` entry ``"dprp"`` holds JSON
        as `to_pt2` records it (library version, architecture when known, input size, `metadata`);
        onnxruntime reads it with ``session.get_modelmeta().custom_metadata_map["dprp"]``.

    Raises:
        ValueError: `path` cannot be written, or is an existing file that is not an ONNX model (see
            `check_output`); nothing is written then.
    """
    inputs = example_tuple(example_inputs, "to_onnx()")
    names = ["input"] + [f"input_{i}" for i in range(1, len(inputs))]
    kwargs: dict[str, Any] = {"input_names": names}
    if opset is not None:
        kwargs["opset_version"] = opset
    size = sum(x.numel() * x.element_size() for x in [*model.parameters(), *model.buffers()])
    with _exporting(model, path, ".onnx") as tmp:
        with torch.no_grad():
            out = run_example(model, inputs, "to_onnx()")  # a clear error for inputs the model cannot take
        n_out = sum(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(out))
        kwargs["output_names"] = ["output"] + [f"output_{i}" for i in range(1, n_out)]  # in the order returned
        if dynamic_batch:
            grown, dyn = _batch_shapes(inputs)
            program = torch.onnx.export(model, grown, dynamo=True, dynamic_shapes=dyn, verbose=False, **kwargs)
        else:
            program = torch.onnx.export(model, inputs, dynamo=True, verbose=False, **kwargs)
        program.model.metadata_props["dprp"] = json.dumps(_export_metadata(model, inputs, metadata))
        program.save(str(tmp), external_data=size > ONNX_INLINE_LIMIT)
    return Path(path).expanduser()


_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
              "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
              "tensor(uint8)": torch.uint8, "tensor(int8)": torch.int8, "tensor(bool)": torch.bool}
"""onnxruntime's input type names and the torch dtype an input is cast to before it is fed."""


class OnnxRuntimeModel(nn.Module):
    """An ONNX model run by onnxruntime on the CPU, called like the module it was exported from.

    Made by `load_onnx`. ``model(x)`` feeds `x` (and further positional tensors) to the graph's inputs in
    order, each cast to the input's type (a float16 graph gets float16), and returns its one output as a
    CPU tensor, or a tuple of several. A graph exported with a fixed batch size
    (``to_onnx(..., dynamic_batch=False)``) is run in slices of that size, the last one padded, so any
    batch works. It runs inference only: ``.train()`` raises NotImplementedError, and it has no parameters.

    Attributes:
        path: The ONNX file.
        metadata: The ``"dprp"`` metadata that `to_onnx` wrote (an empty dict for other files).
        input_shape: The first input's shape, None for a symbolic dimension.
        input_names: The graph inputs' names, in order.
        num_inputs: The number of graph inputs.
        fixed_batch: The batch size the graph was exported with, or None when it is symbolic.
        num_classes: The size of the first output's last dimension when the graph fixes it, else None.
        stored_values: Elements in the graph's initializers (its weights and constants; the exporter
            folds batch norms into the convs before them): what the file stores.
    """

    def __init__(self, session: Any, path: Path, metadata: dict[str, Any], stored_values: int) -> None:
        super().__init__()
        self.session = session
        self.path = path
        self.metadata = metadata
        self.stored_values = stored_values
        inputs = session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self._input_dtypes = [_ORT_TYPES.get(i.type) for i in inputs]
        self.num_inputs = len(inputs)
        self.input_shape = [d if isinstance(d, int) else None for d in inputs[0].shape]
        first = self.input_shape[0] if self.input_shape else None
        self.fixed_batch = first if first and self.num_inputs == 1 else None
        out_shape = session.get_outputs()[0].shape
        last = out_shape[-1] if out_shape else None
        self.num_classes = last if isinstance(last, int) and len(out_shape) == 2 else None
        self.eval()

    def train(self, mode: bool = True) -> OnnxRuntimeModel:
        """Only eval mode exists: ``train(True)`` raises NotImplementedError."""
        if mode:
            raise NotImplementedError(f"{str(self.path)!r} is an ONNX model run by onnxruntime: it cannot be trained")
        return super().train(False)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the graph on `inputs` (one tensor per graph input)."""
        if len(inputs) != self.num_inputs:
            raise ValueError(f"{str(self.path)!r} takes {self.num_inputs} input(s) "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        arrays = [x.detach().to("cpu", dtype or x.dtype).contiguous().numpy()
                  for x, dtype in zip(inputs, self._input_dtypes)]
        shapes = ", ".join(str(tuple(a.shape)) for a in arrays)
        if self.fixed_batch is None or arrays[0].shape[0] == self.fixed_batch:
            outs = self._run(arrays, shapes)
        elif arrays[0].shape[0] == 0:
            outs = [o[:0] for o in self._run([_np_zeros(self.fixed_batch, arrays[0])], shapes)]
        else:
            outs = self._run_in_slices(arrays[0], shapes)
        tensors = tuple(torch.from_numpy(o) for o in outs)
        return tensors[0] if len(tensors) == 1 else tensors

    def _run(self, arrays: list[Any], shapes: str) -> list[Any]:
        """session.run, with onnxruntime's shape and type errors turned into a ValueError naming the file."""
        try:
            return self.session.run(None, dict(zip(self.input_names, arrays)))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot run {str(self.path)!r} on input {shapes} (the model takes "
                             f"{self.input_shape_text}): {_ort_message(exc)}") from None

    def _run_in_slices(self, x: Any, shapes: str) -> list[Any]:
        """Run a fixed-batch graph over `x` in slices of its batch size, padding the last with zeros."""
        import numpy as np

        b = self.fixed_batch
        parts: list[list[Any]] = []
        for start in range(0, x.shape[0], b):
            chunk = x[start:start + b]
            n = chunk.shape[0]
            if n < b:
                chunk = np.concatenate([chunk, _np_zeros(b - n, chunk)])
            parts.append([o[:n] for o in self._run([chunk], shapes)])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    @property
    def input_shape_text(self) -> str:
        """The first input's shape as text, symbolic dimensions as N: ``(N, 3, 32, 32)``."""
        return "(" + ", ".join("N" if d is None else str(d) for d in self.input_shape) + ")"

    def extra_repr(self) -> str:
        """The file and its input shape."""
        return f"path={str(self.path)!r}, input_shape={self.input_shape_text}"


def _np_zeros(n: int, like: Any) -> Any:
    """n zero samples shaped and typed like the samples of the array `like`."""
    import numpy as np

    return np.zeros((n, *like.shape[1:]), dtype=like.dtype)


def _ort_message(exc: BaseException) -> str:
    """onnxruntime's message without its "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :" preamble, on one line."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ", "", text)
    return text[:600] if text else type(exc).__name__


def load_onnx(path: str | os.PathLike[str], *, threads: int | None = None) -> OnnxRuntimeModel:
    """Open an ONNX file (e.g. one written by `to_onnx`) in onnxruntime, as a module for inference.

    Args:
        path: The .onnx file; the external data files it names (`to_onnx` writes ``NAME.onnx.data`` for
            large models), if any, must lie beside it under the names it was written with.
        threads: onnxruntime's intra-op threads (None: ``torch.get_num_threads()``, so that timings compare
            with PyTorch's in the same process).

    Returns:
        An `OnnxRuntimeModel` on the CPU execution provider.

    Raises:
        ValueError: The file is missing or empty, is not an ONNX model, or onnxruntime cannot load it (e.g. an
            external data file is missing), naming the file.
    """
    import onnx
    import onnxruntime as ort

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"ONNX file {str(path)!r} does not exist (or is not a file); check the path.")
    if p.stat().st_size == 0:
        raise ValueError(f"ONNX file {str(path)!r} is empty; re-export it with `dprp export --format onnx`.")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ValueError(f"cannot read {str(path)!r} as an ONNX model ({type(exc).__name__}: {_first_line(exc)}); "
                         "is it corrupt or truncated? Re-export it with `dprp export --format onnx`.") from None
    stored = 0
    external: set[str] = set()
    for init in proto.graph.initializer:
        n = 1
        for d in init.dims:
            n *= int(d)
        stored += n
        external.update(e.value for e in init.external_data if e.key == "location")
    missing = sorted(name for name in external if not (p.parent / name).is_file())
    if missing and p.is_symlink() and all((p.resolve().parent / name).is_file() for name in external):
        p, missing = p.resolve(), []  # a link to a file whose weights lie beside the file, not the link
    if missing:
        raise ValueError(f"ONNX file {str(path)!r} keeps its weights in {', '.join(repr(m) for m in missing)}, which "
                         f"is not in {str(p.parent)!r}: put that file beside it (it keeps the name it was "
                         "written with, even when the .onnx file is renamed).")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy threads after a run
    try:
        session = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"onnxruntime cannot load {str(path)!r}: {_ort_message(exc)}") from None
    meta: Any = {}
    raw = session.get_modelmeta().custom_metadata_map.get("dprp")
    if raw:
        with contextlib.suppress(ValueError):
            meta = json.loads(raw)
    return OnnxRuntimeModel(session, p, meta if isinstance(meta, dict) else {}, stored)


def _export_metadata(model: nn.Module, inputs: tuple, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """What a graph export records of its source: library version, architecture, input size, `metadata`."""
    first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
    return {"dprp_surgery": _version(), "arch": getattr(model, _ARCH_ATTR, None),
            "input_size": list(first.shape[1:]) if first is not None else None, **(metadata or {})}


PT2_METADATA = "dprp.json"
"""The extra file of a .pt2 written by `to_pt2`: what the program was exported from, for `dprp eval`."""


def to_pt2(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *,
           dynamic_batch: bool = True, metadata: dict[str, Any] | None = None) -> Path:
    """Export `model` with ``torch.export.export`` and write it with ``torch.export.save``.

    Load it back with ``torch.export.load(path).module()``. The archive also holds the extra file
    `PT2_METADATA` (JSON: the library version, the model's architecture when known, the input size
    without the batch dimension, and `metadata`), read with
    ``torch.export.load(path, extra_files={"dprp.json": ""})``; `dprp eval` takes the input size and
    normalisation from it.

    Args:
        model: Any model.
        path: The .pt2 file to write.
        example_inputs: A tensor or tuple of inputs.
        dynamic_batch: Keep the batch dimension symbolic (as in `to_onnx`).
        metadata: More JSON-serialisable entries, e.g. ``{"mean": [...], "std": [...]}`` (the
            normalisation the program expects, as the CLI records).

    Returns:
        The written path.

    Raises:
        ValueError: `path` cannot be written, or is an existing file that is not a torch.export archive
            (see `check_output`); nothing is written then.
    """
    inputs = example_tuple(example_inputs, "to_pt2()")
    with _exporting(model, path, ".pt2") as tmp:
        with torch.no_grad():
            run_example(model, inputs, "to_pt2()")  # a clear error for inputs the model cannot take
        if dynamic_batch:
            grown, dyn = _batch_shapes(inputs)
            program = torch.export.export(model, grown, dynamic_shapes=dyn)
        else:
            program = torch.export.export(model, inputs)
        meta = _export_metadata(model, inputs, metadata)
        torch.export.save(program, str(tmp), extra_files={PT2_METADATA: json.dumps(meta)})
    return Path(path).expanduser()


class _CallableModule(types.ModuleType):
    """This module, callable as `export` itself.

    Importing the submodule ``dprp_surgery.export`` rebinds the package attribute ``export`` to the
    module; making the module callable keeps ``from dprp_surgery import export; export(model)`` working
    in whatever order things were imported.
    """

    def __call__(self, model: nn.Module, mode: str = "dense", **kwargs: Any) -> nn.Module:
        return export(model, mode, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
