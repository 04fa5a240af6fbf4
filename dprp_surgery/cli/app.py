"""The ``dprp`` typer app: command wiring and options only.

Every command imports its implementation (and torch) from :mod:`dprp_surgery.cli.commands` when it
runs, so ``dprp --help`` stays fast. Options shared by several commands are ``Annotated`` aliases
defined once below; the DPRP config flags of ``dprp compress`` are generated from the fields of
:class:`~dprp_surgery.config.DPRPConfig`, so they never drift from it.
"""

import dataclasses
import inspect
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..config import DPRPConfig

__all__ = ["app", "main", "CONFIG_FLAG_PREFIX"]

app = typer.Typer(
    name="dprp",
    help=(
        "Compress PyTorch CNNs by Dynamic Parameter Rank Pruning (DPRP): SVD surgery, training with rank "
        "pruning, and export to dense/factorized models, safetensors artifacts, ONNX and .pt2.\n\n"
        "Start with `dprp demo`, or `dprp inspect cifar:resnet20`.\n\n"
        "Exit codes: 0 success, 2 bad usage or input, 1 failure during the work (DPRP_DEBUG=1 shows the "
        "traceback), 130 interrupted (Ctrl-C)."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

MODEL_FORMS = (
    "timm:NAME[@WEIGHTS], torchvision:NAME[@WEIGHTS], cifar:NAME[@WEIGHTS] "
    "(weights: .safetensors/.pth/.pt/.bin/.th/.ckpt), "
    "a dprp artifact directory, a run directory, or a pickled module (with --trust-pickle)"
)
RUNNABLE_FORMS = f"{MODEL_FORMS}; or a .pt2 file (torch.export program)"
"""What `dprp export` also takes: a .pt2 runs, but holds no Conv/Linear modules to factorize."""
EVAL_FORMS = f"{RUNNABLE_FORMS}; or a .onnx file (run in onnxruntime)"
"""What `dprp eval` takes: also an ONNX file, the form most models are shipped in."""


class ExportMode(str, Enum):
    dense = "dense"
    factorized = "factorized"
    auto = "auto"


class Objective(str, Enum):
    params = "params"
    macs = "macs"
    latency = "latency"


class Format(str, Enum):
    safetensors = "safetensors"
    onnx = "onnx"
    pt2 = "pt2"


# ----------------------------------------------------------------------------- shared options
ModelArg = Annotated[str, typer.Argument(help=f"The model: {MODEL_FORMS}.", show_default=False)]
RunnableModelArg = Annotated[str, typer.Argument(help=f"The model: {RUNNABLE_FORMS}.", show_default=False)]
EvalModelArg = Annotated[str, typer.Argument(help=f"The model: {EVAL_FORMS}.", show_default=False)]
EvalDataOpt = Annotated[str, typer.Option(
    "--data", "-d", help="Dataset to evaluate on: a directory with a val/ or test/ ImageFolder (train/ is not "
    "needed), a .tar.gz of one, or cifar10:DIR / cifar100:DIR.", show_default=False)]
ArchOpt = Annotated[str | None, typer.Option(
    "--arch", help="Architecture of a bare state-dict file given as MODEL (timm:NAME, torchvision:NAME, "
    "cifar:NAME); also recorded when exporting a pickled model.")]
NumClassesOpt = Annotated[int | None, typer.Option(
    "--num-classes", min=1, help="Classifier outputs when building the architecture (default: the weights' or "
    "the dataset's); with weights whose classifier has another class count, the other weights are loaded and the "
    "classifier is a new one.")]
TrustPickleOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow loading a whole pickled module (torch.save(model)). Unpickling runs arbitrary code "
    "from the file: use it only for files you trust.")]
InputSizeOpt = Annotated[str | None, typer.Option(
    "--input-size", help="Input shape C,H,W of one image (e.g. 3,32,32; a single number means 3,N,N). Default: the "
    "model's recipe (CIFAR 32, timm pretrained_cfg, torchvision 224).")]
ImageSizeOpt = Annotated[int | None, typer.Option(
    "--image-size", min=1, help="Resize images to this square size at decode time (default: the model's recipe).")]
DownloadOpt = Annotated[bool, typer.Option(
    "--download", help="Let torchvision download CIFAR into DIR when --data cifar10:DIR / cifar100:DIR is missing "
    "(needs the network; without it nothing is ever downloaded).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ModeOpt = Annotated[ExportMode, typer.Option(
    "--mode", "-m", help="dense: original layers (loads strictly into the original architecture); factorized: two "
    "standard layers per SVD layer; auto: per layer the cheaper of the two by --objective.", case_sensitive=False)]
ObjectiveOpt = Annotated[Objective, typer.Option(
    "--objective", help="What --mode auto minimises per layer: params, macs or measured latency.",
    case_sensitive=False)]
SchemeOpt = Annotated[str | None, typer.Option(
    "--scheme", help="Matricization of k x k convs: paper, channel or spatial (default: paper).")]
IncludeOpt = Annotated[list[str] | None, typer.Option(
    "--include", help="Glob of layer names to factorize (repeatable).")]
ExcludeOpt = Annotated[list[str] | None, typer.Option(
    "--exclude", help="Glob of layer names to keep dense (repeatable).")]


# ----------------------------------------------------------------------------- commands
@app.command("inspect", epilog=(
    "Examples:\n\n"
    "    dprp inspect cifar:resnet20\n\n"
    "    dprp inspect timm:resnet18 --input-size 3,224,224 --scheme channel\n\n"
    "    dprp inspect weights.pth --arch timm:resnet50 --json"))
def inspect_cmd(
    model: ModelArg,
    input_size: InputSizeOpt = None,
    scheme: SchemeOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Show every layer DPRP would factorize: scheme, rank, parameters, MACs and R(1).

    The model is factorized at full rank (a copy; nothing is written) and summarised for one input
    image; R(1) is the most each layer can save (compression at rank 1, eqs. (4)/(7)). Models that
    are already factorized (run directories, artifacts) are summarised as they are.
    """
    from .commands import run_inspect

    run_inspect(model=model, input_size=input_size, scheme=scheme, include=include, exclude=exclude, arch=arch,
                num_classes=num_classes, trust_pickle=trust_pickle, json_out=json_out)


CONFIG_FLAG_PREFIX = "cfg_"
_CONFIG_PANEL = "DPRP config (each overrides --config and --preset)"


def _field_docs() -> dict[str, str]:
    """Per-field help from the 'Attributes:' section of DPRPConfig's docstring."""
    doc = inspect.getdoc(DPRPConfig) or ""
    section = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    out: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        m = re.match(r"^    (\w+): (.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.startswith("        "):
            out[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return out


def _choices(name: str) -> tuple | None:
    from .. import config as config_module

    table = {"scheme": "SCHEMES", "regularizer": "REGULARIZERS", "optimizer": "OPTIMIZERS",
             "lr_schedule": "LR_SCHEDULES", "prune_unit": "PRUNE_UNITS", "layer_types": "LAYER_TYPES",
             "comp_weighting": "COMP_WEIGHTINGS", "factor_step": "FACTOR_STEPS"}
    value = getattr(config_module, table.get(name, ""), None)
    return tuple(value) if isinstance(value, (tuple, list)) else None


def config_flags() -> list[tuple[str, str, str]]:
    """(field name, flag, kind) of every DPRPConfig field offered on the command line.

    kind is "int", "float", "str", "bool" (a value: true or false), "list" (repeatable) or "optional_float"
    (a number or 'none').
    """
    out = []
    for f in dataclasses.fields(DPRPConfig):
        if f.name == "version":
            continue
        t = str(f.type).replace(" ", "")
        if t.startswith("tuple[str") or t.startswith("list[str"):
            kind = "list"
        elif t in ("float|None", "Optional[float]", "int|None"):
            kind = "optional_float"
        elif t in ("int", "float", "str", "bool"):
            kind = t
        else:
            kind = "str"
        out.append((f.name, "--" + f.name.replace("_", "-"), kind))
    return out


def _config_parameters() -> list[inspect.Parameter]:
    """Keyword-only typer parameters for every DPRPConfig field (default None = not given)."""
    docs = _field_docs()
    defaults = DPRPConfig().to_dict()
    params = []
    py_types: dict[str, Any] = {"int": Optional[int], "float": Optional[float], "str": Optional[str],
                                "bool": Optional[str], "list": Optional[list[str]], "optional_float": Optional[str]}
    for name, flag, kind in config_flags():
        text = docs.get(name, "")
        choices = _choices(name)
        if choices:
            text += f" Choices: {', '.join(choices)}."
        if kind == "list":
            text += " Repeatable; commas also separate values."
        if kind == "optional_float":
            text += " A number, or 'none'."
        if kind == "bool":  # a value, not a --x/--no-x pair: the pair's second column truncates 80-column help
            text += " true or false."
        default = defaults.get(name)
        shown = (", ".join(default) or "none") if isinstance(default, list) else default
        text += f" (config default: {shown})"
        option = typer.Option(flag, help=text, show_default=False, rich_help_panel=_CONFIG_PANEL)
        params.append(inspect.Parameter(CONFIG_FLAG_PREFIX + name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[py_types[kind], option]))
    return params


def _preset_names() -> list[str]:
    from ..config import PRESETS

    return list(PRESETS)


def compress_cmd(
    model: Annotated[str | None, typer.Argument(
        help=f"The model to compress: {MODEL_FORMS}. An artifact or run that is still factorized is not compressed "
        "again: continue its run with --resume, or give its dense export (dprp export --mode dense). Optional with "
        "--resume (taken from RUN_DIR/run.json).",
        show_default=False)] = None,
    data: Annotated[str | None, typer.Option(
        "--data", "-d", help="Dataset: a directory with train/ and val/ or test/ ImageFolders, a .tar.gz of one, "
        "or cifar10:DIR / cifar100:DIR. Optional with --resume.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Run directory: checkpoint.pt, history.jsonl, run.json and the exported model/.",
        show_default=False)] = None,
    config_file: Annotated[Path | None, typer.Option(
        "--config", "-c", help="DPRP config file (.yaml, .yml or .json); overrides --preset.")] = None,
    preset: Annotated[str | None, typer.Option(
        "--preset", help=f"Named DPRPConfig preset: {', '.join(_preset_names())}.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --out from its checkpoint.pt (model, data, teacher, config, "
        "--limit-train/--limit-val, --image-size, --arch, --num-classes, --export-mode and --objective from "
        "run.json; flags given now override them, except MODEL, --scheme, --include, --exclude, --layer-types and "
        "--min-compressible, which must match the run's; --trust-pickle must be given again). --epochs must be at "
        "least the epochs already finished.")] = False,
    limit_train: Annotated[int | None, typer.Option(
        "--limit-train", min=1, help="Use a class-balanced subset of this many training images (quick runs; "
        "of an image folder only these are decoded).")] = None,
    limit_val: Annotated[int | None, typer.Option(
        "--limit-val", min=1, help="Use a class-balanced subset of this many validation images.")] = None,
    teacher: Annotated[str | None, typer.Option(
        "--teacher", help=f"Distillation teacher for --distill ({MODEL_FORMS}; same classes and preprocessing as "
        "MODEL), e.g. the dense model fine-tuned on DATA. Default: MODEL as given.", show_default=False)] = None,
    export_mode: Annotated[ExportMode | None, typer.Option(
        "--export-mode", help="Form of the exported model written to RUN_DIR/model (see `dprp export --help`). "
        "Default: auto; with --resume the run's (from run.json), which a flag given now overrides.",
        case_sensitive=False, show_default=False)] = None,
    objective: Annotated[Objective | None, typer.Option(
        "--objective", help="What --export-mode auto minimises per layer: params, macs or measured latency. "
        "Default: params; with --resume the run's (from run.json), which a flag given now overrides.",
        case_sensitive=False, show_default=False)] = None,
    image_size: ImageSizeOpt = None,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    trust_pickle: TrustPickleOpt = False,
    download: DownloadOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    **config_overrides: Any,
) -> None:
    """Factorize MODEL, train it with DPRP rank pruning on DATA, and export the compressed model.

    Prints a before/after table (parameters, MACs, top-1) and writes RUN_DIR/run.json (model spec, data
    spec, config), RUN_DIR/model (a pickle-free artifact in the --export-mode form) plus the trainer's
    checkpoint.pt and history.jsonl; `dprp export RUN_DIR`, `dprp eval RUN_DIR` and `dprp report RUN_DIR`
    read them. Config precedence: DPRPConfig defaults < --preset < --config file < individual flags.
    A pretrained model whose classifier does not match the dataset's classes gets a new head.
    """
    from .commands import run_compress

    run_compress(model=model, data=data, out=out, config_file=config_file, preset=preset, resume=resume,
                 limit_train=limit_train, limit_val=limit_val,
                 export_mode=export_mode.value if export_mode is not None else None,
                 objective=objective.value if objective is not None else None,
                 image_size=image_size, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, quiet=quiet,
                 json_out=json_out, download=download,
                 overrides={k[len(CONFIG_FLAG_PREFIX):]: v for k, v in config_overrides.items() if v is not None},
                 teacher=teacher)


_sig = inspect.signature(compress_cmd)
compress_cmd.__signature__ = _sig.replace(parameters=[  # type: ignore[attr-defined]
    p for p in _sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
] + _config_parameters())
app.command("compress", epilog=(
    "Examples:\n\n"
    "    dprp compress cifar:resnet20@cifar10_resnet20.th --data cifar10-jpeg.tar.gz --out runs/r20 "
    "--preset tuned --epochs 5\n\n"
    "    dprp compress cifar:resnet20@cifar10_resnet20.th --data cifar10-jpeg.tar.gz --out runs/r20-half "
    "--preset tuned-target50 --distill 0.5 --teacher runs/r20-dense/model\n\n"
    "    dprp compress timm:resnet18 --data imagenette/ --out runs/r18 --config dprp.yaml --include 'layer*'\n\n"
    "    dprp compress --out runs/r20 --resume --epochs 10\n\n"
    "    dprp compress cifar:resnet20 --data tiny/ --out runs/smoke --epochs 1 --limit-train 256 --limit-val 128"))(
    compress_cmd)


@app.command("export", epilog=(
    "Examples:\n\n"
    "    dprp export runs/r20 --mode dense --format safetensors --out r20-dense\n\n"
    "    dprp export runs/r20 --mode auto --objective latency --format onnx --out r20.onnx\n\n"
    "    dprp export runs/r20/model --mode factorized --format pt2 --out r20.pt2"))
def export_cmd(
    source: Annotated[str, typer.Argument(
        help="A run directory, a dprp artifact, or any model spec (see `dprp inspect --help`); also a .pt2 file "
             "(one written elsewhere than by `dprp export` needs --input-size).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: a directory for safetensors, a file for onnx/pt2.",
                                      show_default=False)],
    mode: ModeOpt = ExportMode.dense,
    fmt: Annotated[Format, typer.Option(
        "--format", "-f", help="safetensors: a pickle-free dprp artifact directory (reload with "
        "dprp_surgery.load or pass it as MODEL); onnx: an ONNX file (dynamic batch); pt2: a torch.export "
        "program.",
        case_sensitive=False)] = Format.safetensors,
    objective: ObjectiveOpt = Objective.params,
    input_size: InputSizeOpt = None,
    arch: ArchOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export a compressed model with standard layers, as safetensors, ONNX or .pt2.

    --mode dense turns every SVD layer back into the original layer (the weights then load strictly into
    the original architecture); factorized keeps two standard layers per SVD layer; auto picks, per layer,
    the cheaper of the two by --objective (never worse than dense for that objective).
    """
    from .commands import run_export

    run_export(source=source, out=out, mode=mode.value, fmt=fmt.value, objective=objective.value,
               input_size=input_size, arch=arch, trust_pickle=trust_pickle, json_out=json_out)


@app.command("eval", epilog=(
    "Examples:\n\n"
    "    dprp eval cifar:resnet20@cifar10_resnet20.th --data cifar10-jpeg.tar.gz --limit 1000\n\n"
    "    dprp eval runs/r20 --data cifar10-jpeg.tar.gz --json\n\n"
    "    dprp eval r20.onnx --data cifar10-jpeg.tar.gz   # the shipped file, in onnxruntime"))
def eval_cmd(
    model: EvalModelArg,
    data: EvalDataOpt,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Evaluate a class-balanced subset of this many images.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Evaluation batch size.")] = 256,
    latency: Annotated[bool, typer.Option(
        "--latency/--no-latency", help="Measure latency at batch 1 and 64 (median of a few runs).")] = True,
    latency_runs: Annotated[int, typer.Option(
        "--latency-runs", min=1, help="Timed runs per batch size (after one warm-up); the median is reported.")] = 5,
    image_size: ImageSizeOpt = None,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    trust_pickle: TrustPickleOpt = False,
    download: DownloadOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Top-1/top-5 on the evaluation split of DATA, parameters, MACs and latency at batch 1 and 64.

    An ONNX file runs in onnxruntime (CPU, as many threads as PyTorch uses), with the input size and
    normalisation that `dprp export --format onnx` recorded in it; its parameters and MACs are those
    recorded at export (a file from elsewhere shows the values its initializers store, and no MACs).
    """
    from .commands import run_eval

    run_eval(model=model, data=data, limit=limit, batch_size=batch_size, latency=latency,
             latency_runs=latency_runs, image_size=image_size,
             arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, json_out=json_out, download=download)


@app.command("report", epilog="Example:\n\n    dprp report runs/r20")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `dprp compress` (or by the Python API's "
                                                  "compress(..., run_dir=...)).", show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """Plot ranks, parameters/MACs, singular values, losses and accuracy of a run, and write report.md."""
    from .commands import run_report

    run_report(run_dir=run_dir, json_out=json_out)


@app.command("demo", epilog=(
    "Examples:\n\n"
    "    dprp demo\n\n"
    "    dprp demo --out /tmp/dprp-demo --epochs 2\n\n"
    "    DPRP_DEMO_DATA=/data/cifar10-jpeg.tar.gz dprp demo"))
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")] = 2,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Compress a CIFAR-10 ResNet-20 end to end in a few minutes on a CPU, offline.

    Data: 2,000 training and 1,000 test images (class-balanced) from the CIFAR-10 JPEG archive
    `$DPRP_DEMO_DATA` or `../shared/datasets/cifar10-jpeg.tar.gz` beside the repository; when neither
    exists, a clearly labelled SYNTHETIC 10-class dataset (procedural 32x32 patterns) is generated instead,
    and its accuracy figures mean nothing about CIFAR-10. Model: the pretrained
    `../shared/models/cifar10_resnet20.th` when present, else a randomly initialised ResNet-20.
    Runs factorize -> DPRP fine-tune ("tuned" preset with pruning every 5 steps, epsilon 0.5, lambda_comp
    20, no cool-down epoch, batch 128) -> export (auto) -> report, prints the before/after table and writes
    the run directory with plots (ranks.png, params_macs.png, singular_values.png, losses.png, accuracy.png,
    report.md).
    About 2 minutes on 2 CPU cores.
    """
    from .commands import run_demo

    run_demo(out=out, epochs=epochs, quiet=quiet, json_out=json_out)


def main() -> None:
    """Entry point of the ``dprp`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
