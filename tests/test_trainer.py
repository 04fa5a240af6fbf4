"""DPRPTrainer / compress: pruning, history, determinism, checkpoints, resume after a kill, DDP.

Everything runs on a CIFAR ResNet-8 with 16 x 16 random images for a few batches. Torch is kept to one
thread: on the shared 2-core machine, two OpenMP threads competing with other processes slow small
ops down a hundredfold.

This file is also the script of the child processes (``python tests/test_trainer.py child RUN_DIR``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dprp_surgery import DPRPConfig, SVDLinear, factorize, svd_layers
from dprp_surgery.data import TensorImageDataset
from dprp_surgery.models import CifarResNet
from dprp_surgery.trainer import CompressionResult, DPRPTrainer, NonFiniteLossError, cap_factor_steps, compress

REPO = Path(__file__).resolve().parents[1]

# Strong compression so that ranks drop within two epochs of a few batches.
STRONG = {"batch_size": 16, "lr": 0.05, "lambda_comp": 10.0, "epsilon": 0.5, "sigma_lr_scale": 10.0, "device": "cpu"}

HISTORY_FIELDS = {
    "epoch", "step", "loss", "app", "orth", "sort", "comp", "structure", "total_reg", "train_top1", "train_top5",
    "val_loss", "val_top1", "val_top5", "lr", "lrs", "epsilon", "lambda_str", "lambda_comp", "mu_orth", "mu_sort",
    "ranks", "mean_rank", "pruned", "params", "macs", "dense_params", "dense_macs", "params_removed", "macs_removed",
    "singular_values", "compression_stopped", "time",
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_BASE: dict[str, nn.Module] = {}


def make_model(seed: int = 0) -> nn.Module:
    """A factorized CIFAR ResNet-8 (factorized once per process, then copied)."""
    import copy

    if seed not in _BASE:
        torch.manual_seed(seed)
        _BASE[seed] = factorize(CifarResNet(8), DPRPConfig())
    return copy.deepcopy(_BASE[seed])


def make_data(n: int = 48, seed: int = 1) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in svd_layers(model)}


# ----------------------------------------------------------------------------- training and history
def test_ranks_shrink_and_history_has_every_field(tmp_path):
    model = make_model()
    full = ranks(model)
    cfg = DPRPConfig(epochs=2, **STRONG)
    trainer = DPRPTrainer(model, cfg, make_data(), make_data(16, seed=2), run_dir=tmp_path, progress=False)
    history = trainer.fit()
    final = ranks(trainer.model)
    assert all(final[n] <= full[n] for n in full) and sum(final.values()) < sum(full.values())
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(lines) == len(history) == 2
    assert lines == json.loads(json.dumps(list(history)))
    for rec in lines:
        assert HISTORY_FIELDS <= set(rec), HISTORY_FIELDS - set(rec)
        assert set(rec["lrs"]) == {"other", "factors", "sigma"}
        assert {n: len(v) for n, v in rec["singular_values"].items()} == rec["ranks"]
        assert 0 <= rec["val_top1"] <= rec["val_top5"] <= 100 and rec["time"] > 0
    assert lines[-1]["ranks"] == final and lines[-1]["params"] < lines[-1]["dense_params"] + 10**6
    assert any(rec["pruned"] for rec in lines)
    assert lines[0]["params"] >= lines[-1]["params"]
    assert lines[-1]["lrs"]["sigma"] == pytest.approx(10 * lines[-1]["lrs"]["other"])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["ranks"] == final and len(ckpt["history"]) == 2


def test_prune_every_step_and_factor_lr_scale():
    cfg = DPRPConfig(epochs=2, prune_unit="step", prune_every=1, factor_lr_scale=0.5, **STRONG)
    trainer = DPRPTrainer(make_model(), cfg, make_data(), progress=False)
    history = trainer.fit()
    assert sum(len(rec["pruned"]) for rec in history) >= 2  # pruned inside epochs, between live graphs
    assert history[-1]["lrs"]["factors"] == pytest.approx(0.5 * history[-1]["lrs"]["other"])
    assert sum(ranks(trainer.model).values()) < sum(ranks(make_model()).values())


def test_epoch_stats_are_the_step_means_and_steps_never_wait_for_the_device(monkeypatch):
    # the training steps build no tensor from Python numbers and read no device value back (on CUDA each
    # would make the CPU wait for the GPU), except the deliberate non-finite check: one bool per step
    import dprp_surgery.trainer as trainer_module

    cfg = DPRPConfig(epochs=2, prune_start_epoch=2, **STRONG)  # ranks stay: no new rank tensors in epoch 1
    trainer = DPRPTrainer(make_model(), cfg, make_data(40), progress=False)  # batches of 16, 16 and 8
    steps: list[dict[str, float]] = []
    real_check, real_topk, real_epoch = trainer._check_finite, trainer_module._topk_correct, trainer._train_epoch

    def check(values, epoch, step):
        steps.append({k: float(v) for k, v in values.items()})
        real_check(values, epoch, step)

    def topk(logits, target):
        correct = real_topk(logits, target)
        steps[-1].update(n=target.shape[0], top1=float(correct[0]), top5=float(correct[1]))
        return correct

    calls: dict[str, int] = {}

    def counted(m, owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        m.setattr(owner, name, wrapper)

    def epoch_counted(epoch):
        if epoch == 0:  # the first epoch builds the cached rank tensors
            return real_epoch(epoch)
        with monkeypatch.context() as m:  # counts the second epoch only, steps and end of epoch
            m.setattr(trainer, "_check_finite", real_check)  # without this test's spies, which read values
            m.setattr(trainer_module, "_topk_correct", real_topk)
            counted(m, torch, "tensor")
            for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
                counted(m, torch.Tensor, name)
            return real_epoch(epoch)

    monkeypatch.setattr(trainer, "_check_finite", check)
    monkeypatch.setattr(trainer_module, "_topk_correct", topk)
    monkeypatch.setattr(trainer, "_train_epoch", epoch_counted)
    history = trainer.fit()
    n_steps = len(steps)
    assert n_steps == 3 and [s["n"] for s in steps] == [16, 16, 8]
    first = history[0]
    for k in ("loss", "app", "orth", "sort", "comp", "structure", "total_reg"):
        assert first[k] == pytest.approx(sum(s[k] for s in steps) / n_steps, rel=1e-12), k
    assert first["train_top1"] == pytest.approx(100.0 * sum(s["top1"] for s in steps) / 40)
    assert first["train_top5"] == pytest.approx(100.0 * sum(s["top5"] for s in steps) / 40)
    # epoch 1: no tensor from host numbers, no value read per step; one list of totals at the end
    assert calls.get("tensor", 0) == 0 and calls.get("item", 0) == 0, calls
    assert calls.get("__float__", 0) == 0 and calls.get("__int__", 0) == 0, calls
    assert calls.get("tolist", 0) == 1 and calls.get("__bool__", 0) == 3, calls
    assert 0 <= history[1]["train_top1"] <= history[1]["train_top5"] <= 100


def test_cooldown_epoch_neither_compresses_nor_prunes():
    cfg = DPRPConfig(epochs=3, reg_cooldown_epochs=1, prune_unit="step", prune_every=1, **STRONG)
    history = DPRPTrainer(make_model(), cfg, make_data(), progress=False).fit()
    assert any(rec["pruned"] for rec in history[:2])
    assert history[2]["pruned"] == {} and history[2]["lambda_comp"] == 0.0 and history[2]["comp"] >= 0
    assert history[2]["ranks"] == history[1]["ranks"]


def test_target_compression_stops_compressing_and_survives_resume(tmp_path):
    cfg = DPRPConfig(epochs=4, prune_unit="step", prune_every=1, target_compression=0.02, **STRONG)
    trainer = DPRPTrainer(make_model(), cfg, make_data(), run_dir=tmp_path, progress=False)
    # the dense count is the unfactorized model's, exactly as summarize() reports it
    assert trainer.dense_params == trainer.summary().dense_params
    history = trainer.fit()
    stop = next(i for i, rec in enumerate(history) if rec["compression_stopped"])
    assert stop < 3, "the strong settings pass 2% within two epochs (11% after three without a target)"
    assert history[stop]["params_removed"] >= 0.02
    for rec in history[stop + 1:]:  # after the epoch that reached the target: fixed ranks, no L_comp
        assert rec["pruned"] == {} and rec["lambda_comp"] == 0.0 and rec["ranks"] == history[stop]["ranks"]
    assert trainer.compression_rate() == pytest.approx(history[-1]["params_removed"])
    resumed = DPRPTrainer(make_model(), cfg.replace(epochs=5), make_data(), run_dir=tmp_path, resume=True,
                          progress=False)
    assert resumed.compression_stopped and resumed.dense_params == trainer.dense_params
    assert resumed.fit()[-1]["ranks"] == history[-1]["ranks"]


def test_structure_when_frozen_false_trains_plain_factors_after_the_target(tmp_path):
    cfg = DPRPConfig(epochs=3, prune_unit="step", prune_every=1, target_compression=0.02, structure_when_frozen=False,
                     **STRONG)
    history = DPRPTrainer(make_model(), cfg, make_data(), progress=False).fit()
    stop = next(i for i, rec in enumerate(history) if rec["compression_stopped"])
    assert stop < 2 and history[0]["lambda_str"] == cfg.lambda_str
    for rec in history[stop + 1:]:  # fixed ranks, neither L_comp nor L_str, L_orth still logged
        assert rec["lambda_str"] == rec["lambda_comp"] == 0.0 and rec["pruned"] == {}
        assert rec["loss"] == pytest.approx(rec["app"], rel=1e-6) and rec["orth"] > 0


# ----------------------------------------------------------------------------- capped factor steps
def _linear_with_sigma(s: list[float]) -> SVDLinear:
    torch.manual_seed(0)
    layer = SVDLinear.from_dense(nn.Linear(4, 5))
    with torch.no_grad():
        layer.s.copy_(torch.tensor(s))
    return layer


def test_cap_factor_steps_divides_columns_by_max_s_squared():
    layer = _linear_with_sigma([2.0, 0.5, -3.0, 1.0])
    model = nn.Sequential(layer)
    layer.U.grad = torch.ones_like(layer.U)
    layer.V.grad = torch.full_like(layer.V, 2.0)
    layer.s.grad = torch.ones_like(layer.s)
    cap_factor_steps(model)
    expected = torch.tensor([1 / 4, 1.0, 1 / 9, 1.0])  # max(s^2, 1) = 4, 1, 9, 1
    torch.testing.assert_close(layer.U.grad, expected.expand_as(layer.U))
    torch.testing.assert_close(layer.V.grad, 2 * expected.expand_as(layer.V))
    torch.testing.assert_close(layer.s.grad, torch.ones(4))  # s is not a factor
    layer.U.grad = None
    cap_factor_steps(model)  # a factor without a gradient is skipped
    assert layer.U.grad is None
    torch.testing.assert_close(layer.V.grad, 2 * expected.expand_as(layer.V) * expected)


def test_capped_step_moves_each_component_at_most_a_dense_step():
    """SGD on U alone: dW = -lr G V diag(s^2 / max(s^2, 1)) V^T, G the gradient of the dense weight."""
    layer = _linear_with_sigma([2.0, 0.5, -3.0, 1.0])
    x = torch.randn(7, 4)
    w0 = layer.dense_weight().detach()
    dense = w0.clone().requires_grad_(True)
    (x @ dense.T + layer.bias.detach()).square().sum().backward()
    layer.s.requires_grad_(False)
    layer.V.requires_grad_(False)
    layer(x).square().sum().backward()
    cap_factor_steps(nn.Sequential(layer))
    torch.optim.SGD([layer.U], lr=0.01).step()
    s2 = layer.s.square()
    expected = w0 - 0.01 * dense.grad @ layer.V @ torch.diag(s2 / s2.clamp_min(1.0)) @ layer.V.T
    torch.testing.assert_close(layer.dense_weight().detach(), expected)


@pytest.mark.parametrize("factor_step", ["plain", "capped"])
def test_trainer_caps_factor_steps_only_when_asked(factor_step, monkeypatch):
    import dprp_surgery.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "cap_factor_steps", lambda model: calls.append(model))
    cfg = DPRPConfig(epochs=1, factor_step=factor_step, **STRONG)
    trainer = DPRPTrainer(make_model(), cfg, make_data(), progress=False)
    trainer.fit()
    assert len(calls) == (3 if factor_step == "capped" else 0)  # 48 images, batch 16
    assert all(model is trainer.model for model in calls)


def test_determinism_same_seed_same_weights():
    cfg = DPRPConfig(epochs=2, seed=3, **STRONG)
    x = torch.randn(48, 3, 16, 16)
    y = torch.randint(0, 10, (48,))
    runs = []
    for _ in range(2):
        trainer = DPRPTrainer(make_model(), cfg, TensorDataset(x, y), progress=False)  # Dataset -> seeded DataLoader
        trainer.fit()
        runs.append((ranks(trainer.model), weights(trainer.model), trainer.history))
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k
    assert [h["loss"] for h in runs[0][2]] == [h["loss"] for h in runs[1][2]]


def test_adamw_cosine_warmup_and_compress():
    cfg = DPRPConfig(epochs=2, optimizer="adamw", lr_schedule="cosine", warmup_epochs=1, lr=0.01, batch_size=16,
                     device="cpu")
    torch.manual_seed(0)
    result = compress(CifarResNet(8), cfg, make_data(), progress=False)
    assert isinstance(result, CompressionResult) and result.run_dir is None
    assert svd_layers(result.model) and result.summary.params == result.history[-1]["params"]
    assert not any(m.training for m in result.model.modules())  # ready to evaluate, as a loaded model is
    # warm-up reaches the scheduled lr at the last step of epoch 0; cosine (T_max = 2) halves it for epoch 1
    assert [h["lr"] for h in result.history] == pytest.approx([0.01, 0.005])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("distill", [0.0, 1.0])
def test_distillation_from_the_dense_teacher(distill):
    # no batch norm, so the factorized student computes the teacher's function exactly at the start: with
    # distill = 1 and no regularizer its first steps have (almost) zero gradient; with distill = 0 it learns labels
    cfg = DPRPConfig(epochs=1, batch_size=16, lr=0.1, momentum=0.0, weight_decay=0.0, regularizer="none",
                     distill=distill, distill_temperature=2.0, device="cpu")
    dense = _mlp()
    before = weights(factorize(dense, cfg))
    result = compress(dense, cfg, make_data(), progress=False)
    moved = max((result.model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    record = result.history[-1]
    if distill:
        assert moved < 1e-4 and record["kd"] < 1e-6 and record["app"] == pytest.approx(record["kd"])
        assert record["ce"] > 1.0  # the labels are random: cross-entropy stays near ln 10
    else:
        assert moved > 1e-3 and "kd" not in record
    assert all(p.requires_grad for p in dense.parameters())  # the user's model is not frozen or moved


def test_compress_distils_from_the_given_teacher():
    cfg = DPRPConfig(epochs=1, batch_size=16, lr=0.1, momentum=0.0, weight_decay=0.0, regularizer="none",
                     distill=1.0, distill_temperature=2.0, device="cpu")
    dense = _mlp()
    torch.manual_seed(1)
    other = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))
    before = weights(factorize(dense, cfg))
    result = compress(dense, cfg, make_data(), progress=False, teacher=other)
    moved = max((result.model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved > 1e-3 and result.history[-1]["kd"] > 1e-4  # it learns another model's outputs, not its own
    with pytest.raises(ValueError, match="distill is 0"):
        compress(dense, cfg.replace(distill=0.0), make_data(), progress=False, teacher=other)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_teacher_of_another_dtype_is_cast_to_the_students(dtype):
    # it was fed the student's float32 inputs as it was: "Input type (float) and bias type (double) should be the same"
    cfg = DPRPConfig(epochs=1, batch_size=16, lr=0.1, momentum=0.0, weight_decay=0.0, regularizer="none",
                     distill=1.0, distill_temperature=2.0, device="cpu")
    teacher = _mlp().to(dtype)
    result = compress(_mlp(), cfg, make_data(), progress=False, teacher=teacher)
    assert result.history[-1]["kd"] < 1e-2  # the student starts as the teacher's (rounded) function
    assert all(p.dtype == dtype for p in teacher.parameters())  # the user's teacher is not cast


def test_labels_out_of_range_in_a_later_batch_are_named():
    # only the first batch is checked up front; a later one reached torch's "Target 12 is out of bounds"
    cfg = DPRPConfig(**{**STRONG, "epochs": 1})
    bad = _batches(_X, _Y) + _batches(_X, torch.full((8,), 12), n=1)
    with pytest.raises(ValueError, match=r"the training labels run from 12 to 12 \(batch 2 of epoch 0\), but the "
                       r"model has 10 outputs"):
        DPRPTrainer(make_model(), cfg, bad, progress=False).fit()
    trainer = DPRPTrainer(make_model(), cfg, _batches(_X, _Y), val_data=_batches(_X, _Y) + bad[-1:], progress=False)
    with pytest.raises(ValueError, match=r"the validation labels run from 12 to 12 \(batch 2\)"):
        trainer.fit()


def test_distillation_needs_a_teacher():
    with pytest.raises(ValueError, match="distill=0.5 needs a teacher"):
        DPRPTrainer(make_model(), DPRPConfig(distill=0.5, device="cpu"), make_data(), progress=False)
    with pytest.raises(ValueError, match="distill"):
        DPRPConfig(distill=1.5)


# ----------------------------------------------------------------------------- failures
def test_non_finite_loss_keeps_last_good_checkpoint(tmp_path):
    x = torch.randn(48, 3, 16, 16)
    y = torch.randint(0, 10, (48,))
    cfg = DPRPConfig(epochs=2, **STRONG)
    DPRPTrainer(make_model(), DPRPConfig(epochs=1, **STRONG), TensorDataset(x, y), run_dir=tmp_path,
                progress=False).fit()
    good = (tmp_path / "checkpoint.pt").read_bytes()
    poisoned = x.clone()
    poisoned[:] = float("nan")
    trainer = DPRPTrainer(make_model(), cfg, TensorDataset(poisoned, y), run_dir=tmp_path, resume=True,
                          progress=False)
    with pytest.raises(FloatingPointError) as err:
        trainer.fit()
    assert isinstance(err.value, NonFiniteLossError)
    assert err.value.term == "app" and err.value.epoch == 1 and err.value.step == 0
    assert "'app'" in str(err.value) and "epoch 1" in str(err.value) and "step 0" in str(err.value)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 1


def test_exploding_lr_raises_before_any_checkpoint(tmp_path):
    cfg = DPRPConfig(epochs=1, batch_size=16, lr=1e30, device="cpu")
    with pytest.raises(NonFiniteLossError) as err:
        DPRPTrainer(make_model(), cfg, make_data(), run_dir=tmp_path, progress=False).fit()
    assert err.value.term in ("app", "orth", "sort", "comp") and err.value.epoch == 0
    assert not (tmp_path / "checkpoint.pt").exists()


def test_corrupt_and_foreign_checkpoints(tmp_path):
    cfg = DPRPConfig(epochs=1, **STRONG)
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt.*corrupt"):
        DPRPTrainer(make_model(), cfg, make_data(), run_dir=tmp_path, resume=True, progress=False)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not a dprp_surgery"):
        DPRPTrainer(make_model(), cfg, make_data(), resume=foreign, progress=False)
    # a real checkpoint of another model
    other = tmp_path / "other"
    torch.manual_seed(0)
    small = factorize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)))
    DPRPTrainer(small, cfg, make_data(), run_dir=other, progress=False).fit()
    with pytest.raises(ValueError, match="belongs to another model"):
        DPRPTrainer(make_model(), cfg, make_data(), resume=other, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        DPRPTrainer(make_model(), cfg, make_data(), resume=tmp_path / "missing.pt", progress=False)


def test_a_checkpoint_torch_refuses_gets_a_short_message_and_runs_no_code(tmp_path):
    class Touch:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    cfg = DPRPConfig(epochs=1, **STRONG)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "x", "extra": Touch()}, pickled)
    with pytest.raises(ValueError) as err:
        DPRPTrainer(make_model(), cfg, make_data(), resume=pickled, progress=False)
    message = str(err.value)
    assert "pickled.pt" in message and "pickled Python objects" in message and "without --resume" in message
    assert "weights_only" not in message and "\n" not in message  # not torch's paragraphs of advice
    assert not (tmp_path / "pwned").exists()
    truncated = tmp_path / "truncated.pt"
    torch.save({"a": torch.zeros(3)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    for broken in (truncated, tmp_path / "garbage.pt"):
        if not broken.exists():
            broken.write_bytes(b"\x00garbage" * 20)
        with pytest.raises(ValueError) as err:
            DPRPTrainer(make_model(), cfg, make_data(), resume=broken, progress=False)
        message = str(err.value)
        assert broken.name in message and "corrupt or truncated" in message and "without --resume" in message
        assert "weights_only" not in message and "\n" not in message


# ----------------------------------------------------------------------------- run directories
@pytest.mark.parametrize("keep, resume, match", [
    (("checkpoint.pt", "history.jsonl"), None, r"holds a run \(checkpoint.pt, history.jsonl\); pass resume=True"),
    (("checkpoint.pt", "history.jsonl"), False, r"already holds a run .*--resume.*another run_dir or delete"),
    (("history.jsonl",), None, r"already holds a run \(history.jsonl\); pass resume=True"),
    (("history.jsonl",), True, r"holds history.jsonl but no checkpoint.pt to resume from"),
])
def test_fresh_run_refuses_a_run_dir_that_holds_a_run(tmp_path, keep, resume, match):
    cfg = DPRPConfig(epochs=1, **STRONG)
    DPRPTrainer(make_model(), cfg, make_data(16), run_dir=tmp_path, progress=False).fit()
    for name in {"checkpoint.pt", "history.jsonl"} - set(keep):
        (tmp_path / name).unlink()
    before = {name: (tmp_path / name).read_bytes() for name in keep}
    with pytest.raises(ValueError, match=match) as err:
        DPRPTrainer(make_model(), cfg.replace(epochs=3), make_data(16), run_dir=tmp_path, resume=resume,
                    progress=False)
    assert repr(str(tmp_path)) in str(err.value)
    assert {name: (tmp_path / name).read_bytes() for name in keep} == before  # nothing appended or replaced
    if "checkpoint.pt" in keep:  # the way the message points to continues the run
        DPRPTrainer(make_model(), cfg.replace(epochs=2), make_data(16), run_dir=tmp_path, resume=True,
                    progress=False).fit()
        lines = (tmp_path / "history.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_fresh_runs_in_new_or_empty_run_dirs_start(tmp_path):
    cfg = DPRPConfig(epochs=1, **STRONG)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("unrelated files do not make a run")
    for run_dir, resume in ((tmp_path / "empty", None), (tmp_path / "new", True)):
        DPRPTrainer(make_model(), cfg, make_data(16), run_dir=run_dir, resume=resume, progress=False).fit()
        assert [json.loads(line)["epoch"] for line in (run_dir / "history.jsonl").open()] == [0]


# ----------------------------------------------------------------------------- data without batches
def _no_batches(kind: str):
    if kind == "drop_last":  # 8 images, batch 16, drop_last: a loader of length 0
        from dprp_surgery.data import TensorLoader

        return TensorLoader(make_data(8), 16, drop_last=True)
    return TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long))


class _NoBatches:
    """An iterable without __len__ that yields nothing (an exhausted stream): seen only when iterated."""

    def __iter__(self):
        return iter(())


@pytest.mark.parametrize("with_val", [False, True])
def test_training_data_without_batches_raises(with_val, tmp_path):
    cfg = DPRPConfig(epochs=2, lr_schedule="cosine", **STRONG)
    val = make_data(16) if with_val else None
    with pytest.raises(ValueError, match="training data yields no batches") as err:  # sized: before any training
        DPRPTrainer(make_model(), cfg, _no_batches("drop_last"), val, run_dir=tmp_path, progress=False)
    assert "TensorLoader of 8 samples with batch_size=16, drop_last=True" in str(err.value)
    trainer = DPRPTrainer(make_model(), cfg, _NoBatches(), val, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="training data yielded no batches in epoch 0"):
        trainer.fit()
    assert trainer.history == [] and trainer.global_step == 0 and trainer.scheduler.last_epoch == 0
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "history.jsonl").exists()


@pytest.mark.parametrize("role", ["training", "validation"])
def test_empty_dataset_is_refused(role):
    empty = _no_batches("empty")
    train, val = (empty, None) if role == "training" else (make_data(16), empty)
    with pytest.raises(ValueError, match=f"{role} data is empty: the TensorDataset has 0 samples"):
        DPRPTrainer(make_model(), DPRPConfig(epochs=1, **STRONG), train, val, progress=False)


@pytest.mark.parametrize("role", ["training", "validation"])
def test_data_without_any_batch_is_refused_before_training(role):
    """A sized loader of length 0 (smaller than one batch with drop_last) is named at construction; an unsized
    one when summary() or evaluate() first iterates it."""
    sized = _no_batches("drop_last")
    train, val = (sized, None) if role == "training" else (make_data(16), sized)
    with pytest.raises(ValueError, match=f"{role} data yields no batches: TensorLoader of 8 samples"):
        DPRPTrainer(make_model(), DPRPConfig(epochs=1, **STRONG), train, val, progress=False)
    train, val = (_NoBatches(), None) if role == "training" else (make_data(16), _NoBatches())
    trainer = DPRPTrainer(make_model(), DPRPConfig(epochs=1, **STRONG), train, val, progress=False,
                          **({"example_inputs": torch.zeros(1, 3, 16, 16)} if role == "validation" else {}))
    if role == "training":
        with pytest.raises(ValueError, match="training data yielded no batches"):
            trainer.summary()
    else:
        with pytest.raises(ValueError, match="validation data yielded no batches"):
            trainer.evaluate()


# ----------------------------------------------------------------------------- schedules
class _Batches:
    """(x, y) batches of 16 without __len__, like a streaming source."""

    def __init__(self, data: TensorImageDataset) -> None:
        self.x, self.y = data.images.float() / 255, data.targets

    def __iter__(self):
        for i in range(0, len(self.y), 16):
            yield self.x[i:i + 16], self.y[i:i + 16]


@pytest.mark.parametrize("sized, factors", [
    (True, [[1 / 6, 2 / 6, 3 / 6], [4 / 6, 5 / 6, 1.0], [1.0] * 3]),  # per step: (global step + 1) / 6
    (False, [[0.25] * 3, [0.75] * 3, [1.0] * 3]),  # per epoch: the mean of the per-step ramp over that epoch
])
def test_warmup_lasts_warmup_epochs_with_and_without_len(sized, factors, monkeypatch):
    cfg = DPRPConfig(epochs=3, warmup_epochs=2, lr_schedule="constant", batch_size=16, lr=0.01, device="cpu")
    data = make_data(48)
    trainer = DPRPTrainer(make_model(), cfg, data if sized else _Batches(data), progress=False)
    seen = []
    step = trainer._scaled_step
    monkeypatch.setattr(trainer, "_scaled_step", lambda: (seen.append(trainer._warm), step()))
    history = trainer.fit()
    assert [seen[i:i + 3] for i in range(0, 9, 3)] == [pytest.approx(f) for f in factors]
    assert [h["lr"] for h in history] == pytest.approx([0.01 * f[-1] for f in factors])


@pytest.mark.parametrize("first, then", [(2, 5), (1, 4), (3, 4)])
def test_resume_with_more_epochs_refits_the_cosine(first, then, tmp_path, caplog):
    import math

    cfg = DPRPConfig(epochs=first, lr_schedule="cosine", batch_size=16, lr=0.01, sigma_lr_scale=10.0, device="cpu")
    DPRPTrainer(make_model(), cfg, make_data(16), run_dir=tmp_path, progress=False).fit()
    with caplog.at_level("WARNING", logger="dprp_surgery.trainer"):
        trainer = DPRPTrainer(make_model(), cfg.replace(epochs=then), make_data(16), run_dir=tmp_path,
                              resume=True, progress=False)
    assert "changed config fields: epochs" in caplog.text
    assert trainer.scheduler.T_max == then
    history = trainer.fit()
    cosine = [0.01 * (1 + math.cos(math.pi * t / then)) / 2 for t in range(then)]  # a straight run of `then`
    resumed = [h["lr"] for h in history[first:]]
    assert resumed == pytest.approx(cosine[first:], abs=1e-12)
    assert all(a >= b for a, b in zip(resumed, resumed[1:]))  # never rises again after the resume
    assert history[-1]["lrs"]["sigma"] == pytest.approx(10 * cosine[-1])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the minimum at the new end


def test_pruned_records_the_rank_at_the_start_and_the_end_of_the_epoch():
    cfg = DPRPConfig(epochs=1, prune_unit="step", prune_every=1, **{**STRONG, "batch_size": 8})
    trainer = DPRPTrainer(make_model(), cfg, make_data(), progress=False)
    start = ranks(trainer.model)
    passes = []
    prune = trainer._prune
    trainer._prune = lambda eps: passes.append(prune(eps)) or passes[-1]
    record = trainer.fit()[0]
    counts = {n: sum(n in p for p in passes) for n in start}
    assert max(counts.values()) >= 2, passes  # some layer was pruned more than once in the epoch
    assert record["pruned"] == {n: [start[n], record["ranks"][n]] for n, k in counts.items() if k}


@pytest.mark.parametrize("before, after", [("sgd", "adamw"), ("adamw", "sgd")])
def test_resume_with_another_optimizer_names_the_field(before, after, tmp_path):
    cfg = DPRPConfig(epochs=1, optimizer=before, **STRONG)
    DPRPTrainer(make_model(), cfg, make_data(16), run_dir=tmp_path, progress=False).fit()
    model = make_model()
    full = ranks(model)
    with pytest.raises(ValueError, match=f"trained with optimizer='{before}' but the config has "
                                         f"optimizer='{after}'.*Resume with optimizer='{before}'"):
        DPRPTrainer(model, cfg.replace(epochs=2, optimizer=after), make_data(16), run_dir=tmp_path, resume=True,
                    progress=False)
    assert ranks(model) == full  # refused before the model was touched


# ----------------------------------------------------------------------------- resume after SIGKILL
RESUME_CFG = {**STRONG, "epochs": 3}


def _resume_setup():
    return make_model(), make_data(96), make_data(16, seed=2)


def _child(run_dir: str) -> None:
    """Train with a slow forward (0.15 s per batch) until killed."""
    torch.set_num_threads(1)
    model, train, val = _resume_setup()
    model.register_forward_pre_hook(lambda m, a: time.sleep(0.15) if m.training else None)
    DPRPTrainer(model, DPRPConfig(**RESUME_CFG), train, val, run_dir=run_dir, progress=False).fit()


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, __file__, "child", str(run_dir)], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = run_dir / "checkpoint.pt"
    try:
        deadline = time.time() + 120
        while not ckpt.exists():
            assert child.poll() is None, child.stdout.read().decode()
            assert time.time() < deadline, "the child wrote no checkpoint"
            time.sleep(0.02)
        time.sleep(0.3)  # into epoch 1 (6 batches of 0.15 s each)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
        child.stdout.close()
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 0, "the child was not killed during epoch 1"
    assert len((run_dir / "history.jsonl").read_text().splitlines()) == 1

    model, train, val = _resume_setup()
    resumed = DPRPTrainer(model, DPRPConfig(**RESUME_CFG), train, val, run_dir=run_dir, resume=True, progress=False)
    assert resumed.start_epoch == 1 and ranks(resumed.model) == state["ranks"]
    resumed.fit()

    model, train, val = _resume_setup()
    straight = DPRPTrainer(model, DPRPConfig(**RESUME_CFG), train, val, progress=False)
    straight.fit()

    assert ranks(resumed.model) == ranks(straight.model)
    assert ranks(straight.model) != ranks(make_model())
    want = weights(straight.model)
    for k, v in weights(resumed.model).items():
        torch.testing.assert_close(v, want[k], msg=k)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history])
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


# ----------------------------------------------------------------------------- DDP (2 processes, gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str, model_file: str) -> None:
    import torch.distributed as dist

    from dprp_surgery.pruning import RankPruner

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # pruning every 2 steps re-wraps the model in a new DDP in the middle of epochs
        cfg = DPRPConfig(epochs=2, prune_unit="step", prune_every=2, **STRONG)
        model = torch.load(model_file, weights_only=False)  # factorized once by the parent (saves seconds)
        g = torch.Generator().manual_seed(5)  # a plain Dataset: sharded by a DistributedSampler
        val = TensorDataset(torch.randn(20, 3, 16, 16, generator=g), torch.randint(0, 10, (20,), generator=g))
        trainer = DPRPTrainer(model, cfg, make_data(64), val, run_dir=f"{out}/run", progress=False)
        history = trainer.fit()
        # RankPruner: rank 0 decides; rank 1 alone would keep every component
        probe = nn.Sequential(SVDLinear(6, 4))
        with torch.no_grad():
            probe[0].s.copy_(torch.tensor([1.0, 0.9, 0.01, 0.001]) if rank == 0 else torch.tensor([1.0, 0.9, 0.8, 0.7]))
        changes = RankPruner(epsilon=0.1).step(probe)
        torch.save({"weights": weights(trainer.model), "ranks": ranks(trainer.model), "history": list(history),
                    "probe": changes}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes(tmp_path):
    model_file = tmp_path / "model.pt"
    torch.save(make_model(), model_file)
    # spawn, not fork: a forked worker cannot run backward once autograd's threads exist in this process, which
    # depends on the tests that ran before (test_io, test_cli, test_trainer in that order failed with fork)
    torch.multiprocessing.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path), str(model_file)),
                                          nprocs=2, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["ranks"] == r1["ranks"] and r0["ranks"] != ranks(make_model())
    for k, v in r0["weights"].items():
        torch.testing.assert_close(v, r1["weights"][k], msg=k)
    assert [h["val_top1"] for h in r0["history"]] == [h["val_top1"] for h in r1["history"]]
    assert [h["loss"] for h in r0["history"]] == pytest.approx([h["loss"] for h in r1["history"]])
    assert r0["probe"] == r1["probe"] == {"0": (4, 2)}
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 2  # only rank 0 wrote


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        _child(sys.argv[2])


@pytest.mark.parametrize(("call", "words"), [
    (lambda: DPRPTrainer(None, DPRPConfig(**STRONG), make_data()), r"DPRPTrainer\(\) takes an nn.Module .* NoneType"),
    (lambda: DPRPTrainer(make_model(), {"epochs": 1}, make_data()),
     r"DPRPTrainer\(\) takes a DPRPConfig .* got dict; build one with DPRPConfig.from_dict"),
    (lambda: compress(make_model(), {"epochs": 1}, make_data()),
     r"compress\(\) takes a DPRPConfig .* got dict; build one with DPRPConfig.from_dict"),
    (lambda: compress("resnet20", DPRPConfig(**STRONG), make_data()), r"compress\(\) takes an nn.Module .* got str"),
])
def test_wrong_argument_types_are_type_errors(call, words):
    with pytest.raises(TypeError, match=words):
        call()


@pytest.mark.parametrize(("device", "count", "words"), [
    ("cuda", 0, r"device='cuda' but torch.cuda.is_available\(\) is false .* use device='cpu' or 'auto'"),
    ("cuda:7", 2, r"device='cuda:7' but this machine has 2 CUDA device\(s\); use 'cuda:0' .. 'cuda:1'"),
])
def test_a_cuda_device_that_is_not_there_is_named_before_any_work(device, count, words, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("a CUDA device was selected"))
    with pytest.raises(ValueError, match=words):
        DPRPTrainer(make_model(), DPRPConfig(**{**STRONG, "device": device}), make_data(), progress=False)


def _batches(x: torch.Tensor, y, n: int = 2):
    return [(x, y) for _ in range(n)]


_X = torch.randn(8, 3, 16, 16)
_Y = torch.randint(0, 10, (8,))


@pytest.mark.parametrize(("data", "words"), [
    (_batches(_X, torch.full((8,), 10)), r"training labels run from 10 to 10, but the model has 10 outputs.*\[0, 9\]"),
    (_batches(_X, torch.full((8,), -1)), r"training labels run from -1 to -1"),
    (_batches(_X, _Y.float()), r"training targets must be integer class indices, got dtype torch.float32"),
    (_batches(_X, torch.nn.functional.one_hot(_Y, 10)), r"targets must hold one class index per sample.*\(8, 10\)"),
    (_batches(_X, torch.nn.functional.one_hot(_Y, 10).float()), r"one-hot labels: pass labels.argmax\(1\)"),
    (_batches(_X, _Y[:, None]), r"shape \(8, 1\); squeeze the extra dimension"),
    (_batches(_X, _Y.tolist()), r"training targets are list, not a torch tensor"),
    (_batches(_X.numpy(), _Y), r"training inputs are a numpy ndarray; convert them with torch.from_numpy"),
    (_batches((_X * 255).to(torch.uint8), _Y), r"training inputs are uint8 images; convert them to float"),
    (_batches(torch.randn(8, 1, 16, 16), _Y), r"cannot take the first training batch \(inputs of shape \(8, 1, 16"),
    ([{"image": _X, "label": _Y}] * 2, None),  # accepted: common key names
    ([{"pixels": _X, "label": _Y}] * 2, r"a batch dict needs an input entry .*this one has 'pixels', 'label'"),
    ([(_X,)] * 2, r"a batch must be \(inputs, targets\), got a tuple of 1 entry"),
], ids=["label-too-high", "label-negative", "float", "one-hot", "one-hot-float", "column", "list", "numpy", "uint8",
        "channels", "dict-image-label", "dict-unknown", "no-labels"])
def test_bad_batches_are_named_before_they_reach_torch(data, words):
    cfg = DPRPConfig(**{**STRONG, "epochs": 1})
    if words is None:
        DPRPTrainer(make_model(), cfg, data, progress=False).fit()
        return
    with pytest.raises(ValueError, match=words):
        DPRPTrainer(make_model(), cfg, data, progress=False).fit()


def test_validation_labels_out_of_range_are_named():
    cfg = DPRPConfig(**{**STRONG, "epochs": 1})
    trainer = DPRPTrainer(make_model(), cfg, _batches(_X, _Y), val_data=_batches(_X, torch.full((8,), 12)),
                          progress=False)
    with pytest.raises(ValueError, match=r"validation labels run from 12 to 12, but the model has 10 outputs"):
        trainer.fit()


def test_extra_batch_entries_are_warned_about_and_ignored_labels_pass():
    y = _Y.clone()
    y[0] = -100  # cross_entropy's ignore_index
    cfg = DPRPConfig(**{**STRONG, "epochs": 1})
    with pytest.warns(UserWarning, match="batches have 3 entries; DPRPTrainer takes the first two"):
        DPRPTrainer(make_model(), cfg, [(_X, y, torch.ones(8))] * 2, progress=False).fit()


def test_a_model_returning_a_dict_without_logits_is_named():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, x):
            return {"scores": self.net(x)}

    cfg = DPRPConfig(**{**STRONG, "epochs": 1})
    with pytest.raises(ValueError, match=r"returned a dict with keys 'scores'; DPRPTrainer reads the logits from"):
        DPRPTrainer(DictOut(), cfg, _batches(_X, _Y), progress=False).fit()


def test_a_run_dir_that_is_a_file_is_named(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    for run_dir in (f, f / "run"):
        with pytest.raises(ValueError, match=rf"run_dir '{f}.*' is a file, or lies under one"):
            DPRPTrainer(make_model(), DPRPConfig(**STRONG), make_data(), run_dir=run_dir, progress=False)
    assert f.read_text() == "keep"


@pytest.mark.parametrize("damage", ["shape", "extra-key", "optimizer-groups"])
def test_a_checkpoint_that_does_not_fit_leaves_the_model_as_it_was(damage, tmp_path):
    cfg = DPRPConfig(**{**STRONG, "epochs": 2})
    run = tmp_path / "run"
    trained = make_model()
    DPRPTrainer(trained, DPRPConfig(**{**STRONG, "epochs": 1}), make_data(), run_dir=run, progress=False).fit()
    assert any(m.rank < m.full_rank for _, m in svd_layers(trained))  # the checkpoint holds pruned ranks
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    if damage == "shape":
        key = next(k for k in ckpt["model"] if k.endswith("bn1.weight"))
        ckpt["model"][key] = torch.ones(3)
        words = rf"'{key}' has shape \(3,\), the model needs"
    elif damage == "extra-key":
        ckpt["model"]["head.extra"] = torch.ones(1)
        words = r"missing keys -, unexpected keys \['head.extra'\]"
    else:
        ckpt["optimizer"]["param_groups"] = ckpt["optimizer"]["param_groups"][:1]
        words = r"its optimizer has 1 parameter groups, this one \d+"
    torch.save(ckpt, run / "checkpoint.pt")
    fresh = make_model()
    before_ranks, before = ranks(fresh), weights(fresh)
    with pytest.raises(ValueError, match=rf"does not fit this model/optimizer: {words}"):
        DPRPTrainer(fresh, cfg, make_data(), run_dir=run, resume=True, progress=False)
    assert ranks(fresh) == before_ranks
    assert all(torch.equal(v, before[k]) for k, v in weights(fresh).items())


def test_resume_of_a_model_with_a_shared_layer(tmp_path):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.again = self.conv  # the same layer under two names
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    data = _batches(torch.randn(8, 3, 8, 8), torch.randint(0, 8, (8,)))
    cfg = DPRPConfig(**{**STRONG, "epochs": 1, "epsilon": 0.9})
    first = factorize(Shared())
    DPRPTrainer(first, cfg, data, run_dir=tmp_path, progress=False).fit()
    assert first.conv.rank < first.conv.full_rank  # the checkpoint's shared factors are truncated
    torch.manual_seed(0)
    again = factorize(Shared())
    DPRPTrainer(again, cfg.replace(epochs=2), data, run_dir=tmp_path, resume=True, progress=False).fit()
    assert again.conv is again.again and again.conv.rank <= first.conv.rank


# ----------------------------------------------------------------------------- resume with a changed config
def _run(tmp_path, name: str, **overrides):
    return DPRPConfig(**{**STRONG, "lambda_comp": 0.0, "epochs": 1, "lr_schedule": "constant", **overrides}), \
        tmp_path / name


def test_resume_applies_changed_optimizer_settings(tmp_path):
    cfg, run = _run(tmp_path, "run", optimizer="sgd")
    DPRPTrainer(make_model(), cfg, make_data(32), run_dir=run, progress=False).fit()
    changed = cfg.replace(epochs=2, lr=1e-3, factor_lr_scale=0.5, sigma_lr_scale=3.0, weight_decay=0.0,
                          momentum=0.5)
    trainer = DPRPTrainer(make_model(), changed, make_data(32), run_dir=run, resume=True, progress=False)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {n: g["lr"] for n, g in groups.items()} == pytest.approx({"other": 1e-3, "factors": 5e-4, "sigma": 3e-3})
    assert all(g["weight_decay"] == 0.0 and g["momentum"] == 0.5 for g in groups.values())
    trainer.fit()
    assert trainer.history[-1]["lrs"] == pytest.approx({"other": 1e-3, "factors": 5e-4, "sigma": 3e-3})


def test_resume_keeps_a_cosine_lr_in_its_place_when_the_base_lr_changes(tmp_path):
    cfg, run = _run(tmp_path, "cos", lr_schedule="cosine", epochs=4)
    trainer = DPRPTrainer(make_model(), cfg.replace(epochs=2), make_data(32), run_dir=run, progress=False)
    trainer.fit()
    resumed = DPRPTrainer(make_model(), cfg.replace(lr=cfg.lr / 2), make_data(32), run_dir=run, resume=True,
                          progress=False)
    # at epoch 2 of a 4-epoch cosine the factor is (1 + cos(pi / 2)) / 2 = 0.5 of the (new) base lr
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr / 2 * 0.5)
    assert resumed.scheduler.base_lrs[0] == pytest.approx(cfg.lr / 2)


def test_resume_refuses_another_lr_schedule(tmp_path):
    cfg, run = _run(tmp_path, "sched", lr_schedule="plateau")
    DPRPTrainer(make_model(), cfg, make_data(32), run_dir=run, progress=False).fit()
    with pytest.raises(ValueError, match=r"lr_schedule='plateau' but the config has lr_schedule='cosine'"):
        DPRPTrainer(make_model(), cfg.replace(epochs=2, lr_schedule="cosine"), make_data(32), run_dir=run,
                    resume=True, progress=False)


def test_resume_decides_again_when_the_compression_target_changed(tmp_path):
    cfg, run = _run(tmp_path, "target", lambda_comp=10.0, prune_unit="step", prune_every=1,
                    target_compression=0.02, epochs=3)  # as test_target_compression_stops_compressing...
    first = DPRPTrainer(make_model(), cfg, make_data(), run_dir=run, progress=False)
    first.fit()
    assert first.compression_stopped
    reached = first.compression_rate()
    for target, stopped in ((0.9, False), (None, False), (reached / 2, True)):
        resumed = DPRPTrainer(make_model(), cfg.replace(epochs=4, target_compression=target), make_data(),
                              run_dir=run, resume=True, progress=False)
        assert resumed.compression_stopped is stopped, target
        assert resumed.regularizer.weights_at(2, stopped=resumed.compression_stopped)["lambda_comp"] == (
            0.0 if stopped else 10.0)


def test_resume_from_another_folder_never_overwrites_a_run(tmp_path):
    cfg, a = _run(tmp_path, "a")
    _, b = _run(tmp_path, "b")
    DPRPTrainer(make_model(), cfg, make_data(32), run_dir=a, progress=False).fit()
    DPRPTrainer(make_model(), cfg, make_data(32), run_dir=b, progress=False).fit()
    before = (b / "history.jsonl").read_text(), (b / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint of another folder.*already holds a run"):
        DPRPTrainer(make_model(), cfg.replace(epochs=2), make_data(32), run_dir=b, resume=a / "checkpoint.pt",
                    progress=False)
    assert ((b / "history.jsonl").read_text(), (b / "checkpoint.pt").read_bytes()) == before
    fresh = DPRPTrainer(make_model(), cfg.replace(epochs=2), make_data(32), run_dir=tmp_path / "c",
                        resume=a / "checkpoint.pt", progress=False)  # an empty run_dir continues it
    assert fresh.start_epoch == 1


def test_ignored_labels_count_in_no_accuracy(tmp_path):
    from torch.utils.data import TensorDataset as TD

    data = make_data(32)
    x, y = data.images.float() / 255, data.targets
    trainer = DPRPTrainer(make_model(), DPRPConfig(**STRONG, epochs=1), data, progress=False)
    plain = trainer.evaluate(TD(x[:16], y[:16]))
    ignored = y.clone()
    ignored[16:] = -100  # documented as allowed: ignored by the loss
    assert trainer.evaluate(TD(x, ignored)) == pytest.approx(plain)


def test_a_sampler_with_its_own_generator_resumes_exactly(tmp_path, stop_in_epoch):
    from torch.utils.data import DataLoader, RandomSampler
    from torch.utils.data import TensorDataset as TD

    data = make_data(48)
    ds = TD(data.images.float() / 255, data.targets)

    def loader():
        return DataLoader(ds, batch_size=16, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)))

    cfg = DPRPConfig(**STRONG, epochs=2)
    whole = DPRPTrainer(make_model(), cfg, loader(), run_dir=tmp_path / "whole", progress=False)
    whole.fit()
    stop_in_epoch(1)
    with pytest.raises(KeyboardInterrupt):
        DPRPTrainer(make_model(), cfg, loader(), run_dir=tmp_path / "cut", progress=False).fit()
    stop_in_epoch(None)
    resumed = DPRPTrainer(make_model(), cfg, loader(), run_dir=tmp_path / "cut", resume=True, progress=False)
    resumed.fit()
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
