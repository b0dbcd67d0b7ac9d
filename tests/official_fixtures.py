"""Tiny checkpoints in the *official* OpenVLA Hugging Face format, plus an independent reference pipeline.

Test-only module: ``timm`` is allowed here (it is a test dependency), the library under test must not need it.

Two public entry points:

* :func:`make_official_checkpoint` writes a directory laid out like ``openvla/openvla-7b`` on the Hub
  (``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards + index),
  ``preprocessor_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
  ``added_tokens.json``) but with tiny, randomly initialised weights.  The state-dict key names, the LayerScale
  ``scale_factor`` renaming, the bf16-rounded ``tvf_normalize_params``, the padded vocabulary
  (``text_config.vocab_size == base_vocab + pad_to_multiple_of``), ``pad_token_id == base_vocab`` and the
  ``norm_stats`` layout all mirror the published checkpoint (see ``docs/official_format.md``).

* :func:`official_reference_predict` recomputes ``OpenVLAForActionPrediction.predict_action`` the way the
  official remote code does it, composed from timm ``VisionTransformer`` towers, torchvision functional
  transforms, the raw ``tokenizers`` pipeline of ``tokenizer.json`` and ``transformers.LlamaForCausalLM``.  It
  does not import anything from the package under test, and returns every intermediate tensor.

Only non-official field written to ``config.json``: ``test_timm_model_kwargs`` (one dict per vision tower with the
tiny ``embed_dim``/``depth``/``num_heads`` that override the architecture implied by ``timm_model_ids``).  Real
checkpoints never contain it and the library does not read it: :func:`load_official` loads a folder with the config
that ``openvla_tools.official_format.official_folder_config`` (the converter's reader) builds from it.
``timm_model_ids`` keep their official values so that the code under test sees the same identifiers as for
``openvla/openvla-7b``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# The official towers are timm models and the official image transform is torchvision's: the tests that use these
# fixtures need both (the `dev` extra has them); without them they are skipped, not failed.
pytest.importorskip("timm", reason="the official-format fixtures build timm towers: pip install -e '.[dev]'")
pytest.importorskip("torchvision", reason="the official image transform is torchvision's: pip install -e '.[dev]'")

# --------------------------------------------------------------------------------------------------------------------
# Official constants (values as published in openvla/openvla-7b, see docs/official_format.md)
# --------------------------------------------------------------------------------------------------------------------
DINO_TIMM_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_TIMM_ID = "vit_so400m_patch14_siglip_224"
PATCH_SIZE = 14

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
N_ACTION_BINS = 256
PAD_TO_MULTIPLE_OF = 64
ACTION_DIM = 7

# Tiny sizes used by the fixtures.
TINY_VISION_KWARGS = {
    "dinov2": {"embed_dim": 32, "depth": 3, "num_heads": 2},  # mlp_ratio stays 4 -> fc1 has 128 outputs
    "siglip": {"embed_dim": 48, "depth": 3, "num_heads": 2},  # mlp_ratio stays 3.7362 -> int(48*3.7362) = 179
}
TINY_TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
BASE_VOCAB_SIZE = 512  # analogue of Llama-2's 32000 (tokenizer.vocab_size, i.e. without the added <PAD>)
DEFAULT_IMAGE_SIZE = 56  # 4x4 = 16 patches per tower

# Single-backbone variants (``fused=False``) -> (vision_backbone_id, timm id, tower kind, mean, std)
SINGLE_BACKBONES = {
    "dinov2-vit-l": (DINO_TIMM_ID, "dinov2", IMAGENET_MEAN, IMAGENET_STD),
    "siglip-vit-so400m": (SIGLIP_TIMM_ID, "siglip", SIGLIP_MEAN, SIGLIP_STD),
}

# Words whose left-to-right BPE merges are put into the tiny vocabulary (so prompts tokenize into few tokens).
_TOKENIZER_WORDS = (
    "▁In",
    "▁What",
    "▁action",
    "▁should",
    "▁the",
    "▁robot",
    "▁take",
    "▁to",
    "Out",
    "▁pick",
    "▁up",
    "▁red",
    "▁blue",
    "▁green",
    "▁block",
    "▁put",
    "▁on",
    "▁plate",
    "▁open",
    "▁close",
    "▁drawer",
    "▁move",
    "▁cup",
    "▁left",
    "▁right",
    "▁and",
    "▁place",
    "▁it",
    "▁in",
    "▁bowl",
)


def bf16_round(values: Sequence[float]) -> list[float]:
    """Round to bfloat16 and back, like ``torch.tensor(mean)`` under ``torch.set_default_dtype(torch.bfloat16)``."""
    return torch.tensor(list(values), dtype=torch.bfloat16).float().tolist()


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------
def _build_tokenizer_vocab(base_vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]], int]:
    """Return (vocab, merges, empty_token_id) for a Llama-like BPE with byte fallback.

    Layout: 0 ``<unk>``, 1 ``<s>``, 2 ``</s>``, 3 ``<0x0A>`` (newline via byte fallback, as Llama's id 13),
    then ``▁`` (the "empty token", Llama's 29871), printable ASCII, word-prefix merges, and finally rare
    CJK filler characters so that the last 256 ids (the action tokens) are never produced by plain text.
    """
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for tok in ("<unk>", "<s>", "</s>", "<0x0A>", "▁"):
        add(tok)
    empty_token_id = vocab["▁"]
    for code in range(33, 127):  # printable ASCII without space (space is encoded as ▁)
        add(chr(code))
    merges: list[tuple[str, str]] = []
    for word in _TOKENIZER_WORDS:
        prefix = word[0]
        for char in word[1:]:
            merged = prefix + char
            if merged not in vocab:
                merges.append((prefix, char))
                add(merged)
            prefix = merged
    n_action = N_ACTION_BINS
    if len(vocab) > base_vocab_size - n_action:
        raise ValueError(f"Tiny vocabulary too small: {len(vocab)} text tokens + {n_action} action tokens")
    code = 0x4E00
    while len(vocab) < base_vocab_size:
        add(chr(code))
        code += 1
    return vocab, merges, empty_token_id


def _write_tokenizer(path: Path, base_vocab_size: int, model_max_length: int) -> dict[str, Any]:
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab, merges, empty_token_id = _build_tokenizer_vocab(base_vocab_size)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Llama-2 style tokenizer.json: normalizer prepends "▁" and turns spaces into "▁"; no pre-tokenizer.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    # The official conversion calls `tokenizer.add_special_tokens({"pad_token": "<PAD>"})` -> id == base vocab size.
    tok.add_special_tokens([AddedToken("<PAD>", normalized=False, special=True)])
    pad_token_id = tok.token_to_id("<PAD>")
    assert pad_token_id == base_vocab_size, (pad_token_id, base_vocab_size)
    tok.save(str(path / "tokenizer.json"))

    def added(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            "0": added("<unk>"),
            "1": added("<s>"),
            "2": added("</s>"),
            str(pad_token_id): added("<PAD>"),
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": model_max_length,
        "pad_token": "<PAD>",
        "padding_side": "right",
        "processor_class": "PrismaticProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special = {
        k: {x: v for x, v in added(c).items() if x != "special"}
        for k, c in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))
    }
    special["pad_token"] = "<PAD>"
    _dump_json(path / "tokenizer_config.json", tokenizer_config)
    _dump_json(path / "special_tokens_map.json", special)
    _dump_json(path / "added_tokens.json", {"<PAD>": pad_token_id})
    return {"pad_token_id": pad_token_id, "empty_token_id": empty_token_id, "tokenizer_size": tok.get_vocab_size()}


# --------------------------------------------------------------------------------------------------------------------
# Vision towers (timm) and the official LayerScale patch
# --------------------------------------------------------------------------------------------------------------------
def _create_timm_tower(timm_id: str, image_size: int, act_layer: str | None, extra_kwargs: dict[str, Any]):
    import timm

    model = timm.create_model(
        timm_id, pretrained=False, num_classes=0, img_size=image_size, act_layer=act_layer, **extra_kwargs
    )
    return model.eval()


def _patch_layerscale(model: nn.Module) -> None:
    """OpenVLA renames every timm ``LayerScale.gamma`` to ``scale_factor`` (HF used to rewrite ``gamma`` keys)."""
    from timm.layers import LayerScale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.scale_factor) if self.inplace else x * self.scale_factor

    for module in model.modules():
        if isinstance(module, LayerScale) and hasattr(module, "gamma"):
            module.scale_factor = nn.Parameter(module.gamma.detach().clone())
            del module.gamma
            module.forward = forward.__get__(module, LayerScale)


def _randomize_tower(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma", "scale_factor"):
                param.copy_(0.1 + 0.9 * torch.rand(param.shape, generator=gen))  # LayerScale: nonzero, random
            elif leaf in ("cls_token", "reg_token", "pos_embed", "latent"):
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
            elif param.ndim == 1 and "norm" in name and leaf == "weight":
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif param.ndim == 1:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            else:
                fan_in = int(np.prod(param.shape[1:]))
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint writer
# --------------------------------------------------------------------------------------------------------------------
def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _make_norm_stats(gen: torch.Generator, include_maskless_dataset: bool) -> dict[str, Any]:
    def rnd(n: int, lo: float, hi: float) -> list[float]:
        return (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)).tolist()

    def dataset(scale: float, with_mask: bool, n_traj: int, n_trans: int) -> dict[str, Any]:
        q01 = [-v for v in rnd(6, 0.2 * scale, scale)] + [0.0]
        q99 = rnd(6, 0.2 * scale, scale) + [1.0]
        action = {
            "max": [v * 1.5 for v in q99[:6]] + [1.0],
            "mean": rnd(6, -0.01 * scale, 0.01 * scale) + [0.5],
            "min": [v * 1.5 for v in q01[:6]] + [0.0],
            "q01": q01,
            "q99": q99,
            "std": rnd(6, 0.1 * scale, 0.5 * scale) + [0.49],
        }
        if with_mask:
            action["mask"] = [True] * 6 + [False]
        zeros = [0.0] * ACTION_DIM
        proprio = {k: list(zeros) for k in ("max", "mean", "min", "q01", "q99", "std")}
        return {"action": action, "num_trajectories": n_traj, "num_transitions": n_trans, "proprio": proprio}

    stats = {
        "bridge_orig": dataset(0.05, True, 60064, 2135463),
        "fractal20220817_data": dataset(0.5, True, 87212, 3786400),
    }
    if include_maskless_dataset:
        stats["maskless_dataset"] = dataset(1.0, False, 10, 100)
    return stats


def _preprocessor_config(
    image_size: int, means: list[Sequence[float]], stds: list[Sequence[float]], fused: bool, image_resize_strategy: str
) -> dict[str, Any]:
    n = len(means)
    resize_size: int | list[int] = [image_size, image_size] if image_resize_strategy == "resize-naive" else image_size
    letterbox = image_resize_strategy == "letterbox"
    return {
        "auto_map": {
            "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
            "AutoProcessor": "processing_prismatic.PrismaticProcessor",
        },
        "image_processor_type": "PrismaticImageProcessor",
        "image_resize_strategy": image_resize_strategy,
        "input_sizes": [[3, image_size, image_size] for _ in range(n)],
        "interpolations": ["bicubic"] * n,
        "means": [list(m) for m in means],
        "processor_class": "PrismaticProcessor",
        "stds": [list(s) for s in stds],
        "tvf_crop_params": [{"output_size": [image_size, image_size]} for _ in range(n)],
        # official quirk: the processor keeps only the *last* tower's letterbox fill
        "tvf_do_letterbox": letterbox,
        "tvf_letterbox_fill": [int(x * 255) for x in means[-1]] if letterbox else None,
        # official quirk: written under torch.set_default_dtype(torch.bfloat16) -> bf16-rounded mean/std
        "tvf_normalize_params": [
            {"inplace": False, "mean": bf16_round(m), "std": bf16_round(s)} for m, s in zip(means, stds, strict=True)
        ],
        "tvf_resize_params": [
            {"antialias": True, "interpolation": 3, "max_size": None, "size": resize_size} for _ in range(n)
        ],
        "use_fused_vision_backbone": fused,
    }


def make_official_checkpoint(
    path: str | Path,
    fused: bool = True,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    *,
    single_backbone: str = "dinov2-vit-l",
    image_resize_strategy: str = "resize-naive",
    sharded: bool = False,
    include_maskless_dataset: bool = False,
    include_test_kwargs: bool = True,
) -> dict[str, Any]:
    """Write a tiny OpenVLA checkpoint in the official Hub format to ``path`` and describe it.

    Vision towers are real timm ``VisionTransformer`` s built exactly like the official remote code builds them
    (``timm.create_model(<official id>, pretrained=False, num_classes=0, img_size=..., act_layer=None)``) with only
    ``embed_dim``/``depth``/``num_heads`` shrunk, so every other constructor argument of
    ``vit_large_patch14_reg4_dinov2`` (``reg_tokens=4, no_embed_class=True, init_values=1e-5``, class token,
    exact GELU, LayerNorm eps 1e-6) and of ``vit_so400m_patch14_siglip_224`` (``class_token=False,
    global_pool='map'`` -> ``attn_pool.*`` head, ``mlp_ratio=3.7362``, exact GELU) is the real one.  All
    parameters, including LayerScale factors, registers, positional embeddings and the unused ``attn_pool``/``norm``
    weights, are random (seeded).

    The language model is a tiny ``LlamaForCausalLM`` whose vocabulary is ``BASE_VOCAB_SIZE + PAD_TO_MULTIPLE_OF``
    (512 + 64 = 576, like 32000 + 64 = 32064), with ``<PAD>`` at id 512.  To make it behave "trained-like", the
    ``lm_head`` rows of the 256 action tokens (ids 256..511, the analogue of Llama's 31744..31999) are drawn with
    std 1.0 while every other row (text tokens, ``<PAD>``, the 63 padding rows) has std 0.02.  The last hidden
    state is RMS-normalised, so action logits have std ~ sqrt(hidden_size) = 8 and all others ~0.16: the greedy
    argmax over the *full* vocabulary is always an action token, but *which* one depends on the hidden state, i.e.
    on image and instruction.

    Returns a dict with paths, ids and sizes (see the code for the keys).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if image_size % PATCH_SIZE:
        raise ValueError("image_size must be a multiple of the patch size 14")
    if image_resize_strategy not in ("resize-naive", "resize-crop", "letterbox"):
        raise ValueError(image_resize_strategy)
    gen = torch.Generator().manual_seed(seed)

    # --- vision towers --------------------------------------------------------------------------------------------
    if fused:
        towers = [(DINO_TIMM_ID, "dinov2"), (SIGLIP_TIMM_ID, "siglip")]
        vision_backbone_id = "dinosiglip-vit-so-224px"
        arch_specifier = "no-align+fused-gelu-mlp"
        means, stds = [IMAGENET_MEAN, SIGLIP_MEAN], [IMAGENET_STD, SIGLIP_STD]
    else:
        timm_id, kind, mean, std = SINGLE_BACKBONES[single_backbone]
        towers = [(timm_id, kind)]
        vision_backbone_id = single_backbone
        arch_specifier = "no-align+gelu-mlp"
        means, stds = [mean], [std]
    prefixes = ["vision_backbone.featurizer.", "vision_backbone.fused_featurizer."]
    state_dict: dict[str, torch.Tensor] = {}
    tower_kwargs: list[dict[str, Any]] = []
    vision_dim = 0
    for (timm_id, kind), prefix in zip(towers, prefixes[: len(towers)], strict=True):
        kwargs = dict(TINY_VISION_KWARGS[kind])
        tower = _create_timm_tower(timm_id, image_size, None, kwargs)
        _randomize_tower(tower, gen)
        _patch_layerscale(tower)  # gamma -> scale_factor, exactly the official key names
        for k, v in tower.state_dict().items():
            state_dict[prefix + k] = v.detach().clone().contiguous()
        tower_kwargs.append(kwargs)
        vision_dim += tower.embed_dim

    # --- projector ------------------------------------------------------------------------------------------------
    llm_dim = TINY_TEXT_CONFIG["hidden_size"]
    if fused:
        shapes = {"fc1": (4 * vision_dim, vision_dim), "fc2": (llm_dim, 4 * vision_dim), "fc3": (llm_dim, llm_dim)}
    else:
        shapes = {"fc1": (llm_dim, vision_dim), "fc2": (llm_dim, llm_dim)}
    for name, (out_f, in_f) in shapes.items():
        state_dict[f"projector.{name}.weight"] = torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
        state_dict[f"projector.{name}.bias"] = 0.1 * torch.randn(out_f, generator=gen)

    # --- tokenizer --------------------------------------------------------------------------------------------------
    tok_info = _write_tokenizer(path, BASE_VOCAB_SIZE, model_max_length=2048)
    pad_token_id = tok_info["pad_token_id"]
    text_vocab_size = BASE_VOCAB_SIZE + PAD_TO_MULTIPLE_OF  # official: vocab_size += pad_to_multiple_of

    # --- language model ---------------------------------------------------------------------------------------------
    from transformers import LlamaConfig, LlamaForCausalLM

    text_config = {
        "model_type": "llama",
        "pad_token_id": pad_token_id,
        "torch_dtype": "float32",
        "vocab_size": text_vocab_size,
        **TINY_TEXT_CONFIG,
    }
    llm = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in text_config.items() if k not in ("model_type", "torch_dtype")})
    )
    action_lo, action_hi = BASE_VOCAB_SIZE - N_ACTION_BINS, BASE_VOCAB_SIZE
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if name == "lm_head.weight":
                w = 0.02 * torch.randn(param.shape, generator=gen)
                w[action_lo:action_hi] = torch.randn(action_hi - action_lo, param.shape[1], generator=gen)
                param.copy_(w)
            elif name == "model.embed_tokens.weight":
                param.copy_(torch.randn(param.shape, generator=gen))
            elif param.ndim == 1:  # RMSNorm weights
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
    for k, v in llm.state_dict().items():
        state_dict["language_model." + k] = v.detach().clone().contiguous()

    # --- weights ------------------------------------------------------------------------------------------------------
    from safetensors.torch import save_file

    keys = sorted(state_dict)
    weight_files: list[str]
    if sharded:
        split = (
            [k for k in keys if k.startswith("language_model.")],
            [k for k in keys if not k.startswith("language_model.")],
        )
        weight_files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        weight_map = {}
        for fname, subset in zip(weight_files, split, strict=True):
            save_file({k: state_dict[k] for k in subset}, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in subset})
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        _dump_json(path / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    else:
        weight_files = ["model.safetensors"]
        save_file({k: state_dict[k] for k in keys}, str(path / "model.safetensors"), metadata={"format": "pt"})

    # --- config.json ------------------------------------------------------------------------------------------------
    norm_stats = _make_norm_stats(gen, include_maskless_dataset)
    config = {
        "_name_or_path": ".",
        "arch_specifier": arch_specifier,
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        },
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": image_resize_strategy,
        "image_sizes": [image_size] * len(towers),
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "model_type": "openvla",
        "n_action_bins": N_ACTION_BINS,
        "norm_stats": norm_stats,
        "output_projector_states": False,
        "pad_to_multiple_of": PAD_TO_MULTIPLE_OF,
        "pad_token_id": pad_token_id,
        "text_config": text_config,
        "timm_model_ids": [t[0] for t in towers],
        "timm_override_act_layers": [None] * len(towers),
        "torch_dtype": "float32",
        "transformers_version": "4.40.1",
        "use_fused_vision_backbone": fused,
        "vision_backbone_id": vision_backbone_id,
    }
    if include_test_kwargs:
        config["test_timm_model_kwargs"] = tower_kwargs
    _dump_json(path / "config.json", config)
    _dump_json(
        path / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": pad_token_id,
            "transformers_version": "4.40.1",
        },
    )
    _dump_json(
        path / "preprocessor_config.json", _preprocessor_config(image_size, means, stds, fused, image_resize_strategy)
    )

    return {
        "path": path,
        "fused": fused,
        "image_size": image_size,
        "num_patches": (image_size // PATCH_SIZE) ** 2,
        "seed": seed,
        "timm_model_ids": config["timm_model_ids"],
        "tower_kwargs": tower_kwargs,
        "vision_dim": vision_dim,
        "llm_dim": llm_dim,
        "text_config": text_config,
        "base_vocab_size": BASE_VOCAB_SIZE,
        "text_vocab_size": text_vocab_size,
        "pad_token_id": pad_token_id,
        "pad_to_multiple_of": PAD_TO_MULTIPLE_OF,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "empty_token_id": tok_info["empty_token_id"],
        "action_token_ids": (action_lo, action_hi),  # half-open range [lo, hi)
        "n_action_bins": N_ACTION_BINS,
        "unnorm_keys": list(norm_stats),
        "norm_stats": norm_stats,
        "weight_files": weight_files,
        "state_dict_keys": keys,
        "num_parameters": int(sum(t.numel() for t in state_dict.values())),
    }


def load_official(path: str | Path):
    """`OpenVLAForActionPrediction` of a tiny official folder, in eval mode, loaded as `convert_openvla_checkpoint.py`
    loads one: its `test_timm_model_kwargs` tower sizes are read by `official_format.official_folder_config` (the
    library builds the timm model ids' full sizes). The one helper here that uses the package under test."""
    from modeling_openvla import OpenVLAForActionPrediction
    from openvla_tools.official_format import official_folder_config

    return OpenVLAForActionPrediction.from_pretrained(path, config=official_folder_config(path)).eval()


# --------------------------------------------------------------------------------------------------------------------
# Reference (official) computation
# --------------------------------------------------------------------------------------------------------------------
def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for fname in files:
        out.update(load_file(str(path / fname)))
    return out


def _sub_state_dict(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def official_image_transform(image: Image.Image, preprocessor_config: dict[str, Any]) -> torch.Tensor:
    """``PrismaticImageProcessor.apply_transform`` on one image -> ``[n_towers*3, H, W]`` float32.

    Uses the serialized ``tvf_*`` parameters: on load, ``ImageProcessingMixin.__init__`` re-applies them via
    ``setattr``, overriding the values the constructor recomputed from ``means``/``stds``.
    """
    import torchvision.transforms.functional as TVF

    img = image.convert("RGB")
    if preprocessor_config.get("tvf_do_letterbox"):
        fill = tuple(preprocessor_config["tvf_letterbox_fill"])
        (w, h), side = img.size, max(img.size)
        pad_w, pad_h = int((side - w) / 2), int((side - h) / 2)
        img = TVF.pad(img, [pad_w, pad_h, pad_w, pad_h], fill=fill, padding_mode="constant")
    chunks = []
    for resize, crop, norm in zip(
        preprocessor_config["tvf_resize_params"],
        preprocessor_config["tvf_crop_params"],
        preprocessor_config["tvf_normalize_params"],
        strict=True,
    ):
        size = resize["size"]
        out = TVF.resize(
            img,
            size=list(size) if isinstance(size, (list, tuple)) else size,
            interpolation=TVF.InterpolationMode.BICUBIC if resize["interpolation"] == 3 else resize["interpolation"],
            max_size=resize["max_size"],
            antialias=resize["antialias"],
        )
        out = TVF.center_crop(out, list(crop["output_size"]))
        t = TVF.to_tensor(out)
        t = TVF.normalize(t, mean=norm["mean"], std=norm["std"], inplace=False)
        chunks.append(t)
    return torch.vstack(chunks)


def _second_to_last_patches(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    out = tower.get_intermediate_layers(pixels, n={len(tower.blocks) - 2})
    # timm 0.9.x returns a tuple (unwrapped by OpenVLA's `unpack_tuple`), timm 1.x a list.
    return out[0] if isinstance(out, (list, tuple)) else out


def official_reference_predict(
    path: str | Path,
    image: Image.Image,
    instruction: str,
    unnorm_key: str | None,
    *,
    attn_implementation: str = "sdpa",
    input_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Recompute official ``processor(prompt, image)`` + ``vla.predict_action(**inputs, unnorm_key, do_sample=False)``.

    Float32 throughout.  ``input_ids`` may override the tokenized prompt (e.g. to test a prompt that already ends
    with the empty token).  Returned keys: ``prompt``, ``input_ids`` (after the empty-token rule, ``[1, T]``),
    ``pixel_values`` (``[1, 3*n_towers, S, S]``), ``patch_features`` (concatenated second-to-last-block patch
    tokens, ``[1, P, vision_dim]``), ``projected`` (``[1, P, llm_dim]``), ``inputs_embeds`` (``[1, 1+P+T-1, D]``),
    ``first_step_logits`` (``[1, V]``, last position of the multimodal prefill), ``step_logits`` (list of ``[1, V]``),
    ``step_margins`` (top1 - top2 logit per step), ``generated_ids`` (new tokens), ``action_token_ids`` (last
    ``action_dim`` ids of prompt+generation, as the official code slices them), ``normalized_actions``, ``actions``.
    """
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    pp_config = json.loads((path / "preprocessor_config.json").read_text())
    sd = load_official_state_dict(path)

    # 1) image -> channel-stacked pixel values (official processor returns float32 numpy -> torch)
    pixel_values = official_image_transform(image, pp_config).unsqueeze(0).float()

    # 2) vision towers: timm models + LayerScale patch, loaded strictly with the official key names
    test_kwargs = config.get("test_timm_model_kwargs") or [{} for _ in config["timm_model_ids"]]
    features = []
    split = torch.split(pixel_values, [3] * len(config["timm_model_ids"]), dim=1)
    for i, (timm_id, size, act, kwargs, px) in enumerate(
        zip(
            config["timm_model_ids"],
            config["image_sizes"],
            config["timm_override_act_layers"],
            test_kwargs,
            split,
            strict=True,
        )
    ):
        tower = _create_timm_tower(timm_id, size, act, dict(kwargs))
        _patch_layerscale(tower)
        prefix = "vision_backbone.featurizer." if i == 0 else "vision_backbone.fused_featurizer."
        tower.load_state_dict(_sub_state_dict(sd, prefix), strict=True)
        with torch.no_grad():
            features.append(_second_to_last_patches(tower, px))
    patch_features = torch.cat(features, dim=2)

    # 3) projector: fc1 -> GELU -> fc2 [-> GELU -> fc3]
    proj = _sub_state_dict(sd, "projector.")
    with torch.no_grad():
        x = F.linear(patch_features, proj["fc1.weight"], proj["fc1.bias"])
        x = F.linear(nn.GELU()(x), proj["fc2.weight"], proj["fc2.bias"])
        if config["use_fused_vision_backbone"]:
            x = F.linear(nn.GELU()(x), proj["fc3.weight"], proj["fc3.bias"])
    projected = x

    # 4) prompt + empty-token rule
    prompt = PROMPT_TEMPLATE.format(instruction=instruction)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    empty_id = tok.token_to_id("▁")
    ids = list(input_ids) if input_ids is not None else tok.encode(prompt).ids
    if ids[-1] != empty_id:
        ids = ids + [empty_id]
    ids_t = torch.tensor([ids], dtype=torch.long)

    # 5) language model (AutoModelForCausalLM.from_config(text_config) in the official code)
    text_cfg = {k: v for k, v in config["text_config"].items() if k not in ("model_type", "torch_dtype")}
    llm = LlamaForCausalLM(LlamaConfig(**text_cfg, attn_implementation=attn_implementation)).eval()
    llm.load_state_dict(_sub_state_dict(sd, "language_model."), strict=True)

    # action dim / stats
    norm_stats = config["norm_stats"]
    if unnorm_key is None:
        assert len(norm_stats) == 1, "multiple datasets: pass unnorm_key"
        unnorm_key = next(iter(norm_stats))
    stats = norm_stats[unnorm_key]["action"]
    action_dim = len(stats["q01"])
    eos_id = 2

    with torch.no_grad():
        emb = llm.get_input_embeddings()(ids_t)
        inputs_embeds = torch.cat([emb[:, :1], projected, emb[:, 1:]], dim=1)
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long)
        out = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True)
        step_logits, generated = [], []
        logits, cache = out.logits[:, -1, :].float(), out.cache
        for step in range(action_dim):
            step_logits.append(logits)
            nxt = int(torch.argmax(logits, dim=-1))
            generated.append(nxt)
            if nxt == eos_id or step == action_dim - 1:  # HF generate stops at EOS / max_new_tokens
                break
            out = llm(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
            logits, cache = out.logits[:, -1, :].float(), out.cache
    top2 = [torch.topk(step[0], 2).values for step in step_logits]
    margins = [float(t[0] - t[1]) for t in top2]

    # 6) official de-tokenisation and un-normalisation (numpy float64)
    full = np.array(ids + generated, dtype=np.int64)
    action_token_ids = full[-action_dim:]
    vocab_size = config["text_config"]["vocab_size"] - config["pad_to_multiple_of"]
    bins = np.linspace(-1, 1, config["n_action_bins"])
    bin_centers = (bins[:-1] + bins[1:]) / 2.0
    discretized = np.clip(vocab_size - action_token_ids - 1, a_min=0, a_max=bin_centers.shape[0] - 1)
    normalized_actions = bin_centers[discretized]
    mask = np.asarray(stats.get("mask", np.ones_like(stats["q01"], dtype=bool)), dtype=bool)
    high, low = np.array(stats["q99"]), np.array(stats["q01"])
    actions = np.where(mask, 0.5 * (normalized_actions + 1) * (high - low) + low, normalized_actions)

    return {
        "prompt": prompt,
        "unnorm_key": unnorm_key,
        "input_ids": ids_t,
        "pixel_values": pixel_values,
        "patch_features": patch_features,
        "projected": projected,
        "inputs_embeds": inputs_embeds,
        "first_step_logits": step_logits[0],
        "step_logits": step_logits,
        "step_margins": margins,
        "generated_ids": np.array(generated, dtype=np.int64),
        "action_token_ids": action_token_ids,
        "normalized_actions": normalized_actions,
        "actions": actions,
    }


def make_test_image(
    seed: int = 0, size: tuple[int, int] = (80, 60), color: tuple[int, int, int] | None = None
) -> Image.Image:
    """Deterministic RGB test image (non-square by default, so the resize step is exercised)."""
    if color is not None:
        return Image.new("RGB", size, color)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, mode="RGB")


# --------------------------------------------------------------------------------------------------------------------
# Official remote code (stand-ins)
# --------------------------------------------------------------------------------------------------------------------
OFFICIAL_CODE_FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")


def write_official_code_stand_ins(path: str | Path) -> dict[str, str]:
    """Write stand-ins for the official remote code (``*_prismatic.py``, which this project does not ship) to ``path``,
    as an official checkpoint folder holds them; each has distinct text, so a test can tell that it was copied.
    Returns ``{file name: text}``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    texts = {
        name: f'"""Test stand-in for the official OpenVLA remote code file {name} (not the real code)."""\n'
        for name in OFFICIAL_CODE_FILES
    }
    for name, text in texts.items():
        (path / name).write_text(text)
    return texts
