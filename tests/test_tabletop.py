"""Tests of the procedural tabletop task: demonstrations, environment, evaluation and ablations."""

import json
from dataclasses import replace

import datasets
import numpy as np
import pytest
from demos import main as demos_main
from evaluate import main as evaluate_main
from PIL import Image

from openvla_tools.envs.tabletop import (
    ACTION_DIM,
    COLORS,
    DIRECTIONS,
    MAX_STEP,
    MIN_OBJECT_DISTANCE,
    PUSH_DISTANCE,
    REACH_TEMPLATES,
    RandomPolicy,
    ScriptedPolicy,
    TabletopEnv,
    evaluate_policy,
    generate_demonstrations,
    locate_gripper,
    locate_objects,
    move_toward,
    parse_instruction,
    render_scene,
)
from openvla_tools.evaluation import StatelessPolicy, rollout_video_path
from openvla_tools.lerobot_format import load_lerobot_dataset


@pytest.fixture(scope="module")
def demos() -> datasets.Dataset:
    return generate_demonstrations(6, seed=0, progress=False)


class ImageBlindPolicy(StatelessPolicy):
    """Reads the instruction (and, generously, the gripper) but not where the objects
    are: it heads for the table centre, shifted by the push direction."""

    def select_actions(self, images, instructions, observations=None):
        actions = []
        for image, instruction in zip(images, instructions, strict=True):
            _, direction = parse_instruction(instruction)
            goal = np.array([0.5, 0.5])
            if direction is not None:
                goal = goal + PUSH_DISTANCE * np.asarray(DIRECTIONS[direction])
            actions.append(move_toward(locate_gripper(image), goal))
        return np.stack(actions)


class NearestObjectPolicy(StatelessPolicy):
    """Ignores the instruction: goes to the visible object nearest the gripper."""

    def select_actions(self, images, instructions, observations=None):
        actions = []
        for image in images:
            gripper = locate_gripper(image)
            positions = list(locate_objects(image).values())
            actions.append(move_toward(gripper, min(positions, key=lambda p: np.linalg.norm(p - gripper))))
        return np.stack(actions)


class FirstColourPolicy(StatelessPolicy):
    """Ignores the instruction: goes to the visible object whose colour comes first in the palette."""

    def select_actions(self, images, instructions, observations=None):
        actions = []
        for image in images:
            objects = locate_objects(image)
            actions.append(move_toward(locate_gripper(image), objects[next(c for c in COLORS if c in objects)]))
        return np.stack(actions)


class RecordingPolicy(ScriptedPolicy):
    """The scripted expert, recording the batch size of every call."""

    def __init__(self):
        self.batch_sizes = []

    def select_actions(self, images, instructions, observations=None):
        self.batch_sizes.append(len(images))
        return super().select_actions(images, instructions)


class WrongShapePolicy(StatelessPolicy):
    def select_actions(self, images, instructions, observations=None):
        return np.zeros((len(images), 6))


# ----------------------------------------------------------------------------------
# Demonstrations


def test_demonstration_columns_and_types(demos):
    assert demos.column_names == ["image", "instruction", "action", "episode", "step", "dataset_name"]
    assert isinstance(demos.features["image"], datasets.Image)
    assert demos.features["action"].feature.dtype == "float32"
    assert sorted(set(demos["episode"])) == list(range(6))
    assert set(demos["dataset_name"]) == {"tabletop"}
    row = demos[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (112, 112) and row["image"].mode == "RGB"
    assert isinstance(row["instruction"], str) and len(row["action"]) == ACTION_DIM

    episodes = np.array(demos["episode"])
    steps = np.array(demos["step"])
    actions = np.array(demos["action"])
    for episode in range(6):
        rows = episodes == episode
        assert list(steps[rows]) == list(range(rows.sum()))  # every step, in order
        assert len(set(np.array(demos["instruction"])[rows])) == 1
        assert list(actions[rows, 6]) == [0.0] * (rows.sum() - 1) + [1.0]  # the gripper closes at the goal
    assert np.all(actions[:, 2:6] == 0)
    assert np.all(np.linalg.norm(actions[:, :2], axis=1) <= MAX_STEP + 1e-6)


def test_demonstrations_are_deterministic(demos):
    again = generate_demonstrations(6, seed=0, progress=False)
    other = generate_demonstrations(6, seed=1, progress=False)
    raw = datasets.Image(decode=False)
    assert demos.cast_column("image", raw)["image"] == again.cast_column("image", raw)["image"]
    assert demos["action"] == again["action"] and demos["instruction"] == again["instruction"]
    assert demos["action"] != other["action"]


def test_demonstrations_replay_to_success(demos):
    env = TabletopEnv()
    for episode in range(6):
        actions = [a for a, e in zip(demos["action"], demos["episode"], strict=True) if e == episode]
        _, instruction = env.reset(seed=episode)
        assert instruction == demos["instruction"][demos["episode"].index(episode)]
        for action in actions:
            env.step(np.array(action))
        assert env.done and env.success


def test_generation_options():
    demos = generate_demonstrations(2, image_size=64, num_objects=2, dataset_name="mini", progress=False)
    assert demos[0]["image"].size == (64, 64)
    assert set(demos["dataset_name"]) == {"mini"}


# ----------------------------------------------------------------------------------
# Environment


def test_reset_samples_a_valid_scene():
    env = TabletopEnv(seed=3)
    for seed in range(30):
        image, instruction = env.reset(seed)
        assert image.size == (112, 112) and instruction == env.instruction
        colors = [obj.color for obj in env.objects]
        assert len(set(colors)) == len(colors) == 3
        positions = [obj.position for obj in env.objects]
        assert min(np.linalg.norm(p - q) for i, p in enumerate(positions) for q in positions[:i]) >= MIN_OBJECT_DISTANCE
        target = env.task.target
        assert target.name in instruction
        assert parse_instruction(instruction) == (target.color, env.task.direction)
        direction = env.task.direction
        offset = np.zeros(2) if direction is None else PUSH_DISTANCE * np.asarray(DIRECTIONS[direction])
        np.testing.assert_allclose(env.goal, target.position + offset)
        assert np.all((0 <= env.goal) & (env.goal <= 1))
        assert np.linalg.norm(env.gripper - env.goal) > env.success_radius


def test_reset_is_deterministic():
    first, second = TabletopEnv(), TabletopEnv(seed=99)
    image_a, instruction_a = first.reset(seed=7)
    image_b, instruction_b = second.reset(seed=7)
    assert instruction_a == instruction_b
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
    assert np.array_equal(first.gripper, second.gripper)
    # without a seed, reset continues the generator seeded in the constructor
    assert TabletopEnv(seed=5).reset()[1] == TabletopEnv(seed=5).reset()[1]


def test_image_changes_when_gripper_moves():
    env = TabletopEnv()
    before, _ = env.reset(seed=0)
    after, _, _ = env.step(env.expert_action())
    assert not np.array_equal(np.asarray(before), np.asarray(after))
    np.testing.assert_allclose(locate_gripper(after), env.gripper, atol=0.01)


def test_image_shows_object_colours():
    env = TabletopEnv()
    image, _ = env.reset(seed=1)
    for obj in env.objects:
        x, y = (obj.position[0] * 112, (1 - obj.position[1]) * 112)
        if np.linalg.norm(obj.position - env.gripper) > 0.15:  # not under the gripper marker
            assert tuple(np.asarray(image)[int(y), int(x)]) == COLORS[obj.color]
    recoloured = [replace(env.objects[0], color=next(c for c in COLORS if c not in {o.color for o in env.objects}))]
    recoloured += env.objects[1:]
    other = render_scene(recoloured, env.gripper)
    assert not np.array_equal(np.asarray(image), np.asarray(other))
    assert set(locate_objects(other)) == {obj.color for obj in recoloured}


def test_step_moves_at_most_max_step_and_stays_on_table():
    env = TabletopEnv()
    env.reset(seed=2)
    start = env.gripper.copy()
    env.step(np.array([5.0, 0, 0, 0, 0, 0, 0]))
    np.testing.assert_allclose(np.linalg.norm(env.gripper - start), min(MAX_STEP, 1 - start[0]), atol=1e-9)
    for _ in range(15):
        if not env.done:
            env.step(np.array([-1.0, -1.0, 0, 0, 0, 0, 0]))
    assert np.all((0 <= env.gripper) & (env.gripper <= 1))


def test_episode_ends_after_max_steps():
    env = TabletopEnv(max_steps=3)
    env.reset(seed=0)
    results = [env.step(np.zeros(ACTION_DIM))[1:] for _ in range(3)]
    assert results == [(False, False), (False, False), (True, False)]


def test_step_after_done_raises():
    env = TabletopEnv()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(ACTION_DIM))
    env.reset(seed=0)
    while not env.done:
        env.step(env.expert_action())
    assert env.success
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.expert_action())


def test_wrong_action_shape_raises():
    env = TabletopEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"\(6,\)"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match=r"\(1, 7\)"):
        env.step(np.zeros((1, 7)))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.full(ACTION_DIM, np.nan))


@pytest.mark.parametrize("task_kinds", [("reach",), ("push",)])
def test_task_kinds_limit_the_goals(task_kinds):
    env = TabletopEnv(task_kinds=task_kinds)
    reach_prefixes = tuple(template.split("{")[0] for template in REACH_TEMPLATES)
    for seed in range(40):
        env.reset(seed)
        reaching = env.task.direction is None
        assert reaching == (task_kinds == ("reach",))
        assert env.instruction.startswith(reach_prefixes) == reaching
        assert np.allclose(env.goal, env.task.target.position) == reaching


def test_both_task_kinds_are_the_default_and_sample_all_five_goals():
    default, both = TabletopEnv(), TabletopEnv(task_kinds=("push", "reach"))
    directions = set()
    for seed in range(60):
        default.reset(seed), both.reset(seed)
        assert default.instruction == both.instruction
        directions.add(default.task.direction)
    assert directions == {None, *DIRECTIONS}


@pytest.mark.parametrize("task_kinds", [(), ("reach", "throw"), "reach"])
def test_unknown_task_kinds_raise(task_kinds):
    with pytest.raises(ValueError, match="task_kinds must be a non-empty subset"):
        TabletopEnv(task_kinds=task_kinds)


def test_too_many_objects_raises():
    with pytest.raises(ValueError, match="num_objects"):
        TabletopEnv(num_objects=len(COLORS) + 1)


# ----------------------------------------------------------------------------------
# Evaluation: the expert solves the task; policies blind to either modality fail


def test_expert_policy_solves_task():
    result = evaluate_policy(ScriptedPolicy(), 20, progress=False)
    assert result["success_rate"] == 1.0 and result["successes"] == [True] * 20
    assert result["num_episodes"] == 20 and 1 < result["mean_steps"] < 15


def test_expert_policy_solves_reach_only_episodes():
    assert evaluate_policy(ScriptedPolicy(), 20, progress=False, task_kinds=("reach",))["success_rate"] == 1.0


def test_random_policy_fails():
    result = evaluate_policy(RandomPolicy(seed=0), 50, progress=False)
    assert result["success_rate"] < 0.3


def test_image_blind_policy_fails():
    assert evaluate_policy(ImageBlindPolicy(), 50, progress=False)["success_rate"] < 0.5


@pytest.mark.parametrize("policy", [NearestObjectPolicy, FirstColourPolicy])
def test_instruction_blind_policy_fails(policy):
    assert evaluate_policy(policy(), 50, progress=False)["success_rate"] < 0.5


def test_batched_evaluation_matches_unbatched():
    recording_policy = RecordingPolicy()
    batch_sizes = recording_policy.batch_sizes
    batched = evaluate_policy(recording_policy, 7, batch_size=3, progress=False)
    assert batch_sizes[0] == 3 and max(batch_sizes) == 3
    unbatched = evaluate_policy(ScriptedPolicy(), 7, progress=False)
    assert batched == unbatched


def test_finished_envs_drop_out_of_the_batch():
    recording_policy = RecordingPolicy()
    batch_sizes = recording_policy.batch_sizes
    result = evaluate_policy(recording_policy, 8, progress=False)
    assert batch_sizes[0] == 8 and batch_sizes == sorted(batch_sizes, reverse=True)
    assert sum(batch_sizes) == result["mean_steps"] * 8


def test_policy_with_wrong_output_shape_raises():
    with pytest.raises(ValueError, match=r"\(4, 7\)"):
        evaluate_policy(WrongShapePolicy(), 4, progress=False)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_strip_is_written(tmp_path, batch_size):
    path = tmp_path / "strips" / "expert.png"
    evaluate_policy(ScriptedPolicy(), 5, batch_size=batch_size, progress=False, strip_path=path, strip_episodes=3)
    strip = Image.open(path)
    assert strip.height == 3 * (112 + 14) and strip.width % 112 == 0


def test_rollout_video_per_task_kind(tmp_path):
    """Next to the strip, one GIF per task kind: its first episodes side by side, one frame per step."""
    path = tmp_path / "expert.png"
    result = evaluate_policy(ScriptedPolicy(), 12, batch_size=5, progress=False, strip_path=path, video_episodes=2)
    assert set(result["task_success"]) == {"reach", "push"} and result["task_success"]["push"] == 1.0
    for kind in ("reach", "push"):
        video = Image.open(rollout_video_path(path, kind))
        assert video.format == "GIF" and video.size == (2 * 112, 112 + 14)
        assert 3 <= video.n_frames <= 1 + 20  # the first observation, then one frame per step of the longest episode
        first = np.asarray(video.convert("RGB"))
        video.seek(video.n_frames - 1)
        assert not np.array_equal(first, np.asarray(video.convert("RGB")))  # the grippers moved


def test_cli_writes_dataset_and_preview(tmp_path, capsys):
    demos_main(["--env", "tabletop", "--episodes", "3", "--output", str(tmp_path / "demos")])  # a LeRobot dataset
    assert len(load_lerobot_dataset(tmp_path / "demos")) > 3
    demos_main(["--env", "tabletop", "--episodes", "3", "--format", "datasets", "--output", str(tmp_path / "plain")])
    assert len(datasets.load_from_disk(str(tmp_path / "plain"))) > 3
    assert Image.open(tmp_path / "demos" / "preview.png").height == 3 * (112 + 14)
    assert "3 episodes" in capsys.readouterr().out


def test_evaluate_cli_runs_the_scripted_expert_with_a_table_per_task(tmp_path, capsys):
    evaluate_main(["--env", "tabletop", "--model", "scripted", "--episodes", "6", "--batch_size", "4",
                   "--json", str(tmp_path / "eval.json"), "--strip", str(tmp_path / "strip.png")])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result) == {"model", "random", "settings"}  # the expert is the evaluated policy here
    assert result["model"]["success_rate"] == 1.0 and result["model"]["num_episodes"] == 6
    assert result["settings"]["model"] == "scripted" and result["settings"]["unnorm_key"] is None
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["task"] == ["model", "random"] and rows["all"][0] == "100.0%"
    assert set(rows) >= {"reach", "push"}
    assert all(rollout_video_path(tmp_path / "strip.png", kind).exists() for kind in ("reach", "push"))
    with pytest.raises(ValueError, match="n_action_steps=2 applies to a model"):
        evaluate_main(["--env", "tabletop", "--model", "random", "--n_action_steps", "2"])
