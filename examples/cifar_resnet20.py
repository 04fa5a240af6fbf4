"""Compress a pretrained CIFAR-10 ResNet-20 with the Python API: compress -> summarize -> export -> save -> load.

    python examples/cifar_resnet20.py --smoke       # 256 train / 128 test images, one epoch, pruning every step
    python examples/cifar_resnet20.py --epochs 10 --out runs/cifar_resnet20

By default the weights are ../shared/models/cifar10_resnet20.th and the data ../shared/datasets/cifar10-jpeg.tar.gz
(both relative to the repository root; the archive is extracted and decoded once into the dprp_surgery cache).
The steps are marked (1) to (5):

(1) load the pretrained model and the data (train batches with the CIFAR crop + flip augmentation, ImageNet
    mean/std as the published weights expect; `--train-limit`/`--test-limit` take class-balanced subsets);
(2) `compress` = `factorize` + `DPRPTrainer.fit` with `DPRPConfig.preset("tuned")` (the settings the CIFAR-10
    reproduction found best for pretrained models; `--preset tuned-target50` stops at half the parameters,
    `--preset finetune` has the paper's losses);
(3) `summarize` before and after: parameters, MACs and rank per layer;
(4) `export(model, "auto")` realises every layer in its cheaper form (dense or two small layers) and `save`
    writes it as a pickle-free artifact (manifest.json + model.safetensors) into the run directory;
(5) `load` rebuilds the artifact and its outputs are checked against the trained model.

The run directory (--out) also holds checkpoint.pt and history.jsonl of the training run; a new run needs a
new (or deleted) --out.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from rich.console import Console

from dprp_surgery import DPRPConfig, compress, export, load, save, summarize
from dprp_surgery.config import PRESETS
from dprp_surgery.data import IMAGENET_MEAN, IMAGENET_STD, TensorLoader, open_data
from dprp_surgery.models import load_cifar_checkpoint, resnet20
from dprp_surgery.trainer import run_files

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def evaluate(model: torch.nn.Module, loader) -> float:
    """Top-1 accuracy (percent) of `model` on `loader`, on the model's device."""
    device = next(model.parameters()).device
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
            total += y.numel()
    return 100.0 * correct / max(total, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=SHARED / "models" / "cifar10_resnet20.th",
                        help="pretrained ResNet-20 checkpoint (default: ../shared/models/cifar10_resnet20.th)")
    parser.add_argument("--data", default=str(SHARED / "datasets" / "cifar10-jpeg.tar.gz"),
                        help="ImageFolder dir with train/ and test/ (or val/), a .tar.gz of one, or cifar10:DIR")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the preset's, 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's, 128")
    parser.add_argument("--train-limit", type=int, default=None, help="class-balanced training subset")
    parser.add_argument("--test-limit", type=int, default=None, help="class-balanced test subset")
    parser.add_argument("--preset", default="tuned", choices=list(PRESETS), help="DPRPConfig preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    parser.add_argument("--out", type=Path, default=Path("runs/cifar_resnet20"), help="run directory")
    parser.add_argument("--smoke", action="store_true", help="256 train / 128 test images, 1 epoch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_limit, args.test_limit = args.train_limit or 256, args.test_limit or 128
        args.epochs = args.epochs or 1
    console = Console(width=None if sys.stdout.isatty() else 140)  # wide tables when piped or captured

    # (1) the pretrained model and the data
    if run_files(args.out):
        raise SystemExit(f"--out {args.out} already holds a training run: choose another --out or delete it")
    if not args.weights.is_file():
        raise SystemExit(f"pretrained weights {args.weights} not found: pass --weights PATH/cifar10_resnet20.th")
    if not re.match(r"^cifar100?:", args.data) and not Path(args.data).expanduser().exists():
        raise SystemExit(f"dataset {args.data} not found: pass --data (an ImageFolder dir with train/ and test/, "
                         "a .tar.gz of one, or cifar10:DIR)")
    model = load_cifar_checkpoint(resnet20(), args.weights)
    try:
        # limits decode only the images they keep (class-balanced, as dprp_surgery.data.subset)
        train_ds, test_ds = open_data(args.data, progress=not args.quiet, train_limit=args.train_limit or None,
                                      eval_limit=args.test_limit or None, seed=args.seed)
    except ValueError as exc:
        raise SystemExit(f"cannot open the dataset: {exc}") from None
    preset = DPRPConfig.preset(args.preset, seed=args.seed, device=args.device)
    # one short smoke epoch: the preset's cool-down epoch and 25-step pruning would never prune in it. One replace,
    # so no intermediate 1-epoch config with the cool-down epoch warns that nothing will be pruned
    smoke = {"reg_cooldown_epochs": 0, "prune_every": 1} if args.smoke else {}
    config = preset.replace(epochs=args.epochs or preset.epochs, batch_size=args.batch_size or preset.batch_size,
                            **smoke)
    if args.smoke:
        print("smoke: pruning every step and no cool-down epoch, so one short epoch shows DPRP at work")
    elif config.reg_cooldown_epochs >= config.epochs:
        print(f"note: all {config.epochs} epoch(s) are the preset's cool-down (reg_cooldown_epochs="
              f"{config.reg_cooldown_epochs}): no pruning will run; give more --epochs")
    train = TensorLoader(train_ds, config.batch_size, shuffle=True, augment="cifar", mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, seed=config.seed, drop_last=len(train_ds) >= config.batch_size)
    test = TensorLoader(test_ds, 256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    print(f"data: {len(train_ds)} train / {len(test_ds)} test images, {len(train_ds.classes)} classes; "
          f"{config.epochs} epochs, batch {config.batch_size}")

    example = torch.zeros(1, 3, 32, 32)
    before = summarize(model, example)
    top1_before = evaluate(model, test)

    # (2) factorize and train with DPRP; checkpoint.pt and history.jsonl go to the run directory
    result = compress(model, config, train, test, run_dir=args.out, progress=not args.quiet)
    trained = result.model.cpu().eval()
    top1_after = evaluate(trained, test)

    # (3) what changed
    after = summarize(trained, example)
    console.print(before.to_table(title="pretrained ResNet-20 (dense)"))
    console.print(after.to_table(title=f"after DPRP ({config.epochs} epochs): dense -> now"))
    ranks = after.ranks()
    full = sum(r.full_rank for r in after.rows if r.status == "factorized")
    print(f"ranks: {full} -> {sum(ranks.values())} (sum over {len(ranks)} layers)")
    print(f"params: {before.params} -> {after.params} ({after.params_removed:+.1%} removed); "
          f"MACs: {before.macs} -> {after.macs} ({after.macs_removed:+.1%} removed)")
    print(f"top-1: {top1_before:.2f}% -> {top1_after:.2f}% on {len(test_ds)} test images")

    # (4) export each layer in its cheaper form and save a pickle-free artifact
    exported = export(trained, "auto").eval()
    shipped = summarize(exported, example)
    artifact = save(exported, args.out / "model", arch="cifar:resnet20", config=config, input_size=(3, 32, 32))
    print(f"exported (auto): {shipped.params} params, {shipped.macs} MACs; saved to {artifact}")

    # (5) load it back and check it computes what the trained model computes
    loaded = load(artifact)
    x = next(iter(test))[0][:16]
    with torch.no_grad():
        want, got = trained(x), loaded(x)
    diff = (want - got).abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    print(f"load-back check: max |output difference| {diff:.2e} on {x.shape[0]} test images: OK")
    return {"before": before, "after": after, "top1_before": top1_before, "top1_after": top1_after,
            "artifact": artifact, "max_diff": diff}


if __name__ == "__main__":
    main()
