"""Build the small OpenVLA model, save it with its processor, reload both through the Auto classes and predict.

    python scripts/quickstart.py [--output outputs/quickstart]

Runs offline on CPU in seconds: the model has random weights (train it with scripts/finetune.py), so the action is
arbitrary, but every step a user takes with a real checkpoint happens here.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoProcessor, AutoTokenizer

from configuration_openvla import OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction
from processing_openvla import OpenVLAImageProcessor, OpenVLAProcessor, compute_action_stats

REPO = Path(__file__).resolve().parents[1]


def sample_image(size: int = 112) -> Image.Image:
    """A table with a red block and a blue ball."""
    image = Image.new("RGB", (size, size), (200, 180, 150))
    draw = ImageDraw.Draw(image)
    draw.rectangle([20, 20, 40, 40], fill=(220, 30, 30))
    draw.ellipse([70, 60, 90, 80], fill=(30, 60, 220))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO / "outputs" / "quickstart")
    parser.add_argument("--instruction", default="pick up the red block")
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(REPO / "assets" / "tokenizer")
    processor = OpenVLAProcessor(image_processor=OpenVLAImageProcessor(image_size=112), tokenizer=tokenizer)
    norm_stats = {"demo_robot": compute_action_stats(np.random.default_rng(0).normal(0.0, 0.05, size=(1000, 7)))}
    config = OpenVLAConfig.small_config(vocab_size=len(tokenizer), norm_stats=norm_stats)
    model = OpenVLAForActionPrediction(config).eval()
    print(f"Built the small OpenVLA config: {config.param_count():,} parameters, {config.num_patches} image tokens.")

    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"Saved model, processor and remote code to {args.output}: {sorted(p.name for p in args.output.iterdir())}")

    model = AutoModel.from_pretrained(args.output, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.output, trust_remote_code=True)
    print(f"Reloaded through the Auto classes: {type(model).__name__}, {type(processor).__name__}")

    inputs = processor(images=sample_image(), text=args.instruction)
    action = model.predict_action(**inputs, unnorm_key="demo_robot")
    print(f"Instruction: {args.instruction!r}")
    print(f"Action [dx, dy, dz, droll, dpitch, dyaw, gripper]: {np.round(action[0].numpy(), 4).tolist()}")


if __name__ == "__main__":
    main()
