"""Convert an official OpenVLA checkpoint (e.g. `openvla/openvla-7b`) into a native folder of this project.

    python scripts/convert_openvla_checkpoint.py --src openvla/openvla-7b --dst openvla-7b-hf --dtype bfloat16
    python scripts/convert_openvla_checkpoint.py --src ./openvla-7b --dst ./openvla-7b-hf --verify
    python scripts/convert_openvla_checkpoint.py --src ./openvla-7b --dst ./openvla-7b-hf --verify_only

`--src` is an official folder or Hub id (Prismatic `config.json`, timm key names). Its config is mapped onto
`OpenVLAConfig` (see `OpenVLAConfig.official_options`), its weights are renamed on load by the weight conversions that
`modeling_openvla` registers with transformers (`timm_dinov2_conversions`, `timm_siglip_conversions`), and `--dst`
receives:

- `config.json` (our `OpenVLAConfig`, `auto_map`, the official `norm_stats` unchanged, `action_binning="openvla"`),
- safetensors weights under our module names (sharded above `--max_shard_size`), `generation_config.json`,
- `processor_config.json` (processor and image-processor settings) and the tokenizer files,
- `configuration_openvla.py`, `modeling_openvla.py`, `processing_openvla.py` and a model card (`README.md`).

`AutoModel.from_pretrained(dst, trust_remote_code=True)` and `AutoProcessor.from_pretrained(dst,
trust_remote_code=True)` load it offline. `--verify` (or `--verify_only` for an existing `--dst`) then predicts actions
for a few images (noise, all black, all white) and every `unnorm_key` with the source loaded directly and with the
converted folder loaded through the Auto classes, and fails unless they are identical.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from configuration_openvla import OpenVLAConfig  # noqa: E402
from modeling_openvla import OpenVLAForActionPrediction  # noqa: E402
from processing_openvla import OpenVLAProcessor  # noqa: E402

MODULES = ("configuration_openvla.py", "modeling_openvla.py", "processing_openvla.py")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VERIFY_INSTRUCTIONS = ("pick up the red block", "open the drawer", "put the cup on the plate")


def convert(src: str, dst: Path, dtype: str = "auto", max_shard_size: str = "5GB", base_model: str | None = None) -> Path:
    """Load the official checkpoint `src` and write the native folder `dst`; returns `dst`."""
    model = OpenVLAForActionPrediction.from_pretrained(src, dtype=DTYPES[dtype])
    processor = OpenVLAProcessor.from_pretrained(src)
    if model.config.vision_layout != "timm":
        print(f"note: {src} is not an official (Prismatic) checkpoint; it is re-saved as it is.")
    dst.mkdir(parents=True, exist_ok=True)
    # save_original_format=False: store the weights under our module names rather than revert to the timm names
    model.save_pretrained(dst, max_shard_size=max_shard_size, save_original_format=False)
    processor.save_pretrained(dst)
    for module in MODULES:  # save_pretrained copies them too; make sure all three are there
        if not (dst / module).exists():
            shutil.copy(REPO / module, dst / module)
    if base_model is None and not Path(src).exists():
        base_model = src  # a Hub id
    from model_card import write_model_card

    write_model_card(
        dst,
        model.config,
        metrics=None,
        base_model=base_model,
        datasets=None,
        training=(
            f"Converted from the official OpenVLA checkpoint `{src}` with `scripts/convert_openvla_checkpoint.py` "
            f"(weights renamed and q/k/v split, stored as {model.dtype}; no training). It predicts the official actions: "
            "official binning (`action_binning='openvla'`) and the checkpoint's `norm_stats`."
        ),
        repo_id=None,
    )
    return dst


def _verify_images(size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (size + 16, size + 40, 3), dtype=np.uint8))
    return [noise, Image.new("RGB", (size, size), (0, 0, 0)), Image.new("RGB", (size, size), (255, 255, 255))]


def _predict_all(model, processor, images, unnorm_keys) -> dict[str, np.ndarray]:
    inputs = processor(images=images, text=list(VERIFY_INSTRUCTIONS[: len(images)])).to(model.device)
    return {key: model.predict_action(**inputs, unnorm_key=key).float().cpu().numpy() for key in unnorm_keys}


def verify(src: str, dst: Path, dtype: str = "auto", max_keys: int | None = None) -> bool:
    """Actions of `src` (loaded directly) and of `dst` (loaded with the Auto classes) for the same inputs, per
    `unnorm_key`; prints a report and returns whether all are identical. Loads one model at a time."""
    from transformers import AutoModel, AutoProcessor

    config = OpenVLAConfig.from_pretrained(src)
    unnorm_keys = sorted(config.norm_stats)[:max_keys] or [None]
    images = _verify_images(config.image_size)
    model = OpenVLAForActionPrediction.from_pretrained(src, dtype=DTYPES[dtype]).eval()
    before = _predict_all(model, OpenVLAProcessor.from_pretrained(src), images, unnorm_keys)
    del model
    model = AutoModel.from_pretrained(dst, trust_remote_code=True, dtype=DTYPES[dtype]).eval()
    after = _predict_all(model, AutoProcessor.from_pretrained(dst, trust_remote_code=True), images, unnorm_keys)
    same = True
    for key in unnorm_keys:
        equal = np.array_equal(before[key], after[key])
        same &= equal
        difference = float(np.abs(before[key] - after[key]).max())
        print(f"unnorm_key={key}: {'identical' if equal else f'DIFFERENT (max |diff| {difference:.3g})'}")
    print(json.dumps({"verified": bool(same), "images": len(images), "unnorm_keys": len(unnorm_keys)}))
    return bool(same)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="official OpenVLA folder or Hub id")
    parser.add_argument("--dst", required=True, type=Path, help="output folder")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="weight dtype (auto: as stored)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard")
    parser.add_argument("--base_model", default=None, help="Hub id for the model card (default: --src if a Hub id)")
    parser.add_argument("--verify", action="store_true", help="after converting, compare predictions before/after")
    parser.add_argument("--verify_only", action="store_true", help="only compare predictions of --src and --dst")
    parser.add_argument("--verify_keys", type=int, default=None, help="check only the first N unnorm_keys")
    args = parser.parse_args(argv)
    if not args.verify_only:
        convert(args.src, args.dst, args.dtype, args.max_shard_size, args.base_model)
        print(f"wrote {args.dst}")
    if args.verify or args.verify_only:
        return 0 if verify(args.src, args.dst, args.dtype, args.verify_keys) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
