"""A check of a demonstration dataset before fine-tuning: per-dimension action statistics, sample frames and findings.

The findings are the causes behind most "my fine-tuned model does nothing useful" reports: idle frames that teach the
model to stand still, constant or binary dimensions, actions recorded as absolute poses or in mixed units, quantile
bounds so close that few bins are used, NaN, frozen camera frames and episodes shorter than an action chunk. Each
comes with its evidence and what to do. Statistics are those fine-tuning computes (`compute_action_stats`: q01/q99
bounds and mask) and bins those of `ActionTokenizer`, so the report shows what training will see.

`scripts/inspect_dataset.py` is the command line; `inspect_actions` and `write_report` are its parts.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from processing_openvla import ActionTokenizer, compute_action_stats

from .lerobot_format import LeRobotMetadata, parse_episodes, read_frames

# Below these sizes the statistical findings (idle frames, dimension kinds, poses, units, bins) would report noise.
MIN_FRAMES = 100
MIN_EPISODES = 3
# A frame is idle when every moving dimension is within this share of its q01-q99 range from zero.
IDLE_TOLERANCE = 0.02
IDLE_SHARE = 0.05  # a finding above this share of idle frames
IDLE_RUN = 3  # frames of a long idle run at an episode's start or end
IDLE_RUN_EPISODE_SHARE = 0.1  # a finding when at least this share of episodes begins or ends with one
ABSOLUTE_MEAN_TO_STD = 3.0  # |mean| / std above this ...
ABSOLUTE_AUTOCORRELATION = 0.9  # ... with lag-1 autocorrelation above this looks like a pose, not a delta
UNIT_RANGE_RATIO = 50.0  # ratio of the widest to the narrowest q01-q99 range of the moving dimensions
MIN_BINS_USED = 16  # a moving dimension using fewer bins (with more distinct values) loses resolution
DUPLICATE_SHARE = 0.05  # share of frames identical to the one before


@dataclass
class Finding:
    """One thing the check found: `kind` (a short id), what it is, the evidence and what to do.

    `severity` is "problem" (likely to hurt training) or "note" (worth knowing, often intended)."""

    kind: str
    title: str
    evidence: str
    advice: str
    severity: str = "problem"


@dataclass
class RecordedActions:
    """The actions of a dataset as recorded, NaN included, one row per frame.

    Attributes:
        actions: `[frames, action_dim]` float64.
        episodes, steps: `[frames]` episode index and frame index of each row.
        instructions: `[frames]` the task of each row.
    """

    actions: np.ndarray
    episodes: np.ndarray
    steps: np.ndarray
    instructions: list[str]

    def __post_init__(self):
        order = np.lexsort((self.steps, self.episodes))
        self.actions = np.asarray(self.actions, dtype=np.float64)[order]
        self.episodes = np.asarray(self.episodes)[order]
        self.steps = np.asarray(self.steps)[order]
        self.instructions = [self.instructions[i] for i in order]

    @property
    def episode_starts(self) -> np.ndarray:
        """Index of each episode's first row, and the number of rows at the end: `[episodes + 1]`."""
        changes = np.flatnonzero(self.episodes[1:] != self.episodes[:-1]) + 1
        return np.r_[0, changes, len(self.episodes)]


def read_lerobot_actions(root: str | Path, action_key: str = "action", episodes: str | None = None) -> RecordedActions:
    """The actions of a LeRobot dataset folder straight from its parquet files, NaN kept (the training reader refuses
    them, which is right for training but hides them from a check)."""
    meta = LeRobotMetadata(root)
    action_dim = meta.action_dim(action_key)
    table = read_frames(meta, meta.select(parse_episodes(episodes)), ["episode_index", "frame_index", "task_index", action_key])
    actions = np.asarray([np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in table[action_key]])
    if actions.ndim != 2 or actions.shape[1] != action_dim:
        raise ValueError(f"{action_key!r} of {str(root)!r} is not {action_dim} values per frame as meta/info.json declares; fix the data.")
    return RecordedActions(
        actions,
        np.asarray(table["episode_index"]).reshape(-1),
        np.asarray(table["frame_index"]).reshape(-1),
        [meta.tasks[int(i)] for i in np.asarray(table["task_index"]).reshape(-1)],
    )


@dataclass
class DimensionSummary:
    """Statistics of one action dimension over the finite frames, and how binning treats it."""

    index: int
    kind: str  # "constant", "binary" or "continuous"
    stats: dict[str, float]
    bins_used: int
    distinct_values: int


@dataclass
class Inspection:
    """What `inspect_actions` computed: the statistics as fine-tuning computes them, per-dimension summaries, the
    idle mask and the findings."""

    norm_stats: dict | None
    dimensions: list[DimensionSummary]
    idle: np.ndarray
    findings: list[Finding] = field(default_factory=list)


def _lag1_autocorrelation(values: np.ndarray, episodes: np.ndarray) -> float:
    """Correlation of each frame's value with the next one's in the same episode, pooled over episodes."""
    same = episodes[1:] == episodes[:-1]
    current, following = values[:-1][same], values[1:][same]
    if len(current) < 3 or current.std() == 0 or following.std() == 0:
        return 0.0
    return float(np.corrcoef(current, following)[0, 1])


def _dimension_kind(values: np.ndarray) -> str:
    distinct = np.unique(values)
    return "constant" if len(distinct) == 1 else "binary" if len(distinct) == 2 else "continuous"


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def inspect_actions(recorded: RecordedActions, num_bins: int = 256, binning: str = "reference", chunk_size: int = 1,
                    frame_hashes: np.ndarray | None = None) -> Inspection:
    """Statistics and findings of `recorded`.

    Args:
        recorded: the actions, episodes and steps.
        num_bins, binning: the model's binning (`config.num_action_bins`, `config.action_binning`).
        chunk_size: the model's action chunk; shorter episodes are reported.
        frame_hashes: `[frames]` a hash of each frame's image in `recorded`'s row order, to find frozen frames.
    """
    actions, episodes = recorded.actions, recorded.episodes
    findings: list[Finding] = []
    finite_rows = np.isfinite(actions).all(axis=1)
    if not finite_rows.all():
        bad = np.flatnonzero(~finite_rows)
        bad_episodes = sorted({int(e) for e in episodes[bad]})
        findings.append(Finding(
            "nan", f"{len(bad)} frame(s) hold NaN or inf actions",
            f"first at episode {episodes[bad[0]]} frame {recorded.steps[bad[0]]} ({_fmt(actions[bad[0]])}); episodes "
            f"{bad_episodes[:20]}{' ...' if len(bad_episodes) > 20 else ''}.",
            "Fine-tuning refuses these rows: fix the recording, or leave the episodes out with --episodes.",
        ))
    starts = recorded.episode_starts
    lengths = np.diff(starts)
    if chunk_size > 1 and (lengths < chunk_size).any():
        short = np.flatnonzero(lengths < chunk_size)
        findings.append(Finding(
            "short_episodes", f"{len(short)} episode(s) are shorter than an action chunk of {chunk_size}",
            f"episodes {[int(episodes[starts[i]]) for i in short[:20]]} have {sorted({int(lengths[i]) for i in short})} frames.",
            "Their chunk labels repeat the last action to fill the chunk; drop them, or train with a smaller --action_chunk_size.",
        ))
    if frame_hashes is not None:
        findings += _duplicate_frames(frame_hashes, episodes)

    finite = actions[finite_rows]
    if len(finite) == 0:
        return Inspection(None, [], np.zeros(len(actions), dtype=bool), findings)
    norm_stats = compute_action_stats(finite)
    tokenizer = ActionTokenizer(action_token_end=num_bins, num_action_bins=num_bins, scheme=binning, norm_stats={"data": norm_stats})
    with warnings.catch_warnings():  # values far outside q01/q99 are reported below, as findings
        warnings.simplefilter("ignore")
        bins = np.asarray(tokenizer.token_ids_to_bins(tokenizer.encode(finite, "data")))
    stats = norm_stats["action"]
    dimensions = []
    for d in range(actions.shape[1]):
        summary = {name: float(stats[name][d]) for name in ("min", "q01", "q99", "max", "mean", "std")}
        summary["median"] = float(np.median(finite[:, d]))
        dimensions.append(DimensionSummary(d, _dimension_kind(finite[:, d]), summary, len(np.unique(bins[:, d])), len(np.unique(finite[:, d]))))

    moving = [dim.index for dim in dimensions if dim.kind == "continuous"]
    scale = np.array([dim.stats["q99"] - dim.stats["q01"] for dim in dimensions])
    idle = np.zeros(len(actions), dtype=bool)
    if moving:
        idle[finite_rows] = (np.abs(finite[:, moving]) <= IDLE_TOLERANCE * np.maximum(scale[moving], 1e-12)).all(axis=1)
    num_episodes = len(lengths)
    if len(finite) < MIN_FRAMES or num_episodes < MIN_EPISODES:
        findings.append(Finding(
            "too_small", f"Too small to judge the actions: {len(finite)} finite frames in {num_episodes} episode(s)",
            f"the checks of idle frames, dimension kinds, absolute poses, units and bins need at least {MIN_FRAMES} frames "
            f"in {MIN_EPISODES} episodes, so they were not run.",
            "Record more demonstrations; fine-tuning on this little data will not generalise either.", "note",
        ))
        return Inspection(norm_stats, dimensions, idle, findings)

    findings += _idle_findings(idle, recorded, moving, scale)
    findings += _dimension_findings(dimensions, tokenizer, finite, recorded, finite_rows)
    return Inspection(norm_stats, dimensions, idle, findings)


def _duplicate_frames(frame_hashes: np.ndarray, episodes: np.ndarray) -> list[Finding]:
    same_episode = episodes[1:] == episodes[:-1]
    duplicate = same_episode & (frame_hashes[1:] == frame_hashes[:-1])
    share = duplicate.sum() / max(same_episode.sum(), 1)
    if share <= DUPLICATE_SHARE:
        return []
    affected = sorted({int(e) for e in episodes[1:][duplicate]})
    return [Finding(
        "duplicate_frames", f"{share:.0%} of frames are identical to the frame before them",
        f"{int(duplicate.sum())} repeated frames in {len(affected)} episode(s), e.g. {affected[:10]}.",
        "A frozen camera (or a recorder faster than the camera) gives the model the same image with different actions; "
        "record at the camera's rate or drop the repeats.",
    )]


def _idle_findings(idle: np.ndarray, recorded: RecordedActions, moving: list[int], scale: np.ndarray) -> list[Finding]:
    starts = recorded.episode_starts
    leading, trailing = [], []
    for first, end in zip(starts[:-1], starts[1:]):
        flags = idle[first:end]
        lead = int(np.argmin(flags)) if not flags.all() else len(flags)
        trail = int(np.argmin(flags[::-1])) if not flags.all() else len(flags)
        leading.append(lead)
        trailing.append(trail)
    leading, trailing = np.array(leading), np.array(trailing)
    num_episodes = len(leading)
    long_start, long_end = (leading >= IDLE_RUN).sum(), (trailing >= IDLE_RUN).sum()
    share = idle.mean()
    if share <= IDLE_SHARE and max(long_start, long_end) < IDLE_RUN_EPISODE_SHARE * num_episodes:
        return []
    tolerance = ", ".join(f"{IDLE_TOLERANCE * scale[d]:.3g}" for d in moving)
    return [Finding(
        "idle_frames", f"{share:.0%} of frames are idle (action near zero)",
        f"a frame is idle when dimensions {moving} are all within {tolerance} of zero ({IDLE_TOLERANCE:.0%} of each "
        f"one's q01-q99 range); {long_start} of {num_episodes} episodes begin with an idle run of {IDLE_RUN} frames or "
        f"more (longest {leading.max()}), {long_end} end with one (longest {trailing.max()}).",
        "Idle frames teach the model to stand still in scenes where it should move: trim them from the start and end "
        "of each episode (as OpenVLA's data pipeline drops no-op actions) and record again if the operator paused.",
    )]


def _dimension_findings(dimensions: list[DimensionSummary], tokenizer: ActionTokenizer, finite: np.ndarray,
                        recorded: RecordedActions, finite_rows: np.ndarray) -> list[Finding]:
    findings = []
    stats = tokenizer.norm_stats["data"]["action"]
    constant = [dim for dim in dimensions if dim.kind == "constant"]
    if constant:
        findings.append(Finding(
            "constant_dimension", f"{len(constant)} action dimension(s) never change: {[dim.index for dim in constant]}",
            f"values {_fmt(dim.stats['min'] for dim in constant)}; the statistics map each to one bin, and the model "
            "always predicts that value.",
            "Harmless if the robot never moves them (padding to a 7-D action); if it should, the recording lost them.",
            "note",
        ))
    episodes = recorded.episodes[finite_rows]
    for dim in dimensions:
        column = finite[:, dim.index]
        if dim.kind == "binary":
            low, high = np.unique(column)
            two_rows = _two_rows(finite, dim.index, low, high)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                decoded = np.asarray(tokenizer.decode(tokenizer.encode(two_rows, "data"), "data"))[:, dim.index]
            error = np.abs(decoded - [low, high]).max() / (high - low)
            masked = bool(stats["mask"][dim.index])
            rare = min((column == low).mean(), (column == high).mean())
            findings.append(Finding(
                "binary_dimension", f"Dimension {dim.index} is binary ({low:.4g} or {high:.4g}): a gripper?",
                f"{'normalised with q01/q99' if masked else 'left unnormalised by the mask'} (q01 {dim.stats['q01']:.4g}, "
                f"q99 {dim.stats['q99']:.4g}); the rarer value is {rare:.1%} of frames; through the statistics and bins "
                f"the two values come back as {_fmt(decoded)} ({error:.1%} of the gap off).",
                "Fine as it is." if error < 0.01 else
                "The rarer value falls outside q01-q99 and is lost: record more frames with it or mark the dimension "
                "unnormalised (mask false) in the statistics.",
                "note" if error < 0.01 else "problem",
            ))
    moving = [dim for dim in dimensions if dim.kind == "continuous"]
    poses = []
    for dim in moving:
        ratio = abs(dim.stats["mean"]) / max(dim.stats["std"], 1e-12)
        autocorrelation = _lag1_autocorrelation(finite[:, dim.index], episodes)
        if ratio > ABSOLUTE_MEAN_TO_STD and autocorrelation > ABSOLUTE_AUTOCORRELATION:
            poses.append((dim.index, f"dim {dim.index}: mean {dim.stats['mean']:.4g} = {ratio:.1f} std, autocorrelation {autocorrelation:.2f}"))
    if poses:
        findings.append(Finding(
            "absolute_actions", f"Dimension(s) {[index for index, _ in poses]} look like absolute poses, not deltas",
            f"each mean lies many standard deviations from zero and each frame's value predicts the next (lag-1 "
            f"autocorrelation): {'; '.join(text for _, text in poses)}.",
            "OpenVLA predicts end-effector deltas: convert with action[t] = pose[t+1] - pose[t] (or confirm the robot "
            "takes absolute targets and the model sees the current pose).",
        ))
    squeezed = [dim for dim in moving if dim.bins_used < MIN_BINS_USED and dim.distinct_values > dim.bins_used]
    if squeezed:
        evidence = []
        for dim in squeezed:
            column = finite[:, dim.index]
            saturated = ((column < dim.stats["q01"]) | (column > dim.stats["q99"])).mean()
            evidence.append(f"dim {dim.index}: {dim.bins_used} bins for {dim.distinct_values} distinct values in "
                            f"[{dim.stats['min']:.4g}, {dim.stats['max']:.4g}], q01 {dim.stats['q01']:.4g}, q99 "
                            f"{dim.stats['q99']:.4g}, {saturated:.1%} of frames outside and saturated")
        findings.append(Finding(
            "few_bins", f"Dimension(s) {[dim.index for dim in squeezed]} use fewer than {MIN_BINS_USED} of {tokenizer.num_action_bins} bins",
            "q01 and q99 are so close that binning merges the values: " + "; ".join(evidence) + ".",
            "Most of the motion is in a few outliers beyond q01/q99, which the model cannot reproduce: check them "
            "(spikes, resets), or drop the dimension.",
        ))
    ranged = [dim for dim in moving if dim not in squeezed and dim.stats["q99"] > dim.stats["q01"]]
    spans = np.array([dim.stats["q99"] - dim.stats["q01"] for dim in ranged])
    if len(ranged) > 1 and spans.max() / spans.min() > UNIT_RANGE_RATIO:
        wide, narrow = ranged[int(spans.argmax())], ranged[int(spans.argmin())]
        findings.append(Finding(
            "unit_mismatch", f"Dimension {wide.index}'s range is {spans.max() / spans.min():.0f}x dimension {narrow.index}'s",
            f"q01-q99 ranges per moving dimension {dict(zip([dim.index for dim in ranged], np.round(spans, 6).tolist()))}.",
            "Each dimension is normalised on its own, so the model copes, but such ratios usually mean mixed units "
            "(mm and m, degrees and radians): check that the robot receives the unit it was recorded in.",
        ))
    return findings


def _two_rows(finite: np.ndarray, index: int, low: float, high: float) -> np.ndarray:
    """Two copies of the first finite action, with dimension `index` set to `low` and to `high`."""
    rows = np.tile(finite[:1], (2, 1))
    rows[:, index] = [low, high]
    return rows


def frame_hashes(rows: datasets.Dataset, image_column: str) -> np.ndarray:
    """A hash of each row's encoded image (identical frames give identical bytes), `[rows]`."""
    images = rows.cast_column(image_column, datasets.Image(decode=False))[image_column]
    return np.asarray([
        hashlib.sha1(value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()).hexdigest()
        for value in images
    ])


def instruction_counts(recorded: RecordedActions) -> list[tuple[str, int, int]]:
    """(instruction, episodes, frames) for each instruction, most episodes first."""
    frames = Counter(recorded.instructions)
    starts = recorded.episode_starts[:-1]
    episodes = Counter(recorded.instructions[i] for i in starts)
    return sorted(((text, episodes[text], frames[text]) for text in frames), key=lambda item: (-item[1], item[0]))


def plot_actions(recorded: RecordedActions, inspection: Inspection, path: Path, max_episodes: int = 5) -> None:
    """Per dimension: a histogram with q01/q99 (top) and the actions of the first episodes over time, idle frames
    shaded (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = recorded.actions.shape[1]
    figure, axes = plt.subplots(2, dims, figsize=(1.9 * dims + 1, 3.8), squeeze=False)
    finite = recorded.actions[np.isfinite(recorded.actions).all(axis=1)]
    starts = recorded.episode_starts
    for d in range(dims):
        top, bottom = axes[0, d], axes[1, d]
        if len(finite):
            top.hist(finite[:, d], bins=40, color="tab:blue")
        if inspection.norm_stats is not None:
            for name in ("q01", "q99"):
                top.axvline(inspection.norm_stats["action"][name][d], color="tab:red", linestyle="--", linewidth=0.8)
        kind = inspection.dimensions[d].kind if inspection.dimensions else ""
        top.set_title(f"dim {d} ({kind})", fontsize=8)
        for e in range(min(max_episodes, len(starts) - 1)):
            first, end = starts[e], starts[e + 1]
            bottom.plot(np.arange(end - first), recorded.actions[first:end, d], linewidth=0.9)
            for t in np.flatnonzero(inspection.idle[first:end]):
                bottom.axvspan(t - 0.5, t + 0.5, color="0.85", zorder=0)
        bottom.set_xlabel("step", fontsize=7)
        for axis in (top, bottom):
            axis.tick_params(labelsize=6)
    axes[0, 0].set_ylabel("frames", fontsize=7)
    axes[1, 0].set_ylabel(f"first {max_episodes} episodes\n(grey: idle)", fontsize=7)
    figure.suptitle("Actions: histogram with q01/q99 (red), and over time", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=72)
    plt.close(figure)


def plot_sample_frames(rows: datasets.Dataset, image_column: str, recorded_counts: list[tuple[str, int, int]], path: Path,
                       max_instructions: int = 6, frames_per_row: int = 4) -> None:
    """For each of the most frequent instructions, frames spread over its first episode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    instructions = [text for text, _, _ in recorded_counts[:max_instructions]]
    table = rows.select_columns(["instruction", "episode", "step"]).to_pandas()
    figure, axes = plt.subplots(len(instructions), frames_per_row, figsize=(1.6 * frames_per_row, 1.75 * len(instructions)), squeeze=False)
    for r, text in enumerate(instructions):
        matching = table[table["instruction"] == text]
        episode_rows = matching[matching["episode"] == matching["episode"].iloc[0]].sort_values("step")
        picks = episode_rows.index[np.unique(np.linspace(0, len(episode_rows) - 1, frames_per_row).round().astype(int))]
        for axis in axes[r, len(picks):]:
            axis.set_axis_off()
        for c, index in enumerate(picks):
            value = rows[int(index)][image_column]
            image = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value["bytes"]))
            axes[r, c].imshow(image.convert("RGB"))
            axes[r, c].set_axis_off()
            axes[r, c].set_title(f"ep {table['episode'][index]} step {table['step'][index]}", fontsize=6)
        axes[r, 0].text(0, -0.35, text[:60], transform=axes[r, 0].transAxes, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=72)
    plt.close(figure)


def write_report(name: str, recorded: RecordedActions, inspection: Inspection, out: Path, details: dict[str, str],
                 frames_figure: str | None) -> Path:
    """`out/report.md`: the summary, the per-dimension table, the instructions, the findings and the figures."""
    starts = recorded.episode_starts
    lengths = np.diff(starts)
    counts = instruction_counts(recorded)
    lines = [f"# Dataset check: {name}", ""]
    lines += [f"- {key}: {value}" for key, value in details.items()]
    lines += [f"- episodes: {len(lengths)}, frames: {len(recorded.actions)} (episode length {lengths.min()}-{lengths.max()}, median {int(np.median(lengths))})",
              f"- instructions: {len(counts)}", "", "## Findings", ""]
    if not inspection.findings:
        lines.append("Nothing found.")
    for finding in inspection.findings:
        lines += [f"### {finding.severity}: {finding.title}", "", f"- evidence: {finding.evidence}", f"- what to do: {finding.advice}", ""]
    lines += ["", "## Actions per dimension", "",
              "| dim | kind | min | q01 | median | q99 | max | mean | std | bins used |", "|" + " --- |" * 10]
    for dim in inspection.dimensions:
        s = dim.stats
        lines.append(f"| {dim.index} | {dim.kind} | " + " | ".join(f"{s[k]:.4g}" for k in ("min", "q01", "median", "q99", "max", "mean", "std")) + f" | {dim.bins_used} |")
    lines += ["", "![actions](actions.png)", "", "## Instructions", "", "| instruction | episodes | frames |", "| --- | --- | --- |"]
    lines += [f"| {text} | {episodes} | {frames} |" for text, episodes, frames in counts[:50]]
    if len(counts) > 50:
        lines.append(f"| ... {len(counts) - 50} more | | |")
    if frames_figure:
        lines += ["", "## Sample frames", "", f"![frames]({frames_figure})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
