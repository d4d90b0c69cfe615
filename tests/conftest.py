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


def question(index: int) -> str:
    """The question of row `index`: lengths vary, so a batch of prompts is left-padded."""
    return f"What number is shown in picture {index}?" + " Look closely." * (index % 3)


def cue(index: int) -> str:
    """ViCuR's cue of row `index`: a description of what its image shows."""
    return f"a white {index} on noise"


def image_question_dataset(num_prompts: int = 8, cues: bool = False) -> Dataset:
    rows = [
        {"prompt": [{"role": "user", "content": question(i)}], "images": [noise_image(i)]} for i in range(num_prompts)
    ]
    if cues:
        for i, row in enumerate(rows):
            row["cue"] = cue(i)
    return Dataset.from_list(rows)


def with_image_parts(dataset):
    """TRL's multimodal prompt format: the image's place in the prompt is an `{"type": "image"}` part."""

    def convert(row):
        text = row["prompt"][0]["content"]
        return {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]}

    return dataset.map(convert)


def pad_output_head(model, rows: int, seed: int):
    """The model with `rows` padding rows appended to its vocabulary (as checkpoints pad their heads), large random
    ones: comparing them, or sampling them, would move much of the probability mass."""
    import torch

    size = model.get_output_embeddings().weight.size(0)
    model.resize_token_embeddings(size + rows, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (model.get_output_embeddings().weight, model.get_input_embeddings().weight):
            weight[size:] = 3 * torch.randn(weight[size:].shape, generator=generator)
    return model


def make_args(tmp_path, **overrides):
    """A tiny CPU VAOPDConfig for one step; plain SGD with lr 1 makes a step's update exactly minus the gradient."""
    from trl_vaopd import VAOPDConfig

    settings = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        num_generations=4,
        max_completion_length=6,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        # Plain SGD with lr 1 and no clipping: a step's parameter change is exactly minus the gradient
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    settings.update(overrides)
    return VAOPDConfig(**settings)


@pytest.fixture(scope="session")
def tokenizer():
    from trl_vaopd.tiny_models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def processors(tokenizer):
    from trl_vaopd.tiny_models import TINY_FAMILIES, build_processor

    return {family: build_processor(family, tokenizer) for family in TINY_FAMILIES}
