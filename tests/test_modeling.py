"""OpenVLAForActionPrediction: shapes, loss, image dependence, batching, RoPE switch, errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import INSTRUCTIONS, assert_equal_up_to_float_rounding, make_model, make_processor, random_images
from PIL import Image

from configuration_openvla import OpenVLAConfig
from modeling_openvla import IdentityRotaryEmbedding, OpenVLAForActionPrediction, vla_loss
from processing_openvla import compute_action_stats

ACTIONS = np.random.default_rng(0).uniform(-1, 1, size=(3, 7))


def test_forward_shapes_small_config(tokenizer, processor):
    model = make_model(tokenizer)
    batch = processor(images=random_images(3), text=INSTRUCTIONS, actions=ACTIONS)
    output = model(**batch)
    assert output.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert output.action_logits.shape == (3, 7, 256)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    assert model.encode_image(batch["pixel_values"]).shape == (3, 16, 64)


def test_forward_shapes_reference_config_on_meta_device():
    config = OpenVLAConfig.recommended_defaults()
    with torch.device("meta"):
        model = OpenVLAForActionPrediction(config)
        input_ids = torch.full((2, 1 + config.num_patches + 12), 5)
        input_ids[:, 1 : 1 + config.num_patches] = config.image_token_id
        pixel_values = torch.zeros(2, 3, 224, 224)
        assert model.encode_image(pixel_values).shape == (2, 256, 384)
        assert model(input_ids=input_ids, pixel_values=pixel_values).logits.shape == (2, input_ids.shape[1], 32000)
    assert config.param_count() == sum(p.numel() for p in model.parameters())


def test_encode_image_is_second_to_last_layer_patch_tokens(tokenizer, processor):
    model = make_model(tokenizer)
    pixel_values = processor.image_processor(random_images(2), return_tensors="pt")["pixel_values"]
    hidden_states = model.vision_backbone.featurizer(pixel_values, output_hidden_states=True).hidden_states
    torch.testing.assert_close(model.encode_image(pixel_values), hidden_states[-2][:, 1:])


def test_vla_loss_is_mean_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 7, 256), torch.randint(0, 256, (4, 7))
    expected = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
    torch.testing.assert_close(vla_loss(logits, targets), expected)
    # Under gradient accumulation / data parallelism the Trainer passes the global target count.
    torch.testing.assert_close(vla_loss(logits, targets, num_items_in_batch=56), expected * 28 / 56)
    with pytest.raises(ValueError, match="disagree"):
        vla_loss(logits, targets[:, :6])


def test_forward_loss_is_vla_loss_on_the_action_tokens_only(tokenizer, processor):
    model = make_model(tokenizer)
    batch = processor(images=random_images(3), text=INSTRUCTIONS, actions=ACTIONS)
    output = model(**batch)
    target_bins = model.action_tokenizer.token_ids_to_bins(batch["labels"][:, -7:])
    torch.testing.assert_close(output.loss, vla_loss(output.action_logits, target_bins))
    # The action logits are the bin slice of the LM logits at the positions that predict each action token.
    start, end = model.action_tokenizer.action_token_start, model.action_tokenizer.action_token_end
    torch.testing.assert_close(output.action_logits, output.logits[:, -8:-1, start:end].flip(-1))
    # Changing the prompt changes nothing in how the loss is taken: still 7 targets per row, no prompt target.
    bad = batch["labels"].clone()
    bad[:, 3] = 5
    with pytest.raises(ValueError, match="supervise 7 action tokens"):
        model(**{**batch, "labels": bad})
    bad = batch["labels"].clone()
    bad[:, -1] = 5
    with pytest.raises(ValueError, match="labels must be action tokens"):
        model(**{**batch, "labels": bad})


def test_training_forward_skips_the_lm_logits_unless_asked(tokenizer, processor):
    model = make_model(tokenizer)
    batch = processor(images=random_images(2), text=INSTRUCTIONS[:2], actions=ACTIONS[:2])
    evaluated = model(**batch)
    model.train()
    trained = model(**batch)
    assert trained.logits is None  # the loss only needs the action-bin logits
    torch.testing.assert_close(trained.loss, evaluated.loss)
    torch.testing.assert_close(trained.action_logits, evaluated.action_logits)
    torch.testing.assert_close(model(**batch, logits_to_keep=0).logits, evaluated.logits)
    assert model(**batch, logits_to_keep=1).logits.shape == (2, 1, len(tokenizer))
    assert model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits.shape[1] == batch["input_ids"].shape[1]



def test_actions_depend_on_the_image(tokenizer, processor):
    model = make_model(tokenizer)
    black, white = Image.new("RGB", (64, 64), "black"), Image.new("RGB", (64, 64), "white")
    batch = processor(images=[black, white], text=[INSTRUCTIONS[0]] * 2, actions=np.zeros((2, 7)))
    action_logits = model(**batch).action_logits
    assert not torch.allclose(action_logits[0], action_logits[1], atol=1e-4)
    logits = model.predict_action_logits(**processor(images=[black, white], text=[INSTRUCTIONS[0]] * 2))
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)


@pytest.mark.parametrize("rope", [False, True])
def test_batched_prediction_equals_single_samples(tokenizer, processor, rope):
    model = make_model(tokenizer, rope=rope)
    images = random_images(3, seed=1)
    batch_logits = model.predict_action_logits(**processor(images=images, text=INSTRUCTIONS))
    batch_actions = model.predict_action(**processor(images=images, text=INSTRUCTIONS))
    assert batch_actions.shape == (3, 7) and batch_actions.dtype == torch.float32
    for index, (image, instruction) in enumerate(zip(images, INSTRUCTIONS)):
        single = processor(images=image, text=instruction)
        torch.testing.assert_close(model.predict_action_logits(**single)[0], batch_logits[index], atol=1e-5, rtol=1e-5)
        assert torch.equal(model.predict_action(**single)[0], batch_actions[index])


def test_predicted_actions_are_greedy_bins_decoded(tokenizer, processor):
    model = make_model(tokenizer)
    inputs = processor(images=random_images(2), text=INSTRUCTIONS[:2])
    bins = model.predict_action_logits(**inputs).argmax(-1)
    expected = -1 + bins.float() / 255 * 2
    torch.testing.assert_close(model.predict_action(**inputs), expected)
    generated = model.generate(**inputs, max_new_tokens=7, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 7)


def test_rope_false_removes_position_information(tokenizer, processor):
    batch = processor(images=random_images(2), text=INSTRUCTIONS[:2], actions=ACTIONS[:2])
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    for rope, position_free in [(False, True), (True, False)]:
        model = make_model(tokenizer, rope=rope)
        assert isinstance(model.language_model.model.rotary_emb, IdentityRotaryEmbedding) is position_free
        stretched = model(**batch, position_ids=positions * 3).action_logits  # changes relative distances too
        assert torch.allclose(model(**batch, position_ids=positions).action_logits, stretched, atol=1e-6) is position_free


def test_unnormalisation_and_unnorm_key_errors(tokenizer, processor):
    rng = np.random.default_rng(0)
    stats = {name: compute_action_stats(rng.normal(offset, 1.0, (100, 7))) for name, offset in [("a", 10.0), ("b", -10.0)]}
    inputs = processor(images=random_images(1), text=INSTRUCTIONS[0])
    normalised = make_model(tokenizer).predict_action(**inputs)
    assert normalised.abs().max() <= 1
    one = make_model(tokenizer, norm_stats={"a": stats["a"]})
    torch.testing.assert_close(one.predict_action(**inputs), one.predict_action(**inputs, unnorm_key="a"))
    several = make_model(tokenizer, norm_stats=stats)
    # Expected from the predicted bins and the formulas: a = -1 + 2b / 255, raw = q01 + (a + 1) / 2 * (q99 - q01).
    for model, key in ((one, "a"), (several, "b")):
        normalised = -1.0 + 2.0 * model.predict_action_logits(**inputs).argmax(-1).numpy() / 255.0
        low, high = (np.array(stats[key]["action"][bound], dtype=np.float64) for bound in ("q01", "q99"))
        expected = low + (normalised + 1.0) / 2.0 * (high - low)
        np.testing.assert_allclose(model.predict_action(**inputs, unnorm_key=key).numpy(), expected, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match=r"several datasets \['a', 'b'\]"):
        several.predict_action(**inputs)
    with pytest.raises(ValueError, match=r"unnorm_key='c' is not in norm_stats; known keys: \['a', 'b'\]"):
        several.predict_action(**inputs, unnorm_key="c")


def test_wrong_pixel_values_raise(tokenizer, processor):
    model = make_model(tokenizer)
    inputs = processor(images=random_images(1), text=INSTRUCTIONS[0])
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, 56, 56\].*\(1, 3, 112, 112\)"):
        model(**{**inputs, "pixel_values": torch.zeros(1, 3, 112, 112)})
    with pytest.raises(ValueError, match=r"\(1, 4, 56, 56\)"):
        model(**{**inputs, "pixel_values": torch.zeros(1, 4, 56, 56)})
    with pytest.raises(ValueError, match="image placeholders"):
        model(input_ids=inputs["input_ids"][:, 3:], pixel_values=inputs["pixel_values"])


@pytest.mark.parametrize("decoding", ["autoregressive", "parallel"])
def test_vision_features_train_like_the_pixels_they_come_from(tokenizer, processor, decoding):
    """With the vision backbone frozen, a training forward on `encode_image`'s features gives the loss and gradients of
    the same forward on the pixels."""
    batch = processor(images=random_images(3), text=INSTRUCTIONS, actions=ACTIONS)
    model = make_model(tokenizer, action_decoding=decoding).train()
    model.vision_backbone.requires_grad_(False)
    with torch.no_grad():
        features = model.encode_image(batch["pixel_values"])
    cached = {**{key: value for key, value in batch.items() if key != "pixel_values"}, "vision_features": features}
    results = []
    for inputs in (batch, cached):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}))
    (pixel_loss, pixel_grads), (feature_loss, feature_grads) = results
    torch.testing.assert_close(feature_loss, pixel_loss)
    assert pixel_grads.keys() == feature_grads.keys() and any(name.startswith("projector.") for name in pixel_grads)
    for name in pixel_grads:
        torch.testing.assert_close(feature_grads[name], pixel_grads[name], msg=name)


def test_wrong_vision_features_raise(tokenizer, processor):
    model = make_model(tokenizer)
    inputs = processor(images=random_images(2), text=INSTRUCTIONS[:2])
    features = model.encode_image(inputs["pixel_values"])
    text_inputs = {key: value for key, value in inputs.items() if key != "pixel_values"}
    assert features.shape == (2, 16, 64)
    with pytest.raises(ValueError, match=r"\[batch, 16, 64\].*\(2, 16, 32\); compute them with model.encode_image"):
        model(**text_inputs, vision_features=features[..., :32])
    with pytest.raises(ValueError, match=r"\[batch, 16, 64\].*torch.int64 \(2, 16, 64\)"):
        model(**text_inputs, vision_features=features.long())
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, vision_features=features)
    with pytest.raises(ValueError, match="Got 1 images for 2 rows"):
        model(**text_inputs, vision_features=features[:1])
    with pytest.raises(ValueError, match="neither pixel_values nor vision_features"):
        model(**text_inputs)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, processor):
    batch = processor(images=random_images(2), text=INSTRUCTIONS[:2], actions=ACTIONS[:2])
    gradients = []
    for checkpointing in (False, True):
        model = make_model(tokenizer).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**batch).loss.backward()
        gradients.append(model.projector.fc1.weight.grad.clone())
    torch.testing.assert_close(gradients[0], gradients[1])


def test_loads_in_bfloat16_with_device_map(tokenizer, processor, tmp_path):
    make_model(tokenizer).save_pretrained(tmp_path)
    model = OpenVLAForActionPrediction.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="auto")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "sdpa"
    actions = model.predict_action(**processor(images=random_images(2), text=INSTRUCTIONS[:2]))
    assert actions.shape == (2, 7) and torch.isfinite(actions).all()


def test_saved_weights_keep_the_module_names(tokenizer, tmp_path):
    from safetensors.torch import load_file

    model = make_model(tokenizer)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(model.state_dict())
    assert not model.load_state_dict(saved, strict=False).missing_keys


def test_new_dinov2_tower_starts_with_sincos_positions_and_loading_replaces_them(tokenizer, tmp_path):
    from modeling_openvla import sincos_2d_positions

    model = make_model(tokenizer)
    positions = model.vision_backbone.featurizer.embeddings.position_embeddings
    torch.testing.assert_close(positions[0, 1:], sincos_2d_positions(4, 64))
    with torch.no_grad():
        positions.mul_(3.0)
    model.save_pretrained(tmp_path)
    reloaded = OpenVLAForActionPrediction.from_pretrained(tmp_path)
    assert torch.equal(reloaded.vision_backbone.featurizer.embeddings.position_embeddings, positions)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_positions(4, 30)


def test_new_model_starts_with_ordinal_action_embeddings_and_loading_replaces_them(tokenizer, tmp_path):
    from modeling_openvla import sincos_1d_positions

    model = make_model(tokenizer)
    action_tokenizer = model.action_tokenizer
    rows = slice(action_tokenizer.action_token_start, action_tokenizer.action_token_end)
    bins = model.get_output_embeddings().weight[rows].flip(0)  # bin 0 first
    width, num_bins = bins.shape[1], model.config.num_action_bins
    expected = sincos_1d_positions(torch.arange(num_bins), width, base=num_bins) * (model.config.text_config.initializer_range * 2**0.5)
    torch.testing.assert_close(bins, expected)
    torch.testing.assert_close(model.get_input_embeddings().weight[rows].flip(0), expected)
    similarity = torch.nn.functional.cosine_similarity(bins[num_bins // 2], bins, dim=-1)
    assert similarity[num_bins // 2 + 1] > similarity[num_bins // 2 + 10] > similarity[-1]
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    model.save_pretrained(tmp_path)
    reloaded = OpenVLAForActionPrediction.from_pretrained(tmp_path)
    assert torch.equal(reloaded.get_output_embeddings().weight, model.get_output_embeddings().weight)
    with pytest.raises(ValueError, match="even width"):
        sincos_1d_positions(torch.arange(4), 7)


def test_fan_in_weight_init_starts_every_layer_at_unit_gain_and_loading_replaces_it(tokenizer, tmp_path):
    """Every linear and convolution weight but the LM head's gets std 1 / sqrt(fan_in); the ordinal action-token rows
    of the head are scaled the same way (std 1 / sqrt(width) instead of the initializer's 0.02)."""
    standard = make_model(tokenizer, vision_num_layers=2)
    model = make_model(tokenizer, weight_init="fan_in", vision_num_layers=2)
    assert len(model.vision_backbone.featurizer.encoder.layer) == 2
    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m is not head]
    assert len(layers) > 20
    for layer in layers:
        weight = layer.weight
        if weight.numel() >= 4096:
            assert abs(weight.std().item() * weight[0].numel() ** 0.5 - 1) < 0.1
    assert abs(standard.projector.fc1.weight.std().item() - 0.02) < 0.002  # the transformers initialiser
    action_tokenizer = model.action_tokenizer
    rows = slice(action_tokenizer.action_token_start, action_tokenizer.action_token_end)
    standard_head = standard.get_output_embeddings().weight
    assert torch.equal(head.weight[: rows.start], standard_head[: rows.start])  # the LM head keeps its initialiser
    width = head.weight.shape[1]
    torch.testing.assert_close(head.weight[rows], standard_head[rows] * (width**-0.5 / model.config.text_config.initializer_range))
    model.save_pretrained(tmp_path)
    reloaded = OpenVLAForActionPrediction.from_pretrained(tmp_path).eval()
    assert reloaded.config.weight_init == "fan_in"
    batch = make_processor(tokenizer)(images=random_images(2), text=INSTRUCTIONS[:2])
    with torch.no_grad():
        assert_equal_up_to_float_rounding(reloaded(**batch).logits, model(**batch).logits)


COORDCONV_STEM = {"patch_size": 8, "vision_stem": "coordconv"}


def test_conv_stem_keeps_the_patch_grid_starts_with_he_init_and_round_trips(tokenizer, tmp_path):
    stem = COORDCONV_STEM
    from modeling_openvla import OpenVLAConvStem

    model = make_model(tokenizer, **stem)
    conv_stem = model.vision_backbone.featurizer.embeddings.patch_embeddings.projection
    assert isinstance(conv_stem, OpenVLAConvStem)
    convs = [conv for conv in conv_stem if isinstance(conv, torch.nn.Conv2d)]
    assert [conv.out_channels for conv in convs] == [16, 32, 64, 64]
    assert convs[0].in_channels == 5  # RGB + the pixel's x and y
    first = conv_stem[0].weight
    assert abs(first.std().item() / (2 / first[0].numel()) ** 0.5 - 1) < 0.15  # He, not the tower's std of 0.02
    pixels = torch.randn(2, 3, 56, 56)
    assert conv_stem(pixels).shape == (2, 64, 7, 7)
    assert model.vision_backbone(pixels).shape == (2, model.config.num_patches, 64) == (2, 49, 64)
    model.save_pretrained(tmp_path)
    reloaded = OpenVLAForActionPrediction.from_pretrained(tmp_path).eval()
    assert reloaded.config.vision_stem == stem["vision_stem"]
    batch = make_processor(tokenizer, patch_size=8)(images=random_images(2), text=INSTRUCTIONS[:2])
    with torch.no_grad():
        assert_equal_up_to_float_rounding(reloaded(**batch).logits, model(**batch).logits)


# Weights left out of a checkpoint in the test below: one of each start that `initialize_weights` gives.
LEFT_OUT = {
    "vision_backbone.featurizer.embeddings.position_embeddings": "sine-cosine",
    "vision_backbone.featurizer.embeddings.patch_embeddings.projection.0.weight": "random",
    "vision_backbone.featurizer.embeddings.patch_embeddings.projection.0.bias": "zero",
    "vision_backbone.featurizer.encoder.layer.0.attention.q_proj.weight": "random",
    "projector.fc1.weight": "random",
    "language_model.model.layers.0.mlp.gate_proj.weight": "random",
    "language_model.model.embed_tokens.weight": "random except the ordinal action rows",
    "language_model.lm_head.weight": "random except the ordinal action rows",
}


@pytest.mark.parametrize("weight_init", ["standard", "fan_in"])
def test_weights_a_checkpoint_lacks_start_as_in_a_model_built_from_config(tokenizer, tmp_path, weight_init):
    """`from_pretrained` starts the weights a checkpoint lacks with the same rules as a model built from its config
    (the coordconv stem's He initialisation, `fan_in`, sine-cosine positions, ordinal action rows), and leaves every
    loaded weight as saved."""
    from safetensors.torch import load_file, save_file

    built = make_model(tokenizer, weight_init=weight_init, **COORDCONV_STEM)
    built.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert set(LEFT_OUT) <= set(weights)
    save_file({name: value for name, value in weights.items() if name not in LEFT_OUT}, tmp_path / "model.safetensors", {"format": "pt"})
    torch.manual_seed(1)
    loaded = OpenVLAForActionPrediction.from_pretrained(tmp_path).state_dict()
    expected = built.state_dict()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected if name not in LEFT_OUT)
    action_tokenizer = built.action_tokenizer
    action_rows = torch.zeros(len(tokenizer), dtype=torch.bool)
    action_rows[action_tokenizer.action_token_start : action_tokenizer.action_token_end] = True
    for name, start in LEFT_OUT.items():
        if start in ("sine-cosine", "zero"):
            assert torch.equal(loaded[name], expected[name]), name
            continue
        rows = ~action_rows if start.endswith("rows") else slice(None)
        if start.endswith("rows"):
            assert torch.equal(loaded[name][action_rows], expected[name][action_rows]), name
        ratio = (loaded[name][rows].std() / expected[name][rows].std()).item()
        assert 0.9 < ratio < 1.1 and not torch.equal(loaded[name], expected[name]), (name, ratio)


def test_action_tokenizer_is_built_once_and_follows_the_config(tokenizer):
    model = make_model(tokenizer)
    action_tokenizer = model.action_tokenizer
    assert model.action_tokenizer is action_tokenizer
    stats = {"a": compute_action_stats(np.eye(7)), "b": compute_action_stats(2 * np.eye(7))}
    model.config.norm_stats = {"a": stats["a"]}  # fine-tuning sets the statistics of its dataset
    assert model.action_tokenizer is not action_tokenizer and model.action_tokenizer.norm_stats == {"a": stats["a"]}
    model.config.norm_stats["b"] = stats["b"]
    assert model.action_tokenizer.norm_stats == stats
    model.config.norm_stats["b"] = stats["a"]
    assert model.action_tokenizer.norm_stats == {"a": stats["a"], "b": stats["a"]}
    model.config.num_action_bins = 128
    assert model.action_tokenizer.num_action_bins == 128


@pytest.mark.parametrize("stem, sees_where", [({"patch_size": 8}, False), (COORDCONV_STEM, True)], ids=["patch", "coordconv"])
def test_only_the_coordconv_stem_tells_apart_places_of_a_uniform_image(tokenizer, stem, sees_where):
    """A patch embedding is translation invariant, so every interior cell of a uniform image gets the same feature;
    the coordinate channels make each cell's feature say where it is."""
    conv_stem = make_model(tokenizer, **stem).vision_backbone.featurizer.embeddings.patch_embeddings.projection
    with torch.no_grad():
        features = conv_stem(torch.ones(1, 3, 56, 56))[0, :, 2:5, 2:5].flatten(1)  # [width, 9 interior cells]
    spread = (features - features[:, :1]).abs().max().item()
    assert (spread > 1e-3) == sees_where


@pytest.mark.parametrize("stem", [{}, COORDCONV_STEM], ids=["patch", "coordconv-stem"])
def test_actions_that_only_the_image_explains_are_learned(tokenizer, stem):
    """One instruction, 16 tabletop scenes, a random action per scene: a model that ignored the image could not get
    its loss below the entropy of 16 equally likely bins per dimension (ln 16 = 2.77); training must get far below."""
    from openvla_tools.envs.tabletop import TabletopEnv

    torch.manual_seed(0)
    model = make_model(tokenizer, **stem).train()
    processor = make_processor(tokenizer, patch_size=model.config.patch_size)
    env = TabletopEnv(image_size=56, num_objects=1)
    images = [env.reset(seed)[0] for seed in range(16)]
    actions = np.random.default_rng(0).uniform(-1, 1, (16, 7))
    processor.norm_stats = {"scenes": compute_action_stats(actions)}
    batch = processor.data_collator(
        [processor.process_example(image, "move to the red block", action, "scenes") for image, action in zip(images, actions)]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(80):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 1.5


def test_autoregressive_decoding_refuses_an_eos_among_the_action_tokens(tokenizer):
    """Generation may not stop before every action token: an EOS id that is an action token raises, never a short action."""
    model = make_model(tokenizer)
    processor = make_processor(tokenizer)
    inputs = processor(images=random_images(1), text=[INSTRUCTIONS[0]])
    tokenizer_ = model.action_tokenizer
    model.generation_config.eos_token_id = list(range(tokenizer_.action_token_start, tokenizer_.action_token_end))
    with pytest.raises(ValueError, match="stopped after 1 of"):
        model.predict_action(**inputs)
