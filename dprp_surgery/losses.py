"""The DPRP training losses of Sec. III-C (eqs. (8)-(12)) and the ablation regularizers (eqs. (14)-(17)).

Every term is computed for all SVD layers at once: the singular values of the L layers are padded into
one ``(L x r_max)`` tensor with a validity mask, so L_sort, L_comp, tau_l and the ablation terms are
single batched operations; for L_orth the factors are grouped by their row count (h for U, w for V),
zero-padded along the rank to the group's largest rank, and each group's Gram matrices come from
one batched matmul. Zero padding is exact: padded columns add zero rows/columns to U^T U, and the
identity subtracted is masked to the layer's own r_l x r_l block. No SVD is ever computed.

Readings of the equations (docs/method.md gives the reasoning):

* eq. (11): the negativity sum runs over all r_l entries (j = 1..r_l), not j = 1..r_l - 1, so that
  the last singular value is also pushed to be non-negative.
* tau_l: with rho_j = |s_{j+1}| / |s_j| (rho_j = 0 when |s_j| = 0), tau_l is the first j (1-based)
  with rho_j <= epsilon, else r_l. Components j > tau_l are the ones pruned.
* eq. (12): the divisor is n_l = r_l - tau_l + 1, the number of summed terms i = tau_l..r_l (the
  paper's r_l - tau_l is zero when tau_l = r_l), so the smallest kept singular value is always pushed
  down. tau_l is computed without gradient.

Example:
    >>> reg = DPRPRegularizer(DPRPConfig())                       # doctest: +SKIP
    >>> loss = F.cross_entropy(model(x), y) + reg(model)[0]        # doctest: +SKIP
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from .config import DPRPConfig, as_config
from .layers import SVDLayer
from .surgery import svd_layers

__all__ = [
    "DPRPRegularizer",
    "distillation_loss",
    "orthogonality_loss",
    "sorting_loss",
    "compression_loss",
    "keep_counts",
    "layer_weights",
    "regularization_loss",
    "pad_singular_values",
    "unwrap_model",
]

LayersLike = nn.Module | Iterable[SVDLayer] | Iterable[tuple[str, SVDLayer]]


# ----------------------------------------------------------------------------- helpers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile (or the model itself)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _as_layers(layers: LayersLike) -> list[SVDLayer]:
    """A list of SVD layers from a model, a list of layers, or a list of (name, layer) pairs."""
    if isinstance(layers, nn.Module):
        if isinstance(layers, SVDLayer):
            return [layers]
        return [m for _, m in svd_layers(unwrap_model(layers))]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"expected a model or a list of its SVD layers, got {type(layers).__name__}")
    out = []
    for item in layers:
        layer = item[1] if isinstance(item, tuple) else item
        if not isinstance(layer, SVDLayer):
            raise TypeError(f"expected SVDLayer objects, got {type(layer).__name__}")
        out.append(layer)
    return out


def pad_singular_values(s_list: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Pad singular-value vectors into one matrix.

    Args:
        s_list: L one-dimensional tensors sigma_l of lengths r_l.

    Returns:
        ``(S, mask, r)``: S is ``(L x r_max)`` with zeros after each layer's r_l values (differentiable
        with respect to every sigma_l), mask is the boolean ``(L x r_max)`` validity mask and r the
        ``(L,)`` int64 tensor of ranks.
    """
    S, mask, r = _pad(s_list)
    return S, mask.clone(), r.clone()


def _pad(s_list: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """`pad_singular_values` with the shared cached mask and ranks of `_rank_tensors` (never modify them)."""
    S = pad_sequence(list(s_list), batch_first=True)
    mask, r = _rank_tensors(S.device, tuple(s.shape[0] for s in s_list))
    return S, mask, r


@functools.lru_cache(maxsize=4096)  # one step asks for 1 + (#U shape groups) + (#V shape groups) rank tuples
def _rank_tensors(device: torch.device, ranks: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The ``(L x r_max)`` validity mask and ``(L,)`` int64 ranks on `device`, built once per (device, ranks)."""
    # the losses run every training step: building r from a Python list there is a host-to-device copy that
    # waits for the GPU; ranks only change at pruning, so each set is copied once. Built outside inference
    # mode, so that a first call under torch.inference_mode does not cache tensors autograd cannot save.
    with torch.inference_mode(False), torch.no_grad():
        r = torch.tensor(ranks, dtype=torch.int64).to(device)
        mask = torch.arange(max(ranks, default=0), device=device) < r[:, None]
    return mask, r


def check_epsilon(value: object, where: str) -> float:
    """epsilon as a float in (0, 1), else a ValueError naming `where` and the value."""
    if isinstance(value, bool) or not isinstance(value, int | float | Tensor):
        raise ValueError(f"{where} epsilon={value!r} must be a number in (0, 1) (the pruning threshold of tau_l, "
                         "Sec. III-C.3; the paper uses 0.1)")
    eps = float(value)
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(f"{where} epsilon={value!r} must lie in (0, 1) (the pruning threshold of tau_l, "
                         "Sec. III-C.3; the paper uses 0.1)")
    return eps


def _chi(count: Tensor) -> Tensor:
    """chi(a) = 1/a for a > 0 and 0 for a = 0 (Sec. III-C.2), element-wise, as floats."""
    c = count.to(torch.float64) if not count.is_floating_point() else count  # the caller casts to its dtype
    return torch.where(c > 0, 1.0 / c.clamp_min(1), torch.zeros_like(c))


def _device_of(model: LayersLike) -> torch.device:
    """The device of a module's first parameter or buffer; the CPU for anything else."""
    if isinstance(model, nn.Module):
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _empty(layers: list[SVDLayer]) -> Tensor:
    """A zero loss for a model without SVD layers."""
    return torch.zeros(())


# ----------------------------------------------------------------------------- eq. (10)
def orthogonality_loss(layers: LayersLike) -> Tensor:
    """L_orth of eq. (10): (1/L) sum_l (||U_l^T U_l - I||_F + ||V_l^T V_l - I||_F) / r_l^2.

    Factors are grouped by row count; within a group they are zero-padded along the rank and one
    batched matmul gives all Gram matrices. The identity is masked to each layer's r_l x r_l block, so
    the padding contributes exactly zero.

    Args:
        layers: A model, SVD layers, or (name, layer) pairs.

    Returns:
        The scalar loss (differentiable with respect to every U_l and V_l).
    """
    layers = _as_layers(layers)
    if not layers:
        return _empty(layers)
    n = len(layers)
    total = _gram_residual_sum([lay.U for lay in layers]) + _gram_residual_sum([lay.V for lay in layers])
    return total / n


def _gram_residual_sum(factors: list[Tensor]) -> Tensor:
    """sum_l ||F_l^T F_l - I||_F / r_l^2 over factors F_l (h_l x r_l), one bmm per distinct h_l."""
    groups: dict[int, list[Tensor]] = {}
    for f in factors:
        groups.setdefault(f.shape[0], []).append(f)
    parts = []
    for group in groups.values():
        mask, r = _rank_tensors(group[0].device, tuple(f.shape[1] for f in group))  # cached: no copy per step
        resid = _GramResidualNorms.apply(mask, *group)  # (n,)
        parts.append((resid / r.to(resid.dtype) ** 2).sum())
    return torch.stack(parts).sum()


class _GramResidualNorms(torch.autograd.Function):
    """||F_l^T F_l - I_{r_l}||_F for same-height factors F_l, with the analytic gradient 2 F_l R_l / ||R_l||_F.

    Autograd of ``bmm(F^T, F)`` would spend two batched matmuls on the backward; with R = F^T F - I
    symmetric the gradient is one (``F @ R``), and the factors are stacked without a transposed copy.
    """

    @staticmethod
    def forward(ctx, mask: Tensor, *factors: Tensor) -> Tensor:  # noqa: D102
        # mask: (n x r_max) bool, True for column j < r_l of factor l (the identity's diagonal)
        with torch.autocast(device_type=factors[0].device.type, enabled=False):
            ranks = [f.shape[1] for f in factors]
            r_max = max(ranks)
            if all(k == r_max for k in ranks):
                F = torch.stack(factors)  # (n, h, r)
            else:
                # after pruning, ranks differ: one slice copy per layer (one pad_sequence of the transposed
                # factors for every group measured slower: 12.0 against 8.1 ms, full-rank spatial ResNet-20)
                F = factors[0].new_zeros((len(factors), factors[0].shape[0], r_max))
                for i, f in enumerate(factors):
                    F[i, :, : f.shape[1]] = f
            R = torch.bmm(F.transpose(1, 2), F)  # F^T F, zero outside each r_l x r_l block
            R.diagonal(dim1=1, dim2=2).sub_(mask.to(R.dtype))
            norms = torch.linalg.matrix_norm(R, ord="fro")
        ctx.save_for_backward(F, R, norms)
        ctx.ranks = ranks
        return norms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_norms: Tensor):  # noqa: D102
        F, R, norms = ctx.saved_tensors
        scale = torch.where(norms > 0, 2.0 * grad_norms / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
        grad = torch.bmm(F, R) * scale[:, None, None]
        return (None, *(grad[i, :, :k] for i, k in enumerate(ctx.ranks)))


# ----------------------------------------------------------------------------- eq. (11)
def sorting_loss(layers: LayersLike) -> Tensor:
    """L_sort of eq. (11), averaged over the L layers.

    Per layer: chi(gamma_l) sum_{j=1}^{r_l-1} max(0, s_{j+1} - s_j) + chi(eta_l) sum_{j=1}^{r_l} max(0, -s_j),
    with gamma_l the number of out-of-order entries (s_{j+1} > s_j), eta_l the number of negative entries
    and chi(a) = 1/a (0 for a = 0). The negativity sum runs over all r_l entries (the paper writes
    r_l - 1; see docs/method.md).

    Args:
        layers: A model, SVD layers, or (name, layer) pairs.

    Returns:
        The scalar loss (differentiable with respect to every s_l).
    """
    layers = _as_layers(layers)
    if not layers:
        return _empty(layers)
    S, mask, _ = _pad([lay.s for lay in layers])
    return _sorting_from_padded(S, mask).mean()


def _sorting_from_padded(S: Tensor, mask: Tensor) -> Tensor:
    """Per-layer L_sort terms (L,) from padded singular values."""
    pair = mask[:, 1:]  # pair (j, j+1) exists when j+1 <= r_l
    rise = (S[:, 1:] - S[:, :-1]).clamp_min(0) * pair
    gamma = ((S[:, 1:] > S[:, :-1]) & pair).sum(1)
    neg = (-S).clamp_min(0) * mask
    eta = ((S < 0) & mask).sum(1)
    return _chi(gamma).to(S.dtype) * rise.sum(1) + _chi(eta).to(S.dtype) * neg.sum(1)


# ----------------------------------------------------------------------------- tau_l
@torch.no_grad()
def keep_counts(s_list: Sequence[Tensor] | Tensor, epsilon: float, mask: Tensor | None = None) -> Tensor:
    """tau_l of Sec. III-C.3 for every layer: the number of leading components to keep.

    With rho_j = |s_{j+1}| / |s_j| (rho_j = 0 when |s_j| = 0, so everything after a zero is pruned),
    tau_l is the first j (1-based) with rho_j <= epsilon, or r_l when there is none.

    Args:
        s_list: L singular-value vectors, or an already padded ``(L x r_max)`` tensor with `mask`.
        epsilon: The pruning threshold epsilon in (0, 1).
        mask: Validity mask when `s_list` is a padded tensor.

    Returns:
        ``(L,)`` int64 tensor of tau_l, each in [1, r_l].

    Raises:
        ValueError: epsilon outside (0, 1).
    """
    epsilon = check_epsilon(epsilon, "keep_counts")
    if isinstance(s_list, Tensor) and s_list.ndim == 2:
        S = s_list.detach()
        mask = torch.ones_like(S, dtype=torch.bool) if mask is None else mask
        r = mask.sum(1)
    else:
        if len(s_list) == 0:
            return torch.zeros(0, dtype=torch.int64)
        S, mask, r = _pad([s.detach() for s in s_list])
    return _tau_from_padded(S, mask, r, epsilon)


def _tau_from_padded(S: Tensor, mask: Tensor, r: Tensor, epsilon: float) -> Tensor:
    """tau_l (L,) from padded singular values (no gradient)."""
    a = S.detach().abs()
    prev, nxt = a[:, :-1], a[:, 1:]
    rho = torch.where(prev > 0, nxt / torch.where(prev > 0, prev, torch.ones_like(prev)), torch.zeros_like(prev))
    cut = (rho <= epsilon) & mask[:, 1:]
    if cut.shape[1] == 0:
        return r.clone()
    first = cut.to(torch.int32).argmax(1) + 1  # 1-based j of the first cut
    return torch.where(cut.any(1), first, r).to(torch.int64)


# ----------------------------------------------------------------------------- eq. (12)
def compression_loss(layers: LayersLike, epsilon: float, weighting: str = "layers", min_rank: int = 1) -> Tensor:
    """L_comp of eq. (12): (1/L) sum_l sum_{i=tau_l}^{r_l} |s_i| / (n_l ||s_l||_2).

    n_l = r_l - tau_l + 1 is the number of summed terms (the paper's r_l - tau_l is zero when
    tau_l = r_l); tau_l (1-based, see `keep_counts`) is computed without gradient, so the sum always
    includes the smallest kept value s_{tau_l}.

    Args:
        layers: A model, SVD layers, or (name, layer) pairs.
        epsilon: The pruning threshold epsilon.
        weighting: "layers" (eq. (12), the mean over layers), "params" (each layer's term weighted by
            h_l w_l / sum_k h_k w_k, its share of the dense parameters; not in the paper) or
            "params-squared" (weights proportional to (h_l w_l)^2; see `layer_weights`).
        min_rank: The pruner's floor (`DPRPConfig.min_rank`; not in the paper): the sum starts at
            max(tau_l, min_rank), and a layer already at r_l <= min_rank, which is never pruned, adds its
            term without gradient. The default 1 is eq. (12) unchanged.

    Returns:
        The scalar loss (differentiable with respect to every s_l, through the sum and ||s_l||_2).
    """
    epsilon = check_epsilon(epsilon, "compression_loss")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"compression_loss min_rank={min_rank!r} must be an int >= 1 (the pruner's floor)")
    layers = _as_layers(layers)
    if not layers:
        return _empty(layers)
    S, mask, r = _pad([lay.s for lay in layers])
    tau = _tau_from_padded(S, mask, r, epsilon)
    return _average(_compression_from_padded(S, mask, r, tau, min_rank), layer_weights(layers, weighting))


_WEIGHTING_POWERS = {"params": 1, "params-squared": 2}  # comp_weighting -> exponent of h_l w_l


def layer_weights(layers: LayersLike, weighting: str = "layers") -> Tensor | None:
    """Weights (L,) summing to 1 that average per-layer terms; None for the plain mean ("layers").

    "params" weights layer l by h_l w_l / sum_k h_k w_k, the share of the dense parameters its
    matricized weight M_l (h_l x w_l, eqs. (1)-(2)) holds, which does not change as rank is pruned;
    "params-squared" by (h_l w_l)^2 / sum_k (h_k w_k)^2.
    """
    if weighting == "layers":
        return None
    power = _WEIGHTING_POWERS.get(weighting)
    if power is None:
        raise ValueError(f"unknown comp_weighting {weighting!r}; use 'layers' (the paper), 'params' or "
                         "'params-squared'")
    layers = _as_layers(layers)
    size = torch.tensor([float(lay.U.shape[0] * lay.V.shape[0]) for lay in layers], dtype=torch.float64) ** power
    w = size / size.sum()
    first = layers[0].s
    return w.to(device=first.device, dtype=first.dtype)


def _average(terms: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of per-layer terms, or their weighted sum when weights are given."""
    return terms.mean() if weights is None else (terms * weights).sum()


def _compression_from_padded(S: Tensor, mask: Tensor, r: Tensor, tau: Tensor, min_rank: int = 1) -> Tensor:
    """Per-layer L_comp terms (L,) from padded singular values, tau (1-based) and the pruner's floor."""
    if min_rank > 1:  # the components the pruner never cuts are not pushed (tau < min_rank, or r_l <= min_rank)
        tau = torch.minimum(r, tau.clamp_min(min_rank))
        terms = _compression_from_padded(S, mask, r, tau)
        return torch.where(r > min_rank, terms, terms.detach())
    ar = torch.arange(S.shape[1], device=S.device)
    tail = (ar[None, :] >= (tau - 1)[:, None]) & mask  # 0-based i >= tau_l - 1
    n = (r - tau + 1).to(S.dtype)
    norm = torch.linalg.vector_norm(S, dim=1)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))  # all-zero sigma: the sum is 0 too
    return (S.abs() * tail).sum(1) / (n * norm)


# ----------------------------------------------------------------------------- eqs. (15)-(17)
def regularization_loss(layers: LayersLike, kind: str, delta: float = 1e-3, weighting: str = "layers") -> Tensor:
    """An ablation regularizer L_reg of eq. (14), averaged over layers.

    * ``"l1"`` (15): ||s_l||_1 / r_l.
    * ``"l2"`` (16): ||s_l||_2 / r_l.
    * ``"funnel"`` (17): (1/r_l) sum_i |s_i| / (|s_i| + delta).
    * ``"none"``: 0.

    Args:
        layers: A model, SVD layers, or (name, layer) pairs.
        kind: "l1", "l2", "funnel" or "none".
        delta: delta of the funnel regularizer.
        weighting: "layers" (the mean over layers), "params" or "params-squared" (see `layer_weights`).

    Returns:
        The scalar loss.
    """
    if kind not in ("l1", "l2", "funnel", "none"):
        raise ValueError(f"unknown ablation regularizer {kind!r}; use l1, l2, funnel or none")
    layers = _as_layers(layers)
    if not layers:
        return _empty(layers)
    S, mask, r = _pad([lay.s for lay in layers])
    return _average(_ablation_from_padded(S, mask, r, kind, delta), layer_weights(layers, weighting))


def _ablation_from_padded(S: Tensor, mask: Tensor, r: Tensor, kind: str, delta: float) -> Tensor:
    """Per-layer ablation terms (L,)."""
    rf = r.to(S.dtype)
    a = S.abs()  # padding is 0, so sums over the padded row are exact
    if kind == "l1":
        return a.sum(1) / rf
    if kind == "l2":
        return torch.linalg.vector_norm(S, dim=1) / rf
    if kind == "funnel":
        return ((a / (a + delta)) * mask).sum(1) / rf
    return torch.zeros_like(rf)


# ----------------------------------------------------------------------------- eq. (8)
def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """Knowledge-distillation term T^2 KL(softmax(teacher / T) || softmax(student / T)), mean over the batch.

    Not part of the paper: an optional addition to its application loss L_app (eq. (8)) that keeps the
    factorized model close to the dense model it started from (`DPRPConfig.distill`). The T^2 factor keeps
    the gradient's scale independent of T (Hinton et al., 2015).

    Args:
        student: Logits of the model being trained, (batch, classes).
        teacher: Logits of the dense model, same shape (no gradient flows into them).
        temperature: Softmax temperature T > 0.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ: "
                         "distillation needs a teacher with the same outputs as the model")
    t = float(temperature)
    # in float64: at a large T both log-softmaxes are close to -log(classes) and their difference, scaled by T^2,
    # cancels in float32 (the KL came out negative from T ~ 1e4 on); the tensors are only batch x classes
    log_p_student = torch.log_softmax(student.double() / t, dim=-1)
    log_p_teacher = torch.log_softmax(teacher.detach().double() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).clamp_min(0)  # KL >= 0; rounding
    return (kl.mean() * (t * t)).float()


class DPRPRegularizer:
    """The regularization part of L_total (eq. (8)): everything except the application loss L_app.

    For ``config.regularizer == "dprp"`` it returns
    ``lambda_str * (mu_orth * L_orth + mu_sort * L_sort) + lambda_comp * L_comp`` (eqs. (8), (10)-(12));
    for an ablation ("l1", "l2", "funnel", "none") it returns ``lambda_comp * L_reg`` (eq. (14); lambda_comp
    doubles as lambda_reg). Add it to your application loss: ``L_total = L_app + reg(model)[0]``.

    Schedules (both optional, from the config): lambda_str and lambda_comp ramp linearly from 0 over
    `reg_warmup_epochs` (``weights_at``), lambda_comp is 0 in the last `reg_cooldown_epochs` epochs
    (``cooling_at``; the trainer also stops pruning then; lambda_str too if ``structure_when_frozen`` is False),
    and epsilon grows geometrically from `epsilon_start` to `epsilon` over `epsilon_ramp_epochs`
    (``epsilon_at``). Calling without an epoch uses the full weights and the final epsilon, with no warm-up and
    no cool-down.

    The regularizer only returns a loss tensor; it never touches ``.grad``.

    Args:
        config: A DPRPConfig (fields lambda_str, mu_orth, mu_sort, lambda_comp, epsilon, regularizer,
            delta, comp_weighting, min_rank, epochs, reg_warmup_epochs, reg_cooldown_epochs,
            structure_when_frozen, epsilon_start, epsilon_ramp_epochs).
    """

    def __init__(self, config: DPRPConfig | None = None) -> None:
        self.config = as_config(config, "DPRPRegularizer()")
        self._weights_key: tuple | None = None
        self._weights: Tensor | None = None

    def _layer_weights(self, layers: list[SVDLayer]) -> Tensor | None:
        """`layer_weights` for the config's comp_weighting, cached: it depends only on the layers' dense shapes."""
        if self.config.comp_weighting == "layers":
            return None
        first = layers[0].s
        key = (tuple(lay.matrix_shape for lay in layers), first.device, first.dtype)
        if key != self._weights_key:
            self._weights, self._weights_key = layer_weights(layers, self.config.comp_weighting), key
        return self._weights

    # ------------------------------------------------------------------ schedules
    def epsilon_at(self, epoch: float | None = None) -> float:
        """epsilon in force at `epoch` (0-based): geometric from epsilon_start to epsilon, then constant."""
        c = self.config
        if epoch is None or c.epsilon_start is None or c.epsilon_ramp_epochs == 0:
            return c.epsilon
        t = min(1.0, max(0.0, float(epoch) / c.epsilon_ramp_epochs))
        return c.epsilon_start * (c.epsilon / c.epsilon_start) ** t

    def weights_at(self, epoch: float | None = None, *, stopped: bool = False) -> dict[str, float]:
        """Loss weights at `epoch` (0-based): lambda_str and lambda_comp times min(1, epoch / reg_warmup_epochs);
        lambda_comp 0 during the cool-down and once compression has `stopped` (target reached), lambda_str too
        then when ``structure_when_frozen`` is False."""
        c = self.config
        ramp = 1.0
        if epoch is not None and c.reg_warmup_epochs > 0:
            ramp = min(1.0, max(0.0, float(epoch) / c.reg_warmup_epochs))
        frozen = stopped or self.cooling_at(epoch)
        comp = 0.0 if frozen else c.lambda_comp * ramp
        structure = 0.0 if frozen and not c.structure_when_frozen else c.lambda_str * ramp
        return {"lambda_str": structure, "lambda_comp": comp, "mu_orth": c.mu_orth, "mu_sort": c.mu_sort}

    def cooling_at(self, epoch: float | None = None) -> bool:
        """True in the last `reg_cooldown_epochs` of `epochs` (no L_comp, no pruning); False without an epoch."""
        c = self.config
        return epoch is not None and c.reg_cooldown_epochs > 0 and epoch >= c.epochs - c.reg_cooldown_epochs

    # ------------------------------------------------------------------ losses
    def __call__(self, model: LayersLike, epoch: float | None = None, *, stopped: bool = False
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted regularization loss and its terms.

        Args:
            model: The (possibly DDP-wrapped) model, or its SVD layers.
            epoch: Epoch for the lambda warm-up, cool-down and epsilon schedule (None: full weights, final
                epsilon, no cool-down).
            stopped: Compression has stopped (the trainer's `target_compression` was reached): lambda_comp is 0.

        Returns:
            ``(loss, terms)``: loss is a differentiable scalar; terms maps "orth", "sort", "comp",
            "structure" (mu_orth L_orth + mu_sort L_sort) and "total_reg" for "dprp", or "reg" and
            "total_reg" for the ablations, to detached 0-dim tensors (``float(t)`` to read them).
        """
        layers = _as_layers(model)
        c = self.config
        w = self.weights_at(epoch, stopped=stopped)
        if not layers:
            zero = torch.zeros((), device=_device_of(model))  # on the model's device: no copy per training step
            keys = ("orth", "sort", "comp", "structure") if c.regularizer == "dprp" else ("reg",)
            return zero, {**{k: zero for k in keys}, "total_reg": zero}
        S, mask, r = _pad([lay.s for lay in layers])
        if c.regularizer == "dprp":
            # a term whose weight is 0 (schedules, frozen ranks) is still reported but builds no graph
            with torch.set_grad_enabled(torch.is_grad_enabled() and w["lambda_str"] > 0):
                orth = orthogonality_loss(layers)
                sort = _sorting_from_padded(S, mask).mean()
                structure = w["mu_orth"] * orth + w["mu_sort"] * sort
            with torch.set_grad_enabled(torch.is_grad_enabled() and w["lambda_comp"] > 0):
                tau = _tau_from_padded(S, mask, r, self.epsilon_at(epoch))
                comp = _average(_compression_from_padded(S, mask, r, tau, c.min_rank), self._layer_weights(layers))
            # a term with weight 0 (warm-up, cool-down, frozen ranks) is left out, so a NaN in it cannot reach the loss
            loss = sum((weight * term for weight, term in ((w["lambda_str"], structure), (w["lambda_comp"], comp))
                        if weight != 0), start=S.new_zeros(()))
            terms = {"orth": orth, "sort": sort, "comp": comp, "structure": structure}
        else:
            reg = _average(_ablation_from_padded(S, mask, r, c.regularizer, c.delta), self._layer_weights(layers))
            loss = w["lambda_comp"] * reg
            terms = {"reg": reg}
        if not loss.requires_grad and S.requires_grad:
            loss = loss + 0.0 * S.sum()  # stays a differentiable scalar, as documented (also for "none")
        terms["total_reg"] = loss
        return loss, {k: v.detach() for k, v in terms.items()}

    def keep_counts(self, model: nn.Module, epsilon: float | None = None) -> dict[str, int]:
        """tau_l of every SVD layer by qualified name (epsilon defaults to the config's)."""
        named = svd_layers(unwrap_model(model))
        if not named:
            return {}
        eps = self.config.epsilon if epsilon is None else epsilon
        tau = keep_counts([m.s for _, m in named], eps)
        return {name: int(t) for (name, _), t in zip(named, tau.tolist())}

    def __repr__(self) -> str:
        c = self.config
        return (f"DPRPRegularizer(regularizer={c.regularizer!r}, lambda_str={c.lambda_str}, mu_orth={c.mu_orth}, "
                f"mu_sort={c.mu_sort}, lambda_comp={c.lambda_comp}, epsilon={c.epsilon})")
