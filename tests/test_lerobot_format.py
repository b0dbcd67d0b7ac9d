"""LeRobot datasets in and out: the reader on fixtures written by LeRobot 0.4.4 itself (v3.0 with AV1 mp4 cameras,
v3.0 with images in the parquet) and a v2.1 folder with H.264 mp4 cameras (tests/fixtures/make_lerobot_fixtures.py),
every bad input, the Hub path of `huggingface_hub` on an offline cache, and the writer's round trip."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY

pytest.importorskip("av", reason="LeRobot video needs the video extra: pip install -e '.[video]'")

from openvla_tools import lerobot_format  # noqa: E402
from openvla_tools.lerobot_format import (  # noqa: E402
    load_lerobot_dataset,
    parse_episodes,
    resolve_lerobot_dataset,
    warn_if_lerobot_quantiles_disagree,
)
from openvla_tools.lerobot_writer import write_lerobot_dataset  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lerobot"
EXPECTED = np.load(FIXTURES / "expected.npz")
TOP, WRIST = "observation.images.top", "observation.images.wrist"
TASKS = ("pick up the red block", "push the blue block left")
# Mean absolute pixel error allowed for mp4 frames (the 64x64 fixtures at LeRobot's crf 30 decode within ~3).
VIDEO_MEAN_ERROR = 8.0


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "datasets_cache")


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def episode_arrays(rows, episode: int) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    picked = [row for row in rows if row["episode"] == episode]
    images = np.stack([np.asarray(row["image"]) for row in picked]).astype(np.int64)
    actions = np.asarray([row["action"] for row in picked], dtype=np.float32)
    return images, actions, [row["instruction"] for row in picked], [row["step"] for row in picked]


def assert_matches_source(rows, camera: int, exact: bool) -> None:
    """Every episode's frames are the source frames (each decoded frame closest to its own source frame) and the
    actions and instructions are identical."""
    assert sorted(set(rows["episode"])) == [0, 1, 2]
    for episode in range(3):
        images, actions, instructions, steps = episode_arrays(rows, episode)
        source = EXPECTED[f"frames_{episode}_{camera}"].astype(np.int64)
        np.testing.assert_array_equal(actions, EXPECTED[f"actions_{episode}"])
        assert instructions == [TASKS[episode % 2]] * len(source)
        assert steps == list(range(len(source)))
        if exact:
            np.testing.assert_array_equal(images, source)
            continue
        errors = np.abs(images[:, None] - source[None]).mean(axis=(2, 3, 4))  # [decoded, source]
        assert errors.diagonal().max() < VIDEO_MEAN_ERROR
        np.testing.assert_array_equal(errors.argmin(axis=1), np.arange(len(source)))


@pytest.mark.parametrize(
    "name, camera, index, exact",
    [("v30_video", TOP, 0, False), ("v30_video", WRIST, 1, False), ("v30_image", None, 0, True), ("v21_video", WRIST, 1, False)],
)
def test_reads_lerobot_fixtures(name, camera, index, exact, cache):
    rows = load_lerobot_dataset(FIXTURES / name, image_key=camera, cache_dir=cache)
    assert len(rows) == 21 and set(rows["dataset_name"]) == {name}
    assert rows.column_names == ["image", "instruction", "action", "episode", "step", "dataset_name"]
    assert_matches_source(rows, index, exact)


def test_frames_are_decoded_once_then_read_from_the_datasets_cache(cache, monkeypatch):
    first = load_lerobot_dataset(FIXTURES / "v30_video", image_key=TOP, cache_dir=cache)

    def fail(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(lerobot_format.VideoFrameDecoder, "decode", fail)
    second = load_lerobot_dataset(FIXTURES / "v30_video", image_key=TOP, cache_dir=cache)
    assert second.cache_files == first.cache_files
    np.testing.assert_array_equal(np.asarray(second[5]["image"]), np.asarray(first[5]["image"]))


def test_episode_selection(cache):
    assert parse_episodes("0-2,5,4") == [0, 1, 2, 4, 5]
    assert parse_episodes(None) is None
    rows = load_lerobot_dataset(FIXTURES / "v30_video", image_key=TOP, episodes=[2, 0], cache_dir=cache)
    assert sorted(set(rows["episode"])) == [0, 2] and len(rows) == 6 + 7
    images, actions, _, _ = episode_arrays(rows, 2)
    np.testing.assert_array_equal(actions, EXPECTED["actions_2"])
    with pytest.raises(ValueError, match=r"Episodes \[3, 7\] are not in .*whose episodes are 0-2"):
        load_lerobot_dataset(FIXTURES / "v30_video", image_key=TOP, episodes=[0, 3, 7], cache_dir=cache)
    with pytest.raises(ValueError, match="'3-1'"):
        parse_episodes("0,3-1")


def test_hub_repo_id_goes_through_snapshot_download_offline(tmp_path, cache):
    """A Hub id is resolved by `huggingface_hub.snapshot_download`; offline it finds the dataset in the Hub cache."""
    hub_cache = tmp_path / "hub"
    commit = "0" * 40
    repo = hub_cache / "datasets--openvla-fixtures--v30_video"
    shutil.copytree(FIXTURES / "v30_video", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    root = resolve_lerobot_dataset("openvla-fixtures/v30_video", TOP, cache_dir=hub_cache)
    assert root == repo / "snapshots" / commit
    assert len(load_lerobot_dataset(root, TOP, cache_dir=cache)) == 21
    with pytest.raises(ValueError, match="pick one with --image_key"):
        resolve_lerobot_dataset("openvla-fixtures/v30_video", cache_dir=hub_cache)
    assert resolve_lerobot_dataset("openvla-fixtures/not-cached", cache_dir=hub_cache) is None
    assert resolve_lerobot_dataset(str(tmp_path)) is None  # a folder that is not a LeRobot dataset


def test_lerobot_quantiles_are_compared_with_the_data(caplog, cache):
    with caplog.at_level(logging.WARNING, logger=lerobot_format.__name__):
        load_lerobot_dataset(FIXTURES / "v30_video", image_key=TOP, cache_dir=cache)
    assert "meta/stats.json's action q01/q99 differ" in caplog.text  # LeRobot 0.4.4's aggregated quantiles
    actions = np.random.default_rng(0).uniform(-1, 1, size=(200, 2))
    own = {"q01": np.quantile(actions, 0.01, axis=0).tolist(), "q99": np.quantile(actions, 0.99, axis=0).tolist()}
    assert not warn_if_lerobot_quantiles_disagree(own, actions, "own")
    assert warn_if_lerobot_quantiles_disagree({**own, "q01": [-0.33, -0.33]}, actions, "shrunk")


def rewrite_v21_actions(root: Path, episode: int, actions: list[list[float]]) -> None:
    """Store every episode's actions as variable-length lists, episode `episode`'s replaced by `actions`."""
    for index in range(3):
        path = root / f"data/chunk-000/episode_{index:06d}.parquet"
        table = pq.read_table(path)
        values = actions if index == episode else EXPECTED[f"actions_{index}"].tolist()
        table = table.set_column(table.column_names.index("action"), "action", pa.array(values, type=pa.list_(pa.float32())))
        pq.write_table(table, path)


def test_bad_inputs_raise_value_errors_naming_the_value(tmp_path, cache):
    with pytest.raises(ValueError, match="no meta/info.json"):
        (tmp_path / "empty" / "meta").mkdir(parents=True)
        resolve_lerobot_dataset(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no meta/info.json"):
        load_lerobot_dataset(tmp_path / "empty", cache_dir=cache)

    old = copy_fixture("v21_video", tmp_path)
    info = json.loads((old / "meta" / "info.json").read_text())
    (old / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v2.0"}))
    with pytest.raises(ValueError, match=r"codebase_version 'v2.0'.*convert_dataset_v21_to_v30"):
        load_lerobot_dataset(old, cache_dir=cache)

    with pytest.raises(ValueError, match=r"Camera 'observation.images.side' is not in .*\['observation.images.top', 'observation.images.wrist'\]"):
        load_lerobot_dataset(FIXTURES / "v30_video", image_key="observation.images.side", cache_dir=cache)
    with pytest.raises(ValueError, match=r"has cameras \['observation.images.top', 'observation.images.wrist'\]; pick one with --image_key"):
        load_lerobot_dataset(FIXTURES / "v30_video", cache_dir=cache)
    with pytest.raises(ValueError, match="Action key 'actions' is not a feature"):
        load_lerobot_dataset(FIXTURES / "v30_image", action_key="actions", cache_dir=cache)


def test_bad_videos_name_the_file_and_episode_and_leave_nothing_cached(tmp_path, cache):
    missing = copy_fixture("v21_video", tmp_path / "a")
    (missing / "videos/chunk-000/observation.images.top/episode_000002.mp4").unlink()
    with pytest.raises(ValueError, match=r"Episode 2: the video 'videos/chunk-000/observation.images.top/episode_000002.mp4'.*missing"):
        load_lerobot_dataset(missing, image_key=TOP, cache_dir=cache)

    unreadable = copy_fixture("v21_video", tmp_path / "b")
    (unreadable / "videos/chunk-000/observation.images.top/episode_000001.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"Episode 1: cannot open the video .*episode_000001.mp4"):
        load_lerobot_dataset(unreadable, image_key=TOP, cache_dir=cache)

    short = copy_fixture("v21_video", tmp_path / "c")
    videos = short / "videos/chunk-000/observation.images.top"
    shutil.copy(videos / "episode_000000.mp4", videos / "episode_000001.mp4")  # 6 frames for an 8-frame episode
    for _ in range(2):  # nothing half-written: the second attempt fails the same way
        with pytest.raises(ValueError, match=r"Episode 1: the video .*episode_000001.mp4' has no frame at 0.600 s.*shorter than the episode"):
            load_lerobot_dataset(short, image_key=TOP, cache_dir=cache)
    assert not list(Path(cache).rglob("*.arrow"))


def test_bad_actions_name_the_episode_and_frame(tmp_path, cache):
    wrong_length = copy_fixture("v21_video", tmp_path / "a")
    actions = EXPECTED["actions_1"].tolist()
    actions[3] = actions[3][:6]
    rewrite_v21_actions(wrong_length, 1, actions)
    with pytest.raises(ValueError, match=r"Episode 1 frame 3: 'action' has 6 values where meta/info.json declares 7"):
        load_lerobot_dataset(wrong_length, image_key=TOP, cache_dir=cache)

    with_nan = copy_fixture("v21_video", tmp_path / "b")
    actions = EXPECTED["actions_2"].tolist()
    actions[4][2] = float("nan")
    rewrite_v21_actions(with_nan, 2, actions)
    with pytest.raises(ValueError, match=r"Episode 2 frame 4: 'action' holds NaN"):
        load_lerobot_dataset(with_nan, image_key=TOP, cache_dir=cache)


@pytest.fixture(scope="module")
def demonstrations():
    from openvla_tools.envs.tabletop import generate_demonstrations

    return generate_demonstrations(4, seed=0, image_size=64, progress=False)


@pytest.mark.parametrize("storage", ["video", "image"])
def test_writer_round_trip(demonstrations, storage, tmp_path, cache):
    root = write_lerobot_dataset(demonstrations, tmp_path / "demos", fps=10, image_storage=storage)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 4 and info["total_frames"] == len(demonstrations)
    assert {"timestamp", "frame_index", "episode_index", "index", "task_index"} <= set(info["features"])
    assert info["features"]["observation.images.main"]["dtype"] == storage
    rows = load_lerobot_dataset(root, cache_dir=cache)
    np.testing.assert_array_equal(np.asarray(rows["action"], np.float32), np.asarray(demonstrations["action"], np.float32))
    assert rows["instruction"] == demonstrations["instruction"]
    written = np.stack([np.asarray(image) for image in rows["image"]]).astype(np.int64)
    source = np.stack([np.asarray(image.convert("RGB")) for image in demonstrations["image"]]).astype(np.int64)
    if storage == "image":
        np.testing.assert_array_equal(written, source)
    else:
        assert np.abs(written - source).mean() < 2.0


def test_writer_refuses_bad_input_and_writes_nothing(demonstrations, tmp_path):
    with pytest.raises(ValueError, match="--image_storage 'png' is not one of"):
        write_lerobot_dataset(demonstrations, tmp_path / "a", fps=10, image_storage="png")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        write_lerobot_dataset(demonstrations, tmp_path / "full", fps=10)
    actions = [list(action) for action in demonstrations["action"]]
    actions[5][0] = float("nan")
    bad = demonstrations.remove_columns("action").add_column("action", actions)
    with pytest.raises(ValueError, match="Row 5 of 'action' holds NaN"):
        write_lerobot_dataset(bad, tmp_path / "b", fps=10)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["full"]


def test_a_writer_that_loses_the_race_to_another_process_keeps_the_winners_dataset(demonstrations, tmp_path, monkeypatch):
    """Two runs (or two processes of `accelerate launch`) writing the same built-in demonstrations at once: the one
    that finishes second gets FileExistsError, the dataset written first stays whole, and no staging folder is left."""
    from openvla_tools import lerobot_writer

    winner = write_lerobot_dataset(demonstrations, tmp_path / "winner", fps=10, image_storage="image")
    finish = lerobot_writer._V30Writer.finish

    def finish_after_the_other_process(self, *args):
        finish(self, *args)
        shutil.copytree(winner, tmp_path / "demos")

    monkeypatch.setattr(lerobot_writer._V30Writer, "finish", finish_after_the_other_process)
    with pytest.raises(FileExistsError, match="written by another process"):
        write_lerobot_dataset(demonstrations, tmp_path / "demos", fps=10, image_storage="image")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demos", "winner"]
    assert sorted(path.name for path in (tmp_path / "demos").iterdir()) == sorted(path.name for path in winner.iterdir())


# scripts/finetune.py and scripts/demos.py on LeRobot data.
TRAIN = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_split_ratio", "0.34", "--eval_steps", "2",
         "--vision_pretraining_steps", "2", "--config_overrides", ",".join(f"{k}={v}" for k, v in TINY.items() if k != "image_size")]


@pytest.mark.parametrize("name", ["v30_video", "v21_video"])
def test_finetune_trains_from_a_lerobot_folder_with_statistics_of_its_training_episodes(name, tmp_path):
    import finetune

    output = tmp_path / "out"
    metrics = finetune.main(["--dataset_name", str(FIXTURES / name), "--image_key", WRIST, "--output_dir", str(output), *TRAIN])
    assert metrics["train_steps"] == 2 and "eval_action_accuracy" in metrics
    stats = json.loads((output / "config.json").read_text())["norm_stats"][name]
    lengths = {21 - 6: (1, 2), 21 - 8: (0, 2), 21 - 7: (0, 1)}  # training rows -> training episodes
    train_actions = np.concatenate([EXPECTED[f"actions_{e}"] for e in lengths[stats["num_transitions"]]]).astype(np.float64)
    np.testing.assert_allclose(stats["action"]["q01"], np.quantile(train_actions, 0.01, axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["action"]["max"], train_actions.max(axis=0), rtol=1e-6)


def test_demos_write_lerobot_and_finetune_mixes_it_with_another_dataset(tmp_path):
    import demos
    import finetune

    demos.main(["--env", "tabletop", "--episodes", "3", "--image-size", "64", "--format", "lerobot", "--image_storage", "image", "--output", str(tmp_path / "demos")])
    info = json.loads((tmp_path / "demos" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["features"]["observation.images.main"]["dtype"] == "image"
    output = tmp_path / "out"
    names = f"{tmp_path / 'demos'},{FIXTURES / 'v21_video'}"
    finetune.main(["--dataset_name", names, "--dataset_weights", "1,3", "--image_key", f",{TOP}", "--output_dir", str(output), *TRAIN])
    config = json.loads((output / "config.json").read_text())
    assert {"demos", "v21_video"} <= set(config["norm_stats"])
    assert config["norm_stats"]["v21_video"]["num_transitions"] < 21


def test_image_key_must_exist_in_every_lerobot_dataset_of_a_mix(tmp_path):
    import finetune

    with pytest.raises(ValueError, match=r"Camera 'observation.images.wrist' is not in .*v30_image"):
        finetune.main(["--dataset_name", f"{FIXTURES / 'v21_video'},{FIXTURES / 'v30_image'}", "--image_key", WRIST, "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"--image_key 'a,b,c' names 3 cameras for the 2 datasets"):
        finetune.main(["--dataset_name", "x,y", "--image_key", "a,b,c", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="--image_key and --episodes select from LeRobot datasets"):
        finetune.main(["--dataset_name", str(tmp_path), "--episodes", "0-1", "--output_dir", str(tmp_path / "out")])


def test_dataset_weights_sample_each_dataset_in_proportion():
    import finetune

    names = ["a"] * 10 + ["b"] * 30
    np.testing.assert_array_equal(finetune.mixture_rows(names, None, seed=0), np.arange(40))
    rows = finetune.mixture_rows(names, "1,1", seed=0)
    assert len(rows) == 40 and (rows < 10).sum() == 20 and np.bincount(rows[rows < 10]).tolist() == [2] * 10
    with pytest.raises(ValueError, match=r"needs 2 positive numbers, one for each of \['a', 'b'\]"):
        finetune.mixture_rows(names, "1,2,3", seed=0)
