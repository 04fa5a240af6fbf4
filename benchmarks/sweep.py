"""Short tuning sweeps of DPRP settings on pretrained CIFAR-10 ResNet-20 (the runs behind the tuned preset).

Each entry of a JSON file is a named run: DPRPConfig overrides on top of the `finetune` preset, plus
``"dense": true`` for a dense fine-tune reference. Every run starts from the same pretrained weights and
trains on a class-balanced training subset, then reports the validation top-1 per epoch, the share of
parameters and MACs removed, the minutes taken and the final per-layer ranks, one JSON line per run.

    python benchmarks/sweep.py benchmarks/sweeps/01_factor_lr.json --train-limit 10000 --test-limit 2000

The sweeps in benchmarks/sweeps/ and their results are discussed in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NoReturn

import torch

from dprp_surgery import DPRPConfig, factorize, summarize
from dprp_surgery.data import IMAGENET_MEAN, IMAGENET_STD, TensorLoader, open_data
from dprp_surgery.models import CIFAR_MODELS, load_cifar_checkpoint
from dprp_surgery.trainer import DPRPTrainer

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXED = ("seed", "device")  # set by --seed and the CPU, the same for every run


def _fail(parser: argparse.ArgumentParser, message: object) -> NoReturn:
    """Exit 2 with a one-line `PROG: error: MESSAGE` (bad input, no traceback)."""
    parser.exit(2, f"{parser.prog}: error: {' '.join(str(message).split())}\n")


def read_sweep(parser: argparse.ArgumentParser, path: Path, seed: int) -> list[tuple[str, bool, DPRPConfig]]:
    """(name, dense?, config) of every run in the sweep file; a bad file or entry exits 2 naming it."""
    try:
        runs = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(parser, f"cannot read sweep file {path}: {exc}")
    if not isinstance(runs, dict) or not runs:
        _fail(parser, f"sweep file {path} must hold a non-empty JSON object {{run name: {{DPRPConfig overrides}}}}.")
    out = []
    for name, overrides in runs.items():
        where = f"sweep file {path}, run {name!r}"
        if not isinstance(overrides, dict):
            _fail(parser, f"{where}: expected an object of DPRPConfig overrides, got {json.dumps(overrides)}.")
        overrides = dict(overrides)
        dense_run = overrides.pop("dense", False)
        if not isinstance(dense_run, bool):
            _fail(parser, f"{where}: \"dense\" must be true or false, got {json.dumps(dense_run)}.")
        fixed = [k for k in FIXED if k in overrides]
        if fixed:
            _fail(parser, f"{where}: {', '.join(fixed)} cannot be set per run (--seed and the CPU apply to all); "
                          "remove it.")
        try:
            config = DPRPConfig.preset("finetune").replace(device="cpu", seed=seed, **overrides)
        except (TypeError, ValueError) as exc:
            _fail(parser, f"{where}: {exc}")
        out.append((name, dense_run, config))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="JSON file: {run name: {DPRPConfig overrides}}")
    parser.add_argument("--data", default=str(SHARED / "datasets" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--model", default="resnet20", choices=sorted(CIFAR_MODELS))
    parser.add_argument("--weights", type=Path, default=None, help="default ../shared/models/cifar10_MODEL.th")
    parser.add_argument("--train-limit", type=int, default=10000,
                        help="class-balanced training images (at most the dataset's)")
    parser.add_argument("--test-limit", type=int, default=2000,
                        help="class-balanced test images (at most the dataset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    for flag, value in (("--train-limit", args.train_limit), ("--test-limit", args.test_limit)):
        if value < 1:
            _fail(parser, f"{flag} {value}: give at least 1 image.")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = read_sweep(parser, args.sweep, args.seed)  # every entry is checked before anything trains
    weights = args.weights or SHARED / "models" / f"cifar10_{args.model}.th"
    try:
        pretrained = load_cifar_checkpoint(CIFAR_MODELS[args.model](), weights)
    except (OSError, ValueError) as exc:
        _fail(parser, f"--weights: {exc}")
    for name, dense_run, config in runs:  # e.g. an include/exclude that leaves nothing to factorize
        if not dense_run:
            try:
                factorize(pretrained, config)
            except ValueError as exc:
                _fail(parser, f"sweep file {args.sweep}, run {name!r}: {exc}")
    try:
        # the limits decode only the images they keep (data.subset's class-balanced picks)
        train_ds, test_ds = open_data(args.data, progress=False, train_limit=args.train_limit,
                                      eval_limit=args.test_limit, seed=args.seed)
    except (OSError, ValueError) as exc:
        _fail(parser, f"--data {args.data}: {exc}")
    example = torch.zeros(1, 3, 32, 32)
    for name, dense_run, config in runs:
        torch.manual_seed(args.seed)
        model = load_cifar_checkpoint(CIFAR_MODELS[args.model](), weights)
        dense = summarize(model, example)
        if not dense_run:
            model = factorize(model, config)
        train = TensorLoader(train_ds, config.batch_size, shuffle=True, augment="cifar", mean=IMAGENET_MEAN,
                             std=IMAGENET_STD, seed=args.seed, drop_last=len(train_ds) > config.batch_size)
        test = TensorLoader(test_ds, 500, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        t0 = time.perf_counter()
        trainer = DPRPTrainer(model, config, train, test, progress=False)
        history = trainer.fit()
        now = summarize(trainer.model, example)
        print(json.dumps({
            "name": name, "val": [round(r["val_top1"], 2) for r in history],
            "removed": round(100 * (1 - now.params / dense.params), 1),
            "macs_removed": round(100 * (1 - now.macs / dense.macs), 1),
            "min": round((time.perf_counter() - t0) / 60, 1), "ranks": list(now.ranks().values()),
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
