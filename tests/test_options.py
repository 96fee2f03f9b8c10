"""specs.options: typed config fields (check_fields, at_least, ConfigMixin) on the package's configs."""

from __future__ import annotations

import json

import pytest

from vlm_encoder.config import VisionConfig
from vlm_encoder.contrastive.config import ContrastiveConfig
from vlm_encoder.text import HFTextConfig


# ------------------------------------------------- check_fields on VisionConfig (the field types are the checks)
def test_vision_config_fields_are_checked_by_their_types():
    with pytest.raises(ValueError, match=r"VisionConfig\.depth must be an int, got True"):
        VisionConfig(depth=True)
    with pytest.raises(ValueError, match=r"VisionConfig\.depth must be >= 1, got 0"):
        VisionConfig(depth=0)
    with pytest.raises(ValueError, match=r"VisionConfig\.qkv_bias must be true or false, got 1"):
        VisionConfig(qkv_bias=1)
    with pytest.raises(ValueError, match=r"VisionConfig\.pool must be one of 'cls', 'gap', 'map', 'none'"):
        VisionConfig(pool="avg")
    with pytest.raises(ValueError, match=r"each item of VisionConfig\.stem_layers must be >= 1, got \(3, 0\)"):
        VisionConfig(stem_layers=[3, 0])
    config = VisionConfig(norm_eps=1, image_size=[64, 96], stem_layers=[1, 2], patch_size=4)
    assert isinstance(config.norm_eps, float) and config.norm_eps == 1.0
    assert config.image_size == (64, 96) and config.stem_layers == (1, 2)
    assert VisionConfig(image_size=32, patch_size=16).image_size == (32, 32)  # an int is a square


def test_vision_config_from_dict_names_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"unknown VisionConfig fields \['hidden_size'\]; known: act, "):
        VisionConfig.from_dict({"width": 64, "hidden_size": 3})
    config = VisionConfig(image_size=(32, 64), patch_size=16, width=64, depth=2, num_heads=4)
    data = config.to_dict()
    assert data["image_size"] == [32, 64] and data["stem_layers"] == []  # plain JSON types
    assert VisionConfig.from_dict(json.loads(json.dumps({"model_type": "vlm_encoder", **data}))) == config
    assert config.replace(depth=3).depth == 3
    with pytest.raises(ValueError, match="unknown VisionConfig fields"):
        config.replace(layers=3)


def test_missing_required_fields_are_named():
    with pytest.raises(ValueError, match=r"HFTextConfig needs the fields \['model_dir'\]"):
        HFTextConfig.from_dict({"pooling": "cls"})
    with pytest.raises(ValueError, match=r"ContrastiveConfig needs the fields \['vision', 'text'\]"):
        ContrastiveConfig.from_dict({"embed_dim": 8})
