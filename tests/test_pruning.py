"""RankPruner: truncation to tau_l, optimizer-state slicing, errors and the DDP broadcast."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dprp_surgery import DPRPConfig, factorize, svd_layers
from dprp_surgery.pruning import RankPruner


def make_model(seed: int = 0) -> nn.Module:
    """Two factorized Linear layers whose singular values have a clear cut at epsilon = 0.1."""
    torch.manual_seed(seed)
    model = factorize(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5)))
    with torch.no_grad():
        model[0].s.copy_(torch.tensor([5.0, 4.0, 3.0, 0.01, 0.005, 0.001]))  # tau = 3
        model[2].s.copy_(torch.tensor([2.0, 1.5, 1.2, 1.0, 0.01]))  # tau = 4
    return model


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 8, generator=g), torch.randint(0, 5, (16,), generator=g)


def train_step(model, opt, seed):
    x, y = batch(seed)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def make_opt(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_prune_then_step_equals_truncated_fresh_model(kind):
    model = make_model()
    opt = make_opt(kind, model)
    for i in range(3):  # build momentum / Adam moments
        train_step(model, opt, i)
    pruner = RankPruner(DPRPConfig(epsilon=0.1))
    keep = pruner.keep_counts(model)
    assert keep == {"0": 3, "2": 4}

    # Reference: a copy truncated by hand and a fresh optimizer loaded with hand-sliced state.
    ref = copy.deepcopy(model)
    state = copy.deepcopy(opt.state_dict())
    for name, layer in svd_layers(ref):
        layer.truncate_(keep[name])
    ref_opt = make_opt(kind, ref)
    names = [n for n, _ in ref.named_parameters()]
    for idx, pname in enumerate(names):
        layer_name, attr = pname.rsplit(".", 1)
        if attr not in ("U", "s", "V"):
            continue
        k = keep[layer_name]
        for key, value in state["state"][idx].items():
            if value.ndim == 0:
                continue
            state["state"][idx][key] = value[:k].clone() if attr == "s" else value[:, :k].clone()
    ref_opt.load_state_dict(state)

    params_before = {n: p for n, p in model.named_parameters()}
    numel_before = sum(p.numel() for p in model.parameters())
    step_before = {k: v.clone() for k, v in opt.state[model[0].s].items() if v.ndim == 0}
    changes = pruner.step(model, opt)
    assert changes == {"0": (6, 3), "2": (5, 4)}
    # the Parameter objects are the same, their data shrank
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) < numel_before
    assert model[0].U.shape == (6, 3) and model[0].V.shape == (8, 3) and model[2].s.shape == (4,)
    for key, value in step_before.items():  # Adam's scalar `step` is untouched
        torch.testing.assert_close(opt.state[model[0].s][key], value)

    for i in range(3, 5):
        train_step(model, opt, i)
        train_step(ref, ref_opt, i)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, msg=f"parameter {n}")
    for p, q in zip(model.parameters(), ref.parameters()):
        for key in opt.state[p]:
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key])


def test_min_rank_and_no_change():
    model = make_model()
    pruner = RankPruner(epsilon=0.1, min_rank=4)
    # layer 0: tau = 3 raised to min_rank 4; layer 2: tau = 4 = min_rank
    assert pruner.step(model) == {"0": (6, 4), "2": (5, 4)}
    assert model[0].rank == 4 and model[2].rank == 4
    assert RankPruner(epsilon=0.1, min_rank=4).step(model) == {}
    # min_rank above the current rank never grows a layer
    assert RankPruner(epsilon=0.9, min_rank=10).step(model) == {}
    assert RankPruner(epsilon=0.1).step(model) == {"0": (4, 3)}
    # epsilon given per call (e.g. from an epsilon schedule)
    assert RankPruner(epsilon=0.1).step(model, epsilon=0.95) == {"0": (3, 1), "2": (4, 1)}


def test_scheduler_keeps_working():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(model, opt, 0)
    sched.step()
    RankPruner(epsilon=0.1).step(model, opt)
    train_step(model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.state[model[0].U]["momentum_buffer"].shape == (6, 3)


def test_prune_while_last_graph_is_alive():
    # A custom loop keeps the last step's `loss` (and so its autograd graph) alive while pruning;
    # the next backward must see the new shapes, not autograd's cached accumulator of the old ones.
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = batch(0)
    loss = F.cross_entropy(model(x), y) + sum((m.U.T @ m.U).sum() for m in (model[0], model[2]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert RankPruner(epsilon=0.1).step(model, opt)
    loss = F.cross_entropy(model(x), y) + sum((m.U.T @ m.U).sum() for m in (model[0], model[2]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert model[0].U.grad.shape == model[0].U.shape == (6, 3)


class OddStateSGD(torch.optim.SGD):
    """An optimizer whose extra state cannot be sliced along the rank."""

    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["odd_stat"] = torch.zeros(p.numel() + 1)
        return out


def test_unsliceable_state_raises_and_changes_nothing():
    model = make_model()
    opt = OddStateSGD(model.parameters(), lr=0.01, momentum=0.9)
    train_step(model, opt, 0)
    with pytest.raises(ValueError) as err:
        RankPruner(epsilon=0.1).step(model, opt)
    msg = str(err.value)
    assert "OddStateSGD" in msg and "'0'" in msg and "odd_stat" in msg
    assert model[0].rank == 6 and model[2].rank == 5  # nothing was truncated
    assert opt.state[model[0].U]["momentum_buffer"].shape == (6, 6)


def test_no_svd_layers_and_validation():
    with pytest.warns(UserWarning, match="Linear has no SVD layers.*factorize"):
        assert RankPruner().step(nn.Linear(3, 3)) == {}
    with pytest.raises(ValueError):
        RankPruner(epsilon=1.5)
    with pytest.raises(ValueError):
        RankPruner(min_rank=0)
    with pytest.raises(TypeError, match="takes the factorized nn.Module, got str"):
        RankPruner().step("model")
    with pytest.raises(TypeError, match=r"RankPruner\(\) takes a DPRPConfig as its config, got dict.*from_dict"):
        RankPruner({"epsilon": 0.1})


@pytest.mark.parametrize("epsilon", [2.0, 1.0, 0.0, -1.0, float("nan"), float("inf"), "0.5", None, True])
@pytest.mark.parametrize("method", ["step", "keep_counts"])
def test_a_per_call_epsilon_outside_0_1_is_refused_and_prunes_nothing(epsilon, method):
    model = make_model()
    ranks = [m.rank for m in (model[0], model[2])]
    pruner = RankPruner(epsilon=0.1)
    if epsilon is None:  # None means "the pruner's own epsilon"
        getattr(pruner, method)(model, epsilon=None)
        return
    with pytest.raises(ValueError, match=rf"RankPruner.{method} epsilon=.* must (lie|be a number) in \(0, 1\)"):
        getattr(pruner, method)(model, epsilon=epsilon)
    assert [m.rank for m in (model[0], model[2])] == ranks


def test_an_optimizer_over_another_model_is_warned_about():
    model = make_model()
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="SGD holds none of the factors.*built before factorize"):
        changes = RankPruner(epsilon=0.5).step(model, other)
    assert changes  # pruning itself still happens: the model is what the caller asked to prune


# The DDP broadcast of the keep counts (rank 0 decides) is tested in the 2-process worker of
# tests/test_trainer.py::test_ddp_two_processes, to start the processes only once.


def test_lbfgs_flat_state_raises_and_changes_nothing():
    model = make_model()
    opt = torch.optim.LBFGS(model.parameters(), history_size=3, max_iter=2)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    with pytest.raises(ValueError, match=r"cannot prune layer '0': LBFGS keeps its state as flat vectors"):
        RankPruner(epsilon=0.1).step(model, opt)
    assert model[0].rank == 6 and model[2].rank == 5
    opt.step(closure)  # still consistent


def test_compiled_models_report_the_models_own_layer_names():
    model = make_model()
    compiled = torch.compile(model)  # compiles lazily: nothing here runs it
    pruner = RankPruner(epsilon=0.1)
    assert pruner.keep_counts(compiled) == {"0": 3, "2": 4}
    assert pruner.step(compiled, torch.optim.SGD(model.parameters(), lr=0.1)) == {"0": (6, 3), "2": (5, 4)}


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_pruning_under_inference_mode_leaves_a_trainable_model(optim):
    """A user's validation hook (Lightning runs them under torch.inference_mode) may prune."""
    model = make_model()
    opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if optim == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with torch.inference_mode():
        changes = RankPruner(epsilon=0.1).step(model, opt)
    assert changes == {"0": (6, 3), "2": (5, 4)}
    params = [p for _, layer in svd_layers(model) for p in (layer.U, layer.s, layer.V)]
    state = [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.ndim]
    assert not any(t.is_inference() for t in params + state)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # failed: "Inference tensors cannot be saved for backward"
    opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_singular_values_are_refused_and_nothing_is_pruned(bad):
    model = make_model()
    with torch.no_grad():
        model[2].s[1] = bad  # [2, bad, 1.2, 1, 0.01]: tau would cut after s_1 and keep the bad value
    before = [layer.rank for _, layer in svd_layers(model)]
    with pytest.raises(ValueError, match=r"layer '2'.*not finite.*Nothing was pruned"):
        RankPruner(epsilon=0.1).step(model)
    assert [layer.rank for _, layer in svd_layers(model)] == before
    with pytest.raises(ValueError, match="layer '2'"):
        RankPruner(epsilon=0.1).keep_counts(model)


def test_compression_never_pushes_the_components_min_rank_keeps():
    """L_comp with min_rank 2 leaves a rank-2 layer alone: its second value is not driven to zero while it is paid
    for (min_rank is the pruner's floor, so those components can never be pruned)."""
    from dprp_surgery.layers import SVDLinear
    from dprp_surgery.losses import DPRPRegularizer

    torch.manual_seed(0)
    config = DPRPConfig(min_rank=2, lambda_str=0.0)
    layer = SVDLinear(4, 4, rank=2)
    with torch.no_grad():
        layer.s.copy_(torch.tensor([1.0, 0.5]))
    reg, pruner = DPRPRegularizer(config), RankPruner(config)
    opt = torch.optim.SGD([layer.s], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        reg([layer])[0].backward()
        opt.step()
        pruner.step(layer, opt)
    assert layer.rank == 2
    torch.testing.assert_close(layer.s.detach(), torch.tensor([1.0, 0.5]))  # no gradient reached s


@pytest.mark.parametrize("bad", [0, 2.5, True, "2"])
def test_pruner_min_rank_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="min_rank"):
        RankPruner(min_rank=bad)


def test_a_model_built_and_pruned_under_inference_mode_still_runs():
    """benchmarks/paired.py loads run directories (and so truncates) inside torch.inference_mode."""
    with torch.inference_mode():
        model = make_model()
        changes = RankPruner(epsilon=0.1).step(model)
        assert changes == {"0": (6, 3), "2": (5, 4)}
        assert model(batch(0)[0]).shape == (16, 5)  # was "Inference tensors do not track version counter"


@pytest.mark.parametrize("frozen", [("U", "s", "V"), ("s",)])
def test_a_frozen_layer_keeps_its_rank(frozen):
    # a layer the user froze (all of U, s, V) was cut like any other and could not re-learn; a partly frozen one is
    # still pruned
    model = make_model()
    for attr in frozen:
        getattr(model[0], attr).requires_grad_(False)
    pruner = RankPruner(epsilon=0.1)
    expected = {"2": (5, 4)} if len(frozen) == 3 else {"0": (6, 3), "2": (5, 4)}
    assert pruner.keep_counts(model) == {"0": 6 if len(frozen) == 3 else 3, "2": 4}
    assert pruner.step(model) == expected


def test_match_ranks_restores_a_checkpoint_saved_after_pruning():
    # a user loop's checkpoint did not load into a freshly factorized model (size mismatch for .U)
    from dprp_surgery import match_ranks

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    model = factorize(dense)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    opt.step()
    model[0].truncate_(2)  # as the pruner leaves it
    ckpt = {"model": copy.deepcopy(model.state_dict())}
    fresh = factorize(dense)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(ckpt["model"])
    assert match_ranks(fresh, ckpt["model"]) == {"0": 2}
    fresh.load_state_dict(ckpt["model"])
    torch.testing.assert_close(fresh(x), model(x))
    bad = {**ckpt["model"], "2.s": torch.ones(99)}
    with pytest.raises(ValueError, match=r"layer '2' has \(99,\) singular values .* rank 10"):
        match_ranks(factorize(dense), bad)
