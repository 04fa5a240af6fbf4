"""Implementations of the ``dprp`` commands (imported only when a command runs).

Every command runs inside :func:`cli_errors`: bad input (``ValueError`` and its subclasses such as
:class:`~dprp_surgery.io.UntrustedPickleError`, missing files) exits with code 2 and a one-paragraph
red message naming the flag, file or layer and what to do; any other failure exits with code 1
(``DPRP_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from .._files import write_bytes_atomic
from .._format import first_line as _first_line
from ..accounting import count_params, summarize
from ..config import DPRPConfig, _content, _json_load, _yaml_floats, _yaml_load
from ..data import TensorImageDataset, TensorLoader, open_data, progress_bar
from ..io import (
    ARCH_KINDS,
    CLASSES_ATTR,
    NEW_HEAD_ATTR,
    DataRecipe,
    check_writable,
    data_recipe,
    infer_num_classes,
    load_model,
    read_run_info,
    set_num_classes,
)

__all__ = [
    "cli_errors",
    "build_config",
    "evaluate",
    "measure_latency",
    "parse_input_size",
    "run_compress",
    "run_demo",
    "run_eval",
    "run_export",
    "run_inspect",
    "run_report",
]

RUN_FORMAT = "dprp-run"
RUN_VERSION = 1
REPO = Path(__file__).resolve().parents[2]


def _out() -> Console:
    """stdout console; when piped (no terminal, no $COLUMNS) wide enough that tables are not truncated."""
    console = Console(soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(soft_wrap=False, width=200)
    return console


def _err() -> Console:
    return Console(stderr=True, soft_wrap=True)


def _busy(text: str, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """A spinner with `text` on stderr while a long step runs (nothing when disabled or not a terminal)."""
    console = _err()
    if not enabled or not console.is_terminal:
        return contextlib.nullcontext()
    return console.status(escape(text))


def _note(text: str) -> None:
    _err().print(f"[yellow]{escape(text)}[/yellow]")


def _fail(message: str, code: int) -> None:
    _err().print(f"[bold red]Error:[/bold red] [red]{escape(message)}[/red]")
    raise typer.Exit(code)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Map exceptions to exit codes: bad input -> 2 (message only), failures -> 1."""
    try:
        yield
    except typer.Exit:
        raise
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        if os.environ.get("DPRP_DEBUG"):
            raise
        _fail(str(exc).strip() or type(exc).__name__, 2)
    except KeyboardInterrupt:
        _fail("interrupted (a `dprp compress` run continues from its last finished epoch with `dprp compress --out "
              "RUN_DIR --resume`; nothing is saved before its first epoch ends).", 130)
    except Exception as exc:  # noqa: BLE001 - the command boundary
        if os.environ.get("DPRP_DEBUG"):
            raise
        _fail(f"{type(exc).__name__}: {exc} (set DPRP_DEBUG=1 to see the traceback).", 1)


def _emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Size | tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _si(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


# ----------------------------------------------------------------------------- helpers
def parse_input_size(text: str | None, flag: str = "--input-size") -> tuple[int, ...] | None:
    """'3,32,32' / '3x32x32' / '32' (= 3,32,32) -> (C, H, W); None stays None."""
    if text is None:
        return None
    compact = re.sub(r"\s+", "", text)
    dims = tuple(int(p) for p in re.split(r"[,x]", compact)) if re.fullmatch(r"\d+([,x]\d+)*", compact) else ()
    if len(dims) == 1:
        dims = (3, dims[0], dims[0])
    if not dims or len(dims) not in (2, 3) or any(d < 1 for d in dims):
        raise ValueError(f"{flag} {text!r} is invalid: give C,H,W such as 3,32,32 (or one number N for 3,N,N).")
    return dims


def _refuse_pt2(spec: str | None, command: str) -> None:
    """Raise a ValueError for a .pt2 MODEL given to a command that needs the model's Conv/Linear modules."""
    if spec is not None and str(spec).lower().endswith(".pt2"):
        raise ValueError(f"{str(spec)!r} is a torch.export program (.pt2): its layers are graph operations, not "
                         f"Conv/Linear modules, so `dprp {command}` cannot factorize it. Give the model it was "
                         "exported from (e.g. cifar:resnet20@weights.th, timm:NAME@weights.safetensors, a dprp "
                         "artifact or run directory); a .pt2 runs in `dprp eval` and `dprp export`.")


def _load(spec: str, *, arch: str | None, num_classes: int | None, trust_pickle: bool, onnx: bool = False
          ) -> tuple[nn.Module, str]:
    """load_model for a command; an ONNX file only where `onnx` (it runs, inference only, in onnxruntime)."""
    is_onnx = str(spec).lower().endswith(".onnx") and Path(spec).expanduser().is_file()
    if is_onnx and not onnx:
        from .app import MODEL_FORMS

        raise ValueError(f"{str(spec)!r} is an ONNX file, which dprp cannot load back into PyTorch layers, so it is "
                         f"not a MODEL here; give the model it was exported from instead: {MODEL_FORMS}. (`dprp eval` "
                         "runs ONNX files in onnxruntime.)")
    if is_onnx and (num_classes is not None or arch is not None):
        flag = "--num-classes" if num_classes is not None else "--arch"
        raise ValueError(f"{flag} does not apply to the ONNX file {str(spec)!r}: its graph fixes the architecture "
                         f"and the classifier; drop {flag}.")
    model, model_arch = load_model(spec, num_classes=num_classes, trust_pickle=trust_pickle, arch=arch)
    if arch and model_arch.split(":", 1)[0] not in ARCH_KINDS:
        model_arch = arch  # a pickled/pt2 model whose architecture the user names
    return model, model_arch


def _input_size(model: nn.Module, recipe: DataRecipe, given: str | None) -> tuple[int, ...]:
    size = parse_input_size(given)
    if size is not None:
        return size
    recorded = getattr(model, "_dprp_input_size", None)
    if recorded:
        return tuple(int(v) for v in recorded)
    if recipe.image_size is None:
        raise ValueError("cannot tell the input size of this model; pass --input-size C,H,W (e.g. 3,224,224).")
    return recipe.input_size()


def _own_size(model: nn.Module, recipe: DataRecipe) -> tuple[int, ...] | None:
    """The model's own input size: recorded by an artifact, else its data recipe's (None when unknown)."""
    recorded = getattr(model, "_dprp_input_size", None)
    if recorded:
        return tuple(int(v) for v in recorded)
    return recipe.input_size() if recipe.image_size is not None else None


def _check_input_size(model: nn.Module, arch: str, size: tuple[int, ...], given: str | None,
                      flag: str = "--input-size", own: tuple[int, ...] | None = None) -> None:
    """Raise a ValueError naming `flag` unless one no-grad forward on zeros(1, *size) runs.

    `own` is the model's own input size (C, H, W) where its recipe knows it: the fix then suggests it.
    """
    what = f"{flag} {given!r}" if given is not None else f"the input size {','.join(map(str, size))}"
    own = tuple(own) if own and tuple(own) != tuple(size) else None
    if flag == "--image-size":
        fix = (f"choose an image size this model takes{f' (its own is {own[-1]})' if own else ''}, or leave "
               "--image-size out to use the model's own")
    elif given is not None:
        example = f"{','.join(map(str, own))}, this model's own size" if own else "3,32,32"
        fix = f"give the C,H,W of one input image (e.g. {example})"
    else:
        fix = "pass --input-size C,H,W (e.g. 3,224,224)"
    if arch.split(":", 1)[0] in ARCH_KINDS and len(size) != 3:
        raise ValueError(f"{what} has {len(size)} numbers but {arch} is an image model; {fix}.")
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = torch.zeros(1, *size) if ref is None else torch.zeros(1, *size, dtype=ref.dtype, device=ref.device)
    was = _set_training(model, False)
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001 - any failure means the shape does not fit
        raise ValueError(f"{what} does not fit the model {arch}: a forward on a (1, {', '.join(map(str, size))}) "
                         f"input fails ({type(exc).__name__}: {_first_line(exc)}); {fix}.") from None
    finally:
        _set_training(model, was)


def _check_out_dir(out: Path) -> None:
    """Raise a ValueError naming --out unless `out` is (or can be made) a directory we can write in."""
    check_writable(out, "--out")  # also names a parent that is a file
    path = out.expanduser()
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory; choose another --out path (the run "
                         "directory to write).")


def _check_out_suffix(out: Path, fmt: str) -> None:
    """Raise a ValueError when the suffix of --out names another format than --format."""
    from ..export import FORMATS

    suffix = out.suffix.lower()
    others = {s: f for f, s in FORMATS.items() if s and f != fmt}
    if fmt == "safetensors":
        if suffix in others:
            raise ValueError(f"--out {str(out)!r} ends in {suffix}, but --format safetensors writes an artifact "
                             f"directory; pass --format {others[suffix]}, or an --out without that suffix.")
        return
    want = FORMATS[fmt]
    if suffix != want:
        named = f"ends in {suffix}" if suffix else "has no suffix"
        raise ValueError(f"--out {str(out)!r} {named}, but --format {fmt} writes a {want} file; use --out "
                         f"{out.with_suffix(want) if suffix else out.with_name(out.name + want)}, or the --format "
                         "that "
                         "matches your path (safetensors for an artifact directory).")


_SPEC_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_-]+):(.*)$")


def _abs_path(text: str) -> str:
    return os.path.abspath(os.path.expanduser(text))


def _absolute_spec(spec: str | None) -> str | None:
    """A model/data spec with its local path made absolute, so that run.json works from any directory.

    Prefixes stay as they are (cifar10:DIR, cifar:NAME@FILE, timm:NAME@FILE); specs without a local path
    (timm:resnet18) are returned unchanged.
    """
    if not spec:
        return spec
    text = str(spec).strip()
    if Path(text).expanduser().exists():
        return _abs_path(text)
    m = _SPEC_PREFIX.match(text)
    if not m:
        return _abs_path(text) if ("/" in text or os.sep in text) else text
    prefix, rest = m.groups()
    if prefix.lower() in ("cifar10", "cifar100"):
        return f"{prefix}:{_abs_path(rest)}" if rest.strip() else text
    name, at, weights = rest.partition("@")
    if at and weights.strip():
        return f"{prefix}:{name}@{_abs_path(weights.strip())}"
    return text


@contextlib.contextmanager
def _recorded(what: str, value: str | None, source: Path | None, flag: str) -> Iterator[None]:
    """Add to a ValueError that `value` came from `source` (RUN_DIR/run.json) and which flag overrides it."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        if source is None:
            raise
        raise ValueError(f"{str(exc).strip()} ({what} {value!r} was taken from {str(source)!r}; pass {flag} to "
                         "override it.)") from None


def _check_device(config: DPRPConfig) -> None:
    """Raise a ValueError naming --device when it asks for CUDA that this machine does not have."""
    device = str(config.device)
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} needs CUDA, but torch.cuda.is_available() is false on this machine; "
                         "use --device cpu (or --device auto: CUDA when available).")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); choose one of them, or --device auto.")


def _finished_epochs(run_dir: Path) -> int:
    """Epochs recorded in RUN_DIR/history.jsonl (the trainer keeps it in step with checkpoint.pt)."""
    path = run_dir / "history.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _is_factorized(model: nn.Module) -> bool:
    from ..export import layer_forms

    return bool(layer_forms(model))


def _set_training(model: nn.Module, mode: bool) -> bool:
    """model.train(mode) where supported (torch.export modules refuse it); returns the previous mode."""
    was = model.training
    with contextlib.suppress(NotImplementedError):
        model.train(mode)
    return was


@torch.inference_mode()
def evaluate(model: nn.Module, loader: TensorLoader, progress: bool = False, label: str = "evaluating"
             ) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of `model` over `loader` (eval mode, model's device).

    Args:
        model: The model (its first parameter's device is used).
        loader: Batches of (images, labels).
        progress: Show a transient progress bar on stderr.
        label: The bar's description.

    Returns:
        (top-1, top-5) in percent.
    """
    was = _set_training(model, False)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct1 = correct5 = total = 0
    try:
        with progress_bar(progress, transient=True) as bar:
            task = bar.add_task(label, total=len(loader))
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                logits = _class_scores(model(x), len(y))
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                correct1 += (top[:, 0] == y).sum().item()
                correct5 += (top == y[:, None]).any(dim=1).sum().item()
                total += y.numel()
                bar.advance(task)
    finally:
        _set_training(model, was)
    if total == 0:
        raise ValueError("the evaluation data is empty.")
    return 100.0 * correct1 / total, 100.0 * correct5 / total


def _class_scores(out: Any, batch: int) -> torch.Tensor:
    """The (batch, classes) scores in a model's output (the first of several), else a ValueError saying why not."""
    first = out
    while isinstance(first, (tuple, list, dict)) and first:
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    several = " (the first of its outputs)" if first is not out else ""
    if not isinstance(first, torch.Tensor):
        raise ValueError(f"the model returned {type(first).__name__}{several}, not a tensor of class scores; "
                         "dprp eval scores classifiers: evaluate a model whose output is (batch, classes).")
    if first.ndim != 2 or first.shape[0] != batch:
        raise ValueError(f"the model's output{several} has shape {tuple(first.shape)} for a batch of {batch} "
                         "images, not (batch, classes); dprp eval scores classifiers: evaluate a model whose "
                         "output is (batch, classes) logits.")
    return first


@torch.inference_mode()
def measure_latency(model: nn.Module, x: torch.Tensor, runs: int = 5, budget_s: float = 10.0) -> float:
    """Median seconds of one forward of `model` on `x` (1 warm-up run; fewer runs past `budget_s`)."""
    was = _set_training(model, False)
    try:
        model(x)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < runs and (len(times) < 1 or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    finally:
        _set_training(model, was)
    return statistics.median(times)


def _macs(model: nn.Module, example: torch.Tensor) -> tuple[int | None, Any]:
    try:
        s = summarize(model, example)
        return s.macs, s
    except Exception:  # noqa: BLE001 - exported programs refuse eval(); count the whole forward instead
        pass
    try:
        from torch.utils.flop_counter import FlopCounterMode

        from ..accounting import counting_attention

        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counting_attention(), counter:
            model(example)
        return counter.get_total_flops() // 2, None
    except Exception:  # noqa: BLE001
        return None, None


# ----------------------------------------------------------------------------- config
def _read_config_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ValueError(f"--config {str(path)!r} is a directory; pass a .json, .yaml or .yml file.")
    if not path.is_file():
        raise ValueError(f"--config file {str(path)!r} does not exist.")
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise ValueError(f"--config file {str(path)!r}: use a .json, .yaml or .yml file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--config file {str(path)!r} is not UTF-8 text (byte {exc.start} cannot be decoded); "
                         "save it as UTF-8 JSON or YAML.") from None
    except OSError as exc:
        raise ValueError(f"--config file {str(path)!r} cannot be read ({exc.strerror or exc}).") from None
    try:
        data = _json_load(text) if path.suffix.lower() == ".json" else _yaml_load(text)
    except Exception as exc:  # noqa: BLE001 - json and yaml parse errors
        raise ValueError(f"--config file {str(path)!r} cannot be parsed ({type(exc).__name__}: {exc}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config file {str(path)!r} must hold a mapping of DPRPConfig fields (e.g. 'lr: 0.01'), "
                         f"but holds {_content(data)}.")
    return data if path.suffix.lower() == ".json" else _yaml_floats(data)  # YAML 1.1 reads 5e-3 as a string


def _coerce(name: str, kind: str, value: Any) -> Any:
    if kind == "list":
        items = []
        for v in value:
            items += [p.strip() for p in str(v).split(",") if p.strip()]
        return tuple(items)
    if kind == "bool":
        word = str(value).strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"--{name.replace('_', '-')} {value!r} is invalid: give true or false.")
    if kind == "optional_float":
        if str(value).strip().lower() in ("none", "null", ""):
            return None
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"--{name.replace('_', '-')} {value!r} is invalid: give a number or 'none'.") from None
    return value


def build_config(*, base: dict[str, Any] | None = None, preset: str | None = None, config_file: Path | None = None,
                 overrides: dict[str, Any] | None = None) -> DPRPConfig:
    """DPRPConfig from defaults < `base` (e.g. a run's config) < preset < config file < flags.

    Errors name the flag (``--epsilon``) or the config file that set the bad value.
    """
    from .app import config_flags

    kinds = {name: kind for name, _, kind in config_flags()}
    from ..config import PRESETS

    merged: dict[str, Any] = {k: v for k, v in (base or {}).items() if k != "version"}
    if preset is not None:
        if preset not in PRESETS:
            try:
                DPRPConfig.preset(preset)  # raises with a suggestion
            except ValueError as exc:
                raise ValueError(f"--preset: {exc}") from None
        merged.update(PRESETS[preset])
    file_data = _read_config_file(config_file) if config_file is not None else {}
    merged.update(file_data)
    flags = {k: _coerce(k, kinds.get(k, "str"), v) for k, v in (overrides or {}).items()}
    merged.update(flags)
    try:
        return DPRPConfig.from_dict(merged)
    except ValueError as exc:
        msg = str(exc)
        m = re.search(r"DPRPConfig\.(\w+)=", msg) or re.search(r"field '(\w+)'", msg)
        field = m.group(1) if m else None
        if field in flags:
            raise ValueError(f"invalid value for --{field.replace('_', '-')}: {msg}") from None
        if config_file is not None and (field in file_data or field is None):
            raise ValueError(f"--config file {str(config_file)!r}: {msg}") from None
        if preset is not None and field in PRESETS.get(preset, {}):
            raise ValueError(f"--preset {preset}: {msg}") from None
        raise ValueError(msg) from None


# ----------------------------------------------------------------------------- inspect
def run_inspect(*, model: str, input_size: str | None, scheme: str | None, include: list[str] | None,
                exclude: list[str] | None, arch: str | None, num_classes: int | None, trust_pickle: bool,
                json_out: bool) -> None:
    """`dprp inspect`."""
    with cli_errors():
        from ..surgery import factorize

        _refuse_pt2(model, "inspect")
        net, net_arch = _load(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
        recipe = data_recipe(net_arch, net)
        size = _input_size(net, recipe, input_size)
        _check_input_size(net, net_arch, size, input_size, own=_own_size(net, recipe))
        fields: dict[str, Any] = {}
        if scheme is not None:
            fields["scheme"] = scheme
        if include:
            fields["include"] = tuple(include)
        if exclude:
            fields["exclude"] = tuple(exclude)
        config = build_config(overrides=fields) if fields else DPRPConfig()
        as_loaded = _is_factorized(net)
        with _busy(f"{'Loading' if as_loaded else 'Factorizing'} {model} and counting its MACs ...", not json_out):
            target = net if as_loaded else factorize(net, config)
            example = torch.zeros(1, *size)
            summary = summarize(target, example)
        # SVD layers and layers an export realised in factorized form alike; at rank 1 a layer keeps h + w + 1
        # parameters plus its bias (dense_params - h w)
        layers = [r for r in summary.rows if r.status == "factorized"]
        rank1 = {r.name: r.max_compression for r in layers}
        best_params = summary.params - sum(r.params for r in layers) + sum(
            r.matrix[0] + r.matrix[1] + 1 + r.dense_params - r.matrix[0] * r.matrix[1] for r in layers)
        run_dir = Path(model).expanduser()
        if run_dir.is_dir() and (run_dir / "run.json").is_file():
            what = f"training checkpoint (SVD form; the exported model is {str(run_dir / 'model')!r})"
        else:
            what = "as loaded" if as_loaded else "factorized at full rank"
        if json_out:
            _emit_json({"model": model, "arch": net_arch, "input_size": list(size), "summarized": what,
                        "summary": summary.to_dict(), "rank1_compression": rank1, "params_at_rank1": best_params})
            return
        console = _out()
        console.print(summary.to_table(title=f"{model} ({net_arch}), {what}, input {tuple(size)}"))
        if layers and summary.dense_params:
            console.print(
                f"R(1): {len(layers)} factorized layers; at rank 1 everywhere the model would keep "
                f"{_si(best_params)} of {_si(summary.dense_params)} parameters "
                f"({1 - best_params / summary.dense_params:.1%} removable). Per-layer R(1): "
                + ", ".join(f"{n} {r:.0%}" for n, r in list(rank1.items())[:8])
                + (" ..." if len(rank1) > 8 else "") + " (all in --json).")


# ----------------------------------------------------------------------------- compress
def _loaders(train: TensorImageDataset, val: TensorImageDataset, recipe: DataRecipe, config: DPRPConfig
             ) -> tuple[TensorLoader, TensorLoader]:
    train_loader = TensorLoader(train, config.batch_size, shuffle=True, augment=recipe.augment, mean=recipe.mean,
                                std=recipe.std, seed=config.seed, drop_last=len(train) > config.batch_size)
    val_loader = TensorLoader(val, max(config.batch_size, 256), mean=recipe.mean, std=recipe.std)
    return train_loader, val_loader


def _match_classes(model: nn.Module, n_classes: int, pretrained: bool) -> nn.Module:
    outputs = infer_num_classes(model)
    if outputs is None or outputs == n_classes:
        return model
    if pretrained:
        _note(f"The model has {outputs} outputs but the data has {n_classes} classes: replacing its classifier by a "
              f"new {n_classes}-way head; its other weights are kept.")
    return set_num_classes(model, n_classes)


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _before_after_table(title: str, before: dict[str, Any], after: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("")
    table.add_column("before (dense)", justify="right")
    table.add_column("after (exported)", justify="right")
    table.add_column("change", justify="right")
    for key, label in (("params", "parameters"), ("macs", "MACs / image")):
        b, a = before.get(key), after.get(key)
        change = f"{a / b - 1:+.1%}" if a is not None and b else "-"
        table.add_row(label, _si(b), _si(a), change)
    for key, label in (("top1", "top-1 (%)"), ("top5", "top-5 (%)")):
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+.2f} pts" if a is not None and b is not None else "-"
        table.add_row(label, "-" if b is None else f"{b:.2f}", "-" if a is None else f"{a:.2f}", change)
    return table


def _device(config: DPRPConfig) -> torch.device:
    """The device training runs on (config.device, "auto" = CUDA when available)."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def _trainer_compress():
    try:
        from ..trainer import compress
    except ImportError as exc:  # pragma: no cover - the trainer ships with the package
        raise RuntimeError(f"the DPRP trainer (dprp_surgery.trainer) is not available: {exc}") from exc
    return compress


def _run_files(out: Path) -> list[str]:
    """The training files (checkpoint.pt, history.jsonl) already in run directory `out`."""
    from ..trainer import run_files

    return run_files(out)


_FACTORIZATION_FIELDS = ("scheme", "include", "exclude", "layer_types", "min_compressible")
"""Config fields that decide which layers are factorized and how: a checkpoint holds exactly those layers."""


def _check_same_factorization(info: dict[str, Any], model: str | None, base: dict[str, Any] | None,
                              config: DPRPConfig, run_json: Path) -> None:
    """Refuse, before anything is loaded or written, a --resume with another MODEL or factorization."""
    recorded = info.get("model")
    if model and recorded and _absolute_spec(model) != recorded:
        raise ValueError(f"MODEL {model!r} differs from the run's ({recorded!r} in {str(run_json)!r}): a run continues "
                         "with the model it started from. Leave MODEL out to resume, or start a new run in another "
                         "--out.")
    new = config.to_dict()
    for name in _FACTORIZATION_FIELDS:
        if base is not None and name in base and base[name] != new.get(name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} cannot change on --resume: the run was factorized with {name}={base[name]!r} "
                             f"({str(run_json)!r}) and its checkpoint holds those layers, not {name}={new[name]!r}. "
                             f"Drop {flag} to resume, or start a new run in another --out.")


def _remove_failed_start(out: Path, created: bool) -> None:
    """Delete RUN_DIR/run.json of a run that failed before its first epoch (and RUN_DIR if created and empty)."""
    with contextlib.suppress(OSError):
        (out / "run.json").unlink(missing_ok=True)
        if created:
            out.rmdir()  # only when empty


def compress_pipeline(*, model: nn.Module, arch: str, model_spec: str, data_spec: str, train: TensorImageDataset,
                      val: TensorImageDataset, recipe: DataRecipe, config: DPRPConfig, out: Path, export_mode: str,
                      objective: str, resume: Path | None, progress: bool, json_out: bool,
                      extra: dict[str, Any] | None = None, teacher: nn.Module | None = None,
                      emit_json: bool = True) -> dict[str, Any]:
    """Train with DPRP, export, save RUN_DIR/model and run.json, print the before/after table.

    The model is factorized before anything is written, and run.json (status "training", the layers'
    ``full_ranks``) is written before training starts. A fresh run that fails before its first epoch is
    recorded (no checkpoint.pt or history.jsonl yet) removes that run.json again (and RUN_DIR when it
    created it and it is empty), so the same --out can simply be used again.

    With `json_out`, the result is printed as JSON unless `emit_json` is False (the caller prints it, from
    ``info["json"]``, with more fields).
    """
    from ..export import export, save
    from ..surgery import factorize, keep_dense, svd_layers

    example = torch.zeros(1, *train.image_shape)
    train_loader, val_loader = _loaders(train, val, recipe, config)
    dense_summary = summarize(model, example)
    model = model.to(_device(config))
    with _busy("Factorizing the model ...", progress and not json_out):
        factorized = factorize(model, config)  # bad --include/--exclude fail here, before anything is written
    recorded = read_run_info(out).get("full_ranks") if resume is not None and (out / "run.json").is_file() else None
    if isinstance(recorded, dict):  # a run written when factorize took fewer layers continues with its own
        keep_dense(factorized, [n for n, _ in svd_layers(factorized) if n not in recorded], "dense in the run resumed")
    full_ranks = {n: m.full_rank for n, m in svd_layers(factorized)}
    if config.distill > 0 and teacher is None:
        teacher = model  # the model as given, as `compress` would use (it gets the factorized copy)
    if (extra or {}).get("new_head"):  # a new, untrained classifier: its top-1 before training is chance
        top1_b = top5_b = None
    else:
        top1_b, top5_b = evaluate(model, val_loader, progress and not json_out, "evaluating the model as given")
    before = {"params": dense_summary.params, "macs": dense_summary.macs, "top1": top1_b, "top5": top5_b}
    info: dict[str, Any] = {
        "format": RUN_FORMAT, "version": RUN_VERSION, "model": model_spec, "arch": arch,
        "num_classes": infer_num_classes(model), "data": data_spec, "classes": list(train.classes),
        "train_images": len(train), "val_images": len(val), "recipe": recipe.to_dict(),
        "input_size": list(example.shape[1:]), "config": config.to_dict(), "export_mode": export_mode,
        "objective": objective, "status": "training", "full_ranks": full_ranks, "results": {"before": before},
        **(extra or {}),
    }
    run_json = out / "run.json"
    previous = run_json.read_bytes() if resume is not None and run_json.is_file() else None
    checkpoint = out / "checkpoint.pt"
    stamp = checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None
    if resume is not None and run_json.is_file():
        old = read_run_info(out)
        info["results"]["before"] = (old.get("results") or {}).get("before") or before
        before = info["results"]["before"]
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(run_json, info)
    compress = _trainer_compress()
    t0 = time.perf_counter()
    try:
        result = compress(factorized, config, train_loader, val_loader, run_dir=out, resume=resume,
                          progress=progress, teacher=teacher)
    except BaseException:
        if resume is None and not _run_files(out):  # nothing recorded: leave no half-made run behind
            _remove_failed_start(out, created)
        elif previous is not None and (checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None) == stamp:
            write_bytes_atomic(run_json, previous)  # a refused resume (no epoch since) leaves the run as it was
        raise
    wall = time.perf_counter() - t0
    trained = result.model.eval()
    device = next(trained.parameters()).device
    layers = svd_layers(trained)
    with _busy(f"Exporting ({export_mode}, objective {objective}) ...", progress and not json_out):
        exported = export(trained, export_mode, objective=objective, example_inputs=example.to(device))
        artifact = save(exported, out / "model", arch=arch, config=config, input_size=list(example.shape[1:]))
    top1_a, top5_a = evaluate(exported, val_loader, progress and not json_out, "evaluating the exported model")
    after_summary = summarize(exported.to("cpu"), example)
    after = {"params": after_summary.params, "macs": after_summary.macs, "top1": top1_a, "top5": top5_a}
    info.update(status="done", wall_s=wall, artifact=str(artifact),
                full_ranks={n: m.full_rank for n, m in layers}, ranks={n: m.rank for n, m in layers},
                results={"before": before, "after": after})
    _write_json_atomic(run_json, info)
    payload = {"run_dir": str(out), "artifact": str(artifact), "before": before, "after": after,
               "ranks": info["ranks"], "wall_s": wall}
    if json_out:
        if emit_json:
            _emit_json(payload)
    else:
        console = _out()
        console.print(_before_after_table(f"{model_spec}: DPRP ({config.epochs} epochs, {len(train)} train / "
                                          f"{len(val)} val images, export {export_mode})", before, after))
        console.print(f"Run directory: {out}  (exported model: {artifact}; plots: dprp report {out})")
    return {**info, "json": payload}


def run_compress(*, model: str | None, data: str | None, out: Path | None, config_file: Path | None,
                 preset: str | None, resume: bool, limit_train: int | None, limit_val: int | None,
                 export_mode: str | None, objective: str | None, image_size: int | None, arch: str | None,
                 num_classes: int | None, trust_pickle: bool, quiet: bool, json_out: bool, overrides: dict[str, Any],
                 teacher: str | None = None, download: bool = False) -> None:
    """`dprp compress`.

    `export_mode`/`objective` None: the run's (RUN_DIR/run.json) with --resume, else auto/params.
    """
    with cli_errors():
        if out is None:
            raise ValueError("--out RUN_DIR is required: the run directory to write (or to resume with --resume).")
        _check_out_dir(out)
        base: dict[str, Any] | None = None
        resume_path = None
        recorded: dict[str, Any] = {}  # settings taken from RUN_DIR/run.json (not given now)
        run_json = out / "run.json"
        if resume:
            resume_path = out / "checkpoint.pt"
            if not resume_path.is_file():
                raise ValueError(f"--resume: {str(resume_path)!r} does not exist; start the run without --resume.")
            info = read_run_info(out)
            given = {"model": model, "data": data, "teacher": teacher}
            model = model or info.get("model")
            data = data or info.get("data")
            base = info.get("config") if isinstance(info.get("config"), dict) else None
            limit_train = limit_train or info.get("limit_train")
            limit_val = limit_val or info.get("limit_val")
            image_size = image_size or info.get("image_size")
            arch = arch or info.get("arch_flag")
            num_classes = num_classes or info.get("num_classes_flag")
            teacher = teacher or info.get("teacher")
            recorded = {k: v for k, v in (("model", model), ("data", data), ("teacher", teacher)) if v and not given[k]}
            for name, flag, choices in (("export_mode", "--export-mode", ("dense", "factorized", "auto")),
                                        ("objective", "--objective", ("params", "macs", "latency"))):
                if (export_mode if name == "export_mode" else objective) is not None:
                    continue
                value = info.get(name)
                if value is not None and value not in choices:
                    raise ValueError(f"{name} {value!r} in {str(run_json)!r} is not one of {', '.join(choices)}; "
                                     f"pass {flag} to override it.")
                if name == "export_mode":
                    export_mode = value
                else:
                    objective = value
        elif _run_files(out):
            raise ValueError(f"--out {str(out)!r} already holds a run ({', '.join(_run_files(out))}); pass --resume "
                             "to continue it, or choose another --out (or delete that directory) to start afresh.")
        elif out.is_dir() and any(out.iterdir()):  # the run's files would be mixed into someone's folder
            shown = ", ".join(sorted(p.name for p in out.iterdir())[:5])
            raise ValueError(f"--out {str(out)!r} exists and is not a dprp run directory (it holds {shown}); a run "
                             "writes checkpoint.pt, history.jsonl, run.json and model/ there. Choose a new or empty "
                             "--out.")
        export_mode = export_mode or "auto"
        objective = objective or "params"
        if not model:
            raise ValueError("MODEL is required (e.g. cifar:resnet20@cifar10_resnet20.th); see `dprp compress --help`.")
        if not data:
            raise ValueError("--data is required: a directory with train/ and val/ or test/, a .tar.gz, or "
                             "cifar10:DIR.")
        config = build_config(base=base, preset=preset, config_file=config_file, overrides=overrides)
        _check_device(config)
        if resume:
            _check_same_factorization(info, given["model"], base, config, run_json)
            done = _finished_epochs(out)
            if config.epochs < done:
                raise ValueError(f"--epochs {config.epochs} is lower than the {done} epochs the run in {str(out)!r} "
                                 f"has already finished; pass --epochs {done} or more to continue it (--epochs {done} "
                                 "only re-exports it), or start a new run in another --out.")
            if config.epochs == done and not quiet and not json_out:
                _note(f"The run in {out} has already finished its {done} epochs: nothing to train, it is only "
                      f"exported again. Pass --epochs {done + 1} or more to train it further.")
        if teacher and config.distill == 0:
            raise ValueError(f"--teacher {teacher!r} needs distillation: add --distill 0.5 (the weight of the "
                             "teacher's soft targets), or drop --teacher.")
        _refuse_pt2(model, "compress")  # before the teacher and the data are loaded
        source = run_json if resume else None
        with _recorded("the teacher", teacher, source if "teacher" in recorded else None, "--teacher"):
            teacher_net = _load_teacher(teacher, trust_pickle) if teacher else None  # bad input fails before data
        torch.manual_seed(config.seed)  # --seed covers a random init of MODEL (a spec without weights)
        with _recorded("MODEL", model, source if "model" in recorded else None, "MODEL"):
            net, net_arch = _load(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
        if net_arch.split(":", 1)[0] not in ARCH_KINDS:
            raise ValueError(f"cannot tell the architecture of {model!r}, so the compressed model could not be saved "
                             "without pickle; pass --arch timm:NAME, torchvision:NAME or cifar:NAME.")
        from ..export import layer_forms

        if any(e["form"] != "dense" for e in layer_forms(net).values()):  # a dense export: an ordinary model
            raise ValueError(f"{model!r} is already factorized; continue its run with --resume, or compress its "
                             f"dense export (dprp export {model} --mode dense --out DIR) or the original model.")
        recipe = data_recipe(net_arch, net)
        recorded_size = getattr(net, "_dprp_input_size", None)  # an artifact trains at the size it was made at
        if image_size is None and recorded_size and int(recorded_size[-1]) != recipe.image_size:
            recipe = DataRecipe(recipe.mean, recipe.std, int(recorded_size[-1]), recipe.augment,
                                "the input size recorded in MODEL")
        if image_size is not None:
            _check_input_size(net, net_arch, (3, image_size, image_size), str(image_size), flag="--image-size",
                              own=_own_size(net, recipe))
            recipe = DataRecipe(recipe.mean, recipe.std, image_size, recipe.augment, "--image-size")
        with _recorded("--data", data, source if "data" in recorded else None, "--data"):
            train, val = open_data(data, image_size=recipe.image_size, progress=not quiet and not json_out,
                                   download=download, train_limit=limit_train, eval_limit=limit_val,
                                   seed=config.seed)  # only the chosen images of a folder are decoded
        if image_size is None and not recorded_size:  # an artifact's own size is not the recipe's choice
            _note_upscaling(train, data, recipe, net_arch, "train")
        missing = sorted(set(range(train.num_classes)) - set(train.targets.tolist()))
        if missing and limit_train:  # a class-balanced subset smaller than the class count
            names = ", ".join(train.classes[i] for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            _note(f"--limit-train {limit_train} leaves {len(missing)} of the {train.num_classes} classes without a "
                  f"training image ({names}); pass at least --limit-train {train.num_classes}.")
        if train.num_classes < 2:
            raise ValueError(f"--data {data!r} has only one class ({', '.join(map(repr, train.classes))}): a "
                             "classifier trained on it predicts that class for everything and scores 100%. Give "
                             "data with at least two class subfolders.")
        pretrained = "@" in model or not model.startswith(ARCH_KINDS)
        replaced = getattr(net, NEW_HEAD_ATTR, None)  # --num-classes replaced the weights' classifier
        outputs = replaced or infer_num_classes(net)
        if (config.distill > 0 and teacher_net is None and pretrained and outputs is not None
                and (replaced or outputs != train.num_classes)):
            raise ValueError(f"--distill {config.distill:g} without --teacher would distil from MODEL itself, but "
                             f"MODEL's {outputs}-way classifier gets replaced by a new (random) "
                             f"{train.num_classes}-way head for the {train.num_classes} classes of the data; "
                             "pass --teacher MODEL, the dense model fine-tuned on DATA, or --distill 0.")
        new_head = outputs is not None and (bool(replaced) or outputs != train.num_classes)  # chance before training
        torch.manual_seed(config.seed)  # ... and of a new classifier
        net = _match_classes(net, train.num_classes, pretrained and num_classes is None)
        teacher_outputs = infer_num_classes(teacher_net) if teacher_net is not None else None
        if teacher_outputs is not None and teacher_outputs != train.num_classes:
            raise ValueError(f"--teacher {teacher!r} has {teacher_outputs} outputs but the data has "
                             f"{train.num_classes} classes; use a teacher trained on these classes (e.g. the dense "
                             "model fine-tuned on this data).")
        compress_pipeline(model=net, arch=net_arch, model_spec=_absolute_spec(model),
                          data_spec=_absolute_spec(data), train=train, val=val,
                          recipe=recipe, config=config, out=out, export_mode=export_mode, objective=objective,
                          resume=resume_path, progress=not quiet and not json_out, json_out=json_out,
                          extra={"limit_train": limit_train, "limit_val": limit_val, "image_size": image_size,
                                 "arch_flag": arch, "num_classes_flag": num_classes,
                                 "teacher": _absolute_spec(teacher), "new_head": new_head}, teacher=teacher_net)


def _run_classes(model: str) -> tuple[Path | None, list[str] | None]:
    """The run directory of a run or its RUN_DIR/model artifact, and the class names it recorded."""
    run = Path(model)
    if not (run / "run.json").is_file() and (run.parent / "run.json").is_file() and run.name == "model":
        run = run.parent  # RUN_DIR/model: the run's artifact
    if not (run / "run.json").is_file():
        return None, None
    with contextlib.suppress(ValueError, OSError):
        trained = read_run_info(run).get("classes")
        if isinstance(trained, list) and trained and all(isinstance(c, str) for c in trained):
            return run, list(trained)
    return run, None


def _check_trained_classes(model: str, classes: list[str], data: str, recorded: list[str] | None = None) -> None:
    """Note when a run's (or a graph's recorded) class names differ from the data's (labels match by position)."""
    run, trained = (Path(model), recorded) if recorded else _run_classes(model)
    if trained and list(trained) != list(classes):
        differ = next(i for i, (a, b) in enumerate(zip([*trained, None], [*classes, None])) if a != b)
        _note(f"The classes of {data} differ from those {run} was trained on (first at position {differ}: "
              f"{classes[differ] if differ < len(classes) else '-'!r} against "
              f"{trained[differ] if differ < len(trained) else '-'!r}): label i is the data's i-th class folder "
              "in sorted order, so renamed or reordered classes are scored against the wrong outputs.")


def _load_teacher(spec: str, trust_pickle: bool) -> nn.Module:
    """The --teacher model (any MODEL form but a .pt2 program or an ONNX file)."""
    graph = {".pt2": "a .pt2 program", ".onnx": "an ONNX file"}.get(Path(spec).suffix.lower())
    if graph:  # torch.export programs cannot be put in eval mode or copied like modules; ONNX runs outside torch
        raise ValueError(f"--teacher {spec!r}: {graph} cannot be a teacher; give a dprp artifact or run "
                         "directory, a state dict with its architecture (timm:NAME@FILE), or a model spec.")
    return _load(spec, arch=None, num_classes=None, trust_pickle=trust_pickle)[0]


# ----------------------------------------------------------------------------- export
def run_export(*, source: str, out: Path, mode: str, fmt: str, objective: str, input_size: str | None,
               arch: str | None, trust_pickle: bool, json_out: bool) -> None:
    """`dprp export`."""
    with cli_errors():
        from ..export import check_output, layer_forms, save, to_onnx, to_pt2
        from ..export import export as export_model

        _check_out_suffix(out, fmt)
        check_output(out, fmt, what="--out")
        net, net_arch = _load(source, arch=arch, num_classes=None, trust_pickle=trust_pickle)
        recipe = data_recipe(net_arch, net)
        size = _input_size(net, recipe, input_size)
        if input_size is None and Path(source).is_dir() and (Path(source) / "run.json").is_file():
            recorded = read_run_info(source).get("input_size")
            size = tuple(recorded) if recorded else size
        _check_input_size(net, net_arch, size, input_size, own=_own_size(net, recipe))
        example = torch.zeros(1, *size)
        if mode != "dense" and not _is_factorized(net):
            _note(f"{source} has no factorized layers (it was not compressed), so --mode {mode} writes it "
                  "unchanged; compress it first (dprp compress) to get a smaller model.")
        with _busy(f"Exporting {source} ({mode}, {fmt}) ...", not json_out):
            exported = export_model(net, mode, objective=objective, example_inputs=example)
            params = count_params(exported)
            macs, _ = _macs(exported, example)
            if fmt == "safetensors":
                rebuildable = net_arch if net_arch.split(":", 1)[0] in ARCH_KINDS else None
                path = save(exported, out, arch=rebuildable, config=getattr(net, "_dprp_config", None),
                            input_size=list(size))
            else:  # what running the graph needs: the input size (recorded by both) and the normalisation;
                # and its size, which `dprp eval` cannot count in an ONNX graph
                meta = {"arch": net_arch, "mean": list(recipe.mean), "std": list(recipe.std), "params": params,
                        "macs": macs}
                if (classes := _run_classes(source)[1]) is not None:
                    meta["classes"] = classes  # for dprp eval's check of the data's class order
                path = (to_onnx if fmt == "onnx" else to_pt2)(exported, out, example, metadata=meta)
        forms: dict[str, int] = {}
        for entry in layer_forms(exported).values():
            forms[entry["form"]] = forms.get(entry["form"], 0) + 1
        result = {"source": source, "arch": net_arch, "mode": mode, "objective": objective, "format": fmt,
                  "out": str(path), "input_size": list(size), "layers": forms, "params": params, "macs": macs}
        if json_out:
            _emit_json(result)
        else:
            listed = ", ".join(f"{v} {k}" for k, v in forms.items()) or "none factorized"
            if net_arch.startswith("pt2:"):
                listed = "not listed (a .pt2 program's layers are graph operations)"
            _out().print(f"Wrote {fmt} to {path}: {params:,} parameters, {_si(macs)} MACs per image; layers {listed}.")


# ----------------------------------------------------------------------------- eval
def _note_upscaling(ds: TensorImageDataset, data: str, recipe: DataRecipe, arch: str, verb: str) -> None:
    """Note when the recipe's input size enlarges the data's images to 4x their pixels or more (and the compute)."""
    stored, size = ds.source_size, recipe.image_size
    if stored is None or size is None or size * size < 4 * stored[0] * stored[1]:
        return
    h, w = stored
    _note(f"The images of {data} are {w}x{h}; they are resized to {size}x{size}, the input size of {arch} "
          f"({recipe.source}): {size * size / (h * w):.0f}x the pixels, and about as much more compute per image. "
          f"Pass --image-size {max(h, w)} to {verb} at their own size (a model pretrained at {size} px may then "
          "score lower).")


def _check_onnx_inputs(net: nn.Module, model: str) -> None:
    """Refuse, before the data is decoded, an ONNX graph `dprp eval` cannot feed (several inputs, no CHW size)."""
    from ..export import OnnxRuntimeModel

    if not isinstance(net, OnnxRuntimeModel):
        return
    if net.num_inputs != 1:
        raise ValueError(f"{model!r} takes {net.num_inputs} inputs ({', '.join(net.input_names)}); dprp eval feeds "
                         "one batch of images: evaluate a graph with a single image input.")
    shape = net.input_shape[1:]
    channels_last = len(shape) == 3 and shape[2] in (1, 3, 4) and shape[0] not in (None, 1, 3, 4)
    if len(shape) != 3 or channels_last:
        looks = " (it looks channels last, NHWC)" if channels_last else ""
        raise ValueError(f"{model!r} takes input of shape {net.input_shape_text}{looks}, not (N, C, H, W) "
                         "images; dprp eval feeds NCHW image batches.")


def _check_onnx_image_shape(net: nn.Module, model: str, image: tuple[int, ...], image_size: int | None) -> None:
    """Refuse decoded images of another size than an ONNX graph's fixed input, saying which size it takes."""
    from ..export import OnnxRuntimeModel

    if not isinstance(net, OnnxRuntimeModel):
        return
    wanted = net.input_shape[1:]
    if all(w is None or w == d for w, d in zip(wanted, image)):
        return
    c, h, w = wanted
    if c is not None and c != image[0]:
        raise ValueError(f"{model!r} takes {c}-channel images (input {net.input_shape_text}); the data has "
                         f"{image[0]} channels.")
    if h is not None and w is not None and h != w:
        raise ValueError(f"{model!r} takes {h}x{w} images (input {net.input_shape_text}); dprp eval decodes "
                         "square images only: export the model at a square input size.")
    size = h or w
    how = f"drop --image-size {image_size} or pass --image-size {size}" if image_size else f"pass --image-size {size}"
    raise ValueError(f"{model!r} takes {size}x{size} images (input {net.input_shape_text}), but the images "
                     f"were decoded at {image[1]}x{image[2]}: {how}.")


def _size_of(model: nn.Module, example: torch.Tensor) -> tuple[int, str, int | None]:
    """(parameters, where that number comes from, MACs per image or None) of a model `dprp eval` measures."""
    from ..export import OnnxRuntimeModel

    if not isinstance(model, OnnxRuntimeModel):
        return count_params(model), "counted", _macs(model, example)[0]
    meta = model.metadata

    def recorded(key: str) -> int | None:
        v = meta.get(key)
        return v if type(v) is int and v >= 0 else None

    params = recorded("params")
    if params is None:
        return model.stored_values, "onnx initializers", None  # a graph's MACs are not counted here
    return params, "recorded at export", recorded("macs")


def run_eval(*, model: str, data: str, limit: int | None, batch_size: int, latency: bool, latency_runs: int = 5,
             image_size: int | None,
             arch: str | None, num_classes: int | None, trust_pickle: bool, json_out: bool,
             download: bool = False) -> None:
    """`dprp eval`."""
    with cli_errors():
        spec = model
        if Path(model).is_dir() and (Path(model) / "run.json").is_file() and (Path(model) / "model").is_dir():
            spec = str(Path(model) / "model")  # the exported artifact is what gets deployed
            _note(f"Evaluating the exported model {spec}.")
        net, net_arch = _load(spec, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, onnx=True)
        if (own := getattr(net, NEW_HEAD_ATTR, None)) is not None:
            raise ValueError(f"--num-classes {num_classes} replaces the {own}-way classifier of {model!r} by a new, "
                             "untrained one, whose accuracy means nothing; drop --num-classes to evaluate the weights "
                             "as they are.")
        _set_training(net, False)
        _check_onnx_inputs(net, model)
        recipe = data_recipe(net_arch, net)
        trained = getattr(net, "_dprp_input_size", None)  # the size an artifact was compressed at
        size = image_size or (int(trained[-1]) if trained else recipe.image_size)
        _, val = open_data(data, image_size=size, progress=not json_out, download=download, eval_limit=limit,
                           train_limit=0)  # the training split is not evaluated (nor needed)
        if image_size is None and not trained:
            _note_upscaling(val, data, recipe, net_arch, "evaluate")
        outputs = infer_num_classes(net)
        if outputs is not None and outputs < val.num_classes:
            raise ValueError(f"the model has {outputs} outputs but {data!r} has {val.num_classes} classes; evaluate it "
                             "on data with the classes it was trained on.")
        if outputs is not None and outputs > val.num_classes:
            shown = ", ".join(val.classes[:3]) + (", ..." if val.num_classes > 3 else "")
            _note(f"The model has {outputs} outputs but {data} has {val.num_classes} classes: label i is the data's "
                  f"i-th class folder in sorted order ({shown}), "
                  f"and a prediction of any of the other {outputs - val.num_classes} outputs counts as wrong. "
                  "Check the model was trained with this class order.")
        _check_onnx_image_shape(net, model, tuple(val.image_shape), image_size)
        _check_trained_classes(model, val.classes, data, getattr(net, CLASSES_ATTR, None))
        kind = net_arch.split(":", 1)[0]
        program = kind in ("pt2", "onnx")
        if program and recipe.source == "ImageNet defaults":
            _note(f"{model} records no normalisation (`dprp export --format {kind}` records it): the images are "
                  "normalised with ImageNet's mean and std, which may not be what the model was trained with.")
        loader = TensorLoader(val, batch_size, mean=recipe.mean, std=recipe.std)
        try:
            top1, top5 = evaluate(net, loader, progress=not json_out)
        except Exception as exc:
            if program and "guard" in str(exc).lower() and ".size()[0]" in str(exc):  # a fixed batch size
                raise ValueError(f"{model!r} (a torch.export program) was exported for a fixed batch size "
                                 f"({_first_line(exc)}); re-export it with a dynamic batch (`dprp export --format "
                                 "pt2` writes one).") from None
            if program and "guard" in str(exc).lower():  # a program exported for another input size
                raise ValueError(f"{model!r} (a torch.export program) does not take {tuple(val.image_shape)} images "
                                 f"({_first_line(exc)}); pass --image-size N with the size it was exported at."
                                 ) from None
            raise
        example = torch.zeros(1, *val.image_shape)
        params, params_source, macs = _size_of(net, example)
        result: dict[str, Any] = {"model": model, "arch": net_arch, "data": data, "images": len(val), "top1": top1,
                                  "top5": top5, "params": params, "params_source": params_source, "macs": macs,
                                  "runtime": "onnxruntime" if kind == "onnx" else "pytorch"}
        if latency:
            if (fixed := getattr(net, "fixed_batch", None)) is not None:
                _note(f"{model} was exported with a fixed batch of {fixed}: each timed batch runs in slices of "
                      f"{fixed} (batch 1 padded to {fixed}); export it with a dynamic batch to time batch 1 itself.")
            g = torch.Generator().manual_seed(0)
            for b in (1, 64):
                x = torch.randn(b, *val.image_shape, generator=g)
                with _busy(f"Timing batch {b} ...", not json_out):
                    result[f"latency_ms_b{b}"] = 1000 * measure_latency(net, x, runs=latency_runs)
            result["threads"] = torch.get_num_threads()
        if json_out:
            _emit_json(result)
            return
        table = Table(title=f"{model} on {data} ({len(val)} images)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("top-1 (%)", f"{top1:.2f}")
        table.add_row("top-5 (%)", f"{top5:.2f}")
        table.add_row({"counted": "parameters", "recorded at export": "parameters (recorded at export)",
                       "onnx initializers": "stored values (ONNX initializers)"}[params_source], f"{params:,}")
        table.add_row("MACs / image" + (" (recorded at export)" if kind == "onnx" and macs is not None else ""),
                      _si(macs))
        table.add_row("runtime", result["runtime"])
        if latency:
            table.add_row("latency batch 1 (ms)", f"{result['latency_ms_b1']:.2f}")
            table.add_row("latency batch 64 (ms)", f"{result['latency_ms_b64']:.1f}")
        _out().print(table)


# ----------------------------------------------------------------------------- report
def run_report(*, run_dir: Path, json_out: bool) -> None:
    """`dprp report`."""
    with cli_errors():
        from ..report import make_report

        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"RUN_DIR {str(run_dir)!r} is a file, not a run directory; pass the directory given as "
                             "--out to `dprp compress`.")
        if not run_dir.is_dir():
            raise ValueError(f"run directory {str(run_dir)!r} does not exist; pass the --out of `dprp compress`.")
        try:
            check_writable(run_dir, "RUN_DIR")
        except ValueError as exc:
            raise ValueError(f"{str(exc).split('; choose')[0]}; `dprp report` writes report.md and its plots into "
                             "RUN_DIR: copy the run directory somewhere writable and report the copy.") from None
        report = make_report(run_dir)
        plots = [p.name for p in report.plots]
        if json_out:
            _emit_json({"report": str(report.path), "plots": [str(p) for p in report.plots]})
        else:
            _out().print(f"Wrote {report.path} and {len(plots)} plots" + (f": {', '.join(plots)}" if plots else "."))


# ----------------------------------------------------------------------------- demo
DEMO_TRAIN, DEMO_TEST = 2000, 1000
DEMO_CONFIG: dict[str, Any] = {"batch_size": 128, "seed": 0, "prune_every": 5, "lambda_comp": 20.0, "epsilon": 0.5,
                               "reg_cooldown_epochs": 0}
"""Overrides of the "tuned" preset used by `dprp demo`: it has only ~15 steps per epoch, so it prunes every 5
steps, pushes harder (lambda_comp 20, epsilon 0.5) and prunes until the end, to show rank pruning within minutes."""


def _demo_archive() -> Path | None:
    env = os.environ.get("DPRP_DEMO_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise ValueError(f"$DPRP_DEMO_DATA={env!r} does not exist; unset it or point it at cifar10-jpeg.tar.gz.")
        return p
    p = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
    return p if p.is_file() else None


def _decode(data: bytes) -> torch.Tensor:
    import io as _io

    import numpy as np
    from PIL import Image

    with Image.open(_io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB").resize((32, 32)) if im.size != (32, 32) else im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _balanced_from_members(items: Iterator[tuple[str, str, bytes | None]], quota: dict[str, int]
                           ) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Take the first images of every class per split from (split, class, bytes) items."""
    from ..data import IMG_EXTENSIONS  # noqa: F401 - extensions are checked by the callers

    got: dict[str, dict[str, list[torch.Tensor]]] = {"train": {}, "test": {}}
    for split, cls, payload in items:
        per = got[split].setdefault(cls, [])
        if len(per) < quota[split] and payload is not None:
            per.append(_decode(payload))
    out = []
    classes = sorted(set(got["train"]) & set(got["test"]))
    if len(classes) < 2:
        raise ValueError("the demo data has fewer than two classes in both train/ and test/.")
    for split in ("train", "test"):
        images, targets = [], []
        for i, c in enumerate(classes):
            images += got[split][c]
            targets += [i] * len(got[split][c])
        out.append(TensorImageDataset(torch.stack(images), torch.tensor(targets), classes))
    return out[0], out[1]


def _demo_split(parts: Sequence[str]) -> tuple[str, str] | None:
    """(split, class) of an archive/directory path .../train|test|val/<class>/<file>."""
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1] in ("train", "test", "val"):
            return ("train" if parts[i - 1] == "train" else "test"), parts[i]
    return None


def _demo_cifar(source: Path) -> tuple[TensorImageDataset, TensorImageDataset]:
    """A class-balanced subset (2,000 train / 1,000 test) read straight from the archive or folder."""
    from ..data import IMG_EXTENSIONS

    n_classes_guess = 10
    quota = {"train": DEMO_TRAIN // n_classes_guess, "test": DEMO_TEST // n_classes_guess}

    def from_tar() -> Iterator[tuple[str, str, bytes | None]]:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.lower().endswith(IMG_EXTENSIONS):
                    continue
                where = _demo_split(Path(member.name).parts)
                if where is None:
                    continue
                f = tar.extractfile(member)
                yield where[0], where[1], f.read() if f is not None else None

    def from_dir() -> Iterator[tuple[str, str, bytes | None]]:
        for split_name in ("train", "test", "val"):
            split_dir = source / split_name
            if not split_dir.is_dir():
                continue
            for cls_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                files = sorted(p for p in cls_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
                key = "train" if split_name == "train" else "test"
                for p in files[: quota[key]]:
                    yield key, cls_dir.name, p.read_bytes()

    try:
        return _balanced_from_members(from_tar() if source.is_file() else from_dir(), quota)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"cannot read the demo data {str(source)!r} ({type(exc).__name__}: {exc}).") from None


def synthetic_dataset(n_train: int | None = None, n_test: int | None = None, n_classes: int = 10, seed: int = 0
                      ) -> tuple[TensorImageDataset, TensorImageDataset]:
    """A SYNTHETIC 10-class set of 32x32 images: per class an oriented colour grating, plus noise and jitter."""
    n_train = DEMO_TRAIN if n_train is None else n_train
    n_test = DEMO_TEST if n_test is None else n_test
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    classes = [f"synthetic-{i}" for i in range(n_classes)]

    def make(n: int) -> TensorImageDataset:
        targets = torch.arange(n) % n_classes
        angle = targets.float() * math.pi / n_classes + 0.15 * torch.randn(n, generator=g)
        freq = 0.25 + 0.05 * (targets % 3).float()
        phase = 2 * math.pi * torch.rand(n, generator=g)
        direction = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
        wave = torch.sin(freq[:, None, None] * direction + phase[:, None, None])
        hue = torch.stack([(targets % 3 == c).float() * 0.5 + 0.25 for c in range(3)], 1)
        img = 0.5 + 0.35 * wave[:, None] * hue[:, :, None, None] + 0.12 * torch.randn(n, 3, 32, 32, generator=g)
        return TensorImageDataset((img.clamp(0, 1) * 255).round().to(torch.uint8), targets, classes)

    return make(n_train), make(n_test)


def run_demo(*, out: Path, epochs: int, quiet: bool, json_out: bool) -> None:
    """`dprp demo`."""
    with cli_errors():
        from ..io import build_arch
        from ..report import make_report

        _check_out_dir(out)
        if _run_files(out):
            raise ValueError(f"--out {str(out)!r} already holds a run ({', '.join(_run_files(out))}); choose "
                             "another --out or delete that directory.")
        torch.manual_seed(0)
        source = _demo_archive()
        if source is not None:
            train, val = _demo_cifar(source)
            data_spec = f"demo: CIFAR-10 JPEG subset of {source} ({len(train)} train / {len(val)} test)"
        else:
            train, val = synthetic_dataset()
            data_spec = "demo: SYNTHETIC procedural 10-class dataset (no CIFAR-10 archive found)"
            _note("No CIFAR-10 archive found ($DPRP_DEMO_DATA or ../shared/datasets/cifar10-jpeg.tar.gz): using a "
                  "SYNTHETIC 10-class dataset. Its accuracies say nothing about real data.")
        weights = REPO.parent / "shared" / "models" / "cifar10_resnet20.th"
        if weights.is_file() and train.num_classes == 10:
            model_spec = f"cifar:resnet20@{weights}"
            net, net_arch = load_model(model_spec)
        else:
            model_spec = "cifar:resnet20 (random init)"
            net, net_arch = build_arch("cifar:resnet20", train.num_classes), "cifar:resnet20"
            _note("Pretrained ResNet-20 weights not found: starting from a random initialisation.")
        if not json_out:
            _err().print(f"[bold]dprp demo[/bold]: {escape(model_spec)} on {escape(data_spec)}, {epochs} epochs.")
        # the tuned preset: pretrained factors at 1/20 of the lr (a step on U or V moves W about s^2 times
        # further than a dense step), singular values at 10x, L_comp strong enough to act within minutes
        config = DPRPConfig.preset("tuned", **DEMO_CONFIG, epochs=epochs)
        recipe = data_recipe(net_arch, net)
        info = compress_pipeline(model=net, arch=net_arch, model_spec=model_spec, data_spec=data_spec, train=train,
                                 val=val, recipe=recipe, config=config, out=out, export_mode="auto",
                                 objective="params", resume=None, progress=not quiet and not json_out,
                                 json_out=json_out, extra={"demo": True, "synthetic": source is None},
                                 emit_json=False)
        report = make_report(out)
        if json_out:
            _emit_json({**info["json"], "report": str(report.path), "plots": [str(p) for p in report.plots],
                        "synthetic": source is None})
        else:
            _out().print(f"Report: {report.path} (plots: {', '.join(p.name for p in report.plots)})")
