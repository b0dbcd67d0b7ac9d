"""The continuous action head (`action_head="l1_regression"`, OpenVLA-OFT): shapes, loss, training, batching,
unnormalisation, save/load, parameter count and configuration errors."""

import numpy as np
import pytest
import test_parallel_decoding as parallel
import torch
from conftest import assert_equal_up_to_float_rounding
from test_parallel_decoding import ACTION_DIM, INSTRUCTIONS, random_actions

from configuration_openvla import OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction, regression_loss
from processing_openvla import (
    ActionTokenizer,
    compute_action_stats,
    detokenize_actions,
    tokenize_actions,
    unnormalize_actions,
)

# The parallel-decoding tests' module fixtures: the shipped tokenizer, a 56 px processor, three random images.
tokenizer, processor, images = parallel.tokenizer, parallel.processor, parallel.images
pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(tokenizer, chunk=1, seed=0, **overrides) -> OpenVLAForActionPrediction:
    return parallel.make_model(tokenizer, "parallel", chunk, seed, action_head="l1_regression", **overrides)


@pytest.mark.parametrize("chunk", [1, 3])
def test_regression_head_shapes(tokenizer, processor, images, chunk):
    model = make_model(tokenizer, chunk=chunk)
    inputs = processor(images=images[:2], text=INSTRUCTIONS[:2])
    expected = (2, ACTION_DIM) if chunk == 1 else (2, chunk, ACTION_DIM)
    with torch.no_grad():
        out = model(**inputs)
    assert out.loss is None and out.action_logits is None
    assert tuple(out.normalized_actions.shape) == expected
    actions = model.predict_action(**inputs)
    assert actions.dtype == torch.float32
    torch.testing.assert_close(actions, out.normalized_actions)  # no statistics: the actions stay normalised
    with pytest.raises(ValueError, match="predict_action"):
        model.predict_action_logits(**inputs)


@pytest.mark.parametrize("chunk", [1, 2])
def test_loss_is_l1_to_the_label_bins(tokenizer, processor, images, chunk):
    """The targets are the values of the label tokens' bins, within one bin width of the actions given."""
    model = make_model(tokenizer, chunk=chunk)
    actions = random_actions(3, chunk)
    with torch.no_grad():
        out = model(**processor(images=images, text=INSTRUCTIONS, actions=actions))
    target = detokenize_actions(tokenize_actions(actions))
    assert np.abs(target - actions).max() <= 2 / 255 + 1e-6
    torch.testing.assert_close(out.loss, regression_loss(out.normalized_actions, torch.as_tensor(target)))
    torch.testing.assert_close(out.loss, (out.normalized_actions - torch.as_tensor(target)).abs().mean())


def test_action_loss_weights_weigh_the_regression_error(tokenizer, processor, images):
    model = make_model(tokenizer, chunk=2, action_loss_weights=[0.0] * (ACTION_DIM - 1) + [1.0])
    actions = random_actions(3, 2)
    with torch.no_grad():
        out = model(**processor(images=images, text=INSTRUCTIONS, actions=actions))
    errors = (out.normalized_actions - torch.as_tensor(detokenize_actions(tokenize_actions(actions)))).abs()
    torch.testing.assert_close(out.loss, errors[..., -1].mean())  # weight 7 on one dimension of seven, mean 1


def test_regression_training_fits_the_actions(tokenizer, processor, images):
    model = make_model(tokenizer, chunk=2).train()
    actions = random_actions(3, 2, seed=3)
    batch = processor(images=images, text=INSTRUCTIONS, actions=actions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(60):
        loss = model(**batch).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    predicted = model.predict_action(**processor(images=images, text=INSTRUCTIONS))
    error = (predicted - torch.as_tensor(actions)).abs().mean().item()
    assert error < 0.2 * first, (first, error)


def test_batched_prediction_equals_single(tokenizer, processor, images):
    model = make_model(tokenizer, chunk=3, rope=True)
    batch = processor(images=images, text=INSTRUCTIONS)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) == len(INSTRUCTIONS)  # really padded
    actions = model.predict_action(**batch)
    for row, (image, instruction) in enumerate(zip(images, INSTRUCTIONS, strict=True)):
        torch.testing.assert_close(actions[row], model.predict_action(**processor(images=image, text=instruction))[0], atol=1e-5, rtol=0)


def test_predict_action_unnormalises_with_the_statistics(tokenizer, processor, images):
    model = make_model(tokenizer)
    stats = compute_action_stats(np.random.default_rng(1).normal(0, 3, (200, ACTION_DIM)))
    model.config.norm_stats = {"robot": stats}
    inputs = processor(images=images, text=INSTRUCTIONS)
    with torch.no_grad():
        normalized = model(**inputs).normalized_actions
    expected = torch.as_tensor(unnormalize_actions(normalized.numpy(), stats))
    torch.testing.assert_close(model.predict_action(**inputs), expected)
    torch.testing.assert_close(model.predict_action(**inputs, unnorm_key="robot"), expected)
    with pytest.raises(ValueError, match="elsewhere"):
        model.predict_action(**inputs, unnorm_key="elsewhere")


def test_save_load_keeps_the_head(tokenizer, processor, images, tmp_path):
    model = make_model(tokenizer, chunk=2)
    inputs = processor(images=images, text=INSTRUCTIONS)
    expected = model.predict_action(**inputs)
    model.save_pretrained(tmp_path)
    loaded = OpenVLAForActionPrediction.from_pretrained(tmp_path).eval()
    assert loaded.config.action_head == "l1_regression"
    assert torch.equal(loaded.action_head.fc2.weight, model.action_head.fc2.weight)  # saved and restored bit for bit
    assert_equal_up_to_float_rounding(loaded.predict_action(**inputs), expected)  # continuous actions: a reload


@pytest.mark.parametrize("chunk", [1, 4])
def test_param_count_is_exact(tokenizer, chunk):
    model = make_model(tokenizer, chunk=chunk)
    assert model.config.param_count() == sum(p.numel() for p in model.parameters())


def test_regression_head_needs_parallel_decoding():
    with pytest.raises(ValueError, match="action_decoding='parallel'"):
        OpenVLAConfig.small_config(action_head="l1_regression")
    with pytest.raises(ValueError, match="action_head='mse'"):
        OpenVLAConfig.small_config(action_decoding="parallel", action_head="mse")


@pytest.mark.parametrize("scheme", ["reference", "openvla"])
def test_nearest_bins_of_normalized_values(scheme):
    """`normalized_to_bins` (the eval bins of the regression head) gives each bin's own value back, a value just
    below or above a bin's value that bin, and the end bins beyond the range."""
    tokenizer = ActionTokenizer.from_config(OpenVLAConfig.small_config(action_binning=scheme))
    bins = np.arange(tokenizer.num_action_bins)
    values = tokenizer.bins_to_normalized_actions(bins)
    for shift in (0.0, -1e-4, 1e-4):
        np.testing.assert_array_equal(tokenizer.bins_to_normalized_actions(tokenizer.normalized_to_bins(values + shift)), values)
    assert tokenizer.normalized_to_bins(torch.tensor([-3.0, 3.0])).tolist() == [0, tokenizer.num_action_bins - 1]
