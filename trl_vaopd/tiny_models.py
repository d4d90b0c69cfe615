"""Tiny, random-initialised vision-language models built locally, with no download.

The test suite, the examples, the notebook and the demo need real VLMs (the real ``transformers`` processor and
``...ForConditionalGeneration`` classes, so that TRL's trainers exercise their true code paths) but cannot reach the
Hugging Face Hub. This module builds everything from scratch in well under a second per model:

* :func:`build_tokenizer` trains a small byte-level BPE tokenizer with the ``tokenizers`` library, carrying the special
  tokens of every supported family and a ChatML chat template.
* :func:`build_processor` wraps it in the family's real processor (``Qwen3VLProcessor``, ``Qwen2_5_VLProcessor``,
  ``Qwen2VLProcessor``, ``LlavaProcessor``, ``LlavaNextProcessor``, ``LlavaOnevisionProcessor``,
  ``Gemma3Processor``,
  ``Idefics3Processor``, ``InternVLProcessor``, ``Glm4vProcessor``, ``SmolVLMProcessor``, ``Gemma4Processor``) with image/video processors sized so a 32x32 image yields only a handful of visual tokens.
* :func:`build_model` instantiates the family's real ``...ForConditionalGeneration`` class with a couple of layers,
  tiny hidden sizes and a vocabulary equal to ``len(tokenizer)``; the ``"teacher"`` size is wider than the
  ``"student"`` size but shares the vocabulary, as distillation requires.
* :func:`build_tiny_vlm` / :func:`save_tiny_vlm` are conveniences; the latter writes a directory that
  ``AutoModelForImageTextToText`` / ``AutoProcessor`` (and hence TRL, given a path string) reload offline.

Every builder is deterministic from its ``seed``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    Gemma4AudioFeatureExtractor,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessor,
    Gemma4Processor,
    Gemma4VideoProcessor,
    GenerationConfig,
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessor,
    Glm4vProcessor,
    Glm4vVideoProcessor,
    GotOcr2ImageProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)

from .families import FAMILIES
from .names import did_you_mean


__all__ = [
    "GEMMA3_CHAT_TEMPLATE",
    "INTERNVL_CHAT_TEMPLATE",
    "LLAVA_ONEVISION_CHAT_TEMPLATE",
    "LLAVA_CHAT_TEMPLATE",
    "MODEL_SIZES",
    "QWEN_CHAT_TEMPLATE",
    "TINY_FAMILIES",
    "build_model",
    "build_processor",
    "build_tiny_vlm",
    "build_tokenizer",
    "save_tiny_vlm",
]

#: Families this module can build: every family of :data:`trl_vaopd.families.FAMILIES`, in its order.
TINY_FAMILIES: tuple[str, ...] = tuple(FAMILIES)

#: Sizes accepted by :func:`build_model`.
MODEL_SIZES: tuple[str, ...] = ("student", "teacher")

# Special tokens. ChatML markers and the Qwen vision markers come first so their ids are small and stable; the Llava
# image placeholder is added too so a single tokenizer (hence a single vocabulary) serves every family.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
LLAVA_IMAGE = "<image>"
# SmolVLM's image markers, added to its processor's tokenizer (a copy) only
SMOLVLM_FAKE_IMAGE = "<fake_token_around_image>"
SMOLVLM_GLOBAL_IMAGE = "<global-img>"
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
    LLAVA_IMAGE,
)


def _chatml_template(image_placeholder: str, video_placeholder: str) -> str:
    """ChatML (Qwen-style) Jinja template; only the image/video placeholders differ between families."""
    # Written with explicit string literals and `-` whitespace control so no stray newline leaks into the render.
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}"
        "{{- '" + image_placeholder + "' -}}"
        "{%- elif part['type'] == 'video' -%}"
        "{{- '" + video_placeholder + "' -}}"
        "{%- elif part['type'] == 'text' -%}"
        "{{- part['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        # Every turn, the assistant's included, ends with the eos token `<|im_end|>`.
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- endif -%}"
    )


#: Chat template of the Qwen families: images render as ``<|vision_start|><|image_pad|><|vision_end|>``.
QWEN_CHAT_TEMPLATE: str = _chatml_template(
    VISION_START + IMAGE_PAD + VISION_END, VISION_START + VIDEO_PAD + VISION_END
)
#: Chat template of the Llava family: images render as the single ``<image>`` placeholder the processor expands.
LLAVA_CHAT_TEMPLATE: str = _chatml_template(LLAVA_IMAGE, LLAVA_IMAGE)

# The Qwen families: one image/video processor, the same vision markers and chat template
_QWEN_FAMILIES = ("qwen3_vl", "qwen2_5_vl", "qwen2_vl", "qwen3_vl_moe", "qwen3_5")
# Qwen3-VL-MoE and Qwen3.5 share Qwen3-VL's processors (their vision towers are Qwen3-VL's, Qwen3.5's without DeepStack)
_QWEN3_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5")

#: Chat template of the Gemma 3 family: images render as the begin-of-image marker (``<|vision_start|>`` here), which
#: the processor expands to the marker, the image tokens and the end-of-image marker.
GEMMA3_CHAT_TEMPLATE: str = _chatml_template(VISION_START, VISION_START)

#: Chat template of the LLaVA-OneVision family: images render as ``<image>``, videos as ``<|video_pad|>``.
LLAVA_ONEVISION_CHAT_TEMPLATE: str = _chatml_template(LLAVA_IMAGE, VIDEO_PAD)

#: Chat template of the InternVL family: images render as the image context token ``<|image_pad|>``, which the
#: processor expands to ``<|vision_start|>``, the image tokens and ``<|vision_end|>``.
INTERNVL_CHAT_TEMPLATE: str = _chatml_template(IMAGE_PAD, VIDEO_PAD)

# The video token Gemma 4's processor adds to its tokenizer
GEMMA4_VIDEO = "<|video|>"
#: Chat template of the Gemma 4 family: images render as one image token (``<|image_pad|>`` here), which the processor
#: expands to the begin-of-image marker, the image's tokens and the end-of-image marker.
GEMMA4_CHAT_TEMPLATE: str = _chatml_template(IMAGE_PAD, GEMMA4_VIDEO)

_CHAT_TEMPLATES: dict[str, str] = {
    **dict.fromkeys(_QWEN_FAMILIES, QWEN_CHAT_TEMPLATE),
    "llava": LLAVA_CHAT_TEMPLATE,
    "llava_next": LLAVA_CHAT_TEMPLATE,
    "llava_onevision": LLAVA_ONEVISION_CHAT_TEMPLATE,
    "gemma3": GEMMA3_CHAT_TEMPLATE,
    "idefics3": LLAVA_CHAT_TEMPLATE,
    "internvl": INTERNVL_CHAT_TEMPLATE,
    "glm4v": QWEN_CHAT_TEMPLATE,  # GLM-4V's markers `<|begin_of_image|>`, `<|image|>`, `<|end_of_image|>` are Qwen's here
    "smolvlm": LLAVA_CHAT_TEMPLATE,
    "gemma4": GEMMA4_CHAT_TEMPLATE,
}
# Gemma 3's processor reads its markers from named special tokens of the tokenizer; the tiny vocabulary's Qwen vision
# markers play them (named on a copy only: see `build_tokenizer` on why the shared tokenizer names no image token)
_GEMMA3_TOKENS = {"boi_token": VISION_START, "eoi_token": VISION_END, "image_token": IMAGE_PAD}
_GLM4V_TOKENS = {"image_token": IMAGE_PAD, "video_token": VIDEO_PAD}
# Gemma 4's processor also requires audio markers (it refuses any input without them); they extend the vocabulary
_GEMMA4_TOKENS = {
    **_GEMMA3_TOKENS,
    "boa_token": "<|audio_start|>",
    "eoa_token": "<|audio_end|>",
    "audio_token": "<|audio_pad|>",
}
_INTERNVL_TOKENS = {
    "start_image_token": VISION_START,
    "end_image_token": VISION_END,
    "context_image_token": IMAGE_PAD,
    "video_token": VIDEO_PAD,
}

# Vision patch geometry per family, mirroring the real checkpoints (Qwen3-VL and Qwen3-VL-MoE: 16, Qwen2-VL and
# Qwen2.5-VL: 14, all merging 2x2 patches into one LLM token). Llava uses a CLIP tower; 16-pixel patches give 4 tokens
# for a 32x32 image.
# Gemma 3's SigLIP tower: 8-pixel patches pooled 2x2, so a 32x32 image gives 4 tokens (real: 896 px, 14-pixel patches
# pooled 4x4 to 256 tokens).
_PATCH_SIZE: dict[str, int] = {
    "qwen3_vl": 16,
    "qwen2_5_vl": 14,
    "qwen2_vl": 14,
    "qwen3_vl_moe": 16,
    "llava": 16,
    "llava_next": 16,
    "llava_onevision": 16,
    "gemma3": 8,
    "idefics3": 8,
    "internvl": 8,
    "glm4v": 14,
    "smolvlm": 8,
    "qwen3_5": 16,
    "gemma4": 8,
}
# Gemma 3 average-pools 2x2 patches into one token, Idefics3 (and SmolVLM, its architecture) and InternVL shuffle them
# into one (`scale_factor`, `downsample_ratio` 0.5)
_GEMMA3_POOL = _IDEFICS3_SCALE = _INTERNVL_SCALE = 2
_MERGE_SIZE = 2
_TEMPORAL_PATCH_SIZE = 2

# Width of each model size. Only the widths differ: the vocabulary is the tokenizer's for both, since distillation
# compares full next-token distributions. A head dimension of 16 keeps the multimodal RoPE sections simple.
_HEAD_DIM = 16
_HIDDEN: dict[str, int] = {"student": 32, "teacher": 64}
_NUM_LAYERS = 2
_VISION_DEPTH = 2


def _builtin_corpus() -> list[str]:
    """Small deterministic English + arithmetic corpus, large enough to fill a ~512-token BPE vocabulary."""
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "What is the length? The length of the segment is shown in the image.",
        "What number is shown? The number shown in the picture is seven.",
        "Look at the image and answer the question with a single number.",
        "A triangle has three sides and a square has four equal sides.",
        "The red circle is to the left of the blue square.",
        "Count the objects in the picture and write the total.",
        "The answer is the sum of the two numbers.",
        "First, read the question carefully. Then, reason step by step.",
        "The area of a rectangle is its width times its height.",
        "The perimeter of a square is four times the side length.",
        "The student learns from the teacher by matching its predictions.",
        "There are five apples and two oranges on the table.",
        "The green line is longer than the yellow line.",
        "Therefore, the final answer is given below.",
        "The image shows a chart with bars of different heights.",
        "Which shape is the largest? The largest shape is the circle.",
        "How many dots are there? There are nine dots.",
        "The angle between the two lines is ninety degrees.",
        "Please describe the image in one short sentence.",
    ]
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    lines = list(sentences)
    # Arithmetic in both digits and words, so numbers and operators get their own merges.
    for a in range(13):
        for b in range(0, 13, 3):
            lines.append(f"{a} + {b} = {a + b}")
            lines.append(f"{a} * {b} = {a * b}")
            lines.append(f"The length is {a * 10 + b} cm, so the answer is {a + b}.")
    for i, w in enumerate(words):
        lines.append(f"The number {w} is written as {i}.")
        lines.append(f"{w.capitalize()} plus one is {words[(i + 1) % len(words)]}.")
    return lines


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 512, seed: int = 0
) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE tokenizer usable by every family in :data:`TINY_FAMILIES`.

    Args:
        corpus: Training texts; a small built-in English/arithmetic corpus when ``None``.
        vocab_size: Target vocabulary size, special tokens included (a small corpus may yield fewer tokens; the
            byte-level alphabet alone is 256 tokens, so this must be larger than ~270).
        seed: Accepted for API symmetry with the other builders. BPE training is deterministic, so the same corpus
            and ``vocab_size`` always give the same tokenizer; the seed does not change the result.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<|im_end|>`` as eos, ``<|endoftext|>`` as pad, left padding, the Qwen
        and Llava special tokens, and the ChatML chat template :data:`QWEN_CHAT_TEMPLATE`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    del seed  # Deterministic by construction (see docstring).
    texts = list(corpus) if corpus is not None else _builtin_corpus()
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (byte alphabet + special tokens)")

    # Byte-level BPE like Qwen's tokenizer: any string is encodable, so no unk token is needed.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # first ids: 0 = <|endoftext|>, 1 = <|im_start|>, ...
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = _wrap(backend)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _wrap(backend: Any, named_tokens: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a trained backend, with `named_tokens` (`{"image_token": ...}`) as
    attributes: the shared tokenizer names none, because the processors read them when present, and a Qwen
    `image_token` would make LlavaProcessor use `<|image_pad|>` instead of `<image>`."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=named_tokens or [t for t in SPECIAL_TOKENS if t not in (IM_END, ENDOFTEXT)],
        padding_side="left",
        model_max_length=4096,
    )


def _check_family(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise ValueError(
            f"Unknown family {family!r}; expected one of {TINY_FAMILIES}.{did_you_mean(family, TINY_FAMILIES)}"
        )


def _qwen_side(family: str, image_size: int) -> int:
    """Side (a multiple of patch * merge) an ``image_size`` square is resized to; at least 2 merged tokens wide."""
    factor = _PATCH_SIZE[family] * _MERGE_SIZE
    return max(2, round(image_size / factor)) * factor


def build_processor(
    family: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    image_size: int = 32,
    seed: int = 0,
) -> ProcessorMixin:
    """Build the family's real processor, configured for tiny images.

    Args:
        family: One of :data:`TINY_FAMILIES`.
        tokenizer: Tokenizer to wrap; a fresh :func:`build_tokenizer` one when ``None``. For the Qwen families it is
            used as is; for ``llava`` a copy is used, because that family needs its own chat template on the tokenizer
            as well (both are saved to the same ``chat_template.jinja``).
        image_size: Nominal image side. Qwen processors resize to ``2 * patch * merge`` pixels per side for 32 (so a
            32x32 image gives 4 visual tokens) and never beyond twice that side; Llava resizes/crops to exactly
            ``image_size`` (``(image_size // 16) ** 2`` visual tokens).
        seed: Seed for the tokenizer built when ``tokenizer`` is ``None``.

    Note:
        The tokenizer's ``padding_side`` is set to ``"left"``, as TRL's generation requires.

    Returns:
        The family's processor (``Qwen3VLProcessor`` for Qwen3-VL and Qwen3-VL-MoE, ``LlavaProcessor``, ...) whose
        ``chat_template`` renders image parts with the family's placeholder, so ``processor.apply_chat_template(...,
        tokenize=True, return_dict=True)`` works with PIL images in the messages. SmolVLM's processor needs the
        ``num2words`` package (in the ``dev`` extra).
    """
    _check_family(family)
    if tokenizer is None:
        tokenizer = build_tokenizer(seed=seed)
    chat_template = _CHAT_TEMPLATES[family]
    if family in ("gemma3", "internvl", "glm4v", "gemma4"):
        # Same vocabulary and ids, with the markers named (Gemma 4's audio markers added after them)
        named = {
            "gemma3": _GEMMA3_TOKENS,
            "internvl": _INTERNVL_TOKENS,
            "glm4v": _GLM4V_TOKENS,
            "gemma4": _GEMMA4_TOKENS,
        }[family]
        tokenizer = _wrap(copy.deepcopy(tokenizer.backend_tokenizer), named)
        tokenizer.chat_template = chat_template
    elif tokenizer.chat_template != chat_template:
        # Don't mutate the caller's (possibly shared) tokenizer; the copy keeps the same vocabulary and ids.
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = chat_template
    tokenizer.padding_side = "left"  # TRL generates from left-padded prompts

    if family in _QWEN_FAMILIES:
        patch = _PATCH_SIZE[family]
        side = _qwen_side(family, image_size)
        # min_pixels (`shortest_edge`) upsamples small images to `side`; max_pixels (`longest_edge`) caps big ones at
        # twice that side (16 visual tokens), keeping every sequence short.
        image_processor = Qwen2VLImageProcessor(
            size={"shortest_edge": side * side, "longest_edge": 4 * side * side},
            patch_size=patch,
            merge_size=_MERGE_SIZE,
            temporal_patch_size=_TEMPORAL_PATCH_SIZE,
        )
        # Videos get the same tiny per-frame budget. `cap_pixels_per_frame=True` opts into the reference
        # (qwen-vl-utils) per-frame cap that becomes transformers' default in v5.22, and silences its warning.
        video_kwargs: dict[str, Any] = {
            "patch_size": patch,
            "merge_size": _MERGE_SIZE,
            "temporal_patch_size": _TEMPORAL_PATCH_SIZE,
            "min_frames": 2,
            "max_frames": 8,
            "cap_pixels_per_frame": True,
            "max_video_tokens": 16,
        }
        if family in _QWEN3_FAMILIES:
            # Qwen3-VL's video budget counts pixels over all frames (t * h * w), Qwen2.5-VL's per frame (h * w).
            video_processor = Qwen3VLVideoProcessor(
                **video_kwargs,
                size={"shortest_edge": _TEMPORAL_PATCH_SIZE * side * side, "longest_edge": 8 * 4 * side * side},
            )
            return Qwen3VLProcessor(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=video_processor,
                chat_template=chat_template,
            )
        video_processor = Qwen2VLVideoProcessor(
            **video_kwargs, size={"shortest_edge": side * side, "longest_edge": 4 * side * side}
        )
        processor_cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
        return processor_cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=chat_template,
        )

    if family == "glm4v":
        # Qwen2-VL's patching (14-pixel patches, 2x2 merged, 2 frames per temporal patch) and pixel budget
        side = _qwen_side(family, image_size)
        geometry = {"patch_size": _PATCH_SIZE[family], "merge_size": _MERGE_SIZE, "temporal_patch_size": 2}
        size = {"shortest_edge": side * side, "longest_edge": 4 * side * side}
        return Glm4vProcessor(
            image_processor=Glm4vImageProcessor(size=size, **geometry),
            tokenizer=tokenizer,
            video_processor=Glm4vVideoProcessor(size=size, **geometry),
            chat_template=chat_template,
        )

    if family == "gemma4":
        side = _PATCH_SIZE[family] * _GEMMA3_POOL
        if image_size % side:
            raise ValueError(f"gemma4 needs an image_size that is a multiple of {side}, got {image_size}")
        # Images keep their size (real: resized to a budget of soft tokens), patches pooled 2x2 as Gemma 3's; the
        # patches are padded to the smallest budget Gemma 4 accepts (70 soft tokens) with -1 positions
        geometry = {"patch_size": _PATCH_SIZE[family], "pooling_kernel_size": _GEMMA3_POOL, "max_soft_tokens": 70}
        return Gemma4Processor(
            feature_extractor=Gemma4AudioFeatureExtractor(),  # required, unused: no audio
            image_processor=Gemma4ImageProcessor(do_resize=False, **geometry),
            tokenizer=tokenizer,
            video_processor=Gemma4VideoProcessor(do_resize=False, **geometry),
            chat_template=chat_template,
            image_seq_length=(image_size // side) ** 2,
        )

    if family == "gemma3":
        side = _PATCH_SIZE[family] * _GEMMA3_POOL
        if image_size % side:
            raise ValueError(f"gemma3 needs an image_size that is a multiple of {side}, got {image_size}")
        # Resized to a fixed square, as Gemma 3 does at 896 px (no pan-and-scan crops)
        return Gemma3Processor(
            image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
            tokenizer=tokenizer,
            chat_template=chat_template,
            image_seq_length=(image_size // side) ** 2,
        )

    if family in ("idefics3", "smolvlm"):
        side = _PATCH_SIZE[family] * _IDEFICS3_SCALE
        if image_size % side:
            raise ValueError(f"{family} needs an image_size that is a multiple of {side}, got {image_size}")
        # One global image of `image_size` pixels per side (no split into tiles)
        size = {"longest_edge": image_size}
        tiles = {"do_image_splitting": False, "size": size, "max_image_size": size}
        tokenizer = copy.deepcopy(tokenizer)  # its markers extend a copy: ids above the shared ones
        if family == "idefics3":
            # The processor adds its markers `<fake_token_around_image>` and `<end_of_utterance>` to the tokenizer
            return Idefics3Processor(
                image_processor=Idefics3ImageProcessor(**tiles),
                tokenizer=tokenizer,
                chat_template=chat_template,
                image_seq_len=(image_size // side) ** 2,
            )
        # SmolVLM's processor reads its markers from the tokenizer without adding them
        tokenizer.add_tokens([SMOLVLM_FAKE_IMAGE, SMOLVLM_GLOBAL_IMAGE], special_tokens=True)
        return SmolVLMProcessor(
            image_processor=SmolVLMImageProcessor(**tiles),
            tokenizer=tokenizer,
            video_processor=SmolVLMVideoProcessor(**tiles),
            chat_template=chat_template,
            image_seq_len=(image_size // side) ** 2,
        )

    if family == "internvl":
        side = _PATCH_SIZE[family] * _INTERNVL_SCALE
        if image_size % side:
            raise ValueError(f"internvl needs an image_size that is a multiple of {side}, got {image_size}")
        size = {"height": image_size, "width": image_size}
        # One tile per image (`max_patches=1`: no crops, hence no thumbnail), as for a small image at 448 px
        return InternVLProcessor(
            image_processor=GotOcr2ImageProcessor(size=size, max_patches=1),
            tokenizer=tokenizer,
            video_processor=InternVLVideoProcessor(size=size),
            image_seq_length=(image_size // side) ** 2,
            chat_template=chat_template,
        )

    if family == "llava_onevision":
        if image_size % _PATCH_SIZE[family]:
            raise ValueError(
                f"{family} needs an image_size that is a multiple of {_PATCH_SIZE[family]}, got {image_size}"
            )
        size = {"height": image_size, "width": image_size}
        # A base view resized to `image_size` plus the tiles of the best grid pinpoint, as LLaVA-NeXT (real: 384 px)
        return LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(
                size=size, image_grid_pinpoints=_llava_next_pinpoints(image_size)
            ),
            tokenizer=tokenizer,
            video_processor=LlavaOnevisionVideoProcessor(size=size),
            num_image_tokens=(image_size // _PATCH_SIZE[family]) ** 2,
            vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
            chat_template=chat_template,
            image_token=LLAVA_IMAGE,
            video_token=VIDEO_PAD,
        )

    # llava: CLIP-style resize + center crop to a fixed square, as llava-1.5 does at 336 px. llava_next: the same
    # square as the base view, plus the tiles of the best of its grid pinpoints (any resolution)
    if image_size % _PATCH_SIZE["llava"]:
        raise ValueError(
            f"{family} needs an image_size that is a multiple of {_PATCH_SIZE['llava']}, got {image_size}"
        )
    size = {"shortest_edge": image_size}
    crop_size = {"height": image_size, "width": image_size}
    if family == "llava_next":
        image_processor = LlavaNextImageProcessor(
            size=size, crop_size=crop_size, image_grid_pinpoints=_llava_next_pinpoints(image_size)
        )
    else:
        image_processor = LlavaImageProcessor(size=size, crop_size=crop_size)
    processor_cls = LlavaNextProcessor if family == "llava_next" else LlavaProcessor
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_PATCH_SIZE["llava"],
        # The CLIP tower prepends a CLS token (+1) that the "default" strategy drops again (-1).
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
        image_token=LLAVA_IMAGE,
    )


def _llava_next_pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-NeXT's candidate resolutions: one tile, or two side by side either way (real: up to 2x2 of 336 px)."""
    return [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]


def _split(processor_or_tokenizer: ProcessorMixin | PreTrainedTokenizerBase) -> tuple[Any, Any]:
    """Return ``(tokenizer, processor_or_None)`` from either a processor or a bare tokenizer."""
    if isinstance(processor_or_tokenizer, ProcessorMixin):
        return processor_or_tokenizer.tokenizer, processor_or_tokenizer
    return processor_or_tokenizer, None


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """Id of a required special token, with a clear error for tokenizers not built by :func:`build_tokenizer`."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"The tokenizer has no {token!r} token; build it with `build_tokenizer`.")
    return token_id


def _qwen_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    # The Qwen families place their vision markers by these ids; untied heads as in the released models
    return {
        "image_token_id": _token_id(tokenizer, IMAGE_PAD),
        "video_token_id": _token_id(tokenizer, VIDEO_PAD),
        "vision_start_token_id": _token_id(tokenizer, VISION_START),
        "vision_end_token_id": _token_id(tokenizer, VISION_END),
        "tie_word_embeddings": False,
    }


def _rope_heads(hidden: int) -> tuple[int, int]:
    """(attention heads, key/value heads) for a given width: head_dim 16 and 2x grouped-query attention."""
    heads = hidden // _HEAD_DIM
    return heads, max(1, heads // 2)


def _siglip_tower(family: str, hidden: int, heads: int, image_size: int) -> SiglipVisionConfig:
    """The tiny SigLIP vision tower of the families built on one (Gemma 3, LLaVA-OneVision)."""
    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=_VISION_DEPTH,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=_PATCH_SIZE[family],
    )


def _build_config(family: str, tokenizer: PreTrainedTokenizerBase, size: str, image_size: int) -> Any:
    """Tiny config of the family's real ``...ForConditionalGeneration`` class for one model size."""
    vocab = len(tokenizer)
    hidden = _HIDDEN[size]
    heads, kv_heads = _rope_heads(hidden)
    # Qwen convention: `<|endoftext|>` is both bos (never prepended by the template) and pad; `<|im_end|>` is eos.
    pad_id = bos_id = _token_id(tokenizer, ENDOFTEXT)
    eos_id = _token_id(tokenizer, IM_END)
    text_common: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": _NUM_LAYERS,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "pad_token_id": pad_id,
    }
    vision_common: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_heads": heads,
        "depth": _VISION_DEPTH,
        "patch_size": _PATCH_SIZE[family],
        "spatial_merge_size": _MERGE_SIZE,
        "temporal_patch_size": _TEMPORAL_PATCH_SIZE,
        "out_hidden_size": hidden,  # the merger projects straight into the text width
    }

    if family == "qwen3_5":
        text_config = dict(
            text_common,
            head_dim=_HEAD_DIM,
            # A gated delta net (linear attention) layer, then a full attention layer (real: 3 to 1)
            layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=_HEAD_DIM,
            linear_value_head_dim=_HEAD_DIM,
            linear_num_key_heads=kv_heads,
            linear_num_value_heads=heads,
            # Interleaved multimodal RoPE on half of each head (real: a quarter), its 4 frequency slots split (t, h, w)
            # as the real 11:11:10
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10_000_000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
                "partial_rotary_factor": 0.5,
            },
        )
        vision_config = dict(vision_common, hidden_act="gelu_pytorch_tanh", num_position_embeddings=64)
        config = Qwen3_5Config(text_config=text_config, vision_config=vision_config, **_qwen_token_ids(tokenizer))
    elif family in _QWEN3_FAMILIES:
        text_config = dict(
            text_common,
            head_dim=_HEAD_DIM,
            # Interleaved multimodal RoPE over head_dim/2 = 8 frequency slots, in the real model's 24:20:20 spirit.
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        )
        # Deepstack taps intermediate vision layers (real: 8/16/24 of 27) and feeds them into the first decoder
        # layers; with a 2-layer tower only layer 0 is intermediate, and it feeds decoder layer 0.
        vision_config = dict(
            vision_common,
            hidden_act="gelu_pytorch_tanh",
            num_position_embeddings=64,  # learned 8x8 position grid, bilinearly resampled to each image grid
            deepstack_visual_indexes=[0],
        )
        if family == "qwen3_vl_moe":
            # Four experts of a quarter of the dense MLP's width in every decoder layer (the dense model's parameter
            # count), two routed per token
            text_config.update(
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden // 2, decoder_sparse_step=1
            )
            config = Qwen3VLMoeConfig(
                text_config=text_config, vision_config=vision_config, **_qwen_token_ids(tokenizer)
            )
        else:
            config = Qwen3VLConfig(text_config=text_config, vision_config=vision_config, **_qwen_token_ids(tokenizer))
    elif family == "qwen2_vl":
        text_config = dict(
            text_common,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        )
        # Qwen2-VL's tower: `embed_dim` wide, projected by its merger to the text width `hidden_size`
        vision_config = {
            "embed_dim": hidden,
            "hidden_size": hidden,
            "mlp_ratio": 2,
            "num_heads": heads,
            "depth": _VISION_DEPTH,
            "patch_size": _PATCH_SIZE[family],
            "spatial_merge_size": _MERGE_SIZE,
            "temporal_patch_size": _TEMPORAL_PATCH_SIZE,
        }
        config = Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **_qwen_token_ids(tokenizer))
    elif family == "qwen2_5_vl":
        text_config = dict(
            text_common,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            # Sections split head_dim/2 = 8 frequency slots between (t, h, w), like the real 16:24:24.
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        )
        vision_config = dict(
            vision_common,
            hidden_act="silu",
            # Windowed attention in 112-px windows (4x4 merged tokens), the last block global, as in the real tower.
            window_size=112,
            fullatt_block_indexes=[_VISION_DEPTH - 1],
            tokens_per_second=2,
        )
        config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **_qwen_token_ids(tokenizer))
    elif family == "gemma3":
        text_config = Gemma3TextConfig(
            **text_common,
            head_dim=_HEAD_DIM,
            query_pre_attn_scalar=_HEAD_DIM,
            # One sliding-window layer and one global layer (real: 5 to 1); the window exceeds every tiny sequence
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=512,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=False,
        )
        vision_config = _siglip_tower(family, hidden, heads, image_size)
        config = Gemma3Config(
            text_config=text_config,
            vision_config=vision_config,
            mm_tokens_per_image=(image_size // (_PATCH_SIZE[family] * _GEMMA3_POOL)) ** 2,
            boi_token_index=_token_id(tokenizer, VISION_START),
            eoi_token_index=_token_id(tokenizer, VISION_END),
            image_token_index=_token_id(tokenizer, IMAGE_PAD),
            tie_word_embeddings=False,
        )
    elif family == "gemma4":
        text_config = dict(
            text_common,
            head_dim=_HEAD_DIM,
            global_head_dim=_HEAD_DIM,
            # One sliding-window layer and one global layer (real: 5 to 1); the window exceeds every tiny sequence
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=512,
            # Per-layer input embeddings, a quarter of the width (real: 256 of 1536 to 5376)
            vocab_size_per_layer_input=vocab,
            hidden_size_per_layer_input=hidden // 4,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=False,
        )
        vision_config = {
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": _VISION_DEPTH,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": _HEAD_DIM,
            "patch_size": _PATCH_SIZE[family],
            "pooling_kernel_size": _GEMMA3_POOL,
            "position_embedding_size": 64,  # learned positions along each axis, up to 64 patches
        }
        config = Gemma4Config(
            text_config=text_config,
            vision_config=vision_config,
            audio_config=None,
            boi_token_id=_token_id(tokenizer, VISION_START),
            eoi_token_id=_token_id(tokenizer, VISION_END),
            image_token_id=_token_id(tokenizer, IMAGE_PAD),
            video_token_id=_token_id(tokenizer, GEMMA4_VIDEO),
            tie_word_embeddings=False,
        )
    elif family in ("idefics3", "smolvlm"):
        text_config = LlamaConfig(
            **text_common,
            head_dim=_HEAD_DIM,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=False,
        )
        vision_config = {
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": _VISION_DEPTH,
            "num_attention_heads": heads,
            "image_size": image_size,
            "patch_size": _PATCH_SIZE[family],
        }
        config = (Idefics3Config if family == "idefics3" else SmolVLMConfig)(
            text_config=text_config,
            vision_config=vision_config,
            scale_factor=_IDEFICS3_SCALE,
            image_token_id=_token_id(tokenizer, LLAVA_IMAGE),
            tie_word_embeddings=False,
        )
    elif family == "glm4v":
        text_config = dict(
            text_common,
            # Rotary on half of each head (GLM's partial_rotary_factor), its 4 frequency slots split (t, h, w) as
            # the real 8:12:12
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10_000.0,
                "mrope_section": [2, 1, 1],
                "partial_rotary_factor": 0.5,
            },
        )
        vision_config = {
            "depth": _VISION_DEPTH,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_heads": heads,
            "patch_size": _PATCH_SIZE[family],
            "spatial_merge_size": _MERGE_SIZE,
            "temporal_patch_size": _TEMPORAL_PATCH_SIZE,
            "out_hidden_size": hidden,
            # The grid its learned position embeddings are resampled from
            "image_size": _qwen_side(family, image_size),
        }
        start, end = _token_id(tokenizer, VISION_START), _token_id(tokenizer, VISION_END)
        config = Glm4vConfig(
            text_config=text_config,
            vision_config=vision_config,
            image_token_id=_token_id(tokenizer, IMAGE_PAD),
            video_token_id=_token_id(tokenizer, VIDEO_PAD),
            image_start_token_id=start,
            image_end_token_id=end,
            video_start_token_id=start,
            video_end_token_id=end,
            tie_word_embeddings=False,
        )
    elif family == "llava_onevision":
        # LLaVA-OneVision: a Qwen2 text model over a SigLIP tower
        text_config = Qwen2Config(**text_common, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False)
        vision_config = _siglip_tower(family, hidden, heads, image_size)
        config = LlavaOnevisionConfig(
            vision_config=vision_config,
            text_config=text_config,
            image_token_index=_token_id(tokenizer, LLAVA_IMAGE),
            video_token_index=_token_id(tokenizer, VIDEO_PAD),
            image_grid_pinpoints=_llava_next_pinpoints(image_size),
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,  # the last layer, so every vision parameter receives a gradient
            tie_word_embeddings=False,
        )
    elif family == "internvl":
        # InternVL 3's text model is Qwen2's; its vision tower InternViT
        text_config = Qwen2Config(**text_common, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False)
        vision_config = InternVLVisionConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=_VISION_DEPTH,
            num_attention_heads=heads,
            image_size=[image_size, image_size],
            patch_size=[_PATCH_SIZE[family]] * 2,
        )
        config = InternVLConfig(
            text_config=text_config,
            vision_config=vision_config,
            image_token_id=_token_id(tokenizer, IMAGE_PAD),
            image_seq_length=(image_size // (_PATCH_SIZE[family] * _INTERNVL_SCALE)) ** 2,
            downsample_ratio=1 / _INTERNVL_SCALE,
            vision_feature_layer=-1,  # the last layer, so every vision parameter receives a gradient
            tie_word_embeddings=False,
        )
    else:  # llava, llava_next
        text_config = LlamaConfig(
            **text_common,
            head_dim=_HEAD_DIM,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=False,
        )
        vision_config = CLIPVisionConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=_VISION_DEPTH,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=_PATCH_SIZE["llava"],
            projection_dim=hidden,
        )
        num_image_tokens = (image_size // _PATCH_SIZE["llava"]) ** 2
        llava = {
            "vision_config": vision_config,
            "text_config": text_config,
            "image_token_id": _token_id(tokenizer, LLAVA_IMAGE),
            "image_seq_length": num_image_tokens,
            "vision_feature_select_strategy": "default",
            # Last layer rather than llava-1.5's -2, so every vision parameter receives a gradient.
            "vision_feature_layer": -1,
            "projector_hidden_act": "gelu",
            "tie_word_embeddings": False,
        }
        if family == "llava_next":
            config = LlavaNextConfig(**llava, image_grid_pinpoints=_llava_next_pinpoints(image_size))
        else:
            config = LlavaConfig(**llava)

    # Special ids on both the composite and the text config: generation reads the former, TRL the latter.
    for cfg in (config, config.get_text_config()):
        cfg.pad_token_id = pad_id
        cfg.eos_token_id = eos_id
        cfg.bos_token_id = bos_id
    return config


def build_model(
    family: str,
    processor_or_tokenizer: ProcessorMixin | PreTrainedTokenizerBase,
    size: str = "student",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Build a tiny random model of the family's real ``...ForConditionalGeneration`` class.

    Args:
        family: One of :data:`TINY_FAMILIES`.
        processor_or_tokenizer: The processor from :func:`build_processor` (preferred: the Llava vision tower is sized
            from its crop size) or the bare tokenizer (Llava then assumes 32x32 images). The model vocabulary is
            ``len(tokenizer)`` and the special token ids come from it.
        size: ``"student"`` (hidden 32) or ``"teacher"`` (hidden 64); both 2 decoder layers and a 2-block vision
            tower, and the same vocabulary.
        seed: Weights are a pure function of ``(family, tokenizer, size, seed)``; the global RNG state is preserved.
        dtype: Parameter dtype.

    Returns:
        The model, in eval mode, with ``generation_config`` eos (``<|im_end|>``, ``<|endoftext|>``), pad and bos set.
    """
    _check_family(family)
    if size not in MODEL_SIZES:
        raise ValueError(f"Unknown size {size!r}; expected one of {MODEL_SIZES}")
    tokenizer, processor = _split(processor_or_tokenizer)
    if family in ("idefics3", "smolvlm", "gemma4") and processor is None:
        # The vocabulary is that of the processor's tokenizer, which has the family's image markers added
        tokenizer, processor = _split(build_processor(family, tokenizer))
    image_size = 32
    if family in ("llava", "llava_next") and processor is not None:
        image_size = int(processor.image_processor.crop_size["height"])
    if family in ("gemma3", "llava_onevision") and processor is not None:
        image_size = int(processor.image_processor.size["height"])
    if family in ("idefics3", "smolvlm"):
        image_size = int(processor.image_processor.max_image_size["longest_edge"])
    if family == "internvl" and processor is not None:
        image_size = int(processor.image_processor.size["height"])
    config = _build_config(family, tokenizer, size, image_size)
    model_cls = {
        "qwen3_vl": Qwen3VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
        "llava": LlavaForConditionalGeneration,
        "llava_next": LlavaNextForConditionalGeneration,
        "llava_onevision": LlavaOnevisionForConditionalGeneration,
        "gemma3": Gemma3ForConditionalGeneration,
        "idefics3": Idefics3ForConditionalGeneration,
        "internvl": InternVLForConditionalGeneration,
        "glm4v": Glm4vForConditionalGeneration,
        "smolvlm": SmolVLMForConditionalGeneration,
        "qwen3_5": Qwen3_5ForConditionalGeneration,
        "gemma4": Gemma4ForConditionalGeneration,
    }[family]

    # Fork the RNG so seeding here neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        if family == "gemma3":
            # transformers starts Gemma 3's image projection at zero, which would hide the image from a random model;
            # a unit-scale random one passes the normalised image features on, as a trained projection does
            projection = model.model.multi_modal_projector.mm_input_projection_weight
            torch.nn.init.normal_(projection, std=projection.size(0) ** -0.5)
    model = model.to(dtype)
    model.eval()

    pad_id, eos_id = _token_id(tokenizer, ENDOFTEXT), _token_id(tokenizer, IM_END)
    # Like Qwen instruct checkpoints: stop on end-of-turn or end-of-text.
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    return model


def build_tiny_vlm(
    family: str = "qwen3_vl",
    size: str = "student",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    image_size: int = 32,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build ``(model, processor)`` for one family; pass the same ``tokenizer`` to get a student/teacher pair."""
    processor = build_processor(family, tokenizer=tokenizer, image_size=image_size, seed=seed)
    model = build_model(family, processor, size=size, seed=seed)
    return model, processor


def save_tiny_vlm(
    directory: str | os.PathLike,
    family: str = "qwen3_vl",
    size: str = "student",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    image_size: int = 32,
) -> str:
    """Build a tiny VLM and save model + processor to ``directory`` with ``save_pretrained``.

    The directory reloads offline with ``AutoModelForImageTextToText.from_pretrained`` and
    ``AutoProcessor.from_pretrained``, which is how TRL's trainers load a model given as a path string
    (``trl.trainer.utils.create_model_from_path``).

    Returns:
        ``directory`` as a string.
    """
    model, processor = build_tiny_vlm(family, size=size, seed=seed, tokenizer=tokenizer, image_size=image_size)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
