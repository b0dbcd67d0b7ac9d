"""Closed-loop evaluation on Meta-World: a saved OpenVLA model (or the scripted expert, or random actions) on held-out
variations, judged by Meta-World's own success signal.

    python scripts/evaluate.py --env metaworld --model outputs/metaworld --tasks button-press-topdown-v3 drawer-close-v3 \\
        coffee-button-v3 --episodes-per-task 20 --json outputs/metaworld_eval.json --plot outputs/metaworld_eval.png \\
        --strip outputs/metaworld_episodes.gif

`--model` is a saved model folder or Hub id (loaded with `AutoModel` / `AutoProcessor`, `trust_remote_code=True`), or
`scripted` / `random`. Episode `i` of a task runs on held-out variation `i % 50` (`MT1(task, seed=1)`; the
demonstrations use seed 0) for at most `--max-steps` steps and succeeds as soon as the environment reports
`info["success"]`. The model gets the task's canonical instruction (the first paraphrase) and acts through
`OpenVLAPolicy`, which executes `n_action_steps` actions of a chunk before re-planning (or, with
`--temporal-ensemble-coeff`, re-plans at every step and averages the overlapping chunks). Unless `--no-baselines`, the
random policy and the scripted expert run on the same variations, side by side in the table and the JSON.

JSON: the evaluated policy's `success` (per task), `mean_success`, `mean_steps`, `successes` (per episode) at the top
level, the instructions and settings, and `baselines` (`random`, `scripted`) with the same keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from modeling_openvla import OpenVLAPolicy

from .envs.metaworld_env import (
    ACTION_DIM,
    DEFAULT_CAMERA,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_STEPS,
    EVAL_SEED,
    TASK_INSTRUCTIONS,
    Episode,
    MetaWorldEnv,
    Policy,
    RandomPolicy,
    ScriptedPolicy,
    check_tasks,
    run_episode,
    task_variations,
)
from .envs.tabletop import save_episode_strip

BASELINES: dict[str, Callable[[str], Policy]] = {
    "random": lambda task: RandomPolicy(seed=0),
    "scripted": ScriptedPolicy,
}


class ModelPolicy:
    """An OpenVLA model as a Meta-World policy: `OpenVLAPolicy` on the image and the instruction (a queue of
    `n_action_steps` actions per query, by default the whole chunk, or with `temporal_ensemble_coeff` a query at
    every step and the overlapping chunks averaged); the state vector is ignored."""

    needs_image = True

    def __init__(self, model, processor, unnorm_key: str | None = None, **policy_options: Any):
        self.policy = self._checked(OpenVLAPolicy(model.eval(), processor, unnorm_key, **policy_options))

    @classmethod
    def served(cls, url: str, unnorm_key: str | None = None, api_key: str | None = None, **policy_options: Any) -> ModelPolicy:
        """The model that `scripts/serve.py` serves at `url`, through `RemotePolicy` (the `serve` extra)."""
        from .remote_policy import RemotePolicy

        served = cls.__new__(cls)
        served.policy = cls._checked(RemotePolicy(url, api_key=api_key, unnorm_key=unnorm_key, **policy_options))
        return served

    @staticmethod
    def _checked(policy: OpenVLAPolicy) -> OpenVLAPolicy:
        action_dim = policy.model.config.action_dim
        if action_dim != ACTION_DIM:
            raise ValueError(
                f"The model predicts action_dim={action_dim} values but Meta-World actions have {ACTION_DIM} (dx, dy, "
                "dz, gripper); train it on Meta-World demonstrations (scripts/demos.py --env metaworld)."
            )
        return policy

    def reset(self) -> None:
        self.policy.reset()

    def select_action(self, image: Image.Image, instruction: str, obs: np.ndarray | None = None) -> np.ndarray:
        return self.policy.select_action(image, instruction)


def load_model_policy(path: str, unnorm_key: str | None = None, **policy_options: Any) -> ModelPolicy:
    """A `ModelPolicy` for a saved model folder or Hub id, loaded through the Auto classes; `policy_options` go to
    `OpenVLAPolicy` (`n_action_steps`, `temporal_ensemble_coeff`)."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    return ModelPolicy(model, processor, unnorm_key, **policy_options)


def policy_factory(model: str, unnorm_key: str | None = None, server: str | None = None, api_key: str | None = None,
                   **policy_options: Any) -> Callable[[str], Policy]:
    """task name -> policy: a baseline's (`scripted`, `random`) or, for a model folder or Hub id, or the model served
    at `server`, one `ModelPolicy` for every task. `policy_options` set to anything but `None` are refused for the
    baselines."""
    if server is not None:
        policy = ModelPolicy.served(server, unnorm_key, api_key, **policy_options)
        return lambda task: policy
    if model in BASELINES:
        for name, value in policy_options.items():
            if value is not None:
                raise ValueError(
                    f"{name}={value} applies to a model's action chunks; the {model!r} baseline acts one step at a "
                    f"time. Leave --{name.replace('_', '-')} out for baselines."
                )
        return BASELINES[model]
    policy = load_model_policy(model, unnorm_key, **policy_options)
    return lambda task: policy


def evaluate_policy_on_tasks(
    policy_factory: Callable[[str], Policy],
    tasks: Sequence[str],
    episodes_per_task: int,
    max_steps: int = DEFAULT_MAX_STEPS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    camera_name: str = DEFAULT_CAMERA,
    strip_path: str | Path | None = None,
    strip_episodes_per_task: int = 1,
    progress: bool = True,
    desc: str = "evaluation",
) -> dict[str, Any]:
    """Success of `policy_factory(task)` on `episodes_per_task` held-out variations of each task.

    Args:
        policy_factory: task name -> a policy (`reset()`, `select_action(image, instruction, obs) -> [4]`).
        strip_path: if given, the first `strip_episodes_per_task` episodes of every task are saved there (`.gif`:
            an animation, the episodes side by side; otherwise a PNG grid, one row per episode).

    Returns:
        `{"success": {task: rate}, "mean_success", "mean_steps": {task: steps}, "successes": {task: [bool]},
        "instructions": {task: instruction}}`; `mean_success` is the mean of the per-task rates.
    """
    tasks = check_tasks(tasks)
    if isinstance(episodes_per_task, bool) or not isinstance(episodes_per_task, int) or episodes_per_task < 1:
        raise ValueError(f"episodes_per_task={episodes_per_task!r} must be a positive integer.")
    episodes: dict[str, list[Episode]] = {}
    with tqdm(total=len(tasks) * episodes_per_task, desc=desc, disable=not progress) as bar:
        for task in tasks:
            variations = task_variations(task, EVAL_SEED)
            policy = policy_factory(task)
            episodes[task] = []
            with MetaWorldEnv(task, image_size, camera_name, max_steps) as env:
                for index in range(episodes_per_task):
                    record = strip_path is not None and index < strip_episodes_per_task
                    episode = run_episode(env, variations[index % len(variations)], policy, TASK_INSTRUCTIONS[task][0], record=record)
                    episodes[task].append(episode)
                    bar.update()
                    bar.set_postfix(task=task, success=f"{np.mean([e.success for e in episodes[task]]):.2f}")
    if strip_path is not None:
        save_strip([episode for task_episodes in episodes.values() for episode in task_episodes if episode.images], strip_path)
    success = {task: float(np.mean([e.success for e in task_episodes])) for task, task_episodes in episodes.items()}
    return {
        "success": success,
        "mean_success": float(np.mean(list(success.values()))),
        "mean_steps": {task: float(np.mean([e.num_steps for e in task_episodes])) for task, task_episodes in episodes.items()},
        "successes": {task: [e.success for e in task_episodes] for task, task_episodes in episodes.items()},
        "instructions": {task: TASK_INSTRUCTIONS[task][0] for task in tasks},
    }


def save_strip(episodes: Sequence[Episode], path: str | Path) -> None:
    """Recorded episodes as a PNG grid (one captioned row each) or, for a `.gif` path, an animation of them side by
    side (an episode that ended holds its last frame)."""
    path = Path(path)
    captions = [f"{e.task}: {'success' if e.success else 'failure'} after {e.num_steps} steps" for e in episodes]
    if path.suffix.lower() != ".gif":
        save_episode_strip([e.images for e in episodes], path, captions)
        return
    length = max(len(e.images) for e in episodes)
    width, height = episodes[0].images[0].size
    frames = []
    for t in range(length):
        frame = Image.new("RGB", (width * len(episodes), height))
        for column, episode in enumerate(episodes):
            frame.paste(episode.images[min(t, len(episode.images) - 1)], (column * width, 0))
        frames.append(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)


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


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """Success per task (rows) and policy (columns), and the mean."""
    tasks = list(next(iter(results.values()))["success"])
    names = list(results)
    print(f"{'task':<26}" + "".join(f"{name:>13}" for name in names))
    for task in tasks:
        print(f"{task:<26}" + "".join(f"{results[name]['success'][task]:>13.1%}" for name in names))
    print(f"{'mean':<26}" + "".join(f"{results[name]['mean_success']:>13.1%}" for name in names))
