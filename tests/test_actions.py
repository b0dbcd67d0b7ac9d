"""Action binning (reference and official schemes), statistics and the ActionTokenizer."""

import numpy as np
import pytest
import torch

from processing_openvla import (
    ActionTokenizer,
    compute_action_stats,
    detokenize_actions,
    normalize_actions,
    resolve_unnorm_key,
    tokenize_actions,
    unnormalize_actions,
)


def test_reference_formula_on_hand_computed_values():
    actions = np.array([-1.0, 1.0, 0.0, 0.5, -0.5, 2.0, -3.0])
    # floor((a + 1) / 2 * 255): -1 -> 0, 1 -> 255, 0 -> floor(127.5), 0.5 -> floor(191.25), -0.5 -> floor(63.75);
    # out-of-range values are clipped first.
    expected = np.array([0, 255, 127, 191, 63, 255, 0])
    np.testing.assert_array_equal(tokenize_actions(actions), expected)
    decoded = detokenize_actions(expected)
    np.testing.assert_allclose(decoded, [-1.0, 1.0, -1 + 127 / 255 * 2, -1 + 191 / 255 * 2, -1 + 63 / 255 * 2, 1.0, -1.0], atol=1e-7)


def test_custom_range_and_bins():
    bins = tokenize_actions(np.array([0.0, 3.7, 10.0, 9.99]), num_bins=11, action_min=0.0, action_max=10.0)
    np.testing.assert_array_equal(bins, [0, 3, 10, 9])
    np.testing.assert_allclose(detokenize_actions(bins, num_bins=11, action_min=0.0, action_max=10.0), [0.0, 3.0, 10.0, 9.0])


def test_torch_and_numpy_batched_and_single():
    actions = torch.tensor([[0.1, -0.2, 0.3], [0.9, -0.9, 0.0]])
    bins = tokenize_actions(actions)
    assert isinstance(bins, torch.Tensor) and bins.dtype == torch.int64 and bins.shape == (2, 3)
    np.testing.assert_array_equal(bins.numpy(), tokenize_actions(actions.numpy()))
    single = tokenize_actions(actions[0].numpy())
    assert isinstance(single, np.ndarray) and single.shape == (3,)
    np.testing.assert_array_equal(single, bins[0].numpy())
    decoded = detokenize_actions(bins)
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.float32 and decoded.shape == (2, 3)


@pytest.mark.parametrize("scheme", ["reference", "openvla"])
def test_round_trip_error_is_within_one_bin(scheme):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-2.0, 3.0, size=(500, 7))
    bins = tokenize_actions(actions, num_bins=64, action_min=-2.0, action_max=3.0, scheme=scheme)
    decoded = detokenize_actions(bins, num_bins=64, action_min=-2.0, action_max=3.0, scheme=scheme)
    assert np.abs(decoded - actions).max() <= 5.0 / 63 + 1e-6


def _official_encode_decode(actions: np.ndarray, num_bins: int = 256) -> np.ndarray:
    """Official OpenVLA: digitize over linspace(-1, 1, n), token = vocab - digitize, decode to bin centres."""
    edges = np.linspace(-1, 1, num_bins)
    centers = (edges[:-1] + edges[1:]) / 2.0
    digitized = np.digitize(np.clip(actions, -1, 1), edges)
    return centers[np.clip(digitized - 1, 0, centers.shape[0] - 1)]


def test_openvla_scheme_matches_official_formulas():
    actions = np.array([-1.0, -0.99999, 0.0, 0.3, 0.99, 1.0, 1.5, -7.0])
    bins = tokenize_actions(actions, scheme="openvla")
    np.testing.assert_array_equal(bins, np.digitize(np.clip(actions, -1, 1), np.linspace(-1, 1, 256)) - 1)
    np.testing.assert_allclose(detokenize_actions(bins, scheme="openvla"), _official_encode_decode(actions), atol=1e-7)
    assert bins[-3] == 255 and detokenize_actions(np.array([255]), scheme="openvla")[0] == pytest.approx(1 - 1 / 255)


def test_bad_actions_and_bins_raise():
    with pytest.raises(ValueError, match="NaN or inf"):
        tokenize_actions(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="NaN or inf"):
        tokenize_actions(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        detokenize_actions(np.array([0, 256]))
    with pytest.raises(ValueError, match="integers"):
        detokenize_actions(np.array([0.5]))
    with pytest.raises(ValueError, match="action_min=1.0"):
        tokenize_actions(np.zeros(3), action_min=1.0, action_max=1.0)
    with pytest.raises(ValueError, match="scheme"):
        tokenize_actions(np.zeros(3), scheme="kmeans")


def test_compute_action_stats_known_values():
    actions = np.stack([np.arange(101, dtype=np.float64), np.full(101, 2.0), np.linspace(0, 1, 101)], axis=1)
    stats = compute_action_stats(actions, mask=[True, True, False])["action"]
    assert stats["q01"][0] == pytest.approx(1.0) and stats["q99"][0] == pytest.approx(99.0)
    assert stats["min"][0] == 0.0 and stats["max"][0] == 100.0 and stats["mean"][0] == pytest.approx(50.0)
    assert stats["std"][1] == 0.0 and stats["mask"] == [True, True, False]
    with pytest.raises(ValueError, match="mask has 2 entries"):
        compute_action_stats(actions, mask=[True, False])
    with pytest.raises(ValueError, match="non-empty"):
        compute_action_stats(np.zeros((0, 3)))


def test_normalisation_round_trip_mask_and_constant_dims():
    rng = np.random.default_rng(1)
    raw = np.stack([rng.normal(5, 2, 1000), rng.uniform(-10, 10, 1000), np.full(1000, 3.0), rng.integers(0, 2, 1000)], 1)
    stats = compute_action_stats(raw, mask=[True, True, True, False])
    low, high = np.array(stats["action"]["q01"]), np.array(stats["action"]["q99"])
    inside = raw[np.all((raw[:, :2] >= low[:2]) & (raw[:, :2] <= high[:2]), axis=1)]
    normalised = normalize_actions(inside, stats)
    assert normalised[:, :2].min() >= -1 and normalised[:, :2].max() <= 1
    np.testing.assert_array_equal(normalised[:, 2], 0.0)  # q01 == q99: mapped to 0
    np.testing.assert_array_equal(normalised[:, 3], inside[:, 3])  # unmasked gripper passes through
    np.testing.assert_allclose(unnormalize_actions(normalised, stats), inside, rtol=1e-5, atol=1e-4)
    outside = normalize_actions(np.array([[100.0, -100.0, 3.0, 1.0]]), stats)
    np.testing.assert_array_equal(outside, [[1.0, -1.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="4-dimensional"):
        normalize_actions(np.zeros((2, 3)), stats)


def test_action_tokenizer_maps_bins_to_the_last_ids_highest_first():
    tokenizer = ActionTokenizer(num_action_bins=256, action_token_end=1024)
    assert tokenizer.action_token_start == 768
    np.testing.assert_array_equal(tokenizer.bins_to_token_ids(np.array([0, 255])), [1023, 768])
    np.testing.assert_array_equal(tokenizer.token_ids_to_bins(np.array([1023, 768, 5, 2000])), [0, 255, 255, 0])
    token_ids = tokenizer.encode(np.array([[-1.0, 1.0, 0.0]]))
    np.testing.assert_array_equal(token_ids, [[1023, 768, 1023 - 127]])
    np.testing.assert_allclose(tokenizer.decode(token_ids), [[-1.0, 1.0, -1 + 127 / 255 * 2]], atol=1e-7)
    with pytest.raises(ValueError, match="num_action_bins=256"):
        ActionTokenizer(num_action_bins=256, action_token_end=200)


def test_action_tokenizer_uses_statistics():
    stats = {"robot": compute_action_stats(np.linspace([0.0, 10.0], [1.0, 30.0], 101))}
    q01, q99 = np.array([0.01, 10.2]), np.array([0.99, 29.8])  # 1% / 99% quantiles of the two ramps, by hand
    np.testing.assert_allclose(stats["robot"]["action"]["q01"], q01, rtol=1e-6)
    np.testing.assert_allclose(stats["robot"]["action"]["q99"], q99, rtol=1e-6)
    tokenizer = ActionTokenizer(num_action_bins=256, action_token_end=1024, norm_stats=stats)
    # 0.255 and 24.9 sit a quarter and three quarters up their q01..q99 ranges: normalised -0.5 and 0.5, bins
    # floor(0.25 * 255) = 63 and floor(0.75 * 255) = 191; the bounds themselves map to bins 0 and 255.
    raw = np.array([[0.255, 24.9], [0.01, 29.8]])
    bins = np.array([[63, 191], [0, 255]])
    token_ids = tokenizer.encode(raw, "robot")
    np.testing.assert_array_equal(token_ids, 1023 - bins)
    expected = q01 + (2.0 * bins / 255.0) / 2.0 * (q99 - q01)  # bin b -> a = -1 + 2b / 255 -> q01 + (a + 1) / 2 * span
    np.testing.assert_allclose(tokenizer.decode(token_ids, "robot"), expected, rtol=1e-6)
    with pytest.warns(UserWarning, match="no statistics"):
        ActionTokenizer(action_token_end=1024).encode(np.array([0.0, 2.0]))


def test_resolve_unnorm_key():
    stats = {"a": {}, "b": {}}
    assert resolve_unnorm_key({}, None) is None
    assert resolve_unnorm_key({"a": {}}, None) == "a"
    assert resolve_unnorm_key(stats, "b") == "b"
    with pytest.raises(ValueError, match=r"several datasets \['a', 'b'\]"):
        resolve_unnorm_key(stats, None)
    with pytest.raises(ValueError, match=r"unnorm_key='c' is not in norm_stats; known keys: \['a', 'b'\]"):
        resolve_unnorm_key(stats, "c")
