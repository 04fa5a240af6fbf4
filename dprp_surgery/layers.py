"""SVD-factorized twins of nn.Linear, nn.Conv1d and nn.Conv2d (paper Sec. III-B, eqs. (1)-(7)).

A twin holds the factors of its reshaped weight M = U diag(s) V^T as parameters
``U (h x r)``, ``s (r)``, ``V (w x r)`` plus the dense layer's bias. How the dense weight is reshaped
into M is the *matricization scheme*:

* ``"paper"``   : M in R^{(S*C) x (L2*L1)}, row (s, c), column (l2, l1): eqs. (1)-(2).
* ``"channel"`` : M in R^{S x (C*L2*L1)}: a k x k conv C -> r, then a 1x1 conv r -> S.
* ``"spatial"`` : M in R^{(S*L2) x (C*L1)}: a (1 x L1) conv C -> r, then an (L2 x 1) conv r -> S.

Linear layers use M = W (out x in), which is the "channel" scheme of a kernel of size 1.

Layers own both conversions: ``SVDConv2d.from_dense(conv)`` / ``.to_dense()``, and
``.to_factorized()`` which realises the factors with standard torch.nn layers only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple, _reverse_repeat_tuple

__all__ = [
    "SVDLayer",
    "SVDLinear",
    "SVDConv1d",
    "SVDConv2d",
    "FactorizedSequential",
    "Scheme",
    "MATRICIZATIONS",
    "TWINS",
    "EQUIVALENT_SUBCLASSES",
    "resolve_scheme",
    "twin_for",
    "layer_from_spec",
]


# ----------------------------------------------------------------------------- schemes
class Scheme(ABC):
    """A matricization: how a dense weight tensor maps to the matrix M that is factorized."""

    name: ClassVar[str]

    @abstractmethod
    def matrix_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, int]:
        """(h, w) of M for a weight of this shape."""

    @abstractmethod
    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """Reshape a dense weight into M."""

    @abstractmethod
    def to_weight(self, matrix: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
        """Inverse of `to_matrix`."""


class PaperScheme(Scheme):
    """M in R^{(S*C) x (L2*L1)} with i = (s-1)C + c, j = (l2-1)L1 + l1 (eq. (1))."""

    name = "paper"

    def matrix_shape(self, weight_shape):
        return weight_shape[0] * weight_shape[1], math.prod(weight_shape[2:])

    def to_matrix(self, weight):
        return weight.reshape(self.matrix_shape(tuple(weight.shape)))

    def to_weight(self, matrix, weight_shape):
        return matrix.reshape(weight_shape)


class ChannelScheme(Scheme):
    """M in R^{S x (C*L2*L1)}: output channels against everything else (also Linear: out x in)."""

    name = "channel"

    def matrix_shape(self, weight_shape):
        return weight_shape[0], math.prod(weight_shape[1:])

    def to_matrix(self, weight):
        return weight.reshape(weight.shape[0], -1)

    def to_weight(self, matrix, weight_shape):
        return matrix.reshape(weight_shape)


class SpatialScheme(Scheme):
    """M in R^{(S*L2) x (C*L1)}, row (s, l2), column (c, l1) (Jaderberg et al., scheme 2)."""

    name = "spatial"

    def matrix_shape(self, weight_shape):
        s, c, kh, kw = weight_shape
        return s * kh, c * kw

    def to_matrix(self, weight):
        s, c, kh, kw = weight.shape
        return weight.permute(0, 2, 1, 3).reshape(s * kh, c * kw)

    def to_weight(self, matrix, weight_shape):
        s, c, kh, kw = weight_shape
        return matrix.reshape(s, kh, c, kw).permute(0, 2, 1, 3)


MATRICIZATIONS: dict[str, Scheme] = {cls.name: cls() for cls in (PaperScheme, ChannelScheme, SpatialScheme)}


def resolve_scheme(module: nn.Module, requested: str) -> tuple[str, str | None]:
    """The scheme actually used for `module` when `requested` is asked for, and why it differs.

    Linear layers and 1x1 convs always use out x in ("channel"); grouped convs always use "paper"
    (the only scheme that keeps groups apart); "spatial" needs a 2-D kernel.
    """
    if requested not in MATRICIZATIONS:
        raise ValueError(f"unknown scheme {requested!r}; use one of {', '.join(MATRICIZATIONS)}")
    if isinstance(module, nn.Linear):
        return "channel", None if requested == "channel" else "Linear layers use out x in"
    groups = getattr(module, "groups", 1)
    kernel = tuple(module.kernel_size)
    if groups > 1:
        if requested == "paper":
            return "paper", None
        return "paper", f"groups={groups}: only the paper scheme keeps groups apart"
    if math.prod(kernel) == 1:
        return "channel", None if requested == "channel" else "1x1 kernels use out x in"
    if requested == "spatial" and len(kernel) != 2:
        return "channel", "the spatial scheme needs a 2-D kernel"
    return requested, None


# ----------------------------------------------------------------------------- base layer
GRAM_SVD_MIN = 256
"""Tall CPU matrices with at least this many columns take the float64 Gram path of `_thin_svd`."""

_GRAM_COND = 1e-4
"""Smallest s_min / s_max for which the Gram path is as accurate as a float32 SVD (else exact SVD)."""


def _thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, s, V) of a tall float32 or float64 matrix, singular values descending.

    Large CPU matrices go through the eigendecomposition of the float64 Gram matrix A^T A (2-3x faster
    than LAPACK's float32 SVD on 768-wide ViT weights): V and s^2 come from ``eigh``, U = A V / s. In
    float64 the error of s_i and U_i is about 1e-16 (s_max / s_i)^2, below float32 resolution while
    s_min / s_max > 1e-4; worse-conditioned (e.g. rank-deficient) and float64 matrices use
    ``torch.linalg.svd``.
    """
    if matrix.device.type == "cpu" and matrix.dtype == torch.float32 and matrix.shape[1] >= GRAM_SVD_MIN:
        a = matrix.double()
        lam, v = torch.linalg.eigh(a.T @ a)
        lam, v = lam.flip(0), v.flip(1)
        s = lam.clamp_min(0).sqrt()
        if s[-1] > s[0] * _GRAM_COND:
            return ((a @ v) / s).to(matrix.dtype), s.to(matrix.dtype), v.to(matrix.dtype)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh.T


class SVDLayer(nn.Module, ABC):
    """Base of the factorized twins: W = reshape(U diag(s) V^T) (eqs. (2) and (5)).

    Attributes:
        U: Left factor, h x r (U_l).
        s: Singular values, r (sigma_l; the diagonal of Sigma_l).
        V: Right factor, w x r (V_l).
        bias: The dense layer's bias, unchanged.
        scheme: Name of the matricization.
        full_rank: theta = min(h, w), the rank at initialisation.
    """

    dense_type: ClassVar[type[nn.Module]]
    weight_shape: tuple[int, ...]

    @classmethod
    def _check_dense(cls, module: nn.Module) -> None:
        """Raise a TypeError unless `module` is exactly this twin's dense layer type."""
        if dense_base(module) is cls.dense_type:
            return
        want = f"nn.{cls.dense_type.__name__}"
        got = f"{type(module).__module__}.{type(module).__qualname__}"
        if isinstance(module, cls.dense_type):
            fix = (f"it subclasses {want} and may compute something else (e.g. timm's Conv2dSame, StdConv2d, or a "
                   "parametrized weight); leave it dense (factorize skips such layers)")
        else:
            twin = twin_for(module)
            fix = (f"use {twin.__name__}.from_dense" if twin is not None else
                   f"dprp_surgery factorizes {', '.join(f'nn.{t.__name__}' for t in TWINS)} only; leave it dense")
        raise TypeError(f"{cls.__name__}.from_dense takes an {want}, got {got}: {fix}")

    def _init_factors(self, scheme: str, rank: int | None, bias: bool, device, dtype) -> None:
        """Allocate U, s, V (uninitialised) and the bias for the given rank."""
        if scheme not in MATRICIZATIONS:
            raise ValueError(f"unknown scheme {scheme!r}; use one of {', '.join(MATRICIZATIONS)}")
        self.scheme = scheme
        h, w = MATRICIZATIONS[scheme].matrix_shape(self.weight_shape)
        self.full_rank = min(h, w)
        rank = self.full_rank if rank is None else int(rank)
        if not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank={rank} is out of range: use 1 <= rank <= min(h, w) = {self.full_rank}")
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(h, rank, **kw))
        self.s = nn.Parameter(torch.empty(rank, **kw))
        self.V = nn.Parameter(torch.empty(w, rank, **kw))
        self.bias = nn.Parameter(torch.empty(self.weight_shape[0], **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the SVD of a dense layer's default (kaiming-uniform) weight."""
        if self.U.device.type == "meta":  # shapes only (accounting, loading)
            return
        dense = torch.empty(self.weight_shape, device=self.U.device, dtype=self.U.dtype)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self._set_from_weight(dense)
        if self.bias is not None:
            fan_in = math.prod(self.weight_shape[1:])
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def _copy_from(self, dense: nn.Module) -> None:
        """Take the dense layer's weight (as its SVD), bias and frozen/trainable flags (and its class, see to_dense)."""
        self._dense_subclass = type(dense) if type(dense) is not self.dense_type else None
        self._set_from_weight(dense.weight)
        for p in (self.U, self.s, self.V):
            p.requires_grad_(dense.weight.requires_grad)
        if dense.bias is not None:
            self.bias.copy_(dense.bias.detach())
            self.bias.requires_grad_(dense.bias.requires_grad)

    def _as_original(self, dense: nn.Module) -> nn.Module:
        """`dense` as the class of the layer this twin was made from (an `EQUIVALENT_SUBCLASSES` entry: same state)."""
        subclass = getattr(self, "_dense_subclass", None)
        if subclass is not None:
            dense.__class__ = subclass
        return dense

    @torch.no_grad()
    def _copy_to(self, dense: nn.Module) -> None:
        """Write the dense weight, bias and frozen/trainable flags into a dense layer of the same shape."""
        dense.weight.copy_(self.dense_weight())
        dense.weight.requires_grad_(self.U.requires_grad)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
            dense.bias.requires_grad_(self.bias.requires_grad)

    @torch.no_grad()
    def _set_from_weight(self, weight: torch.Tensor) -> None:
        """Set U, s, V to the leading `rank` components of the SVD of the reshaped weight."""
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float64 layers keep float64 precision
        matrix = MATRICIZATIONS[self.scheme].to_matrix(weight.detach()).to(dtype)
        if matrix.shape[0] >= matrix.shape[1]:
            u, s, v = _thin_svd(matrix)
        else:  # LAPACK is about twice as fast on the tall orientation
            v, s, u = _thin_svd(matrix.T)
        r = self.rank
        self.U.copy_(u[:, :r])
        self.s.copy_(s[:r])
        self.V.copy_(v[:, :r])

    # ------------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        """r_l, the current number of components."""
        return self.s.shape[0]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(h, w) of the factorized matrix M."""
        return self.U.shape[0], self.V.shape[0]

    def dense_param_count(self) -> int:
        """Parameters of the dense layer, bias included (P_c or P_f plus bias)."""
        return math.prod(self.weight_shape) + (0 if self.bias is None else self.bias.numel())

    def factor_param_count(self, rank: int | None = None) -> int:
        """Trainable parameters at `rank` (default: current), bias included: r(h + w + 1) + bias."""
        h, w = self.matrix_shape
        r = self.rank if rank is None else rank
        return r * (h + w + 1) + (0 if self.bias is None else self.bias.numel())

    def compression_rate(self, rank: int | None = None) -> float:
        """R(r) = 1 - r(h + w + 1) / (h w), eqs. (4) and (7) (bias excluded, as in the paper)."""
        h, w = self.matrix_shape
        r = self.rank if rank is None else rank
        return 1.0 - r * (h + w + 1) / (h * w)

    # ------------------------------------------------------------------ weights
    @property
    def weight(self) -> torch.Tensor:
        """Read-only dense weight U diag(s) V^T, for code that reads ``layer.weight`` directly.

        Code such as the inference fast path of ``nn.TransformerEncoderLayer``, or a forward calling
        ``F.linear(x, self.fc.weight)`` in a model that torch.fx cannot trace, passes ``layer.weight`` to
        functional ops instead of calling the layer; with this property it computes with the factorized
        weight and gradients reach U, s, V.
        It is recomputed at every access: assign to U, s, V (or use `from_dense`) to change the layer.
        """
        return self.dense_weight()

    def dense_weight(self) -> torch.Tensor:
        """The dense weight U diag(s) V^T reshaped back to the layer's weight shape."""
        matrix = (self.U * self.s) @ self.V.T
        return MATRICIZATIONS[self.scheme].to_weight(matrix, self.weight_shape)

    @torch.no_grad()
    def truncate_(self, keep: int) -> SVDLayer:
        """Keep the `keep` leading components in place (U[:, :k], s[:k], V[:, :k]).

        The Parameter objects stay the same (only their data shrinks), so optimizers keep
        referring to them; their gradients are sliced alike, and autograd's cached gradient
        accumulators are reset so the next backward accepts the new shapes. Returns self.
        """
        keep = int(keep)
        if not 1 <= keep <= self.rank:
            raise ValueError(f"truncate_({keep}) is out of range: keep must be in [1, {self.rank}]")
        if keep == self.rank:
            return self
        for p, dim in ((self.U, 1), (self.s, 0), (self.V, 1)):
            # the clone is of the parameter's own kind: an ordinary (trainable) parameter stays one when pruned
            # under torch.inference_mode, and one made in inference mode stays an inference tensor
            with torch.inference_mode(p.data.is_inference()):
                p.data = p.data.narrow(dim, 0, keep).clone()
                if p.grad is not None:
                    p.grad = p.grad.narrow(dim, 0, keep).clone()
                reset_grad_accumulator(p)
        return self

    def spec(self) -> dict:
        """JSON-ready constructor arguments (type, hyper-parameters, scheme, rank); see `layer_from_spec`."""
        return {"type": type(self).__name__, **self._hparams(), "bias": self.bias is not None, "rank": self.rank}

    def extra_repr(self) -> str:
        h, w = self.matrix_shape
        return f"{self._dense_repr()}, scheme={self.scheme}, rank={self.rank}/{self.full_rank}, M={h}x{w}"

    # ------------------------------------------------------------------ hooks for subclasses
    @abstractmethod
    def _hparams(self) -> dict:
        """Constructor hyper-parameters other than bias and rank."""

    @abstractmethod
    def _dense_repr(self) -> str:
        """Hyper-parameters in the dense layer's repr style."""

    @abstractmethod
    def to_dense(self) -> nn.Module:
        """The dense layer this twin computes, with identical hyper-parameters."""

    @abstractmethod
    def to_factorized(self) -> nn.Sequential:
        """The factors realised with standard torch.nn layers (Sigma folded into the U side)."""

    @classmethod
    @abstractmethod
    def from_dense(cls, module: nn.Module, scheme: str = "paper", rank: int | None = None) -> SVDLayer:
        """Factorize a dense layer at `rank` (default full rank theta), preserving its function.

        Raises:
            TypeError: `module` is not this twin's dense type (a subclass not in EQUIVALENT_SUBCLASSES, a
                transposed conv, a conv of another dimension), or this is SVDLayer itself (call it on a twin class).
            ValueError: A scheme the layer cannot use, or a rank out of range.
        """
        twin = twin_for(module)
        fix = (f"use {twin.__name__}.from_dense" if twin is not None else
               f"dprp_surgery factorizes {', '.join(f'nn.{t.__name__}' for t in TWINS)} only")
        raise TypeError(f"{cls.__name__}.from_dense is abstract; {fix} (or factorize() for a whole model)")


# ----------------------------------------------------------------------------- Linear
class SVDLinear(SVDLayer):
    """Factorized nn.Linear: W = U diag(s) V^T with U (out x r), V (in x r) (eq. (5))."""

    dense_type = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._init_factors("channel", rank, bias, device, dtype)

    @classmethod
    def from_dense(cls, module: nn.Linear, scheme: str = "channel", rank: int | None = None) -> SVDLinear:
        cls._check_dense(module)
        if scheme != "channel":
            raise ValueError(f"SVDLinear factorizes the out x in matrix ('channel' scheme); got scheme={scheme!r}: "
                             "pass scheme='channel' or leave it out")
        layer = cls(module.in_features, module.out_features, module.bias is not None, rank=rank, device="meta",
                    dtype=module.weight.dtype).to_empty(device=module.weight.device)
        layer._copy_from(module)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # named as nn.Linear's: callers may pass input=
        x = input
        h, w = self.matrix_shape
        rows = x.numel() // max(w, 1)
        # Two thin matmuls when cheaper than rebuilding W; same function either way. torch.export keeps the
        # batch symbolic, so it cannot branch on `rows`: an exported program always takes the factorized path.
        if torch.compiler.is_exporting() or rows * (h + w) < h * w + rows * h * w / self.rank:
            return F.linear(F.linear(x, self.V.T) * self.s, self.U, self.bias)
        return F.linear(x, self.dense_weight(), self.bias)

    def _hparams(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def _dense_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def to_dense(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                          device=self.U.device, dtype=self.U.dtype)
        self._copy_to(dense)
        return self._as_original(dense)

    def to_factorized(self) -> nn.Sequential:
        kw = {"device": self.U.device, "dtype": self.U.dtype}
        first = nn.Linear(self.in_features, self.rank, bias=False, **kw)
        second = nn.Linear(self.rank, self.out_features, bias=self.bias is not None, **kw)
        with torch.no_grad():
            first.weight.copy_(self.V.T)
            second.weight.copy_(self.U * self.s)
            if self.bias is not None:
                second.bias.copy_(self.bias)
        return FactorizedSequential(first, second, spec=self.spec())


# ----------------------------------------------------------------------------- Conv
class _SVDConvNd(SVDLayer):
    """Shared code of the factorized convolutions (every nn.ConvNd hyper-parameter is kept)."""

    _ndim: ClassVar[int]

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, scheme: str = "paper",
                 rank: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        ntuple = _ntuple(self._ndim)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible "
                             f"by groups={groups}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode={padding_mode!r}: use zeros, reflect, replicate or circular")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = ntuple(kernel_size), ntuple(stride), ntuple(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding={padding!r}: use 'same', 'valid' or integers")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = ntuple(padding)
        self.padding_mode = padding_mode
        if groups > 1 and scheme != "paper":
            raise ValueError(f"scheme={scheme!r} with groups={groups}: only the paper scheme keeps groups apart; "
                             "pass scheme='paper' (factorize picks it for grouped convs)")
        if scheme == "spatial" and self._ndim != 2:
            raise ValueError(f"scheme='spatial' needs a 2-D kernel, and {type(self).__name__} has a "
                             f"{self._ndim}-D one; pass scheme='paper' or 'channel'")
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_factors(scheme, rank, bias, device, dtype)

    @classmethod
    def from_dense(cls, module, scheme: str = "paper", rank: int | None = None):
        cls._check_dense(module)
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, module.bias is not None, module.padding_mode, scheme=scheme,
                    rank=rank, device="meta", dtype=module.weight.dtype).to_empty(device=module.weight.device)
        layer._copy_from(module)
        return layer

    # ------------------------------------------------------------------ padding helpers
    def _explicit_padding(self) -> tuple[int, ...]:
        """Padding as F.pad expects it (last dim first, left/right pairs), 'same' resolved."""
        if self.padding == "valid":
            return (0,) * (2 * self._ndim)
        if self.padding == "same":
            out: list[int] = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return tuple(out)
        return _reverse_repeat_tuple(self.padding, 2)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The dense convolution with this layer's hyper-parameters."""
        conv = F.conv1d if self._ndim == 1 else F.conv2d
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_padding(), mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # named as nn.ConvNd's: callers may pass input=
        return self._conv(input, self.dense_weight(), self.bias)

    def _hparams(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "padding_mode": self.padding_mode,
                "scheme": self.scheme}

    def _dense_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._ndim:
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self._ndim:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s

    # ------------------------------------------------------------------ conversions
    def _conv_type(self) -> type[nn.Module]:
        return nn.Conv1d if self._ndim == 1 else nn.Conv2d

    def to_dense(self):
        dense = self._conv_type()(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                                  self.dilation, self.groups, self.bias is not None, self.padding_mode,
                                  device=self.U.device, dtype=self.U.dtype)
        self._copy_to(dense)
        return self._as_original(dense)

    def _pad_module(self) -> nn.Module | None:
        """An explicit padding layer, needed when the realisation cannot pad inside its convs."""
        pad = self._explicit_padding()
        if not any(pad):
            return None
        if self.padding_mode == "zeros":
            return (nn.ZeroPad1d if self._ndim == 1 else nn.ZeroPad2d)(pad)
        kinds = {
            "reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d),
            "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d),
            "circular": (nn.CircularPad1d, nn.CircularPad2d),
        }
        return kinds[self.padding_mode][self._ndim - 1](pad)

    def _paper_order(self) -> str:
        """Which paper-scheme realisation needs fewer MACs per output position (docs/method.md).

        A layer with a bias always takes "depthwise_first": its last conv is the 1x1 mix, which can hold
        a bias per output channel, while the last conv of "pointwise_first" is shared by all of them.
        """
        return _paper_order_of(self.in_channels, self.out_channels, self.groups, self.kernel_size, self.stride,
                               self.bias is not None)

    def to_factorized(self) -> nn.Sequential:
        conv_t = self._conv_type()
        kw = {"device": self.U.device, "dtype": self.U.dtype}
        r, c, s, g = self.rank, self.in_channels, self.out_channels, self.groups
        us = self.U * self.s
        has_bias = self.bias is not None
        ones = (1,) * self._ndim
        layers: list[nn.Module] = []
        # Zero padding commutes with the bias-free first conv, so it can stay inside the k x k conv.
        in_conv = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        p = self.padding if in_conv else (0,) * self._ndim
        if not in_conv and (pad := self._pad_module()) is not None:
            layers.append(pad)
        if self.scheme == "channel":
            first = conv_t(c, r, self.kernel_size, self.stride, p, self.dilation, bias=False, **kw)
            second = conv_t(r, s, 1, bias=has_bias, **kw)
            w1 = self.V.T.reshape(r, c, *self.kernel_size)
            w2 = us.reshape(s, r, *ones)
        elif self.scheme == "spatial":
            kh, kw_ = self.kernel_size
            first = conv_t(c, r, (1, kw_), (1, self.stride[1]), (0, p[1]), (1, self.dilation[1]), bias=False, **kw)
            second = conv_t(r, s, (kh, 1), (self.stride[0], 1), (p[0], 0), (self.dilation[0], 1), bias=has_bias,
                            **kw)
            w1 = self.V.T.reshape(r, c, 1, kw_)
            w2 = us.reshape(s, kh, r).permute(0, 2, 1).reshape(s, r, kh, 1)
        elif self._paper_order() == "depthwise_first":
            # The r basis filters V_g on every input channel (channels folded into the batch, so the
            # filters are stored once), then a grouped 1x1 mix with U diag(s).
            first = conv_t(1, r, self.kernel_size, self.stride, p, self.dilation, bias=False, **kw)
            second = conv_t(c * r, s, 1, groups=g, bias=has_bias, **kw)
            w1 = self.V.T.reshape(r, 1, *self.kernel_size)
            w2 = us.reshape(s, (c // g) * r, *ones)
            first = nn.Sequential(nn.Unflatten(1, (c, 1)), nn.Flatten(0, 1), first, nn.Unflatten(0, (-1, c)),
                                  nn.Flatten(1, 2))
        else:
            # A grouped 1x1 projection with U to S*r channels, then the r filters s_g V_g summed per
            # output channel (output channels folded into the batch; no bias, see `_paper_order`).
            first = conv_t(c, s * r, 1, groups=g, bias=False, **kw)
            second = conv_t(r, 1, self.kernel_size, self.stride, p, self.dilation, bias=False, **kw)
            w1 = self.U.reshape(s, c // g, r).permute(0, 2, 1).reshape(s * r, c // g, *ones)
            w2 = (self.V * self.s).T.reshape(1, r, *self.kernel_size)
            second = nn.Sequential(nn.Unflatten(1, (s, r)), nn.Flatten(0, 1), second, nn.Unflatten(0, (-1, s)),
                                   nn.Flatten(1, 2))
        conv1, conv2 = (_only_conv(m) for m in (first, second))
        with torch.no_grad():
            conv1.weight.copy_(w1)
            conv2.weight.copy_(w2)
            if has_bias:
                conv2.bias.copy_(self.bias)
        modules = (*layers, *_items(first), *_items(second))
        # the paper realisation's folds into the batch dimension need a batch
        return FactorizedSequential(*modules, spec=self.spec(),
                                    sample_dim=self._ndim + 1 if self.scheme == "paper" else None)


class _BatchedSequential(nn.Sequential):
    """An nn.Sequential that also takes one unbatched sample, as nn.ConvNd does (run as a batch of one)."""

    def __init__(self, *modules: nn.Module, sample_dim: int | None = None) -> None:
        super().__init__(*modules)
        self.sample_dim = sample_dim or 0  # dims of one unbatched sample; 0 (None given): none expected (an int
        # either way, for torch.jit.script)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # named as nn.Sequential's: callers may pass input=
        x = input
        single = x.dim() == self.sample_dim  # 0 when no unbatched sample is expected
        if single:
            x = x.unsqueeze(0)
        for module in self:  # as nn.Sequential.forward, written out so that torch.jit.script compiles it
            x = module(x)
        return x.squeeze(0) if single else x


_DENSE_HPARAMS: dict[str, tuple[str, ...]] = {
    "SVDLinear": ("in_features", "out_features"),
    "SVDConv1d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode"),
}
_DENSE_HPARAMS["SVDConv2d"] = _DENSE_HPARAMS["SVDConv1d"]


class FactorizedSequential(_BatchedSequential):
    """The standard-layer realisation of an SVD layer (`SVDLayer.to_factorized`), posing as the dense layer.

    An nn.Sequential of standard torch.nn layers (Sigma folded into the U side), so its state dict, ONNX and
    torch.export graphs are those of the layers it holds. Like the SVD layer it came from, it also answers
    what the dense layer answered, for code that reads a layer's attributes instead of calling it (timm's
    ``PositionalEncodingFourier`` reads ``token_projection.weight.device``, DaViT's ``Downsample`` reads
    ``conv.kernel_size``, ``nn.TransformerEncoderLayer``'s inference fast path passes ``linear1.weight`` to
    a fused kernel): the dense layer's hyper-parameters (``in_features``/``out_features``, or
    ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups``,
    ``padding_mode``) as attributes, and read-only ``weight`` and ``bias`` properties.

    Attributes:
        scheme: Name of the matricization.
        rank: Number of components r.
        dense_type: The dense layer type it computes (nn.Linear, nn.Conv1d or nn.Conv2d).
        weight_shape: Shape of the dense weight.
        transposed: False, and ``output_padding`` zeros (convolutions only, as nn.ConvNd has them).
    """

    def __init__(self, *modules: nn.Module, spec: dict, sample_dim: int | None = None) -> None:
        super().__init__(*modules, sample_dim=sample_dim)
        kind = spec.get("type")
        if kind not in _DENSE_HPARAMS:
            raise ValueError(f"unknown layer type {kind!r} in spec; expected one of {', '.join(_DENSE_HPARAMS)}")
        self._spec = dict(spec)
        self.scheme, self.rank = spec.get("scheme", "channel"), int(spec["rank"])
        self.dense_type = {t.__name__: d for d, t in TWINS.items()}[kind]
        for key in _DENSE_HPARAMS[kind]:
            value = spec[key]
            setattr(self, key, tuple(value) if isinstance(value, list) else value)
        if kind == "SVDLinear":
            self.weight_shape = (self.out_features, self.in_features)
        else:  # as nn.ConvNd has them
            self.transposed, self.output_padding = False, (0,) * len(self.kernel_size)
            self.weight_shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a part of the realisation is no longer the dense layer: a plain Sequential
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def spec(self) -> dict:
        """The SVD layer's `SVDLayer.spec()` (type, hyper-parameters, scheme, rank) it was realised from."""
        return dict(self._spec)

    __jit_unused_properties__: ClassVar[list[str]] = ["weight", "bias"]  # torch.jit.script compiles forward only

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(U', V', bias) with U' V'^T = M, read off the two realised layers (U' holds Sigma; not detached).

        Raises:
            AttributeError: The realisation no longer holds its two plain layers (e.g. after re-factorizing
                or dynamic quantization), so it has no dense weight to show (``hasattr`` is then False).
        """
        try:
            return _realised_factors(self, self._spec)
        except ValueError as exc:
            raise AttributeError(str(exc)) from None

    @property
    def weight(self) -> torch.Tensor:
        """Read-only dense weight reshape(U' V'^T) in the layers' dtype and device, for code that reads it.

        Like `SVDLayer.weight` it is recomputed at every access and carries gradients to the realised layers'
        weights; assign to those (``layer[i].weight``) to change the layer.
        """
        u, v, _ = self.factors()
        return MATRICIZATIONS[self.scheme].to_weight(u @ v.T, self.weight_shape)

    @property
    def bias(self) -> torch.Tensor | None:
        """The dense layer's bias (the last realised layer's bias Parameter), None without one."""
        return self.factors()[2]

    def extra_repr(self) -> str:
        h, w = MATRICIZATIONS[self.scheme].matrix_shape(self.weight_shape)
        try:
            dense = f"{self.dense_type.__name__}({self.dense_type.extra_repr(self)}), "  # as the dense layer prints
        except AttributeError:  # its layers were replaced (bias unknown): the realisation's own modules tell
            dense = f"{self.dense_type.__name__} realisation, "
        return f"{dense}scheme={self.scheme}, rank={self.rank}/{min(h, w)}, M={h}x{w}"


def _paper_order_of(in_channels: int, out_channels: int, groups: int, kernel_size, stride, bias: bool) -> str:
    """The paper-scheme realisation of a conv with these hyper-parameters (see `_SVDConvNd._paper_order`)."""
    c, s, g = in_channels, out_channels, groups
    k = math.prod(kernel_size)
    depthwise_first = c * k + s * (c // g)
    pointwise_first = s * (c // g) * math.prod(stride) + s * k
    if bias or depthwise_first <= pointwise_first:
        return "depthwise_first"
    return "pointwise_first"


def _realised_factors(seq: nn.Module, spec: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(U', V', bias) with U' V'^T = M of a ``to_factorized`` realisation of `spec` (inverse of its weight maps)."""
    parts = [m for m in seq if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)] if isinstance(
        seq, nn.Sequential) else []
    if len(parts) != 2:
        kinds = ", ".join(type(m).__name__ for m in seq.children()) if isinstance(seq, nn.Module) else type(seq)
        raise ValueError(f"expected a two-layer factorized realisation of {spec.get('type')} (two Linear/Conv "
                         f"layers), got {kinds or 'nothing'}")
    first, second = parts
    w1, w2 = first.weight, second.weight
    r = int(spec["rank"])
    if spec["type"] == "SVDLinear":
        return w2, w1.T, second.bias
    s, c, g = spec["out_channels"], spec["in_channels"], spec["groups"]
    k = math.prod(spec["kernel_size"])
    if spec["scheme"] == "channel":
        return w2.reshape(s, r), w1.reshape(r, -1).T, second.bias
    if spec["scheme"] == "spatial":
        kh = spec["kernel_size"][0]
        u = w2.reshape(s, r, kh).permute(0, 2, 1).reshape(s * kh, r)
        return u, w1.reshape(r, -1).T, second.bias
    order = _paper_order_of(c, s, g, spec["kernel_size"], spec["stride"], spec.get("bias", True))
    if order == "depthwise_first":  # the r basis filters, shared by every input channel
        return w2.reshape(s * (c // g), r), w1.reshape(r, k).T, second.bias
    u = w1.reshape(s, r, c // g).permute(0, 2, 1).reshape(s * (c // g), r)
    return u, w2.reshape(r, k).T, second.bias  # V diag(s), shared by every output channel


def _items(module: nn.Module) -> list[nn.Module]:
    """The modules of a Sequential, or the module itself, as a flat list."""
    return list(module) if isinstance(module, nn.Sequential) else [module]


def _only_conv(module: nn.Module) -> nn.Module:
    """The one convolution in `module` (itself or inside a Sequential)."""
    return next(m for m in _items(module) if isinstance(m, nn.Conv1d | nn.Conv2d))


class SVDConv1d(_SVDConvNd):
    """Factorized nn.Conv1d ("paper": (S*C) x L, "channel": S x (C*L))."""

    dense_type = nn.Conv1d
    _ndim = 1


class SVDConv2d(_SVDConvNd):
    """Factorized nn.Conv2d with the paper's M in R^{SC x L1L2} (eqs. (1)-(4)) or another scheme."""

    dense_type = nn.Conv2d
    _ndim = 2


TWINS: dict[type[nn.Module], type[SVDLayer]] = {nn.Linear: SVDLinear, nn.Conv1d: SVDConv1d, nn.Conv2d: SVDConv2d}

EQUIVALENT_SUBCLASSES: dict[str, type[nn.Module]] = {
    # forward differs only under torch.jit scripting (a dtype cast); the classifier of timm's MobileNetV3,
    # GhostNet, HardCoReNAS and others
    "timm.layers.linear.Linear": nn.Linear,
}
"""Subclasses (by module path and qualified name) that compute exactly what their dense base computes and hold
no other state: factorized like the base, and rebuilt as the subclass by ``to_dense``."""


def dense_base(module: nn.Module) -> type[nn.Module] | None:
    """The registered dense type `module` is (exactly, or as one of `EQUIVALENT_SUBCLASSES`), else None."""
    kind = type(module)
    if kind in TWINS:
        return kind
    return EQUIVALENT_SUBCLASSES.get(f"{kind.__module__}.{kind.__qualname__}")


def twin_for(module: nn.Module) -> type[SVDLayer] | None:
    """The factorized twin class of a module of a registered dense type (or an equivalent subclass)."""
    base = dense_base(module)
    return TWINS[base] if base is not None else None


def layer_from_spec(spec: dict, device=None, dtype=None) -> SVDLayer:
    """Build an SVD layer from `SVDLayer.spec()` output (factors uninitialised on "meta")."""
    by_name = {t.__name__: t for t in TWINS.values()}
    kwargs = dict(spec)
    kind = kwargs.pop("type", None)
    if kind not in by_name:
        raise ValueError(f"unknown layer type {kind!r} in spec; expected one of {', '.join(by_name)}")
    return by_name[kind](**kwargs, device=device, dtype=dtype)


@torch.no_grad()
def reset_grad_accumulator(param: torch.Tensor) -> None:
    """Drop autograd's cached gradient accumulator of `param` after its shape changed in place.

    Autograd keeps one AccumulateGrad node per leaf while any graph that used the leaf is alive (for
    instance the previous step's ``loss`` tensor) and checks incoming gradients against the shape
    recorded in it, so the first backward after ``param.data = smaller`` fails with "returned an invalid
    gradient ... expected shape compatible with" the old shape. Assigning ``.data`` of another dtype
    makes autograd forget the node (torch resets it only on a dtype or device change), and assigning the
    real data back keeps the same Parameter object.
    """
    data = param.data
    other = torch.float64 if data.dtype != torch.float64 else torch.float32
    param.data = torch.empty(0, dtype=other, device=data.device)
    param.data = data
