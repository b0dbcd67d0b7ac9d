"""Fine-tune (or train from scratch) OpenVLA on robot demonstrations with the `Trainer`, optionally with LoRA.

The first argument may be a recipe: a YAML or JSON file of these arguments (`configs/recipes/*.yaml`); flags after it
override its values. With no arguments at all it runs the main job, `configs/recipes/tabletop.yaml`: a small model
trained from scratch on the built-in tabletop demonstrations, after a short self-supervised pretraining of its vision
backbone (`openvla_tools.vision_pretraining`), evaluated in closed loop on held-out episodes, written as a Hub-ready
folder to `outputs/finetune`. Without a recipe the defaults are those of official OpenVLA fine-tuning (learning rate
5e-4, batch 16, constant schedule, image augmentation, LoRA rank 32 when `--use_lora`):

    python scripts/finetune.py
    python scripts/finetune.py configs/recipes/metaworld.yaml --max_steps 2000
    python scripts/finetune.py --model_name_or_path outputs/finetune --use_lora --dataset_name my_demos --output_dir outputs/lora
    accelerate launch --num_processes 2 scripts/finetune.py --dataset_name my_demos --max_steps 2000
    python scripts/finetune.py --help

A dataset is any `datasets` dataset with an image, an instruction and an action column (`--dataset_name`: a Hub name,
a `save_to_disk` folder, parquet files or an imagefolder), or a LeRobot dataset (v3.0 or v2.1; a folder or a Hub id,
`openvla_tools.lerobot_format`; `--image_key`, `--action_key`, `--episodes`). Several datasets train together with
`--dataset_name a,b` (sampled in proportion to their size, or by `--dataset_weights`). Action statistics are computed
per dataset (see `--dataset_name_column`; the dataset's name for each of a mix) on the training split and stored in
the model's `norm_stats`. When the vision backbone stays fixed (`--freeze_vision_backbone`, with or without LoRA, or
after `--vision_pretraining_steps`) and no augmentation touches the images, its features are computed once per image
and kept in memory (`cache_frozen_vision_features`; the log says why when they are not).

Output: `output_dir/` holds the merged model (LoRA folded in), processor, tokenizer, remote code and a model card;
`output_dir/adapter/` the PEFT adapter (with `--use_lora`); `output_dir/checkpoints/checkpoint-N/` the Trainer's
checkpoints (resume with `--resume_from_checkpoint output_dir/checkpoints/checkpoint-N`, or `True` for the latest);
`output_dir/training_curves.png` the loss and metric curves; `output_dir/eval_results.json` the metrics.
"""

import hashlib
import io
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import psutil
import torch
import yaml
from accelerate.utils import gather_object
from PIL import Image, ImageEnhance
from tqdm.auto import tqdm
from transformers import (
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    EvalPrediction,
    HfArgumentParser,
    SchedulerType,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from configuration_openvla import OpenVLAConfig
from modeling_openvla import ADAPTER_NORM_STATS_NAME, OpenVLAForActionPrediction
from openvla_tools.envs.tabletop import FPS as TABLETOP_FPS
from openvla_tools.envs.tabletop import TASK_KINDS, check_task_kinds, evaluate_model, generate_demonstrations
from openvla_tools.lerobot_format import load_lerobot_dataset, parse_episodes, resolve_lerobot_dataset
from openvla_tools.lerobot_writer import write_lerobot_dataset
from openvla_tools.model_card import push_folder, write_model_card
from openvla_tools.open_loop import replay_for_model_card
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
RECIPES = REPO / "configs" / "recipes"
# What `python scripts/finetune.py` with no arguments runs (README, main job).
MAIN_JOB_RECIPE = RECIPES / "tabletop.yaml"
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Saved model folder or Hub id to fine-tune. Without it, --from_scratch is implied."}
    )
    from_scratch: bool = field(
        default=False, metadata={"help": "Train a new model from the reference small config (see --config_overrides)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated options over the reference small config for --from_scratch, e.g. "
                          "'hidden_dim=128,num_layers=2,rope=true' (configs/recipes/tabletop.yaml holds the main job's)."},
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
    action_loss_weights: str | None = field(
        default=None,
        metadata={"help": "Comma-separated loss weight of each action dimension, e.g. '1,1,1,4' to stress the gripper's "
                          "token (scaled to mean 1; saved in the config as action_loss_weights). Default: the model's, "
                          "equal for a new one."},
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of all weights."})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank r (official OpenVLA fine-tuning: 32)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha, scaling = alpha / r (official: min(r, 16))."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "'all-linear' or comma-separated module names (q_proj,v_proj,...)."}
    )
    lora_modules_to_save: str = field(
        default="projector", metadata={"help": "Comma-separated modules trained fully next to LoRA ('' for none)."}
    )
    freeze_vision_backbone: bool = field(default=False, metadata={"help": "Keep the vision backbone's weights fixed."})
    vision_pretraining_steps: int = field(
        default=0,
        metadata={"help": "From scratch only: steps of self-supervised vision pretraining before VLA training (the "
                          "vision backbone and projector learn each patch's colour content and position, "
                          "openvla_tools.vision_pretraining), after which both stay fixed. Built for the tabletop's "
                          "coloured objects; its recipe uses 250."},
    )

    @property
    def trains_from_scratch(self) -> bool:
        """True unless a saved model is loaded (`--model_name_or_path` without `--from_scratch`)."""
        return not self.model_name_or_path or self.from_scratch

    def resolved_vision_pretraining_steps(self) -> int:
        """`vision_pretraining_steps`, checked to apply only to a model trained from scratch."""
        steps = self.vision_pretraining_steps
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
        metadata={"help": "Hub name or local path (save_to_disk folder, parquet file/folder, imagefolder, LeRobot v3.0/v2.1 folder or "
                          "Hub id); several, comma-separated, train together. Default: built-in tabletop demos."},
    )
    dataset_weights: str | None = field(
        default=None, metadata={"help": "Comma-separated sampling weights of the --dataset_name datasets (default: their sizes)."}
    )
    image_key: str | None = field(
        default=None,
        metadata={"help": "LeRobot camera, e.g. observation.images.top (default: the dataset's only camera); one per dataset of a mix, comma-separated."},
    )
    action_key: str = field(default="action", metadata={"help": "LeRobot action feature."})
    episodes: str | None = field(default=None, metadata={"help": "LeRobot episodes to use, e.g. '0-99,120' (default: all)."})
    image_column: str = field(default="image", metadata={"help": "Column with the camera images."})
    instruction_column: str = field(default="instruction", metadata={"help": "Column with the language instructions."})
    action_column: str = field(default="action", metadata={"help": "Column with the actions (lists of floats)."})
    dataset_name_column: str | None = field(
        default=None, metadata={"help": "Column naming each row's dataset, to mix several; statistics are kept per dataset."}
    )
    episode_column: str = field(default="episode", metadata={"help": "Episode id column (for chunk labels and the split)."})
    eval_split_ratio: float = field(default=0.05, metadata={"help": "Share of episodes (or rows) held out for evaluation."})
    image_augmentation: bool = field(
        default=True, metadata={"help": "Random resized crop (scale 0.9-1) and colour jitter on training images (as "
                                        "official OpenVLA fine-tuning); `--image_augmentation false` to turn off."}
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
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size per process."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Eval batch size per process."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule ('cosine', 'linear', ...)."})
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
    """'hidden_dim=128,rope=true,dropout=0.0,vision_stem=coordconv' -> {'hidden_dim': 128, 'rope': True,
    'dropout': 0.0, 'vision_stem': 'coordconv'}: JSON values, and any other value as a string."""
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


def parse_loss_weights(text: str) -> list[float]:
    """'1,1,1,4' -> [1.0, 1.0, 1.0, 4.0] (`--action_loss_weights`)."""
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"--action_loss_weights {text!r} must be comma-separated numbers, one per action dimension, e.g. '1,1,1,4'.") from None


def builtin_demonstrations(num_episodes: int, seed: int, task_kinds: Sequence[str] = TASK_KINDS) -> datasets.Dataset:
    """The built-in tabletop demonstrations, through the same LeRobot path as a user's data: generated once, written as
    a LeRobot v3.0 dataset with lossless frames in the `datasets` cache folder, and read back by the LeRobot reader
    (later runs with the same episodes, seed and goal kinds read the folder written before)."""
    key = f"tabletop-{num_episodes}-episodes-seed-{seed}-{'-'.join(task_kinds)}"
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "openvla_builtin_demos" / key
    if not (folder / "meta" / "info.json").exists():
        demos = generate_demonstrations(num_episodes, seed=seed, dataset_name=BUILTIN_DATASET, task_kinds=task_kinds)
        try:
            write_lerobot_dataset(demos, folder, fps=TABLETOP_FPS, image_storage="image", robot_type=BUILTIN_DATASET)
        except FileExistsError:
            pass  # another run (or another process of `accelerate launch`) wrote the same demonstrations first
    return load_lerobot_dataset(folder, dataset_name=BUILTIN_DATASET)


def load_raw_dataset(name: str | None, num_demo_episodes: int, seed: int, task_kinds: Sequence[str] = TASK_KINDS) -> datasets.Dataset:
    """The built-in demos (goals of `task_kinds`), or a dataset from a `save_to_disk` folder, parquet files, an
    imagefolder or the Hub."""
    if name is None:
        return builtin_demonstrations(num_demo_episodes, seed, task_kinds)
    path = Path(name)
    if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
    elif path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
        loaded = datasets.load_dataset("parquet", data_files=files)
    elif path.is_dir():
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    else:
        try:
            loaded = datasets.load_dataset(name)
        except (FileNotFoundError, ConnectionError) as error:  # DatasetNotFoundError is a FileNotFoundError
            raise ValueError(
                f"Dataset {name!r} is neither a local folder or file nor a dataset on the Hub ({error}); check the name, "
                "or download it first."
            ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"Dataset {name!r} has splits {list(loaded)} but no 'train' split.")
        loaded = loaded["train"]
    return loaded


MIX_COLUMNS = ("image", "instruction", "action", "episode", "step", "dataset_name")
_MIX_ARGUMENTS = {"image_column": "image", "instruction_column": "instruction", "action_column": "action", "episode_column": "episode"}


def load_training_data(data_args: DataArguments, seed: int, task_kinds: Sequence[str] = TASK_KINDS) -> tuple[datasets.Dataset, DataArguments]:
    """The rows to train on and the data arguments that describe their columns.

    One plain dataset (or none: the built-in demos) comes as `load_raw_dataset` reads it. A LeRobot dataset and a mix
    of several datasets come as the demonstrations' columns (`MIX_COLUMNS`), each row named by its dataset (the
    `unnorm_key`) and the episodes of a mix numbered apart.
    """
    names = [part.strip() for part in (data_args.dataset_name or "").split(",") if part.strip()]
    episodes = parse_episodes(data_args.episodes)
    image_keys = [key.strip() or None for key in (data_args.image_key or "").split(",")]
    if len(image_keys) not in (1, len(names)):
        raise ValueError(
            f"--image_key {data_args.image_key!r} names {len(image_keys)} cameras for the {len(names)} datasets {names}; give one "
            "camera for all, or one per dataset (empty for a dataset's only camera)."
        )
    image_keys = image_keys * len(names) if len(image_keys) == 1 else image_keys
    roots = [resolve_lerobot_dataset(name, key) for name, key in zip(names, image_keys)]
    if not any(root is not None for root in roots) and (data_args.image_key or episodes is not None):
        raise ValueError("--image_key and --episodes select from LeRobot datasets; for other datasets use --image_column and filter the rows.")
    if len(names) == 1 and roots[0] is not None:
        return _read_lerobot(names[0], roots[0], image_keys[0], data_args, episodes), replace(data_args, **_MIX_ARGUMENTS, dataset_name_column=None)
    if len(names) <= 1:
        return load_raw_dataset(data_args.dataset_name, data_args.num_demo_episodes, seed, task_kinds), data_args
    short_names = [_short_name(name) for name in names]
    if len(set(short_names)) != len(names):
        raise ValueError(f"The datasets {names} share a name ({short_names}); their statistics are kept by name, so rename a folder.")
    parts, next_episode = [], 0
    for name, short, root, image_key in zip(names, short_names, roots, image_keys):
        rows = _read_lerobot(name, root, image_key, data_args, episodes) if root is not None else _as_mix_part(load_raw_dataset(name, 0, seed), short, data_args)
        rows = rows.cast(datasets.Features({**rows.features, "action": datasets.List(datasets.Value("float32")), "episode": datasets.Value("int64"), "step": datasets.Value("int64")}))
        parts.append(rows.map(lambda batch, offset=next_episode: {"episode": [e + offset for e in batch["episode"]]}, batched=True))
        next_episode += max(rows["episode"]) + 1 if len(rows) else 0
    return datasets.concatenate_datasets(parts), replace(data_args, **_MIX_ARGUMENTS, dataset_name_column="dataset_name")


def _short_name(name: str) -> str:
    return Path(name.rstrip("/")).name


def _read_lerobot(name: str, root: Path, image_key: str | None, data_args: DataArguments, episodes: list[int] | None) -> datasets.Dataset:
    return load_lerobot_dataset(root, image_key, data_args.action_key, episodes, dataset_name=_short_name(name))


def _as_mix_part(rows: datasets.Dataset, name: str, data_args: DataArguments) -> datasets.Dataset:
    """A plain dataset's rows as the demonstrations' columns (row order gives the steps; no episodes: one per row)."""
    source = [data_args.image_column, data_args.instruction_column, data_args.action_column]
    missing = [column for column in source if column not in rows.column_names]
    if missing:
        raise ValueError(f"Dataset {name!r} has no column(s) {missing}; its columns are {rows.column_names}. Set --*_column.")
    has_episodes = data_args.episode_column in rows.column_names
    has_names = data_args.dataset_name_column is not None and data_args.dataset_name_column in rows.column_names
    part = rows.select_columns(source + [data_args.episode_column] * has_episodes + [data_args.dataset_name_column] * has_names)
    part = part.rename_columns(dict(zip(source, MIX_COLUMNS[:3])) | ({data_args.episode_column: "episode"} if has_episodes else {}))
    if has_names:
        part = part.rename_column(data_args.dataset_name_column, "dataset_name")
    else:
        part = part.add_column("dataset_name", [name] * len(part))
    if not has_episodes:
        part = part.add_column("episode", list(range(len(part))))
    part = part.add_column("step", [int(s) for s in rows["step"]] if "step" in rows.column_names else list(range(len(part))))
    return part.cast_column("image", datasets.Image()).select_columns(list(MIX_COLUMNS))


def mixture_rows(names: list[str], weights: str | None, seed: int) -> np.ndarray:
    """Indices of the training rows to sample: all of them once, or, with `weights` (one per dataset, in the order
    of `--dataset_name`, which is the order of `names`' first appearances), each dataset's share of the same total in
    proportion to its weight (every row of a dataset before any of its rows repeats)."""
    order = list(dict.fromkeys(names))
    if weights is None:
        return np.arange(len(names))
    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError as error:
        raise ValueError(f"--dataset_weights {weights!r} must be comma-separated numbers, one per dataset.") from error
    if len(values) != len(order) or min(values) <= 0:
        raise ValueError(f"--dataset_weights {weights!r} needs {len(order)} positive numbers, one for each of {order}.")
    rng = np.random.default_rng(seed)
    labels = np.asarray(names)
    picked = []
    for name, weight in zip(order, values):
        rows = np.flatnonzero(labels == name)
        count = int(round(len(names) * weight / sum(values)))
        repeats = [rng.permutation(rows) for _ in range(-(-count // len(rows)))]
        picked.append(np.concatenate(repeats)[:count])
    return rng.permutation(np.concatenate(picked))


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
    for row, action in enumerate(actions):
        if isinstance(action, (str, bytes)) or np.ndim(action) != 1 or not all(isinstance(value, (int, float, np.number)) for value in action):
            raise ValueError(
                f"Row {row} of column {args.action_column!r} holds {action!r:.80}, not a list of numbers; each row's "
                "action must be [action_dim] floats (parse strings first; chunks come from --action_chunk_size)."
            )
    lengths = {len(action) for action in actions}
    if len(lengths) != 1:
        raise ValueError(f"Actions have different lengths {sorted(lengths)}; every action must have the same dimension.")
    instructions = dataset[args.instruction_column]
    bad_text = next((row for row, text in enumerate(instructions) if not isinstance(text, str)), None)
    if bad_text is not None:
        raise ValueError(f"Row {bad_text} of column {args.instruction_column!r} holds {instructions[bad_text]!r}, not a text instruction.")
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

    The work that does not change between epochs is done once, when the dataset is built: each distinct instruction's
    prompt is tokenised once and all rows' action labels in one array operation (`encode_action_rows`), and, without
    augmentation, each image is decoded and resized once into a uint8 column that `datasets` caches on disk
    (`resized_images`), so that a step only rescales and normalises its images. With augmentation each step decodes
    and augments its images afresh, as the augmentation differs per epoch: it draws from a generator seeded by
    `(seed, epoch, row)`, so a run resumed from a checkpoint sees the same augmented images as one that ran straight
    through (`EpochCallback` keeps `epoch` current). Either way a row equals `processor.process_example` of its image
    (augmented or not), instruction, labels and dataset name.

    For a frozen vision backbone and no augmentation, `cache_vision_features` runs the backbone once over every image;
    the rows then hold its features (`vision_features`, which the model's forward takes instead of `pixel_values`).
    """

    def __init__(self, dataset: datasets.Dataset, labels: np.ndarray, names: list[str], processor: OpenVLAProcessor,
                 args: DataArguments, augment_seed: int | None = None):
        self.dataset = dataset
        self.processor = processor
        self.args = args
        self.augment_seed = augment_seed
        self.epoch = 0
        instructions = list(dataset[args.instruction_column])
        self.prompts = {text: processor.encode_row(text)["input_ids"] for text in dict.fromkeys(instructions)}
        self.instructions = instructions
        self.action_ids = encode_action_rows(processor, instructions, labels, names)
        self.pixels = resized_images(dataset, args.image_column, processor.image_processor) if augment_seed is None else None
        self.vision_features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The rows at `indices` (the `DataLoader` fetches a batch through this in one call), with their cached
        `vision_features` or their `pixel_values` (see `pixel_values`)."""
        indices = [int(index) for index in indices]
        if self.vision_features is not None:
            image_key, images = "vision_features", self.vision_features[indices]
        else:
            image_key, images = "pixel_values", self.pixel_values(indices)
        rows = []
        for index, values in zip(indices, images):
            prompt, action_ids = self.prompts[self.instructions[index]], self.action_ids[index].tolist()
            input_ids = prompt + action_ids
            rows.append({
                "input_ids": input_ids,
                "labels": [IGNORE_INDEX] * len(prompt) + action_ids,
                "attention_mask": [1] * len(input_ids),
                image_key: values,
            })
        return rows

    def pixel_values(self, indices: Sequence[int]) -> np.ndarray | list[np.ndarray]:
        """The processed images `[C, H, W]` of the rows at `indices`: read from the cache in one slice and normalised
        by one image processor call, or decoded (and augmented) one by one."""
        image_processor = self.processor.image_processor
        if self.pixels is None:
            return [image_processor(self._image(index))["pixel_values"][0] for index in indices]
        size = image_processor.image_size
        pixels = self.pixels[list(indices)]["pixels"].reshape(len(indices), 3, size, size)
        return image_processor(pixels, do_resize=False, input_data_format="channels_first")["pixel_values"]

    @torch.no_grad()
    def cache_vision_features(self, model: OpenVLAForActionPrediction, batch_size: int, progress: bool = True) -> None:
        """Run the vision backbone once over every row's image (`model.encode_image` in eval mode, `batch_size`
        images at a time, on the model's device) and keep the features in memory, one float32 tensor
        `[rows, num_patches, vision_dim]`: from now on the rows hold `vision_features` instead of `pixel_values`.

        For a backbone that stays fixed and has no randomness in training mode (`vision_cache_refusal` checks both),
        so that the features equal what the backbone computes at every step; not with augmentation, whose images change
        every epoch."""
        if self.pixels is None:
            raise ValueError("Vision features are cached for unaugmented images only; augmented ones change every epoch.")
        config = model.config
        features = torch.empty(len(self), config.num_patches, config.vision_dim)
        logger.info(
            "Caching the frozen vision backbone's features of %d images once: %.1f MB in memory (float32 [%d, %d] each).",
            len(self), features.numel() * features.element_size() / 2**20, config.num_patches, config.vision_dim,
        )
        was_training = model.training
        model.eval()
        for start in tqdm(range(0, len(self), batch_size), desc="Vision features", unit="batch", disable=not progress):
            indices = range(start, min(start + batch_size, len(self)))
            pixel_values = torch.as_tensor(np.asarray(self.pixel_values(indices))).to(model.device)
            features[start : start + len(indices)] = model.encode_image(pixel_values).float().cpu()
        model.train(was_training)
        self.vision_features = features

    def _image(self, index: int) -> Image.Image:
        """Row `index`'s image, decoded, and augmented with the generator of `(seed, epoch, index)` when augmenting."""
        image = _as_image(self.dataset[index][self.args.image_column], index, self.args.image_column)
        if self.augment_seed is not None:
            image = augment(image, np.random.default_rng([self.augment_seed, self.epoch, index]))
        return image


def encode_action_rows(processor: OpenVLAProcessor, instructions: list[str], labels: np.ndarray, names: list[str]) -> np.ndarray:
    """The action token ids of every row, `[rows, chunk * action_dim]`, tokenised per dataset in one call each.

    The first row goes through `processor.encode_row` first, which checks the labels' shape against the model's
    action dimension and chunk size (and raises naming the fix)."""
    if len(labels) == 0:
        return np.zeros((0, 0), dtype=np.int64)
    processor.encode_row(instructions[0], labels[0], names[0])
    action_ids = np.empty((len(labels), int(np.prod(labels.shape[1:]))), dtype=np.int64)
    names = np.asarray(names)
    for name in dict.fromkeys(names.tolist()):
        rows = np.flatnonzero(names == name)
        action_ids[rows] = np.asarray(processor.action_token_ids(labels[rows], name)).reshape(len(rows), -1)
    return action_ids


def resized_images(dataset: datasets.Dataset, column: str, image_processor: OpenVLAImageProcessor) -> datasets.Dataset:
    """Each row's image decoded and resized by `image_processor` once: a dataset with one uint8 column `pixels`
    (`[3, image_size, image_size]`, flattened: the processor's resize output, before rescaling and normalisation), written by
    `datasets.map` into the `datasets` cache next to `dataset`'s files (kept in memory for an in-memory dataset), so a
    later run over the same rows reads it back."""
    size = image_processor.image_size

    def resize(batch: dict[str, list], indices: list[int]) -> dict[str, np.ndarray]:
        images = [_as_image(value, index, column) for value, index in zip(batch[column], indices)]
        pixels = image_processor(images, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
        return {"pixels": pixels.astype(np.uint8).reshape(len(images), -1)}

    # Flat fixed-length rows: `datasets` reads a slice of them as one 2-D array (a 3-D array feature goes row by row).
    features = datasets.Features({"pixels": datasets.List(datasets.Value("uint8"), length=3 * size * size)})
    resized = dataset.select_columns([column]).map(
        resize, batched=True, batch_size=256, with_indices=True, remove_columns=[column], features=features,
        desc="Decoding and resizing images once",
    )
    return resized.with_format("numpy")


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
        if model_args.action_loss_weights is not None:
            if not hasattr(model.config, "validate_action_loss_weights"):
                raise ValueError(
                    f"--action_loss_weights needs model code that knows them, and {model_args.model_name_or_path!r} "
                    "runs an older configuration_openvla.py and modeling_openvla.py: copy this repository's over them."
                )
            model.config.action_loss_weights = parse_loss_weights(model_args.action_loss_weights)
            model.config.validate_action_loss_weights()
        return model, processor
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
    overrides = {"action_dim": action_dim, "vocab_size": len(tokenizer), "dropout": 0.0, **parse_overrides(model_args.config_overrides)}
    if model_args.action_decoding is not None:
        overrides["action_decoding"] = model_args.action_decoding
    if model_args.action_chunk_size is not None:
        overrides["action_chunk_size"] = model_args.action_chunk_size
    if model_args.action_loss_weights is not None:
        overrides["action_loss_weights"] = parse_loss_weights(model_args.action_loss_weights)
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


def vision_cache_refusal(model, splits: Sequence[ProcessedDemonstrations]) -> str | None:
    """Why the vision backbone of `model` (LoRA-wrapped or not) must run at every step on `splits` rather than have
    its features cached once (`None` when they can be): image augmentation, a backbone that trains (some of its
    weights, or LoRA adapters inside it), randomness in training mode (a dropout or drop path in a tower's config),
    or a cache larger than half the free memory."""
    if any(dataset.pixels is None for dataset in splits):
        return "image augmentation changes the images every epoch"
    backbone = model.vision_backbone
    if any(parameter.requires_grad for parameter in backbone.parameters()):
        return "it trains (freeze it with --freeze_vision_backbone)"
    config = model.config
    for tower in filter(None, (config.vision_config, config.fused_vision_config)):
        for name, value in tower.to_dict().items():
            if ("dropout" in name or "drop_path" in name) and isinstance(value, (int, float)) and value > 0:
                return f"its {tower.model_type} config sets {name}={value}, random in training mode"
    size = sum(len(dataset) for dataset in splits) * config.num_patches * config.vision_dim * 4
    available = psutil.virtual_memory().available
    if size > available / 2:
        return f"its features would take {size / 2**20:.1f} MB, more than half the {available / 2**20:.1f} MB of free memory"
    return None


def cache_frozen_vision_features(model, splits: Sequence[ProcessedDemonstrations | None], training_args: TrainingArguments) -> bool:
    """Compute a frozen vision backbone's features once per image and train on them
    (`ProcessedDemonstrations.cache_vision_features`), unless `vision_cache_refusal` gives a reason, which is logged.
    Moves the model to the training device. Returns whether the features are cached."""
    splits = [dataset for dataset in splits if dataset is not None]
    reason = vision_cache_refusal(model, splits)
    if reason is not None:
        logger.info("The vision backbone runs at every step: %s.", reason)
        return False
    model.to(training_args.device)
    for dataset in splits:
        dataset.cache_vision_features(model, training_args.per_device_eval_batch_size, progress=training_args.process_index == 0)
    return True


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
    image_key = "vision_features" if "vision_features" in batch else "pixel_values"
    swapped = {**batch, image_key: batch[image_key].roll(1, dims=0)}
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


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, FinetuneTrainingArguments]:
    """The three argument groups from `argv` (default: the command line). A first argument ending in .yaml, .yml or
    .json is a recipe whose values replace the defaults, so the flags that follow it override it; no arguments at all
    mean the main job's recipe. An unknown name in a recipe is an error that names it."""
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuneTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = MAIN_JOB_RECIPE if not argv else None
    if argv and argv[0].endswith(RECIPE_SUFFIXES):
        recipe = Path(argv.pop(0))
    if recipe is not None:
        parser.set_defaults(**read_recipe(recipe, {action.dest for action in parser._actions}))
    return parser.parse_args_into_dataclasses(args=argv)


def read_recipe(path: Path, known: set[str]) -> dict[str, Any]:
    """A recipe file's arguments (YAML, or JSON for a .json file), checked against the program's argument names."""
    if not path.is_file():
        raise ValueError(f"Recipe {str(path)!r} does not exist; the shipped recipes are {sorted(p.name for p in RECIPES.glob('*.yaml'))} in {RECIPES}.")
    values = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"Recipe {str(path)!r} must hold a mapping of argument names to values, got {type(values).__name__}.")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Recipe {str(path)!r} sets unknown arguments {unknown}; see `python scripts/finetune.py --help`.")
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args = parse_arguments(argv)
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
    raw, data_args = load_training_data(data_args, training_args.seed, task_kinds)
    actions = validate_dataset(raw, data_args)
    default_name = BUILTIN_DATASET if data_args.dataset_name is None else Path(data_args.dataset_name).name
    train_raw, eval_raw = split_dataset(raw, data_args, training_args.seed)
    if len(train_raw) == 0:
        raise ValueError(
            f"--eval_split_ratio {data_args.eval_split_ratio} holds out all {len(raw)} rows; lower it (or 0 to train "
            "on everything)."
        )
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
    rows = mixture_rows(train_names, data_args.dataset_weights, training_args.seed)
    train_labels = action_labels(train_raw, data_args, chunk_size)[rows]
    eval_dataset = eval_names = None
    with training_args.main_process_first(desc="decoding and resizing the images once"):  # one process writes the cache
        train_dataset = ProcessedDemonstrations(train_raw.select(rows), train_labels, [train_names[i] for i in rows], processor, data_args, augment_seed)
        if eval_raw is not None and len(eval_raw):
            eval_names = dataset_names(eval_raw, data_args, default_name)
            eval_dataset = ProcessedDemonstrations(eval_raw, action_labels(eval_raw, data_args, chunk_size), eval_names, processor, data_args)
    if eval_dataset is None:
        training_args.eval_strategy = "no"

    pretraining_error = run_vision_pretraining(model, processor, train_dataset, pretraining_steps, training_args) if pretraining_steps else None
    model = apply_training_mode(model, model_args)
    cache_frozen_vision_features(model, [train_dataset, eval_dataset], training_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("Trainable parameters: %s of %s (%.2f%%).", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    trainer = AtomicCheckpointTrainer(
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
    resume = resume_checkpoint(training_args.resume_from_checkpoint, Path(training_args.output_dir))
    train_result = trainer.train(resume_from_checkpoint=resume)
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
        open_loop = None
        if eval_dataset is not None and data_args.episode_column in eval_raw.column_names:
            columns = {name: getattr(data_args, name) for name in ("image_column", "instruction_column", "action_column", "episode_column")}
            figures, open_loop = replay_for_model_card(merged, processor, train_raw, eval_raw, eval_names[0], output_dir / "open_loop",
                                                       data_args.dataset_name_column, **columns)
            metrics.update(figures)
        plot_curves(trainer.state.log_history, output_dir / "training_curves.png")
        (output_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2))
        write_model_card(
            output_dir, merged.config, metrics=metrics, base_model=model_args.model_name_or_path,
            datasets=data_args.dataset_name.split(",") if data_args.dataset_name else [], training=_training_summary(model_args, data_args, training_args),
            repo_id=hub_model_id if push_to_hub else None, open_loop=open_loop,
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


# Where checkpoints and the final folder are written before they are renamed into place; no `checkpoint-N` pattern,
# so neither the Trainer nor `resume_checkpoint` takes it for a checkpoint.
STAGING_FOLDER = ".saving"
# A checkpoint holds one of these weight files, and `trainer_state.json`, which the Trainer writes last.
CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def save_outputs(model, processor: OpenVLAProcessor, output_dir: Path, model_args: ModelArguments) -> OpenVLAForActionPrediction:
    """Write the adapter (LoRA runs) with the action statistics it needs (`ADAPTER_NORM_STATS_NAME`, which
    `load_adapter` reads) to `output_dir/adapter`, then the merged model, processor and remote code: all of it first
    to `output_dir/.saving`, then moved in by `publish_folder`."""
    staging = output_dir / STAGING_FOLDER
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    if model_args.use_lora:
        model.save_pretrained(staging / "adapter")
        norm_stats = model.get_base_model().config.norm_stats
        (staging / "adapter" / ADAPTER_NORM_STATS_NAME).write_text(json.dumps(norm_stats, indent=2))
        model = model.merge_and_unload()
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    publish_folder(staging, output_dir)
    return model.eval()


def publish_folder(staging: Path, output_dir: Path) -> None:
    """Move a fully written model folder from `staging` into `output_dir`, replacing the model there.

    The previous model's `config.json` and weights go first and the new `config.json` comes last (each move a
    rename), so a run killed in between leaves a folder without `config.json`, which nothing loads as a model, and
    never one that looks complete but mixes two models. Other files in `output_dir` (`checkpoints/`, ...) stay.
    """
    (output_dir / "config.json").unlink(missing_ok=True)
    for weights in [*output_dir.glob("*.safetensors"), *output_dir.glob("*.safetensors.index.json")]:
        weights.unlink()
    for entry in sorted(staging.iterdir(), key=lambda path: path.name == "config.json"):
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    staging.rmdir()


class AtomicCheckpointTrainer(Trainer):
    """A `Trainer` whose `checkpoint-N` folders appear only when complete.

    The Trainer writes a checkpoint straight into `checkpoint-N`, so a run killed while saving leaves a folder that
    looks like a checkpoint but lacks files. Here each checkpoint is written to `<checkpoints>/.saving/checkpoint-N`
    by the Trainer's own code, then renamed to `<checkpoints>/checkpoint-N` once every process has written its part.
    """

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        staging = run_dir / STAGING_FOLDER
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(staging)  # the Trainer builds the checkpoint path from this
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            shutil.rmtree(run_dir / name, ignore_errors=True)
            (staging / name).rename(run_dir / name)
            staging.rmdir()
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (`None` when it is)."""
    if not folder.is_dir():
        return "no such folder"
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json"
    if not any((folder / name).is_file() for name in CHECKPOINT_WEIGHTS):
        return f"none of {list(CHECKPOINT_WEIGHTS)}"
    return None


def resume_checkpoint(value: str | None, checkpoints: Path) -> str | None:
    """`--resume_from_checkpoint` as the checkpoint folder to resume from, or `None` to start afresh.

    `True` is the newest complete `checkpoint-N` under `checkpoints`; newer incomplete ones (written by a run killed
    while saving) are skipped with a warning naming each. A folder given by path must be complete.
    """
    resume = _resume_argument(value)
    if resume is None:
        return None
    if resume is not True:
        problem = checkpoint_problem(Path(resume))
        if problem:
            raise ValueError(
                f"--resume_from_checkpoint {resume} is not a complete checkpoint ({problem}); pass another "
                "checkpoint-N folder, or True for the newest complete one."
            )
        return resume
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = [(int(match.group(1)), path) for path in checkpoints.glob("*") if path.is_dir() and (match := pattern.match(path.name))]
    for _, folder in sorted(found, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            logger.info("Resuming from %s.", folder)
            return str(folder)
        logger.warning("Skipping the incomplete checkpoint %s (%s): its run stopped while writing it.", folder, problem)
    raise ValueError(
        f"--resume_from_checkpoint True found no complete checkpoint in {checkpoints}; start without it, or pass a "
        "checkpoint folder."
    )


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
        f"Trained {source} with `scripts/finetune.py` ({mode}{', vision backbone frozen' if model_args.freeze_vision_backbone else ''}"
        f"{f', loss weights {model_args.action_loss_weights} per action dimension' if model_args.action_loss_weights else ''}) "
        f"on {data} for {training_args.max_steps} steps, batch {training_args.per_device_train_batch_size} per process x "
        f"{training_args.world_size} process(es), learning rate {training_args.learning_rate} ({SchedulerType(training_args.lr_scheduler_type).value}), "
        f"seed {training_args.seed}{', with image augmentation' if data_args.image_augmentation else ''}.{pretraining}"
    )


if __name__ == "__main__":
    main()
