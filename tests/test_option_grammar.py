"""One typed grammar for YAML files and `key=value` overrides (`vlm_encoder.specs.options`):
YAML 1.2 numbers and booleans, values read by each field's type, duplicate keys refused, the
same in `train` (YAML + overrides), `extract` / `viz` / `info` (`--override`) and Python."""

from __future__ import annotations

import pytest

from vlm_encoder import VisionConfig
from vlm_encoder.specs.options import apply_overrides, parse_yaml
from vlm_encoder.train import TrainConfig


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "value"), [("5e-4", 5e-4), ("1e-3", 1e-3), ("1.0e-5", 1e-5), ("2", 2.0), (".5", 0.5)])
def test_floats_with_exponents_are_floats_in_yaml_and_overrides(tmp_path, text, value):
    from_yaml = TrainConfig.from_yaml(write(tmp_path, f"lr: {text}\nmin_lr: 0\n"))
    assert from_yaml.lr == value and isinstance(from_yaml.lr, float)
    assert TrainConfig().with_overrides([f"lr={text}", "min_lr=1e-5" if value >= 1e-5 else "min_lr=0"]).lr == value


def test_mixed_precision_no_is_the_string_no(tmp_path):
    assert TrainConfig.from_yaml(write(tmp_path, "mixed_precision: no\n")).mixed_precision == "no"
    assert TrainConfig().with_overrides(["mixed_precision=no"]).mixed_precision == "no"
    assert TrainConfig().with_overrides(["mixed_precision=bf16"]).mixed_precision == "bf16"


@pytest.mark.parametrize("value", ["'false'", '"true"', "no", "yes", "off", "0", "1"])
def test_a_bool_field_takes_only_true_or_false(tmp_path, value):
    with pytest.raises(ValueError, match="lock_image must be true or false"):
        TrainConfig().with_overrides([f"lock_image={value}"])
    with pytest.raises(ValueError, match="lock_image must be true or false"):
        TrainConfig.from_yaml(write(tmp_path, f"lock_image: {value}\n"))
    assert TrainConfig().with_overrides(["lock_image=true"]).lock_image is True
    assert TrainConfig.from_yaml(write(tmp_path, "lock_image: false\n")).lock_image is False


def test_a_list_field_refuses_a_bare_string(tmp_path):
    with pytest.raises(ValueError, match="class_names must be a list"):
        TrainConfig().with_overrides(["class_names=abc"])
    with pytest.raises(ValueError, match="class_names must be a list"):
        TrainConfig.from_yaml(write(tmp_path, "class_names: abc\n"))
    assert TrainConfig().with_overrides(["class_names=[a, b]"]).class_names == ("a", "b")


def test_duplicate_keys_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="key 'lr' is given twice"):
        TrainConfig.from_yaml(write(tmp_path, "lr: 1e-3\nepochs: 2\nlr: 2e-3\n"))


def test_a_string_field_keeps_numeric_text_and_mappings_merge():
    config = TrainConfig().with_overrides(["output_dir=2024", "vision_overrides.depth=4", "vision_overrides.width=64"])
    assert config.output_dir == "2024" and config.vision_overrides == {"depth": 4, "width": 64}
    with pytest.raises(ValueError, match="lr is not a mapping"):
        TrainConfig().with_overrides(["lr.x=1"])


def test_unknown_fields_and_bounds_are_named():
    with pytest.raises(ValueError, match="unknown TrainConfig field 'lrr'.*known: .*lr"):
        TrainConfig().with_overrides(["lrr=1"])
    with pytest.raises(ValueError, match="TrainConfig.batch_size must be >= 1, got 0"):
        TrainConfig().with_overrides(["batch_size=0"])
    with pytest.raises(ValueError, match="must look like key=value"):
        TrainConfig().with_overrides(["lr"])


def test_vision_overrides_use_the_same_grammar():
    assert apply_overrides(VisionConfig, {}, ["depth=4", "image_size=[64, 96]", "qkv_bias=false", "norm_eps=1e-5"]) == {
        "depth": 4, "image_size": [64, 96], "qkv_bias": False, "norm_eps": 1e-5}
    config = VisionConfig.from_dict(apply_overrides(VisionConfig, {}, ["image_size=[64, 96]", "norm_eps=1e-5"]))
    assert config.image_size == (64, 96) and config.norm_eps == 1e-5
    with pytest.raises(ValueError, match="qkv_bias must be true or false"):
        VisionConfig.from_dict(apply_overrides(VisionConfig, {}, ["qkv_bias=no"]))


def test_yaml_is_read_as_yaml_1_2():
    data = parse_yaml("a: 1e-3\nb: no\nc: on\nd: 012\ne: 0x1f\nf: true\ng: ~\nh: .inf\n")
    assert data == {"a": 1e-3, "b": "no", "c": "on", "d": 12, "e": 31, "f": True, "g": None, "h": float("inf")}
