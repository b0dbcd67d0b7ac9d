"""Shared fixtures: the shipped tiny tokenizer, a processor, tiny models and images. Everything is offline and seeded."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer  # noqa: E402

from configuration_openvla import OpenVLAConfig  # noqa: E402
from modeling_openvla import OpenVLAForActionPrediction  # noqa: E402
from processing_openvla import OpenVLAImageProcessor, OpenVLAProcessor  # noqa: E402

TOKENIZER_DIR = REPO / "assets" / "tokenizer"
TINY = {"image_size": 56, "vision_dim": 64, "hidden_dim": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def make_processor(tokenizer, image_size: int = 56, **kwargs) -> OpenVLAProcessor:
    return OpenVLAProcessor(image_processor=OpenVLAImageProcessor(image_size=image_size), tokenizer=tokenizer, **kwargs)


@pytest.fixture
def processor(tokenizer):
    return make_processor(tokenizer)


def make_model(tokenizer, seed: int = 0, **overrides) -> OpenVLAForActionPrediction:
    """A tiny randomly initialised model that matches `make_processor(tokenizer)`."""
    torch.manual_seed(seed)
    options = {**TINY, "vocab_size": len(tokenizer), "dropout": 0.0, **overrides}
    return OpenVLAForActionPrediction(OpenVLAConfig.small_config(**options)).eval()


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


def random_images(count: int, seed: int = 0, size: tuple[int, int] = (64, 80)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def assert_equal_up_to_float_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """For the same model computing from weights that now sit elsewhere in memory (after a save and reload, or in
    another process): float32 kernels may take alignment- or ISA-dependent paths (seen on AVX2-only CPUs, where
    reloaded weights gave actions 4.7e-10 away), so equality holds only within rounding. Weights themselves, which
    are copied and not computed, are compared with `torch.equal`."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


INSTRUCTIONS = ["move to the red block", "push the blue ball to the left", "go to the green cube now please"]


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from threads, and on a busy machine idle OpenMP threads spinning cost 10x the time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
