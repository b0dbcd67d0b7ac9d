"""Meta-World (MuJoCo) tasks for OpenVLA: rendering environments, task variations, instructions and baseline policies.

Meta-World (`pip install -e ".[metaworld]"`, version 3) gives third-party demonstrations (its scripted expert
policies) and a third-party success judge (`info["success"]` of `env.step`). This module is shared by
`metaworld_demos` (demonstrations) and `openvla_tools.metaworld_evaluation` (closed-loop evaluation).

Conventions:

* A *variation* is a Meta-World `Task`: one placement of the task's objects and goal. Every task has 50 of them per
  seed, `metaworld.MT1(name, seed=seed).train_tasks`. Demonstrations use `TRAIN_SEED` (0) by default (or any other
  seeds but 1) and evaluation `EVAL_SEED` (1), so held-out placements are not training ones. Meta-World ignores
  `reset(seed=...)`: the placement comes from `set_task`, and the scripted expert and the physics are deterministic.
* Images are RGB, `image_size` x `image_size`, from the camera `corner2` (a view of the whole table). Meta-World's
  corner cameras are mounted rolled by 180 degrees, so frames are rotated back upright. They are rendered without
  shadows, reflections or anti-aliasing, which takes ~15 ms per 128 px frame instead of ~140 ms on a CPU.
* Actions are 4 floats in [-1, 1]: the end effector's (dx, dy, dz) and the gripper effort (1 closes it). The
  environment clips actions to [-1, 1]; `check_action` does the same, so what is recorded is what was executed.
* A policy is an `openvla_tools.evaluation.Policy`, stepping environments in lock-step:
  `select_actions(images, instructions, observations) -> float32 [B, 4]`, where each observation is Meta-World's
  39-float state vector. The scripted expert reads the instruction (which names the task) and the state only; an
  image policy (an OpenVLA model) reads the image and the instruction only. A policy whose `needs_image` attribute is
  False gets `None` for the images of steps that are not recorded, which saves the rendering.
* MuJoCo renders through OpenGL. Without a display this needs `MUJOCO_GL=egl` (set here unless the user set it,
  before MuJoCo is imported). Several environments render in turn (each makes its OpenGL context current first);
  `close()` every environment before making the next ones, as a context freed later blanks the frames of the others.
  A blank frame means a broken OpenGL context and raises a `RuntimeError` rather than being recorded or acted on.
"""

from __future__ import annotations

import functools
import gc
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before mujoco is imported

import metaworld  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402
from PIL import Image  # noqa: E402

from ..evaluation import Policy, StatelessPolicy  # noqa: E402

ACTION_DIM = 4
TRAIN_SEED = 0
EVAL_SEED = 1
DEFAULT_CAMERA = "corner2"
DEFAULT_IMAGE_SIZE = 128
DEFAULT_MAX_STEPS = 150
MIN_PIXEL_RANGE = 10  # a frame whose pixel values all lie within this range is blank


@dataclass(frozen=True)
class DerivedCamera:
    """A camera of the Meta-World scene, `base`, given the vertical field of view `fovy` (degrees) and, unless
    `position` is None, moved to `position` (metres, in the frame of the body it is mounted on); its orientation is
    kept."""

    base: str
    fovy: float
    position: tuple[float, float, float] | None = None


# Cameras made from the scene's own, selected by name like them (`camera_name`).
DERIVED_CAMERAS: dict[str, DerivedCamera] = {
    # `topview` looks straight down from (0, 0.5, 1.5) with a 45 degree field of view, which spans the whole table.
    # This one is moved over the part of it the three tasks use (y from the gripper's start, 0.4, to the back of the
    # button box, ~0.95) and narrowed to it, so every object and the gripper appear 1.5 times larger.
    "topview_close": DerivedCamera("topview", fovy=30.0, position=(0.0, 0.67, 1.5)),
    # `corner` (45 degrees) sees the MT10 tasks' objects, goals and the expert's paths within the middle 55% of its
    # frame (measured over the expert's episodes of 30 placements per task). Narrowed to them from the same place, the
    # puck, peg and goal markers appear 1.7 times larger.
    "corner_close": DerivedCamera("corner", fovy=26.0),
}

# Paraphrases per task; the first is the canonical one (used in evaluation). coffee-button-v3 was chosen as the third
# task by measurement: the scripted expert always succeeds (50/50 variations of both seeds) in ~36 steps, random
# actions almost never do (0-2%), and the machine moves across the table (x 0.19, y 0.10) between variations.
TASK_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "button-press-topdown-v3": (
        "press the button from the top",
        "push the button down from above",
        "press down on the button",
        "push the top of the button down",
        "press the button downwards",
    ),
    "drawer-close-v3": (
        "close the drawer",
        "push the drawer shut",
        "slide the drawer closed",
        "shut the drawer",
        "push the drawer in",
    ),
    "coffee-button-v3": (
        "press the button on the coffee machine",
        "push the coffee machine's button",
        "turn on the coffee machine",
        "press the coffee button",
        "push the button on the front of the coffee maker",
    ),
    "reach-v3": (
        "reach the goal",
        "move the gripper to the goal",
        "reach for the target position",
        "bring the hand to the goal",
        "move the arm to the target",
    ),
    "push-v3": (
        "push the puck to the goal",
        "slide the puck to the target",
        "push the puck over to the goal",
        "move the puck to the goal by pushing it",
        "shove the puck to the target position",
    ),
    "pick-place-v3": (
        "pick up the puck and place it at the goal",
        "grasp the puck and put it on the target",
        "lift the puck and move it to the goal",
        "pick the puck up and set it down at the goal",
        "carry the puck to the target",
    ),
    "door-open-v3": (
        "open the door",
        "pull the door open",
        "swing the door open",
        "open the door by its handle",
        "pull the door's handle to open it",
    ),
    "drawer-open-v3": (
        "open the drawer",
        "pull the drawer open",
        "slide the drawer out",
        "pull the drawer out by its handle",
        "draw the drawer open",
    ),
    "peg-insert-side-v3": (
        "insert the peg into the hole from the side",
        "push the peg sideways into the hole",
        "put the peg in the hole",
        "pick up the peg and slide it into the hole",
        "insert the peg sideways",
    ),
    "window-open-v3": (
        "open the window",
        "slide the window open",
        "push the window open",
        "slide the window pane open",
        "open the sliding window",
    ),
    "window-close-v3": (
        "close the window",
        "slide the window shut",
        "push the window closed",
        "slide the window pane closed",
        "shut the sliding window",
    ),
    "handle-press-v3": (
        "press the handle down",
        "push the handle down",
        "press down on the handle",
        "push the lever down",
        "press the handle downwards",
    ),
    "plate-slide-v3": (
        "slide the plate into the goal",
        "push the plate into the net",
        "slide the plate to the target",
        "push the plate into the goal",
        "move the plate into the net by sliding it",
    ),
}
KNOWN_TASKS = tuple(TASK_INSTRUCTIONS)
# Meta-World's MT10 benchmark; `check_tasks` reads the name "mt10" as these ten tasks.
MT10_TASKS = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
)
TASK_SETS = {"mt10": MT10_TASKS}
TASK_OF_INSTRUCTION = {instruction: task for task, instructions in TASK_INSTRUCTIONS.items() for instruction in instructions}


def check_task(task_name: str) -> str:
    """`task_name` if it is a known task, else a `ValueError` listing the known ones."""
    if task_name not in TASK_INSTRUCTIONS:
        raise ValueError(f"Unknown Meta-World task {task_name!r}; known tasks are {list(KNOWN_TASKS)}.")
    return task_name


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """A non-empty list of known, distinct tasks, with the names of `TASK_SETS` (`mt10`) replaced by their tasks, else
    `ValueError`."""
    tasks = [task for name in tasks for task in TASK_SETS.get(name, (name,))]
    if not tasks:
        raise ValueError(f"No tasks given; choose from {list(KNOWN_TASKS)} or {list(TASK_SETS)}.")
    for task in tasks:
        check_task(task)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"Tasks {tasks} repeat a task; give each task once.")
    return tasks


@functools.cache
def task_variations(task_name: str, seed: int) -> tuple[metaworld.Task, ...]:
    """The 50 variations (object and goal placements) of `task_name` drawn with `seed`: `TRAIN_SEED` for
    demonstrations, `EVAL_SEED` for held-out evaluation."""
    return tuple(metaworld.MT1(check_task(task_name), seed=seed).train_tasks)


def check_action(action) -> np.ndarray:
    """`action` as float32 `[4]`, clipped to [-1, 1] as the environment clips it. Raises `ValueError` on a wrong shape
    or a NaN / inf."""
    array = np.asarray(action, dtype=np.float32).reshape(-1)
    if array.shape != (ACTION_DIM,):
        raise ValueError(
            f"A Meta-World action has {ACTION_DIM} values (dx, dy, dz, gripper), got shape {np.shape(action)}; "
            f"use a model with action_dim={ACTION_DIM}."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"Action {array.tolist()} holds NaN or inf.")
    return np.clip(array, -1.0, 1.0)


class MetaWorldEnv:
    """One Meta-World task rendered from one camera, stepped for at most `max_steps` steps per episode.

    Args:
        task_name: one of `KNOWN_TASKS`.
        image_size: side of the square RGB frames, in pixels.
        camera_name: a camera of the Meta-World scene (`corner`, `corner2`, `corner3`, `topview`, ...) or of
            `DERIVED_CAMERAS` (`topview_close`, `corner_close`).
        max_steps: steps per episode; at most 500 (Meta-World refuses to step further without a reset).

    Example:
        ```python
        with MetaWorldEnv("drawer-close-v3") as env:
            image, obs = env.reset(task_variations("drawer-close-v3", EVAL_SEED)[0])
            image, obs, success = env.step(np.zeros(4))
        ```
    """

    def __init__(
        self,
        task_name: str,
        image_size: int = DEFAULT_IMAGE_SIZE,
        camera_name: str = DEFAULT_CAMERA,
        max_steps: int = DEFAULT_MAX_STEPS,
    ):
        env_class = ALL_V3_ENVIRONMENTS[check_task(task_name)]
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size={image_size!r} must be a positive number of pixels, e.g. 128.")
        if not 1 <= max_steps <= env_class.max_path_length:
            raise ValueError(f"max_steps={max_steps} must be from 1 to {env_class.max_path_length} (Meta-World's limit).")
        derived = DERIVED_CAMERAS.get(camera_name)
        scene_camera = derived.base if derived else camera_name
        self.env = env_class(render_mode="rgb_array", camera_name=scene_camera, width=image_size, height=image_size)
        cameras = [self.env.model.camera(i).name for i in range(self.env.model.ncam)]
        if scene_camera not in cameras:
            self.env.close()
            raise ValueError(
                f"camera_name={camera_name!r} is not a camera of {task_name}; choose one of "
                f"{cameras + list(DERIVED_CAMERAS)}."
            )
        if derived:
            camera_id = cameras.index(scene_camera)
            if derived.position is not None:
                self.env.model.cam_pos[camera_id] = derived.position
            self.env.model.cam_fovy[camera_id] = derived.fovy
        self.env.model.vis.quality.offsamples = 0  # no multisampling; read when the OpenGL context is made
        self.task_name = task_name
        self.camera_name = camera_name
        self.max_steps = max_steps
        self.steps = 0
        self._viewer = None

    def reset(self, variation: metaworld.Task) -> tuple[Image.Image, np.ndarray]:
        """Start an episode on `variation` (from `task_variations`). Returns the first frame and the state `[39]`."""
        self.env.set_task(variation)
        obs, _ = self.env.reset()
        self.steps = 0
        return self.render(), obs

    def step(self, action, render: bool = True) -> tuple[Image.Image | None, np.ndarray, bool]:
        """Execute `action` (clipped to [-1, 1]). Returns the next frame (`None` if not `render`), the state `[39]`
        and whether the task is solved in the new state."""
        if self.steps >= self.max_steps:
            raise RuntimeError(f"The episode already has max_steps={self.max_steps} steps; call reset() first.")
        obs, _, _, _, info = self.env.step(check_action(action))
        self.steps += 1
        return (self.render() if render else None), obs, bool(info["success"])

    def render(self) -> Image.Image:
        """The current frame, upright, `[image_size, image_size]` RGB. Raises `RuntimeError` if it is blank."""
        frame = self._render_array()
        low, high = int(frame.min()), int(frame.max())
        if high - low < MIN_PIXEL_RANGE:
            raise RuntimeError(
                f"Meta-World rendered a blank frame for task {self.task_name!r} (camera {self.camera_name!r}, every "
                f"pixel value within {low}..{high}): the OpenGL context does not work. Set MUJOCO_GL=egl (or osmesa) "
                "before anything imports mujoco, and close() an environment before creating the next one."
            )
        return Image.fromarray(np.ascontiguousarray(frame[::-1, ::-1]))

    def _render_array(self) -> np.ndarray:
        """`[H, W, 3]` uint8 as MuJoCo renders it (rolled by 180 degrees for the corner cameras)."""
        if self._viewer is None:
            self.env.render()  # makes the OpenGL context and the scene
            self._viewer = self.env.mujoco_renderer.viewer
            self._viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            self._viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._viewer.make_context_current()  # another environment freed since then may have released it
        return self.env.render()

    def close(self) -> None:
        """Free the OpenGL context now (an environment freed later, while another one renders, blanks its frames)."""
        self.env.close()
        self._viewer = None
        gc.collect()

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ScriptedPolicy(StatelessPolicy):
    """Meta-World's scripted experts: for each environment, the expert of the task its instruction names (any of the
    task's paraphrases in `TASK_INSTRUCTIONS`), reading the state vector only."""

    needs_image = False

    def __init__(self):
        self._experts = {}

    def select_actions(self, images: Sequence, instructions: Sequence[str], observations: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """`B` instructions and states `[39]` -> float32 `[B, 4]` (the images are not read)."""
        if observations is None or len(observations) != len(instructions):
            raise ValueError("The scripted expert acts on Meta-World's state vectors: pass one observation per environment.")
        with warnings.catch_warnings():  # the experts warn whenever their gains saturate an action
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
            return np.stack([check_action(self._expert(instruction).get_action(obs)) for instruction, obs in zip(instructions, observations)])

    def _expert(self, instruction: str):
        task = TASK_OF_INSTRUCTION.get(instruction)
        if task is None:
            raise ValueError(
                f"The scripted expert does not know the instruction {instruction!r}; give one of the paraphrases in "
                "TASK_INSTRUCTIONS, which name the task."
            )
        if task not in self._experts:
            self._experts[task] = ENV_POLICY_MAP[task]()
        return self._experts[task]


class RandomPolicy(StatelessPolicy):
    """Uniform actions in [-1, 1]^4 from one seeded stream, which goes on across episodes."""

    needs_image = False

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def select_actions(self, images: Sequence, instructions: Sequence[str], observations: Sequence | None = None) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, (len(instructions), ACTION_DIM)).astype(np.float32)


BASELINES = {"scripted": ScriptedPolicy, "random": RandomPolicy}


@dataclass
class Episode:
    """One rollout. `images[t]` is the frame the policy saw before `actions[t]`, the policy's action (see `action_noise`
    of `run_episode` for what was executed); `images` ends with the final frame (empty when not recorded).
    `success_step` is the number of steps until `info["success"]` first turned 1."""

    task: str
    instruction: str
    images: list[Image.Image] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    success_step: int | None = None

    @property
    def success(self) -> bool:
        return self.success_step is not None

    @property
    def num_steps(self) -> int:
        return len(self.actions)


def run_episode(
    env: MetaWorldEnv,
    variation: metaworld.Task,
    policy: Policy,
    instruction: str,
    steps_after_success: int | None = 0,
    record: bool = True,
    action_noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Episode:
    """Roll `policy` out on `variation` for at most `env.max_steps` steps: `run_episodes` with one environment."""
    return run_episodes([env], [variation], policy, [instruction], steps_after_success, [record], action_noise, rng)[0]


def run_episodes(
    envs: Sequence[MetaWorldEnv],
    variations: Sequence[metaworld.Task],
    policy: Policy,
    instructions: Sequence[str],
    steps_after_success: int | None = 0,
    record: Sequence[bool] | None = None,
    action_noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> list[Episode]:
    """Roll `policy` out on `envs` in lock-step, environment `i` on `variations[i]` with `instructions[i]`, for at
    most `max_steps` steps each. `policy.reset()` starts the episodes and `policy.drop` removes the environments
    whose episodes ended from its batch.

    Args:
        steps_after_success: steps taken after `info["success"]` first turns 1 before an episode stops (0: stop at
            once, as in evaluation); `None` runs all `max_steps` steps.
        record: per environment, keep every frame in `Episode.images` (default: all; otherwise only the actions, and
            frames are rendered only for a policy that needs them).
        action_noise: standard deviation of Gaussian noise (from `rng`) added to every action before it is executed
            (clipped to [-1, 1]). `Episode.actions` keeps the policy's own actions, so an expert rolled out with noise
            gives demonstrations of how to recover from states off its own path (DART, Laskey et al. 2017).
    """
    if action_noise < 0:
        raise ValueError(f"action_noise={action_noise} must be >= 0 (a standard deviation in action units).")
    if action_noise and rng is None:
        raise ValueError("Pass rng (a numpy Generator) with action_noise > 0, so the noise is reproducible.")
    record = [True] * len(envs) if record is None else list(record)
    if not len(envs) == len(variations) == len(instructions) == len(record):
        raise ValueError(
            f"Got {len(envs)} environments, {len(variations)} variations, {len(instructions)} instructions and "
            f"{len(record)} record flags; give one of each per environment."
        )
    needs_image = getattr(policy, "needs_image", True)
    images, observations, episodes = [], [], []
    for env, variation, instruction, recorded in zip(envs, variations, instructions, record):
        image, obs = env.reset(variation)
        images.append(image)
        observations.append(obs)
        episodes.append(Episode(env.task_name, instruction, [image] if recorded else []))
    policy.reset()
    active = list(range(len(envs)))
    while active:
        actions = np.asarray(policy.select_actions(
            [images[i] for i in active], [instructions[i] for i in active], [observations[i] for i in active]
        ))
        if actions.shape[:1] != (len(active),):
            raise ValueError(f"The policy returned {actions.shape} actions for {len(active)} environments; return one each.")
        finished = []
        for position, (i, action) in enumerate(zip(active, actions)):
            action = check_action(action)
            executed = action + rng.normal(0.0, action_noise, ACTION_DIM) if action_noise else action
            episode = episodes[i]
            images[i], observations[i], success = envs[i].step(executed, render=record[i] or needs_image)
            episode.actions.append(action)
            if record[i]:
                episode.images.append(images[i])
            if success and episode.success_step is None:
                episode.success_step = episode.num_steps
            stop = steps_after_success is not None and episode.success and (
                episode.num_steps >= episode.success_step + steps_after_success
            )
            if stop or envs[i].steps >= envs[i].max_steps:
                finished.append(position)
        if finished:
            policy.drop(finished)
        active = [i for position, i in enumerate(active) if position not in finished]
    return episodes
