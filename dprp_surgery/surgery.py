"""Model surgery: find every Conv/Linear that a model calls and swap in its SVD-factorized twin.

torch.fx finds the modules the forward really calls (shared modules once, weights read elsewhere
flagged), tracing a throw-away copy of the model; when a model cannot be traced, a walk over
``named_modules`` takes over. The returned
model is a deep copy of the input, of the same class, with only the selected layers replaced, so
its state dict keeps the original names apart from ``weight -> U, s, V``.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from .config import DPRPConfig, as_config, require_module
from .layers import MATRICIZATIONS, TWINS, SVDLayer, dense_base, resolve_scheme, twin_for

__all__ = ["factorize", "keep_dense", "SurgeryReport", "surgery_report", "svd_layers", "FactorizationError"]

log = logging.getLogger(__name__)

_REPORT_ATTR = "_dprp_surgery_report"
EXPORT_RECORDS_ATTR = "_dprp_layers"
"""Where `export` records the layers it realised; factorize forgets the dense-form ones (ordinary layers now)."""


class FactorizationError(ValueError):
    """Raised when surgery cannot proceed (nothing to factorize, a pattern that matches nothing)."""


@dataclass
class SurgeryReport:
    """What `factorize` did, attached to the model it returns.

    Attributes:
        factorized: Qualified name -> scheme used.
        skipped: Qualified name -> reason the layer stayed dense.
        notes: Qualified name -> why the scheme differs from the one asked for.
        traced: True when torch.fx traced the model, False when the module walk was used.
    """

    factorized: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    traced: bool = True


def factorize(model: nn.Module, config: DPRPConfig | None = None) -> nn.Module:
    """Return a copy of `model` in which every selected Conv/Linear is an SVD-factorized twin.

    Each twin starts at full rank theta = min(h, w) from the SVD of its reshaped weight, so the
    copy computes the same function (Sec. III-C), and is frozen where the dense layer was
    (``requires_grad``). The input model is not modified: torch.fx traces a throw-away copy, with the
    defaults of the forward's optional parameters (``forward(x, mask=None)`` is traced as ``model(x)``).
    A layer stays dense, with its reason in the report's ``skipped``, when the forward never calls it (in
    training or eval mode),
    reads its weight outside its own forward, shares a weight or bias with another module, carries module hooks
    (forward, backward, state-dict or load-state-dict), is parametrized, lazy and not yet initialised, scripted
    (torch.jit) or empty, subclasses Conv/Linear (with or without a forward of its own), or is incompressible under
    ``min_compressible``; Conv3d and transposed convolutions have no twin and are listed there as not supported.

    Args:
        model: Any nn.Module (timm, torchvision or your own).
        config: Surgery fields `scheme`, `include`, `exclude`, `layer_types`, `min_compressible`.

    Returns:
        The factorized copy; `surgery_report(result)` tells what was replaced and skipped.

    Raises:
        FactorizationError: No layer can be factorized, an include pattern matches nothing, the model is already
            factorized, or it holds a tensor computed from its parameters (the old torch.nn.utils.weight_norm),
            which cannot be copied.
        TypeError: `model` is not an nn.Module or `config` not a DPRPConfig.
    """
    require_module(model, "factorize()")
    config = as_config(config, "factorize()")
    done = svd_layers(model)
    if done and not any(dense_base(m) is not None for m in model.modules()):
        raise FactorizationError(
            f"{type(model).__name__} is already factorized ({len(done)} SVD layers) and has no dense layer left to "
            "factorize; train it as it is (DPRPTrainer, compress), or factorize the original model.")
    called, traced = _called_modules(model)
    plan, report = _plan(model, called, config)
    report.traced = traced
    return _apply(model, plan, report)


def surgery_report(model: nn.Module) -> SurgeryReport | None:
    """The report `factorize` attached to a factorized model (None for other models)."""
    return getattr(model, _REPORT_ATTR, None)


def svd_layers(model: nn.Module) -> list[tuple[str, SVDLayer]]:
    """(qualified name, layer) of every SVD-factorized layer, each shared layer once."""
    require_module(model, "svd_layers()")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDLayer)]


def keep_dense(model: nn.Module, names: list[str], reason: str) -> None:
    """Put the dense layer back in place of each named SVD layer of a factorized `model` (noted as skipped).

    Args:
        model: A model returned by `factorize`.
        names: Qualified names of SVD layers (every alias of a shared layer is replaced).
        reason: Why they stay dense, for the surgery report.
    """
    report = surgery_report(model)
    aliases: dict[int, list[str]] = {}
    for alias, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(alias)
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, SVDLayer):
            continue
        dense = layer.to_dense().train(layer.training)
        for alias in aliases[id(layer)]:
            model.set_submodule(alias, dense)
            if report is not None:
                report.factorized.pop(alias, None)
                report.skipped[alias] = reason


# ----------------------------------------------------------------------------- tracing
class _Tracer(torch.fx.Tracer):
    """An fx tracer that keeps timm's untraceable modules as leaves."""

    def __init__(self) -> None:
        self._leaf_types: tuple[type, ...] = ()
        fns: tuple = ()
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            self._leaf_types = tuple(get_notrace_modules())
            fns = tuple(f for f in get_notrace_functions() if callable(f))
        except ImportError:  # pragma: no cover - timm is a dependency
            pass
        super().__init__(autowrap_functions=fns)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or dense_base(m) is not None:  # layers called as modules
            return True
        return super().is_leaf_module(m, qualname)


def _tracing_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` to trace, its parameters and buffers on the meta device (no memory, no data).

    Tracing runs the forward with fx Proxies, and modules that cache in forward (timm LeViT's
    ``attention_bias_cache``) keep them; the copy is thrown away afterwards, so the user's model never
    holds one. Falls back to a plain deep copy when a tensor cannot be mirrored on meta (lazy modules).
    """
    try:
        memo: dict[int, torch.Tensor] = {}
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
    except Exception:  # noqa: BLE001 - e.g. UninitializedParameter
        memo = {}
    return copy.deepcopy(model, memo)


def _concrete_args(model: nn.Module) -> dict[str, object] | None:
    """The defaults of `model.forward`'s optional parameters (the first one excepted), to trace them as given.

    Traced as Proxies, ``mask=None`` would take the wrong branch of ``if mask is None``; with its default
    the trace follows the call ``model(x)``. *args and **kwargs stay symbolic.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature (a builtin forward)
        return None
    named = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    out = {p.name: p.default for p in params[1:] if p.kind in named and p.default is not inspect.Parameter.empty}
    return out or None


def _trace(model: nn.Module) -> torch.fx.Graph:
    """The fx graph of `model`'s forward, optional parameters at their defaults."""
    with warnings.catch_warnings():  # fx cannot guard non-scalar defaults; the trace is only analysed
        warnings.filterwarnings("ignore", message="Was not able to add assertion")
        return _Tracer().trace(model, concrete_args=_concrete_args(model))


def _traced_copy(model: nn.Module, training: bool) -> tuple[nn.Module, torch.fx.Graph]:
    """A throw-away copy of `model` in mode `training` and its fx graph (meta copy first, then a real one)."""
    try:
        traced = _tracing_copy(model).train(training)
        return traced, _trace(traced)
    except Exception:  # noqa: BLE001 - a forward reading a buffer's value (int(self.reps)) needs real data
        traced = copy.deepcopy(model).train(training)
        return traced, _trace(traced)


def _called_modules(model: nn.Module) -> tuple[dict[str, str | None], bool]:
    """Modules the forward calls, name -> None, or name -> reason they must stay dense.

    The forward is traced on a throw-away meta copy of `model` (`_tracing_copy`; a plain deep copy when the
    forward needs its tensors' values), with the defaults of its optional parameters (`_concrete_args`),
    in the model's mode and, when that traces too, in the other one (a model factorized in eval mode keeps
    the layers only training calls, such as GoogLeNet's auxiliary heads); the graphs are only read for
    module calls and parameter reads. Falls back to every named module (with one warning) when torch.fx
    cannot trace the model.
    """
    try:
        traces = [_traced_copy(model, model.training)]
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "use the walk"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} (first failing op: {first}); "
            "falling back to a walk over named_modules, which replaces every matching layer.",
            stacklevel=3,
        )
        return {name: None for name, _ in model.named_modules()}, False
    with contextlib.suppress(Exception):  # the other mode is a bonus: a model may trace in one mode only
        traces.append(_traced_copy(model, not model.training))
    called: dict[str, str | None] = {}
    read_attrs: set[str] = set()
    for traced, graph in traces:
        for node in graph.nodes:
            if node.op == "call_module":
                called.setdefault(node.target, None)
                sub = traced.get_submodule(node.target)
                if dense_base(sub) is None:  # an opaque leaf: its inner layers are called inside it
                    for inner, _ in sub.named_modules(prefix=node.target):
                        called.setdefault(inner, None)
            elif node.op == "get_attr":
                read_attrs.add(node.target)
    reads: dict[str, list[str]] = {}
    for attr in sorted(read_attrs, key=lambda a: (not a.endswith(".weight"), a)):  # weight first
        owner = attr.rsplit(".", 1)[0] if "." in attr else ""
        if owner:  # the root's forward is the one traced
            reads.setdefault(owner, []).append(repr(attr))
    for owner, attrs in reads.items():  # called or not (F.linear(x, self.qkv.weight)): used without calling it
        what = f"parameter {attrs[0]} is" if len(attrs) == 1 else f"parameters {' and '.join(attrs)} are"
        called[owner] = f"its {what} read outside its forward"
    if dense_base(model) is not None:  # the root is traced, never called
        twin = twin_for(model).__name__
        called[""] = (f"the model is itself one {type(model).__name__}: use {twin}.from_dense(layer), or wrap it "
                      "(nn.Sequential(layer)) to factorize it")
    return called, True


# ----------------------------------------------------------------------------- planning
UNSUPPORTED: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd,)
"""Layer types that have no twin (Conv3d, ConvTranspose1d/2d/3d): listed in the report's skipped, left dense."""


def _plan(model: nn.Module, called: dict[str, str | None], config: DPRPConfig):
    """Decide layer by layer: (name -> scheme) to replace, and the report with skip reasons."""
    report = SurgeryReport()
    plan: dict[str, str] = {}
    names = {n for n, _ in model.named_modules()}
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            if _selected(name, config) and getattr(module, "original_name", "") in {t.__name__ for t in TWINS}:
                report.skipped[name] = (f"it is a scripted (torch.jit) {module.original_name}; left dense: factorize "
                                        "the eager model, then script the result")
            continue
        if isinstance(module, UNSUPPORTED) and not isinstance(module, tuple(TWINS)):
            if _selected(name, config):
                kinds = [t.__name__ for t in TWINS]
                report.skipped[name] = (f"{type(module).__name__} is not supported; dprp_surgery factorizes "
                                        f"{', '.join(kinds[:-1])} and {kinds[-1]}")
            continue
        if not isinstance(module, tuple(TWINS)):
            continue
        if dense_base(module) is None:
            report.skipped[name] = _subclass_reason(module)
            continue
        if dense_base(module).__name__ not in config.layer_types:
            continue
        candidates.append((name, module))
    _check_patterns(config, [n for n, _ in candidates], names)
    shared = _shared_weights(model)
    defaults = sorted(_concrete_args(model) or {})
    never = "never called by the model's forward" + (
        f" (traced with {', '.join(defaults)} at {'its default' if len(defaults) == 1 else 'their defaults'})"
        if defaults else "")
    for name, module in candidates:
        if not _selected(name, config):
            continue
        if name not in called:
            report.skipped[name] = never
            continue
        if called[name] is not None:
            report.skipped[name] = called[name]
            continue
        hooks = _hooks_on(module)
        if hooks:
            report.skipped[name] = (f"it has {hooks} registered on it, which a twin would not carry; left dense to "
                                    "keep its function (remove them before factorize and register them on the "
                                    "factorized model)")
            continue
        tied = [n for n, p in module.named_parameters(recurse=False) if id(p) in shared]
        if tied:
            what = f"its {' and '.join(tied)} {'is' if len(tied) == 1 else 'are'}"
            report.skipped[name] = f"{what} shared with another module (tied weights)"
            continue
        scheme, note = resolve_scheme(module, config.scheme)
        h, w = MATRICIZATIONS[scheme].matrix_shape(tuple(module.weight.shape))
        if h * w == 0:
            report.skipped[name] = f"it has no weights (weight shape {tuple(module.weight.shape)})"
            continue
        if config.min_compressible is not None:
            best = 1.0 - (h + w + 1) / (h * w)
            if best <= config.min_compressible:
                report.skipped[name] = (f"incompressible: even rank 1 keeps {h + w + 1} of {h * w} weights "
                                        f"(M is {h}x{w}, R(1) = {best:.2f}); set min_compressible=None to force it")
                continue
        plan[name] = scheme
        if note:
            report.notes[name] = note
    if not plan:
        found = len(candidates)
        reasons = "; ".join(f"{n}: {r}" for n, r in list(report.skipped.items())[:3])
        raise FactorizationError(
            f"{type(model).__name__} has no layer to factorize: found {found} layer(s) of types "
            f"{', '.join(config.layer_types)} matching include={list(config.include)} exclude={list(config.exclude)}"
            + (f"; skipped: {reasons}" if reasons else "")
            + ". Check the include/exclude globs or set min_compressible=None."
        )
    return plan, report


_HOOK_DICTS = {"_forward_pre_hooks": "forward pre-hooks", "_forward_hooks": "forward hooks",
               "_backward_pre_hooks": "backward pre-hooks", "_backward_hooks": "backward hooks",
               "_state_dict_pre_hooks": "state-dict pre-hooks", "_state_dict_hooks": "state-dict hooks",
               "_load_state_dict_pre_hooks": "load-state-dict pre-hooks",
               "_load_state_dict_post_hooks": "load-state-dict post-hooks"}


def _subclass_reason(module: nn.Module) -> str:
    """Why a subclass of a factorizable layer type is left dense, with the fix where there is one."""
    base = _base_name(module)
    kind = type(module).__name__
    if parametrize.is_parametrized(module):
        names = ", ".join(repr(n) for n in module.parametrizations)
        return (f"its {names} {'is' if len(module.parametrizations) == 1 else 'are'} parametrized "
                "(torch.nn.utils.parametrize, e.g. weight_norm or spectral_norm); left dense. To factorize it, bake "
                "the parametrization in first: torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')")
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return f"{kind} is not initialised yet; run one forward pass through the model before factorize"
    if type(module).forward is next(t for t in TWINS if isinstance(module, t)).forward:
        return (f"{kind} subclasses nn.{base} without a forward of its own; left dense, since code may rely on the "
                f"subclass (nn.MultiheadAttention reads its out_proj's weight itself)")
    return f"{kind} subclasses nn.{base} with its own forward; left dense to keep its function"


def _hooks_on(module: nn.Module) -> str:
    """Kinds of module hooks registered on `module` ('' when none), e.g. 'forward hooks'."""
    return " and ".join(kind for attr, kind in _HOOK_DICTS.items() if getattr(module, attr, None))


def _base_name(module: nn.Module) -> str:
    """Name of the registered dense base class of a subclass."""
    return next(t.__name__ for t in TWINS if isinstance(module, t))


def _selected(name: str, config: DPRPConfig) -> bool:
    """True when `name` matches an include glob and no exclude glob."""
    return any(fnmatch.fnmatchcase(name, p) for p in config.include) and not any(
        fnmatch.fnmatchcase(name, p) for p in config.exclude
    )


def _check_patterns(config: DPRPConfig, candidate_names: list[str], all_names: set[str]) -> None:
    """Every include glob must match at least one candidate layer (when there are any)."""
    if not candidate_names:
        return
    for pattern in config.include:
        if any(fnmatch.fnmatchcase(n, pattern) for n in candidate_names):
            continue
        other = [n for n in all_names if n and fnmatch.fnmatchcase(n, pattern)]
        detail = (f"it matches {len(other)} module(s) that are not {'/'.join(config.layer_types)} layers "
                  f"(e.g. {other[0]!r}); use a glob such as {other[0] + '.*'!r}") if other else (
            f"layer names look like {', '.join(repr(n) for n in candidate_names[:3])}")
        raise FactorizationError(f"include pattern {pattern!r} matches no factorizable layer: {detail}.")


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters owned by more than one module object (tied weights)."""
    owners: dict[int, set[int]] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    return {pid for pid, mods in owners.items() if len(mods) > 1}


# ----------------------------------------------------------------------------- applying
def copy_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy(model) whose parameters are leaves with the original's requires_grad flags.

    A plain deep copy of a ``torch.jit.script``-ed submodule clones its parameters with autograd, so they
    come out as non-leaf tensors that no optimizer takes and whose flags cannot be set; copying without
    grad and setting the flags back gives leaves.
    """
    with torch.no_grad():
        new = copy.deepcopy(model)
    originals = dict(model.named_parameters(remove_duplicate=False))
    for name, p in new.named_parameters(remove_duplicate=False):
        want = originals[name].requires_grad if name in originals else True
        if p.requires_grad != want:
            p.requires_grad_(want)
    return new


def _deepcopy(model: nn.Module) -> nn.Module:
    """copy_model(model); a FactorizationError naming the module that holds a computed (non-leaf) tensor."""
    try:
        return copy_model(model)
    except RuntimeError as exc:
        if "deepcopy" not in str(exc):
            raise
        holder = next(((n, a) for n, m in model.named_modules() for a, v in vars(m).items()
                       if isinstance(v, torch.Tensor) and v.grad_fn is not None), None)
        where = (f"module {holder[0] or type(model).__name__!r} holds {holder[1]!r}, a tensor computed from its "
                 "parameters (the old torch.nn.utils.weight_norm does this)") if holder else str(exc).splitlines()[0]
        raise FactorizationError(
            f"cannot copy {type(model).__name__} to factorize it: {where}. Remove it first "
            "(torch.nn.utils.remove_weight_norm(layer)), or use torch.nn.utils.parametrizations.weight_norm"
        ) from exc


def _apply(model: nn.Module, plan: dict[str, str], report: SurgeryReport) -> nn.Module:
    """Deep-copy the model and swap each planned layer for its twin (shared modules stay shared)."""
    new = _deepcopy(model)
    recorded = getattr(new, EXPORT_RECORDS_ATTR, None)
    if recorded:  # a dense export's layers are factorized afresh or stay dense: their old spec and rank go
        object.__setattr__(new, EXPORT_RECORDS_ATTR, {n: e for n, e in recorded.items() if e.get("form") != "dense"})
    twins: dict[int, SVDLayer] = {}
    aliases: dict[int, list[str]] = {}
    for name, m in new.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(name)
    for name, scheme in plan.items():
        dense = new.get_submodule(name)
        if id(dense) not in twins:
            twins[id(dense)] = twin_for(dense).from_dense(dense, scheme=scheme)
            twins[id(dense)].train(dense.training)
        for alias in aliases[id(dense)]:
            new.set_submodule(alias, twins[id(dense)])
        report.factorized[name] = scheme
    object.__setattr__(new, _REPORT_ATTR, report)
    log.info("factorized %d layers of %s (%d skipped)", len(report.factorized), type(model).__name__,
             len(report.skipped))
    return new
