"""The input surface, as a table: every kind of odd input at every entry point (image processor, processor, model,
policy, fine-tuning CLI, loading a folder) gives the right result or a `ValueError` naming the bad value. A robot
executes what `predict_action` returns, so nothing here may come back as a plausible-looking wrong action.

Also: random images through the image processor never give NaN or out-of-range pixels without an error, and a
fine-tuning run killed (SIGKILL) while writing a checkpoint or its final folder resumes from the newest complete
checkpoint and never leaves a folder that looks complete but is not.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import finetune
import numpy as np
import pytest
import torch
from conftest import REPO, TINY, TOKENIZER_DIR, make_model, make_processor
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer

from configuration_openvla import OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction, OpenVLAPolicy
from openvla_tools.envs.tabletop import generate_demonstrations
from processing_openvla import OpenVLAImageProcessor, OpenVLAProcessor

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 56
RNG = np.random.default_rng(0)
PHOTO = RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # an [H, W, C] camera frame
RAMP16 = np.tile(np.linspace(0, 65535, 48), (40, 1)).astype(np.uint16)  # a 16-bit depth-camera ramp
GOOD_STATS = {"robot": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}}


def pixels(images, **kwargs) -> torch.Tensor:
    return OpenVLAImageProcessor(image_size=SIZE)(images, return_tensors="pt", **kwargs)["pixel_values"]


def red(size: int) -> np.ndarray:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 0] = 255
    return image


def stats_with(**fields) -> dict:
    return {"robot": {"action": {**GOOD_STATS["robot"]["action"], **fields}}}


@dataclass
class Surface:
    """What the cases act on: a processor, a tiny model and a saved folder of both."""

    processor: OpenVLAProcessor
    model: OpenVLAForActionPrediction
    folder: pathlib.Path
    tmp: pathlib.Path

    def inputs(self, count: int = 1):
        return self.processor(images=[PHOTO] * count, text=["pick up the red block"] * count)

    def policy(self, **kwargs) -> OpenVLAPolicy:
        return OpenVLAPolicy(self.model, self.processor, **kwargs)

    def folder_without(self, name: str) -> pathlib.Path:
        """A copy of the saved folder with the file `name` removed."""
        copy = self.tmp / f"without-{name}"
        if not copy.exists():
            shutil.copytree(self.folder, copy)
            (copy / name).unlink()
        return copy

    def folder_with_config(self, file: str, key: str, **fields) -> pathlib.Path:
        """A copy of the saved folder whose `file` holds `norm_stats` edited as `fields` (an edited or corrupt file)."""
        copy = self.tmp / f"edited-{file}-{'-'.join(fields)}"
        shutil.copytree(self.folder, copy, dirs_exist_ok=True)
        settings = json.loads((copy / file).read_text())
        settings[key] = stats_with(**fields)
        (copy / file).write_text(json.dumps(settings))
        return copy


@pytest.fixture(scope="module")
def surface(tmp_path_factory) -> Surface:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = make_model(tokenizer, norm_stats=GOOD_STATS)
    processor = make_processor(tokenizer, norm_stats=GOOD_STATS)
    tmp = tmp_path_factory.mktemp("surface")
    folder = tmp / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Surface(processor, model, folder, tmp)


@dataclass
class Case:
    """One input kind at one entry point: `call` must raise a ValueError matching `error`, or return a result that
    `check` accepts."""

    entry: str
    kind: str
    call: Callable[[Surface], Any]
    error: str | None = None
    check: Callable[[Any], None] | None = None

    @property
    def id(self) -> str:
        return f"{self.entry}: {self.kind}"


def same_as(expected: Callable[[], torch.Tensor]) -> Callable[[torch.Tensor], None]:
    return lambda result: torch.testing.assert_close(result, expected(), rtol=0, atol=0)


def is_red(result: torch.Tensor) -> None:
    mean, std = np.array(OpenVLAImageProcessor().image_mean), np.array(OpenVLAImageProcessor().image_std)
    np.testing.assert_allclose(result[0, :, 0, 0].numpy(), (np.array([1.0, 0.0, 0.0]) - mean) / std, atol=1e-5)


IMAGE_PROCESSOR = [
    Case("image processor", "16-bit PIL image (I;16) is scaled by 255/65535",
         lambda s: pixels(Image.fromarray(RAMP16)),
         check=same_as(lambda: pixels(Image.fromarray((RAMP16 / 65535.0 * 255).astype(np.uint8)).convert("RGB")))),
    Case("image processor", "big-endian 16-bit PIL image (I;16B) is scaled by 255/65535",
         lambda s: pixels(Image.frombytes("I;16B", RAMP16.shape[::-1], RAMP16.astype(">u2").tobytes())), check=same_as(lambda: pixels(RAMP16))),
    Case("image processor", "uint16 array is scaled by 255/65535",
         lambda s: pixels(RAMP16), check=same_as(lambda: pixels(Image.fromarray((RAMP16 / 65535.0 * 255).astype(np.uint8)).convert("RGB")))),
    Case("image processor", "float PIL image (F) in [0, 1] is scaled by 255",
         lambda s: pixels(Image.fromarray(PHOTO[..., 0] / np.float32(255))),
         check=same_as(lambda: pixels(Image.fromarray(PHOTO[..., 0]).convert("RGB")))),
    Case("image processor", "float PIL image (F) in [0, 255]",
         lambda s: pixels(Image.fromarray(PHOTO[..., 0].astype(np.float32))), error=r"values in \[0, 255\].*must lie in \[0, 1\]"),
    Case("image processor", "all-white float image (every value 1.0) stays white",
         lambda s: pixels(np.ones((40, 48, 3))), check=same_as(lambda: pixels(np.full((40, 48, 3), 255, np.uint8)))),
    Case("image processor", "0x0 PIL image", lambda s: pixels(Image.new("RGB", (0, 0))), error="empty 0x0 PIL image"),
    Case("image processor", "0x0 array", lambda s: pixels(np.zeros((0, 0, 3), np.uint8)), error=r"shape \(0, 0, 3\) \(0x0 pixels\)"),
    Case("image processor", "2-D grayscale array is grayscale",
         lambda s: pixels(PHOTO[..., 0]), check=same_as(lambda: pixels(Image.fromarray(PHOTO[..., 0])))),
    Case("image processor", "1x1 [H, W, C] red pixel: channel axis ambiguous",
         lambda s: pixels(red(1)), error=r"shape \(1, 1, 3\) is ambiguous.*input_data_format='channels_last'"),
    Case("image processor", "4x4 [H, W, C] red image: channel axis ambiguous",
         lambda s: pixels(red(4)), error=r"shape \(4, 4, 3\) is ambiguous"),
    Case("image processor", "4x4 red image with input_data_format='channels_last' stays red",
         lambda s: pixels(red(4), input_data_format="channels_last"), check=is_red),
    Case("image processor", "float [H, W, C] in [0, 255], whole numbers",
         lambda s: pixels(PHOTO.astype(np.float32)), error=r"values in \[0, 255\].*divide 0-255 images by 255"),
    Case("image processor", "float [H, W, C] in [0, 255], fractional",
         lambda s: pixels(PHOTO + np.float32(0.5)), error=r"values in \[0.5, 255.5\].*must lie in \[0, 1\]"),
    Case("image processor", "already-normalised (negative) float image",
         lambda s: pixels(np.full((40, 48, 3), -1.5, np.float32)), error="Already-normalised pixel_values go to the model"),
    Case("image processor", "NaN in a float image", lambda s: pixels(np.full((40, 48, 3), np.nan, np.float32)), error="NaN or inf"),
    Case("image processor", "int64 array in [0, 255] is 8-bit",
         lambda s: pixels(PHOTO.astype(np.int64)), check=same_as(lambda: pixels(PHOTO))),
    Case("image processor", "int32 array beyond 255", lambda s: pixels(np.full((40, 48, 3), 1000, np.int32)),
         error=r"int32 holds values in \[1000, 1000\], outside the 8-bit range"),
    Case("image processor", "boolean mask", lambda s: pixels(np.ones((40, 48, 3), bool)), error="dtype bool"),
    Case("image processor", "2-channel array", lambda s: pixels(np.zeros((40, 48, 2), np.uint8)), error=r"shape \(40, 48, 2\) has no channel axis"),
    Case("image processor", "images=[]", lambda s: pixels([]), error="holds no image"),
    Case("image processor", "None inside an image list", lambda s: pixels([PHOTO, None]), error=r"images\[1\] is None"),
    Case("image processor", "nested image list", lambda s: pixels([[PHOTO]]), error=r"images\[0\] is list"),
    Case("image processor", "5-D array", lambda s: pixels(np.zeros((1, 2, 40, 48, 3), np.uint8)), error=r"images is an array of shape \(1, 2, 40, 48, 3\)"),
    Case("image processor", "a path that does not exist", lambda s: pixels("/no/such/frame.png"), error=r"from '/no/such/frame.png'.*Check the path"),
    Case("image processor", "pathlib.Path of a PNG", lambda s: pixels(s.tmp / "frame.png"), check=same_as(lambda: pixels(Image.fromarray(PHOTO)))),
    Case("image processor", "str path of a PNG", lambda s: pixels(str(s.tmp / "frame.png")), check=same_as(lambda: pixels(PHOTO))),
    Case("image processor", "4-D [B, H, W, C] batch is B images",
         lambda s: pixels(np.stack([PHOTO, PHOTO[::-1]])), check=same_as(lambda: pixels([PHOTO, PHOTO[::-1]]))),
    Case("image processor", "bfloat16 [C, H, W] tensor in [0, 1]",
         lambda s: pixels(torch.from_numpy(PHOTO.transpose(2, 0, 1) / np.float32(255)).bfloat16()),
         check=lambda result: torch.testing.assert_close(result, pixels(PHOTO), rtol=0, atol=0.1)),
    Case("image processor", "an object that is no image", lambda s: pixels({"image": PHOTO}), error="image of type dict"),
]

PROCESSOR = [
    Case("processor", "None as an instruction in a list", lambda s: s.processor(images=[PHOTO] * 2, text=["go", None]), error="instruction=None is not a string"),
    Case("processor", "a number as an instruction", lambda s: s.processor(images=PHOTO, text=3), error="instruction=3 is not a string"),
    Case("processor", "images=[] and text=[]", lambda s: s.processor(images=[], text=[]), error="holds no image"),
    Case("processor", "4-D batch array with one instruction per image",
         lambda s: s.processor(images=np.stack([PHOTO] * 2), text=["go", "stop"])["pixel_values"], check=lambda r: r.shape == (2, 3, SIZE, SIZE) or pytest.fail(r.shape)),
    Case("processor", "ragged action lists", lambda s: s.processor(images=[PHOTO] * 2, text=["a", "b"], actions=[[0.1] * 7, [0.1] * 6]),
         error=r"ragged: rows have lengths \[6, 7\]"),
    Case("processor", "actions as strings", lambda s: s.processor(images=PHOTO, text="a", actions=["0.1"] * 6 + ["left"]), error="must be numbers"),
    Case("processor", "[K, action_dim] actions for a model without chunks",
         lambda s: OpenVLAProcessor.from_model_config(s.model.config, s.processor.image_processor, s.processor.tokenizer)(
             images=PHOTO, text="a", actions=np.zeros((4, 7))), error=r"action_chunk_size=1 action\(s\).*shape \(4, 7\)"),
    Case("processor", "norm_stats with NaN", lambda s: make_processor(s.processor.tokenizer, norm_stats=stats_with(q99=[np.nan] * 7)),
         error=r"norm_stats\['robot'\] has q99=\[nan"),
    Case("processor", "norm_stats with q01 > q99", lambda s: make_processor(s.processor.tokenizer, norm_stats=stats_with(q01=[2.0] + [-1.0] * 6)),
         error=r"q01 > q99 in action dimension\(s\) \[0\]"),
    Case("processor", "norm_stats with q01 and q99 of different lengths", lambda s: make_processor(s.processor.tokenizer, norm_stats=stats_with(q99=[1.0] * 6)),
         error=r"q01 \(7,\), q99 \(6,\) and mask \(7,\)"),
    Case("processor", "norm_stats with a short mask", lambda s: make_processor(s.processor.tokenizer, norm_stats=stats_with(mask=[True] * 3)),
         error=r"mask \(3,\)"),
    Case("processor", "norm_stats without bounds", lambda s: make_processor(s.processor.tokenizer, norm_stats={"robot": {"action": {"mean": [0.0] * 7}}}),
         error="has no action 'q01' and 'q99' bounds"),
]

MODEL = [
    Case("model", "raw uint8 pixel_values",
         lambda s: s.model.predict_action(**{**s.inputs(), "pixel_values": torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8)}),
         error="dtype torch.uint8, so they are raw image pixels"),
    Case("model", "0-255 float pixel_values", lambda s: s.model.predict_action(**{**s.inputs(), "pixel_values": torch.full((1, 3, SIZE, SIZE), 200.0)}),
         error=r"reach 200.*look like raw 0-255 pixels"),
    Case("model", "NaN pixel_values", lambda s: s.model.predict_action(**{**s.inputs(), "pixel_values": torch.full((1, 3, SIZE, SIZE), np.nan)}), error="NaN or inf"),
    Case("model", "pixel_values as numpy", lambda s: s.model.predict_action(**{**s.inputs(), "pixel_values": s.inputs()["pixel_values"].numpy()}),
         error="must be a torch tensor, got ndarray"),
    Case("model", "config with NaN norm_stats", lambda s: OpenVLAConfig.small_config(norm_stats=stats_with(q01=[np.nan] * 7)), error="NaN or inf"),
    Case("model", "config with q01 > q99", lambda s: OpenVLAConfig.small_config(norm_stats=stats_with(q01=[1.5] * 7)), error="q01 > q99"),
]


def replanned_after_new_instruction(s: Surface) -> tuple[np.ndarray, np.ndarray]:
    chunked = make_model(s.processor.tokenizer, action_decoding="parallel", action_chunk_size=4, norm_stats=GOOD_STATS)
    policy = OpenVLAPolicy(chunked, s.processor)
    policy.select_action(PHOTO, "pick up the red block")
    expected = chunked.predict_action(**s.processor(images=PHOTO, text="push the blue ball"))[0, 0].numpy()
    return policy.select_action(PHOTO, "push the blue ball"), expected


POLICY = [
    Case("policy", "None as the instruction", lambda s: s.policy().select_action(PHOTO, None), error="instruction of environment 0 is None"),
    Case("policy", "a list of images for one instruction", lambda s: s.policy().select_action([PHOTO, PHOTO], "go"), error="takes one image, got 2"),
    Case("policy", "a 4-D batch for one instruction", lambda s: s.policy().select_action(np.stack([PHOTO] * 2), "go"), error="takes one image, got 2"),
    Case("policy", "one [H, W, C] frame to select_actions is one environment",
         lambda s: s.policy().select_actions(PHOTO, "go"), check=lambda r: r.shape == (1, 7) or pytest.fail(r.shape)),
    Case("policy", "a new instruction mid-chunk re-plans", replanned_after_new_instruction,
         check=lambda r: np.testing.assert_array_equal(*r)),
    Case("policy", "config and processor holding different norm_stats",
         lambda s: OpenVLAPolicy(s.model, make_processor(s.processor.tokenizer, norm_stats=stats_with(q99=[2.0] * 7))),
         error=r"differ for dataset\(s\) \['robot'\]"),
]

LOADING = [
    Case("loading a folder", "no config.json (model class)", lambda s: OpenVLAForActionPrediction.from_pretrained(s.folder_without("config.json")),
         error="has no config.json"),
    Case("loading a folder", "no config.json (AutoModel)", lambda s: AutoModel.from_pretrained(s.folder_without("config.json"), trust_remote_code=True),
         error="config.json"),
    Case("loading a folder", "no weights", lambda s: AutoModel.from_pretrained(s.folder_without("model.safetensors"), trust_remote_code=True),
         error="has no model.safetensors"),
    Case("loading a folder", "no tokenizer.json", lambda s: AutoProcessor.from_pretrained(s.folder_without("tokenizer.json"), trust_remote_code=True),
         error="has no tokenizer.json"),
    Case("loading a folder", "no processor_config.json", lambda s: OpenVLAProcessor.from_pretrained(s.folder_without("processor_config.json")),
         error="has no processor_config.json"),
    Case("loading a folder", "a model folder that does not exist", lambda s: OpenVLAForActionPrediction.from_pretrained(s.tmp / "nowhere"),
         error="There is no folder"),
    Case("loading a folder", "a processor folder that does not exist", lambda s: OpenVLAProcessor.from_pretrained(s.tmp / "nowhere"),
         error="There is no folder"),
    Case("loading a folder", "config.json edited to q01 > q99",
         lambda s: AutoModel.from_pretrained(s.folder_with_config("config.json", "norm_stats", q01=[3.0] * 7), trust_remote_code=True), error="q01 > q99"),
    Case("loading a folder", "processor_config.json with NaN statistics",
         lambda s: AutoProcessor.from_pretrained(s.folder_with_config("processor_config.json", "norm_stats", q01=[np.nan] * 7), trust_remote_code=True),
         error="NaN or inf"),
]


def run_cli(s: Surface, name: str, transform: Callable[[datasets.Dataset], datasets.Dataset], *options: str):
    path = s.tmp / f"data-{name}"
    transform(generate_demonstrations(3, progress=False)).save_to_disk(str(path))
    return finetune.main(["--dataset_name", str(path), "--output_dir", str(s.tmp / f"out-{name}"), "--max_steps", "1", *options])


def replace_column(name: str, values: Callable[[int], Any]) -> Callable[[datasets.Dataset], datasets.Dataset]:
    return lambda data: data.remove_columns(name).add_column(name, [values(row) for row in range(len(data))])


CLI = [
    Case("fine-tuning CLI", "empty dataset", lambda s: run_cli(s, "empty", lambda d: d.filter(lambda row: False)), error="The dataset is empty"),
    Case("fine-tuning CLI", "action column of strings", lambda s: run_cli(s, "strings", replace_column("action", lambda row: "0.1,0.2,0.3")),
         error="Row 0 of column 'action' holds '0.1,0.2,0.3', not a list of numbers"),
    Case("fine-tuning CLI", "action column of numbers", lambda s: run_cli(s, "scalars", replace_column("action", lambda row: 0.5)),
         error="holds 0.5, not a list of numbers"),
    Case("fine-tuning CLI", "action chunks in the action column", lambda s: run_cli(s, "chunks", replace_column("action", lambda row: [[0.0] * 7] * 4)),
         error="not a list of numbers.*--action_chunk_size"),
    Case("fine-tuning CLI", "ragged actions", lambda s: run_cli(s, "ragged", replace_column("action", lambda row: [0.0] * (6 if row == 1 else 7))),
         error=r"different lengths \[6, 7\]"),
    Case("fine-tuning CLI", "None as an instruction", lambda s: run_cli(s, "none", replace_column("instruction", lambda row: None if row == 2 else "go")),
         error="Row 2 of column 'instruction' holds None"),
    Case("fine-tuning CLI", "an eval split that takes every row",
         lambda s: run_cli(s, "held-out", lambda d: d, "--eval_split_ratio", "0.9"), error="holds out all"),
    Case("fine-tuning CLI", "resuming from an incomplete checkpoint folder",
         lambda s: finetune.resume_checkpoint(str(s.folder), s.tmp), error=r"is not a complete checkpoint \(no trainer_state.json\)"),
]

CASES = IMAGE_PROCESSOR + PROCESSOR + MODEL + POLICY + LOADING + CLI


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_input_surface(surface, case):
    Image.fromarray(PHOTO).save(surface.tmp / "frame.png")
    if case.error is not None:
        with pytest.raises(ValueError, match=case.error):
            case.call(surface)
    else:
        case.check(case.call(surface))


def test_every_entry_point_is_in_the_table():
    assert {case.entry for case in CASES} == {
        "image processor", "processor", "model", "policy", "fine-tuning CLI", "loading a folder"
    }


def test_actions_far_outside_the_statistics_warn(surface):
    far = np.array([0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 1.0])  # dimension 3: q01..q99 is -1..1, so 9 is 4 spans beyond
    with pytest.warns(UserWarning, match=r"dataset 'robot' lie far outside its statistics in action dimension 3.*\[-1, 1\]"):
        surface.processor(images=PHOTO, text="go", actions=far, dataset_name="robot")


DTYPES = (np.uint8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_)


def test_random_images_give_pixels_within_the_normalised_range_or_an_error():
    """Random shapes, layouts, dtypes and value ranges: the output is finite and within the normalisation of
    [0, 1] per channel, or the call raises a ValueError; float images outside [0, 1] always raise."""
    processor = OpenVLAImageProcessor(image_size=28)
    mean, std = np.array(processor.image_mean)[:, None, None], np.array(processor.image_std)[:, None, None]
    low, high = (0.0 - mean) / std - 1e-5, (1.0 - mean) / std + 1e-5
    rng = np.random.default_rng(7)
    outcomes = {"converted": 0, "refused": 0}
    for _ in range(120):
        height, width, channels = rng.integers(1, 40), rng.integers(1, 40), rng.choice([1, 2, 3, 4, 5])
        shape = [(height, width), (height, width, channels), (channels, height, width)][rng.integers(3)]
        dtype = DTYPES[rng.integers(len(DTYPES))]
        scale = [1.0, 255.0, 65535.0, 1e6][rng.integers(4)] * (1 if rng.random() < 0.8 else -1)
        with np.errstate(over="ignore"):  # 1e6 overflows float16 to inf, which must be refused too
            image = (rng.random(shape) * scale).astype(dtype)
        if np.issubdtype(dtype, np.floating) and rng.random() < 0.1:
            image.flat[0] = np.nan
        try:
            result = processor(image, return_tensors="pt")["pixel_values"][0].numpy()
        except ValueError:
            outcomes["refused"] += 1
            continue
        outcomes["converted"] += 1
        assert np.all(np.isfinite(result)) and np.all((result >= low) & (result <= high)), (shape, dtype, scale)
        assert not (np.issubdtype(dtype, np.floating) and (np.nanmin(image) < 0 or np.nanmax(image) > 1)), (shape, dtype, scale)
    assert min(outcomes.values()) > 10, outcomes  # both paths were exercised


# The training run killed below: a tiny model from scratch on 12 built-in episodes, a checkpoint every 2 steps.
KILL_RUN = ["--num_demo_episodes", "12", "--per_device_train_batch_size", "8", "--max_steps", "4", "--save_steps", "2",
            "--eval_strategy", "no", "--closed_loop_episodes", "0", "--vision_pretraining_steps", "0", "--logging_steps", "1",
            "--config_overrides", ",".join(f"{name}={value}" for name, value in TINY.items() if name != "image_size")]
# Runs scripts/finetune.py's main, but first makes one save stop half-way (and say so): `checkpoint` blocks after the
# checkpoint of step 4 has its weights, optimizer and RNG state but not yet trainer_state.json; `final` blocks after
# the final model's weights are written and before its processor files.
STOPPING_RUN = """
import sys, time
sys.path.insert(0, {scripts!r})
import finetune
from transformers import Trainer

def stop(where):
    print("STOPPED", where, flush=True)
    time.sleep(600)

if sys.argv[1] == "checkpoint":
    save_rng_state = Trainer._save_rng_state
    def stopping_save_rng_state(self, output_dir):
        save_rng_state(self, output_dir)
        if self.state.global_step == 4:
            stop(output_dir)
    Trainer._save_rng_state = stopping_save_rng_state
elif sys.argv[1] == "final":
    save_pretrained = finetune.OpenVLAProcessor.save_pretrained
    def stopping_save_pretrained(self, folder, *args, **kwargs):
        if str(folder).endswith("run/.saving"):  # not the copy the Trainer saves into each checkpoint
            stop(folder)
        return save_pretrained(self, folder, *args, **kwargs)
    finetune.OpenVLAProcessor.save_pretrained = stopping_save_pretrained
finetune.main(sys.argv[2:])
"""


def run_until_killed(stop_at: str, *arguments: str) -> str:
    """Start the fine-tuning program, SIGKILL it once it reports that it stopped inside a save; its output so far."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    code = STOPPING_RUN.format(scripts=str(REPO / "scripts"))
    process = subprocess.Popen([sys.executable, "-c", code, stop_at, *arguments], cwd=REPO, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("STOPPED"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    output = "".join(lines)
    assert process.returncode == -signal.SIGKILL, output[-3000:]
    return output


def weights_of(folder: pathlib.Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_a_run_killed_while_saving_resumes_from_the_newest_complete_checkpoint(tmp_path):
    output = tmp_path / "run"
    checkpoints = output / "checkpoints"
    arguments = ["--output_dir", str(output), *KILL_RUN]

    # Killed while writing the checkpoint of step 4: it never appears as checkpoint-4.
    run_until_killed("checkpoint", *arguments)
    assert sorted(path.name for path in checkpoints.iterdir()) == [".saving", "checkpoint-2"]
    assert finetune.checkpoint_problem(checkpoints / ".saving" / "checkpoint-4") == "no trainer_state.json"
    assert finetune.checkpoint_problem(checkpoints / "checkpoint-2") is None
    assert not (output / "config.json").exists()

    # A half-written checkpoint as the plain Trainer leaves one (weights, no trainer_state.json) is skipped by name.
    shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-3")
    (checkpoints / "checkpoint-3" / "trainer_state.json").unlink()
    resumed = run_until_killed("final", *arguments, "--resume_from_checkpoint", "True")
    assert f"Skipping the incomplete checkpoint {checkpoints / 'checkpoint-3'} (no trainer_state.json)" in resumed
    assert f"Resuming from {checkpoints / 'checkpoint-2'}" in resumed
    assert finetune.checkpoint_problem(checkpoints / "checkpoint-4") is None
    # Killed while writing the final folder: nothing in output_dir looks like a model yet.
    assert not (output / "config.json").exists() and (output / ".saving" / "config.json").exists()

    finetune.main([*arguments, "--resume_from_checkpoint", "True"])
    assert not (output / ".saving").exists() and not (checkpoints / ".saving").exists()
    assert json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    model = AutoModel.from_pretrained(output, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    assert model.predict_action(**processor(images=PHOTO, text="go to the red block")).shape == (1, 7)

    # Killed while replacing that model with a new one: the complete old model stays until the new one is written.
    before = weights_of(output), (output / "config.json").read_text()
    run_until_killed("final", *arguments, "--resume_from_checkpoint", "True")
    assert (weights_of(output), (output / "config.json").read_text()) == before
