"""DPRPConfig: validation, round trips and presets."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest
import yaml

from dprp_surgery import DPRPConfig
from dprp_surgery.config import CONFIG_VERSION, PRESETS


def test_defaults_follow_the_paper():
    c = DPRPConfig()
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size) == (0.1, 0.9, 1e-4, 256)
    assert (c.lambda_str, c.mu_orth, c.mu_sort) == (1.0, 1000.0, 1.0)
    assert (c.lambda_comp, c.epsilon) == (0.1, 0.1)  # Table I, CIFAR-10 ResNet-20
    assert (c.lr_factor, c.lr_patience, c.lr_schedule) == (0.1, 10, "plateau")


def test_frozen_and_keyword_only():
    c = DPRPConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0
    with pytest.raises(TypeError):
        DPRPConfig("paper")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epsilon", 2.0, r"DPRPConfig.epsilon=2.0 is invalid: the pruning threshold epsilon must lie in \(0, 1\)"),
        ("epochs", 0, r"DPRPConfig.epochs=0 is invalid: must be an integer >= 1"),
        ("lr", -1.0, r"DPRPConfig.lr=-1.0 is invalid"),
        ("regularizer", "l3", r"DPRPConfig.regularizer='l3' is unknown; use one of dprp, l1, l2, funnel, none"),
        ("layer_types", ("Conv3d",), r"DPRPConfig.layer_types='Conv3d' is unknown"),
        ("lambda_comp", float("nan"), r"DPRPConfig.lambda_comp=nan is invalid"),
        ("device", "tpu", r"DPRPConfig.device='tpu' is invalid"),
        ("target_compression", 1.0, r"DPRPConfig.target_compression=1.0 is invalid: must be None or a fraction"),
        ("distill", -0.1, r"DPRPConfig.distill=-0.1 is invalid"),
        ("distill_temperature", 0.0, r"DPRPConfig.distill_temperature=0.0 is invalid"),
        ("comp_weighting", "param",
         r"DPRPConfig.comp_weighting='param' is unknown; use one of layers, params, params-squared. "
         r"Did you mean 'params'"),
        ("factor_step", "caped", r"DPRPConfig.factor_step='caped' is unknown; use one of plain, capped. Did you mean"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        DPRPConfig(**{field: value})


def test_capped_factor_steps_need_sgd():
    with pytest.raises(ValueError, match=r"DPRPConfig.factor_step='capped' is invalid: .*AdamW.*optimizer='sgd'"):
        DPRPConfig(factor_step="capped", optimizer="adamw")
    assert DPRPConfig(factor_step="capped").factor_step == "capped"


def test_json_and_yaml_round_trip(tmp_path):
    c = DPRPConfig(scheme="channel", include=["layer1.*"], lambda_comp=0.5, epsilon=0.01, min_compressible=None)
    assert c.include == ("layer1.*",)
    assert DPRPConfig.from_json(c.to_json()) == c
    assert DPRPConfig.from_yaml(c.to_yaml()) == c
    c.to_json(tmp_path / "c.json")
    c.to_yaml(tmp_path / "c.yaml")
    assert DPRPConfig.load(tmp_path / "c.json") == c == DPRPConfig.load(tmp_path / "c.yaml")
    assert c.to_dict()["version"] == CONFIG_VERSION


def test_unknown_key_and_version_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown DPRPConfig field 'lamda_comp'. Did you mean 'lambda_comp'"):
        DPRPConfig.from_dict({"lamda_comp": 0.5})
    with pytest.raises(ValueError, match=r"version"):
        DPRPConfig.from_dict({"version": 99})
    with pytest.raises(ValueError, match=r"does not exist"):
        DPRPConfig.load(tmp_path / "missing.yaml")


def test_presets():
    assert DPRPConfig.preset("paper") == DPRPConfig()
    p1 = DPRPConfig.preset("paper-proposed1")
    assert (p1.lambda_comp, p1.epsilon) == (0.5, 0.01)
    assert DPRPConfig.preset("finetune", epochs=3).epochs == 3
    t50 = DPRPConfig.preset("tuned-target50")
    assert t50 == DPRPConfig.preset("tuned", comp_weighting="params", target_compression=0.5)
    assert DPRPConfig.preset("tuned-target50", target_compression=0.65).target_compression == 0.65
    with pytest.raises(ValueError, match=r"unknown preset 'fast'"):
        DPRPConfig.preset("fast")


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_single_line_text_longer_than_a_file_name_is_parsed(fmt):
    c = DPRPConfig.preset("tuned-target50", include=["layer1.*", "layer2.*"])
    if fmt == "json":
        text, parse = json.dumps(c.to_dict()), DPRPConfig.from_json
    else:
        text, parse = yaml.safe_dump(c.to_dict(), default_flow_style=True, width=10**6).strip(), DPRPConfig.from_yaml
    assert "\n" not in text and len(text) > 255  # longer than NAME_MAX: Path(text).is_file() raises OSError
    assert parse(text) == c


@pytest.mark.parametrize("as_path", [False, True])
@pytest.mark.parametrize(("parse", "name"), [("from_json", "missing_config.json"), ("from_yaml", "missing.yaml"),
                                             ("from_yaml", "missing.YML"), ("from_json", "missing.yaml")])
def test_missing_config_file_is_named(tmp_path, parse, name, as_path):
    path = tmp_path / name
    arg = path if as_path else str(path)
    with pytest.raises(ValueError, match=rf"config file '{re.escape(str(path))}' does not exist; check the path"):
        getattr(DPRPConfig, parse)(arg)


@pytest.mark.parametrize("as_path", [False, True])
@pytest.mark.parametrize(("parse", "name", "content", "message"), [
    ("from_json", "c.json", b'{"epsilon": 0.1,', r"is not valid JSON \(Expecting property name .*: line 1 column 17"),
    ("from_yaml", "c.yaml", b"epsilon: [0.1\n", r"is not valid YAML \(.*line 2"),
    ("from_json", "c.json", b'{"epsilon": "\xff"}', r"is not UTF-8 text \(byte 13 cannot be decoded\)"),
    ("from_yaml", "c.yaml", b"epsilon: \xfe\n", r"is not UTF-8 text \(byte 9 cannot be decoded\)"),
])
def test_unreadable_config_file_is_named(tmp_path, parse, name, content, message, as_path):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^config file '{re.escape(str(path))}' {message}"):
        getattr(DPRPConfig, parse)(path if as_path else str(path))


@pytest.mark.parametrize("parse", ["from_json", "from_yaml"])
def test_invalid_config_text_says_it_is_the_text(parse):
    with pytest.raises(ValueError, match=r"^the (JSON|YAML) text is not valid"):
        getattr(DPRPConfig, parse)('{"epsilon": [0.1')


@pytest.mark.parametrize("as_path", [False, True])
def test_config_directory_is_not_called_missing(tmp_path, as_path):
    folder = tmp_path / "configs.yaml"
    folder.mkdir()
    with pytest.raises(ValueError, match=rf"config file '{re.escape(str(folder))}' is a directory; pass a YAML file"):
        DPRPConfig.from_yaml(folder if as_path else str(folder))


def test_file_name_given_as_a_string_is_read(tmp_path):
    c = DPRPConfig(lr=0.05)
    c.to_json(tmp_path / "c.json")
    c.to_yaml(tmp_path / "c.yaml")
    assert DPRPConfig.from_json(str(tmp_path / "c.json")) == c == DPRPConfig.from_yaml(str(tmp_path / "c.yaml"))


def test_yaml_floats_without_a_dot_are_numbers():
    # PyYAML (YAML 1.1) reads 1e-4 as the string "1e-4"
    assert yaml.safe_load("weight_decay: 1e-4")["weight_decay"] == "1e-4"
    c = DPRPConfig.from_yaml("weight_decay: 1e-4\nlr: 1E-2\nfactor_weight_decay: 5e-5\ntarget_compression: 5e-1\n")
    assert (c.weight_decay, c.lr, c.factor_weight_decay, c.target_compression) == (1e-4, 1e-2, 5e-5, 0.5)
    assert c == DPRPConfig.from_yaml(c.to_yaml())
    # only numeric strings of float fields are converted; other strings still fail validation
    with pytest.raises(ValueError, match=r"DPRPConfig.lr='fast' is invalid"):
        DPRPConfig.from_yaml("lr: fast\n")
    with pytest.raises(ValueError, match=r"DPRPConfig.epochs='1e2' is invalid: must be an integer"):
        DPRPConfig.from_yaml("epochs: 1e2\n")
    with pytest.raises(ValueError, match=r"DPRPConfig.weight_decay='1e-4' is invalid"):
        DPRPConfig(weight_decay="1e-4")  # Python callers pass numbers


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "cpu:0"])
def test_valid_devices(device):
    assert DPRPConfig(device=device).device == device


@pytest.mark.parametrize("device", [None, 0, "cudafoo", "CUDA", "cuda:x", "cuda:-1", "meta", "mps", ""])
def test_invalid_device_is_a_value_error(device):
    with pytest.raises(ValueError, match=rf"DPRPConfig.device={device!r} is invalid: use 'auto'.*'cuda:1'"):
        DPRPConfig(device=device)


@pytest.mark.parametrize(
    "make",
    [lambda: DPRPConfig.preset("tuned", epochz=3), lambda: DPRPConfig().replace(epochz=3),
     lambda: DPRPConfig.from_dict({"epochz": 3})],
    ids=["preset", "replace", "from_dict"],
)
def test_unknown_override_suggests_the_field(make):
    with pytest.raises(ValueError, match=r"unknown DPRPConfig field 'epochz'. Did you mean 'epochs'\?"):
        make()


INT_FIELDS = ["epochs", "batch_size", "min_rank", "prune_every", "lr_patience", "warmup_epochs", "reg_warmup_epochs",
              "reg_cooldown_epochs", "epsilon_ramp_epochs", "prune_start_epoch", "seed", "version"]


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("field", INT_FIELDS)
def test_bools_are_not_integers(field, value):
    with pytest.raises(ValueError, match=rf"DPRPConfig.{field}={value} is invalid"):
        DPRPConfig(**{field: value})


def test_integers_still_accepted():
    c = DPRPConfig(epochs=3, seed=0, lr_patience=0, prune_start_epoch=1, version=CONFIG_VERSION)
    assert (c.epochs, c.seed, c.lr_patience, c.prune_start_epoch) == (3, 0, 0, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 2, "reg_cooldown_epochs": 2}, r"reg_cooldown_epochs=2 >= epochs=2: .*nothing is compressed"),
        ({"epochs": 1, "reg_cooldown_epochs": 5}, r"reg_cooldown_epochs=5 >= epochs=1"),
        ({"epochs": 3, "prune_start_epoch": 3}, r"prune_start_epoch=3 >= epochs=3: pruning never runs"),
        ({"epsilon_start": 0.01}, r"epsilon_start=0.01 is ignored because epsilon_ramp_epochs=0"),
        ({"epsilon_ramp_epochs": 2}, r"epsilon_ramp_epochs=2 is ignored because epsilon_start=None"),
        ({"optimizer": "adamw", "momentum": 0.5}, r"momentum=0.5 is ignored with optimizer='adamw'"),
    ],
)
def test_settings_without_effect_log_a_warning(caplog, kwargs, message):
    with caplog.at_level(logging.WARNING, logger="dprp_surgery.config"):
        c = DPRPConfig(**kwargs)
    assert all(getattr(c, k) == v for k, v in kwargs.items())  # still accepted (smoke runs of presets)
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert re.search(message, caplog.records[0].getMessage())


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_and_working_schedules_log_nothing(caplog, name):
    with caplog.at_level(logging.WARNING, logger="dprp_surgery.config"):
        DPRPConfig.preset(name)
        DPRPConfig(epochs=3, reg_cooldown_epochs=2, prune_start_epoch=2, epsilon_start=0.01, epsilon_ramp_epochs=2)
    assert caplog.records == []


def test_a_preset_name_that_is_not_a_string_is_a_type_error():
    with pytest.raises(TypeError, match=r"DPRPConfig.preset takes a preset name, got NoneType; use one of paper"):
        DPRPConfig.preset(None)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"momentum": 1.5}, r"DPRPConfig.momentum=1.5 is invalid: SGD momentum must lie in \[0, 1\)"),
    ({"momentum": 1.0}, r"DPRPConfig.momentum=1.0 is invalid"),
    ({"min_compressible": 1.5}, r"DPRPConfig.min_compressible=1.5 is invalid: must be < 1.*skip every layer"),
    ({"include": [1]}, r"DPRPConfig.include=\[1\] is invalid: give a list of strings"),
    ({"exclude": ["fc", None]}, r"DPRPConfig.exclude=\['fc', None\] is invalid"),
])
def test_values_that_would_silently_break_training_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DPRPConfig(**kwargs)


@pytest.mark.parametrize("parse", ["from_json", "from_yaml"])
def test_empty_config_text(parse):
    if parse == "from_yaml":  # an empty or comment-only YAML file gave the paper's defaults (300 epochs) silently
        for text in ("", "# only a comment\n"):
            with pytest.raises(ValueError, match=r"^the YAML text must hold a mapping of DPRPConfig fields .* but "
                               r"holds nothing \(it is empty or only comments\)"):
                DPRPConfig.from_yaml(text)
    else:
        with pytest.raises(ValueError, match=r"^the JSON text is not valid JSON"):
            DPRPConfig.from_json("")


@pytest.mark.parametrize(("text", "got"), [("[]", r"a list \(\[\]\)"), ("0", r"an int \(0\)"),
                                           ("false", r"a bool \(False\)"), ("''", r"a str \(''\)")])
def test_yaml_that_is_not_a_mapping_is_refused(text, got, tmp_path):
    # these all gave DPRPConfig() (`data or {}`)
    with pytest.raises(ValueError, match=rf"^the YAML text must hold a mapping .* but holds {got}"):
        DPRPConfig.from_yaml(text)
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=rf"^config file '.*c.yaml' must hold a mapping .* but holds {got}"):
        DPRPConfig.load(path)


def test_numpy_scalars_become_plain_numbers():
    # np.float64 passed validation, then broke to_yaml and the resume of its checkpoint; np.float32/np.int64 were
    # refused as "not a finite number"
    import numpy as np

    config = DPRPConfig(lr=np.float64(0.01), momentum=np.float32(0.5), epochs=np.int64(3), seed=np.uint8(7))
    assert (type(config.lr), type(config.momentum), type(config.epochs), type(config.seed)) == (float, float, int, int)
    assert DPRPConfig.from_yaml(config.to_yaml()) == config == DPRPConfig.from_json(config.to_json())


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"lr": 10**400}, r"DPRPConfig.lr=1000.* is invalid: must be a finite number > 0"),  # was OverflowError
    ({"seed": 2**64}, r"DPRPConfig.seed=18446744073709551616 is invalid: must be below 2\*\*63"),
])
def test_numbers_too_large_are_a_value_error_naming_the_field(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DPRPConfig(**kwargs)


@pytest.mark.parametrize(("key", "field"), [("learnig_rate", "lr"), ("LR", "lr"), ("Epochs", "epochs"),
                                            ("batch-size", "batch_size"), ("Weight_Decay", "weight_decay")])
def test_unknown_fields_suggest_through_case_and_aliases(key, field):
    with pytest.raises(ValueError, match=rf"unknown DPRPConfig field '{key}'. Did you mean '{field}'\?"):
        DPRPConfig.from_dict({key: 1})


def test_config_files_with_upper_case_suffixes_and_a_byte_order_mark_load(tmp_path):
    for name, text in (("UP.YAML", "lr: 0.05\n"), ("bom.json", '{"lr": 0.05}')):
        path = tmp_path / name
        path.write_bytes((b"\xef\xbb\xbf" if name.endswith("json") else b"") + text.encode())
        assert DPRPConfig.load(path).lr == 0.05  # UP.YAML: "use a .json, .yaml or .yml file"; BOM: invalid JSON


def test_load_of_a_directory_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory; pass a .json, .yaml or .yml file"):
        DPRPConfig.load(tmp_path)


@pytest.mark.parametrize(("key", "words"), [
    ("learning_rate", r"Did you mean 'lr'\?"),  # names of other tools
    ("wd", r"Did you mean 'weight_decay'\?"),
    ("zzz_unrelated", r"The fields are: .*\blambda_comp\b.*\blr\b"),  # no close name: the list, for CLI users
])
def test_an_unknown_field_gets_the_field_it_probably_means(key, words):
    with pytest.raises(ValueError, match=rf"unknown DPRPConfig field '{key}'\. {words}"):
        DPRPConfig.from_dict({key: 1})


@pytest.mark.parametrize(("parse", "text"), [("from_yaml", "lr: 0.1\nepochs: 3\nlr: 0.5\n"),
                                             ("from_json", '{"lr": 0.1, "epochs": 3, "lr": 0.5}')])
def test_a_field_set_twice_is_refused(parse, text):
    # both parsers kept the last value silently
    with pytest.raises(ValueError, match=r"'lr' is set twice \(0.1, then 0.5\); keep one of them"):
        getattr(DPRPConfig, parse)(text)
