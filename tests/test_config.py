"""IvtpConfig: validation with clear errors, presets, serialisation."""

import re
from pathlib import Path

import pytest

from llava_ivtp.measuring.analytic_flops import llava_flops
from modeling_llava_ivtp import IvtpConfig
from tiny_models import TINY_SCHEDULE, tiny_config, tiny_config_dict


PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def test_defaults_and_derived_groups():
    config = tiny_config()
    assert config.model_type == "llava_ivtp"
    assert config.group_size == 2 and config.tau == 0.2 and config.clip_text_encoder is None
    assert config.num_patches == 36
    assert config.vision_layer_groups == [(0, 1), (2, 3), (4, 5)]  # 6 of 7 layers run (feature layer -2)
    assert config.llm_layer_groups == [(0, 1), (2, 3)]


def test_round_trip_through_dict(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    loaded = IvtpConfig.from_pretrained(tmp_path)
    assert loaded.schedule == TINY_SCHEDULE
    assert loaded.group_size == 2 and loaded.model_type == "llava_ivtp"


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        ({"group_size": 0}, "group_size", ">= 1"),
        ({"tau": 1.5}, "tau", r"\[-1, 1\]"),
        ({"tau": -1.01}, "tau", r"\[-1, 1\]"),
        ({"clip_text_encoder": "ViT-L-14"}, "clip_text_encoder", "dict"),
        ({"schedule": [24, 16]}, "schedule", "dict"),
        ({"schedule": {"vision": [24, 16, 12]}}, "schedule", "missing"),
        ({"schedule": {"vision": [24, 16, 12], "llm": [], "text": []}}, "schedule", "unknown"),
        ({"schedule": {"vision": [24, 30, 12], "llm": []}}, r'schedule\["vision"\]\[1\]', "must not increase"),
        ({"schedule": {"vision": [40, 30, 12], "llm": []}}, r'schedule\["vision"\]\[0\]', r"patches per image \(36\)"),
        ({"schedule": {"vision": [24, 0, 0], "llm": []}}, r'schedule\["vision"\]\[1\]', "at least 1"),
        ({"schedule": {"vision": [24, 16], "llm": []}}, r'schedule\["vision"\]', "one entry per vision group"),
        ({"schedule": {"vision": [24, 16, 12], "llm": [13]}}, r'schedule\["llm"\]\[0\]', r"enter the LLM .*\(12\)"),
        ({"schedule": {"vision": [24, 16, 12], "llm": [8, 6, 4, 2, 1]}}, r'schedule\["llm"\]', "at most 4"),
        ({"schedule": {"vision": [24, 16.0, 12], "llm": []}}, r'schedule\["vision"\]\[1\]', "int"),
        ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy", "'default'"),
        ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer", "int"),
        ({"image_seq_length": 35}, "image_seq_length", "36"),
    ],
)
def test_bad_fields_raise_clear_errors(overrides, field, allowed):
    with pytest.raises(ValueError, match=field) as error:
        IvtpConfig(**tiny_config_dict(**overrides))
    assert re.search(allowed, str(error.value)), str(error.value)


def test_empty_stage_is_allowed():
    config = IvtpConfig(**tiny_config_dict(schedule={"vision": [], "llm": [8]}))
    assert config.llm_layer_groups == [(0, 1)]


@pytest.mark.parametrize("name, layers", [("llava-1.5-7b-ivtp.json", 32), ("llava-1.5-13b-ivtp.json", 40)])
def test_presets_are_the_paper_setting(name, layers):
    config = IvtpConfig.from_json_file(PRESETS / name)
    assert config.num_patches == 576
    assert config.group_size == 3 and config.tau == 0.2
    assert len(config.vision_layer_groups) == 8 and config.vision_layer_groups[-1] == (21, 22)
    assert config.llm_layer_groups[-1] == (9, 11)  # the first 12 LLM layers
    assert config.schedule["llm"][-1] == 64
    assert config.text_config.num_hidden_layers == layers


def test_7b_preset_costs_match_paper_table_9():
    ivtp = IvtpConfig.from_json_file(PRESETS / "llava-1.5-7b-ivtp.json")
    stock = IvtpConfig.from_dict({**ivtp.to_dict(), "schedule": None})
    base, pruned = llava_flops(stock, 512), llava_flops(ivtp, 512)
    assert abs(base["total"] / 1e12 - 15.364) / 15.364 < 0.01
    assert abs(pruned["vit"] / 1e12 - 0.202) / 0.202 < 0.03
    assert abs(pruned["llm"] / 1e12 - 7.946) / 7.946 < 0.01
    assert pruned["total"] < 0.54 * base["total"]
