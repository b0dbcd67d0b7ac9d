"""`RemotePolicy`: the policy of a model served by `scripts/serve.py`, over either of its protocols.

    policy = RemotePolicy("http://127.0.0.1:8000")           # openpi websocket protocol (msgpack), or
    policy = RemotePolicy("http://127.0.0.1:8000", protocol="rest")  # the official OpenVLA `POST /act`
    policy.reset()
    action = policy.select_action(image, "pick up the red block")  # float32 [action_dim]

It queues and re-plans exactly as `OpenVLAPolicy` does (both are `ActionQueuePolicy`s; here a plan is a request to
the server): the environments of one `select_actions` call that need a new plan send their requests together, so the
server batches them.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import requests
import requests.adapters
import websockets.exceptions
import websockets.sync.client
from PIL import Image
from transformers.image_utils import load_image

from modeling_openvla import ActionQueuePolicy
from openvla_tools.wire_format import dumps_json, loads_json, pack_msgpack, unpack_msgpack
from processing_openvla import resolve_unnorm_key

PROTOCOLS = ("openpi", "rest")
# Connections kept open to a REST server, for the requests of many environments at once.
MAX_PARALLEL_REQUESTS = 64


class ServerRefusedError(ValueError):
    """The server refused a request (HTTP 4xx, or a websocket error message): `status` and the server's `detail`."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"The server refused the request ({status}): {detail}")
        self.status = status
        self.detail = detail


def _raise_for_answer(status: int, detail: str) -> None:
    if 400 <= status < 500:
        raise ServerRefusedError(status, detail)
    raise RuntimeError(f"The server failed to answer ({status}): {detail}")


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Api-Key {api_key}"} if api_key else {}


def _server_url(url: str, scheme_map: dict[str, str]) -> str:
    parts = urlsplit(url)
    if parts.scheme not in scheme_map or not parts.netloc:
        raise ValueError(f"url={url!r} must look like {sorted(scheme_map)[0]}://HOST:PORT.")
    return urlunsplit((scheme_map[parts.scheme], parts.netloc, parts.path.rstrip("/"), "", ""))


def as_uint8_image(image: Any) -> np.ndarray:
    """A PIL image, an image file's path or a numpy array -> the array the server takes, uint8 `[H, W, 3]` (other
    arrays go as they are, for the server to refuse with its reason)."""
    if isinstance(image, (str, Path)):
        image = load_image(str(image))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return image
    raise ValueError(
        f"Send a PIL image, an image file's path or a numpy uint8 array [H, W, 3], got {type(image).__name__}."
    )


class OpenPIConnection:
    """One openpi websocket connection: the server's metadata on connect, then one request at a time.

    Args:
        url: `ws://HOST:PORT` (or `http://`, mapped to `ws://`).
        api_key: sent as `Authorization: Api-Key <key>`.
        timeout_s: longest wait to connect and for each answer.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0):
        self.url = _server_url(url, {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"})
        self.timeout_s = timeout_s
        try:
            self._socket = websockets.sync.client.connect(
                self.url,
                additional_headers=_auth_headers(api_key),
                compression=None,
                max_size=None,
                open_timeout=timeout_s,
            )
        except websockets.exceptions.InvalidStatus as error:
            try:
                detail = loads_json(error.response.body)["detail"]
            except (ValueError, KeyError, TypeError):
                detail = str(error)
            _raise_for_answer(error.response.status_code, detail)
        self.metadata: dict[str, Any] = unpack_msgpack(self._socket.recv(timeout=timeout_s))

    def send(self, observation: dict[str, Any]) -> None:
        self._socket.send(pack_msgpack(observation))

    def receive(self) -> dict[str, Any]:
        """The answer to the last request sent: `{"actions": [K, action_dim], "server_timing": {...}}`."""
        answer = self._socket.recv(timeout=self.timeout_s)
        if isinstance(answer, str):
            error = loads_json(answer)
            _raise_for_answer(error["status"], error["detail"])
        return unpack_msgpack(answer)

    def infer(self, observation: dict[str, Any]) -> dict[str, Any]:
        self.send(observation)
        return self.receive()

    def close(self) -> None:
        self._socket.close()


class RestConnection:
    """The official OpenVLA REST protocol: `POST /act` with `json_numpy` bodies, `GET /metadata`.

    Args:
        url: `http://HOST:PORT`.
        api_key: sent as `Authorization: Api-Key <key>`.
        timeout_s: longest wait for each answer.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0):
        self.url = _server_url(url, {"http": "http", "https": "https"})
        self.timeout_s = timeout_s
        self._session = requests.Session()
        self._session.mount(self.url, requests.adapters.HTTPAdapter(pool_maxsize=MAX_PARALLEL_REQUESTS))
        self._session.headers.update(_auth_headers(api_key))
        self.metadata: dict[str, Any] = self._answer(self._session.get(f"{self.url}/metadata", timeout=timeout_s))

    @staticmethod
    def _answer(response: requests.Response) -> Any:
        if response.status_code != 200:
            try:
                detail = response.json()["detail"]
            except (ValueError, KeyError, TypeError):
                detail = response.text[:500]
            _raise_for_answer(response.status_code, detail)
        return loads_json(response.content)

    def act(self, image: np.ndarray, instruction: str, unnorm_key: str | None = None) -> np.ndarray:
        """-> float32 `[action_dim]`, or `[K, action_dim]` for a model with action chunks."""
        payload = {"image": image, "instruction": instruction}
        if unnorm_key is not None:
            payload["unnorm_key"] = unnorm_key
        response = self._session.post(
            f"{self.url}/act",
            data=dumps_json(payload),
            headers={"Content-Type": "application/json"},
            timeout=self.timeout_s,
        )
        return self._answer(response)

    def close(self) -> None:
        self._session.close()


class RemotePolicy(ActionQueuePolicy):
    """`OpenVLAPolicy`'s served twin: the plans of `ActionQueuePolicy` come from `scripts/serve.py` instead of a local
    model; same `reset` / `drop` / `select_action(s)`, same queues.

    Args:
        url: the server, `http://HOST:PORT` (`ws://HOST:PORT` also for `openpi`).
        api_key: the server's `--api_key`, if it has one.
        protocol: `openpi` (websocket + msgpack, one connection per environment) or `rest` (official `POST /act`).
        unnorm_key: the dataset whose statistics unnormalise the actions; defaults to the server's `--unnorm_key`.
            Checked against the served datasets here (the statistics stay on the server, which applies them).
        n_action_steps, temporal_ensemble_coeff: as for `OpenVLAPolicy`.
        timeout_s: longest wait for the server to connect and to answer a request.

    Raises `ServerRefusedError` (a `ValueError`) with the server's reason when it refuses a request.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        protocol: str = "openpi",
        unnorm_key: str | None = None,
        n_action_steps: int | None = None,
        temporal_ensemble_coeff: float | None = None,
        timeout_s: float = 60.0,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r} is not one of {PROTOCOLS}.")
        self.url, self.api_key, self.protocol, self.timeout_s = url, api_key, protocol, timeout_s
        self._connections: list[OpenPIConnection | RestConnection] = [self._connect()]
        self.server_metadata = metadata = self._connections[0].metadata
        try:
            super().__init__(metadata["action_chunk_size"], metadata["action_dim"], n_action_steps, temporal_ensemble_coeff)
            default_key = metadata["default_unnorm_key"]
            resolve_unnorm_key(dict.fromkeys(metadata["unnorm_keys"]), default_key if unnorm_key is None else unnorm_key)
        except ValueError:
            self._connections[0].close()
            raise
        self.unnorm_key = unnorm_key
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def _connect(self) -> OpenPIConnection | RestConnection:
        connection = OpenPIConnection if self.protocol == "openpi" else RestConnection
        return connection(self.url, self.api_key, self.timeout_s)

    def _plan(self, images: list, instructions: list[str]) -> np.ndarray:
        """One request per environment, all in flight together -> float32 `[B, chunk_size, action_dim]`."""
        images = [as_uint8_image(image) for image in images]
        if self.protocol == "openpi":
            actions = self._plan_openpi(images, instructions)
        else:
            actions = self._plan_rest(images, instructions)
        return np.stack([np.asarray(chunk, dtype=np.float32).reshape(-1, self.action_dim) for chunk in actions])

    def _plan_openpi(self, images: list[np.ndarray], instructions: list[str]) -> list[np.ndarray]:
        while len(self._connections) < len(images):
            self._connections.append(self._connect())
        image_key = self.server_metadata["image_key"]
        prompt_key = self.server_metadata["prompt_key"]
        for connection, image, instruction in zip(self._connections, images, instructions):
            observation = {image_key: image, prompt_key: instruction}
            if self.unnorm_key is not None:
                observation["unnorm_key"] = self.unnorm_key
            connection.send(observation)
        answers, errors = [], []
        for connection in self._connections[: len(images)]:  # every answer is read, so each connection stays in step
            try:
                answers.append(connection.receive()["actions"])
            except ServerRefusedError as error:
                errors.append(error)
        if errors:
            raise errors[0]
        return answers

    def _plan_rest(self, images: list[np.ndarray], instructions: list[str]) -> list[np.ndarray]:
        connection = self._connections[0]
        if len(images) == 1:
            return [connection.act(images[0], instructions[0], self.unnorm_key)]
        if self._pool_size < len(images):
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = ThreadPoolExecutor(max_workers=len(images), thread_name_prefix="remote-policy")
            self._pool_size = len(images)
        calls = [
            self._pool.submit(connection.act, image, text, self.unnorm_key) for image, text in zip(images, instructions)
        ]
        return [call.result() for call in calls]

    def close(self) -> None:
        """Close the connections to the server."""
        for connection in self._connections:
            connection.close()
        self._connections = []
        if self._pool is not None:
            self._pool.shutdown()
            self._pool, self._pool_size = None, 0

    def __enter__(self) -> "RemotePolicy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
