"""What the closed-loop evaluations of every environment share: the policy protocol, loading the evaluated policy,
the per-task table and rollout videos.

A policy steps `B` environments in lock-step:

    policy.reset()                                                        # new episodes in every environment
    actions = policy.select_actions(images, instructions, observations)   # float32 [B, action_dim]
    policy.drop(env_ids)                                                  # these episodes ended; the others go on

`OpenVLAPolicy` (a local model) and `RemotePolicy` (a model behind `scripts/serve.py`) implement it through
`ActionQueuePolicy`, which keeps one queue of planned actions per environment; the environments' scripted experts and
random policies through `StatelessPolicy`.

Rollout videos are animated GIFs written with Pillow (a core dependency; GitHub and the Hub show them inline): the
recorded episodes of a task side by side, each captioned with its outcome, an episode that ended holding its last frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VIDEO_FPS = 10
VIDEO_MAX_FRAMES = 50  # longer episodes are shown at evenly spaced steps, so a video stays small
CAPTION_HEIGHT = 14


class Policy(Protocol):
    """What the evaluation loops step: `B` environments at a time, one action each per call."""

    def reset(self, env_ids: int | Sequence[int] | None = None) -> None:
        """New episodes: in every environment, or only in `env_ids`."""

    def drop(self, env_ids: int | Sequence[int]) -> None:
        """The episodes of `env_ids` ended and they leave the batch; the others keep their order."""

    def select_actions(self, images: Sequence, instructions: Sequence[str], observations: Sequence | None = None) -> np.ndarray:
        """`B` images (`None` where the policy's `needs_image` is False and nothing is recorded), `B` instructions and
        optionally `B` state readings -> float32 `[B, action_dim]`."""


class StatelessPolicy:
    """Base of the policies that keep nothing per environment (scripted experts, random actions): `reset` and `drop`
    have nothing to do. Subclasses implement `select_actions`; `needs_image = False` spares the rendering of frames
    they do not read."""

    needs_image = True

    def reset(self, env_ids: int | Sequence[int] | None = None) -> None:
        """Nothing is planned ahead."""

    def drop(self, env_ids: int | Sequence[int]) -> None:
        """Nothing is kept per environment."""

    def select_actions(self, images: Sequence, instructions: Sequence[str], observations: Sequence | None = None) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement select_actions(images, instructions, observations).")


# The name the evaluator gives the adapter it loads (`load_policy`).
ADAPTER_NAME = "evaluated"


def load_policy(
    model: str | None,
    baselines: dict[str, Callable[[], Policy]],
    action_dim: int,
    env_name: str,
    server: str | None = None,
    api_key: str | None = None,
    unnorm_key: str | None = None,
    n_action_steps: int | None = None,
    temporal_ensemble_coeff: float | None = None,
    adapter: str | None = None,
) -> Policy:
    """The policy `scripts/evaluate.py` evaluates: a baseline of `baselines` (`model` is its name), the model served at
    `server` (`RemotePolicy`, the `serve` extra), or a saved model folder or Hub id (`OpenVLAPolicy`, loaded through
    the Auto classes with `trust_remote_code=True`), with the PEFT adapter `adapter` (a folder or Hub id written by
    `scripts/finetune.py --use_lora`, `OUTPUT/adapter`) loaded on it and active. `n_action_steps` and
    `temporal_ensemble_coeff` apply to models' action chunks, so a baseline refuses them; a model whose actions are
    not `action_dim` long is refused."""
    options = {"n_action_steps": n_action_steps, "temporal_ensemble_coeff": temporal_ensemble_coeff}
    if adapter is not None and (server is not None or model in baselines):
        raise ValueError(
            f"adapter={adapter!r} is loaded on a saved model (--model FOLDER); the {server or model!r} policy cannot take "
            "it. Serve the base model with its adapter, or leave --adapter out."
        )
    if server is None and model in baselines:
        for name, value in options.items():
            if value is not None:
                raise ValueError(
                    f"{name}={value} applies to a model's action chunks; the {model!r} baseline acts one step at a "
                    f"time. Leave --{name} out for baselines."
                )
        return baselines[model]()
    if server is not None:
        from .remote_policy import RemotePolicy

        policy = RemotePolicy(server, api_key=api_key, unnorm_key=unnorm_key, **options)
    else:
        from transformers import AutoModel, AutoProcessor

        from modeling_openvla import OpenVLAPolicy

        loaded = AutoModel.from_pretrained(model, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
        if adapter is not None:
            loaded.load_adapter(adapter, adapter_name=ADAPTER_NAME)  # the first adapter loaded is active
            processor.norm_stats = dict(loaded.config.norm_stats)
        policy = OpenVLAPolicy(loaded, processor, unnorm_key, **options)
    if policy.action_dim != action_dim:
        raise ValueError(
            f"The model predicts action_dim={policy.action_dim} values but {env_name} actions have {action_dim}; train "
            f"it on {env_name} demonstrations (scripts/demos.py --env {env_name})."
        )
    return policy


def statistics_key(policy: Policy, unnorm_key: str | None) -> str | None:
    """The dataset whose statistics unnormalise `policy`'s actions: `unnorm_key` resolved against a local model's
    `norm_stats`, or as given for a served model (None: the server's default) and for baselines."""
    from modeling_openvla import OpenVLAPolicy
    from processing_openvla import resolve_unnorm_key

    if isinstance(policy, OpenVLAPolicy):
        return resolve_unnorm_key(policy.model.config.norm_stats, unnorm_key)
    return unnorm_key


def print_table(success: dict[str, dict[str, float]]) -> None:
    """Success per task (rows) and policy (columns): `success[policy][task]`, tasks in the first policy's order."""
    names = list(success)
    tasks = list(success[names[0]])
    width = max(13, *(len(name) + 2 for name in names))
    print(f"{'task':<26}" + "".join(f"{name:>{width}}" for name in names))
    for task in tasks:
        print(f"{task:<26}" + "".join(f"{success[name][task]:>{width}.1%}" for name in names))


def rollout_video_path(strip_path: str | Path, task: str) -> Path:
    """Where the rollout video of `task` goes: next to the strip picture, `STEM_TASK.gif`."""
    strip_path = Path(strip_path)
    return strip_path.with_name(f"{strip_path.stem}_{task}.gif")


def save_rollout_video(
    episodes: Sequence[Sequence[Image.Image]],
    path: str | Path,
    captions: Sequence[str] | None = None,
    fps: int = VIDEO_FPS,
    max_frames: int = VIDEO_MAX_FRAMES,
) -> None:
    """Episodes' frames (first observation to last) as one animated GIF, side by side: at most `max_frames` frames,
    evenly spaced over the longest episode and always including its first and last, shown at `fps`; an episode that
    ended holds its last frame. `captions` (one per episode) are written above each episode."""
    length = max(len(frames) for frames in episodes)
    width, height = episodes[0][0].size
    top = CAPTION_HEIGHT if captions is not None else 0
    font = ImageFont.load_default(size=11)
    video = []
    for t in np.unique(np.linspace(0, length - 1, min(length, max_frames)).round().astype(int)):
        frame = Image.new("RGB", (width * len(episodes), height + top), "white")
        draw = ImageDraw.Draw(frame)
        for column, frames in enumerate(episodes):
            frame.paste(frames[min(t, len(frames) - 1)], (column * width, top))
            if captions is not None:
                draw.text((column * width + 2, 1), captions[column], fill="black", font=font)
        video.append(frame)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    video[0].save(path, save_all=True, append_images=video[1:], duration=round(1000 / fps), loop=0)


def check_positive(name: str, value: Any) -> int:
    """`value` if it is a positive integer, else a `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return value
