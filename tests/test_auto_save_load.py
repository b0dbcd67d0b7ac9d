"""A saved folder loads in a fresh process, from another directory, offline: through the Auto classes with
`trust_remote_code=True`, and through this library's own classes without it."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from conftest import INSTRUCTIONS, REPO, assert_equal_up_to_float_rounding, make_model, random_images

from processing_openvla import compute_action_stats

LOAD_AND_PREDICT = """
import json, sys
import numpy as np, torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

folder, images_file, output_file = sys.argv[1:4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "OpenVLAConfig"
assert type(AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)).__name__ == "OpenVLAForActionPrediction"
assert type(AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)).__name__ == "OpenVLAImageProcessor"
images = [Image.fromarray(array) for array in np.load(images_file)]
instructions = json.loads(sys.argv[4])
actions = model.predict_action(**processor(images=images, text=instructions), unnorm_key="robot")
np.save(output_file, actions.numpy())
"""

# Our own classes need no remote code: none of these may ask for `trust_remote_code` (stdin is closed, so the prompt
# transformers shows in a terminal would fail the script instead of waiting).
LOAD_DIRECT_AND_PREDICT = """
import json, sys
import numpy as np
from PIL import Image
from configuration_openvla import OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction
from processing_openvla import OpenVLAImageProcessor, OpenVLAProcessor

folder, images_file, output_file = sys.argv[1:4]
assert OpenVLAConfig.from_pretrained(folder).norm_stats.keys() == {"robot", "other"}
assert OpenVLAImageProcessor.from_pretrained(folder).image_size == 56
model = OpenVLAForActionPrediction.from_pretrained(folder)
processor = OpenVLAProcessor.from_pretrained(folder)
assert type(model).__module__ == "modeling_openvla" and type(processor).__module__ == "processing_openvla"
images = [Image.fromarray(array) for array in np.load(images_file)]
actions = model.predict_action(**processor(images=images, text=json.loads(sys.argv[4])), unnorm_key="robot")
np.save(output_file, actions.numpy())
"""


def _saved_folder(tokenizer, processor, tmp_path):
    """A tiny model and its processor saved as a Hub folder, with the actions it predicts for `INSTRUCTIONS`."""
    stats = {"robot": compute_action_stats(np.random.default_rng(0).normal(3.0, 2.0, (50, 7))), "other": compute_action_stats(np.ones((5, 7)))}
    model = make_model(tokenizer, norm_stats=stats)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = random_images(3, seed=4)
    np.save(tmp_path / "images.npy", np.stack([np.asarray(image) for image in images]))
    expected = model.predict_action(**processor(images=images, text=INSTRUCTIONS), unnorm_key="robot")
    return folder, expected


def _predict_in_fresh_process(script: str, folder, tmp_path) -> torch.Tensor:
    """Run `script` offline in a new interpreter, from a directory that is not the repository, without the repository
    on `PYTHONPATH` (the installed package provides the modules), and return the actions it saved."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    environment["PYTHONPATH"] = os.pathsep.join(p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(tmp_path / "images.npy"), str(tmp_path / "out.npy"), json.dumps(INSTRUCTIONS)],
        cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.from_numpy(np.load(tmp_path / "out.npy"))


def test_auto_classes_load_offline_in_a_fresh_process(tokenizer, processor, tmp_path):
    folder, expected = _saved_folder(tokenizer, processor, tmp_path)
    for name in ("configuration_openvla.py", "modeling_openvla.py", "processing_openvla.py", "model.safetensors"):
        assert (folder / name).exists(), name
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_openvla.OpenVLAProcessor"
    assert_equal_up_to_float_rounding(_predict_in_fresh_process(LOAD_AND_PREDICT, folder, tmp_path), expected)


def test_own_classes_load_a_saved_folder_without_remote_code(tokenizer, processor, tmp_path):
    folder, expected = _saved_folder(tokenizer, processor, tmp_path)
    assert_equal_up_to_float_rounding(_predict_in_fresh_process(LOAD_DIRECT_AND_PREDICT, folder, tmp_path), expected)


def test_hub_kernels_stay_off_unless_asked(tokenizer, tmp_path, monkeypatch):
    """transformers replaces the layers of a model loaded onto a GPU with kernels fetched from the Hub by default; that
    fails offline (seen on an H200: 'kernels-community/activation ... not available in the local cache') and changes
    the numerics. Loading keeps them off unless `use_kernels=True` is passed."""
    from transformers import PreTrainedModel

    from modeling_openvla import OpenVLAForActionPrediction

    make_model(tokenizer).save_pretrained(tmp_path)
    requested = []
    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", lambda self, use_kernels, *args, **kwargs: requested.append(use_kernels))
    assert not OpenVLAForActionPrediction.from_pretrained(tmp_path).use_kernels
    OpenVLAForActionPrediction.from_pretrained(tmp_path, use_kernels=True)
    assert requested == [False, True]
