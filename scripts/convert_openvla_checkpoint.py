"""Convert an official OpenVLA checkpoint (e.g. `openvla/openvla-7b`) into a native folder of this project, and back.

    python scripts/convert_openvla_checkpoint.py --src openvla/openvla-7b --dst openvla-7b-hf --dtype bfloat16
    python scripts/convert_openvla_checkpoint.py --src ./openvla-7b --dst ./openvla-7b-hf --verify
    python scripts/convert_openvla_checkpoint.py --src ./openvla-7b --dst ./openvla-7b-hf --verify_only
    python scripts/convert_openvla_checkpoint.py --to official --src outputs/my-lora --dst my-openvla \
        --official_code openvla/openvla-7b --verify

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

`--to official` is the inverse: `--src` is a folder of ours whose architecture the official code can express (a
converted official checkpoint, fine-tuned here with or without LoRA, merged), and `--dst` receives the official layout
(Prismatic `config.json` with the official `auto_map` and every `norm_stats` entry, timm weight names,
`preprocessor_config.json`, tokenizer files, `generation_config.json`, `dataset_statistics.json`) plus the official
remote code, copied from the official checkpoint `--official_code` (a folder or Hub id; this project does not ship it).
Other models are refused with an error naming what cannot be written (`openvla_tools.official_format`). `--verify`
then compares the actions of `--src` (Auto classes) and of `--dst` loaded by this project's official-folder path.
"""

import argparse
import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from configuration_openvla import OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction
from openvla_tools.model_card import write_model_card
from openvla_tools.official_format import export_official, official_folder_config
from processing_openvla import OpenVLAProcessor

MODULES = ("configuration_openvla.py", "modeling_openvla.py", "processing_openvla.py")
MODULE_DIR = Path(inspect.getfile(OpenVLAConfig)).resolve().parent  # where the installed modules live
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VERIFY_INSTRUCTIONS = ("pick up the red block", "open the drawer", "put the cup on the plate")


def convert(src: str, dst: Path, dtype: str = "auto", max_shard_size: str = "5GB", base_model: str | None = None) -> Path:
    """Load the official checkpoint `src` and write the native folder `dst`; returns `dst`."""
    model = OpenVLAForActionPrediction.from_pretrained(src, config=official_folder_config(src), dtype=DTYPES[dtype])
    processor = OpenVLAProcessor.from_pretrained(src)
    if model.config.vision_layout != "timm":
        print(f"note: {src} is not an official (Prismatic) checkpoint; it is re-saved as it is.")
    dst.mkdir(parents=True, exist_ok=True)
    # save_original_format=False: store the weights under our module names rather than revert to the timm names
    model.save_pretrained(dst, max_shard_size=max_shard_size, save_original_format=False)
    processor.save_pretrained(dst)
    for module in MODULES:  # save_pretrained copies them too; make sure all three are there
        if not (dst / module).exists():
            shutil.copy(MODULE_DIR / module, dst / module)
    if base_model is None and not Path(src).exists():
        base_model = src  # a Hub id
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


def _load(folder: str | Path, official: bool, dtype: str):
    """Model and processor of `folder`: an official folder through this project's classes (its `auto_map` names the
    official remote code), one of ours through the Auto classes and the folder's remote code."""
    if official:
        model = OpenVLAForActionPrediction.from_pretrained(folder, config=official_folder_config(folder), dtype=DTYPES[dtype])
        return model.eval(), OpenVLAProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=DTYPES[dtype])
    return model.eval(), AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def verify(src: str, dst: Path, dtype: str = "auto", max_keys: int | None = None, to: str = "ours") -> bool:
    """Actions of `src` and of `dst` for the same inputs, per `unnorm_key` (the official folder of the two is loaded
    with this project's classes, the other with the Auto classes); prints a report and returns whether all are
    identical. Loads one model at a time."""
    config = OpenVLAConfig.from_pretrained(src)
    unnorm_keys = sorted(config.norm_stats)[:max_keys] or [None]
    images = _verify_images(config.image_size)
    model, processor = _load(src, official=to == "ours", dtype=dtype)
    before = _predict_all(model, processor, images, unnorm_keys)
    del model
    model, processor = _load(dst, official=to == "official", dtype=dtype)
    after = _predict_all(model, processor, images, unnorm_keys)
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
    parser.add_argument("--src", required=True, help="official OpenVLA folder or Hub id (with --to official: a folder of ours)")
    parser.add_argument("--dst", required=True, type=Path, help="output folder")
    parser.add_argument("--to", default="ours", choices=("ours", "official"), help="layout written to --dst")
    parser.add_argument("--official_code", default=None, help="with --to official: official checkpoint folder or Hub id "
                        "(e.g. openvla/openvla-7b) whose remote code (*_prismatic.py) is copied to --dst")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="weight dtype (auto: as stored)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard")
    parser.add_argument("--base_model", default=None, help="Hub id for the model card (default: --src if a Hub id)")
    parser.add_argument("--verify", action="store_true", help="after converting, compare predictions before/after")
    parser.add_argument("--verify_only", action="store_true", help="only compare predictions of --src and --dst")
    parser.add_argument("--verify_keys", type=int, default=None, help="check only the first N unnorm_keys")
    args = parser.parse_args(argv)
    if args.to == "official" and args.official_code is None and not args.verify_only:
        parser.error("--to official needs --official_code: the official checkpoint (folder or Hub id, e.g. "
                     "openvla/openvla-7b) whose configuration/modeling/processing_prismatic.py go into --dst.")
    if not args.verify_only:
        if args.to == "official":
            try:
                export_official(args.src, args.dst, args.official_code, DTYPES[args.dtype], args.max_shard_size)
            except (ValueError, FileNotFoundError) as error:
                sys.exit(f"error: {error}")
        else:
            convert(args.src, args.dst, args.dtype, args.max_shard_size, args.base_model)
        print(f"wrote {args.dst}")
    if args.verify or args.verify_only:
        return 0 if verify(args.src, args.dst, args.dtype, args.verify_keys, args.to) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
