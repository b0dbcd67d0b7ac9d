"""Closed-loop evaluation on Meta-World: any `openvla_tools.evaluation.Policy` (an OpenVLA model, the scripted expert,
random actions) on held-out variations, judged by Meta-World's own success signal.

    python scripts/evaluate.py --env metaworld --model outputs/metaworld --tasks button-press-topdown-v3 drawer-close-v3 \\
        coffee-button-v3 --episodes-per-task 20 --json outputs/metaworld_eval.json --plot outputs/metaworld_eval.png \\
        --strip outputs/metaworld_episodes.gif

Episode `i` of a task runs on held-out variation `i % 50` (`MT1(task, seed=1)`; the demonstrations use seed 0) for at
most `max_steps` steps and succeeds as soon as the environment reports `info["success"]`. The episodes of a task run
in lock-step batches of `batch_size` environments (`run_episodes`: one batched policy call per step). The policy gets
the task's canonical instruction (the first paraphrase); a model acts through `OpenVLAPolicy`, which executes
`n_action_steps` actions of a chunk before re-planning (or, with `temporal_ensemble_coeff`, re-plans at every step
and averages the overlapping chunks).

Result (and the JSON of `scripts/evaluate.py`): the policy's `success` (per task), `mean_success`, `mean_steps`,
`successes` (per episode) and `instructions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .envs.metaworld_env import (
    DEFAULT_CAMERA,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_STEPS,
    EVAL_SEED,
    TASK_INSTRUCTIONS,
    Episode,
    MetaWorldEnv,
    check_tasks,
    run_episodes,
    task_variations,
)
from .envs.tabletop import save_episode_strip
from .evaluation import Policy, check_positive, rollout_video_path, save_rollout_video

DEFAULT_BATCH_SIZE = 10  # environments stepped together; each holds its own OpenGL context


def evaluate_policy_on_tasks(
    policy: Policy,
    tasks: Sequence[str],
    episodes_per_task: int,
    max_steps: int = DEFAULT_MAX_STEPS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    camera_name: str = DEFAULT_CAMERA,
    batch_size: int = DEFAULT_BATCH_SIZE,
    strip_path: str | Path | None = None,
    strip_episodes_per_task: int = 1,
    video_episodes_per_task: int = 2,
    progress: bool = True,
    desc: str = "evaluation",
    wrong_instructions: bool = False,
) -> dict[str, Any]:
    """Success of `policy` on `episodes_per_task` held-out variations of each task.

    Args:
        policy: steps `batch_size` environments of one task at a time (`reset`, `drop`,
            `select_actions(images, instructions, observations) -> [B, 4]`).
        strip_path: if given, the first `strip_episodes_per_task` episodes of every task are saved there (`.gif`:
            an animation, the episodes side by side; otherwise a PNG grid, one row per episode), and the first
            `video_episodes_per_task` of each task as a rollout video next to it
            (`openvla_tools.evaluation.rollout_video_path`).
        wrong_instructions: give each task's episodes the instruction of the next task in `tasks` (the last task
            gets the first's), to test that the instruction selects the task: a policy that reads it fails.

    Returns:
        `{"success": {task: rate}, "mean_success", "mean_steps": {task: steps}, "successes": {task: [bool]},
        "instructions": {task: instruction}}`; `mean_success` is the mean of the per-task rates.
    """
    tasks = check_tasks(tasks)
    if wrong_instructions and len(tasks) < 2:
        raise ValueError(f"wrong_instructions needs at least two tasks to swap instructions between, got {tasks}.")
    shift = 1 if wrong_instructions else 0
    instructions = {task: TASK_INSTRUCTIONS[tasks[(i + shift) % len(tasks)]][0] for i, task in enumerate(tasks)}
    check_positive("episodes_per_task", episodes_per_task)
    check_positive("batch_size", batch_size)
    recorded = 0 if strip_path is None else max(strip_episodes_per_task, video_episodes_per_task)
    episodes: dict[str, list[Episode]] = {}
    with tqdm(total=len(tasks) * episodes_per_task, desc=desc, disable=not progress) as bar:
        for task in tasks:
            variations = task_variations(task, EVAL_SEED)
            instruction = instructions[task]
            episodes[task] = []
            for start in range(0, episodes_per_task, batch_size):
                indices = range(start, min(start + batch_size, episodes_per_task))
                envs = [MetaWorldEnv(task, image_size, camera_name, max_steps) for _ in indices]
                try:
                    episodes[task] += run_episodes(
                        envs, [variations[i % len(variations)] for i in indices], policy, [instruction] * len(envs),
                        record=[i < recorded for i in indices],
                    )
                finally:
                    for env in envs:
                        env.close()
                bar.update(len(indices))
                bar.set_postfix(task=task, success=f"{np.mean([e.success for e in episodes[task]]):.2f}")
    if strip_path is not None:
        save_strip([e for task_episodes in episodes.values() for e in task_episodes[:strip_episodes_per_task]], strip_path)
        for task, task_episodes in episodes.items():
            shown = task_episodes[:video_episodes_per_task]
            captions = [f"{'success' if e.success else 'failure'}, {e.num_steps} steps" for e in shown]
            save_rollout_video([e.images for e in shown], rollout_video_path(strip_path, task), captions)
    success = {task: float(np.mean([e.success for e in task_episodes])) for task, task_episodes in episodes.items()}
    return {
        "success": success,
        "mean_success": float(np.mean(list(success.values()))),
        "mean_steps": {task: float(np.mean([e.num_steps for e in task_episodes])) for task, task_episodes in episodes.items()},
        "successes": {task: [e.success for e in task_episodes] for task, task_episodes in episodes.items()},
        "instructions": instructions,
    }


def save_strip(episodes: Sequence[Episode], path: str | Path) -> None:
    """Recorded episodes as a PNG grid (one captioned row each) or, for a `.gif` path, an animation of them side by
    side (`save_rollout_video`)."""
    path = Path(path)
    captions = [f"{e.task}: {'success' if e.success else 'failure'} after {e.num_steps} steps" for e in episodes]
    if path.suffix.lower() == ".gif":
        save_rollout_video([e.images for e in episodes], path, [e.task for e in episodes])
    else:
        save_episode_strip([e.images for e in episodes], path, captions)


def save_plot(results: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Grouped bars: success per task and the mean, one bar per policy (`results`: policy name -> evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(next(iter(results.values()))["success"])
    labels = [*tasks, "mean"]
    width = 0.8 / len(results)
    figure, axes = plt.subplots(figsize=(2 + 1.8 * len(labels), 4))
    for index, (name, result) in enumerate(results.items()):
        values = [result["success"][task] for task in tasks] + [result["mean_success"]]
        positions = np.arange(len(labels)) + (index - (len(results) - 1) / 2) * width
        bars = axes.bar(positions, values, width, label=name)
        axes.bar_label(bars, [f"{value:.0%}" for value in values], fontsize=8)
    axes.set_xticks(np.arange(len(labels)), labels, rotation=15)
    axes.set_ylim(0, 1.1)
    axes.set_ylabel("success rate")
    episodes = len(next(iter(results.values()))["successes"][tasks[0]])
    axes.set_title(f"Meta-World, held-out variations ({episodes} episodes per task)")
    axes.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
