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

import torch

from dprp_surgery import DPRPConfig, factorize, summarize
from dprp_surgery.data import IMAGENET_MEAN, IMAGENET_STD, TensorLoader, open_data, subset
from dprp_surgery.models import CIFAR_MODELS, load_cifar_checkpoint
from dprp_surgery.trainer import DPRPTrainer

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="JSON file: {run name: {DPRPConfig overrides}}")
    parser.add_argument("--data", default=str(SHARED / "datasets" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--model", default="resnet20", choices=sorted(CIFAR_MODELS))
    parser.add_argument("--weights", type=Path, default=None, help="default ../shared/models/cifar10_MODEL.th")
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        runs = json.loads(args.sweep.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"cannot read sweep file {args.sweep}: {exc}") from exc
    weights = args.weights or SHARED / "models" / f"cifar10_{args.model}.th"
    train_ds, test_ds = open_data(args.data, progress=False)
    train_ds = subset(train_ds, args.train_limit, seed=args.seed)
    test_ds = subset(test_ds, args.test_limit, seed=args.seed)
    example = torch.zeros(1, 3, 32, 32)
    for name, overrides in runs.items():
        overrides = dict(overrides)
        dense_run = overrides.pop("dense", False)
        config = DPRPConfig.preset("finetune").replace(device="cpu", seed=args.seed, **overrides)
        torch.manual_seed(args.seed)
        model = load_cifar_checkpoint(CIFAR_MODELS[args.model](), weights)
        dense = summarize(model, example)
        if not dense_run:
            model = factorize(model, config)
        train = TensorLoader(train_ds, config.batch_size, shuffle=True, augment="cifar", mean=IMAGENET_MEAN,
                             std=IMAGENET_STD, seed=args.seed, drop_last=True)
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
