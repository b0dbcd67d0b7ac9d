"""Open-loop replay: a saved model is fed the recorded frames of episodes, and its actions are compared with the
recorded ones, dimension by dimension.

A model that does not reproduce the actions of its own training episodes is under-fit (train longer, check the data);
one that reproduces them but not those of held-out episodes is over-fit (more data, augmentation, fewer steps). That
is the check to run before blaming the robot. `scripts/evaluate.py --open_loop` is the command line; fine-tuning
ends with `replay_for_model_card`, whose plot and table go into the model card.

Figures, per split (training / held-out episodes):
- `l1`: mean |predicted - recorded| in the data's units, per dimension;
- `l1_normalized`: the same after normalising both with the dataset's statistics (q01/q99: 1.0 is half the range);
- `bin_accuracy`: share of steps whose predicted bin is the recorded action's bin (`ActionTokenizer`);
- `gripper_accuracy`: for binary dimensions (a gripper), share of steps where the predicted value is nearer the
  recorded one of the two values.

Models that predict chunks are compared on the first action of each chunk.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from processing_openvla import ActionTokenizer, normalize_actions, resolve_unnorm_key

# Mean normalised L1 on training episodes above this (5% of the q01-q99 range) means the model did not fit them.
FIT_L1 = 0.1
# Held-out L1 above this multiple of the training L1 (and above FIT_L1) means the model fits only what it saw.
OVERFIT_RATIO = 2.0
# A split replayed over fewer frames than this gets no verdict: one frame's miss (a gripper step) would decide it.
MIN_VERDICT_FRAMES = 30
SPLITS = ("training", "held-out")


@dataclass
class EpisodeReplay:
    """One replayed episode: `recorded` and `predicted` actions `[steps, action_dim]` in the data's units."""

    episode: int
    split: str
    instruction: str
    recorded: np.ndarray
    predicted: np.ndarray


def episode_rows(rows: datasets.Dataset, episode_column: str = "episode", step_column: str = "step") -> dict[int, np.ndarray]:
    """Row indices of each episode of `rows`, in step order."""
    if episode_column not in rows.column_names:
        raise ValueError(f"Open-loop replay needs episodes, but the dataset has no {episode_column!r} column; its columns are {rows.column_names}.")
    episodes = np.asarray(rows[episode_column])
    steps = np.asarray(rows[step_column]) if step_column in rows.column_names else np.arange(len(rows))
    order = np.lexsort((steps, episodes))
    bounds = np.flatnonzero(np.r_[True, episodes[order][1:] != episodes[order][:-1], True])
    return {int(episodes[order[first]]): order[first:end] for first, end in zip(bounds[:-1], bounds[1:])}


@torch.no_grad()
def replay_episodes(model, processor, rows: datasets.Dataset, episodes: dict[int, str], unnorm_key: str | None = None,
                    batch_size: int = 32, image_column: str = "image", instruction_column: str = "instruction",
                    action_column: str = "action", episode_column: str = "episode") -> list[EpisodeReplay]:
    """Feed every recorded frame of `episodes` (episode -> "training" or "held-out") through `model.predict_action`.

    Raises:
        ValueError: an episode is not in `rows`, or a split is not one of `SPLITS`.
    """
    index = episode_rows(rows, episode_column)
    missing = sorted(set(episodes) - set(index))
    if missing:
        known = sorted(index)
        raise ValueError(f"Episodes {missing[:10]} are not in the dataset, whose episodes are {known[:5]}...{known[-5:]} ({len(known)}); pick --episodes among those.")
    bad_splits = sorted({split for split in episodes.values() if split not in SPLITS})
    if bad_splits:
        raise ValueError(f"Splits {bad_splits} are not among {list(SPLITS)}.")
    model.eval()
    device = next(model.parameters()).device
    replays = []
    for episode, split in episodes.items():
        selected = rows.select(index[episode])
        recorded = np.asarray(selected[action_column], dtype=np.float64)
        predicted = []
        for first in range(0, len(selected), batch_size):
            batch = selected[first:first + batch_size]
            inputs = processor(images=batch[image_column], text=batch[instruction_column], return_tensors="pt").to(device)
            actions = model.predict_action(**inputs, unnorm_key=unnorm_key)
            predicted.append((actions[:, 0] if actions.ndim == 3 else actions).float().cpu().numpy())
        replays.append(EpisodeReplay(episode, split, selected[0][instruction_column], recorded, np.concatenate(predicted).astype(np.float64)))
    return replays


def gripper_values(actions: np.ndarray) -> dict[int, tuple[float, float]]:
    """The binary dimensions of `actions` `[rows, action_dim]` (exactly two values, e.g. a gripper) and their values."""
    found = {}
    for d in range(actions.shape[1]):
        values = np.unique(actions[:, d])
        if len(values) == 2:
            found[d] = (float(values[0]), float(values[1]))
    return found


def replay_metrics(replays: list[EpisodeReplay], tokenizer: ActionTokenizer, unnorm_key: str | None,
                   grippers: dict[int, tuple[float, float]]) -> dict[str, dict[str, Any]]:
    """Per split: `l1`, `l1_normalized`, `bin_accuracy` (lists over dimensions), `gripper_accuracy` (None without a
    binary dimension), their means (`mean_*`, over the dimensions that vary in the data, q01 < q99: a constant
    dimension, reproduced trivially, would hide errors in the others) and the episodes and steps compared."""
    stats = tokenizer.stats_for(unnorm_key)
    varying = slice(None)
    if stats is not None:
        action_stats = stats.get("action", stats)
        spread = np.asarray(action_stats["q99"], dtype=np.float64) > np.asarray(action_stats["q01"], dtype=np.float64)
        varying = spread if spread.any() else varying
    results = {}
    for split in SPLITS:
        chosen = [replay for replay in replays if replay.split == split]
        if not chosen:
            continue
        recorded = np.concatenate([replay.recorded for replay in chosen])
        predicted = np.concatenate([replay.predicted for replay in chosen])
        normalized = [recorded, predicted] if stats is None else [np.asarray(normalize_actions(a, stats), dtype=np.float64) for a in (recorded, predicted)]
        recorded_bins = np.asarray(tokenizer.token_ids_to_bins(tokenizer.encode(recorded, unnorm_key)))
        predicted_bins = np.asarray(tokenizer.normalized_to_bins(normalized[1]))
        hits = [
            np.abs(predicted[:, d] - values[1]) < np.abs(predicted[:, d] - values[0])
            for d, values in grippers.items()
        ]
        truth = [recorded[:, d] == values[1] for d, values in grippers.items()]
        entry = {
            "episodes": [replay.episode for replay in chosen],
            "steps": int(len(recorded)),
            "l1": np.abs(predicted - recorded).mean(0).tolist(),
            "l1_normalized": np.abs(normalized[1] - normalized[0]).mean(0).tolist(),
            "bin_accuracy": (predicted_bins == recorded_bins).mean(0).tolist(),
            "gripper_accuracy": float(np.mean([h == t for h, t in zip(hits, truth)])) if grippers else None,
        }
        for name in ("l1", "l1_normalized", "bin_accuracy"):
            entry[f"mean_{name}"] = float(np.mean(np.asarray(entry[name])[varying]))
        results[split] = entry
    return results


def fit_verdict(metrics: dict[str, dict[str, Any]], min_frames: int = MIN_VERDICT_FRAMES) -> str:
    """'under-fit', 'over-fit', 'fits' or 'fits the training episodes' / 'unknown' when a split is missing, with the
    evidence, from the mean normalised L1 of each split; 'no verdict' when a replayed split has fewer than
    `min_frames` frames."""
    frames = {split: entry["steps"] for split, entry in metrics.items() if split in SPLITS}
    if any(count < min_frames for count in frames.values()):
        counted = ", ".join(f"{count} {split}" for split, count in frames.items())
        return (f"no verdict: only {counted} frames were replayed (fewer than {min_frames} in a split, where one frame's "
                "miss would decide it); replay more episodes with scripts/evaluate.py --open_loop --episodes ...")
    training, held_out = (metrics.get(split, {}).get("mean_l1_normalized") for split in SPLITS)
    if training is not None and training > FIT_L1:
        return (f"under-fit: on its own training episodes the mean normalised L1 of the varying dimensions is {training:.3f} (> {FIT_L1}); train "
                "longer or check the data (scripts/inspect_dataset.py) before judging it on the robot.")
    if training is not None and held_out is not None and held_out > max(OVERFIT_RATIO * training, FIT_L1):
        return (f"over-fit: it follows its training episodes (L1 {training:.3f}) but not held-out ones (L1 "
                f"{held_out:.3f}); more or more varied demonstrations, augmentation or fewer steps.")
    if training is None:
        return f"unknown: no training episode was replayed (held-out L1 {held_out:.3f})."
    if held_out is None:
        return f"fits the training episodes (L1 {training:.3f}); replay held-out episodes to check it generalises."
    return f"fits: L1 {training:.3f} on training and {held_out:.3f} on held-out episodes."


def plot_replay(replay: EpisodeReplay, path: Path, bounds: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Predicted against recorded action over the episode's steps, one panel per dimension, as a PNG; with `bounds`
    (the statistics' q01, q99) each panel spans at least that range, so an error within a bin looks as small as it is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = replay.recorded.shape[1]
    columns = min(dims, 4)
    rows = -(-dims // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 1.9 * rows + 0.5), squeeze=False)
    steps = np.arange(len(replay.recorded))
    for d, axis in enumerate(axes.flat):
        if d >= dims:
            axis.set_axis_off()
            continue
        axis.plot(steps, replay.recorded[:, d], color="black", linewidth=1.2, label="recorded")
        axis.plot(steps, replay.predicted[:, d], color="tab:orange", linewidth=1.0, linestyle="--", marker=".", markersize=3, label="predicted")
        if bounds is not None and bounds[1][d] > bounds[0][d]:
            values = np.r_[replay.recorded[:, d], replay.predicted[:, d], bounds[0][d], bounds[1][d]]
            margin = 0.05 * (values.max() - values.min())
            axis.set_ylim(values.min() - margin, values.max() + margin)
        axis.set_title(f"dim {d}", fontsize=8)
        axis.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6)
    figure.suptitle(f"episode {replay.episode} ({replay.split}): {replay.instruction[:60]}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=72)
    plt.close(figure)


def metrics_table(metrics: dict[str, dict[str, Any]]) -> str:
    """The per-dimension figures of each split side by side, as a Markdown table."""
    splits = [split for split in SPLITS if split in metrics]
    dims = len(next(iter(metrics.values()))["l1"])
    header = "| dim | " + " | ".join(f"{split} L1 | {split} L1 (norm.) | {split} bin acc." for split in splits) + " |"
    lines = [header, "|" + " --- |" * (1 + 3 * len(splits))]
    for d in [*range(dims), "mean (varying dims)"]:
        cells = []
        for split in splits:
            entry = metrics[split]
            values = [entry[n][d] if isinstance(d, int) else entry[f"mean_{n}"] for n in ("l1", "l1_normalized", "bin_accuracy")]
            cells += [f"{values[0]:.4g}", f"{values[1]:.3f}", f"{values[2]:.0%}"]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    grippers = [f"{split}: {metrics[split]['gripper_accuracy']:.0%}" for split in splits if metrics[split]["gripper_accuracy"] is not None]
    if grippers:
        lines += ["", f"Gripper (binary dimension) accuracy: {', '.join(grippers)}."]
    steps = ", ".join(f"{split}: episodes {metrics[split]['episodes']} ({metrics[split]['steps']} steps)" for split in splits)
    return "\n".join(lines + ["", f"Replayed {steps}."])


def write_open_loop_report(replays: list[EpisodeReplay], metrics: dict[str, dict[str, Any]], verdict: str, out: Path,
                           title: str, bounds: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[str, list[Path]]:
    """Write one plot per episode (`out/episode_<n>.png`) and `out/report.md`; returns the report's Markdown (plot
    links relative to `out`) and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for replay in replays:
        path = out / f"episode_{replay.episode}.png"
        plot_replay(replay, path, bounds)
        plots.append(path)
    body = "\n".join([
        f"Verdict: {verdict}", "", metrics_table(metrics), "",
        *[f"![episode {replay.episode} ({replay.split})]({path.name})" for replay, path in zip(replays, plots)],
    ])
    (out / "report.md").write_text(f"# Open-loop replay: {title}\n\n{body}\n")
    return body, plots


def run_open_loop(model, processor, rows: datasets.Dataset, episodes: dict[int, str], out: Path, unnorm_key: str | None = None,
                  title: str = "", batch_size: int = 32, grippers: dict[int, tuple[float, float]] | None = None,
                  min_verdict_frames: int = MIN_VERDICT_FRAMES, **columns: str) -> tuple[dict[str, dict[str, Any]], str]:
    """Replay `episodes` of `rows`, write the plots, `report.md` and `metrics.json` to `out`; returns the metrics and
    the verdict (`fit_verdict` with `min_verdict_frames`).

    `grippers` are the binary dimensions (`gripper_values` of the whole dataset's actions; by default of `rows`')."""
    unnorm_key = resolve_unnorm_key(model.config.norm_stats, unnorm_key)
    replays = replay_episodes(model, processor, rows, episodes, unnorm_key, batch_size, **columns)
    if grippers is None:
        grippers = gripper_values(np.asarray(rows[columns.get("action_column", "action")], dtype=np.float64))
    tokenizer = ActionTokenizer.from_config(model.config)
    metrics = replay_metrics(replays, tokenizer, unnorm_key, grippers)
    stats = tokenizer.stats_for(unnorm_key)
    bounds = None if stats is None else tuple(np.asarray(stats.get("action", stats)[name], dtype=np.float64) for name in ("q01", "q99"))
    verdict = fit_verdict(metrics, min_verdict_frames)
    write_open_loop_report(replays, metrics, verdict, out, title, bounds)
    (out / "metrics.json").write_text(json.dumps({"verdict": verdict, "unnorm_key": unnorm_key, **metrics}, indent=2))
    return metrics, verdict


def replay_for_model_card(model, processor, train_rows: datasets.Dataset, held_out_rows: datasets.Dataset,
                          unnorm_key: str | None, out: Path, name_column: str | None = None,
                          **columns: str) -> tuple[dict[str, float], str]:
    """The replay fine-tuning ends with: the first held-out episodes and the first training episodes (of the same
    dataset, by `name_column`, in a mix), as many of each as give `MIN_VERDICT_FRAMES` frames (or all there are),
    written to `out`; the card shows the plot of the first of each.

    Returns the headline figures (`open_loop_<split>_l1...`, for the card's results table) and the Markdown section
    for the model card (plot links relative to the card's folder, `out`'s parent)."""
    episode_column = columns.get("episode_column", "episode")
    candidates = train_rows
    if name_column is not None:
        name = held_out_rows[0][name_column]
        candidates = train_rows.select(np.flatnonzero(np.asarray(train_rows[name_column]) == name))
    episodes, parts = {}, []
    for split, split_rows in (("training", candidates), ("held-out", held_out_rows)):
        chosen = first_episodes(split_rows, episode_column, MIN_VERDICT_FRAMES)
        episodes.update(dict.fromkeys(chosen, split))
        index = episode_rows(split_rows, episode_column)
        parts.append(split_rows.select(np.concatenate([index[episode] for episode in chosen])))
    rows = datasets.concatenate_datasets(parts)
    grippers = gripper_values(np.asarray(candidates[columns.get("action_column", "action")], dtype=np.float64))
    metrics, verdict = run_open_loop(model, processor, rows, episodes, out, unnorm_key, "end of fine-tuning", grippers=grippers, **columns)
    figures = {}
    for split, entry in metrics.items():
        key = split.replace("-", "_")
        figures[f"open_loop_{key}_l1"] = entry["mean_l1"]
        figures[f"open_loop_{key}_l1_normalized"] = entry["mean_l1_normalized"]
        figures[f"open_loop_{key}_bin_accuracy"] = entry["mean_bin_accuracy"]
    first = {split: next(episode for episode, chosen in episodes.items() if chosen == split) for split in SPLITS}
    links = [f"![open-loop replay, episode {episode} ({split})]({out.name}/episode_{episode}.png)" for split, episode in first.items()]
    counts = {split: len([chosen for chosen in episodes.values() if chosen == split]) for split in SPLITS}
    section = "\n".join([
        f"Recorded frames of {counts['training']} training and {counts['held-out']} held-out episodes fed to the model, "
        "its actions against the recorded ones (`scripts/evaluate.py --open_loop` replays more; the first episode of "
        "each is plotted).", "", f"Verdict: {verdict}", "", metrics_table(metrics), "", *links,
    ])
    return figures, section


def first_episodes(rows: datasets.Dataset, episode_column: str, min_frames: int) -> list[int]:
    """The first episodes of `rows` (in order of appearance) that together hold at least `min_frames` frames."""
    lengths = dict(Counter(int(episode) for episode in rows[episode_column]))
    chosen, total = [], 0
    for episode, length in lengths.items():
        chosen.append(episode)
        total += length
        if total >= min_frames:
            break
    return chosen
