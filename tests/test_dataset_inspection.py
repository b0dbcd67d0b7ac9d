"""The dataset check (openvla_tools.dataset_inspection, scripts/inspect_dataset.py): each planted defect is found with
its evidence, a clean dataset reports nothing, a tiny one says it is too small, and the program writes its report for a
LeRobot folder (NaN included, which the training reader refuses) and rejects unknown cameras, episodes and datasets."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from openvla_tools.dataset_inspection import RecordedActions, inspect_actions
from openvla_tools.envs.tabletop import generate_demonstrations
from openvla_tools.lerobot_writer import write_lerobot_dataset

EPISODES, STEPS = 12, 25


def clean_actions(seed: int = 0) -> np.ndarray:
    """`[EPISODES, STEPS, 4]` smooth end-effector deltas around zero: each dimension a sine of its own phase and
    frequency per episode plus noise, scales 0.02-0.1 (one unit)."""
    rng = np.random.default_rng(seed)
    t = np.arange(STEPS)[None, :, None]
    phase = rng.uniform(0, 2 * np.pi, (EPISODES, 1, 4))
    frequency = rng.uniform(0.2, 0.5, (EPISODES, 1, 4))
    scale = np.array([0.05, 0.05, 0.1, 0.02])
    return scale * (np.sin(frequency * t + phase) + 0.1 * rng.normal(size=(EPISODES, STEPS, 4)))


def recording(actions: np.ndarray) -> RecordedActions:
    """`[episodes, steps, dims]` actions as a recording with one instruction per episode."""
    episodes, steps, dims = actions.shape
    return RecordedActions(
        actions.reshape(-1, dims),
        np.repeat(np.arange(episodes), steps),
        np.tile(np.arange(steps), episodes),
        [f"task {e % 3}" for e in range(episodes) for _ in range(steps)],
    )


def kinds(actions: np.ndarray, **options) -> dict[str, object]:
    return {finding.kind: finding for finding in inspect_actions(recording(actions), **options).findings}


def test_a_clean_dataset_reports_nothing():
    inspection = inspect_actions(recording(clean_actions()))
    assert inspection.findings == []
    assert [dim.kind for dim in inspection.dimensions] == ["continuous"] * 4
    assert all(dim.bins_used > 100 for dim in inspection.dimensions)


def test_idle_runs_at_the_start_of_episodes_are_found():
    actions = clean_actions()
    actions[:, :6] = 0.0  # the operator waited before moving
    found = kinds(actions)
    assert set(found) == {"idle_frames"}
    assert "12 of 12 episodes begin with an idle run" in found["idle_frames"].evidence
    assert "24%" in found["idle_frames"].title


def test_a_constant_and_a_binary_dimension_are_named():
    actions = clean_actions()
    gripper = np.where(np.arange(STEPS) < 15, -1.0, 1.0)[None, :, None].repeat(EPISODES, 0)
    actions = np.concatenate([actions, np.full((EPISODES, STEPS, 1), 0.25), gripper], axis=2)
    found = kinds(actions)
    assert set(found) == {"constant_dimension", "binary_dimension"}
    assert "[4]" in found["constant_dimension"].title and "0.25" in found["constant_dimension"].evidence
    binary = found["binary_dimension"]
    assert binary.title.startswith("Dimension 5 is binary (-1 or 1)") and binary.severity == "note"
    assert "normalised with q01/q99" in binary.evidence and "come back as [-1, 1]" in binary.evidence


def test_absolute_poses_are_told_from_deltas():
    deltas = clean_actions()
    poses = np.array([0.45, -0.1, 0.3]) + 0.1 * np.cumsum(deltas[..., :3], axis=1)  # positions in metres
    actions = np.concatenate([poses, deltas[..., 3:]], axis=2)
    found = kinds(actions)
    assert set(found) == {"absolute_actions"}
    assert found["absolute_actions"].title.startswith("Dimension(s) [0, 1, 2] look like absolute poses")


def test_a_dimension_in_another_unit_is_found():
    actions = clean_actions()
    actions[..., 2] *= 1000  # millimetres among metres
    found = kinds(actions)
    assert set(found) == {"unit_mismatch"}
    assert found["unit_mismatch"].title.startswith("Dimension 2's range is")


def test_nan_actions_are_reported_and_the_rest_still_checked():
    actions = clean_actions()
    actions[3, 7, 1] = np.nan
    found = kinds(actions)
    assert set(found) == {"nan"}
    assert "episode 3 frame 7" in found["nan"].evidence


def test_outliers_that_squeeze_q01_q99_leave_few_bins():
    actions = clean_actions()
    actions[..., 3] = 0.0
    actions[[1, 4, 6], 10, 3] = [0.5, 0.4, 0.3]  # spikes in 1% of the frames, and one the other way
    actions[2, 3, 3] = -0.3
    found = kinds(actions)
    assert set(found) == {"few_bins"}
    assert found["few_bins"].title.startswith("Dimension(s) [3] use fewer than 16 of 256 bins")
    assert "2 bins for 5 distinct values" in found["few_bins"].evidence


def test_duplicate_frames_and_short_episodes():
    actions = clean_actions()
    hashes = np.array([f"{e}-{t // 2}" for e in range(EPISODES) for t in range(STEPS)])  # every frame shown twice
    found = {f.kind: f for f in inspect_actions(recording(actions), chunk_size=30, frame_hashes=hashes).findings}
    assert set(found) == {"duplicate_frames", "short_episodes"}
    assert "shorter than an action chunk of 30" in found["short_episodes"].title


def test_a_tiny_dataset_says_it_is_too_small_instead_of_reporting_noise():
    actions = clean_actions()[:2, :5]
    actions[:, :3] = 0.0
    found = kinds(actions)
    assert set(found) == {"too_small"}
    assert "10 finite frames in 2 episode(s)" in found["too_small"].title


@pytest.fixture(scope="module")
def lerobot_with_nan(tmp_path_factory):
    """A LeRobot folder of 6 built-in demonstrations whose episode 2 has a NaN action (planted in the parquet, as the
    writer refuses NaN)."""
    folder = write_lerobot_dataset(generate_demonstrations(6, seed=0, image_size=56, progress=False), tmp_path_factory.mktemp("data") / "demos",
                                   fps=10, image_storage="image")
    data_file = next(folder.glob("data/*/*.parquet"))
    table = pq.read_table(data_file)
    actions = table.column("action").to_pylist()
    row = table.column("episode_index").to_pylist().index(2)
    actions[row][0] = float("nan")
    pq.write_table(table.set_column(table.schema.get_field_index("action"), "action", [actions]), data_file)
    return folder


def test_inspect_dataset_program_writes_the_report(lerobot_with_nan, tmp_path, capsys):
    import inspect_dataset

    inspect_dataset.main(["--dataset_name", str(lerobot_with_nan), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "6 episodes" in printed and "1 frame(s) hold NaN or inf actions" in printed
    report = (tmp_path / "report.md").read_text()
    assert "first at episode 2 frame 0" in report and "| 6 | binary |" in report
    assert (tmp_path / "actions.png").stat().st_size > 0 and (tmp_path / "frames.png").stat().st_size > 0


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--image_key", "observation.images.nope", "Camera 'observation.images.nope' is not in"),
        ("--episodes", "9", r"Episodes \[9\] are not in"),
        ("--dataset_name", "/no/such/folder", "neither a local folder or file nor a dataset on the Hub"),
    ],
)
def test_inspect_dataset_rejects_unknown_cameras_episodes_and_datasets(lerobot_with_nan, tmp_path, option, value, message):
    import inspect_dataset

    with pytest.raises(ValueError, match=message):
        inspect_dataset.main(["--dataset_name", str(lerobot_with_nan), option, value, "--out", str(tmp_path)])
