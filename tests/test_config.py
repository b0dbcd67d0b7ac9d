"""OpenVLAConfig: reference options, sub-configs, parameter count and validation."""

import pytest
import torch
from conftest import TINY
from transformers import Dinov2WithRegistersConfig, LlamaConfig, SiglipVisionConfig

from configuration_openvla import OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction

REFERENCE_DEFAULTS = {
    "image_size": 224, "patch_size": 14, "in_channels": 3, "vision_dim": 384, "hidden_dim": 2048, "num_layers": 24,
    "num_heads": 16, "num_kv_heads": 4, "action_dim": 7, "num_action_bins": 256, "max_text_len": 64, "dropout": 0.1,
    "rope": False, "action_min": -1.0, "action_max": 1.0,
}


def test_reference_defaults_and_sub_configs():
    config = OpenVLAConfig.recommended_defaults()
    for name, value in REFERENCE_DEFAULTS.items():
        assert getattr(config, name) == value, name
    vision, text = config.vision_config, config.text_config
    assert vision.model_type == "dinov2" and vision.num_hidden_layers == 12
    assert vision.num_attention_heads == max(384 // 64, 4) and vision.hidden_size == 384
    assert text.model_type == "llama" and text.hidden_size == 2048 and text.num_hidden_layers == 24
    assert text.num_attention_heads == 16 and text.num_key_value_heads == 4
    assert config.num_patches == 256
    assert config.output_size() == 7 * 256


def test_small_config_matches_reference_and_takes_overrides():
    config = OpenVLAConfig.small_config()
    expected = {"image_size": 112, "patch_size": 14, "vision_dim": 192, "hidden_dim": 256, "num_layers": 4,
                "num_heads": 4, "num_kv_heads": 2, "action_dim": 7, "num_action_bins": 256}
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.vision_config.num_attention_heads == 4
    overridden = OpenVLAConfig.small_config(hidden_dim=128, num_layers=2, vocab_size=1024, action_dim=4)
    assert (overridden.hidden_dim, overridden.num_layers, overridden.vocab_size, overridden.action_dim) == (128, 2, 1024, 4)
    assert overridden.text_config.vocab_size == 1024 and overridden.action_token_end == 1024


def test_explicit_sub_configs_win():
    vision = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
    fused = SiglipVisionConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    text = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=512)
    config = OpenVLAConfig(vision_config=vision, fused_vision_config=fused, text_config=text, hidden_dim=999)
    assert (config.vision_dim, config.hidden_dim, config.image_size, config.vocab_size) == (80, 64, 28, 512)
    assert config.pixel_channels == 6
    reloaded = OpenVLAConfig.from_dict(config.to_dict())
    assert reloaded.fused_vision_config.hidden_size == 48 and reloaded.vision_config.num_register_tokens == 4


def test_save_load_round_trip(tmp_path):
    config = OpenVLAConfig.small_config(vocab_size=1024, rope=True, norm_stats={"a": {"action": {"q01": [0.0], "q99": [1.0]}}})
    config.save_pretrained(tmp_path)
    reloaded = OpenVLAConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.auto_map["AutoModel"] == "modeling_openvla.OpenVLAForActionPrediction"


def _built_count(config: OpenVLAConfig) -> int:
    with torch.device("meta"):
        model = OpenVLAForActionPrediction(config)
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize(
    "config",
    [
        OpenVLAConfig.recommended_defaults(),
        OpenVLAConfig.small_config(),
        OpenVLAConfig.small_config(**TINY, vocab_size=1024, tie_word_embeddings=True),
        OpenVLAConfig.small_config(**TINY, vocab_size=1024, action_decoding="parallel", action_chunk_size=4),
        OpenVLAConfig.small_config(**TINY, vocab_size=1024, patch_size=8, vision_stem="coordconv", vision_num_layers=2),
        OpenVLAConfig(
            vision_config=Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
            fused_vision_config=SiglipVisionConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14),
            text_config=LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=512, attention_bias=True),
        ),
    ],
    ids=["reference", "small", "tied-head", "parallel-chunks", "coordconv-stem", "fused-registers-siglip-head"],
)
def test_param_count_is_exact(config):
    assert config.param_count() == _built_count(config)


def test_tied_head_shares_the_embedding():
    config = OpenVLAConfig.small_config(**TINY, vocab_size=1024, tie_word_embeddings=True)
    model = OpenVLAForActionPrediction(config)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert config.param_count() < OpenVLAConfig.small_config(**TINY, vocab_size=1024).param_count()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"hidden_dim": 100, "num_heads": 16}, "hidden_dim=100"),
        ({"num_heads": 16, "num_kv_heads": 5}, "num_kv_heads=5"),
        ({"image_size": 100, "patch_size": 14}, "image_size=100"),
        ({"num_action_bins": 1}, "num_action_bins=1"),
        ({"num_action_bins": 2000, "vocab_size": 1024}, "num_action_bins=2000"),
        ({"action_min": 1.0, "action_max": -1.0}, "action_min=1.0"),
        ({"action_min": 0.5, "action_max": 0.5}, "action_min=0.5"),
        ({"dropout": 1.5}, "dropout=1.5"),
        ({"action_dim": 0}, "action_dim=0"),
        ({"action_decoding": "beam"}, "action_decoding='beam'"),
        ({"action_chunk_size": 4}, "action_chunk_size=4"),
        ({"action_binning": "quantile"}, "action_binning='quantile'"),
        ({"vision_dim": 202}, "vision_dim=202"),
        ({"vision_stem": "resnet"}, "vision_stem='resnet'"),
        ({"vision_stem": "conv"}, "vision_stem='conv'"),  # the plain convolutional stem was removed: it did not help
        ({"vision_stem": "coordconv"}, "power-of-two patch_size (got 14"),
        ({"vision_stem": "coordconv", "patch_size": 16, "vision_dim": 260}, "divisible by patch_size // 2 = 8 (got 260)"),
        ({"vision_stem": "coordconv", "patch_size": 16, "vision_layout": "timm"}, "single DINOv2 tower"),
        ({"vision_num_layers": 0}, "vision_num_layers=0 must be a positive integer"),
        ({"weight_init": "xavier"}, "weight_init='xavier'"),
        ({"vision_stem": "coordconv", "patch_size": 28}, "vision_stem='coordconv' needs a power-of-two patch_size (got 28"),
    ],
)
def test_inconsistent_values_raise(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OpenVLAConfig(**options)
