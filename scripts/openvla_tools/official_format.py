"""Write a model of this project in the official OpenVLA (Prismatic) checkpoint layout, the inverse of loading one.

`export_official(src, dst, official_code)` reads a folder of ours whose architecture the official remote code can
express (a converted official checkpoint, fine-tuned here with or without LoRA and merged) and writes `dst` as the
official `openvla/openvla-7b` folder is laid out (docs/official_format.md, "Writing the official format"):

- `config.json`: the Prismatic fields (`vision_backbone_id`, `llm_backbone_id`, `arch_specifier`, `timm_model_ids`,
  `image_sizes`, `n_action_bins`, `pad_to_multiple_of`, `llm_max_length`, `text_config`, `norm_stats`, ...) and the
  official `auto_map` (`configuration_prismatic.OpenVLAConfig`, `modeling_prismatic.OpenVLAForActionPrediction`);
- safetensors weights under the official timm / Prismatic names (the registered weight conversions, reverted);
- `preprocessor_config.json` (`PrismaticImageProcessor`), the tokenizer files (`LlamaTokenizer`, `<PAD>`),
  `generation_config.json` and `dataset_statistics.json` (every `norm_stats` entry, as official fine-tuning writes it);
- the official remote code (`configuration_prismatic.py`, `modeling_prismatic.py`, `processing_prismatic.py`), copied
  from the official checkpoint `official_code` (a folder or a Hub id): it is not ours to ship.

A model the official code cannot express (transformers-layout vision towers such as `small_config`'s DINOv2-only one,
parallel decoding, the L1 regression head, action chunks, ...) is refused with a `ValueError` naming every option that
cannot be written. Before anything is written, the official `config.json` is read back through
`OpenVLAConfig.official_options` and must describe the same model.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download, save_torch_state_dict
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
from transformers import AutoProcessor, PreTrainedConfig
from transformers.core_model_loading import revert_weight_conversion
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from configuration_openvla import LLAMA_EMPTY_TOKEN, OFFICIAL_CONFIG_KEYS, TIMM_VISION_TOWERS, OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction
from processing_openvla import DEFAULT_PROMPT_TEMPLATE, OpenVLAImageProcessor, OpenVLAProcessor

OFFICIAL_CODE_FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")
OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_prismatic.OpenVLAConfig",
    "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
}
OFFICIAL_PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
    "AutoProcessor": "processing_prismatic.PrismaticProcessor",
}
# The transformers version the official remote code pins (and the published checkpoints were written with).
OFFICIAL_TRANSFORMERS_VERSION = "4.40.1"
# Official vision backbones (`configuration_prismatic.VISION_BACKBONE_TO_TIMM_ID` / `VISION_BACKBONE_TO_RESOLUTION`)
# built from the two timm towers this project loads: timm ids -> (`vision_backbone_id`, the image size it fixes).
DINOV2_TIMM_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_TIMM_IDS = {224: "vit_so400m_patch14_siglip_224", 384: "vit_so400m_patch14_siglip_384"}
OFFICIAL_VISION_BACKBONES = {
    (DINOV2_TIMM_ID,): ("dinov2-vit-l", 224),
    (SIGLIP_TIMM_IDS[224],): ("siglip-vit-so400m", 224),
    (SIGLIP_TIMM_IDS[384],): ("siglip-vit-so400m-384px", 384),
    (DINOV2_TIMM_ID, SIGLIP_TIMM_IDS[224]): ("dinosiglip-vit-so-224px", 224),
    (DINOV2_TIMM_ID, SIGLIP_TIMM_IDS[384]): ("dinosiglip-vit-so-384px", 384),
}
# Full-size towers (the timm model ids' own sizes) and the timm data config (`means` / `stds`) of each.
TIMM_TOWER_SIZES = {
    "dinov2_with_registers": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "siglip_vision_model": {"embed_dim": 1152, "depth": 27, "num_heads": 16},
}
# Not an official field: the vision towers of this project's tiny test checkpoints (and of their exports) are smaller
# than their timm model ids, which the official format cannot say, so their timm constructor sizes (one dict per tower,
# names as in `TIMM_SIZE_FIELDS`) travel in it. `config_from_official` reads it; the library ignores it.
TEST_TOWER_SIZES_FIELD = "test_timm_model_kwargs"
# timm constructor sizes -> the transformers sub-config fields they set.
TIMM_SIZE_FIELDS = {"embed_dim": "hidden_size", "depth": "num_hidden_layers", "num_heads": "num_attention_heads"}
TIMM_TOWER_NORMALIZATION = {
    "dinov2_with_registers": (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)),
    "siglip_vision_model": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}
# The official LLM backbone: Llama-2 7B. In the official code `llm_backbone_id` only selects the Llama config class;
# the sizes come from `text_config`.
OFFICIAL_LLM_BACKBONE = ("llama2-7b-pure", "meta-llama/Llama-2-7b-hf")
# `LlamaConfig` of transformers 4.40 (the official code's): its fields and defaults. `text_config` holds the fields
# that differ from them, as 4.40 writes it.
LLAMA_4_40_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
}
# Options of ours that the official code fixes: option -> (its official value, what the official code does instead).
FIXED_OPTIONS = {
    "vision_layout": ("timm", "the official code builds timm vision towers (vit_large_patch14_reg4_dinov2, vit_so400m_patch14_siglip); only models converted from an official checkpoint have their parameter set"),
    "action_decoding": ("autoregressive", "the official predict_action generates one action token per step"),
    "action_chunk_size": (1, "the official code predicts one action per call, no chunks"),
    "action_head": ("tokens", "the official code decodes action tokens with the LM head; it has no regression head"),
    "prefix_attention": ("causal", "the official decoder is causal throughout"),
    "vision_stem": ("patch", "the official towers embed patches with one strided convolution"),
    "action_binning": ("openvla", "the official code decodes bin centres of linspace(-1, 1, n_action_bins)"),
    "action_min": (-1.0, "the official bins cover [-1, 1]"),
    "action_max": (1.0, "the official bins cover [-1, 1]"),
    "vision_feature_layer": (-2, "the official towers give the second-to-last block's patches"),
    "rope": (True, "the official Llama uses rotary position embeddings"),
    "tie_word_embeddings": (False, "the official Llama has its own LM head"),
    "prompt_suffix_token": (LLAMA_EMPTY_TOKEN, "the official predict_action appends Llama-2's empty token"),
}
# Config entries that describe neither the computation nor the data (left out of the read-back comparison).
_BOOKKEEPING = {"architectures", "auto_map", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "id2label",
                "label2id", "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout",
                "drop_path_rate", "initializer_range", "output_hidden_states", "output_attentions", "return_dict",
                "use_cache", "chunk_size_feed_forward", "problem_type", "is_encoder_decoder"}


def unsupported_options(config: OpenVLAConfig, processor: OpenVLAProcessor) -> list[str]:
    """What of `config` / `processor` the official code cannot express, one line each (empty: exportable)."""
    problems = [
        f"{name}={getattr(config, name)!r} ({reason}; it needs {name}={value!r})"
        for name, (value, reason) in FIXED_OPTIONS.items()
        if getattr(config, name) != value
    ]
    text = config.text_config
    if text.model_type != "llama":
        problems.append(f"text_config.model_type={text.model_type!r} (official OpenVLA uses a Llama language model)")
    rope_type = (getattr(text, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        problems.append(f"text_config rope_type={rope_type!r} (transformers 4.40's Llama has the default rotary embedding)")
    if getattr(text, "mlp_bias", False):
        problems.append("text_config.mlp_bias=True (transformers 4.40's Llama has no MLP biases)")
    if getattr(text, "head_dim", None) not in (None, text.hidden_size // text.num_attention_heads):
        problems.append(f"text_config.head_dim={text.head_dim} (transformers 4.40's Llama uses hidden_size // num_attention_heads)")
    if config.vision_layout == "timm":
        problems += _tower_problems(config)
    if processor.prompt_template != DEFAULT_PROMPT_TEMPLATE:
        problems.append(f"prompt_template={processor.prompt_template!r} (official users prompt {DEFAULT_PROMPT_TEMPLATE!r})")
    problems += _image_processor_problems(processor.image_processor, config)
    merges = json.loads(processor.tokenizer.backend_tokenizer.to_str())["model"].get("merges") or []
    if any(" " in part for pair in merges if isinstance(pair, list) for part in pair):
        problems.append("a tokenizer with BPE merges of tokens that contain spaces (the tokenizers < 0.20 of transformers 4.40 cannot read them)")
    if not config.norm_stats:
        problems.append("norm_stats={} (the official predict_action needs the statistics of an unnorm_key)")
    for key, stats in (config.norm_stats or {}).items():
        if len(stats["action"]["q01"]) != config.action_dim:
            problems.append(
                f"norm_stats[{key!r}] with {len(stats['action']['q01'])} action dimensions (the official code generates "
                f"one token per dimension of the statistics; the model predicts action_dim={config.action_dim})"
            )
    return problems


def _towers(config: OpenVLAConfig) -> list[PreTrainedConfig]:
    return [config.vision_config] + ([config.fused_vision_config] if config.fused_vision_config is not None else [])


def _timm_ids(config: OpenVLAConfig) -> tuple[str, ...]:
    """The official timm model ids of the vision towers (the SigLIP id names its image size; a tower of another kind
    keeps its model type, which no official backbone has)."""
    ids = {"dinov2_with_registers": DINOV2_TIMM_ID, "siglip_vision_model": SIGLIP_TIMM_IDS.get(config.image_size, SIGLIP_TIMM_IDS[224])}
    return tuple(ids.get(tower.model_type, tower.model_type) for tower in _towers(config))


def _tower_problems(config: OpenVLAConfig) -> list[str]:
    timm_ids = _timm_ids(config)
    if timm_ids not in OFFICIAL_VISION_BACKBONES:
        return [f"vision towers {[tower.model_type for tower in _towers(config)]} (official backbones: {sorted(OFFICIAL_VISION_BACKBONES)})"]
    if not any(_reduced_tower_sizes(config)):
        resolution = OFFICIAL_VISION_BACKBONES[timm_ids][1]
        if config.image_size != resolution:
            return [f"image_size={config.image_size} (the official {OFFICIAL_VISION_BACKBONES[timm_ids][0]!r} backbone sees {resolution} px images)"]
    return []


def _image_processor_problems(image_processor: OpenVLAImageProcessor, config: OpenVLAConfig) -> list[str]:
    problems = []
    if not (image_processor.do_resize and image_processor.do_rescale and image_processor.do_normalize):
        problems.append("an image processor that skips resizing, rescaling or normalising (the official one always does all three)")
    if abs(image_processor.rescale_factor - 1 / 255) > 1e-12:
        problems.append(f"rescale_factor={image_processor.rescale_factor} (the official processor divides by 255)")
    if image_processor.image_size != config.image_size:
        problems.append(f"an image processor for {image_processor.image_size} px images (the model sees {config.image_size} px)")
    if (image_processor.fused_image_mean is not None) != (config.fused_vision_config is not None):
        problems.append("an image processor whose normalisations do not match the vision towers (one per tower)")
    return problems


def _reduced_tower_sizes(config: OpenVLAConfig) -> list[dict[str, int]]:
    """Per tower, the timm constructor arguments that shrink it below the timm model id's size (the non-official
    `TEST_TOWER_SIZES_FIELD` of the tiny test checkpoints; empty dicts for full-size towers)."""
    reduced = []
    for tower in _towers(config):
        sizes = {name: getattr(tower, field) for name, field in TIMM_SIZE_FIELDS.items()}
        reduced.append({key: value for key, value in sizes.items() if value != TIMM_TOWER_SIZES[tower.model_type][key]})
    return reduced


def config_from_official(values: dict[str, Any]) -> OpenVLAConfig:
    """`OpenVLAConfig` of an official `config.json` (as a dict), with its towers shrunk to the sizes of
    `TEST_TOWER_SIZES_FIELD` when it carries that field (the library itself builds the timm model ids' full sizes)."""
    values = dict(values)
    tower_sizes = values.pop(TEST_TOWER_SIZES_FIELD, None)
    if not tower_sizes:
        return OpenVLAConfig(**values)
    official = {key: values.pop(key) for key in OFFICIAL_CONFIG_KEYS if key in values}
    values.pop("auto_map", None)  # the official one points to the Prismatic remote code
    options = OpenVLAConfig.official_options(official, values.get("text_config"), values.get("norm_stats"))
    towers = ("vision_config", "fused_vision_config")[: len(tower_sizes)]
    for name, sizes in zip(towers, tower_sizes, strict=True):
        options[name] = _resized_tower(options[name], sizes)
    return OpenVLAConfig(**{**values, **options})


def _resized_tower(tower: dict[str, Any], sizes: dict[str, int]) -> dict[str, Any]:
    """A tower description of `OpenVLAConfig.official_options` with the timm constructor sizes `sizes` applied."""
    unknown = set(sizes) - set(TIMM_SIZE_FIELDS)
    if unknown:
        raise ValueError(f"{TEST_TOWER_SIZES_FIELD} holds {sorted(unknown)}; known: {sorted(TIMM_SIZE_FIELDS)}.")
    tower = {**tower, **{TIMM_SIZE_FIELDS[name]: value for name, value in sizes.items()}}
    if tower["model_type"] == "siglip_vision_model":  # timm's MLP width is `int(embed_dim * mlp_ratio)`
        mlp_ratio = next(t["mlp_ratio"] for t in TIMM_VISION_TOWERS.values() if t["model_type"] == tower["model_type"])
        tower["intermediate_size"] = int(tower["hidden_size"] * mlp_ratio)
    return tower


def official_folder_config(src: str | Path, **kwargs) -> OpenVLAConfig:
    """`OpenVLAConfig.from_pretrained(src, **kwargs)` of an official folder or Hub id, through `config_from_official`
    when it carries `TEST_TOWER_SIZES_FIELD`; pass it as `config=` to `OpenVLAForActionPrediction.from_pretrained`."""
    values, _ = OpenVLAConfig.get_config_dict(src, **kwargs)
    if TEST_TOWER_SIZES_FIELD not in values:
        return OpenVLAConfig.from_pretrained(src, **kwargs)
    return config_from_official(values)


def official_text_config(text: PreTrainedConfig, dtype: torch.dtype) -> dict[str, Any]:
    """`text_config` as the official checkpoint stores it: model type, pad id, dtype, vocabulary size and every
    transformers 4.40 `LlamaConfig` field that differs from its default."""
    values = {name: getattr(text, name, default) for name, default in LLAMA_4_40_DEFAULTS.items()}
    values["rope_theta"] = (getattr(text, "rope_parameters", None) or {}).get("rope_theta", LLAMA_4_40_DEFAULTS["rope_theta"])
    values["rope_scaling"] = None
    changed = {name: value for name, value in values.items() if value != LLAMA_4_40_DEFAULTS[name]}
    return {"model_type": "llama", "pad_token_id": text.pad_token_id, "torch_dtype": _dtype_name(dtype), **changed,
            "vocab_size": text.vocab_size}


def official_config(config: OpenVLAConfig, image_resize_strategy: str, dtype: torch.dtype) -> dict[str, Any]:
    """The official `config.json` of an exportable `config` (see `unsupported_options`)."""
    timm_ids = _timm_ids(config)
    vision_backbone_id = OFFICIAL_VISION_BACKBONES[timm_ids][0]
    fused = config.fused_vision_config is not None
    text = official_text_config(config.text_config, dtype)
    official = {
        "_name_or_path": ".",
        "arch_specifier": "no-align+fused-gelu-mlp" if fused else "no-align+gelu-mlp",
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": dict(OFFICIAL_AUTO_MAP),
        "hf_llm_id": OFFICIAL_LLM_BACKBONE[1],
        "image_resize_strategy": image_resize_strategy,
        "image_sizes": [config.image_size] * len(timm_ids),
        "llm_backbone_id": OFFICIAL_LLM_BACKBONE[0],
        "llm_max_length": config.max_text_len + 1 + config.num_patches + config.action_dim,
        "model_type": "openvla",
        "n_action_bins": config.num_action_bins,
        "norm_stats": config.norm_stats,
        "output_projector_states": False,
        "pad_to_multiple_of": config.vocab_size - config.action_token_end,
        "pad_token_id": text["pad_token_id"],
        "text_config": text,
        "timm_model_ids": list(timm_ids),
        "timm_override_act_layers": [None] * len(timm_ids),
        "torch_dtype": _dtype_name(dtype),
        "transformers_version": OFFICIAL_TRANSFORMERS_VERSION,
        "use_fused_vision_backbone": fused,
        "vision_backbone_id": vision_backbone_id,
    }
    reduced = _reduced_tower_sizes(config)
    if any(reduced):
        official[TEST_TOWER_SIZES_FIELD] = reduced
    return official


def official_preprocessor_config(image_processor: OpenVLAImageProcessor, config: OpenVLAConfig) -> dict[str, Any]:
    """`preprocessor_config.json` of the official `PrismaticImageProcessor`. Its serialized `tvf_*` parameters are what
    the official processor applies (they win over the values it recomputes from `means`/`stds`), so they hold this
    processor's normalisation; `means`/`stds` are the timm data configs of the towers, as the official conversion
    writes them."""
    size = image_processor.image_size
    strategy = image_processor.image_resize_strategy
    towers = [tower.model_type for tower in _towers(config)]
    normalize = [(list(image_processor.image_mean), list(image_processor.image_std))]
    if image_processor.fused_image_mean is not None:
        normalize.append((list(image_processor.fused_image_mean), list(image_processor.fused_image_std)))
    interpolation = int(PILImageResampling(image_processor.resample))
    letterbox = strategy == "letterbox"
    return {
        "auto_map": dict(OFFICIAL_PROCESSOR_AUTO_MAP),
        "image_processor_type": "PrismaticImageProcessor",
        "image_resize_strategy": strategy,
        "input_sizes": [[3, size, size] for _ in towers],
        "interpolations": [PILImageResampling(interpolation).name.lower() for _ in towers],
        "means": [TIMM_TOWER_NORMALIZATION[tower][0] for tower in towers],
        "processor_class": "PrismaticProcessor",
        "stds": [TIMM_TOWER_NORMALIZATION[tower][1] for tower in towers],
        "tvf_crop_params": [{"output_size": [size, size]} for _ in towers],
        "tvf_do_letterbox": letterbox,
        "tvf_letterbox_fill": list(image_processor.letterbox_fill or [0, 0, 0]) if letterbox else None,
        "tvf_normalize_params": [{"inplace": False, "mean": mean, "std": std} for mean, std in normalize],
        "tvf_resize_params": [
            {"antialias": True, "interpolation": interpolation, "max_size": None,
             "size": [size, size] if strategy == "resize-naive" else size}
            for _ in towers
        ],
        "use_fused_vision_backbone": config.fused_vision_config is not None,
    }


def write_official_tokenizer(tokenizer, dst: Path, model_max_length: int) -> None:
    """The tokenizer's `tokenizer.json` (BPE merges as `"left right"` strings, the form tokenizers < 0.20, which
    transformers 4.40 needs, reads; later versions read both), and the `tokenizer_config.json`,
    `special_tokens_map.json` and `added_tokens.json` of the official (transformers 4.40 `LlamaTokenizerFast`, `<PAD>`
    added) checkpoint."""
    pipeline = json.loads(tokenizer.backend_tokenizer.to_str())
    if "merges" in pipeline["model"]:
        pipeline["model"]["merges"] = [" ".join(pair) if isinstance(pair, list) else pair for pair in pipeline["model"]["merges"]]
    (dst / "tokenizer.json").write_text(json.dumps(pipeline, indent=2, ensure_ascii=False) + "\n")

    def entry(token) -> dict[str, Any]:
        return {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized, "rstrip": token.rstrip,
                "single_word": token.single_word, "special": token.special}

    added = tokenizer.added_tokens_decoder
    special = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(token_id): entry(token) for token_id, token in sorted(added.items())},
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "processor_class": "PrismaticProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
        **special,
    }
    by_content = {token.content: entry(token) for token in added.values()}
    special_tokens_map = {
        name: (content if name == "pad_token" else {k: v for k, v in by_content[content].items() if k != "special"})
        for name, content in special.items()
    }
    _write_json(dst / "tokenizer_config.json", tokenizer_config)
    _write_json(dst / "special_tokens_map.json", special_tokens_map)
    _write_json(dst / "added_tokens.json", {token.content: token_id for token_id, token in sorted(added.items()) if token_id >= tokenizer.vocab_size})


def find_official_code(official_code: str) -> list[Path]:
    """Paths of the official remote code (`OFFICIAL_CODE_FILES`) in the official checkpoint `official_code`: a folder,
    or a Hub id (downloaded, or taken from the local cache when offline). Raises `FileNotFoundError` naming what is
    missing and where to get it."""
    folder = Path(official_code)
    paths = []
    for name in OFFICIAL_CODE_FILES:
        if folder.is_dir():
            if not (folder / name).is_file():
                raise FileNotFoundError(_missing_code_message(official_code, name, "it is not in that folder"))
            paths.append(folder / name)
            continue
        try:
            paths.append(Path(hf_hub_download(official_code, name)))
        except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as error:
            raise FileNotFoundError(_missing_code_message(official_code, name, f"{type(error).__name__}: {error}")) from error
    return paths


def _missing_code_message(official_code: str, name: str, why: str) -> str:
    return (
        f"The official remote code {name} was not found in --official_code {official_code!r} ({why}). The exported "
        f"folder needs {', '.join(OFFICIAL_CODE_FILES)}, which this project does not ship: pass --official_code a "
        "folder holding them (a download of the official checkpoint, e.g. `hf download openvla/openvla-7b "
        f"{' '.join(OFFICIAL_CODE_FILES)} --local-dir openvla-7b`) or the Hub id openvla/openvla-7b (needs the Hub or "
        "its local cache)."
    )


def official_state_dict(model: OpenVLAForActionPrediction) -> dict[str, torch.Tensor]:
    """The model's weights under the official names (timm tower keys, fused q/k/v): the registered weight conversions,
    reverted. The conversions are taken from a copy that shares the weights, so that they do not depend on the names
    the model was loaded from. A tensor that is a slice of a larger one (SigLIP's attention-pool `q` / `kv`, split
    from one `in_proj`) is copied out, as safetensors stores whole tensors only."""
    with torch.device("meta"):
        blank = OpenVLAForActionPrediction(model.config)
    blank.load_state_dict(model.state_dict(), strict=True, assign=True)
    state_dict = revert_weight_conversion(blank, blank.state_dict())
    return {
        key: tensor.clone() if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() else tensor
        for key, tensor in state_dict.items()
    }


def check_round_trip(config: OpenVLAConfig, official: dict[str, Any]) -> None:
    """The official `config.json` read back by this project must describe `config`'s model; raise otherwise."""
    reloaded = config_from_official(json.loads(json.dumps(official)))
    expected, got = _description(config.to_dict()), _description(reloaded.to_dict())
    differences = sorted(key for key in expected.keys() | got.keys() if expected.get(key) != got.get(key))
    if differences:
        details = "; ".join(f"{key}: {expected.get(key)!r} -> {got.get(key)!r}" for key in differences)
        raise ValueError(f"The official config.json would describe another model ({details}); it cannot be written.")


def _description(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat `{dotted.name: value}` of a config dict without its bookkeeping entries."""
    flat = {}
    for key, value in values.items():
        if key in _BOOKKEEPING:
            continue
        if isinstance(value, dict) and key.endswith("config"):
            flat.update(_description(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def export_official(src: str | Path, dst: Path, official_code: str, dtype: torch.dtype | str = "auto",
                    max_shard_size: str = "5GB") -> Path:
    """Write the model folder `src` (ours) in the official OpenVLA layout to `dst`; returns `dst`.

    Raises `ValueError` (naming every option) for a model the official code cannot express, and
    `FileNotFoundError` when the official remote code is not in `official_code`.
    """
    config = OpenVLAConfig.from_pretrained(src)
    processor = AutoProcessor.from_pretrained(src, trust_remote_code=True)
    problems = unsupported_options(config, processor)
    if problems:
        raise ValueError(
            f"{src} cannot be written in the official OpenVLA format; the official code cannot express:\n  - "
            + "\n  - ".join(problems)
        )
    strategy = processor.image_processor.image_resize_strategy
    check_round_trip(config, official_config(config, strategy, torch.float32))  # the dtype is not compared
    code = find_official_code(official_code)
    model = OpenVLAForActionPrediction.from_pretrained(src, dtype=dtype)
    official = official_config(model.config, strategy, model.dtype)
    if TEST_TOWER_SIZES_FIELD in official:
        print(
            f"note: the vision towers of {src} are smaller than their timm models {official['timm_model_ids']}; their "
            f"sizes go into the non-official {TEST_TOWER_SIZES_FIELD} field, which only this project's converter "
            "(official_folder_config) and its test fixtures read (the official code would build full-size towers)."
        )
    dst.mkdir(parents=True, exist_ok=True)
    for path in code:
        shutil.copy(path, dst / path.name)
    save_torch_state_dict(official_state_dict(model), dst, max_shard_size=max_shard_size, metadata={"format": "pt"})
    text = model.config.text_config
    _write_json(dst / "config.json", official)
    _write_json(dst / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id, "transformers_version": OFFICIAL_TRANSFORMERS_VERSION,
    })
    _write_json(dst / "preprocessor_config.json", official_preprocessor_config(processor.image_processor, model.config))
    write_official_tokenizer(processor.tokenizer, dst, official["llm_max_length"])
    _write_json(dst / "dataset_statistics.json", model.config.norm_stats)
    return dst


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
