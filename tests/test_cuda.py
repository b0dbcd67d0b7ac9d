"""The behaviour users rely on, on a CUDA GPU in bfloat16: batched prediction equals one sample at a time, a saved
model reloads onto the GPU unchanged, and LoRA and the fine-tuning program train there. Skipped without CUDA
(`scripts/gpu_check.sh` runs them on a GPU machine; docs/gpu.md has the results)."""

import json

import pytest
import torch
from conftest import INSTRUCTIONS, make_model, make_processor, random_images
from test_finetune import QUICK, run_finetune

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
# bfloat16 keeps 8 bits of mantissa: logits near 1 computed in another batch composition differ by one or two units of its last
# place, so they are compared within that, and a bin only where the top two bins are further apart than it.
BF16_LOGIT_TOLERANCE = 0.02


def bf16_model(tokenizer, **overrides):
    return make_model(tokenizer, **overrides).to(device=DEVICE, dtype=torch.bfloat16)


def assert_same_bins(batched: torch.Tensor, single: torch.Tensor) -> None:
    """`[..., num_bins]` logits: close within bf16 rounding, and the same greedy bin wherever the choice is clear."""
    torch.testing.assert_close(batched.float(), single.float(), atol=BF16_LOGIT_TOLERANCE, rtol=0)
    top2 = single.float().topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * BF16_LOGIT_TOLERANCE
    assert torch.equal(batched.argmax(-1)[clear], single.argmax(-1)[clear])


@pytest.mark.parametrize("decoding", ["autoregressive", "parallel"])
def test_bf16_batched_prediction_equals_single_samples(tokenizer, decoding):
    processor = make_processor(tokenizer)
    model = bf16_model(tokenizer, action_decoding=decoding, action_chunk_size=4 if decoding == "parallel" else 1)
    images = random_images(len(INSTRUCTIONS))
    batch = processor(images=images, text=INSTRUCTIONS).to(DEVICE, torch.bfloat16)
    batched = model.predict_action_logits(**batch)
    for index, (image, instruction) in enumerate(zip(images, INSTRUCTIONS)):
        single = processor(images=[image], text=[instruction]).to(DEVICE, torch.bfloat16)
        assert_same_bins(batched[index : index + 1], model.predict_action_logits(**single))


def test_bf16_save_and_load_onto_the_gpu(tokenizer, tmp_path):
    from transformers import AutoModel

    processor = make_processor(tokenizer)
    model = bf16_model(tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.bfloat16, device_map=DEVICE).eval()
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, loaded.state_dict()[name]), name
    batch = processor(images=random_images(2), text=INSTRUCTIONS[:2]).to(DEVICE, torch.bfloat16)
    torch.testing.assert_close(loaded.predict_action(**batch), model.predict_action(**batch), rtol=0, atol=0)


def test_a_lora_step_in_bf16_lowers_the_loss(tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    processor = make_processor(tokenizer)
    model = get_peft_model(
        bf16_model(tokenizer).train(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["projector"])
    )
    batch = processor(images=random_images(4), text=INSTRUCTIONS + INSTRUCTIONS[:1], actions=torch.rand(4, 7) * 2 - 1).to(DEVICE, torch.bfloat16)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.9 * losses[0], losses


def test_the_finetune_program_trains_on_the_gpu_in_bf16(tmp_path):
    output = tmp_path / "run"
    run_finetune("--output_dir", str(output), "--max_steps", "6", "--eval_steps", "6", "--save_steps", "6",
                 "--closed_loop_episodes", "2", "--eval_split_ratio", "0.25", "--bf16", *QUICK)
    metrics = json.loads((output / "eval_results.json").read_text())
    assert metrics["train_steps"] == 6 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
