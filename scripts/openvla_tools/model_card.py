"""Model cards and Hub uploads for saved OpenVLA folders (used by finetune.py and convert_openvla_checkpoint.py)."""

from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

CARD_BODY = """
# {title}

OpenVLA vision-language-action model for the Hugging Face ecosystem: an image and an instruction go in, a
continuous robot action comes out. Each action dimension is discretised into {num_action_bins} bins, predicted as
tokens by a Llama decoder that reads {num_patches} image patches of a {vision} vision backbone.

## Usage

```python
from transformers import AutoModel, AutoProcessor
from PIL import Image

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(images=Image.open("frame.png"), text="{instruction}")
action = model.predict_action(**inputs{unnorm_argument})  # -> [1, {action_dim}] floats
```

## Action space

- Dimensions: {action_dim}; decoding: {action_decoding} (chunk of {action_chunk_size}); binning: {action_binning}.
- Statistics (`unnorm_key`): {norm_keys}.

## Model

- Parameters: {num_parameters:,}; vision width {vision_dim}, LLM width {hidden_dim}, {num_layers} decoder layers,
  {num_heads} heads ({num_kv_heads} KV heads), RoPE: {rope}, image size {image_size}px, patch {patch_size}px.

## Training

{training}

## Results

{results}
"""


# What a reader of a model card wants to know about its quality; runtime counters (samples per second, FLOPs, epochs)
# stay in eval_results.json.
RESULT_METRICS = ("loss", "accuracy", "l1", "reliance", "success")


def reported_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The quality metrics among `metrics`: losses, token accuracy, L1 errors, image reliance, closed-loop success."""
    return {
        name: value for name, value in metrics.items()
        if isinstance(value, (int, float)) and any(word in name.lower() for word in RESULT_METRICS)
    }


def _results_table(metrics: dict[str, Any]) -> str:
    reported = reported_metrics(metrics)
    if not reported:
        return "No metrics were recorded."
    rows = [f"| {name} | {value:.4g} |" for name, value in reported.items()]
    return "\n".join(["| metric | value |", "| --- | --- |", *rows])


def write_model_card(folder: Path, config, metrics: dict[str, Any] | None = None, base_model: str | None = None,
                     datasets: list[str] | None = None, training: str = "", repo_id: str | None = None,
                     instruction: str = "move to the red block", license: str = "mit", open_loop: str | None = None) -> ModelCard:
    """Write `folder/README.md`: Hub metadata (library, pipeline tag, tags, base model, datasets, license, metrics),
    a usage snippet, the action space, the architecture, how it was trained and the results, and with `open_loop`
    (Markdown from `open_loop.replay_for_model_card`) an open-loop replay section.

    The usage snippet loads `repo_id` (the Hub id the folder is pushed to), else the folder's own name, never a path
    of the machine that wrote it."""
    norm_keys = sorted(config.norm_stats)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="robotics",
        license=license,
        tags=["openvla", "vision-language-action", "robotics", "custom_code"],
        base_model=base_model,
        datasets=datasets or None,
        action_dim=config.action_dim,
        unnorm_keys=norm_keys,
        metrics_summary=reported_metrics(metrics or {}),
    )
    body = CARD_BODY.format(
        title=f"OpenVLA ({Path(folder).name})",
        repo_id=repo_id or Path(folder).name,
        instruction=instruction,
        unnorm_argument=f', unnorm_key="{norm_keys[0]}"' if len(norm_keys) > 1 else "",
        norm_keys=", ".join(f"`{key}`" for key in norm_keys) or "none (actions stay normalised)",
        num_parameters=config.param_count(),
        vision="+".join(c.model_type for c in (config.vision_config, config.fused_vision_config) if c is not None),
        training=training or "Not recorded.",
        results=_results_table(metrics or {}),
        **{name: getattr(config, name) for name in ("action_dim", "action_decoding", "action_chunk_size", "action_binning", "num_action_bins", "num_patches", "vision_dim", "hidden_dim", "num_layers", "num_heads", "num_kv_heads", "rope", "image_size", "patch_size")},
    )
    if open_loop:
        body += f"\n## Open-loop replay\n\n{open_loop}\n"
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    card.save(Path(folder) / "README.md")
    return card


def push_folder(folder: Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create `repo_id` on the Hub (if needed) and upload the whole folder; returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload OpenVLA model").commit_url
