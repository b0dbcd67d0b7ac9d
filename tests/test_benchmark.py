"""scripts/benchmark.py: the --quick run's JSON layout and the measuring helpers (no timing thresholds)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"
ROW_TYPES = {
    "config": str,
    "mode": str,
    "batch_size": int,
    "chunk_size": int,
    "latency_ms": float,
    "actions_per_s": float,
    "speedup": float,
    "peak_mem_mb": float,
    "flops_per_call": float,
    "peak_fraction": float,
}


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("openvla_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_the_json_layout(tmp_path):
    path = tmp_path / "nested" / "benchmark.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(path.read_text())

    assert set(result) == {"device", "matmul_peak_gflops", "rows"}
    assert result["device"] == "cpu"
    assert isinstance(result["matmul_peak_gflops"], float) and result["matmul_peak_gflops"] > 0
    rows = result["rows"]
    for row in rows:
        assert set(row) == set(ROW_TYPES), row
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind) and not isinstance(row[key], bool), (key, row[key])
            if kind is float:
                assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
        assert row["config"] == "small"
        assert row["latency_ms"] > 0 and row["flops_per_call"] > 0 and row["peak_fraction"] > 0

    kinds = {(row["mode"], row["batch_size"], row["chunk_size"]) for row in rows}
    assert kinds == {
        ("baseline", 1, 1),
        ("autoregressive", 1, 1),
        ("autoregressive", 4, 1),
        ("autoregressive", 16, 1),
        ("parallel", 1, 1),
        ("parallel", 1, 8),
        ("forward", 16, 1),
    }
    for row in rows:
        if row["mode"] == "baseline":
            assert row["speedup"] == pytest.approx(1.0)
        if row["mode"] == "forward":
            assert row["actions_per_s"] == 0 and row["speedup"] == 0
        else:
            expected = row["batch_size"] * row["chunk_size"] / (row["latency_ms"] / 1e3)
            assert row["actions_per_s"] == pytest.approx(expected, rel=1e-6)
    assert "Targets:" in completed.stdout


def test_flop_counter_counts_matmuls_and_cpu_attention(benchmark):
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert benchmark.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    batch, heads, seq, dim = 2, 4, 10, 8
    q, k, v = (torch.randn(batch, heads, seq, dim) for _ in range(3))
    # QK^T and PV: 2 * (2 * seq * seq * dim) per head, however SDPA dispatches on this device.
    assert benchmark.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * batch * heads * seq * seq * dim


def test_peak_memory_sees_a_large_temporary(benchmark):
    memory = benchmark.PeakMemory("cpu")
    memory.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    del block
    assert memory.stop() >= 48


def test_matmul_peak_is_positive(benchmark):
    assert benchmark.measure_matmul_peak("cpu", torch.float32, size=256, trials=1, reps=1) > 0


def test_bad_options(benchmark):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--dtype", "float64"])
    args = benchmark.parse_args(["--quick"])
    assert args.config == ["small"]
    assert benchmark.parse_args([]).config == ["small", "mid"]


TRAIN_ROW_TYPES = {
    "config": str,
    "mode": str,
    "variant": str,
    "tuning": str,
    "vision": str,
    "dtype": str,
    "batch_size": int,
    "latency_ms": float,
    "samples_per_s": float,
    "peak_mem_mb": float,
    "flops_per_call": float,
    "peak_fraction": float,
}


def test_quick_train_run_measures_model_data_and_loop(benchmark, tmp_path, capsys):
    path = tmp_path / "train.json"
    result = benchmark.main(["--train", "--quick", "--train_batch_size", "2", "--train_episodes", "4", "--json", str(path)])

    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert set(result) == {"device", "matmul_peak_gflops", "rows"} and result["matmul_peak_gflops"] > 0
    rows = result["rows"]
    jobs = [("model", "trained"), ("data", "trained"), ("loop", "trained"), ("model", "frozen"), ("loop", "frozen"),
            ("model", "frozen-cached"), ("data", "frozen-cached"), ("loop", "frozen-cached")]
    assert [(row["variant"], row["tuning"], row["vision"]) for row in rows] == [
        (variant, tuning, vision) for tuning in ("full", "lora") for variant, vision in jobs
    ]
    for row in rows:
        assert set(row) == set(TRAIN_ROW_TYPES), row
        for key, kind in TRAIN_ROW_TYPES.items():
            assert isinstance(row[key], kind) and not isinstance(row[key], bool), (key, row[key])
        assert row["config"] == "small" and row["mode"] == "train" and row["dtype"] == "float32" and row["batch_size"] == 2
        assert row["latency_ms"] > 0 and row["peak_mem_mb"] >= 0
        assert row["samples_per_s"] == pytest.approx(2 / (row["latency_ms"] / 1e3), rel=1e-6)
        if row["variant"] == "data":
            assert row["flops_per_call"] == 0 and row["peak_fraction"] == 0
        else:
            assert row["flops_per_call"] > 0 and 0 < row["peak_fraction"]
    by_key = {(row["variant"], row["tuning"], row["vision"]): row for row in rows}
    # LoRA trains fewer weights: its backward skips the frozen weights' gradients.
    assert by_key[("model", "lora", "trained")]["flops_per_call"] < by_key[("model", "full", "trained")]["flops_per_call"]
    assert by_key[("loop", "full", "trained")]["flops_per_call"] == by_key[("model", "full", "trained")]["flops_per_call"]
    for tuning in ("full", "lora"):
        # A frozen backbone skips its backward; cached features skip its forward too.
        flops = [by_key[("model", tuning, vision)]["flops_per_call"] for vision in ("trained", "frozen", "frozen-cached")]
        assert flops == sorted(flops, reverse=True) and len(set(flops)) == 3, flops
    output = capsys.readouterr().out
    assert "Targets:" in output and "loop >= 90% of the model step" in output
    assert "full: frozen, cached / pixels model samples/s" in output and "lora: frozen, cached / pixels loop samples/s" in output


def test_train_configs_follow_the_recipes(benchmark):
    metaworld = benchmark.train_model_arguments("metaworld")
    recipe = benchmark.yaml.safe_load(benchmark.METAWORLD_RECIPE.read_text())
    assert (metaworld.config_overrides, metaworld.action_decoding, metaworld.action_chunk_size) == (
        recipe["config_overrides"], recipe["action_decoding"], recipe["action_chunk_size"]
    )
    assert "hidden_dim=1024" in benchmark.train_model_arguments("mid").config_overrides
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--train", "--config", "path/to/model"])
    assert benchmark.parse_args(["--train"]).config == ["small", "metaworld", "mid"]


def test_size_check_measures_inference_and_a_lora_step_of_both_decodings(tmp_path):
    """scripts/size_check.py (run on a GPU with the openvla-7b shapes; docs/gpu.md) on the small config on the CPU:
    every row present, with positive figures, and the JSON written."""
    path = tmp_path / "size_check.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "size_check.py"), "--device", "cpu", "--config", "small", "--dtype", "float32",
         "--quick", "--json", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads(path.read_text())["rows"]
    assert [(row["mode"], row["decoding"], row["batch_size"]) for row in rows] == [
        ("inference", "autoregressive", 1), ("inference", "autoregressive", 2), ("lora", "autoregressive", 2),
        ("inference", "parallel", 1), ("inference", "parallel", 2), ("lora", "parallel", 2),
    ]
    assert all(row["chunk_size"] == (8 if row["decoding"] == "parallel" else 1) for row in rows)
    assert all(row.get("latency_ms", row.get("step_s", 0)) > 0 for row in rows)
    assert all(0 < row["trainable_params"] < 26_000_000 for row in rows if row["mode"] == "lora")


def test_size_check_refuses_cuda_without_a_gpu(monkeypatch):
    spec = importlib.util.spec_from_file_location("size_check", REPO / "scripts" / "size_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda but PyTorch sees no CUDA GPU"):
        module.parse_args(["--device", "cuda"])
