"""OpenVLA configuration.

`OpenVLAConfig` accepts the options of the reference OpenVLA API (`image_size`, `patch_size`, `in_channels`,
`vision_dim`, `hidden_dim`, `num_layers`, `num_heads`, `num_kv_heads`, `action_dim`, `num_action_bins`,
`max_text_len`, `dropout`, `rope`) and turns them into transformers sub-configs: a `Dinov2Config` for the vision
backbone (optionally fused with a `SiglipVisionConfig`) and a `LlamaConfig` for the language model. Sub-configs
passed explicitly win, and the reference options are then read back from them, so any DINOv2 / SigLIP / Llama size
can be described.

Official OpenVLA checkpoints (`openvla/openvla-7b` and other Prismatic-format folders) are recognised by their
`config.json` fields (`vision_backbone_id`, `timm_model_ids`, `arch_specifier`, `n_action_bins`, ...) and mapped onto
the same sub-configs (see `OpenVLAConfig.official_options` and `OpenVLAConfig.openvla_7b`).
"""

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

try:
    from .processing_openvla import check_norm_stats
except ImportError:
    from processing_openvla import check_norm_stats

ACTION_BINNING_SCHEMES = ("reference", "openvla")
ACTION_DECODING_MODES = ("autoregressive", "parallel")
ACTION_HEADS = ("tokens", "l1_regression")
PREFIX_ATTENTION_MODES = ("causal", "bidirectional")
VISION_LAYOUTS = ("transformers", "timm")
VISION_STEMS = ("patch", "coordconv")
WEIGHT_INITS = ("standard", "fan_in")
# Options that take one of a fixed set of values, checked by `OpenVLAConfig._validate`.
OPTION_CHOICES = (
    ("action_binning", ACTION_BINNING_SCHEMES),
    ("vision_layout", VISION_LAYOUTS),
    ("vision_stem", VISION_STEMS),
    ("weight_init", WEIGHT_INITS),
    ("action_decoding", ACTION_DECODING_MODES),
    ("action_head", ACTION_HEADS),
    ("prefix_attention", PREFIX_ATTENTION_MODES),
)
# Extra input channels of the first stem convolution of `vision_stem="coordconv"`: the pixel's x and y.
COORDINATE_CHANNELS = 2
AUTO_MAP = {
    "AutoConfig": "configuration_openvla.OpenVLAConfig",
    "AutoModel": "modeling_openvla.OpenVLAForActionPrediction",
    "AutoModelForImageTextToText": "modeling_openvla.OpenVLAForActionPrediction",
}

# --- Official (Prismatic) OpenVLA checkpoints -------------------------------------------------------------------------
# `config.json` fields of an official checkpoint that have no counterpart among ours (translated, then dropped).
OFFICIAL_CONFIG_KEYS = (
    "vision_backbone_id",
    "llm_backbone_id",
    "arch_specifier",
    "use_fused_vision_backbone",
    "image_resize_strategy",
    "image_sizes",
    "timm_model_ids",
    "timm_override_act_layers",
    "hf_llm_id",
    "llm_max_length",
    "n_action_bins",
    "pad_to_multiple_of",
    "pad_token_id",
    "output_projector_states",
)
# Any of these marks a config as official (the other keys above, e.g. `pad_token_id`, may appear elsewhere too).
OFFICIAL_CONFIG_MARKERS = ("vision_backbone_id", "timm_model_ids", "arch_specifier", "n_action_bins")
# timm vision towers of official checkpoints (architecture name without the pretrained tag) -> transformers sub-config.
# Everything not listed is the timm default: qkv bias, exact GELU, LayerNorm eps 1e-6, no dropout.
_SIGLIP_SO400M_14 = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "mlp_ratio": 3.7362,
    "patch_size": 14,
}
TIMM_VISION_TOWERS = {
    "vit_large_patch14_reg4_dinov2": {
        "model_type": "dinov2_with_registers",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "mlp_ratio": 4,
        "num_register_tokens": 4,
        "patch_size": 14,
    },
    # The same tower at two input sizes (the size itself comes from the checkpoint's `image_sizes`).
    "vit_so400m_patch14_siglip_224": _SIGLIP_SO400M_14,
    "vit_so400m_patch14_siglip_384": _SIGLIP_SO400M_14,
}
# Llama-2's SentencePiece "empty" token: official OpenVLA appends it to every prompt that does not end with it.
LLAMA_EMPTY_TOKEN = "\u2581"
# `config.json` of the published `openvla/openvla-7b` (its fields that describe the architecture; the norm_stats of its
# 25 datasets are in the checkpoint itself).
OPENVLA_7B_OFFICIAL_CONFIG = {
    "arch_specifier": "no-align+fused-gelu-mlp",
    "hf_llm_id": "meta-llama/Llama-2-7b-hf",
    "image_resize_strategy": "resize-naive",
    "image_sizes": [224, 224],
    "llm_backbone_id": "llama2-7b-pure",
    "llm_max_length": 2048,
    "n_action_bins": 256,
    "output_projector_states": False,
    "pad_to_multiple_of": 64,
    "pad_token_id": 32000,
    "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064},
    "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "timm_override_act_layers": [None, None],
    "torch_dtype": "bfloat16",
    "use_fused_vision_backbone": True,
    "vision_backbone_id": "dinosiglip-vit-so-224px",
}


class OpenVLAConfig(PreTrainedConfig):
    r"""
    Configuration of [`OpenVLAForActionPrediction`].

    Reference options (names and defaults of the reference API):
        image_size (`int`, defaults to 224): square input image size in pixels.
        patch_size (`int`, defaults to 14): ViT patch size.
        in_channels (`int`, defaults to 3): image channels seen by the (first) vision backbone.
        vision_dim (`int`, defaults to 384): width of the vision features fed to the projector (for a fused
            backbone, the sum of both widths).
        hidden_dim (`int`, defaults to 2048): width of the language model.
        num_layers (`int`, defaults to 24): decoder layers of the language model.
        num_heads (`int`, defaults to 16): attention heads of the language model.
        num_kv_heads (`int`, defaults to 4): key/value heads of the language model (grouped-query attention).
        action_dim (`int`, defaults to 7): dimensions of one robot action.
        num_action_bins (`int`, defaults to 256): bins per action dimension; the action tokens are the
            `num_action_bins` ids just below `action_token_end`.
        max_text_len (`int`, defaults to 64): longest prompt, in tokens, that the processor accepts.
        dropout (`float`, defaults to 0.1): dropout of the vision blocks and of the decoder's attention (training only).
        rope (`bool`, defaults to `False`): rotary position embedding in the decoder. With `False` the decoder has no
            position encoding at all (its rotary embedding is replaced by the identity rotation); the causal mask is
            then the only source of order.

    Further options:
        vision_num_layers (`int`, defaults to 12): blocks of the DINOv2 tower built from the reference options (the
            reference API fixes 12). With the default `vision_feature_layer=-2` the last block's output is not used.
        action_min, action_max (`float`, defaults to -1.0 and 1.0): range covered by the bins (normalised units).
        vocab_size (`int`, defaults to 32000): vocabulary of the language model (use `len(tokenizer)`).
        vision_config, fused_vision_config, text_config (`dict` or config, *optional*): explicit sub-configs; they win
            over the reference options above.
        vision_feature_layer (`int`, defaults to -2): hidden state of the vision backbone used as patch features
            (-2: output of the second-to-last block, as official OpenVLA).
        image_token_id (`int`, *optional*): placeholder id the processor writes where the image patches go. Defaults to
            `vocab_size`, an id outside the vocabulary that is never embedded nor predicted.
        action_token_end (`int`, *optional*): one past the highest action token id. Defaults to `vocab_size` (the last
            `num_action_bins` ids of the vocabulary); official checkpoints use the size of the un-padded vocabulary.
        action_binning (`str`, defaults to `"reference"`): `"reference"` bins with
            `floor((a - min) / (max - min) * (bins - 1))` and decodes `min + bin / (bins - 1) * (max - min)`;
            `"openvla"` bins with `np.digitize` over `linspace(min, max, bins)` and decodes to bin centres, as the
            published OpenVLA checkpoints do.
        action_decoding (`str`, defaults to `"autoregressive"`): `"autoregressive"` predicts one action token per
            step with a KV cache; `"parallel"` predicts every action token of a chunk in one forward pass.
        action_chunk_size (`int`, defaults to 1): actions predicted per call in parallel decoding.
        action_head (`str`, defaults to `"tokens"`): `"tokens"` predicts each action dimension as one of
            `num_action_bins` action tokens with the LM head (OpenVLA). `"l1_regression"` (OpenVLA-OFT, Kim et al.
            2025) maps the final hidden state of each action query through a two-layer MLP (`action_head` module) to
            one action value in normalised units, trained with an L1 loss; it needs `action_decoding="parallel"`. Its
            targets are the values of the label tokens' bins (so the processor, collator and datasets are the same for
            both heads; the bins quantise a target by at most `(action_max - action_min) / (num_action_bins - 1)`).
        action_loss_weights (`list[float]`, *optional*): one weight per action dimension for the training loss, e.g.
            `[1, 1, 1, 4]` to stress a gripper's token; scaled to mean 1 (so the loss keeps its scale) and repeated for
            each action of a chunk. `None` (default) weighs every dimension alike, as OpenVLA does. Training only.
        prefix_attention (`str`, defaults to `"causal"`): how the prefix (BOS, image patches and prompt, everything
            before the action queries) attends to itself in parallel decoding. `"causal"` is OpenVLA's decoder mask;
            `"bidirectional"` lets every prefix token see the whole prefix, as in PaliGemma's and pi0's prefix-LM, so
            the image patches also see the instruction, which comes after them. It needs
            `action_decoding="parallel"`.
        vision_layout (`str`, defaults to `"transformers"`): `"transformers"` uses transformers' vision models as
            they are; `"timm"` keeps the parameter set of the timm towers of official OpenVLA checkpoints (DINOv2
            position embeddings for the patches only, no DINOv2 mask token, SigLIP attention-pooling head kept but not
            run), whose official key names load (and save back) through registered weight conversions.
        vision_stem (`str`, defaults to `"patch"`): how the DINOv2 tower turns pixels into patch tokens. `"patch"` is
            DINOv2's own linear patch embedding (one `patch_size`-strided convolution, as in every published
            checkpoint); `"coordconv"` replaces it with a convolutional stem (Xiao et al. 2021, "Early Convolutions
            Help Transformers See Better") whose first convolution also sees the pixel's x and y as two more input
            channels (CoordConv, Liu et al. 2018): `log2(patch_size)` 3x3 stride-2 convolutions with ReLU, widths
            doubling up to `vision_dim`, then a 1x1 convolution, giving the same patch grid. Meant for towers trained
            from scratch: the tabletop main job scored 38% instead of 99% without it
            (docs/experiments/tabletop_main_job.md). Needs a power-of-two `patch_size`, a `vision_dim` divisible by
            `patch_size // 2` and a single DINOv2 tower in the transformers layout.
        weight_init (`str`, defaults to `"standard"`): how a model built from scratch starts its linear and convolution
            weights. `"standard"` keeps each part's transformers initialiser (normal, std `initializer_range` = 0.02,
            as DINOv2 and Llama). `"fan_in"` draws every linear and convolution weight but the LM head's from a normal
            with std `1 / sqrt(fan_in)` (LeCun), and scales the ordinal start of the action tokens' embeddings to the
            same std, so each layer starts with unit gain whatever its width: at std 0.02 a 128-wide layer starts
            with a gain of 0.23, the network starts almost linear, and a narrow model trained from scratch stays long
            on the plateau where it ignores the image (README, main job). Loaded weights replace either; weights a
            checkpoint lacks start as in a model built from this config.
        prompt_suffix_token (`str`, *optional*): token the processor appends to a prompt that does not already end
            with it (official checkpoints: Llama-2's empty token `"\u2581"`); the processor looks its id up in the
            tokenizer.
        norm_stats (`dict`, *optional*): per-dataset action statistics in the official OpenVLA layout,
            `{dataset: {"action": {"q01": [...], "q99": [...], "mean": [...], "std": [...], "min": [...],
            "max": [...], "mask": [...]}}}`; checked (finite, `q01 <= q99`, lengths) whenever the config is
            built or loaded.
    """

    model_type = "openvla"
    keys_to_ignore_at_inference = ["cache", "logits", "hidden_states", "attentions"]
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2", optional=True),
        "fused_vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model", optional=True),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True),
    }

    image_size: int = 224
    patch_size: int = 14
    in_channels: int = 3
    vision_dim: int = 384
    hidden_dim: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 4
    action_dim: int = 7
    num_action_bins: int = 256
    max_text_len: int = 64
    dropout: float = 0.1
    rope: bool = False
    vision_num_layers: int = 12
    action_min: float = -1.0
    action_max: float = 1.0
    vocab_size: int = 32000
    vision_config: dict | PreTrainedConfig | None = None
    fused_vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -2
    image_token_id: int | None = None
    action_token_end: int | None = None
    action_binning: str = "reference"
    action_decoding: str = "autoregressive"
    action_chunk_size: int = 1
    action_head: str = "tokens"
    action_loss_weights: list[float] | None = None
    prefix_attention: str = "causal"
    vision_layout: str = "transformers"
    vision_stem: str = "patch"
    weight_init: str = "standard"
    prompt_suffix_token: str | None = None
    norm_stats: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if any(key in kwargs for key in OFFICIAL_CONFIG_MARKERS):
            official = {key: kwargs.pop(key) for key in OFFICIAL_CONFIG_KEYS if key in kwargs}
            kwargs.pop("auto_map", None)  # the official one points to the Prismatic remote code
            for name, value in self.official_options(official, self.text_config, self.norm_stats).items():
                setattr(self, name, value)
        self._validate_reference_options(vision=self.vision_config is None, text=self.text_config is None)
        if self.vision_config is None:
            self.vision_config = self._default_vision_config()
        if self.text_config is None:
            self.text_config = self._default_text_config()
        super().__post_init__(**kwargs)
        self._read_back_sub_configs()
        if self.image_token_id is None:
            self.image_token_id = self.vocab_size
        if self.action_token_end is None:
            self.action_token_end = self.vocab_size
        if self.norm_stats is None:
            self.norm_stats = {}
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        self._validate()

    def _default_vision_config(self) -> dict[str, Any]:
        """DINOv2 ViT of the reference API: `vision_num_layers` (12) blocks, `max(vision_dim // 64, 4)` heads."""
        return {
            "model_type": "dinov2",
            "hidden_size": self.vision_dim,
            "num_hidden_layers": self.vision_num_layers,
            "num_attention_heads": max(self.vision_dim // 64, 4),
            "mlp_ratio": 4,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.in_channels,
            "hidden_dropout_prob": self.dropout,
            "attention_probs_dropout_prob": self.dropout,
            "use_mask_token": False,
        }

    def _default_text_config(self) -> dict[str, Any]:
        """Llama decoder with grouped-query attention and a SwiGLU MLP of width `4 * hidden_dim`."""
        return {
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_dim,
            "intermediate_size": 4 * self.hidden_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_sequence_length,
            "attention_dropout": self.dropout,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    def _read_back_sub_configs(self) -> None:
        """Make the reference options describe the sub-configs actually used."""
        vision, text = self.vision_config, self.text_config
        self.image_size = _as_square(vision.image_size, "vision_config.image_size")
        self.patch_size = _as_square(vision.patch_size, "vision_config.patch_size")
        self.in_channels = vision.num_channels
        self.vision_dim = vision.hidden_size
        self.vision_num_layers = vision.num_hidden_layers
        if self.fused_vision_config is not None:
            self.vision_dim += self.fused_vision_config.hidden_size
        self.hidden_dim = text.hidden_size
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads or text.num_attention_heads
        self.vocab_size = text.vocab_size
        self.tie_word_embeddings = text.tie_word_embeddings

    def _validate_reference_options(self, vision: bool, text: bool) -> None:
        """Check the reference options that build the vision (`vision`) and text (`text`) sub-configs."""
        names = ["action_dim", "max_text_len", "action_chunk_size"]
        names += ["image_size", "patch_size", "in_channels", "vision_dim", "vision_num_layers"] if vision else []
        names += ["hidden_dim", "num_layers", "num_heads", "num_kv_heads", "vocab_size"] if text else []
        checks = [(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"{name}={getattr(self, name)!r} must be a positive integer") for name in names]
        checks.append((0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)"))
        if vision:
            vision_heads = max(self.vision_dim // 64, 4)
            checks += [
                (self.image_size % self.patch_size == 0, f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"),
                (self.vision_dim % vision_heads == 0, f"vision_dim={self.vision_dim} is not divisible by its {vision_heads} vision heads (max(vision_dim // 64, 4))"),
            ]
        if text:
            checks += [
                (self.hidden_dim % self.num_heads == 0, f"hidden_dim={self.hidden_dim} is not divisible by num_heads={self.num_heads}"),
                (self.num_heads % self.num_kv_heads == 0, f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"),
            ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Inconsistent OpenVLAConfig: {message}.")

    def _validate(self) -> None:
        if self.num_action_bins < 2:
            raise ValueError(f"Inconsistent OpenVLAConfig: num_action_bins={self.num_action_bins} must be at least 2.")
        if not self.num_action_bins <= self.action_token_end <= self.vocab_size:
            raise ValueError(
                f"Inconsistent OpenVLAConfig: num_action_bins={self.num_action_bins} action tokens ending at action_token_end="
                f"{self.action_token_end}, which needs num_action_bins <= action_token_end <= vocab_size="
                f"{self.vocab_size}. Use a larger vocabulary or fewer bins."
            )
        if not self.action_min < self.action_max:
            raise ValueError(
                f"Inconsistent OpenVLAConfig: action_min={self.action_min} must be smaller than action_max={self.action_max}."
            )
        for name, choices in OPTION_CHOICES:
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {choices}.")
        check_norm_stats(self.norm_stats)
        self._validate_vision_stem()
        if self.action_decoding == "autoregressive" and self.action_chunk_size != 1:
            raise ValueError(
                f"action_chunk_size={self.action_chunk_size} needs action_decoding='parallel'; autoregressive decoding "
                "predicts one action per call."
            )
        if self.action_head == "l1_regression" and self.action_decoding != "parallel":
            raise ValueError(
                "action_head='l1_regression' needs action_decoding='parallel': the regression head reads the hidden "
                "states of the action queries."
            )
        if self.prefix_attention == "bidirectional" and self.action_decoding != "parallel":
            raise ValueError(
                "prefix_attention='bidirectional' needs action_decoding='parallel': autoregressive decoding extends the "
                "prompt token by token with a causal KV cache."
            )
        self.validate_action_loss_weights()
        if self.fused_vision_config is not None:
            fused = self.fused_vision_config
            if _as_square(fused.patch_size, "fused_vision_config.patch_size") != self.patch_size or (
                _as_square(fused.image_size, "fused_vision_config.image_size") != self.image_size
            ):
                raise ValueError(
                    f"Inconsistent OpenVLAConfig: the fused backbone sees {fused.image_size}px images in "
                    f"{fused.patch_size}px patches, the first one {self.image_size}px in {self.patch_size}px patches; "
                    "both must give the same patch grid."
                )

    def validate_action_loss_weights(self) -> None:
        """Check `action_loss_weights` (also after setting it on a loaded config)."""
        weights = self.action_loss_weights
        if weights is None:
            return
        if len(weights) != self.action_dim or not all(isinstance(w, (int, float)) and 0 <= w < float("inf") for w in weights) or not any(weights):
            raise ValueError(
                f"action_loss_weights={weights!r} must be {self.action_dim} (action_dim) finite weights >= 0, not all "
                "zero; or None to weigh every action dimension alike."
            )

    def _validate_vision_stem(self) -> None:
        if self.vision_stem == "patch":
            return
        problems = []
        if self.vision_config.model_type != "dinov2" or self.fused_vision_config is not None or self.vision_layout != "transformers":
            problems.append("a single DINOv2 tower (vision_layout='transformers', no fused backbone)")
        if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
            problems.append(f"a power-of-two patch_size (got {self.patch_size}; e.g. patch_size=16)")
        elif self.vision_config.hidden_size % (self.patch_size // 2):
            problems.append(f"a vision width divisible by patch_size // 2 = {self.patch_size // 2} (got {self.vision_config.hidden_size})")
        if problems:
            raise ValueError(f"vision_stem={self.vision_stem!r} needs {' and '.join(problems)}; or use vision_stem='patch'.")

    @property
    def num_patches(self) -> int:
        """Image tokens in the LLM sequence: `(image_size // patch_size) ** 2`."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def max_sequence_length(self) -> int:
        """Longest LLM sequence: BOS, patches, prompt and the action tokens of one chunk."""
        return 1 + self.num_patches + self.max_text_len + self.action_chunk_size * self.action_dim

    @property
    def pixel_channels(self) -> int:
        """Channels of `pixel_values`: 3 per backbone (6 for a fused DINOv2 + SigLIP backbone)."""
        fused_channels = self.fused_vision_config.num_channels if self.fused_vision_config is not None else 0
        return self.in_channels + fused_channels

    def output_size(self) -> int:
        """Size of the model's output per sample: `action_dim * num_action_bins` logits."""
        return self.action_dim * self.num_action_bins

    def param_count(self) -> int:
        """Exact number of parameters of the model this config builds, computed from the config alone."""
        timm_layout = self.vision_layout == "timm"
        vision = _vision_param_count(self.vision_config, timm_layout, stem=self.vision_stem)
        if self.fused_vision_config is not None:
            vision += _vision_param_count(self.fused_vision_config, timm_layout)
        projector = _projector_param_count(self.vision_dim, self.hidden_dim, fused=self.fused_vision_config is not None)
        queries = self.action_chunk_size * self.action_dim * self.hidden_dim if self.action_decoding == "parallel" else 0
        head = _linear(self.hidden_dim, self.hidden_dim) + _linear(self.hidden_dim, 1) if self.action_head == "l1_regression" else 0
        return vision + projector + _llama_param_count(self.text_config) + queries + head

    @classmethod
    def recommended_defaults(cls, **overrides) -> "OpenVLAConfig":
        """The reference API's recommended configuration (its defaults), with optional overrides."""
        return cls(**overrides)

    @classmethod
    def openvla_7b(cls, **overrides) -> "OpenVLAConfig":
        """The published `openvla/openvla-7b`: fused DINOv2 ViT-L/14 (4 registers) + SigLIP so400m/14 at 224 px, fused
        GELU MLP projector, Llama-2 7B with a 32064-token vocabulary, 256 official bins (7,541,237,184 parameters).
        `norm_stats` stays empty: the checkpoint carries the statistics of its 25 datasets."""
        return cls(**{**OPENVLA_7B_OFFICIAL_CONFIG, **overrides})

    @staticmethod
    def official_options(official: dict[str, Any], text_config: dict | PreTrainedConfig | None, norm_stats: dict | None) -> dict[str, Any]:
        """Our options for an official OpenVLA (Prismatic) `config.json`.

        Args:
            official: its fields listed in `OFFICIAL_CONFIG_KEYS` (`timm_model_ids`, `arch_specifier`, ...).
            text_config: its `text_config` (Llama; every field it leaves out keeps the `LlamaConfig` default, as in
                the official code, e.g. `rms_norm_eps=1e-6`).
            norm_stats: its statistics (kept as they are; they give `action_dim`).

        Returns:
            `vision_config` / `fused_vision_config` (Dinov2WithRegisters / SigLIP vision sub-configs of the timm towers),
            `vision_layout="timm"`, `rope=True`, `num_action_bins`, `action_binning="openvla"`, `action_token_end`
            (`text vocab_size - pad_to_multiple_of`: the action tokens sit below the padding rows), `action_dim`,
            `max_text_len`, `prompt_suffix_token` (Llama-2's empty token) and our `auto_map`.
        """
        timm_ids = list(official.get("timm_model_ids") or [])
        fused = bool(official.get("use_fused_vision_backbone", len(timm_ids) > 1))
        if not timm_ids or len(timm_ids) != (2 if fused else 1):
            raise ValueError(
                f"Official OpenVLA config with use_fused_vision_backbone={fused} needs {2 if fused else 1} timm_model_ids, "
                f"got {timm_ids}."
            )
        count = len(timm_ids)
        image_sizes = official.get("image_sizes") or [224] * count
        activations = official.get("timm_override_act_layers") or [None] * count
        towers = [_timm_tower_config(*tower) for tower in zip(timm_ids, image_sizes, activations, strict=True)]
        arch = official.get("arch_specifier", "no-align+gelu-mlp")
        if not arch.endswith("gelu-mlp") or arch.endswith("fused-gelu-mlp") != fused:
            raise ValueError(
                f"arch_specifier={arch!r} with use_fused_vision_backbone={fused} is not supported: the projector is "
                "'fused-gelu-mlp' for a fused vision backbone and 'gelu-mlp' for a single one."
            )
        text = text_config.to_dict() if isinstance(text_config, PreTrainedConfig) else dict(text_config or {})
        if text.get("model_type", "llama") != "llama":
            raise ValueError(f"Official OpenVLA checkpoints use a Llama language model, got text_config {text}.")
        text.setdefault("model_type", "llama")
        if "pad_token_id" in official:
            text.setdefault("pad_token_id", official["pad_token_id"])
        vocab_size = text.get("vocab_size", 32000)
        stats = norm_stats or {}
        first = next(iter(stats.values()), None)
        action_dim = len(first["action"]["q01"]) if first else 7
        num_patches = (towers[0]["image_size"] // towers[0]["patch_size"]) ** 2
        return {
            "vision_config": towers[0],
            "fused_vision_config": towers[1] if fused else None,
            "text_config": text,
            "vision_layout": "timm",
            "rope": True,
            "dropout": 0.0,
            "num_action_bins": official.get("n_action_bins", 256),
            "action_binning": "openvla",
            "action_token_end": vocab_size - official.get("pad_to_multiple_of", 0),
            "action_dim": action_dim,
            "max_text_len": official.get("llm_max_length", 2048) - 1 - num_patches - action_dim,
            "prompt_suffix_token": LLAMA_EMPTY_TOKEN,
            "auto_map": dict(AUTO_MAP),
        }

    @classmethod
    def small_config(cls, **overrides) -> "OpenVLAConfig":
        """The reference API's small configuration for tests and prototyping, with optional overrides."""
        options = {
            "image_size": 112,
            "patch_size": 14,
            "vision_dim": 192,
            "hidden_dim": 256,
            "num_layers": 4,
            "num_heads": 4,
            "num_kv_heads": 2,
            "action_dim": 7,
            "num_action_bins": 256,
        }
        options.update(overrides)
        return cls(**options)


def _as_square(size: int | list[int] | tuple[int, int], name: str) -> int:
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"{name}={size} must be square.")
    return int(size[0])


def _linear(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def _vit_block_param_count(width: int, mlp_width: int, qkv_bias: bool, layer_scale: bool) -> int:
    attention = 3 * _linear(width, width, qkv_bias) + _linear(width, width)
    mlp = _linear(width, mlp_width) + _linear(mlp_width, width)
    norms = 2 * 2 * width
    return attention + mlp + norms + (2 * width if layer_scale else 0)


def _timm_tower_config(timm_id: str, image_size: int, activation: str | None) -> dict[str, Any]:
    """transformers vision sub-config of an official timm tower (`timm.create_model(timm_id, img_size=image_size,
    act_layer=activation)`)."""
    name = timm_id.split(".")[0]
    if name not in TIMM_VISION_TOWERS:
        raise NotImplementedError(
            f"timm vision tower {timm_id!r} is not supported; supported: {sorted(TIMM_VISION_TOWERS)} (the towers of "
            "the published OpenVLA checkpoints)."
        )
    if activation not in (None, "gelu"):
        raise NotImplementedError(f"timm_override_act_layers={activation!r} is not supported (only the exact GELU).")
    tower = dict(TIMM_VISION_TOWERS[name])
    mlp_ratio = tower.pop("mlp_ratio")
    config = {
        "image_size": int(image_size),
        "num_channels": 3,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        **tower,
    }
    if config["model_type"] == "siglip_vision_model":
        config.update({"intermediate_size": int(config["hidden_size"] * mlp_ratio), "vision_use_head": True, "attention_dropout": 0.0})
    else:
        config.update({"mlp_ratio": int(mlp_ratio), "qkv_bias": True, "use_swiglu_ffn": False, "drop_path_rate": 0.0,
                       "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    return config


def conv_stem_widths(patch_size: int, width: int) -> list[int]:
    """Output widths of the 3x3 stride-2 convolutions of `vision_stem="coordconv"`: `log2(patch_size)` of them, doubling up
    to `width` (e.g. patch 16, width 192: `[24, 48, 96, 192]`)."""
    num_convs = patch_size.bit_length() - 1
    return [width // 2 ** (num_convs - 1 - index) for index in range(num_convs)]


def conv_stem_in_channels(num_channels: int) -> int:
    """Input channels of the first convolution of the `"coordconv"` stem: the image's, plus the pixel coordinates."""
    return num_channels + COORDINATE_CHANNELS


def _conv_stem_param_count(in_channels: int, patch_size: int, width: int) -> int:
    widths = conv_stem_widths(patch_size, width)
    convs = sum(_linear(9 * fan_in, fan_out) for fan_in, fan_out in zip([in_channels, *widths[:-1]], widths))
    return convs + _linear(width, width)


def _vision_param_count(config: PreTrainedConfig, timm_layout: bool = False, stem: str = "patch") -> int:
    """Parameters of a transformers Dinov2, Dinov2WithRegisters or SigLIP vision model built from `config` (with
    `timm_layout`, the DINOv2 model of `vision_layout="timm"`: no mask token, no class-token position embedding; with
    `stem="coordconv"`, that convolutional stem in place of the patch embedding)."""
    width = config.hidden_size
    patch = _as_square(config.patch_size, "patch_size")
    grid = (_as_square(config.image_size, "image_size") // patch) ** 2
    if stem != "patch":
        patch_embedding = _conv_stem_param_count(conv_stem_in_channels(config.num_channels), patch, width)
    else:
        patch_embedding = _linear(config.num_channels * patch * patch, width)
    if config.model_type in ("dinov2", "dinov2_with_registers"):
        if getattr(config, "use_swiglu_ffn", False):
            raise NotImplementedError("param_count does not cover DINOv2's SwiGLU MLP (use_swiglu_ffn=True).")
        block = _vit_block_param_count(width, int(width * config.mlp_ratio), config.qkv_bias, layer_scale=True)
        tokens = width * (1 + getattr(config, "num_register_tokens", 0))
        mask_token = width if getattr(config, "use_mask_token", True) and not timm_layout else 0
        positions = (grid + (0 if timm_layout else 1)) * width
        return patch_embedding + tokens + mask_token + positions + config.num_hidden_layers * block + 2 * width
    if config.model_type == "siglip_vision_model":
        block = _vit_block_param_count(width, config.intermediate_size, qkv_bias=True, layer_scale=False)
        total = patch_embedding + grid * width + config.num_hidden_layers * block + 2 * width
        if config.vision_use_head:
            head_mlp = _linear(width, config.intermediate_size) + _linear(config.intermediate_size, width)
            total += width + 3 * width * width + 3 * width + _linear(width, width) + 2 * width + head_mlp
        return total
    raise NotImplementedError(f"param_count does not know vision model_type={config.model_type!r}.")


def _projector_param_count(vision_dim: int, hidden_dim: int, fused: bool) -> int:
    if fused:
        return _linear(vision_dim, 4 * vision_dim) + _linear(4 * vision_dim, hidden_dim) + _linear(hidden_dim, hidden_dim)
    return _linear(vision_dim, hidden_dim) + _linear(hidden_dim, hidden_dim)


def _llama_param_count(config: PreTrainedConfig) -> int:
    """Parameters of a transformers `LlamaForCausalLM` built from `config`."""
    width, vocab = config.hidden_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or width // config.num_attention_heads
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    attention = (
        _linear(width, config.num_attention_heads * head_dim, config.attention_bias)
        + 2 * _linear(width, kv_heads * head_dim, config.attention_bias)
        + _linear(config.num_attention_heads * head_dim, width, config.attention_bias)
    )
    mlp = 2 * _linear(width, config.intermediate_size, config.mlp_bias) + _linear(config.intermediate_size, width, config.mlp_bias)
    layer = attention + mlp + 2 * width
    head = 0 if config.tie_word_embeddings else vocab * width
    return vocab * width + config.num_hidden_layers * layer + width + head


__all__ = ["OpenVLAConfig"]
