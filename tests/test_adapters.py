"""PEFT adapters trained by `scripts/finetune.py --use_lora` on a new dataset, loaded on their base model with
`load_adapter` (action statistics included) and evaluated through `scripts/evaluate.py --adapter`."""

import json
import shutil

import finetune
import numpy as np
import pytest
import torch
from conftest import random_images
from peft import PeftModel
from test_finetune import QUICK
from transformers import AutoModel, AutoProcessor

from modeling_openvla import ADAPTER_NORM_STATS_NAME
from openvla_tools.envs.tabletop import BASELINES, generate_demonstrations
from openvla_tools.evaluation import load_policy

INSTRUCTIONS = ["go to the red block", "push the blue ball up"]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A tiny base model trained on the built-in demos, and two LoRA runs on top of it, on datasets named `scaled`
    (actions ten times larger) and `shifted` (actions moved by 3), so that their statistics differ from the base
    model's `tabletop` ones and from each other's."""
    root = tmp_path_factory.mktemp("adapters")
    base = root / "base"
    finetune.main(["--output_dir", str(base), "--max_steps", "2", "--eval_strategy", "no", "--closed_loop_episodes", "0", *QUICK])
    runs = {}
    for name, change in (("scaled", lambda value: value * 10), ("shifted", lambda value: value + 3)):
        data, output = root / name, root / f"lora_{name}"
        rows = generate_demonstrations(3, seed=7, progress=False)
        rows.map(lambda row, change=change: {"action": [change(value) for value in row["action"]]}).save_to_disk(str(data))
        finetune.main(["--model_name_or_path", str(base), "--use_lora", "--lora_rank", "4", "--dataset_name", str(data),
                       "--max_steps", "3", "--learning_rate", "0.01", "--eval_strategy", "no", "--closed_loop_episodes", "0",
                       "--output_dir", str(output), *QUICK[2:6]])
        runs[name] = output
    return base, runs


def _actions(model, processor, unnorm_key: str) -> np.ndarray:
    batch = processor(images=random_images(2, seed=3), text=INSTRUCTIONS)
    with torch.no_grad():
        return model.predict_action(**batch, unnorm_key=unnorm_key).numpy()


def _merged(folder):
    return AutoModel.from_pretrained(folder, trust_remote_code=True).eval()


def test_an_adapter_loaded_on_its_base_acts_like_the_merged_model(adapted):
    base, runs = adapted
    assert (runs["scaled"] / "adapter" / ADAPTER_NORM_STATS_NAME).exists()
    processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
    model = _merged(base)
    assert list(model.config.norm_stats) == ["tabletop"]
    model.load_adapter(str(runs["scaled"] / "adapter"), adapter_name="scaled")
    assert sorted(model.config.norm_stats) == ["scaled", "tabletop"]
    merged = _merged(runs["scaled"])
    assert model.config.norm_stats == merged.config.norm_stats
    np.testing.assert_allclose(_actions(model, processor, "scaled"), _actions(merged, processor, "scaled"), atol=1e-5)


def test_one_base_model_switches_between_adapters(adapted):
    base, runs = adapted
    processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
    model = _merged(base)
    base_actions = _actions(model, processor, "tabletop")
    served = PeftModel.from_pretrained(model, runs["scaled"] / "adapter", adapter_name="scaled")
    served.load_adapter(runs["shifted"] / "adapter", adapter_name="shifted")
    for run in runs.values():
        model.load_adapter_norm_stats(str(run / "adapter"))
    assert sorted(model.config.norm_stats) == ["scaled", "shifted", "tabletop"]
    for name in ("shifted", "scaled"):
        served.set_adapter(name)
        np.testing.assert_allclose(_actions(served, processor, name), _actions(_merged(runs[name]), processor, name), atol=1e-5)
    with served.disable_adapter():
        np.testing.assert_array_equal(_actions(served, processor, "tabletop"), base_actions)


def test_an_adapter_trained_with_other_statistics_under_a_known_name_is_refused(adapted, tmp_path):
    base, runs = adapted
    adapter = tmp_path / "adapter"
    shutil.copytree(runs["scaled"] / "adapter", adapter)
    stats = json.loads((adapter / ADAPTER_NORM_STATS_NAME).read_text())
    stats["tabletop"]["action"]["q99"] = [value + 1 for value in stats["tabletop"]["action"]["q99"]]
    (adapter / ADAPTER_NORM_STATS_NAME).write_text(json.dumps(stats))
    model = AutoModel.from_pretrained(base, trust_remote_code=True)
    with pytest.raises(ValueError, match=r"other statistics for dataset\(s\) \['tabletop'\]"):
        model.load_adapter(str(adapter), adapter_name="edited")


def test_the_evaluator_serves_the_adapted_model_from_the_base(adapted):
    base, runs = adapted
    policy = load_policy(str(base), BASELINES, 7, "tabletop", unnorm_key="scaled", adapter=str(runs["scaled"] / "adapter"))
    merged = _merged(runs["scaled"])
    processor = AutoProcessor.from_pretrained(runs["scaled"], trust_remote_code=True)
    policy.reset()
    actions = policy.select_actions(random_images(2, seed=3), INSTRUCTIONS)
    np.testing.assert_allclose(actions, _actions(merged, processor, "scaled"), atol=1e-5)
    with pytest.raises(ValueError, match="adapter='x' is loaded on a saved model"):
        load_policy("scripted", BASELINES, 7, "tabletop", adapter="x")
