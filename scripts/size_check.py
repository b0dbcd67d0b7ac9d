"""Will the full-size model fit my GPU, and how fast does it run? Memory and speed of OpenVLA-7B's architecture.

    python scripts/size_check.py --device cuda                      # the published openvla-7b shapes, bfloat16
    python scripts/size_check.py --device cuda --json outputs/size_check.json
    python scripts/size_check.py --device cpu --config small --quick # a smoke run of this program on any machine

The model has random weights made on the device (nothing is downloaded; speed and memory do not depend on the
weights): `OpenVLAConfig.openvla_7b()` (fused DINOv2 ViT-L + SigLIP so400m at 224 px, Llama-2 7B) or the small
reference config. One run measures, for the model's autoregressive decoding and for parallel decoding with chunk
`--chunk_size` (same weights, action queries added):

    inference   `predict_action` at each of `--batch_sizes`: median latency, actions/s, peak memory
    lora        one LoRA training step (rank `--lora_rank` on all linear layers, AdamW, gradient checkpointing) at
                `--train_batch_size`: seconds per step and peak memory, as `scripts/finetune.py --use_lora` trains

Peak memory is `torch.cuda.max_memory_allocated()` over the calls (weights included), in GB.
"""

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from benchmark import DTYPES, PeakMemory, make_inputs, synchronize, time_calls

from configuration_openvla import OpenVLAConfig
from modeling_openvla import OpenVLAForActionPrediction


def build_model(args: argparse.Namespace, **overrides) -> OpenVLAForActionPrediction:
    config = OpenVLAConfig.openvla_7b(**overrides) if args.config == "openvla_7b" else OpenVLAConfig.small_config(**overrides)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = OpenVLAForActionPrediction._from_config(config, dtype=DTYPES[args.dtype])
    return model.eval()


def measure(fn: Callable[[], Any], args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds per call of `fn` after one warm-up call (`benchmark.time_calls`), and the calls' peak memory in
    GB with what was resident before them (weights, inputs, optimizer state) included: CUDA only, NaN elsewhere."""
    fn()
    synchronize(args.device)
    resident = torch.cuda.memory_allocated() if args.device.startswith("cuda") else float("nan")
    seconds, extra_mb = time_calls(fn, args.repeats, args.device, PeakMemory(args.device))
    return seconds, (resident + extra_mb * 2**20) / 2**30


def inference_rows(model: OpenVLAForActionPrediction, decoding: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    chunk = model.config.action_chunk_size if decoding == "parallel" else 1
    for batch_size in args.batch_sizes:
        inputs = make_inputs(model.config, batch_size, args)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        seconds, peak_gb = measure(partial(model.predict_action, **inputs), args)
        actions = batch_size * chunk
        rows.append({"mode": "inference", "decoding": decoding, "batch_size": batch_size, "chunk_size": chunk,
                     "latency_ms": seconds * 1e3, "actions_per_s": actions / seconds, "peak_mem_gb": peak_gb})
    return rows


def lora_row(model: OpenVLAForActionPrediction, decoding: str, args: argparse.Namespace) -> dict:
    from peft import LoraConfig, get_peft_model

    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    lora = get_peft_model(model.train(), LoraConfig(r=args.lora_rank, lora_alpha=min(args.lora_rank, 16), target_modules="all-linear"))
    config = model.config
    inputs = make_inputs(config, args.train_batch_size, args)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    chunk = config.action_chunk_size if decoding == "parallel" else 1
    bins = torch.randint(0, config.num_action_bins, (args.train_batch_size, chunk * config.action_dim), device=args.device)
    action_tokens = config.action_token_end - config.num_action_bins + bins
    inputs["input_ids"] = torch.cat([inputs["input_ids"], action_tokens], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -action_tokens.shape[1] :] = action_tokens
    trainable = [parameter for parameter in lora.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-4)

    def step() -> None:
        lora(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak_gb = measure(step, args)
    row = {"mode": "lora", "decoding": decoding, "batch_size": args.train_batch_size, "chunk_size": chunk,
           "step_s": seconds, "samples_per_s": args.train_batch_size / seconds, "peak_mem_gb": peak_gb,
           "trainable_params": sum(p.numel() for p in trainable)}
    lora.unload()
    return row


def format_table(rows: list[dict]) -> str:
    lines = ["| mode | decoding | batch | chunk | latency / step | actions/s or samples/s | peak memory (GB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        timing = f"{row['latency_ms']:.1f} ms" if row["mode"] == "inference" else f"{row['step_s']:.3f} s"
        rate = row.get("actions_per_s", row.get("samples_per_s"))
        lines.append(f"| {row['mode']} | {row['decoding']} | {row['batch_size']} | {row['chunk_size']} | {timing} | "
                     f"{rate:.1f} | {row['peak_mem_gb']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="openvla_7b", choices=["openvla_7b", "small"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--batch_sizes", type=lambda text: [int(v) for v in text.split(",")], default=[1, 8, 32])
    parser.add_argument("--train_batch_size", type=int, default=16, help="the official LoRA fine-tuning batch per GPU")
    parser.add_argument("--lora_rank", type=int, default=32)
    parser.add_argument("--chunk_size", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 2, 2 repeats, train batch 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.repeats, args.train_batch_size = [1, 2], 2, 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} but PyTorch sees no CUDA GPU; use --device cpu (with --config small).")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for decoding in ("autoregressive", "parallel"):
        chunk = args.chunk_size if decoding == "parallel" else 1
        model = build_model(args, action_decoding=decoding, action_chunk_size=chunk)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{args.config} ({decoding}): {parameters / 1e9:.3f} B parameters in {args.dtype} on {args.device}")
        rows += inference_rows(model, decoding, args)
        rows.append(lora_row(model, decoding, args))
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "device": args.device, "dtype": args.dtype, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
