"""Serving benchmark: `scripts/serve.py` under 1, 4 and 16 concurrent clients, with dynamic batching on and off.

    python scripts/benchmark_serve.py --json outputs/benchmark_serve.json   # small config, minutes on 2 cores
    python scripts/benchmark_serve.py --quick                               # 1 and 4 clients, few requests
    python scripts/benchmark_serve.py --model outputs/my_model --device cuda --clients 1 8 32 64

For each `--max_batch_sizes` value (default 16, i.e. batching on, and 1, batching off) one server process is started
on 127.0.0.1 (a free port) with the model: a saved folder (`--model`) or, by default, `OpenVLAConfig.small_config()`
with random weights (timing does not depend on them) saved to a temporary folder. Then for each `--clients` count,
that many client threads each hold one connection (`--protocol openpi`: websocket + msgpack; `rest`: `POST /act`),
send one warm-up request, wait for the others, and send `--requests_per_client` requests back to back, each a
random uint8 `--image_size` x `--image_size` camera frame of its own. Only 127.0.0.1 is loaded, and every run is
bounded by its request count and by `--timeout_s`.

Each row reports:
    requests_per_s      answered requests / wall time from the start signal to the last answer
    actions_per_s       requests_per_s * actions per answer (the model's `action_chunk_size`)
    latency_ms_p50/95/99  client-side time from sending a request to its answer
    mean_batch_size     mean size of the batch each request was answered in (the server's `server_timing`)
    infer_ms_p99        99th percentile of the model time of those batches (openpi protocol only; 0 for rest)

JSON (`--json FILE`): {"device", "model", "protocol", "max_wait_ms", "image_size", "num_threads", "rows":
[{"max_batch_size", "clients", "requests", "requests_per_s", "actions_per_s", "latency_ms_p50", "latency_ms_p95",
"latency_ms_p99", "mean_batch_size", "infer_ms_p99"}, ...]}
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import requests

from openvla_tools.remote_policy import OpenPIConnection, RestConnection

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LoadRow:
    max_batch_size: int
    clients: int
    requests: int
    requests_per_s: float
    actions_per_s: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    mean_batch_size: float
    infer_ms_p99: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Saved model folder or Hub id (default: the small config, random weights).")
    parser.add_argument("--unnorm_key")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max_batch_sizes", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--requests_per_client", type=int, default=32)
    parser.add_argument("--protocol", choices=["openpi", "rest"], default="openpi")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num_threads", type=int, help="The server's CPU threads for inference (serve.py's option).")
    parser.add_argument("--timeout_s", type=float, default=600.0, help="Longest time for one load run.")
    parser.add_argument("--quick", action="store_true", help="1 and 4 clients, 8 requests each (for CI).")
    parser.add_argument("--json", type=Path, help="Write the rows here.")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.requests_per_client = [1, 4], 8
    for name in ("clients", "max_batch_sizes"):
        if min(getattr(args, name)) < 1:
            raise SystemExit(f"--{name} {getattr(args, name)}: every value must be at least 1.")
    if args.requests_per_client < 1:
        raise SystemExit(f"--requests_per_client {args.requests_per_client} must be at least 1.")
    return args


def save_small_model(folder: Path) -> None:
    """`OpenVLAConfig.small_config()` with random weights and its processor (the shipped tokenizer), saved."""
    import torch
    from transformers import AutoTokenizer

    from configuration_openvla import OpenVLAConfig
    from modeling_openvla import OpenVLAForActionPrediction
    from processing_openvla import OpenVLAImageProcessor, OpenVLAProcessor

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "assets" / "tokenizer")
    config = OpenVLAConfig.small_config(vocab_size=len(tokenizer))
    OpenVLAForActionPrediction(config).eval().save_pretrained(folder)
    processor = OpenVLAProcessor(
        image_processor=OpenVLAImageProcessor(image_size=config.image_size), tokenizer=tokenizer
    )
    processor.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`scripts/serve.py` in a subprocess on 127.0.0.1, ready once `/healthz` answers; stopped with SIGTERM."""

    def __init__(self, model: str, max_batch_size: int, args: argparse.Namespace):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            str(REPO / "scripts" / "serve.py"),
            "--model",
            model,
            "--port",
            str(self.port),
            "--max_batch_size",
            str(max_batch_size),
            "--max_wait_ms",
            str(args.max_wait_ms),
            "--device",
            args.device,
            "--log_level",
            "warning",
        ]
        for option in ("unnorm_key", "dtype", "num_threads"):
            if getattr(args, option) is not None:
                command += [f"--{option}", str(getattr(args, option))]
        self.process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self._wait_until_ready(timeout_s=300)

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"scripts/serve.py exited with code {self.process.returncode} before serving.")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"scripts/serve.py did not answer /healthz within {timeout_s:.0f} s.")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_load(
    url: str,
    clients: int,
    requests_per_client: int,
    protocol: str = "openpi",
    image_size: int = 224,
    max_batch_size: int = 0,
    timeout_s: float = 600.0,
    seed: int = 0,
) -> LoadRow:
    """`clients` threads, one connection each, send `requests_per_client` requests back to back after one warm-up
    request each; -> the row of figures (`max_batch_size` is only recorded in it)."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    batch_sizes: list[list[int]] = [[] for _ in range(clients)]
    infer_ms: list[list[float]] = [[] for _ in range(clients)]
    chunk_sizes: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1, timeout=timeout_s)
    connect = OpenPIConnection if protocol == "openpi" else RestConnection
    deadline = time.monotonic() + timeout_s

    def client(index: int) -> None:
        try:
            connection = connect(url, timeout_s=timeout_s)
            chunk_sizes.append(connection.metadata["action_chunk_size"])
            instruction = f"pick up block number {index}"
            observation = {
                connection.metadata["image_key"]: images[index],
                connection.metadata["prompt_key"]: instruction,
            }

            def request() -> None:
                if protocol == "openpi":
                    timing = connection.infer(observation)["server_timing"]
                    batch_sizes[index].append(timing["batch_size"])
                    infer_ms[index].append(timing["infer_ms"])
                else:
                    connection.act(images[index], instruction)

            request()
            start.wait()
            for _ in range(requests_per_client):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the load run passed --timeout_s {timeout_s}")
                sent = time.perf_counter()
                request()
                latencies[index].append(time.perf_counter() - sent)
            connection.close()
        except BaseException as error:  # noqa: BLE001  (reported by the main thread)
            errors.append(error)
            start.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    began = time.perf_counter()
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 0) + 10)
    wall = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"A client failed: {errors[0]!r}") from errors[0]
    all_latencies = np.array([value for values in latencies for value in values]) * 1000
    count = len(all_latencies)
    p50, p95, p99 = np.percentile(all_latencies, [50, 95, 99])
    sizes = [size for values in batch_sizes for size in values[1:]]  # without the warm-up requests
    infers = [ms for values in infer_ms for ms in values[1:]]
    return LoadRow(
        max_batch_size=max_batch_size,
        clients=clients,
        requests=count,
        requests_per_s=count / wall,
        actions_per_s=count * chunk_sizes[0] / wall,
        latency_ms_p50=float(p50),
        latency_ms_p95=float(p95),
        latency_ms_p99=float(p99),
        mean_batch_size=float(np.mean(sizes)) if sizes else 0.0,
        infer_ms_p99=float(np.percentile(infers, 99)) if infers else 0.0,
    )


def print_table(rows: list[LoadRow]) -> None:
    print("| max_batch_size | clients | requests | requests/s | actions/s | p50 ms | p95 ms | p99 ms | mean batch |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row.max_batch_size} | {row.clients} | {row.requests} | {row.requests_per_s:.1f} | "
            f"{row.actions_per_s:.1f} | {row.latency_ms_p50:.1f} | {row.latency_ms_p95:.1f} | "
            f"{row.latency_ms_p99:.1f} | {row.mean_batch_size:.2f} |"
        )


def print_targets(rows: list[LoadRow], max_wait_ms: float) -> None:
    """The issue's targets at the most clients: batching's throughput gain, and p99 against 2 x wait + compute."""
    most = max(row.clients for row in rows)
    by_batch = {row.max_batch_size: row for row in rows if row.clients == most}
    batched = max(by_batch.values(), key=lambda row: row.max_batch_size)
    print("Targets:")
    if 1 in by_batch and batched.max_batch_size > 1:
        gain = batched.requests_per_s / by_batch[1].requests_per_s
        print(f"  {most} clients: batching gives {gain:.2f}x the requests/s of max_batch_size 1 (target >= 3x).")
    if batched.infer_ms_p99:
        bound = 2 * max_wait_ms + batched.infer_ms_p99
        print(
            f"  {most} clients, max_batch_size {batched.max_batch_size}: p99 latency {batched.latency_ms_p99:.1f} ms "
            f"against 2 x max_wait_ms + batch compute (p99) = {bound:.1f} ms."
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows: list[LoadRow] = []
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            model = str(Path(scratch) / "small")
            save_small_model(Path(model))
        for max_batch_size in args.max_batch_sizes:
            server = ServerProcess(model, max_batch_size, args)
            try:
                for clients in args.clients:
                    row = run_load(
                        server.url,
                        clients,
                        args.requests_per_client,
                        args.protocol,
                        args.image_size,
                        max_batch_size,
                        args.timeout_s,
                    )
                    rows.append(row)
                    print(json.dumps(asdict(row)), flush=True)
            finally:
                server.stop()
    print_table(rows)
    print_targets(rows, args.max_wait_ms)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "device": args.device,
            "model": args.model or "small",
            "protocol": args.protocol,
            "max_wait_ms": args.max_wait_ms,
            "image_size": args.image_size,
            "num_threads": args.num_threads,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
