"""DPRP on a timm model from a local weights file, in your own training loop; export back to plain timm.

    python examples/timm_model.py --smoke                  # resnet18, random 64 px images: a few seconds
    python examples/timm_model.py --model resnet18 --weights resnet18.safetensors --data my_images/ --epochs 5

Nothing is downloaded. The model is ``timm.create_model(NAME, pretrained=False)`` with the weights of a local
``.safetensors``/``.pth`` file (``dprp_surgery.io.load_model("timm:NAME@FILE")`` reads it without unpickling
and loads it strictly); without --weights the example first writes such a file from a randomly initialised
model into a temporary folder, to show the path a downloaded checkpoint takes. When the file's classifier has
a different class count than the data (an ImageNet checkpoint and 10 classes of your own), the head is
replaced with ``model.reset_classifier(num_classes)``.

Data: --data DIR is an ImageFolder (DIR/<class>/<image>, trained and evaluated on; or DIR/train and DIR/val,
each an ImageFolder), resized to the model's input size and normalised with the mean/std of
``timm.data.resolve_data_config``; without --data, random images with random labels (accuracy stays at chance).

The three DPRP pieces are marked (1), (2) and (3), as in examples/custom_loop.py; everything else is an
ordinary PyTorch loop. (4) ``export(model, "dense")`` turns every SVD layer back into the original layer
type: its state dict loads with ``strict=True`` into a fresh ``timm.create_model(NAME, num_classes=...)``,
which the example checks. The optimizer follows ``DPRPConfig.preset("tuned")`` (U and V at 1/20 of the
learning rate, the singular values at 10x); lambda_comp and epsilon default to deliberately aggressive values
so that ranks fall within a few epochs of random data (the tuned preset uses 2.0 and 0.1).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config

from dprp_surgery import DPRPConfig, export, factorize, summarize, svd_layers
from dprp_surgery.data import TensorImageDataset, TensorLoader, load_image_folder, open_data
from dprp_surgery.io import load_model
from dprp_surgery.losses import DPRPRegularizer
from dprp_surgery.pruning import RankPruner

# (normal, --smoke) defaults of the flags left unset
DEFAULTS = {"epochs": (3, 2), "batch_size": (16, 8)}
SMOKE_SIZE = 64  # --smoke's image size, for models that take any size (a ViT keeps its own)


def write_local_weights(name: str, folder: Path) -> Path:
    """A stand-in for a downloaded checkpoint: a random-init model's state dict as a .safetensors file."""
    from safetensors.torch import save_file

    model = timm.create_model(name, pretrained=False)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def random_images(n: int, num_classes: int, size: int, seed: int) -> TensorImageDataset:
    """`n` random uint8 RGB images with random labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return TensorImageDataset(images, labels, [f"class{i}" for i in range(num_classes)])


def takes_size(model: torch.nn.Module, size: int) -> bool:
    """Whether `model` runs on a `size` x `size` image (a ViT built for 224 px does not run on 64)."""
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except (AssertionError, RuntimeError, ValueError):
        return False
    return True


def image_folder(path: Path, size: int) -> tuple[TensorImageDataset, TensorImageDataset]:
    """(train, eval) of DIR/train + DIR/val (or test), or the one ImageFolder DIR twice."""
    if (path / "train").is_dir():
        return open_data(path, image_size=size, progress=False)
    ds = load_image_folder(path, image_size=size, progress=False)
    return ds, ds


def evaluate(model: torch.nn.Module, loader, max_batches: int | None = None) -> float:
    """Top-1 accuracy (percent)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for b, (x, y) in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.numel()
    return 100.0 * correct / max(total, 1)


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="timm architecture name")
    parser.add_argument("--weights", type=Path, default=None,
                        help="local .safetensors/.pth weights (default: written from a random-init model)")
    parser.add_argument("--data", type=Path, default=None,
                        help="ImageFolder DIR (or DIR with train/ and val/); default: random images")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the folder's classes, or 10")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square input size (default: timm's input size for the model; with --smoke 64 where "
                        "the model takes it)")
    parser.add_argument("--epochs", type=int, default=None, help="default 3 (2 with --smoke)")
    parser.add_argument("--batches", type=int, default=None,
                        help="batches per epoch (default: all of --data; 4 of random images; 2 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (8 with --smoke)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lambda-comp", type=float, default=10.0)
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the dense export's weights to this .safetensors")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run: 64 px (or the model's fixed size), 2 epochs of 2 batches of 8")
    args = parser.parse_args(argv)
    if args.num_classes is not None and args.num_classes < 1:
        raise SystemExit(f"--num-classes {args.num_classes}: give at least 1 (or leave it out).")
    for key, (normal, smoke) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else normal)
    if args.batches is None and (args.data is None or args.smoke):
        args.batches = 2 if args.smoke else 4
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights if args.weights is not None else write_local_weights(args.model, Path(tmp))
        try:  # timm.create_model(NAME, pretrained=False) + the file's weights, loaded strictly; no download
            model, arch = load_model(f"timm:{args.model}@{weights}")
        except ValueError as exc:
            raise SystemExit(f"cannot load {args.model} with weights {weights}: {exc}") from None
    print(f"model: {arch} with weights {weights if args.weights else 'of a random-init model (temporary file)'}")

    config_dc = resolve_data_config({}, model=model)  # timm's input size, mean and std for this model
    native = int(config_dc["input_size"][-1])
    size = args.image_size or (SMOKE_SIZE if args.smoke else native)
    if size != native and not takes_size(model, size):
        if args.image_size is not None:
            raise SystemExit(f"--image-size {size}: {args.model} does not take {size} px inputs (it is built for "
                             f"{native} px); leave --image-size out to use {native}.")
        size = native  # --smoke on a model with a fixed input size (e.g. a ViT's position embeddings)
    if args.data is not None:
        if not args.data.is_dir():
            raise SystemExit(f"--data {args.data} is not a directory (an ImageFolder: DIR/<class>/<image>)")
        try:
            train_ds, eval_ds = image_folder(args.data, size)
        except ValueError as exc:
            raise SystemExit(f"cannot read --data: {exc}") from None
        found = max(len(train_ds.classes), len(eval_ds.classes))
        if args.num_classes is not None and args.num_classes < found:
            raise SystemExit(f"--num-classes {args.num_classes} is fewer than the {found} classes of --data "
                             f"{args.data}; leave --num-classes out to use {found}.")
        num_classes = args.num_classes or len(train_ds.classes)
    else:
        num_classes = args.num_classes or 10
        train_ds = random_images(args.batches * args.batch_size, num_classes, size, args.seed)
        eval_ds = random_images(2 * args.batch_size, num_classes, size, args.seed + 1)
    if getattr(model, "num_classes", num_classes) != num_classes:
        model.reset_classifier(num_classes)  # e.g. an ImageNet checkpoint fine-tuned on 10 classes
    mean, std = config_dc["mean"], config_dc["std"]
    train = TensorLoader(train_ds, args.batch_size, shuffle=True, augment="cifar", mean=mean, std=std,
                         seed=args.seed, drop_last=len(train_ds) >= args.batch_size)
    evals = TensorLoader(eval_ds, args.batch_size, mean=mean, std=std)
    batches = len(train) if args.batches is None else min(args.batches, len(train))
    print(f"data: {len(train_ds)} {'images of ' + str(args.data) if args.data else 'random images'}, "
          f"{num_classes} classes, {size} px, mean {tuple(round(m, 3) for m in mean)}, "
          f"std {tuple(round(s, 3) for s in std)}; {args.epochs} epochs of {batches} batches of {args.batch_size}")

    tuned = DPRPConfig.preset("tuned")
    config = tuned.replace(lambda_comp=args.lambda_comp, epsilon=args.epsilon, min_rank=1, lr=args.lr,
                           seed=args.seed)
    example = torch.zeros(1, 3, size, size)
    dense_summary = summarize(model, example)
    # (1) surgery: every Conv/Linear becomes U diag(s) V^T at full rank (same function as before)
    model = factorize(model, config)
    before = {n: m.rank for n, m in svd_layers(model)}
    top1_before = evaluate(model, evals)

    factors = [p for _, m in svd_layers(model) for p in (m.U, m.V)]
    sigmas = [m.s for _, m in svd_layers(model)]
    taken = {id(p) for p in factors + sigmas}
    others = [p for p in model.parameters() if id(p) not in taken]
    optimizer = torch.optim.SGD([{"params": others},
                                 {"params": factors, "lr": config.lr * config.factor_lr_scale},
                                 {"params": sigmas, "lr": config.lr * config.sigma_lr_scale}],
                                lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    regularizer = DPRPRegularizer(config)
    pruner = RankPruner(config)

    for epoch in range(args.epochs):
        model.train()
        train.set_epoch(epoch)
        for b, (x, y) in enumerate(train):
            if b >= batches:
                break
            app = F.cross_entropy(model(x), y)
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
    top1_after = evaluate(model, evals)
    print(f"ranks: {sum(before.values())} -> {sum(after.values())} (sum over {len(after)} layers)")
    print(f"params: {dense_summary.params} -> {now.params}; MACs: {dense_summary.macs} -> {now.macs}")
    print(f"top-1: {top1_before:.2f}% -> {top1_after:.2f}% on {len(eval_ds)} "
          f"{'images' if args.data else 'random images (chance level)'}")

    # (4) back to the plain timm architecture: every SVD layer as its original layer type (low-rank weights)
    dense = export(model, "dense").eval()
    fresh = timm.create_model(args.model, pretrained=False, num_classes=num_classes).eval()
    missing, unexpected = fresh.load_state_dict(dense.state_dict(), strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    x = next(iter(evals))[0]
    with torch.no_grad():
        want, got = model.eval()(x), fresh(x)
    diff = (want - got).abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    print(f"dense export: loads strict=True into timm.create_model({args.model!r}, num_classes={num_classes}), "
          f"max |output difference| {diff:.2e}: OK")
    if args.out is not None:
        from safetensors.torch import save_file

        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in fresh.state_dict().items()}, str(args.out))
        print(f"wrote {args.out} (load with dprp_surgery.io.load_model('timm:{args.model}@{args.out}'))")
    return after


if __name__ == "__main__":
    main()
