"""Fine-tune (or train from scratch) OpenVLA on robot demonstrations with the `Trainer`, optionally with LoRA.

With no arguments it trains a model from scratch (the small reference config with the overrides of
`FROM_SCRATCH_RECIPE`) on the built-in tabletop demonstrations, after a short self-supervised pretraining of its vision
backbone (`openvla_tools.vision_pretraining`), evaluates it in closed loop on held-out episodes and writes a Hub-ready folder to
`outputs/finetune`:

    python scripts/finetune.py
    python scripts/finetune.py --model_name_or_path outputs/finetune --use_lora --output_dir outputs/lora
    accelerate launch --num_processes 2 scripts/finetune.py --dataset_name my_demos --max_steps 2000
    python scripts/finetune.py --help

A dataset is any `datasets` dataset with an image, an instruction and an action column (`--dataset_name`: a Hub name,
a `save_to_disk` folder, parquet files or an imagefolder). Action statistics are computed per dataset (see
`--dataset_name_column`) on the training split and stored in the model's `norm_stats`.

Output: `output_dir/` holds the merged model (LoRA folded in), processor, tokenizer, remote code and a model card;
`output_dir/adapter/` the PEFT adapter (with `--use_lora`); `output_dir/checkpoints/checkpoint-N/` the Trainer's
checkpoints (resume with `--resume_from_checkpoint output_dir/checkpoints/checkpoint-N`, or `True` for the latest);
`output_dir/training_curves.png` the loss and metric curves; `output_dir/eval_results.json` the metrics.
"""

import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image, ImageEnhance
from transformers import (
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from configuration_openvla import OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction
from openvla_tools.envs.tabletop import TASK_KINDS, check_task_kinds, evaluate_model, generate_demonstrations
from openvla_tools.model_card import push_folder, write_model_card
from openvla_tools.vision_pretraining import PatchColourTarget, pretrain_vision
from processing_openvla import (
    IGNORE_INDEX,
    ActionTokenizer,
    OpenVLAImageProcessor,
    OpenVLAProcessor,
    build_action_chunks,
    compute_action_stats,
)

logger = logging.getLogger("finetune")
REPO = Path(__file__).resolve().parents[1]
BUILTIN_DATASET = "tabletop"
# Default --config_overrides: a narrow, shallow model whose layers start at unit gain (`weight_init="fan_in"`), a
# convolutional stem that sees pixel coordinates, parallel decoding, and a prefix whose image patches also see the
# instruction. README, main job: what each part changes.
FROM_SCRATCH_RECIPE = (
    "vision_dim=128,vision_num_layers=2,hidden_dim=128,num_layers=2,patch_size=16,vision_stem=coordconv,"
    "weight_init=fan_in,action_decoding=parallel,prefix_attention=bidirectional"
)
# Steps of `vision_pretraining.pretrain_vision` before VLA training from scratch (README, main job).
DEFAULT_VISION_PRETRAINING_STEPS = 250


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Saved model folder or Hub id to fine-tune. Without it, --from_scratch is implied."}
    )
    from_scratch: bool = field(
        default=False, metadata={"help": "Train a new model from the reference small config (see --config_overrides)."}
    )
    config_overrides: str | None = field(
        default=FROM_SCRATCH_RECIPE,
        metadata={"help": "Comma-separated options over the reference small config for --from_scratch, e.g. "
                          "'hidden_dim=128,num_layers=2,rope=true'. The default is the recipe that learns the built-in "
                          "tabletop task in minutes on a CPU (README, main job); pass '' for the plain small config."},
    )
    tokenizer_name_or_path: str = field(
        default=str(REPO / "assets" / "tokenizer"), metadata={"help": "Tokenizer for --from_scratch (default: the shipped one)."}
    )
    action_decoding: str | None = field(
        default=None, metadata={"help": "'autoregressive' or 'parallel' (from scratch; wins over --config_overrides, whose default says parallel)."}
    )
    action_chunk_size: int | None = field(
        default=None, metadata={"help": "Actions per prediction in parallel decoding; labels are the next K actions of the episode."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of all weights."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "'all-linear' or comma-separated module names (q_proj,v_proj,...)."}
    )
    lora_modules_to_save: str = field(
        default="projector", metadata={"help": "Comma-separated modules trained fully next to LoRA ('' for none)."}
    )
    freeze_vision_backbone: bool = field(default=False, metadata={"help": "Keep the vision backbone's weights fixed."})
    vision_pretraining_steps: int | None = field(
        default=None,
        metadata={"help": "From scratch: steps of self-supervised vision pretraining before VLA training (the vision "
                          "backbone and projector learn each patch's colour content and position, "
                          "openvla_tools.vision_pretraining), after which both stay fixed; 0 to skip. Default: "
                          f"{DEFAULT_VISION_PRETRAINING_STEPS} from scratch, 0 (the only choice) for a loaded model."},
    )

    @property
    def trains_from_scratch(self) -> bool:
        """True unless a saved model is loaded (`--model_name_or_path` without `--from_scratch`)."""
        return not self.model_name_or_path or self.from_scratch

    def resolved_vision_pretraining_steps(self) -> int:
        """`vision_pretraining_steps`, defaulted and checked to apply only to a model trained from scratch."""
        steps = self.vision_pretraining_steps
        if steps is None:
            return DEFAULT_VISION_PRETRAINING_STEPS if self.trains_from_scratch else 0
        if steps < 0:
            raise ValueError(f"--vision_pretraining_steps must be >= 0, got {steps}.")
        if steps and not self.trains_from_scratch:
            raise ValueError(
                f"--vision_pretraining_steps {steps} applies to a model trained from scratch, not to the loaded "
                f"{self.model_name_or_path!r}; drop it (or pass --from_scratch)."
            )
        return steps


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub name or local path (save_to_disk folder, parquet file/folder, imagefolder). Default: built-in tabletop demos."},
    )
    image_column: str = field(default="image", metadata={"help": "Column with the camera images."})
    instruction_column: str = field(default="instruction", metadata={"help": "Column with the language instructions."})
    action_column: str = field(default="action", metadata={"help": "Column with the actions (lists of floats)."})
    dataset_name_column: str | None = field(
        default=None, metadata={"help": "Column naming each row's dataset, to mix several; statistics are kept per dataset."}
    )
    episode_column: str = field(default="episode", metadata={"help": "Episode id column (for chunk labels and the split)."})
    eval_split_ratio: float = field(default=0.05, metadata={"help": "Share of episodes (or rows) held out for evaluation."})
    image_augmentation: bool = field(
        default=False, metadata={"help": "Random resized crop (scale 0.9-1) and colour jitter on training images."}
    )
    num_demo_episodes: int = field(default=4000, metadata={"help": "Episodes of built-in tabletop demonstrations."})
    demo_tasks: str = field(
        default=",".join(TASK_KINDS),
        metadata={"help": "Comma-separated goal kinds of the built-in demos and closed-loop episodes: 'reach', 'push' or both ('reach,push')."},
    )
    closed_loop_episodes: int = field(
        default=100, metadata={"help": "Held-out tabletop episodes run in closed loop after training (0 to skip)."}
    )


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    output_dir: str = field(default=str(REPO / "outputs" / "finetune"), metadata={"help": "Where the final model goes."})
    max_steps: int = field(default=2500, metadata={"help": "Optimisation steps."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per process."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Eval batch size per process."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up steps."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    logging_steps: int = field(default=25, metadata={"help": "Log every N steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "'steps', 'epoch' or 'no'."})
    eval_steps: int = field(default=200, metadata={"help": "Evaluate every N steps."})
    save_steps: int = field(default=400, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    report_to: str = field(default="none", metadata={"help": "Trackers: 'none', 'tensorboard', 'wandb', ..."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep dataset columns (the transform needs them)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data-loading worker processes."})
    use_cpu: bool = field(
        default=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        metadata={"help": "Train on the CPU (the default without a GPU; also makes torchrun use gloo data parallelism there)."},
    )
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Pin host memory (useful on GPUs)."})


def parse_overrides(text: str | None) -> dict[str, Any]:
    """'hidden_dim=128,rope=true,dropout=0.0,vision_stem=conv' -> {'hidden_dim': 128, 'rope': True, 'dropout': 0.0,
    'vision_stem': 'conv'}: JSON values, and any other value as a string."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise ValueError(f"--config_overrides item {item!r} is not name=value.")
        name, value = (part.strip() for part in item.split("=", 1))
        try:
            overrides[name] = json.loads(value.lower() if value.lower() in ("true", "false", "null") else value)
        except json.JSONDecodeError:
            overrides[name] = value
    return overrides


def load_raw_dataset(name: str | None, num_demo_episodes: int, seed: int, task_kinds: Sequence[str] = TASK_KINDS) -> datasets.Dataset:
    """The built-in demos (goals of `task_kinds`), or a dataset from a `save_to_disk` folder, parquet files, an
    imagefolder or the Hub."""
    if name is None:
        return generate_demonstrations(num_demo_episodes, seed=seed, dataset_name=BUILTIN_DATASET, task_kinds=task_kinds)
    path = Path(name)
    if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
    elif path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
        loaded = datasets.load_dataset("parquet", data_files=files)
    elif path.is_dir():
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    else:
        loaded = datasets.load_dataset(name)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"Dataset {name!r} has splits {list(loaded)} but no 'train' split.")
        loaded = loaded["train"]
    return loaded


def _as_image(value: Any, row: int, column: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, np.ndarray) and value.ndim == 3:
        return Image.fromarray(value.astype(np.uint8)).convert("RGB")
    raise ValueError(
        f"Row {row} of column {column!r} holds {type(value).__name__}, not an image; point --image_column at a column of images."
    )


def validate_dataset(dataset: datasets.Dataset, args: DataArguments) -> np.ndarray:
    """Check the columns and every action before training starts. Returns the actions `[rows, action_dim]`."""
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; there is nothing to train on.")
    required = [args.image_column, args.instruction_column, args.action_column]
    required += [args.dataset_name_column] if args.dataset_name_column else []
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise ValueError(f"The dataset has no column(s) {missing}; its columns are {dataset.column_names}. Set --*_column.")
    actions = dataset[args.action_column]
    lengths = {len(action) if hasattr(action, "__len__") else 1 for action in actions}
    if len(lengths) != 1:
        raise ValueError(f"Actions have different lengths {sorted(lengths)}; every action must have the same dimension.")
    actions = np.asarray(actions, dtype=np.float64)
    bad = np.argwhere(~np.isfinite(actions))
    if len(bad):
        raise ValueError(f"Row {bad[0][0]} of column {args.action_column!r} holds NaN or inf ({actions[bad[0][0]].tolist()}); clean the data.")
    for row in sorted({0, len(dataset) - 1}):
        _as_image(dataset[row][args.image_column], row, args.image_column)
    return actions


def split_dataset(dataset: datasets.Dataset, args: DataArguments, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out `eval_split_ratio` of the episodes (of the rows when there is no episode column)."""
    if args.eval_split_ratio <= 0:
        return dataset, None
    if args.episode_column in dataset.column_names:
        episodes = np.asarray(dataset[args.episode_column])
        keys = episodes if args.dataset_name_column is None else np.char.add(np.asarray(dataset[args.dataset_name_column], str), episodes.astype(str))
        unique = np.unique(keys)
        rng = np.random.default_rng(seed)
        held_out = set(rng.choice(unique, size=max(1, int(round(len(unique) * args.eval_split_ratio))), replace=False).tolist())
        is_eval = np.array([key in held_out for key in keys.tolist()])
        return dataset.select(np.flatnonzero(~is_eval)), dataset.select(np.flatnonzero(is_eval))
    split = dataset.train_test_split(test_size=args.eval_split_ratio, seed=seed)
    return split["train"], split["test"]


def dataset_names(dataset: datasets.Dataset, args: DataArguments, default: str) -> list[str]:
    if args.dataset_name_column:
        return [str(name) for name in dataset[args.dataset_name_column]]
    return [default] * len(dataset)


def action_labels(dataset: datasets.Dataset, args: DataArguments, chunk_size: int) -> np.ndarray:
    """Actions `[rows, action_dim]`, or the next `chunk_size` actions of each row's episode `[rows, K, action_dim]`."""
    actions = np.asarray(dataset[args.action_column], dtype=np.float64)
    if chunk_size == 1:
        return actions
    if args.episode_column not in dataset.column_names:
        raise ValueError(f"Action chunks need an episode column; --episode_column={args.episode_column!r} is missing.")
    steps = np.asarray(dataset["step"]) if "step" in dataset.column_names else np.arange(len(dataset))
    return build_action_chunks(actions, np.asarray(dataset[args.episode_column]), steps, chunk_size)


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """OpenVLA-style augmentation: random resized crop (area 90-100%, square) and brightness/contrast/colour jitter."""
    width, height = image.size
    scale = np.sqrt(rng.uniform(0.9, 1.0))
    crop_w, crop_h = int(round(width * scale)), int(round(height * scale))
    left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
    image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.8, 1.2))


class ProcessedDemonstrations(torch.utils.data.Dataset):
    """Rows of a demonstration dataset turned into model inputs by the processor (one unpadded row each).

    Augmentation draws from a generator seeded by `(seed, epoch, row)`, so a run resumed from a checkpoint sees the
    same augmented images as one that ran straight through (`EpochCallback` keeps `epoch` current).
    """

    def __init__(self, dataset: datasets.Dataset, labels: np.ndarray, names: list[str], processor: OpenVLAProcessor,
                 args: DataArguments, augment_seed: int | None = None):
        self.dataset = dataset
        self.labels = labels
        self.names = names
        self.processor = processor
        self.args = args
        self.augment_seed = augment_seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index)]
        image = _as_image(row[self.args.image_column], index, self.args.image_column)
        if self.augment_seed is not None:
            image = augment(image, np.random.default_rng([self.augment_seed, self.epoch, int(index)]))
        return self.processor.process_example(image, row[self.args.instruction_column], self.labels[index], self.names[index])


class EpochCallback(TrainerCallback):
    """Tells the training dataset which epoch the `Trainer` is in (for its augmentation seed)."""

    def __init__(self, dataset: ProcessedDemonstrations):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch or 0)


def build_model_and_processor(model_args: ModelArguments, action_dim: int) -> tuple[OpenVLAForActionPrediction, OpenVLAProcessor]:
    """Load a saved model and its processor, or build the small reference config (with overrides) from scratch."""
    if not model_args.trains_from_scratch:
        model = AutoModel.from_pretrained(model_args.model_name_or_path, trust_remote_code=True, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
        for name in ("action_decoding", "action_chunk_size"):
            requested = getattr(model_args, name)
            if requested is not None and requested != getattr(model.config, name):
                raise ValueError(f"--{name} {requested} differs from the loaded model's {getattr(model.config, name)}; it is fixed by the model.")
        return model, processor
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
    overrides = {"action_dim": action_dim, "vocab_size": len(tokenizer), "dropout": 0.0, **parse_overrides(model_args.config_overrides)}
    if model_args.action_decoding is not None:
        overrides["action_decoding"] = model_args.action_decoding
    if model_args.action_chunk_size is not None:
        overrides["action_chunk_size"] = model_args.action_chunk_size
    config = OpenVLAConfig.small_config(**overrides)
    processor = OpenVLAProcessor.from_model_config(config, OpenVLAImageProcessor(image_size=config.image_size), tokenizer)
    return OpenVLAForActionPrediction(config), processor


def run_vision_pretraining(model: OpenVLAForActionPrediction, processor: OpenVLAProcessor, dataset: ProcessedDemonstrations,
                           steps: int, training_args: TrainingArguments) -> float | None:
    """Pretrain the vision backbone and projector of a model built from scratch for `steps` steps
    (`vision_pretraining.pretrain_vision` on shuffled batches of the training images, seeded by `--seed`, so every
    process computes the same weights), then fix both for VLA training. A resumed run skips the pretraining: its
    checkpoint holds the result. Returns the last relative error, or None when skipped."""
    error = None
    if _resume_argument(training_args.resume_from_checkpoint) is None:
        generator = torch.Generator().manual_seed(training_args.seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=training_args.per_device_train_batch_size, shuffle=True, generator=generator,
            collate_fn=processor.data_collator,
        )
        image_processor = processor.image_processor
        target = PatchColourTarget(model, image_processor.image_mean, image_processor.image_std, seed=training_args.seed)
        model.to(training_args.device)
        losses = pretrain_vision(model, loader, target, steps, progress=training_args.process_index == 0)
        error = losses[-1]
    model.vision_backbone.requires_grad_(False)
    model.projector.requires_grad_(False)
    return error


def apply_training_mode(model: OpenVLAForActionPrediction, model_args: ModelArguments):
    """Freeze the vision backbone and/or wrap the model with LoRA adapters."""
    if model_args.freeze_vision_backbone:
        model.vision_backbone.requires_grad_(False)
    if not model_args.use_lora:
        return model
    from peft import LoraConfig, get_peft_model

    targets = model_args.lora_target_modules
    modules_to_save = [name for name in model_args.lora_modules_to_save.split(",") if name]
    if model.action_queries is not None:
        modules_to_save.append("action_queries")
    if model.action_head is not None:
        modules_to_save.append("action_head")
    lora_config = LoraConfig(
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        exclude_modules=r".*vision_backbone.*" if model_args.freeze_vision_backbone else None,
        modules_to_save=modules_to_save or None,
    )
    return get_peft_model(model, lora_config)


def make_compute_metrics(processor: OpenVLAProcessor, eval_names: list[str]):
    """Action-token accuracy and L1 error in normalised and raw action units, from the eval predictions."""
    tokenizer: ActionTokenizer = processor.action_tokenizer

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predicted_bins = np.asarray(prediction.predictions)
        labels = np.asarray(prediction.label_ids)
        target_bins = tokenizer.token_ids_to_bins(labels[labels != IGNORE_INDEX]).reshape(predicted_bins.shape)
        predicted, target = tokenizer.bins_to_normalized_actions(predicted_bins), tokenizer.bins_to_normalized_actions(target_bins)
        raw_errors = [
            np.abs(tokenizer.bins_to_actions(p, name) - tokenizer.bins_to_actions(t, name)).mean()
            for p, t, name in zip(predicted_bins, target_bins, eval_names[: len(predicted_bins)])
        ]
        return {
            "action_accuracy": float((predicted_bins == target_bins).mean()),
            "l1_normalized": float(np.abs(predicted - target).mean()),
            "l1_raw": float(np.mean(raw_errors)),
        }

    return compute_metrics


def make_predicted_bins(config: OpenVLAConfig):
    """`preprocess_logits_for_metrics` for the model's action head: keep only the predicted bins during evaluation
    (the argmax of `action_logits`, or the bins of the regression head's `normalized_actions`)."""
    tokenizer = ActionTokenizer.from_config(config)
    continuous = config.action_head == "l1_regression"

    def predicted_bins(logits, labels=None) -> torch.Tensor:
        values = logits[0] if isinstance(logits, (tuple, list)) else logits
        return tokenizer.normalized_to_bins(values) if continuous else values.argmax(-1)

    return predicted_bins


@torch.no_grad()
def image_reliance(model: torch.nn.Module, dataset: torch.utils.data.Dataset, collator, num_rows: int = 64) -> float:
    """Share of predicted action tokens that change when each of `num_rows` rows with action labels (spread over
    `dataset`, e.g. the eval split) is given the image of the row before it, with its own instruction.

    Near 0 means the model acts on the instruction alone and ignores the camera: the plateau a model trained from
    scratch sits on before it learns to see, whatever its loss says.
    """
    rows = np.unique(np.linspace(0, len(dataset) - 1, min(num_rows, len(dataset))).round().astype(int))
    if len(rows) < 2:
        raise ValueError(f"image_reliance needs at least 2 rows to swap images between, got {len(rows)}.")
    device = next(model.parameters()).device
    batch = {name: value.to(device) for name, value in collator([dataset[int(row)] for row in rows]).items()}
    swapped = {**batch, "pixel_values": batch["pixel_values"].roll(1, dims=0)}
    to_bins = make_predicted_bins(model.config)
    field = "normalized_actions" if model.config.action_head == "l1_regression" else "action_logits"
    was_training = model.training
    model.eval()
    own = to_bins(getattr(model(**batch), field))
    other = to_bins(getattr(model(**swapped), field))
    model.train(was_training)
    return float((own != other).float().mean())


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter, to check that data-parallel processes end with identical weights."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def plot_curves(log_history: list[dict[str, Any]], path: Path) -> None:
    """Training loss, eval loss and action accuracy against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key, axis in (("loss", loss_axis), ("eval_loss", loss_axis), ("eval_action_accuracy", metric_axis), ("eval_l1_normalized", metric_axis)):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            axis.plot(*zip(*points), marker=".", label=key)
    loss_axis.set(xlabel="step", ylabel="loss", yscale="log", title="Loss")
    metric_axis.set(xlabel="step", title="Eval metrics")
    for axis in (loss_axis, metric_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuneTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    set_seed(training_args.seed)
    started = time.time()
    pretraining_steps = model_args.resolved_vision_pretraining_steps()

    output_dir = Path(training_args.output_dir)
    push_to_hub, hub_model_id = training_args.push_to_hub, training_args.hub_model_id
    if push_to_hub and not hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id <user>/<repo>.")
    training_args.output_dir = str(output_dir / "checkpoints")
    training_args.push_to_hub = False

    task_kinds = check_task_kinds(data_args.demo_tasks.split(","))
    raw = load_raw_dataset(data_args.dataset_name, data_args.num_demo_episodes, training_args.seed, task_kinds)
    actions = validate_dataset(raw, data_args)
    default_name = BUILTIN_DATASET if data_args.dataset_name is None else Path(data_args.dataset_name).name
    train_raw, eval_raw = split_dataset(raw, data_args, training_args.seed)
    model, processor = build_model_and_processor(model_args, actions.shape[1])
    if model.config.action_dim != actions.shape[1]:
        raise ValueError(f"The actions have {actions.shape[1]} dimensions but the model predicts action_dim={model.config.action_dim}.")

    train_names = dataset_names(train_raw, data_args, default_name)
    train_actions = np.asarray(train_raw[data_args.action_column], dtype=np.float64)
    norm_stats = {
        name: compute_action_stats(train_actions[[n == name for n in train_names]]) for name in sorted(set(train_names))
    }
    model.config.norm_stats = {**model.config.norm_stats, **norm_stats}
    processor.norm_stats = dict(model.config.norm_stats)
    logger.info("Action statistics for %s from %d training rows.", sorted(norm_stats), len(train_raw))

    chunk_size = model.config.action_chunk_size
    augment_seed = training_args.seed if data_args.image_augmentation else None
    train_dataset = ProcessedDemonstrations(train_raw, action_labels(train_raw, data_args, chunk_size), train_names, processor, data_args, augment_seed)
    eval_dataset = eval_names = None
    if eval_raw is not None and len(eval_raw):
        eval_names = dataset_names(eval_raw, data_args, default_name)
        eval_dataset = ProcessedDemonstrations(eval_raw, action_labels(eval_raw, data_args, chunk_size), eval_names, processor, data_args)
    else:
        training_args.eval_strategy = "no"

    pretraining_error = run_vision_pretraining(model, processor, train_dataset, pretraining_steps, training_args) if pretraining_steps else None
    model = apply_training_mode(model, model_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("Trainable parameters: %s of %s (%.2f%%).", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=processor.data_collator,
        processing_class=processor,  # saved into every checkpoint, so a checkpoint folder loads like the final one
        compute_metrics=make_compute_metrics(processor, eval_names) if eval_dataset is not None else None,
        preprocess_logits_for_metrics=make_predicted_bins(model.config),
        callbacks=[EpochCallback(train_dataset)],
    )
    train_result = trainer.train(resume_from_checkpoint=_resume_argument(training_args.resume_from_checkpoint))
    metrics = {"train_loss": train_result.training_loss, "train_steps": trainer.state.global_step, "vision_pretraining_steps": pretraining_steps}
    if pretraining_error is not None:
        metrics["vision_pretraining_error"] = pretraining_error
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
        metrics["eval_image_reliance"] = image_reliance(trainer.model, eval_dataset, processor.data_collator)
        if metrics["eval_image_reliance"] < 0.05:
            logger.warning(
                "Only %.1f%% of the predicted action tokens change when the eval rows swap images: the model acts on "
                "the instruction and hardly uses the camera. Train longer (a model trained from scratch learns to see "
                "late) before judging it in closed loop.", 100 * metrics["eval_image_reliance"],
            )
    final_model = trainer.model
    fingerprints = gather_object([weights_fingerprint(final_model)])
    if trainer.is_world_process_zero():
        print(f"weights sha256 of the {len(fingerprints)} process(es), by rank: {' '.join(fingerprints)}", flush=True)

    if trainer.is_world_process_zero():
        merged = save_outputs(final_model, processor, output_dir, model_args)
        metrics["train_minutes"] = (time.time() - started) / 60
        if data_args.dataset_name is None and data_args.closed_loop_episodes > 0:
            closed_loop = evaluate_model(
                merged, processor, num_episodes=data_args.closed_loop_episodes, strip_path=output_dir / "closed_loop_episodes.png",
                task_kinds=task_kinds,
            )
            metrics["closed_loop_success_rate"] = closed_loop["success_rate"]
            print(f"Closed-loop success on {closed_loop['num_episodes']} held-out episodes: {closed_loop['success_rate']:.1%}")
        plot_curves(trainer.state.log_history, output_dir / "training_curves.png")
        (output_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2))
        write_model_card(
            output_dir, merged.config, metrics=metrics, base_model=model_args.model_name_or_path,
            datasets=[data_args.dataset_name] if data_args.dataset_name else [], training=_training_summary(model_args, data_args, training_args),
        )
        if push_to_hub:
            push_folder(output_dir, hub_model_id, token=training_args.hub_token, private=bool(training_args.hub_private_repo))
        print(json.dumps(metrics, indent=2))
    trainer.accelerator.wait_for_everyone()
    return metrics


def _resume_argument(value: str | None) -> str | bool | None:
    if value in (None, "", "False", "false"):
        return None
    return True if value in ("True", "true") else value


def save_outputs(model, processor: OpenVLAProcessor, output_dir: Path, model_args: ModelArguments) -> OpenVLAForActionPrediction:
    """Write the adapter (LoRA runs) to `output_dir/adapter`, then the merged model, processor and remote code."""
    if model_args.use_lora:
        model.save_pretrained(output_dir / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return model.eval()


def _training_summary(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> str:
    mode = f"LoRA (r={model_args.lora_rank}, alpha={model_args.lora_alpha}, targets={model_args.lora_target_modules})" if model_args.use_lora else "full fine-tuning"
    source = "from scratch" if model_args.trains_from_scratch else f"from `{model_args.model_name_or_path}`"
    data = data_args.dataset_name or f"{data_args.num_demo_episodes} built-in tabletop demonstration episodes ({data_args.demo_tasks} goals)"
    pretraining_steps = model_args.resolved_vision_pretraining_steps()
    pretraining = (
        f" Before that, {pretraining_steps} steps of self-supervised vision pretraining (per-patch colour and position "
        "targets); the vision backbone and projector then stayed fixed." if pretraining_steps else ""
    )
    return (
        f"Trained {source} with `scripts/finetune.py` ({mode}{', vision backbone frozen' if model_args.freeze_vision_backbone else ''}) "
        f"on {data} for {training_args.max_steps} steps, batch {training_args.per_device_train_batch_size} per process x "
        f"{training_args.world_size} process(es), learning rate {training_args.learning_rate} ({training_args.lr_scheduler_type}), "
        f"seed {training_args.seed}{', with image augmentation' if data_args.image_augmentation else ''}.{pretraining}"
    )


if __name__ == "__main__":
    main()
