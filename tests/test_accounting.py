"""summarize(): parameters and MACs against numbers worked out by hand."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dprp_surgery import DPRPConfig, factorize, summarize


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


X = torch.randn(1, 3, 8, 8)


def test_dense_model_counts():
    s = summarize(Small(), X)
    rows = {r.name: r for r in s.rows}
    # conv: 8 out * 3 in * 9 taps * 64 output pixels; fc: 8 * 4
    assert rows["conv"].macs == 8 * 3 * 9 * 64 == 13824
    assert rows["fc"].macs == 32
    assert rows["conv"].params == 216 and rows["fc"].params == 36
    assert s.params == s.dense_params == 252
    assert s.macs == s.dense_macs == 13856
    assert s.params_removed == 0.0


def test_paper_scheme_counts_and_eq4():
    fact = factorize(Small(), DPRPConfig(scheme="paper", min_compressible=None))
    s = summarize(fact, X)
    conv, fc = (next(r for r in s.rows if r.name == n) for n in ("conv", "fc"))
    # conv: M is (S*C) x (L2*L1) = 24 x 9, full rank 9: P_fc = 9 (24 + 9 + 1) = 306 (eq. (3))
    assert (conv.matrix, conv.rank, conv.params, conv.dense_params) == ((24, 9), 9, 306, 216)
    assert conv.compression == pytest.approx(1 - 306 / 216)  # eq. (4), negative at full rank
    assert conv.max_compression == pytest.approx(1 - 34 / 216)
    # realisation (depthwise-first): per output pixel and rank, C*k^2 + S*C = 27 + 24 = 51 MACs
    assert conv.dense_macs == 13824 and conv.macs == 51 * 64 * 9
    # fc: 4 x 8, rank 4: 4 (4 + 8 + 1) + 4 bias = 56; MACs r (8 + 4) = 48
    assert (fc.params, fc.macs, fc.dense_macs) == (56, 48, 32)
    assert s.params == 306 + 56 and s.dense_params == 252
    assert s.macs == 51 * 64 * 9 + 48 and s.dense_macs == 13856

    fact.conv.truncate_(2)
    s2 = summarize(fact, X)
    conv = next(r for r in s2.rows if r.name == "conv")
    assert (conv.rank, conv.params, conv.macs) == (2, 68, 51 * 64 * 2)
    assert s2.params_removed == pytest.approx(1 - (68 + 56) / 252)
    assert s2.macs_removed == pytest.approx(1 - (51 * 64 * 2 + 48) / 13856)


def test_channel_scheme_counts():
    fact = factorize(Small(), DPRPConfig(scheme="channel"))
    conv = next(r for r in summarize(fact, X).rows if r.name == "conv")
    # M is S x (C*L2*L1) = 8 x 27, rank 8: 8 (8 + 27 + 1) = 288; MACs (27 + 8) * 64 per rank
    assert (conv.matrix, conv.params, conv.macs) == ((8, 27), 288, 35 * 64 * 8)


def test_summary_json_and_table():
    fact = factorize(Small(), DPRPConfig(min_compressible=None))
    s = summarize(fact, X)
    data = json.loads(s.to_json())
    assert data["params"] == s.params and data["rows"][0]["name"] == "conv"
    assert {"params_removed", "macs_removed", "mean_rank"} <= set(data)
    text = str(s)
    assert "conv" in text and "scheme" in text and "paper" in text
    assert s.ranks() == {"conv": 9, "fc": 4}


def test_skipped_layers_are_listed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 36, 1))
    fact = factorize(model)
    rows = {r.name: r for r in summarize(fact, X).rows}
    assert rows["2"].status == "skipped" and "incompressible" in rows["2"].note


@pytest.mark.parametrize("scheme", ["paper", "channel"])
def test_exported_layers_count_against_their_dense_original(scheme):
    from dprp_surgery import svd_layers
    from dprp_surgery.export import export

    fact = factorize(Small(), DPRPConfig(scheme=scheme, min_compressible=None))
    for _, layer in svd_layers(fact):
        layer.truncate_(2)
    svd = summarize(fact, X)
    exported = summarize(export(fact, "factorized"), X)
    # one row per original layer (not one per inner conv/linear), against the same dense layer
    assert [r.name for r in exported.rows] == [r.name for r in svd.rows] == ["conv", "fc"]
    for e, s in zip(exported.rows, svd.rows):
        assert e.status == "factorized" and (e.kind, e.scheme, e.matrix, e.rank) == (s.kind, s.scheme, s.matrix, 2)
        assert (e.dense_params, e.dense_macs, e.macs) == (s.dense_params, s.dense_macs, s.macs)
        assert e.params == s.params - 2  # the singular values are folded into U
    assert exported.dense_params == svd.dense_params == 252 and exported.params == svd.params - 4
    assert exported.dense_macs == svd.dense_macs == 13856 and exported.macs == svd.macs
    dense = summarize(export(fact, "dense"), X)  # a dense export is as big as the original
    assert dense.params == dense.dense_params == 252 and [r.status for r in dense.rows] == ["dense", "dense"]


def test_exported_resnet20_reports_what_its_svd_form_removes():
    from dprp_surgery import svd_layers
    from dprp_surgery.export import export
    from dprp_surgery.models import resnet20

    torch.manual_seed(0)
    fact = factorize(resnet20(), DPRPConfig(min_compressible=None)).eval()
    for _, layer in svd_layers(fact):
        layer.truncate_(max(1, layer.rank // 4))
    x = torch.zeros(1, 3, 32, 32)
    svd, exported = summarize(fact, x), summarize(export(fact, "factorized"), x)
    assert len(exported.rows) == len(svd.rows) == 20
    assert exported.dense_params == svd.dense_params and exported.dense_macs == svd.dense_macs
    assert exported.params_removed == pytest.approx(svd.params_removed, abs=0.002) and svd.params_removed > 0.7
    assert exported.macs_removed == pytest.approx(svd.macs_removed)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = self.conv(self.conv(x))  # the same layer twice, as in weight-shared or recurrent blocks
        return self.fc(y.flatten(1))


def _true_macs(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("scheme", ["paper", "channel"])
def test_a_layer_called_twice_counts_every_call(scheme):
    from dprp_surgery import export

    torch.manual_seed(0)
    dense = CalledTwice().eval()
    x = torch.randn(1, 4, 8, 8)
    fact = factorize(dense, DPRPConfig(scheme=scheme, min_compressible=None))
    fact.conv.truncate_(2)
    s = summarize(fact, x)
    deployed = export(fact, "factorized")
    assert s.dense_macs == _true_macs(dense, x)
    assert s.macs == _true_macs(deployed, x)
    exported = summarize(deployed, x)
    assert (exported.dense_macs, exported.macs) == (s.dense_macs, s.macs)


class LatentQuery(nn.Module):
    """A learnt query expanded over the batch and fed to a Linear, as in a ViT's attention pool."""

    def __init__(self):
        super().__init__()
        self.latent = nn.Parameter(torch.randn(1, 2, 8))
        self.q = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.q(self.latent.expand(x.shape[0], -1, -1)).mean(1) + x)


@pytest.mark.parametrize("factorized", [False, True])
def test_a_parameter_view_as_layer_input_is_counted(factorized):
    model = LatentQuery()
    if factorized:
        model = factorize(model, DPRPConfig(min_compressible=None))
    s = summarize(model, torch.zeros(1, 8))
    assert s.dense_macs == 2 * 8 * 8 + 8 * 3  # two latent tokens through q, one vector through fc
    assert s.dense_params == 1 * 2 * 8 + (8 * 8 + 8) + (8 * 3 + 3)
    assert all(p.requires_grad for p in model.parameters())  # left trainable as it was


@pytest.mark.parametrize(("layer", "shape", "params", "macs"), [
    (nn.Conv3d(3, 8, 3, padding=1), (1, 3, 4, 6, 6), 8 * 3 * 27 + 8, 8 * 3 * 27 * (4 * 6 * 6)),
    (nn.ConvTranspose2d(3, 8, 3, stride=2), (1, 3, 6, 6), 3 * 8 * 9 + 8, 3 * 8 * 9 * (6 * 6)),  # per input pixel
], ids=["Conv3d", "ConvTranspose2d"])
@pytest.mark.parametrize("factorized", [False, True])
def test_unsupported_convolutions_get_rows(layer, shape, params, macs, factorized):
    """Conv3d and transposed convs are not factorized, but their parameters and MACs are listed, not lost."""
    model = nn.Sequential(layer, nn.Flatten(2), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4))
    if factorized:
        model = factorize(model, DPRPConfig(min_compressible=None))
    s = summarize(model, torch.randn(shape))
    rows = {r.name: r for r in s.rows}
    assert set(rows) == {"0", "4"}
    row = rows["0"]
    assert row.kind == type(layer).__name__
    assert (row.dense_params, row.params, row.dense_macs, row.macs) == (params, params, macs, macs)
    if factorized:
        assert row.status == "skipped" and "is not supported" in row.note
    else:
        assert row.status == "dense" and row.note is None
    assert s.dense_params == params + 8 * 4 + 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_summary_of_a_model_in_another_dtype(dtype):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    reference = summarize(factorize(dense), torch.randn(1, 3, 8, 8))
    f = factorize(dense.to(dtype))
    got = summarize(f, torch.randn(1, 3, 8, 8, dtype=dtype))
    assert (got.params, got.dense_params, got.macs, got.dense_macs) == (
        reference.params, reference.dense_params, reference.macs, reference.dense_macs)


def test_summarize_of_a_non_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"summarize\(\) takes an nn.Module as its model, got str"):
        summarize("m", torch.randn(1, 3))


@pytest.mark.parametrize(("reference", "now", "text"), [
    (100, 80, "20.0% smaller"), (100, 101, "1.0% larger"), (100, 100, "unchanged"), (0, 5, "-"),
])
def test_size_changes_are_said_in_words(reference, now, text):
    from dprp_surgery._format import size_change

    assert size_change(reference, now) == text


def test_the_summary_table_says_whether_the_model_grew_or_shrank():
    import io

    from rich.console import Console

    model = factorize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)),
                      DPRPConfig(scheme="channel", min_compressible=None))
    buf = io.StringIO()
    Console(file=buf, width=250).print(summarize(model, torch.randn(1, 3, 6, 6)).to_table())  # full rank: larger
    footer = next(line for line in buf.getvalue().splitlines() if "total" in line)
    assert "larger)" in footer and "%" in footer and "+" not in footer and "-0" not in footer


class _Attention(nn.Module):
    """q, k, v projections and scaled_dot_product_attention, as timm's ViT blocks with fused_attn."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_scaled_dot_product_attention_is_counted():
    # counted 0 MACs on CPU (no counter formula for the flash kernel): a ViT's totals were 14% short
    n, d, heads = 5, 8, 2
    macs = n * d * 3 * d + 2 * heads * n * n * (d // heads)  # qkv projection, then q k^T and attn v
    summary = summarize(_Attention(d, heads), torch.randn(1, n, d))
    assert summary.dense_macs == summary.macs == macs


class _SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def test_multihead_attention_is_counted_in_eval_mode():
    # eval mode without gradients took nn.MultiheadAttention's fused fast path, which counted 0 MACs
    n, d, heads = 5, 8, 2
    model = _SelfAttention(d, heads)
    macs = n * d * 3 * d + 2 * heads * n * n * (d // heads) + n * d * d  # in_proj, attention, out_proj
    fastpath = torch.backends.mha.get_fastpath_enabled()
    assert summarize(model, torch.randn(1, n, d)).dense_macs == macs
    assert torch.backends.mha.get_fastpath_enabled() == fastpath  # restored


@pytest.mark.parametrize("where", ["summarize", "compress"])
def test_an_uninitialised_lazy_layer_is_named(where):
    # a raw "Attempted to use an uninitialized parameter" from the parameter counts (factorize skips the layer)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"layer '2' \(LazyLinear\) is not initialised yet; run one forward pass"):
        if where == "summarize":
            summarize(model, torch.randn(1, 3, 6, 6))
        else:
            from dprp_surgery import compress

            data = torch.utils.data.TensorDataset(torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 0, 1]))
            compress(model, DPRPConfig(epochs=1, batch_size=2, device="cpu"), data)
    assert isinstance(model[2], nn.LazyLinear) and model[2].has_uninitialized_params()  # left as it was
