"""Open-loop replay (openvla_tools.open_loop and `evaluate.py --open_loop`): a tiny model trained to fit three
episodes reproduces their recorded actions, a fourth (held out) it has not seen gives it away as over-fit, an
untrained one is flagged as under-fit, and bad episodes, cameras and datasets are clear errors."""

import json
import os
import subprocess
import sys

import datasets
import finetune
import numpy as np
import pytest
import torch
from conftest import INSTRUCTIONS, REPO, TOKENIZER_DIR, make_model, random_images

from openvla_tools.envs.tabletop import demonstration_features
from openvla_tools.lerobot_writer import write_lerobot_dataset
from openvla_tools.open_loop import (
    FIT_L1,
    EpisodeReplay,
    fit_verdict,
    replay_episodes,
    replay_for_model_card,
    replay_metrics,
    run_open_loop,
)
from processing_openvla import ActionTokenizer, OpenVLAImageProcessor, OpenVLAProcessor, compute_action_stats

NUM_EPISODES, STEPS, ACTION_DIM, NUM_BINS = 4, 4, 3, 32
SPLIT = {"eval_split_ratio": 0.25, "seed": 0}  # finetune.split_dataset's: holds out one of the four episodes


def tiny_rows() -> datasets.Dataset:
    """Four episodes of four steps: random images, two continuous dimensions of different scales and a +-1 gripper."""
    rng = np.random.default_rng(0)
    count = NUM_EPISODES * STEPS
    actions = np.c_[rng.uniform(-0.1, 0.1, count), rng.uniform(-2.0, 2.0, count), rng.choice([-1.0, 1.0], count)]
    return datasets.Dataset.from_dict(
        {
            "image": random_images(count, seed=1, size=(56, 56)),
            "instruction": [INSTRUCTIONS[e % len(INSTRUCTIONS)] for e in range(NUM_EPISODES) for _ in range(STEPS)],
            "action": actions.astype(np.float32).tolist(),
            "episode": np.repeat(np.arange(NUM_EPISODES), STEPS).tolist(),
            "step": np.tile(np.arange(STEPS), NUM_EPISODES).tolist(),
            "dataset_name": ["tiny"] * count,
        },
        features=demonstration_features(ACTION_DIM),
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, single_thread):
    """`(rows, training episodes, held-out episode, model, processor, saved folder)`: a tiny model trained on the
    training episodes of finetune's split until it reproduces them, saved as a Hub folder."""
    from transformers import AutoTokenizer

    rows = tiny_rows()
    data_args = finetune.DataArguments(eval_split_ratio=SPLIT["eval_split_ratio"])
    train_rows, held_out_rows = finetune.split_dataset(rows, data_args, SPLIT["seed"])
    actions = np.asarray(train_rows["action"], dtype=np.float64)
    stats = {"tiny": compute_action_stats(actions)}
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = make_model(tokenizer, action_dim=ACTION_DIM, action_decoding="parallel", num_action_bins=NUM_BINS, norm_stats=stats)
    processor = OpenVLAProcessor.from_model_config(model.config, OpenVLAImageProcessor(image_size=model.config.image_size), tokenizer)
    batch = processor(images=list(train_rows["image"]), text=list(train_rows["instruction"]), actions=actions, dataset_name="tiny")
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    folder = tmp_path_factory.mktemp("open_loop") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    training = sorted(set(train_rows["episode"]))
    return rows, training, int(held_out_rows[0]["episode"]), model, processor, folder


def test_replay_of_the_training_episodes_matches_the_recorded_actions(fitted, tmp_path):
    rows, training, _, model, processor, _ = fitted
    metrics, verdict = run_open_loop(model, processor, rows, dict.fromkeys(training, "training"), tmp_path, min_verdict_frames=STEPS)
    replays = replay_episodes(model, processor, rows, dict.fromkeys(training, "training"))
    stats = model.config.norm_stats["tiny"]["action"]
    bin_width = (np.asarray(stats["q99"]) - np.asarray(stats["q01"])) / (model.config.num_action_bins - 1)
    for replay in replays:
        assert replay.predicted.shape == replay.recorded.shape == (STEPS, ACTION_DIM)
        inside = (replay.recorded >= np.asarray(stats["q01"])) & (replay.recorded <= np.asarray(stats["q99"]))
        assert (np.abs(replay.predicted - replay.recorded)[inside] <= np.broadcast_to(bin_width, inside.shape)[inside]).all()
    assert metrics["training"]["bin_accuracy"] == [1.0] * ACTION_DIM
    assert metrics["training"]["gripper_accuracy"] == 1.0
    assert verdict.startswith("fits the training episodes")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"episode_{e}.png" for e in training]
    assert json.loads((tmp_path / "metrics.json").read_text())["training"]["steps"] == STEPS * len(training)


def test_an_untrained_model_is_flagged_as_under_fit(fitted, tmp_path):
    rows, training, _, model, processor, _ = fitted
    from transformers import AutoTokenizer

    untrained = make_model(AutoTokenizer.from_pretrained(TOKENIZER_DIR), seed=3, action_dim=ACTION_DIM, action_decoding="parallel", num_action_bins=NUM_BINS,
                           norm_stats=model.config.norm_stats)
    metrics, verdict = run_open_loop(untrained, processor, rows, dict.fromkeys(training, "training"), tmp_path, min_verdict_frames=STEPS)
    assert verdict.startswith("under-fit"), verdict
    assert metrics["training"]["mean_bin_accuracy"] < 0.5


def test_dimensions_that_never_vary_do_not_hide_the_errors_of_the_others():
    """Six constant dimensions reproduced exactly beside one dimension missed by a quarter of its range: the means, and
    so the verdict, are over the varying dimension alone."""
    recorded = np.zeros((20, 7))
    recorded[:, 0] = np.linspace(-1, 1, 20)
    predicted = recorded.copy()
    predicted[:, 0] += 0.5
    tokenizer = ActionTokenizer(action_token_end=256, num_action_bins=256, norm_stats={"arm": compute_action_stats(recorded)})
    metrics = replay_metrics([EpisodeReplay(0, "training", "reach", recorded, predicted)], tokenizer, "arm", {})
    assert metrics["training"]["l1"][1:] == [0.0] * 6
    entry = metrics["training"]
    assert entry["mean_l1_normalized"] == entry["l1_normalized"][0]
    assert np.mean(entry["l1_normalized"]) < FIT_L1 < entry["mean_l1_normalized"]  # a mean over all 7 would pass it
    assert fit_verdict(metrics, min_frames=20).startswith("under-fit")
    assert fit_verdict(metrics).startswith("no verdict: only 20 training frames")  # MIN_VERDICT_FRAMES = 30


def test_the_model_card_replay_takes_episodes_until_a_verdict_has_enough_frames(fitted, tmp_path):
    """Four-step episodes: the card's replay takes every training and held-out episode there is, and with fewer frames
    than a verdict needs it says so rather than calling one missed step over-fitting."""
    rows, training, held_out, model, processor, _ = fitted
    is_held_out = np.asarray(rows["episode"]) == held_out
    figures, section = replay_for_model_card(model, processor, rows.select(np.flatnonzero(~is_held_out)),
                                             rows.select(np.flatnonzero(is_held_out)), "tiny", tmp_path / "open_loop")
    metrics = json.loads((tmp_path / "open_loop" / "metrics.json").read_text())
    assert metrics["training"]["episodes"] == training and metrics["held-out"]["episodes"] == [held_out]
    assert f"Verdict: no verdict: only {STEPS * len(training)} training, {STEPS} held-out frames" in section
    assert f"open_loop/episode_{training[0]}.png" in section and f"open_loop/episode_{held_out}.png" in section
    assert figures["open_loop_training_bin_accuracy"] == 1.0


def test_an_unknown_episode_is_a_clear_error(fitted):
    rows, _, _, model, processor, _ = fitted
    with pytest.raises(ValueError, match=r"Episodes \[99\] are not in the dataset"):
        replay_episodes(model, processor, rows, {99: "training"})


@pytest.fixture(scope="module")
def lerobot_folder(fitted, tmp_path_factory):
    return write_lerobot_dataset(fitted[0], tmp_path_factory.mktemp("data") / "tiny", fps=10, image_storage="image")


def test_evaluate_open_loop_command_flags_a_model_that_fits_only_its_training_episodes(fitted, lerobot_folder, tmp_path):
    _, training, held_out, _, _, folder = fitted
    out = tmp_path / "replay"
    command = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--open_loop", "--model", str(folder), "--dataset_name",
               str(lerobot_folder), "--eval_split_ratio", str(SPLIT["eval_split_ratio"]), "--seed", str(SPLIT["seed"]), "--out", str(out), "--episodes", f"0-{NUM_EPISODES - 1}", "--min_verdict_frames", str(STEPS)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["training"]["episodes"] == training and saved["held-out"]["episodes"] == [held_out]
    assert saved["training"]["bin_accuracy"] == [1.0] * ACTION_DIM
    assert saved["verdict"].startswith("over-fit"), saved["verdict"]
    assert "Verdict: over-fit" in result.stdout
    assert {p.name for p in out.glob("*.png")} == {f"episode_{e}.png" for e in [*training, held_out]}
    assert "| 2 |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--image_key", "observation.images.nope", "Camera 'observation.images.nope' is not in"),
        ("--episodes", "7", r"Episodes \[7\] are not in the dataset"),
    ],
)
def test_evaluate_open_loop_rejects_a_bad_camera_or_episode(fitted, lerobot_folder, tmp_path, option, value, message):
    import evaluate

    with pytest.raises(ValueError, match=message):
        evaluate.main(["--open_loop", "--model", str(fitted[5]), "--dataset_name", str(lerobot_folder), option, value, "--out", str(tmp_path)])


def test_evaluate_open_loop_rejects_an_unknown_dataset(fitted, tmp_path):
    import evaluate

    with pytest.raises(ValueError, match="neither a local folder or file nor a dataset on the Hub"):
        evaluate.main(["--open_loop", "--model", str(fitted[5]), "--dataset_name", str(tmp_path / "no_such_data"), "--out", str(tmp_path)])
