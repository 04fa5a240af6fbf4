"""Wall time of `factorize` as a ratio to one forward pass at batch 1 (issue 2 benchmark).

    python benchmarks/factorize_time.py --models resnet50 vit_base_patch16_224 --repeats 3
"""

from __future__ import annotations

import argparse
import difflib
import statistics
import sys
import time
from typing import NoReturn

import timm
import torch

from dprp_surgery import DPRPConfig, factorize
from dprp_surgery.config import SCHEMES


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fail(parser: argparse.ArgumentParser, message: object) -> NoReturn:
    """Exit 2 with a one-line `PROG: error: MESSAGE` (bad input, no traceback)."""
    parser.exit(2, f"{parser.prog}: error: {' '.join(str(message).split())}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_base_patch16_224"], help="timm names")
    parser.add_argument("--schemes", nargs="+", default=["paper", "channel"], choices=SCHEMES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        _fail(parser, f"--repeats {args.repeats}: give at least 1.")
    for name in args.models:  # every name is checked before anything is timed
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models()."
            _fail(parser, f"--models: unknown timm model {name!r}.{hint}")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}")
    print("| model | scheme | factorize (s) | forward b=1 (s) | ratio |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model = timm.create_model(name).eval()
        x = torch.randn(1, *model.pretrained_cfg["input_size"])
        with torch.no_grad():
            model(x)
            fwd = _median_time(lambda m=model, x=x: m(x), args.repeats)
        for scheme in args.schemes:
            cfg = DPRPConfig(scheme=scheme)
            t = _median_time(lambda m=model, c=cfg: factorize(m, c), args.repeats)
            print(f"| {name} | {scheme} | {t:.2f} | {fwd:.3f} | {t / fwd:.0f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
