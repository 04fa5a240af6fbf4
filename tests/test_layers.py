"""SVD twins against their dense originals: function, Eckart-Young truncation, parameter formulas."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dprp_surgery.layers import (
    MATRICIZATIONS,
    TWINS,
    SVDConv1d,
    SVDConv2d,
    SVDLayer,
    SVDLinear,
    layer_from_spec,
    resolve_scheme,
)

SCHEMES = ("paper", "channel", "spatial")


def expected_matrix_shape(module: nn.Module, scheme: str) -> tuple[int, int]:
    """(h, w) of M written out from the definitions in docs/method.md."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    s, c = module.out_channels, module.in_channels // module.groups
    k = tuple(module.kernel_size)
    if scheme == "paper":
        return s * c, math.prod(k)
    if scheme == "channel":
        return s, c * math.prod(k)
    return s * k[0], c * k[1]


@st.composite
def dense_layers(draw):
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    bias = draw(st.booleans())
    if kind == "linear":
        lin = nn.Linear(draw(st.integers(1, 12)), draw(st.integers(1, 12)), bias=bias)
        return lin, (2, 3, lin.in_features)
    ndim = 1 if kind == "conv1d" else 2
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_ch = groups * draw(st.integers(1, 4))
    depthwise = draw(st.booleans()) and groups == 1
    if depthwise:
        groups = in_ch
    out_ch = groups * draw(st.integers(1, 4))
    kernel = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    if draw(st.booleans()):
        padding, stride = "same", 1
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
        padding = tuple(draw(st.integers(0, (k - 1) * d // 2 + 0)) for k, d in zip(kernel, dilation))
    conv_t = nn.Conv1d if ndim == 1 else nn.Conv2d
    conv = conv_t(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                  bias=bias, padding_mode=padding_mode)
    size = max(k_ * d_ for k_, d_ in zip(kernel, dilation)) + 4
    return conv, (2, in_ch) + (size,) * ndim


def _twin(dense: nn.Module, scheme: str):
    used, _ = resolve_scheme(dense, scheme)
    return TWINS[type(dense)].from_dense(dense, scheme=used), used


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=dense_layers(), scheme=st.sampled_from(SCHEMES), data=st.data())
def test_full_rank_twin_computes_the_dense_function(layer, scheme, data):
    dense, shape = layer
    torch.manual_seed(0)
    x = torch.randn(shape)
    twin, used = _twin(dense, scheme)
    want = dense(x)
    torch.testing.assert_close(twin(x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(twin.to_dense()(x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(twin.to_factorized()(x), want, rtol=1e-4, atol=1e-5)

    # parameter counts equal the formulas: r(h + w + 1) + bias, eqs. (3)/(6)
    h, w = expected_matrix_shape(dense, used)
    bias = 0 if dense.bias is None else dense.bias.numel()
    assert twin.matrix_shape == (h, w)
    assert twin.full_rank == min(h, w) == twin.rank
    assert twin.factor_param_count() == twin.rank * (h + w + 1) + bias
    assert sum(p.numel() for p in twin.parameters()) == twin.factor_param_count()
    assert twin.dense_param_count() == sum(p.numel() for p in dense.parameters())

    # truncate_(k) keeps exactly the best rank-k approximation (Eckart-Young)
    k = data.draw(st.integers(1, twin.rank))
    matrix = MATRICIZATIONS[used].to_matrix(dense.weight.detach()).double()
    sv = torch.linalg.svdvals(matrix)
    twin.truncate_(k)
    approx = MATRICIZATIONS[used].to_matrix(twin.dense_weight().detach()).double()
    err = torch.linalg.matrix_norm(matrix - approx)
    dropped = sv[k:].square().sum().sqrt()
    torch.testing.assert_close(err, dropped, rtol=1e-4, atol=1e-5 * float(sv[0]) + 1e-6)
    assert twin.rank == k and twin.factor_param_count() == k * (h + w + 1) + bias
    assert twin.compression_rate() == pytest.approx(1 - k * (h + w + 1) / (h * w))
    # the standard-layer realisation still computes the truncated layer
    torch.testing.assert_close(twin.to_factorized()(x), twin(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(twin.to_factorized().weight, twin.dense_weight(), rtol=1e-4, atol=1e-5)
    if used != "paper":  # Sigma folded into U: r(h + w) weights
        fact = twin.to_factorized()
        assert sum(p.numel() for p in fact.parameters()) == k * (h + w) + bias


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False),
        nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect"),
        nn.Conv2d(64, 4, 3, padding=1),  # paper scheme: pointwise-first realisation
        nn.Conv2d(4, 64, 3, padding=1),  # paper scheme: depthwise-first realisation
        nn.Conv2d(8, 8, 3, groups=8, padding=1),
    ],
    ids=["nonsquare-stride", "same-reflect", "wide-in", "wide-out", "depthwise"],
)
def test_conversions_copy_every_hyper_parameter(conv, scheme):
    twin, used = _twin(conv, scheme)
    dense = twin.to_dense()
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(dense, attr) == getattr(conv, attr), attr
    assert (dense.bias is None) == (conv.bias is None)
    x = torch.randn(2, conv.in_channels, 11, 13)
    torch.testing.assert_close(dense(x), conv(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(twin.to_factorized()(x), conv(x), rtol=1e-4, atol=1e-5)
    assert f"scheme={used}" in repr(twin) and f"rank={twin.rank}/{twin.full_rank}" in repr(twin)


def test_paper_scheme_is_eq_1_index_map():
    # [K]_{s,c,l2,l1} = [M]_{(s-1)C+c, (l2-1)L1+l1}: check the 0-based version of eq. (1) entry by entry
    conv = nn.Conv2d(3, 2, (2, 4), bias=False)
    m = MATRICIZATIONS["paper"].to_matrix(conv.weight)
    S, C, L2, L1 = conv.weight.shape
    for s in range(S):
        for c in range(C):
            for l2 in range(L2):
                for l1 in range(L1):
                    assert m[s * C + c, l2 * L1 + l1] == conv.weight[s, c, l2, l1]


def test_spatial_scheme_index_map():
    conv = nn.Conv2d(3, 2, (2, 4), bias=False)
    m = MATRICIZATIONS["spatial"].to_matrix(conv.weight)
    assert m.shape == (2 * 2, 3 * 4)
    assert m[1 * 2 + 1, 2 * 4 + 3] == conv.weight[1, 2, 1, 3]
    torch.testing.assert_close(MATRICIZATIONS["spatial"].to_weight(m, tuple(conv.weight.shape)), conv.weight)


def test_truncate_keeps_parameter_objects_and_slices_grads():
    layer = SVDLinear.from_dense(nn.Linear(6, 5))
    ids = [id(p) for p in (layer.U, layer.s, layer.V)]
    layer(torch.randn(3, 6)).sum().backward()
    layer.truncate_(2)
    assert [id(p) for p in (layer.U, layer.s, layer.V)] == ids
    assert layer.U.shape == (5, 2) and layer.V.shape == (6, 2) and layer.s.shape == (2,)
    assert layer.U.grad.shape == layer.U.shape and layer.s.grad.shape == (2,)


@pytest.mark.parametrize("keep", [0, 6])
def test_truncate_rejects_out_of_range(keep):
    layer = SVDLinear.from_dense(nn.Linear(6, 5))
    with pytest.raises(ValueError, match=r"keep must be in \[1, 5\]"):
        layer.truncate_(keep)


def test_spec_round_trip_rebuilds_the_same_shapes():
    for layer in (SVDConv2d.from_dense(nn.Conv2d(4, 6, 3, stride=2, padding="valid")),
                  SVDConv1d.from_dense(nn.Conv1d(4, 6, 5, padding="same", padding_mode="circular"), scheme="channel"),
                  SVDLinear.from_dense(nn.Linear(4, 6, bias=False))):
        layer.truncate_(2)
        clone = layer_from_spec(layer.spec())
        clone.load_state_dict(layer.state_dict())
        x = torch.randn(2, 4, 9) if isinstance(layer, SVDConv1d) else (
            torch.randn(2, 4, 9, 9) if isinstance(layer, SVDConv2d) else torch.randn(2, 4))
        torch.testing.assert_close(clone(x), layer(x))


def test_resolve_scheme_explains_fallbacks():
    assert resolve_scheme(nn.Linear(3, 4), "paper") == ("channel", "Linear layers use out x in")
    assert resolve_scheme(nn.Conv2d(4, 4, 3, groups=2), "spatial")[0] == "paper"
    assert resolve_scheme(nn.Conv2d(4, 4, 1), "paper")[0] == "channel"
    assert resolve_scheme(nn.Conv1d(4, 4, 3), "spatial") == ("channel", "the spatial scheme needs a 2-D kernel")
    with pytest.raises(ValueError, match="unknown scheme 'tucker'"):
        resolve_scheme(nn.Conv2d(4, 4, 3), "tucker")


class _OwnForwardConv(nn.Conv2d):
    def forward(self, x):  # computes something else than nn.Conv2d
        return super().forward(x).relu()


@pytest.mark.parametrize(("twin", "dense", "words"), [
    (SVDConv2d, nn.ConvTranspose2d(6, 6, 3, padding=1), r"takes an nn.Conv2d, got torch.nn.modules.conv.ConvTranspose2d"
     r": dprp_surgery factorizes nn.Linear, nn.Conv1d, nn.Conv2d only; leave it dense"),
    (SVDConv2d, nn.Conv3d(4, 6, 3), r"got torch.nn.modules.conv.Conv3d: .*leave it dense"),
    (SVDConv2d, nn.Conv1d(4, 6, 3), r"got torch.nn.modules.conv.Conv1d: use SVDConv1d.from_dense"),
    (SVDConv1d, nn.Conv2d(4, 6, 3), r"got torch.nn.modules.conv.Conv2d: use SVDConv2d.from_dense"),
    (SVDLinear, nn.Conv2d(4, 6, 1), r"SVDLinear.from_dense takes an nn.Linear, .*use SVDConv2d.from_dense"),
    (SVDConv2d, _OwnForwardConv(4, 6, 3), r"got .*_OwnForwardConv: it subclasses nn.Conv2d and may compute something "
     r"else .*leave it dense"),
    # an equivalent subclass is named like its base (was "factorizes nn.Linear, ... only")
    (SVDConv2d, __import__("timm").layers.Linear(4, 6), r"got timm.layers.linear.Linear: use SVDLinear.from_dense"),
    # the abstract base returned None
    (SVDLayer, nn.Linear(4, 6), r"SVDLayer.from_dense is abstract; use SVDLinear.from_dense"),
    (SVDLayer, nn.Conv3d(4, 6, 3), r"SVDLayer.from_dense is abstract; dprp_surgery factorizes nn.Linear, nn.Conv1d"),
])
def test_from_dense_refuses_a_layer_it_cannot_represent(twin, dense, words):
    # these were accepted and gave a twin with another function (ConvTranspose2d: off by 2 at the same shape)
    with pytest.raises(TypeError, match=words):
        twin.from_dense(dense)


@pytest.mark.parametrize(("dense", "scheme", "words"), [
    (nn.Conv2d(4, 8, 3, padding=1, groups=2), "channel", r"scheme='channel' with groups=2: only the paper scheme"),
    (nn.Conv2d(4, 4, 3, padding=1, groups=4), "spatial", r"scheme='spatial' with groups=4: .*pass scheme='paper'"),
    (nn.Conv1d(4, 6, 3), "spatial", r"scheme='spatial' needs a 2-D kernel, and SVDConv1d has a 1-D one"),
    (nn.Linear(4, 6), "paper", r"SVDLinear factorizes the out x in matrix \('channel' scheme\); got scheme='paper'"),
    (nn.Conv2d(4, 6, 3), "tucker", r"unknown scheme 'tucker'; use one of paper, channel, spatial"),
])
def test_from_dense_refuses_a_scheme_the_layer_cannot_use(dense, scheme, words):
    # grouped convs built with 'channel'/'spatial' failed only later, in to_factorized, with a bare reshape error
    with pytest.raises(ValueError, match=words):
        TWINS[type(dense)].from_dense(dense, scheme=scheme)


def test_linear_forward_paths_agree():
    # the thin two-matmul path (few rows, low rank) and the rebuild path compute the same function
    dense = nn.Linear(64, 48)
    layer = SVDLinear.from_dense(dense)
    layer.truncate_(4)
    x_small, x_big = torch.randn(1, 64), torch.randn(512, 64)
    w = layer.dense_weight()
    for x in (x_small, x_big):
        torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(300, 256), (256, 700)])
def test_large_layers_take_the_gram_path_exactly(shape):
    """Wide/tall Linear layers (>= GRAM_SVD_MIN) are initialised via the float64 Gram matrix, as exactly as by SVD."""
    from dprp_surgery.layers import GRAM_SVD_MIN

    assert min(shape) >= GRAM_SVD_MIN
    torch.manual_seed(0)
    dense = nn.Linear(shape[1], shape[0])
    layer = SVDLinear.from_dense(dense)
    reference = torch.linalg.svdvals(dense.weight.detach())
    torch.testing.assert_close(layer.s.detach(), reference, rtol=1e-5, atol=1e-6)
    eye = torch.eye(layer.rank)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.V.T @ layer.V, eye, rtol=0, atol=1e-5)
    x = torch.randn(4, shape[1])
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    k = layer.rank // 3  # Eckart-Young still holds for the truncation
    w = dense.weight.detach()
    layer.truncate_(k)
    err = torch.linalg.matrix_norm(layer.dense_weight().detach() - w)
    torch.testing.assert_close(err, reference[k:].norm(), rtol=1e-4, atol=1e-5)


def test_rank_deficient_large_layer_falls_back_to_svd():
    """A rank-deficient weight (here 200 zero rows) cannot be split by A V / s; the exact SVD is used instead."""
    torch.manual_seed(0)
    dense = nn.Linear(300, 400, bias=False)
    with torch.no_grad():
        dense.weight[:200] = 0
        dense.weight[200:] = torch.randn(200, 300) @ torch.randn(300, 300) / 30
        dense.weight[200:, :1] = 0
    layer = SVDLinear.from_dense(dense)
    assert torch.isfinite(layer.U).all() and torch.isfinite(layer.V).all()
    torch.testing.assert_close(layer.V.T @ layer.V, torch.eye(300), rtol=0, atol=1e-5)
    x = torch.randn(3, 300)
    y = dense(x)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-5 * y.abs().max().item())  # zero rows: relative is inf


@pytest.mark.parametrize("scheme", ["paper", "channel", "spatial"])
def test_float64_layers_keep_float64_precision(scheme):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    twin = SVDConv2d.from_dense(conv, scheme=scheme)
    assert twin.U.dtype == torch.float64
    torch.testing.assert_close(twin(x), conv(x), rtol=1e-12, atol=1e-12)


def test_float64_large_linear_is_exact_in_float64():
    torch.manual_seed(0)
    lin = nn.Linear(300, 400).double()  # wide enough for the float32 Gram path, which float64 must skip
    twin = SVDLinear.from_dense(lin)
    torch.testing.assert_close(twin.dense_weight(), lin.weight.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dense", [nn.Linear(6, 5), nn.Conv2d(3, 4, 3)], ids=["linear", "conv"])
def test_weight_property_is_the_dense_weight_with_gradient_to_the_factors(dense):
    twin = TWINS[type(dense)].from_dense(dense)
    torch.testing.assert_close(twin.weight, dense.weight.detach(), rtol=1e-5, atol=1e-6)
    twin.weight.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (twin.U, twin.s, twin.V))
    assert "weight" not in dict(twin.named_parameters())


@pytest.mark.parametrize("frozen", ["weight", "bias", "both"])
def test_conversions_carry_frozen_flags(frozen):
    conv = nn.Conv2d(3, 4, 3)
    if frozen in ("weight", "both"):
        conv.weight.requires_grad_(False)
    if frozen in ("bias", "both"):
        conv.bias.requires_grad_(False)
    twin = SVDConv2d.from_dense(conv)
    assert [p.requires_grad for p in (twin.U, twin.s, twin.V)] == [conv.weight.requires_grad] * 3
    assert twin.bias.requires_grad == conv.bias.requires_grad
    back = twin.to_dense()
    assert (back.weight.requires_grad, back.bias.requires_grad) == (conv.weight.requires_grad,
                                                                    conv.bias.requires_grad)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    "dense",
    [
        nn.Linear(12, 7),
        nn.Linear(12, 7, bias=False),
        nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False),
        nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect"),
        nn.Conv2d(64, 4, 3, padding=1, bias=False),  # paper scheme: pointwise-first realisation
        nn.Conv2d(4, 64, 3, padding=1),  # paper scheme: depthwise-first realisation
        nn.Conv2d(8, 8, 3, groups=8, padding=1),
        nn.Conv1d(6, 8, 5, stride=2, padding=2, groups=2),
    ],
    ids=["linear", "linear-nobias", "nonsquare-stride", "same-reflect", "wide-in", "wide-out", "depthwise", "conv1d"],
)
def test_factorized_realisation_answers_like_the_dense_layer(dense, scheme):
    """Code around a layer reads its hyper-parameters, weight and bias; `to_factorized()` must answer them too."""
    torch.manual_seed(0)
    twin, used = _twin(dense, scheme)
    twin.truncate_(max(1, twin.rank // 2))
    fact = twin.to_factorized()
    hparams = ("in_features", "out_features") if isinstance(dense, nn.Linear) else (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    for attr in hparams:
        assert getattr(fact, attr) == getattr(dense, attr), attr
    # weight: the dense product of the realised factors (the truncated layer's), with gradient to them
    torch.testing.assert_close(fact.weight, twin.dense_weight().detach(), rtol=1e-5, atol=1e-6)
    assert fact.weight.shape == dense.weight.shape and fact.weight.dtype == dense.weight.dtype
    fact.weight.square().sum().backward()
    assert all(p.grad is not None for n, p in fact.named_parameters() if n.endswith("weight"))
    if dense.bias is None:
        assert fact.bias is None
    else:
        torch.testing.assert_close(fact.bias, twin.bias.detach())
        assert any(fact.bias is p for p in fact.parameters())  # the realised layer's own Parameter
    # the state dict is that of the plain layers it holds (artifacts, load, ONNX and pt2 see no change)
    assert list(fact.state_dict()) == list(nn.Sequential(*fact).state_dict())
    assert "weight" not in dict(fact.named_parameters()) and "bias" not in dict(fact.named_parameters())
    with pytest.raises(AttributeError):
        fact.weight = dense.weight.detach()  # read-only, as on the SVD layer
    text = repr(fact)
    assert repr(dense) in text and f"scheme={used}" in text and f"rank={twin.rank}/{twin.full_rank}" in text
    whole = fact[:]  # a slice is a plain Sequential of the same layers
    assert type(whole) is nn.Sequential and list(whole) == list(fact)
    x = torch.randn(2, *dense.weight.shape[1:2]) if isinstance(dense, nn.Linear) else torch.randn(
        2, dense.in_channels, *(11,) * (dense.weight.dim() - 2))
    torch.testing.assert_close(whole(x), twin(x), rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():  # TorchScript is deprecated in newer torch, but deployments still use it
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(fact)  # it compiles the forward (not weight/bias)
    for inputs in (x, x[0]):  # batched and one unbatched sample
        torch.testing.assert_close(scripted(inputs), fact(inputs), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fact(inputs), twin(inputs), rtol=1e-4, atol=1e-5)
    last = max(i for i, m in enumerate(fact) if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d))
    fact[last] = nn.Identity()  # no longer two plain layers (as after re-factorizing or quantizing its parts)
    assert not hasattr(fact, "weight") and not hasattr(fact, "bias")
    assert f"scheme={used}" in repr(fact)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float64_factorized_realisation_weight_is_float64(scheme):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    fact = SVDConv2d.from_dense(conv, scheme=scheme).to_factorized()
    assert fact.weight.dtype == torch.float64
    torch.testing.assert_close(fact.weight, conv.weight.detach(), rtol=1e-12, atol=1e-12)
