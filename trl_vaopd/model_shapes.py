"""Qwen3-VL model shapes: the published Qwen3-VL-2B / 8B ones and parametrised tiny ones, built with random weights.

One place for these model-family facts: the benchmarks, the cost model, the GPU check and the real-width tests all
read them here. Everything is random-initialised from hand-written config dicts; nothing is downloaded. The models use
the tokenizer of `trl_vaopd.tiny_models` (so the special-token ids line up) with a model vocabulary that may exceed
the tokenizer's, as real checkpoints pad their heads: the extra rows are never decoded (the student may sample them,
which is all a benchmark needs; the trainer compares heads of different sizes over the tokenizer's tokens).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from unittest import mock

import torch
from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from .tiny_models import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)


__all__ = [
    "REAL_SHAPES",
    "ModelShape",
    "build_qwen3_vl",
    "merged_tokens",
    "param_bytes",
    "qwen3_vl_config",
    "special_token_ids",
    "tiny_shape",
]

#: Qwen3-VL's vision patch side and spatial merge: one merged visual token per 32 x 32 pixels
PATCH_SIZE, MERGE_SIZE = 16, 2


@dataclass(frozen=True)
class ModelShape:
    """A Qwen3-VL shape: text decoder, vision tower, vocabulary."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]
    vision_hidden: int
    vision_depth: int
    vision_intermediate: int
    vision_heads: int
    deepstack: tuple[int, ...]
    vision_positions: int
    vocab: int | None = None  # None: the tokenizer's size
    tie_embeddings: bool = False

    def describe(self) -> dict:
        return asdict(self)

    def shallow(self, layers: int = 2, vision_depth: int = 2) -> ModelShape:
        """The same widths, heads and vocabulary with `layers` decoder layers and a `vision_depth`-block tower.

        DeepStack stays on: the tower's first blocks (as many as the full shape taps, at most `vision_depth`) add their
        features to what leaves the first decoder layers, as the real taps do after layers 0, 1 and 2; never after
        the last layer, where they would reach no completion token.
        """
        taps = min(len(self.deepstack), vision_depth, layers - 1)
        return replace(self, layers=layers, vision_depth=vision_depth, deepstack=tuple(range(taps)))


def tiny_shape(hidden: int, layers: int = 2, vocab: int | None = None) -> ModelShape:
    """A tiny text decoder of width `hidden` (head_dim 16, 2x GQA) on a fixed 2-block, 32-wide vision tower."""
    heads = max(1, hidden // 16)
    return ModelShape(
        hidden=hidden,
        layers=layers,
        intermediate=2 * hidden,
        heads=heads,
        kv_heads=max(1, heads // 2),
        head_dim=16,
        mrope_section=(4, 2, 2),
        vision_hidden=32,
        vision_depth=2,
        vision_intermediate=64,
        vision_heads=2,
        deepstack=(0,),
        vision_positions=64,
        vocab=vocab,
    )


#: The published shapes of Qwen3-VL-2B-Instruct (student) and Qwen3-VL-8B-Instruct (teacher), the paper's pair
REAL_SHAPES: dict[str, ModelShape] = {
    "student": ModelShape(
        hidden=2048,
        layers=28,
        intermediate=6144,
        heads=16,
        kv_heads=8,
        head_dim=128,
        mrope_section=(24, 20, 20),
        vision_hidden=1024,
        vision_depth=24,
        vision_intermediate=4096,
        vision_heads=16,
        deepstack=(5, 11, 17),
        vision_positions=2304,
        vocab=151936,
        tie_embeddings=True,
    ),
    "teacher": ModelShape(
        hidden=4096,
        layers=36,
        intermediate=12288,
        heads=32,
        kv_heads=8,
        head_dim=128,
        mrope_section=(24, 20, 20),
        vision_hidden=1152,
        vision_depth=27,
        vision_intermediate=4304,
        vision_heads=16,
        deepstack=(8, 16, 24),
        vision_positions=2304,
        vocab=151936,
        tie_embeddings=False,
    ),
}


def merged_tokens(side: int) -> int:
    """Visual tokens a `side` x `side` image becomes in Qwen3-VL's language model (a multiple of 32 pixels)."""
    if side % (PATCH_SIZE * MERGE_SIZE):
        raise ValueError(f"image side {side} is not a multiple of {PATCH_SIZE * MERGE_SIZE} pixels")
    return (side // (PATCH_SIZE * MERGE_SIZE)) ** 2


def special_token_ids(tokenizer) -> list[int]:
    """Ids of every special token of the tiny tokenizer (suppressed during sampling so lengths are forced)."""
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS})


def qwen3_vl_config(shape: ModelShape, tokenizer) -> Qwen3VLConfig:
    """The `Qwen3VLConfig` of a shape, with the special-token ids of `tokenizer` (a `trl_vaopd.tiny_models` one)."""
    pad_id, eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT), tokenizer.convert_tokens_to_ids(IM_END)
    vocab = shape.vocab if shape.vocab is not None else len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"model vocabulary {vocab} is smaller than the tokenizer's {len(tokenizer)}")
    text = {
        "vocab_size": vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": 32768,
        "pad_token_id": pad_id,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": list(shape.mrope_section),
            "mrope_interleaved": True,
        },
    }
    vision = {
        "hidden_size": shape.vision_hidden,
        "intermediate_size": shape.vision_intermediate,
        "num_heads": shape.vision_heads,
        "depth": shape.vision_depth,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        "out_hidden_size": shape.hidden,
        "hidden_act": "gelu_pytorch_tanh",
        "num_position_embeddings": shape.vision_positions,
        "deepstack_visual_indexes": list(shape.deepstack),
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PAD),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_PAD),
        vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(VISION_END),
        tie_word_embeddings=shape.tie_embeddings,
    )
    for cfg in (config, config.get_text_config()):
        cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = pad_id, eos_id, pad_id
    return config


@contextmanager
def _transformers_init_only():
    """Skip torch's default initialisers while modules are built: transformers' `_init_weights` then sets every
    weight once (normal, std 0.02; norms one; biases zero), which halves the build time of a real-width model."""
    skipped = ("kaiming_uniform_", "uniform_", "normal_")
    with mock.patch.multiple(torch.nn.init, **{name: lambda tensor, *args, **kwargs: tensor for name in skipped}):
        yield


def build_qwen3_vl(
    shape: ModelShape, tokenizer, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Qwen3VLForConditionalGeneration:
    """A random-initialised `Qwen3VLForConditionalGeneration` of `shape`, created directly on `device`."""
    config = qwen3_vl_config(shape, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device != "cpu":
            torch.cuda.manual_seed_all(seed)
        with torch.device(device), _transformers_init_only():
            model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    pad_id, eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT), tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    return model


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters of `model` (`parameters()` yields a tied weight once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
