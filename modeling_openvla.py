"""OpenVLA: a vision-language-action model built from transformers' Dinov2 / SigLIP and Llama modules.

```
pixel_values [B, C, H, W] -> vision backbone -> patch features [B, P, vision_dim] -> projector -> [B, P, hidden]
input_ids [B, T] = [BOS | image placeholders | prompt | action tokens] -> embeddings, placeholders <- patches
-> Llama decoder -> action_logits [B, action_dim, num_action_bins] -> argmax -> bins -> continuous actions
```

Official OpenVLA checkpoints (timm vision towers) load directly: with `config.vision_layout == "timm"` the towers are
`OpenVLATimmDinov2Model` / `OpenVLATimmSiglipVisionModel`, whose official timm key names are renamed (and q/k/v split)
on load by the weight conversions registered below with `register_checkpoint_conversion_mapping`.
"""

import json
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    Dinov2Model,
    GenerationConfig,
    GenerationMixin,
    LlamaForCausalLM,
    PreTrainedModel,
    SiglipVisionModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, ConversionOps, WeightConverter, WeightRenaming
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersEncoder,
    Dinov2WithRegistersModel,
    Dinov2WithRegistersPatchEmbeddings,
    Dinov2WithRegistersPreTrainedModel,
)
from transformers.utils import ModelOutput, cached_file

try:
    from .configuration_openvla import OpenVLAConfig, conv_stem_in_channels, conv_stem_widths
    from .processing_openvla import (
        IGNORE_INDEX,
        ActionTokenizer,
        as_image_list,
        check_same_norm_stats,
        check_saved_folder,
        differing_norm_stats,
    )
except ImportError:
    from configuration_openvla import OpenVLAConfig, conv_stem_in_channels, conv_stem_widths
    from processing_openvla import (
        IGNORE_INDEX,
        ActionTokenizer,
        as_image_list,
        check_same_norm_stats,
        check_saved_folder,
        differing_norm_stats,
    )

# Largest |pixel value| the image processor produces: `(x - mean) / std` for `x` in [0, 1] stays within
# `max(mean, 1 - mean) / std`, under 3 for the ImageNet and SigLIP constants and under 10 for any `std >= 0.1`. Raw
# 0-255 pixels pass it as soon as one pixel is brighter than 10.
MAX_NORMALISED_PIXEL = 10.0
# The action statistics (`config.norm_stats`) of the model an adapter was trained into, saved beside the adapter.
ADAPTER_NORM_STATS_NAME = "norm_stats.json"


def regression_loss(
    predicted: torch.Tensor,
    target: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean absolute error over every action dimension (the loss of `action_head="l1_regression"`).

    Args:
        predicted: `[batch, ...]` actions in normalised units, e.g. `[batch, action_dim]`.
        target: the same shape.
        num_items_in_batch: if given (the `Trainer` passes it), the summed error is divided by this count of targets
            instead of averaged over this batch's.
        token_weights: `predicted.shape[1:]`, the weight of each action dimension's error (`action_loss_weights`);
            `None` weighs them alike.

    Returns:
        Scalar loss.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} actions disagree.")
    errors = F.l1_loss(predicted.float(), target.float(), reduction="none")
    return _reduce_loss(errors, num_items_in_batch, token_weights)


def _reduce_loss(
    losses: torch.Tensor, num_items_in_batch: int | torch.Tensor | None, token_weights: torch.Tensor | None
) -> torch.Tensor:
    """`losses` `[batch, ...]`, each weighted by `token_weights` `[...]`, averaged over the batch's or summed and divided
    by `num_items_in_batch`."""
    if token_weights is not None:
        if token_weights.shape != losses.shape[1:]:
            raise ValueError(f"token_weights {tuple(token_weights.shape)} must match the action tokens {tuple(losses.shape[1:])}.")
        losses = losses * token_weights.to(losses)
    return losses.mean() if num_items_in_batch is None else losses.sum() / num_items_in_batch


def vla_loss(
    action_logits: torch.Tensor,
    target_bins: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over every action dimension (the reference API's `vla_loss`).

    Args:
        action_logits: `[batch, ..., num_action_bins]`, e.g. `[batch, action_dim, num_action_bins]`.
        target_bins: `[batch, ...]` integer bins, e.g. `[batch, action_dim]`.
        num_items_in_batch: if given (the `Trainer` passes it under gradient accumulation or data parallelism), the
            summed cross-entropy is divided by this count of targets instead of averaged over this batch's.
        token_weights: `target_bins.shape[1:]`, the weight of each action token's cross-entropy
            (`action_loss_weights`); `None` weighs them alike.

    Returns:
        Scalar loss.
    """
    if action_logits.shape[:-1] != target_bins.shape:
        raise ValueError(
            f"action_logits {tuple(action_logits.shape)} and target_bins {tuple(target_bins.shape)} disagree; "
            "expected logits [batch, action_dim, num_action_bins] and targets [batch, action_dim]."
        )
    num_bins = action_logits.shape[-1]
    flat_logits, flat_targets = action_logits.reshape(-1, num_bins).float(), target_bins.reshape(-1).long()
    cross_entropy = F.cross_entropy(flat_logits, flat_targets, reduction="none").view(target_bins.shape)
    return _reduce_loss(cross_entropy, num_items_in_batch, token_weights)


@dataclass
class OpenVLAOutput(ModelOutput):
    """
    loss (`torch.FloatTensor`, *optional*): `vla_loss` of the action tokens, when `labels` are given.
    logits (`torch.FloatTensor` `[batch, sequence_length, vocab_size]`, *optional*): language-model logits; `None` in
        training mode with `labels` unless `logits_to_keep` is given (see `forward`).
    action_logits (`torch.FloatTensor` `[batch, action_dim, num_action_bins]`, *optional*): logits of the action bins
        at the action positions (`[batch, chunk, action_dim, num_action_bins]` for parallel decoding with chunks);
        present when the input holds action tokens (`labels`) or in parallel decoding, with `action_head="tokens"`.
    normalized_actions (`torch.FloatTensor` `[batch, action_dim]`, *optional*): the actions of
        `action_head="l1_regression"`, in normalised units (`[batch, chunk, action_dim]` with chunks).
    cache (`Cache`, *optional*): KV cache of the decoder.
    hidden_states, attentions: as returned by the decoder when requested.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    action_logits: torch.FloatTensor | None = None
    normalized_actions: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class IdentityRotaryEmbedding(nn.Module):
    """Stands in for the decoder's rotary embedding when `rope=False`: cos = 1 and sin = 0, the identity rotation,
    so queries and keys carry no position information."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*position_ids.shape, self.head_dim)
        ones = torch.ones(shape, dtype=hidden_states.dtype, device=hidden_states.device)
        return ones, torch.zeros_like(ones)


class OpenVLATimmDinov2Embeddings(nn.Module):
    """Embeddings with the parameters of timm's DINOv2 ViT (`no_embed_class=True`): class token, register tokens and
    position embeddings for the patches only (the class token has none), no mask token. Output
    `[cls, registers, patches + positions]`, exactly as timm computes it."""

    def __init__(self, config):
        super().__init__()
        self.patch_embeddings = Dinov2WithRegistersPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.patch_embeddings.num_patches, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        if bool_masked_pos is not None:
            raise ValueError("The timm-layout DINOv2 has no mask token; bool_masked_pos is not supported.")
        patches = self.patch_embeddings(pixel_values)
        if patches.shape[1] != self.position_embeddings.shape[1]:
            raise ValueError(
                f"Got {patches.shape[1]} patches but the position embeddings cover {self.position_embeddings.shape[1]}; "
                "resize images to the model's image_size."
            )
        batch_size = patches.shape[0]
        embeddings = torch.cat(
            [
                self.cls_token.expand(batch_size, -1, -1),
                self.register_tokens.expand(batch_size, -1, -1),
                patches + self.position_embeddings,
            ],
            dim=1,
        )
        return self.dropout(embeddings)


class OpenVLATimmDinov2Model(Dinov2WithRegistersPreTrainedModel):
    """`Dinov2WithRegistersModel` with the parameter set of official OpenVLA's timm tower
    (`vit_large_patch14_reg4_dinov2`); see `OpenVLATimmDinov2Embeddings`. Encoder and final norm are transformers'."""

    def __init__(self, config):
        super().__init__(config)
        self.config = config
        self.embeddings = OpenVLATimmDinov2Embeddings(config)
        self.encoder = Dinov2WithRegistersEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    forward = Dinov2WithRegistersModel.forward

    @torch.no_grad()
    def _init_weights(self, module) -> None:
        super()._init_weights(module)
        if isinstance(module, OpenVLATimmDinov2Embeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.register_tokens)


class OpenVLATimmSiglipVisionModel(SiglipVisionModel):
    """`SiglipVisionModel` of official OpenVLA's timm tower (`vit_so400m_patch14_siglip_224`): the attention-pooling
    head keeps its parameters (they are in the checkpoint) but is never run, as in the official code."""

    def __init__(self, config):
        super().__init__(config)
        self.use_head = False


class SqueezeLeadingDim(ConversionOps):
    """`[1, *shape]` -> `shape`: timm stores SigLIP's position embeddings as `[1, P, D]`, `nn.Embedding` as `[P, D]`."""

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        tensor = next(iter(input_dict.values()))
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        return {target_patterns[0]: tensor.squeeze(0).contiguous()}

    @property
    def reverse_op(self) -> ConversionOps:
        return UnsqueezeLeadingDim()


class UnsqueezeLeadingDim(ConversionOps):
    """`shape` -> `[1, *shape]` (the reverse of `SqueezeLeadingDim`)."""

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        tensor = next(iter(input_dict.values()))
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        return {target_patterns[0]: tensor.unsqueeze(0).contiguous()}

    @property
    def reverse_op(self) -> ConversionOps:
        return SqueezeLeadingDim()


class ConcatenateParts(ConversionOps):
    """Concatenates the source tensors (in source-pattern order) along `dim`; the reverse splits by the relative sizes
    `parts` (timm's attention-pool `q` [D] and `kv` [2D] <-> `nn.MultiheadAttention.in_proj` [3D]: parts (1, 2))."""

    def __init__(self, dim: int = 0, parts: tuple[int, ...] = (1, 2)):
        self.dim = dim
        self.parts = tuple(parts)

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        tensors = []
        for pattern in source_patterns:
            if pattern in input_dict:
                value = input_dict.pop(pattern)
                tensors.extend(value if isinstance(value, list) else [value])
        return {target_patterns[0]: torch.cat(tensors, dim=self.dim)}

    @property
    def reverse_op(self) -> ConversionOps:
        return SplitParts(self.dim, self.parts)


class SplitParts(ConversionOps):
    """Splits one tensor along `dim` into pieces of relative sizes `parts`, one per target (reverse of
    `ConcatenateParts`)."""

    def __init__(self, dim: int = 0, parts: tuple[int, ...] = (1, 2)):
        self.dim = dim
        self.parts = tuple(parts)

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        tensor = next(iter(input_dict.values()))
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        unit = tensor.shape[self.dim] // sum(self.parts)
        pieces = torch.split(tensor, [unit * part for part in self.parts], dim=self.dim)
        return {target: piece.contiguous() for target, piece in zip(target_patterns, pieces, strict=True)}

    @property
    def reverse_op(self) -> ConversionOps:
        return ConcatenateParts(self.dim, self.parts)


def _split_qkv(attention: str) -> list[WeightConverter]:
    """timm's fused `attn.qkv` (rows q; k; v), already renamed to `{attention}.qkv`, -> `{attention}.{q,k,v}_proj`.
    (Converters are looked up by source pattern, so each tower's must differ: hence the renaming first.)"""
    return [
        WeightConverter(
            source_patterns=rf"\.{attention}\.qkv\.{kind}",
            target_patterns=[f".{attention}.{name}_proj.{kind}" for name in ("q", "k", "v")],
            operations=[Chunk(dim=0)],
        )
        for kind in ("weight", "bias")
    ]


def timm_dinov2_conversions() -> list[WeightRenaming | WeightConverter]:
    """Official timm DINOv2 keys (`vision_backbone.featurizer.*`) -> `OpenVLATimmDinov2Model`. Rules, in order:
    `cls_token` -> `embeddings.cls_token`, `reg_token` -> `embeddings.register_tokens`, `pos_embed` -> `embeddings.position_embeddings`,
    `patch_embed.proj` -> `embeddings.patch_embeddings.projection`, `blocks.N` -> `encoder.layer.N`, `attn` ->
    `attention`, `attention.proj` -> `attention.o_proj`, `ls1/ls2.scale_factor` -> `layer_scale1/layer_scale2.lambda1`,
    `norm` -> `layernorm`, and the converters `attention.qkv.weight/bias` -> `attention.{q,k,v}_proj.weight/bias`
    (`Chunk(dim=0)`)."""
    return [
        WeightRenaming(r"^cls_token", "embeddings.cls_token"),
        WeightRenaming(r"^reg_token", "embeddings.register_tokens"),
        WeightRenaming(r"^pos_embed", "embeddings.position_embeddings"),
        WeightRenaming(r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
        WeightRenaming(r"^blocks\.(\d+)\.", r"encoder.layer.\1."),
        WeightRenaming(r"\.attn\.", ".attention."),
        WeightRenaming(r"\.attention\.proj\.", ".attention.o_proj."),
        WeightRenaming(r"\.ls1\.scale_factor", ".layer_scale1.lambda1"),
        WeightRenaming(r"\.ls2\.scale_factor", ".layer_scale2.lambda1"),
        WeightRenaming(r"^norm\.", "layernorm."),
        *_split_qkv("attention"),
    ]


def timm_siglip_conversions() -> list[WeightRenaming | WeightConverter]:
    """Official timm SigLIP keys (`vision_backbone.fused_featurizer.*`) -> `OpenVLATimmSiglipVisionModel`. Rules, in
    order: `patch_embed.proj` -> `embeddings.patch_embedding`, `blocks.N` -> `encoder.layers.N`, `norm1/norm2` ->
    `layer_norm1/layer_norm2`, `attn` -> `self_attn`, `self_attn.proj` -> `self_attn.out_proj`, `norm` ->
    `post_layernorm`, `attn_pool.latent` -> `head.probe`, `attn_pool.proj` -> `head.attention.out_proj`,
    `attn_pool.norm` -> `head.layernorm`, `attn_pool.mlp` -> `head.mlp`, and the converters
    `self_attn.qkv.weight/bias` -> `self_attn.{q,k,v}_proj.weight/bias` (`Chunk`),
    `pos_embed` -> `embeddings.position_embedding.weight` (`SqueezeLeadingDim`), `attn_pool.q` + `attn_pool.kv` ->
    `head.attention.in_proj_weight/bias` (`ConcatenateParts`)."""
    return [
        WeightRenaming(r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
        WeightRenaming(r"^blocks\.(\d+)\.", r"encoder.layers.\1."),
        WeightRenaming(r"\.norm1\.", ".layer_norm1."),
        WeightRenaming(r"\.norm2\.", ".layer_norm2."),
        WeightRenaming(r"\.attn\.", ".self_attn."),
        WeightRenaming(r"\.self_attn\.proj\.", ".self_attn.out_proj."),
        WeightRenaming(r"^norm\.", "post_layernorm."),
        WeightRenaming(r"^attn_pool\.latent", "head.probe"),
        WeightRenaming(r"^attn_pool\.proj\.", "head.attention.out_proj."),
        WeightRenaming(r"^attn_pool\.norm\.", "head.layernorm."),
        WeightRenaming(r"^attn_pool\.mlp\.", "head.mlp."),
        *_split_qkv("self_attn"),
        WeightConverter(r"^pos_embed", "embeddings.position_embedding.weight", operations=[SqueezeLeadingDim()]),
        *[
            WeightConverter(
                source_patterns=[rf"^attn_pool\.q\.{kind}", rf"^attn_pool\.kv\.{kind}"],
                target_patterns=f"head.attention.in_proj_{kind}",
                operations=[ConcatenateParts(dim=0, parts=(1, 2))],
            )
            for kind in ("weight", "bias")
        ],
    ]


# Registered by class name: transformers applies them, scoped to `vision_backbone.featurizer` /
# `vision_backbone.fused_featurizer`, when loading a model holding these towers (and reverts them when saving it with
# `save_original_format=True`, which writes the official names again).
register_checkpoint_conversion_mapping("OpenVLATimmDinov2Model", timm_dinov2_conversions(), overwrite=True)
register_checkpoint_conversion_mapping("OpenVLATimmSiglipVisionModel", timm_siglip_conversions(), overwrite=True)
TIMM_LAYOUT_TOWERS = {"dinov2_with_registers": OpenVLATimmDinov2Model, "siglip_vision_model": OpenVLATimmSiglipVisionModel}


def _vision_tower(config, layout: str) -> PreTrainedModel:
    """A transformers vision model for `config`; with `layout="timm"` the tower class of official checkpoints."""
    if layout != "timm":
        return AutoModel.from_config(config)
    if config.model_type not in TIMM_LAYOUT_TOWERS:
        raise ValueError(
            f"vision_layout='timm' supports the vision models {sorted(TIMM_LAYOUT_TOWERS)}, got {config.model_type!r}."
        )
    return TIMM_LAYOUT_TOWERS[config.model_type]._from_config(config)


def _is_loaded(parameter: torch.Tensor) -> bool:
    """Whether `from_pretrained` filled `parameter` from a checkpoint (the flag `transformers.initialization` checks)."""
    return getattr(parameter, "_is_hf_initialized", False)


def sincos_1d_positions(positions: torch.Tensor, width: int, base: float = 10000.0) -> torch.Tensor:
    """Sine-cosine embeddings of 1-D `positions` `[N]`: `[N, width]` (sines then cosines of `width // 2` frequencies
    from 1 down to `1 / base` per unit; `width` even)."""
    if width % 2:
        raise ValueError(f"Sine-cosine embeddings need an even width, got {width}.")
    frequencies = 1.0 / base ** (torch.arange(width // 2, dtype=torch.float32) / (width // 2))
    angles = positions.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_positions(grid: int, width: int) -> torch.Tensor:
    """2-D sine-cosine position embeddings of a `grid` x `grid` patch grid, row-major: `[grid * grid, width]` (x in the
    first half of the features, y in the second; `width` divisible by 4)."""
    if width % 4:
        raise ValueError(f"Sine-cosine position embeddings need a width divisible by 4, got {width}.")
    rows, columns = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d_positions(columns.flatten(), width // 2), sincos_1d_positions(rows.flatten(), width // 2)], dim=1)


class OpenVLAConvStem(nn.Sequential):
    """Convolutional patch embedding of `vision_stem="coordconv"`: 3x3 stride-2 convolutions with ReLU (widths from
    `conv_stem_widths`), then a 1x1 convolution to the tower width. `[batch, channels, H, W]` ->
    `[batch, width, H / patch_size, W / patch_size]`, the output shape of DINOv2's patch projection it replaces.

    The first convolution also sees each pixel's x and y, from -1 to 1, as two more channels (CoordConv, Liu et al.
    2018): its ReLU features are then products of what and where from the first layer, so the position of a small
    object is one pooling away, where additive position embeddings leave that product to be learned deep in the
    network.
    """

    def __init__(self, in_channels: int, patch_size: int, width: int):
        widths = conv_stem_widths(patch_size, width)
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip([conv_stem_in_channels(in_channels), *widths[:-1]], widths):
            layers += [nn.Conv2d(fan_in, fan_out, kernel_size=3, stride=2, padding=1), nn.ReLU()]
        super().__init__(*layers, nn.Conv2d(width, width, kernel_size=1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values [batch, channels, H, W]` with the pixel coordinates appended -> `[batch, width, H / patch, W / patch]`."""
        batch, _, height, width = pixel_values.shape
        kwargs = {"device": pixel_values.device, "dtype": pixel_values.dtype}
        rows, columns = torch.meshgrid(torch.linspace(-1, 1, height, **kwargs), torch.linspace(-1, 1, width, **kwargs), indexing="ij")
        grid = torch.stack([columns, rows]).expand(batch, -1, -1, -1)
        return super().forward(torch.cat([pixel_values, grid], dim=1))

    @property
    def weight(self) -> nn.Parameter:
        """The first convolution's weight: DINOv2's patch embedding casts the pixels to the dtype of `projection.weight`."""
        return self[0].weight


class OpenVLAVisionBackbone(nn.Module):
    """DINOv2 (optionally fused with SigLIP) patch features of one hidden layer, without CLS / register tokens.

    For a fused backbone, channels 0-2 of `pixel_values` go to the first model and channels 3-5 to the second; their
    patch features are concatenated on the feature dimension.
    """

    def __init__(self, config: OpenVLAConfig):
        super().__init__()
        self.feature_layer = config.vision_feature_layer
        self.featurizer = _vision_tower(config.vision_config, config.vision_layout)
        self.fused_featurizer = (
            _vision_tower(config.fused_vision_config, config.vision_layout)
            if config.fused_vision_config is not None
            else None
        )
        if config.vision_stem != "patch":
            vision = config.vision_config
            self.featurizer.embeddings.patch_embeddings.projection = OpenVLAConvStem(
                vision.num_channels, config.patch_size, vision.hidden_size
            )

    def _patch_features(self, model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        num_prefix_tokens = hidden_states.shape[1] - (pixel_values.shape[-1] // model.config.patch_size) ** 2
        return hidden_states[:, num_prefix_tokens:]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[batch, channels, height, width]` -> `[batch, num_patches, vision_dim]`."""
        if self.fused_featurizer is None:
            return self._patch_features(self.featurizer, pixel_values)
        first_channels = self.featurizer.config.num_channels
        features = self._patch_features(self.featurizer, pixel_values[:, :first_channels])
        fused = self._patch_features(self.fused_featurizer, pixel_values[:, first_channels:])
        return torch.cat([features, fused], dim=-1)


class OpenVLAProjector(nn.Module):
    """MLP from vision features to the LLM width: `fc1 -> GELU -> fc2`, or for a fused backbone
    `fc1 (4x wider) -> GELU -> fc2 -> GELU -> fc3` (official OpenVLA's "fused-gelu-mlp")."""

    def __init__(self, vision_dim: int, hidden_dim: int, fused: bool):
        super().__init__()
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, hidden_dim)
            self.fc3 = nn.Linear(hidden_dim, hidden_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, hidden_dim)
            self.fc2 = nn.Linear(hidden_dim, hidden_dim)
            self.fc3 = None
        self.act = nn.GELU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[batch, num_patches, vision_dim]` -> `[batch, num_patches, hidden_dim]`."""
        hidden_states = self.fc2(self.act(self.fc1(features)))
        if self.fc3 is not None:
            hidden_states = self.fc3(self.act(hidden_states))
        return hidden_states


class OpenVLAActionHead(nn.Module):
    """Continuous action head of `action_head="l1_regression"` (OpenVLA-OFT): `fc1 -> GELU -> fc2` maps the final
    hidden state of each action query to one action value in normalised units."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[batch, num_action_tokens, hidden_dim]` -> `[batch, num_action_tokens]`."""
        return self.fc2(self.act(self.fc1(hidden_states))).squeeze(-1)


class ActionTokenRange(LogitsProcessor):
    """Restricts greedy decoding to the action tokens `[start, end)`."""

    def __init__(self, start: int, end: int):
        self.start = start
        self.end = end

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.full_like(scores, float("-inf"))
        allowed[:, self.start : self.end] = 0.0
        return scores + allowed


class OpenVLAPreTrainedModel(PreTrainedModel):
    config_class = OpenVLAConfig
    config: OpenVLAConfig
    base_model_prefix = "openvla"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "Dinov2Layer", "Dinov2WithRegistersLayer", "SiglipEncoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Save with this model's own parameter names (transformers would otherwise write the legacy names of the
        DINOv2 attention weights), so that a plain `load_state_dict`, which the `Trainer` uses to resume from a
        checkpoint, finds every weight."""
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved model. A local folder is checked first for `config.json` (unless `config=` is given) and
        safetensors weights, so that an incomplete folder (e.g. left by a run killed while saving) fails with the
        missing file named, rather than loading a default-sized model or failing inside the Hub lookup.

        Hub kernels stay off unless `use_kernels=True` is passed: transformers would otherwise replace layers of a
        model placed on a GPU with kernels downloaded from the Hub, which fails on a robot without internet access and
        changes the numerics that make the loaded model match the official one."""
        needs = {"model.safetensors": (".safetensors", ".safetensors.index.json")}
        if kwargs.get("config") is None:
            needs["config.json"] = ("config.json",)
        check_saved_folder(pretrained_model_name_or_path, needs, kwargs.get("subfolder"))
        kwargs.setdefault("use_kernels", False)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def load_adapter(self, peft_model_id: str | None = None, adapter_name: str | None = None, **kwargs):
        """Load a PEFT adapter as `PeftAdapterMixin.load_adapter` does, with its action statistics
        (`load_adapter_norm_stats`). The first adapter loaded is the active one. To switch between several adapters on
        one base model, use PEFT's own API: `PeftModel.from_pretrained(model, path_a, adapter_name="a")`, then
        `.load_adapter(path_b, adapter_name="b")` and `.set_adapter("b")`, with `model.load_adapter_norm_stats(path)`
        for each adapter (transformers' `set_adapter` needs peft >= 0.22)."""
        result = super().load_adapter(peft_model_id, adapter_name=adapter_name, **kwargs)
        if peft_model_id is not None:
            self.load_adapter_norm_stats(peft_model_id, local_files_only=kwargs.get("local_files_only", False))
        return result

    def load_adapter_norm_stats(self, adapter: str, local_files_only: bool = False) -> None:
        """Add the action statistics saved beside an adapter (`ADAPTER_NORM_STATS_NAME`, written by
        `scripts/finetune.py --use_lora`; an adapter folder or Hub id without it adds none) to `config.norm_stats`, so
        that `predict_action` can unnormalise the actions of the datasets the adapter was trained on. A dataset the
        model already has statistics for must have the same ones, else `ValueError` (the adapter was trained on other
        data under that name). Give the processor the model's statistics afterwards: `processor.norm_stats =
        model.config.norm_stats`."""
        stats_file = cached_file(
            adapter, ADAPTER_NORM_STATS_NAME, _raise_exceptions_for_missing_entries=False, local_files_only=local_files_only
        )
        if stats_file is None:
            return
        with open(stats_file) as file:
            adapter_stats = json.load(file)
        conflicting = differing_norm_stats(self.config.norm_stats or {}, adapter_stats)
        if conflicting:
            raise ValueError(
                f"The adapter {adapter!r} was trained with other statistics for dataset(s) {conflicting} than the "
                "model holds under those names; load it on the model it was trained from."
            )
        self.config.norm_stats = {**(self.config.norm_stats or {}), **adapter_stats}


class OpenVLAForActionPrediction(OpenVLAPreTrainedModel, GenerationMixin):
    """Image + instruction -> discretised robot action.

    Submodules keep the official OpenVLA names: `vision_backbone` (`featurizer`, `fused_featurizer`), `projector`
    (`fc1`, `fc2`, `fc3`) and `language_model` (a `LlamaForCausalLM`). In parallel decoding, `action_queries` holds one
    learned embedding per predicted action token, and with `action_head="l1_regression"` the `action_head` MLP turns
    their final hidden states into continuous actions.
    """

    def __init__(self, config: OpenVLAConfig):
        super().__init__(config)
        self._action_tokenizer: ActionTokenizer | None = None
        self._action_tokenizer_key: tuple | None = None
        self.vision_backbone = OpenVLAVisionBackbone(config)
        self.projector = OpenVLAProjector(
            config.vision_dim, config.hidden_dim, fused=config.fused_vision_config is not None
        )
        self.language_model = LlamaForCausalLM(config.text_config)
        if not config.rope:
            text_config = config.text_config
            head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
            self.language_model.model.rotary_emb = IdentityRotaryEmbedding(head_dim)
        self.action_queries = (
            nn.Embedding(config.action_chunk_size * config.action_dim, config.hidden_dim)
            if config.action_decoding == "parallel"
            else None
        )
        self.action_head = OpenVLAActionHead(config.hidden_dim) if config.action_head == "l1_regression" else None
        self.post_init()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialise every weight that no checkpoint supplied: transformers' initialisation (each tower by its own
        `_init_weights`), then the starts of a model trained from scratch, in this order:

        1. DINOv2 patch position embeddings: 2-D sine-cosine (`_start_with_sincos_positions`);
        2. the action tokens' input and output embeddings: ordinal (`_start_with_ordinal_action_embeddings`);
        3. `vision_stem="coordconv"`: He initialisation of the stem (`_start_conv_stem`);
        4. `weight_init="fan_in"`: every linear and convolution weight from N(0, 1 / fan_in) (`_start_with_fan_in_weights`).

        transformers calls this hook when a model is built from its config (`post_init`) and, for the weights a
        checkpoint lacks, in `from_pretrained`, so both start a weight alike; the `transformers.initialization`
        functions used here leave loaded weights alone. These steps reach into the DINOv2 and Llama towers, whose
        modules transformers initialises with the towers' own `_init_weights` (never this model's), and step 4 draws
        over the whole model in one order, so they run here, after that, rather than per module in `_init_weights`.
        """
        super().initialize_weights()
        self._start_with_sincos_positions()
        self._start_with_ordinal_action_embeddings()
        self._start_conv_stem()
        self._start_with_fan_in_weights()

    def _start_with_sincos_positions(self) -> None:
        """A DINOv2 tower (transformers layout) starts with 2-D sine-cosine patch position embeddings (as MAE) instead
        of random ones, and a zero class-token position: the patch features then carry a clear position signal from
        the first step, and a model trained from scratch learns where things are in the image far sooner."""
        featurizer = self.vision_backbone.featurizer
        if not isinstance(featurizer, (Dinov2Model, Dinov2WithRegistersModel)):
            return
        positions = featurizer.embeddings.position_embeddings
        grid = int(round((positions.shape[1] - 1) ** 0.5))
        table = F.pad(sincos_2d_positions(grid, positions.shape[-1]), (0, 0, 1, 0))  # row 0: the class token
        init.copy_(positions, table.unsqueeze(0).to(positions.dtype))

    def _start_with_ordinal_action_embeddings(self) -> None:
        """The input and output embeddings of the action tokens start as 1-D sine-cosine embeddings of their bin index
        (frequencies from 1 down to `1 / num_action_bins` per bin, scaled to the initializer's standard deviation, or
        to `1 / sqrt(width)` with `weight_init="fan_in"`), instead of random ones: neighbouring bins start alike and
        far bins unlike, so a hidden state that moves a little moves the predicted bin a little, and the 256-way
        classification starts out ordinal, as the action values are. Skipped for an odd decoder width."""
        output_embeddings = self.get_output_embeddings().weight
        if output_embeddings.shape[1] % 2:
            return
        tokenizer = self.action_tokenizer
        bins = torch.arange(self.config.num_action_bins - 1, -1, -1)  # token ids ascending = bins descending
        table = sincos_1d_positions(bins, output_embeddings.shape[1], base=self.config.num_action_bins)
        std = output_embeddings.shape[1] ** -0.5 if self.config.weight_init == "fan_in" else self.config.text_config.initializer_range
        table = table * (std * 2**0.5)
        rows = slice(tokenizer.action_token_start, tokenizer.action_token_end)
        for embeddings in (output_embeddings, self.get_input_embeddings().weight):
            if not _is_loaded(embeddings):  # a slice loses the flag that `transformers.initialization` checks
                embeddings[rows] = table.to(embeddings.dtype)

    def _start_conv_stem(self) -> None:
        """A convolutional stem (`vision_stem="coordconv"`) starts with He initialisation (fan-in, ReLU gain) and zero
        biases, which keep the activations' scale through the stem; the DINOv2 initialiser's std of 0.02, which
        transformers gives every convolution of the tower, would shrink them about a thousandfold."""
        if self.config.vision_stem == "patch":
            return
        for conv in self.vision_backbone.featurizer.embeddings.patch_embeddings.projection:
            if isinstance(conv, nn.Conv2d):
                init.kaiming_normal_(conv.weight, nonlinearity="relu")
                init.zeros_(conv.bias)

    def _start_with_fan_in_weights(self) -> None:
        """With `weight_init="fan_in"`, every linear and convolution weight but the LM head's starts from a normal with
        std `1 / sqrt(fan_in)` (biases, norms and embeddings keep their start)."""
        if self.config.weight_init != "fan_in":
            return
        head = self.get_output_embeddings()
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module is not head:
                init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    @property
    def action_tokenizer(self) -> ActionTokenizer:
        """The `ActionTokenizer` of `config`'s action settings: built once, and again only after they change (e.g.
        when fine-tuning adds a dataset's statistics to `config.norm_stats`)."""
        config = self.config
        # The tokenizer holds a shallow copy of `norm_stats`, so it keeps each dataset's statistics object alive (their
        # ids stay theirs while it is cached) and sees changes inside them; a dataset added, removed or replaced
        # changes the key.
        key = (
            config.num_action_bins,
            config.action_token_end,
            config.action_min,
            config.action_max,
            config.action_binning,
            tuple((name, id(stats)) for name, stats in (config.norm_stats or {}).items()),
        )
        if self._action_tokenizer_key != key:
            self._action_tokenizer = ActionTokenizer.from_config(config)
            self._action_tokenizer_key = key
        return self._action_tokenizer

    @property
    def num_action_tokens(self) -> int:
        """Action tokens predicted per call: `action_chunk_size * action_dim`."""
        return self.config.action_chunk_size * self.config.action_dim

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Refuse anything but what the image processor makes: a floating-point tensor `[batch, C, H, W]` of finite
        values within +-`MAX_NORMALISED_PIXEL`.

        An integer dtype (uint8 camera frames) or a value beyond the bound (0-255 pixels) means raw pixels that were
        not normalised; NaN or inf would pin the action to one end of its range. The value check is one reduction over
        the tensor, skipped on the meta device and while compiling. Raw pixels already scaled to [0, 1] lie within
        the bound and cannot be told apart from normalised ones.
        """
        fix = "preprocess images with the model's OpenVLAProcessor / OpenVLAImageProcessor"
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(
                f"pixel_values must be a torch tensor, got {type(pixel_values).__name__}; {fix} (return_tensors='pt')."
            )
        config = self.config
        expected = (config.pixel_channels, config.image_size, config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be [batch, {expected[0]}, {expected[1]}, {expected[2]}] for this model, got "
                f"{tuple(pixel_values.shape)}; {fix}."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values have dtype {pixel_values.dtype}, so they are raw image pixels; {fix}.")
        if pixel_values.device.type == "meta" or torch.compiler.is_compiling():
            return
        if not bool((pixel_values.abs() <= MAX_NORMALISED_PIXEL).all()):
            if not bool(torch.isfinite(pixel_values).all()):
                raise ValueError(f"pixel_values hold NaN or inf; check the camera frame and {fix}.")
            raise ValueError(
                f"pixel_values reach {pixel_values.abs().max().item():.4g}, beyond the +-{MAX_NORMALISED_PIXEL} that "
                f"normalised images span: they look like raw 0-255 pixels; {fix}."
            )

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features of the vision backbone: `[batch, C, H, W]` -> `[batch, num_patches, vision_dim]`."""
        self._check_pixel_values(pixel_values)
        return self.vision_backbone(pixel_values.to(self.dtype))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected patch features: `[batch, C, H, W]` -> `[batch, num_patches, hidden_dim]`."""
        return self.projector(self.encode_image(pixel_values))

    def _check_vision_features(self, vision_features: torch.Tensor) -> None:
        """Refuse anything but `encode_image`'s output: a floating-point tensor `[batch, num_patches, vision_dim]`."""
        config = self.config
        expected = (config.num_patches, config.vision_dim)
        if (
            not isinstance(vision_features, torch.Tensor)
            or not vision_features.is_floating_point()
            or vision_features.ndim != 3
            or tuple(vision_features.shape[1:]) != expected
        ):
            got = tuple(vision_features.shape) if isinstance(vision_features, torch.Tensor) else type(vision_features).__name__
            dtype = f" {vision_features.dtype}" if isinstance(vision_features, torch.Tensor) else ""
            raise ValueError(
                f"vision_features must be a floating-point tensor [batch, {expected[0]}, {expected[1]}] for this model "
                f"(the vision backbone's patch features, before the projector), got{dtype} {got}; compute them with "
                "model.encode_image(pixel_values)."
            )

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings `[batch, seq, hidden]` with the image placeholders replaced by projected patches: those of
        `pixel_values` `[batch, C, H, W]`, or of `vision_features` `[batch, num_patches, vision_dim]` computed before by
        `encode_image` (a frozen vision backbone's features, cached for training)."""
        if pixel_values is not None and vision_features is not None:
            raise ValueError(
                "Pass pixel_values or vision_features (model.encode_image(pixel_values)), not both: they are the same image."
            )
        image_mask = input_ids == self.config.image_token_id
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        placeholders = image_mask.sum(-1)
        checkable = input_ids.device.type != "meta"
        if pixel_values is None and vision_features is None:
            if checkable and placeholders.any():
                raise ValueError("input_ids hold image placeholders but neither pixel_values nor vision_features were given.")
            return inputs_embeds
        if checkable and not torch.all(placeholders == self.config.num_patches):
            raise ValueError(
                f"Each row of input_ids must hold {self.config.num_patches} image placeholders (id "
                f"{self.config.image_token_id}), got {placeholders.tolist()}; build inputs with OpenVLAProcessor."
            )
        if vision_features is None:
            image_features = self.get_image_features(pixel_values)
        else:
            self._check_vision_features(vision_features)
            image_features = self.projector(vision_features.to(self.dtype))
        if image_features.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Got {image_features.shape[0]} images for {input_ids.shape[0]} rows of input_ids.")
        mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))

    def _action_positions(self, labels: torch.LongTensor) -> torch.Tensor:
        """Boolean `[batch, seq]` mask of the supervised action tokens, checked to hold `num_action_tokens` per row."""
        supervised = labels != IGNORE_INDEX
        counts = supervised.sum(-1)
        if not torch.all(counts == self.num_action_tokens):
            raise ValueError(
                f"Each row of labels must supervise {self.num_action_tokens} action tokens "
                f"(action_chunk_size * action_dim), got {counts.tolist()}."
            )
        tokenizer = self.action_tokenizer
        targets = labels[supervised]
        if torch.any((targets < tokenizer.action_token_start) | (targets >= tokenizer.action_token_end)):
            raise ValueError(
                f"labels must be action tokens in [{tokenizer.action_token_start}, {tokenizer.action_token_end}) or "
                f"{IGNORE_INDEX}; build them with OpenVLAProcessor(actions=...)."
            )
        return supervised

    def _bin_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden states `[..., hidden]` -> logits of the action bins `[..., num_action_bins]` (bin 0 first)."""
        tokenizer = self.action_tokenizer
        head = self.get_output_embeddings()
        weight = head.weight[tokenizer.action_token_start : tokenizer.action_token_end].flip(0)
        bias = head.bias[tokenizer.action_token_start : tokenizer.action_token_end].flip(0) if head.bias is not None else None
        return F.linear(hidden_states, weight, bias)

    def _parallel_inputs(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.LongTensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the action queries over the action tokens (training) or append them (inference); a missing
        `attention_mask` means no padding.

        Returns the embeddings, the 2D attention mask, and a boolean `[batch, seq]` mask of the query positions.
        """
        batch_size = inputs_embeds.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        queries = self.action_queries.weight.to(inputs_embeds.dtype)
        if labels is not None:
            query_mask = self._action_positions(labels)
            expanded = query_mask.unsqueeze(-1).expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(expanded, queries.repeat(batch_size, 1))
            return inputs_embeds, attention_mask, query_mask
        inputs_embeds = torch.cat([inputs_embeds, queries.unsqueeze(0).expand(batch_size, -1, -1)], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, self.num_action_tokens)], dim=1)
        query_mask = torch.zeros(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
        query_mask[:, -self.num_action_tokens :] = True
        return inputs_embeds, attention_mask, query_mask

    def _parallel_attention_mask(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, query_mask: torch.Tensor
    ):
        """Bidirectional among the action queries (one block of `block_sequence_ids`); over the prefix before them
        causal, or with `prefix_attention="bidirectional"` a second block."""
        block_ids = torch.where(query_mask, 0, -1)
        if self.config.prefix_attention == "bidirectional":
            block_ids = block_ids.masked_fill(query_mask.cumsum(-1) == 0, 1)
        return create_causal_mask(
            config=self.language_model.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
            block_sequence_ids=block_ids,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs,
    ) -> OpenVLAOutput:
        """
        Args:
            input_ids: `[batch, seq]` from `OpenVLAProcessor`: `[BOS | image placeholders | prompt | action tokens]`.
            attention_mask: `[batch, seq]`, 0 on (left) padding.
            pixel_values: `[batch, 3 or 6, image_size, image_size]`.
            vision_features: instead of `pixel_values`, the vision backbone's patch features
                `[batch, num_patches, vision_dim]` as `model.encode_image(pixel_values)` returns them (before the
                projector, which may train). For training with a frozen vision backbone, whose features can be
                computed once per image and cached (`scripts/finetune.py` does so); give exactly one of the two when
                `input_ids` hold image placeholders.
            labels: `[batch, seq]`, action token ids where supervised, -100 elsewhere.
            logits_to_keep: LM logits for the last N positions (an int, 0 = all) or the given positions (a tensor).
                `None` (default) means all positions, except in training mode with `labels`: the loss needs only
                `action_logits`, so the `[batch, seq, vocab]` LM logits are skipped (`logits=None`), with their matmul
                and memory (large for a 32,000-token vocabulary).
            num_items_in_batch: number of supervised tokens across accumulated batches and processes (the `Trainer`
                passes it); the loss is then a sum divided by it.

        Returns:
            `OpenVLAOutput`; `action_logits` is `[batch, action_dim, num_action_bins]` (with a chunk dimension after
            `batch` for parallel decoding with chunks), or with `action_head="l1_regression"` `normalized_actions` is
            `[batch, action_dim]` (likewise).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        parallel = self.config.action_decoding == "parallel"

        # 1. Embed the sequence: token embeddings, the image placeholders replaced by projected patch features
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, vision_features)

        # 2. Parallel decoding: the action queries take the action tokens' places (training) or follow the prompt
        query_mask = None
        if parallel:
            inputs_embeds, attention_mask, query_mask = self._parallel_inputs(inputs_embeds, attention_mask, labels)
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]

        # 3. Run the decoder: causal, or in parallel decoding bidirectional among the action queries
        if parallel:
            attention_mask = self._parallel_attention_mask(inputs_embeds, attention_mask, position_ids, query_mask)
        outputs = self.language_model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache and not parallel,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state

        # 4. Language-model logits (skipped in training with labels unless `logits_to_keep` asks for them)
        logits = self._language_logits(hidden_states, labels, logits_to_keep)

        # 5. Action head over the hidden states that predict the actions, and its loss against the labels
        action_logits = normalized_actions = loss = None
        if parallel or labels is not None:
            action_hidden = self._action_hidden_states(hidden_states, labels, query_mask)
            action_logits, normalized_actions, loss = self._predict_actions(action_hidden, labels, num_items_in_batch)
        return OpenVLAOutput(
            loss=loss,
            logits=logits,
            action_logits=action_logits,
            normalized_actions=normalized_actions,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _language_logits(
        self, hidden_states: torch.Tensor, labels: torch.LongTensor | None, logits_to_keep: int | torch.Tensor | None
    ) -> torch.Tensor | None:
        """LM-head logits `[batch, kept, vocab_size]` of the positions `logits_to_keep` selects (`None`: all), or `None`
        in training mode with `labels` and no `logits_to_keep` (the loss needs only the action logits)."""
        if logits_to_keep is None and self.training and labels is not None:
            return None
        kept = hidden_states if logits_to_keep is None else slice_logits_to_keep(hidden_states, logits_to_keep)
        return self.language_model.lm_head(kept)

    def _action_hidden_states(
        self, hidden_states: torch.Tensor, labels: torch.LongTensor | None, query_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Decoder hidden states `[batch, seq, hidden]` -> those that predict the action tokens
        `[batch, num_action_tokens, hidden]`: the action queries' (parallel decoding, `query_mask`), or else each
        supervised action token's predecessor's (autoregressive decoding, `labels`)."""
        batch_size = hidden_states.shape[0]
        if query_mask is not None:
            return hidden_states[query_mask].view(batch_size, self.num_action_tokens, -1)
        predicts_action = self._action_positions(labels)[:, 1:]
        return hidden_states[:, :-1][predicts_action].view(batch_size, self.num_action_tokens, -1)

    def _predict_actions(
        self,
        action_hidden: torch.Tensor,
        labels: torch.LongTensor | None,
        num_items_in_batch: int | torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The action head over `action_hidden` `[batch, num_action_tokens, hidden]`.

        Returns:
            `(action_logits, normalized_actions, loss)`: the bins' logits `[batch, action_dim, num_action_bins]`
            (`action_head="tokens"`) or the continuous actions `[batch, action_dim]` (`action_head="l1_regression"`),
            the other `None`, each with a chunk dimension after `batch` for action chunks; the loss if `labels` are
            given, else `None`.
        """
        if self.action_head is not None:
            predictions = self.action_head(action_hidden)
        else:
            predictions = self._bin_logits(action_hidden)
        loss = None if labels is None else self._action_loss(predictions, labels, num_items_in_batch)
        predictions = self._chunked(predictions)
        return (None, predictions, loss) if self.action_head is not None else (predictions, None, loss)

    def _action_loss(
        self, predictions: torch.Tensor, labels: torch.LongTensor, num_items_in_batch: int | torch.Tensor | None
    ) -> torch.Tensor:
        """`vla_loss` of the bins' logits `[batch, num_action_tokens, num_action_bins]`, or with
        `action_head="l1_regression"` `regression_loss` of the actions `[batch, num_action_tokens]`, against the
        action tokens of `labels`."""
        tokenizer = self.action_tokenizer
        target_bins = tokenizer.token_ids_to_bins(labels[labels != IGNORE_INDEX]).view(labels.shape[0], self.num_action_tokens)
        token_weights = self._action_token_weights()
        if self.action_head is not None:
            targets = tokenizer.bins_to_normalized_actions(target_bins)
            return regression_loss(predictions, targets, num_items_in_batch, token_weights)
        return vla_loss(predictions, target_bins, num_items_in_batch, token_weights)

    def _action_token_weights(self) -> torch.Tensor | None:
        """`config.action_loss_weights` repeated for each action of a chunk, `[num_action_tokens]`, scaled to mean 1
        so that the loss keeps its scale; `None` without them."""
        weights = self.config.action_loss_weights
        if weights is None:
            return None
        token_weights = torch.tensor(weights, dtype=torch.float32).repeat(self.config.action_chunk_size)
        return token_weights / token_weights.mean()

    def _chunked(self, values: torch.Tensor) -> torch.Tensor:
        """`[batch, chunk * action_dim, ...]` -> `[batch, action_dim, ...]`, or `[batch, chunk, action_dim, ...]`."""
        if self.config.action_chunk_size == 1:
            return values
        return values.view(values.shape[0], self.config.action_chunk_size, self.config.action_dim, *values.shape[2:])

    def _predict_in_parallel(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, pixel_values: torch.Tensor | None
    ) -> OpenVLAOutput:
        """One parallel-decoding forward pass over prompts (the action queries are appended, a missing attention mask
        means no padding); the full-vocabulary LM head runs for the last position only."""
        return self(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, logits_to_keep=1)

    @torch.no_grad()
    def predict_action_logits(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the action bins for a batch of prompts (no action tokens in `input_ids`).

        Autoregressive decoding runs `generate()` greedily over the action tokens with a KV cache and collects each
        step's logits; parallel decoding runs one forward pass.

        Returns:
            `[batch, action_dim, num_action_bins]`, or `[batch, chunk, action_dim, num_action_bins]` with chunks.
        """
        if self.action_head is not None:
            raise ValueError(
                "This model has a continuous action head (action_head='l1_regression') and predicts no action logits; "
                "use predict_action (or forward's normalized_actions)."
            )
        if self.config.action_decoding == "parallel":
            return self._predict_in_parallel(input_ids, attention_mask, pixel_values).action_logits
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokenizer = self.action_tokenizer
        # No min_new_tokens: `ActionTokenRange` already keeps EOS (not an action token) from being generated, and its
        # logits processors would scan the whole vocabulary for EOS at every step. The step count is checked below.
        generation_config = GenerationConfig(
            max_new_tokens=self.num_action_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=self.config.text_config.pad_token_id or 0,
            eos_token_id=None,
            bos_token_id=None,
            return_dict_in_generate=True,
            output_logits=True,
        )
        generated = self.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([ActionTokenRange(tokenizer.action_token_start, tokenizer.action_token_end)]),
        )
        if len(generated.logits) != self.num_action_tokens:
            raise ValueError(
                f"generate() stopped after {len(generated.logits)} of {self.num_action_tokens} action tokens: the EOS id "
                f"{self.generation_config.eos_token_id} lies among the action tokens [{tokenizer.action_token_start}, "
                f"{tokenizer.action_token_end}); give the model's generation_config an EOS id outside them."
            )
        step_logits = torch.stack(generated.logits, dim=1)
        return self._chunked(step_logits[..., tokenizer.action_token_start : tokenizer.action_token_end].flip(-1))

    @torch.no_grad()
    def predict_action(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        unnorm_key: str | None = None,
    ) -> torch.Tensor:
        """Continuous actions for a batch of images and instructions.

        Args:
            input_ids, attention_mask, pixel_values: the output of `OpenVLAProcessor(images=..., text=...)`.
            unnorm_key: dataset whose statistics (`config.norm_stats`) unnormalise the actions; may be left out when
                there is one dataset. Without statistics the actions stay in `[action_min, action_max]`.

        Returns:
            float32 actions `[batch, action_dim]`, or `[batch, chunk, action_dim]` with action chunks.
        """
        tokenizer = self.action_tokenizer
        tokenizer.stats_for(unnorm_key)
        if self.action_head is not None:
            outputs = self._predict_in_parallel(input_ids, attention_mask, pixel_values)
            return tokenizer.normalized_to_actions(outputs.normalized_actions, unnorm_key)
        bins = self.predict_action_logits(input_ids, attention_mask, pixel_values).argmax(-1)
        return tokenizer.bins_to_actions(bins, unnorm_key)


class ActionQueuePolicy:
    """Closed-loop control from action chunks: one action per environment step, from a queue of planned actions.

    The planner ("re-planning") is called only when an environment's queue is empty. One plan is a chunk of
    `chunk_size` actions; the first `n_action_steps` of them are queued and executed open-loop, one per call, before the
    next plan, as LeRobot policies do with `select_action`. Several environments stepped together (`select_actions`)
    share one batched planner call per re-plan and keep one queue each.

    With `temporal_ensemble_coeff` (ACT's temporal ensembling, Zhao et al. 2023) the planner is called at every step
    instead, and the action executed is the weighted mean of what the last `chunk_size` chunks predicted for this
    step: weight `exp(-temporal_ensemble_coeff * i)` for the `i`-th oldest prediction, so 0 is a plain mean, a positive
    value favours the older predictions and a negative one the newer.

    A new instruction re-plans at once: when an environment's instruction differs from the one its queued actions
    (or ensembled chunks) were planned for, that queue is dropped and a plan made for the new instruction, so no step
    executes the old plan. The other environments keep their queues.

    This is the batched policy interface the evaluation loops step (`reset`, `drop`, `select_actions`). Subclasses
    implement `_plan`: `OpenVLAPolicy` calls a local model, `openvla_tools.remote_policy.RemotePolicy` a served one.

    Args:
        chunk_size: actions one plan holds (the model's `action_chunk_size`).
        action_dim: values per action.
        n_action_steps: actions executed per plan, in `1..chunk_size`; defaults to `chunk_size`, or to 1 with
            `temporal_ensemble_coeff`.
        temporal_ensemble_coeff: if set, a finite float: average overlapping chunks as described above.
    """

    def __init__(
        self,
        chunk_size: int,
        action_dim: int,
        n_action_steps: int | None = None,
        temporal_ensemble_coeff: float | None = None,
    ):
        if temporal_ensemble_coeff is not None:
            if isinstance(temporal_ensemble_coeff, bool) or not isinstance(temporal_ensemble_coeff, (int, float)) or (
                not math.isfinite(temporal_ensemble_coeff)
            ):
                raise ValueError(f"temporal_ensemble_coeff={temporal_ensemble_coeff!r} must be a finite number (or None).")
            if n_action_steps not in (None, 1):
                raise ValueError(
                    f"n_action_steps={n_action_steps!r} cannot be combined with temporal_ensemble_coeff: temporal "
                    "ensembling queries the model at every step; leave n_action_steps out."
                )
            n_action_steps = 1
        if n_action_steps is None:
            n_action_steps = chunk_size
        if isinstance(n_action_steps, bool) or not isinstance(n_action_steps, int) or not 1 <= n_action_steps <= chunk_size:
            raise ValueError(
                f"n_action_steps={n_action_steps!r} must be an integer from 1 to {chunk_size}: the model predicts "
                f"action_chunk_size={chunk_size} action(s) per call."
            )
        self.chunk_size = chunk_size
        self.action_dim = action_dim
        self.n_action_steps = n_action_steps
        self.temporal_ensemble_coeff = temporal_ensemble_coeff
        # One deque per environment: the actions still to execute, or with temporal ensembling the last chunks; and
        # the instruction each environment's queue was planned for.
        self._queues: list[deque] = []
        self._instructions: list[str] = []

    def _env_ids(self, env_ids: int | Sequence[int]) -> list[int]:
        env_ids = [env_ids] if isinstance(env_ids, int) else list(env_ids)
        for env_id in env_ids:
            if not 0 <= env_id < len(self._queues):
                raise ValueError(f"env_id={env_id} is not one of the {len(self._queues)} environments of this policy.")
        return env_ids

    def reset(self, env_ids: int | Sequence[int] | None = None) -> None:
        """Empty the action queues, so that the next call re-plans: all of them (start of an episode), or only those
        of the environments `env_ids` (episodes that ended while others go on, and start again in the same slots)."""
        if env_ids is None:
            self._queues = []
            self._instructions = []
            return
        for env_id in self._env_ids(env_ids):
            self._queues[env_id].clear()

    def drop(self, env_ids: int | Sequence[int]) -> None:
        """Forget the environments `env_ids`, whose episodes ended and which leave the batch: the others keep their
        queues, in their order, and are the environments of the next `select_actions` call."""
        dropped = set(self._env_ids(env_ids))
        kept = [env_id for env_id in range(len(self._queues)) if env_id not in dropped]
        self._queues = [self._queues[env_id] for env_id in kept]
        self._instructions = [self._instructions[env_id] for env_id in kept]

    def select_action(self, image, instruction: str) -> np.ndarray:
        """One environment: an image (PIL, numpy `[H, W, C]` or torch `[C, H, W]`) and its instruction -> the next
        action, float32 `[action_dim]`."""
        if isinstance(image, (list, tuple)) or (isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4):
            raise ValueError(
                f"select_action takes one image, got {len(image)}; step several environments with select_actions "
                "(one image and one instruction each)."
            )
        return self.select_actions([image], [instruction])[0]

    def select_actions(
        self, images: Sequence, instructions: str | Sequence[str], observations: Sequence | None = None
    ) -> np.ndarray:
        """`B` environments stepped together: `B` images and `B` instructions (or one for all) -> the next action of
        each, float32 `[B, action_dim]`. Environments whose queue is empty, or whose instruction changed, are
        re-planned in one batched call. `observations` (other readings of the environments, such as a robot's state)
        is accepted so that evaluation loops can step any policy alike; plans read the images and instructions only."""
        images = as_image_list(images)
        instructions = [instructions] * len(images) if isinstance(instructions, str) else list(instructions)
        if len(instructions) != len(images):
            raise ValueError(
                f"Got {len(images)} images and {len(instructions)} instructions; pass one (image, instruction) per "
                "environment."
            )
        for env_id, instruction in enumerate(instructions):
            if not isinstance(instruction, str):
                raise ValueError(f"The instruction of environment {env_id} is {instruction!r}, not a string.")
        ensembling = self.temporal_ensemble_coeff is not None
        if not self._queues:
            self._queues = [deque(maxlen=self.chunk_size if ensembling else None) for _ in images]
            self._instructions = list(instructions)
        elif len(self._queues) != len(images):
            raise ValueError(
                f"Got {len(images)} environments but the policy holds action queues for {len(self._queues)}; call "
                "reset() when the number of environments changes, or drop() the environments that left."
            )
        for env_id, instruction in enumerate(instructions):
            if instruction != self._instructions[env_id]:
                self._queues[env_id].clear()
                self._instructions[env_id] = instruction
        stale = [env_id for env_id, queue in enumerate(self._queues) if ensembling or not queue]
        if stale:
            chunks = self._plan([images[i] for i in stale], [instructions[i] for i in stale])
            for env_id, chunk in zip(stale, chunks, strict=True):
                if ensembling:
                    self._queues[env_id].append(chunk)
                else:
                    self._queues[env_id].extend(chunk[: self.n_action_steps])
        if ensembling:
            return np.stack([self._ensemble(chunks) for chunks in self._queues])
        return np.stack([queue.popleft() for queue in self._queues])

    def _ensemble(self, chunks: deque) -> np.ndarray:
        """The last `n` chunks of one environment, oldest first, each `[chunk_size, action_dim]` -> the weighted mean
        of their predictions for the current step, float32 `[action_dim]` (chunk `i` was planned `n - 1 - i` steps
        ago, so its action `n - 1 - i` is the one for now)."""
        count = len(chunks)
        predictions = np.stack([chunk[count - 1 - i] for i, chunk in enumerate(chunks)])
        weights = np.exp(-self.temporal_ensemble_coeff * np.arange(count))
        return (weights @ predictions / weights.sum()).astype(np.float32)

    def _plan(self, images: list, instructions: list[str]) -> np.ndarray:
        """`B` images and instructions -> float32 `[B, chunk_size, action_dim]`."""
        raise NotImplementedError(f"{type(self).__name__} must implement _plan(images, instructions).")


class OpenVLAPolicy(ActionQueuePolicy):
    """Closed-loop control with an OpenVLA model: `ActionQueuePolicy` whose plans are `predict_action` calls.

    One `predict_action` call yields a chunk of `action_chunk_size` actions (parallel decoding with chunks) or a single
    action (otherwise), unnormalised with `unnorm_key`; `ActionQueuePolicy` says how chunks are queued or ensembled.

    Args:
        model: an `OpenVLAForActionPrediction` (put it in eval mode and on its device first).
        processor: the model's `OpenVLAProcessor`; its `norm_stats`, if any, must equal the model's.
        unnorm_key: dataset whose statistics unnormalise the actions (see `predict_action`); checked here.
        n_action_steps: actions executed per model query, in `1..action_chunk_size`; defaults to `action_chunk_size`,
            or to 1 with `temporal_ensemble_coeff`.
        temporal_ensemble_coeff: if set, a finite float: average overlapping chunks (see `ActionQueuePolicy`).

    Example:
        ```python
        policy = OpenVLAPolicy(model, processor, unnorm_key="my_robot")
        policy.reset()
        for _ in range(max_steps):
            action = policy.select_action(env.render(), "pick up the red block")  # [action_dim]
            env.step(action)
        ```
    """

    def __init__(
        self,
        model: OpenVLAForActionPrediction,
        processor,
        unnorm_key: str | None = None,
        n_action_steps: int | None = None,
        temporal_ensemble_coeff: float | None = None,
    ):
        super().__init__(model.config.action_chunk_size, model.config.action_dim, n_action_steps, temporal_ensemble_coeff)
        model.action_tokenizer.stats_for(unnorm_key)  # unknown or ambiguous keys fail now, not mid-episode
        check_same_norm_stats(model.config.norm_stats, getattr(processor, "norm_stats", None) or {})
        self.model = model
        self.processor = processor
        self.unnorm_key = unnorm_key

    def _plan(self, images: list, instructions: list[str]) -> np.ndarray:
        """One `predict_action` call -> float32 `[B, chunk_size, action_dim]` (`chunk_size` 1 without chunks)."""
        inputs = self.processor(images=images, text=instructions).to(self.model.device)
        actions = self.model.predict_action(**inputs, unnorm_key=self.unnorm_key)
        actions = actions.detach().float().cpu().numpy()
        return actions.reshape(len(images), -1, self.action_dim)


OpenVLAConfig.register_for_auto_class()
OpenVLAForActionPrediction.register_for_auto_class("AutoModel")

__all__ = ["ActionQueuePolicy", "OpenVLAForActionPrediction", "OpenVLAPolicy", "OpenVLAPreTrainedModel", "regression_loss", "vla_loss"]
