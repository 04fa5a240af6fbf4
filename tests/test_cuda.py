"""CUDA paths: factorize, training with AMP and pruning, export. Skipped where torch sees no GPU."""

from __future__ import annotations

import pytest
import timm
import torch

from dprp_surgery import DPRPConfig, export, factorize, svd_layers
from dprp_surgery.data import TensorImageDataset
from dprp_surgery.models import resnet20
from dprp_surgery.trainer import DPRPTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 on the GPU (cuDNN convolutions default to TF32, a 1e-3 relative error)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _data(n: int, seed: int) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])


@pytest.mark.parametrize("scheme", ["paper", "channel", "spatial"])
def test_factorize_on_cuda_preserves_the_function(scheme):
    torch.manual_seed(0)
    dense = timm.create_model("resnet18", num_classes=10).cuda().eval()
    fact = factorize(dense, DPRPConfig(scheme=scheme)).eval()
    assert all(layer.U.is_cuda for _, layer in svd_layers(fact))
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        y, y_fact = dense(x), fact(x)
    assert ((y_fact - y).norm() / y.norm()).item() <= 1e-5


@pytest.mark.parametrize("amp", [False, True])
def test_training_with_pruning_on_cuda(amp, tmp_path):
    torch.manual_seed(0)
    model = factorize(resnet20(), DPRPConfig())
    full = {n: m.rank for n, m in svd_layers(model)}
    cfg = DPRPConfig(epochs=2, batch_size=32, lr=0.05, lambda_comp=10.0, epsilon=0.5, sigma_lr_scale=10.0,
                     device="cuda", amp=amp)
    trainer = DPRPTrainer(model, cfg, _data(128, 1), _data(64, 2), run_dir=tmp_path, progress=False)
    history = trainer.fit()
    assert trainer.use_amp is amp
    final = {n: m.rank for n, m in svd_layers(trainer.model)}
    assert sum(final.values()) < sum(full.values())
    assert all(torch.isfinite(torch.tensor(rec["loss"])) for rec in history)
    assert all(p.is_cuda for p in trainer.model.parameters())
    for mode in ("dense", "factorized"):
        exported = export(trainer.model, mode).eval()
        x = torch.randn(4, 3, 32, 32, device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(exported(x), trainer.model.eval()(x), rtol=1e-3, atol=1e-3)
