"""DPRPConfig: validation, round trips and presets."""

from __future__ import annotations

import dataclasses

import pytest

from dprp_surgery import DPRPConfig
from dprp_surgery.config import CONFIG_VERSION


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
