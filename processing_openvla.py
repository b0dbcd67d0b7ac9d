"""OpenVLA processing: images, prompts, action tokens and action statistics.

- `tokenize_actions` / `detokenize_actions`: continuous actions <-> bin indices (reference or official OpenVLA scheme).
- `compute_action_stats`, `normalize_actions`, `unnormalize_actions`: per-dataset statistics in the official OpenVLA
  layout (q01/q99 bounds, a mask of the dimensions that are normalised).
- `ActionTokenizer`: bins <-> token ids (the `num_action_bins` ids just below `action_token_end`, highest id = bin 0,
  as in official OpenVLA) and raw actions <-> token ids through the statistics.
- `OpenVLAImageProcessor`: resize, rescale and normalise; a second normalisation stacked as channels 3-5 for a fused
  DINOv2 + SigLIP backbone.
- `OpenVLAProcessor`: images + instructions (+ actions) -> `input_ids`, `attention_mask`, `pixel_values`, `labels`.
- `OpenVLADataCollator`: left-pads rows that the processor made one at a time.
"""

import inspect
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import AutoTokenizer, BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_transforms import rescale
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    load_image,
)
from transformers.processing_utils import ImagesKwargs, ProcessorMixin

DEFAULT_PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")
# Fields of an official OpenVLA `preprocessor_config.json` (`PrismaticImageProcessor`) that we translate.
OFFICIAL_IMAGE_PROCESSOR_KEYS = (
    "means",
    "stds",
    "input_sizes",
    "interpolations",
    "tvf_crop_params",
    "tvf_do_letterbox",
    "tvf_letterbox_fill",
    "tvf_normalize_params",
    "tvf_resize_params",
    "use_fused_vision_backbone",
)
IGNORE_INDEX = -100
# A saved processor's settings: ours (`processor_config.json`) or an official checkpoint's image-processor file.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(values: ArrayLike | Sequence) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _like(result: np.ndarray, reference: Any) -> ArrayLike:
    """Return `result` as a torch tensor on `reference`'s device if `reference` is one, else as numpy."""
    if isinstance(reference, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(result)).to(reference.device)
    return result


def _check_finite(actions: np.ndarray, name: str = "actions") -> None:
    if not np.all(np.isfinite(actions)):
        bad = np.argwhere(~np.isfinite(actions))[0].tolist()
        raise ValueError(
            f"{name} contain NaN or inf (first at index {bad}: {actions[tuple(bad)]}); clean or drop these samples."
        )


def _check_range(action_min: float, action_max: float) -> None:
    if not action_min < action_max:
        raise ValueError(f"action_min={action_min} must be smaller than action_max={action_max}.")


def tokenize_actions(
    actions: ArrayLike,
    num_bins: int = 256,
    action_min: float = -1.0,
    action_max: float = 1.0,
    scheme: str = "reference",
) -> ArrayLike:
    """Discretise continuous actions into bin indices.

    Args:
        actions: `[batch, action_dim]` or `[action_dim]` floats (numpy or torch); values are clipped to the range first.
        num_bins: bins per dimension.
        action_min, action_max: range covered by the bins.
        scheme: `"reference"`: `floor((a - min) / (max - min) * (num_bins - 1))`; `"openvla"`:
            `digitize(a, linspace(min, max, num_bins)) - 1`, as the published OpenVLA checkpoints.

    Returns:
        int64 bin indices in `[0, num_bins - 1]`, same shape and array type as `actions`.
    """
    _check_range(action_min, action_max)
    values = _to_numpy(actions).astype(np.float64)
    _check_finite(values)
    values = np.clip(values, action_min, action_max)
    if scheme == "reference":
        bins = np.floor((values - action_min) / (action_max - action_min) * (num_bins - 1))
    elif scheme == "openvla":
        bins = np.digitize(values, np.linspace(action_min, action_max, num_bins)) - 1
    else:
        raise ValueError(f"scheme={scheme!r} is not one of ('reference', 'openvla').")
    return _like(bins.astype(np.int64), actions)


def detokenize_actions(
    bins: ArrayLike,
    num_bins: int = 256,
    action_min: float = -1.0,
    action_max: float = 1.0,
    scheme: str = "reference",
) -> ArrayLike:
    """Map bin indices back to continuous actions.

    Args:
        bins: `[batch, action_dim]` or `[action_dim]` integers in `[0, num_bins - 1]`.
        scheme: `"reference"`: `min + bin / (num_bins - 1) * (max - min)`; `"openvla"`: the centre of bin
            `min(bin, num_bins - 2)` of `linspace(min, max, num_bins)` (official OpenVLA decoding).

    Returns:
        float32 actions, same shape and array type as `bins`.
    """
    return _like(_bin_values(bins, num_bins, action_min, action_max, scheme).astype(np.float32), bins)


def _bin_values(bins: ArrayLike, num_bins: int, action_min: float, action_max: float, scheme: str) -> np.ndarray:
    """`detokenize_actions` in float64 (numpy), before any rounding to float32."""
    _check_range(action_min, action_max)
    indices = _to_numpy(bins)
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"bins must be integers, got dtype {indices.dtype}.")
    if indices.size and (indices.min() < 0 or indices.max() > num_bins - 1):
        raise ValueError(
            f"bins must lie in [0, {num_bins - 1}] for num_bins={num_bins}, got values in [{indices.min()}, {indices.max()}]."
        )
    if scheme == "reference":
        values = action_min + indices / (num_bins - 1) * (action_max - action_min)
    elif scheme == "openvla":
        edges = np.linspace(action_min, action_max, num_bins)
        centers = (edges[:-1] + edges[1:]) / 2.0
        values = centers[np.minimum(indices, num_bins - 2)]
    else:
        raise ValueError(f"scheme={scheme!r} is not one of ('reference', 'openvla').")
    return np.asarray(values, dtype=np.float64)


def compute_action_stats(actions: ArrayLike, mask: Sequence[bool] | None = None) -> dict[str, Any]:
    """Statistics of a dataset's actions in the official OpenVLA layout.

    Args:
        actions: `[num_samples, action_dim]` raw actions.
        mask: per dimension, whether it is normalised (official OpenVLA leaves the gripper dimension out). All
            dimensions by default.

    Returns:
        `{"action": {"mean", "std", "max", "min", "q01", "q99", "mask"}, "num_transitions": N}` with lists of floats.
    """
    values = _to_numpy(actions).astype(np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"actions must be a non-empty [num_samples, action_dim] array, got shape {values.shape}.")
    _check_finite(values)
    mask = [True] * values.shape[1] if mask is None else [bool(m) for m in mask]
    if len(mask) != values.shape[1]:
        raise ValueError(f"mask has {len(mask)} entries but the actions have {values.shape[1]} dimensions.")
    stats = {
        "mean": values.mean(0),
        "std": values.std(0),
        "max": values.max(0),
        "min": values.min(0),
        "q01": np.quantile(values, 0.01, axis=0),
        "q99": np.quantile(values, 0.99, axis=0),
    }
    action_stats = {name: stat.astype(np.float32).tolist() for name, stat in stats.items()}
    action_stats["mask"] = mask
    return {"action": action_stats, "num_transitions": int(values.shape[0])}


def build_action_chunks(actions: np.ndarray, episode_ids: np.ndarray, steps: np.ndarray, chunk_size: int) -> np.ndarray:
    """Chunk labels for parallel decoding: each row's action and the next `chunk_size - 1` actions of its episode.

    Rows may come in any order; within an episode they are ordered by `steps`. Past the end of an episode the final
    action repeats (the robot holds its last command), so every row gets a full chunk.

    Args:
        actions: `[rows, action_dim]`.
        episode_ids, steps: `[rows]` each.

    Returns:
        `[rows, chunk_size, action_dim]`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1.")
    order = np.lexsort((steps, episode_ids))
    sorted_episodes = np.asarray(episode_ids)[order]
    episode_last = np.flatnonzero(np.r_[sorted_episodes[1:] != sorted_episodes[:-1], True])
    positions = np.arange(len(order))
    last_of_row = episode_last[np.searchsorted(episode_last, positions)]
    following = np.minimum(positions[:, None] + np.arange(chunk_size)[None], last_of_row[:, None])
    chunks = np.empty((len(order), chunk_size, actions.shape[-1]), dtype=actions.dtype)
    chunks[order] = np.asarray(actions)[order][following]
    return chunks


def _read_stat_arrays(stats: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(q01, q99, mask)` of one dataset's statistics (official layout, or the action entry itself) as arrays; the
    mask as stored (all true when absent), its length and values unchecked."""
    action_stats = stats.get("action", stats)
    low = np.asarray(action_stats["q01"], dtype=np.float64)
    high = np.asarray(action_stats["q99"], dtype=np.float64)
    return low, high, np.asarray(action_stats.get("mask", np.ones_like(low, dtype=bool)))


def _stat_arrays(stats: Mapping[str, Any], action_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    low, high, mask = _read_stat_arrays(stats)
    mask = mask.astype(bool)
    if not low.shape == high.shape == mask.shape == (action_dim,):
        raise ValueError(
            f"The action statistics describe {low.shape[0]}-dimensional actions (q01 {low.shape}, q99 {high.shape}, "
            f"mask {mask.shape}) but the actions have {action_dim} dimensions."
        )
    return low, high, mask


def normalize_actions(actions: ArrayLike, stats: Mapping[str, Any]) -> ArrayLike:
    """Raw actions -> [-1, 1] with the q01/q99 bounds (official OpenVLA `BOUNDS_Q99`).

    Masked dimensions are normalised as `clip(2 * (a - q01) / (q99 - q01) - 1, -1, 1)` (values beyond the 1% / 99%
    quantiles saturate, by design of the scheme); dimensions with `q01 == q99` map to 0; unmasked dimensions pass
    through unchanged. `actions` is `[..., action_dim]`.
    """
    values = _to_numpy(actions).astype(np.float64)
    _check_finite(values)
    low, high, mask = _stat_arrays(stats, values.shape[-1])
    span = high - low
    scaled = np.clip(2.0 * (values - low) / np.where(span > 0, span, 1.0) - 1.0, -1.0, 1.0)
    scaled = np.where(span > 0, scaled, 0.0)
    return _like(np.where(mask, scaled, values).astype(np.float32), actions)


def unnormalize_actions(actions: ArrayLike, stats: Mapping[str, Any]) -> ArrayLike:
    """[-1, 1] -> raw actions: `0.5 * (a + 1) * (q99 - q01) + q01` on masked dimensions (official OpenVLA)."""
    values = _to_numpy(actions).astype(np.float64)
    low, high, mask = _stat_arrays(stats, values.shape[-1])
    raw = 0.5 * (values + 1.0) * (high - low) + low
    return _like(np.where(mask, raw, values).astype(np.float32), actions)


def resolve_unnorm_key(norm_stats: Mapping[str, Any], unnorm_key: str | None) -> str | None:
    """The dataset whose statistics apply: `unnorm_key`, or the only dataset, or `None` when there are no statistics."""
    if unnorm_key is None:
        if len(norm_stats) > 1:
            raise ValueError(
                f"This model was trained on several datasets {sorted(norm_stats)}; pass unnorm_key=<one of them> to "
                "say whose action statistics to use."
            )
        return next(iter(norm_stats), None)
    if unnorm_key not in norm_stats:
        raise ValueError(f"unnorm_key={unnorm_key!r} is not in norm_stats; known keys: {sorted(norm_stats)}.")
    return unnorm_key


def check_norm_stats(norm_stats: Any) -> None:
    """Check per-dataset action statistics before anything normalises or unnormalises with them.

    Each dataset's statistics (official layout, `{"action": {"q01", "q99", "mask", ...}}`) need `q01` and `q99` of
    one length, finite, with `q01 <= q99`, and a boolean `mask` (optional) of that length. An edited or corrupt
    `config.json` would otherwise give NaN or sign-flipped actions without an error. (Statistics of another length
    than the actions fail when they are applied, naming both.)

    Raises:
        ValueError: naming the dataset, the field and the value.
    """
    if not isinstance(norm_stats, Mapping):
        raise ValueError(f"norm_stats must map dataset names to statistics, got {type(norm_stats).__name__}.")
    for key, stats in norm_stats.items():
        action_stats = stats.get("action", stats) if isinstance(stats, Mapping) else None
        where = f"norm_stats[{key!r}]"
        if not isinstance(action_stats, Mapping) or not {"q01", "q99"} <= set(action_stats):
            raise ValueError(
                f"{where} has no action 'q01' and 'q99' bounds; compute statistics with compute_action_stats."
            )
        try:
            low, high, mask = _read_stat_arrays(action_stats)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where} holds q01 / q99 / mask entries that are not lists of numbers: {error}.") from error
        if low.ndim != 1 or not low.shape == high.shape == mask.shape:
            raise ValueError(
                f"{where} has q01 {low.shape}, q99 {high.shape} and mask {mask.shape}: they need one entry per action "
                "dimension each; recompute the statistics."
            )
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{where} has mask {mask.tolist()}; a mask holds booleans, one per action dimension.")
        for name, values in (("q01", low), ("q99", high)):
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{where} has {name}={values.tolist()} with NaN or inf; recompute the statistics.")
        flipped = np.flatnonzero(low > high)
        if flipped.size:
            raise ValueError(
                f"{where} has q01 > q99 in action dimension(s) {flipped.tolist()} (q01 {low[flipped].tolist()}, q99 "
                f"{high[flipped].tolist()}); the file is corrupt or edited: recompute the statistics."
            )


def _warn_far_outside(values: np.ndarray, stats: Mapping[str, Any], unnorm_key: str | None) -> None:
    """Warn about actions more than one q01..q99 span beyond those bounds: normalisation clips them to the end bin,
    which is by design for the 2% of samples past the quantiles but means wrong statistics (another dataset's, other
    units) when values are that far out. The message names the dataset and dimension, not the value, so Python shows
    it once per dimension rather than once per sample."""
    low, high, mask = _stat_arrays(stats, values.shape[-1])
    span = high - low
    far = mask & (span > 0) & ((values < low - span) | (values > high + span))
    if far.any():
        dim = int(np.argwhere(far)[0][-1])
        warnings.warn(
            f"Actions of dataset {unnorm_key!r} lie far outside its statistics in action dimension {dim} (more than "
            f"the q01..q99 range [{low[dim]:.4g}, {high[dim]:.4g}] away from it) and are clipped to the end bin. Check "
            "that the statistics belong to these actions (dataset name, units).",
            stacklevel=3,
        )


def differing_norm_stats(first: Mapping[str, Any], second: Mapping[str, Any]) -> list[str]:
    """The datasets whose statistics both mappings hold but with different values (compared as float32)."""
    differing = []
    for key in sorted(set(first) & set(second)):
        pairs = [_read_stat_arrays(stats) for stats in (first[key], second[key])]
        if any(not np.array_equal(a.astype(np.float32), b.astype(np.float32)) for a, b in zip(*pairs)):
            differing.append(key)
    return differing


def check_same_norm_stats(model_stats: Mapping[str, Any], processor_stats: Mapping[str, Any]) -> None:
    """Refuse a model and a processor whose statistics differ: the processor normalises training labels with its
    copy and the model unnormalises predictions with its own, so actions would come out rescaled without an error.
    Either side may be empty (a processor that only prepares inputs)."""
    if not model_stats or not processor_stats:
        return
    differing = sorted(set(model_stats) ^ set(processor_stats)) + differing_norm_stats(model_stats, processor_stats)
    if differing:
        raise ValueError(
            f"The model's config.norm_stats and the processor's norm_stats differ for dataset(s) {differing}: labels "
            "would be normalised with one copy and predictions unnormalised with the other. Load both from the same "
            "folder, or set processor.norm_stats = model.config.norm_stats."
        )


def action_array(actions: ArrayLike | Sequence, name: str = "actions") -> np.ndarray:
    """User-given actions (array, tensor or nested lists of numbers) -> float64 array, with a clear error for ragged
    rows or values that are not numbers."""
    try:
        return _to_numpy(actions).astype(np.float64)
    except (TypeError, ValueError) as error:
        if isinstance(actions, (list, tuple)) and all(isinstance(row, (list, tuple, np.ndarray)) for row in actions):
            lengths = sorted({len(row) for row in actions})
            if len(lengths) > 1:
                raise ValueError(f"{name} are ragged: rows have lengths {lengths}; every action needs action_dim values.") from error
        raise ValueError(f"{name} must be numbers (float arrays or lists of floats): {error}.") from error


class ActionTokenizer:
    """Maps actions to LLM token ids and back.

    Action tokens are the `num_action_bins` ids just below `action_token_end`; bin `b` is token
    `action_token_end - 1 - b` (official OpenVLA ordering).
    """

    def __init__(
        self,
        *,
        action_token_end: int,
        num_action_bins: int = 256,
        action_min: float = -1.0,
        action_max: float = 1.0,
        scheme: str = "reference",
        norm_stats: Mapping[str, Any] | None = None,
    ):
        if num_action_bins < 2 or action_token_end < num_action_bins:
            raise ValueError(
                f"num_action_bins={num_action_bins} action tokens do not fit below action_token_end={action_token_end}; "
                "the vocabulary must hold at least num_action_bins tokens."
            )
        _check_range(action_min, action_max)
        self.num_action_bins = num_action_bins
        self.action_token_end = action_token_end
        self.action_min = action_min
        self.action_max = action_max
        self.scheme = scheme
        self.norm_stats = dict(norm_stats or {})

    @classmethod
    def from_config(cls, config) -> "ActionTokenizer":
        return cls(
            num_action_bins=config.num_action_bins,
            action_token_end=config.action_token_end,
            action_min=config.action_min,
            action_max=config.action_max,
            scheme=config.action_binning,
            norm_stats=config.norm_stats,
        )

    @property
    def action_token_start(self) -> int:
        return self.action_token_end - self.num_action_bins

    def bins_to_token_ids(self, bins: ArrayLike) -> ArrayLike:
        return self.action_token_end - 1 - bins

    def token_ids_to_bins(self, token_ids: ArrayLike) -> ArrayLike:
        """Token ids -> bins; ids outside the action range clip to the nearest end (official OpenVLA)."""
        bins = self.action_token_end - 1 - token_ids
        if isinstance(bins, torch.Tensor):
            return bins.clamp(0, self.num_action_bins - 1)
        return np.clip(bins, 0, self.num_action_bins - 1)

    def _bin_options(self) -> dict[str, Any]:
        return {
            "num_bins": self.num_action_bins,
            "action_min": self.action_min,
            "action_max": self.action_max,
            "scheme": self.scheme,
        }

    def stats_for(self, unnorm_key: str | None) -> Mapping[str, Any] | None:
        key = resolve_unnorm_key(self.norm_stats, unnorm_key)
        return None if key is None else self.norm_stats[key]

    def encode(self, actions: ArrayLike, unnorm_key: str | None = None) -> ArrayLike:
        """Raw actions `[..., action_dim]` -> action token ids (normalised first when statistics are known)."""
        stats = self.stats_for(unnorm_key)
        values = _to_numpy(actions).astype(np.float64)
        _check_finite(values)
        if stats is not None:
            _warn_far_outside(values, stats, unnorm_key)
            values = normalize_actions(values, stats)
        elif values.size and (values.min() < self.action_min or values.max() > self.action_max):
            warnings.warn(
                f"Actions span [{values.min():.4g}, {values.max():.4g}] but there are no statistics to normalise them and "
                f"the bins cover [{self.action_min}, {self.action_max}]: values outside are clipped. Compute statistics "
                "with compute_action_stats and pass them as norm_stats.",
                stacklevel=2,
            )
        token_ids = self.bins_to_token_ids(tokenize_actions(values, **self._bin_options()))
        return _like(token_ids, actions)

    def bins_to_normalized_actions(self, bins: ArrayLike) -> ArrayLike:
        """Bins `[..., action_dim]` -> actions in `[action_min, action_max]` (before unnormalisation), float32."""
        return detokenize_actions(bins, **self._bin_options())

    def bins_to_actions(self, bins: ArrayLike, unnorm_key: str | None = None) -> ArrayLike:
        """Bins `[..., action_dim]` -> raw actions (unnormalised when statistics are known), float32.

        Computed in float64 and rounded once at the end, so official checkpoints give the official actions (which are
        float64) rounded to float32."""
        return _like(self.normalized_to_actions(_bin_values(bins, **self._bin_options()), unnorm_key), bins)

    def normalized_to_actions(self, values: ArrayLike, unnorm_key: str | None = None) -> ArrayLike:
        """Actions in normalised units `[..., action_dim]` -> raw actions (unnormalised when statistics are known),
        float32, same array type as `values`."""
        stats = self.stats_for(unnorm_key)
        actions = _to_numpy(values).astype(np.float64) if stats is None else unnormalize_actions(_to_numpy(values), stats)
        return _like(np.asarray(actions, dtype=np.float32), values)

    def normalized_to_bins(self, values: ArrayLike) -> ArrayLike:
        """Actions in normalised units `[..., action_dim]` (e.g. a regression head's output) -> the bins whose values
        (`bins_to_normalized_actions`) are nearest, so a bin's own value maps back to it; values outside the range go
        to the end bins."""
        table = _bin_values(np.arange(self.num_action_bins), **self._bin_options())
        array = _to_numpy(values).astype(np.float64)
        upper = np.clip(np.searchsorted(table, array), 1, len(table) - 1)
        lower_is_nearer = array - table[upper - 1] <= table[upper] - array
        return _like(upper - lower_is_nearer, values)

    def decode(self, token_ids: ArrayLike, unnorm_key: str | None = None) -> ArrayLike:
        """Action token ids `[..., action_dim]` -> raw actions."""
        return self.bins_to_actions(self.token_ids_to_bins(token_ids), unnorm_key)


# PIL modes whose pixels are numbers wider than 8 bits (16-bit, 32-bit integer, float): read as arrays, since PIL's own
# conversion to RGB would clip them to 0-255.
NUMERIC_PIL_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
CHANNEL_COUNTS = (1, 3, 4)


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor))


def _describe(value: Any) -> str:
    if _is_array(value):
        return f"an array of shape {tuple(value.shape)}"
    return "None" if value is None else f"{type(value).__name__} {str(value)[:60]!r}"


def as_image_list(images: Any) -> list:
    """`images` as a flat, non-empty list of single images.

    One image (PIL, file path, `[H, W]` / `[H, W, C]` / `[C, H, W]` array or tensor) becomes a list of one; a 4-D array
    or tensor is a batch (`[B, H, W, C]` or `[B, C, H, W]`); a list or tuple must hold single images.

    Raises:
        ValueError: for `None`, no images, `None` or a nested list inside a list, or an array that is not 2- to 4-D.
    """
    if isinstance(images, (list, tuple)):
        for index, image in enumerate(images):
            if image is None or isinstance(image, (list, tuple)) or (_is_array(image) and image.ndim not in (2, 3)):
                raise ValueError(
                    f"images[{index}] is {_describe(image)}; each entry of an image list must be one image (PIL, "
                    "[H, W, C] / [C, H, W] array or tensor, or a file path)."
                )
        listed = list(images)
    elif _is_array(images) and images.ndim == 4:
        listed = list(images)
    elif images is None or (_is_array(images) and images.ndim not in (2, 3)):
        raise ValueError(
            f"images is {_describe(images)}; pass one image (PIL, [H, W, C] / [C, H, W] array or tensor, or a file "
            "path), a list of them, or a [B, H, W, C] / [B, C, H, W] batch."
        )
    else:
        listed = [images]
    if not listed:
        raise ValueError("images holds no image; pass at least one.")
    return listed


def checked_image(
    image: Any, input_data_format: ChannelDimension | str | None = None
) -> tuple[PIL.Image.Image | np.ndarray, ChannelDimension | str | None]:
    """One image in a form whose meaning is certain, with its channel layout.

    - A file path (`str` or `pathlib.Path`), URL or base64 string is opened first.
    - PIL images of 8-bit modes (`"RGB"`, `"L"`, `"RGBA"`, `"P"`, ...) pass unchanged (converted to RGB later,
      transparency composited over white).
    - Everything else becomes a uint8 array, by its type: 16-bit images (PIL `"I;16"`, uint16 arrays) are scaled by
      255 / 65535; floating-point images (PIL `"F"`, float arrays) must hold values in [0, 1] and are scaled by 255;
      other integer images (PIL `"I"`, int32 / int64 arrays) must hold values in [0, 255]. The range is never guessed
      from the values, so a dark frame means the same as a bright one.
    - The channel axis of a 3-D array is its first or last axis of size 1, 3 or 4; when both are (a 4 x 4 x 3 array
      is either), `input_data_format` ("channels_first" / "channels_last") must say which. 2-D arrays are grayscale.

    Returns:
        `(image, input_data_format)`: a PIL image, or a uint8 array and its `ChannelDimension`.

    Raises:
        ValueError: naming the value and the fix, for an empty image, NaN or out-of-range values, an ambiguous or
            missing channel axis, a file that does not exist, or an unsupported type.
    """
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(image)
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"Got an empty {image.width}x{image.height} PIL image; images need at least one pixel.")
        if image.mode not in NUMERIC_PIL_MODES:
            return image, input_data_format
        array = np.asarray(image)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ValueError(
            f"Got an image of type {type(image).__name__}; pass PIL images, numpy arrays, torch tensors or file paths."
        )
    if array.ndim == 2:
        array, input_data_format = array[None], ChannelDimension.FIRST
    data_format = _channel_format(array.shape, input_data_format)
    height, width = array.shape[1:] if data_format == ChannelDimension.FIRST else array.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"Got an image array of shape {array.shape} ({height}x{width} pixels); images need at least one pixel.")
    return _as_uint8(array), data_format


def _open_image(path: str | os.PathLike) -> PIL.Image.Image:
    """A file path, URL or base64 string -> PIL image, with an error that names a path that does not exist."""
    location = os.fspath(path)
    try:
        return load_image(location)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not read an image from {location!r}: no such image file (nor a URL or base64 image). Check the path."
        ) from error


def _channel_format(shape: tuple[int, ...], given: ChannelDimension | str | None) -> ChannelDimension:
    """The channel axis of a 3-D image of `shape`: `given`, else the first or last axis of size 1, 3 or 4."""
    if given is not None:
        data_format = ChannelDimension(given)
        channels = shape[0] if data_format == ChannelDimension.FIRST else shape[-1]
        if channels not in CHANNEL_COUNTS:
            raise ValueError(f"An image of shape {shape} with input_data_format={data_format.value!r} has {channels} channels; images have 1, 3 or 4.")
        return data_format
    first, last = shape[0] in CHANNEL_COUNTS, shape[-1] in CHANNEL_COUNTS
    if first and last:
        raise ValueError(
            f"The channel axis of an image of shape {shape} is ambiguous (first or last); pass "
            "input_data_format='channels_last' (for [H, W, C]) or 'channels_first' (for [C, H, W]), or a PIL image."
        )
    if not (first or last):
        raise ValueError(
            f"An image of shape {shape} has no channel axis of size 1, 3 or 4; pass [H, W, C] or [C, H, W] RGB, "
            "RGBA or grayscale images."
        )
    return ChannelDimension.FIRST if first else ChannelDimension.LAST


def _as_uint8(array: np.ndarray) -> np.ndarray:
    """Pixel values -> uint8 by dtype (see `checked_image`); floats scale as transformers' own PIL conversion does."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16 of either byte order (PIL "I;16B")
        array = array / 65535.0
    elif np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"An integer image of dtype {array.dtype} holds values in [{array.min()}, {array.max()}], outside the "
                "8-bit range [0, 255]; pass 16-bit images as uint16 (scaled by 1/65535) or rescale to uint8 yourself."
            )
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"Images of dtype {array.dtype} are not supported; pass uint8, uint16 or floats in [0, 1].")
    if not np.all(np.isfinite(array)):
        raise ValueError("The image holds NaN or inf values; clean the camera frame before predicting.")
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(
            f"A floating-point image holds values in [{array.min():.4g}, {array.max():.4g}], but float images must lie "
            "in [0, 1]; divide 0-255 images by 255 (or pass them as uint8). Already-normalised pixel_values go to the "
            "model directly, not through the image processor."
        )
    return rescale(array, 255).astype(np.uint8)


class OpenVLAImagesKwargs(ImagesKwargs, total=False):
    """
    fused_image_mean (`list[float]`, *optional*):
        Mean of the second normalisation, stacked as channels 3-5 for a fused (DINOv2 + SigLIP) backbone.
    fused_image_std (`list[float]`, *optional*):
        Standard deviation of the second normalisation.
    image_resize_strategy (`str`, *optional*):
        `"resize-naive"` (default): resize to `size`, ignoring the aspect ratio; `"resize-crop"`: shorter side to
        `size`, then a centre crop; `"letterbox"`: pad to a square with `letterbox_fill` first, then as
        `"resize-crop"` (the strategies of official OpenVLA, computed as torchvision does).
    letterbox_fill (`list[int]`, *optional*):
        Per-channel fill (0-255) of the letterbox padding.
    """

    fused_image_mean: list[float] | None
    fused_image_std: list[float] | None
    image_resize_strategy: str | None
    letterbox_fill: list[int] | None


class OpenVLAImageProcessor(PilBackend):
    """Resizes images to `image_size` x `image_size` (bicubic, antialiased), rescales and normalises them.

    Accepts PIL images, numpy `[H, W, C]` / `[C, H, W]` / `[H, W]` arrays, torch tensors and image file paths, one, a
    list or a 4-D batch. Pixel values are read by type (`checked_image`): 8-bit images as 0-255, 16-bit images (PIL
    `"I;16"`, uint16) as 0-65535, floating-point images as [0, 1]; anything ambiguous or out of range raises a
    `ValueError`, so every output pixel is finite and within the normalisation of [0, 1]. With `fused_image_mean` and
    `fused_image_std`, the image is normalised twice and the results stacked as 6 channels (DINOv2 + SigLIP).

    Loads official OpenVLA `preprocessor_config.json` files too (`PrismaticImageProcessor`: their `tvf_*` resize,
    crop and normalisation parameters are translated; the bf16-rounded normalisation constants of the published files
    are used, as the official processor does).

    Returns `pixel_values` `[batch, 3 or 6, image_size, image_size]`.
    """

    valid_kwargs = OpenVLAImagesKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    fused_image_mean = None
    fused_image_std = None
    image_resize_strategy = "resize-naive"
    letterbox_fill = None
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def __init__(self, image_size: int | None = None, **kwargs):
        if any(key in kwargs for key in OFFICIAL_IMAGE_PROCESSOR_KEYS):
            kwargs = _official_image_processor_kwargs(kwargs)
        if image_size is not None:
            kwargs["size"] = {"height": image_size, "width": image_size}
        super().__init__(**kwargs)
        if (self.fused_image_mean is None) != (self.fused_image_std is None):
            raise ValueError("Pass both fused_image_mean and fused_image_std for a fused backbone, or neither.")
        if self.image_resize_strategy not in RESIZE_STRATEGIES:
            raise ValueError(f"image_resize_strategy={self.image_resize_strategy!r} is not one of {RESIZE_STRATEGIES}.")

    @property
    def image_size(self) -> int:
        return self.size["height"]

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list:
        """A flat list of single images (`as_image_list`); paths are opened one at a time in `process_image`."""
        return as_image_list(images)

    def process_image(self, image: Any, input_data_format: ChannelDimension | str | None = None, **kwargs) -> np.ndarray:
        """One image -> channels-first array, after `checked_image` has fixed its pixel range and channel axis."""
        image, input_data_format = checked_image(image, input_data_format)
        return super().process_image(image, input_data_format=input_data_format, **kwargs)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        fused_image_mean=None,
        fused_image_std=None,
        image_resize_strategy=None,
        letterbox_fill=None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        pixel_values = []
        for image in images:
            if do_resize:
                image = self._resize_with_strategy(image, size, resample, image_resize_strategy, letterbox_fill)
            if do_rescale and not np.issubdtype(image.dtype, np.floating):
                image = self.rescale(image, rescale_factor)
            image = image.astype(np.float32)
            if do_normalize:
                normalised = [self.normalize(image, image_mean, image_std)]
                if fused_image_mean is not None:
                    normalised.append(self.normalize(image, fused_image_mean, fused_image_std))
                image = np.concatenate(normalised, axis=0)
            pixel_values.append(image)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _resize_with_strategy(self, image: np.ndarray, size, resample, strategy: str | None, fill) -> np.ndarray:
        """Resize a `[C, H, W]` image with one of `RESIZE_STRATEGIES` (PIL resampling, torchvision's size and crop
        arithmetic, as the official processor)."""
        if strategy in (None, "resize-naive"):
            return self.resize(image=image, size=size, resample=resample)
        if strategy not in RESIZE_STRATEGIES:
            raise ValueError(f"image_resize_strategy={strategy!r} is not one of {RESIZE_STRATEGIES}.")
        if strategy == "letterbox":
            image = _letterbox(image, fill)
        height, width = image.shape[-2:]
        short, long = min(height, width), max(height, width)
        new_short, new_long = size.height, int(size.height * long / short)
        new_height, new_width = (new_long, new_short) if width <= height else (new_short, new_long)
        image = self.resize(image=image, size=SizeDict(height=new_height, width=new_width), resample=resample)
        top = int(round((new_height - size.height) / 2.0))
        left = int(round((new_width - size.width) / 2.0))
        return image[:, top : top + size.height, left : left + size.width]


def _letterbox(image: np.ndarray, fill: Sequence[int] | None) -> np.ndarray:
    """Pad a `[C, H, W]` image to a square (official OpenVLA: `int((side - w) / 2)` on both sides) with `fill`."""
    height, width = image.shape[-2:]
    side = max(height, width)
    pad_width, pad_height = int((side - width) / 2), int((side - height) / 2)
    fill = [0] * image.shape[0] if fill is None else list(fill)
    if np.issubdtype(image.dtype, np.floating):
        fill = [value / 255.0 for value in fill]
    return np.stack(
        [
            np.pad(channel, ((pad_height, pad_height), (pad_width, pad_width)), mode="constant", constant_values=value)
            for channel, value in zip(image, fill, strict=True)
        ]
    )


def _official_image_processor_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Our image-processor options for an official OpenVLA `preprocessor_config.json` (`PrismaticImageProcessor`).

    Its serialized `tvf_normalize_params` win over `means`/`stds` (the official processor re-applies them on load; in
    the published files they are rounded to bfloat16). Tower 0 gives `image_mean`/`image_std`, tower 1 (fused
    backbone) `fused_image_mean`/`fused_image_std`. All towers must share the resize and crop parameters.
    """
    kwargs = dict(kwargs)
    official = {key: kwargs.pop(key) for key in OFFICIAL_IMAGE_PROCESSOR_KEYS if key in kwargs}
    for key in ("auto_map", "image_processor_type", "processor_class"):
        kwargs.pop(key, None)
    normalize = official.get("tvf_normalize_params") or [
        {"mean": mean, "std": std} for mean, std in zip(official["means"], official["stds"], strict=True)
    ]
    resize = official.get("tvf_resize_params") or [{}]
    crop_sizes = {tuple(params["output_size"]) for params in official.get("tvf_crop_params") or []}
    crop_sizes = crop_sizes or {tuple(size[-2:]) for size in official.get("input_sizes") or []}
    if len(crop_sizes) != 1 or len({tuple(sorted((k, str(v)) for k, v in params.items())) for params in resize}) != 1:
        raise ValueError(
            f"The vision towers of this official preprocessor config use different resize or crop parameters "
            f"({resize}, crop sizes {sorted(crop_sizes)}); only a shared one is supported."
        )
    height, width = crop_sizes.pop()
    if height != width:
        raise ValueError(f"Official preprocessor config crops to {height}x{width}; only square images are supported.")
    interpolation = resize[0].get("interpolation", PILImageResampling.BICUBIC)
    if isinstance(interpolation, str):  # `interpolations`-style names
        interpolation = PILImageResampling[interpolation.upper()]
    strategy = kwargs.pop("image_resize_strategy", "resize-naive")
    if official.get("tvf_do_letterbox"):
        strategy = "letterbox"
    kwargs.update(
        size={"height": height, "width": width},
        resample=PILImageResampling(interpolation),
        image_mean=list(normalize[0]["mean"]),
        image_std=list(normalize[0]["std"]),
        image_resize_strategy=strategy,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
    )
    if len(normalize) > 1:
        kwargs.update(fused_image_mean=list(normalize[1]["mean"]), fused_image_std=list(normalize[1]["std"]))
    if strategy == "letterbox":
        kwargs["letterbox_fill"] = list(official.get("tvf_letterbox_fill") or [0, 0, 0])
    return kwargs


def check_saved_folder(path: str | os.PathLike, needs: Mapping[str, Sequence[str]], subfolder: str | None = None) -> None:
    """Refuse an incomplete saved folder before transformers looks for its files, naming what is missing.

    `needs` maps each required file (as named in the error) to the file names of which one must be present, e.g.
    `{"tokenizer.json": ("tokenizer.json", "tokenizer.model")}`; a name starting with "." is a suffix (".safetensors"). A path that cannot be a Hub id (absolute, starting
    with `.` or `~`, or with more than one `/`) must be an existing folder; Hub ids pass unchecked.
    """
    folder = os.path.expanduser(os.fspath(path))
    folder = os.path.join(folder, subfolder) if subfolder else folder
    if not os.path.isdir(folder):
        if os.path.isabs(folder) or folder.startswith(".") or folder.count("/") > 1:
            raise ValueError(f"There is no folder {folder!r}; check the path (a Hub id has the form 'owner/name').")
        return
    names = os.listdir(folder)
    missing = [
        label
        for label, accepted in needs.items()
        if not any(name == wanted or (wanted.startswith(".") and name.endswith(wanted)) for name in names for wanted in accepted)
    ]
    if missing:
        raise ValueError(
            f"The folder {folder!r} has no {' and no '.join(missing)}, so it is not a complete saved model folder; load "
            "the folder that save_pretrained or scripts/finetune.py wrote (a run stopped while saving leaves no "
            "config.json), or copy the missing files from the model it came from."
        )


def _as_list(values: Any) -> list:
    return list(values) if isinstance(values, (list, tuple)) else [values]


def left_pad(rows: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad `input_ids` (with `pad_token_id`), `attention_mask` (0) and `labels` (-100) of several rows.

    Left padding keeps every prompt's last token in the last column, as batched generation needs.
    """
    length = max(len(row["input_ids"]) for row in rows)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {}
    for key, pad_value in pad_values.items():
        if key not in rows[0]:
            continue
        batch[key] = torch.tensor(
            [[pad_value] * (length - len(row[key])) + list(row[key]) for row in rows], dtype=torch.long
        )
    return batch


class OpenVLAProcessor(ProcessorMixin):
    """Turns images and instructions (and, for training, actions) into OpenVLA model inputs.

    The sequence of a row is `[BOS | image placeholders x num_image_tokens | prompt | action tokens]`, left-padded:
    the model writes the projected image patches over the placeholders. The prompt is `prompt_template` filled with
    the instruction. With `actions`, `labels` supervise the action tokens only (everything else is -100).

    Args:
        image_processor: an `OpenVLAImageProcessor`.
        tokenizer: a fast tokenizer with BOS and EOS tokens; if it has no pad token, EOS pads (no token is added).
        action_dim, num_action_bins, action_min, action_max, action_binning: action space, as in `OpenVLAConfig`.
        action_token_end: one past the highest action token id; defaults to `len(tokenizer)`, so the action tokens
            are the last `num_action_bins` ids of the vocabulary.
        patch_size: ViT patch size; `num_image_tokens = (image_size // patch_size) ** 2`.
        image_token_id: placeholder id of the image patches; defaults to `len(tokenizer)` (the config default).
        prompt_template: format string with an `{instruction}` field.
        prompt_suffix_token_id: token appended to a prompt that does not already end with it (official OpenVLA
            appends Llama-2's empty token).
        max_text_len: longest prompt in tokens; longer prompts raise an error.
        norm_stats: per-dataset action statistics (official layout) used to normalise raw training actions; checked
            with `check_norm_stats`.
        action_chunk_size: actions per sample the model predicts (`OpenVLAConfig.action_chunk_size`); when set,
            training actions of another chunk length raise an error here rather than in the model's forward. `None`
            (a processor built without a model config) accepts any.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        action_dim: int = 7,
        num_action_bins: int = 256,
        action_min: float = -1.0,
        action_max: float = 1.0,
        action_binning: str = "reference",
        action_token_end: int | None = None,
        patch_size: int = 14,
        image_token_id: int | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        prompt_suffix_token_id: int | None = None,
        max_text_len: int = 64,
        norm_stats: dict | None = None,
        action_chunk_size: int | None = None,
        **kwargs,
    ):
        if tokenizer is None or image_processor is None:
            raise ValueError("OpenVLAProcessor needs both an image_processor and a tokenizer.")
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer needs BOS and EOS tokens, got bos={tokenizer.bos_token!r}, eos={tokenizer.eos_token!r}.")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if "{instruction}" not in prompt_template:
            raise ValueError(f"prompt_template={prompt_template!r} has no {{instruction}} field.")
        self.action_dim = action_dim
        self.num_action_bins = num_action_bins
        self.action_min = action_min
        self.action_max = action_max
        self.action_binning = action_binning
        self.action_token_end = len(tokenizer) if action_token_end is None else action_token_end
        self.patch_size = patch_size
        self.image_token_id = len(tokenizer) if image_token_id is None else image_token_id
        self.prompt_template = prompt_template
        self.prompt_suffix_token_id = prompt_suffix_token_id
        self.max_text_len = max_text_len
        self.norm_stats = dict(norm_stats or {})
        check_norm_stats(self.norm_stats)
        self.action_chunk_size = action_chunk_size
        super().__init__(image_processor, tokenizer, **kwargs)
        self._check_action_tokens()

    @classmethod
    def from_model_config(cls, config, image_processor, tokenizer, **overrides) -> "OpenVLAProcessor":
        """The processor matching an `OpenVLAConfig`: action space, token ids, patch size, prompt length and statistics
        from the config; `config.prompt_suffix_token` (e.g. official OpenVLA's empty token) is looked up in the
        tokenizer."""
        suffix_id = None
        if getattr(config, "prompt_suffix_token", None) is not None:
            suffix_id = tokenizer.convert_tokens_to_ids(config.prompt_suffix_token)
            if suffix_id is None or (suffix_id == tokenizer.unk_token_id and config.prompt_suffix_token != tokenizer.unk_token):
                raise ValueError(
                    f"The model appends prompt_suffix_token={config.prompt_suffix_token!r} to prompts, but the tokenizer "
                    "does not know that token; use the tokenizer saved with the model."
                )
        options = {
            "action_dim": config.action_dim,
            "num_action_bins": config.num_action_bins,
            "action_min": config.action_min,
            "action_max": config.action_max,
            "action_binning": config.action_binning,
            "action_token_end": config.action_token_end,
            "patch_size": config.patch_size,
            "image_token_id": config.image_token_id,
            "prompt_suffix_token_id": suffix_id,
            "max_text_len": config.max_text_len,
            "norm_stats": config.norm_stats,
            "action_chunk_size": config.action_chunk_size,
        }
        return cls(image_processor=image_processor, tokenizer=tokenizer, **{**options, **overrides})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved processor; for a folder without processor settings (an official OpenVLA checkpoint, whose
        `PrismaticProcessor` keeps them in `config.json`), build it with `from_model_config` from the folder's config,
        image-processor config and tokenizer.

        The parts are loaded with this module's own classes, never through the Auto classes, so a saved folder loads
        without `trust_remote_code` whatever its `auto_map` says and however transformers resolves sub-processors.
        Keyword arguments that name an `__init__` option (e.g. `max_text_len=128`) override the saved value; the
        others (`revision`, `token`, `cache_dir`, ...) go to the file lookup.
        """
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in cls._init_option_names()}
        check_saved_folder(
            pretrained_model_name_or_path,
            {"processor_config.json": PROCESSOR_FILES, "tokenizer.json": ("tokenizer.json", "tokenizer.model")},
            kwargs.get("subfolder"),
        )
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **dict(kwargs))
        image_processor = OpenVLAImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if "num_action_bins" not in processor_dict:
            try:
                from .configuration_openvla import OpenVLAConfig
            except ImportError:
                from configuration_openvla import OpenVLAConfig
            config = OpenVLAConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
            # `config=` keeps AutoTokenizer from reading config.json, whose auto_map names the official remote code
            tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
            return cls.from_model_config(config, image_processor, tokenizer, **options)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        saved = {name: value for name, value in processor_dict.items() if name in cls._init_option_names()}
        return cls(image_processor=image_processor, tokenizer=tokenizer, **{**saved, **options})

    @classmethod
    def _init_option_names(cls) -> set[str]:
        """The processor settings `__init__` takes besides its two parts (`action_dim`, `norm_stats`, ...)."""
        parameters = inspect.signature(cls.__init__).parameters
        return {name for name, parameter in parameters.items() if parameter.kind is parameter.POSITIONAL_OR_KEYWORD} - {
            "self", "image_processor", "tokenizer"
        }

    def _check_action_tokens(self) -> None:
        if self.num_action_bins > self.action_token_end:
            raise ValueError(
                f"The vocabulary ({len(self.tokenizer)} tokens, action tokens ending at {self.action_token_end}) is "
                f"too small for num_action_bins={self.num_action_bins}; use a tokenizer with more tokens or fewer bins."
            )
        action_ids = range(self.action_token_end - self.num_action_bins, self.action_token_end)
        special = {name: getattr(self.tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")}
        clashes = {name: token_id for name, token_id in special.items() if token_id in action_ids}
        if clashes:
            raise ValueError(
                f"Special tokens {clashes} fall among the action token ids [{action_ids.start}, {action_ids.stop}); "
                f"the vocabulary ({len(self.tokenizer)} tokens) is too small for num_action_bins={self.num_action_bins}."
            )

    @property
    def action_tokenizer(self) -> ActionTokenizer:
        """Maps this processor's actions to token ids (it holds the same action settings as `OpenVLAConfig`)."""
        return ActionTokenizer.from_config(self)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_processor.image_size // self.patch_size) ** 2

    def prompt_token_ids(self, instruction: str) -> list[int]:
        """`[BOS, prompt tokens...(, suffix)]` for one instruction."""
        if not isinstance(instruction, str):
            raise ValueError(
                f"instruction={instruction!r} is not a string; pass one text instruction (str) per image."
            )
        token_ids = self.tokenizer(self.prompt_template.format(instruction=instruction), add_special_tokens=True)["input_ids"]
        if not token_ids or token_ids[0] != self.tokenizer.bos_token_id:
            token_ids = [self.tokenizer.bos_token_id, *token_ids]
        if self.prompt_suffix_token_id is not None and token_ids[-1] != self.prompt_suffix_token_id:
            token_ids.append(self.prompt_suffix_token_id)
        if len(token_ids) > self.max_text_len:
            raise ValueError(
                f"The prompt for instruction {instruction!r} has {len(token_ids)} tokens, more than max_text_len="
                f"{self.max_text_len}; shorten the instruction or raise max_text_len."
            )
        return token_ids

    def action_token_ids(self, actions: ArrayLike, dataset_name: str | None = None) -> np.ndarray:
        """Raw actions `[..., action_dim]` -> token ids `[..., action_dim]`, after checking shape and values."""
        values = action_array(actions)
        if values.shape[-1:] != (self.action_dim,):
            raise ValueError(
                f"Each action must have action_dim={self.action_dim} values, got an array of shape {values.shape}."
            )
        return self.action_tokenizer.encode(values, dataset_name)

    def encode_row(
        self, instruction: str, actions: ArrayLike | None = None, dataset_name: str | None = None
    ) -> dict[str, list[int]]:
        """Token ids, attention mask and (with actions) labels of one unpadded row.

        `actions` is `[action_dim]`, or `[chunk, action_dim]` for parallel decoding with action chunks.
        """
        prompt_ids = self.prompt_token_ids(instruction)
        input_ids = [prompt_ids[0]] + [self.image_token_id] * self.num_image_tokens + prompt_ids[1:]
        row = {"input_ids": input_ids}
        if actions is not None:
            action_ids = self.action_token_ids(actions, dataset_name).reshape(-1).tolist()
            if self.action_chunk_size is not None and len(action_ids) != self.action_chunk_size * self.action_dim:
                raise ValueError(
                    f"Each sample needs action_chunk_size={self.action_chunk_size} action(s) of action_dim="
                    f"{self.action_dim} values, got actions of shape {np.shape(actions)}; pass [action_dim] actions "
                    "(or [action_chunk_size, action_dim] chunks for a model with action chunks)."
                )
            row["labels"] = [IGNORE_INDEX] * len(input_ids) + action_ids
            row["input_ids"] = input_ids + action_ids
        row["attention_mask"] = [1] * len(row["input_ids"])
        return row

    def process_example(
        self, image, instruction: str, actions: ArrayLike | None = None, dataset_name: str | None = None
    ) -> dict[str, Any]:
        """One unpadded training or inference example: `encode_row` plus `pixel_values` `[C, H, W]`.

        Map a `datasets` dataset through this and batch it with `data_collator`.
        """
        row = self.encode_row(instruction, actions, dataset_name)
        row["pixel_values"] = self.image_processor(image)["pixel_values"][0]
        return row

    @property
    def data_collator(self) -> "OpenVLADataCollator":
        """Left-pads examples made by `process_example` into a batch."""
        return OpenVLADataCollator(self.tokenizer.pad_token_id)

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        actions: ArrayLike | Sequence | None = None,
        dataset_name: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Process one sample or a batch.

        Args:
            images: one image or a list (PIL, numpy, torch).
            text: one instruction or a list, as many as images.
            actions: raw actions `[batch, action_dim]` (or `[action_dim]` for one sample; `[batch, chunk, action_dim]`
                for action chunks); normalised with `norm_stats[dataset_name]` when statistics are known.
            dataset_name: the dataset (key of `norm_stats`) of each sample, or one for all.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `pixel_values` and, with actions, `labels`.
        """
        if images is None or text is None:
            raise ValueError("OpenVLAProcessor needs both images and text (the instructions).")
        image_list, instructions = as_image_list(images), _as_list(text)
        if len(image_list) != len(instructions):
            raise ValueError(
                f"Got {len(image_list)} images and {len(instructions)} instructions; pass one instruction per image."
            )
        names = _as_list(dataset_name) if isinstance(dataset_name, (list, tuple)) else [dataset_name] * len(instructions)
        if len(names) != len(instructions):
            raise ValueError(f"Got {len(names)} dataset names for {len(instructions)} samples.")
        action_rows: list = [None] * len(instructions)
        if actions is not None:
            values = action_array(actions)
            if values.ndim == 1 or (values.ndim == 2 and len(instructions) == 1 and values.shape[0] != 1):
                values = values[None]
            if values.shape[0] != len(instructions):
                raise ValueError(
                    f"Got actions of shape {values.shape} for {len(instructions)} samples; pass one action per sample."
                )
            action_rows = list(values)
        rows = [self.encode_row(t, a, n) for t, a, n in zip(instructions, action_rows, names)]
        batch = left_pad(rows, self.tokenizer.pad_token_id)
        pixel_values = self.image_processor(image_list, return_tensors="pt", **kwargs)["pixel_values"]
        features = BatchFeature({**batch, "pixel_values": pixel_values})
        if return_tensors is None:
            return BatchFeature({key: value.tolist() for key, value in features.items()})
        return features.convert_to_tensors(return_tensors)

    def batch_decode_actions(self, token_ids: ArrayLike, unnorm_key: str | None = None) -> ArrayLike:
        """Action token ids `[..., action_dim]` -> raw actions."""
        return self.action_tokenizer.decode(token_ids, unnorm_key)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


class OpenVLADataCollator:
    """Collates rows made by `OpenVLAProcessor.encode_row` plus their image into a left-padded batch: `pixel_values`
    `[C, H, W]`, or `vision_features` `[num_patches, vision_dim]` (a frozen vision backbone's cached
    `model.encode_image` output, which the model's forward takes instead of pixels)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty list of samples.")
        batch = left_pad(features, self.pad_token_id)
        image_key = "vision_features" if "vision_features" in features[0] else "pixel_values"
        batch[image_key] = torch.stack([torch.as_tensor(np.asarray(f[image_key])) for f in features]).float()
        return batch


OpenVLAImageProcessor.register_for_auto_class("AutoImageProcessor")
OpenVLAProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "ActionTokenizer",
    "OpenVLADataCollator",
    "build_action_chunks",
    "OpenVLAImageProcessor",
    "OpenVLAProcessor",
    "compute_action_stats",
    "detokenize_actions",
    "normalize_actions",
    "resolve_unnorm_key",
    "tokenize_actions",
    "unnormalize_actions",
]
