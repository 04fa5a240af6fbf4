"""The DPRP loss terms (eqs. (10)-(12), (15)-(17)) against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dprp_surgery import DPRPConfig, SVDLinear, factorize
from dprp_surgery.losses import (
    DPRPRegularizer,
    _gram_residual_sum,
    _rank_tensors,
    compression_loss,
    distillation_loss,
    keep_counts,
    layer_weights,
    orthogonality_loss,
    pad_singular_values,
    regularization_loss,
    sorting_loss,
)


def lin(out_f: int, in_f: int, s, U=None, V=None) -> SVDLinear:
    """An SVDLinear (U: out x r, V: in x r) with the given factors (identity-like when not given)."""
    s = torch.tensor(s, dtype=torch.float32)
    layer = SVDLinear(in_f, out_f, rank=s.numel())
    with torch.no_grad():
        layer.s.copy_(s)
        layer.U.copy_(torch.eye(out_f, s.numel()) if U is None else torch.tensor(U, dtype=torch.float32))
        layer.V.copy_(torch.eye(in_f, s.numel()) if V is None else torch.tensor(V, dtype=torch.float32))
    return layer


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- eq. (10)
def test_orthogonality_by_hand_with_padding():
    # A: U (3x2) = [[1,0],[0,2],[0,0]] -> U^T U = diag(1, 4), minus I = diag(0, 3): ||.||_F = 3.
    #    V = I (2x2) -> 0.  r = 2: (3 + 0) / 4 = 0.75
    a = lin(3, 2, [1, 1], U=[[1, 0], [0, 2], [0, 0]], V=[[1, 0], [0, 1]])
    # B: U (2x1) = [2, 0]^T -> 4 - 1 = 3;  V (3x1) = [1, 1, 0]^T -> 2 - 1 = 1.  r = 1: (3 + 1) / 1 = 4
    b = lin(2, 3, [1], U=[[2], [0]], V=[[1], [1], [0]])
    # C: U (3x1) = [1, 1, 1]^T -> 3 - 1 = 2;  V (3x1) = [0, 0, 1]^T -> 0.  r = 1: 2
    #    (C shares h = 3 with A at another rank: the U group is zero-padded to r_max = 2;
    #     C shares w = 3 with B: one V group without padding.)
    c = lin(3, 3, [1], U=[[1], [1], [1]], V=[[0], [0], [1]])
    close(orthogonality_loss([a]), 0.75)
    close(orthogonality_loss([b]), 4.0)
    # mean over L = 3 layers: (0.75 + 4 + 2) / 3 = 2.25
    close(orthogonality_loss([a, b, c]), 2.25)
    close(orthogonality_loss([("a", a), ("c", c)]), (0.75 + 2) / 2)


def test_orthogonality_gradient_matches_the_equation():
    # L_orth's backward is written by hand (2 F R / ||R||_F): compare it with autograd of eq. (10)
    # spelled out per layer, in float64, for same-height factors at different ranks (padded group).
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4, 3), (6, 5, 2), (6, 3, 3), (4, 6, 1)]  # (out, in, rank): U heights 6, 6, 6, 4
    layers = []
    for out_f, in_f, r in shapes:
        m = SVDLinear(in_f, out_f, rank=r).double()
        with torch.no_grad():
            m.U.copy_(torch.randn(out_f, r, generator=gen, dtype=torch.float64))
            m.V.copy_(torch.randn(in_f, r, generator=gen, dtype=torch.float64))
        layers.append(m)
    orthogonality_loss(layers).backward()
    got = [(m.U.grad.clone(), m.V.grad.clone()) for m in layers]
    factors = [(m.U.detach().clone().requires_grad_(), m.V.detach().clone().requires_grad_()) for m in layers]
    ref = sum((torch.linalg.matrix_norm(U.T @ U - torch.eye(U.shape[1], dtype=U.dtype))
               + torch.linalg.matrix_norm(V.T @ V - torch.eye(V.shape[1], dtype=V.dtype))) / U.shape[1] ** 2
              for U, V in factors) / len(factors)
    ref.backward()
    for (gU, gV), (U, V) in zip(got, factors):
        torch.testing.assert_close(gU, U.grad)
        torch.testing.assert_close(gV, V.grad)
    inputs = [layers[0].U.detach().clone().requires_grad_(), layers[1].U.detach().clone().requires_grad_()]
    assert torch.autograd.gradcheck(lambda u0, u1: _gram_residual_sum([u0, u1]), inputs)


def test_orthogonality_gradient_zero_when_orthonormal():
    # At U^T U = I the norm is 0: the (sub)gradient is taken as zero, never NaN.
    a = lin(3, 2, [1, 1])
    orthogonality_loss([a]).backward()
    assert torch.equal(a.U.grad, torch.zeros_like(a.U)) and torch.equal(a.V.grad, torch.zeros_like(a.V))


def test_orthogonality_zero_for_svd_factors():
    torch.manual_seed(0)
    model = factorize(nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)))
    assert float(orthogonality_loss(model).detach()) < 1e-5


# ----------------------------------------------------------------------------- eq. (11)
def test_sorting_by_hand():
    # [3, 1, 2, -1]: rises (1 -> 2) = 1, gamma = 1 -> 1/1 * 1 = 1; negatives {-1}, eta = 1 -> 1.  total 2
    close(sorting_loss([lin(4, 4, [3, 1, 2, -1])]), 2.0)
    # [1, 2, 4]: rises 1 and 2, gamma = 2 -> (1 + 2) / 2 = 1.5; no negatives.  total 1.5
    close(sorting_loss([lin(3, 3, [1, 2, 4])]), 1.5)
    # [2, 1, -3]: sorted, gamma = 0 -> 0; the LAST value is negative: eta = 1 -> 3
    # (the paper's sum j = 1..r-1 would give 0 here; we sum over all r entries, docs/method.md).
    close(sorting_loss([lin(3, 3, [2, 1, -3])]), 3.0)
    # [-1, -2]: sorted; eta = 2 -> (1 + 2) / 2 = 1.5
    close(sorting_loss([lin(2, 2, [-1, -2])]), 1.5)
    # sorted and non-negative (zeros and ties included): 0
    close(sorting_loss([lin(4, 4, [2, 2, 1, 0])]), 0.0)
    # mean over layers of different ranks (2, 1.5, 3): 6.5 / 3
    layers = [lin(4, 4, [3, 1, 2, -1]), lin(3, 3, [1, 2, 4]), lin(3, 3, [2, 1, -3])]
    close(sorting_loss(layers), 6.5 / 3)


# ----------------------------------------------------------------------------- tau_l
@pytest.mark.parametrize(
    "s, eps, tau",
    [
        ([4, 2, 1], 0.1, 3),          # rho = 0.5, 0.5: nothing <= 0.1 -> r
        ([1, 0.05, 0.04], 0.1, 1),    # rho_1 = 0.05 -> first position
        ([1, 0.9, 0.05], 0.1, 2),     # rho_1 = 0.9, rho_2 = 0.0556 -> 2 (last pair)
        ([2, 1, 0, 5], 0.1, 2),       # rho_2 = 0 / 1 = 0 -> 2
        ([0, 1, 2], 0.1, 1),          # |s_1| = 0: rho_1 taken as 0 -> prune after the zero
        ([2, 0, 0], 0.1, 1),          # rho_1 = 0; rho_2 = 0/0 taken as 0
        ([1, 0.5], 0.5, 1),           # rho = 0.5 <= 0.5 (inclusive)
        ([1, -0.05], 0.1, 1),         # ratios of absolute values
        ([5], 0.1, 1),                # rank 1
    ],
)
def test_keep_count_cases(s, eps, tau):
    assert keep_counts([torch.tensor(s, dtype=torch.float32)], eps).tolist() == [tau]


def test_keep_counts_batched_and_named():
    s = [torch.tensor([4.0, 2, 1]), torch.tensor([1.0, 0.05, 0.04]), torch.tensor([3.0])]
    assert keep_counts(s, 0.1).tolist() == [3, 1, 1]
    model = nn.Sequential(lin(3, 3, [4, 2, 1]), lin(3, 3, [1, 0.05, 0.04]))
    assert DPRPRegularizer(DPRPConfig()).keep_counts(model) == {"0": 3, "1": 1}
    assert DPRPRegularizer(DPRPConfig()).keep_counts(model, epsilon=0.6) == {"0": 1, "1": 1}


# ----------------------------------------------------------------------------- eq. (12)
def test_compression_by_hand():
    # [3, 4, 0], eps 0.1: rho_1 = 4/3, rho_2 = 0 -> tau = 2; sum_{i=2..3} = 4 + 0 = 4; n = 3 - 2 + 1 = 2;
    # ||s|| = 5 -> 4 / (2 * 5) = 0.4
    close(compression_loss([lin(3, 3, [3, 4, 0])], 0.1), 0.4)
    # n_l = 1: [3, 4], no cut -> tau = r = 2; sum_{i=2..2} = 4; n = 1; ||s|| = 5 -> 0.8
    close(compression_loss([lin(2, 2, [3, 4])], 0.1), 0.8)
    # zero first: [0, 3, 4] -> tau = 1; sum = 7; n = 3; ||s|| = 5 -> 7/15
    close(compression_loss([lin(3, 3, [0, 3, 4])], 0.1), 7 / 15)
    # negative value: [4, -3], rho = 0.75 -> tau = 2; |-3| / (1 * 5) = 0.6
    close(compression_loss([lin(2, 2, [4, -3])], 0.1), 0.6)
    # mean of 0.4, 0.8, 7/15 (ranks 3, 2, 3): (6 + 12 + 7) / 15 / 3 = 5/9
    layers = [lin(3, 3, [3, 4, 0]), lin(2, 2, [3, 4]), lin(3, 3, [0, 3, 4])]
    close(compression_loss(layers, 0.1), 5 / 9)


def test_compression_weighted_by_parameters_by_hand():
    # layer sizes h*w: 3x3 = 9, 2x2 = 4, 3x3 = 9 -> weights 9/22, 4/22, 9/22
    layers = [lin(3, 3, [3, 4, 0]), lin(2, 2, [3, 4]), lin(3, 3, [0, 3, 4])]
    close(layer_weights(layers, "params"), [9 / 22, 4 / 22, 9 / 22])
    assert layer_weights(layers, "layers") is None
    # per-layer terms 0.4, 0.8, 7/15 (test above): (9 * 0.4 + 4 * 0.8 + 9 * 7/15) / 22 = 11 / 22 = 0.5
    close(compression_loss(layers, 0.1, weighting="params"), 0.5)
    # equal sizes: the weighted sum is the paper's mean
    same = [lin(2, 2, [3, 4]), lin(2, 2, [4, -3])]
    close(compression_loss(same, 0.1, weighting="params"), compression_loss(same, 0.1))
    # ablation l1 with sizes 4 and 1: (4 * 3.5 + 1 * 1) / 5 = 3
    close(regularization_loss([lin(2, 2, [3, -4]), lin(1, 1, [1])], "l1", weighting="params"), 3.0)
    with pytest.raises(ValueError, match="comp_weighting"):
        layer_weights(layers, "flops")


def test_compression_weighted_by_squared_parameters_by_hand():
    # sizes 9, 4, 9 -> squares 81, 16, 81 -> weights 81/178, 16/178, 81/178
    layers = [lin(3, 3, [3, 4, 0]), lin(2, 2, [3, 4]), lin(3, 3, [0, 3, 4])]
    close(layer_weights(layers, "params-squared"), [81 / 178, 16 / 178, 81 / 178])
    # per-layer terms 0.4, 0.8, 7/15: (81 * 0.4 + 16 * 0.8 + 81 * 7/15) / 178 = (32.4 + 12.8 + 37.8) / 178 = 83/178
    close(compression_loss(layers, 0.1, weighting="params-squared"), 83 / 178)
    reg = DPRPRegularizer(DPRPConfig(lambda_comp=1.0, epsilon=0.1, comp_weighting="params-squared"))
    close(reg(layers)[1]["comp"], 83 / 178)


def test_regularizer_uses_comp_weighting():
    model = _model()  # sizes 3x2 = 6, 3x3 = 9, 4x4 = 16
    cfg = DPRPConfig(lambda_comp=0.5, epsilon=0.1, comp_weighting="params")
    loss, terms = DPRPRegularizer(cfg)(model)
    close(terms["comp"], compression_loss(model, 0.1, weighting="params"))
    close(loss, terms["structure"] + 0.5 * terms["comp"])
    assert float(terms["comp"]) != pytest.approx(float(compression_loss(model, 0.1).detach()))
    _, l1 = DPRPRegularizer(DPRPConfig(regularizer="l1", comp_weighting="params"))(model)
    close(l1["reg"], regularization_loss(model, "l1", weighting="params"))


def test_regularizer_weights_follow_the_layers_it_is_given():
    reg = DPRPRegularizer(DPRPConfig(epsilon=0.1, comp_weighting="params"))
    model = _model()
    reg(model)
    model[2].truncate_(2)  # pruning keeps the dense shape h x w, so the weights stay (6, 9, 16) / 31
    close(reg(model)[1]["comp"], compression_loss(model, 0.1, weighting="params"))
    close(reg._layer_weights(list(model)), [6 / 31, 9 / 31, 16 / 31])
    other = nn.Sequential(lin(2, 2, [3, 4]), lin(1, 1, [1]))  # another model: weights (4, 1) / 5, not the cached ones
    close(reg(other)[1]["comp"], compression_loss(other, 0.1, weighting="params"))
    close(reg._layer_weights(list(other)), [0.8, 0.2])


def test_compression_all_zero_is_finite():
    loss = compression_loss([lin(2, 2, [0, 0])], 0.1).detach()
    assert float(loss) == 0.0


# ----------------------------------------------------------------------------- eqs. (15)-(17)
def test_ablation_regularizers_by_hand():
    layers = [lin(2, 2, [3, -4]), lin(1, 1, [1])]
    # l1: [3,-4] -> 7/2 = 3.5; [1] -> 1; mean 2.25
    close(regularization_loss(layers, "l1"), 2.25)
    # l2: 5/2 = 2.5; 1; mean 1.75
    close(regularization_loss(layers, "l2"), 1.75)
    # funnel, delta = 1: (3/4 + 4/5) / 2 = 0.775; (1/2) / 1 = 0.5; mean 0.6375
    close(regularization_loss(layers, "funnel", delta=1.0), 0.6375)
    close(regularization_loss(layers, "none"), 0.0)
    with pytest.raises(ValueError, match="unknown ablation"):
        regularization_loss(layers, "l3")


# ----------------------------------------------------------------------------- eq. (8)
def _model():
    return nn.Sequential(lin(3, 2, [1, 1], U=[[1, 0], [0, 2], [0, 0]], V=[[1, 0], [0, 1]]),
                         lin(3, 3, [3, 4, 0]), lin(4, 4, [3, 1, 2, -1]))


def test_total_dprp_weights():
    cfg = DPRPConfig(lambda_str=2.0, mu_orth=10.0, mu_sort=3.0, lambda_comp=0.5, epsilon=0.1)
    model = _model()
    loss, terms = DPRPRegularizer(cfg)(model)
    orth, sort, comp = orthogonality_loss(model), sorting_loss(model), compression_loss(model, 0.1)
    close(terms["orth"], orth)
    close(terms["sort"], sort)
    close(terms["comp"], comp)
    close(terms["structure"], 10 * orth + 3 * sort)
    close(loss, 2 * (10 * orth + 3 * sort) + 0.5 * comp)
    close(terms["total_reg"], loss)
    assert not any(t.requires_grad for t in terms.values())


@pytest.mark.parametrize("kind", ["l1", "l2", "funnel", "none"])
def test_total_ablation(kind):
    cfg = DPRPConfig(regularizer=kind, lambda_comp=0.25, delta=0.5)
    model = _model()
    loss, terms = DPRPRegularizer(cfg)(model)
    assert set(terms) == {"reg", "total_reg"}
    close(loss, 0.25 * regularization_loss(model, kind, 0.5))


def test_schedules():
    reg = DPRPRegularizer(DPRPConfig(reg_warmup_epochs=4, lambda_str=2.0, lambda_comp=0.4, epsilon_start=0.001,
                                     epsilon=0.1, epsilon_ramp_epochs=2))
    assert reg.weights_at(0)["lambda_comp"] == 0.0
    assert reg.weights_at(2) == {"lambda_str": 1.0, "lambda_comp": 0.2, "mu_orth": 1000.0, "mu_sort": 1.0}
    assert reg.weights_at(10)["lambda_str"] == 2.0 and reg.weights_at(None)["lambda_comp"] == 0.4
    # geometric: 0.001 * (0.1 / 0.001) ** (e / 2): 0.001, 0.01, 0.1, then constant
    assert [round(reg.epsilon_at(e), 12) for e in (0, 1, 2, 5)] == [0.001, 0.01, 0.1, 0.1]
    assert reg.epsilon_at(None) == 0.1
    # at epoch 0 of the warm-up the regularizer contributes nothing
    assert float(reg(_model(), epoch=0)[0].detach()) == 0.0
    assert DPRPRegularizer(DPRPConfig(epsilon=0.2)).epsilon_at(7) == 0.2


def test_cooldown_switches_compression_off_in_the_last_epochs():
    reg = DPRPRegularizer(DPRPConfig(epochs=5, reg_cooldown_epochs=2, lambda_comp=0.4, lambda_str=2.0))
    assert [reg.cooling_at(e) for e in (None, 0, 2, 3, 4)] == [False, False, False, True, True]
    assert reg.weights_at(2)["lambda_comp"] == 0.4
    assert reg.weights_at(3) == {"lambda_str": 2.0, "lambda_comp": 0.0, "mu_orth": 1000.0, "mu_sort": 1.0}
    model = _model()
    structure_only = DPRPRegularizer(DPRPConfig(lambda_comp=1e-12, lambda_str=2.0))(model)[0]
    torch.testing.assert_close(reg(model, epoch=4)[0], structure_only, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="reg_cooldown_epochs"):
        DPRPConfig(reg_cooldown_epochs=-1)


def test_structure_when_frozen_false_drops_l_str_at_fixed_ranks():
    cfg = DPRPConfig(epochs=5, reg_cooldown_epochs=1, lambda_comp=0.4, lambda_str=2.0, structure_when_frozen=False)
    reg = DPRPRegularizer(cfg)
    assert reg.weights_at(3) == {"lambda_str": 2.0, "lambda_comp": 0.4, "mu_orth": 1000.0, "mu_sort": 1.0}
    assert reg.weights_at(4)["lambda_str"] == reg.weights_at(4)["lambda_comp"] == 0.0  # cool-down
    assert reg.weights_at(1, stopped=True)["lambda_str"] == 0.0  # target reached
    assert DPRPRegularizer(cfg.replace(structure_when_frozen=True)).weights_at(1, stopped=True)["lambda_str"] == 2.0
    model = _model()  # its first layer's U is not orthonormal: L_orth > 0
    loss, terms = reg(model, epoch=1, stopped=True)
    close(terms["orth"], orthogonality_loss(model))
    assert float(terms["orth"]) > 0.1 and float(terms["structure"]) > 0  # still reported
    assert loss.requires_grad and float(loss.detach()) == 0.0  # a differentiable zero: nothing is pushed
    loss.backward()
    for m in model:
        for p in (m.U, m.s, m.V):
            assert p.grad is None or not p.grad.any()
    with pytest.raises(ValueError, match="structure_when_frozen"):
        DPRPConfig(structure_when_frozen="no")


# ----------------------------------------------------------------------------- vectorised == loop
def _reference(layers, eps, delta):
    """A plain per-layer Python loop over the equations."""
    orth = sort = comp = l1 = l2 = fun = 0.0
    for m in layers:
        U, s, V = m.U.detach().double(), m.s.detach().double().tolist(), m.V.detach().double()
        r = len(s)
        eye = torch.eye(r, dtype=torch.float64)
        orth += (torch.linalg.norm(U.T @ U - eye) + torch.linalg.norm(V.T @ V - eye)).item() / r**2
        rises = [max(0.0, s[j + 1] - s[j]) for j in range(r - 1)]
        gamma = sum(1 for j in range(r - 1) if s[j + 1] > s[j])
        negs = [max(0.0, -v) for v in s]
        eta = sum(1 for v in s if v < 0)
        sort += (sum(rises) / gamma if gamma else 0.0) + (sum(negs) / eta if eta else 0.0)
        tau = r
        for j in range(r - 1):
            rho = abs(s[j + 1]) / abs(s[j]) if s[j] != 0 else 0.0
            if rho <= eps:
                tau = j + 1
                break
        norm = math.sqrt(sum(v * v for v in s))
        comp += sum(abs(v) for v in s[tau - 1:]) / ((r - tau + 1) * norm)
        l1 += sum(abs(v) for v in s) / r
        l2 += norm / r
        fun += sum(abs(v) / (abs(v) + delta) for v in s) / r
    n = len(layers)
    return {k: v / n for k, v in dict(orth=orth, sort=sort, comp=comp, l1=l1, l2=l2, funnel=fun).items()}


def test_vectorised_equals_loop():
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 3, 3), (5, 4, 2), (7, 3, 1), (2, 6, 2), (4, 4, 4), (3, 5, 3)]  # (out, in, rank), h and w repeat
    layers = []
    for out_f, in_f, r in shapes:
        m = SVDLinear(in_f, out_f, rank=r)
        with torch.no_grad():
            m.U.copy_(torch.randn(out_f, r, generator=gen))
            m.V.copy_(torch.randn(in_f, r, generator=gen))
            m.s.copy_(torch.randn(r, generator=gen))
            if r >= 3:
                m.s[1] = 0.0  # a zero in the middle
        layers.append(m)
    ref = _reference(layers, 0.3, 0.01)
    got = {"orth": orthogonality_loss(layers), "sort": sorting_loss(layers), "comp": compression_loss(layers, 0.3),
           "l1": regularization_loss(layers, "l1"), "l2": regularization_loss(layers, "l2"),
           "funnel": regularization_loss(layers, "funnel", 0.01)}
    for k, v in got.items():
        torch.testing.assert_close(v.double(), torch.tensor(ref[k], dtype=torch.float64), rtol=1e-5, atol=1e-6,
                                   msg=f"term {k}")


# ----------------------------------------------------------------------------- gradients
def test_gradients_flow_and_grad_untouched(monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("the losses must not compute an SVD")

    torch.manual_seed(0)
    model = factorize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)))
    with torch.no_grad():
        model[0].s[0] = -model[0].s[0]  # a negative and out-of-order entry: L_sort has gradient
    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch, "svd", no_svd)
    reg = DPRPRegularizer(DPRPConfig(lambda_comp=1.0))
    loss, _ = reg(model)
    assert all(p.grad is None for p in model.parameters())  # computing the loss never sets .grad
    for kind in ("l1", "l2", "funnel"):
        DPRPRegularizer(DPRPConfig(regularizer=kind))(model)
    reg.keep_counts(model)
    assert all(p.grad is None for p in model.parameters())
    loss.backward()
    for layer in (model[0], model[3]):
        for p in (layer.U, layer.s, layer.V):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_no_svd_layers_gives_zero():
    loss, terms = DPRPRegularizer(DPRPConfig())(nn.Linear(3, 2))
    assert float(loss.detach()) == 0.0 and set(terms) == {"orth", "sort", "comp", "structure", "total_reg"}
    assert keep_counts([], 0.1).numel() == 0


# ----------------------------------------------------------------------------- no host-to-device copy per step
def counting_tensor(monkeypatch) -> list[int]:
    """Count the calls of torch.tensor from now on (a list built on the host and copied to the device)."""
    calls = [0]
    real = torch.tensor

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counted)
    return calls


def uneven_layers(seed: int = 0) -> list[SVDLinear]:
    """SVD layers whose heights and widths repeat at different ranks (padded Gram groups and sigma rows)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for out_f, in_f, r in [(6, 5, 4), (6, 7, 2), (3, 5, 3), (4, 4, 1)]:
        m = SVDLinear(in_f, out_f, rank=r)
        with torch.no_grad():
            for p in (m.U, m.s, m.V):
                p.copy_(torch.randn(p.shape, generator=gen))
        layers.append(m)
    return layers


@pytest.mark.parametrize("kind,weighting", [("dprp", "layers"), ("dprp", "params"), ("l1", "params-squared")])
def test_losses_build_no_tensor_from_python_lists_after_the_first_step(kind, weighting, monkeypatch):
    # on CUDA, torch.tensor([...], device=...) is a copy that waits for the GPU: the losses run every step
    _rank_tensors.cache_clear()  # the cache is shared by the whole process: start from none
    layers = uneven_layers()
    reg = DPRPRegularizer(DPRPConfig(regularizer=kind, comp_weighting=weighting, lambda_comp=1.0))

    def step():
        loss, terms = reg(layers, epoch=1)
        loss.backward()
        for term in (orthogonality_loss(layers), sorting_loss(layers), compression_loss(layers, 0.3),
                     regularization_loss(layers, "funnel")):
            term.backward()
        keep_counts([m.s for m in layers], 0.3)
        return loss.detach(), terms

    loss, first = step()  # the first step copies each set of ranks to the device once
    calls = counting_tensor(monkeypatch)
    for _ in range(3):
        again, terms = step()
        torch.testing.assert_close(again, loss, rtol=0, atol=0)
        for k in first:
            torch.testing.assert_close(terms[k], first[k], rtol=0, atol=0, msg=k)
    assert calls[0] == 0
    # pruning changes the ranks: those are copied once, then the steps are free of copies again
    with torch.no_grad():
        layers[0].truncate_(3)
    reg(layers, epoch=1)
    assert calls[0] > 0
    calls[0] = 0
    reg(layers, epoch=1)[0].backward()
    assert calls[0] == 0


def test_cached_ranks_are_not_shared_with_callers_or_inference_mode():
    s = [torch.tensor([3.0, 2.0, 1.0]), torch.tensor([5.0])]
    _, mask, r = pad_singular_values(s)
    mask.fill_(False)  # a caller may modify what it gets: the next call still sees the true ranks
    r.zero_()
    S, mask, r = pad_singular_values(s)
    torch.testing.assert_close(S, torch.tensor([[3.0, 2.0, 1.0], [5.0, 0.0, 0.0]]))
    torch.testing.assert_close(mask, torch.tensor([[True, True, True], [True, False, False]]))
    torch.testing.assert_close(r, torch.tensor([3, 1]))
    assert not r.requires_grad and not mask.requires_grad
    # ranks first seen under inference_mode are cached as ordinary tensors, usable with autograd afterwards
    _rank_tensors.cache_clear()
    layers = [SVDLinear(11, 9, rank=7), SVDLinear(13, 9, rank=5)]
    reg = DPRPRegularizer(DPRPConfig(lambda_comp=1.0))
    with torch.inference_mode():
        reg(layers)
    reg(layers)[0].backward()
    assert all(p.grad is not None for m in layers for p in (m.U, m.s, m.V))


# ----------------------------------------------------------------------------- distillation (not in the paper)
def test_distillation_by_hand():
    # teacher logits (ln 3, 0) -> p_t = (3/4, 1/4); student (0, 0) -> p_s = (1/2, 1/2)
    # T = 1: KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812036
    # T = 2: p_t = (sqrt3, 1) / (sqrt3 + 1) = (0.633975, 0.366025); KL = 0.0363408 -> T^2 KL = 0.145363131
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    student = torch.zeros(2, 2)
    # the second row is already matched (KL 0), so the batch mean is half the first row's value
    close(distillation_loss(student, teacher, 1.0), 0.130812036 / 2)
    close(distillation_loss(student, teacher, 2.0), 0.145363131 / 2)
    close(distillation_loss(teacher, teacher, 3.0), 0.0)


@pytest.mark.parametrize("temperature", [1e3, 1e4, 1e6])
def test_distillation_at_a_large_temperature_tends_to_half_the_centred_squared_logit_gap(temperature):
    # T^2 KL -> sum_i (d_i - mean d)^2 / (2 C) with d = teacher - student logits, C classes: for the rows of
    # test_distillation_by_hand, (ln 3)^2 / 8 and 0, batch mean (ln 3)^2 / 16. In float32 it was -1.9 at T = 1e4.
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    value = distillation_loss(torch.zeros(2, 2), teacher, temperature)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, torch.tensor(math.log(3.0) ** 2 / 16), rtol=2e-3, atol=0.0)


def test_distillation_gradient_only_to_the_student_and_shapes_checked():
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    distillation_loss(student, teacher, 4.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    with pytest.raises(ValueError, match="teacher logits"):
        distillation_loss(torch.zeros(2, 5), torch.zeros(2, 6))


def test_regularizer_argument_types_are_named():
    from dprp_surgery import DPRPRegularizer

    with pytest.raises(TypeError, match=r"DPRPRegularizer\(\) takes a DPRPConfig .* got dict; .*from_dict"):
        DPRPRegularizer({"lambda_comp": 1.0})
    with pytest.raises(TypeError, match="expected a model or a list of its SVD layers, got NoneType"):
        DPRPRegularizer()(None)
    with pytest.raises(TypeError, match="expected a model or a list of its SVD layers, got str"):
        DPRPRegularizer()("model")


@pytest.mark.parametrize(("s", "min_rank", "expected", "grad_s1"), [
    # s (4, 2, 1, 0.05), eps 0.1: tau 3; 1.05 / (2 sqrt(21.0025)), whatever min_rank up to 3
    ([4.0, 2.0, 1.0, 0.05], 1, 1.05 / (2 * math.sqrt(21.0025)), None),
    ([4.0, 2.0, 1.0, 0.05], 3, 1.05 / (2 * math.sqrt(21.0025)), None),
    # r_l = min_rank 4: the value of the tail from s_4, but no gradient (the pruner never cuts it)
    ([4.0, 2.0, 1.0, 0.05], 4, 0.05 / math.sqrt(21.0025), 0.0),
    # s (4, 0.1, 0.05): tau 1, the paper sums all three; with min_rank 2 the sum starts at s_2
    ([4.0, 0.1, 0.05], 1, 4.15 / (3 * math.sqrt(16.0125)), None),
    ([4.0, 0.1, 0.05], 2, 0.15 / (2 * math.sqrt(16.0125)), -0.075 * 4.0 / 16.0125 ** 1.5),
])
def test_compression_loss_starts_at_min_rank(s, min_rank, expected, grad_s1):
    layer = lin(4, 4, s)
    loss = compression_loss([layer], epsilon=0.1, min_rank=min_rank)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    reg_loss, terms = DPRPRegularizer(DPRPConfig(min_rank=min_rank, lambda_str=0.0, lambda_comp=1.0,
                                                 epsilon=0.1))([layer])
    assert float(terms["comp"]) == pytest.approx(expected, rel=1e-5)
    if grad_s1 is not None:
        (grad,) = torch.autograd.grad(reg_loss, layer.s)
        assert float(grad[0]) == pytest.approx(grad_s1, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("kind", ["none", "l1"])
def test_every_regularizer_returns_a_differentiable_loss(kind):
    layer = lin(4, 4, [2.0, 1.0])
    loss, terms = DPRPRegularizer(DPRPConfig(regularizer=kind))(layer)
    loss.backward()  # "none" raised "element 0 of tensors does not require grad"
    assert layer.s.grad is not None and float(terms["total_reg"]) == float(loss.detach())


def test_the_rank_cache_holds_the_rank_sets_of_a_large_model():
    layers = [SVDLinear(80, 1 + i, rank=1 + i) for i in range(70)]  # 70 shapes: over 140 rank sets per step
    reg = DPRPRegularizer(DPRPConfig())
    reg(layers)
    _rank_tensors.cache_clear()
    reg(layers)
    misses = _rank_tensors.cache_info().misses
    reg(layers)
    assert _rank_tensors.cache_info().misses == misses  # the second step builds nothing again


def test_a_zero_weighted_term_cannot_make_the_loss_nan():
    layer = lin(4, 4, [2.0, 1.0])
    with torch.no_grad():
        layer.U[0, 0] = float("nan")  # L_orth is NaN; its weight is 0 (e.g. during a warm-up or once frozen)
    loss, terms = DPRPRegularizer(DPRPConfig(lambda_str=0.0, lambda_comp=1.0))(layer)
    assert math.isnan(float(terms["orth"])) and math.isfinite(float(loss.detach()))
    loss.backward()
    assert torch.isfinite(layer.s.grad).all()


def test_standalone_loss_functions_check_their_arguments():
    layer = lin(4, 4, [2.0, 1.0])
    for bad in (0.0, 1.0, 2.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="epsilon"):
            keep_counts([layer.s], bad)
        with pytest.raises(ValueError, match="epsilon"):
            compression_loss([layer], bad)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="min_rank"):
            compression_loss([layer], 0.1, min_rank=bad)


def test_sorting_counts_are_exact_in_float64():
    layer = lin(4, 4, [1.0, 2.0, 3.0, 4.0]).double()  # three rises of 1, chi(3) = 1/3: exactly 1
    assert float(sorting_loss([layer]).detach()) == 1.0
