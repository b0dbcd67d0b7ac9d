"""OpenVLAImageProcessor and OpenVLAProcessor: inputs, padding, labels and errors."""

import numpy as np
import pytest
import torch
from build_tokenizer import build_tokenizer
from conftest import INSTRUCTIONS, make_processor, random_images
from PIL import Image

from processing_openvla import (
    IGNORE_INDEX,
    OpenVLADataCollator,
    OpenVLAImageProcessor,
    OpenVLAProcessor,
    compute_action_stats,
)


def _manual_pixels(image: Image.Image, size: int, mean, std) -> np.ndarray:
    resized = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return ((resized - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def test_image_processor_matches_manual_transform_for_every_input_type():
    image = random_images(1, size=(70, 90))[0]
    processor = OpenVLAImageProcessor(image_size=56)
    expected = _manual_pixels(image, 56, processor.image_mean, processor.image_std)
    array = np.asarray(image)
    inputs = {
        "pil": image,
        "numpy_hwc_uint8": array,
        "numpy_chw_uint8": array.transpose(2, 0, 1),
        "torch_chw_uint8": torch.from_numpy(array.transpose(2, 0, 1).copy()),
    }
    for name, value in inputs.items():
        pixels = processor(value, return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, 56, 56), name
        np.testing.assert_allclose(pixels[0].numpy(), expected, atol=1e-5, err_msg=name)
    as_float = torch.from_numpy(array.transpose(2, 0, 1) / 255.0).float()
    np.testing.assert_allclose(processor(as_float, return_tensors="pt")["pixel_values"][0].numpy(), expected, atol=0.03)
    batch = processor(random_images(3), return_tensors="pt")["pixel_values"]
    assert batch.shape == (3, 3, 56, 56)


def test_fused_normalisation_stacks_six_channels_and_round_trips_json(tmp_path):
    image = random_images(1)[0]
    processor = OpenVLAImageProcessor(image_size=28, fused_image_mean=[0.5, 0.5, 0.5], fused_image_std=[0.5, 0.5, 0.5])
    pixels = processor(image, return_tensors="pt")["pixel_values"][0].numpy()
    assert pixels.shape == (6, 28, 28)
    np.testing.assert_allclose(pixels[:3], _manual_pixels(image, 28, processor.image_mean, processor.image_std), atol=1e-5)
    np.testing.assert_allclose(pixels[3:], _manual_pixels(image, 28, [0.5] * 3, [0.5] * 3), atol=1e-5)
    processor.save_pretrained(tmp_path)
    reloaded = OpenVLAImageProcessor.from_pretrained(tmp_path)
    assert reloaded.image_size == 28 and list(reloaded.fused_image_std) == [0.5, 0.5, 0.5]
    np.testing.assert_array_equal(reloaded(image, return_tensors="pt")["pixel_values"][0].numpy(), pixels)
    with pytest.raises(ValueError, match="both fused_image_mean and fused_image_std"):
        OpenVLAImageProcessor(fused_image_mean=[0.5, 0.5, 0.5])


def test_processor_builds_left_padded_rows_with_image_placeholders(processor, tokenizer):
    batch = processor(images=random_images(3), text=INSTRUCTIONS)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    assert batch["pixel_values"].shape == (3, 3, 56, 56)
    num_patches = (56 // 14) ** 2
    for row, mask, instruction in zip(batch["input_ids"], batch["attention_mask"], INSTRUCTIONS):
        real = row[mask.bool()]
        assert torch.all(row[~mask.bool()] == tokenizer.pad_token_id) and torch.all(mask[: (~mask.bool()).sum()] == 0)
        assert real[0] == tokenizer.bos_token_id
        assert torch.all(real[1 : 1 + num_patches] == processor.image_token_id)
        prompt = tokenizer.decode(real[1 + num_patches :])
        assert prompt == f"In: What action should the robot take to {instruction}?\nOut:"
    assert processor.image_token_id == len(tokenizer) and processor.action_token_end == len(tokenizer)


def test_labels_supervise_only_the_action_tokens(processor):
    actions = np.array([[-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0], [0.1] * 7])
    batch = processor(images=random_images(2), text=INSTRUCTIONS[:2], actions=actions)
    labels, input_ids = batch["labels"], batch["input_ids"]
    expected_ids = torch.from_numpy(processor.action_tokenizer.encode(actions))
    assert torch.all(labels[:, :-7] == IGNORE_INDEX)
    assert torch.equal(labels[:, -7:], expected_ids) and torch.equal(input_ids[:, -7:], expected_ids)
    assert labels[0, -7] == len(processor.tokenizer) - 1 and labels[0, -1] == len(processor.tokenizer) - 256


def test_single_sample_and_chunked_actions(processor):
    single = processor(images=random_images(1)[0], text="go to the red block", actions=np.zeros(7))
    assert single["input_ids"].shape[0] == 1 and (single["labels"] != IGNORE_INDEX).sum() == 7
    chunked = processor(images=random_images(2), text=INSTRUCTIONS[:2], actions=np.zeros((2, 4, 7)))
    assert ((chunked["labels"] != IGNORE_INDEX).sum(-1) == 28).all()


def test_actions_are_normalised_with_the_dataset_statistics(tokenizer):
    rng = np.random.default_rng(0)
    raw = rng.normal(10.0, 3.0, size=(200, 7))
    stats = {"robot": compute_action_stats(raw)}
    processor = make_processor(tokenizer, norm_stats=stats)
    batch = processor(images=random_images(2), text=INSTRUCTIONS[:2], actions=raw[:2], dataset_name="robot")
    expected = processor.action_tokenizer.encode(raw[:2], "robot")
    assert torch.equal(batch["labels"][:, -7:], torch.from_numpy(expected))
    decoded = processor.batch_decode_actions(batch["labels"][:, -7:].numpy(), "robot")
    span = np.array(stats["robot"]["action"]["q99"]) - np.array(stats["robot"]["action"]["q01"])
    inside = np.all((raw[:2] > stats["robot"]["action"]["q01"]) & (raw[:2] < stats["robot"]["action"]["q99"]), axis=1)
    assert np.all(np.abs(decoded - raw[:2])[inside] <= span / 255 + 1e-4)


def test_pad_token_is_reused_not_added(tokenizer):
    assert tokenizer.pad_token_id is None
    length = len(tokenizer)
    processor = make_processor(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and len(tokenizer) == length == processor.action_token_end


def test_collator_pads_rows_made_one_at_a_time(processor):
    images = random_images(2)
    rows = [processor.process_example(image, instruction, np.zeros(7)) for image, instruction in zip(images, INSTRUCTIONS[:2])]
    collated = processor.data_collator(rows)
    assert isinstance(processor.data_collator, OpenVLADataCollator)
    direct = processor(images=images, text=INSTRUCTIONS[:2], actions=np.zeros((2, 7)))
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(collated[key], direct[key]), key


def test_save_and_reload(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = OpenVLAProcessor.from_pretrained(tmp_path)
    images = random_images(2)
    for key, value in processor(images=images, text=INSTRUCTIONS[:2]).items():
        assert torch.equal(value, reloaded(images=images, text=INSTRUCTIONS[:2])[key]), key


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p(images=random_images(3), text=INSTRUCTIONS[:2]), "Got 3 images and 2 instructions"),
        (lambda p: p(images=random_images(2), text=INSTRUCTIONS[:2], actions=np.full((2, 7), np.nan)), "NaN or inf"),
        (lambda p: p(images=random_images(2), text=INSTRUCTIONS[:2], actions=np.zeros((2, 6))), "action_dim=7"),
        (lambda p: p(images=random_images(2), text=INSTRUCTIONS[:2], actions=np.zeros((3, 7))), "one action per sample"),
        (lambda p: p(images=random_images(1), text="move " * 80), "more than max_text_len=64"),
        (lambda p: p(images=None, text="go"), "needs both images and text"),
    ],
    ids=["count-mismatch", "nan-actions", "action-dim", "action-count", "long-prompt", "no-images"],
)
def test_bad_inputs_raise(processor, call, message):
    with pytest.raises(ValueError, match=message):
        call(processor)


def test_vocabulary_smaller_than_the_bins_raises():
    small = build_tokenizer(vocab_size=300)
    with pytest.raises(ValueError, match="num_action_bins=512"):
        make_processor(small, num_action_bins=512)
    with pytest.raises(ValueError, match="Special tokens"):
        make_processor(small, num_action_bins=299)
