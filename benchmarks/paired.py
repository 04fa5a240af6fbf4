"""Paired comparison of models with a baseline on the same test images (issue 5).

Two rows of a table evaluated on the same 10,000 images do not differ by chance as much as two
independent evaluations would: most images are right (or wrong) for both. What decides whether a
difference in top-1 is real is how many images the two models disagree on. For every model against the
baseline this script reports, on the eval split of --data:

* top-1 of both and the difference (model - baseline, points);
* b: images the baseline gets right and the model wrong; c: the reverse;
* the paired standard error of the difference, sqrt(b + c - (b - c)^2 / n) / n (points), and the normal
  95% interval of the difference;
* the exact two-sided McNemar p-value (binomial test of b against b + c at one half);
* where --band is given, whether the 95% interval lies inside the band (``inside``), outside it
  (``outside``) or across its edge (``undecided``): a target such as "within 0.5 points of dense" is met
  measurably only when the whole interval is inside.

Usage:

    python benchmarks/paired.py --data ../shared/datasets/cifar10-jpeg.tar.gz \\
        --baseline runs/cifar10-r56-e10-dense/resnet56/dense \\
        --model runs/cifar10-r56-e10-target65-kd-pw-l8/resnet56/distill --band 0.5

MODEL and BASELINE are anything `dprp eval` takes: a run directory, a dprp artifact or a model spec.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from dprp_surgery import load_model
from dprp_surgery.data import TensorLoader, open_data
from dprp_surgery.io import data_recipe


def paired_stats(base_right: torch.Tensor, model_right: torch.Tensor, band: float | None = None) -> dict:
    """Paired statistics of two per-image correctness vectors (bool, same images, same order).

    Args:
        base_right: Whether the baseline classifies each image correctly.
        model_right: The same for the model.
        band: Half-width of the band the difference must stay within (points; ``None``: not judged).

    Returns:
        n, top-1 of each, diff (points), b, c, se (points), ci95 (points), p_mcnemar and, with a band,
        the verdict "inside" / "outside" / "undecided" for diff >= -band.
    """
    if base_right.shape != model_right.shape or base_right.ndim != 1 or base_right.numel() == 0:
        raise ValueError(f"need two equal, non-empty 1-D correctness vectors; got shapes {tuple(base_right.shape)} "
                         f"and {tuple(model_right.shape)}")
    n = base_right.numel()
    b = int((base_right & ~model_right).sum())
    c = int((~base_right & model_right).sum())
    diff = 100.0 * (c - b) / n
    se = 100.0 * math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    lo, hi = diff - 1.96 * se, diff + 1.96 * se
    k = min(b, c)
    # integer / integer: exact, rounded once (a float factor would overflow converting 2 ** 1024 and up)
    p = min(1.0, 2 * sum(math.comb(b + c, i) for i in range(k + 1)) / 2 ** (b + c)) if b + c else 1.0
    out = {"n": n, "base_top1": 100.0 * float(base_right.float().mean()),
           "model_top1": 100.0 * float(model_right.float().mean()), "diff": diff, "b": b, "c": c, "se": se,
           "ci95": [lo, hi], "p_mcnemar": p}
    if band is not None:
        out["band"] = band
        out["verdict"] = "inside" if lo >= -band else "outside" if hi < -band else "undecided"
    return out


class DataError(ValueError):
    """The eval data cannot be opened (the message is open_data's)."""


@functools.lru_cache(maxsize=4)
def _eval_split(data: str, image_size: int | None, limit: int | None):
    """The eval split of `data` (decoded once per image size, shared by every model)."""
    # the training split is not used (nor needed); a limit decodes only the images it keeps
    _, val = open_data(data, image_size=image_size, progress=False, train_limit=0, eval_limit=limit)
    return val


@torch.inference_mode()
def correctness(net: torch.nn.Module, arch: str, data: str, limit: int | None, batch_size: int) -> torch.Tensor:
    """Per-image correctness of the model `net` (architecture `arch`) on the eval split of `data`."""
    net.eval()
    recipe = data_recipe(arch, net)
    try:
        val = _eval_split(data, recipe.image_size, limit)
    except (OSError, ValueError) as exc:
        raise DataError(" ".join(str(exc).split())) from None
    hits = [(net(x).argmax(dim=1) == y) for x, y in TensorLoader(val, batch_size, mean=recipe.mean, std=recipe.std)]
    return torch.cat(hits)


def main(argv: list[str] | None = None) -> int:
    """Compare every --model with --baseline; print a markdown table (or JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="eval data: an ImageFolder tree, archive or cifar10:DIR")
    p.add_argument("--baseline", required=True, help="the reference model (run directory, artifact or spec)")
    p.add_argument("--model", action="append", required=True, help="a model to compare (repeatable)")
    p.add_argument("--band", type=float, default=None, help="judge diff >= -BAND points (e.g. 0.5)")
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed, class-balanced subset of LIMIT images")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if not re.match(r"^cifar100?:", args.data) and not Path(args.data).expanduser().exists():
        p.error(f"--data {args.data} does not exist: give an ImageFolder tree, an archive of one or cifar10:DIR")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: give at least 1 image")
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: give at least 1")
    start = time.perf_counter()
    models = {}  # every model is loaded before any is evaluated: a typo in the last one costs nothing
    for flag, spec in [("--baseline", args.baseline), *(("--model", m) for m in args.model)]:
        if spec not in models:
            try:
                models[spec] = load_model(spec)
            except (OSError, ValueError) as exc:  # ModelSpecError, unreadable or misfitting weights
                p.error(f"{flag} {spec}: {' '.join(str(exc).split())}")
    try:
        base_arch = models[args.baseline][1]
        base = correctness(*models[args.baseline], args.data, args.limit, args.batch_size)
    except DataError as exc:  # data that open_data cannot read (checked on the baseline, before any model)
        p.error(f"--data {args.data}: {exc}")
    rows = []
    for spec in args.model:
        net, arch = models[spec]
        right = correctness(net, arch, args.data, args.limit, args.batch_size)
        if right.shape != base.shape:
            raise SystemExit(f"{spec} was evaluated on {right.numel()} images and the baseline on {base.numel()}")
        rows.append({"model": spec, "arch": arch, **paired_stats(base, right, args.band)})
    if args.json:
        print(json.dumps({"baseline": args.baseline, "data": args.data, "rows": rows}, indent=2))
        return 0
    print(f"baseline: {args.baseline} ({base_arch}), {base.numel()} images of {args.data}, "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| model | top-1 | baseline | diff | b (base only) | c (model only) | paired SE | 95% interval | "
          "McNemar p |" + (" band |" if args.band is not None else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if args.band is not None else ""))
    for r in rows:
        lo, hi = r["ci95"]
        print(f"| {Path(r['model'])} | {r['model_top1']:.2f} | {r['base_top1']:.2f} | {r['diff']:+.2f} | {r['b']} | "
              f"{r['c']} | {r['se']:.2f} | [{lo:+.2f}, {hi:+.2f}] | {r['p_mcnemar']:.3g} |"
              + (f" {r['verdict']} |" if args.band is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
