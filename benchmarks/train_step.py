"""Training-step time of the factorized CIFAR ResNet-20 against the dense model (issue 3 benchmark).

    python benchmarks/train_step.py --steps 10 --warmup 3 --fraction 0.5
    python benchmarks/train_step.py --ranks runs/r20/history.jsonl   # ranks of a finished run
    python benchmarks/train_step.py --profile paper                     # where the time of one step goes
    python benchmarks/train_step.py --smoke          # seconds, meaningless timings: keeps the script alive in tests

One step = forward, cross-entropy, the DPRP regularizer (factorized models only; eq. (8) with the
default weights), backward and an SGD step (momentum 0.9, weight decay 1e-4), on a random batch. The
dense model, each scheme at full rank and each scheme after pruning (every layer truncated to
``ceil(fraction * full_rank)``, or to the ranks of a JSON file) are timed round-robin, one step each in
turn, so that load changes on a shared machine hit every configuration alike; the table reports
medians and the ratio to the dense step. "model only" leaves the regularizer out.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from dprp_surgery import DPRPConfig, factorize, svd_layers
from dprp_surgery.config import SCHEMES
from dprp_surgery.io import check_ranks_match, read_ranks
from dprp_surgery.losses import DPRPRegularizer
from dprp_surgery.models import resnet20


def truncated(model, ranks: dict[str, int] | None, fraction: float):
    """A copy with every SVD layer cut to its given rank (clipped to the layer) or to a fraction of theta."""
    model = copy.deepcopy(model)
    for name, layer in svd_layers(model):
        keep = ranks.get(name, layer.rank) if ranks else math.ceil(fraction * layer.full_rank)
        layer.truncate_(max(1, min(layer.rank, int(keep))))
    return model


class Config:
    """One timed configuration: a model, its optimizer and whether the regularizer is added."""

    def __init__(self, name: str, model, reg: DPRPRegularizer | None) -> None:
        self.name, self.model, self.reg = name, model, reg
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.times: list[float] = []

    def step(self, x, y) -> float:
        t0 = time.perf_counter()
        loss = F.cross_entropy(self.model(x), y)
        if self.reg is not None:
            loss = loss + self.reg(self.model)[0]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def overheads(model, reg: DPRPRegularizer, repeats: int) -> tuple[float, float]:
    """Median seconds of (the regularizer's forward + backward, rebuilding every dense weight + backward)."""
    layers = [m for _, m in svd_layers(model)]

    def reg_step():
        reg(model)[0].backward()

    def rebuild_step():
        sum(m.dense_weight().sum() for m in layers).backward()

    out = []
    for fn in (reg_step, rebuild_step):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    model.zero_grad(set_to_none=True)
    return out[0], out[1]


def profile(cfg: Config, x, y, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    cfg.step(x, y)
    with prof(activities=[ProfilerActivity.CPU]) as p:
        cfg.step(x, y)
    print(f"\nprofile of one step: {cfg.name}")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--fraction", type=float, default=0.5, help="pruned rank = ceil(fraction * theta)")
    parser.add_argument("--ranks", help="JSON {layer: rank}, a run.json (its \"ranks\") or a run's history.jsonl "
                        "(its last epoch's ranks); overrides --fraction")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model-only", action="store_true",
                        help="also time the factorized models without the regularizer")
    parser.add_argument("--profile", metavar="CONFIG", help="profile one step of a configuration (e.g. 'paper')")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, not minutes (batch 8, 1 warm-up and 1 timed step, 2 overhead repeats): keeps "
                             "the script alive in tests; the timings mean nothing")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: time at least 1 step per configuration (e.g. --steps 10)")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: give 0 or more untimed steps")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction {args.fraction}: the pruned rank is ceil(fraction * theta), give a value in (0, 1]")
    ranks = None
    if args.ranks:
        try:
            ranks = read_ranks(args.ranks)
            check_ranks_match(ranks, [n for n, _ in svd_layers(factorize(resnet20(), DPRPConfig()))], args.ranks)
        except ValueError as exc:
            parser.error(f"--ranks: {exc}")
    repeats = 20
    if args.smoke:
        args.batch_size, args.steps, args.warmup, repeats = 8, 1, 1, 2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}, batch {args.batch_size}")
    dense = resnet20()
    pruned_label = f"ranks of {args.ranks}" if ranks else f"{args.fraction:g} theta"
    configs = [Config("dense", dense, None)]
    for scheme in args.schemes:
        cfg = DPRPConfig(scheme=scheme)
        fact = factorize(dense, cfg)
        reg = DPRPRegularizer(cfg)
        configs.append(Config(f"{scheme}", fact, reg))
        if args.model_only:
            configs.append(Config(f"{scheme} (model only)", copy.deepcopy(fact), None))
        configs.append(Config(f"{scheme} pruned", truncated(fact, ranks, args.fraction), reg))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)

    if args.profile:
        by_name = {c.name: c for c in configs}
        if args.profile not in by_name:
            raise SystemExit(f"--profile: choose one of {', '.join(by_name)}")
        profile(by_name[args.profile], x, y, args.rows)
        return

    for _ in range(args.warmup):
        for c in configs:
            c.step(x, y)
    for _ in range(args.steps):
        for c in configs:  # round-robin: load changes hit every configuration alike
            c.times.append(c.step(x, y))
    base = statistics.median(configs[0].times)
    print(f"\npruned = every layer cut to {pruned_label}; median of {args.steps} steps after {args.warmup} warm-up")
    print("| configuration | mean rank | step (s) | ratio to dense |")
    print("|---|---|---|---|")
    for c in configs:
        layers = svd_layers(c.model)
        mean_rank = f"{sum(m.rank for _, m in layers) / len(layers):.2f}" if layers else "-"
        med = statistics.median(c.times)
        print(f"| {c.name} | {mean_rank} | {med:.3f} | {med / base:.2f} |", flush=True)
    print(f"\nwhere the extra time goes (median of {repeats}, each alone; a share of the dense step):")
    print("| configuration | regularizer fwd+bwd (ms) | dense-weight rebuild fwd+bwd (ms) | sum / dense step |")
    print("|---|---|---|---|")
    for c in configs:
        if c.reg is None:
            continue
        r, w = overheads(c.model, c.reg, repeats)
        print(f"| {c.name} | {1e3 * r:.1f} | {1e3 * w:.1f} | {(r + w) / base:.1%} |", flush=True)


if __name__ == "__main__":
    main()
