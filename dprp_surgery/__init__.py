"""dprp_surgery: compress existing PyTorch networks by Dynamic Parameter Rank Pruning (DPRP).

The pipeline is ``factorize -> train -> export`` (``compress`` composes the first two; ``export``
and ``save`` ship the result), after Sharma, Heard, Saber and Markopoulos, "Convolutional Neural
Network Compression via Dynamic Parameter Rank Pruning", IEEE Access 2025.

Names are imported lazily (PEP 562), so ``import dprp_surgery`` and ``dprp --help`` do not pay for
importing torch until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it, in pipeline order
_EXPORTS: dict[str, str] = {
    "DPRPConfig": "config",
    "SVDLayer": "layers", "SVDLinear": "layers", "SVDConv1d": "layers", "SVDConv2d": "layers",
    "factorize": "surgery", "FactorizationError": "surgery", "surgery_report": "surgery", "svd_layers": "surgery",
    "DPRPRegularizer": "losses",
    "RankPruner": "pruning", "match_ranks": "pruning",
    "DPRPTrainer": "trainer", "CompressionResult": "trainer", "NonFiniteLossError": "trainer", "compress": "trainer",
    "cap_factor_steps": "trainer",
    "export": "export", "save": "export", "load": "export", "to_onnx": "export", "to_pt2": "export",
    "load_onnx": "export",
    "summarize": "accounting", "Summary": "accounting", "LayerRow": "accounting",
    "load_model": "io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name from its submodule on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dprp_surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .accounting import LayerRow, Summary, summarize
    from .config import DPRPConfig
    from .export import export, load, load_onnx, save, to_onnx, to_pt2
    from .io import load_model
    from .layers import SVDConv1d, SVDConv2d, SVDLayer, SVDLinear
    from .losses import DPRPRegularizer
    from .pruning import RankPruner, match_ranks
    from .surgery import FactorizationError, factorize, surgery_report, svd_layers
    from .trainer import CompressionResult, DPRPTrainer, NonFiniteLossError, cap_factor_steps, compress
