"""Meta-World demonstrations and closed-loop evaluation (scripts/demos.py and scripts/evaluate.py with --env metaworld)."""

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering, before anything imports mujoco

import pytest  # noqa: E402

pytest.importorskip("metaworld", reason="Meta-World is an optional extra: pip install -e '.[metaworld]'")

import numpy as np  # noqa: E402
from conftest import make_model, make_processor  # noqa: E402
from demos import main as demos_main  # noqa: E402
from evaluate import main as evaluate_main  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_openvla import OpenVLAPolicy  # noqa: E402
from openvla_tools.envs.metaworld_demos import generate_metaworld_demonstrations  # noqa: E402
from openvla_tools.envs.metaworld_env import (  # noqa: E402
    DERIVED_CAMERAS,
    MT10_TASKS,
    TASK_INSTRUCTIONS,
    TRAIN_SEED,
    MetaWorldEnv,
    ScriptedPolicy,
    check_action,
    check_tasks,
    run_episode,
    task_variations,
)
from openvla_tools.lerobot_format import load_lerobot_dataset  # noqa: E402
from openvla_tools.metaworld_evaluation import evaluate_policy_on_tasks  # noqa: E402
from processing_openvla import compute_action_stats  # noqa: E402

TASK = "coffee-button-v3"  # the shortest expert episodes (~35 steps)
INSTRUCTION = TASK_INSTRUCTIONS[TASK][0]  # names the task for the scripted expert
METAWORLD_STATS = {"metaworld": compute_action_stats(np.random.default_rng(0).uniform(-1, 1, (100, 4)))}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    output = tmp_path_factory.mktemp("demos") / "metaworld"
    demos_main(["--env", "metaworld", "--tasks", TASK, "--episodes-per-task", "2", "--output", str(output), "--image-size", "64",
                "--image_storage", "image"])
    return output


def test_demonstrations_are_successful_expert_episodes(demos):
    dataset = load_lerobot_dataset(demos)  # written as a LeRobot dataset, read back by the reader finetune.py uses
    assert dataset.column_names == ["image", "instruction", "action", "episode", "step", "dataset_name"]
    assert set(dataset["episode"]) == {0, 1} and set(dataset["dataset_name"]) == {"metaworld"}
    assert set(dataset["instruction"]) <= set(TASK_INSTRUCTIONS[TASK])
    assert dataset[0]["image"].size == (64, 64) and np.asarray(dataset[0]["image"]).std() > 10
    stats = json.loads((demos / "stats.json").read_text())
    assert stats["tasks"][TASK]["episodes_successful"] == 2 and stats["overall"]["steps"] == len(dataset)
    assert len(stats["overall"]["action_stats"]["action"]["q99"]) == 4 and stats["wall_time_s"] > 0
    assert (demos / "preview.png").exists()

    episodes = np.asarray(dataset["episode"])
    actions = np.asarray(dataset["action"], dtype=np.float32)
    assert np.abs(actions).max() <= 1.0
    with MetaWorldEnv(TASK, image_size=64) as env:
        for episode, variation in enumerate(task_variations(TASK, TRAIN_SEED)[:2]):
            rows = np.flatnonzero(episodes == episode)
            assert list(np.asarray(dataset["step"])[rows]) == list(range(len(rows)))
            _, obs = env.reset(variation)
            expert, successes = ScriptedPolicy(), []
            for action in actions[rows]:  # the recorded actions are the expert's and solve the task
                np.testing.assert_allclose(action, expert.select_actions([None], [INSTRUCTION], [obs])[0], atol=1e-6)
                _, obs, success = env.step(action, render=False)
                successes.append(success)
            assert successes[-1] and not successes[0]


def test_demonstrations_use_the_variations_of_the_given_seeds():
    dataset = generate_metaworld_demonstrations([TASK], 1, image_size=64, variation_seeds=[2], progress=False)
    with MetaWorldEnv(TASK, image_size=64) as env:
        first_frames = [env.reset(task_variations(TASK, seed)[0])[0] for seed in (2, TRAIN_SEED)]
    np.testing.assert_array_equal(np.asarray(dataset[0]["image"]), np.asarray(first_frames[0]))
    assert not np.array_equal(np.asarray(first_frames[0]), np.asarray(first_frames[1]))
    for seeds, message in (([0, 1], "contains 1, the seed of the held-out"), ([0, 0], "repeats a seed"), ([], "non-empty")):
        with pytest.raises(ValueError, match=message):
            generate_metaworld_demonstrations([TASK], 1, variation_seeds=seeds, progress=False)


def test_scripted_policy_succeeds_on_held_out_variations():
    result = evaluate_policy_on_tasks(ScriptedPolicy(), [TASK], episodes_per_task=2, max_steps=80, image_size=64, progress=False)
    assert result["success"] == {TASK: 1.0} and result["mean_success"] == 1.0
    assert result["successes"] == {TASK: [True, True]} and 0 < result["mean_steps"][TASK] < 80


def test_evaluator_runs_a_saved_model_end_to_end(tokenizer, tmp_path, single_thread):
    folder = tmp_path / "model"
    make_model(tokenizer, action_dim=4, norm_stats=METAWORLD_STATS).save_pretrained(folder)
    make_processor(tokenizer).save_pretrained(folder)
    output = tmp_path / "eval"
    evaluate_main([
        "--env", "metaworld",
        "--model", str(folder), "--tasks", TASK, "--episodes-per-task", "2", "--max-steps", "60", "--image-size", "64",
        "--json", str(output / "eval.json"), "--plot", str(output / "eval.png"), "--strip", str(output / "eval.gif"),
    ])
    result = json.loads((output / "eval.json").read_text())
    assert result["policy"] == str(folder) and set(result["success"]) == {TASK}
    assert 0.0 <= result["mean_success"] <= 1.0 and len(result["successes"][TASK]) == 2
    assert set(result["baselines"]) == {"random", "scripted"}
    assert result["baselines"]["scripted"]["mean_success"] == 1.0
    assert result["instructions"][TASK] == TASK_INSTRUCTIONS[TASK][0]
    assert (output / "eval.png").stat().st_size > 0 and (output / "eval.gif").stat().st_size > 0
    video = Image.open(output / f"eval_{TASK}.gif")  # the rollout video of the task, next to the strip
    assert video.size == (2 * 64, 64 + 14) and video.n_frames > 2


class RecordingExpert(ScriptedPolicy):
    """The scripted expert, recording the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def select_actions(self, images, instructions, observations=None):
        self.batch_sizes.append(len(instructions))
        return super().select_actions(images, instructions, observations)


def test_lock_step_batches_end_each_episode_as_it_ends_alone(tmp_path):
    """Episodes stepped together give the results they give one at a time; a finished one leaves the policy's batch."""
    options = {"tasks": [TASK], "episodes_per_task": 3, "max_steps": 60, "image_size": 64, "progress": False}
    alone = evaluate_policy_on_tasks(ScriptedPolicy(), batch_size=1, **options)
    expert = RecordingExpert()
    together = evaluate_policy_on_tasks(expert, batch_size=2, strip_path=tmp_path / "strip.png", **options)
    assert together == alone and together["success"] == {TASK: 1.0}
    assert expert.batch_sizes[0] == 2 and expert.batch_sizes == sorted(expert.batch_sizes, reverse=True)
    assert sum(expert.batch_sizes) == round(3 * together["mean_steps"][TASK])  # no call for an episode that ended
    assert Image.open(tmp_path / "strip.png").height == 64 + 14
    assert Image.open(tmp_path / f"strip_{TASK}.gif").size == (2 * 64, 64 + 14)


def test_scripted_expert_reads_the_task_from_the_instruction():
    expert, variation = ScriptedPolicy(), task_variations(TASK, TRAIN_SEED)[0]
    with MetaWorldEnv(TASK, image_size=64) as env:
        _, obs = env.reset(variation)
        paraphrases = expert.select_actions([None] * 2, list(TASK_INSTRUCTIONS[TASK][:2]), [obs, obs])
        np.testing.assert_array_equal(paraphrases[0], paraphrases[1])
        with pytest.raises(ValueError, match="does not know the instruction 'make coffee'"):
            expert.select_actions([None], ["make coffee"], [obs])
        with pytest.raises(ValueError, match="one observation per environment"):
            expert.select_actions([None], [INSTRUCTION])


def test_chunked_model_replans_every_n_action_steps_or_every_step_when_ensembling(tokenizer, tmp_path, single_thread):
    model = make_model(tokenizer, action_dim=4, norm_stats=METAWORLD_STATS, action_decoding="parallel", action_chunk_size=4)
    queries = []
    model.register_forward_hook(lambda module, args, output: queries.append(1))
    variation = task_variations(TASK, TRAIN_SEED)[0]
    with MetaWorldEnv(TASK, image_size=64, max_steps=8) as env:
        for options, expected_queries in (({}, 2), ({"n_action_steps": 2}, 4), ({"n_action_steps": 1}, 8),
                                          ({"temporal_ensemble_coeff": 0.0}, 8)):
            queries.clear()
            policy = OpenVLAPolicy(model, make_processor(tokenizer), **options)
            episode = run_episode(env, variation, policy, TASK_INSTRUCTIONS[TASK][0])
            assert episode.num_steps == 8 and len(queries) == expected_queries
    with pytest.raises(ValueError, match="n_action_steps=5"):
        OpenVLAPolicy(model, make_processor(tokenizer), n_action_steps=5)
    with pytest.raises(ValueError, match="n_action_steps=2 applies to a model"):
        evaluate_main(["--env", "metaworld", "--model", "scripted", "--tasks", TASK, "--episodes-per-task", "1", "--json", str(tmp_path / "eval.json"),
                       "--n-action-steps", "2"])
    with pytest.raises(ValueError, match="temporal_ensemble_coeff=0.1 applies to a model"):
        evaluate_main(["--env", "metaworld", "--model", "random", "--tasks", TASK, "--episodes-per-task", "1", "--json", str(tmp_path / "eval.json"),
                       "--temporal-ensemble-coeff", "0.1"])
    assert not (tmp_path / "eval.json").exists()


def test_noisy_expert_episodes_keep_the_expert_actions():
    noise, variation, expert = 0.3, task_variations(TASK, TRAIN_SEED)[0], ScriptedPolicy()
    with MetaWorldEnv(TASK, image_size=64) as env:
        clean = run_episode(env, variation, expert, INSTRUCTION, record=False)
        noisy = run_episode(env, variation, expert, INSTRUCTION, record=False, action_noise=noise, rng=np.random.default_rng(7))
        assert clean.success and noisy.success  # the expert recovers from its perturbed path
        assert noisy.num_steps != clean.num_steps or not np.allclose(noisy.actions, clean.actions)

        replay_rng, (_, obs) = np.random.default_rng(7), env.reset(variation)
        for action in noisy.actions:  # each label is the expert's action in the state the noisy rollout reached
            np.testing.assert_allclose(action, expert.select_actions([None], [INSTRUCTION], [obs])[0], atol=1e-6)
            _, obs, _ = env.step(action + replay_rng.normal(0.0, noise, 4), render=False)
        with pytest.raises(ValueError, match="action_noise=-0.1 must be >= 0"):
            run_episode(env, variation, expert, INSTRUCTION, action_noise=-0.1, rng=np.random.default_rng(0))


def test_blank_frame_raises(monkeypatch):
    with MetaWorldEnv(TASK, image_size=64) as env:
        env.reset(task_variations(TASK, TRAIN_SEED)[0])
        monkeypatch.setattr(env.env, "render", lambda: np.zeros((64, 64, 3), np.uint8))  # a context gone bad
        with pytest.raises(RuntimeError, match=f"blank frame for task '{TASK}'.*MUJOCO_GL=egl"):
            env.step(np.zeros(4))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="known tasks are .*drawer-close-v3"):
        MetaWorldEnv("assembly-v3")
    with pytest.raises(ValueError, match="action_dim=4"):
        check_action(np.zeros(7))
    with pytest.raises(ValueError, match="NaN"):
        check_action([0.0, np.nan, 0.0, 0.0])
    np.testing.assert_array_equal(check_action([2, -3, 0.5, 1]), [1, -1, 0.5, 1])


def test_mt10_names_its_ten_tasks_whose_instructions_tell_them_apart():
    tasks = check_tasks(["mt10", "coffee-button-v3"])
    assert tasks[:10] == list(MT10_TASKS) and tasks[10] == "coffee-button-v3" and len(set(tasks)) == 11
    instructions = [text for task in tasks for text in TASK_INSTRUCTIONS[task]]
    assert len(set(instructions)) == len(instructions)  # each paraphrase names one task, for the expert and the model
    with pytest.raises(ValueError, match="repeat a task"):
        check_tasks(["mt10", "reach-v3"])


def test_wrong_instructions_make_a_policy_that_reads_them_fail():
    tasks = ["reach-v3", "window-open-v3"]  # the expert of either fails the other (not every pair does)
    settings = {"episodes_per_task": 2, "max_steps": 150, "image_size": 32, "progress": False}
    right = evaluate_policy_on_tasks(ScriptedPolicy(), tasks, **settings)
    wrong = evaluate_policy_on_tasks(ScriptedPolicy(), tasks, wrong_instructions=True, **settings)
    assert wrong["instructions"] == {"reach-v3": TASK_INSTRUCTIONS["window-open-v3"][0], "window-open-v3": TASK_INSTRUCTIONS["reach-v3"][0]}
    assert right["mean_success"] == 1.0 and wrong["mean_success"] == 0.0
    with pytest.raises(ValueError, match="at least two tasks"):
        evaluate_policy_on_tasks(ScriptedPolicy(), tasks[:1], wrong_instructions=True, **settings)


def test_topview_close_camera_magnifies_the_workspace():
    """The derived camera sees the same scene as `topview`, narrowed to the workspace: the button box is larger."""
    variation = task_variations("button-press-topdown-v3", TRAIN_SEED)[0]
    yellow_pixels = {}
    for camera in ("topview", "topview_close"):
        with MetaWorldEnv("button-press-topdown-v3", image_size=64, camera_name=camera) as env:
            frame = np.asarray(env.reset(variation)[0]).astype(int)
        yellow_pixels[camera] = int(((frame[..., 0] > 180) & (frame[..., 1] > 140) & (frame[..., 2] < 90)).sum())
    assert yellow_pixels["topview"] > 20
    # 45 -> 30 degrees of field of view: tan(22.5) / tan(15) = 1.55 times wider, 2.4 times the area
    assert 1.8 < yellow_pixels["topview_close"] / yellow_pixels["topview"] < 3.2
    with pytest.raises(ValueError, match="'topview_close', 'corner_close'"):
        MetaWorldEnv("button-press-topdown-v3", camera_name="overhead")


def test_corner_close_camera_is_the_middle_of_the_corner_view_enlarged():
    """`corner_close` is `corner` narrowed from the same place: its frame is the middle of `corner`'s, magnified."""
    variation = task_variations("push-v3", TRAIN_SEED)[0]
    with MetaWorldEnv("push-v3", image_size=256, camera_name="corner") as env:
        wide = env.reset(variation)[0]
    with MetaWorldEnv("push-v3", image_size=64, camera_name="corner_close") as env:
        close = np.asarray(env.reset(variation)[0]).astype(float)
    narrowed = np.tan(np.radians(DERIVED_CAMERAS["corner_close"].fovy / 2)) / np.tan(np.radians(45.0 / 2))  # corner: 45
    middle = 256 * narrowed  # the close camera's field of view, in pixels of the wide frame

    def crop_of_wide(side: float, shift: int = 0) -> np.ndarray:
        box = (128 - side / 2 + shift, 128 - side / 2, 128 + side / 2 + shift, 128 + side / 2)
        return np.asarray(wide.resize((64, 64), Image.BILINEAR, box=box)).astype(float)

    error = np.abs(close - crop_of_wide(middle)).mean()
    assert error < 12
    assert error < 0.5 * np.abs(close - crop_of_wide(256)).mean()
    assert error < 0.5 * np.abs(close - crop_of_wide(middle, shift=24)).mean()
