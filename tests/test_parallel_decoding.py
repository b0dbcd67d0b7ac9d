"""Parallel decoding (learned action queries, bidirectional among themselves) and its contracts with the
autoregressive mode: shapes, loss, attention structure, training, batching, save/load, parameter count."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from configuration_openvla import OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction, vla_loss
from processing_openvla import OpenVLAImageProcessor, OpenVLAProcessor, tokenize_actions

TOKENIZER_PATH = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
IMAGE_SIZE = 56
ACTION_DIM = 7
TINY = dict(
    hidden_dim=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    vision_dim=64,
    image_size=IMAGE_SIZE,
    dropout=0.0,
)
INSTRUCTIONS = [
    "pick up the red block and put it in the green bowl",
    "go left",
    "push the blue ball to the right",
]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_PATH)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return OpenVLAProcessor(image_processor=OpenVLAImageProcessor(image_size=IMAGE_SIZE), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) for _ in range(len(INSTRUCTIONS))]


def make_model(tokenizer, decoding="parallel", chunk=1, seed=0, **overrides) -> OpenVLAForActionPrediction:
    torch.manual_seed(seed)
    config = OpenVLAConfig.small_config(
        vocab_size=len(tokenizer), action_decoding=decoding, action_chunk_size=chunk, **{**TINY, **overrides}
    )
    return OpenVLAForActionPrediction(config).eval()


def random_actions(batch, chunk, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, ACTION_DIM) if chunk == 1 else (batch, chunk, ACTION_DIM)
    return rng.uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize("chunk", [1, 3])
def test_parallel_shapes(tokenizer, processor, images, chunk):
    model = make_model(tokenizer, chunk=chunk)
    inputs = processor(images=images[:2], text=INSTRUCTIONS[:2])
    seq = inputs["input_ids"].shape[1]
    bins = model.config.num_action_bins
    expected = (2, ACTION_DIM, bins) if chunk == 1 else (2, chunk, ACTION_DIM, bins)
    with torch.no_grad():
        out = model(**inputs)
    assert out.loss is None
    assert tuple(out.action_logits.shape) == expected
    # The action queries are appended after the prompt.
    assert tuple(out.logits.shape) == (2, seq + chunk * ACTION_DIM, len(tokenizer))
    assert tuple(model.predict_action_logits(**inputs).shape) == expected
    actions = model.predict_action(**inputs)
    assert tuple(actions.shape) == expected[:-1]
    assert actions.dtype == torch.float32
    assert actions.min() >= -1 and actions.max() <= 1


@pytest.mark.parametrize("decoding,chunk", [("parallel", 1), ("parallel", 3), ("autoregressive", 1)])
def test_loss_with_labels_is_vla_loss(tokenizer, processor, images, decoding, chunk):
    model = make_model(tokenizer, decoding, chunk)
    actions = random_actions(2, chunk)
    inputs = processor(images=images[:2], text=INSTRUCTIONS[:2], actions=actions)
    with torch.no_grad():
        out = model(**inputs)
    assert out.loss is not None and out.loss.ndim == 0
    target_bins = torch.as_tensor(tokenize_actions(actions, num_bins=model.config.num_action_bins))
    assert tuple(out.action_logits.shape) == (*target_bins.shape, model.config.num_action_bins)
    torch.testing.assert_close(out.loss, vla_loss(out.action_logits, target_bins))


@pytest.mark.parametrize("decoding,chunk", [("parallel", 3), ("autoregressive", 1)])
def test_action_loss_weights_weigh_each_dimension_in_every_action_of_a_chunk(tokenizer, processor, images, decoding, chunk):
    weights = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]
    plain, weighted = make_model(tokenizer, decoding, chunk), make_model(tokenizer, decoding, chunk, action_loss_weights=weights)
    actions = random_actions(3, chunk)
    inputs = processor(images=images, text=INSTRUCTIONS, actions=actions)
    with torch.no_grad():
        plain_out, weighted_out = plain(**inputs), weighted(**inputs)
    torch.testing.assert_close(weighted_out.action_logits, plain_out.action_logits)  # weights change the loss only
    target_bins = torch.as_tensor(tokenize_actions(actions, num_bins=plain.config.num_action_bins))
    logits = plain_out.action_logits.reshape(-1, plain.config.num_action_bins)
    cross_entropy = torch.nn.functional.cross_entropy(logits, target_bins.reshape(-1), reduction="none").view(target_bins.shape)
    # Scaled to mean 1: the first dimension counts 7/4, the last 21/4, the rest not at all.
    expected = (cross_entropy[..., 0] * 7 / 4 + cross_entropy[..., -1] * 21 / 4).sum() / cross_entropy.numel()
    torch.testing.assert_close(weighted_out.loss, expected)
    alike = make_model(tokenizer, decoding, chunk, action_loss_weights=[2.0] * ACTION_DIM)
    with torch.no_grad():
        torch.testing.assert_close(alike(**inputs).loss, plain_out.loss)


@pytest.mark.parametrize("weights", [[1.0] * (ACTION_DIM - 1), [0.0] * ACTION_DIM, [1.0] * (ACTION_DIM - 1) + [-1.0], [float("nan")] * ACTION_DIM])
def test_bad_action_loss_weights_raise(weights):
    with pytest.raises(ValueError, match="action_loss_weights"):
        OpenVLAConfig.small_config(**TINY, action_loss_weights=weights)


@pytest.mark.parametrize("rope", [False, True])
def test_parallel_training_logits_match_inference(tokenizer, processor, images, rope):
    """With labels the queries overwrite the action tokens: the label values never leak into the outputs, and the
    action logits equal those of inference, where the queries are appended after the prompt."""
    model = make_model(tokenizer, chunk=2, rope=rope)
    with torch.no_grad():
        train_a = model(**processor(images=images, text=INSTRUCTIONS, actions=random_actions(3, 2, seed=1)))
        train_b = model(**processor(images=images, text=INSTRUCTIONS, actions=random_actions(3, 2, seed=2)))
        inference = model.predict_action_logits(**processor(images=images, text=INSTRUCTIONS))
    torch.testing.assert_close(train_a.action_logits, train_b.action_logits, atol=0, rtol=0)
    assert not torch.equal(train_a.loss, train_b.loss)
    torch.testing.assert_close(train_a.action_logits, inference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_labels", [False, True])
def test_action_queries_are_bidirectional_and_hidden_from_the_prompt(tokenizer, processor, images, with_labels):
    """Perturbing the LAST action query changes the EARLIER action positions (bidirectional among the queries) but
    not a single prompt position, in any layer (causal over the prompt, queries invisible to it)."""
    chunk = 2
    num_queries = chunk * ACTION_DIM
    model = make_model(tokenizer, chunk=chunk)
    actions = random_actions(2, chunk) if with_labels else None
    inputs = processor(images=images[:2], text=INSTRUCTIONS[:2], actions=actions)
    with torch.no_grad():
        before = model(**inputs, output_hidden_states=True)
        model.action_queries.weight[-1].add_(torch.randn(model.config.hidden_dim))
        after = model(**inputs, output_hidden_states=True)

    seq = before.logits.shape[1]
    prompt = slice(0, seq - num_queries)  # the action positions are the last ones in both cases
    for layer_before, layer_after in zip(before.hidden_states, after.hidden_states, strict=True):
        torch.testing.assert_close(layer_before[:, prompt], layer_after[:, prompt], atol=1e-6, rtol=0)
    torch.testing.assert_close(before.logits[:, prompt], after.logits[:, prompt], atol=1e-6, rtol=0)

    logits_before = before.action_logits.reshape(2, num_queries, -1)
    logits_after = after.action_logits.reshape(2, num_queries, -1)
    for position in range(num_queries - 1):  # every earlier query, the very first one included
        assert (logits_before[:, position] - logits_after[:, position]).abs().amax() > 1e-4, position


def eager_attentions(tokenizer, processor, images, **options) -> tuple[dict, tuple[torch.Tensor, ...]]:
    """The inputs of two padded rows and a parallel-decoding model's attention weights on them (eager attention),
    each `[2, heads, seq, seq]`."""
    torch.manual_seed(0)
    config = OpenVLAConfig.small_config(vocab_size=len(tokenizer), action_decoding="parallel", **{**TINY, **options})
    model = OpenVLAForActionPrediction._from_config(config, attn_implementation="eager").eval()
    inputs = processor(images=images[:2], text=INSTRUCTIONS[:2])
    with torch.no_grad():
        return inputs, model(**inputs, output_attentions=True).attentions


def test_parallel_attention_pattern(tokenizer, processor, images):
    """The attention weights (eager) show the mask directly: causal over the prompt, full among the queries, padding
    invisible."""
    num_queries = 2 * ACTION_DIM
    inputs, attentions = eager_attentions(tokenizer, processor, images, action_chunk_size=2)
    for row in range(2):
        padding = int((inputs["attention_mask"][row] == 0).sum())
        for layer in attentions:
            weights = layer[row]  # [heads, seq, seq]
            seq = weights.shape[-1]
            queries = slice(seq - num_queries, seq)
            prompt_rows = weights[:, padding : seq - num_queries]
            assert torch.all(prompt_rows.triu(diagonal=padding + 1) == 0)  # nothing after the row itself
            assert torch.all(weights[:, queries, queries] > 0)  # every query sees every query
            assert torch.all(weights[:, queries, padding : seq - num_queries] > 0)  # ... and the whole prompt
            assert torch.all(weights[:, padding:, :padding] == 0)  # nobody real sees padding


def test_bidirectional_prefix_attention_pattern(tokenizer, processor, images):
    """With `prefix_attention="bidirectional"` every prefix token (image patches included) sees the whole prefix,
    the prompt after it too, but never the action queries; the queries see everything; padding stays invisible."""
    num_queries = ACTION_DIM
    inputs, attentions = eager_attentions(tokenizer, processor, images, prefix_attention="bidirectional")
    for row in range(2):
        padding = int((inputs["attention_mask"][row] == 0).sum())
        for layer in attentions:
            weights = layer[row]
            seq = weights.shape[-1]
            prefix = slice(padding, seq - num_queries)
            assert torch.all(weights[:, prefix, prefix] > 0)  # the first patch sees the last prompt token
            assert torch.all(weights[:, prefix, seq - num_queries :] == 0)
            assert torch.all(weights[:, seq - num_queries :, padding:] > 0)
            assert torch.all(weights[:, padding:, :padding] == 0)


def test_bidirectional_prefix_keeps_labels_out_and_batches(tokenizer, processor, images):
    """The label tokens (overwritten by the queries) reach no output, training logits equal inference, and a padded
    batch predicts what each sample predicts alone."""
    model = make_model(tokenizer, chunk=2, prefix_attention="bidirectional")
    with torch.no_grad():
        train_a = model(**processor(images=images, text=INSTRUCTIONS, actions=random_actions(3, 2, seed=1)))
        train_b = model(**processor(images=images, text=INSTRUCTIONS, actions=random_actions(3, 2, seed=2)))
        batch = model.predict_action_logits(**processor(images=images, text=INSTRUCTIONS))
    torch.testing.assert_close(train_a.action_logits, train_b.action_logits, atol=0, rtol=0)
    torch.testing.assert_close(train_a.action_logits, batch, atol=1e-5, rtol=1e-5)
    for row, (image, instruction) in enumerate(zip(images, INSTRUCTIONS, strict=True)):
        single = model.predict_action_logits(**processor(images=image, text=instruction))
        torch.testing.assert_close(batch[row], single[0], atol=1e-5, rtol=0)


def test_bidirectional_prefix_needs_parallel_decoding():
    with pytest.raises(ValueError, match="parallel"):
        OpenVLAConfig.small_config(prefix_attention="bidirectional")
    with pytest.raises(ValueError, match="prefix_attention"):
        OpenVLAConfig.small_config(action_decoding="parallel", prefix_attention="full")


def test_autoregressive_is_causal(tokenizer, processor, images):
    """Appending tokens never changes the logits of the earlier positions, and the predictions are sequential."""
    model = make_model(tokenizer, "autoregressive")
    prompt = processor(images=images[:1], text=INSTRUCTIONS[:1])
    with_actions = processor(images=images[:1], text=INSTRUCTIONS[:1], actions=random_actions(1, 1))
    other_actions = processor(images=images[:1], text=INSTRUCTIONS[:1], actions=random_actions(1, 1, seed=5))
    seq = prompt["input_ids"].shape[1]
    with torch.no_grad():
        short = model(input_ids=prompt["input_ids"], pixel_values=prompt["pixel_values"]).logits
        longer = model(input_ids=with_actions["input_ids"], pixel_values=with_actions["pixel_values"]).logits
        other = model(input_ids=other_actions["input_ids"], pixel_values=other_actions["pixel_values"]).logits
    assert longer.shape[1] == seq + ACTION_DIM
    torch.testing.assert_close(short, longer[:, :seq], atol=1e-5, rtol=1e-5)
    # Other action tokens change the logits from the first action position on, never before it.
    torch.testing.assert_close(longer[:, :seq], other[:, :seq], atol=1e-5, rtol=1e-5)
    assert (longer[:, seq:] - other[:, seq:]).abs().amax() > 1e-4
    assert model.action_queries is None


def test_parallel_training_lowers_loss(tokenizer, processor, images):
    torch.manual_seed(0)
    model = make_model(tokenizer, chunk=2).train()
    batch = processor(images=images, text=INSTRUCTIONS, actions=random_actions(3, 2, seed=3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = model(**batch).loss.item()
    assert np.isfinite(losses).all()
    assert final < 0.3 * losses[0], (losses[0], final)


@pytest.mark.parametrize(
    "decoding,chunk,rope",
    [("autoregressive", 1, False), ("autoregressive", 1, True), ("parallel", 1, False), ("parallel", 3, True)],
)
def test_batched_prediction_equals_single(tokenizer, processor, images, decoding, chunk, rope):
    """Instructions of different lengths are left-padded; every row of the batch equals the sample alone."""
    model = make_model(tokenizer, decoding, chunk, rope=rope)
    batch = processor(images=images, text=INSTRUCTIONS)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) == len(INSTRUCTIONS)  # really padded
    batch_logits = model.predict_action_logits(**batch)
    batch_actions = model.predict_action(**batch)
    for row, (image, instruction) in enumerate(zip(images, INSTRUCTIONS, strict=True)):
        single = processor(images=image, text=instruction)
        torch.testing.assert_close(batch_logits[row], model.predict_action_logits(**single)[0], atol=1e-5, rtol=0)
        assert torch.equal(batch_actions[row], model.predict_action(**single)[0])


@pytest.mark.parametrize("decoding,chunk", [("autoregressive", 1), ("parallel", 3)])
def test_save_load_keeps_mode(tokenizer, processor, images, tmp_path, decoding, chunk):
    model = make_model(tokenizer, decoding, chunk)
    inputs = processor(images=images, text=INSTRUCTIONS)
    expected = model.predict_action(**inputs)
    model.save_pretrained(tmp_path)
    loaded = OpenVLAForActionPrediction.from_pretrained(tmp_path).eval()
    assert loaded.config.action_decoding == decoding
    assert loaded.config.action_chunk_size == chunk
    assert (loaded.action_queries is None) == (decoding == "autoregressive")
    if loaded.action_queries is not None:
        assert torch.equal(loaded.action_queries.weight, model.action_queries.weight)
    assert torch.equal(loaded.predict_action(**inputs), expected)


@pytest.mark.parametrize(
    "decoding,chunk,extra",
    [("autoregressive", 1, {}), ("parallel", 1, {}), ("parallel", 4, {}), ("parallel", 4, {"tie_word_embeddings": True})],
)
def test_param_count_is_exact(tokenizer, decoding, chunk, extra):
    model = make_model(tokenizer, decoding, chunk, **extra)
    assert model.config.param_count() == sum(p.numel() for p in model.parameters())
    if decoding == "parallel":
        assert model.action_queries.weight.numel() == chunk * ACTION_DIM * model.config.hidden_dim


def test_parallel_labels_must_cover_the_chunk(tokenizer, processor, images):
    model = make_model(tokenizer, chunk=2)
    inputs = processor(images=images[:2], text=INSTRUCTIONS[:2], actions=random_actions(2, 1))  # 1 action, not 2
    with pytest.raises(ValueError, match="action_chunk_size"):
        model(**inputs)


def test_chunks_need_parallel_decoding():
    with pytest.raises(ValueError, match="parallel"):
        OpenVLAConfig.small_config(action_decoding="autoregressive", action_chunk_size=4)


def test_parallel_prediction_skips_the_full_vocabulary_head(tokenizer, processor, images):
    model = make_model(tokenizer, chunk=2)
    positions = []
    model.language_model.lm_head.register_forward_hook(lambda module, args, output: positions.append(args[0].shape[1]))
    model.predict_action(**processor(images=images, text=INSTRUCTIONS))
    assert positions and max(positions) <= 1, positions
