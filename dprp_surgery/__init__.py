"""dprp_surgery: compress existing PyTorch networks by Dynamic Parameter Rank Pruning (DPRP).

The pipeline is ``factorize -> train -> export`` (``compress`` composes them), after
Sharma, Heard, Saber and Markopoulos, "Convolutional Neural Network Compression via Dynamic
Parameter Rank Pruning", IEEE Access 2025.
"""

from .accounting import LayerRow, Summary, summarize
from .config import DPRPConfig
from .layers import SVDConv1d, SVDConv2d, SVDLayer, SVDLinear
from .surgery import FactorizationError, factorize, surgery_report, svd_layers

__version__ = "0.1.0"

__all__ = [
    "DPRPConfig",
    "FactorizationError",
    "LayerRow",
    "SVDConv1d",
    "SVDConv2d",
    "SVDLayer",
    "SVDLinear",
    "Summary",
    "factorize",
    "summarize",
    "surgery_report",
    "svd_layers",
]
