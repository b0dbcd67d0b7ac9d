"""Serve an OpenVLA model to robots: the official OpenVLA REST protocol and the openpi websocket protocol on one port,
with requests from all clients batched into shared `predict_action` calls.

Endpoints (one FastAPI app, run by uvicorn):

- `POST /act` (official OpenVLA `vla-scripts/deploy.py`): a JSON body `{"image": uint8 [H, W, 3], "instruction": str,
  "unnorm_key": optional str}` with the array encoded by `json_numpy`, or the double-encoded `{"encoded": "<that JSON
  as a string>"}`. The answer is the action in `json_numpy`'s encoding (a JSON string holding it when the request was
  double-encoded): float32 `[action_dim]`, or `[K, action_dim]` for a model with action chunks.
- websocket `/` (openpi's `WebsocketClientPolicy`): the server first sends its metadata (msgpack); then every binary
  message is a msgpack observation map holding the camera image at `image_key` (default `observation/image`) and the
  instruction at `prompt`, optionally `unnorm_key`; other keys (state, more cameras) are ignored. The answer is
  `{"actions": float32 [K, action_dim], "server_timing": {"infer_ms", "queue_ms", "batch_size"}}` (`K` = 1 without
  chunks). A refused request is answered by a text message, JSON `{"status": 4xx, "detail": reason}`, and the
  connection stays open.
- `GET /healthz` (`{"status": "ok" | "draining", "in_flight": n}`, no key needed) and `GET /metadata`.

Requests are validated as they arrive (a bad one is refused at once and never reaches a batch), then queued; a single
inference thread takes up to `max_batch_size` of them, waiting at most `max_wait_ms` for more once the model is free,
and answers them with one `predict_action` call per `unnorm_key` in the batch, so the event loop keeps accepting
connections meanwhile. A row of a batch equals the same request served alone. With an `api_key` both protocols need the
header `Authorization: Api-Key <key>` (openpi's) or `Authorization: Bearer <key>`. The first SIGINT / SIGTERM stops
taking requests (503), answers those in flight, then exits; a second one skips the wait. Limits: a body or message of at
most `max_request_bytes`, an instruction of at most 1000 characters.
"""

import asyncio
import hmac
import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from types import FrameType
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.websockets import WebSocketDisconnect

from openvla_tools.wire_format import WireFormatError, dumps_json, loads_json, pack_msgpack, unpack_msgpack

logger = logging.getLogger(__name__)

MAX_INSTRUCTION_CHARS = 1000


class RequestError(Exception):
    """A request the server refuses: `status` is its HTTP status (4xx, or 503 while shutting down)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class ActionRequest:
    """One validated request: `image` uint8 `[H, W, 3]`, an instruction, and the dataset whose statistics unnormalise
    the actions (resolved by `ActionPredictor.check`)."""

    image: np.ndarray
    instruction: str
    unnorm_key: str | None = None


@dataclass(frozen=True)
class Timing:
    """Where a request's time went on the server: waiting for its batch, and that batch's inference."""

    queue_ms: float
    infer_ms: float
    batch_size: int


def check_image(value: Any, field: str) -> np.ndarray:
    """A decoded image field -> uint8 `[H, W, 3]` (RGB, channels last), or a `RequestError` (422) saying what to
    send."""
    if not isinstance(value, np.ndarray):
        raise RequestError(
            422,
            f"{field!r} must be a numpy uint8 array [H, W, 3] (json_numpy on REST, openpi's msgpack encoding on the "
            f"websocket), got {type(value).__name__}.",
        )
    if value.ndim != 3 or value.shape[-1] != 3:
        hint = " (channels first? send image.transpose(1, 2, 0))" if value.ndim == 3 and value.shape[0] == 3 else ""
        raise RequestError(422, f"{field!r} has shape {list(value.shape)}; send an RGB image [H, W, 3]{hint}.")
    if value.dtype != np.uint8:
        raise RequestError(
            422,
            f"{field!r} has dtype {value.dtype}; send uint8 pixels in 0..255 (a float image in [0, 1]: "
            "(image * 255).round().astype(np.uint8)).",
        )
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise RequestError(422, f"{field!r} is empty (shape {list(value.shape)}); send a camera frame.")
    return value


def check_instruction(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(422, f"{field!r} must be a non-empty string (the task instruction), got {value!r:.80}.")
    if len(value) > MAX_INSTRUCTION_CHARS:
        raise RequestError(422, f"{field!r} has {len(value)} characters; at most {MAX_INSTRUCTION_CHARS} are accepted.")
    return value


def check_unnorm_key(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise RequestError(422, f"'unnorm_key' must be a string (a dataset name) or left out, got {value!r:.80}.")
    return value


def _require(payload: dict, field: str) -> Any:
    if field not in payload:
        raise RequestError(422, f"The request has no {field!r} field (it has {sorted(map(str, payload))}).")
    return payload[field]


def parse_rest_payload(payload: Any) -> tuple[ActionRequest, bool]:
    """A decoded `/act` body -> the request and whether it came double-encoded (`{"encoded": "<JSON>"}`)."""
    double_encoded = isinstance(payload, dict) and "encoded" in payload
    if double_encoded:
        if len(payload) != 1 or not isinstance(payload["encoded"], str):
            raise RequestError(422, "A double-encoded request is exactly {'encoded': '<json_numpy string>'}.")
        try:
            payload = loads_json(payload["encoded"])
        except WireFormatError as error:
            raise RequestError(400, f"'encoded': {error}") from None
    if not isinstance(payload, dict):
        raise RequestError(422, f"The body must be a JSON object, got {type(payload).__name__}.")
    request = ActionRequest(
        image=check_image(_require(payload, "image"), "image"),
        instruction=check_instruction(_require(payload, "instruction"), "instruction"),
        unnorm_key=check_unnorm_key(payload.get("unnorm_key")),
    )
    return request, double_encoded


def parse_openpi_observation(observation: Any, image_key: str, prompt_key: str = "prompt") -> ActionRequest:
    """A decoded openpi observation map -> the request (the image at `image_key`, the instruction at `prompt_key`)."""
    if not isinstance(observation, dict):
        raise RequestError(422, f"An observation must be a msgpack map, got {type(observation).__name__}.")
    return ActionRequest(
        image=check_image(_require(observation, image_key), image_key),
        instruction=check_instruction(_require(observation, prompt_key), prompt_key),
        unnorm_key=check_unnorm_key(observation.get("unnorm_key")),
    )


class ActionPredictor:
    """The model side of the server: validated requests -> their actions, with batched `predict_action` calls.

    Args:
        model: an `OpenVLAForActionPrediction` in eval mode, on its device.
        processor: its `OpenVLAProcessor`.
        unnorm_key: the dataset used when a request names none (checked here); may be left out when the model has
            statistics of one dataset only (or none).
        name: the model's name in the metadata; defaults to `model.name_or_path`.
    """

    def __init__(self, model, processor, unnorm_key: str | None = None, name: str | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = model.action_tokenizer
        self.unnorm_key = unnorm_key
        if unnorm_key is not None or len(self.tokenizer.norm_stats) <= 1:
            self.tokenizer.stats_for(unnorm_key)  # an unknown default key fails at start-up
        self.name = name or model.name_or_path or type(model).__name__

    @property
    def metadata(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "model": str(self.name),
            "action_dim": config.action_dim,
            "action_chunk_size": config.action_chunk_size,
            "action_decoding": config.action_decoding,
            "unnorm_keys": sorted(self.tokenizer.norm_stats),
            "default_unnorm_key": self.unnorm_key,
        }

    def check(self, request: ActionRequest) -> ActionRequest:
        """The request with its `unnorm_key` resolved (its own, else the server's default), or a `RequestError` (422)
        that lists the known keys."""
        key = request.unnorm_key if request.unnorm_key is not None else self.unnorm_key
        try:
            self.tokenizer.stats_for(key)
        except ValueError as error:
            raise RequestError(422, str(error)) from None
        return replace(request, unnorm_key=key)

    def predict(self, requests: Sequence[ActionRequest]) -> np.ndarray:
        """Requests of one `unnorm_key` -> float32 actions `[B, action_dim]`, or `[B, K, action_dim]` with chunks."""
        images = [Image.fromarray(request.image) for request in requests]
        inputs = self.processor(images=images, text=[request.instruction for request in requests])
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        actions = self.model.predict_action(**inputs, unnorm_key=requests[0].unnorm_key)
        return actions.float().cpu().numpy()

    def __call__(self, requests: Sequence[ActionRequest]) -> list[np.ndarray | Exception]:
        """A batch -> each request's actions (`[action_dim]` or `[K, action_dim]`) or the error it raised. One call
        per `unnorm_key`; if a call fails with a `ValueError`, its requests are retried one by one so that only the
        bad one fails."""
        results: dict[int, np.ndarray | Exception] = {}
        groups: dict[str | None, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.unnorm_key, []).append(index)
        for indices in groups.values():
            try:
                actions = self.predict([requests[i] for i in indices])
            except ValueError as error:
                if len(indices) == 1:
                    results[indices[0]] = error
                    continue
                for i in indices:
                    results[i] = self([requests[i]])[0]
                continue
            except Exception as error:  # noqa: BLE001  (answered as a 500 to each of the group's clients)
                logger.exception("Inference failed for a batch of %d requests", len(indices))
                for i in indices:
                    results[i] = error
                continue
            for row, i in enumerate(indices):
                results[i] = actions[row]
        return [results[i] for i in range(len(requests))]


@dataclass
class _Pending:
    request: ActionRequest
    future: asyncio.Future
    arrived: float


class DynamicBatcher:
    """Queues requests and answers them in batches on one inference thread.

    A batch starts when `max_batch_size` requests are queued, or `max_wait_ms` after its oldest request arrived or
    the previous batch finished, whichever is later (so the clients just answered can join the next batch instead of
    waiting a whole batch behind it), or at once while draining. Requests whose client gave up (their future
    cancelled) are dropped before inference.

    Args:
        predict: a batch of requests -> one result (actions or an exception) per request, e.g. an `ActionPredictor`.
        max_batch_size: most requests per batch (1 turns batching off).
        max_wait_ms: longest time the oldest queued request waits for the batch to fill once the model is free.
    """

    def __init__(
        self,
        predict: Callable[[Sequence[ActionRequest]], list[np.ndarray | Exception]],
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
    ):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r} must be a positive integer (1 turns batching off).")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms={max_wait_ms!r} must be a number >= 0.")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self._pending: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._flush = False
        self._free_since = 0.0  # event-loop time at which the last batch finished
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openvla-inference")
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the worker (after its current batch) and fail whatever is still queued."""
        if self._worker is None:
            return
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(RequestError(503, "The server is shutting down."))
        self._pending.clear()
        self._executor.shutdown(wait=True)
        self._worker = None

    def flush(self) -> None:
        """From now on, run every batch at once instead of waiting for it to fill (used while draining)."""
        self._flush = True
        if self._arrived is not None:
            self._arrived.set()

    async def submit(self, request: ActionRequest) -> tuple[np.ndarray, Timing]:
        """Queue a request and wait for its actions. Cancelling the caller drops the request from its batch."""
        if self._worker is None:
            raise RuntimeError("The batcher is not running: call start() first (the app's lifespan does).")
        loop = asyncio.get_running_loop()
        pending = _Pending(request, loop.create_future(), loop.time())
        self._pending.append(pending)
        self._arrived.set()
        return await pending.future

    def _live_count(self) -> int:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()
        return sum(not pending.future.done() for pending in self._pending)

    async def _next_batch(self) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        while not self._live_count():
            self._arrived.clear()
            await self._arrived.wait()
        deadline = max(self._pending[0].arrived, self._free_since) + self.max_wait_s
        while not self._flush and self._live_count() < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = []
        while self._pending and len(batch) < self.max_batch_size:
            pending = self._pending.popleft()
            if not pending.future.done():
                batch.append(pending)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = loop.time()
            try:
                results = await loop.run_in_executor(self._executor, self.predict, [p.request for p in batch])
            except Exception as error:  # noqa: BLE001  (the batch's clients get it; the worker goes on)
                logger.exception("Inference failed for a batch of %d requests", len(batch))
                results = [error] * len(batch)
            self._free_since = loop.time()
            infer_ms = (self._free_since - started) * 1000
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():  # the client left while its batch ran
                    continue
                if isinstance(result, Exception):
                    pending.future.set_exception(result)
                else:
                    timing = Timing((started - pending.arrived) * 1000, infer_ms, len(batch))
                    pending.future.set_result((result, timing))


@dataclass
class ServingOptions:
    """What the app needs besides the model: see `scripts/serve.py` for each option."""

    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    api_key: str | None = None
    image_key: str = "observation/image"
    prompt_key: str = "prompt"
    max_request_bytes: int = 16 * 2**20
    drain_timeout_s: float = 30.0


class InferenceService:
    """Admission of requests (auth, size, validation, draining) in front of a `DynamicBatcher`, shared by both
    protocols, and the count of requests in flight that a graceful shutdown waits for."""

    def __init__(self, predictor: ActionPredictor, options: ServingOptions):
        self.predictor = predictor
        self.options = options
        self.batcher = DynamicBatcher(predictor, options.max_batch_size, options.max_wait_ms)
        self.draining = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        options = self.options
        return {
            **self.predictor.metadata,
            "image_key": options.image_key,
            "prompt_key": options.prompt_key,
            "max_batch_size": options.max_batch_size,
            "max_wait_ms": options.max_wait_ms,
            "max_request_bytes": options.max_request_bytes,
        }

    async def start(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    def authorize(self, authorization: str | None) -> None:
        """Check an `Authorization` header (`Api-Key <key>` or `Bearer <key>`) when the server has a key."""
        expected = self.options.api_key
        if expected is None:
            return
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() not in ("api-key", "bearer") or not hmac.compare_digest(
            key.strip().encode(), expected.encode()
        ):
            raise RequestError(401, "Missing or wrong API key: send the header 'Authorization: Api-Key <key>'.")

    def check_size(self, size: int) -> None:
        if size > self.options.max_request_bytes:
            raise RequestError(
                413,
                f"The request has {size} bytes, over this server's limit of {self.options.max_request_bytes} "
                "(serve.py --max_request_mb); send a smaller image.",
            )

    def check_open(self) -> None:
        if self.draining:
            raise RequestError(503, "The server is shutting down; it answers no new requests.")

    async def act(self, request: ActionRequest) -> tuple[np.ndarray, Timing]:
        """A validated request -> its actions, through the batcher; counted in flight until the caller is done."""
        self.check_open()
        request = self.predictor.check(request)
        try:
            actions, timing = await self.batcher.submit(request)
        except ValueError as error:
            raise RequestError(422, str(error)) from None
        except RequestError:
            raise
        except Exception as error:  # noqa: BLE001
            raise RequestError(500, f"Inference failed: {type(error).__name__}: {error}") from None
        return actions, timing

    @asynccontextmanager
    async def tracked(self):
        """Counts the enclosed request (from admission to its answer being sent) as in flight."""
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def drain(self) -> None:
        """Refuse new requests, run queued batches at once, and wait (at most `drain_timeout_s`) for those in flight."""
        self.draining = True
        self.batcher.flush()
        try:
            await asyncio.wait_for(self._idle.wait(), self.options.drain_timeout_s)
        except asyncio.TimeoutError:
            logger.warning(
                "%d requests still in flight after %.0f s; exiting anyway.",
                self.in_flight,
                self.options.drain_timeout_s,
            )


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, whatever Content-Length claims."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"The request has {declared} bytes, over this server's limit of {limit}.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"The request passed this server's limit of {limit} bytes.")
    return bytes(body)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_text(error: RequestError) -> str:
    return json.dumps({"status": error.status, "detail": error.detail})


def create_app(predictor: ActionPredictor, options: ServingOptions | None = None) -> FastAPI:
    """The FastAPI app serving `predictor` over both protocols (see the module docstring); its lifespan starts and
    stops the batcher. `app.state.service` is the `InferenceService`."""
    options = options or ServingOptions()
    service = InferenceService(predictor, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="OpenVLA action server", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def refuse(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": error.detail}, status_code=error.status)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "draining" if service.draining else "ok", "in_flight": service.in_flight}

    @app.get("/metadata")
    async def metadata(request: Request) -> dict[str, Any]:
        service.authorize(request.headers.get("authorization"))
        return service.metadata

    @app.post("/act")
    async def act(request: Request) -> Response:
        service.authorize(request.headers.get("authorization"))
        service.check_open()
        body = await _read_body(request, options.max_request_bytes)
        try:
            payload = loads_json(body)
        except WireFormatError as error:
            raise RequestError(400, str(error)) from None
        action_request, double_encoded = parse_rest_payload(payload)
        async with service.tracked():
            answer = asyncio.ensure_future(service.act(action_request))
            gone = asyncio.ensure_future(_until_disconnected(request))
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not answer.done():  # the client left: its request leaves the queue
                answer.cancel()
                return Response(status_code=499)
            actions, timing = answer.result()
        text = dumps_json(actions)
        headers = {"Server-Timing": f"queue;dur={timing.queue_ms:.2f}, infer;dur={timing.infer_ms:.2f}"}
        return Response(dumps_json(text) if double_encoded else text, media_type="application/json", headers=headers)

    @app.websocket("/")
    async def openpi(websocket: WebSocket) -> None:
        try:
            service.authorize(websocket.headers.get("authorization"))
            service.check_open()
        except RequestError as error:
            await websocket.send_denial_response(JSONResponse({"detail": error.detail}, status_code=error.status))
            return
        await websocket.accept()
        await websocket.send_bytes(pack_msgpack(service.metadata))
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                async with service.tracked():
                    try:
                        if message.get("bytes") is None:
                            raise RequestError(400, "Send observations as binary msgpack messages, not text.")
                        service.check_size(len(message["bytes"]))
                        try:
                            observation = unpack_msgpack(message["bytes"])
                        except WireFormatError as error:
                            raise RequestError(400, str(error)) from None
                        request = parse_openpi_observation(observation, options.image_key, options.prompt_key)
                        actions, timing = await service.act(request)
                    except RequestError as error:
                        await websocket.send_text(_error_text(error))
                        continue
                    chunk = actions.reshape(-1, predictor.model.config.action_dim)  # [K, action_dim]
                    await websocket.send_bytes(pack_msgpack({"actions": chunk, "server_timing": asdict(timing)}))
        except WebSocketDisconnect:
            return

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGINT / SIGTERM drains the app's `InferenceService` (new requests are
    refused, those in flight answered) before uvicorn shuts down; a second signal skips the wait (uvicorn's own
    shutdown, forced by a second SIGINT)."""

    def __init__(self, config: uvicorn.Config, service: InferenceService):
        super().__init__(config)
        self.service = service
        self._drain: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self._loop is None:
            super().handle_exit(sig, frame)
            return
        logger.info("Signal %d: answering %d requests in flight, then exiting.", sig, self.service.in_flight)
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        await self.service.drain()
        super().handle_exit(sig, None)


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> DrainingServer:
    """A `DrainingServer` for an app from `create_app`, with the websocket message limit set from the app's
    `max_request_bytes` (messages up to twice that are read and refused with a reason; larger ones close the
    connection with code 1009)."""
    service: InferenceService = app.state.service
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws_max_size=2 * service.options.max_request_bytes,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=service.options.drain_timeout_s,
    )
    return DrainingServer(config, service)


def load_predictor(
    model: str, unnorm_key: str | None = None, device: str | None = None, dtype: str | None = None
) -> ActionPredictor:
    """An `ActionPredictor` for a saved model folder or Hub id, loaded through the Auto classes.

    Args:
        device: `cpu`, `cuda`, `cuda:1`, ...; defaults to `cuda` when available.
        dtype: `float32`, `bfloat16` or `float16`; defaults to bfloat16 on CUDA and float32 on CPU.
    """
    from transformers import AutoModel, AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r} is not one of 'float32', 'bfloat16', 'float16'.")
    loaded = AutoModel.from_pretrained(model, trust_remote_code=True, dtype=getattr(torch, dtype)).to(device).eval()
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
    return ActionPredictor(loaded, processor, unnorm_key=unnorm_key, name=model)
