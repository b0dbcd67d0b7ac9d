"""Meta-World demonstrations from the scripted expert policies, as a `datasets` folder for `scripts/finetune.py`.

    python scripts/demos.py --env metaworld --tasks button-press-topdown-v3 drawer-close-v3 coffee-button-v3 \\
        --episodes-per-task 50 --output data/metaworld

Episode `i` of a task runs the task's scripted expert on training variation `i % V`, where the `V = 50 * S`
variations are those of the `S` seeds of `--variation-seeds` (default `0`: `MT1(task, seed=0).train_tasks`), in
order; seed 1 is refused, because the evaluator holds out its variations. An episode stops `STEPS_AFTER_SUCCESS` steps
after the environment first reports success, so the data shows the finished state briefly, or after `--max-steps`
steps; only successful episodes are kept. Each kept step is one row:

    image        the camera frame the expert acted on (PIL, `--image-size` square, camera `--camera`)
    instruction  one paraphrase of the task, drawn per episode with `--seed`
    action       the expert's 4 floats (dx, dy, dz, gripper), clipped to [-1, 1] as the environment clips them
    episode      episode id, unique across tasks (0, 1, ... over the kept episodes)
    step         step within the episode, from 0
    task         the Meta-World task name

The expert and the physics are deterministic, so more than 50 episodes per task repeat trajectories (with another
paraphrase), unless `--action-noise` is set: the environment then executes the expert's action plus Gaussian noise of
that standard deviation while the row keeps the expert's own action, so every episode takes its own path and the data
shows how the expert recovers from states a little off its path (DART). Such an episode no longer replays from its
recorded actions. `DIR/stats.json` holds per-task and overall action statistics (`compute_action_stats`), episode counts
and the wall time; `DIR/preview.png` shows the first kept episode of every task with its instruction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from processing_openvla import compute_action_stats

from .metaworld_env import (
    ACTION_DIM,
    DEFAULT_CAMERA,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_STEPS,
    EVAL_SEED,
    TASK_INSTRUCTIONS,
    TRAIN_SEED,
    MetaWorldEnv,
    ScriptedPolicy,
    check_tasks,
    run_episode,
    task_variations,
)
from .tabletop import demonstration_features, save_episode_strip

STEPS_AFTER_SUCCESS = 3
FEATURES = demonstration_features(ACTION_DIM, name_column="task")


def generate_metaworld_demonstrations(
    tasks: Sequence[str],
    episodes_per_task: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    camera_name: str = DEFAULT_CAMERA,
    max_steps: int = DEFAULT_MAX_STEPS,
    seed: int = 0,
    action_noise: float = 0.0,
    variation_seeds: Sequence[int] = (TRAIN_SEED,),
    progress: bool = True,
) -> datasets.Dataset:
    """Roll out the scripted expert `episodes_per_task` times per task (see the module docstring) and return the
    steps of the successful episodes, one row each, ordered by episode. `seed` draws the paraphrases and the
    execution noise of standard deviation `action_noise`; the episodes cycle through the 50 variations of each
    Meta-World seed in `variation_seeds`."""
    tasks = check_tasks(tasks)
    variation_seeds = check_variation_seeds(variation_seeds)
    if isinstance(episodes_per_task, bool) or not isinstance(episodes_per_task, int) or episodes_per_task < 1:
        raise ValueError(f"episodes_per_task={episodes_per_task!r} must be a positive integer.")
    rng = np.random.default_rng(seed)
    policy = ScriptedPolicy()
    image_feature = datasets.Image()
    columns: dict[str, list] = {name: [] for name in FEATURES}
    kept = 0
    with tqdm(total=len(tasks) * episodes_per_task, desc="demonstrations", disable=not progress) as bar:
        for task in tasks:
            variations = [variation for seed in variation_seeds for variation in task_variations(task, seed)]
            with MetaWorldEnv(task, image_size, camera_name, max_steps) as env:
                for index in range(episodes_per_task):
                    instruction = str(rng.choice(TASK_INSTRUCTIONS[task]))
                    episode = run_episode(
                        env, variations[index % len(variations)], policy, instruction, STEPS_AFTER_SUCCESS,
                        action_noise=action_noise, rng=rng,
                    )
                    if episode.success:
                        for step, (image, action) in enumerate(zip(episode.images, episode.actions)):
                            columns["image"].append(image_feature.encode_example(image))
                            columns["instruction"].append(instruction)
                            columns["action"].append(action.tolist())
                            columns["episode"].append(kept)
                            columns["step"].append(step)
                            columns["task"].append(task)
                        kept += 1
                    bar.update()
                    bar.set_postfix(task=task, kept=kept)
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def check_variation_seeds(variation_seeds: Sequence[int]) -> list[int]:
    """Checks the seeds of the training variations: distinct integers, none of them the evaluator's `EVAL_SEED`."""
    seeds = list(variation_seeds)
    if not seeds or not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds):
        raise ValueError(f"variation_seeds={variation_seeds!r} must be a non-empty list of integers, e.g. [0, 2].")
    if EVAL_SEED in seeds:
        raise ValueError(
            f"variation_seeds={seeds} contains {EVAL_SEED}, the seed of the held-out evaluation variations; "
            "drop it (use e.g. 0, 2, 3)."
        )
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"variation_seeds={seeds} repeats a seed; give each seed once.")
    return seeds


def demonstration_stats(dataset: datasets.Dataset, tasks: Sequence[str], episodes_per_task: int) -> dict[str, Any]:
    """Per-task and overall episode counts and action statistics (official OpenVLA layout) of a demonstration set."""
    actions = np.asarray(dataset["action"], dtype=np.float64).reshape(-1, ACTION_DIM)
    row_tasks = np.asarray(dataset["task"])
    episodes = np.asarray(dataset["episode"])

    def summary(rows: np.ndarray, attempted: int) -> dict[str, Any]:
        kept = len(np.unique(episodes[rows]))
        return {
            "episodes_attempted": attempted,
            "episodes_successful": kept,  # every successful episode is kept
            "success_rate": kept / attempted,
            "steps": int(rows.sum()),
            "mean_episode_length": float(rows.sum() / kept) if kept else None,
            "action_stats": compute_action_stats(actions[rows]) if rows.any() else None,
        }

    per_task = {task: summary(row_tasks == task, episodes_per_task) for task in tasks}
    return {"tasks": per_task, "overall": summary(np.ones(len(dataset), dtype=bool), episodes_per_task * len(tasks))}


def save_preview(dataset: datasets.Dataset, path: Path) -> None:
    """A PNG with the first kept episode of every task, one row each, captioned with its task and instruction."""
    episodes = np.asarray(dataset["episode"])
    first_episodes: dict[str, int] = {}
    for task, episode in zip(dataset["task"], episodes):
        first_episodes.setdefault(task, episode)
    frames, captions = [], []
    for task, episode in first_episodes.items():
        rows = dataset.select(np.flatnonzero(episodes == episode))
        frames.append(list(rows["image"]))
        captions.append(f"{task}: {rows[0]['instruction']}")
    save_episode_strip(frames, path, captions)
