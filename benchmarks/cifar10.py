"""Reproduce DPRP on pretrained CIFAR-10 ResNets, side by side with a dense fine-tune (issue 5).

Every row starts from the same pretrained weights and uses the same epochs, seed, augmentation and
learning-rate schedule (the `finetune` recipe: SGD momentum 0.9, cosine from --lr, batch --batch-size;
in every factorized row U and V train at lr x --factor-lr-scale, default the tuned preset's 0.05, because
a step on a factor moves the weight about s^2 times further than the same step on the dense weight):

    dense     dense fine-tune: the baseline every row is compared with
    paper2    DPRP, paper scheme, "proposed 2" (Table I: R20 lambda 0.1 eps 0.1; R32 lambda 0.5 eps 0.001)
    paper1    DPRP, paper scheme, "proposed 1" (Sec. IV-C: R20 lambda 0.5 eps 0.01; R32 lambda 1 eps 0.001)
    tuned     DPRP with the toolkit's tuned preset (DPRPConfig.preset("tuned"), docs/benchmarks.md)
    distill   the tuned row plus knowledge distillation (DPRPConfig.distill = --distill, T 4) from --teacher:
              a dprp artifact, default the dense row's fine-tuned model in --out when it exists (run the
              dense row first), else the pretrained weights. Not in the paper; not in the default rows.
    none/l1/l2/funnel   the ablation of Table IV: factorized (paper scheme) with eq. (14) regularizers,
              lambda_reg 0.1 and epsilon 0.001 as in the paper; the DPRP row of Table IV is paper2.

Usage:

    python benchmarks/cifar10.py --out runs/cifar10-r20     # the default budget: ResNet-20, 8 rows, 3 epochs
    python benchmarks/cifar10.py --models resnet32 resnet56 --epochs 10 --out runs/cifar10-deep
    python benchmarks/cifar10.py --smoke            # tiny slice, one epoch: keeps the script alive in tests

Writes RESULTS.md and results.json under --out, plus one run directory (history, checkpoints) per row. A later
command with the same --out adds its rows to those already there (a row run again replaces its old entry; the
table keeps the order of the rows above); every row records its command, and RESULTS.md lists the rows that
came from another command than the one in its header. So the distill row can follow the dense row:

    python benchmarks/cifar10.py --rows dense tuned --out runs/r20
    python benchmarks/cifar10.py --rows distill --out runs/r20     # distils from runs/r20/resnet20/dense/model
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from dprp_surgery import DPRPConfig, export, factorize, load, save, summarize
from dprp_surgery._files import write_text_atomic
from dprp_surgery.cli.commands import RUN_FORMAT, RUN_VERSION
from dprp_surgery.config import COMP_WEIGHTINGS, FACTOR_STEPS, SCHEMES
from dprp_surgery.data import IMAGENET_MEAN, IMAGENET_STD, TensorLoader, open_data
from dprp_surgery.io import load_model
from dprp_surgery.models import CIFAR_MODELS, load_cifar_checkpoint
from dprp_surgery.surgery import svd_layers
from dprp_surgery.trainer import CHECKPOINT_NAME, DPRPTrainer, run_files

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# "proposed 2" (Table I) and "proposed 1" (Sec. IV-C) per model; ResNet-56 has no paper setting: use R32's.
PAPER_SETTINGS = {
    "resnet20": {"paper2": (0.1, 0.1), "paper1": (0.5, 0.01)},
    "resnet32": {"paper2": (0.5, 0.001), "paper1": (1.0, 0.001)},
    "resnet56": {"paper2": (0.5, 0.001), "paper1": (1.0, 0.001)},
}
ABLATIONS = ("none", "l1", "l2", "funnel")
ALL_ROWS = ("dense", "paper2", "paper1", "tuned", "distill", *ABLATIONS)
PAPER_ROWS = tuple(r for r in ALL_ROWS if r != "distill")
DEFAULT_ROWS = {"resnet20": PAPER_ROWS, "resnet32": PAPER_ROWS, "resnet56": ("dense", "tuned")}
# --smoke: the tuned preset's cool-down epoch and 25-step pruning would never prune in one short epoch
SMOKE_TUNED = {"reg_cooldown_epochs": 0, "prune_every": 1}


def row_config(row: str, model_name: str, base: DPRPConfig, smoke: bool = False) -> DPRPConfig:
    """The DPRPConfig of one table row.

    Args:
        row: The row (one of ALL_ROWS).
        model_name: The CIFAR ResNet (its paper settings).
        base: The shared schedule (epochs, lr, batch size, seed, ...).
        smoke: The tuned and distill rows drop the preset's cool-down and prune every step (SMOKE_TUNED), so that
            a one-epoch smoke run compresses.

    Raises:
        ValueError: An unknown row.
    """
    base = base if row in ("tuned", "distill") else base.replace(target_compression=None, comp_weighting="layers")
    if row == "dense":
        return base.replace(regularizer="none", distill=0.0)
    if row in ("paper1", "paper2"):
        lam, eps = PAPER_SETTINGS[model_name][row]
        return base.replace(scheme="paper", regularizer="dprp", lambda_comp=lam, epsilon=eps, distill=0.0)
    if row in ("tuned", "distill"):
        tuned = DPRPConfig.preset("tuned")
        keep = {f: getattr(base, f) for f in ("epochs", "batch_size", "lr", "lr_schedule", "seed", "device",
                                                "momentum", "weight_decay", "warmup_epochs", "factor_lr_scale",
                                                "distill", "target_compression", "comp_weighting")}
        return tuned.replace(**keep, **(SMOKE_TUNED if smoke else {}))  # one replace: no cool-down warning
    if row in ABLATIONS:
        return base.replace(scheme="paper", regularizer=row, lambda_comp=0.1, epsilon=0.001, distill=0.0)
    raise ValueError(f"unknown row {row!r}; use one of {', '.join(ALL_ROWS)}")


def pretrained(model_name: str, weights_dir: Path | None, from_scratch: bool) -> torch.nn.Module:
    """A CIFAR ResNet with the shared pretrained weights (random init with --from-scratch).

    Raises:
        ValueError: The weights file is missing or does not fit.
    """
    model = CIFAR_MODELS[model_name]()
    if from_scratch:
        return model
    path = (weights_dir or SHARED / "models") / f"cifar10_{model_name}.th"
    if not path.is_file():
        where = f"--weights-dir {weights_dir}" if weights_dir else f"the default folder {path.parent}"
        raise ValueError(f"pretrained weights {path} not found in {where}: pass --weights-dir (a folder with "
                         f"cifar10_{model_name}.th) or --from-scratch")
    try:
        return load_cifar_checkpoint(model, path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"pretrained weights {path}: {exc}") from None


def load_given(flag: str, value: Path, model_name: str) -> torch.nn.Module:
    """The model of --init or --teacher: anything `dprp eval` takes (dprp artifact, run directory, model spec).

    Raises:
        ValueError: Naming the flag and the value: a path that does not exist or a model that cannot be loaded.
    """
    text = str(value)
    if not re.match(r"^[A-Za-z][A-Za-z0-9_-]+:", text) and not Path(text).expanduser().exists():
        raise ValueError(f"{flag} {text} does not exist: give a dprp artifact or run directory (e.g. "
                         f"RUN/{model_name}/dense/model or RUN/{model_name}/dense) or a model spec "
                         f"(e.g. cifar:{model_name}@WEIGHTS.th)")
    try:
        return load_model(text)[0]
    except (OSError, ValueError) as exc:  # ModelSpecError and UntrustedPickleError too
        raise ValueError(f"{flag} {text}: {' '.join(str(exc).split())}") from None


def initial(model_name: str, args) -> torch.nn.Module:
    """The weights a row starts from: --init's dense model, else the pretrained (or random) weights.

    --init takes what `dprp eval` takes: a dprp artifact, a run directory (e.g. the dense row's RUN/resnet20/dense)
    or a model spec; the model must be dense.

    Raises:
        ValueError: --init is missing, factorized or not a CIFAR `model_name`; or the pretrained weights are.
    """
    if args.init is None:
        return pretrained(model_name, args.weights_dir, args.from_scratch)
    source = load_given("--init", args.init, model_name)
    if svd_layers(source):
        raise ValueError(f"--init {args.init} is a factorized model: give a dense artifact or run directory "
                         "(e.g. the dense row's)")
    model = CIFAR_MODELS[model_name]()
    try:
        model.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(f"--init {args.init} is not a CIFAR {model_name}: {str(err).splitlines()[0]}") from None
    return model


def evaluate(model: torch.nn.Module, loader, device: torch.device) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent)."""
    model.eval()
    correct1 = correct5 = total = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            top5 = model(x).topk(5, dim=1).indices
            correct1 += (top5[:, 0] == y).sum().item()
            correct5 += (top5 == y[:, None]).any(dim=1).sum().item()
            total += y.numel()
    return 100.0 * correct1 / total, 100.0 * correct5 / total


def teacher_for(model_name: str, args) -> tuple[torch.nn.Module, str]:
    """The distillation teacher of the distill row and where it came from.

    --teacher takes what `dprp eval` takes (a dprp artifact, a run directory or a model spec); without it, the
    dense row's model in --out when it exists, else the pretrained weights.

    Raises:
        ValueError: --teacher cannot be loaded.
    """
    if args.teacher:
        return load_given("--teacher", args.teacher, model_name), str(args.teacher)
    path = args.out / model_name / "dense" / "model"
    if path.exists():
        return load(path), str(path)
    return pretrained(model_name, args.weights_dir, args.from_scratch), "pretrained weights"


# flags that override the same-named DPRPConfig field of the tuned and distill rows when given
TUNED_FLAGS = ("lambda_comp", "scheme", "epsilon", "epsilon_start", "prune_every", "min_rank", "factor_step")


def run_row(row: str, model_name: str, args, train_ds, test_ds, base: DPRPConfig) -> dict:
    """Train one row and measure it."""
    config = row_config(row, model_name, base.replace(distill=args.distill if row == "distill" else 0.0,
                                                      target_compression=args.target_compression,
                                                      comp_weighting=args.comp_weighting), smoke=args.smoke)
    if args.sigma_lr_scale is not None and row not in ("dense", "tuned", "distill"):
        config = config.replace(sigma_lr_scale=args.sigma_lr_scale)
    if row in ("tuned", "distill"):
        overrides = {field: getattr(args, field) for field in TUNED_FLAGS if getattr(args, field) is not None}
        if args.epsilon_start is not None:
            overrides["epsilon_ramp_epochs"] = args.epsilon_ramp_epochs
        if args.no_structure_when_frozen:
            overrides["structure_when_frozen"] = False
        config = config.replace(**overrides)
    torch.manual_seed(config.seed)
    dense = initial(model_name, args)
    example = torch.zeros(1, 3, 32, 32)
    dense_summary = summarize(dense, example)
    model = dense if row == "dense" else factorize(dense, config)
    train = TensorLoader(train_ds, config.batch_size, shuffle=True, augment="cifar", mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, seed=config.seed, drop_last=True)
    test = TensorLoader(test_ds, 256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    run_dir = args.out / model_name / row
    t0 = time.perf_counter()
    teacher, teacher_from = teacher_for(model_name, args) if config.distill > 0 else (None, None)
    resumed = args.resume and (run_dir / CHECKPOINT_NAME).is_file()
    trainer = DPRPTrainer(model, config, train, test, run_dir=run_dir, progress=not args.quiet, teacher=teacher,
                          resume=True if resumed else None)
    start_epoch = trainer.start_epoch
    trainer.fit()
    wall = time.perf_counter() - t0
    if resumed:  # the epochs before the interruption ran in another process: add their recorded times
        wall += sum(h["time"] for h in trainer.history[:start_epoch])
    model = trainer.model
    device = next(model.parameters()).device
    top1, top5 = evaluate(model, test, device)
    s = summarize(model.cpu(), example)
    result = {
        "model": model_name, "row": row, "top1": top1, "top5": top5,
        "params": s.params, "dense_params": dense_summary.params,
        "params_removed": 100.0 * (1 - s.params / dense_summary.params),
        "macs": s.macs, "dense_macs": dense_summary.macs,
        "macs_removed": 100.0 * (1 - s.macs / dense_summary.macs),
        "ranks": s.ranks(), "wall_s": wall, "config": config.to_dict(),
    }
    if teacher_from is not None:
        result["teacher"] = teacher_from
    if args.init is not None:
        result["init"] = str(args.init)
    if resumed:
        result["resumed_at_epoch"] = start_epoch
    result["command"] = args.command
    return {**result, **ship(model, model_name, config, run_dir, dense_summary, result)}


def ship(model: torch.nn.Module, model_name: str, config: DPRPConfig, run_dir: Path, dense_summary, result: dict
         ) -> dict:
    """Export the trained row as a user would ship it and make `run_dir` a dprp run directory.

    The shipped model is ``export(model, "auto", objective="params")`` (per layer the smaller of the dense and
    the factorized realisation, never larger than dense), saved as a pickle-free artifact in ``run_dir/model``;
    ``run_dir/run.json`` lets ``dprp export``, ``dprp eval``, ``dprp report`` and ``benchmarks/latency.py
    --run-dir`` open the row. A dense row ships the fine-tuned dense model as it is.
    """
    arch = f"cifar:{model_name}"
    shipped = model if result["row"] == "dense" else export(model, "auto", objective="params")
    artifact = save(shipped, run_dir / "model", arch=arch, config=config, input_size=[3, 32, 32])
    s = summarize(shipped, torch.zeros(1, 3, 32, 32))
    info = {"format": RUN_FORMAT, "version": RUN_VERSION, "model": arch, "arch": arch,
            "num_classes": 10, "input_size": [3, 32, 32], "config": config.to_dict(), "export_mode": "auto",
            "objective": "params", "status": "done", "artifact": str(artifact), "ranks": result["ranks"],
            "full_ranks": {n: m.full_rank for n, m in svd_layers(model)},  # `dprp report`: initial vs final
            "benchmark_row": {k: v for k, v in result.items() if k != "config"}}
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(run_dir / "run.json")
    return {"shipped_params": s.params, "shipped_macs": s.macs,
            "shipped_params_removed": 100.0 * (1 - s.params / dense_summary.params),
            "shipped_macs_removed": 100.0 * (1 - s.macs / dense_summary.macs)}


def read_results(out: Path) -> list[dict]:
    """The rows of ``out/results.json`` ([] when there is none).

    Raises:
        ValueError: The file is unreadable or not a list of result rows.
    """
    path = out / "results.json"
    if not path.is_file():
        return []
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path} ({exc}): fix or move it away, or choose another --out") from None
    if not isinstance(results, list) or not all(isinstance(r, dict) and "model" in r and "row" in r
                                                for r in results):
        raise ValueError(f"{path} is not a list of result rows (with 'model' and 'row'): move it away or choose "
                         "another --out")
    return results


def row_order(result: dict) -> tuple[int, int, str, str]:
    """The table's order: models as in PAPER_SETTINGS, rows as in ALL_ROWS (unknown ones last)."""
    models, rows = list(PAPER_SETTINGS), list(ALL_ROWS)
    model, row = result["model"], result["row"]
    return (models.index(model) if model in models else len(models), rows.index(row) if row in rows else len(rows),
            str(model), str(row))


def merge_results(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with the rows of `new` added; a row in both (same model and row) takes its entry from `new`."""
    merged = {(r["model"], r["row"]): r for r in old}
    merged.update({(r["model"], r["row"]): r for r in new})
    return sorted(merged.values(), key=row_order)


def header_command(header: str) -> str | None:
    """The command recorded at the end of a RESULTS.md header line (None if there is none)."""
    match = re.search(r", command: (python benchmarks/cifar10\.py.*)$", header)
    return match.group(1) if match else None


def write_results(out: Path, results: list[dict], header: str, command: str | None) -> None:
    """Write results.json and RESULTS.md atomically (temporary file + os.replace each)."""
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    write_text_atomic(out / "RESULTS.md", markdown(results, header, command))


def rescore(out: Path) -> int:
    """Re-export every row of ``out/results.json`` from its checkpoint and rewrite the results.

    Raises:
        ValueError: There is no results.json in `out` (or it is unreadable).
    """
    from dprp_surgery.io import load_run

    if not (out / "results.json").is_file():
        raise ValueError(f"--rescore: --out {out} holds no results.json; give the --out of an earlier run of this "
                         "script")
    results = read_results(out)
    for r in results:
        run_dir = out / r["model"] / r["row"]
        config = DPRPConfig.from_dict(r["config"])
        if not (run_dir / "run.json").is_file():  # rows written before run directories carried run.json
            write_text_atomic(run_dir / "run.json", json.dumps({"format": RUN_FORMAT, "version": RUN_VERSION,
                                                                "arch": f"cifar:{r['model']}", "num_classes": 10,
                                                                "config": r["config"], "status": "done"}))
        model, _ = load_run(run_dir)
        ranks = {n: m.rank for n, m in svd_layers(model)}
        if ranks != r["ranks"]:
            raise SystemExit(f"{run_dir}: checkpoint ranks differ from results.json; was the row re-run?")
        dense_summary = summarize(CIFAR_MODELS[r["model"]](), torch.zeros(1, 3, 32, 32))
        r.update(ship(model.eval(), r["model"], config, run_dir, dense_summary, r))
    md = (out / "RESULTS.md").read_text().split("\n", 1)[0] if (out / "RESULTS.md").is_file() else ""
    write_results(out, results, md, header_command(md))
    print(markdown(results, md, header_command(md)))
    return 0


def markdown(results: list[dict], header: str, command: str | None = None) -> str:
    """The results as a markdown table, deltas against each model's dense row.

    Args:
        results: The rows.
        header: The first line (the data, schedule and command of the run).
        command: The command of the header: rows recorded with another command (or with none, written before
            rows recorded theirs) are listed under the table. None lists nothing.
    """
    lines = [header, "",
             "| model | row | top-1 | delta top-1 | top-5 | params removed | MACs removed | shipped: params removed "
             "| shipped: MACs removed | wall (min) | final ranks |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {r["model"]: r["top1"] for r in results if r["row"] == "dense"}
    for r in results:
        delta = f"{r['top1'] - dense[r['model']]:+.2f}" if r["model"] in dense else "-"
        ranks = " ".join(str(v) for v in r["ranks"].values()) or "-"
        shipped = (f"{r['shipped_params_removed']:.1f}% | {r['shipped_macs_removed']:.1f}%"
                   if "shipped_params" in r else "- | -")
        lines.append(f"| {r['model']} | {r['row']} | {r['top1']:.2f} | {delta} | {r['top5']:.2f} | "
                     f"{r['params_removed']:.1f}% | {r['macs_removed']:.1f}% | {shipped} | {r['wall_s'] / 60:.1f} | "
                     f"{ranks} |")
    if command is not None:
        other = [r for r in results if r.get("command") != command]
        if other:
            lines += ["", "Rows from another command than the header's (their data, schedule and flags are that "
                          "command's):", ""]
            lines += [f"- {r['model']} {r['row']}: " + (f"`{r['command']}`" if r.get("command")
                                                        else "an earlier run (its command was not recorded)")
                      for r in other]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "datasets" / "cifar10-jpeg.tar.gz"),
                        help="ImageFolder dir, .tar.gz of one, or cifar10:DIR")
    parser.add_argument("--weights-dir", type=Path, default=None, help="folder with cifar10_resnetNN.th")
    parser.add_argument("--models", nargs="+", default=["resnet20"], choices=sorted(PAPER_SETTINGS))
    parser.add_argument("--rows", nargs="+", default=None, choices=ALL_ROWS,
                        help="rows to run (default: all for resnet20/32, dense+tuned for resnet56)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every row (default 3: the R20 table of docs/benchmarks.md took 59 min on 2 "
                             "cores; --smoke: 1)")
    parser.add_argument("--lr", type=float, default=None,
                        help="initial learning rate of the cosine schedule (default 0.01, fine-tuning the pretrained "
                             "weights; 0.1, the paper's, with --from-scratch)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--factor-lr-scale", type=float, default=None,
                        help="lr multiplier of U and V in every factorized row (default: the tuned preset's)")
    parser.add_argument("--sigma-lr-scale", type=float, default=None,
                        help="lr multiplier of the singular values in the paper and ablation rows (default 1, the "
                             "paper's optimizer; the tuned rows keep the preset's 10)")
    parser.add_argument("--target-compression", type=float, default=None,
                        help="DPRPConfig.target_compression of the tuned and distill rows (e.g. 0.5: stop compressing "
                             "once half the parameters are gone)")
    parser.add_argument("--lambda-comp", type=float, default=None,
                        help="lambda_comp of the tuned and distill rows (default: the tuned preset's 2)")
    parser.add_argument("--epsilon", type=float, default=None,
                        help="epsilon of the tuned and distill rows (default: the tuned preset's 0.1)")
    parser.add_argument("--epsilon-start", type=float, default=None,
                        help="tuned and distill rows: epsilon grows geometrically from this value to --epsilon over "
                             "--epsilon-ramp-epochs epochs (DPRPConfig.epsilon_start; default: fixed epsilon)")
    parser.add_argument("--epsilon-ramp-epochs", type=int, default=None,
                        help="length of the epsilon schedule in epochs (DPRPConfig.epsilon_ramp_epochs); goes "
                             "with --epsilon-start (each needs the other)")
    parser.add_argument("--prune-every", type=int, default=None,
                        help="steps between pruning checks in the tuned and distill rows (default: the tuned "
                             "preset's 25). L_comp pushes down the smallest kept singular value until it falls under "
                             "epsilon times its neighbour, so a layer sheds about one component per check at best: "
                             "the long spectra of the spatial scheme (rank up to 3 x channels) need frequent checks")
    parser.add_argument("--min-rank", type=int, default=None,
                        help="DPRPConfig.min_rank of the tuned and distill rows: no layer is pruned below it "
                             "(default: the preset's 1)")
    parser.add_argument("--no-structure-when-frozen", action="store_true",
                        help="tuned and distill rows: drop L_str too once the ranks are frozen (target met or "
                             "cool-down), so U and V train as a plain low-rank factorization "
                             "(DPRPConfig.structure_when_frozen=False)")
    parser.add_argument("--factor-step", default=None, choices=FACTOR_STEPS,
                        help="DPRPConfig.factor_step of the tuned and distill rows (default: the preset's plain; "
                             "capped: U's and V's gradients divided by max(s_j^2, 1), so no component moves faster "
                             "than a dense step at the factors' lr; pair it with a larger --factor-lr-scale)")
    parser.add_argument("--scheme", default=None, choices=SCHEMES,
                        help="matricization of the tuned and distill rows (default: the tuned preset's, paper); the "
                             "paper and ablation rows always use the paper scheme")
    parser.add_argument("--comp-weighting", default="layers", choices=COMP_WEIGHTINGS,
                        help="DPRPConfig.comp_weighting of the tuned and distill rows (layers: the paper's mean over "
                             "layers; params: weighted by each layer's share of the parameters; params-squared: by its "
                             "square)")
    parser.add_argument("--distill", type=float, default=0.5,
                        help="distillation weight alpha of the distill row (DPRPConfig.distill)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="model the distill row distils from: a dprp artifact or run directory (e.g. RUN/resnet20/"
                             "dense), anything `dprp eval` takes (default: the dense row's model in --out)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start every row from this dense model of the architecture, a dprp artifact or run "
                             "directory (e.g. RUN/resnet56/dense, a finished dense fine-tune) instead of the "
                             "pretrained weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-limit", type=int, default=None, help="class-balanced training subset")
    parser.add_argument("--test-limit", type=int, default=None, help="class-balanced test subset")
    parser.add_argument("--from-scratch", action="store_true", help="random init (the paper's setting; slow)")
    parser.add_argument("--smoke", action="store_true",
                        help="256 train / 128 test images, 1 epoch; the tuned and distill rows prune every step and "
                             "have no cool-down epoch, so the one short epoch compresses")
    parser.add_argument("--out", type=Path, default=Path("runs/cifar10"))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--resume", action="store_true",
                        help="continue each row from its run directory's checkpoint.pt when there is one (an "
                             "interrupted run; pass the same flags again), else start the row afresh")
    parser.add_argument("--rescore", action="store_true",
                        help="train nothing: re-export and re-measure the rows of --out/results.json from their "
                             "checkpoints (adds the shipped columns to tables of older runs)")
    args = parser.parse_args(argv)
    args.command = "python benchmarks/cifar10.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.rescore:
        try:
            return rescore(args.out)
        except ValueError as exc:
            parser.error(str(exc))
    if args.epsilon_ramp_epochs is not None and args.epsilon_start is None:
        parser.error("--epsilon-ramp-epochs needs --epsilon-start (the epsilon the schedule starts from)")
    if args.epsilon_start is not None and args.epsilon_ramp_epochs is None:
        parser.error(f"--epsilon-start {args.epsilon_start} needs --epsilon-ramp-epochs (the epochs over which "
                     "epsilon moves to --epsilon, e.g. --epsilon-ramp-epochs 3); without it epsilon would stay fixed")
    if args.epsilon_ramp_epochs is not None and args.epsilon_ramp_epochs < 1:
        parser.error(f"--epsilon-ramp-epochs {args.epsilon_ramp_epochs}: the schedule needs at least 1 epoch (or drop "
                     "it and --epsilon-start for a fixed epsilon)")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: train at least 1 epoch")
    if args.smoke:
        if args.epochs not in (None, 1):
            print(f"note: --smoke trains 1 epoch; --epochs {args.epochs} is ignored (drop --smoke to train "
                  f"{args.epochs} epochs)", flush=True)
        args.epochs, args.train_limit, args.test_limit = 1, args.train_limit or 256, args.test_limit or 128
    args.epochs = 3 if args.epochs is None else args.epochs
    if args.lr is None:
        args.lr = 0.1 if args.from_scratch else 0.01  # the paper's from-scratch lr; fine-tuning takes 0.01
    rows = {m: args.rows or DEFAULT_ROWS[m] for m in args.models}
    if not args.resume:  # the trainer refuses a fresh row in a used run directory: say so before any row trains
        taken = [f"{m}/{row}" for m in args.models for row in rows[m] if run_files(args.out / m / row)]
        if taken:
            parser.error(f"--out {args.out} already holds the rows {', '.join(taken)}: pass --resume to continue "
                         "them, or choose another --out (or delete those row directories) to train them afresh")
    try:  # every input is checked before any row trains (a typo would otherwise cost all rows before it)
        earlier = read_results(args.out)
        for model_name in args.models:
            initial(model_name, args)
            if "distill" in rows[model_name] and args.teacher is not None:
                teacher_for(model_name, args)
    except ValueError as exc:
        parser.error(str(exc))
    if not re.match(r"^cifar100?:", args.data) and not Path(args.data).expanduser().exists():
        parser.error(f"--data {args.data} does not exist: give an ImageFolder dir with train/ and test/ (or val/), "
                     "a .tar.gz of one, or cifar10:DIR")

    # limits decode only the images they keep (the same class-balanced subsets as data.subset)
    try:
        train_ds, test_ds = open_data(args.data, progress=not args.quiet, train_limit=args.train_limit or None,
                                      eval_limit=args.test_limit or None, seed=args.seed)
    except (OSError, ValueError) as exc:
        parser.error(f"--data {args.data}: {' '.join(str(exc).split())}")
    if args.factor_lr_scale is None:
        args.factor_lr_scale = DPRPConfig.preset("tuned").factor_lr_scale
    base = DPRPConfig.preset("finetune").replace(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                                 seed=args.seed, device=args.device,
                                                 factor_lr_scale=args.factor_lr_scale)
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = earlier
    where = "CUDA" if torch.cuda.is_available() and args.device != "cpu" else f"{torch.get_num_threads()} CPU threads"
    header = (f"CIFAR-10 ({len(train_ds)} train / {len(test_ds)} test images), {args.epochs} epochs, lr {args.lr} "
              f"cosine (factors x{args.factor_lr_scale}), batch {args.batch_size}, seed {args.seed}, "
              f"torch {torch.__version__}, {where}, command: {args.command}")
    for model_name in args.models:
        for row in rows[model_name]:
            result = run_row(row, model_name, args, train_ds, test_ds, base)
            results = merge_results(results, [result])  # rows of earlier commands stay; a re-run row is replaced
            write_results(args.out, results, header, args.command)
            print(markdown([result], ""), flush=True)
    print(markdown(results, header, args.command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
