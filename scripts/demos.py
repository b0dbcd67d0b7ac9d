"""Scripted-expert demonstrations, written as a LeRobot v3.0 dataset that `scripts/finetune.py --dataset_name` reads.

    python scripts/demos.py --env tabletop --episodes 1000 --output outputs/tabletop_demos
    python scripts/demos.py --env metaworld --tasks button-press-topdown-v3 drawer-close-v3 coffee-button-v3 \\
        --episodes-per-task 100 --camera topview --action-noise 0.2 --image_storage image --output outputs/metaworld_demos

`--env` picks the environment (default `tabletop`); the other options are the environment's own (`--env ENV --help`
lists them). Tabletop: the built-in 2-D task (`openvla_tools.envs.tabletop`). Meta-World (the `metaworld` extra):
the scripted expert policies on the training variations (`openvla_tools.envs.metaworld_demos` says how episodes,
noise and variations are chosen); `DIR/stats.json` holds the action statistics and wall time. Both write
`DIR/preview.png`.

The dataset (`openvla_tools.lerobot_writer`) holds the camera `observation.images.main` as AV1 mp4, or with
`--image_storage image` as lossless PNG in the parquet (the frames exactly as rendered, as the measured recipes
used them); tabletop at a nominal 10 fps, Meta-World at its 80 Hz control rate. LeRobot's own tools open it.
`--format datasets` writes a `save_to_disk` folder instead.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import datasets

from openvla_tools.envs import run_for_env
from openvla_tools.envs.tabletop import FPS as TABLETOP_FPS
from openvla_tools.envs.tabletop import TASK_KINDS, episode_frames, generate_demonstrations, save_episode_strip
from openvla_tools.lerobot_writer import IMAGE_STORAGES, write_lerobot_dataset

FORMATS = ("datasets", "lerobot")
FPS = {"tabletop": TABLETOP_FPS, "metaworld": 80}


def add_format_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="lerobot", help="'lerobot' (LeRobot v3.0) or 'datasets' (save_to_disk).")
    parser.add_argument(
        "--image_storage", "--image-storage", dest="image_storage", choices=IMAGE_STORAGES, default="video",
        help="LeRobot camera frames: 'video' (mp4) or 'image' (lossless PNG inside the parquet).",
    )


def save_demonstrations(dataset: datasets.Dataset, args: argparse.Namespace, env: str) -> None:
    """Write `dataset` to `args.output` in `args.format`."""
    if args.format == "lerobot":
        write_lerobot_dataset(dataset, args.output, fps=FPS[env], image_storage=args.image_storage, robot_type=env)
    else:
        dataset.save_to_disk(str(args.output))


def tabletop_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="demos.py --env tabletop", description="Tabletop demonstrations and a preview image.")
    parser.add_argument("--episodes", type=int, default=100, help="number of expert episodes")
    parser.add_argument("--output", type=Path, required=True, help="directory for the dataset (see --format)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--num-objects", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--dataset-name", default="tabletop")
    parser.add_argument("--tasks", nargs="+", choices=TASK_KINDS, default=list(TASK_KINDS), help="goal kinds to sample")
    add_format_arguments(parser)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    dataset = generate_demonstrations(
        args.episodes, args.seed, args.image_size, args.num_objects, args.max_steps, args.dataset_name,
        task_kinds=args.tasks,
    )
    elapsed = time.perf_counter() - start
    save_demonstrations(dataset, args, "tabletop")
    preview = args.output / "preview.png"
    frames, captions = episode_frames(dataset, num_episodes=4)
    save_episode_strip(frames, preview, captions)

    steps_per_episode = len(dataset) / max(1, args.episodes)
    print(f"{args.episodes} episodes, {len(dataset)} steps ({steps_per_episode:.1f} per episode) in {elapsed:.1f}s")
    print(f"{len(set(dataset['instruction']))} distinct instructions, e.g. {dataset[0]['instruction']!r}")
    print(f"dataset: {args.output}\npreview: {preview}")


def metaworld_main(argv: Sequence[str]) -> None:
    from openvla_tools.envs.metaworld_demos import (
        STEPS_AFTER_SUCCESS,
        demonstration_stats,
        generate_metaworld_demonstrations,
        save_preview,
    )
    from openvla_tools.envs.metaworld_env import (
        DEFAULT_CAMERA,
        DEFAULT_IMAGE_SIZE,
        DEFAULT_MAX_STEPS,
        EVAL_SEED,
        KNOWN_TASKS,
        TRAIN_SEED,
        check_tasks,
    )

    parser = argparse.ArgumentParser(prog="demos.py --env metaworld", description="Meta-World demonstrations from the scripted experts (openvla_tools.envs.metaworld_demos).")
    parser.add_argument("--tasks", nargs="+", required=True, help=f"Meta-World tasks, from {list(KNOWN_TASKS)}, or mt10 (its ten tasks).")
    parser.add_argument("--episodes-per-task", type=int, required=True, help="Expert episodes run per task.")
    parser.add_argument("--output", type=Path, required=True, help="Folder for the dataset (see --format).")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="Side of the square frames.")
    parser.add_argument("--camera", default=DEFAULT_CAMERA, help="Meta-World camera name.")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="Steps per episode at most.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the instruction paraphrases and the noise.")
    parser.add_argument(
        "--action-noise", type=float, default=0.0,
        help="Std of Gaussian noise added to the executed actions (the rows keep the expert's); 0 = none.",
    )
    parser.add_argument(
        "--variation-seeds", type=int, nargs="+", default=[TRAIN_SEED],
        help=f"Meta-World seeds; the episodes cycle through the 50 variations of each (not {EVAL_SEED}, the held-out seed).",
    )
    add_format_arguments(parser)
    args = parser.parse_args(argv)
    args.tasks = check_tasks(args.tasks)

    start = time.perf_counter()
    dataset = generate_metaworld_demonstrations(
        args.tasks, args.episodes_per_task, args.image_size, args.camera, args.max_steps, args.seed, args.action_noise,
        args.variation_seeds,
    )
    wall_time = time.perf_counter() - start
    if len(dataset) == 0:
        raise RuntimeError(f"No episode of {args.tasks} succeeded within --max-steps={args.max_steps}; raise it.")
    save_demonstrations(dataset, args, "metaworld")
    attempted = args.episodes_per_task * len(args.tasks)
    stats = {
        **demonstration_stats(dataset, args.tasks, args.episodes_per_task),
        "wall_time_s": wall_time,
        "seconds_per_episode": wall_time / attempted,
        "settings": {
            "image_size": args.image_size, "camera": args.camera, "max_steps": args.max_steps, "seed": args.seed,
            "action_noise": args.action_noise, "variation_seeds": args.variation_seeds, "steps_after_success": STEPS_AFTER_SUCCESS,
        },
    }
    (args.output / "stats.json").write_text(json.dumps(stats, indent=2))
    save_preview(dataset, args.output / "preview.png")

    for task, task_stats in stats["tasks"].items():
        print(
            f"{task:<26} kept {task_stats['episodes_successful']}/{task_stats['episodes_attempted']} episodes, "
            f"{task_stats['steps']} steps"
        )
    print(f"{len(dataset)} rows in {wall_time:.1f}s ({wall_time / attempted:.2f}s per episode)")
    print(f"dataset: {args.output}\nstats: {args.output / 'stats.json'}\npreview: {args.output / 'preview.png'}")


def main(argv: Sequence[str] | None = None) -> None:
    run_for_env(argv, __doc__, {"tabletop": tabletop_main, "metaworld": metaworld_main})

if __name__ == "__main__":
    main()
