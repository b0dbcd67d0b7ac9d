"""OpenVLAPolicy: one action per call from a queue, re-planning every n_action_steps calls, one queue per environment."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from configuration_openvla import OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction, OpenVLAPolicy
from processing_openvla import OpenVLAImageProcessor, OpenVLAProcessor, compute_action_stats

TOKENIZER_PATH = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
TINY = dict(hidden_dim=64, num_layers=2, num_heads=2, num_kv_heads=1, vision_dim=64, image_size=56, dropout=0.0)
CHUNK = 4
INSTRUCTIONS = ["pick up the red block", "go left", "push the blue ball to the right"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def processor():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_PATH)
    return OpenVLAProcessor(image_processor=OpenVLAImageProcessor(image_size=56), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in INSTRUCTIONS]


def make_model(processor, decoding="parallel", chunk=CHUNK, **overrides):
    torch.manual_seed(0)
    config = OpenVLAConfig.small_config(
        vocab_size=len(processor.tokenizer), action_decoding=decoding, action_chunk_size=chunk, **TINY, **overrides
    )
    return OpenVLAForActionPrediction(config).eval()


class CallCounter:
    """Wraps `model.predict_action` and records the batch size of every call."""

    def __init__(self, model):
        self.batch_sizes = []
        self._predict_action = model.predict_action
        model.predict_action = self

    def __call__(self, **inputs):
        self.batch_sizes.append(inputs["input_ids"].shape[0])
        return self._predict_action(**inputs)

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)


def reference_chunk(model, processor, images, instructions, unnorm_key=None) -> np.ndarray:
    """What one model call predicts: `[B, chunk, action_dim]`."""
    actions = model.predict_action(**processor(images=images, text=instructions), unnorm_key=unnorm_key)
    return actions.numpy().reshape(len(images), -1, model.config.action_dim)


@pytest.mark.parametrize("n_action_steps", [None, 1, 2, CHUNK])
def test_queue_replans_every_n_action_steps(processor, images, n_action_steps):
    model = make_model(processor)
    chunk = reference_chunk(model, processor, images[:1], INSTRUCTIONS[:1])[0]  # [CHUNK, 7]
    counter = CallCounter(model)
    policy = OpenVLAPolicy(model, processor, n_action_steps=n_action_steps)
    steps = policy.n_action_steps
    assert steps == (CHUNK if n_action_steps is None else n_action_steps)

    actions = [policy.select_action(images[0], INSTRUCTIONS[0]) for _ in range(3 * steps)]
    assert counter.calls == 3
    for action in actions:
        assert action.shape == (7,) and action.dtype == np.float32
    # Same observation each time: every plan is the same chunk, executed in order, its first n_action_steps only.
    np.testing.assert_array_equal(np.stack(actions), np.tile(chunk[:steps], (3, 1)))


def test_reset_forces_replanning(processor, images):
    model = make_model(processor)
    counter = CallCounter(model)
    policy = OpenVLAPolicy(model, processor)
    first = policy.select_action(images[0], INSTRUCTIONS[0])
    policy.select_action(images[0], INSTRUCTIONS[0])
    assert counter.calls == 1
    policy.reset()
    again = policy.select_action(images[0], INSTRUCTIONS[0])
    assert counter.calls == 2
    np.testing.assert_array_equal(first, again)  # a fresh plan starts at the chunk's first action


def test_queued_actions_ignore_new_observations_until_replanning(processor, images):
    """Within a chunk the actions are executed open-loop: they come from the image seen at the re-planning step."""
    model = make_model(processor)
    chunk = reference_chunk(model, processor, images[:1], INSTRUCTIONS[:1])[0]
    other = reference_chunk(model, processor, images[1:2], INSTRUCTIONS[:1])[0]
    policy = OpenVLAPolicy(model, processor)
    observed = [policy.select_action(images[0], INSTRUCTIONS[0])]
    observed += [policy.select_action(images[1], INSTRUCTIONS[0]) for _ in range(CHUNK)]
    np.testing.assert_array_equal(np.stack(observed[:CHUNK]), chunk)
    np.testing.assert_array_equal(observed[CHUNK], other[0])


def test_autoregressive_model_replans_every_call(processor, images):
    model = make_model(processor, decoding="autoregressive", chunk=1)
    expected = reference_chunk(model, processor, images[:1], INSTRUCTIONS[:1])[0, 0]
    counter = CallCounter(model)
    policy = OpenVLAPolicy(model, processor)
    assert policy.n_action_steps == 1
    for call in range(3):
        np.testing.assert_array_equal(policy.select_action(images[0], INSTRUCTIONS[0]), expected)
        assert counter.calls == call + 1


@pytest.mark.parametrize("decoding,chunk,bad", [("parallel", CHUNK, 0), ("parallel", CHUNK, CHUNK + 1),
                                                ("parallel", CHUNK, 2.0), ("autoregressive", 1, 2)])
def test_bad_n_action_steps(processor, decoding, chunk, bad):
    model = make_model(processor, decoding=decoding, chunk=chunk)
    with pytest.raises(ValueError, match="n_action_steps"):
        OpenVLAPolicy(model, processor, n_action_steps=bad)


def test_batched_environments_have_one_queue_each(processor, images):
    model = make_model(processor)
    chunks = reference_chunk(model, processor, images, INSTRUCTIONS)  # [3, CHUNK, 7]
    counter = CallCounter(model)
    policy = OpenVLAPolicy(model, processor, n_action_steps=3)

    steps = [policy.select_actions(images, INSTRUCTIONS) for _ in range(3)]
    assert counter.batch_sizes == [3]  # one batched call re-plans every environment
    assert all(step.shape == (3, 7) and step.dtype == np.float32 for step in steps)
    np.testing.assert_allclose(np.stack(steps, axis=1), chunks[:, :3], atol=1e-6)

    # Environment 1 finishes its episode: only it is re-planned, alone, while the others' queues are refilled together.
    policy.reset(env_ids=[1])
    step = policy.select_actions(images, INSTRUCTIONS)
    assert counter.batch_sizes == [3, 3]  # queues of 0 and 2 were empty too (3 steps of 3 done)
    np.testing.assert_allclose(step, chunks[:, 0], atol=1e-6)
    policy.select_actions(images, INSTRUCTIONS)
    policy.reset(env_ids=1)
    step = policy.select_actions(images, INSTRUCTIONS)
    assert counter.batch_sizes == [3, 3, 1]
    np.testing.assert_allclose(step[1], chunks[1, 0], atol=1e-6)
    np.testing.assert_allclose(step[[0, 2]], chunks[[0, 2], 2], atol=1e-6)


def test_batched_environment_errors(processor, images):
    model = make_model(processor)
    policy = OpenVLAPolicy(model, processor)
    with pytest.raises(ValueError, match="instructions"):
        policy.select_actions(images, INSTRUCTIONS[:2])
    policy.select_actions(images, INSTRUCTIONS)
    with pytest.raises(ValueError, match="reset"):
        policy.select_actions(images[:2], INSTRUCTIONS[:2])
    with pytest.raises(ValueError, match="env_id"):
        policy.reset(env_ids=[5])
    policy.reset()
    assert policy.select_actions(images[:2], "go left").shape == (2, 7)  # one instruction for all


def test_unnorm_key(processor, images):
    raw = np.random.default_rng(0).uniform(-5, 5, (100, 7))
    stats = {"robot_a": compute_action_stats(raw), "robot_b": compute_action_stats(raw * 2)}
    model = make_model(processor, norm_stats=stats)
    with pytest.raises(ValueError, match="unnorm_key"):
        OpenVLAPolicy(model, processor)  # two datasets: which one is ambiguous
    with pytest.raises(ValueError, match="robot_c"):
        OpenVLAPolicy(model, processor, unnorm_key="robot_c")
    policy = OpenVLAPolicy(model, processor, unnorm_key="robot_b")
    action = policy.select_action(images[0], INSTRUCTIONS[0])
    # Expected from the logits and the formulas: bin b -> a = -1 + 2b / 255 -> q01 + (a + 1) / 2 * (q99 - q01).
    bins = model.predict_action_logits(**processor(images=images[:1], text=INSTRUCTIONS[:1])).argmax(-1)[0, 0].numpy()
    normalised = -1.0 + 2.0 * bins / 255.0
    expected = {}
    for name in ("robot_a", "robot_b"):
        low, high = (np.array(stats[name]["action"][bound], dtype=np.float64) for bound in ("q01", "q99"))
        expected[name] = low + (normalised + 1.0) / 2.0 * (high - low)
    np.testing.assert_allclose(action, expected["robot_b"], rtol=1e-6, atol=1e-6)
    assert np.abs(action - expected["robot_a"]).max() > 0.1  # the other dataset's statistics give other actions


@pytest.mark.parametrize("coeff", [0.0, 0.5, -1.0])
def test_temporal_ensembling_averages_overlapping_chunks(processor, images, coeff):
    """Each step re-plans; the action for step t is the weighted mean of what the chunks planned at steps t-3..t said
    about step t, the oldest weighted exp(0), the next exp(-coeff), and so on."""
    model = make_model(processor)
    observations = [0, 1, 2, 0, 1, 2]  # the image seen at each step (one instruction: a new one would re-plan)
    plans = [reference_chunk(model, processor, [images[i]], INSTRUCTIONS[:1])[0] for i in observations]
    counter = CallCounter(model)
    policy = OpenVLAPolicy(model, processor, temporal_ensemble_coeff=coeff)
    assert policy.n_action_steps == 1

    for step, i in enumerate(observations):
        action = policy.select_action(images[i], INSTRUCTIONS[0])
        assert counter.calls == step + 1 and action.shape == (7,) and action.dtype == np.float32
        planned_at = range(max(0, step - CHUNK + 1), step + 1)  # oldest first
        predictions = np.stack([plans[start][step - start] for start in planned_at])
        weights = np.exp(-coeff * np.arange(len(predictions)))[:, None]
        np.testing.assert_allclose(action, (weights * predictions).sum(0) / weights.sum(), rtol=1e-5, atol=1e-6)

    policy.reset()
    np.testing.assert_allclose(policy.select_action(images[2], INSTRUCTIONS[0]), plans[2][0], atol=1e-6)


def test_temporal_ensembling_per_environment_reset(processor, images):
    model = make_model(processor)
    chunks = reference_chunk(model, processor, images, INSTRUCTIONS)  # [3, CHUNK, 7]
    policy = OpenVLAPolicy(model, processor, temporal_ensemble_coeff=0.0)
    policy.select_actions(images, INSTRUCTIONS)
    policy.reset(env_ids=[1])
    step = policy.select_actions(images, INSTRUCTIONS)
    np.testing.assert_allclose(step[1], chunks[1, 0], atol=1e-6)  # a new episode: only its own first plan
    np.testing.assert_allclose(step[[0, 2]], (chunks[[0, 2], 0] + chunks[[0, 2], 1]) / 2, atol=1e-6)


@pytest.mark.parametrize("options,match", [
    (dict(temporal_ensemble_coeff=float("nan")), "temporal_ensemble_coeff=nan"),
    (dict(temporal_ensemble_coeff="0.1"), "temporal_ensemble_coeff='0.1'"),
    (dict(temporal_ensemble_coeff=0.1, n_action_steps=2), "n_action_steps=2 cannot be combined"),
])
def test_bad_temporal_ensembling(processor, options, match):
    with pytest.raises(ValueError, match=match):
        OpenVLAPolicy(make_model(processor), processor, **options)


def test_dropped_environments_leave_the_batch_and_the_others_keep_their_queues(processor, images):
    """An evaluation loop drops the environments whose episodes ended; the rest go on with their plans, in order."""
    model = make_model(processor)
    chunks = reference_chunk(model, processor, images, INSTRUCTIONS)  # [3, CHUNK, 7]
    counter = CallCounter(model)
    policy = OpenVLAPolicy(model, processor)
    policy.select_actions(images, INSTRUCTIONS)
    policy.drop([1])
    step = policy.select_actions([images[0], images[2]], [INSTRUCTIONS[0], INSTRUCTIONS[2]])
    assert counter.batch_sizes == [3]  # no re-plan: environments 0 and 2 execute their chunks' second actions
    np.testing.assert_allclose(step, chunks[[0, 2], 1], atol=1e-6)
    policy.drop(0)
    np.testing.assert_allclose(policy.select_action(images[2], INSTRUCTIONS[2]), chunks[2, 2], atol=1e-6)
    with pytest.raises(ValueError, match="env_id=1 is not one of the 1 environments"):
        policy.drop([1])
    with pytest.raises(ValueError, match="drop"):
        policy.select_actions(images[:2], INSTRUCTIONS[:2])
