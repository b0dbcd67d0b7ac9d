"""Export to the official OpenVLA format (`convert_openvla_checkpoint.py --to official`): the exact inverse of loading one.

An official tiny checkpoint (`official_fixtures.make_official_checkpoint`) is loaded, fine-tuned here with LoRA on a
small dataset with a new `unnorm_key`, merged and saved; the program writes it back in the official layout, and this
project's official-folder path reloads it with identical actions for the old and the new `unnorm_key`.
"""

import json
import os
import subprocess
import sys

import convert_openvla_checkpoint
import numpy as np
import pytest
import torch
from conftest import REPO, assert_equal_up_to_float_rounding
from official_fixtures import (
    OFFICIAL_CODE_FILES,
    load_official,
    load_official_state_dict,
    make_official_checkpoint,
    make_test_image,
    write_official_code_stand_ins,
)
from peft import LoraConfig, get_peft_model
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoProcessor

from configuration_openvla import OPENVLA_7B_OFFICIAL_CONFIG, OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction
from openvla_tools.official_format import check_round_trip, export_official, official_config, official_folder_config
from processing_openvla import OpenVLAImageProcessor, OpenVLAProcessor, compute_action_stats

pytestmark = pytest.mark.usefixtures("single_thread")
NEW_KEY = "my_robot"
OLD_KEYS = ("bridge_orig", "fractal20220817_data")
INSTRUCTIONS = ["pick up the red block", "open the drawer", "put the cup on the plate", "move left"]
PROGRAM = REPO / "scripts" / "convert_openvla_checkpoint.py"
JSON_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json")


def _images() -> list[Image.Image]:
    return [make_test_image(0), make_test_image(1, size=(97, 61)), Image.new("RGB", (64, 48), (0, 0, 0)),
            Image.new("RGB", (64, 48), (255, 255, 255))]


def _assert_same_tokenizer(exported, official) -> None:
    """Same tokenizer pipeline; the exported file writes BPE merges as "left right" strings, which the tokenizers < 0.20
    of transformers 4.40 need (the fixture's file is written by the installed tokenizers, as [left, right] lists)."""
    assert Tokenizer.from_file(str(exported / "tokenizer.json")).to_str() == Tokenizer.from_file(str(official / "tokenizer.json")).to_str()
    merges = json.loads((exported / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(merge, str) and len(merge.split(" ")) == 2 for merge in merges)


def _run_program(*arguments: str, cwd) -> subprocess.CompletedProcess:
    """The program in a fresh process, from another folder, importing the installed modules only."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    environment["PYTHONPATH"] = os.pathsep.join(p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != str(REPO))
    return subprocess.run([sys.executable, str(PROGRAM), *map(str, arguments)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def _save(model: OpenVLAForActionPrediction, processor: OpenVLAProcessor, folder) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _fine_tune_with_lora(model: OpenVLAForActionPrediction, processor: OpenVLAProcessor, steps: int = 4) -> OpenVLAForActionPrediction:
    """A few LoRA steps (all linear layers, projector trained fully) on 8 rows of a new dataset `NEW_KEY`, whose
    statistics join `norm_stats`; returns the merged model."""
    rng = np.random.default_rng(0)
    actions = rng.normal(0.0, [0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.5], size=(8, 7))
    actions[:, 6] = rng.integers(0, 2, size=8)
    stats = compute_action_stats(actions, mask=[True] * 6 + [False])
    model.config.norm_stats = {**model.config.norm_stats, NEW_KEY: stats}
    processor.norm_stats = dict(model.config.norm_stats)
    rows = [processor.process_example(make_test_image(10 + i), INSTRUCTIONS[i % 4], action, NEW_KEY) for i, action in enumerate(actions)]
    batch = processor.data_collator(rows)
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["projector"]))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(steps):
        loss = lora(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return lora.merge_and_unload().eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """official tiny checkpoint -> loaded -> LoRA on `NEW_KEY`, merged, saved (ours) -> exported by the program with
    `--verify`; plus the stand-in official code it copies."""
    root = tmp_path_factory.mktemp("export")
    info = make_official_checkpoint(root / "official", sharded=True)
    code = write_official_code_stand_ins(root / "official_code")
    model = load_official(info["path"])
    processor = OpenVLAProcessor.from_pretrained(info["path"])
    _save(_fine_tune_with_lora(model, processor), processor, root / "finetuned")
    result = _run_program("--to", "official", "--src", root / "finetuned", "--dst", root / "exported",
                          "--official_code", root / "official_code", "--verify", cwd=root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return {"info": info, "code": code, "finetuned": root / "finetuned", "exported": root / "exported", "stdout": result.stdout, "root": root}


def _actions_and_logits(model, processor, keys=(*OLD_KEYS, NEW_KEY)) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    inputs = processor(images=_images(), text=INSTRUCTIONS)
    with torch.no_grad():
        logits = model.predict_action_logits(**inputs)
    return {key: model.predict_action(**inputs, unnorm_key=key).numpy() for key in keys}, logits


def test_fine_tuned_model_round_trips_exactly_through_the_official_format(folders):
    assert '"verified": true' in folders["stdout"] and f"unnorm_key={NEW_KEY}: identical" in folders["stdout"]
    finetuned = OpenVLAForActionPrediction.from_pretrained(folders["finetuned"]).eval()
    exported = load_official(folders["exported"])  # this project's official-folder path
    before, before_logits = _actions_and_logits(finetuned, AutoProcessor.from_pretrained(folders["finetuned"], trust_remote_code=True))
    after, after_logits = _actions_and_logits(exported, OpenVLAProcessor.from_pretrained(folders["exported"]))
    assert_equal_up_to_float_rounding(after_logits, before_logits)  # weights elsewhere in memory (see conftest)
    for key in (*OLD_KEYS, NEW_KEY):  # decoded from the greedy bins: identical
        assert np.array_equal(before[key], after[key]), key
    assert not np.array_equal(after[NEW_KEY], after[OLD_KEYS[0]])
    # the export carries the fine-tuned weights, not the official ones
    original = load_official(folders["info"]["path"])
    _, original_logits = _actions_and_logits(original, OpenVLAProcessor.from_pretrained(folders["info"]["path"]), keys=())
    assert not torch.allclose(original_logits, after_logits, atol=1e-3)


def test_exported_folder_has_the_official_layout(folders):
    official, exported, info = folders["info"]["path"], folders["exported"], folders["info"]
    config = json.loads((exported / "config.json").read_text())
    source = json.loads((official / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                                  "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"}
    assert {key: value for key, value in config.items() if key != "norm_stats"} == {key: value for key, value in source.items() if key != "norm_stats"}
    assert config["norm_stats"] == {**info["norm_stats"], NEW_KEY: config["norm_stats"][NEW_KEY]} and len(config["norm_stats"]) == 3
    assert json.loads((exported / "dataset_statistics.json").read_text()) == config["norm_stats"]
    for name in JSON_FILES[1:]:
        assert json.loads((exported / name).read_text()) == json.loads((official / name).read_text()), name
    _assert_same_tokenizer(exported, official)
    for name, text in folders["code"].items():
        assert (exported / name).read_text() == text
    assert not any((exported / name).exists() for name in ("processor_config.json", "modeling_openvla.py", "configuration_openvla.py"))
    weights = load_official_state_dict(exported)
    original = load_official_state_dict(official)
    assert sorted(weights) == info["state_dict_keys"]
    assert all(weights[key].shape == original[key].shape and weights[key].dtype == original[key].dtype for key in weights)


def test_export_of_an_unchanged_official_checkpoint_gives_back_its_files(folders, tmp_path):
    info = make_official_checkpoint(tmp_path / "official", fused=False, single_backbone="siglip-vit-so400m", image_resize_strategy="letterbox")
    _save(load_official(info["path"]), OpenVLAProcessor.from_pretrained(info["path"]), tmp_path / "ours")
    export_official(tmp_path / "ours", tmp_path / "back", str(folders["root"] / "official_code"))
    for name in JSON_FILES:
        assert json.loads((tmp_path / "back" / name).read_text()) == json.loads((info["path"] / name).read_text()), name
    _assert_same_tokenizer(tmp_path / "back", info["path"])
    weights, original = load_official_state_dict(tmp_path / "back"), load_official_state_dict(info["path"])
    assert sorted(weights) == sorted(original) and all(torch.equal(weights[key], original[key]) for key in original)


def test_openvla_7b_config_exports_to_the_published_fields():
    config = OpenVLAConfig.openvla_7b()
    exported = official_config(config, "resize-naive", torch.bfloat16)
    for key, value in OPENVLA_7B_OFFICIAL_CONFIG.items():
        assert exported[key] == value, key
    assert "test_timm_model_kwargs" not in exported
    assert exported["vision_backbone_id"] == "dinosiglip-vit-so-224px" and exported["llm_backbone_id"] == "llama2-7b-pure"


def test_what_the_official_config_cannot_carry_is_caught_by_reading_it_back(folders):
    values = official_folder_config(folders["info"]["path"]).to_dict()
    values["vision_config"]["layer_norm_eps"] = 1e-5  # the official towers fix timm's 1e-6
    values["text_config"]["rms_norm_eps"] = 1e-5  # a Llama field: written to text_config, so it reads back
    config = OpenVLAConfig.from_dict(values)
    with pytest.raises(ValueError, match=r"another model \(vision_config.layer_norm_eps: 1e-05 -> 1e-06\)"):
        check_round_trip(config, official_config(config, "resize-naive", torch.float32))


# --- refusals -------------------------------------------------------------------------------------------------------
def _official_variant(info, **options) -> tuple[OpenVLAForActionPrediction, OpenVLAProcessor]:
    config = official_folder_config(info["path"])
    config = OpenVLAConfig.from_dict({**config.to_dict(), **options})
    return OpenVLAForActionPrediction(config).eval(), OpenVLAProcessor.from_pretrained(info["path"])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"action_decoding": "parallel"}, ["action_decoding='parallel'"]),
        ({"action_decoding": "parallel", "action_head": "l1_regression"}, ["action_head='l1_regression'", "action_decoding='parallel'"]),
        ({"action_decoding": "parallel", "action_chunk_size": 4}, ["action_chunk_size=4", "action_decoding='parallel'"]),
    ],
)
def test_architectures_the_official_code_cannot_express_are_refused(folders, tmp_path, options, named):
    model, processor = _official_variant(folders["info"], **options)
    _save(model, processor, tmp_path / "ours")
    with pytest.raises(ValueError, match="official code cannot express") as error:
        export_official(tmp_path / "ours", tmp_path / "out", str(folders["root"] / "official_code"))
    for text in named:
        assert text in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_dinov2_only_small_config_is_refused_by_the_program(folders, tmp_path, tokenizer):
    config = OpenVLAConfig.small_config(image_size=56, vision_dim=64, hidden_dim=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                        vocab_size=len(tokenizer), norm_stats={NEW_KEY: compute_action_stats(np.eye(7))})
    processor = OpenVLAProcessor.from_model_config(config, OpenVLAImageProcessor(image_size=56), tokenizer)
    _save(OpenVLAForActionPrediction(config), processor, tmp_path / "small")
    with pytest.raises(SystemExit) as error:
        convert_openvla_checkpoint.main(["--to", "official", "--src", str(tmp_path / "small"), "--dst", str(tmp_path / "out"),
                                         "--official_code", str(folders["root"] / "official_code")])
    message = str(error.value.code)
    assert message.startswith("error: ") and "cannot be written in the official OpenVLA format" in message
    assert "vision_layout='transformers'" in message and "action_binning='reference'" in message
    assert not (tmp_path / "out").exists()


def test_missing_official_code_is_named(folders, tmp_path, capsys):
    partial = tmp_path / "partial"
    write_official_code_stand_ins(partial)
    (partial / "modeling_prismatic.py").unlink()
    for official_code, why in ((partial, "not in that folder"), ("openvla/openvla-7b", "openvla/openvla-7b")):
        with pytest.raises(FileNotFoundError, match="modeling_prismatic.py|configuration_prismatic.py") as error:
            export_official(folders["finetuned"], tmp_path / "out", str(official_code))
        assert why in str(error.value) and "--official_code" in str(error.value)
        assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as error:
        convert_openvla_checkpoint.main(["--to", "official", "--src", str(folders["finetuned"]), "--dst", str(tmp_path / "out")])
    assert error.value.code == 2 and "--official_code" in capsys.readouterr().err
    assert set(OFFICIAL_CODE_FILES) == {"configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py"}
