"""Which matricization keeps most of a trained model at a given size? Truncation error per scheme, no training.

For every scheme, the model is factorized at full rank and each SVD layer is truncated to the largest rank
whose factors hold at most ``--keep`` of the layer's dense weights (``rank = floor(keep * h * w / (h + w + 1))``,
at least 1; eqs. (4)/(7)). By Eckart-Young the truncation is the best one of that size for the scheme's
matrix, and its relative squared Frobenius error is ``sum_{i > rank} s_i^2 / sum_i s_i^2``. The table gives
that error averaged over the layers weighted by their dense weights (and per stage for CIFAR ResNets), and,
with ``--data``, top-1 of the truncated model on the test split (no fine-tuning).

It says how far each scheme must move a trained network to reach a size, before any training: a guide for
choosing the scheme of a deep compression (docs/benchmarks.md, issue 5), not a result of DPRP.

Usage:

    python benchmarks/truncation_error.py --model cifar:resnet56@../shared/models/cifar10_resnet56.th
    python benchmarks/truncation_error.py --model cifar:resnet20@../shared/models/cifar10_resnet20.th \\
        --keep 0.5 0.35 0.2 --data ../shared/datasets/cifar10-jpeg.tar.gz --test-limit 2000
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn

import torch

from dprp_surgery import DPRPConfig, factorize, svd_layers
from dprp_surgery.config import SCHEMES
from dprp_surgery.data import IMAGENET_MEAN, IMAGENET_STD, TensorLoader, open_data
from dprp_surgery.io import load_model


def layer_rank(layer, keep: float) -> int:
    """Largest rank whose factors hold at most `keep` of the layer's dense weight count (at least 1)."""
    h, w = layer.matrix_shape
    return max(1, min(layer.rank, math.floor(keep * h * w / (h + w + 1))))


def truncation_rows(model: torch.nn.Module, scheme: str, keeps: list[float]) -> list[dict]:
    """Per keep fraction: the weighted relative error of the truncated layers and their ranks."""
    factorized = factorize(model, DPRPConfig(scheme=scheme))
    rows = []
    for keep in keeps:
        layers = []
        for name, layer in svd_layers(factorized):
            s2 = layer.s.detach().double() ** 2
            rank = layer_rank(layer, keep)
            h, w = layer.matrix_shape
            layers.append({"name": name, "scheme": layer.scheme, "rank": rank, "full_rank": layer.rank,
                           "weights": h * w, "error": float(s2[rank:].sum() / s2.sum())})
        total = sum(x["weights"] for x in layers)
        rows.append({"scheme": scheme, "keep": keep, "layers": layers,
                     "error": sum(x["error"] * x["weights"] for x in layers) / total})
    return rows


def stage_errors(layers: list[dict]) -> dict[str, float]:
    """Weighted error per CIFAR ResNet stage (layer1/2/3), when the names show stages."""
    out = {}
    for stage in ("layer1", "layer2", "layer3"):
        sel = [x for x in layers if x["name"].startswith(stage + ".")]
        if sel:
            out[stage] = sum(x["error"] * x["weights"] for x in sel) / sum(x["weights"] for x in sel)
    return out


def top1(model: torch.nn.Module, loader) -> float:
    """Top-1 (%) of `model` in eval mode."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += y.numel()
    return 100.0 * correct / total


def truncated(model: torch.nn.Module, scheme: str, keep: float) -> torch.nn.Module:
    """The model factorized with `scheme` and every SVD layer truncated at `keep` (no training)."""
    factorized = factorize(model, DPRPConfig(scheme=scheme))
    for _, layer in svd_layers(factorized):
        layer.truncate_(layer_rank(layer, keep))
    return factorized


def _fail(parser: argparse.ArgumentParser, message: object) -> NoReturn:
    """Exit 2 with a one-line `PROG: error: MESSAGE` (bad input, no traceback)."""
    parser.exit(2, f"{parser.prog}: error: {' '.join(str(message).split())}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model spec, e.g. cifar:resnet56@FILE or timm:resnet18")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.35, 0.2],
                        help="fractions of each layer's dense weights the factors may hold")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--data", default=None, help="ImageFolder dir or .tar.gz: also measure top-1 (no training)")
    parser.add_argument("--test-limit", type=int, default=2000,
                        help="class-balanced test images for --data (at most the split's; 0: all)")
    args = parser.parse_args(argv)
    if any(not 0 < k <= 1 for k in args.keep):
        parser.error("--keep values must lie in (0, 1]")
    if args.test_limit < 0:
        _fail(parser, f"--test-limit {args.test_limit}: give 0 (all test images) or more.")
    try:
        model = load_model(args.model)[0].eval()
    except (OSError, ValueError) as exc:
        _fail(parser, f"--model {args.model}: {exc}")
    loader = None
    if args.data:
        try:
            # only the test split is used (train/ is not even needed); a limit decodes only the images it keeps
            _, test_ds = open_data(args.data, progress=False, train_limit=0, eval_limit=args.test_limit or None)
        except (OSError, ValueError) as exc:
            _fail(parser, f"--data {args.data}: {exc}")
        loader = TensorLoader(test_ds, 500, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # as benchmarks/cifar10.py
        print(f"dense top-1 on {len(test_ds)} test images: {top1(model, loader):.2f}")
    print(f"{args.model}: relative squared Frobenius error of the best truncation at each size")
    print("| scheme | keep | weighted error | per stage |" + (" top-1 |" if loader else ""))
    print("|---|---|---|---|" + ("---|" if loader else ""))
    for scheme in args.schemes:
        for row in truncation_rows(model, scheme, args.keep):
            stages = ", ".join(f"{k} {v:.3f}" for k, v in stage_errors(row["layers"]).items()) or "-"
            line = f"| {scheme} | {row['keep']} | {row['error']:.3f} | {stages} |"
            if loader:
                line += f" {top1(truncated(model, scheme, row['keep']), loader):.2f} |"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
