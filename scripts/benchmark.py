"""Inference benchmark: the official OpenVLA decoding path against batched autoregressive and parallel decoding.

    python scripts/benchmark.py --quick --json outputs/benchmark_quick.json     # small config, < 2 min on 2 CPU cores
    python scripts/benchmark.py --json outputs/benchmark.json                   # small + mid configs
    python scripts/benchmark.py --config path/to/saved_model --device cuda --dtype bfloat16 --profile

For each config (`small` = `OpenVLAConfig.small_config()`, `mid` = ViT-S/14 (vision_dim 384) at 224 px with an
8-layer, 1024-wide Llama decoder (16 heads, 4 KV heads), or the folder of a saved model) one run measures:

    baseline        the official OpenVLA path: `generate()` greedily with a KV cache, batch 1, unrestricted vocabulary,
                    then the last `action_dim` tokens decoded to actions (no `inference_mode`, as the official code)
    autoregressive  `model.predict_action` (generate with a KV cache, logits restricted to the action tokens) at batch
                    1 / 4 / 16 (`--batch_sizes`)
    parallel        `model.predict_action` of the same config with `action_decoding="parallel"`, chunk 1 and chunk
                    `--chunk_size` (all action tokens of a chunk in one forward pass), batch 1
    forward         one plain forward pass (`model(**inputs)`, all logits) at batch 16, the hardware-efficiency row

Models have random weights (timing does not depend on them); inputs are synthetic: `[BOS | image placeholders |
--prompt_len prompt tokens]` and random pixels. For a saved model the other decoding modes are loaded from the same
weights with `action_decoding` / `action_chunk_size` overridden (missing action queries are freshly initialised).

Each row reports (JSON layout below):
    latency_ms      median wall time of one call, after one warm-up call (plus one for compilation with --compile)
    actions_per_s   actions per call / latency; a call yields batch_size * chunk_size actions (0 for `forward`)
    speedup         actions_per_s over the baseline's of the same config (0 for `forward`)
    peak_mem_mb     memory a call needs above what was resident before it (weights and inputs excluded).
                    CUDA: `torch.cuda.max_memory_allocated()` - `memory_allocated()` before the timed calls.
                    CPU: peak resident set size during the timed calls (`VmHWM` of /proc/self/status, reset through
                    /proc/self/clear_refs) - resident set size before them (after `gc` and glibc `malloc_trim`).
                    Without /proc/self/clear_refs: `resource.getrusage().ru_maxrss` (a lifetime peak) - RSS before.
    flops_per_call  model FLOPs of one call counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls,
                    convolutions and attention; 2 FLOPs per multiply-add; CPU SDPA kernels included)
    peak_fraction   flops_per_call / latency / matmul peak

`matmul_peak_gflops` is measured in the same run: the best rate of a 2048 x 2048 matmul in `--dtype` on the device.

JSON (`--json FILE`):
    {"device": ..., "matmul_peak_gflops": ..., "rows": [{"config", "mode", "batch_size", "chunk_size", "latency_ms",
     "actions_per_s", "speedup", "peak_mem_mb", "flops_per_call", "peak_fraction"}, ...]}

Training (`--train`, instead of the inference rows): for the small config, the Meta-World recipe's model
(configs/recipes/metaworld.yaml's `config_overrides`, `action_decoding`, `action_chunk_size`) and the mid config,
each with full fine-tuning and LoRA (`scripts/finetune.py`'s defaults: rank 32, all linear layers, the projector
trained fully), built from scratch by `scripts/finetune.py`'s own functions and trained on the built-in tabletop
demonstrations (`--train_episodes`, read through its LeRobot path and its `ProcessedDemonstrations`):

    model           forward + backward + optimizer step of its `Trainer` (fused AdamW) on one batch already in memory
    data            its `Trainer`'s dataloader alone (dataset rows -> images -> processor -> collator), batch after batch
    loop            its `Trainer.train()` steps (data, step, callbacks), timed after two warm-up steps

and the same with the vision backbone frozen (`--freeze_vision_backbone`): `vision: frozen` are the model and loop
rows on pixels (the fixed backbone runs at every step), `vision: frozen-cached` the model, data and loop rows with its
features computed once per image (`finetune.cache_frozen_vision_features`, as `scripts/finetune.py` does).

    python scripts/benchmark.py --train --json outputs/benchmark_train.json            # small, metaworld, mid
    python scripts/benchmark.py --train --config metaworld --dtype bfloat16             # the Trainer's --bf16 autocast

Training rows: {"config", "mode": "train", "variant": "model"|"data"|"loop", "tuning": "full"|"lora",
"vision": "trained"|"frozen"|"frozen-cached", "dtype", "batch_size", "latency_ms" (one step, or one batch for data),
"samples_per_s", "peak_mem_mb", "flops_per_call" (one step: forward and backward; 0 for data), "peak_fraction"}. With `--dtype bfloat16` the weights stay float32 and the
steps run under the Trainer's bfloat16 autocast (`--bf16`); the matmul peak is then bfloat16's. `--compile` sets the
Trainer's `torch_compile` (the loop rows compile; the model rows stay eager).

`--compile` uses a static KV cache and `torch.compile` for the autoregressive rows (generate's own compiled decoding
step) and compiles the forward pass of the parallel rows; the baseline stays the uncompiled official path. FLOPs are
counted on an eager call. `--profile` prints the top `torch.profiler` ops of the baseline, parallel and forward rows.
"""

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import finetune
import numpy as np
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from tqdm.auto import tqdm
from transformers import GenerationConfig, TrainerCallback
from transformers.generation import CompileConfig

from configuration_openvla import OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction
from processing_openvla import compute_action_stats

REPO = Path(__file__).resolve().parents[1]
METAWORLD_RECIPE = REPO / "configs" / "recipes" / "metaworld.yaml"
TRAIN_CONFIGS = ("small", "metaworld", "mid")

MID_OPTIONS = {
    "image_size": 224,
    "patch_size": 14,
    "vision_dim": 384,
    "hidden_dim": 1024,
    "num_layers": 8,
    "num_heads": 16,
    "num_kv_heads": 4,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    config: str
    mode: str
    batch_size: int
    chunk_size: int
    latency_ms: float
    actions_per_s: float
    speedup: float
    peak_mem_mb: float
    flops_per_call: float
    peak_fraction: float


# ----------------------------------------------------------------------------------------------------------- models


def build_model(name: str, decoding: str, chunk_size: int, args: argparse.Namespace) -> OpenVLAForActionPrediction:
    """A model of config `name` ("small", "mid" or a saved folder) in the given decoding mode, on the device."""
    overrides = {"action_decoding": decoding, "action_chunk_size": chunk_size}
    torch.manual_seed(args.seed)
    if name in ("small", "mid"):
        config = (
            OpenVLAConfig.small_config(**overrides) if name == "small" else OpenVLAConfig(**MID_OPTIONS, **overrides)
        )
        model = OpenVLAForActionPrediction._from_config(config, attn_implementation=args.attn_implementation)
    else:
        model = OpenVLAForActionPrediction.from_pretrained(
            name, attn_implementation=args.attn_implementation, **overrides
        )
    return model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()


def config_label(name: str) -> str:
    return name if name in ("small", "mid") else Path(name).resolve().name


def make_inputs(config: OpenVLAConfig, batch_size: int, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Synthetic processor output: `[BOS | image placeholders | prompt]` ids, all-ones mask, random pixels."""
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, config.action_token_end - config.num_action_bins, (batch_size, args.prompt_len), generator=generator)
    bos = torch.ones(batch_size, 1, dtype=torch.long)
    placeholders = torch.full((batch_size, config.num_patches), config.image_token_id, dtype=torch.long)
    input_ids = torch.cat([bos, placeholders, prompt], dim=1)
    pixel_values = torch.randn(
        batch_size, config.pixel_channels, config.image_size, config.image_size, generator=generator
    )
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}
    return {key: value.to(args.device) for key, value in inputs.items()}


def official_predict_action(model: OpenVLAForActionPrediction, inputs: dict[str, torch.Tensor]):
    """The official OpenVLA `predict_action`: greedy `generate()` of `action_dim` tokens with a KV cache over the whole
    vocabulary, then the last `action_dim` generated ids decoded on the CPU. Batch 1, no `inference_mode`."""
    action_dim = model.config.action_dim
    generation_config = GenerationConfig(
        max_new_tokens=action_dim,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=None,  # random weights must not stop early: exactly action_dim steps, as a trained model does
        pad_token_id=0,
    )
    generated = model.generate(**inputs, generation_config=generation_config)
    return model.action_tokenizer.decode(generated[:, -action_dim:].cpu().numpy())


# ------------------------------------------------------------------------------------------------------- measuring


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_matmul_peak(device: str, dtype: torch.dtype, size: int = 2048, trials: int = 8, reps: int = 5) -> float:
    """Best GFLOP/s of a `size` x `size` matmul on the device, in `dtype`."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    best = 0.0
    with torch.inference_mode():
        for _ in range(3):
            torch.mm(a, b)
        for _ in range(trials):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            synchronize(device)
            best = max(best, 2 * size**3 * reps / (time.perf_counter() - start))
    return best / 1e9


def _with_query_heads(shape: torch.Size, query_shape: torch.Size) -> tuple[int, ...]:
    """A key/value shape `[batch, kv_heads, length, dim]` with the query's heads: grouped-query attention costs what
    attention over the repeated key/value heads costs."""
    return (shape[0], query_shape[1], *shape[2:])


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, _with_query_heads(key_shape, query_shape), _with_query_heads(value_shape, query_shape))


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(
        grad_out_shape, query_shape, _with_query_heads(key_shape, query_shape), _with_query_heads(value_shape, query_shape)
    )


# FlopCounterMode does not know the CPU SDPA kernel, and before torch 2.12 its formulas for the CUDA kernels reject
# grouped-query attention (fewer key/value heads than query heads, as in the Llama decoder here).
FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_efficient_attention: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_cudnn_attention: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_backward: _sdpa_backward_flops,
    torch.ops.aten._scaled_dot_product_efficient_attention_backward: _sdpa_backward_flops,
    torch.ops.aten._scaled_dot_product_cudnn_attention_backward: _sdpa_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> float:
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        fn()
    return float(counter.get_total_flops())


class PeakMemory:
    """Peak memory of the calls made between `start()` and `stop()` above what was resident at `start()`, in MB."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.method = (
            "torch.cuda.max_memory_allocated - memory_allocated before"
            if self.cuda
            else "peak RSS (VmHWM reset via /proc/self/clear_refs) - RSS before"
        )
        if not self.cuda and not self._reset_hwm():
            self.method = "ru_maxrss (lifetime peak) - RSS before"
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        return int(match.group(1)) if match else None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)  # hand freed heap pages back, so that they are not counted as resident
        rss = self._status_kb("VmRSS")
        self._base = (rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        self._reset_hwm()

    def stop(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            hwm = self._status_kb("VmHWM") if self.method.startswith("peak RSS") else None
            peak = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return max(peak - self._base, 0) / 2**20


def time_calls(fn: Callable[[], Any], repeats: int, device: str, memory: PeakMemory) -> tuple[float, float]:
    """Median seconds per call over `repeats` calls and their peak memory increase (MB)."""
    times = []
    memory.start()
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), memory.stop()


def profile_top_ops(fn: Callable[[], Any], device: str, title: str, row_limit: int = 15) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total"
    with torch.profiler.profile(activities=activities) as profiler:
        fn()
        synchronize(device)
    tqdm.write(f"\n=== torch.profiler top ops: {title} ===")
    tqdm.write(profiler.key_averages().table(sort_by=sort_by, row_limit=row_limit))


# ------------------------------------------------------------------------------------------------------- the rows


def enable_compile(model: OpenVLAForActionPrediction, decoding: str) -> None:
    """Static KV cache + compiled decoding step for `generate()` (autoregressive), compiled forward (parallel)."""
    if decoding == "autoregressive":
        compile_config = CompileConfig(fullgraph=False, dynamic=False)
        compile_config._compile_all_devices = True  # generate() only auto-compiles on accelerators otherwise
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = compile_config
    else:
        model.forward = torch.compile(model.forward, dynamic=False)


def benchmark_config(name: str, args: argparse.Namespace, memory: PeakMemory) -> list[Row]:
    label = config_label(name)
    repeats = 2 if args.quick else args.repeats
    min_repeats = 1 if args.quick else 3
    jobs = [("baseline", "autoregressive", 1, 1)]
    jobs += [("autoregressive", "autoregressive", batch, 1) for batch in args.batch_sizes]
    jobs += [("forward", "autoregressive", args.forward_batch_size, 1)]
    jobs += [("parallel", "parallel", 1, 1), ("parallel", "parallel", 1, args.chunk_size)]
    rows: list[Row] = []
    model = model_key = None
    for mode, decoding, batch_size, chunk_size in tqdm(jobs, desc=f"{label}", unit="row", leave=False):
        if model_key != (decoding, chunk_size):
            model = None
            gc.collect()
            model = build_model(name, decoding, chunk_size, args)
            model_key = (decoding, chunk_size)
            compiled = False
        inputs = make_inputs(model.config, batch_size, args)
        if mode == "baseline":
            fn = partial(official_predict_action, model, inputs)
        elif mode == "forward":
            fn = partial(_inference, model, inputs)
        else:
            fn = partial(_inference, model.predict_action, inputs)

        start = time.perf_counter()
        fn()  # warm-up
        warm_up_seconds = time.perf_counter() - start
        flops = count_flops(fn)
        if args.compile and mode != "baseline" and mode != "forward" and not compiled:
            enable_compile(model, decoding)
            compiled = True
        if args.compile and mode != "baseline" and mode != "forward":
            fn()  # compiles for these shapes
            fn()
        budget_repeats = int(args.max_row_seconds / max(warm_up_seconds, 1e-6))
        latency, peak_mem = time_calls(fn, max(min_repeats, min(repeats, budget_repeats)), args.device, memory)
        if args.profile and mode in ("baseline", "parallel", "forward"):
            profile_top_ops(fn, args.device, f"{label} {mode} batch {batch_size} chunk {chunk_size}")

        actions = 0 if mode == "forward" else batch_size * chunk_size
        rows.append(
            Row(
                config=label,
                mode=mode,
                batch_size=batch_size,
                chunk_size=chunk_size,
                latency_ms=latency * 1e3,
                actions_per_s=actions / latency,
                speedup=0.0,
                peak_mem_mb=peak_mem,
                flops_per_call=flops,
                peak_fraction=0.0,  # set by main() once the matmul peak is final
            )
        )
    baseline = rows[0].actions_per_s
    for row in rows:
        row.speedup = row.actions_per_s / baseline if row.mode != "forward" else 0.0
    model = fn = None
    gc.collect()
    return rows


def _load_average() -> str:
    try:
        return "/".join(f"{value:.2f}" for value in os.getloadavg())  # 1, 5, 15 min: other processes skew timings
    except OSError:
        return "n/a"


def _inference(fn: Callable[..., Any], inputs: dict[str, torch.Tensor]):
    with torch.inference_mode():
        return fn(**inputs)


# ------------------------------------------------------------------------------------------------------ training


@dataclass
class TrainRow:
    config: str
    mode: str  # always "train"
    variant: str  # "model", "data" or "loop"
    tuning: str  # "full" or "lora"
    vision: str  # "trained", "frozen" (pixels through the fixed backbone) or "frozen-cached" (its cached features)
    dtype: str
    batch_size: int
    latency_ms: float  # one step (model, loop) or one batch (data)
    samples_per_s: float
    peak_mem_mb: float
    flops_per_call: float  # one training step (forward + backward); 0 for the data rows
    peak_fraction: float


def train_model_arguments(name: str) -> "finetune.ModelArguments":
    """`scripts/finetune.py`'s model arguments for a model trained from scratch: the plain small config, the Meta-World
    recipe's model (`config_overrides`, `action_decoding`, `action_chunk_size` of configs/recipes/metaworld.yaml) or
    the mid config."""
    if name == "small":
        return finetune.ModelArguments(from_scratch=True)
    if name == "mid":
        return finetune.ModelArguments(from_scratch=True, config_overrides=",".join(f"{k}={v}" for k, v in MID_OPTIONS.items()))
    if name == "metaworld":
        recipe = yaml.safe_load(METAWORLD_RECIPE.read_text())
        options = {key: recipe[key] for key in ("config_overrides", "action_decoding", "action_chunk_size") if key in recipe}
        return finetune.ModelArguments(from_scratch=True, **options)
    raise ValueError(f"--train config {name!r} is not one of {TRAIN_CONFIGS}.")


def training_data(args: argparse.Namespace) -> tuple[datasets.Dataset, "finetune.DataArguments", np.ndarray]:
    """The built-in tabletop demonstrations as `scripts/finetune.py` reads them (LeRobot folder in the `datasets`
    cache), checked by its `validate_dataset`: rows, data arguments and actions."""
    data_args = finetune.DataArguments(num_demo_episodes=args.train_episodes, image_augmentation=args.train_augmentation)
    raw, data_args = finetune.load_training_data(data_args, args.seed)
    return raw, data_args, finetune.validate_dataset(raw, data_args)


def build_trainer(name: str, tuning: str, data, args: argparse.Namespace, max_steps: int, output_dir: Path,
                  vision: str = "trained"):
    """`scripts/finetune.py`'s own pieces: its model (from scratch, LoRA through `apply_training_mode`, the vision
    backbone frozen unless `vision="trained"`), its `ProcessedDemonstrations` with statistics from the rows (holding
    the backbone's features, cached by its `cache_frozen_vision_features`, for `vision="frozen-cached"`), and its
    `Trainer` subclass with its collator."""
    raw, data_args, actions = data
    model_args = train_model_arguments(name)
    model_args.use_lora = tuning == "lora"
    model_args.freeze_vision_backbone = vision != "trained"
    torch.manual_seed(args.seed)
    model, processor = finetune.build_model_and_processor(model_args, actions.shape[1])
    names = finetune.dataset_names(raw, data_args, finetune.BUILTIN_DATASET)
    model.config.norm_stats = {finetune.BUILTIN_DATASET: compute_action_stats(actions)}
    processor.norm_stats = dict(model.config.norm_stats)
    labels = finetune.action_labels(raw, data_args, model.config.action_chunk_size)
    dataset = finetune.ProcessedDemonstrations(
        raw, labels, names, processor, data_args, args.seed if data_args.image_augmentation else None
    )
    model = finetune.apply_training_mode(model, model_args)
    training_args = finetune.FinetuneTrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=args.train_batch_size,
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True, seed=args.seed,
        bf16=args.dtype == "bfloat16", use_cpu=not args.device.startswith("cuda"), dataloader_num_workers=args.num_workers,
        torch_compile=args.compile,
    )
    if vision == "frozen-cached" and not finetune.cache_frozen_vision_features(model, [dataset], training_args):
        raise ValueError(f"{name} {tuning}: the vision features cannot be cached ({finetune.vision_cache_refusal(model, [dataset])}).")
    return finetune.AtomicCheckpointTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=processor.data_collator,
        callbacks=[finetune.EpochCallback(dataset)],
    )


def _training_step(trainer, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """One step as the `Trainer` takes it: its `compute_loss` under its `Accelerator`'s autocast (bfloat16 with
    `--dtype bfloat16`, which the Trainer's prepared model runs under), backward through the `Accelerator`, the
    optimizer's step."""
    trainer.model.train()
    with trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, batch)
    trainer.accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class StepClock(TrainerCallback):
    """Times the `Trainer`'s steps after the first `warm_up` of them."""

    def __init__(self, warm_up: int, device: str):
        self.warm_up = warm_up
        self.device = device
        self.start = self.end = None

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        if state.global_step == self.warm_up:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def epochs_of(loader: torch.utils.data.DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches, one epoch after another, without end."""
    while True:
        yield from loader


# The training rows of each tuning: the vision backbone trained (model, data, loop), then frozen, with its features
# computed at every step (model, loop) and cached once (model, data, loop).
TRAIN_JOBS = (("trained", ("model", "data", "loop")), ("frozen", ("model", "loop")), ("frozen-cached", ("model", "data", "loop")))


def benchmark_training(name: str, args: argparse.Namespace, memory: PeakMemory, data, workdir: Path) -> list[TrainRow]:
    """The model-step, data and loop rows of config `name` (`TRAIN_JOBS`), full fine-tuning and LoRA."""
    rows = []
    for tuning in tqdm(("full", "lora"), desc=f"train {name}", unit="tuning", leave=False):
        for vision, variants in TRAIN_JOBS:
            rows += _training_rows(name, tuning, vision, variants, args, memory, data, workdir)
    return rows


def _training_rows(name: str, tuning: str, vision: str, variants: tuple[str, ...], args: argparse.Namespace,
                   memory: PeakMemory, data, workdir: Path) -> list[TrainRow]:
    steps = 2 if args.quick else args.repeats
    batches = 4 if args.quick else 4 * args.repeats
    row = partial(TrainRow, config=name, mode="train", tuning=tuning, vision=vision, dtype=args.dtype,
                  batch_size=args.train_batch_size)
    rows = []

    # model step alone: forward + backward + optimizer step on one batch already in memory
    trainer = build_trainer(name, tuning, data, args, steps, workdir / f"{name}-{tuning}-{vision}", vision)
    loader = trainer.get_train_dataloader()
    batch = next(iter(loader))
    optimizer = trainer.create_optimizer()
    model_step = partial(_training_step, trainer, batch, optimizer)
    model_step()  # warm-up (creates the optimizer state)
    flops = count_flops(model_step)
    latency, peak_mem = time_calls(model_step, steps, args.device, memory)
    rows.append(row(variant="model", latency_ms=latency * 1e3, samples_per_s=args.train_batch_size / latency,
                    peak_mem_mb=peak_mem, flops_per_call=flops, peak_fraction=0.0))
    if args.profile:
        profile_top_ops(model_step, args.device, f"train {name} {tuning} vision {vision}: model step")

    # data pipeline alone: the Trainer's dataloader, batch after batch (epoch after epoch, as training goes on)
    if "data" in variants:
        iterator = epochs_of(loader)
        next(iterator)
        memory.start()
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        elapsed = (time.perf_counter() - start) / batches
        rows.append(row(variant="data", latency_ms=elapsed * 1e3, samples_per_s=args.train_batch_size / elapsed,
                        peak_mem_mb=memory.stop(), flops_per_call=0.0, peak_fraction=0.0))
    trainer = loader = iterator = batch = optimizer = None
    gc.collect()

    # the real loop: the Trainer's own steps, timed after two warm-up steps
    if "loop" in variants:
        warm_up = 2
        trainer = build_trainer(name, tuning, data, args, warm_up + steps, workdir / f"{name}-{tuning}-{vision}-loop", vision)
        clock = StepClock(warm_up, args.device)
        trainer.add_callback(clock)
        memory.start()
        trainer.train()
        peak_mem = memory.stop()
        latency = (clock.end - clock.start) / steps
        rows.append(row(variant="loop", latency_ms=latency * 1e3, samples_per_s=args.train_batch_size / latency,
                        peak_mem_mb=peak_mem, flops_per_call=flops, peak_fraction=0.0))
        trainer = None
        gc.collect()
    return rows


def format_train_table(rows: list[TrainRow]) -> str:
    header = f"{'config':<10} {'variant':<7} {'tuning':<6} {'vision':<13} {'dtype':<9} {'batch':>5} {'ms/step':>9} {'samples/s':>10} {'peak MB':>9} {'GFLOP/step':>11} {'% peak':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.config:<10} {row.variant:<7} {row.tuning:<6} {row.vision:<13} {row.dtype:<9} {row.batch_size:>5} {row.latency_ms:>9.1f} "
            f"{row.samples_per_s:>10.2f} {row.peak_mem_mb:>9.1f} {row.flops_per_call / 1e9:>11.2f} {100 * row.peak_fraction:>6.1f}%"
        )
    return "\n".join(lines)


def train_target_report(rows: list[TrainRow]) -> str:
    """The issue's training targets: the loop at >= 90% of the model step's rate (small config and Meta-World
    recipe), the mid config's float32 model step at >= 40% of the matmul peak; and, with the vision backbone frozen,
    the model step's speedup from cached features (a measurement, no target)."""
    by_key = {(row.config, row.variant, row.tuning, row.vision): row for row in rows}
    lines = []
    for (config, variant, tuning, vision), row in by_key.items():
        label = tuning if vision == "trained" else f"{tuning}, {vision}"
        checks = []
        if variant == "loop" and config in ("small", "metaworld"):
            ratio = row.samples_per_s / by_key[(config, "model", tuning, vision)].samples_per_s
            checks.append((f"{label}: loop >= 90% of the model step's samples/s", ratio, ratio >= 0.9))
        if variant == "model" and config == "mid" and tuning == "full" and vision == "trained" and row.dtype == "float32":
            checks.append(("full: model step >= 40% of matmul peak", row.peak_fraction, row.peak_fraction >= 0.4))
        for text, value, ok in checks:
            lines.append(f"{config:<10} {text:<62} {value:>8.2f}  {'met' if ok else 'MISSED'}")
        if variant in ("model", "loop") and vision == "frozen-cached":
            speedup = row.samples_per_s / by_key[(config, variant, tuning, "frozen")].samples_per_s
            lines.append(f"{config:<10} {f'{tuning}: frozen, cached / pixels {variant} samples/s':<62} {speedup:>8.2f}x")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- report


def format_table(rows: list[Row]) -> str:
    header = f"{'config':<10} {'mode':<15} {'batch':>5} {'chunk':>5} {'latency ms':>11} {'actions/s':>10} {'speedup':>8} {'peak MB':>9} {'GFLOP/call':>11} {'% peak':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.config:<10} {row.mode:<15} {row.batch_size:>5} {row.chunk_size:>5} {row.latency_ms:>11.1f} "
            f"{row.actions_per_s:>10.1f} {row.speedup:>7.2f}x {row.peak_mem_mb:>9.1f} {row.flops_per_call / 1e9:>11.2f} "
            f"{100 * row.peak_fraction:>6.1f}%"
        )
    return "\n".join(lines)


def target_report(rows: list[Row], chunk_size: int) -> str:
    """The issue's targets, per config."""
    lines = []
    for label in dict.fromkeys(row.config for row in rows):
        by_key = {(r.mode, r.batch_size, r.chunk_size): r for r in rows if r.config == label}
        baseline = by_key[("baseline", 1, 1)]
        checks = []
        if (chunk := by_key.get(("parallel", 1, chunk_size))) is not None:
            checks.append((f"parallel chunk {chunk_size} >= 10x baseline actions/s", chunk.speedup, chunk.speedup >= 10))
        if (batched := by_key.get(("autoregressive", 16, 1))) is not None:
            checks.append(("autoregressive batch 16 >= 3x baseline actions/s", batched.speedup, batched.speedup >= 3))
        if (parallel := by_key.get(("parallel", 1, 1))) is not None:
            ratio = parallel.latency_ms / baseline.latency_ms
            checks.append(("parallel latency <= 0.6x baseline latency", ratio, ratio <= 0.6))
        for row in rows:
            if row.config == label and row.mode == "forward":
                checks.append((f"forward batch {row.batch_size} >= 40% of matmul peak", row.peak_fraction, row.peak_fraction >= 0.4))
        for text, value, ok in checks:
            lines.append(f"{label:<10} {text:<55} {value:>8.2f}  {'met' if ok else 'MISSED'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=None, help="small, mid and/or saved model folders (default: small mid; small with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--compile", action="store_true", help="static KV cache + torch.compile for our autoregressive and parallel paths")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler top ops of the baseline, parallel and forward rows")
    parser.add_argument("--quick", action="store_true", help="small config, 2 repeats")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (at least 3 unless --quick)")
    parser.add_argument("--max_row_seconds", type=float, default=30.0, help="fewer repeats (not below the minimum) for slow rows")
    parser.add_argument("--batch_sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--forward_batch_size", type=int, default=16)
    parser.add_argument("--chunk_size", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=20, help="prompt tokens after the image (official prompts have ~20)")
    parser.add_argument("--seed", type=int, default=0)
    training = parser.add_argument_group("training (--train)")
    training.add_argument("--train", action="store_true", help="the training rows (model step, data pipeline, real loop) instead of the inference rows")
    training.add_argument("--train_batch_size", type=int, default=16, help="batch of every training row (the Meta-World recipe's: 16)")
    training.add_argument("--train_episodes", type=int, default=None, help="built-in tabletop episodes to train on (default 40; 8 with --quick)")
    training.add_argument("--train_augmentation", action="store_true", help="image augmentation in the data path (off in the recipes)")
    training.add_argument("--num_workers", type=int, default=0, help="dataloader worker processes of the training rows")
    args = parser.parse_args(argv)
    if args.train:
        args.config = args.config or (["small"] if args.quick else list(TRAIN_CONFIGS))
        unknown = [name for name in args.config if name not in TRAIN_CONFIGS]
        if unknown:
            parser.error(f"--train --config {unknown}: the training rows build {list(TRAIN_CONFIGS)} from scratch.")
        args.train_episodes = args.train_episodes or (8 if args.quick else 40)
    if args.config is None:
        args.config = ["small"] if args.quick else ["small", "mid"]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here.")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    peak_gflops = measure_matmul_peak(args.device, DTYPES[args.dtype])
    memory = PeakMemory(args.device)
    tqdm.write(
        f"device {args.device} ({torch.get_num_threads()} threads), dtype {args.dtype}, attention {args.attn_implementation}"
        f"{', compiled' if args.compile else ''}; matmul peak {peak_gflops:.1f} GFLOP/s (2048 x 2048 {args.dtype}); "
        f"memory: {memory.method}; load average {_load_average()}"
    )
    rows = []
    if args.train:
        data = training_data(args)
        with tempfile.TemporaryDirectory() as workdir:
            for name in args.config:
                rows += benchmark_training(name, args, memory, data, Path(workdir))
    for name in [] if args.train else args.config:
        try:
            rows += benchmark_config(name, args, memory)
        except ImportError as error:  # e.g. flash_attention_2 without the flash-attn package
            raise SystemExit(f"--attn_implementation {args.attn_implementation}: {error}") from error
    # Measured again at the end: the best of both is the peak (a busy moment only ever lowers a measurement).
    peak_gflops = max(peak_gflops, measure_matmul_peak(args.device, DTYPES[args.dtype]))
    for row in rows:
        row.peak_fraction = row.flops_per_call / (row.latency_ms / 1e3) / (peak_gflops * 1e9)
    print(f"matmul peak {peak_gflops:.1f} GFLOP/s (best of the start and the end of the run); load average {_load_average()}")
    result = {"device": args.device, "matmul_peak_gflops": peak_gflops, "rows": [asdict(row) for row in rows]}
    print(format_train_table(rows) if args.train else format_table(rows))
    print("\nTargets:")
    print(train_target_report(rows) if args.train else target_report(rows, args.chunk_size))
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
