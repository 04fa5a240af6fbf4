"""Export of factorized models: dense/factorized/auto forms, pickle-free artifacts, ONNX and .pt2."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dprp_surgery import DPRPConfig, factorize, summarize, svd_layers
from dprp_surgery.accounting import count_params
from dprp_surgery.export import export, layer_forms, load, save, to_onnx, to_pt2
from dprp_surgery.layers import SVDLayer
from dprp_surgery.models import resnet20


class SmallCNN(nn.Module):
    """Convs of every flavour the realisations distinguish (paper orders, groups, padding modes)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)  # depthwise-first
        self.c3 = nn.Conv2d(32, 4, 3, padding=1, bias=False)  # pointwise-first (few outputs, no bias)
        self.c4 = nn.Conv2d(4, 8, 3, padding=1, groups=2, padding_mode="reflect")
        self.c5 = nn.Conv2d(8, 8, (3, 5), padding="same")
        self.seq = nn.Conv1d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = torch.relu(self.c4(x))
        x = self.c5(x)
        x = self.seq(x.flatten(2)).mean(-1)
        return self.fc(x)


def _compressed(model: nn.Module, scheme: str = "paper", keep: float = 0.4) -> nn.Module:
    """Factorize and truncate every other layer (the rest stay at full rank)."""
    f = factorize(model, DPRPConfig(scheme=scheme, min_compressible=None)).eval()
    for i, (_, layer) in enumerate(svd_layers(f)):
        if i % 2 == 0:
            layer.truncate_(max(1, int(layer.rank * keep)))
    return f


@pytest.fixture(scope="module")
def r20() -> nn.Module:
    torch.manual_seed(0)
    return _compressed(resnet20())


@pytest.mark.parametrize("scheme", ["paper", "channel", "spatial"])
def test_small_cnn_modes_and_conversions(scheme):
    torch.manual_seed(1)
    model = _compressed(SmallCNN(), scheme)
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outs = {}
    for mode in ("dense", "factorized", "auto"):
        e = export(model, mode)
        assert not any(isinstance(m, SVDLayer) for m in e.modules())
        torch.testing.assert_close(e(x), ref, atol=1e-5, rtol=1e-4)
        outs[mode] = e
    # forms convert into each other exactly (factorized -> dense -> factorized)
    back = export(export(outs["factorized"], "dense"), "factorized")
    torch.testing.assert_close(back(x), ref, atol=1e-5, rtol=1e-4)
    assert {n: e["spec"]["rank"] for n, e in layer_forms(back).items()} == {n: m.rank for n, m in svd_layers(model)}
    # the input is untouched
    assert all(isinstance(m, SVDLayer) for _, m in svd_layers(model)) and len(svd_layers(model)) == 7
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_paper_realisations_cover_both_orders():
    model = _compressed(SmallCNN(), "paper", keep=1.0)
    e = export(model, "factorized")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(e(x), model(x), rtol=1e-5, atol=1e-5)
    for name, order in (("c2", "depthwise_first"), ("c3", "pointwise_first")):
        layer = model.get_submodule(name)
        assert layer._paper_order() == order
        convs = [m for m in e.get_submodule(name) if isinstance(m, torch.nn.Conv2d)]
        spatial = convs[0] if order == "depthwise_first" else convs[1]
        # the r basis filters are stored once (channels folded into the batch): in 1 -> r, or r -> 1
        assert tuple(spatial.weight.shape[:2]) == ((layer.rank, 1) if order == "depthwise_first" else (1, layer.rank))
        h, w = layer.matrix_shape  # Sigma folded into U: eq. (4) minus the r singular values
        bias = layer.bias.numel() if layer.bias is not None else 0
        assert sum(p.numel() for p in e.get_submodule(name).parameters()) == layer.rank * (h + w) + bias


def test_dense_export_loads_into_original_architectures():
    import timm
    import torchvision

    x = torch.randn(1, 3, 64, 64)
    for fresh_fn in (lambda: timm.create_model("resnet18"), lambda: torchvision.models.resnet18()):
        torch.manual_seed(0)
        f = factorize(fresh_fn(), DPRPConfig(include=("layer3.0.downsample.0", "layer4.1.conv1", "fc"))).eval()
        for _, layer in svd_layers(f):
            layer.truncate_(max(1, layer.rank // 4))
        dense = export(f, "dense")
        fresh = fresh_fn().eval()
        fresh.load_state_dict(dense.state_dict(), strict=True)
        torch.testing.assert_close(fresh(x), f(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["dense", "factorized", "auto"])
def test_artifact_round_trip(r20, mode, tmp_path):
    x = torch.randn(3, 3, 32, 32)
    e = export(r20, mode, objective="macs", example_inputs=x[:1])
    path = save(e, tmp_path / "art", config=DPRPConfig(), input_size=(3, 32, 32))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["arch"] == "cifar:resnet20" and manifest["num_classes"] == 10
    assert set(manifest["layers"]) == {n for n, _ in svd_layers(r20)}
    assert manifest["config"]["scheme"] == "paper"
    loaded = load(path)
    torch.testing.assert_close(loaded(x), r20(x), atol=1e-5, rtol=1e-4)
    assert {n: v["form"] for n, v in layer_forms(loaded).items() if v["form"] != "dense"} == {
        n: v["form"] for n, v in layer_forms(e).items() if v["form"] != "dense"}
    # an artifact re-exports into any form
    torch.testing.assert_close(export(loaded, "dense")(x), r20(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["dense", "factorized"])
def test_artifact_keeps_mixed_dtypes(r20, mode, tmp_path):
    """A half-precision model with float32 BatchNorm comes back with every tensor in its saved dtype."""
    e = export(r20, mode).half()
    for m in e.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.float()
    loaded = load(save(e, tmp_path / "art"))
    want = {k: v.dtype for k, v in e.state_dict().items()}
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == want
    assert torch.float32 in want.values() and torch.float16 in want.values()
    for k, v in e.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_svd_form_artifact_and_overwrite(r20, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    path = save(r20, tmp_path / "art")
    save(r20, path)  # replacing an artifact is fine
    loaded = load(path)
    assert {n: m.rank for n, m in svd_layers(loaded)} == {n: m.rank for n, m in svd_layers(r20)}
    torch.testing.assert_close(loaded(x), r20(x))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind


def test_auto_is_never_worse_than_dense(r20):
    x = torch.randn(1, 3, 32, 32)
    dense, fact = export(r20, "dense"), export(r20, "factorized")
    auto_p = export(r20, "auto", objective="params")
    assert count_params(auto_p) <= count_params(dense) and count_params(auto_p) <= count_params(fact)
    auto_m = export(r20, "auto", objective="macs", example_inputs=x)
    macs = {k: summarize(m, x).macs for k, m in (("dense", dense), ("fact", fact), ("auto", auto_m))}
    assert macs["auto"] <= macs["dense"] and macs["auto"] <= macs["fact"]
    forms = {v["form"] for v in layer_forms(auto_m).values()}
    assert forms == {"dense", "factorized"}  # full-rank layers stay dense, truncated ones factorize
    auto_t = export(r20, "auto", objective="latency", example_inputs=x)
    torch.testing.assert_close(auto_t(x), r20(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("whole_model_faster", [True, False])
def test_auto_latency_checks_the_assembled_model(r20, monkeypatch, whole_model_faster):
    """Layer timings say factorized wins everywhere; the whole-model timing decides whether that stands."""
    import importlib

    export_module = importlib.import_module("dprp_surgery.export")  # the module, not the package's export()

    calls = []

    def fake_latencies(modules, shape, runs=9, warmup_s=0.02, inputs=None):
        calls.append("model" if inputs is not None else "layer")
        if inputs is None:
            return [2.0, 1.0]  # (dense, factorized): factorized faster
        return [2.0, 1.0] if whole_model_faster else [1.0, 1.5]  # (all dense, mixed)

    monkeypatch.setattr(export_module, "_latencies", fake_latencies)
    x = torch.randn(1, 3, 32, 32)
    auto = export(r20, "auto", objective="latency", example_inputs=x)
    assert calls.count("model") == 1 and calls.count("layer") == len(svd_layers(r20))
    forms = {v["form"] for v in layer_forms(auto).values()}
    assert forms == ({"factorized"} if whole_model_faster else {"dense"})
    torch.testing.assert_close(auto(x), r20(x), atol=1e-5, rtol=1e-4)
    n_auto, n_dense = (sum(p.numel() for p in m.parameters()) for m in (auto, export(r20, "dense")))
    assert (n_auto < n_dense) if whole_model_faster else (n_auto == n_dense)  # r20 is truncated: factorized is smaller


@pytest.mark.parametrize("winner", ["dense", "factorized", "mixed", "tie"])
def test_auto_latency_keeps_the_fastest_whole_model(r20, monkeypatch, winner):
    """Layer timings give a mix; the assembled mix, all-dense and all-factorized models are timed together, and
    a model less than 1 / LATENCY_MARGIN faster than dense ("tie": 3% faster) leaves the model dense."""
    import importlib

    export_module = importlib.import_module("dprp_surgery.export")
    layer_calls, model_calls = [], []

    def fake_latencies(modules, shape, runs=9, warmup_s=0.02, inputs=None):
        if inputs is None:
            layer_calls.append(shape)
            return [1.0, 2.0] if len(layer_calls) % 2 else [2.0, 1.0]  # dense wins on odd layers
        model_calls.append(len(modules))
        return {"dense": [1.0, 2.0, 3.0], "factorized": [2.0, 1.0, 3.0], "mixed": [2.0, 3.0, 1.0],
                "tie": [1.0, 2.0, 0.97]}[winner]

    monkeypatch.setattr(export_module, "_latencies", fake_latencies)
    x = torch.randn(1, 3, 32, 32)
    auto = export(r20, "auto", objective="latency", example_inputs=x)
    assert model_calls == [3]  # (all dense, all factorized, mixed)
    forms = [v["form"] for v in layer_forms(auto).values()]
    if winner == "mixed":
        assert forms == ["dense" if i % 2 == 0 else "factorized" for i in range(len(forms))]
    else:
        assert set(forms) == {"dense" if winner == "tie" else winner}
    torch.testing.assert_close(auto(x), r20(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("factorized_time", "expected"), [(0.97, "dense"), (0.90, "factorized")])
def test_auto_latency_tries_all_factorized_when_every_layer_chose_dense(r20, monkeypatch, factorized_time, expected):
    import importlib

    export_module = importlib.import_module("dprp_surgery.export")
    model_calls = []

    def fake_latencies(modules, shape, runs=9, warmup_s=0.02, inputs=None):
        if inputs is None:
            return [1.0, 2.0]  # every layer: dense faster
        model_calls.append(len(modules))
        return [factorized_time, 1.0]  # (all factorized, the mix = all dense)

    monkeypatch.setattr(export_module, "_latencies", fake_latencies)
    x = torch.randn(1, 3, 32, 32)
    auto = export(r20, "auto", objective="latency", example_inputs=x)
    assert model_calls == [2]
    assert {v["form"] for v in layer_forms(auto).values()} == {expected}
    torch.testing.assert_close(auto(x), r20(x), atol=1e-5, rtol=1e-4)


def test_export_argument_errors(r20):
    with pytest.raises(ValueError, match="mode='sparse'|mode=.sparse"):
        export(r20, "sparse")
    with pytest.raises(ValueError, match="example_inputs"):
        export(r20, "auto", objective="macs")
    with pytest.raises(ValueError, match="objective"):
        export(r20, "auto", objective="energy")


@pytest.mark.parametrize("mode", ["dense", "factorized"])
def test_onnx_parity(r20, mode, tmp_path):
    import onnxruntime as ort

    e = export(r20, mode)
    path = to_onnx(e, tmp_path / f"{mode}.onnx", torch.randn(1, 3, 32, 32))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)  # a different batch size than exported with
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, e(x).detach().numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("external", [False, True])
def test_graph_exports_record_what_running_them_needs(monkeypatch, tmp_path, external):
    # ONNX and .pt2 files said nothing of the input size or normalisation their model expects
    import json

    import onnxruntime as ort

    if external:
        monkeypatch.setattr(importlib.import_module("dprp_surgery.export"), "ONNX_INLINE_LIMIT", 0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    meta = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    path = to_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 6), metadata=meta)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    recorded = json.loads(session.get_modelmeta().custom_metadata_map["dprp"])
    assert recorded["input_size"] == [3, 8, 6] and recorded["mean"] == meta["mean"] and "dprp_surgery" in recorded
    x = torch.randn(2, 3, 8, 6)
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).detach().numpy(), atol=1e-5)
    extra = {"dprp.json": ""}
    torch.export.load(str(to_pt2(model, tmp_path / "m.pt2", torch.randn(1, 3, 8, 6), metadata=meta)),
                      extra_files=extra)
    assert json.loads(extra["dprp.json"]) == recorded


@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_load_onnx_runs_like_the_model(r20, tmp_path, dynamic_batch):
    from dprp_surgery.export import OnnxRuntimeModel, load_onnx

    e = export(r20, "factorized")
    path = to_onnx(e, tmp_path / "m.onnx", torch.randn(1, 3, 32, 32), dynamic_batch=dynamic_batch,
                   metadata={"params": 7})
    model = load_onnx(path, threads=1)
    assert isinstance(model, OnnxRuntimeModel) and not model.training and list(model.parameters()) == []
    assert model.fixed_batch == (None if dynamic_batch else 1) and model.input_shape[1:] == [3, 32, 32]
    assert model.num_classes == 10 and model.metadata["params"] == 7 and model.metadata["input_size"] == [3, 32, 32]
    x = torch.randn(5, 3, 32, 32)  # a batch the fixed-batch graph is run over in slices of 1
    torch.testing.assert_close(model(x), e(x).detach(), atol=1e-4, rtol=1e-4)
    assert model.eval() is model
    with pytest.raises(NotImplementedError, match="cannot be trained"):
        model.train()
    with pytest.raises(ValueError, match=r"takes 1 input\(s\) \(input\), got 2"):
        model(x, x)
    with pytest.raises(ValueError, match=r"onnxruntime cannot run .*m\.onnx' on input \(5, 3, 16, 16\)"):
        model(torch.randn(5, 3, 16, 16))


def test_load_onnx_a_graph_with_several_outputs_returns_a_tuple(tmp_path):
    from dprp_surgery.export import load_onnx

    model = _TwoHeads().eval()
    x = torch.randn(2, 3, 8, 8)
    got = load_onnx(to_onnx(model, tmp_path / "two.onnx", x))(x)
    ref = model(x)
    assert isinstance(got, tuple) and len(got) == 2
    torch.testing.assert_close(got[0], ref["out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref["aux"], atol=1e-5, rtol=1e-5)


def test_load_onnx_feeds_each_input_its_own_type(tmp_path):
    # every input was cast to float32: a float16 graph could never run
    from dprp_surgery.export import load_onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).half().eval()
    x = torch.randn(2, 3, 8, 8)
    got = load_onnx(to_onnx(model, tmp_path / "half.onnx", x.half()))(x)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), model(x.half()).float(), atol=2e-3, rtol=2e-3)


def test_load_onnx_a_fixed_batch_graph_takes_an_empty_batch(tmp_path):
    from dprp_surgery.export import load_onnx

    model = load_onnx(to_onnx(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), tmp_path / "f.onnx",
                              torch.zeros(4, 3, 2, 2), dynamic_batch=False))
    assert model.fixed_batch == 4 and model(torch.zeros(0, 3, 2, 2)).shape == (0, 3)
    assert model(torch.zeros(6, 3, 2, 2)).shape == (6, 3)


def test_load_onnx_names_the_file_it_cannot_use(tmp_path, monkeypatch):
    from dprp_surgery.export import load_onnx

    with pytest.raises(ValueError, match=r"ONNX file .*nothere\.onnx' does not exist"):
        load_onnx(tmp_path / "nothere.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07onnx")
    with pytest.raises(ValueError, match=r"cannot read .*junk\.onnx' as an ONNX model"):
        load_onnx(junk)
    monkeypatch.setattr(importlib.import_module("dprp_surgery.export"), "ONNX_INLINE_LIMIT", 0)
    path = to_onnx(nn.Conv2d(3, 4, 3), tmp_path / "ext.onnx", torch.randn(1, 3, 8, 8))
    moved = tmp_path / "moved"
    moved.mkdir()
    link = moved / "link.onnx"  # a link to the file: its weights lie beside the file, not the link
    link.symlink_to(path)
    torch.testing.assert_close(load_onnx(link)(torch.ones(1, 3, 8, 8)).shape, torch.Size([1, 4, 6, 6]))
    renamed = moved / "renamed.onnx"  # renamed with its weights file: the graph still names ext.onnx.data
    shutil.copy(path, renamed)
    shutil.copy(tmp_path / "ext.onnx.data", moved / "renamed.onnx.data")
    with pytest.raises(ValueError, match=r"renamed\.onnx' keeps its weights in 'ext\.onnx\.data', which is not in"):
        load_onnx(renamed)
    (tmp_path / "ext.onnx.data").unlink()  # the weights file that must travel with it
    with pytest.raises(ValueError, match=r"ext\.onnx' keeps its weights in 'ext\.onnx\.data'.*put that file beside"):
        load_onnx(path)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.onnx' is empty"):
        load_onnx(empty)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        h = self.body(x)
        return {"out": self.a(h), "aux": self.b(h)}


@pytest.mark.parametrize("factorized", [False, True])
def test_onnx_outputs_of_a_model_with_several_are_named_in_order(tmp_path, factorized):
    # the second output got an op name (conv2d_1, or conv2d_3 for the factorized copy): not stable, not documented
    import onnxruntime as ort

    model = _TwoHeads().eval()
    model = factorize(model).eval() if factorized else model
    session = ort.InferenceSession(str(to_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))),
                                   providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["output", "output_1"]
    x = torch.randn(2, 3, 8, 8)
    got = session.run(None, {"input": x.numpy()})
    want = model(x)
    for g, key in zip(got, ("out", "aux")):
        np.testing.assert_allclose(g, want[key].detach().numpy(), atol=1e-5)


def test_pt2_round_trip(r20, tmp_path):
    e = export(r20, "factorized")
    path = to_pt2(e, tmp_path / "m.pt2", torch.randn(1, 3, 32, 32))
    program = torch.export.load(str(path))
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(program.module()(x), e(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("writer", ["pt2", "onnx"])
def test_a_model_with_svd_linear_layers_exports_with_a_dynamic_batch(writer, tmp_path):
    torch.manual_seed(0)
    f = factorize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))).eval()
    x1 = torch.randn(1, 3, 8, 8)
    if writer == "pt2":
        run = torch.export.load(str(to_pt2(f, tmp_path / "f.pt2", x1))).module()
    else:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(to_onnx(f, tmp_path / "f.onnx", x1)), providers=["CPUExecutionProvider"])
        def run(x):
            return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    for batch in (1, 5, 64):  # SVDLinear's eager path choice depends on the batch; the program's must not
        x = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(run(x), f(x), atol=1e-4, rtol=1e-4)


class _Fails(nn.Module):
    def forward(self, x):
        raise RuntimeError("cannot trace this")


@pytest.mark.parametrize("writer", [to_pt2, to_onnx])
def test_graph_export_is_atomic_and_keeps_training_mode(writer, tmp_path):
    ok = nn.Linear(3, 2).train()
    path = writer(ok, tmp_path / "ok.bin", torch.randn(1, 3))
    assert path == tmp_path / "ok.bin" and path.stat().st_size > 0 and ok.training
    bad = _Fails().train()
    with pytest.raises(Exception, match="cannot trace this"):
        writer(bad, tmp_path / "bad.bin", torch.randn(1, 3))
    assert bad.training and sorted(p.name for p in tmp_path.iterdir()) == ["ok.bin"]  # no target, no temp file


def test_onnx_external_data_travels_with_the_file(monkeypatch, tmp_path):
    import shutil

    import onnxruntime as ort

    export_module = importlib.import_module("dprp_surgery.export")  # the package re-exports a function `export`
    monkeypatch.setattr(export_module, "ONNX_INLINE_LIMIT", 0)  # as for a model over 1 GiB
    model = nn.Linear(3, 2)
    to_onnx(model, tmp_path / "out" / "m.onnx", torch.randn(1, 3))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx", "m.onnx.data"]
    shutil.move(tmp_path / "out", tmp_path / "moved")  # the pair still loads after it is moved
    session = ort.InferenceSession(str(tmp_path / "moved" / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3)
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).detach().numpy(), atol=1e-6)

def test_bad_artifacts(r20, tmp_path, without_manifest_hash):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nope")
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="manifest.json.*missing"):
        load(tmp_path / "empty")
    path = without_manifest_hash(save(export(r20, "factorized"), tmp_path / "art"))
    manifest = (path / "manifest.json").read_text()
    weights = (path / "model.safetensors").read_bytes()

    (path / "manifest.json").write_text(manifest[:50])
    with pytest.raises(ValueError, match="manifest.json.*corrupt"):
        load(path)
    (path / "manifest.json").write_text(manifest)

    (path / "model.safetensors").write_bytes(weights[:-100] + b"\x00" * 100)
    with pytest.raises(ValueError, match="model.safetensors.*corrupt"):
        load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors.*missing"):
        load(path)
    (path / "model.safetensors").write_bytes(weights)

    # intact files that do not belong together: another form's weights, with their own checksum
    other = without_manifest_hash(save(export(r20, "dense"), tmp_path / "other"))
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    m = json.loads(manifest)
    m["sha256"] = json.loads((other / "manifest.json").read_text())["sha256"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"model.safetensors.*does not fit.*\d+ missing keys \(first: .*re-export"):
        load(path)
    (path / "model.safetensors").write_bytes(weights)
    (path / "manifest.json").write_text(manifest)

    m = json.loads(manifest)
    m["layers"]["layer9.conv"] = m["layers"].pop("layer1.0.conv1")
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="layer9.conv"):
        load(path)

    m = json.loads(manifest)
    m["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="upgrade"):
        load(path)

    m["format_version"] = 1  # paper-scheme convs of format 1 repeat the basis filters per channel
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"layer 'conv1'.*format_version 1.*re-export"):
        load(path)


def test_save_needs_a_rebuildable_arch(tmp_path):
    import torchvision

    model = factorize(torchvision.models.resnet18(num_classes=3), DPRPConfig(include=("fc",)))
    with pytest.raises(ValueError, match="arch="):
        save(model, tmp_path / "a")
    path = save(model, tmp_path / "a", arch="torchvision:resnet18")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(load(path)(x), model.eval()(x))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save(model, tmp_path / "other", arch="torchvision:resnet18")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("mode", ["dense", "factorized", "auto", "svd"])
def test_a_replaced_layer_loads_with_its_own_hyper_parameters_in_every_form(tmp_path, mode):
    torch.manual_seed(0)
    model = resnet20().eval()
    model.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=2, dilation=2, bias=False)  # the weights' shape is the same
    factorized = factorize(model, DPRPConfig(scheme="spatial"))
    exported = factorized if mode == "svd" else export(factorized, mode)  # "svd": the trainable SVD layers
    path = save(exported, tmp_path / mode)
    loaded = load(path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), exported.eval()(x), rtol=1e-5, atol=1e-5)
    if mode == "dense":  # the same type and hyper-parameters as the layer saved, not the architecture's own conv1
        assert type(loaded.conv1) is nn.Conv2d and (loaded.conv1.stride, loaded.conv1.dilation) == ((2, 2), (2, 2))


@pytest.mark.parametrize("scheme", ["paper", "channel"])
def test_export_keeps_frozen_weights_and_trainable_biases_apart(scheme):
    """BitFit-style: weights frozen, biases trained; every form keeps both flags, and re-exports too."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    for layer in (model[0], model[2]):
        layer.weight.requires_grad_(False)
    factorized = factorize(model, DPRPConfig(scheme=scheme, min_compressible=None))

    def flags(m: nn.Module) -> dict[str, set[bool]]:
        out: dict[str, set[bool]] = {"weights": set(), "bias": set()}
        for name, p in m.named_parameters():
            out["bias" if name.endswith("bias") else "weights"].add(p.requires_grad)
        return out

    assert flags(factorized) == {"weights": {False}, "bias": {True}}
    x = torch.randn(1, 3, 6, 6)
    for mode in ("dense", "factorized", "auto"):
        exported = export(factorized, mode, example_inputs=x)
        assert flags(exported) == {"weights": {False}, "bias": {True}}, mode
        for again in ("dense", "factorized"):  # from one exported form to another
            assert flags(export(exported, again)) == {"weights": {False}, "bias": {True}}, (mode, again)
    frozen = export(factorized, "factorized")
    for p in frozen.parameters():
        p.requires_grad_(False)
    assert flags(export(frozen, "dense")) == {"weights": {False}, "bias": {False}}  # not made trainable again


class KeywordCalls(nn.Module):
    """Layers called as nn.Linear/nn.Conv2d allow, with the input by keyword (`input=`) or by position."""

    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.keyword = keyword
        self.c = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if self.keyword:
            return self.fc(input=self.c(input=x).mean((2, 3)))
        return self.fc(self.c(x).mean((2, 3)))


def test_layers_called_with_input_by_keyword():
    x = torch.randn(2, 3, 8, 8)
    results = {}
    for keyword in (False, True):
        torch.manual_seed(0)
        model = KeywordCalls(keyword).eval()
        factorized = factorize(model, DPRPConfig(min_compressible=None))
        torch.testing.assert_close(factorized(x), model(x), rtol=1e-4, atol=1e-5)  # was a TypeError
        rows = summarize(factorized, x).rows  # was an IndexError, even for the dense model
        forms = {}
        for objective in ("macs", "latency"):  # the layer's input shape was not seen: params decided silently
            exported = export(factorized, "auto", objective=objective, example_inputs=x)
            torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)
            forms[objective] = {n: e["form"] for n, e in layer_forms(exported).items()}
        results[keyword] = ([(r.name, r.macs, r.params) for r in rows], forms["macs"], summarize(model, x).macs)
    assert results[True] == results[False]


def test_export_warns_about_hooks_it_cannot_carry():
    model = factorize(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hooks: no warning
        export(model, "dense")
    calls = []
    model[2].register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    with pytest.warns(UserWarning, match=r"layer '2' has forward hooks.*get_submodule\('2'\)"):
        exported = export(model, "factorized")
    exported(torch.randn(1, 8))
    assert calls == []  # indeed not carried: the warning is the user's only sign


@pytest.mark.parametrize("mode", ["factorized", "auto"])
def test_re_exporting_dense_weights_trained_after_export_warns(mode):
    torch.manual_seed(0)
    model = factorize(nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)))
    for _, layer in svd_layers(model):
        layer.truncate_(2)
    dense = export(model, "dense")
    x = torch.randn(1, 4, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exported weights are exactly of the recorded rank: no warning
        export(dense, mode, example_inputs=x)
    with torch.no_grad():
        dense[2].weight.add_(0.1 * torch.randn_like(dense[2].weight))  # as a fine-tune of the dense export would
    with pytest.warns(UserWarning, match=r"layer '2' \(dense form, recorded rank 2\).*changes the weight by"):
        export(dense, mode, example_inputs=x)


def test_an_artifact_that_no_longer_fits_names_the_library_version_it_was_saved_with(tmp_path, monkeypatch):
    import timm
    from timm.models.resnet import BasicBlock, ResNet

    from dprp_surgery import io as io_module

    export_module = importlib.import_module("dprp_surgery.export")
    model = timm.create_model("test_resnet", num_classes=3).eval()
    path = save(export(factorize(model, DPRPConfig(include=("fc",))), "factorized"), tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["arch"] == "timm:test_resnet" and manifest["arch_library_version"] == timm.__version__
    torch.testing.assert_close(load(path)(torch.randn(1, 3, 32, 32)).shape, torch.Size([1, 3]))
    # a newer timm whose test_resnet is built differently (here: wider), the version the artifact was saved with
    real_build = io_module.build_arch
    monkeypatch.setattr(export_module, "_arch_library_version", lambda arch: "99.0")
    hint = rf"saved with timm {re.escape(timm.__version__)} and this is timm 99\.0.*load it with timm"
    for rebuilt, words in ((lambda arch, n=None: real_build("timm:test_convnext", n),
                            "lists layer 'fc', which timm:test_resnet does not have"),
                           (lambda arch, n=None: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=n),  # wider
                            "does not fit")):
        monkeypatch.setattr(io_module, "build_arch", rebuilt)
        with pytest.raises(ValueError, match=rf"{words}.*{hint}"):
            load(path)


class _WithSharedInput(nn.Module):
    """A second input without a batch dimension of its own (shared by every sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, offset):
        return self.fc(x) + offset


@pytest.mark.parametrize("batch", [1, 3])
def test_graph_exports_keep_only_the_batched_inputs_dynamic(tmp_path, batch):
    ort = pytest.importorskip("onnxruntime")
    model = export(factorize(_WithSharedInput(), DPRPConfig(min_compressible=None)), "factorized").eval()
    offset = torch.randn(4)
    example = (torch.randn(batch, 8), offset)
    session = ort.InferenceSession(str(to_onnx(model, tmp_path / "m.onnx", example_inputs=example)))
    program = torch.export.load(str(to_pt2(model, tmp_path / "m.pt2", example_inputs=example))).module()
    for n in (1, 5):  # any batch, the shared input unchanged
        x = torch.randn(n, 8)
        want = model(x, offset)
        feeds = {i.name: v.numpy() for i, v in zip(session.get_inputs(), (x, offset))}
        torch.testing.assert_close(torch.from_numpy(session.run(None, feeds)[0]), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(program(x, offset), want, rtol=1e-4, atol=1e-5)


def test_export_name_is_callable_whatever_the_import_order():
    import dprp_surgery
    import dprp_surgery.export as export_module
    from dprp_surgery import export as exported

    model = factorize(nn.Sequential(nn.Linear(8, 6)))
    for fn in (dprp_surgery.export, export_module, exported):
        out = fn(model, "dense")
        assert isinstance(out[0], nn.Linear)


def _tree(root) -> dict[str, str]:
    """Relative path -> text of every file under `root`."""
    return {str(p.relative_to(root)): p.read_text(errors="replace") for p in sorted(root.rglob("*")) if p.is_file()}


def test_save_never_deletes_a_directory_that_is_not_only_an_artifact(tmp_path):
    model = resnet20()
    web = tmp_path / "webapp"  # a manifest.json of another kind (a web app's) beside the user's files
    (web / "src").mkdir(parents=True)
    (web / "manifest.json").write_text(json.dumps({"name": "My PWA", "start_url": "/"}))
    (web / "index.html").write_text("<html>precious</html>")
    (web / "src" / "app.js").write_text("// lots of work")
    before = _tree(web)
    with pytest.raises(ValueError, match=r"refusing to overwrite '.*webapp'.*not a dprp artifact"):
        save(model, web)
    assert _tree(web) == before

    art = save(model, tmp_path / "art")  # a real artifact the user added a file to
    (art / "notes.txt").write_text("mine")
    before = _tree(art)
    with pytest.raises(ValueError, match=r"refusing to overwrite '.*art'.*notes\.txt"):
        save(model, art)
    assert _tree(art) == before

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"refusing to overwrite '.*afile'.*not a directory"):
        save(model, tmp_path / "afile")
    with pytest.raises(ValueError, match=r"'.*afile' is a file"):  # a parent that is a file
        save(model, tmp_path / "afile" / "sub")
    with pytest.raises(ValueError, match=r"'.*afile' is a file"):
        to_pt2(nn.Linear(3, 2), tmp_path / "afile" / "m.pt2", torch.randn(1, 3))
    assert (tmp_path / "afile").read_text() == "x"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_save_replaces_an_artifact_or_keeps_the_old_one(tmp_path, monkeypatch):
    import os

    x = torch.randn(2, 3, 32, 32)
    first, second = resnet20().eval(), resnet20().eval()
    art = save(first, tmp_path / "art")
    stale = tmp_path / f".art.old-{os.getpid()}"  # left by an earlier save that died (pids are reused)
    stale.mkdir()
    (stale / "model.safetensors").write_text("stale")
    save(second, art)
    torch.testing.assert_close(load(art)(x), second(x))
    assert not stale.exists()

    rename = os.rename

    def failing_rename(src, dst):
        if ".tmp-" in str(src):  # moving the new artifact into place fails
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)  # export.save moves directories with os.rename
    with pytest.raises(OSError, match="No space left"):
        save(first, art)
    monkeypatch.undo()
    torch.testing.assert_close(load(art)(x), second(x))  # the previous artifact is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_load_rejects_malformed_manifest_entries(tmp_path, without_manifest_hash):
    art = without_manifest_hash(save(resnet20(), tmp_path / "art"))
    manifest = json.loads((art / "manifest.json").read_text())
    for key, value, words in (("layers", {"conv1": "factorized"}, r"manifest\.json.*layer 'conv1'.*invalid entry"),
                              ("dtype", "nn", r"manifest\.json.*dtype 'nn'"),
                              ("weights", "../elsewhere.safetensors", r"manifest\.json.*'weights' must name a file "
                                                                      r"inside the artifact")):
        (art / "manifest.json").write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(ValueError, match=words):
            load(art)


@pytest.mark.parametrize("conv, x", [
    (nn.Conv2d(8, 16, 3, padding=1), torch.randn(8, 10, 10)),  # depthwise-first
    (nn.Conv2d(32, 2, 3, padding=1, bias=False), torch.randn(32, 10, 10)),  # pointwise-first
    (nn.Conv1d(8, 16, 3), torch.randn(8, 20)),
])
def test_paper_realisations_take_unbatched_input(conv, x):
    f = factorize(nn.Sequential(conv), DPRPConfig(scheme="paper", min_compressible=None)).eval()
    for _, layer in svd_layers(f):
        layer.truncate_(1)  # cheap enough that auto picks the factorized form
    ref = f(x)  # (C, *spatial) as nn.ConvNd and the SVD layer take it
    for mode in ("factorized", "auto"):
        e = export(f, mode)
        assert {v["form"] for v in layer_forms(e).values()} == {"factorized"}
        with torch.no_grad():
            torch.testing.assert_close(e(x), ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(e(x[None]), ref[None], atol=1e-5, rtol=1e-4)


def test_save_with_an_explicit_arch_that_does_not_rebuild_the_model_raises(tmp_path):
    import timm

    model = timm.create_model("resnet18", num_classes=10, global_pool="max")
    with pytest.raises(ValueError, match=r"arch='timm:resnet18' does not rebuild this model: .*global_pool"):
        save(model, tmp_path / "art", arch="timm:resnet18")
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"global_pool": "avg", "fc_norm": False}, r"attribute 'global_pool' is 'avg' in the model but 'token'"),
    ({"img_size": 32}, r"tensor 'pos_embed' is \(1, 5, 192\) in the model but \(1, 197, 192\)"),
])
def test_save_refuses_a_timm_model_built_with_arguments_its_name_cannot_rebuild(tmp_path, kwargs, words):
    """Arguments that change no module's repr: token pooling, or a pos_embed that could never be loaded back."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    exported = export(factorize(model, DPRPConfig(scheme="channel", include=("head",))), "dense")
    with pytest.raises(ValueError, match=r"looks like timm:vit_tiny_patch16_224.*" + words + r".*to_pt2"):
        save(exported, tmp_path / "art")
    assert not (tmp_path / "art").exists()


class _EncoderFastPath(nn.Module):
    """nn.TransformerEncoderLayer's inference fast path passes linear1.weight etc. to a fused kernel."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)

    def forward(self, x):
        return self.enc(x)


class _ReadsHyperParameters(nn.Module):
    """Reads a conv's kernel_size/stride and a layer's weight device/dtype, as timm DaViT and EdgeNeXt do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        pad = self.conv.kernel_size[0] - self.conv.stride[0]  # DaViT's Downsample
        y = self.conv(nn.functional.pad(x, (pad, 0, pad, 0))).mean((2, 3))
        return self.fc(y) + torch.ones(1, device=self.fc.weight.device, dtype=self.fc.weight.dtype)


class _UsesWeightUntraceable(nn.Module):
    """A forward that torch.fx cannot trace (module walk) and that calls F.linear with a layer's weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return nn.functional.linear(x.mean((2, 3)), self.fc.weight, self.fc.bias)


@pytest.mark.parametrize("mode", ["factorized", "auto"])
@pytest.mark.parametrize(("make", "shape"), [(_EncoderFastPath, (2, 5, 16)), (_ReadsHyperParameters, (2, 4, 9, 9)),
                                             (_UsesWeightUntraceable, (2, 3, 8, 8))],
                         ids=["encoder-fast-path", "reads-hyper-parameters", "uses-weight-untraceable"])
def test_factorized_export_serves_code_that_reads_layer_attributes(make, shape, mode):
    torch.manual_seed(0)
    model = make().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untraceable model's fallback warning
        f = factorize(model, DPRPConfig(min_compressible=None)).eval()
    for _, layer in svd_layers(f):
        layer.truncate_(1)  # cheap enough that auto picks the factorized form
    e = export(f, mode)
    assert {v["form"] for v in layer_forms(e).values()} == {"factorized"}
    x = torch.randn(shape)
    with torch.no_grad():  # the encoder's fast path runs in eval mode without gradients
        torch.testing.assert_close(e(x), f(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(export(e, "dense")(x), f(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["paper", "channel", "spatial"])
def test_float64_factorized_form_reexports_in_float64(scheme):
    """Converting a factorized-form layer back (to dense or SVD) keeps float64 precision."""
    torch.manual_seed(0)
    f = _compressed(SmallCNN().double(), scheme)
    fact = export(f, "factorized")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    want = f(x)
    for back in (export(fact, "dense"), export(export(fact, "dense"), "factorized")):
        torch.testing.assert_close(back(x), want, rtol=1e-10, atol=1e-10)
    dense = export(fact, "dense")
    for name, layer in svd_layers(f):
        torch.testing.assert_close(dense.get_submodule(name).weight, layer.dense_weight().detach(), rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("mode", ["svd", "dense", "factorized"])
def test_artifact_keeps_module_versions(mode, tmp_path):
    """torchvision's MNASNet refuses a state dict without its module version (state_dict()._metadata)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mnasnet0_5(weights=None).eval()
    f = factorize(model, DPRPConfig(include=("layers.0", "layers.3", "classifier.1"))).eval()
    e = f if mode == "svd" else export(f, mode)
    path = save(e, tmp_path / "art", arch="torchvision:mnasnet0_5")
    loaded = load(path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), e(x))
    assert {n: v["form"] for n, v in layer_forms(loaded).items()} == {n: v["form"] for n, v in layer_forms(e).items()}
    assert json.loads((path / "manifest.json").read_text())["module_versions"][""] == 2  # MNASNet._version


def test_artifact_without_module_versions_still_loads_and_bad_ones_are_refused(r20, tmp_path,
                                                                              without_manifest_hash):
    x = torch.randn(2, 3, 32, 32)
    path = without_manifest_hash(save(export(r20, "factorized"), tmp_path / "art"))
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["module_versions"]  # written before dprp_surgery recorded them
    (path / "manifest.json").write_text(json.dumps(manifest))
    torch.testing.assert_close(load(path)(x), r20(x), atol=1e-5, rtol=1e-4)
    manifest["module_versions"] = {"layer1": "two"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json.*'module_versions' must map module names to integer"):
        load(path)


def _edit_manifest(art, edit):
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize("edit", [
    lambda m: m["layers"]["conv1"]["spec"].__setitem__("scheme", "spatial"),  # same factor shapes as paper
    lambda m: m["layers"]["layer1.0.conv1"]["spec"].__setitem__("padding_mode", "reflect"),
    lambda m: m["layers"]["layer1.0.conv1"]["spec"].__setitem__("stride", [2, 2]),
    lambda m: m.__setitem__("num_classes", 100),
    lambda m: m.__setitem__("input_size", [3, 64, 64]),
], ids=["scheme", "padding_mode", "stride", "num_classes", "input_size"])
def test_an_edited_manifest_is_refused_instead_of_building_another_model(edit, tmp_path):
    torch.manual_seed(0)
    art = save(factorize(resnet20()), tmp_path / "art", input_size=[3, 32, 32])
    _edit_manifest(art, edit)
    with pytest.raises(ValueError, match=r"manifest\.json' was changed after the model was saved.*re-export"):
        load(art)


def test_a_manifest_without_its_weights_hash_is_refused(tmp_path):
    art = save(resnet20(), tmp_path / "art")
    _edit_manifest(art, lambda m: m.pop("sha256"))
    with pytest.raises(ValueError, match=r"manifest\.json' is corrupt: its 'sha256' entry .* is missing"):
        load(art)


@pytest.mark.parametrize(("key", "value", "words"), [
    ("format_version", None, r"'format_version' must be a positive integer, got None"),
    ("format_version", -1, r"'format_version' must be a positive integer, got -1"),
    ("input_size", 5, r"'input_size' must be a list of positive integers .* got 5"),
    ("input_size", "abc", r"'input_size' must be a list of positive integers .* got 'abc'"),
])
def test_malformed_manifest_values_of_an_older_artifact(key, value, words, tmp_path, without_manifest_hash):
    art = without_manifest_hash(save(resnet20(), tmp_path / "art"))
    _edit_manifest(art, lambda m: m.__setitem__(key, value) if value is not None else m.pop(key))
    with pytest.raises(ValueError, match=words):
        load(art)


def test_an_unknown_scheme_in_an_older_artifact_names_the_layer(tmp_path, without_manifest_hash):
    art = without_manifest_hash(save(factorize(resnet20()), tmp_path / "art"))
    _edit_manifest(art, lambda m: m["layers"]["conv1"]["spec"].__setitem__("scheme", "magic"))
    with pytest.raises(ValueError, match=r"layer 'conv1' has an invalid spec \(ValueError: unknown scheme 'magic'; "
                       r"use one of paper, channel, spatial\); re-export"):
        load(art)


def test_export_of_a_non_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"export\(\) takes an nn.Module as its model, got str"):
        export("model", "dense")


def _tiny():
    torch.manual_seed(0)
    return factorize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))).eval()


@pytest.mark.parametrize("call", [
    lambda m, p: summarize(m, torch.randn(1, 1, 8, 8)),
    lambda m, p: export(m, "auto", objective="macs", example_inputs=torch.randn(1, 1, 8, 8)),
    lambda m, p: to_onnx(m, p / "m.onnx", torch.randn(1, 1, 8, 8)),
    lambda m, p: to_pt2(m, p / "m.pt2", torch.randn(1, 1, 8, 8)),
], ids=["summarize", "export-auto", "onnx", "pt2"])
def test_example_inputs_the_model_cannot_take_are_named(call, tmp_path):
    with pytest.raises(ValueError, match=r"the model cannot run on example_inputs \(\(1, 1, 8, 8\) float32\): .*"
                                         r"channels and image size"):
        call(_tiny(), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [None, [torch.randn(1, 3, 8, 8)]], ids=["none", "list"])
@pytest.mark.parametrize("call", [
    lambda m, x, p: summarize(m, x),
    lambda m, x, p: to_onnx(m, p / "m.onnx", x),
    lambda m, x, p: to_pt2(m, p / "m.pt2", x),
], ids=["summarize", "onnx", "pt2"])
def test_example_inputs_of_the_wrong_type_are_type_errors(call, bad, tmp_path):
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor or a tuple of positional inputs, got"):
        call(_tiny(), bad, tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_saved_artifact_gets_the_umask_mode_like_any_new_file(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        art = save(resnet20().eval(), tmp_path / "art")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(art) == 0o777 & ~umask  # was 0700 (tempfile.mkdtemp) whatever the umask
    assert {mode(f) for f in art.iterdir()} == {0o666 & ~umask}


def test_every_public_name_resolves_and_load_onnx_is_one():
    # README pointed to dprp_surgery.export.load_onnx, but the package attribute `export` is the function
    import dprp_surgery
    from dprp_surgery.export import load_onnx

    assert all(getattr(dprp_surgery, name) is not None for name in dprp_surgery.__all__)
    assert dprp_surgery.load_onnx is load_onnx and "load_onnx" in dir(dprp_surgery)
