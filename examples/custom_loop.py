"""DPRP inside your own training loop: factorize, add the regularizer to the loss, prune once an epoch.

    python examples/custom_loop.py                 # a CIFAR ResNet-8 on random data, a few seconds
    python examples/custom_loop.py --depth 20 --epochs 5 --batches 20

The three DPRP pieces are marked (1), (2) and (3); everything else is an ordinary PyTorch loop. The
settings are deliberately aggressive (large lambda_comp and epsilon) so that ranks fall within a few
epochs of random data; the paper's values are `DPRPConfig()` (Table I) or `DPRPConfig.preset("finetune")`.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dprp_surgery import DPRPConfig, factorize, summarize, svd_layers
from dprp_surgery.losses import DPRPRegularizer
from dprp_surgery.models import CifarResNet
from dprp_surgery.pruning import RankPruner


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=8, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.depth < 8 or (args.depth - 2) % 6:
        parser.error(f"--depth {args.depth}: a CIFAR ResNet has depth 6n+2 with n >= 1; use 8, 14, 20, 32, 44, 56, ...")
    for flag, value in (("--epochs", args.epochs), ("--batches", args.batches), ("--batch-size", args.batch_size),
                        ("--image-size", args.image_size)):
        if value < 1:
            parser.error(f"{flag} {value}: give at least 1")

    torch.manual_seed(args.seed)
    config = DPRPConfig(lambda_comp=10.0, epsilon=0.5, min_rank=1)
    original = CifarResNet(args.depth)
    # (1) surgery: every Conv/Linear becomes U diag(s) V^T at full rank (same function as before)
    model = factorize(original, config)
    example = torch.randn(1, 3, args.image_size, args.image_size)
    before = {n: m.rank for n, m in svd_layers(model)}
    dense = summarize(original, example)  # the dense model: at full rank the factorized one has more parameters

    sigmas = [m.s for _, m in svd_layers(model)]
    others = [p for p in model.parameters() if all(p is not s for s in sigmas)]
    optimizer = torch.optim.SGD([{"params": others}, {"params": sigmas, "lr": 0.5}], lr=0.05, momentum=0.9,
                                weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    regularizer = DPRPRegularizer(config)
    pruner = RankPruner(config)

    g = torch.Generator().manual_seed(args.seed)
    n = args.batches * args.batch_size
    images = torch.randn(n, 3, args.image_size, args.image_size, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)

    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for b in range(args.batches):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            app = F.cross_entropy(model(images[idx]), labels[idx])
            # (2) L_total = L_app + lambda_str L_str + lambda_comp L_comp  (eq. (8))
            reg, terms = regularizer(model, epoch=epoch)
            loss = app + reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        # (3) rank pruning: truncate to tau_l and slice the optimizer's momentum buffers alike
        changes = pruner.step(model, optimizer, epsilon=regularizer.epsilon_at(epoch))
        ranks = [m.rank for _, m in svd_layers(model)]
        print(f"epoch {epoch}: loss {loss.item():.3f} (app {app.item():.3f}, orth {float(terms['orth']):.2e}, "
              f"comp {float(terms['comp']):.3f}), pruned {len(changes)} layers, mean rank "
              f"{sum(ranks) / len(ranks):.2f}")

    after = {n: m.rank for n, m in svd_layers(model)}
    now = summarize(model, example)
    print(f"ranks: {sum(before.values())} -> {sum(after.values())} (sum over {len(after)} layers)")
    print(f"params: {dense.params} -> {now.params}; MACs: {dense.macs} -> {now.macs}")
    return after


if __name__ == "__main__":
    main()
