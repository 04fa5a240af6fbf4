"""Training of a factorized model with the DPRP losses and dynamic rank pruning (Sec. III-C/D, IV-B).

`DPRPTrainer` runs the paper's recipe: L_total = cross-entropy + the `DPRPRegularizer` terms (eq. (8)),
SGD with momentum 0.9, weight decay 1e-4, lr 0.1 and ReduceLROnPlateau (factor 0.1, patience 10) on the
epoch's mean classification loss (Sec. IV-B), and rank pruning by `RankPruner` every `prune_every` epochs
(or steps). For a pretrained model use `DPRPConfig.preset("tuned")`: the `finetune` recipe (10 epochs,
lr 0.01, cosine schedule, batch 128) with the factors at 1/20 of the lr (without which a pretrained model loses
about 20 points in two epochs; docs/benchmarks.md, learnt 1), singular values at 10x, lambda_comp 2, pruning every
25 steps and a last epoch without L_comp or pruning. `compress` composes `factorize` and the trainer.

Runs are resumable: every epoch writes ``run_dir/checkpoint.pt`` atomically (model, ranks, optimizer,
scheduler, GradScaler, RNG states, history, config) and appends a line to ``run_dir/history.jsonl``;
``resume=True`` continues at the next epoch, with the same numbers as an uninterrupted run. A fresh run
refuses a run_dir that already holds checkpoint.pt or history.jsonl (resume it, or use another folder).

Distributed (torchrun / DistributedDataParallel): when ``torch.distributed`` is initialised the model
is wrapped in DDP (a new wrapper after every pruning that changes a shape); a DataLoader gets a
DistributedSampler (its batch size is per process); a TensorLoader or TensorImageDataset is iterated
identically on every process, each taking its contiguous share of every global batch (so
``batch_size`` is the global batch, as in a single process). Only rank 0 writes files and shows
progress; pruning decisions are broadcast from rank 0.

Example:
    >>> result = compress(resnet20(), DPRPConfig.preset("tuned"), train, test, run_dir="runs/r20")  # doctest: +SKIP
    >>> result.summary.to_table()                                                                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler

from ._files import atomic_write, write_text_atomic
from .accounting import Summary, count_params, dense_param_count, error_cause, summarize
from .config import DPRPConfig, as_config, require_initialized, require_module
from .data import TensorImageDataset, TensorLoader
from .losses import DPRPRegularizer, distillation_loss, unwrap_model
from .pruning import RankPruner
from .surgery import factorize, svd_layers

try:  # numpy is a dependency, but keep the trainer usable without it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = [
    "CHECKPOINT_NAME",
    "HISTORY_NAME",
    "run_files",
    "CompressionResult",
    "DPRPTrainer",
    "History",
    "NonFiniteLossError",
    "build_optimizer",
    "cap_factor_steps",
    "build_scheduler",
    "compress",
    "seed_everything",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.jsonl"
_CHECKPOINT_FORMAT = "dprp_surgery.trainer.checkpoint"


def run_files(run_dir: str | os.PathLike[str]) -> list[str]:
    """Names of the training files (checkpoint.pt, history.jsonl) already in `run_dir`.

    A fresh `DPRPTrainer` refuses a run_dir where this is not empty (resume it, or use another folder).
    """
    return [name for name in (CHECKPOINT_NAME, HISTORY_NAME) if (Path(run_dir) / name).exists()]
_CHECKPOINT_VERSION = 1
_LOSS_TERMS = ("app", "kd", "orth", "sort", "comp", "reg")


# ----------------------------------------------------------------------------- results and errors
class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite during training.

    Attributes:
        term: The first non-finite term ("app", "kd", "orth", "sort", "comp" or "reg").
        epoch: Epoch (0-based) in which it happened.
        step: Batch index (0-based) inside that epoch.
        values: Every term's value at that step.
    """

    def __init__(self, term: str, epoch: int, step: int, values: dict[str, float]) -> None:
        self.term, self.epoch, self.step, self.values = term, epoch, step, values
        detail = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        super().__init__(
            f"non-finite loss term {term!r} at epoch {epoch}, step {step} ({detail}); training stopped and the "
            "last good checkpoint was left untouched. Lower the learning rate or the loss weights, or check the "
            "data for NaN/Inf."
        )

    def __reduce__(self):
        return type(self), (self.term, self.epoch, self.step, self.values)


class History(list):
    """Per-epoch records of a run (a list of dicts, as written to history.jsonl)."""

    def column(self, key: str) -> list[Any]:
        """The value of `key` in every epoch (None where absent)."""
        return [rec.get(key) for rec in self]

    @property
    def last(self) -> dict[str, Any] | None:
        """The latest epoch's record."""
        return self[-1] if self else None


@dataclass
class CompressionResult:
    """What `compress` returns.

    Attributes:
        model: The trained, rank-pruned factorized model, in eval mode.
        history: One dict per epoch (see `DPRPTrainer` for the fields).
        summary: Parameters and MACs of the final model (`accounting.Summary`).
        run_dir: The run folder (checkpoint.pt, history.jsonl), or None.
    """

    model: nn.Module
    history: History
    summary: Summary | None
    run_dir: Path | None


# ----------------------------------------------------------------------------- small helpers
def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's `random` and numpy (when installed)."""
    torch.manual_seed(seed)
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)


def _dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _resolve_device(config: DPRPConfig) -> torch.device:
    """config.device resolved: "auto" is CUDA when available; under torchrun the process's LOCAL_RANK GPU."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"DPRPConfig.device={config.device!r} but torch.cuda.is_available() is false (no GPU, "
                             "no driver, or a CPU build of torch); use device='cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"DPRPConfig.device={config.device!r} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); use 'cuda:0' .. "
                             f"'cuda:{torch.cuda.device_count() - 1}', or 'auto'")
        if device.index is None:
            index = int(os.environ.get("LOCAL_RANK", 0)) if _dist_info()[1] > 1 else torch.cuda.current_device()
            device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device


def _epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the data order of one epoch."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 12345) % (2**63 - 1)


def _rng_state() -> dict[str, Any]:
    """RNG states of torch, CUDA, Python and numpy as tensors and plain Python values."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss], "cuda": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if np is not None and state.get("numpy") is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _checkpoint_misfit(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any],
                       ranks: dict[str, int]) -> str | None:
    """Why a checkpoint's model and optimizer state would not load into `model` at `ranks` (None if they fit)."""
    saved = ckpt.get("model")
    if not isinstance(saved, dict):
        return "it has no model state"
    current = model.state_dict()
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or unexpected:
        return f"missing keys {missing[:3] or '-'}, unexpected keys {unexpected[:3] or '-'}"
    rank_of = {id(model.get_submodule(name)): r for name, r in ranks.items()}
    factor_dims = {f"{alias}.{attr}": (rank_of[id(m)], dim)  # every alias of a shared layer
                   for alias, m in model.named_modules(remove_duplicate=False) if id(m) in rank_of
                   for attr, dim in (("U", 1), ("s", 0), ("V", 1))}
    for key, value in saved.items():
        if not isinstance(value, Tensor):
            return f"entry {key!r} is not a tensor"
        expected = list(current[key].shape)
        if key in factor_dims and len(expected) > factor_dims[key][1]:
            r, dim = factor_dims[key]
            expected[dim] = r
        if list(value.shape) != expected:
            return f"{key!r} has shape {tuple(value.shape)}, the model needs {tuple(expected)}"
    groups = ckpt.get("optimizer", {}).get("param_groups") if isinstance(ckpt.get("optimizer"), dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return (f"its optimizer has {len(groups) if isinstance(groups, list) else 'no'} parameter groups, this one "
                f"{len(optimizer.param_groups)}")
    for i, (old, new) in enumerate(zip(groups, optimizer.param_groups)):
        if len(old.get("params", ())) != len(new["params"]):
            return (f"optimizer parameter group {i} holds {len(old.get('params', ()))} parameters in the checkpoint "
                    f"and {len(new['params'])} here")
    return None


def _unreadable_checkpoint(path: Path, exc: BaseException) -> str:
    """The message for a checkpoint torch.load(weights_only=True) refused: pickled objects, or corrupt bytes."""
    text = str(exc)
    restart = ("start the run afresh without resuming (CLI: without --resume, or in another --out), or resume "
               "from a checkpoint DPRPTrainer.save_checkpoint wrote")
    if "Unsupported global" in text or "not an allowed global" in text:
        return (f"checkpoint {str(path)!r} holds pickled Python objects, not only tensors, so it was not written by "
                "DPRPTrainer.save_checkpoint (or was altered); it is not loaded, because unpickling it would run "
                f"code from the file. Delete or move it and {restart}.")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = lines[0] if lines else type(exc).__name__
    for i, line in enumerate(lines):  # torch's header is advice for trusted pickles; the cause follows this tag
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            cause = rest or (lines[i + 1] if i + 1 < len(lines) else cause)
            break
    first = cause.split(". ", 1)[0].rstrip(".")[:200]
    return (f"checkpoint {str(path)!r} is corrupt or truncated, or not a torch checkpoint ({type(exc).__name__}: "
            f"{first}); {restart}.")


def _merge_pruned(pruned: dict[str, tuple[int, int]], changes: dict[str, tuple[int, int]]) -> None:
    """Add a pruning pass to `pruned`: per layer (rank before its first pass, rank after its last)."""
    for name, (old, new) in changes.items():
        pruned[name] = (pruned[name][0] if name in pruned else old, new)


def _labelled(target: Tensor) -> Tensor:
    """Samples with a label (not the ignored -100), as a 0-dim device tensor (no host sync)."""
    return (target != -100).sum().to(torch.float64)


def _topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == target[:, None]
    return [hit[:, : min(k, kmax)].any(1).sum() for k in ks]


_INPUT_KEYS = ("input", "x", "inputs", "image", "images", "img", "pixel_values")
_TARGET_KEYS = ("target", "y", "targets", "label", "labels")


def _split_batch(batch: Any) -> tuple[Any, Tensor]:
    """(inputs, targets) of a batch given as a sequence (first two entries) or a dict with input/target keys."""
    if isinstance(batch, dict):
        x = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if x is None or y is None:
            keys = ", ".join(repr(k) for k in list(batch)[:8])
            raise ValueError(f"a batch dict needs an input entry (one of {', '.join(_INPUT_KEYS)}) and a target "
                             f"entry (one of {', '.join(_TARGET_KEYS)}); this one has {keys}. Rename the keys, or "
                             "make the loader yield (inputs, targets) pairs")
        return x, y
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError(f"a batch must be (inputs, targets), got a {type(batch).__name__} of {len(batch)} "
                             "entry: the data has no labels; DPRP training needs class labels")
        if len(batch) > 2:
            warnings.warn(f"batches have {len(batch)} entries; DPRPTrainer takes the first two as (inputs, targets) "
                          "and ignores the rest (e.g. sample weights or indices)", UserWarning, stacklevel=3)
        return batch[0], batch[1]
    raise ValueError(f"a batch must be an (inputs, targets) pair or a dict with 'input' and 'target', got "
                     f"{type(batch).__name__}")


def _logits(out: Any) -> Tensor:
    """Logits from a model output (a tensor, the first element of a tuple, or a dict's "logits"/"out")."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        key = next((k for k in ("logits", "out") if k in out), None)
        if key is None:
            raise ValueError(f"the model returned a dict with keys {', '.join(map(repr, list(out)[:8]))}; DPRPTrainer "
                             "reads the logits from 'logits' or 'out': wrap the model so it returns the logits")
        out = out[key]
    return out


def _check_batch(x: Any, y: Any, where: str) -> None:
    """Raise a ValueError naming what is wrong with a batch's types before it reaches the model."""
    if not isinstance(y, Tensor):
        raise ValueError(f"the {where} targets are {type(y).__name__}, not a torch tensor; yield class indices as a "
                         "tensor (torch.as_tensor(labels)), e.g. with a torch DataLoader")
    if type(x).__module__ == "numpy":
        raise ValueError(f"the {where} inputs are a numpy {type(x).__name__}; convert them with torch.from_numpy, "
                         "or use a torch DataLoader")
    if isinstance(x, Tensor) and x.dtype == torch.uint8:
        raise ValueError(f"the {where} inputs are uint8 images; convert them to float and normalise them (x.float() / "
                         "255, then the model's mean and std), e.g. with dprp_surgery.data.TensorLoader")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        hint = " (one-hot labels: pass labels.argmax(1))" if y.ndim == 2 else ""
        raise ValueError(f"the {where} targets must be integer class indices, got dtype {y.dtype}{hint}; soft "
                         "labels are not supported")
    if y.ndim != 1:
        hint = "; squeeze the extra dimension (y.squeeze(1))" if y.ndim == 2 and y.shape[1] == 1 else ""
        raise ValueError(f"the {where} targets must hold one class index per sample, shape (N,), got shape "
                         f"{tuple(y.shape)}{hint}")


def _check_labels(y: Tensor, classes: int, where: str, at: str = "") -> None:
    """Raise a ValueError when labels fall outside the model's `classes` outputs (-100, ignored, is allowed)."""
    kept = y[y != -100]
    if kept.numel() == 0:
        return
    lo, hi = int(kept.min()), int(kept.max())
    if lo < 0 or hi >= classes:
        at = f" ({at})" if at else ""
        raise ValueError(f"the {where} labels run from {lo} to {hi}{at}, but the model has {classes} outputs: labels "
                         f"must be class indices in [0, {classes - 1}]. Give the model as many outputs as the data has "
                         "classes (dprp_surgery.io.set_num_classes(model, n); CLI --num-classes)")


def _cross_entropy(out: Tensor, y: Tensor, where: str, at: str, **kwargs: Any) -> Tensor:
    """F.cross_entropy; where torch raises on a label outside the outputs, the ValueError of `_check_labels`."""
    try:
        return F.cross_entropy(out, y, **kwargs)
    except (IndexError, RuntimeError):  # CPU: "Target 12 is out of bounds" (CUDA asserts on the device instead)
        if out.ndim == 2 and y.ndim == 1:
            _check_labels(y, out.shape[1], where, at)
        raise


# ----------------------------------------------------------------------------- data
class _RankShard:
    """Every process iterates the same global batches and keeps its contiguous share (DDP)."""

    def __init__(self, loader: Any, rank: int, world: int) -> None:
        self.loader, self.rank, self.world = loader, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.loader:
            x, y = _split_batch(batch)
            if y.shape[0] < self.world:  # identical on every process: skip it everywhere
                continue
            yield x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]


def _make_loader(data: Any, config: DPRPConfig, train: bool, device: torch.device) -> Any:
    """An iterable of (x, y) batches from a DataLoader, a TensorLoader, a Dataset or any iterable."""
    if data is None:
        return None
    rank, world = _dist_info()
    if isinstance(data, TensorImageDataset):
        data = TensorLoader(data, config.batch_size, shuffle=train, seed=config.seed, device=device)
    if isinstance(data, TensorLoader):
        return _RankShard(data, rank, world) if world > 1 else data
    if isinstance(data, DataLoader):
        if world == 1 or isinstance(data.sampler, DistributedSampler) or isinstance(data.dataset, IterableDataset):
            return data
        if type(data.batch_sampler) is not BatchSampler:
            raise ValueError("under torch.distributed a DataLoader with a custom batch_sampler cannot be sharded; "
                             "give it a DistributedSampler yourself")
        sampler = DistributedSampler(data.dataset, world, rank, shuffle=isinstance(data.sampler, RandomSampler),
                                     seed=config.seed, drop_last=data.drop_last)
        return DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers,
                          collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=data.drop_last,
                          worker_init_fn=data.worker_init_fn, persistent_workers=data.persistent_workers)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError(f"{'training' if train else 'validation'} data is empty: the {type(data).__name__} "
                             "has 0 samples; check the dataset's path or filter")
        if world > 1:
            sampler = DistributedSampler(data, world, rank, shuffle=train, seed=config.seed)
            return DataLoader(data, batch_size=max(1, config.batch_size // world), sampler=sampler)
        gen = torch.Generator().manual_seed(config.seed)
        return DataLoader(data, batch_size=config.batch_size, shuffle=train, generator=gen)
    if isinstance(data, Iterable):
        return data
    raise ValueError(f"training data must be a DataLoader, a TensorLoader, a Dataset or an iterable of (x, y) "
                     f"batches; got {type(data).__name__}")


def _set_epoch(loader: Any, epoch: int, seed: int) -> None:
    """Pin a loader's randomness to (seed, epoch) so that resumed runs see the same batches."""
    if loader is None:
        return
    if isinstance(loader, DataLoader):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        samplers = (loader.sampler, getattr(loader.batch_sampler, "sampler", None))
        generators = [loader.generator, *(getattr(sm, "generator", None) for sm in samplers)]
        for gen in {id(g): g for g in generators if isinstance(g, torch.Generator)}.values():  # a sampler's own too
            gen.manual_seed(_epoch_seed(seed, epoch))
    elif hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)


# ----------------------------------------------------------------------------- optimisation
def build_optimizer(model: nn.Module, config: DPRPConfig) -> torch.optim.Optimizer:
    """SGD (the paper: momentum 0.9, weight decay 1e-4) or AdamW over three parameter groups.

    Groups: "other" (every non-factor parameter, `weight_decay`), "factors" (U and V,
    `factor_weight_decay` or `weight_decay`, learning rate lr * `factor_lr_scale`) and "sigma" (s,
    `sigma_weight_decay` or `weight_decay`, learning rate lr * `sigma_lr_scale`). Empty groups are left out.
    """
    model = unwrap_model(model)
    factors, sigmas = [], []
    for _, layer in svd_layers(model):
        factors += [p for p in (layer.U, layer.V) if p.requires_grad]
        if layer.s.requires_grad:
            sigmas.append(layer.s)
    taken = {id(p) for p in factors + sigmas}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    wd = config.weight_decay
    fwd = wd if config.factor_weight_decay is None else config.factor_weight_decay
    swd = wd if config.sigma_weight_decay is None else config.sigma_weight_decay
    groups = []
    if others:
        groups.append({"params": others, "weight_decay": wd, "name": "other"})
    if factors:
        groups.append({"params": factors, "weight_decay": fwd, "lr": config.lr * config.factor_lr_scale,
                       "name": "factors"})
    if sigmas:
        groups.append({"params": sigmas, "weight_decay": swd, "lr": config.lr * config.sigma_lr_scale,
                       "name": "sigma"})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def cap_factor_steps(model: nn.Module) -> None:
    """Divide column j of every U and V gradient by max(s_j^2, 1) (``DPRPConfig.factor_step="capped"``).

    A plain SGD step on U moves the dense weight W = U diag(s) V^T by -lr G V diag(s^2) V^T (G the
    gradient of W), so component j moves s_j^2 times as far as under a dense step. After this call the
    factor is max(s_j^2, 1) smaller: min(s_j^2, 1), never faster than a dense step at the factors'
    learning rate (a scaled-gradient preconditioner in the spirit of ScaledGD, Tong, Ma & Chi 2021).
    Call it between ``backward()`` and ``optimizer.step()``; with a GradScaler the order with
    ``unscale_`` does not matter (both are multiplications). Layers whose U and V have no gradient are
    skipped. One multi-tensor op per stage for all layers, no loop of kernels per layer.

    Args:
        model: A model with SVD layers (a DDP wrapper is unwrapped).
    """
    layers = [layer for _, layer in svd_layers(unwrap_model(model))]
    grads, sigmas = [], []
    for layer in layers:
        for factor in (layer.U, layer.V):
            if factor.grad is not None:
                grads.append(factor.grad)
                sigmas.append(layer.s.detach())
    if not grads:
        return
    with torch.no_grad():
        scale = torch._foreach_mul(sigmas, sigmas)
        torch._foreach_clamp_min_(scale, 1.0)
        torch._foreach_reciprocal_(scale)
        torch._foreach_mul_(grads, scale)  # s and its factors' gradients share a dtype


def build_scheduler(optimizer: torch.optim.Optimizer, config: DPRPConfig):
    """ReduceLROnPlateau (factor, patience; stepped on the epoch's mean L_app), cosine (T_max = epochs,
    stepped per epoch) or None for "constant". The linear warm-up is applied by the trainer on top."""
    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=config.lr_factor,
                                                          patience=config.lr_patience)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return None


# ----------------------------------------------------------------------------- the trainer
class DPRPTrainer:
    """Train a factorized model with L_total of eq. (8) and prune ranks on the way (Sec. III-C/D, IV-B).

    Defaults (`DPRPConfig()`) reproduce Sec. IV-B: SGD, momentum 0.9, weight decay 1e-4, lr 0.1,
    ReduceLROnPlateau on the epoch's mean classification loss (factor 0.1, patience 10), lambda_str 1,
    mu_orth 1000, mu_sort 1, lambda_comp 0.1 and epsilon 0.1 (Table I), pruning every epoch.
    For pretrained models use `DPRPConfig.preset("tuned")` (the `finetune` recipe, 10 epochs, lr 0.01, cosine,
    with the factors at 1/20 of the lr, singular values at 10x, lambda_comp 2, pruning every 25 steps and a
    last epoch without L_comp or pruning).
    ``warmup_epochs`` = w ramps every lr linearly per step over the first w epochs; for training data without
    ``len()`` the number of steps is unknown, so the factor is one per epoch, (epoch + 0.5) / w (the step-wise
    ramp's mean over that epoch).

    Each epoch record (``history`` and ``run_dir/history.jsonl``) holds: ``epoch`` (0-based), ``step`` (global
    steps so far), the mean over the epoch's steps of ``loss`` (L_total) and of every regularizer term
    (``app``, ``orth``, ``sort``, ``comp``, ``structure``, ``total_reg``; ``reg`` for the ablations),
    ``train_top1``/``train_top5`` (percent), ``val_loss``/``val_top1``/``val_top5`` (with val_data), ``lr`` (of
    the first parameter group, warm-up included) and ``lrs`` (every group), ``epsilon``, ``lambda_str``,
    ``lambda_comp``, ``mu_orth``, ``mu_sort`` (in force at the epoch's last step), ``ranks`` and ``mean_rank``,
    ``pruned`` ({layer: [rank at the start of the epoch, rank at its end]} for the layers pruned in it),
    ``params``/``macs``/``dense_params``/``dense_macs``/``params_removed``/``macs_removed`` (from `summarize`
    with a batch of one), ``singular_values`` ({layer: list}, for the paper's Fig. 6), ``compression_stopped``
    (`target_compression` reached) and ``time`` (seconds).

    Args:
        model: A model with SVD layers (see `factorize`; DDP-wrapped models are unwrapped).
        config: Training, loss and pruning settings.
        train_data: DataLoader, TensorLoader, TensorImageDataset (-> shuffled TensorLoader of
            config.batch_size, ImageNet mean/std, no augmentation: pass your own
            ``TensorLoader(..., augment="cifar")`` for that) or any Dataset (-> seeded, shuffled DataLoader)
            of (image, label) pairs.
        val_data: Same kinds, evaluated after each epoch (after that epoch's pruning).
        run_dir: Folder for checkpoint.pt and history.jsonl (created); None keeps everything in memory. A
            fresh run (no checkpoint to resume) refuses a folder that already holds either file.
        resume: A checkpoint file, a run folder, or True for ``run_dir/checkpoint.pt`` (a fresh start when it
            does not exist yet): the model is truncated to the stored ranks, every state is restored and
            training continues at the next epoch. With ``lr_schedule="cosine"`` and a changed ``epochs`` the
            schedule is re-fitted to the new length: from the resumed epoch on, the lr is that of a cosine
            over the new number of epochs (it reaches its minimum at the new end).
        progress: Show rich progress bars (rank 0 only).
        example_inputs: Inputs for the parameter/MAC accounting; default a batch of one from the first batch.
        teacher: The dense model to distil from when ``config.distill > 0`` (a frozen copy is kept, cast to the
            student's dtype; it is not checkpointed, so pass it again on resume). `compress` passes the model it
            was given.

    With distillation ``app`` in the history is (1 - alpha) CE + alpha KD, and ``ce`` and ``kd`` hold the two parts.

    Raises:
        ValueError: A lazy layer not initialised yet, a corrupt or foreign checkpoint, a checkpoint of another
            optimizer or lr_schedule or with more finished epochs than ``config.epochs``, unusable data, a fresh
            run in a run_dir that already holds one, or ``distill > 0`` without a teacher.
    """

    def __init__(self, model: nn.Module, config: DPRPConfig | None, train_data: Any, val_data: Any = None, *,
                 run_dir: str | os.PathLike | None = None, resume: str | os.PathLike | bool | None = None,
                 progress: bool = True, example_inputs: Any = None, teacher: nn.Module | None = None) -> None:
        require_module(model, "DPRPTrainer()")
        require_initialized(model, "DPRPTrainer()")
        self.config = config = as_config(config, "DPRPTrainer()")
        self.rank, self.world = _dist_info()
        self.device = _resolve_device(config)
        seed_everything(config.seed + self.rank)
        self.model = unwrap_model(model).to(self.device)
        # the SVD layers, found once: pruning truncates them in place, so this list stays the model's
        self._svd_layers = [m for _, m in svd_layers(self.model)]
        if not self._svd_layers:
            log.warning("%s has no SVD layers: call factorize() first (compress() does); training it densely",
                        type(self.model).__name__)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None and self.rank == 0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise ValueError(f"run_dir {str(self.run_dir)!r} is a file, or lies under one, not a directory; "
                                 "choose another run_dir (a new or existing directory)") from None
        self.progress = bool(progress) and self.rank == 0
        self.example_inputs = example_inputs
        self.regularizer = DPRPRegularizer(config)
        self.pruner = RankPruner(config)
        self.teacher = self._frozen_teacher(teacher)
        self.dense_params = dense_param_count(self.model)
        self.compression_stopped = False
        if train_data is None:
            raise ValueError("DPRPTrainer needs train_data (a DataLoader, a TensorLoader or a Dataset)")
        self.train_loader = _make_loader(train_data, config, True, self.device)
        self.val_loader = _make_loader(val_data, config, False, self.device)
        for which, loader in (("training", self.train_loader), ("validation", self.val_loader)):
            self._check_has_batches(loader, which)  # before an epoch is spent training
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.use_amp = bool(config.amp) and self.device.type == "cuda"
        if config.amp and not self.use_amp:
            log.warning("amp=True needs CUDA; training in float32 on %s", self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.history = History()
        self.start_epoch = 0
        self.global_step = 0
        self.last_summary: Summary | None = None
        self._example: Any = example_inputs
        self._warm = 1.0
        self._steps_per_epoch: int | None = None
        path = self._resume_path(resume)
        if path is not None:
            self._check_resume_target(path)
            self.load_checkpoint(path)
        else:
            self._check_fresh_run_dir(resume)
        self._net = self._wrap()

    # ------------------------------------------------------------------ public API
    @property
    def checkpoint_path(self) -> Path | None:
        """run_dir/checkpoint.pt, or None without a run_dir."""
        return self.run_dir / CHECKPOINT_NAME if self.run_dir is not None else None

    def fit(self) -> History:
        """Train from `start_epoch` to `config.epochs`; returns the history (also in ``self.history``).

        Raises:
            NonFiniteLossError: A loss term became NaN/Inf (the last checkpoint is left untouched).
            ValueError: The training data yielded no batches in an epoch (nothing is recorded or saved for it).
        """
        with self._progress_bars() as bars:
            self._bars = bars
            for epoch in range(self.start_epoch, self.config.epochs):
                record = self._run_epoch(epoch)
                self.history.append(record)
                if self.rank == 0 and self.run_dir is not None:
                    self.save_checkpoint(epoch)
                    self._append_history(record)
                self.start_epoch = epoch + 1
                if bars is not None:
                    bars.update(self._epoch_task, completed=epoch + 1)
                log.info("epoch %d: loss %.4f, top-1 %.2f%%, mean rank %.2f, params %d", epoch, record["loss"],
                         record["train_top1"], record["mean_rank"], record["params"])
        self._bars = None
        return self.history

    def evaluate(self, data: Any = None) -> dict[str, float]:
        """Mean cross-entropy and top-1/top-5 (percent) on `data` (default: the validation data).

        Raises:
            ValueError: No data, or data that yields no batches.
        """
        loader = self.val_loader if data is None else _make_loader(data, self.config, False, self.device)
        if loader is None:
            raise ValueError("evaluate() needs data: pass it, or give the trainer val_data")
        model = self.model
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top1, top5, labelled samples
        count, n_batches = 0, 0  # samples and batches, counted on the host: no host-to-device copy per batch
        _set_epoch(loader, 0, self.config.seed)
        with torch.no_grad():
            for batch in loader:
                x, y = self._to_device(batch, "validation")
                with self._autocast():
                    out = self._logits_of(model, x, y, "validation").float()
                c1, c5 = _topk_correct(out, y)
                loss = _cross_entropy(out, y, "validation", f"batch {n_batches}", reduction="sum")
                sums += torch.stack([loss, c1, c5, _labelled(y)]).to(sums)
                count += y.shape[0]
                n_batches += 1
        model.train(was_training)
        loss, top1, top5, labelled, n = self._reduce_totals(sums, count)
        if n == 0:
            raise ValueError(f"validation data yielded no batches: {self._describe_empty(loader)}")
        n = max(labelled, 1.0)  # samples labelled -100 are ignored, as by the loss
        return {"val_loss": loss / n, "val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n}

    def summary(self) -> Summary:
        """`summarize` of the model now, on a batch of one."""
        self.last_summary = summarize(self.model, self._example_inputs())
        return self.last_summary

    # ------------------------------------------------------------------ one epoch
    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        c = self.config
        eps = self.regularizer.epsilon_at(epoch)
        stats = self._train_epoch(epoch)
        # the loss weights of the epoch's last step (a target met mid-epoch by step pruning stopped L_comp there)
        weights = self.regularizer.weights_at(epoch, stopped=self.compression_stopped)
        pruned: dict[str, tuple[int, int]] = dict(stats.pop("_pruned"))
        since = epoch - c.prune_start_epoch
        if c.prune_unit == "epoch" and since >= 0 and since % c.prune_every == 0 and not self._frozen(epoch):
            _merge_pruned(pruned, self._prune(eps))
        self._sync_buffers()
        record: dict[str, Any] = {"epoch": epoch, "step": self.global_step, **stats}
        if self.val_loader is not None:
            record.update(self.evaluate())
        # the learning rates used in this epoch's last step (before the scheduler moves them on)
        lrs = {g.get("name", str(i)): g["lr"] * self._warm for i, g in enumerate(self.optimizer.param_groups)}
        lr = self.optimizer.param_groups[0]["lr"] * self._warm
        self._step_scheduler(epoch, stats.get("ce", stats["app"]))
        summ = self.summary()
        layers = svd_layers(self.model)
        record.update(
            lr=lr, lrs=lrs, epsilon=eps, **weights,
            ranks={n: m.rank for n, m in layers},
            mean_rank=summ.mean_rank,
            pruned={n: [a, b] for n, (a, b) in pruned.items()},
            params=summ.params, macs=summ.macs, dense_params=summ.dense_params, dense_macs=summ.dense_macs,
            params_removed=summ.params_removed, macs_removed=summ.macs_removed,
            singular_values={n: m.s.detach().float().cpu().tolist() for n, m in layers},
            compression_stopped=self.compression_stopped,
        )
        record["time"] = time.perf_counter() - t0
        return record

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        c = self.config
        loader = self.train_loader
        _set_epoch(loader, epoch, c.seed)
        try:
            n_steps = len(loader)
        except TypeError:
            n_steps = None
        self._steps_per_epoch = n_steps
        self.model.train()
        keys = ("loss", "app", "orth", "sort", "comp", "structure", "total_reg") if c.regularizer == "dprp" else (
            "loss", "app", "reg", "total_reg")
        if self.teacher is not None:
            keys = (*keys[:2], "ce", "kd", *keys[2:])
        sums = torch.zeros(len(keys) + 3, dtype=torch.float64, device=self.device)  # + top1, top5, labelled
        count, n_done = 0, 0  # samples and steps, counted on the host: no host-to-device copy per step
        pruned: dict[str, tuple[int, int]] = {}
        bars = getattr(self, "_bars", None)
        if bars is not None:
            bars.reset(self._batch_task, total=n_steps, description=f"epoch {epoch}")
        last_update = 0.0
        for i, batch in enumerate(loader):
            x, y = self._to_device(batch)
            if self._example is None:
                self._example = x[:1].detach().clone()
            with self._autocast():
                out = self._logits_of(self._net, x, y, "training")
            app = _cross_entropy(out.float(), y, "training", f"batch {i} of epoch {epoch}",
                                 label_smoothing=c.label_smoothing)
            parts: dict[str, Tensor] = {}
            if self.teacher is not None:
                with torch.no_grad(), self._autocast():
                    target = _logits(self.teacher(x))
                kd = distillation_loss(out, target, c.distill_temperature)
                parts = {"ce": app.detach(), "kd": kd.detach()}
                app = (1.0 - c.distill) * app + c.distill * kd
            reg, terms = self.regularizer(self._svd_layers or self.model, epoch=epoch, stopped=self.compression_stopped)
            loss = app + reg.to(app.device)
            values = {"loss": loss.detach(), "app": app.detach(), **parts, **terms}
            self._check_finite(values, epoch, i)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self._warm = self._warmup_factor(epoch, i, n_steps)
            self._scaled_step()
            self.global_step += 1
            with torch.no_grad():
                c1, c5 = _topk_correct(out.detach().float(), y)
                sums += torch.stack([*(values[k].to(self.device, torch.float64) for k in keys), c1.double(),
                                     c5.double(), _labelled(y)]).to(sums)
            count += y.shape[0]
            n_done += 1
            if (c.prune_unit == "step" and epoch >= c.prune_start_epoch and self.global_step % c.prune_every == 0
                    and not self._frozen(epoch)):
                _merge_pruned(pruned, self._prune(self.regularizer.epsilon_at(epoch)))
            if bars is not None:
                now = time.perf_counter()
                if now - last_update > 0.25 or (n_steps is not None and i + 1 == n_steps):
                    last_update = now
                    bars.update(self._batch_task, completed=i + 1,
                                info=self._batch_info(keys, sums, count, n_done))
        *totals, count, n_done = self._reduce_totals(sums, count, n_done)
        if n_done == 0:  # before any scheduler step, history record or checkpoint
            raise ValueError(f"training data yielded no batches in epoch {epoch}: {self._describe_empty(loader)}")
        steps, count = max(n_done, 1.0), max(totals[len(keys) + 2], 1.0)  # accuracy over the labelled samples
        stats: dict[str, Any] = {k: totals[j] / steps for j, k in enumerate(keys)}
        stats["train_top1"] = 100.0 * totals[len(keys)] / count
        stats["train_top5"] = 100.0 * totals[len(keys) + 1] / count
        stats["_pruned"] = pruned
        return stats

    # ------------------------------------------------------------------ pieces of a step
    def _frozen_teacher(self, teacher: nn.Module | None) -> nn.Module | None:
        """A frozen eval-mode copy of the distillation teacher on the training device (None without distillation)."""
        if self.config.distill == 0:
            return None
        if teacher is None:
            raise ValueError(f"DPRPConfig.distill={self.config.distill} needs a teacher model: pass "
                             "DPRPTrainer(..., teacher=dense_model), or use compress(), which distils from the model "
                             "it was given; or set distill=0")
        frozen = copy.deepcopy(unwrap_model(teacher)).to(self.device).eval()
        student = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        theirs = next((p.dtype for p in frozen.parameters() if p.is_floating_point()), None)
        if student is not None and theirs is not None and theirs != student:  # it is fed the student's inputs
            log.info("distillation teacher cast from %s to the student's %s", theirs, student)
            frozen.to(student)
        return frozen.requires_grad_(False)

    def _logits_of(self, net: nn.Module, x: Any, y: Tensor, where: str) -> Tensor:
        """net's logits on x; on the first batch of `where` (training, validation) also checked against y."""
        checked = self.__dict__.setdefault("_checked_batches", set())
        if where in checked:
            return _logits(net(x))
        try:
            out = _logits(net(x))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            shape = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            cause = error_cause(exc)
            raise ValueError(f"the model cannot take the first {where} batch (inputs of {shape}): {cause}. Check "
                             "that the data's channels and image size are the ones the model was built for") from exc
        if isinstance(out, Tensor) and out.ndim == 2:
            _check_labels(y, out.shape[1], where)  # one device read, on the first batch only
        checked.add(where)
        return out

    def _to_device(self, batch: Any, where: str = "training") -> tuple[Any, Tensor]:
        x, y = _split_batch(batch)
        _check_batch(x, y, where)
        nb = self.device.type == "cuda"
        x = x.to(self.device, non_blocking=nb) if isinstance(x, Tensor) else x
        return x, y.to(self.device, non_blocking=nb)

    def _autocast(self):
        if self.use_amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _check_finite(self, values: dict[str, Tensor], epoch: int, step: int) -> None:
        """Raise NonFiniteLossError naming the first non-finite term (checked on every process)."""
        names = [k for k in _LOSS_TERMS if k in values]
        vec = torch.stack([values[k].to(self.device, torch.float32) for k in names])
        vec = self._all_reduce(vec.clone())  # a NaN anywhere makes the sum NaN on every process
        finite = torch.isfinite(vec)
        if bool(finite.all()):
            return
        bad = next(k for k, ok in zip(names, finite.tolist()) if not ok)
        raise NonFiniteLossError(bad, epoch, step, dict(zip(names, vec.tolist())))

    def _warmup_factor(self, epoch: int, step: int, n_steps: int | None) -> float:
        """Warm-up over `warmup_epochs` epochs: (global step + 1) / warm-up steps; (epoch + 0.5) / w without len()."""
        w = self.config.warmup_epochs
        if w == 0 or epoch >= w:
            return 1.0
        if not n_steps:  # unknown epoch length: one factor per epoch, the step-wise ramp's mean over that epoch
            return (epoch + 0.5) / w
        return min(1.0, (epoch * n_steps + step + 1) / (w * n_steps))

    def _scaled_step(self) -> None:
        """optimizer.step through the GradScaler, with the warm-up factor applied to every group's lr."""
        if self.config.factor_step == "capped":
            cap_factor_steps(self.model)
        if self._warm == 1.0:
            self.scaler.step(self.optimizer)
        else:
            saved = [g["lr"] for g in self.optimizer.param_groups]
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * self._warm
            try:
                self.scaler.step(self.optimizer)
            finally:
                for g, lr in zip(self.optimizer.param_groups, saved):
                    g["lr"] = lr
        self.scaler.update()

    def _step_scheduler(self, epoch: int, app_loss: float) -> None:
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if epoch >= self.config.warmup_epochs:
                self.scheduler.step(app_loss)
        else:
            self.scheduler.step()

    def _frozen(self, epoch: int) -> bool:
        """No pruning and no L_comp: the cool-down epochs, or `target_compression` reached."""
        return self.compression_stopped or self.regularizer.cooling_at(epoch)

    def compression_rate(self) -> float:
        """Fraction of the dense model's parameters removed now (U, s, V counted as eqs. (4)/(7))."""
        return 1.0 - count_params(self.model) / self.dense_params

    def _prune(self, epsilon: float) -> dict[str, tuple[int, int]]:
        if not svd_layers(self.model):  # warned once at construction; nothing to prune
            return {}
        changes = self.pruner.step(self.model, self.optimizer, epsilon=epsilon)
        if changes and self.world > 1:
            self._net = None  # drop the old reducer (and its autograd hooks) before wrapping again
            gc.collect()
            self._net = self._wrap()
        target = self.config.target_compression
        if changes and target is not None and self.compression_rate() >= target:
            self.compression_stopped = True  # ranks are identical on every process, so is this decision
            log.info("target_compression %.3g reached (%.1f%% of parameters removed at step %d): compression "
                     "stops, training continues at fixed ranks", target, 100 * self.compression_rate(),
                     self.global_step)
        return changes

    def _wrap(self) -> nn.Module:
        if self.world > 1:
            kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            return nn.parallel.DistributedDataParallel(self.model, **kwargs)
        return self.model

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _all_reduce(self, t: Tensor) -> Tensor:
        """Sum over processes (identity without torch.distributed)."""
        if self.world == 1:
            return t
        buf = t.to(self._comm_device())
        dist.all_reduce(buf)
        return buf.to(t.device)

    def _reduce_totals(self, sums: Tensor, *counts: float) -> list[float]:
        """`sums` followed by the host-side `counts`, summed over processes, as Python floats (once, at the end)."""
        if self.world == 1:
            return [*sums.tolist(), *(float(n) for n in counts)]
        vec = torch.cat([sums, torch.tensor(counts, dtype=sums.dtype).to(sums.device)])
        return self._all_reduce(vec).tolist()

    def _sync_buffers(self) -> None:
        """Copy rank 0's buffers (BatchNorm statistics) to every process, so all hold the same model."""
        if self.world == 1:
            return
        for b in self.model.buffers():
            buf = b.data.to(self._comm_device())
            dist.broadcast(buf, 0)
            b.data.copy_(buf)

    def _example_inputs(self) -> Any:
        """A batch of one for the accounting: example_inputs, else the first sample seen or of the data."""
        if self._example is None:
            val = self.val_loader is not None
            loader = self.val_loader if val else self.train_loader
            batch = next(iter(loader), None)
            if batch is None:
                raise ValueError(f"{'validation' if val else 'training'} data yielded no batches, so there is no "
                                 f"example input for the accounting: {self._describe_empty(loader)}")
            x, _ = self._to_device(batch)
            self._example = x[:1].detach().clone()
        return self._example

    def _check_has_batches(self, loader: Any, which: str) -> None:
        """Raise a ValueError for a loader whose len() says it yields no batches (unsized ones are seen later)."""
        if loader is None:
            return
        try:
            empty = len(loader) == 0
        except TypeError:  # an iterable without len(), e.g. over an IterableDataset
            return
        if empty:
            raise ValueError(f"{which} data yields no batches: {self._describe_empty(loader)}")

    def _describe_empty(self, loader: Any) -> str:
        """The likely causes of a loader that yields no batches, with what it knows of its size."""
        inner = getattr(loader, "loader", loader)  # _RankShard
        batch_size = getattr(inner, "batch_size", None)
        drop_last = getattr(inner, "drop_last", None)
        dataset = getattr(inner, "dataset", None)
        try:
            size = f"{len(dataset)} samples" if dataset is not None else None
        except TypeError:
            size = None
        known = ", ".join(f"{k}={v}" for k, v in (("batch_size", batch_size), ("drop_last", drop_last))
                          if v is not None)
        desc = type(inner).__name__ + (f" of {size}" if size else "") + (f" with {known}" if known else "")
        return (f"{desc}. The data is empty, or smaller than one batch with drop_last=True (set drop_last=False "
                "or lower the batch size), or an iterator that was already exhausted (pass a re-iterable loader, "
                "not a generator).")

    # ------------------------------------------------------------------ progress
    @contextlib.contextmanager
    def _progress_bars(self):
        if not self.progress:
            yield None
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # progress goes to stderr, so that stdout stays clean for tables and --json output
        bars = Progress(TextColumn("{task.description:>9}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True))
        self._epoch_task = bars.add_task("epochs", total=self.config.epochs, completed=self.start_epoch,
                                         info=self._model_info())
        self._batch_task = bars.add_task("epoch", total=None, info="")
        with bars:
            yield bars

    def _model_info(self) -> str:
        layers = svd_layers(self.model)
        params = sum(p.numel() for p in self.model.parameters())
        rank = sum(m.rank for _, m in layers) / len(layers) if layers else 0.0
        macs = f"{self.last_summary.macs / 1e6:.2f}M" if self.last_summary is not None else "-"
        return f"params (U, s, V) {params / 1e6:.3f}M MACs {macs} mean rank {rank:.2f}"  # the training form

    def _batch_info(self, keys: tuple[str, ...], sums: Tensor, count: int, n_done: int) -> str:
        """The running means of this process's epoch so far, for the progress bar."""
        vals = sums.tolist()
        steps, count = max(float(n_done), 1.0), max(vals[len(keys) + 2], 1.0)
        shown = [(j, k) for j, k in enumerate(keys) if k not in ("total_reg", "structure")]
        terms = " ".join(f"{k} {vals[j] / steps:.3g}" for j, k in shown)
        top1 = 100.0 * vals[len(keys)] / count
        if self._bars is not None:
            self._bars.update(self._epoch_task, info=self._model_info())
        return f"{terms} top-1 {top1:.1f}%"

    # ------------------------------------------------------------------ checkpoints
    def _resume_path(self, resume: Any) -> Path | None:
        if resume is None or resume is False:
            return None
        if resume is True:
            if self.run_dir is None:
                raise ValueError("resume=True needs a run_dir (it resumes from run_dir/checkpoint.pt)")
            path = self.run_dir / CHECKPOINT_NAME
            if not path.is_file():
                log.info("no checkpoint at %s yet: starting a fresh run", path)
                return None
            return path
        path = Path(resume)
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        if not path.is_file():
            raise ValueError(f"cannot resume: checkpoint {str(path)!r} does not exist")
        return path

    def _check_resume_target(self, path: Path) -> None:
        """Refuse to continue another folder's checkpoint in a run_dir that holds a run of its own."""
        if self.run_dir is None or path.resolve() == (self.run_dir / CHECKPOINT_NAME).resolve():
            return
        found = run_files(self.run_dir)
        if found:
            raise ValueError(f"resume={str(path)!r} is a checkpoint of another folder, but run_dir "
                             f"{str(self.run_dir)!r} already holds a run ({', '.join(found)}), which continuing "
                             "there would overwrite; choose an empty run_dir for the continued run, or resume=True "
                             "to continue the run in run_dir")

    def _check_fresh_run_dir(self, resume: Any) -> None:
        """Refuse a fresh start in a run_dir that already holds a run (its checkpoint or history)."""
        if self.run_dir is None:
            return
        found = run_files(self.run_dir)
        if not found:
            return
        where = str(self.run_dir)
        if resume is True:  # only history.jsonl is left: there is no checkpoint to continue from
            raise ValueError(f"run_dir {where!r} holds {HISTORY_NAME} but no {CHECKPOINT_NAME} to resume from, "
                             f"and a fresh run would append to that history; delete {where!r} (or its "
                             f"{HISTORY_NAME}) or choose another run_dir")
        raise ValueError(f"run_dir {where!r} already holds a run ({', '.join(found)}); pass resume=True to "
                         "continue it (CLI: --resume), or choose another run_dir or delete that one to start "
                         "afresh")

    def state_dict(self, epoch: int) -> dict[str, Any]:
        """Everything needed to continue after `epoch`, as tensors and plain Python values."""
        return {
            "format": _CHECKPOINT_FORMAT,
            "version": _CHECKPOINT_VERSION,
            "epoch": int(epoch),
            "global_step": int(self.global_step),
            "model": self.model.state_dict(),
            "ranks": {n: m.rank for n, m in svd_layers(self.model)},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "history": [dict(r) for r in self.history],
            "config": self.config.to_dict(),
            "compression_stopped": bool(self.compression_stopped),
        }

    def save_checkpoint(self, epoch: int, path: str | os.PathLike | None = None) -> Path:
        """Write the checkpoint atomically (temp file, fsync, os.replace) to `path` or run_dir/checkpoint.pt."""
        target = Path(path) if path is not None else self.checkpoint_path
        if target is None:
            raise ValueError("save_checkpoint needs a path when the trainer has no run_dir")
        state = self.state_dict(epoch)
        atomic_write(target, lambda f: torch.save(state, f))
        return target

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by `save_checkpoint`; training continues at the next epoch.

        Raises:
            ValueError: The file is corrupt, not a dprp_surgery trainer checkpoint, for another model, or has
                finished more epochs than ``config.epochs``.
        """
        path = Path(path)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*pickle protocol.*")
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"checkpoint {str(path)!r} does not exist; start the run without resuming (CLI: "
                             "without --resume).") from None
        except Exception as exc:  # noqa: BLE001 - any failure to unpickle means "not a usable checkpoint"
            raise ValueError(_unreadable_checkpoint(path, exc)) from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint {str(path)!r} is not a dprp_surgery training checkpoint "
                             "(written by DPRPTrainer.save_checkpoint)")
        if ckpt.get("version") != _CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {str(path)!r} has version {ckpt.get('version')!r}; this dprp_surgery "
                             f"reads version {_CHECKPOINT_VERSION}")
        layers = dict(svd_layers(self.model))
        ranks = ckpt.get("ranks", {})
        if set(ranks) != set(layers):
            missing, extra = sorted(set(layers) - set(ranks))[:3], sorted(set(ranks) - set(layers))[:3]
            raise ValueError(f"checkpoint {str(path)!r} belongs to another model: its SVD layers differ "
                             f"(missing {missing or '-'}, unexpected {extra or '-'})")
        stored = ckpt["config"] if isinstance(ckpt.get("config"), dict) else {}
        done = int(ckpt.get("epoch", -1)) + 1
        if self.config.epochs < done:
            raise ValueError(f"checkpoint {str(path)!r} has already finished {done} epochs but the config has "
                             f"epochs={self.config.epochs}; resume with epochs >= {done} (CLI: --epochs {done} or "
                             "more), or start a fresh run in another run_dir")
        if stored.get("lr_schedule", self.config.lr_schedule) != self.config.lr_schedule:
            raise ValueError(f"checkpoint {str(path)!r} was trained with lr_schedule={stored['lr_schedule']!r} but "
                             f"the config has lr_schedule={self.config.lr_schedule!r}: one schedule's state cannot "
                             f"continue another. Resume with lr_schedule={stored['lr_schedule']!r} (lr, "
                             "factor_lr_scale, sigma_lr_scale, weight decay and momentum may change), or start a "
                             "fresh run in another run_dir")
        if stored.get("optimizer", self.config.optimizer) != self.config.optimizer:
            raise ValueError(f"checkpoint {str(path)!r} was trained with optimizer={stored['optimizer']!r} but the "
                             f"config has optimizer={self.config.optimizer!r}: the optimizer state cannot carry "
                             f"over. Resume with optimizer={stored['optimizer']!r}, or start a fresh run in another "
                             "run_dir")
        for name, r in ranks.items():
            if not 1 <= int(r) <= layers[name].rank:
                raise ValueError(f"checkpoint {str(path)!r}: layer {name!r} has rank {r}, but the model's layer "
                                 f"has only {layers[name].rank} components")
        misfit = _checkpoint_misfit(self.model, self.optimizer, ckpt, {n: int(r) for n, r in ranks.items()})
        if misfit:  # found before anything is truncated or loaded: a failed resume leaves the model as it was
            raise ValueError(f"checkpoint {str(path)!r} does not fit this model/optimizer: {misfit}")
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            for name, r in ranks.items():
                layers[name].truncate_(int(r))
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt.get("scheduler") is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            self._apply_group_settings(fresh, stored)
            if self.scheduler is not None and ckpt.get("scheduler") is not None:
                self._fit_schedule_to_epochs()
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"checkpoint {str(path)!r} does not fit this model/optimizer: {exc}") from exc
        differ = sorted(k for k, v in self.config.to_dict().items() if k in stored and stored[k] != v)
        if differ:
            log.warning("resuming %s with changed config fields: %s", path, ", ".join(differ))
        self.history = History(ckpt.get("history", []))
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.global_step = int(ckpt.get("global_step", 0))
        self.compression_stopped = bool(ckpt.get("compression_stopped", False))
        target = self.config.target_compression
        if stored.get("target_compression", target) != target:  # a raised, lowered or removed target: decide anew
            self.compression_stopped = target is not None and self.compression_rate() >= target
        if self.rank == 0 and self.run_dir is not None:  # history.jsonl matches the checkpoint again
            text = "".join(json.dumps(r) + "\n" for r in self.history)
            write_text_atomic(self.run_dir / HISTORY_NAME, text)
        log.info("resumed %s at epoch %d", path, self.start_epoch)

    _GROUP_LR_SCALE = {"factors": "factor_lr_scale", "sigma": "sigma_lr_scale"}  # group name -> its lr scale field

    def _apply_group_settings(self, fresh: list[dict[str, Any]], stored: dict[str, Any]) -> None:
        """After loading optimizer state: the config's weight decay, momentum etc. again, and its base lrs.

        Every lr keeps its place in the schedule: it is scaled by new base / stored base of its group (lr times
        the group's factor_lr_scale or sigma_lr_scale), as are the scheduler's base_lrs.
        """
        sch = self.scheduler
        for i, (group, new) in enumerate(zip(self.optimizer.param_groups, fresh)):
            if group.get("name") != new.get("name"):
                continue
            for key, value in new.items():
                if key not in ("lr", "initial_lr"):
                    group[key] = value
            scale = self._GROUP_LR_SCALE.get(str(group.get("name")))
            old = float(stored.get("lr", self.config.lr)) * float(stored.get(scale, 1.0) if scale else 1.0)
            base = self.config.lr * (float(getattr(self.config, scale)) if scale else 1.0)
            ratio = base / old if old > 0 else 1.0
            group["lr"] = group["lr"] * ratio
            if "initial_lr" in group:
                group["initial_lr"] = base
            if sch is not None and hasattr(sch, "base_lrs") and i < len(sch.base_lrs):
                sch.base_lrs[i] = sch.base_lrs[i] * ratio
            if sch is not None and hasattr(sch, "min_lrs") and i < len(sch.min_lrs):
                sch.min_lrs[i] = sch.min_lrs[i] * ratio
        if sch is not None:
            sch._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _fit_schedule_to_epochs(self) -> None:
        """After a resume with another `epochs`: the restored cosine follows the new length (T_max, current lr)."""
        sch = self.scheduler
        if not isinstance(sch, torch.optim.lr_scheduler.CosineAnnealingLR) or sch.T_max == self.config.epochs:
            return
        log.info("cosine schedule re-fitted from T_max=%d to the new epochs=%d", sch.T_max, self.config.epochs)
        sch.T_max = self.config.epochs
        phase = (1.0 + math.cos(math.pi * sch.last_epoch / sch.T_max)) / 2.0
        for group, base in zip(self.optimizer.param_groups, sch.base_lrs):
            group["lr"] = sch.eta_min + (base - sch.eta_min) * phase
        sch._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _append_history(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / HISTORY_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- one call
def compress(model: nn.Module, config: DPRPConfig | None = None, train_data: Any = None, val_data: Any = None, *,
             run_dir: str | os.PathLike | None = None, resume: str | os.PathLike | bool | None = None,
             progress: bool = True, teacher: nn.Module | None = None) -> CompressionResult:
    """Factorize `model` (unless it already has SVD layers) and train it with DPRP (`DPRPTrainer`).

    Use `DPRPConfig.preset("tuned")` for a pretrained model, `DPRPConfig()` for the paper's recipe from scratch.

    Args:
        teacher: The distillation teacher when ``config.distill > 0`` (e.g. the dense model fine-tuned on
            the same data); default the model as given (before factorizing). It is not checkpointed: pass it
            again on resume.

    Returns:
        CompressionResult with the trained model (in eval mode), its history, its Summary and the run folder.
        A model that already has SVD layers is trained in place (it is the result's model); any other is
        left untouched (a factorized copy is trained).

    Raises:
        ValueError: No training data, a lazy layer not initialised yet, a teacher with ``config.distill == 0``
            (it would be ignored), or any of `DPRPTrainer`'s (e.g. a fresh run in a run_dir that already holds
            one: pass ``resume=True``).
    """
    require_module(model, "compress()")
    require_initialized(model, "compress()")
    config = as_config(config, "compress()")
    if train_data is None:
        raise ValueError("compress needs train_data (a DataLoader, a TensorLoader or a Dataset)")
    if teacher is not None and config.distill == 0:
        raise ValueError("compress got a teacher but config.distill is 0, so it would be ignored; set distill "
                         "(e.g. 0.5) or drop the teacher")
    if config.distill > 0 and teacher is None:
        teacher = unwrap_model(model)
    if not svd_layers(unwrap_model(model)):
        model = factorize(unwrap_model(model), config)
    trainer = DPRPTrainer(model, config, train_data, val_data, run_dir=run_dir, resume=resume, progress=progress,
                          teacher=teacher)
    history = trainer.fit()
    trainer.model.eval()  # ready to evaluate or export, like a loaded model
    return CompressionResult(model=trainer.model, history=history, summary=trainer.summary(), run_dir=trainer.run_dir)

