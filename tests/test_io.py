"""Model specs: every accepted form, safe weight loading, the untrusted-pickle guard, data recipes."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from dprp_surgery.data import IMAGENET_MEAN, IMAGENET_STD
from dprp_surgery.io import (
    ModelSpecError,
    UntrustedPickleError,
    build_arch,
    data_recipe,
    infer_arch,
    infer_num_classes,
    load_model,
    parse_model_spec,
    read_ranks,
    read_state_dict,
    set_num_classes,
)
from dprp_surgery.models import CifarResNet, resnet20


class _Touch:
    """Unpickling this object creates its marker file: stands in for arbitrary code execution."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k])


# ----------------------------------------------------------------------------- parsing
def test_parse_forms(tmp_path):
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    assert parse_model_spec("timm:resnet18").arch == "timm:resnet18"
    s = parse_model_spec(f"cifar:resnet20@{w}")
    assert (s.kind, s.name, s.weights) == ("cifar", "resnet20", w)
    assert parse_model_spec("torchvision:resnet18").kind == "torchvision"
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    assert parse_model_spec(tmp_path / "art").kind == "artifact"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    assert parse_model_spec(tmp_path / "run").kind == "run"
    p2 = tmp_path / "m.pt2"
    p2.write_bytes(b"x")
    assert parse_model_spec(p2).kind == "pt2"
    assert parse_model_spec(w).kind == "file"


@pytest.mark.parametrize("spec, words", [
    ("foo:resnet18", ["unknown model spec prefix", "'foo'", "timm:NAME"]),
    ("resnet18", ["Did you mean timm:resnet18", "torchvision:resnet18"]),
    ("timm:", ["names no architecture"]),
    ("cifar:resnet20@/nonexistent/w.th", ["/nonexistent/w.th", "does not exist"]),
    ("/nonexistent/model.pt", ["/nonexistent/model.pt", "Accepted forms"]),
])
def test_bad_specs(spec, words):
    with pytest.raises(ModelSpecError) as info:
        load_model(spec)
    for w in words:
        assert w in str(info.value)


def test_unknown_names_suggest():
    with pytest.raises(ModelSpecError, match="Did you mean .*cifar:resnet20"):
        load_model("cifar:resnet21")
    with pytest.raises(ModelSpecError, match="unknown timm model 'resnet18x'"):
        load_model("timm:resnet18x")


def test_empty_directory_is_rejected(tmp_path):
    with pytest.raises(ModelSpecError, match="neither a dprp artifact"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- architectures and weights
def test_cifar_spec_with_weights_and_wrappers(tmp_path):
    src = resnet20()
    path = tmp_path / "r20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "best_prec1": 1.0}, path)
    model, arch = load_model(f"cifar:resnet20@{path}")
    assert arch == "cifar:resnet20" and isinstance(model, CifarResNet)
    _same(model, src)
    assert infer_arch(model) == "cifar:resnet20"


def test_pretrained_cifar_checkpoint(shared_dir):
    path = shared_dir / "models" / "cifar10_resnet20.th"
    if not path.is_file():
        pytest.skip("pretrained ResNet-20 not available")
    model, arch = load_model(f"cifar:resnet20@{path}")
    assert arch == "cifar:resnet20" and infer_num_classes(model) == 10


def test_cifar_num_classes_follow_weights(tmp_path):
    src = resnet20(num_classes=3)
    path = tmp_path / "r20c3.safetensors"
    save_file(src.state_dict(), str(path))
    model, _ = load_model(f"cifar:resnet20@{path}")
    assert infer_num_classes(model) == 3
    _same(model, src)


@pytest.mark.parametrize("spec", ["cifar:resnet20", "timm:resnet10t", "torchvision:resnet18"])
def test_num_classes_with_weights_of_another_head_replaces_the_classifier(tmp_path, spec):
    # --num-classes 3 with 10-class weights failed: "2 tensors have the wrong shape" (as timm's pretrained=True,
    # num_classes=3, every other weight is loaded and the classifier is new)
    src, _ = load_model(spec, num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    model, _ = load_model(f"{spec}@{path}", num_classes=3)
    assert infer_num_classes(model) == 3
    own, theirs = model.state_dict(), src.state_dict()
    same = [k for k in theirs if own[k].shape == theirs[k].shape]
    assert len(same) == len(theirs) - 2  # all but the classifier's weight and bias
    assert all(torch.equal(own[k], theirs[k]) for k in same)
    again, _ = load_model(f"{spec}@{path}", num_classes=10)  # the weights' own count: loaded whole
    assert all(torch.equal(again.state_dict()[k], v) for k, v in theirs.items())


def test_a_1x1_conv_classifier_gets_a_new_head(tmp_path):
    # SqueezeNet's classifier is a 1x1 conv: "cannot find the classifier", and --num-classes failed on its weights
    import torchvision

    src = torchvision.models.squeezenet1_1().eval()
    path = tmp_path / "sq.safetensors"
    save_file(src.state_dict(), str(path))
    model, _ = load_model(f"torchvision:squeezenet1_1@{path}", num_classes=3)
    assert infer_num_classes(model) == 3 and model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert torch.equal(model.features[0].weight, src.features[0].weight)
    set_num_classes(src, 5)
    assert infer_num_classes(src) == 5 and src(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_torchvision_dense_prediction_models_build_without_downloading_a_backbone(monkeypatch):
    # weights=None still downloaded the ImageNet backbone of segmentation/detection builders (weights_backbone),
    # so save/load of such a model failed offline with a raw URLError
    import torch.hub

    def offline(*args, **kwargs):
        raise RuntimeError("download attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    model = build_arch("torchvision:lraspp_mobilenet_v3_large", num_classes=3)
    assert model.eval()(torch.randn(1, 3, 64, 64))["out"].shape == (1, 3, 64, 64)
    assert build_arch("torchvision:resnet18", num_classes=3).fc.out_features == 3  # classifiers: no such argument


def test_timm_and_torchvision_specs(tmp_path):
    model, arch = load_model("timm:resnet18", num_classes=7)
    assert arch == "timm:resnet18" and infer_num_classes(model) == 7
    path = tmp_path / "r18.pth"
    torch.save({"model": model.state_dict()}, path)
    again, _ = load_model(f"timm:resnet18@{path}")  # num_classes inferred from the head
    _same(again, model)
    tv, tv_arch = load_model("torchvision:resnet18", num_classes=5)
    assert tv_arch == "torchvision:resnet18" and infer_num_classes(tv) == 5
    tv_path = tmp_path / "tv.safetensors"
    save_file(tv.state_dict(), str(tv_path))
    tv2, _ = load_model(f"torchvision:resnet18@{tv_path}")
    _same(tv2, tv)


def test_wrong_arch_state_dict(tmp_path):
    path = tmp_path / "r20.pth"
    torch.save(resnet20().state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_model(f"timm:resnet18@{path}")
    text = str(info.value)
    assert str(path) in text and "timm:resnet18" in text and "missing keys" in text and "unexpected keys" in text
    with pytest.raises(ValueError, match="resnet32"):
        load_model(f"cifar:resnet32@{path}")


def test_bare_state_dict_needs_arch(tmp_path):
    path = tmp_path / "sd.pth"
    src = resnet20()
    torch.save(src.state_dict(), path)
    with pytest.raises(ValueError, match="--arch"):
        load_model(path)
    model, arch = load_model(path, arch="cifar:resnet20")
    assert arch == "cifar:resnet20"
    _same(model, src)


def test_corrupt_weights(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"definitely not a checkpoint" * 4)
    with pytest.raises(ValueError, match="corrupt"):
        load_model(f"cifar:resnet20@{path}")
    st = tmp_path / "bad.safetensors"
    st.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_state_dict(st)


# ----------------------------------------------------------------------------- pickles
def test_untrusted_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Touch(marker)}, path)
    with pytest.raises(UntrustedPickleError) as info:
        load_model(path)
    assert "--trust-pickle" in str(info.value) and "arbitrary code" in str(info.value)
    assert not marker.exists()
    with pytest.raises(UntrustedPickleError):  # also as weights of an architecture
        load_model(f"cifar:resnet20@{path}")
    assert not marker.exists()
    # the guard is what stops it: trusting the file does run the payload
    with pytest.raises(ValueError, match="not an nn.Module"):
        load_model(path, trust_pickle=True)
    assert marker.exists()


def test_plain_pickle_is_untrusted(tmp_path):
    import pickle

    marker = tmp_path / "pwned2"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Touch(marker), protocol=4))
    with pytest.raises(UntrustedPickleError):
        load_model(path)
    assert not marker.exists()


def test_trusted_whole_module(tmp_path):
    src = resnet20()
    path = tmp_path / "whole.pt"
    torch.save(src, path)
    with pytest.raises(UntrustedPickleError):
        load_model(path)
    model, arch = load_model(path, trust_pickle=True)
    assert arch == "cifar:resnet20"
    _same(model, src)


# ----------------------------------------------------------------------------- pt2, run dirs, recipes
def test_pt2_spec(tmp_path):
    model = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    path = tmp_path / "m.pt2"
    torch.export.save(program, str(path))
    loaded, arch = load_model(path)
    assert arch.startswith("pt2:")
    torch.testing.assert_close(loaded(x), model(x))
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"zzz")
    with pytest.raises(ValueError, match="bad.pt2"):
        load_model(bad)


def test_onnx_spec_runs_in_onnxruntime_with_its_recorded_recipe(tmp_path):
    from dprp_surgery.export import OnnxRuntimeModel, to_onnx

    model = resnet20().eval()
    path = to_onnx(model, tmp_path / "M.ONNX", torch.zeros(1, 3, 40, 40),
                   metadata={"arch": "cifar:resnet20", "mean": [0.5] * 3, "std": [0.25] * 3})
    assert parse_model_spec(path).kind == "onnx"
    loaded, arch = load_model(path)
    assert isinstance(loaded, OnnxRuntimeModel) and arch == f"onnx:{path}"
    x = torch.randn(3, 3, 40, 40)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-4)
    recipe = data_recipe(arch, loaded)
    assert (recipe.mean, recipe.std, recipe.image_size) == ((0.5,) * 3, (0.25,) * 3, 40)
    assert recipe.source == "recorded in the ONNX file (cifar:resnet20)"
    plain = tmp_path / "plain.onnx"  # from another exporter: no record, the size from the graph's input
    torch.onnx.export(model, (torch.zeros(1, 3, 36, 36),), str(plain), dynamo=True)
    loaded, arch = load_model(plain)
    assert loaded._dprp_input_size == [3, 36, 36] and data_recipe(arch, loaded).source == "ImageNet defaults"


def test_run_dir_rebuilds_factorized_model(tmp_path, caplog):
    from dprp_surgery import DPRPConfig, factorize, svd_layers

    config = DPRPConfig(scheme="channel", epochs=1, reg_cooldown_epochs=1)  # warned about once, when configured
    model = factorize(resnet20(), config)
    for _, layer in svd_layers(model):
        layer.truncate_(max(1, layer.rank // 2))
    torch.save({"model": model.state_dict(), "ranks": {n: m.rank for n, m in svd_layers(model)},
                "config": config.to_dict(), "epoch": 0, "history": []}, tmp_path / "checkpoint.pt")
    (tmp_path / "run.json").write_text(json.dumps({"arch": "cifar:resnet20", "num_classes": 10}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="dprp_surgery.config"):
        loaded, arch = load_model(tmp_path)
    assert not caplog.records  # `dprp eval`/`export` of the finished run repeated the warning
    with caplog.at_level("WARNING", logger="dprp_surgery.config"):
        DPRPConfig.from_dict(config.to_dict())
    assert "every epoch is in the cool-down" in caplog.text  # configuring a run still warns
    assert arch == "cifar:resnet20"
    assert {n: m.rank for n, m in svd_layers(loaded)} == {n: m.rank for n, m in svd_layers(model)}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="run directory"):  # the checkpoint alone needs its run dir
        load_model(tmp_path / "checkpoint.pt")


def test_corrupt_run_json(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="run.json"):
        load_model(tmp_path)


def test_data_recipes():
    r = data_recipe("cifar:resnet20", resnet20())
    assert (r.mean, r.std, r.image_size, r.augment) == (IMAGENET_MEAN, IMAGENET_STD, 32, "cifar")
    model = build_arch("timm:resnet18")
    r = data_recipe("timm:resnet18", model)
    assert r.image_size == 224 and len(r.mean) == 3 and r.input_size() == (3, 224, 224)
    assert data_recipe("torchvision:resnet18").image_size == 224
    assert data_recipe("pt2:/x.pt2").image_size is None


def test_set_num_classes():
    m = set_num_classes(resnet20(), 4)
    assert infer_num_classes(m) == 4 and m(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    t = set_num_classes(build_arch("torchvision:resnet18"), 3)
    assert t.fc.out_features == 3


# ----------------------------------------------------------------------------- crafted .pt2 files
def _tampered_pt2(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    """Rewrite the PT2 archive `src` as `dst`; ``edit(name, data)`` returns new bytes or ``{name: bytes}`` to write."""
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    reader = PT2ArchiveReader(str(src))
    with PT2ArchiveWriter(str(dst)) as writer:
        for name in reader.get_file_names():
            if name.startswith(".data/"):
                continue  # written by the writer itself
            data = edit(name, reader.read_bytes(name))
            for entry, content in (data if isinstance(data, dict) else {name: data}).items():
                writer.write_bytes(entry, content)
    return dst


def _pickled_bias(marker):
    """An edit marking the Linear's bias use_pickle, its payload a pickle that creates `marker`."""
    import io as std_io

    payload = std_io.BytesIO()
    torch.save(_Touch(marker), payload)

    def edit(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            config["config"]["bias"]["use_pickle"] = True
            return json.dumps(config).encode()
        return payload.getvalue() if name == "data/weights/weight_1" else data

    return edit


def _pickled_sample_inputs(marker):
    """An edit replacing the sample inputs by a pickle that creates `marker` (torch retries weights_only=False)."""
    import io as std_io

    payload = std_io.BytesIO()
    torch.save(((_Touch(marker),), {}), payload)
    return lambda name, data: payload.getvalue() if name.startswith("data/sample_inputs/") else data


def _opaque_constant(marker):
    """An edit adding an opaque-object constant, which torch reads with pickle.loads."""
    import pickle

    def edit(name, data):
        if name.endswith("model_constants_config.json"):
            config = json.loads(data)
            config["config"]["c"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                     "tensor_meta": None}
            return {"data/constants/opaque_obj_0": pickle.dumps(_Touch(marker), protocol=4),
                    name: json.dumps(config).encode()}
        return data

    return edit


@pytest.mark.parametrize("tamper, entry", [
    (_pickled_bias, "bias (use_pickle"),
    (_pickled_sample_inputs, "data/sample_inputs/model.pt"),
    (_opaque_constant, "c (use_pickle in data/constants/model_constants_config.json)"),
])
def test_pt2_with_pickled_entries_runs_nothing(tmp_path, tamper, entry):
    from dprp_surgery.export import to_pt2

    clean = to_pt2(torch.nn.Linear(3, 2), tmp_path / "lin.pt2", torch.randn(1, 3))
    loaded, arch = load_model(clean)  # an ordinary .pt2 needs no trust
    assert arch == f"pt2:{clean}"
    marker = tmp_path / "pwned"
    evil = _tampered_pt2(clean, tmp_path / "evil.pt2", tamper(marker))
    with pytest.raises(UntrustedPickleError) as info:
        load_model(evil)
    text = str(info.value)
    assert str(evil) in text and entry in text and "--trust-pickle" in text and "trust_pickle=True" in text
    assert not marker.exists()
    # the check is what stops it: trusting the file lets torch.export.load unpickle the payload
    try:
        load_model(evil, trust_pickle=True)
    except ValueError:
        pass
    assert marker.exists()


def test_pt2_with_compiled_code_is_untrusted(tmp_path):
    from dprp_surgery.export import to_pt2

    clean = to_pt2(torch.nn.Linear(3, 2), tmp_path / "lin.pt2", torch.randn(1, 3))
    evil = _tampered_pt2(clean, tmp_path / "aoti.pt2", lambda name, data: (
        {"data/aotinductor/model/model.so": b"\x7fELF", name: data} if name == "models/model.json" else data))
    with pytest.raises(UntrustedPickleError, match="AOTInductor"):
        load_model(evil)


def test_dprp_pt2_export_loads_without_trust(tmp_path):
    from dprp_surgery import DPRPConfig, factorize
    from dprp_surgery.export import export, to_pt2

    model = export(factorize(resnet20(), DPRPConfig(scheme="channel")), "factorized").eval()
    x = torch.randn(2, 3, 32, 32)
    path = to_pt2(model, tmp_path / "f.pt2", x)
    loaded, _ = load_model(path)
    torch.testing.assert_close(loaded(x), model(x))


# ----------------------------------------------------------------------------- whole modules with --arch
def test_trusted_whole_module_with_arch_becomes_rebuildable(tmp_path):
    import torchvision

    from dprp_surgery.export import load, save

    src = torchvision.models.resnet18(num_classes=3).eval()
    path = tmp_path / "tv.pt"
    torch.save(src, path)
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):  # --arch alone does not unpickle
        load_model(path, arch="torchvision:resnet18")
    model, arch = load_model(path, arch="torchvision:resnet18", trust_pickle=True)
    assert arch == "torchvision:resnet18" and infer_arch(model) == "torchvision:resnet18"
    _same(model, src)
    art = save(model, tmp_path / "art")  # no arch= needed: the module now records it
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(load(art)(x), src(x))
    with pytest.raises(ValueError) as info:  # a different architecture is refused, naming the first difference
        load_model(path, arch="torchvision:resnet34", trust_pickle=True)
    text = str(info.value)
    assert str(path) in text and "torchvision:resnet34" in text and "'layer1.2'" in text


def test_trusted_checkpoint_with_pickled_extras_and_arch(tmp_path):
    src = resnet20()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": src.state_dict(), "note": _Touch(tmp_path / "ran")}, path)
    with pytest.raises(UntrustedPickleError):
        load_model(path, arch="cifar:resnet20")
    model, arch = load_model(path, arch="cifar:resnet20", trust_pickle=True)
    assert arch == "cifar:resnet20"
    _same(model, src)


# ----------------------------------------------------------------------------- rebuilding from the arch name
def test_headless_timm_model_round_trips(tmp_path):
    import timm

    from dprp_surgery.export import load, save

    src = timm.create_model("mobilenetv3_small_050", num_classes=0).eval()
    assert infer_num_classes(src) == 0
    art = save(src, tmp_path / "art")
    assert json.loads((art / "manifest.json").read_text())["num_classes"] == 0
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(load(art)(x), src(x))


def test_non_default_timm_kwargs_are_not_saved_silently(tmp_path):
    import timm

    from dprp_surgery.export import save

    src = timm.create_model("mobilenetv3_small_050", num_classes=10, global_pool="max").eval()
    with pytest.raises(ValueError) as info:
        save(src, tmp_path / "art")
    text = str(info.value)
    assert "'global_pool.pool'" in text and "AdaptiveMaxPool2d" in text and "timm:mobilenetv3_small_050" in text
    assert "default arguments" in text and "num_classes=10" in text
    assert not (tmp_path / "art").exists()
    assert infer_arch(src, verify=False) == "timm:mobilenetv3_small_050"
    # a trusted pickle of it stays a pickle instead of claiming the default architecture
    path = tmp_path / "whole.pt"
    torch.save(src, path)
    _, arch = load_model(path, trust_pickle=True)
    assert arch == f"pickle:{path}"


def test_rebuild_check_skips_replaced_layers():
    import timm

    from dprp_surgery import DPRPConfig, factorize
    from dprp_surgery.export import export

    model = factorize(timm.create_model("mobilenetv3_small_050", num_classes=4), DPRPConfig())
    assert infer_arch(model) == "timm:mobilenetv3_small_050"
    for mode in ("factorized", "auto", "dense"):
        assert infer_arch(export(model, mode)) == "timm:mobilenetv3_small_050"


@pytest.mark.parametrize("make", ["torchvision:resnet18", "cifar:resnet20"])
def test_head_of_a_factorized_export_is_the_whole_realisation(make):
    """The classifier of a factorized export is its FactorizedSequential, not the second of its two layers."""
    from dprp_surgery import DPRPConfig, export, factorize
    from dprp_surgery.io import build_arch, infer_num_classes

    torch.manual_seed(0)
    model = build_arch(make, 10).eval()
    exported = export(factorize(model, DPRPConfig(scheme="channel")), "factorized")
    name = "fc" if make.startswith("torchvision") else "linear"
    assert type(exported.get_submodule(name)).__name__ == "FactorizedSequential"
    assert infer_num_classes(exported) == 10
    set_num_classes(exported, 3)
    head = exported.get_submodule(name)
    assert type(head) is torch.nn.Linear and head.out_features == 3
    size = 64 if make.startswith("torchvision") else 32
    assert exported(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_read_ranks_formats(tmp_path):
    """{layer: rank}, a run.json-style {"ranks": {...}} and a history.jsonl (its last record) are all read."""
    plain, run_json, history = tmp_path / "r.json", tmp_path / "run.json", tmp_path / "history.jsonl"
    plain.write_text(json.dumps({"conv1": 3, "fc": 2}))
    run_json.write_text(json.dumps({"arch": "cifar:resnet20", "ranks": {"conv1": 3, "fc": 2},
                                    "full_ranks": {"conv1": 16, "fc": 10}}))
    history.write_text("\n".join(json.dumps({"epoch": e, "ranks": {"conv1": 9 - e, "fc": 2}}) for e in range(7)) + "\n")
    assert read_ranks(plain) == read_ranks(run_json) == read_ranks(history) == {"conv1": 3, "fc": 2}
    for text, words in (("", "is empty"), ("{", "not valid JSON"), ("[1, 2]", "holds no ranks"),
                        ('{"conv1": 0}', "not a positive integer"), ('{"conv1": "3"}', "not a positive integer")):
        plain.write_text(text)
        with pytest.raises(ValueError, match=words):
            read_ranks(plain)
