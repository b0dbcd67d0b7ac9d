"""Official OpenVLA checkpoints run on transformers 5 and predict the official actions, bit for bit.

Tiny official-format checkpoints (timm towers, official key names, bf16-rounded preprocessing constants, padded
vocabulary) come from `official_fixtures.make_official_checkpoint`; `official_reference_predict` recomputes what the
official remote code does (timm, torchvision, raw tokenizers, unrestricted greedy decoding, official bin maths).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from official_fixtures import (
    _patch_layerscale,
    load_official,
    load_official_state_dict,
    make_official_checkpoint,
    make_test_image,
    official_image_transform,
    official_reference_predict,
)
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from configuration_openvla import OFFICIAL_CONFIG_KEYS, OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction, OpenVLATimmDinov2Model, OpenVLATimmSiglipVisionModel
from openvla_tools.official_format import official_folder_config
from processing_openvla import ActionTokenizer, OpenVLAImageProcessor, OpenVLAProcessor, detokenize_actions

INSTRUCTION = "pick up the red block"
VARIANTS = {
    "fused": {"fused": True},
    "dinov2": {"fused": False, "single_backbone": "dinov2-vit-l"},
    "siglip": {"fused": False, "single_backbone": "siglip-vit-so400m"},
}
OPENVLA_7B_PARAMETERS = 7_541_237_184


def _images() -> list[Image.Image]:
    """Noise (non-square, so the resize matters), another noise image, all black and all white."""
    return [
        make_test_image(0),
        make_test_image(1, size=(97, 61)),
        Image.new("RGB", (64, 48), (0, 0, 0)),
        Image.new("RGB", (64, 48), (255, 255, 255)),
    ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny official checkpoint per variant (the fused one sharded, as the 7B), built once."""
    return {
        name: make_official_checkpoint(tmp_path_factory.mktemp(name), sharded=name == "fused", **options)
        for name, options in VARIANTS.items()
    }


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """Model and processor loaded directly from each official folder (its tiny tower sizes read by
    `official_folder_config`, as `convert_openvla_checkpoint.py` reads them)."""
    return {
        name: (load_official(info["path"]), OpenVLAProcessor.from_pretrained(info["path"]))
        for name, info in checkpoints.items()
    }


def _greedy_tokens(model, inputs) -> torch.Tensor:
    """Action token ids chosen by our decoding (restricted to the action tokens)."""
    bins = model.predict_action_logits(**inputs).argmax(-1)
    return model.action_tokenizer.bins_to_token_ids(bins)


# --- config -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_config_maps_onto_ours(checkpoints, variant):
    info = checkpoints[variant]
    official = json.loads((info["path"] / "config.json").read_text())
    config = official_folder_config(info["path"])
    towers = [config.vision_config] + ([config.fused_vision_config] if config.fused_vision_config is not None else [])
    expected_types = {"fused": ["dinov2_with_registers", "siglip_vision_model"], "dinov2": ["dinov2_with_registers"], "siglip": ["siglip_vision_model"]}
    assert [tower.model_type for tower in towers] == expected_types[variant]
    for tower, kwargs in zip(towers, info["tower_kwargs"], strict=True):
        assert (tower.hidden_size, tower.num_hidden_layers, tower.num_attention_heads) == (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"])
        assert tower.hidden_act == "gelu" and tower.layer_norm_eps == 1e-6 and tower.image_size == info["image_size"]
        if tower.model_type == "dinov2_with_registers":
            assert tower.num_register_tokens == 4 and tower.mlp_ratio == 4
        else:
            assert tower.vision_use_head and tower.intermediate_size == int(kwargs["embed_dim"] * 3.7362)
    assert config.vision_layout == "timm" and config.rope and config.vision_dim == info["vision_dim"]
    assert config.text_config.vocab_size == info["text_vocab_size"] == config.vocab_size
    assert config.text_config.pad_token_id == info["pad_token_id"]
    assert config.text_config.rms_norm_eps == 1e-6  # LlamaConfig default, as the official code (not Llama-2's 1e-5)
    assert config.action_binning == "openvla" and config.num_action_bins == info["n_action_bins"]
    assert config.action_token_end == info["text_vocab_size"] - info["pad_to_multiple_of"] == info["action_token_ids"][1]
    assert config.image_token_id >= config.vocab_size  # outside the vocabulary: never embedded nor predicted
    assert config.norm_stats == official["norm_stats"] and config.action_dim == 7
    assert config.prompt_suffix_token == "\u2581"
    assert config.param_count() == info["num_parameters"]
    saved = config.to_dict()
    assert not set(OFFICIAL_CONFIG_KEYS) & set(saved) and saved["auto_map"]["AutoModel"] == "modeling_openvla.OpenVLAForActionPrediction"
    assert OpenVLAConfig.from_dict(saved).to_dict() == saved


def test_unsupported_official_configs_raise(checkpoints):
    official = json.loads((checkpoints["fused"]["path"] / "config.json").read_text())
    with pytest.raises(NotImplementedError, match="vit_large_patch14_clip"):
        OpenVLAConfig(**{**official, "timm_model_ids": ["vit_large_patch14_clip_224.openai", official["timm_model_ids"][1]]})
    with pytest.raises(ValueError, match="arch_specifier"):
        OpenVLAConfig(**{**official, "arch_specifier": "no-align+gelu-mlp"})


# --- weights ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_load_with_the_registered_conversions_and_revert_exactly(loaded, checkpoints, variant, tmp_path):
    model, _ = loaded[variant]
    info = checkpoints[variant]
    _, loading_info = OpenVLAForActionPrediction.from_pretrained(info["path"], config=official_folder_config(info["path"]), output_loading_info=True)
    assert not any(loading_info.values()), loading_info  # no missing, unexpected or mismatched keys
    assert isinstance(model.vision_backbone.featurizer, (OpenVLATimmDinov2Model, OpenVLATimmSiglipVisionModel))
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"]
    official = load_official_state_dict(info["path"])
    reverted = revert_weight_conversion(model, model.state_dict())  # our names -> official names
    assert sorted(reverted) == sorted(official) == info["state_dict_keys"]
    assert all(torch.equal(reverted[key], official[key]) for key in official)
    # saved under our module names (the default) or, reverted, under the official names; both reload identically
    for folder, original_format in ((tmp_path / "native", False), (tmp_path / "official", True)):
        model.save_pretrained(folder, save_original_format=original_format)
        assert (sorted(load_official_state_dict(folder)) == info["state_dict_keys"]) is original_format
        again = OpenVLAForActionPrediction.from_pretrained(folder)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_openvla_7b_has_the_official_parameters_on_meta():
    import timm

    config = OpenVLAConfig.openvla_7b()
    assert config.param_count() == OPENVLA_7B_PARAMETERS
    assert (config.action_token_end, config.vocab_size, config.num_patches, config.vision_dim) == (32000, 32064, 256, 2176)
    with torch.device("meta"):
        model = OpenVLAForActionPrediction(config)
        dino = timm.create_model("vit_large_patch14_reg4_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=224)
        siglip = timm.create_model("vit_so400m_patch14_siglip_224", pretrained=False, num_classes=0, img_size=224)
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=32064, pad_token_id=32000))
    assert sum(p.numel() for p in model.parameters()) == OPENVLA_7B_PARAMETERS
    # the official state dict, built the way the official code builds it (timm towers with the LayerScale rename)
    _patch_layerscale(dino)
    expected = {f"vision_backbone.featurizer.{k}": v.shape for k, v in dino.state_dict().items()}
    expected |= {f"vision_backbone.fused_featurizer.{k}": v.shape for k, v in siglip.state_dict().items()}
    expected |= {f"language_model.{k}": v.shape for k, v in llm.state_dict().items()}
    expected |= {"projector.fc1.weight": (8704, 2176), "projector.fc1.bias": (8704,), "projector.fc2.weight": (4096, 8704),
                 "projector.fc2.bias": (4096,), "projector.fc3.weight": (4096, 4096), "projector.fc3.bias": (4096,)}
    ours = {key: tuple(value.shape) for key, value in revert_weight_conversion(model, model.state_dict()).items()}
    assert len(ours) == 982 and ours == {key: tuple(shape) for key, shape in expected.items()}
    # shapes quoted in docs/official_format.md
    assert ours["vision_backbone.featurizer.pos_embed"] == (1, 256, 1024)
    assert ours["vision_backbone.featurizer.blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert ours["vision_backbone.featurizer.blocks.0.ls1.scale_factor"] == (1024,)
    assert ours["vision_backbone.fused_featurizer.pos_embed"] == (1, 256, 1152)
    assert ours["vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight"] == (4304, 1152)
    assert ours["vision_backbone.fused_featurizer.attn_pool.kv.weight"] == (2304, 1152)
    assert ours["language_model.model.embed_tokens.weight"] == ours["language_model.lm_head.weight"] == (32064, 4096)
    assert sum(int(np.prod(shape)) for shape in ours.values()) == OPENVLA_7B_PARAMETERS


# --- preprocessing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["resize-naive", "resize-crop", "letterbox"])
@pytest.mark.parametrize("fused", [True, False])
def test_image_processor_equals_the_official_transform(tmp_path, strategy, fused):
    make_official_checkpoint(tmp_path, fused=fused, image_resize_strategy=strategy)
    preprocessor_config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    image_processor = OpenVLAImageProcessor.from_pretrained(tmp_path)
    assert image_processor.image_resize_strategy == strategy
    assert list(image_processor.image_mean) == preprocessor_config["tvf_normalize_params"][0]["mean"]  # bf16-rounded
    for image in [*_images(), make_test_image(2, size=(57, 100)), make_test_image(3, size=(56, 56))]:
        ours = image_processor(image, return_tensors="pt")["pixel_values"][0]
        official = official_image_transform(image, preprocessor_config)
        assert ours.shape == official.shape == (6 if fused else 3, 56, 56)
        torch.testing.assert_close(ours, official, atol=1e-5, rtol=0)
    assert "tvf_normalize_params" not in image_processor.to_dict() and "auto_map" not in image_processor.to_dict()


def test_processor_applies_the_empty_token_rule_from_the_config(loaded, checkpoints):
    _, processor = loaded["fused"]
    info = checkpoints["fused"]
    assert processor.prompt_suffix_token_id == info["empty_token_id"]  # looked up in the tokenizer, not hard-coded
    assert (processor.action_token_end, processor.num_action_bins, processor.action_binning) == (info["action_token_ids"][1], 256, "openvla")
    assert processor.norm_stats == info["norm_stats"] and processor.tokenizer.pad_token_id == info["pad_token_id"]
    inputs = processor(images=_images()[0], text=INSTRUCTION)
    reference = official_reference_predict(info["path"], _images()[0], INSTRUCTION, "bridge_orig")
    prompt_ids = inputs["input_ids"][0][inputs["input_ids"][0] != processor.image_token_id]
    assert torch.equal(prompt_ids, reference["input_ids"][0]) and prompt_ids[-1] == info["empty_token_id"]
    assert (inputs["input_ids"] == processor.image_token_id).sum() == info["num_patches"]
    assert bool(inputs["attention_mask"].all())  # the mask covers the appended empty token (batch 1: same result)


# --- predictions ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_predictions_equal_the_official_computation(loaded, checkpoints, variant):
    model, processor = loaded[variant]
    path = checkpoints[variant]["path"]
    lo, hi = checkpoints[variant]["action_token_ids"]
    actions_per_image = []
    for image in _images():
        inputs = processor(images=image, text=INSTRUCTION)
        reference = official_reference_predict(path, image, INSTRUCTION, "bridge_orig")
        torch.testing.assert_close(inputs["pixel_values"], reference["pixel_values"], atol=1e-5, rtol=0)
        with torch.no_grad():
            features = model.encode_image(inputs["pixel_values"])
            projected = model.projector(features)
            logits = model(**inputs).logits[:, -1]
        torch.testing.assert_close(features, reference["patch_features"], atol=1e-5, rtol=0)
        torch.testing.assert_close(projected, reference["projected"], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits, reference["first_step_logits"], atol=1e-5, rtol=0)
        # greedy decoding restricted to the action tokens == the official unrestricted greedy decoding
        tokens = _greedy_tokens(model, inputs)[0]
        assert np.all((reference["generated_ids"] >= lo) & (reference["generated_ids"] < hi))
        assert np.array_equal(tokens.numpy(), reference["generated_ids"])
        unrestricted = model.generate(**inputs, max_new_tokens=7, do_sample=False)[0, -7:]
        assert np.array_equal(unrestricted.numpy(), reference["generated_ids"])
        for unnorm_key in checkpoints[variant]["unnorm_keys"]:
            expected = reference["actions"] if unnorm_key == "bridge_orig" else official_reference_predict(path, image, INSTRUCTION, unnorm_key)["actions"]
            actions = model.predict_action(**inputs, unnorm_key=unnorm_key)
            assert actions.dtype == torch.float32
            assert np.array_equal(actions[0].numpy(), expected.astype(np.float32)), unnorm_key
        actions_per_image.append(actions[0])
    assert not torch.equal(actions_per_image[2], actions_per_image[3])  # all black and all white differ


def test_batched_predict_action_equals_per_sample_calls(loaded):
    model, processor = loaded["fused"]
    images = _images()
    instructions = ["pick up the red block", "open the drawer", "put the blue cup on the green plate and close the drawer", "move left"]
    batch = processor(images=images, text=instructions)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 1  # rows of different lengths: left padding is used
    batched = model.predict_action(**batch, unnorm_key="fractal20220817_data")
    single = torch.cat([model.predict_action(**processor(images=i, text=t), unnorm_key="fractal20220817_data") for i, t in zip(images, instructions, strict=True)])
    assert torch.equal(batched, single)


def test_both_binning_schemes_decode_as_their_formulas(loaded, checkpoints):
    model, _ = loaded["fused"]
    reference_model = OpenVLAForActionPrediction(OpenVLAConfig.small_config(image_size=28, vision_dim=32, hidden_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=600))
    assert model.config.action_binning == model.action_tokenizer.scheme == "openvla"
    assert reference_model.config.action_binning == reference_model.action_tokenizer.scheme == "reference"
    bins = np.arange(256)
    edges = np.linspace(-1, 1, 256)
    centres = (edges[:-1] + edges[1:]) / 2
    np.testing.assert_array_equal(detokenize_actions(bins, scheme="openvla"), centres[np.minimum(bins, 254)].astype(np.float32))
    np.testing.assert_array_equal(detokenize_actions(bins, scheme="reference"), (-1 + bins / 255 * 2).astype(np.float32))
    # official un-normalisation (float64, as the official code) rounded once to float32
    stats = checkpoints["fused"]["norm_stats"]["bridge_orig"]["action"]
    tokenizer = model.action_tokenizer
    token_ids = np.array([[tokenizer.action_token_end - 1 - b for b in (0, 17, 128, 200, 254, 255, 3)]])
    index = np.clip(tokenizer.action_token_end - token_ids - 1, 0, 254)
    low, high, mask = np.array(stats["q01"]), np.array(stats["q99"]), np.array(stats["mask"])
    official = np.where(mask, 0.5 * (centres[index] + 1) * (high - low) + low, centres[index])
    np.testing.assert_array_equal(tokenizer.decode(token_ids, "bridge_orig"), official.astype(np.float32))
    reference_tokenizer = ActionTokenizer(num_action_bins=256, action_token_end=tokenizer.action_token_end, scheme="reference", norm_stats=checkpoints["fused"]["norm_stats"])
    assert not np.array_equal(reference_tokenizer.decode(token_ids, "bridge_orig"), tokenizer.decode(token_ids, "bridge_orig"))


# --- conversion -------------------------------------------------------------------------------------------------------
LOAD_AND_PREDICT = """
import json, sys
import numpy as np
from PIL import Image
from transformers import AutoModel, AutoProcessor

folder, images_file, output_file = sys.argv[1:4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
images = [Image.fromarray(array) for array in np.load(images_file)]
inputs = processor(images=images, text=["pick up the red block"] * len(images))
actions = {key: model.predict_action(**inputs, unnorm_key=key).numpy() for key in model.config.norm_stats}
np.savez(output_file, **actions)
"""


def test_converted_folder_loads_with_auto_classes_and_predicts_the_official_actions(checkpoints, tmp_path):
    source = checkpoints["fused"]["path"]
    converted = tmp_path / "converted"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    environment["PYTHONPATH"] = os.pathsep.join(p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != str(REPO))
    script = REPO / "scripts" / "convert_openvla_checkpoint.py"
    result = subprocess.run(
        [sys.executable, str(script), "--src", str(source), "--dst", str(converted), "--verify"],
        cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert '"verified": true' in result.stdout
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md", "generation_config.json",
                 "configuration_openvla.py", "modeling_openvla.py", "processing_openvla.py"):
        assert (converted / name).exists(), name
    config = json.loads((converted / "config.json").read_text())
    assert config["vision_layout"] == "timm" and config["action_binning"] == "openvla" and not set(OFFICIAL_CONFIG_KEYS) & set(config)
    assert config["norm_stats"] == checkpoints["fused"]["norm_stats"]
    from safetensors import safe_open

    with safe_open(converted / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert "vision_backbone.featurizer.encoder.layer.0.attention.q_proj.weight" in keys and not any(".blocks." in key for key in keys)

    images = [np.asarray(image.convert("RGB").resize((64, 48))) for image in _images()]
    np.save(tmp_path / "images.npy", np.stack(images))
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, str(converted), str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
        cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = np.load(tmp_path / "out.npz")
    for unnorm_key in checkpoints["fused"]["unnorm_keys"]:
        for index, array in enumerate(images):
            expected = official_reference_predict(source, Image.fromarray(array), INSTRUCTION, unnorm_key)["actions"]
            assert np.array_equal(predicted[unnorm_key][index], expected.astype(np.float32)), (unnorm_key, index)
