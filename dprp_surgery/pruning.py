"""Dynamic rank pruning of Sec. III-D: truncate every SVD layer to tau_l and slice the optimizer state.

`RankPruner.step` computes tau_l for every layer with the same function as the compression loss
(`losses.keep_counts`, no SVD), keeps ``max(tau_l, min_rank)`` leading components in place (a layer whose U, s
and V are all frozen keeps its rank)
(`SVDLayer.truncate_`: the Parameter objects stay the same, only their data shrinks) and narrows every
optimizer state tensor of U, s and V (SGD ``momentum_buffer``; Adam/AdamW ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``; any other per-parameter tensor) to the kept components. Scalar states such as
Adam's ``step`` are left alone. Because the optimizer's param_groups keep the same Parameter objects,
learning-rate schedulers that hold the optimizer keep working.

Under torch.distributed the keep counts of rank 0 are broadcast (one int64 tensor), so every process
truncates identically; wrap the model in a new DistributedDataParallel afterwards when a shape changed.

Example:
    >>> pruner = RankPruner(config)                      # doctest: +SKIP
    >>> for epoch in range(config.epochs):               # doctest: +SKIP
    ...     train_one_epoch(model, optimizer)
    ...     changes = pruner.step(model, optimizer)      # {name: (old_rank, new_rank)}
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import DPRPConfig, as_config, require_module
from .layers import SVDLayer, reset_grad_accumulator
from .losses import check_epsilon, keep_counts, unwrap_model
from .surgery import svd_layers

__all__ = ["RankPruner", "match_ranks", "reset_grad_accumulator", "slice_optimizer_state"]

log = logging.getLogger(__name__)

# The pruned dimension of each factor: U (h x r) and V (w x r) along dim 1, s (r) along dim 0.
_FACTOR_DIMS = (("U", 1), ("s", 0), ("V", 1))


class RankPruner:
    """Truncate SVD layers to tau_l components and keep the optimizer consistent (Sec. III-D).

    Each layer keeps min(r_l, max(tau_l, min_rank)) components; a layer whose U, s and V are all frozen
    (``requires_grad=False``) keeps its rank, since it could not adapt to a cut.

    Args:
        config: Takes `epsilon` and `min_rank` from a DPRPConfig.
        epsilon: Pruning threshold epsilon (overrides the config's).
        min_rank: No layer is truncated below this rank (overrides the config's).
    """

    def __init__(self, config: DPRPConfig | None = None, *, epsilon: float | None = None,
                 min_rank: int | None = None) -> None:
        config = as_config(config, "RankPruner()")
        self.epsilon = check_epsilon(config.epsilon if epsilon is None else epsilon, "RankPruner")
        value = config.min_rank if min_rank is None else min_rank
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"RankPruner min_rank={value!r} must be an int >= 1 (no layer is pruned below it)")
        self.min_rank = value

    def keep_counts(self, model: nn.Module, epsilon: float | None = None) -> dict[str, int]:
        """Components each layer would keep: min(r_l, max(tau_l, min_rank)), identical on every rank.

        A frozen layer (U, s and V all with ``requires_grad=False``) keeps its rank: it could not adapt to a cut.
        """
        named = _layers_of(model, "keep_counts")
        if not named:
            return {}
        eps = self.epsilon if epsilon is None else check_epsilon(epsilon, "RankPruner.keep_counts")
        keep = self._decide(named, eps)
        return {name: int(k) for (name, _), k in zip(named, keep.tolist())}

    def _decide(self, named: list[tuple[str, SVDLayer]], epsilon: float) -> Tensor:
        """Keep counts (L,) int64 on the CPU; broadcast from rank 0 when torch.distributed is running."""
        layers = [m for _, m in named]
        if not bool(torch.isfinite(torch.cat([m.s.detach() for m in layers])).all()):  # one check for all layers
            # tau of NaN/inf values would cut the finite components and keep the others
            name, layer = next((n, m) for n, m in named if not bool(torch.isfinite(m.s.detach()).all()))
            raise ValueError(f"cannot prune layer {name!r}: its singular values s are not finite "
                             f"({layer.s.detach().flatten()[:4].tolist()} ...); training diverged. Nothing was "
                             "pruned: lower the learning rate (or sigma_lr_scale) and resume from a checkpoint "
                             "taken before the divergence")
        tau = keep_counts([m.s for m in layers], epsilon)
        ranks = torch.tensor([m.rank for m in layers], dtype=torch.int64, device=tau.device)
        keep = torch.minimum(ranks, tau.clamp_min(self.min_rank))
        frozen = [i for i, m in enumerate(layers) if not any(p.requires_grad for p in (m.U, m.s, m.V))]
        if frozen:  # a frozen layer cannot re-learn after a cut: its rank is the user's, not the pruner's
            keep[frozen] = ranks[frozen]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            keep = keep.to(device)
            dist.broadcast(keep, src=0)
        return keep.cpu()

    @torch.no_grad()
    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             epsilon: float | None = None) -> dict[str, tuple[int, int]]:
        """Prune every SVD layer of `model` to its keep count and slice `optimizer`'s state alike.

        Call it between optimizer steps (e.g. after ``optimizer.step()``), never between a forward pass and
        its ``backward()``: a graph built before pruning still holds the old shapes.

        Args:
            model: The model (DDP-wrapped or not; the wrapper must be rebuilt when shapes change).
            optimizer: Optimizer over the model's parameters whose per-parameter state is narrowed.
            epsilon: Threshold for this call (e.g. from `DPRPRegularizer.epsilon_at`); default the pruner's.

        Returns:
            ``{layer name: (old_rank, new_rank)}`` for every layer whose rank changed.

        Raises:
            ValueError: An optimizer state tensor of a pruned parameter cannot be sliced (its shape does
                not match the parameter's), or the optimizer keeps flat state over all parameters (LBFGS);
                nothing is modified in that case.
        """
        named = _layers_of(model, "step")
        if not named:
            return {}
        eps = self.epsilon if epsilon is None else check_epsilon(epsilon, "RankPruner.step")
        keep = self._decide(named, eps)
        todo = [(name, layer, int(k)) for (name, layer), k in zip(named, keep.tolist()) if int(k) < layer.rank]
        if optimizer is not None and todo:  # check everything first so that a failure leaves model and state intact
            _check_optimizer(optimizer, todo[0][0])
            _warn_if_not_optimized(optimizer, todo)
            for name, layer, _ in todo:
                _check_state(optimizer, name, layer)
        changes: dict[str, tuple[int, int]] = {}
        for name, layer, k in todo:  # under inference mode (a validation hook) trainable data stays trainable
            old = layer.rank
            layer.truncate_(k)
            if optimizer is not None:
                for attr, dim in _FACTOR_DIMS:
                    slice_optimizer_state(optimizer, getattr(layer, attr), dim, old, k)
            changes[name] = (old, k)
        if changes:
            log.info("rank pruning: %s", ", ".join(f"{n} {a}->{b}" for n, (a, b) in changes.items()))
        return changes

    def __repr__(self) -> str:
        return f"RankPruner(epsilon={self.epsilon}, min_rank={self.min_rank})"


def match_ranks(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """Truncate every SVD layer of `model` to the rank it has in `state_dict`, so that the state dict loads.

    A freshly factorized model is at full rank, a state dict saved after pruning is not. In a training
    loop of your own, restore a checkpoint with ``match_ranks(model, ckpt["model"])``, then
    ``model.load_state_dict(ckpt["model"])``, then build (or load the state of) the optimizer.

    Args:
        model: A factorized model (see `factorize`).
        state_dict: A state dict of the same model after pruning (``U``/``s``/``V`` per layer).

    Returns:
        ``{layer: rank}`` of the layers truncated.

    Raises:
        ValueError: A layer whose stored rank is not between 1 and its current rank (or not 1-D).
    """
    require_module(model, "match_ranks()")
    changed: dict[str, int] = {}
    for name, layer in svd_layers(unwrap_model(model)):
        s = state_dict.get(f"{name}.s")
        if s is None:
            continue
        if s.ndim != 1 or not 1 <= s.shape[0] <= layer.rank:
            raise ValueError(f"match_ranks(): layer {name!r} has {tuple(s.shape)} singular values in the state dict, "
                             f"but rank {layer.rank} in the model; is the state dict of another model?")
        if s.shape[0] < layer.rank:
            layer.truncate_(int(s.shape[0]))
            changed[name] = int(s.shape[0])
    return changed


def _layers_of(model: object, where: str) -> list[tuple[str, SVDLayer]]:
    """The SVD layers of `model`; a TypeError for a non-module, a warning when it has none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"RankPruner.{where} takes the factorized nn.Module, got {type(model).__name__}")
    named = svd_layers(unwrap_model(model))
    if not named:
        warnings.warn(f"RankPruner.{where}: {type(unwrap_model(model)).__name__} has no SVD layers, so nothing is "
                      "pruned; prune the model factorize() returned, not the original", UserWarning, stacklevel=3)
    return named


def _warn_if_not_optimized(optimizer: torch.optim.Optimizer, todo: list[tuple[str, SVDLayer, int]]) -> None:
    """Warn when the optimizer holds none of the factors about to be pruned (it trains another model)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(getattr(layer, attr)) in held for _, layer, _ in todo for attr, _ in _FACTOR_DIMS):
        warnings.warn(f"RankPruner.step: {type(optimizer).__name__} holds none of the factors (U, s, V) of the "
                      f"layers being pruned ({todo[0][0]!r} ...): it was built before factorize() or over another "
                      "model, so these factors are not trained; build the optimizer from the factorized model's "
                      "parameters", UserWarning, stacklevel=3)


def _sliceable(value: Tensor, dim: int, old_rank: int, shape: tuple[int, ...]) -> bool:
    """True for a state tensor laid out like the parameter: the parameter's shape, the old rank along the
    pruned dimension (other dimensions may also be 1, for broadcast-shaped statistics)."""
    if value.ndim != len(shape) or value.shape[dim] != old_rank:
        return False
    return all(v in (n, 1) for i, (v, n) in enumerate(zip(value.shape, shape)) if i != dim)


# Optimizers whose state is one flat vector over all parameters (kept on the first), not per parameter.
_FLAT_STATE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.LBFGS,)


def _check_optimizer(optimizer: torch.optim.Optimizer, name: str) -> None:
    """Raise a ValueError for an optimizer whose state cannot follow a change of parameter shapes."""
    if isinstance(optimizer, _FLAT_STATE_OPTIMIZERS):
        raise ValueError(
            f"cannot prune layer {name!r}: {type(optimizer).__name__} keeps its state as flat vectors over all "
            "parameters, which no longer fit once a layer loses rank; use SGD/Adam/AdamW, or create a new "
            f"{type(optimizer).__name__} after every pruning step"
        )


def _check_state(optimizer: torch.optim.Optimizer, name: str, layer: SVDLayer) -> None:
    """Raise a ValueError if a per-parameter state tensor of the layer's factors cannot be sliced."""
    for attr, dim in _FACTOR_DIMS:
        p = getattr(layer, attr)
        for key, value in optimizer.state.get(p, {}).items():
            if not isinstance(value, Tensor) or value.ndim == 0:
                continue
            if not _sliceable(value, dim, layer.rank, tuple(p.shape)):
                raise ValueError(
                    f"cannot prune layer {name!r}: {type(optimizer).__name__} state {key!r} of parameter "
                    f"'{name}.{attr}' has shape {tuple(value.shape)}, which does not match the parameter's "
                    f"shape {tuple(p.shape)} along the pruned dimension {dim}; this optimizer's state cannot be "
                    "sliced to the kept components (use SGD/Adam/AdamW, or prune before creating the optimizer)"
                )


def slice_optimizer_state(optimizer: torch.optim.Optimizer, param: Tensor, dim: int, old_rank: int,
                          keep: int) -> None:
    """Narrow every per-parameter state tensor of `param` to its first `keep` entries along `dim`.

    Tensors shaped like the parameter before pruning (size `old_rank` along `dim`) are narrowed and
    cloned; 0-dim tensors (Adam's step) and non-tensors are left alone. Call it after truncating `param`.

    Raises:
        ValueError: A state tensor is not shaped like the parameter.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    for key, value in list(state.items()):
        if isinstance(value, Tensor) and value.ndim > 0:
            shape = list(param.shape)
            shape[dim] = old_rank
            if not _sliceable(value, dim, old_rank, tuple(shape)):
                raise ValueError(f"{type(optimizer).__name__} state {key!r} has shape {tuple(value.shape)}, which "
                                 f"does not match the parameter's shape {tuple(shape)} along dimension {dim}")
            with torch.inference_mode(value.is_inference()):  # an ordinary state tensor stays one (see truncate_)
                state[key] = value.narrow(dim, 0, keep).clone()
