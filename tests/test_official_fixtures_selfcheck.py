"""Sanity checks for the official-format fixture builder and the reference pipeline (tests/official_fixtures.py)."""

import json

import numpy as np
import pytest
import torch
from official_fixtures import (
    BASE_VOCAB_SIZE,
    PROMPT_TEMPLATE,
    bf16_round,
    load_official_state_dict,
    make_official_checkpoint,
    make_test_image,
    official_reference_predict,
)


@pytest.fixture(scope="module")
def fused_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("openvla_fused")
    return make_official_checkpoint(path, fused=True, seed=0)


def test_build_is_deterministic(tmp_path):
    info_a = make_official_checkpoint(tmp_path / "a", seed=3)
    info_b = make_official_checkpoint(tmp_path / "b", seed=3)
    sd_a, sd_b = load_official_state_dict(info_a["path"]), load_official_state_dict(info_b["path"])
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    sd_c = load_official_state_dict(make_official_checkpoint(tmp_path / "c", seed=4)["path"])
    assert not torch.equal(sd_a["projector.fc1.weight"], sd_c["projector.fc1.weight"])


def test_official_layout(fused_ckpt):
    path = fused_ckpt["path"]
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    ):
        assert (path / name).exists(), name
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "openvla"
    assert cfg["timm_model_ids"] == ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
    assert cfg["text_config"]["vocab_size"] == BASE_VOCAB_SIZE + cfg["pad_to_multiple_of"]
    assert cfg["pad_token_id"] == cfg["text_config"]["pad_token_id"] == BASE_VOCAB_SIZE
    assert set(cfg["norm_stats"]) == {"bridge_orig", "fractal20220817_data"}
    for stats in cfg["norm_stats"].values():
        assert stats["action"]["mask"] == [True] * 6 + [False]
        assert all(len(stats["action"][k]) == 7 for k in ("q01", "q99", "mean", "std", "min", "max", "mask"))

    keys = set(fused_ckpt["state_dict_keys"])
    f, ff = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."
    for k in (
        "cls_token",
        "reg_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "norm.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.ls1.scale_factor",
        "blocks.0.ls2.scale_factor",
    ):
        assert f + k in keys, k
    assert not any(k.endswith(".gamma") for k in keys)
    assert not any(k.startswith(ff + "cls_token") or ".ls1." in k for k in keys if k.startswith(ff))
    for k in (
        "attn_pool.latent",
        "attn_pool.q.weight",
        "attn_pool.kv.weight",
        "attn_pool.proj.weight",
        "attn_pool.mlp.fc1.weight",
        "attn_pool.norm.weight",
        "norm.weight",
        "pos_embed",
    ):
        assert ff + k in keys, k
    for k in (
        "projector.fc1.weight",
        "projector.fc2.weight",
        "projector.fc3.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
    ):
        assert k in keys
    sd = load_official_state_dict(path)
    assert sd[f + "reg_token"].shape == (1, 4, 32)
    assert sd[f + "pos_embed"].shape == (1, 16, 32)  # no_embed_class: no cls/reg position
    assert sd[ff + "pos_embed"].shape == (1, 16, 48)
    assert sd[ff + "blocks.0.mlp.fc1.weight"].shape == (179, 48)
    assert sd["projector.fc1.weight"].shape == (4 * 80, 80)
    assert sd["projector.fc2.weight"].shape == (64, 320)
    assert sd["language_model.lm_head.weight"].shape == (576, 64)
    ls = sd[f + "blocks.0.ls1.scale_factor"]
    assert (ls > 0).all() and ls.std() > 0.05  # LayerScale is random and matters

    pp = json.loads((path / "preprocessor_config.json").read_text())
    assert pp["tvf_normalize_params"][0]["mean"] == [0.484375, 0.455078125, 0.40625]
    assert pp["tvf_normalize_params"][0]["std"] == [0.228515625, 0.2236328125, 0.224609375]
    assert pp["means"][0] == [0.485, 0.456, 0.406]
    assert bf16_round([0.5]) == [0.5]


def test_tokenizer_matches_transformers_autotokenizer(fused_ckpt):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = fused_ckpt["path"]
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(path))
    assert hf.pad_token_id == fused_ckpt["pad_token_id"] == BASE_VOCAB_SIZE
    assert len(hf) == BASE_VOCAB_SIZE + 1
    empty = fused_ckpt["empty_token_id"]
    assert raw.id_to_token(empty) == "▁"
    lo, hi = fused_ckpt["action_token_ids"]
    for instr in ("pick up the red block", "open the drawer", "Put it in the bowl!"):
        prompt = PROMPT_TEMPLATE.format(instruction=instr)
        ids = raw.encode(prompt).ids
        assert ids[0] == 1 and ids[-1] != empty
        assert hf(prompt).input_ids == ids
        assert all(not (lo <= i < hi) for i in ids)
        assert 3 in ids  # "\n" -> <0x0A> byte-fallback token
    assert raw.encode("Out: ").ids[-1] == empty


def test_reference_prediction(fused_ckpt):
    path = fused_ckpt["path"]
    img = make_test_image(0)
    out = official_reference_predict(path, img, "pick up the red block", "bridge_orig")
    p = fused_ckpt["num_patches"]
    assert out["pixel_values"].shape == (1, 6, 56, 56)
    assert out["patch_features"].shape == (1, p, 80)
    assert out["projected"].shape == (1, p, 64)
    T = out["input_ids"].shape[1]
    assert out["input_ids"][0, -1].item() == fused_ckpt["empty_token_id"]
    assert out["inputs_embeds"].shape == (1, 1 + p + T - 1, 64)
    assert out["first_step_logits"].shape == (1, 576)
    lo, hi = fused_ckpt["action_token_ids"]
    assert len(out["generated_ids"]) == 7
    assert all(lo <= t < hi for t in out["action_token_ids"])
    assert min(out["step_margins"]) > 1e-3  # no near-ties -> stable token comparisons
    assert np.all(np.abs(out["normalized_actions"]) < 1)
    assert out["actions"].shape == (7,)
    # gripper dim (mask False) stays normalized
    assert out["actions"][6] == out["normalized_actions"][6]

    # both unnorm keys work and differ on masked dims
    out2 = official_reference_predict(path, img, "pick up the red block", "fractal20220817_data")
    assert np.array_equal(out["action_token_ids"], out2["action_token_ids"])
    assert not np.allclose(out["actions"][:6], out2["actions"][:6])
    with pytest.raises(AssertionError):
        official_reference_predict(path, img, "pick up the red block", None)

    # an explicit prompt that already ends with the empty token is not extended
    ids = out["input_ids"][0].tolist()
    out3 = official_reference_predict(path, img, "pick up the red block", "bridge_orig", input_ids=ids)
    assert out3["input_ids"].tolist() == out["input_ids"].tolist()
    assert np.array_equal(out3["action_token_ids"], out["action_token_ids"])


def test_reference_depends_on_inputs(fused_ckpt):
    path = fused_ckpt["path"]
    black = official_reference_predict(path, make_test_image(color=(0, 0, 0)), "open the drawer", "bridge_orig")
    white = official_reference_predict(path, make_test_image(color=(255, 255, 255)), "open the drawer", "bridge_orig")
    assert not torch.allclose(black["patch_features"], white["patch_features"])
    assert not torch.allclose(black["first_step_logits"], white["first_step_logits"])
    seqs = {tuple(black["action_token_ids"]), tuple(white["action_token_ids"])}
    for seed in range(3):
        o = official_reference_predict(path, make_test_image(seed), "pick up the red block", "bridge_orig")
        seqs.add(tuple(o["action_token_ids"]))
    assert len(seqs) >= 3


@pytest.mark.parametrize("backbone", ["dinov2-vit-l", "siglip-vit-so400m"])
def test_single_backbone_and_sharded(tmp_path, backbone):
    info = make_official_checkpoint(
        tmp_path, fused=False, single_backbone=backbone, sharded=True, seed=1, include_maskless_dataset=True
    )
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert "projector.fc3.weight" not in info["state_dict_keys"]
    out = official_reference_predict(tmp_path, make_test_image(1), "move the cup left", "maskless_dataset")
    assert out["pixel_values"].shape == (1, 3, 56, 56)
    # without a mask every dim (incl. gripper) is un-normalized
    stats = info["norm_stats"]["maskless_dataset"]["action"]
    expected = 0.5 * (out["normalized_actions"] + 1) * (np.array(stats["q99"]) - np.array(stats["q01"])) + np.array(
        stats["q01"]
    )
    assert np.array_equal(out["actions"], expected)


@pytest.mark.parametrize("strategy", ["letterbox", "resize-crop"])
def test_other_resize_strategies(tmp_path, strategy):
    make_official_checkpoint(tmp_path, image_resize_strategy=strategy)
    out = official_reference_predict(tmp_path, make_test_image(2, size=(90, 40)), "open the drawer", "bridge_orig")
    assert out["pixel_values"].shape == (1, 6, 56, 56)
