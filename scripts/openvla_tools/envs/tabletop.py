"""A procedural 2-D tabletop task that needs both vision and language.

A top-down table holds a few coloured objects (blocks and balls) and a gripper
marker (a black crosshair). An instruction names one object, either to reach it
("go to the red block") or to push it one way ("push the blue ball to the left").
Which object it is can only be read from the instruction, and where it is can only
be read from the image, so a policy that ignores either one fails.

Conventions:

* Table coordinates are continuous in ``[0, 1]^2`` with x to the right and y up
  ("up" in an instruction is towards the top of the image).
* Actions are 7 floats like a real arm: ``[dx, dy, dz, droll, dpitch, dyaw, gripper]``.
  Only ``(dx, dy)`` move the gripper (its length is capped at ``MAX_STEP``, then the
  gripper is clipped to the table); ``dz`` and the rotations are always 0 in the
  demonstrations. ``gripper`` is 1.0 (close) on the step that brings the gripper
  within ``success_radius`` of the goal and 0.0 (open) otherwise.
* A reach goal is the object's centre; a push goal is the point ``PUSH_DISTANCE``
  beyond the object in the named direction (objects are not simulated, so a push
  task is reaching that point). Objects sit in ``[OBJECT_MARGIN, 1 - OBJECT_MARGIN]``,
  so every goal is on the table.
* An episode succeeds as soon as the gripper is within ``success_radius`` of the goal
  and otherwise ends after ``max_steps`` steps.
* Everything is seeded: episode ``i`` of :func:`generate_demonstrations` uses seed
  ``seed + i`` (default 0, 1, ...), and episode ``i`` of :func:`evaluate_policy` uses
  ``seed + i`` (default 10_000, 10_001, ...), so held-out scenes are not training scenes.

A policy is an ``openvla_tools.evaluation.Policy``: ``select_actions(images, instructions)``
takes B PIL images and B strings and returns a ``[B, 7]`` array (``OpenVLAPolicy`` for a model).
:class:`ScriptedPolicy` solves the task from the pixels and the instruction alone (by
colour segmentation), showing the observations are sufficient. The demonstrations
use the privileged :meth:`TabletopEnv.expert_action`, which reads the true state.

``python scripts/demos.py --env tabletop --help`` writes a demonstration dataset and a
preview image; ``python scripts/evaluate.py --env tabletop`` evaluates a policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from modeling_openvla import OpenVLAPolicy

from ..evaluation import Policy, StatelessPolicy, check_positive, rollout_video_path, save_rollout_video

ACTION_DIM = 7
FPS = 10  # nominal frame rate of recorded episodes: the task has no clock, one step per frame
MAX_STEP = 0.1  # longest gripper move per step, table units
SUCCESS_RADIUS = 0.05
PUSH_DISTANCE = 0.15
OBJECT_HALF_SIZE = 0.06  # half the side of a block, radius of a ball
OBJECT_MARGIN = 0.2  # objects are kept this far from the table edge
MIN_OBJECT_DISTANCE = 0.2  # between object centres
MIN_START_DISTANCE = 0.25  # between the gripper's start and the goal
GRIPPER_RADIUS = 0.05
GRIPPER_LINE_WIDTH = 0.02
SUPERSAMPLE = 4  # shapes are drawn this much larger and box-filtered down

TABLE_RGB = (200, 200, 200)
GRIPPER_RGB = (0, 0, 0)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 200, 30),
}
SHAPES = ("block", "ball")
TASK_KINDS = ("reach", "push")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, 1.0),
    "down": (0.0, -1.0),
}
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
REACH_TEMPLATES = ("move to the {object}", "go to the {object}", "reach the {object}")
PUSH_TEMPLATES = ("push the {object} {direction}", "slide the {object} {direction}")

@dataclass(frozen=True)
class SceneObject:
    """An object on the table: a colour name, a shape name and its centre ``[2]``."""

    color: str
    shape: str
    position: np.ndarray

    @property
    def name(self) -> str:
        """How instructions refer to the object, e.g. ``"red block"``."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Task:
    """What to do in an episode: the target object, an optional push direction,
    the instruction text and the goal point ``[2]`` the gripper must reach."""

    target: SceneObject
    direction: str | None
    instruction: str
    goal: np.ndarray


def sample_objects(rng: np.random.Generator, num_objects: int) -> list[SceneObject]:
    """Samples ``num_objects`` (at most ``len(COLORS)``) objects with distinct colours
    at non-overlapping random positions."""
    colors = rng.choice(list(COLORS), size=num_objects, replace=False)
    positions: list[np.ndarray] = []
    while len(positions) < num_objects:
        candidate = rng.uniform(OBJECT_MARGIN, 1 - OBJECT_MARGIN, size=2)
        if all(np.linalg.norm(candidate - p) >= MIN_OBJECT_DISTANCE for p in positions):
            positions.append(candidate)
    return [
        SceneObject(str(color), str(rng.choice(SHAPES)), position)
        for color, position in zip(colors, positions, strict=True)
    ]


def check_task_kinds(task_kinds: Sequence[str]) -> tuple[str, ...]:
    """``task_kinds`` as a tuple, checked to be a non-empty subset of ``TASK_KINDS``."""
    kinds = tuple(task_kinds)
    unknown = sorted(set(kinds) - set(TASK_KINDS))
    if not kinds or unknown:
        raise ValueError(f"task_kinds must be a non-empty subset of {TASK_KINDS}, got {kinds}")
    return kinds


def sample_task(rng: np.random.Generator, objects: Sequence[SceneObject], task_kinds: Sequence[str] = TASK_KINDS) -> Task:
    """Picks a target object and one of the equally likely goals ``task_kinds`` allows:
    reach it (``"reach"``), or push it left, right, up or down (``"push"``, four goals);
    then phrases the instruction with a random template."""
    target = objects[rng.integers(len(objects))]
    kinds = check_task_kinds(task_kinds)
    goals = ([None] if "reach" in kinds else []) + (list(DIRECTIONS) if "push" in kinds else [])
    direction = goals[rng.integers(len(goals))]
    if direction is None:
        template = REACH_TEMPLATES[rng.integers(len(REACH_TEMPLATES))]
        return Task(target, None, template.format(object=target.name), target.position)
    template = PUSH_TEMPLATES[rng.integers(len(PUSH_TEMPLATES))]
    instruction = template.format(object=target.name, direction=DIRECTION_PHRASES[direction])
    goal = target.position + PUSH_DISTANCE * np.asarray(DIRECTIONS[direction])
    return Task(target, direction, instruction, goal)


def sample_gripper_start(rng: np.random.Generator, goal: np.ndarray) -> np.ndarray:
    """Samples a gripper position ``[2]`` at least ``MIN_START_DISTANCE`` from the goal."""
    while True:
        start = rng.uniform(0.05, 0.95, size=2)
        if np.linalg.norm(start - goal) >= MIN_START_DISTANCE:
            return start


def move_toward(position: np.ndarray, goal: np.ndarray, success_radius: float = SUCCESS_RADIUS) -> np.ndarray:
    """The expert action ``[7]`` (float32) moving from ``position`` toward ``goal``.

    ``(dx, dy)`` is the direction to the goal times ``min(MAX_STEP, distance)``; the
    gripper closes (1.0) iff this move ends within ``success_radius`` of the goal.
    """
    offset = goal - position
    distance = float(np.linalg.norm(offset))
    action = np.zeros(ACTION_DIM, dtype=np.float32)
    if distance > 0:
        action[:2] = offset * (min(MAX_STEP, distance) / distance)
    action[6] = float(distance - MAX_STEP <= success_radius)
    return action


def _to_pixels(point: np.ndarray, size: int) -> tuple[float, float]:
    """Table coordinates (y up) to pixel coordinates (y down) in an image of ``size``."""
    return float(point[0]) * size, (1 - float(point[1])) * size


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, size: int) -> None:
    x, y = _to_pixels(obj.position, size)
    half = OBJECT_HALF_SIZE * size
    box = (x - half, y - half, x + half, y + half)
    if obj.shape == "block":
        draw.rectangle(box, fill=COLORS[obj.color])
    else:
        draw.ellipse(box, fill=COLORS[obj.color])


def _draw_gripper(draw: ImageDraw.ImageDraw, gripper: np.ndarray, size: int) -> None:
    x, y = _to_pixels(gripper, size)
    r = GRIPPER_RADIUS * size
    width = max(1, round(GRIPPER_LINE_WIDTH * size))
    draw.ellipse((x - r, y - r, x + r, y + r), outline=GRIPPER_RGB, width=width)
    draw.line((x - r, y, x + r, y), fill=GRIPPER_RGB, width=width)
    draw.line((x, y - r, x, y + r), fill=GRIPPER_RGB, width=width)


def render_table(objects: Sequence[SceneObject], image_size: int) -> Image.Image:
    """Draws the objects on an empty table, supersampled (``image_size * SUPERSAMPLE``)."""
    size = image_size * SUPERSAMPLE
    table = Image.new("RGB", (size, size), TABLE_RGB)
    draw = ImageDraw.Draw(table)
    for obj in objects:
        _draw_object(draw, obj, size)
    return table


def render_gripper(table: Image.Image, gripper: np.ndarray) -> Image.Image:
    """Draws the gripper on a copy of a supersampled table and filters it down to
    an ``image_size x image_size`` RGB image."""
    image = table.copy()
    _draw_gripper(ImageDraw.Draw(image), gripper, image.width)
    return image.reduce(SUPERSAMPLE)


def render_scene(objects: Sequence[SceneObject], gripper: np.ndarray, image_size: int = 112) -> Image.Image:
    """Renders the table with its objects and the gripper as an RGB image."""
    return render_gripper(render_table(objects, image_size), gripper)


class TabletopEnv:
    """The closed-loop tabletop environment.

    ``reset`` samples a scene and an instruction (a goal of ``task_kinds``: ``"reach"``,
    ``"push"`` or both); ``step`` applies a ``[7]`` action.
    After ``reset`` the attributes ``objects``, ``task``, ``instruction``, ``goal`` ``[2]``,
    ``gripper`` ``[2]``, ``steps``, ``done`` and ``success`` describe the state.
    """

    def __init__(
        self,
        image_size: int = 112,
        num_objects: int = 3,
        max_steps: int = 20,
        success_radius: float = SUCCESS_RADIUS,
        seed: int = 0,
        task_kinds: Sequence[str] = TASK_KINDS,
    ) -> None:
        if not 1 <= num_objects <= len(COLORS):
            raise ValueError(f"num_objects must be in [1, {len(COLORS)}], got {num_objects}")
        self.image_size = image_size
        self.num_objects = num_objects
        self.task_kinds = check_task_kinds(task_kinds)
        self.max_steps = max_steps
        self.success_radius = success_radius
        self._rng = np.random.default_rng(seed)
        self._table: Image.Image | None = None
        self.objects: list[SceneObject] = []
        self.task: Task | None = None
        self.gripper = np.zeros(2)
        self.steps = 0
        self.done = True
        self.success = False

    @property
    def instruction(self) -> str:
        """The current episode's instruction."""
        return self._require_task().instruction

    @property
    def goal(self) -> np.ndarray:
        """The point ``[2]`` the gripper must reach in the current episode."""
        return self._require_task().goal

    @property
    def task_kind(self) -> str:
        """The kind of the current episode's goal, ``"reach"`` or ``"push"``."""
        return "reach" if self._require_task().direction is None else "push"

    def _require_task(self) -> Task:
        if self.task is None:
            raise RuntimeError("call reset() before using the environment")
        return self.task

    def reset(self, seed: int | None = None) -> tuple[Image.Image, str]:
        """Samples a new scene (from ``seed`` if given, else from the environment's own
        generator) and returns the first image and the instruction."""
        rng = self._rng if seed is None else np.random.default_rng(seed)
        self.objects = sample_objects(rng, self.num_objects)
        self.task = sample_task(rng, self.objects, self.task_kinds)
        self.gripper = sample_gripper_start(rng, self.task.goal)
        self._table = render_table(self.objects, self.image_size)
        self.steps = 0
        self.done = False
        self.success = False
        return self.render(), self.task.instruction

    def render(self) -> Image.Image:
        """The current ``image_size x image_size`` RGB observation."""
        self._require_task()
        return render_gripper(self._table, self.gripper)

    def step(self, action: np.ndarray) -> tuple[Image.Image, bool, bool]:
        """Moves the gripper by ``action[:2]`` (capped at ``MAX_STEP`` in length, then
        clipped to the table) and returns ``(image, done, success)``."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape ({ACTION_DIM},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action}")
        if self.done:
            raise RuntimeError("the episode is over (or was never started); call reset()")
        move = action[:2]
        length = float(np.linalg.norm(move))
        if length > MAX_STEP:
            move = move * (MAX_STEP / length)
        self.gripper = np.clip(self.gripper + move, 0.0, 1.0)
        self.steps += 1
        self.success = bool(np.linalg.norm(self.gripper - self.goal) <= self.success_radius)
        self.done = self.success or self.steps >= self.max_steps
        return self.render(), self.done, self.success

    def expert_action(self) -> np.ndarray:
        """The privileged expert's action ``[7]`` (float32) from the true state."""
        return move_toward(self.gripper, self.goal, self.success_radius)


# ----------------------------------------------------------------------------------
# Perception from pixels (used by the scripted expert policy and by ablations)


def _pixel_centroid(mask: np.ndarray) -> np.ndarray | None:
    """Centre ``[2]`` in table coordinates of a boolean ``[H, W]`` mask, or None if empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    size = mask.shape[0]
    return np.array([(cols.mean() + 0.5) / size, 1 - (rows.mean() + 0.5) / size])


def locate_objects(image: Image.Image) -> dict[str, np.ndarray]:
    """Finds each palette colour visible in ``image``: ``{colour name: centre [2]}``."""
    pixels = np.asarray(image, dtype=np.int16)
    found = {}
    for name, rgb in COLORS.items():
        centre = _pixel_centroid(np.abs(pixels - np.array(rgb)).max(axis=-1) <= 30)
        if centre is not None:
            found[name] = centre
    return found


def locate_gripper(image: Image.Image) -> np.ndarray:
    """Finds the gripper's centre ``[2]`` (the dark pixels) in ``image``."""
    centre = _pixel_centroid(np.asarray(image).max(axis=-1) < 100)
    if centre is None:
        raise ValueError("no gripper visible in the image")
    return centre


def parse_instruction(instruction: str) -> tuple[str, str | None]:
    """Returns the colour the instruction names and its push direction (None to reach)."""
    words = instruction.lower().split()
    colors = [word for word in words if word in COLORS]
    if not colors:
        raise ValueError(f"no known colour in instruction {instruction!r}")
    direction = next((word for word in words if word in DIRECTIONS), None)
    return colors[0], direction


class ScriptedPolicy(StatelessPolicy):
    """A scripted policy that sees only what a model sees: it parses the instruction, segments the image by colour
    and moves toward the goal (closing the gripper on the step that should end within ``SUCCESS_RADIUS`` of it)."""

    def select_actions(self, images: Sequence[Image.Image], instructions: Sequence[str], observations=None) -> np.ndarray:
        """``B`` images and instructions -> ``[B, 7]`` float32."""
        actions = []
        for image, instruction in zip(images, instructions, strict=True):
            color, direction = parse_instruction(instruction)
            objects = locate_objects(image)
            if color not in objects:
                raise ValueError(f"no {color} object visible for instruction {instruction!r}")
            goal = objects[color]
            if direction is not None:
                goal = goal + PUSH_DISTANCE * np.asarray(DIRECTIONS[direction])
            actions.append(move_toward(locate_gripper(image), goal))
        return np.stack(actions)


class RandomPolicy(StatelessPolicy):
    """Uniformly random moves (each of dx, dy in ``[-MAX_STEP, MAX_STEP]``) and random gripper commands, from one
    seeded stream."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def select_actions(self, images: Sequence[Image.Image], instructions: Sequence[str], observations=None) -> np.ndarray:
        actions = np.zeros((len(images), ACTION_DIM), dtype=np.float32)
        actions[:, :2] = self.rng.uniform(-MAX_STEP, MAX_STEP, size=(len(images), 2))
        actions[:, 6] = self.rng.integers(0, 2, size=len(images))
        return actions


BASELINES = {"scripted": ScriptedPolicy, "random": RandomPolicy}


# ----------------------------------------------------------------------------------
# Demonstrations and evaluation


def demonstration_features(action_dim: int = ACTION_DIM, name_column: str = "dataset_name") -> datasets.Features:
    """The columns of a demonstration dataset (one row per step): ``image``, ``instruction``, ``action``
    (``action_dim`` floats), ``episode``, ``step`` and a string column ``name_column`` saying where the row
    comes from. The defaults are those of :func:`generate_demonstrations`."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "instruction": datasets.Value("string"),
            "action": datasets.List(datasets.Value("float32"), length=action_dim),
            "episode": datasets.Value("int32"),
            "step": datasets.Value("int32"),
            name_column: datasets.Value("string"),
        }
    )


def generate_demonstrations(
    num_episodes: int,
    seed: int = 0,
    image_size: int = 112,
    num_objects: int = 3,
    max_steps: int = 20,
    dataset_name: str = "tabletop",
    progress: bool = True,
    task_kinds: Sequence[str] = TASK_KINDS,
) -> datasets.Dataset:
    """Rolls out the privileged expert for ``num_episodes`` episodes (episode ``i`` from
    seed ``seed + i``, goals of ``task_kinds``) and returns one row per step, including
    the final one, with columns image, instruction, action ``[7]``, episode, step and dataset_name."""
    env = TabletopEnv(image_size, num_objects, max_steps, task_kinds=task_kinds)
    image_feature = datasets.Image()
    columns: dict[str, list] = {name: [] for name in demonstration_features()}
    for episode in tqdm(range(num_episodes), desc="demonstrations", disable=not progress):
        image, instruction = env.reset(seed + episode)
        while not env.done:
            action = env.expert_action()
            columns["image"].append(image_feature.encode_example(image))
            columns["instruction"].append(instruction)
            columns["action"].append(action.tolist())
            columns["episode"].append(episode)
            columns["step"].append(env.steps)
            columns["dataset_name"].append(dataset_name)
            image, _, _ = env.step(action)
    return datasets.Dataset.from_dict(columns, features=demonstration_features())


def _check_actions(actions: np.ndarray, batch: int) -> np.ndarray:
    """``actions`` as a float32 array, checked to have shape ``[batch, ACTION_DIM]``."""
    actions = np.asarray(actions, dtype=np.float32)
    if actions.shape != (batch, ACTION_DIM):
        raise ValueError(f"policy must return shape ({batch}, {ACTION_DIM}), got {actions.shape}")
    return actions


def _rollout(policy: Policy, envs: list[TabletopEnv], recorded: Sequence[bool], bar: tqdm) -> list[list[Image.Image]]:
    """Steps freshly reset ``envs`` in lock-step, calling ``policy`` once per step on the unfinished ones (those that
    finish are dropped from its batch), until all are done. Returns the frames of the envs marked in ``recorded``, from
    first observation to last (empty lists for the others)."""
    images = [env.render() for env in envs]
    frames = [[image] if record else [] for image, record in zip(images, recorded, strict=True)]
    policy.reset()
    active = list(range(len(envs)))
    while active:
        actions = policy.select_actions([images[i] for i in active], [envs[i].instruction for i in active])
        actions = _check_actions(actions, len(active))
        for i, action in zip(active, actions, strict=True):
            images[i], done, _ = envs[i].step(action)
            if recorded[i]:
                frames[i].append(images[i])
            if done:
                bar.update()
        finished = [position for position, i in enumerate(active) if envs[i].done]
        if finished:
            policy.drop(finished)
        active = [i for i in active if not envs[i].done]
    return frames


def evaluate_policy(
    policy: Policy,
    num_episodes: int,
    seed: int = 10_000,
    image_size: int = 112,
    num_objects: int = 3,
    max_steps: int = 20,
    batch_size: int | None = None,
    progress: bool = True,
    strip_path: str | Path | None = None,
    strip_episodes: int = 4,
    task_kinds: Sequence[str] = TASK_KINDS,
    video_episodes: int = 4,
) -> dict:
    """Runs ``policy`` in closed loop on ``num_episodes`` environments (episode ``i``
    from seed ``seed + i``), ``batch_size`` of them (default all) in lock-step.

    ``policy.select_actions(images, instructions)`` gets B images and B instructions and returns
    ``[B, 7]`` actions; ``policy.reset()`` starts every batch and ``policy.drop`` removes the
    environments whose episodes ended. If ``strip_path`` is given, the first ``strip_episodes``
    episodes are saved there with :func:`save_episode_strip`, and the first ``video_episodes``
    of each task kind as a rollout video next to it (``openvla_tools.evaluation.rollout_video_path``).
    ``task_kinds`` limits the goals as in :class:`TabletopEnv`.

    Returns ``{"success_rate", "num_episodes", "mean_steps", "task_success", "successes"}``;
    ``task_success`` holds the success rate of each task kind that occurred.
    """
    check_positive("num_episodes", num_episodes)
    batch_size = check_positive("batch_size", batch_size or num_episodes)
    envs: list[TabletopEnv] = []
    frames: list[list[Image.Image]] = []
    videos: dict[str, list[int]] = {kind: [] for kind in check_task_kinds(task_kinds)}  # kind -> recorded episodes
    with tqdm(total=num_episodes, desc="evaluation", disable=not progress) as bar:
        for start in range(0, num_episodes, batch_size):
            seeds = range(seed + start, seed + min(start + batch_size, num_episodes))
            batch = [TabletopEnv(image_size, num_objects, max_steps, task_kinds=task_kinds) for _ in seeds]
            recorded = []
            for index, (env, episode_seed) in enumerate(zip(batch, seeds, strict=True), start=len(envs)):
                env.reset(episode_seed)
                in_video = strip_path is not None and len(videos[env.task_kind]) < video_episodes
                if in_video:
                    videos[env.task_kind].append(index)
                recorded.append(in_video or (strip_path is not None and index < strip_episodes))
            frames += _rollout(policy, batch, recorded, bar)
            envs += batch
            bar.set_postfix(success=f"{np.mean([env.success for env in envs]):.2f}")
    successes = [env.success for env in envs]
    outcomes = [f"{env.instruction}: {'success' if env.success else 'failure'}" for env in envs]
    if strip_path is not None:
        shown = range(min(strip_episodes, num_episodes))
        save_episode_strip([frames[i] for i in shown], strip_path, [outcomes[i] for i in shown])
        for kind, indices in videos.items():
            if indices:
                captions = ["success" if successes[i] else "failure" for i in indices]
                save_rollout_video([frames[i] for i in indices], rollout_video_path(strip_path, kind), captions, fps=FPS // 2)
    kinds = [env.task_kind for env in envs]
    return {
        "success_rate": float(np.mean(successes)),
        "num_episodes": num_episodes,
        "mean_steps": float(np.mean([env.steps for env in envs])),
        "task_success": {
            kind: float(np.mean([s for s, k in zip(successes, kinds, strict=True) if k == kind]))
            for kind in videos if kind in kinds
        },
        "successes": successes,
    }


def save_episode_strip(
    frames: list[list[Image.Image]],
    path: str | Path,
    captions: Sequence[str] | None = None,
    max_columns: int = 10,
) -> None:
    """Writes a PNG grid with one row per episode and up to ``max_columns`` evenly
    spaced frames (always the first and the last) per row, each row optionally
    captioned."""
    size = frames[0][0].width
    caption_height = 14 if captions is not None else 0
    columns = min(max_columns, max(len(episode) for episode in frames))
    strip = Image.new("RGB", (columns * size, len(frames) * (size + caption_height)), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=11)
    for row, episode in enumerate(frames):
        top = row * (size + caption_height)
        if captions is not None:
            draw.text((2, top + 1), captions[row], fill="black", font=font)
        indices = np.unique(np.linspace(0, len(episode) - 1, min(columns, len(episode))).round().astype(int))
        for column, index in enumerate(indices):
            strip.paste(episode[index], (column * size, top + caption_height))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)


def episode_frames(dataset: datasets.Dataset, num_episodes: int) -> tuple[list[list[Image.Image]], list[str]]:
    """The images and the instructions of the first ``num_episodes`` episodes of a
    demonstration dataset (whose rows are ordered by episode)."""
    rows = dataset.select(range(int(np.searchsorted(dataset["episode"], num_episodes))))
    frames: list[list[Image.Image]] = [[] for _ in set(rows["episode"])]
    captions = [""] * len(frames)
    for row in rows:
        frames[row["episode"]].append(row["image"])
        captions[row["episode"]] = row["instruction"]
    return frames, captions


@torch.no_grad()
def evaluate_model(model, processor, num_episodes: int = 100, seed: int = 10_000, unnorm_key: str | None = None,
                   batch_size: int | None = 50, strip_path: Path | None = None,
                   task_kinds: Sequence[str] = TASK_KINDS, n_action_steps: int | None = None) -> dict[str, Any]:
    """Success rate of `model` on `num_episodes` held-out tabletop episodes (seeds `seed`, `seed + 1`, ...) whose goals
    are of `task_kinds`, acting through `OpenVLAPolicy` (`n_action_steps` of each chunk, by default all of it)."""
    policy = OpenVLAPolicy(model.eval(), processor, unnorm_key, n_action_steps=n_action_steps)
    return evaluate_policy(policy, num_episodes, seed=seed, batch_size=batch_size,
                           strip_path=strip_path, task_kinds=task_kinds)
