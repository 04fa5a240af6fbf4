"""The one configuration object of DPRP: surgery, losses, pruning and training knobs.

Every field carries the paper's symbol (Sharma et al., IEEE Access 2025) in its comment and docs.
Configs are frozen, keyword-only, validated on construction and round-trip through JSON/YAML.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import json
import logging
import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

CONFIG_VERSION = 1

SCHEMES = ("paper", "channel", "spatial")
REGULARIZERS = ("dprp", "l1", "l2", "funnel", "none")
LAYER_TYPES = ("Linear", "Conv1d", "Conv2d")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("plateau", "cosine", "constant")
PRUNE_UNITS = ("epoch", "step")
COMP_WEIGHTINGS = ("layers", "params", "params-squared")
FACTOR_STEPS = ("plain", "capped")
DEVICE_TYPES = ("cpu", "cuda")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")

log = logging.getLogger(__name__)


def _check(cond: bool, name: str, value: Any, want: str) -> None:
    """Raise a ValueError naming the field, the value received and what is accepted."""
    if not cond:
        raise ValueError(f"DPRPConfig.{name}={value!r} is invalid: {want}.")


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    """Check that a string field is one of the options, suggesting the closest."""
    if value in options:
        return
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"DPRPConfig.{name}={value!r} is unknown; use one of {', '.join(options)}.{hint}")


@dataclass(frozen=True, kw_only=True)
class DPRPConfig:
    """Configuration of surgery, losses, rank pruning and training (eqs. (1)-(17), Sec. IV-B).

    Defaults reproduce the paper's CIFAR-10 ResNet-20 setting (Sec. IV-B and Table I). Named
    presets (`DPRPConfig.preset`) give the tuned settings for pretrained models ("tuned",
    "tuned-target50"), the paper's settings and the short schedule they share ("finetune").

    Attributes:
        scheme: Matricization of k x k convolutions: "paper" (M in R^{SC x L1L2}, eqs. (1)-(2)),
            "channel" (S x C L1 L2: a k x k conv to r channels then a 1x1 conv) or "spatial"
            ((S L2) x (C L1): a (1 x L1) conv then an (L2 x 1) conv). Linear and 1x1 convs always
            use out x in; grouped convs always use "paper". See docs/method.md.
        include: Module-name globs (fnmatch) of layers to factorize.
        exclude: Module-name globs of layers to leave dense; wins over `include`.
        layer_types: Which dense types to replace: any of "Linear", "Conv1d", "Conv2d".
        min_compressible: A layer is factorized only if its compression rate at rank 1
            (R(1) of eqs. (4)/(7)) exceeds this value; layers where no rank can save parameters
            are then skipped and reported. ``None`` forces every selected layer in.
        epochs: Training epochs (the paper trains 300 from scratch).
        batch_size: Mini-batch size (256 in Sec. IV-B).
        lr: Initial learning rate (0.1 in Sec. IV-B).
        momentum: SGD momentum (0.9); ignored, with a warning, by ``optimizer="adamw"``.
        weight_decay: Weight decay of non-factor parameters (1e-4).
        factor_weight_decay: Weight decay of U and V; ``None`` uses `weight_decay`.
        sigma_weight_decay: Weight decay of the singular values s; ``None`` uses `weight_decay`.
        sigma_lr_scale: Learning-rate multiplier of the singular values s.
        factor_lr_scale: Learning-rate multiplier of the factors U and V. A step on U moves
            the dense weight U diag(s) V^T about s_j^2 times further than the same step on the
            dense weight, so pretrained models need a value well below 1 (docs/method.md).
        factor_step: How U and V are stepped. "plain" (the paper): with their gradients as they
            are, so a step on column j moves W about s_j^2 times as far as the same step on W.
            "capped": column j of U's and V's gradients is divided by max(s_j^2, 1) before every
            optimizer step (a scaled-gradient preconditioner, after ScaledGD, Tong, Ma & Chi 2021),
            so no component moves W faster than a dense step at the factors' learning rate, and
            components with |s_j| < 1 move as under "plain". SGD only. Not in the paper.
        optimizer: "sgd" (the paper) or "adamw".
        lr_schedule: "plateau" (ReduceLROnPlateau on the classification loss, the paper),
            "cosine" (cosine annealing over `epochs`) or "constant".
        lr_factor: ReduceLROnPlateau factor (0.1).
        lr_patience: ReduceLROnPlateau patience in epochs (10).
        warmup_epochs: Linear warm-up of the learning rate over this many epochs (per step; one factor per
            epoch for training data without ``len()``).
        lambda_str: lambda_str of eq. (8), weight of the structure loss (1).
        mu_orth: mu_orth, weight of L_orth (eq. (10)) inside L_str (1000).
        mu_sort: mu_sort, weight of L_sort (eq. (11)) inside L_str (1).
        lambda_comp: lambda_comp of eq. (8) (Table I: 0.1 for CIFAR-10 ResNet-20); it is also
            lambda_reg of eq. (14) for the ablation regularizers.
        epsilon: Pruning threshold epsilon of tau_l (Sec. III-C.3; Table I: 0.1).
        regularizer: "dprp" (eqs. (8)-(12)), or an ablation of eq. (14): "l1" (15), "l2" (16),
            "funnel" (17), "none".
        delta: delta of the funnel regularizer, eq. (17).
        reg_warmup_epochs: Epochs over which lambda_str and lambda_comp ramp linearly from 0.
        reg_cooldown_epochs: In the last this many epochs lambda_comp is 0 and no pruning runs, so
            the model settles at its final ranks (L_str stays on unless ``structure_when_frozen`` is
            False). 0 (the paper) prunes to the end.
        comp_weighting: How L_comp (eq. (12)) and an ablation's L_reg average over layers. "layers" (the
            paper): the plain mean (1/L) sum_l. "params": each layer's term weighted by its share of the
            dense parameters (h_l w_l / sum_k h_k w_k), so the push falls on the layers whose rank costs
            the most parameters and small layers keep their rank. "params-squared": weighted by
            (h_l w_l)^2 / sum_k (h_k w_k)^2, which moves the push further onto the largest layers (a
            ResNet's 64-channel convs get 16x the weight of its 32-channel ones instead of 4x). Not in
            the paper.
        epsilon_start: If set, epsilon moves geometrically from this value to `epsilon` over
            `epsilon_ramp_epochs` epochs (it grows when epsilon_start < epsilon, the usual schedule, and
            shrinks otherwise); ``None`` keeps it fixed.
        epsilon_ramp_epochs: Length of the epsilon schedule.
        min_rank: No layer is pruned below this rank.
        prune_every: Rank pruning runs every `prune_every` `prune_unit`s.
        prune_unit: "epoch" (default, as Sec. III-D) or "step".
        prune_start_epoch: First epoch (0-based) in which pruning may run.
        target_compression: Stop compressing once this fraction of the dense model's parameters is
            removed (1 - params / dense params over the whole model, U, s, V counted as in eqs. (4)/(7)):
            from the pruning pass that reaches it on, lambda_comp is 0 and no pruning runs, as in the
            cool-down, so the remaining epochs recover accuracy at fixed ranks. ``None`` (the paper)
            compresses to the end. Not in the paper.
        structure_when_frozen: Keep L_str once the ranks are frozen (the cool-down, or
            `target_compression` reached). ``True`` (default) keeps lambda_str. ``False`` sets it to 0 from
            then on: no pruning runs after that point, so U and V no longer need to stay orthonormal and
            train as a plain low-rank factorization, and s stops being exactly their singular values.
            Not in the paper.
        seed: Seed of every random number generator (data order, augmentation, init); an int in [0, 2**63).
        device: "auto" (CUDA when available), "cpu" or "cuda[:N]".
        amp: Mixed precision on CUDA.
        label_smoothing: Label smoothing of the cross-entropy application loss.
        distill: Weight alpha of knowledge distillation from the dense model (not in the paper; 0, the
            paper, trains on labels only). L_app of eq. (8) becomes (1 - alpha) CE + alpha T^2
            KL(softmax(teacher / T) || softmax(student / T)); `compress` uses the model it was given,
            before factorizing, as the teacher (docs/method.md).
        distill_temperature: Softmax temperature T of the distillation term.
        version: Schema version, written into JSON/YAML.
    """

    # --- surgery (Sec. III-B) ---
    scheme: str = "paper"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    layer_types: tuple[str, ...] = LAYER_TYPES
    min_compressible: float | None = 0.0
    # --- optimisation (Sec. IV-B) ---
    epochs: int = 300
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    factor_weight_decay: float | None = None
    sigma_weight_decay: float | None = None
    sigma_lr_scale: float = 1.0
    factor_lr_scale: float = 1.0
    factor_step: str = "plain"
    optimizer: str = "sgd"
    lr_schedule: str = "plateau"
    lr_factor: float = 0.1
    lr_patience: int = 10
    warmup_epochs: int = 0
    # --- losses (Sec. III-C, eqs. (8)-(17)) ---
    lambda_str: float = 1.0
    mu_orth: float = 1000.0
    mu_sort: float = 1.0
    lambda_comp: float = 0.1
    epsilon: float = 0.1
    regularizer: str = "dprp"
    delta: float = 1e-3
    reg_warmup_epochs: int = 0
    reg_cooldown_epochs: int = 0
    comp_weighting: str = "layers"
    epsilon_start: float | None = None
    epsilon_ramp_epochs: int = 0
    # --- pruning (Sec. III-D) ---
    min_rank: int = 1
    prune_every: int = 1
    prune_unit: str = "epoch"
    prune_start_epoch: int = 0
    target_compression: float | None = None
    structure_when_frozen: bool = True
    # --- run ---
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    label_smoothing: float = 0.0
    distill: float = 0.0
    distill_temperature: float = 4.0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        for f in fields(self):  # numpy scalars (np.float64 subclasses float) as plain numbers: JSON/YAML, resume
            v = getattr(self, f.name)
            if isinstance(v, numbers.Number) and not isinstance(v, bool) and type(v) not in (int, float):
                if isinstance(v, numbers.Integral):
                    object.__setattr__(self, f.name, int(v))
                elif isinstance(v, numbers.Real):
                    object.__setattr__(self, f.name, float(v))
        for name in ("include", "exclude", "layer_types"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            _check(isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value), name, value,
                   "give a list of strings")
            object.__setattr__(self, name, tuple(value))
        _choice("scheme", self.scheme, SCHEMES)
        _choice("regularizer", self.regularizer, REGULARIZERS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("prune_unit", self.prune_unit, PRUNE_UNITS)
        _choice("comp_weighting", self.comp_weighting, COMP_WEIGHTINGS)
        _choice("factor_step", self.factor_step, FACTOR_STEPS)
        _check(self.factor_step == "plain" or self.optimizer == "sgd", "factor_step", self.factor_step,
               "it rescales SGD gradients, and AdamW (optimizer='adamw') normalises every gradient coordinate, "
               "which undoes it; use optimizer='sgd' or factor_step='plain'")
        for t in self.layer_types:
            _choice("layer_types", t, LAYER_TYPES)
        _check(len(self.layer_types) > 0, "layer_types", self.layer_types, "name at least one layer type")
        for name in ("epochs", "batch_size", "min_rank", "prune_every"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, v, "must be an integer >= 1")
        for name in ("lr_patience", "warmup_epochs", "reg_warmup_epochs", "reg_cooldown_epochs", "epsilon_ramp_epochs",
                     "prune_start_epoch", "seed"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 0, name, v, "must be an integer >= 0")
        _check(self.seed < 2**63, "seed", self.seed, "must be below 2**63 (torch generators take 64-bit seeds, and "
               "the trainer adds the epoch and the process rank)")
        for name in ("lr", "sigma_lr_scale", "factor_lr_scale", "delta"):
            v = getattr(self, name)
            _check(_finite(v) and v > 0, name, v, "must be a finite number > 0")
        for name in ("momentum", "weight_decay", "lambda_str", "mu_orth", "mu_sort", "lambda_comp",
                     "label_smoothing"):
            v = getattr(self, name)
            _check(_finite(v) and v >= 0, name, v, "must be a finite number >= 0")
        for name in ("factor_weight_decay", "sigma_weight_decay"):
            v = getattr(self, name)
            _check(v is None or (_finite(v) and v >= 0), name, v, "must be None or a number >= 0")
        _check(self.momentum < 1, "momentum", self.momentum, "SGD momentum must lie in [0, 1) (0.9 in Sec. IV-B)")
        _check(_finite(self.epsilon) and 0 < self.epsilon < 1, "epsilon", self.epsilon,
               "the pruning threshold epsilon must lie in (0, 1)")
        _check(self.epsilon_start is None or (_finite(self.epsilon_start) and 0 < self.epsilon_start < 1),
               "epsilon_start", self.epsilon_start, "must be None or lie in (0, 1)")
        _check(_finite(self.lr_factor) and 0 < self.lr_factor < 1, "lr_factor", self.lr_factor,
               "must lie in (0, 1)")
        _check(self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "must be < 1")
        _check(self.target_compression is None or (_finite(self.target_compression) and
                                                   0 < self.target_compression < 1),
               "target_compression", self.target_compression,
               "must be None or a fraction of parameters to remove in (0, 1), e.g. 0.5")
        _check(_finite(self.distill) and 0 <= self.distill <= 1, "distill", self.distill,
               "the distillation weight must lie in [0, 1] (0 turns distillation off)")
        _check(_finite(self.distill_temperature) and self.distill_temperature > 0, "distill_temperature",
               self.distill_temperature, "must be a finite number > 0")
        _check(self.min_compressible is None or _finite(self.min_compressible), "min_compressible",
               self.min_compressible, "must be None or a finite number")
        _check(self.min_compressible is None or self.min_compressible < 1, "min_compressible", self.min_compressible,
               "must be < 1: a layer's compression rate at rank 1 is always below 1, so 1 or more would skip every "
               "layer (None forces every selected layer in)")
        for name in ("amp", "structure_when_frozen"):
            v = getattr(self, name)
            _check(isinstance(v, bool), name, v, "must be true or false")
        _check(_valid_device(self.device), "device", self.device,
               "use 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N' (e.g. 'cuda:1')")
        _check(_is_int(self.version) and self.version == CONFIG_VERSION, "version", self.version,
               f"this dprp_surgery reads config version {CONFIG_VERSION}")
        self._warn_inert_settings()

    def _warn_inert_settings(self) -> None:
        """Log a warning for settings that are valid but have no effect on training (not for recorded configs)."""
        if _RECORDED.get():
            return
        if self.reg_cooldown_epochs > 0 and self.reg_cooldown_epochs >= self.epochs:
            log.warning("DPRPConfig.reg_cooldown_epochs=%d >= epochs=%d: every epoch is in the cool-down, so "
                        "lambda_comp is 0 and no pruning runs (nothing is compressed); lower reg_cooldown_epochs "
                        "below epochs or raise epochs.", self.reg_cooldown_epochs, self.epochs)
        if self.prune_start_epoch >= self.epochs:
            log.warning("DPRPConfig.prune_start_epoch=%d >= epochs=%d: pruning never runs (nothing is "
                        "compressed); lower prune_start_epoch below epochs or raise epochs.",
                        self.prune_start_epoch, self.epochs)
        if self.epsilon_start is not None and self.epsilon_ramp_epochs == 0:
            log.warning("DPRPConfig.epsilon_start=%r is ignored because epsilon_ramp_epochs=0: epsilon stays at "
                        "%r; set epsilon_ramp_epochs >= 1 for the schedule, or epsilon_start=None.",
                        self.epsilon_start, self.epsilon)
        if self.optimizer == "adamw" and self.momentum != 0.9:
            log.warning("DPRPConfig.momentum=%r is ignored with optimizer='adamw' (AdamW uses its own betas, "
                        "(0.9, 0.999)); leave momentum at 0.9 or use optimizer='sgd'.", self.momentum)
        if self.epsilon_start is None and self.epsilon_ramp_epochs > 0:
            log.warning("DPRPConfig.epsilon_ramp_epochs=%d is ignored because epsilon_start=None: epsilon stays "
                        "at %r; set epsilon_start (e.g. 0.01) for the schedule, or epsilon_ramp_epochs=0.",
                        self.epsilon_ramp_epochs, self.epsilon)

    # ------------------------------------------------------------------ round trips
    def replace(self, **changes: Any) -> DPRPConfig:
        """Return a copy with some fields changed (validated like the constructor).

        Args:
            **changes: New values of fields.

        Raises:
            ValueError: For an unknown field name (with the closest field suggested) or an invalid value.
        """
        _check_field_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict of every field (tuples become lists)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPRPConfig:
        """Build a config from a dict, rejecting unknown keys with a suggestion."""
        if not isinstance(data, dict):
            raise ValueError(f"a DPRPConfig must be a mapping of field names to values, got {type(data).__name__}")
        _check_field_names(data)
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON; also write it to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> DPRPConfig:
        """Parse JSON text, or read a .json file.

        Args:
            text_or_path: A `Path`, the name of an existing file, or JSON text. A string that ends in
                .json/.yaml/.yml (one line, not starting with "{", without ": ") is taken as a file name.

        Raises:
            ValueError: If a file name is given but the file does not exist or cannot be read, for
                invalid JSON, content that is not a mapping, a field set twice, an unknown field or an
                invalid value.
        """
        return cls.from_dict(_parse(text_or_path, "JSON", _json_load, (json.JSONDecodeError, DuplicateKeyError)))

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Serialise to YAML (needs PyYAML); also write it to `path` when given."""
        yaml = _yaml()
        text = yaml.safe_dump(self.to_dict(), sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> DPRPConfig:
        """Parse YAML text, or read a .yaml/.yml file.

        PyYAML follows YAML 1.1, which reads a float without a dot (``weight_decay: 1e-4``) as the string
        "1e-4"; such strings are converted to numbers for the float fields.

        Args:
            text_or_path: A `Path`, the name of an existing file, or YAML text. A string that ends in
                .json/.yaml/.yml (one line, not starting with "{", without ": ") is taken as a file name.

        Raises:
            ValueError: If a file name is given but the file does not exist or cannot be read, for YAML
                that is not a non-empty mapping (an empty or comment-only text too), a field set twice, an
                unknown field or an invalid value.
        """
        yaml = _yaml()
        data = _parse(text_or_path, "YAML", _yaml_load, (yaml.YAMLError, DuplicateKeyError))
        return cls.from_dict(_yaml_floats(data))

    @classmethod
    def load(cls, path: str | Path) -> DPRPConfig:
        """Read a config file; the format follows the suffix (.json, .yaml, .yml)."""
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"config file {str(p)!r} is a directory; pass a .json, .yaml or .yml file")
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        if p.suffix.lower() == ".json":
            return cls.from_json(p)
        if p.suffix.lower() in (".yaml", ".yml"):
            return cls.from_yaml(p)
        raise ValueError(f"config file {str(p)!r}: use a .json, .yaml or .yml file")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DPRPConfig:
        """A named preset, optionally with fields overridden.

        Presets:
            "paper": the paper's "proposed 2" CIFAR-10 ResNet-20 setting (Table I), from scratch.
            "paper-proposed1": "proposed 1" of Sec. IV-C (lambda_comp 0.5, epsilon 0.01).
            "finetune": the paper's losses and optimizer on a short schedule (10 epochs, lr 0.01, cosine,
                batch 128): the base of the others and of the benchmark rows. Its factors train at the full
                lr, which loses about 20 points of a pretrained model in two epochs; use "tuned" for one.
            "tuned": "finetune" with the settings the CIFAR-10 reproduction found best for
                pretrained models: factors at 1/20 of the lr, singular values at 10x, a stronger
                L_comp (lambda_comp 2), epsilon 0.1, pruning every 25 steps, and a last epoch
                without L_comp or pruning (docs/benchmarks.md). Measured over 3 epochs (27% of the
                parameters removed for about one point of top-1 on ResNet-20); over its default 10 epochs it
                keeps pruning (about 50% after five) and costs more accuracy, so for a chosen size add
                ``target_compression`` (or use "tuned-target50").
            "tuned-target50": "tuned" for a chosen size: L_comp weighted by each layer's share of the
                parameters (``comp_weighting="params"``) and compression stopped once half of the
                parameters are gone (``target_compression=0.5``); override ``target_compression`` for
                another size. Add ``distill`` (with a fine-tuned dense teacher) for the last points.
        """
        if not isinstance(name, str):
            raise TypeError(f"DPRPConfig.preset takes a preset name, got {type(name).__name__}; use one of "
                            f"{', '.join(PRESETS)}")
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}.{hint}")
        _check_field_names(overrides)
        return cls(**{**PRESETS[name], **overrides})


_RECORDED: contextvars.ContextVar[bool] = contextvars.ContextVar("dprp_recorded_config", default=False)


@contextlib.contextmanager
def recorded_configs() -> Iterator[None]:
    """Within it, configs are rebuilt from a finished run's record: no warnings about settings without effect.

    Those warnings are for the person configuring a run; `dprp eval` or `dprp export` of a run that trained
    one epoch with ``reg_cooldown_epochs=1`` should not repeat them.
    """
    token = _RECORDED.set(True)
    try:
        yield
    finally:
        _RECORDED.reset(token)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "paper-proposed1": {"lambda_comp": 0.5, "epsilon": 0.01},
    "finetune": {"epochs": 10, "lr": 0.01, "lr_schedule": "cosine", "batch_size": 128},
    # the reproduction's tuned settings for pretrained models (docs/benchmarks.md, "What we learnt")
    "tuned": {"epochs": 10, "lr": 0.01, "lr_schedule": "cosine", "batch_size": 128, "factor_lr_scale": 0.05,
              "sigma_lr_scale": 10.0, "lambda_comp": 2.0, "epsilon": 0.1, "prune_unit": "step", "prune_every": 25,
              "reg_cooldown_epochs": 1},
}
# the tuned settings for a chosen size: the best R20 rows at 50% removed (docs/benchmarks.md, learnt 12)
PRESETS["tuned-target50"] = {**PRESETS["tuned"], "comp_weighting": "params", "target_compression": 0.5}


def _finite(v: Any) -> bool:
    """True for a real finite number (bools excluded; an int too large for a float is not finite)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _is_int(v: Any) -> bool:
    """True for an int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def _valid_device(v: Any) -> bool:
    """True for "auto" or a torch device string of a supported type ("cpu", "cuda", "cuda:1")."""
    if v == "auto":
        return True
    if not isinstance(v, str):
        return False
    import torch

    try:
        return torch.device(v).type in DEVICE_TYPES
    except RuntimeError:
        return False


_FIELD_ALIASES = {"learning_rate": "lr", "scheduler": "lr_schedule", "lr_scheduler": "lr_schedule",
                  "schedule": "lr_schedule", "wd": "weight_decay", "num_epochs": "epochs", "n_epochs": "epochs",
                  "bs": "batch_size", "eps": "epsilon", "lambda": "lambda_comp", "seed_value": "seed"}
"""Names other tools use for DPRPConfig fields, for the 'did you mean' of an unknown field."""


def _check_field_names(names: Any) -> None:
    """Raise a ValueError for the first name that is not a DPRPConfig field, suggesting the closest."""
    known = sorted(f.name for f in fields(DPRPConfig))
    for key in names:
        if key not in known:
            close = _suggest_field(str(key), known)
            hint = (f" Did you mean {close[0]!r}?" if close
                    else f" The fields are: {', '.join(k for k in known if k != 'version')}.")
            raise ValueError(f"unknown DPRPConfig field {key!r}.{hint}")


def _suggest_field(key: str, known: list[str]) -> list[str]:
    """The field an unknown name most likely means: an alias, a case or near-miss of a field or an alias."""
    folded = key.lower().replace("-", "_")
    if folded in known:
        return [folded]
    if folded in _FIELD_ALIASES:
        return [_FIELD_ALIASES[folded]]
    close = difflib.get_close_matches(folded, [*known, *_FIELD_ALIASES], n=1)
    return [_FIELD_ALIASES.get(close[0], close[0])] if close else []


def _yaml_floats(data: dict[str, Any]) -> dict[str, Any]:
    """Convert numeric strings (YAML 1.1 reads 1e-4 as a string) of the float fields to floats."""
    float_fields = {f.name for f in fields(DPRPConfig) if "float" in str(f.type)}
    out = dict(data)
    for key, value in data.items():
        if key in float_fields and isinstance(value, str):
            try:
                out[key] = float(value)
            except ValueError:
                pass  # left as is: validation names the field and the value
    return out


def as_config(config: Any, where: str) -> DPRPConfig:
    """`config`, or the defaults for None; a TypeError saying how to build one for anything else."""
    if config is None:
        return DPRPConfig()
    if isinstance(config, DPRPConfig):
        return config
    how = ("DPRPConfig.from_dict(your_dict)" if isinstance(config, dict)
           else "DPRPConfig.preset(name)" if isinstance(config, str) else "DPRPConfig(field=value, ...)")
    raise TypeError(f"{where} takes a DPRPConfig as its config, got {type(config).__name__}; build one with {how}")


def require_module(model: Any, where: str, what: str = "model") -> None:
    """Raise a TypeError unless `model` is an nn.Module."""
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"{where} takes an nn.Module as its {what}, got {type(model).__name__}; load or build the "
                        "model first (e.g. dprp_surgery.io.load_model('timm:resnet18'))")


def require_initialized(model: Any, where: str) -> None:
    """Raise a ValueError naming the first lazy layer of `model` whose parameters are not initialised yet."""
    import torch.nn as nn

    for name, module in model.named_modules():
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"{where}: layer {name or '<root>'!r} ({type(module).__name__}) is not initialised yet; "
                             "run one forward pass through the model with an example input first "
                             "(lazy layers take their shapes from it)")


def _exists(path: Path) -> bool:
    """Whether `path` is a file or a directory; False instead of raising for names the OS rejects (too long, NUL)."""
    try:
        return path.is_file() or path.is_dir()
    except (OSError, ValueError):
        return False


def _read_if_path(text_or_path: str | os.PathLike[str], kind: str) -> str:
    """Return a config file's contents when given a path or a file name, else the text itself."""
    if isinstance(text_or_path, os.PathLike):
        path = Path(text_or_path)
    else:
        text = str(text_or_path)
        stripped = text.strip()
        if not stripped or "\n" in text or stripped.startswith(("{", "[")) or ": " in text:
            return text  # JSON/YAML text, never a file name
        path = Path(stripped)
        if not _exists(path):
            if stripped.lower().endswith(CONFIG_SUFFIXES):
                raise ValueError(f"config file {stripped!r} does not exist; check the path, or pass the {kind} "
                                 "text itself")
            return text
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a directory; pass a {kind} file or the {kind} text itself")
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of the text
    except FileNotFoundError:
        raise ValueError(f"config file {str(path)!r} does not exist; check the path, or pass the {kind} "
                         "text itself") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start} cannot be decoded); "
                         f"save it as UTF-8 {kind}") from None
    except OSError as exc:
        raise ValueError(f"cannot read config file {str(path)!r}: {exc}") from None


def _parse(text_or_path: str | os.PathLike[str], kind: str, parse: Any, error: type[Exception]) -> Any:
    """Parse config text or a config file; a syntax error names the file (or says it was the text)."""
    text = _read_if_path(text_or_path, kind)
    source = f"config file {str(text_or_path)!r}" if text != text_or_path else f"the {kind} text"
    try:
        data = parse(text)
    except error as exc:
        raise ValueError(f"{source} is not valid {kind} ({' '.join(str(exc).split())}); fix it, or write the "
                         f"config with DPRPConfig.to_{kind.lower()}") from None
    if not isinstance(data, dict):
        shown = "" if data is None else f" ({data!r:.40})"
        raise ValueError(f"{source} must hold a mapping of DPRPConfig fields (e.g. {{\"lr\": 0.01}}), but holds "
                         f"{_content(data)}{shown}")
    return data


def _content(data: Any) -> str:
    """What a parsed config file holds instead of a mapping, in words ('a list', 'nothing (...)')."""
    if data is None:
        return "nothing (it is empty or only comments)"
    kind = type(data).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


class DuplicateKeyError(ValueError):
    """A config file sets one field twice (JSON and YAML parsers would keep the last silently)."""


def _unique_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A dict from key/value pairs; a DuplicateKeyError when a key repeats."""
    out: dict[Any, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"{key!r} is set twice ({out[key]!r}, then {value!r}); keep one of them")
        out[key] = value
    return out


def _json_load(text: str) -> Any:
    """json.loads refusing repeated keys."""
    return json.loads(text, object_pairs_hook=_unique_pairs)


def _yaml_load(text: str) -> Any:
    """yaml.safe_load refusing repeated keys in a mapping."""
    yaml = _yaml()

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN202 - PyYAML's signature
            self.flatten_mapping(node)
            return _unique_pairs([(self.construct_object(k, deep=deep), self.construct_object(v, deep=deep))
                                  for k, v in node.value])

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml():
    """Import PyYAML with a clear error if it is missing."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is a dependency
        raise ValueError("YAML configs need PyYAML: pip install pyyaml") from exc
    return yaml


__all__ = ["DPRPConfig", "CONFIG_VERSION", "SCHEMES", "REGULARIZERS", "COMP_WEIGHTINGS", "FACTOR_STEPS", "PRESETS"]
