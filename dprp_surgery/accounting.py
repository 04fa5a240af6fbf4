"""Parameters and MACs per layer and in total, dense against factorized (eqs. (3)-(7)).

MACs come from torch's own counter (`torch.utils.flop_counter.FlopCounterMode`, MACs = FLOPs / 2):
one forward of the model measures every layer as it runs; a factorized layer is also measured as
its dense original and as its deployable realisation (`SVDLayer.to_factorized`) on the meta device.
Layers that `dprp_surgery.export.export` realised in factorized form (or that an artifact loaded so)
count as one factorized layer each, against the dense layer rebuilt from their recorded spec.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ._format import si as _si
from ._format import size_change
from .config import require_initialized, require_module
from .layers import TWINS, SVDLayer, layer_from_spec
from .surgery import UNSUPPORTED, surgery_report

__all__ = ["LayerRow", "Summary", "summarize", "count_params"]


def example_tuple(example_inputs: Any, where: str) -> tuple:
    """`example_inputs` as a tuple of positional inputs; a TypeError naming `where` for None or a list."""
    if example_inputs is None or isinstance(example_inputs, list):
        fix = ("pass a tuple for several positional inputs, or the tensor itself for one"
               if isinstance(example_inputs, list) else "pass one batch, e.g. torch.zeros(1, 3, 224, 224)")
        raise TypeError(f"{where}: example_inputs must be a tensor or a tuple of positional inputs, got "
                        f"{type(example_inputs).__name__}; {fix}")
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def error_cause(exc: BaseException, limit: int = 240) -> str:
    """The first non-empty line of an exception's message (torch's errors run over many lines)."""
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:limit]


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The input tensor of a layer call, positional or ``input=`` (as nn.Linear/nn.ConvNd name it), if any."""
    value = args[0] if args else kwargs.get("input")
    return value if isinstance(value, torch.Tensor) else None


def run_example(model: nn.Module, inputs: tuple, where: str) -> Any:
    """`model(*inputs)`; a RuntimeError (wrong channels or size) becomes a ValueError saying what to pass."""
    try:
        return model(*inputs)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" if isinstance(t, torch.Tensor)
                           else type(t).__name__ for t in inputs)
        cause = error_cause(exc)
        raise ValueError(f"{where}: the model cannot run on example_inputs ({shapes}): {cause}. Pass inputs of the "
                         "shape the model takes (its channels and image size, e.g. torch.zeros(1, 3, 32, 32) for a "
                         "CIFAR model)") from exc


@dataclass
class LayerRow:
    """One Conv/Linear layer in a `Summary`.

    Attributes:
        name: Qualified module name.
        kind: Dense layer type ("Conv2d", "Linear", ...).
        status: "factorized", "dense" or "skipped" (with `note`).
        scheme: Matricization of a factorized layer.
        matrix: (h, w) of the factorized matrix M.
        rank: Current rank r_l (tau after pruning).
        full_rank: theta_l = min(h, w).
        dense_params: Parameters of the dense layer (bias included).
        params: Parameters now: r(h + w + 1) + bias when factorized (eqs. (3)/(6)).
        dense_macs: MACs of the dense layer for the example input.
        macs: MACs now (the realisation of `SVDLayer.to_factorized` when factorized).
        compression: R(r) of eqs. (4)/(7) (1 - params/dense_params without biases).
        max_compression: R(1), the most a factorized layer can save.
        note: Why a layer is skipped, or why its scheme differs from the config.
    """

    name: str
    kind: str
    status: str
    scheme: str | None = None
    matrix: tuple[int, int] | None = None
    rank: int | None = None
    full_rank: int | None = None
    dense_params: int = 0
    params: int = 0
    dense_macs: int = 0
    macs: int = 0
    compression: float = 0.0
    max_compression: float | None = None
    note: str | None = None


@dataclass
class Summary:
    """Per-layer and total parameters and MACs of a model, dense against now.

    Attributes:
        model: Class name of the model.
        rows: One row per Conv/Linear layer, in forward order.
        dense_params: Parameters of the dense model.
        params: Parameters of the model as it is.
        dense_macs: MACs of the dense model for the example input.
        macs: MACs of the model as deployed (factorized layers realised by `to_factorized`).
        input_shape: Shapes of the example inputs.
    """

    model: str
    rows: list[LayerRow] = field(default_factory=list)
    dense_params: int = 0
    params: int = 0
    dense_macs: int = 0
    macs: int = 0
    input_shape: list[list[int]] = field(default_factory=list)

    @property
    def params_removed(self) -> float:
        """Fraction of the dense model's parameters removed (negative when it grew)."""
        return 1.0 - self.params / self.dense_params if self.dense_params else 0.0

    @property
    def macs_removed(self) -> float:
        """Fraction of the dense model's MACs removed (negative when it grew)."""
        return 1.0 - self.macs / self.dense_macs if self.dense_macs else 0.0

    @property
    def mean_rank(self) -> float:
        """Mean rank over factorized layers (0 when none)."""
        ranks = [r.rank for r in self.rows if r.status == "factorized"]
        return sum(ranks) / len(ranks) if ranks else 0.0

    def ranks(self) -> dict[str, int]:
        """Qualified name -> rank of every factorized layer."""
        return {r.name: r.rank for r in self.rows if r.status == "factorized"}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with totals and rows."""
        out = asdict(self)
        out.update(params_removed=self.params_removed, macs_removed=self.macs_removed, mean_rank=self.mean_rank)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of `to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self, title: str | None = None):
        """A rich Table of the rows and totals."""
        from rich.table import Table

        table = Table(title=title or f"{self.model}: dense -> now", show_footer=True)
        table.add_column("layer", footer="total")
        table.add_column("type")
        table.add_column("scheme")
        table.add_column("M (h x w)", justify="right")
        table.add_column("rank", justify="right", footer=f"mean {self.mean_rank:.1f}")
        table.add_column("params", justify="right",
                         footer=f"{_si(self.dense_params)} -> {_si(self.params)} "
                                f"({size_change(self.dense_params, self.params)})")
        table.add_column("MACs", justify="right",
                         footer=f"{_si(self.dense_macs)} -> {_si(self.macs)} "
                                f"({size_change(self.dense_macs, self.macs)})")
        table.add_column("R(r) eq.4/7", justify="right")
        table.add_column("R(1) max", justify="right")
        table.add_column("note")
        for r in self.rows:
            table.add_row(
                r.name, r.kind, r.scheme or "-",
                f"{r.matrix[0]}x{r.matrix[1]}" if r.matrix else "-",
                f"{r.rank}/{r.full_rank}" if r.rank is not None else "-",
                f"{_si(r.dense_params)} -> {_si(r.params)}" if r.status == "factorized" else _si(r.params),
                f"{_si(r.dense_macs)} -> {_si(r.macs)}" if r.status == "factorized" else _si(r.macs),
                f"{r.compression:+.1%}" if r.status == "factorized" else "-",
                f"{r.max_compression:+.1%}" if r.max_compression is not None else "-",
                r.note or "",
            )
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=160, record=True, file=_NullFile())
        console.print(self.to_table())
        return console.export_text()


class _NullFile:
    """A write-only sink for rich's recording console."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def count_params(model: nn.Module) -> int:
    """Number of unique parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters())


def dense_param_count(model: nn.Module) -> int:
    """Parameters of `model` with every factorized layer merged back into its dense layer.

    Factorized layers are SVD layers and the layers that export realised in factorized form (listed by
    ``dprp_surgery.export.layer_forms``); shared ones are counted once.

    Args:
        model: Any model.

    Returns:
        The parameter count of the dense model `model` was factorized from.
    """
    svd = {id(m): m for m in model.modules() if isinstance(m, SVDLayer)}.values()
    total = count_params(model) - sum(m.factor_param_count() for m in svd) + sum(m.dense_param_count() for m in svd)
    for name, spec in _realised(model).items():
        total += _spec_layer(spec).dense_param_count() - count_params(model.get_submodule(name))
    return total


def _realised(model: nn.Module) -> dict[str, dict]:
    """name -> spec of every layer realised by export in factorized form (an nn.Sequential of standard layers)."""
    if not getattr(model, "_dprp_layers", None):
        return {}
    from .export import layer_forms

    return {name: entry["spec"] for name, entry in layer_forms(model).items() if entry["form"] == "factorized"}


def _spec_layer(spec: dict) -> SVDLayer:
    """A shape-only SVD layer of a recorded spec, on the meta device."""
    return layer_from_spec(spec, device="meta")


@contextlib.contextmanager
def counting_attention() -> Iterator[None]:
    """Attention on its composite paths, so that FlopCounterMode counts it (restored on exit).

    The counter has no formula for nn.MultiheadAttention's fused fast path or for the CPU flash kernel of
    scaled_dot_product_attention (both would count 0 MACs): SDPA runs its math backend, MHA unfused.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def summarize(model: nn.Module, example_inputs: Any) -> Summary:
    """Per-layer and total parameters and MACs of `model`, dense against its current state.

    Works on dense and factorized models. MACs are for the given inputs (pass a batch of one for
    per-sample figures). Runs one forward pass in eval mode without gradients, with attention on its
    composite paths (scaled_dot_product_attention's math backend, no fused nn.MultiheadAttention fast
    path) so that its MACs are counted; the outputs of that pass are not used.

    Args:
        model: A model, factorized by `factorize` or not.
        example_inputs: A tensor or a tuple of positional inputs.

    Returns:
        The Summary (``.to_table()`` for rich, ``.to_json()`` for machines).

    Raises:
        ValueError: A lazy layer (e.g. nn.LazyLinear) is not initialised yet: run one forward pass first.
    """
    require_module(model, "summarize()")
    require_initialized(model, "summarize()")
    inputs = example_tuple(example_inputs, "summarize()")
    layer_types = (*TWINS, SVDLayer, *UNSUPPORTED)  # Conv3d and transposed convs get dense (or skipped) rows
    realised = _realised(model)
    outer = {id(model.get_submodule(n)) for n in realised}
    inner = {id(m) for n in realised for m in model.get_submodule(n).modules()} - outer  # counted by the outer
    measured: dict[str, tuple[int, list[tuple[int, ...]]]] = {}  # name -> (flops, input shape of every call)
    counter = FlopCounterMode(display=False)
    handles = []
    names = {id(m): n for n, m in model.named_modules()}

    def pre(module, args, kwargs):
        module._dprp_flops0 = counter.get_total_flops()

    def post(module, args, kwargs, output):
        flops = counter.get_total_flops() - module.__dict__.pop("_dprp_flops0")
        name = names[id(module)]
        total, shapes = measured.get(name, (0, []))  # a module called again (shared): add this call
        x = layer_input(args, kwargs)
        measured[name] = (total + flops, [*shapes, *([tuple(x.shape)] if x is not None else [])])

    for m in model.modules():
        if (isinstance(m, layer_types) and id(m) not in inner) or id(m) in outer:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    was_training = model.training
    model.eval()
    # torch's module tracker (inside FlopCounterMode) fails on a module whose input is a view of a parameter
    # (a ViT's attention pool feeds `latent.expand(B, ...)` to a Linear): such views require grad even in no_grad
    grads = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in grads:
            p.requires_grad_(False)
        with torch.no_grad(), counting_attention(), counter:
            run_example(model, inputs, "summarize()")
    finally:
        for p in grads:
            p.requires_grad_(True)
        model.train(was_training)
        for h in handles:
            h.remove()
    total_flops = counter.get_total_flops()

    report = surgery_report(model)
    rows: list[LayerRow] = []
    layer_flops = 0
    for name, (flops, shapes) in measured.items():
        module = model.get_submodule(name)
        layer_flops += flops
        if name in realised:
            rows.append(_realised_row(name, module, realised[name], flops, shapes))
        else:
            rows.append(_row(name, module, flops, shapes, report))
    for name, reason in (report.skipped.items() if report else ()):
        if name not in measured and isinstance(model.get_submodule(name), layer_types):
            module = model.get_submodule(name)
            p = sum(t.numel() for t in module.parameters())
            rows.append(LayerRow(name=name, kind=type(module).__name__, status="skipped", dense_params=p,
                                 params=p, note=reason))
    other_macs = (total_flops - layer_flops) // 2
    params_now = count_params(model)
    dense_params = dense_param_count(model)
    return Summary(
        model=type(model).__name__,
        rows=rows,
        dense_params=dense_params,
        params=params_now,
        dense_macs=other_macs + sum(r.dense_macs for r in rows),
        macs=other_macs + sum(r.macs for r in rows),
        input_shape=[list(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
    )


def _row(name: str, module: nn.Module, flops: int, shapes: list[tuple[int, ...]], report) -> LayerRow:
    """The LayerRow of one measured layer (`shapes`: the input shape of each of its calls)."""
    if not isinstance(module, SVDLayer):
        params = sum(p.numel() for p in module.parameters(recurse=False))
        note = report.skipped.get(name) if report else None
        return LayerRow(name=name, kind=type(module).__name__, status="skipped" if note else "dense",
                        dense_params=params, params=params, dense_macs=flops // 2, macs=flops // 2, note=note)
    dense_macs = _meta_macs(_meta_layer(module, module.rank).to_dense(), shapes)
    unit_macs = _meta_macs(_meta_layer(module, 1).to_factorized(), shapes)
    return LayerRow(
        name=name, kind=module.dense_type.__name__, status="factorized", scheme=module.scheme,
        matrix=module.matrix_shape, rank=module.rank, full_rank=module.full_rank,
        dense_params=module.dense_param_count(), params=module.factor_param_count(),
        dense_macs=dense_macs, macs=unit_macs * module.rank, compression=module.compression_rate(),
        max_compression=module.compression_rate(1), note=report.notes.get(name) if report else None,
    )


def _realised_row(name: str, module: nn.Module, spec: dict, flops: int, shapes: list[tuple[int, ...]]) -> LayerRow:
    """The LayerRow of a layer realised in factorized form, against the dense layer of its spec."""
    layer = _spec_layer(spec)
    return LayerRow(
        name=name, kind=layer.dense_type.__name__, status="factorized", scheme=layer.scheme,
        matrix=layer.matrix_shape, rank=layer.rank, full_rank=layer.full_rank,
        dense_params=layer.dense_param_count(), params=count_params(module),
        dense_macs=_meta_macs(layer.to_dense(), shapes), macs=flops // 2, compression=layer.compression_rate(),
        max_compression=layer.compression_rate(1), note="exported factorized",
    )


def _meta_layer(layer: SVDLayer, rank: int) -> SVDLayer:
    """A shape-only copy of `layer` at `rank` on the meta device."""
    return layer_from_spec({**layer.spec(), "rank": rank}, device="meta", dtype=layer.U.dtype)


def _meta_macs(module: nn.Module, input_shapes: list[tuple[int, ...]]) -> int:
    """MACs of `module`'s forwards on meta tensors, one per input shape (realisations are linear in r)."""
    counter = FlopCounterMode(display=False)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())
    with counter:
        for shape in input_shapes:
            module(torch.empty(shape, device="meta", dtype=dtype))
    return counter.get_total_flops() // 2

