"""factorize(): function preservation on real architectures, fallback, selection and errors."""

from __future__ import annotations

import re
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

from dprp_surgery import DPRPConfig, FactorizationError, SVDLayer, factorize, surgery_report, svd_layers

MODELS = {
    "torchvision:resnet18": (lambda: torchvision.models.resnet18(), 64),
    "timm:resnet50": (lambda: timm.create_model("resnet50"), 64),
    "timm:vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224"), 224),
    "timm:convnext_atto": (lambda: timm.create_model("convnext_atto"), 64),
    "timm:mobilenetv3_small_100": (lambda: timm.create_model("mobilenetv3_small_100"), 64),
    "timm:efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), 64),
}


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("name", list(MODELS))
def test_factorize_preserves_function_on_real_architectures(name):
    make, size = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model(x)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for scheme in ("paper", "channel", "spatial"):
            fact = factorize(model, DPRPConfig(scheme=scheme))
            report = surgery_report(fact)
            assert report.traced, name
            assert len(report.factorized) >= 10
            assert max_relative_error(fact(x), want) <= 1e-5, (name, scheme)
            assert type(fact) is type(model)
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, SVDLayer) for m in model.modules())


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y.relu()
        return self.fc(y.mean((2, 3)))


def test_untraceable_model_falls_back_to_module_walk_with_one_warning():
    model = Untraceable().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"could not trace Untraceable \(first failing op: .*symbolically traced"):
        fact = factorize(model)
    report = surgery_report(fact)
    assert not report.traced
    assert set(report.factorized) == {"conv", "fc"}
    torch.testing.assert_close(fact(x), model(x), rtol=1e-4, atol=1e-6)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.alias = self.block  # the same module registered twice
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.alias(self.block(x)).mean((2, 3)))


def test_shared_module_stays_shared():
    model = Shared()
    fact = factorize(model)
    assert isinstance(fact.block, SVDLayer) and fact.block is fact.alias
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(fact(x), model(x), rtol=1e-4, atol=1e-6)
    assert len(svd_layers(fact)) == 2


class WSConv(nn.Conv2d):
    """A weight-standardising conv: a subclass with its own forward."""

    def forward(self, x):
        mean, std = self.weight.mean((1, 2, 3), keepdim=True), self.weight.std((1, 2, 3), keepdim=True)
        w = (self.weight - mean) / (std + 1e-5)
        return self._conv_forward(x, w, self.bias)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.ws = WSConv(3, 8, 3)
        self.conv = nn.Conv2d(8, 8, 3)
        self.tiny = nn.Linear(1, 1)  # no rank can save parameters
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        y = self.conv(self.ws(x)).mean((2, 3))
        return self.tiny(self.fc(y))


def test_subclasses_and_incompressible_layers_are_skipped_with_reasons():
    model = Mixed().eval()
    fact = factorize(model)
    report = surgery_report(fact)
    assert type(fact.ws) is WSConv
    assert "own forward" in report.skipped["ws"]
    assert "incompressible" in report.skipped["tiny"] and "min_compressible=None" in report.skipped["tiny"]
    assert set(report.factorized) == {"conv"}  # fc is 1x8: rank 1 needs 10 > 8 weights
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fact(x), model(x), rtol=1e-4, atol=1e-6)
    forced = factorize(model, DPRPConfig(min_compressible=None))
    assert set(surgery_report(forced).factorized) == {"conv", "tiny", "fc"}
    torch.testing.assert_close(forced(x), model(x), rtol=1e-4, atol=1e-6)


def test_timm_linear_is_factorized_and_exported_as_itself():
    # timm.layers.Linear (the classifier of MobileNetV3, GhostNet, ...) was skipped as "a subclass with its own
    # forward": 1.0M of mobilenetv3_small_100's 2.5M parameters stayed dense
    from timm.layers import Linear as TimmLinear

    from dprp_surgery import export

    model = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    assert type(model.classifier) is TimmLinear
    fact = factorize(model)
    assert "classifier" in surgery_report(fact).factorized and isinstance(fact.classifier, SVDLayer)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(fact.eval()(x), model(x), rtol=1e-4, atol=1e-5)
    dense = export(fact, mode="dense")
    assert type(dense.classifier) is TimmLinear  # the original layer type, not nn.Linear
    fresh = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    fresh.load_state_dict(dense.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-4, atol=1e-5)


def test_factorizing_a_dense_export_forgets_its_old_layer_records():
    # the old run's records leaked: a layer excluded now (and trained dense) was exported factorized at its old
    # rank, and a replaced head kept its old spec (10 outputs against 3)
    from dprp_surgery import export
    from dprp_surgery.export import layer_forms

    torch.manual_seed(0)
    first = factorize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)))
    first[2].truncate_(3)
    dense = export(first, mode="dense")
    assert set(layer_forms(dense)) == {"0", "2"}
    again = factorize(dense, DPRPConfig(exclude=("2",)))
    assert set(layer_forms(again)) == {"0"} and type(again[2]) is nn.Linear
    assert set(layer_forms(export(again, mode="factorized"))) == {"0"}
    assert set(layer_forms(dense)) == {"0", "2"}  # the model given is left as it was


def test_keep_dense_puts_the_dense_layer_back():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    fact = factorize(model)
    from dprp_surgery.surgery import keep_dense

    keep_dense(fact, ["2"], "dense in the run's checkpoint")
    assert type(fact[2]) is nn.Linear and [n for n, _ in svd_layers(fact)] == ["0"]
    assert surgery_report(fact).skipped["2"] == "dense in the run's checkpoint" and "2" not in surgery_report(
        fact).factorized
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fact(x), model(x), rtol=1e-4, atol=1e-5)


def test_equivalent_subclasses_compute_what_their_base_computes():
    # the registry's promise, checked against the installed library: same forward, no state of its own
    import importlib

    from dprp_surgery.layers import EQUIVALENT_SUBCLASSES

    for path, base in EQUIVALENT_SUBCLASSES.items():
        module_name, _, qualname = path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), qualname)
        assert issubclass(cls, base) and cls.__init__ is base.__init__, path
        args, x = ((6, 4), torch.randn(3, 6)) if base is nn.Linear else ((6, 4, 3), torch.randn(2, 6, *[9] * (
            2 if base is nn.Conv2d else 1)))
        torch.manual_seed(0)
        layer = cls(*args)
        plain = base(*args)
        plain.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
        assert set(vars(layer)) == set(vars(plain)), path


def test_include_exclude_and_layer_types():
    model = torchvision.models.resnet18()
    fact = factorize(model, DPRPConfig(include=("layer1.*",), exclude=("layer1.0.*",)))
    assert set(surgery_report(fact).factorized) == {"layer1.1.conv1", "layer1.1.conv2"}
    fact = factorize(model, DPRPConfig(layer_types=("Linear",)))
    assert set(surgery_report(fact).factorized) == {"fc"}


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 8)
        self.dec.weight = self.enc.weight
        self.mid = nn.Linear(8, 8)

    def forward(self, x):
        return self.dec(self.mid(self.enc(x)))


def test_tied_weights_stay_dense():
    fact = factorize(Tied())
    report = surgery_report(fact)
    assert set(report.factorized) == {"mid"}
    assert "shared" in report.skipped["enc"] and "shared" in report.skipped["dec"]


def test_error_no_factorizable_layer():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    with pytest.raises(FactorizationError, match=r"Sequential has no layer to factorize"):
        factorize(model)


def test_error_include_pattern_matches_nothing():
    model = torchvision.models.resnet18()
    with pytest.raises(FactorizationError, match=r"include pattern 'layer9\.\*' matches no factorizable layer"):
        factorize(model, DPRPConfig(include=("layer9.*",)))
    with pytest.raises(FactorizationError, match=r"use a glob such as 'layer1\.\*'"):
        factorize(model, DPRPConfig(include=("layer1",)))


def test_error_unknown_scheme():
    with pytest.raises(ValueError, match=r"DPRPConfig.scheme='tucker' is unknown; use one of paper, channel, spatial"):
        DPRPConfig(scheme="tucker")
    with pytest.raises(ValueError, match=r"Did you mean 'spatial'"):
        DPRPConfig(scheme="spatail")


def test_unused_layers_are_reported_not_replaced():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.spare = nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    report = surgery_report(factorize(Unused()))
    assert report.factorized == {"used": "channel"}
    assert report.skipped["spare"] == "never called by the model's forward"


def test_factorize_no_warning_on_traceable_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factorize(torchvision.models.resnet18())


def test_builtin_modules_that_read_weight_directly_keep_working():
    """nn.TransformerEncoderLayer's eval fast path reads linear1.weight and linear2.weight itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0))
    x = torch.randn(2, 5, 16)
    fact = factorize(model, DPRPConfig(min_compressible=None))
    assert set(surgery_report(fact).factorized) == {"0.linear1", "0.linear2"}
    torch.testing.assert_close(fact(x), model(x), rtol=1e-4, atol=1e-5)  # training mode
    fact(x).sum().backward()
    assert fact[0].linear1.s.grad is not None
    model.eval(), fact.eval()
    with torch.no_grad():
        torch.testing.assert_close(fact(x), model(x), rtol=1e-4, atol=1e-5)


class ReadsWeightUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = self.a(x)
        return torch.nn.functional.linear(x, self.b.weight, self.b.bias)


def test_module_walk_fallback_with_a_weight_read_outside_forward():
    torch.manual_seed(0)
    model = ReadsWeightUntraceable()
    x = torch.rand(2, 8)
    with pytest.warns(UserWarning, match="could not trace"):
        fact = factorize(model, DPRPConfig(min_compressible=None))
    assert set(surgery_report(fact).factorized) == {"a", "b"}
    torch.testing.assert_close(fact(x), model(x), rtol=1e-5, atol=1e-6)


def test_layers_with_hooks_stay_dense_and_keep_their_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.Linear(10, 4))
    model[3].register_forward_hook(lambda module, inputs, output: output * 0.5)
    model[0].register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2,))
    x = torch.randn(2, 3, 8, 8)
    fact = factorize(model, DPRPConfig(min_compressible=None))
    report = surgery_report(fact)
    assert "forward hooks" in report.skipped["3"] and "forward pre-hooks" in report.skipped["0"]
    assert [n for n, _ in svd_layers(fact)] == ["4"]
    torch.testing.assert_close(fact(x), model(x), rtol=1e-5, atol=1e-6)


def test_frozen_layers_stay_frozen():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    model[0].requires_grad_(False)
    fact = factorize(model, DPRPConfig(min_compressible=None))
    assert [p.requires_grad for p in fact[0].parameters()] == [False] * 4
    assert all(p.requires_grad for p in fact[3].parameters())


class CachesInForward(nn.Module):
    """Caches a tensor derived from a parameter in eval mode (timm LeViT's attention_bias_cache) and keeps the
    last input, as modules that cache state during forward do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.table = nn.Parameter(torch.randn(8))
        self.cache: dict[str, torch.Tensor] = {}
        self.last_input = None

    def forward(self, x):
        self.last_input = x
        if self.training:
            return self.fc(x) + self.table
        if "bias" not in self.cache:
            self.cache["bias"] = self.table * 2
        return self.fc(x) + self.cache["bias"]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_factorize_leaves_a_model_that_caches_in_forward_untouched(training):
    torch.manual_seed(0)
    model = CachesInForward().train(training)
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    fact = factorize(model, DPRPConfig(min_compressible=None))
    assert model.cache == {} and model.last_input is None  # no fx Proxy left in the user's model
    assert all(p is model.get_parameter(n) and torch.equal(p, v) for n, (p, v) in params.items())
    assert fact.cache == {} and fact.last_input is None  # nor in the copy returned
    again = factorize(model, DPRPConfig(scheme="channel", min_compressible=None))  # and it can be done twice
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
        for f in (fact, again):
            torch.testing.assert_close(f(x), want, rtol=1e-5, atol=1e-6)
    assert set(surgery_report(fact).factorized) == {"fc"}


class OptionalArgs(nn.Module):
    def __init__(self, signature: str):
        super().__init__()
        self.signature = signature
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)

    def forward(self, x, mask=None, *, features_only: bool = False, scale: float = 1.0):
        x = self.body(x)
        if mask is not None:
            x = x * mask
        if features_only:
            return x
        return self.head(x) * scale if self.signature != "swap" else self.aux(x)


class VarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, *args, **kwargs):
        return self.head(self.body(x))


@pytest.mark.parametrize(("make", "factorized", "never"), [
    (lambda: OptionalArgs("plain"), {"body", "head"}, {"aux"}),
    (lambda: OptionalArgs("swap"), {"body", "aux"}, {"head"}),
    (VarArgs, {"body", "head"}, set()),
], ids=["defaults", "defaults-other-branch", "varargs"])
def test_optional_forward_arguments_are_traced_with_their_defaults(make, factorized, never):
    """forward(x, mask=None, *, features_only=False): the layers that model(x) calls are the ones factorized."""
    torch.manual_seed(0)
    model = make().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced, no fallback warning
        fact = factorize(model, DPRPConfig(min_compressible=None))
    report = surgery_report(fact)
    assert report.traced
    assert set(report.factorized) == factorized
    reasons = {n: r for n, r in report.skipped.items() if r.startswith("never called by the model's forward")}
    assert set(reasons) == never
    for r in reasons.values():  # the reason says which call was traced
        assert r.endswith("(traced with features_only, mask, scale at their defaults)"), r
    x = torch.randn(2, 8)
    torch.testing.assert_close(fact(x), model(x), rtol=1e-5, atol=1e-6)
    if isinstance(model, OptionalArgs):  # the other call paths still compute the same function
        mask = torch.rand(2, 8)
        torch.testing.assert_close(fact(x, mask, scale=2.0), model(x, mask, scale=2.0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fact(x, features_only=True), model(x, features_only=True), rtol=1e-5,
                                   atol=1e-6)


class FunctionalWeights(nn.Module):
    """Uses layers' weights functionally instead of calling them (timm EVA-02, torchvision swin_t)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 8)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        y = nn.functional.conv2d(x, self.conv.weight, padding=1).mean((2, 3))
        return self.out(nn.functional.linear(y, self.qkv.weight, self.qkv.bias))


@pytest.mark.parametrize(("name", "reason"), [
    ("qkv", "its parameters 'qkv.weight' and 'qkv.bias' are read outside its forward"),
    ("conv", "its parameter 'conv.weight' is read outside its forward"),
], ids=["linear-weight-and-bias", "conv-weight"])
def test_layers_whose_weights_are_used_functionally_say_so(name, reason):
    torch.manual_seed(0)
    model = FunctionalWeights()
    fact = factorize(model, DPRPConfig(min_compressible=None))
    report = surgery_report(fact)
    assert report.skipped[name] == reason
    assert set(report.factorized) == {"out"}
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fact(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("layer", "shape"), [
    (nn.Conv3d(3, 8, 3, padding=1), (2, 3, 4, 6, 6)),
    (nn.ConvTranspose1d(3, 8, 3, stride=2), (2, 3, 6)),
    (nn.ConvTranspose2d(3, 8, 3, stride=2), (2, 3, 6, 6)),
    (nn.ConvTranspose3d(3, 8, 3), (2, 3, 4, 6, 6)),
], ids=["Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"])
def test_unsupported_convolutions_are_reported_as_skipped(layer, shape):
    torch.manual_seed(0)
    model = nn.Sequential(layer, nn.Flatten(2), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4))
    fact = factorize(model, DPRPConfig(min_compressible=None))
    report = surgery_report(fact)
    assert report.skipped == {"0": f"{type(layer).__name__} is not supported; dprp_surgery factorizes Linear, "
                                   "Conv1d and Conv2d"}
    assert set(report.factorized) == {"4"} and type(fact[0]) is type(layer)
    x = torch.randn(shape)
    torch.testing.assert_close(fact(x), model(x), rtol=1e-5, atol=1e-6)
    excluded = surgery_report(factorize(model, DPRPConfig(exclude=("0",), min_compressible=None)))
    assert excluded.skipped == {}  # excluded layers are not listed


class ReadsABufferValue(nn.Module):
    """A forward that needs a buffer's value (not only its shape), and reads a layer's weight functionally."""

    def __init__(self):
        super().__init__()
        self.register_buffer("reps", torch.tensor(2))
        self.qkv, self.unused, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias)
        return self.fc(h.repeat(1, int(self.reps)))


def test_a_forward_needing_tensor_values_is_traced_on_a_real_copy():
    model = ReadsABufferValue()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced (on a real copy once the meta copy fails), no fallback walk
        fact = factorize(model, DPRPConfig(min_compressible=None))
    report = surgery_report(fact)
    assert report.traced and set(report.factorized) == {"fc"}
    assert report.skipped["unused"].startswith("never called") and "read outside its forward" in report.skipped["qkv"]
    x = torch.randn(2, 8)
    torch.testing.assert_close(fact(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [nn.Linear(4, 3), nn.Conv2d(3, 4, 3)], ids=["linear", "conv2d"])
def test_a_bare_layer_is_refused_with_the_way_to_factorize_it(layer):
    twin = "SVDLinear" if isinstance(layer, nn.Linear) else "SVDConv2d"
    with pytest.raises(FactorizationError, match=rf"itself one {type(layer).__name__}: use {twin}\.from_dense"):
        factorize(layer, DPRPConfig(min_compressible=None))
    assert isinstance(factorize(nn.Sequential(layer), DPRPConfig(min_compressible=None))[0], SVDLayer)


class AuxHead(nn.Module):
    """A head only training calls (GoogLeNet's and Inception's auxiliary classifiers)."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x)
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_layers_of_either_mode_are_factorized(training):
    model = AuxHead().train(training)
    fact = factorize(model, DPRPConfig(min_compressible=None))
    assert set(surgery_report(fact).factorized) == {"body", "head", "aux"} and fact.training == training
    x = torch.randn(2, 8)
    for mode in (False, True):
        torch.testing.assert_close(fact.train(mode)(x), model.train(mode)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("call", "words"), [
    (lambda: factorize("resnet18"), r"factorize\(\) takes an nn.Module as its model, got str"),
    (lambda: factorize(None), r"factorize\(\) takes an nn.Module as its model, got NoneType"),
    (lambda: svd_layers("x"), r"svd_layers\(\) takes an nn.Module as its model, got str"),
    (lambda: factorize(nn.Linear(4, 4), {"scheme": "channel"}),
     r"factorize\(\) takes a DPRPConfig as its config, got dict; build one with DPRPConfig.from_dict"),
    (lambda: factorize(nn.Linear(4, 4), "channel"),
     r"factorize\(\) takes a DPRPConfig as its config, got str; build one with DPRPConfig.preset"),
])
def test_wrong_argument_types_are_type_errors_that_say_what_to_pass(call, words):
    with pytest.raises(TypeError, match=words):
        call()


def test_factorizing_a_factorized_model_says_it_already_is():
    once = factorize(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    with pytest.raises(FactorizationError, match=r"Sequential is already factorized \(2 SVD layers\).*train it"):
        factorize(once)


class _TiedBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.bias = self.a.bias

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_a_tied_bias_keeps_both_layers_dense():
    # only the weight was checked: both layers were factorized with two separate copies of the one bias
    model = _TiedBias()
    out = factorize(model)
    report = surgery_report(out)
    assert report.skipped == {"a": "its bias is shared with another module (tied weights)",
                              "b": "its bias is shared with another module (tied weights)"}
    assert out.a.bias is out.b.bias and list(report.factorized) == ["c"]


@pytest.mark.parametrize(("register", "kind"), [
    (lambda m: m._register_state_dict_hook(lambda mod, sd, p, local: sd.__setitem__(p + "extra", torch.zeros(1))),
     "state-dict hooks"),
    (lambda m: m.register_state_dict_pre_hook(lambda mod, p, keep: None), "state-dict pre-hooks"),
    (lambda m: m._register_load_state_dict_pre_hook(lambda *a: None), "load-state-dict pre-hooks"),
    (lambda m: m.register_load_state_dict_post_hook(lambda mod, keys: None), "load-state-dict post-hooks"),
])
def test_layers_with_state_dict_hooks_stay_dense(register, kind):
    # these hooks vanished with the replaced layer (no skip entry, no warning)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    register(model[2])
    out = factorize(model)
    assert f"it has {kind} registered on it" in surgery_report(out).skipped["2"]
    assert out[2] is not model[2] and type(out[2]) is nn.Conv2d and out[2]._state_dict_hooks.keys() == \
        model[2]._state_dict_hooks.keys()


class _WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.attn = nn.Linear(8, 8), nn.MultiheadAttention(8, 2)

    def forward(self, x):
        x = self.proj(x)
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize(("build", "name", "reason"), [
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
                           torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3))), "2",
     r"its 'weight' is parametrized .*torch.nn.utils.parametrize.remove_parametrizations\(layer, 'weight'\)"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LazyConv2d(8, 3)), "2",
     r"LazyConv2d is not initialised yet; run one forward pass through the model before factorize"),
    (_WithAttention, "attn.out_proj", r"NonDynamicallyQuantizableLinear subclasses nn.Linear without a forward of its"
     r" own; left dense"),
    (lambda: nn.Sequential(torch.jit.script(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Conv2d(8, 8, 3)), "0",
     r"it is a scripted \(torch.jit\) Conv2d; left dense: factorize the eager model, then script the result"),
    (lambda: nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 4), nn.Linear(4, 8), nn.Linear(8, 8)), "1",
     r"it has no weights \(weight shape \(4, 0\)\)"),
])
def test_skipped_layers_say_why_and_what_to_do(build, name, reason):
    # parametrized and lazy layers were "subclasses with their own forward"; a scripted conv was missing from the
    # report; a zero-size Linear raised ZeroDivisionError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = surgery_report(factorize(build()))
    assert re.fullmatch(f".*{reason}.*", report.skipped[name])


def test_a_model_holding_a_computed_tensor_names_it_and_the_fix():
    # the old torch.nn.utils.weight_norm: factorize crashed in deepcopy with torch's message and no layer named
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv1d(4, 8, 3)), nn.ReLU(), nn.Conv1d(8, 8, 3))
        with pytest.raises(FactorizationError, match=r"module '0' holds 'weight', a tensor computed from its "
                           r"parameters .*torch.nn.utils.remove_weight_norm\(layer\)"):
            factorize(model)


def test_a_scripted_layer_stays_dense_and_trainable():
    # the copy factorize made of a torch.jit.script-ed layer held non-leaf parameters: summarize raised and
    # compress's optimizer refused "can't optimize a non-leaf Tensor"
    from dprp_surgery import export, summarize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; users still have such models
        scripted = torch.jit.script(nn.Conv2d(8, 8, 3))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), scripted, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    model[1].bias.requires_grad_(False)
    fact = factorize(model)
    flags = {n: (p.is_leaf, p.requires_grad) for n, p in fact.named_parameters()}
    assert flags["1.weight"] == (True, True) and flags["1.bias"] == (True, False)
    assert all(leaf for leaf, _ in flags.values())
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(fact(x), model(x), atol=1e-5, rtol=1e-4)
    assert summarize(fact, x).params > 0
    before = fact[1].weight.detach().clone()
    fact(x).sum().backward()
    torch.optim.SGD([p for p in fact.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(fact[1].weight, before)
    assert all(p.is_leaf for p in export(fact, "dense").parameters())
