"""Serve an OpenVLA model to robots: the official OpenVLA `POST /act` REST protocol and the openpi websocket protocol
on one port, with requests from all clients batched into shared model calls.

    python scripts/serve.py --model outputs/my_model --unnorm_key my_robot              # http/ws://127.0.0.1:8000
    python scripts/serve.py --model outputs/my_model --host 0.0.0.0 --api_key "$KEY" --device cuda

Clients: `requests.post("http://127.0.0.1:8000/act", json={"image": ..., "instruction": ...})` after
`json_numpy.patch()` (as for the official `vla-scripts/deploy.py`), openpi's `WebsocketClientPolicy(host, port)`, or
`openvla_tools.remote_policy.RemotePolicy(url)`. The protocols, batching and shutdown are described in
`openvla_tools/serving.py`. Needs the `serve` extra: `pip install -e ".[serve]"`.
"""

import logging
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from openvla_tools.serving import ServingOptions, create_app, load_predictor, make_server


@dataclass
class ServeArguments:
    model: str = field(metadata={"help": "Saved model folder or Hub id (loaded with trust_remote_code=True)."})
    unnorm_key: str | None = field(
        default=None, metadata={"help": "Dataset whose statistics unnormalise actions when a request names none."}
    )
    host: str = field(
        default="127.0.0.1", metadata={"help": "Address to bind; 0.0.0.0 exposes the server to the network."}
    )
    port: int = field(default=8000)
    max_batch_size: int = field(default=16, metadata={"help": "Most requests per model call (1: no batching)."})
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "Longest time a request waits for its batch to fill before the model runs."}
    )
    api_key: str | None = field(
        default=None,
        metadata={"help": "Require the header 'Authorization: Api-Key <key>' (or 'Bearer <key>') on both protocols."},
    )
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, cuda:1, ...; left out: cuda when available, else cpu."}
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Left out: bfloat16 on CUDA, float32 on CPU.", "choices": ["float32", "bfloat16", "float16"]},
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads for inference (torch.set_num_threads); left out: torch's choice."}
    )
    image_key: str = field(
        default="observation/image", metadata={"help": "Key of the camera image in openpi observations."}
    )
    max_request_mb: float = field(default=16.0, metadata={"help": "Largest request body / websocket message, in MiB."})
    drain_timeout_s: float = field(
        default=30.0, metadata={"help": "On SIGINT/SIGTERM, longest wait for requests in flight to be answered."}
    )
    log_level: str = field(default="info", metadata={"choices": ["debug", "info", "warning", "error"]})


def parse_args(argv: list[str] | None = None) -> ServeArguments:
    (args,) = HfArgumentParser(ServeArguments).parse_args_into_dataclasses(args=argv)
    if args.max_request_mb <= 0:
        raise ValueError(f"--max_request_mb {args.max_request_mb} must be positive.")
    if args.num_threads is not None and args.num_threads < 1:
        raise ValueError(f"--num_threads {args.num_threads} must be at least 1.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServingOptions(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        api_key=args.api_key,
        image_key=args.image_key,
        max_request_bytes=int(args.max_request_mb * 2**20),
        drain_timeout_s=args.drain_timeout_s,
    )
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    predictor = load_predictor(args.model, args.unnorm_key, device=args.device, dtype=args.dtype)
    app = create_app(predictor, options)
    server = make_server(app, args.host, args.port, log_level=args.log_level)
    logging.getLogger(__name__).info(
        "Serving %s on http://%s:%d (POST /act) and ws://%s:%d (openpi)",
        args.model,
        args.host,
        args.port,
        args.host,
        args.port,
    )
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, once the server has shut down
        pass


if __name__ == "__main__":
    sys.exit(main())
