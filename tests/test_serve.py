"""scripts/serve.py: the official REST client and the openpi client drive a served tiny model; batching, bad input,
disconnects, API keys, graceful shutdown; RemotePolicy acts as OpenVLAPolicy. Servers bind 127.0.0.1 only and every
client call is bounded in count and time."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("msgpack")
json_numpy = pytest.importorskip("json_numpy")
requests = pytest.importorskip("requests")
pytest.importorskip("websockets")
import websockets.exceptions  # noqa: E402
import websockets.sync.client  # noqa: E402
from conftest import INSTRUCTIONS, TOKENIZER_DIR, make_model, make_processor  # noqa: E402

from modeling_openvla import OpenVLAPolicy  # noqa: E402
from openvla_tools.remote_policy import OpenPIConnection, RemotePolicy, RestConnection, ServerRefusedError  # noqa: E402
from openvla_tools.serving import (  # noqa: E402
    ActionPredictor,
    ActionRequest,
    DynamicBatcher,
    ServingOptions,
    create_app,
    make_server,
)
from openvla_tools.wire_format import pack_msgpack  # noqa: E402
from processing_openvla import compute_action_stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHUNK = 4
KEYS = ("robot_a", "robot_b")
WAIT_S = 60  # bound on every wait for a server-side event

pytestmark = pytest.mark.usefixtures("single_thread")


def camera_frames(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(count)]


IMAGES = camera_frames(4, seed=0)


@pytest.fixture(scope="module")
def processor():
    return make_processor(AutoTokenizer.from_pretrained(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def chunked(processor):
    """Parallel decoding with chunks of 4, statistics of two datasets."""
    rng = np.random.default_rng(1)
    norm_stats = {key: compute_action_stats(rng.normal(i, 0.2 + i, size=(200, 7))) for i, key in enumerate(KEYS)}
    return make_model(processor.tokenizer, action_decoding="parallel", action_chunk_size=CHUNK, norm_stats=norm_stats)


@pytest.fixture(scope="module")
def single(processor):
    """Autoregressive (official) decoding, one action per call, statistics of one dataset."""
    norm_stats = {"robot": compute_action_stats(np.random.default_rng(2).normal(0, 0.3, size=(200, 7)))}
    return make_model(processor.tokenizer, norm_stats=norm_stats)


def alone(model, processor, image: np.ndarray, instruction: str, unnorm_key: str | None) -> np.ndarray:
    """What `predict_action` gives for this request on its own: `[action_dim]` or `[K, action_dim]`."""
    inputs = processor(images=Image.fromarray(image), text=instruction)
    return model.predict_action(**inputs, unnorm_key=unnorm_key)[0].numpy()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out waiting for {what}.")
        time.sleep(0.01)


@contextmanager
def serving(predictor, **options):
    """The app served by uvicorn in a thread, on 127.0.0.1 and a free port -> (base URL, InferenceService, server)."""
    app = create_app(predictor, ServingOptions(**options))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = make_server(app, "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the server to start")
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}", app.state.service, server
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        listener.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def post_act(url: str, payload, **kwargs) -> requests.Response:
    body = json_numpy.dumps(payload) if isinstance(payload, (dict, list)) else payload
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return requests.post(f"{url}/act", data=body, headers=headers, timeout=WAIT_S, **kwargs)


def run_threads(*targets: Callable[[], None]) -> None:
    """Run the callables concurrently; re-raise the first failure."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,), daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * WAIT_S)
        assert not thread.is_alive(), "a client thread did not finish"
    if errors:
        raise errors[0]


@pytest.fixture
def json_numpy_patched():
    """`json_numpy.patch()` as an official client does, undone afterwards."""
    saved = (json.dumps, json.loads, json.dump, json.load)
    json_numpy.patch()
    yield
    json.dumps, json.loads, json.dump, json.load = saved


@pytest.mark.parametrize("which,shape", [("chunked", (CHUNK, 7)), ("single", (7,))])
def test_official_client_gets_what_predict_action_gives(request, processor, json_numpy_patched, which, shape):
    model = request.getfixturevalue(which)
    default_key = "robot_a" if which == "chunked" else None
    with serving(ActionPredictor(model, processor, unnorm_key=default_key)) as (url, _, _):
        action = requests.post(f"{url}/act", json={"image": IMAGES[0], "instruction": INSTRUCTIONS[0]}).json()
        assert isinstance(action, np.ndarray) and action.dtype == np.float32 and action.shape == shape
        expected = alone(model, processor, IMAGES[0], INSTRUCTIONS[0], default_key)
        np.testing.assert_array_equal(action, expected)

        encoded = requests.post(
            f"{url}/act", json={"encoded": json.dumps({"image": IMAGES[0], "instruction": INSTRUCTIONS[0]})}
        ).json()
        assert isinstance(encoded, str)
        np.testing.assert_array_equal(json.loads(encoded), expected)

        if which == "chunked":
            other = requests.post(
                f"{url}/act", json={"image": IMAGES[0], "instruction": INSTRUCTIONS[0], "unnorm_key": "robot_b"}
            ).json()
            np.testing.assert_array_equal(other, alone(model, processor, IMAGES[0], INSTRUCTIONS[0], "robot_b"))
            assert not np.array_equal(other, action)


def test_openpi_client_and_action_chunk_broker(processor, chunked):
    pytest.importorskip("openpi_client")
    pytest.importorskip("tree")  # dm-tree, used by ActionChunkBroker
    from openpi_client.action_chunk_broker import ActionChunkBroker
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    with serving(ActionPredictor(chunked, processor, unnorm_key="robot_a")) as (url, _, _):
        client = WebsocketClientPolicy(host="127.0.0.1", port=port_of(url))
        metadata = client.get_server_metadata()
        assert metadata["action_chunk_size"] == CHUNK and metadata["action_dim"] == 7
        assert metadata["unnorm_keys"] == list(KEYS) and metadata["image_key"] == "observation/image"

        observation = {
            "observation/image": IMAGES[1],
            "observation/wrist_image": IMAGES[2],  # other cameras and the state are ignored
            "observation/state": np.zeros(8, dtype=np.float32),
            "prompt": INSTRUCTIONS[1],
            "unnorm_key": "robot_b",
        }
        expected = alone(chunked, processor, IMAGES[1], INSTRUCTIONS[1], "robot_b")
        answer = client.infer(observation)
        np.testing.assert_array_equal(answer["actions"], expected)
        assert answer["actions"].dtype == np.float32
        assert answer["server_timing"]["batch_size"] == 1 and answer["server_timing"]["infer_ms"] > 0

        broker = ActionChunkBroker(client, action_horizon=CHUNK)
        steps = [broker.infer(observation)["actions"] for _ in range(CHUNK + 1)]
        np.testing.assert_array_equal(np.stack(steps[:CHUNK]), expected)
        np.testing.assert_array_equal(steps[CHUNK], expected[0])  # a new chunk after the horizon


@pytest.mark.parametrize("protocol", ["openpi", "rest"])
@pytest.mark.parametrize("options", [{"n_action_steps": 2}, {"temporal_ensemble_coeff": 0.1}])
def test_remote_policy_acts_as_openvla_policy(processor, chunked, protocol, options):
    local = OpenVLAPolicy(chunked, processor, unnorm_key="robot_b", **options)
    with serving(ActionPredictor(chunked, processor, unnorm_key="robot_a")) as (url, _, _):
        with RemotePolicy(url, protocol=protocol, unnorm_key="robot_b", **options) as remote:
            assert (remote.chunk_size, remote.action_dim, remote.n_action_steps) == (CHUNK, 7, local.n_action_steps)
            for step in range(4):
                frames = camera_frames(3, seed=10 + step)
                state = [np.zeros(4, dtype=np.float32)] * 3
                actions = remote.select_actions(frames, INSTRUCTIONS, observations=state)
                assert actions.shape == (3, 7) and actions.dtype == np.float32
                np.testing.assert_array_equal(actions, local.select_actions(frames, INSTRUCTIONS))
            remote.reset(1)
            local.reset(1)
            frames = camera_frames(3, seed=20)
            np.testing.assert_array_equal(
                remote.select_actions(frames, INSTRUCTIONS), local.select_actions(frames, INSTRUCTIONS)
            )
            remote.reset()
            local.reset()
            image = Image.fromarray(IMAGES[3])
            np.testing.assert_array_equal(remote.select_action(image, "go"), local.select_action(image, "go"))

            with pytest.raises(ValueError, match="call reset"):
                remote.select_actions(IMAGES[:2], INSTRUCTIONS[:2])


def test_remote_policy_checks_unnorm_key_against_the_server(processor, chunked):
    with serving(ActionPredictor(chunked, processor)) as (url, _, _):  # two datasets, no default
        with pytest.raises(ValueError, match="robot_a"):
            RemotePolicy(url, unnorm_key="robot_c")
        with pytest.raises(ValueError, match="several datasets"):
            RemotePolicy(url, protocol="rest")
        with pytest.raises(ValueError, match="protocol"):
            RemotePolicy(url, protocol="grpc")


def test_concurrent_requests_share_a_batch_and_each_row_equals_it_alone(processor, chunked, monkeypatch):
    """Four clients (two per protocol, two datasets) form one batch: one predict_action call per dataset."""
    expected = [alone(chunked, processor, IMAGES[i], INSTRUCTIONS[i % 3], KEYS[i // 3]) for i in range(4)]
    calls = []
    predict_action = chunked.predict_action

    def counting(**inputs):
        calls.append(inputs["input_ids"].shape[0])
        return predict_action(**inputs)

    monkeypatch.setattr(chunked, "predict_action", counting)
    answers, timings = {}, {}

    def openpi_client(i):
        def run():
            connection = OpenPIConnection(url)
            observation = {"observation/image": IMAGES[i], "prompt": INSTRUCTIONS[i % 3], "unnorm_key": KEYS[i // 3]}
            answer = connection.infer(observation)
            answers[i], timings[i] = answer["actions"], answer["server_timing"]
            connection.close()

        return run

    def rest_client(i):
        def run():
            answers[i] = RestConnection(url).act(IMAGES[i], INSTRUCTIONS[i % 3], KEYS[i // 3])

        return run

    # The batch runs once 4 requests are queued (the wait is far longer than this test).
    with serving(ActionPredictor(chunked, processor), max_batch_size=4, max_wait_ms=1000 * WAIT_S) as (url, _, _):
        run_threads(openpi_client(0), rest_client(1), rest_client(2), openpi_client(3))

    assert sorted(calls) == [1, 3]  # robot_b: request 3; robot_a: the others
    assert timings[0]["batch_size"] == timings[3]["batch_size"] == 4
    for i in range(4):
        np.testing.assert_array_equal(answers[i], expected[i])


def test_a_request_that_fails_in_the_model_fails_alone_and_not_its_batch(processor, chunked):
    class Picky(ActionPredictor):
        def predict(self, requests_):
            if any(request.instruction == "poison" for request in requests_):
                raise ValueError("'poison' is not an instruction")
            return super().predict(requests_)

    texts = ["go left", "poison", "go right"]
    batch = [ActionRequest(IMAGES[i], text, "robot_a") for i, text in enumerate(texts)]
    results = Picky(chunked, processor, unnorm_key="robot_a")(batch)
    assert isinstance(results[1], ValueError) and "poison" in str(results[1])
    for i in (0, 2):
        np.testing.assert_array_equal(results[i], alone(chunked, processor, IMAGES[i], texts[i], "robot_a"))


REST_BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[1, 2]", 422, "JSON object"),
    ({"instruction": "go"}, 422, "no 'image' field"),
    ({"image": IMAGES[0]}, 422, "no 'instruction' field"),
    ({"image": IMAGES[0][..., :2], "instruction": "go"}, 422, "[64, 80, 2]"),
    ({"image": IMAGES[0].transpose(2, 0, 1).copy(), "instruction": "go"}, 422, "channels first"),
    ({"image": IMAGES[0][..., 0], "instruction": "go"}, 422, "[H, W, 3]"),
    ({"image": IMAGES[0][:16].astype(np.float32), "instruction": "go"}, 422, "uint8"),
    ({"image": np.zeros((0, 0, 3), np.uint8), "instruction": "go"}, 422, "empty"),
    ({"image": IMAGES[0][:8].tolist(), "instruction": "go"}, 422, "numpy uint8 array"),
    ({"image": IMAGES[0], "instruction": ""}, 422, "non-empty string"),
    ({"image": IMAGES[0], "instruction": "go" * 600}, 422, "at most"),
    ({"image": IMAGES[0], "instruction": "go", "unnorm_key": "robot_c"}, 422, "['robot_a', 'robot_b']"),
    ({"image": IMAGES[0], "instruction": "go", "unnorm_key": 3}, 422, "unnorm_key"),
    ({"encoded": "{bad"}, 400, "not valid JSON"),
    ({"encoded": "{}", "image": 1}, 422, "exactly"),
    ({"image": np.zeros((200, 200, 3), np.uint8), "instruction": "go"}, 413, "limit"),
    ('{"image": {"__numpy__": "AAAA", "dtype": "|O", "shape": [1]}, "instruction": "go"}', 400, "refused"),
    ('{"image": {"__numpy__": "AAAA", "dtype": "|u1", "shape": [2, 2, 3]}, "instruction": "go"}', 400, "decode"),
]


def ws_bad_cases() -> list[tuple[bytes | str, int, str]]:
    image = {"observation/image": IMAGES[0]}
    return [
        (b"\xc1\x00", 400, "not valid msgpack"),
        ("hello", 400, "binary"),
        (pack_msgpack([1, 2]), 422, "map"),
        (pack_msgpack(image), 422, "no 'prompt' field"),
        (pack_msgpack({"prompt": "go"}), 422, "no 'observation/image' field"),
        (pack_msgpack({**image, "prompt": "go", "unnorm_key": "robot_c"}), 422, "['robot_a', 'robot_b']"),
        (pack_msgpack({"observation/image": IMAGES[0][:16].astype(np.float64), "prompt": "go"}), 422, "uint8"),
        (pack_msgpack({"observation/image": np.zeros((200, 200, 3), np.uint8), "prompt": "go"}), 413, "limit"),
    ]


def test_bad_requests_are_refused_with_a_reason_and_good_ones_from_other_clients_succeed(processor, chunked):
    limit = 64 * 2**10  # the good frames (15 KB) fit, a 200 x 200 frame does not
    expected = {i: alone(chunked, processor, IMAGES[i], INSTRUCTIONS[i % 3], "robot_a") for i in range(3)}

    def good_openpi():
        connection = OpenPIConnection(url)
        for round_ in range(6):
            i = round_ % 3
            answer = connection.infer({"observation/image": IMAGES[i], "prompt": INSTRUCTIONS[i]})
            np.testing.assert_array_equal(answer["actions"], expected[i])

    def good_rest():
        connection = RestConnection(url)
        for round_ in range(6):
            i = (round_ + 1) % 3
            np.testing.assert_array_equal(connection.act(IMAGES[i], INSTRUCTIONS[i]), expected[i])

    def bad_rest():
        for _ in range(2):
            for payload, status, reason in REST_BAD:
                response = post_act(url, payload)
                assert response.status_code == status, (
                    payload if isinstance(payload, bytes) else reason,
                    response.text,
                )
                assert reason in response.json()["detail"], response.text
        chunked_upload = post_act(url, iter([b'{"image": "' + b"A" * (2 * limit) + b'"}']))  # no Content-Length
        assert chunked_upload.status_code == 413 and "limit" in chunked_upload.json()["detail"]

    def bad_openpi():
        with websockets.sync.client.connect(f"ws://127.0.0.1:{port_of(url)}", max_size=None) as connection:
            connection.recv(timeout=WAIT_S)  # metadata
            for message, status, reason in ws_bad_cases():
                connection.send(message)
                answer = connection.recv(timeout=WAIT_S)
                assert isinstance(answer, str), reason
                error = json.loads(answer)
                assert error["status"] == status and reason in error["detail"], answer
            # The connection stays usable after refusals.
            connection.send(pack_msgpack({"observation/image": IMAGES[0], "prompt": INSTRUCTIONS[0]}))
            assert isinstance(connection.recv(timeout=WAIT_S), bytes)
            # Past twice the limit the message is not even read: the connection closes with 1009.
            connection.send(pack_msgpack({"observation/image": np.zeros((400, 400, 3), np.uint8), "prompt": "go"}))
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                connection.recv(timeout=WAIT_S)
            assert closed.value.rcvd.code == 1009

    predictor = ActionPredictor(chunked, processor, unnorm_key="robot_a")
    with serving(predictor, max_batch_size=8, max_wait_ms=20, max_request_bytes=limit) as (url, service, _):
        run_threads(good_openpi, good_rest, bad_rest, bad_openpi)
        health = requests.get(f"{url}/healthz", timeout=WAIT_S).json()
        assert health == {"status": "ok", "in_flight": 0}
        np.testing.assert_array_equal(RestConnection(url).act(IMAGES[2], INSTRUCTIONS[2]), expected[2])


class GatedPredictor:
    """An `ActionPredictor` whose batches wait for the test's go-ahead, recording the instructions of each batch."""

    def __init__(self, predictor: ActionPredictor):
        self.predictor = predictor
        self.release = threading.Event()
        self.batches: list[list[str]] = []

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def __call__(self, requests_):
        self.batches.append([request.instruction for request in requests_])
        assert self.release.wait(WAIT_S)
        return self.predictor(requests_)


def test_a_client_that_disconnects_mid_request_does_not_stall_the_others(processor, chunked):
    predictor = GatedPredictor(ActionPredictor(chunked, processor, unnorm_key="robot_a"))
    answers = {}
    with serving(predictor, max_batch_size=1, max_wait_ms=0) as (url, service, _):
        first = threading.Thread(target=lambda: answers.update(first=RestConnection(url).act(IMAGES[0], "first")))
        first.start()
        wait_until(lambda: predictor.batches == [["first"]], "the first batch")

        body = json_numpy.dumps({"image": IMAGES[1], "instruction": "rest leaver"}).encode()
        leaver = socket.create_connection(("127.0.0.1", port_of(url)), timeout=WAIT_S)
        leaver.sendall(
            b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        wait_until(lambda: service.in_flight == 2, "the leaving REST request to be queued")
        ws_leaver = OpenPIConnection(url)
        ws_leaver.send({"observation/image": IMAGES[2], "prompt": "ws leaver"})
        wait_until(lambda: service.in_flight == 3, "the leaving websocket request to be queued")
        leaver.close()
        ws_leaver.close()
        wait_until(lambda: service.in_flight == 2, "the REST disconnect to be noticed")

        stayer = OpenPIConnection(url)
        stayer.send({"observation/image": IMAGES[3], "prompt": "stayer"})
        predictor.release.set()
        np.testing.assert_array_equal(
            stayer.receive()["actions"], alone(chunked, processor, IMAGES[3], "stayer", "robot_a")
        )
        first.join(WAIT_S)
        np.testing.assert_array_equal(answers["first"], alone(chunked, processor, IMAGES[0], "first", "robot_a"))
        wait_until(lambda: service.in_flight == 0, "every request to finish")
        assert ["rest leaver"] not in predictor.batches  # dropped from the queue when its client left
        assert requests.get(f"{url}/healthz", timeout=WAIT_S).json()["status"] == "ok"


def test_api_key_is_required_on_both_protocols(processor, chunked):
    openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")
    with serving(ActionPredictor(chunked, processor, unnorm_key="robot_a"), api_key="s3cret") as (url, _, _):
        payload = {"image": IMAGES[0], "instruction": INSTRUCTIONS[0]}
        for headers in ({}, {"Authorization": "Api-Key wrong"}, {"Authorization": "s3cret"}):
            response = post_act(url, payload, headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["detail"]
        assert requests.get(f"{url}/metadata", timeout=WAIT_S).status_code == 401
        assert requests.get(f"{url}/healthz", timeout=WAIT_S).status_code == 200
        for authorization in ("Api-Key s3cret", "Bearer s3cret"):
            assert post_act(url, payload, headers={"Authorization": authorization}).status_code == 200

        for key in (None, "wrong"):
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=port_of(url), api_key=key)
            assert refused.value.response.status_code == 401
        client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=port_of(url), api_key="s3cret")
        answer = client.infer({"observation/image": IMAGES[0], "prompt": INSTRUCTIONS[0]})
        np.testing.assert_array_equal(
            answer["actions"], alone(chunked, processor, IMAGES[0], INSTRUCTIONS[0], "robot_a")
        )

        for protocol in ("openpi", "rest"):
            with pytest.raises(ServerRefusedError, match="API key") as refused:
                RemotePolicy(url, protocol=protocol)
            assert refused.value.status == 401
            with RemotePolicy(url, api_key="s3cret", protocol=protocol) as policy:
                assert policy.select_action(IMAGES[0], INSTRUCTIONS[0]).shape == (7,)


def test_shutdown_refuses_new_requests_and_answers_those_in_flight(processor, chunked):
    predictor = GatedPredictor(ActionPredictor(chunked, processor, unnorm_key="robot_a"))
    answers = {}
    with serving(predictor, max_batch_size=4, max_wait_ms=1000 * WAIT_S) as (url, service, server):
        connection = OpenPIConnection(url)

        def in_flight_rest():
            answers["rest"] = RestConnection(url).act(IMAGES[0], INSTRUCTIONS[0])

        def in_flight_openpi():
            answers["openpi"] = connection.infer({"observation/image": IMAGES[1], "prompt": INSTRUCTIONS[1]})["actions"]

        clients = [threading.Thread(target=target) for target in (in_flight_rest, in_flight_openpi)]
        for client in clients:
            client.start()
        wait_until(lambda: service.in_flight == 2, "two requests in flight")
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        wait_until(lambda: service.draining, "draining")
        wait_until(lambda: len(predictor.batches) == 1, "the queued batch to run at once")
        response = post_act(url, {"image": IMAGES[2], "instruction": "too late"})
        assert response.status_code == 503 and "shutting down" in response.json()["detail"]
        assert not server.should_exit
        predictor.release.set()
        for client in clients:
            client.join(WAIT_S)
        wait_until(lambda: server.should_exit, "the server to exit")
    np.testing.assert_array_equal(answers["rest"], alone(chunked, processor, IMAGES[0], INSTRUCTIONS[0], "robot_a"))
    np.testing.assert_array_equal(answers["openpi"], alone(chunked, processor, IMAGES[1], INSTRUCTIONS[1], "robot_a"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_to_the_server_process_answers_requests_in_flight_first(processor, chunked, tmp_path):
    chunked.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        str(REPO / "scripts" / "serve.py"),
        "--model",
        str(tmp_path),
        "--port",
        str(port),
        "--unnorm_key",
        "robot_b",
        "--max_batch_size",
        "8",
        "--max_wait_ms",
        str(1000 * WAIT_S),
        "--log_level",
        "warning",
    ]
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=stderr)
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return requests.get(f"{url}/healthz", timeout=1).ok
            except requests.ConnectionError:
                return False

        deadline = time.monotonic() + 300  # loading the model in a fresh interpreter
        while not ready():
            assert time.monotonic() < deadline, "scripts/serve.py did not start"
            time.sleep(0.2)
        answers = {}
        clients = [
            threading.Thread(target=lambda: answers.update(rest=RestConnection(url).act(IMAGES[0], INSTRUCTIONS[0]))),
            threading.Thread(
                target=lambda: answers.update(
                    openpi=OpenPIConnection(url).infer({"observation/image": IMAGES[1], "prompt": INSTRUCTIONS[1]})[
                        "actions"
                    ]
                )
            ),
        ]
        for client in clients:
            client.start()
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=WAIT_S).json()["in_flight"] == 2, "2 in flight")
        process.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(WAIT_S)
        process.wait(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    np.testing.assert_array_equal(answers["rest"], alone(chunked, processor, IMAGES[0], INSTRUCTIONS[0], "robot_b"))
    np.testing.assert_array_equal(answers["openpi"], alone(chunked, processor, IMAGES[1], INSTRUCTIONS[1], "robot_b"))
    assert process.returncode in (0, -signal.SIGTERM), log.read_text()


def test_batcher_and_command_line_options():
    from serve import parse_args

    args = parse_args(["--model", "some/model"])
    assert (args.host, args.port, args.max_batch_size, args.max_wait_ms, args.api_key) == (
        "127.0.0.1",
        8000,
        16,
        5.0,
        None,
    )
    assert args.image_key == "observation/image"
    with pytest.raises(ValueError, match="max_batch_size=0"):
        DynamicBatcher(lambda batch: [], max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms=-1"):
        DynamicBatcher(lambda batch: [], max_wait_ms=-1)


def test_benchmark_load_run_reports_its_figures(processor, chunked):
    import benchmark_serve

    assert benchmark_serve.parse_args(["--quick"]).clients == [1, 4]
    with serving(ActionPredictor(chunked, processor, unnorm_key="robot_a"), max_batch_size=4) as (url, _, _):
        row = benchmark_serve.run_load(url, clients=2, requests_per_client=3, image_size=64, max_batch_size=4)
    assert (row.clients, row.requests, row.max_batch_size) == (2, 6, 4)
    assert row.actions_per_s == pytest.approx(CHUNK * row.requests_per_s)
    assert 0 < row.latency_ms_p50 <= row.latency_ms_p95 <= row.latency_ms_p99
    assert 1 <= row.mean_batch_size <= 2 and row.infer_ms_p99 > 0


def readme_serving_snippets() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Serve it to a robot\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if section is None:
        pytest.skip("README.md has no 'Serve it to a robot' section yet.")
    return re.findall(r"```python\n(.*?)```", section.group(1), flags=re.S)


def test_readme_client_snippets_run_as_written(processor, chunked):
    pytest.importorskip("openpi_client")
    snippets = readme_serving_snippets()
    assert len(snippets) == 3
    with serving(ActionPredictor(chunked, processor, unnorm_key="robot_a")) as (url, _, _):
        for snippet in snippets:
            code = snippet.replace("8000", str(port_of(url)))
            completed = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            assert completed.returncode == 0, completed.stderr[-3000:]


def test_evaluator_drives_a_served_model_as_it_drives_the_local_one(processor, chunked, tmp_path):
    """`scripts/evaluate.py --server URL` runs the same closed-loop episodes through RemotePolicy as `--model PATH`
    runs locally, and gets the same per-episode outcomes."""
    from evaluate import main as evaluate_main

    tabletop_processor = make_processor(processor.tokenizer, image_size=56)
    folder = tmp_path / "model"
    chunked.save_pretrained(folder)
    tabletop_processor.save_pretrained(folder)
    common = ["--env", "tabletop", "--episodes", "3", "--batch_size", "3", "--unnorm_key", "robot_a"]
    evaluate_main([*common, "--model", str(folder), "--json", str(tmp_path / "local.json")])
    with serving(ActionPredictor(chunked, tabletop_processor, unnorm_key="robot_a")) as (url, _, _):
        evaluate_main([*common, "--server", url, "--json", str(tmp_path / "served.json")])
    local, served = (json.loads((tmp_path / name).read_text()) for name in ("local.json", "served.json"))
    assert served["model"] == local["model"]
    assert local["settings"]["unnorm_key"] == served["settings"]["unnorm_key"] == "robot_a"
