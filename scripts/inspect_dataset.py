"""Check a demonstration dataset before fine-tuning: action statistics, sample frames and findings, with pictures.

    python scripts/inspect_dataset.py --out outputs/inspect_tabletop
    python scripts/inspect_dataset.py --dataset_name outputs/metaworld_demos --out outputs/inspect_metaworld
    python scripts/inspect_dataset.py --dataset_name lerobot/pusht --image_key observation.image --out outputs/inspect_pusht

The dataset is read as `scripts/finetune.py` reads it (`--dataset_name`: a LeRobot folder or Hub id, a `save_to_disk`
folder, parquet files, a Hub dataset; none: the built-in tabletop demonstrations). `--out` receives `report.md`,
`actions.png` (per-dimension histograms with the q01/q99 bounds fine-tuning uses, and the first episodes over time)
and `frames.png` (frames of each of the most frequent instructions); the terminal shows a summary and the findings
(`openvla_tools.dataset_inspection` says what each one checks). NaN actions, which fine-tuning refuses, are reported
instead (their episodes have no frames in the figures).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from finetune import DataArguments, load_training_data

from configuration_openvla import OpenVLAConfig
from openvla_tools.dataset_inspection import (
    RecordedActions,
    frame_hashes,
    inspect_actions,
    instruction_counts,
    plot_actions,
    plot_sample_frames,
    read_lerobot_actions,
    write_report,
)
from openvla_tools.envs.tabletop import FPS as TABLETOP_FPS
from openvla_tools.envs.tabletop import check_task_kinds
from openvla_tools.lerobot_format import LeRobotMetadata, resolve_lerobot_dataset


def load_for_inspection(args: argparse.Namespace):
    """`(recorded actions, image rows, image column, details)` of the dataset `args` name."""
    if args.dataset_name and "," in args.dataset_name:
        raise ValueError(f"--dataset_name {args.dataset_name!r} names several datasets; check one at a time.")
    root = resolve_lerobot_dataset(args.dataset_name, args.image_key) if args.dataset_name else None
    if root is not None:
        meta = LeRobotMetadata(root)
        camera = meta.camera(args.image_key)
        recorded = read_lerobot_actions(root, args.action_key, args.episodes)
        nan_episodes = set(recorded.episodes[~np.isfinite(recorded.actions).all(axis=1)].tolist())
        clean = [int(e) for e in np.unique(recorded.episodes) if e not in nan_episodes]
        data_args = DataArguments(dataset_name=args.dataset_name, image_key=camera, action_key=args.action_key, episodes=",".join(map(str, clean)))
        rows = load_training_data(data_args, args.seed)[0] if clean else None
        details = {"layout": f"LeRobot {meta.version}", "fps": f"{meta.fps:g}", "cameras": ", ".join(meta.camera_keys), "camera shown": camera}
        return recorded, rows, "image", details
    data_args = DataArguments(dataset_name=args.dataset_name, num_demo_episodes=args.num_demo_episodes, demo_tasks=args.demo_tasks)
    rows, data_args = load_training_data(data_args, args.seed, check_task_kinds(args.demo_tasks.split(",")))
    missing = [c for c in (data_args.image_column, data_args.instruction_column, data_args.action_column) if c not in rows.column_names]
    if missing:
        raise ValueError(f"The dataset has no column(s) {missing}; its columns are {rows.column_names}.")
    try:
        actions = np.asarray(rows[data_args.action_column], dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"Column {data_args.action_column!r} does not hold actions of one length ({error}).") from error
    count = len(rows)
    episodes = np.asarray(rows[data_args.episode_column]) if data_args.episode_column in rows.column_names else np.arange(count)
    steps = np.asarray(rows["step"]) if "step" in rows.column_names else np.arange(count)
    recorded = RecordedActions(actions, episodes, steps, [str(t) for t in rows[data_args.instruction_column]])
    if args.dataset_name is None:
        details = {"layout": "built-in tabletop demonstrations (LeRobot v3.0)", "fps": f"{TABLETOP_FPS:g}", "cameras": "observation.images.main"}
    else:
        details = {"layout": "datasets rows", "fps": "not recorded", "cameras": data_args.image_column}
    rows = rows.rename_columns({data_args.image_column: "image", data_args.instruction_column: "instruction"}) if data_args.image_column != "image" or data_args.instruction_column != "instruction" else rows
    if data_args.episode_column not in rows.column_names:
        rows = rows.add_column("episode", episodes.tolist())
    elif data_args.episode_column != "episode":
        rows = rows.rename_column(data_args.episode_column, "episode")
    if "step" not in rows.column_names:
        rows = rows.add_column("step", steps.tolist())
    return recorded, rows, "image", details


def aligned_hashes(recorded: RecordedActions, rows, image_column: str) -> np.ndarray:
    """A hash of each recorded frame's image, in `recorded`'s order; frames without an image row get distinct
    placeholders."""
    keys = {(int(e), int(s)): i for i, (e, s) in enumerate(zip(rows["episode"], rows["step"]))}
    found = frame_hashes(rows, image_column)
    return np.asarray([
        found[keys[(int(e), int(s))]] if (int(e), int(s)) in keys else f"missing-{i}"
        for i, (e, s) in enumerate(zip(recorded.episodes, recorded.steps))
    ])


def main(argv: Sequence[str] | None = None) -> None:
    config = OpenVLAConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default=None, help="LeRobot folder or Hub id, datasets folder or Hub name (default: built-in tabletop demos).")
    parser.add_argument("--image_key", default=None, help="LeRobot camera to show (default: the only one).")
    parser.add_argument("--action_key", default="action", help="LeRobot action feature.")
    parser.add_argument("--episodes", default=None, help="LeRobot episodes to check, e.g. '0-99' (default: all).")
    parser.add_argument("--out", type=Path, default=Path("outputs/inspect"), help="Folder for report.md and the PNGs.")
    parser.add_argument("--num_bins", type=int, default=config.num_action_bins, help="Action bins of the model to train.")
    parser.add_argument("--binning", default=config.action_binning, help="Binning scheme ('reference' or 'openvla').")
    parser.add_argument("--chunk_size", type=int, default=config.action_chunk_size, help="Action chunk of the model to train.")
    parser.add_argument("--num_demo_episodes", type=int, default=4000, help="Episodes of the built-in demos (no --dataset_name).")
    parser.add_argument("--demo_tasks", default="reach,push", help="Goal kinds of the built-in demos.")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the built-in demos (finetune.py's --seed).")
    args = parser.parse_args(argv)

    recorded, rows, image_column, details = load_for_inspection(args)
    hashes = aligned_hashes(recorded, rows, image_column) if rows is not None else None
    inspection = inspect_actions(recorded, args.num_bins, args.binning, args.chunk_size, hashes)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_actions(recorded, inspection, args.out / "actions.png")
    counts = instruction_counts(recorded)
    frames_figure = None
    if rows is not None:
        plot_sample_frames(rows, image_column, [c for c in counts if c[0] in set(rows["instruction"])], args.out / "frames.png")
        frames_figure = "frames.png"
    name = args.dataset_name or "built-in tabletop demonstrations"
    report = write_report(name, recorded, inspection, args.out, details, frames_figure)

    lengths = np.diff(recorded.episode_starts)
    print(f"{name}: {len(lengths)} episodes, {len(recorded.actions)} frames, fps {details['fps']}, cameras {details['cameras']}, "
          f"{len(counts)} instructions, action_dim {recorded.actions.shape[1]}")
    for dim in inspection.dimensions:
        s = dim.stats
        print(f"  dim {dim.index} {dim.kind:<10} q01 {s['q01']:>9.4g}  median {s['median']:>9.4g}  q99 {s['q99']:>9.4g}  bins used {dim.bins_used}")
    print(f"{len(inspection.findings)} finding(s):" if inspection.findings else "No findings.")
    for finding in inspection.findings:
        print(f"  [{finding.severity}] {finding.title}")
    print(f"Report: {report}")


if __name__ == "__main__":
    main()
