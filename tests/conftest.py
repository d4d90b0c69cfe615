"""Shared offline fixtures: tiny tokenizer, processors, models and an image-question dataset."""

import os

import numpy as np
import pytest
from datasets import Dataset
from PIL import Image


# Tests never touch the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def noise_image(index: int, size: int = 32) -> Image.Image:
    """A deterministic image with fine detail, so that pixelation changes what the teacher sees."""
    return Image.fromarray(np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8))


def image_question_dataset(num_prompts: int = 8) -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"What number is shown in picture {i}?"}],
                "images": [noise_image(i)],
            }
            for i in range(num_prompts)
        ]
    )


@pytest.fixture(scope="session")
def tokenizer():
    from trl_vaopd.tiny_models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def processors(tokenizer):
    from trl_vaopd.tiny_models import TINY_FAMILIES, build_processor

    return {family: build_processor(family, tokenizer) for family in TINY_FAMILIES}
